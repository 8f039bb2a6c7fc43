#!/usr/bin/env bash
# The one-call GPU check (issue #37): everything the first GPU run should learn, prepared here and
# run there in one call, each step under its own time limit, one JSON file per step and one report.
#
#     scripts/gpu-check.sh build          # here: dist/gpu-check/ (xz-compressed fuserl and test binaries,
#                                         # SmolLM2's config and tokenizer), under 60 MiB
#     scripts/gpu-check.sh run            # there, from a checkout of the same commit with dist/gpu-check/
#     DEV=cpu scripts/gpu-check.sh run    # the same steps on the CPU with tiny models, in a minute or two
#
# `run` writes $GPU_CHECK_OUT (default $OUT when set, as the device tool gives it, else
# dist/gpu-check/out): STEP.json per step ({"step", "status": ok|failed|skipped|timeout, "seconds",
# "results": [...]}), the steps' logs, and report.md (scripts/gpu_check_report.py), whose tables
# go into docs/benchmarks.md. On the GPU machine (one H200, Python with torch and transformers, no
# network) the steps are: the environment (GPU, driver, where libcuda and NVRTC are); the kernel
# tests on CUDA and on wgpu (Vulkan); random-weight models made by transformers from real configs;
# per-token log-probs on cuda and wgpu against transformers in f32 with TF32 off; step-0 loss and
# gradient norm of sft, dpo and simpo against PyTorch; a FusePO-DPO step of 8 pairs of 512-token
# sequences at 135M and at SmolLM2-1.7B's shape, f32 and bf16, next to a PyTorch eager step
# (tokens/s, peak device memory polled by nvidia-smi for both, MFU); generation tokens/s at batch 1
# and 32 next to transformers' generate; the bf16 step with attention in tiles; the bf16 step with
# LoRA (r 16, all-linear) and QLoRA (the base in Q4_K blocks), their peaks beside the full step's.
#
# Environment: DEV (cuda, the default, or cpu), PYTHON (a Python with torch and transformers; the
# PyTorch steps are skipped, and say so, when it has none), FUSERL_BIN and FUSERL_TESTS_BIN (use
# these binaries instead of the bundle's: the dry-mode test passes the `fuserl` cargo built and
# FUSERL_TESTS_BIN=none, as it is itself the test binary), STEP_TIMEOUT_SCALE (multiplies every
# step's time limit), GPU_CHECK_BUDGET (seconds for all the steps together, default 450 on a GPU,
# so that a device call of 480 s ends with its report; 0: no budget; `environment` always runs, a
# later step that would start with under 10 s left does not, and one cut short by the budget says
# so: status "budget").
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
dist="$repo/dist/gpu-check"
mode="${1:-}"

