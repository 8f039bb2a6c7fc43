#!/usr/bin/env bash
# The memory plan against measured peaks (issue #30): FuseSFT and FusePO-DPO on
# SmolLM2-135M-Instruct on the CPU, at several batch sizes and lengths, f32, bf16 mixed
# precision and the lean option, with and without gradient checkpointing. Each stage logs its
# plan when it starts and writes the plan with the process's measured peak resident memory into
# its memory.json; this prints one table row per stage (planned, measured, ratio).
#
#     scripts/fetch-smollm2.sh
#     cargo build -p fuserl-cli
#     scripts/bench-memory-plan.sh [CASE...]      # cases: see the list below; default all
#
# The data: 12 prompts whose three sources' answers are longer than any max_length here, so
# every sequence is exactly max_length tokens (the plan's worst case is then the real one).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fuserl-target}"
fuserl="${FUSERL_BIN:-$CARGO_TARGET_DIR/debug/fuserl}"
model="$(scripts/fetch-smollm2.sh)"
work="${FUSERL_BENCH_DIR:-$HOME/.cache/fuserl/bench-memory-plan}"
mkdir -p "$work"
python3 - "$work/long.jsonl" <<'PY'
import json, sys
words = "the quick brown fox jumps over the lazy dog while seven wise owls count every star in the sky".split()
with open(sys.argv[1], "w") as f:
    for p in range(12):
        def answer(k):
            return " ".join(words[(p + k + i) % len(words)] for i in range(900))
        responses = {f"model-{s}": [answer(3 * i), answer(3 * i + 1)] for i, s in enumerate("abc")}
        scores = {f"model-{s}": [0.9 - 0.1 * i, 0.2 + 0.05 * i] for i, s in enumerate("abc")}
        prompt = [{"role": "user", "content": f"Question {p}: tell me a long story about the number {p}."}]
        f.write(json.dumps({"id": f"q{p}", "prompt": prompt, "responses": responses, "scores": scores}) + "\n")
PY
# name: dtype master_weights batch_size max_length gradient_checkpointing [lora: r 16, all-linear]
cases=(
    "f32-b2-l256:f32:f32:2:256:true"
    "f32-b8-l512:f32:f32:8:512:true"
    "f32-b4-l256-nockpt:f32:f32:4:256:false"
    "f32-b4-l512-nockpt:f32:f32:4:512:false"
    "bf16-b4-l256:bf16:f32:4:256:true"
    "bf16-b4-l256-nockpt:bf16:f32:4:256:false"
    "lean-b4-l256:bf16:bf16:4:256:true"
    "lean-b8-l512:bf16:bf16:8:512:true"
    "lora-b4-l512:f32:f32:4:512:true:lora"
)
wanted=("$@")
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(git rev-parse --short HEAD)"
echo "| case | stage | planned | measured peak | planned / measured |"
echo "|---|---|---|---|---|"
for case in "${cases[@]}"; do
    IFS=: read -r name dtype master batch length ckpt lora <<<"$case"
    lora_table=""
    [ "${lora:-}" = lora ] && lora_table=$'[target.lora]\nr = 16\nalpha = 32\ntarget_modules = "all-linear"'

    if [ ${#wanted[@]} -gt 0 ] && [[ ! " ${wanted[*]} " == *" $name "* ]]; then continue; fi
    dir="$work/$name"
    rm -rf "$dir" && mkdir -p "$dir"
    stage_settings="max_steps = 2
learning_rate = 1e-6
warmup_steps = 0
batch_size = $batch
gradient_checkpointing = $ckpt
checkpoint_every = 1000"
    cat > "$dir/recipe.toml" <<TOML
schema_version = 1
[run]
name = "$name"
output_dir = "$dir/run"
[backend]
dtype = "$dtype"
master_weights = "$master"
[target]
checkpoint = "$model"
max_length = $length
$lora_table
[[sources]]
kind = "jsonl"
path = "$work/long.jsonl"
[reward]
kind = "precomputed"
[weighting]
kind = "softmax"
temperature = 0.5
[sft]
$stage_settings
[po]
$stage_settings
[po.objective]
kind = "dpo"
[eval]
enabled = false
[export]
enabled = false
TOML
    for stage in sft po; do
        # One process per stage: each measures its own peak.
        "$fuserl" -q "$stage" "$dir/recipe.toml" > "$dir/$stage.log" 2>&1 || { echo "| $name | $stage | failed: see $dir/$stage.log | | |"; continue; }
        python3 - "$dir/run/$stage/memory.json" "$name" "$stage" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
p, r = m["planned_peak_bytes"], m["measured_peak_bytes"]
print(f"| {sys.argv[2]} | {sys.argv[3]} | {p / 1e9:.2f} GB | {r / 1e9:.2f} GB | {p / r:.2f} |")
PY
    done
    # Only the measurements are kept (each trained model is half a GB).
    rm -rf "$dir/run/sft/final" "$dir/run/po/final" "$dir/run/sft/checkpoints" "$dir/run/po/checkpoints"
done
