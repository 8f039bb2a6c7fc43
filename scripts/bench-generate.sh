#!/usr/bin/env bash
# Generation tokens/s of SmolLM2-135M on the CPU (what the `local` source does): fuserl's batched
# KV-cache generation next to transformers' `generate` with a KV cache, same machine, prompts and
# settings (greedy and sampled at temperature 0.8, 128 new tokens at most, batch 1, 8 and 32;
# FUSERL_BENCH_BATCHES=1,8 for fewer). Needs the oracle environment
# (docs/oracle.md) for the transformers half. Results: docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
model="$(scripts/fetch-smollm2.sh)"
python="${ORACLE_PYTHON:-$HOME/.cache/fuserl-oracle/venv/bin/python}"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
cargo bench --quiet --profile dev --workspace --bench generate
"$python" scripts/bench_generate_torch.py "$model" 2>/dev/null
