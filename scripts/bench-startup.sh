#!/usr/bin/env bash
# Start-up of `fuserl generate` (issue #34, point 9): the wall time of one reply of one token from
# SmolLM2-135M-Instruct (538 MB of f32 weights), load included, and the load time it reports;
# next to transformers in the same run (import, from_pretrained, one token). Five runs each, the
# median kept. Needs the oracle environment (docs/oracle.md) for the transformers half.
# Results: docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
model="$(scripts/fetch-smollm2.sh)"
python="${ORACLE_PYTHON:-$HOME/.cache/fuserl-oracle/venv/bin/python}"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
cargo build --quiet -p fuserl-cli
bin="${CARGO_TARGET_DIR:-target}/debug/fuserl"
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
walls=(); loads=()
for _ in 1 2 3 4 5; do
  start=$(date +%s.%N)
  line=$("$bin" generate --model "$model" --prompt Hi --max-new-tokens 1 2>&1 >/dev/null | tail -1)
  end=$(date +%s.%N)
  walls+=("$(echo "$end - $start" | bc -l)")
  loads+=("$(echo "$line" | sed -n 's/.*loaded in \([0-9.]*\) s.*/\1/p')")
done
printf 'fuserl generate: %.2f s wall (median of 5), the model loaded in %.2f s\n' \
  "$(printf '%s\n' "${walls[@]}" | median)" "$(printf '%s\n' "${loads[@]}" | median)"
"$python" - "$model" <<'PY'
import statistics, subprocess, sys, time
code = """
import time; t0 = time.time()
import torch, transformers
t1 = time.time()
m = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
t2 = time.time()
tok = transformers.AutoTokenizer.from_pretrained(MODEL)
ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt")
ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
m.generate(ids, max_new_tokens=1, do_sample=False)
print(t1 - t0, t2 - t1)
""".replace("MODEL", repr(sys.argv[1]))
walls, imports, loads = [], [], []
for _ in range(5):
    start = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    walls.append(time.time() - start)
    imports.append(float(out[0])); loads.append(float(out[1]))
print(f"transformers: {statistics.median(walls):.2f} s wall (median of 5): import {statistics.median(imports):.2f} s, "
      f"from_pretrained {statistics.median(loads):.2f} s")
PY
