#!/usr/bin/env python3
"""Check fuserl's LoRA exports in the libraries users load them with: the adapter folder
(`[export] lora = "adapter"`) through peft.PeftModel.from_pretrained on its base, the merged folder
(`lora = "merged"`) through transformers alone; each against the per-token log-probs fuserl
computes for the same folder (`fuserl logprobs`), in float64, within 1e-4.

    fuserl logprobs --model ADAPTER_DIR --data pairs.jsonl --out adapter.jsonl
    fuserl logprobs --model MERGED_DIR --data pairs.jsonl --out merged.jsonl
    ~/.cache/fuserl-oracle/venv/bin/python scripts/check_lora_export.py ADAPTER_DIR adapter.jsonl MERGED_DIR merged.jsonl

Prints one JSON line (the largest differences) and exits 1 when one is above the tolerance.
tests/e2e.rs runs it when the oracle environment has peft (docs/oracle.md).
"""
import json
import pathlib
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

TOL = 1e-4


def worst_difference(model, tok, scored):
    worst = 0.0
    for line in pathlib.Path(scored).read_text().splitlines():
        r = json.loads(line)
        messages = r["prompt"] if isinstance(r["prompt"], list) else [{"role": "user", "content": r["prompt"]}]
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        p = tok(prompt, add_special_tokens=False).input_ids
        ids = torch.tensor([p + tok(r["response"], add_special_tokens=False).input_ids + [tok.eos_token_id]])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0].double(), -1)
        theirs = [lp[t - 1, ids[0, t]].item() for t in range(len(p), ids.shape[1])]
        assert len(theirs) == len(r["token_logps"]), "token counts differ"
        worst = max(worst, max(abs(a - b) for a, b in zip(theirs, r["token_logps"])))
    return worst


def main():
    adapter, adapter_scored, merged, merged_scored = sys.argv[1:5]
    config = json.loads((pathlib.Path(adapter) / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"], dtype=torch.float64).eval()
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    tok = AutoTokenizer.from_pretrained(adapter)
    with_peft = worst_difference(peft_model, tok, adapter_scored)
    full = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float64).eval()
    with_transformers = worst_difference(full, AutoTokenizer.from_pretrained(merged), merged_scored)
    doc = {"peft_adapter_max_abs_difference": with_peft, "transformers_merged_max_abs_difference": with_transformers,
           "tolerance": TOL}
    print(json.dumps(doc))
    sys.exit(0 if with_peft <= TOL and with_transformers <= TOL else 1)


if __name__ == "__main__":
    main()
