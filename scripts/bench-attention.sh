#!/usr/bin/env bash
# Peak memory and time of causal attention, forward and backward, on the CPU (issue #37): the
# tiled path (fuserl_kernels::causal_attention) against the path the model had before (the
# [batch, heads, seq, seq] mask and scores written out), each configuration in its own process.
# The materialised path at batch 4 and 4096 tokens needs about 40 GB: it runs at batch 1 (its
# memory grows linearly with the batch) unless MATERIALISED_B says otherwise.
#
#     scripts/bench-attention.sh            # heads 32, head_dim 64; HEADS, KV_HEADS, D, TS override
#     DEVICE=wgpu scripts/bench-attention.sh # on wgpu (lavapipe in CI): fuserl's cubecl kernel, the
#                                            # tiles of Burn ops and the materialised path, batch B
#                                            # (default 1), each run twice (the first compiles)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fuserl-target}"
heads="${HEADS:-32}"; kv="${KV_HEADS:-32}"; d="${D:-64}"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(free -g | awk '/Mem:/ {print $2}') GB"
cargo bench --quiet --profile dev --workspace --bench attention --no-run
run() { cargo bench --quiet --profile dev --workspace --bench attention -- "$@" --heads "$heads" --kv-heads "$kv" --d "$d"; }
if [ "${DEVICE:-cpu}" = wgpu ]; then
  for t in ${TS:-1024 2048}; do
    for method in kernel tiles materialised; do
      run --method "$method" --device wgpu --runs 2 --b "${B:-1}" --t "$t"
    done
  done
  exit 0
fi
for t in ${TS:-1024 2048 4096}; do
  run --method tiles --b 4 --t "$t"
  run --method tiles --b 1 --t "$t"
  run --method materialised --b "${MATERIALISED_B:-1}" --t "$t"
done
