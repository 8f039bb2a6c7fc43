#!/usr/bin/env bash
# Fuzz fuserl's parsers of untrusted input with AFL++ (issue #13; docs/reliability.md).
#
#   scripts/fuzz.sh list                 the targets and what each parses
#   scripts/fuzz.sh build                install cargo-afl (it builds AFL++) and build the harness
#   scripts/fuzz.sh TARGET SECONDS       fuzz one target for SECONDS of wall time on one core
#   scripts/fuzz.sh all SECONDS          every target in turn, SECONDS each (what CI runs)
#   scripts/fuzz.sh table                rebuild the table in docs/reliability.md from fuzz/runs.jsonl
#
# Each target keeps its queue in $FUSERL_FUZZ_DIR/TARGET (default ~/.cache/fuserl/fuzz), seeded
# from the committed fixtures (fuzz/src/lib.rs names them) and resumed by the next run, so that
# runs add up. A run appends its numbers (CPU-seconds, executions, crashes, hangs) to
# fuzz/runs.jsonl unless FUSERL_FUZZ_RECORD=0 (CI), copies every crash and hang into
# fuzz/regressions/TARGET/ (replayed by `cargo test -p fuserl-fuzz` from then on: commit it with
# its fix) and fails when it found any. A hang is a run longer than 10 s; an allocation that
# would take the harness past 1 GiB aborts it and counts as a crash.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export CARGO_TARGET_DIR="${FUSERL_FUZZ_TARGET_DIR:-$HOME/.cache/fuserl-fuzz-target}"
work="${FUSERL_FUZZ_DIR:-$HOME/.cache/fuserl/fuzz}"
afl_version=0.18.2
bin="$CARGO_TARGET_DIR/debug/fuserl-fuzz"

log() { echo "[fuzz $(date -u +%H:%M:%S)] $*" >&2; }

targets() {
    "$bin" --list | cut -f1
}

build() {
    if ! cargo afl --version 2>/dev/null | grep -q "$afl_version"; then
        log "installing cargo-afl $afl_version (it builds AFL++ itself)"
        cargo install --locked --quiet cargo-afl --version "$afl_version"
    fi
    local data="${XDG_DATA_HOME:-$HOME/.local/share}/afl.rs"
    FUSERL_AFL_RUNTIME=$(find "$data" -path "*afl.rs-$afl_version/afl-llvm/afl-compiler-rt.o" 2>/dev/null | head -1)
    if [ -z "$FUSERL_AFL_RUNTIME" ]; then
        cargo afl config --build --force >&2
        FUSERL_AFL_RUNTIME=$(find "$data" -path "*afl.rs-$afl_version/afl-llvm/afl-compiler-rt.o" | head -1)
    fi
    export FUSERL_AFL_RUNTIME
    log "building the harness (instrumented parsers; $CARGO_TARGET_DIR)"
    RUSTC_WRAPPER="$root/scripts/fuzz-rustc.sh" RUSTFLAGS="--cfg fuzzing" \
        cargo build --quiet -p fuserl-fuzz --features afl --bin fuserl-fuzz
}

# The seeds of a target: the files its `seeds` patterns name (fuzz/src/lib.rs), as the harness
# lists them.
seed() {
    local target=$1 dir=$2
    mkdir -p "$dir"
    "$bin" --seeds "$target" | while read -r f; do
            cp "$f" "$dir/$(basename "$(dirname "$f")")-$(basename "$f")"
        done
    [ -n "$(ls -A "$dir")" ] || { log "$target: no seeds"; exit 1; }
}

