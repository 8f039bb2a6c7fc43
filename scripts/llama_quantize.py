"""Quantise a GGUF file with llama.cpp's own quantiser (`llama_model_quantize`, as its
`llama-quantize` tool), through the llama-cpp-python package scripts/setup-llama-server.sh
installs: the peer tests/gguf_export.rs compares fuserl's GGUF export with (per-tensor types and
quantisation error).

    "$(scripts/setup-llama-server.sh)" scripts/llama_quantize.py IN.gguf OUT.gguf q4_k_m
"""
import ctypes
import sys

import llama_cpp

# llama.cpp's llama_ftype codes.
FTYPES = {"f32": 0, "f16": 1, "q8_0": 7, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18, "bf16": 32}

if len(sys.argv) != 4 or sys.argv[3].lower() not in FTYPES:
    sys.exit(f"usage: llama_quantize.py IN.gguf OUT.gguf TYPE (TYPE: {', '.join(FTYPES)})")
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = FTYPES[sys.argv[3].lower()]
status = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params))
sys.exit(f"llama_model_quantize failed with status {status}" if status else 0)
