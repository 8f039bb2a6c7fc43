#!/usr/bin/env bash
# One DPO step on SmolLM2-135M-Instruct, CPU: fuserl (with and without gradient checkpointing, and
# LoRA r 16 on every linear layer) next to TRL's DPOTrainer (its defaults, f32 with and without
# gradient checkpointing, and f32 with peft's LoRA of the same shape), one process each, same
# machine, same data. Needs the oracle environment (docs/oracle.md) for TRL.
#
#   scripts/bench-dpo-step.sh          # the above
#   scripts/bench-dpo-step.sh bf16     # fuserl's bf16 compute over f32 master weights (checkpointing)
#                                      # next to TRL's default bf16 autocast: issue #35's goal on AMX
#                                      # (where the CPU has AMX, also with FUSERL_AMX=1: the tiles)
#   scripts/bench-dpo-step.sh qlora    # QLoRA (issue #31): the LoRA step on Qwen2.5-Coder-0.5B's
#                                      # Q4_K_M GGUF kept in its blocks, then on the same file
#                                      # dequantised to an f32 base
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == bf16 ]]; then
    model="$(scripts/fetch-smollm2.sh)"
    python="${ORACLE_PYTHON:-$HOME/.cache/fuserl-oracle/venv/bin/python}"
    echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)," \
        "$(grep -m1 -o -w -E 'amx_bf16|avx512_bf16' /proc/cpuinfo | sort -u | xargs || true)"
    cargo bench --quiet --profile dev --workspace --bench dpo_step --no-run
    for mode in "checkpointing" "checkpointing bf16"; do
        # shellcheck disable=SC2086 # the options are separate words
        cargo bench --quiet --profile dev --workspace --bench dpo_step -- $mode
    done
    if grep -q -w amx_bf16 /proc/cpuinfo; then
        # The bf16 products on AMX tiles (kernels/src/cpu_amx.rs; experimental, opt-in).
        FUSERL_AMX=1 cargo bench --quiet --profile dev --workspace --bench dpo_step -- checkpointing bf16
    fi
    "$python" scripts/bench_dpo_step_trl.py "$model" 2>/dev/null | tail -n 1
    exit 0
fi
if [[ "${1:-}" == qlora ]]; then
    scripts/fetch-qwen-coder.sh > /dev/null
    echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
    cargo bench --quiet --profile dev --workspace --bench dpo_step --no-run
    for mode in "checkpointing qlora" "checkpointing dequantised"; do
        # shellcheck disable=SC2086 # the options are separate words
        cargo bench --quiet --profile dev --workspace --bench dpo_step -- $mode
    done
    exit 0
fi
model="$(scripts/fetch-smollm2.sh)"
python="${ORACLE_PYTHON:-$HOME/.cache/fuserl-oracle/venv/bin/python}"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
cargo bench --quiet --profile dev --workspace --bench dpo_step --no-run
for mode in "" checkpointing "checkpointing lora"; do
    # shellcheck disable=SC2086 # the options are separate words
    cargo bench --quiet --profile dev --workspace --bench dpo_step -- $mode
done
for options in "" "f32 checkpointing" "f32 no-checkpointing" "f32 checkpointing lora"; do
    # shellcheck disable=SC2086 # the options are separate words
    "$python" scripts/bench_dpo_step_trl.py "$model" $options 2>/dev/null | tail -n 1
done
