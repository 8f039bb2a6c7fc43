#!/usr/bin/env bash
# Per-token log-probs with their backward: fuserl's fused projection + log-prob, the naive Burn
# path and PyTorch, for T in {2048, 8192} tokens and V in {49152, 128256} (hidden size H = 576,
# SmolLM2's), each configuration in its own process. Prints one JSON line per measurement and a
# Markdown table at the end (docs/benchmarks.md).
#
#     scripts/bench-logprobs.sh [cpu|wgpu|cuda]     # default cpu
#
# Environment: PYTHON (default ~/.cache/fuserl-oracle/venv/bin/python; see docs/oracle.md; the
# PyTorch column is left out when it is missing), REPS (timed repetitions, median reported;
# default 1 on the CPU, 5 on GPUs), TS, VS, H (override the grid), FEATURES (cargo features of
# fuserl-kernels alone, for example vulkan for cubecl's SPIR-V path; default: the workspace's), FUSERL_BENCH_BIN (a prebuilt
# benchmark binary, as scripts/gpu-check.sh uses on a machine without cargo).
set -euo pipefail
cd "$(dirname "$0")/.."
device="${1:-cpu}"
python="${PYTHON:-$HOME/.cache/fuserl-oracle/venv/bin/python}"
if [ "$device" = cpu ]; then reps="${REPS:-1}"; else reps="${REPS:-5}"; fi
ts="${TS:-2048 8192}"
vs="${VS:-49152 128256}"
h="${H:-576}"
torch_device="$device"
[ "$device" = wgpu ] && torch_device=cuda

if [ -n "${FUSERL_BENCH_BIN:-}" ]; then
    bench=("$FUSERL_BENCH_BIN")
else
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fuserl-target}"
    if [ -n "${FEATURES:-}" ]; then
        select=(-p fuserl-kernels --features "$FEATURES")
    else
        # The whole workspace's features (wgpu, cuda for the kernels), as `cargo test --workspace`
        # builds them, so that the tests' build is reused (`-p fuserl-kernels` alone unifies
        # features differently and rebuilds Burn).
        select=(--workspace)
    fi
    cargo bench --profile dev "${select[@]}" --bench logprobs --no-run >&2
    bench=(cargo bench -q --profile dev "${select[@]}" --bench logprobs --)
fi

# glibc's malloc as the fuserl binary sets it (fuserl_backends::keep_freed_memory): blocks up to
# 1 GiB from the heap, freed memory kept, one arena. Without it each chunk's temporaries are fresh
# pages from the kernel, and on some machines the page faults cost more than the arithmetic.
export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-1073741824}"
export MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-2147483647}"
export MALLOC_ARENA_MAX="${MALLOC_ARENA_MAX:-1}"

results=()
for t in $ts; do
    for v in $vs; do
        for method in fused naive; do
            line=$("${bench[@]}" --method "$method" --device "$device" --t "$t" --v "$v" --h "$h" --reps "$reps" 2>/dev/null | tail -1) \
                || line="{\"impl\": \"fuserl-$method\", \"t\": $t, \"v\": $v, \"error\": \"failed (out of memory?)\"}"
            echo "$line"
            results+=("$line")
        done
        if [ -x "$python" ]; then
            line=$("$python" scripts/bench_logprobs_torch.py --device "$torch_device" --t "$t" --v "$v" --h "$h" --reps "$reps" 2>/dev/null | tail -1) \
                || line="{\"impl\": \"pytorch\", \"t\": $t, \"v\": $v, \"error\": \"failed (out of memory?)\"}"
            echo "$line"
            results+=("$line")
        fi
    done
done

printf '%s\n' "${results[@]}" | python3 scripts/bench_table.py
