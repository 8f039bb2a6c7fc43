#!/usr/bin/env python3
"""The PyTorch peer of kernels/benches/logprobs.rs: per-token log-probs with their backward,
`log_softmax(hidden @ weight.T).gather(targets)` then `.sum().backward()`, for one (T, V, H),
same inputs' shapes, same targets, threads = cores. Prints one JSON line like the Rust bench.

    python scripts/bench_logprobs_torch.py --t 2048 --v 49152 [--h 576] [--device cpu|cuda] [--reps 3]

Peak memory: on the CPU, the growth of the peak resident set over the untimed and the timed runs
(the peak is reset through /proc/self/clear_refs once the inputs exist, as the Rust bench does); on CUDA,
torch.cuda.max_memory_reserved over the timed runs minus what the inputs hold.
"""
import argparse
import json
import os
import time

import torch

p = argparse.ArgumentParser()
p.add_argument("--t", type=int, default=2048)
p.add_argument("--v", type=int, default=49152)
p.add_argument("--h", type=int, default=576)
p.add_argument("--device", default="cpu")
p.add_argument("--reps", type=int, default=3)
a = p.parse_args()
torch.set_num_threads(os.cpu_count())
torch.manual_seed(2024)
dev = torch.device(a.device)


def rss():
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            fields[k] = v
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


# Same distributions as the Rust bench (uniform, hidden of unit variance, logits of about unit
# variance); torch's generator, so not the same numbers.
hidden = (torch.rand(a.t, a.h, device=dev) * 2 - 1) * 1.7
weight = (torch.rand(a.v, a.h, device=dev) * 2 - 1) * 0.09
targets = torch.tensor([(i * 7919) % a.v for i in range(a.t)], device=dev)


def step():
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    logp = torch.log_softmax(h @ w.T, dim=-1).gather(1, targets[:, None]).squeeze(1)
    total = logp.sum()
    total.backward()
    return float(total)


# The peak resident set is measured over the untimed step too, as the Rust bench does.
rss0, _ = rss()
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
step()
if dev.type == "cuda":
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
times = []
for _ in range(max(a.reps, 1)):
    t0 = time.perf_counter()
    check = step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    times.append(time.perf_counter() - t0)
_, hwm = rss()
times.sort()
out = {
    "impl": "pytorch",
    "torch": torch.__version__,
    "device": a.device,
    "t": a.t,
    "v": a.v,
    "h": a.h,
    "seconds": round(times[len(times) // 2], 4),
    "peak_rss_growth_bytes": max(hwm - rss0, 0),
    "pool_bytes": (torch.cuda.max_memory_reserved() - base) if dev.type == "cuda" else None,
    "threads": torch.get_num_threads(),
    "check": check,
}
print(json.dumps(out))
