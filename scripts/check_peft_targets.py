#!/usr/bin/env python3
"""Which modules PEFT wraps with an adapter_config.json's `target_modules` on a multimodal Gemma 3
(`Gemma3ForConditionalGeneration`: the text model under `model.language_model`, a SigLIP vision
tower whose attention also has q_proj/k_proj/v_proj). Builds a tiny one from a config (random
weights: only the module paths matter), applies `peft.LoraConfig(target_modules=...)` as
`PeftModel.from_pretrained` would, and prints the wrapped modules' paths as a JSON list.

    ~/.cache/fuserl-oracle/venv/bin/python scripts/check_peft_targets.py ADAPTER_DIR/adapter_config.json

tests/model/lora.rs runs it on fuserl's export of a multimodal base (when the oracle environment
has peft, docs/oracle.md): every wrapped module must be the text model's.
"""
import json
import sys
import warnings

from peft import LoraConfig, get_peft_model
from transformers import Gemma3Config, Gemma3ForConditionalGeneration

warnings.filterwarnings("ignore")
adapter = json.load(open(sys.argv[1]))
config = Gemma3Config(
    text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=8, sliding_window=8, max_position_embeddings=64),
    vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       image_size=28, patch_size=14),
    mm_tokens_per_image=4,
)
model = get_peft_model(Gemma3ForConditionalGeneration(config),
                       LoraConfig(r=adapter["r"], lora_alpha=adapter["lora_alpha"],
                                  target_modules=adapter["target_modules"]))
prefix = "base_model.model."
print(json.dumps(sorted(n[len(prefix):] for n, m in model.named_modules() if hasattr(m, "lora_A") and n.startswith(prefix)
                        and hasattr(m, "base_layer"))))
