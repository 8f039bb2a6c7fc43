#!/usr/bin/env bash
# `classifier` reward throughput on the CPU: a SmolLM2-sized LlamaForSequenceClassification
# (random weights, SmolLM2's tokenizer and template; needs scripts/fetch-smollm2.sh) scores N
# conversations of about 512 tokens in batches of B, by `fuserl reward` and by transformers on
# the same machine, each in its own process. Prints one JSON line each (sequences/s over loading,
# tokenizing and scoring: fuserl's whole process, Python's after its imports and, as
# process_sequences_per_s, its whole process too; peak RSS from
# /usr/bin/time, which counts the whole process) and their ratios; also checks that both gave the
# same scores (within 1e-3).
#
#     scripts/bench-reward.sh            # N=32 B=8
#
# Environment: PYTHON (default ~/.cache/fuserl-oracle/venv/bin/python, docs/oracle.md), N, B,
# FUSERL (a fuserl binary; default: built with cargo in the shared target folder).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-$HOME/.cache/fuserl-oracle/venv/bin/python}"
n="${N:-32}"
b="${B:-8}"
out="${OUT:-$HOME/.cache/fuserl/bench-reward}"
mkdir -p "$out"
if [ -z "${FUSERL:-}" ]; then
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fuserl-target}"
    cargo build -q -p fuserl-cli >&2
    FUSERL="$CARGO_TARGET_DIR/debug/fuserl"
fi
[ -f "$out/pairs.jsonl" ] && [ "$(wc -l < "$out/pairs.jsonl")" = "$n" ] || "$python" scripts/bench_reward_torch.py make "$out" "$n"
peak() { sed -n 's/.*Maximum resident set size (kbytes): \([0-9]*\).*/\1/p' "$1"; }
p0=$(date +%s.%N)
/usr/bin/time -v "$python" scripts/bench_reward_torch.py torch "$out" "$b" > "$out/torch.json" 2> "$out/torch.time"
p1=$(date +%s.%N)
torch_line=$(tail -1 "$out/torch.json")
t0=$(date +%s.%N)
/usr/bin/time -v "$FUSERL" reward --model "$out/rm" --data "$out/pairs.jsonl" --out "$out/fuserl-scores.jsonl" \
    --batch-size "$b" > /dev/null 2> "$out/fuserl.time"
t1=$(date +%s.%N)
"$python" - "$out" "$n" "$b" "$t0" "$t1" "$(peak "$out/fuserl.time")" "$(peak "$out/torch.time")" "$torch_line" "$p0" "$p1" <<'PY'
import json, sys
out, n, b, t0, t1, fuserl_kb, torch_kb, torch_line, p0, p1 = sys.argv[1:]
torch_r = json.loads(torch_line)
secs = float(t1) - float(t0)
# The Python process as a whole too (interpreter start and imports included), as fuserl's is timed.
torch_r["process_seconds"] = round(float(p1) - float(p0), 3)
torch_r["process_sequences_per_s"] = round(int(n) / torch_r["process_seconds"], 3)
mine = [json.loads(l)["score"] for l in open(f"{out}/fuserl-scores.jsonl")]
theirs = json.load(open(f"{out}/torch-scores.json"))
diff = max(abs(a - b) for a, b in zip(mine, theirs))
fuserl_r = {"impl": "fuserl", "sequences": int(n), "batch": int(b), "seconds": round(secs, 3),
            "sequences_per_s": round(int(n) / secs, 3), "peak_rss_mb": round(int(fuserl_kb) / 1024, 1)}
torch_r["peak_rss_mb_time"] = round(int(torch_kb) / 1024, 1)
print(json.dumps(fuserl_r))
print(json.dumps(torch_r))
print(json.dumps({"throughput_ratio": round(fuserl_r["sequences_per_s"] / torch_r["sequences_per_s"], 3),
                  "throughput_ratio_whole_processes": round(fuserl_r["sequences_per_s"] / torch_r["process_sequences_per_s"], 3),
                  "peak_memory_ratio": round(fuserl_r["peak_rss_mb"] / torch_r["peak_rss_mb_time"], 3),
                  "max_score_difference": diff}))
assert diff < 1e-3, f"scores differ by {diff}"
PY
