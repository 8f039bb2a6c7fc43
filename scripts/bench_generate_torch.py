#!/usr/bin/env python3
"""transformers' `generate` with a KV cache on the same model, prompts and settings as
model/benches/generate.rs: greedy and sampled (temperature 0.8, top-k and top-p off), at most 128
new tokens, batch 1, 8 and 32 (the 8 prompts repeated; left-padded), f32, threads = the machine's
cores. Median of 3 after a warm-up. FUSERL_BENCH_BATCHES=1,8 limits the batch sizes.

    ~/.cache/fuserl-oracle/venv/bin/python scripts/bench_generate_torch.py [CONVERTED_DIR]
"""
import os
import pathlib
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    "Write a short story about a dragon who learns to read.",
    "Explain how a bicycle works, step by step.",
    "Describe a walk through a forest in autumn.",
    "Write a letter to a friend about your summer holiday.",
    "Explain why the sky is blue to a ten-year-old.",
    "Describe the life cycle of a butterfly in detail.",
    "Write a recipe for a vegetable soup and explain each step.",
    "Tell the history of the printing press.",
]

folder = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser("~/.cache/fuserl/models/SmolLM2-135M-Instruct"))
torch.set_num_threads(os.cpu_count())
torch.manual_seed(0)
tok = AutoTokenizer.from_pretrained(folder)
tok.padding_side = "left"
if tok.pad_token is None:
    tok.pad_token = tok.eos_token
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
batches = [int(b) for b in os.environ.get("FUSERL_BENCH_BATCHES", "1,8,32").split(",")]
for mode, batch in [(m, b) for m in ("greedy", "sampled") for b in batches]:
    texts = [tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], tokenize=False,
                                     add_generation_prompt=True)
             for i in range(batch)]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)

    def run():
        start = time.perf_counter()
        with torch.no_grad():
            if mode == "greedy":
                out = model.generate(**enc, max_new_tokens=128, do_sample=False, use_cache=True,
                                     pad_token_id=tok.pad_token_id)
            else:
                out = model.generate(**enc, max_new_tokens=128, do_sample=True, temperature=0.8, top_k=0,
                                     top_p=1.0, use_cache=True, pad_token_id=tok.pad_token_id)
        secs = time.perf_counter() - start
        new = out[:, enc["input_ids"].shape[1]:]
        eos = set([tok.eos_token_id] + ([model.generation_config.eos_token_id] if isinstance(model.generation_config.eos_token_id, int) else list(model.generation_config.eos_token_id or [])))
        tokens = 0
        for row in new.tolist():
            n = 0
            for t in row:
                if t in eos:
                    break
                n += 1
            tokens += n
        return secs, tokens

    run()
    times = sorted(run() for _ in range(3))
    secs, tokens = times[1]
    print(f"transformers (torch {torch.__version__}, f32, {torch.get_num_threads()} threads): {mode} batch {batch}: "
          f"{tokens} new tokens in {secs:.2f} s, {tokens / secs:.1f} tokens/s (runs: {' '.join(f'{t[0]:.2f}' for t in times)})")
