#!/usr/bin/env bash
# Forward tokens/s of SmolLM2-135M on the CPU: fuserl (Burn flex) next to PyTorch, same machine
# and input. Needs the oracle environment (docs/oracle.md) for the PyTorch half.
set -euo pipefail
cd "$(dirname "$0")/.."
model="$(scripts/fetch-smollm2.sh)"
python="${ORACLE_PYTHON:-$HOME/.cache/fuserl-oracle/venv/bin/python}"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
cargo bench --quiet --profile dev --workspace --bench forward
"$python" scripts/bench_forward_torch.py "$model" 2>/dev/null