case "$mode" in
build)
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/fuserl-target}"
    mkdir -p "$dist"
    # find_exe NAME TEST: the executable cargo built for target NAME, its test harness or not.
    find_exe() { python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[1] and m.get("executable") \
            and m["profile"]["test"] == (sys.argv[2] == "test"):
        print(m["executable"])' "$1" "$2" | tail -1; }
    # The binaries `cargo test --workspace` builds (default features: wgpu and cuda; the one
    # build profile of the tests), so that nothing new is built.
    built=$(cargo test --workspace --no-run --message-format=json)
    fuserl_exe=$(echo "$built" | find_exe fuserl bin)
    test_exe=$(echo "$built" | find_exe tests test)
    [ -x "$fuserl_exe" ] && [ -x "$test_exe" ] || { echo "gpu-check build: cargo built no fuserl or tests executable" >&2; exit 1; }
    for pair in "fuserl:$fuserl_exe" "tests:$test_exe"; do
        name=${pair%%:*}
        strip -o "$dist/$name" "${pair#*:}"
        xz -6 -T0 -f "$dist/$name"
    done
    # SmolLM2-135M's config and tokenizer (the 1.7B shape is fixtures/configs/smollm2-1.7b; the
    # weights are made there, at random).
    model="$(scripts/fetch-smollm2.sh)"
    mkdir -p "$dist/smollm2-135m"
    for f in config.json tokenizer.json tokenizer_config.json special_tokens_map.json chat_template.jinja generation_config.json; do
        [ -f "$model/$f" ] && cp "$model/$f" "$dist/smollm2-135m/"
    done
    git rev-parse HEAD > "$dist/COMMIT"
    du -sh "$dist"
    size=$(du -sb "$dist" | cut -f1)
    [ "$size" -lt $((60 << 20)) ] || { echo "gpu-check build: $size bytes, over 60 MiB" >&2; exit 1; }
    ;;
run)
    dev="${DEV:-cuda}"
    out="${GPU_CHECK_OUT:-${OUT:-$dist/out}}"
    mkdir -p "$out"
    out="$(cd "$out" && pwd)"
    # This run's steps only (a reused folder keeps an earlier run's).
    rm -f "$out"/*.json "$out"/*.log "$out/report.md"
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    python="${PYTHON:-python3}"
    scale="${STEP_TIMEOUT_SCALE:-1}"
    [[ "$scale" =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "STEP_TIMEOUT_SCALE=$scale: expected a number" >&2; exit 2; }
    budget="${GPU_CHECK_BUDGET:-}"
    [ -n "$budget" ] || { [ "$dev" = cpu ] && budget=0 || budget=450; }
    [[ "$budget" =~ ^[0-9]+$ ]] || { echo "GPU_CHECK_BUDGET=$budget: expected whole seconds" >&2; exit 2; }
    run_start=$(date +%s)
    unpack() { # NAME ENV_OVERRIDE: the binary to run ("none": no such step)
        if [ "$2" = none ]; then return 0; fi
        if [ -n "$2" ]; then echo "$2"; return; fi
        if [ -f "$dist/$1.xz" ]; then
            xz -dc "$dist/$1.xz" > "$work/$1" && chmod +x "$work/$1" && echo "$work/$1"
        fi
        return 0
    }
    fuserl="$(unpack fuserl "${FUSERL_BIN:-}")"
    tests="$(unpack tests "${FUSERL_TESTS_BIN:-}")"
    [ -n "$fuserl" ] || { echo "no fuserl binary: run 'scripts/gpu-check.sh build' here first (or set FUSERL_BIN)" >&2; exit 1; }
    has_torch=0
    "$python" -c 'import torch, transformers' 2>/dev/null && has_torch=1

    # step NAME SECONDS COMMAND...: runs COMMAND under its time limit (cut to what is left of the
    # budget); every line it prints that is a JSON object is a result. STEP.json gets the status,
    # the seconds and the results.
    step() {
        local name=$1 limit=$2
        shift 2
        local log="$out/$name.log" start status rc left cut=0
        start=$(date +%s.%N)
        echo "== $name" >&2
        limit=$(python3 -c 'import sys; print(max(1, round(float(sys.argv[1]) * float(sys.argv[2]))))' "$limit" "$scale")
        left=$((budget - ($(date +%s) - run_start)))
        if [ "$name" = environment ]; then
            left=$limit
        fi
        if [ "$budget" -gt 0 ] && [ "$left" -lt 10 ]; then
            echo "not run: the steps' budget of $budget s (GPU_CHECK_BUDGET) is spent" > "$log"
            rc=budget
        else
            if [ "$budget" -gt 0 ] && [ "$left" -lt "$limit" ]; then
                limit=$left cut=1
            fi
            set +e
            timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
            rc=$?
            set -e
        fi
        case $rc in
            0) status=ok ;;
            77) status=skipped ;;
            budget) status=budget ;;
            124 | 137) status=timeout ;;
            *) status=failed ;;
        esac
        if [ "$status" = timeout ] && [ "$cut" = 1 ]; then
            echo "stopped after $limit s: the rest of the steps' budget of $budget s (GPU_CHECK_BUDGET)" >> "$log"
            status=budget
        fi
        python3 - "$out" "$name" "$status" "$start" "$log" <<'PY'
import json, sys, time
out, name, status, start, log = sys.argv[1:]
results, tail = [], []
for line in open(log, errors="replace"):
    s = line.strip()
    if s.startswith("{") and s.endswith("}"):
        try:
            results.append(json.loads(s))
            continue
        except ValueError:
            pass
    tail.append(line.rstrip("\n"))
doc = {"step": name, "status": status, "seconds": round(time.time() - float(start), 2),
       "results": results, "log_tail": tail[-25:]}
json.dump(doc, open(f"{out}/{name}.json", "w"), indent=1)
PY
        echo "   $status" >&2
    }
    skip() { echo "$1" >&2; exit 77; }
    export -f skip

    # Models, pairs and shapes: tiny ones on the CPU, SmolLM2's shapes on a GPU.
    if [ "$dev" = cpu ]; then
        devices=(cpu)
        shapes=("tiny:$repo/checkpoints/tiny-chat")
        big=()
        pairs=2 tokens=64 steps=2 new=16 batches="1 4"
    else
        devices=(cuda wgpu)
        shapes=("tiny:$repo/checkpoints/tiny-chat" "smollm2-135m:$dist/smollm2-135m")
        big=("smollm2-1.7b:$repo/fixtures/configs/smollm2-1.7b")
        pairs=8 tokens=512 steps=3 new=128 batches="1 32"
    fi

    step environment 60 bash -c '
        echo "commit $(cat "'"$dist"'/COMMIT" 2>/dev/null || git -C "'"$repo"'" rev-parse HEAD)"
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "nvidia-smi: not found"
        echo "libcuda: $(ldconfig -p | grep -m1 "libcuda.so" || echo "not found by ldconfig")"
        nvrtc=$(ldconfig -p | grep -m1 "libnvrtc.so"; ls /usr/local/cuda*/lib64/libnvrtc.so* 2>/dev/null | head -1)
        echo "libnvrtc: ${nvrtc:-not found}"
        nvcc=$(nvcc --version 2>/dev/null | tail -1)
        echo "nvcc: ${nvcc:-not found}"
        echo "cpu: $(nproc) cores, $(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2 | xargs)"
        '"$python"' -c "import json, torch, transformers; print(json.dumps({\"torch\": torch.__version__, \"transformers\": transformers.__version__, \"cuda_available\": torch.cuda.is_available()}))" 2>&1 || echo "python: no torch"
        '"$fuserl"' --version'

    if [ -n "$tests" ]; then
        if [ "$dev" = cpu ]; then
            step kernels 600 bash -c "cd '$repo/cli' && '$tests' kernels:: --test-threads 1"
        else
            step kernels 300 bash -c "cd '$repo/cli' && '$tests' kernels:: --include-ignored --test-threads 1"
        fi
    else
        step kernels 5 bash -c "skip 'no test binary (the dry-mode test runs the kernel tests itself)'"
    fi

    # Random-weight models, made by transformers from real configs (the tiny one is committed).
    models=()
    for s in "${shapes[@]}" "${big[@]}"; do
        name=${s%%:*} src=${s#*:}
        if [ "$name" = tiny ]; then
            models+=("tiny:$src")
        elif [ "$has_torch" = 1 ]; then
            step "model-$name" 300 "$python" scripts/gpu_check_torch.py make-model "$src" "$work/$name"
            [ -f "$work/$name/config.json" ] && models+=("$name:$work/$name")
            # The 1.7B shape's tokenizer is SmolLM2's.
            [ "$name" = smollm2-1.7b ] && cp "$dist/smollm2-135m/"tokenizer* "$work/$name/" 2>/dev/null || true
        fi
    done
    model_of() { for m in "${models[@]}"; do [ "${m%%:*}" = "$1" ] && echo "${m#*:}"; done; }

    # Per-token log-probs against transformers (f32, TF32 off).
    python3 -c 'import json
for line in open("data/fusion-mini.jsonl"):
    r = json.loads(line)
    for answers in r["responses"].values():
        print(json.dumps({"prompt": r["prompt"], "response": answers[0]}))' > "$work/pairs.jsonl"
    for m in "${models[@]}"; do
        name=${m%%:*}
        [[ " ${big[*]} " == *" $name:"* ]] && continue
        for d in "${devices[@]}"; do
            if [ "$has_torch" = 1 ]; then
                torch_dev=$d
                [ "$d" = wgpu ] && torch_dev=cuda
                step "logprobs-$name-$d" 180 bash -c "'$fuserl' logprobs --model '${m#*:}' --device $d --data '$work/pairs.jsonl' --out '$work/lp-$name-$d.jsonl' >&2 && '$python' scripts/gpu_check_torch.py logprobs '${m#*:}' '$work/pairs.jsonl' '$work/lp-$name-$d.jsonl' --device $torch_dev"
            else
                step "logprobs-$name-$d" 120 bash -c "'$fuserl' logprobs --model '${m#*:}' --device $d --data '$work/pairs.jsonl' --out '$work/lp-$name-$d.jsonl' >&2 && skip 'no torch: fuserl ran, transformers did not'"
            fi
        done
    done

    # peak COMMAND...: on a GPU, nvidia-smi's largest memory.used while COMMAND runs, over the
    # value before it, printed as a JSON line after COMMAND's output.
    peak() {
        if ! command -v nvidia-smi >/dev/null; then "$@"; return; fi
        local before samples pid rc
        before=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 | head -1)
        samples="$(mktemp)"
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i 0 -lms 50 > "$samples" &
        pid=$!
        set +e
        "$@"
        rc=$?
        set -e
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        python3 -c 'import json, sys
vals = [int(l) for l in open(sys.argv[1]) if l.strip().isdigit()]
print(json.dumps({"device_peak_bytes": (max(vals) - int(sys.argv[2])) << 20 if vals else None}))' "$samples" "$before"
        rm -f "$samples"
        return $rc
    }
    export -f peak

    # Step-0 loss and gradient norm of sft, dpo and simpo against PyTorch (f32), small batches.
    for m in "${models[@]}"; do
        name=${m%%:*}
        [[ " ${big[*]} " == *" $name:"* ]] && continue
        for objective in sft dpo simpo; do
            args=(--objective "$objective" --pairs 2 --tokens 128 --steps 1)
            cmd="'$fuserl' bench train-step --model '${m#*:}' --device ${devices[0]} ${args[*]}"
            if [ "$has_torch" = 1 ]; then
                cmd+=" && '$python' scripts/gpu_check_torch.py train-step '${m#*:}' --device ${devices[0]/wgpu/cuda} ${args[*]}"
            fi
            step "step0-$name-$objective" 180 bash -c "$cmd"
        done
    done

    # A FusePO-DPO step: fuserl next to PyTorch eager, f32 and bf16.
    for m in "${models[@]}"; do
        name=${m%%:*}
        [ "$dev" != cpu ] && [ "$name" = tiny ] && continue
        for dtype in f32 bf16; do
            args=(--objective dpo --pairs "$pairs" --tokens "$tokens" --steps "$steps" --dtype "$dtype")
            cmd="peak '$fuserl' bench train-step --model '${m#*:}' --device ${devices[0]} ${args[*]}"
            if [ "$has_torch" = 1 ]; then
                cmd+=" && peak '$python' scripts/gpu_check_torch.py train-step '${m#*:}' --device ${devices[0]} ${args[*]}"
            fi
            step "dpo-step-$name-$dtype" 300 bash -c "$cmd"
        done
    done

    # Generation tokens/s next to transformers' generate.
    for m in "${models[@]}"; do
        name=${m%%:*}
        [[ " ${big[*]} " == *" $name:"* ]] && continue
        [ "$dev" != cpu ] && [ "$name" = tiny ] && continue
        for batch in $batches; do
            args=(--batch "$batch" --new-tokens "$new" --runs 2)
            cmd="'$fuserl' bench generate --model '${m#*:}' --device ${devices[0]} ${args[*]}"
            if [ "$has_torch" = 1 ]; then
                cmd+=" && '$python' scripts/gpu_check_torch.py generate '${m#*:}' --device ${devices[0]} ${args[*]}"
            fi
            step "generate-$name-b$batch" 240 bash -c "$cmd"
        done
    done

    # The same bf16 step with attention in tiles of Burn operations (`[backend] attention =
    # "tiles"`: tensor-core matmuls) instead of fuserl's kernel (no tensor cores): which of the two
    # should be the GPU default. Last of all the steps, so that a slow one costs only itself (the
    # CPU's dry run takes the same step, where attention always runs in tiles).
    for m in "${models[@]}"; do
        name=${m%%:*}
        [ "$dev" != cpu ] && [ "$name" = tiny ] && continue
        args=(--objective dpo --pairs "$pairs" --tokens "$tokens" --steps "$steps" --dtype bf16 --attention tiles)
        step "dpo-step-$name-bf16-tiles" 240 bash -c "peak '$fuserl' bench train-step --model '${m#*:}' --device ${devices[0]} ${args[*]}"
    done

    # LoRA and QLoRA (issue #31) on the device: the same DPO step in bf16 with rank-16 adapters on
    # every linear layer, the base frozen in bf16, then kept in Q4_K blocks; its peak beside the
    # full step's above (no PyTorch peer: peft's is not in the machine's Python).
    for m in "${models[@]}"; do
        name=${m%%:*}
        [ "$dev" != cpu ] && [ "$name" = tiny ] && continue
        for quant in none q4_k; do
            # QLoRA quantises the base on the host at load (about a minute at 1.7B): 135M only.
            [ "$quant" != none ] && [[ " ${big[*]} " == *" $name:"* ]] && continue
            args=(--objective dpo --pairs "$pairs" --tokens "$tokens" --steps "$steps" --dtype bf16 --lora 16)
            label=lora
            [ "$quant" != none ] && args+=(--quantize-base "$quant") && label=qlora
            step "$label-step-$name-bf16" 240 bash -c "peak '$fuserl' bench train-step --model '${m#*:}' --device ${devices[0]} ${args[*]}"
        done
    done

    python3 scripts/gpu_check_report.py "$out" "$dev" > "$out/report.md"
    echo "report: $out/report.md" >&2
    # Failed when a step failed or timed out, or a parity check is past its tolerance.
    python3 -c 'import json, sys
f = json.load(open(sys.argv[1]))["failures"]
sys.exit("gpu-check: " + "; ".join(f) if f else 0)' "$out/summary.json"
    ;;
*)
    echo "usage: scripts/gpu-check.sh build|run  (DEV=cpu for the dry run on the CPU)" >&2
    exit 2
    ;;
esac
