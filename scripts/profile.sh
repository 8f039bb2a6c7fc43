#!/usr/bin/env bash
# Where a benchmark's time goes: perf's samples of one of the workspace's bench targets (forward,
# generate, dpo_step, ...), by function (self time), the top 40; then the same samples by shared
# object. Results: docs/benchmarks.md (issue #35's profiles).
#
#   scripts/profile.sh generate                      # every setting of the bench
#   FUSERL_BENCH_BATCHES=32 scripts/profile.sh generate
#
# Needs perf (Debian's linux-perf). On a virtual machine without hardware counters perf samples
# the cpu-clock timer instead (same use; say which in the results). The perf data stays in
# $PROFILE_OUT (default /tmp/fuserl-profile-BENCH.data) for `perf report -i`.
set -euo pipefail
cd "$(dirname "$0")/.."
bench="${1:?usage: scripts/profile.sh BENCH (a bench target: forward, generate, dpo_step, ...)}"
command -v perf >/dev/null || { echo "scripts/profile.sh: perf is missing (Debian: apt-get install linux-perf)" >&2; exit 1; }
out="${PROFILE_OUT:-/tmp/fuserl-profile-$bench.data}"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); vector extensions: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|avx512f|avx512_bf16|amx_tile|amx_bf16)$' | tr '\n' ' ')"
bin="$(cargo bench --profile dev --workspace --bench "$bench" --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "bench" in m["target"]["kind"]:
        print(m["executable"])' | tail -1)"
[[ -x "$bin" ]] || { echo "scripts/profile.sh: no bench target named $bench" >&2; exit 1; }
event=cpu-cycles
counters="$(perf stat -e cpu-cycles true 2>&1 || true)"
[[ "$counters" == *"not supported"* ]] && event=cpu-clock
echo "perf event: $event"
perf record -q -e "$event" -F 499 -g -o "$out" -- "$bin" --bench
perf report -i "$out" --no-children --sort symbol --stdio --percent-limit 0.5 -g none 2>/dev/null \
    | grep -v '^#' | grep -v '^$' | head -40
echo "--- by shared object"
perf report -i "$out" --no-children --sort dso --stdio -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -8
