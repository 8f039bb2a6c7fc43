#!/usr/bin/env bash
# The memory plan of generation against measured peaks: a `local` source answering with
# SmolLM2-135M-Instruct on the CPU at several batch sizes, prompt lengths and new-token counts,
# in f32 and bf16 (`fuserl plan`'s `collect: local source` line, and the line the source logs when
# it starts, against the process's peak resident memory from GNU time).
#
#     scripts/fetch-smollm2.sh
#     cargo build -p fuserl-cli
#     scripts/bench-generation-plan.sh [CASE...]      # cases: see the list below; default all
#
# The plan is a worst case: every prompt `max_prompt_length` tokens and every answer
# `max_tokens` long. To measure that case, the model is a copy of SmolLM2 whose end-of-sequence
# token is one it never writes (its config and tokenizer_config name vocabulary id 49151), and
# every prompt is longer than `max_prompt_length` (it keeps its last tokens). Each case answers
# twice its batch of prompts, so a second batch is prefilled after the first. Every answer then
# ends at the same step, so prompts are never admitted into finished rows while others still
# answer: the plan's phase for that (the worst case of continuous batching) is shown beside, and
# the measured peak is compared with the plan's other phases.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fuserl-target}"
fuserl="${FUSERL_BIN:-$CARGO_TARGET_DIR/debug/fuserl}"
model="$(scripts/fetch-smollm2.sh)"
work="${FUSERL_BENCH_DIR:-$HOME/.cache/fuserl/bench-generation-plan}"
mkdir -p "$work/noeos"
for f in "$model"/*; do
    case "$(basename "$f")" in
    config.json | tokenizer_config.json) ;;
    *) ln -sfn "$f" "$work/noeos/$(basename "$f")" ;;
    esac
done
python3 - "$model" "$work/noeos" "$work/prompts.jsonl" <<'PY'
import json, sys
model, out, prompts = sys.argv[1:]
vocab = json.load(open(f"{model}/tokenizer.json"))["model"]["vocab"]
never = 49151
token = next(t for t, i in vocab.items() if i == never)
config = json.load(open(f"{model}/config.json"))
config["eos_token_id"] = never
json.dump(config, open(f"{out}/config.json", "w"), indent=1)
tc = json.load(open(f"{model}/tokenizer_config.json"))
tc["eos_token"] = token
json.dump(tc, open(f"{out}/tokenizer_config.json", "w"), indent=1)
words = "the quick brown fox jumps over the lazy dog while seven wise owls count every star".split()
with open(prompts, "w") as f:
    for p in range(128):
        text = " ".join(words[(p + i) % len(words)] for i in range(600))
        f.write(json.dumps({"id": f"p{p}", "prompt": f"Question {p}: {text}"}) + "\n")
PY
# name: dtype batch_size max_prompt_length max_tokens
cases=(
    "f32-b32-p192-n256:f32:32:192:256"
    "f32-b16-p64-n512:f32:16:64:512"
    "f32-b64-p256-n256:f32:64:256:256"
    "f32-b8-p128-n128:f32:8:128:128"
    "bf16-b32-p192-n256:bf16:32:192:256"
)
if [[ $# -gt 0 ]]; then
    picked=()
    for want in "$@"; do
        for c in "${cases[@]}"; do [[ ${c%%:*} == "$want" ]] && picked+=("$c"); done
    done
    cases=("${picked[@]}")
fi
printf '| case | planned peak (loading, prefill, decoding) | measured peak | planned / measured | answers cut by max_tokens | planned: admitting prompts into finished rows |\n|---|---|---|---|---|---|\n'
for c in "${cases[@]}"; do
    IFS=: read -r name dtype batch prompt new <<< "$c"
    dir="$work/$name"
    rm -rf "$dir"
    mkdir -p "$dir"
    head -n $((2 * batch)) "$work/prompts.jsonl" > "$dir/prompts.jsonl"
    cat > "$dir/recipe.toml" <<EOF
schema_version = 1
[run]
name = "$name"
seed = 17
output_dir = "$dir/run"
[backend]
device = "cpu"
dtype = "$dtype"
[target]
checkpoint = "$work/noeos"
max_length = 1024
[data]
prompts = ["$dir/prompts.jsonl"]
samples_per_prompt = 1
[data.sampling]
temperature = 0.0
max_new_tokens = $new
[[sources]]
kind = "local"
name = "noeos"
checkpoint = "$work/noeos"
batch_size = $batch
max_prompt_length = $prompt
[reward]
kind = "precomputed"
[weighting]
kind = "softmax"
temperature = 0.5
EOF
    "$fuserl" plan "$dir/recipe.toml" --json > "$dir/plan.json"
    /usr/bin/time -f "%M" -o "$dir/peak_kb" "$fuserl" -v collect "$dir/recipe.toml" > "$dir/collect.log" 2>&1
    cut=$(grep -o 'cut_by_max_tokens=[0-9]*' "$dir/collect.log" | tail -1 | cut -d= -f2)
    python3 - "$name" "$dir/plan.json" "$(cat "$dir/peak_kb")" "$cut" "$((2 * batch))" <<'PY'
import json, sys
name, plan, peak_kb, cut, n = sys.argv[1:]
p = json.load(open(plan))["generation"][0]["plan"]
total = {ph["name"]: p["runtime"] + sum(x["bytes"] for x in ph["parts"]) for ph in p["phases"]}
admitting = total.pop("admitting prompts into finished rows", None)
planned = max(total.values())
measured = int(peak_kb) * 1024
shown = f"{admitting / 1e9:.3f} GB" if admitting else ""
print(f"| {name} | {planned / 1e9:.3f} GB | {measured / 1e9:.3f} GB | {planned / measured:.2f} | {cut} of {n} | {shown} |")
PY
    rm -rf "$dir/run"
done
