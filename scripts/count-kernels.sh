#!/usr/bin/env bash
# Kernel launches of a training step on a wgpu device, through Burn's fusion backend and through
# the plain cubecl backend (issue #37): `fuserl bench train-step` (DPO, 2 pairs of 64 tokens, one
# warm-up step and 2 timed ones) with cubecl's profiling logger at `minimal`, which writes one
# `Executing <kernel>` line per kernel launched; the lines are counted per run.
#
#     scripts/count-kernels.sh [MODEL]      # default checkpoints/tiny-chat; lavapipe works
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fuserl-target}"
cargo build --quiet -p fuserl-cli
fuserl="${FUSERL_BIN:-$CARGO_TARGET_DIR/debug/fuserl}"
model="$(cd "${1:-checkpoints/tiny-chat}" && pwd)"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for fusion in true false; do
    work="$(mktemp -d)"
    cat > "$work/cubecl.toml" <<TOML
[profiling.logger]
level = "minimal"
file = "$work/kernels.log"
TOML
    line="$(cd "$work" && "$fuserl" bench train-step --model "$model" --device wgpu --pairs 2 --tokens 64 \
        --steps 2 --fusion "$fusion")"
    # The logger writes from its own task: give it a moment after the process is done.
    sleep 1
    n="$(grep -c 'Executing' "$work/kernels.log" || true)"
    echo "fusion = $fusion: $n kernel launches in 3 steps (about $((n / 3)) a step); $line"
    rm -rf "$work"
done
