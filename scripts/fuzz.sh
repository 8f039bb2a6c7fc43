#!/usr/bin/env bash
# Fuzz fuserl's parsers of untrusted input with AFL++ (issue #13; docs/reliability.md).
#
#   scripts/fuzz.sh list                 the targets and what each parses
#   scripts/fuzz.sh build                install cargo-afl (it builds AFL++) and build the harness
#   scripts/fuzz.sh TARGET SECONDS       fuzz one target for SECONDS of wall time on one core
#                                        (several targets may run at once, one per core)
#   scripts/fuzz.sh all SECONDS          every target in turn, SECONDS each (what CI runs)
#   scripts/fuzz.sh topup MINUTES [JOBS] run each target until fuzz/runs.jsonl gives it MINUTES
#                                        CPU-minutes on the current harness (fuserl_fuzz::HARNESS),
#                                        least-run first, JOBS at once (stop it any time: the
#                                        next topup goes on from what runs.jsonl holds)
#   scripts/fuzz.sh table                rebuild the table in docs/reliability.md from fuzz/runs.jsonl
#
# Each target keeps its queue in $FUSERL_FUZZ_DIR/TARGET (default ~/.cache/fuserl/fuzz), seeded
# from the committed fixtures (fuzz/src/lib.rs names them) and resumed by the next run, so that
# runs add up. A run appends its numbers (CPU-seconds, executions, crashes, hangs) to
# fuzz/runs.jsonl unless FUSERL_FUZZ_RECORD=0 (CI), copies every crash and hang into
# fuzz/regressions/TARGET/ (replayed by `cargo test -p fuserl-cli --test tests fuzz::` from then on: commit it with
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

# Runs a command (argv[2:]) and writes the CPU-seconds of all its descendants to argv[1]. AFL++
# does not wait for its fork server when it stops, so this process takes in the orphans
# (PR_SET_CHILD_SUBREAPER) and waits for them, which adds their time to its children's.
children_cpu='
import ctypes, os, resource, subprocess, sys
ctypes.CDLL(None).prctl(36, 1)
rc = subprocess.call(sys.argv[2:])
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
r = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[1], "w").write("%d\n" % (r.ru_utime + r.ru_stime))
sys.exit(rc)'

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
    # A harness built from another checkout sharing this target folder is fresh to cargo (its
    # units hash the same) but looks for the fixtures in that checkout: rebuild it here.
    if [ "$("$bin" --root 2>/dev/null)" != "$root" ]; then
        log "the harness was built from another checkout; rebuilding it from $root"
        touch fuzz/src/lib.rs
        RUSTC_WRAPPER="$root/scripts/fuzz-rustc.sh" RUSTFLAGS="--cfg fuzzing" \
            cargo build --quiet -p fuserl-fuzz --features afl --bin fuserl-fuzz
    fi
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
    # The CPU time (user + system) of AFL++ and every harness process it ran, as the kernel
    # accounts it to a waiting parent (getrusage of the children): what the table counts (on a
    # busy machine, less than the wall time). The harness restarts every 1000 inputs, so
    # sampling /proc would miss most of its processes.
    local cpu_file="$dir/cpu_seconds"
    rm -f "$cpu_file"
    AFL_MAP_SIZE="$map_size" AFL_FUZZER_LOOPCOUNT=1000 AFL_AUTORESUME=1 AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_NO_AFFINITY=1 \
        AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 FUSERL_FUZZ_TARGET="$target" \
        python3 -c "$children_cpu" "$cpu_file" \
        cargo afl fuzz -i "$dir/in" -o "$dir/out" -t 10000 -m none -V "$seconds" -- "$bin" >"$dir/afl.log" 2>&1 || {
        log "$target: afl-fuzz failed: $dir/afl.log"
        tail -20 "$dir/afl.log" >&2
        exit 3
    }
    local cpu_seconds
    cpu_seconds=$(cat "$cpu_file")
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
        printf '{"target": "%s", "fuzzer": "AFL++ (cargo-afl %s)", "cpu_seconds": %s, "executions": %s, "crashes": %s, "hangs": %s, "ended": "%s", "commit": "%s", "cpu": "%s", "cpu_accounting": "rusage", "harness": %s}\n' \
            "$target" "$afl_version" "$cpu_seconds" "$((execs - before_execs))" "$crashes" "$hangs" \
            "$(date -u +%FT%TZ)" "$(git rev-parse --short HEAD)" \
            "$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)" "$("$bin" --harness)" >>fuzz/runs.jsonl
    fi
    [ $((crashes + hangs)) -eq 0 ] || { log "$target: fix them; the files stay as regression tests"; return 1; }
}

