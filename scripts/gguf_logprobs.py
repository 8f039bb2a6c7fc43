"""Per-token log-probs of token-id sequences computed by llama.cpp (llama-cpp-python) from a GGUF
file: for each sequence, log p(token i | tokens before it) for i = 1..n-1, as JSON on stdout.
The peer tests/gguf_export.rs compares fuserl's GGUF export of the tiny oracle models with.

    "$(scripts/setup-llama-server.sh)" scripts/gguf_logprobs.py MODEL.gguf SEQUENCES.json
"""
import json
import sys

import numpy as np
import llama_cpp

if len(sys.argv) != 3:
    sys.exit("usage: gguf_logprobs.py MODEL.gguf SEQUENCES.json (a JSON list of lists of token ids)")
sequences = json.load(open(sys.argv[2]))
n_ctx = max(len(s) for s in sequences)
# The KV cache in f32 (llama.cpp keeps it in f16 by default), so that an f32 model computes in f32.
llm = llama_cpp.Llama(
    model_path=sys.argv[1], n_ctx=max(n_ctx, 32), logits_all=True, verbose=False, n_threads=2,
    type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
)
out = []
for seq in sequences:
    llm.reset()
    llm.eval(seq)
    logits = np.array(llm.scores[: len(seq)], dtype=np.float64)
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    out.append([float(logp[i - 1, seq[i]]) for i in range(1, len(seq))])
print(json.dumps(out))