run() {
    local target=$1 seconds=$2
    targets | grep -qx "$target" || { log "no target $target; targets: $(targets | tr '\n' ' ')"; exit 2; }
    local dir="$work/$target"
    [ -d "$dir/out/default" ] || seed "$target" "$dir/in"
    local stats="$dir/out/default/fuzzer_stats"
    local before_execs=0
    [ -f "$stats" ] && before_execs=$(awk -F' *: *' '$1 == "execs_done" { print $2 }' "$stats")
    log "$target: $seconds s (queue $dir)"
    # -t: a hang is a run past 10 s; -m none: the harness's own allocator cap bounds memory (a
    # fresh process every 1000 inputs, so that what a target keeps on purpose, such as the
    # leaked plugin declarations, never adds up to it);
    # the coverage map as large as the instrumented crates need.
    local map_size
    map_size=$(AFL_DUMP_MAP_SIZE=1 "$bin" </dev/null || true)
    AFL_MAP_SIZE="$map_size" AFL_FUZZER_LOOPCOUNT=1000 AFL_AUTORESUME=1 AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_NO_AFFINITY=1 \
        AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 FUSERL_FUZZ_TARGET="$target" \
        cargo afl fuzz -i "$dir/in" -o "$dir/out" -t 10000 -m none -V "$seconds" -- "$bin" >"$dir/afl.log" 2>&1 &
    local afl=$!
    # The CPU time (user + system) of AFL++ and the harness processes, the last value seen of each,
    # sampled once a second: what the table counts (on a busy machine, less than the wall time).
    declare -A ticks=()
    while kill -0 "$afl" 2>/dev/null; do
        for p in $(pgrep -f -- "$bin" || true); do
            local t
            t=$(awk '{ print $14 + $15 }' "/proc/$p/stat" 2>/dev/null) && [ -n "$t" ] && ticks[$p]=$t
        done
        sleep 1
    done
    local rc=0
    wait "$afl" || rc=$?
    if [ "$rc" -ne 0 ]; then
        log "$target: afl-fuzz failed: $dir/afl.log"
        tail -20 "$dir/afl.log" >&2
        exit 1
    fi
    local cpu_seconds=0 hz
    hz=$(getconf CLK_TCK)
    for p in "${!ticks[@]}"; do cpu_seconds=$((cpu_seconds + ticks[$p])); done
    cpu_seconds=$((cpu_seconds / hz))
    local execs
    execs=$(awk -F' *: *' '$1 == "execs_done" { print $2 }' "$stats")
    # execs_done may count from the last start: a resumed run may start it afresh.
    [ "$execs" -ge "$before_execs" ] || before_execs=0
    # The findings of this run: into fuzz/regressions/TARGET/ (named by their content), then out
    # of the queue, so that the next run reports only what it finds itself.
    local crashes=0 hangs=0
    mkdir -p "fuzz/regressions/$target"
    for f in "$dir"/out/default/crashes/id:* "$dir"/out/default/hangs/id:*; do
        [ -f "$f" ] || continue
        local kind=crash
        [[ $f == */hangs/* ]] && kind=hang
        local name
        name="$kind-$(sha256sum "$f" | cut -c1-16)"
        [ -f "fuzz/regressions/$target/$name" ] || cp "$f" "fuzz/regressions/$target/$name"
        log "$target: $kind: fuzz/regressions/$target/$name"
        rm "$f"
        if [ $kind = crash ]; then crashes=$((crashes + 1)); else hangs=$((hangs + 1)); fi
    done
    log "$target: $((execs - before_execs)) executions in $cpu_seconds CPU-seconds; $crashes crashes, $hangs hangs"
    if [ "${FUSERL_FUZZ_RECORD:-1}" != 0 ]; then
        printf '{"target": "%s", "fuzzer": "AFL++ (cargo-afl %s)", "cpu_seconds": %s, "executions": %s, "crashes": %s, "hangs": %s, "ended": "%s", "commit": "%s", "cpu": "%s"}\n' \
            "$target" "$afl_version" "$cpu_seconds" "$((execs - before_execs))" "$crashes" "$hangs" \
            "$(date -u +%FT%TZ)" "$(git rev-parse --short HEAD)" \
            "$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)" >>fuzz/runs.jsonl
    fi
    [ $((crashes + hangs)) -eq 0 ] || { log "$target: fix them; the files stay as regression tests"; return 1; }
}

case "${1:-}" in
    list)
        build
        "$bin" --list
        ;;
    build) build ;;
    table) python3 scripts/fuzz_table.py ;;
    all)
        build
        failed=0
        for t in $(targets); do run "$t" "${2:?seconds}" || failed=1; done
        exit "$failed"
        ;;
    "" | -h | --help)
        sed -n '2,17p' "$0"
        exit 2
        ;;
    *)
        build
        run "$1" "${2:?seconds}"
        ;;
esac