# The targets still short of $1 CPU-seconds in fuzz/runs.jsonl on the current harness
# (fuserl_fuzz::HARNESS; runs recorded without one are of the first), least-run first, with
# what each lacks.
short_of() {
    targets | python3 -c '
import json, sys
need, harness = int(sys.argv[1]), int(sys.argv[2])
done = {}
for line in open("fuzz/runs.jsonl"):
    r = json.loads(line)
    if r.get("harness", 1) == harness:
        done[r["target"]] = done.get(r["target"], 0) + r["cpu_seconds"]
rows = [(done.get(t, 0), t) for t in sys.stdin.read().split()]
for d, t in sorted(rows):
    if d < need:
        print(t, need - d)
' "$1" "$("$bin" --harness)"
}

# One worker of `topup`: takes the least-run target that no other worker holds (a lock folder),
# runs it for what it lacks (at most 15 minutes of wall time per turn, so that the workers
# rebalance), until no target is short.
topup_worker() {
    local need=$1 failed=0
    while true; do
        local target="" lacks=0 rows t l
        # (read whole first: leaving the loop early would break short_of's pipe)
        mapfile -t rows < <(short_of "$need")
        for row in "${rows[@]}"; do
            read -r t l <<<"$row"
            if mkdir "$work/locks/$t" 2>/dev/null; then
                echo "$BASHPID" >"$work/locks/$t/pid"
                target=$t lacks=$l
                break
            fi
        done
        [ -n "$target" ] || break
        local seconds=$((lacks + 30))
        [ "$seconds" -le 900 ] || seconds=900
        local rc=0
        ( run "$target" "$seconds" ) || rc=$?
        rm -rf "$work/locks/$target"
        # A finding (1) leaves the target to later turns; AFL++ failing (3) would fail every turn.
        [ "$rc" -ne 3 ] || return 1
        [ "$rc" -eq 0 ] || failed=1
    done
    return "$failed"
}

case "${1:-}" in
    list)
        build
        "$bin" --list
        ;;
    build) build ;;
    table) python3 scripts/fuzz_table.py ;;
    topup)
        build
        need=$((${2:?minutes} * 60))
        # Locks of workers that are gone (a topup killed): another topup's stay, so that two
        # topups started apart never run one target at once.
        mkdir -p "$work/locks"
        for lock in "$work/locks"/*; do
            [ -d "$lock" ] || continue
            holder=$(cat "$lock/pid" 2>/dev/null || true)
            if [ -z "$holder" ] || ! kill -0 "$holder" 2>/dev/null; then rm -rf "$lock"; fi
        done
        pids=()
        for _ in $(seq "${3:-1}"); do
            topup_worker "$need" &
            pids+=($!)
            sleep 2
        done
        failed=0
        for p in "${pids[@]}"; do wait "$p" || failed=1; done
        exit "$failed"
        ;;
    all)
        build
        failed=0
        for t in $(targets); do run "$t" "${2:?seconds}" || failed=1; done
        exit "$failed"
        ;;
    "" | -h | --help)
        sed -n '2,20p' "$0"
        exit 2
        ;;
    *)
        build
        run "$1" "${2:?seconds}"
        ;;
esac
