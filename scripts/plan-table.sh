#!/usr/bin/env bash
# docs/scaling.md's table: `fuserl plan` for the sizes users train (Qwen2.5-0.5B, SmolLM2-1.7B,
# Llama-3.1-8B: their config.json in fixtures/configs/) on one CUDA GPU of 24, 48, 80 and 141 GB,
# with f32 master weights (mixed precision, bf16 compute), with the lean option, with LoRA (r 16,
# all-linear: the base frozen in bf16) and QLoRA (the same adapters on a base whose linear
# layers are quantised to Q4_K at load, `quantize_base = "q4_k"`). FuseSFT at
# 8 sequences and FusePO-DPO at 8 pairs a micro-batch, every sequence 512 tokens, gradient
# checkpointing on (the defaults); the peak includes a 1 GiB allowance for the CUDA runtime.
#
#     cargo build -p fuserl-cli
#     scripts/plan-table.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fuserl-target}"
fuserl="${FUSERL_BIN:-$CARGO_TARGET_DIR/debug/fuserl}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "| target | weights | FuseSFT peak | FusePO peak | 24 GB | 48 GB | 80 GB | 141 GB |"
echo "|---|---|---|---|---|---|---|---|"
for model in qwen2.5-0.5b smollm2-1.7b llama-3.1-8b; do
    for mode in "mixed:f32:" "lean:bf16:" "LoRA r 16:f32:" "QLoRA r 16, Q4_K base:f32:q4_k"; do
        IFS=: read -r label master quant <<<"$mode"
        lora=""
        if [[ "$label" == *LoRA* ]]; then
            lora=$'[target.lora]\nr = 16\nalpha = 32\ntarget_modules = "all-linear"'
            [[ -n "$quant" ]] && lora+=$'\nquantize_base = "'"$quant"'"'
        fi
        cat > "$work/recipe.toml" <<TOML
schema_version = 1
[run]
name = "plan"
output_dir = "$work/run"
[backend]
device = "cuda"
dtype = "bf16"
master_weights = "$master"
[target]
checkpoint = "$PWD/fixtures/configs/$model"
max_length = 512
$lora
[[sources]]
kind = "jsonl"
path = "$PWD/data/fusion-mini.jsonl"
[reward]
kind = "precomputed"
[weighting]
kind = "softmax"
[sft]
batch_size = 8
[po]
batch_size = 8
[po.objective]
kind = "dpo"
TOML
        row="| $model | $label |"
        for gbs in 24 48 80 141; do
            "$fuserl" plan "$work/recipe.toml" --json --memory-gb "$gbs" > "$work/$gbs.json"
        done
        row+=$(python3 - "$work" <<'PY'
import json, sys
plans = {g: json.load(open(f"{sys.argv[1]}/{g}.json")) for g in (24, 48, 80, 141)}
stages = {s["stage"]: s for s in plans[24]["stages"]}
cells = [f" {stages[s]['peak_bytes'] / 1e9:.1f} GB |" for s in ("sft", "po")]
for g in (24, 48, 80, 141):
    fits = all(s["fits"] for s in plans[g]["stages"])
    tight = max(s["peak_bytes"] for s in plans[g]["stages"]) > 0.85 * plans[g]["capacity_bytes"]
    cells.append(" fits, tight |" if fits and tight else " fits |" if fits else " no |")
print("".join(cells))
PY
)
        echo "$row"
    done
done
