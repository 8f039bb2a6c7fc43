#!/usr/bin/env python3
"""Markdown table of the JSON lines that scripts/bench-logprobs.sh prints (read from stdin)."""
import json
import sys

rows = [json.loads(line) for line in sys.stdin if line.strip().startswith("{")]


def memory(r):
    b = r.get("pool_bytes")
    return r.get("peak_rss_growth_bytes") if b is None else b


def cell(r):
    if r is None:
        return "-"
    if "error" in r:
        return r["error"]
    return "{:.2f} s, {:.0f} MiB".format(r["seconds"], memory(r) / 2**20)


print()
print("| T | V | fused | naive Burn | PyTorch | fused / naive: time, memory |")
print("|---|---|---|---|---|---|")
for t in sorted({r["t"] for r in rows}):
    for v in sorted({r["v"] for r in rows}):
        got = {r["impl"]: r for r in rows if r["t"] == t and r["v"] == v}
        f, n = got.get("fuserl-fused"), got.get("fuserl-naive")
        ratio = "-"
        if f and n and "error" not in f and "error" not in n:
            ratio = "{:.2f}x, {:.3f}x".format(f["seconds"] / n["seconds"], memory(f) / max(memory(n), 1))
        print("| {} | {} | {} | {} | {} | {} |".format(t, v, cell(f), cell(n), cell(got.get("pytorch")), ratio))
