#!/usr/bin/env bash
# Every CPU benchmark of issue #35 on this machine, one after the other: generation against
# transformers (batch 1, 8, 32, greedy and sampled), classifier scoring against transformers,
# one DPO step against TRL (f32, checkpointing, LoRA), fuserl's bf16 compute against TRL's bf16
# autocast (with and without the AMX tiles where the CPU has them, after a check of the tiles and
# a training step's products on them), and HumanEval evaluation against commit f292813. About
# an hour and a half on a 2-core machine, most of it the evaluation's baseline; needs the oracle
# environment (docs/oracle.md). Run it on an idle machine, in the background:
#
#   nohup scripts/bench-cpu.sh > /tmp/bench-cpu.log 2>&1 &
#
# Each benchmark's output goes to runs/bench-cpu/CPU/NAME.log (CPU: the model name, e.g.
# Intel-R-Xeon-R-Platinum-8481C), with machine.txt (CPU, cores, vector extensions, commit). A
# benchmark whose log is there is not run again, so a killed run resumes where it stopped
# (delete a log to run that benchmark again). Results go into docs/benchmarks.md by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fuserl-target}"
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)
tag=$(printf '%s' "$cpu" | tr -c 'A-Za-z0-9' '-' | tr -s '-' | sed 's/^-//; s/-$//')
out="${FUSERL_BENCH_OUT:-runs/bench-cpu/$tag}"
mkdir -p "$out"
flags=$(grep -m1 -o -w -E 'avx2|avx512f|avx512bw|avx512_vnni|avx512_bf16|amx_tile|amx_bf16' /proc/cpuinfo | sort -u | xargs || true)
{
    echo "cpu: $cpu"
    echo "cores: $(nproc)"
    echo "vector extensions: ${flags:-none of avx2, avx-512, amx}"
    echo "commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD || echo ' (with changes)')"
} > "$out/machine.txt"
cat "$out/machine.txt"
load=$(cut -d' ' -f1 /proc/loadavg)
if awk -v l="$load" 'BEGIN { exit !(l > 0.5) }'; then
    echo "warning: load average $load: the ratios want an idle machine" >&2
fi

step() {
    local name=$1
    shift
    if [[ -s "$out/$name.log" ]]; then
        echo "$name: already measured ($out/$name.log)"
        return
    fi
    echo "$name: $* ($(date -u +%H:%M:%S))"
    # Written under another name first: a killed benchmark leaves no log that looks finished.
    "$@" > "$out/$name.log.part" 2>&1
    mv "$out/$name.log.part" "$out/$name.log"
    tail -n 12 "$out/$name.log"
}

if grep -q -w amx_bf16 /proc/cpuinfo; then
    # The AMX tiles (kernels/src/cpu_amx.rs, opt-in with FUSERL_AMX=1): first whether they give
    # the products their emulation gives, then a training step's products on AVX512-BF16 and on
    # them, side by side.
    step amx-check cargo test -q -p fuserl-kernels --lib -- amx --nocapture
    step matmul-train cargo bench -q --profile dev -p fuserl-kernels --bench matmul -- --train
fi
step generate scripts/bench-generate.sh
step reward scripts/bench-reward.sh
step dpo-step scripts/bench-dpo-step.sh
step dpo-step-bf16 scripts/bench-dpo-step.sh bf16
FUSERL_BENCH_DIR="$PWD/$out/eval" step eval scripts/bench-eval.sh f292813 1
echo "all measured: $out"
