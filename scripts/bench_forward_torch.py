#!/usr/bin/env python3
"""PyTorch's forward throughput on the same model and input as model/benches/forward.rs.

    ~/.cache/fuserl-oracle/venv/bin/python scripts/bench_forward_torch.py [CONVERTED_DIR]

Loads fuserl's converted SmolLM2 folder (default ~/.cache/fuserl/models/SmolLM2-135M-Instruct)
with transformers, float32, eager attention, threads = the machine's cores.
"""
import os
import pathlib
import sys
import time

import torch
from transformers import AutoModelForCausalLM

folder = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser("~/.cache/fuserl/models/SmolLM2-135M-Instruct"))
torch.set_num_threads(os.cpu_count())
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
batch, length, runs = 1, 256, 5
state, ids = 12345, []
for _ in range(batch * length):
    state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
    ids.append((state >> 33) % 49152)
x = torch.tensor(ids).reshape(batch, length)
with torch.no_grad():
    model(x)
    start = time.perf_counter()
    for _ in range(runs):
        model(x).logits[0, 0, 0].item()
    secs = (time.perf_counter() - start) / runs
print(f"pytorch {torch.__version__} (f32, {torch.get_num_threads()} threads): batch {batch} x {length} tokens: "
      f"{secs * 1e3:.1f} ms per forward, {batch * length / secs:.0f} tokens/s")
