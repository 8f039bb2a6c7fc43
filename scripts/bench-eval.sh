#!/usr/bin/env bash
# Evaluation time on HumanEval (issue #35): `fuserl eval` with the SmolLM2-135M-Instruct target as
# the model evaluated (no baselines) on HumanEval's 164 prompts, at most 384 new tokens, greedy,
# scored by python-tests (HumanEval's own tests), as the code-fusion benchmark evaluates a model;
# against the same evaluation by the binary of a baseline commit, built here in its own worktree
# and target folder (by default f292813, the code when issue #35 was filed). Each run starts from
# an empty run folder; the two binaries take turns. Prints one JSON line per run and a summary:
# the wall times and their ratio, pass@1 of each, and how many greedy answers differ in text.
#
#   scripts/bench-eval.sh                    # f292813 against the working tree, 1 run each
#   scripts/bench-eval.sh COMMIT RUNS        # another baseline, RUNS turns each
#   FUSERL_BENCH_PROMPTS=8 scripts/bench-eval.sh    # the first 8 prompts only (a quick check)
#
# The baseline's first build is a cold build of the whole tree (about 15 minutes on 2 cores); it
# is kept in $HOME/.cache/fuserl-baseline-target for later runs (the worktree in
# $HOME/.cache/fuserl-baseline/COMMIT, or FUSERL_BASELINE_TREE). Needs scripts/fetch-models.sh
# and scripts/fetch-humaneval.sh (run here if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
baseline="${1:-f292813}"
runs="${2:-1}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fuserl-target}"
base_target="$HOME/.cache/fuserl-baseline-target"
base_tree="${FUSERL_BASELINE_TREE:-$HOME/.cache/fuserl-baseline/$baseline}"
work="${FUSERL_BENCH_DIR:-$root/runs/bench-eval}"

log() { echo "[bench-eval $(date -u +%H:%M:%S)] $*" >&2; }

model="$root/models/SmolLM2-135M-Instruct"
[[ -f "$model/config.json" ]] || scripts/fetch-models.sh >&2
humaneval=$(scripts/fetch-humaneval.sh)
prompts="$(dirname "$humaneval")/humaneval-prompts.jsonl"

log "building the working tree's fuserl"
cargo build -q -p fuserl-cli
current="$CARGO_TARGET_DIR/debug/fuserl"
if [[ ! -d "$base_tree" ]]; then
    log "a worktree of $baseline in $base_tree"
    mkdir -p "$(dirname "$base_tree")"
    git worktree add --detach "$base_tree" "$baseline" >&2
fi
log "building $baseline's fuserl (cold the first time)"
(cd "$base_tree" && CARGO_TARGET_DIR="$base_target" cargo build -q -p fuserl-cli)
old="$base_target/debug/fuserl"

mkdir -p "$work"
if [[ -n "${FUSERL_BENCH_PROMPTS:-}" ]]; then
    head -n "$FUSERL_BENCH_PROMPTS" "$prompts" > "$work/prompts.jsonl"
else
    cp "$prompts" "$work/prompts.jsonl"
fi
n=$(wc -l < "$work/prompts.jsonl")

# recipe NAME: a recipe whose evaluated model is the target itself (the export path points at its
# checkpoint, and `fuserl eval` does not export); the data, source and weighting are never used.
recipe() {
    cat > "$work/$1.toml" <<EOF
schema_version = 1
[run]
name = "bench-eval"
seed = 17
output_dir = "$work/$1"
[backend]
device = "cpu"
dtype = "f32"
[target]
checkpoint = "$model"
max_length = 448
max_prompt_length = 192
[data]
prompts = ["$root/data/prompts-mini.jsonl"]
[[sources]]
kind = "jsonl"
path = "$root/data/fusion-mini.jsonl"
[reward]
kind = "python-tests"
tests = "$humaneval"
timeout_s = 10
concurrency = 2
[weighting]
kind = "softmax"
temperature = 0.5
[export]
path = "$model"
[eval]
enabled = true
prompts = "$work/prompts.jsonl"
max_new_tokens = 384
temperature = 0.0
baselines = []
EOF
}

results="$work/results.jsonl"
: > "$results"
for i in $(seq 1 "$runs"); do
    for who in baseline current; do
        bin=$old
        [[ $who == current ]] && bin=$current
        name="$who-$i"
        rm -rf "${work:?}/$name"
        recipe "$name"
        log "$name: fuserl eval on $n prompts"
        start=$(date +%s.%N)
        "$bin" -q eval "$work/$name.toml" > "$work/$name.log"
        end=$(date +%s.%N)
        python3 - "$work/$name" "$who" "$i" "$start" "$end" >> "$results" <<'PY'
import json, sys
out, who, i, start, end = sys.argv[1:]
report = json.load(open(f"{out}/eval/eval.json"))
m = report["models"][0]
print(json.dumps({"binary": who, "run": int(i), "wall_s": round(float(end) - float(start), 1),
                  "prompts": report["n_prompts"], "pass_at_1": m["pass_at_1"]["mean"],
                  "mean_length_tokens": m["mean_length_tokens"]["mean"]}))
PY
        tail -n 1 "$results"
    done
done

python3 - "$work" "$results" "$baseline" <<'PY'
import glob, json, statistics, sys
work, results, baseline = sys.argv[1:]
rows = [json.loads(l) for l in open(results)]
def answers(name):
    [path] = glob.glob(f"{work}/{name}/eval/collect/*.jsonl")
    return {json.loads(l)["prompt_id"]: json.loads(l)["text"] for l in open(path) if l.strip()}
old = statistics.median(r["wall_s"] for r in rows if r["binary"] == "baseline")
new = statistics.median(r["wall_s"] for r in rows if r["binary"] == "current")
a, b = answers("baseline-1"), answers("current-1")
differ = sum(1 for k in a if a[k] != b.get(k))
print(json.dumps({"baseline": baseline, "baseline_wall_s": old, "current_wall_s": new,
                  "ratio": round(new / old, 3), "answers": len(a), "answers_differ": differ}))
PY
