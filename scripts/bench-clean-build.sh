#!/usr/bin/env bash
# A clean test build of each commit given, timed: `cargo test --workspace --no-run` in a fresh clone
# with an empty target folder (every dependency, Burn included, compiled from the registry's
# sources already on the machine). Issue #36 asks that the restructured layout builds no slower.
#
#   scripts/bench-clean-build.sh f292813 HEAD
#
# One JSON line per commit goes to $OUT (default ~/.cache/fuserl/bench/clean-build.jsonl): the
# commit, wall-clock seconds, the CPU and its core count. A commit already measured there is
# skipped, so a run that was stopped goes on with the next one when started again. Nothing else
# should build meanwhile (the two cores are the measurement); copy the lines into
# docs/benchmarks.md.
set -euo pipefail

repo=$(git rev-parse --show-toplevel)
out=${OUT:-$HOME/.cache/fuserl/bench/clean-build.jsonl}
mkdir -p "$(dirname "$out")"
cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -n 1)

for rev in "$@"; do
    sha=$(git -C "$repo" rev-parse --short=7 "$rev^{commit}")
    if [ -f "$out" ] && grep -q "\"rev\": \"$sha\"" "$out"; then
        echo "$sha: measured already ($out)"
        continue
    fi
    work=$(mktemp -d /tmp/fuserl-clean-build.XXXXXX)
    git clone -q --shared --no-checkout "$repo" "$work/src"
    git -C "$work/src" checkout -q "$sha"
    echo "$sha: building in $work (about 15 minutes on 2 cores)"
    start=$(date +%s.%N)
    (cd "$work/src" && CARGO_TARGET_DIR="$work/target" cargo test --workspace --no-run --offline -q) \
        >"$work/build.log" 2>&1 || { echo "$sha: the build failed, see $work/build.log"; exit 1; }
    end=$(date +%s.%N)
    secs=$(python3 -c "print(round($end - $start, 1))")
    printf '{"rev": "%s", "seconds": %s, "cpu": "%s", "cores": %s, "date": "%s"}\n' \
        "$sha" "$secs" "$cpu" "$(nproc)" "$(date -u +%F)" >>"$out"
    echo "$sha: $secs s"
    rm -rf "$work"
done
