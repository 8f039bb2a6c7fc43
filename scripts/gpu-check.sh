#!/usr/bin/env bash
# The kernel tests and the log-prob benchmark on a CUDA machine, on CUDA and on Vulkan (cubecl's
# SPIR-V compiler). The GPU machine reaches no package registry, so this works in two steps:
#
#     scripts/gpu-check.sh build        # here: builds stripped test and bench binaries into dist/gpu-check/
#     (copy dist/gpu-check/ and scripts/ to the GPU machine, into a checkout of the same commit)
#     scripts/gpu-check.sh run          # there: runs the tests (CUDA and Vulkan), then the benchmark grid
#
# `run` writes dist/gpu-check/report.md; its tables go into docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
dist=dist/gpu-check
mode="${1:-}"
case "$mode" in
build)
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fuserl-target}"
    mkdir -p "$dist"
    # A feature set of its own (vulkan switches wgpu's Vulkan adapters to SPIR-V), so a build of
    # its own; dependencies optimised as in every profile of the repository.
    features=cuda,vulkan
    find_exe() { python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[1] and m.get("executable"):
        print(m["executable"])' "$1" | tail -1; }
    # The kernel tests are the `kernels::` area of the one integration-test binary.
    test_exe=$(cargo test -p fuserl-cli --features "$features" --test tests --no-run --message-format=json | find_exe tests)
    bench_exe=$(cargo bench -p fuserl-kernels --features "$features" --bench logprobs --no-run --message-format=json | find_exe logprobs)
    cp "$test_exe" "$dist/logprobs-test"
    cp "$bench_exe" "$dist/logprobs-bench"
    strip "$dist/logprobs-test" "$dist/logprobs-bench"
    git rev-parse HEAD > "$dist/COMMIT"
    ls -la "$dist"
    ;;
run)
    [ -x "$dist/logprobs-test" ] || { echo "no $dist/logprobs-test: run 'scripts/gpu-check.sh build' first" >&2; exit 1; }
    report="$dist/report.md"
    {
        echo "# gpu-check, commit $(cat "$dist/COMMIT" 2>/dev/null || echo unknown), $(date -u +%Y-%m-%d)"
        echo
        echo '```'
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
        echo '```'
        echo
        echo "## Kernel tests (CUDA, and wgpu on Vulkan with SPIR-V)"
        echo '```'
    } > "$report"
    status=0
    (cd cli && "../$dist/logprobs-test" kernels:: --include-ignored --test-threads 1) 2>&1 | tee -a "$report" || status=1
    echo '```' >> "$report"
    for device in cuda wgpu; do
        {
            echo
            echo "## Log-prob benchmark, $device"
        } >> "$report"
        FUSERL_BENCH_BIN="$dist/logprobs-bench" scripts/bench-logprobs.sh "$device" 2>&1 | tee -a "$report" || status=1
    done
    echo "report: $report"
    exit "$status"
    ;;
*)
    echo "usage: scripts/gpu-check.sh build|run" >&2
    exit 2
    ;;
esac
