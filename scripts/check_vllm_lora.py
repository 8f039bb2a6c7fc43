#!/usr/bin/env python3
"""Check fuserl's LoRA exports in vLLM, as users serve them: the adapter folder (`[export] lora =
"adapter"`) through vLLM's LoRA support (`enable_lora`, a `LoRARequest` on the base, which is what
`vllm serve BASE --enable-lora --lora-modules NAME=ADAPTER_DIR` does per request), and the merged
folder (`lora = "merged"`) as a plain model; each against the per-token log-probs fuserl computes
for the same folder (`fuserl logprobs`), through vLLM's prompt log-probs, in float32, within 1e-4
per token.

    fuserl logprobs --model ADAPTER_DIR --data pairs.jsonl --out adapter.jsonl
    fuserl logprobs --model MERGED_DIR --data pairs.jsonl --out merged.jsonl
    ~/.cache/fuserl-vllm/venv/bin/python scripts/check_vllm_lora.py ADAPTER_DIR adapter.jsonl MERGED_DIR merged.jsonl

The token ids are made as `fuserl logprobs` makes them (the chat template with the generation
prompt, the response, EOS) with the base's tokenizer, and given to vLLM as ids. vLLM's sampler
reports each prompt token's log-prob from the model's raw logits. Prints one JSON line (the largest
differences, the LoRA rank vLLM loaded, vLLM's version) and exits 1 when one is above the
tolerance. The vLLM environment: scripts/setup-vllm.sh (docs/oracle.md).
"""
import json
import math
import os
import pathlib
import sys

# vLLM on the CPU: a small KV cache, no compile step (a 135M model on 2 cores), no usage report.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("VLLM_DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOL = 1e-4


def token_rows(tok, scored):
    rows = []
    for line in pathlib.Path(scored).read_text().splitlines():
        r = json.loads(line)
        messages = r["prompt"] if isinstance(r["prompt"], list) else [{"role": "user", "content": r["prompt"]}]
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        p = tok(prompt, add_special_tokens=False).input_ids
        ids = p + tok(r["response"], add_special_tokens=False).input_ids + [tok.eos_token_id]
        if len(ids) - len(p) != len(r["token_logps"]):
            raise SystemExit(f"{scored}: token counts differ from fuserl's ({len(ids) - len(p)} vs {len(r['token_logps'])})")
        rows.append((p, ids, r["token_logps"]))
    return rows


def worst_difference(llm, rows, lora=None):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    worst = 0.0
    for p, ids, ours in rows:
        # One prompt a call: vLLM 0.32's CPU LoRA path fails on the prompt log-probs of a batch of
        # several prompts with an adapter (the logits' LoRA indices are per prompt, not per token).
        [out] = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, lora_request=lora, use_tqdm=False)
        theirs = [out.prompt_logprobs[t][ids[t]].logprob for t in range(len(p), len(ids))]
        for a, b in zip(theirs, ours):
            d = abs(a - b)
            # A NaN on either side is kept (and fails the check), not skipped as max() would.
            if math.isnan(d) or d > worst:
                worst = d
    return worst


def main():
    # vLLM 0.32's engine processes abort the interpreter's shutdown (SIGABRT), which would replace
    # the verdict's exit status, and outlive os._exit holding the caller's pipes open: whatever
    # happens, they are killed and the process exits with the verdict (1 on an error).
    import psutil

    code = 1
    try:
        code = check()
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for child in psutil.Process().children(recursive=True):
            child.kill()
        os._exit(code)


def check():
    adapter, adapter_scored, merged, merged_scored = sys.argv[1:5]
    import vllm
    from transformers import AutoTokenizer
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    config = json.loads((pathlib.Path(adapter) / "adapter_config.json").read_text())
    base = config["base_model_name_or_path"]
    common = dict(dtype="float32", max_model_len=1024, enforce_eager=True, seed=0)
    llm = LLM(model=base, enable_lora=True, max_lora_rank=max(8, config["r"]), max_loras=1, **common)
    rows = token_rows(AutoTokenizer.from_pretrained(adapter), adapter_scored)
    with_lora = worst_difference(llm, rows, LoRARequest("fused", 1, str(pathlib.Path(adapter).resolve())))
    # The same prompts on the bare base: the adapter has to move them, or the check above proves nothing.
    base_gap = worst_difference(llm, rows)
    del llm
    llm = LLM(model=merged, **common)
    full = worst_difference(llm, token_rows(AutoTokenizer.from_pretrained(merged), merged_scored))
    doc = {"vllm": vllm.__version__, "lora_rank": config["r"], "vllm_lora_max_abs_difference": with_lora,
           "vllm_merged_max_abs_difference": full, "base_without_adapter_max_abs_difference": base_gap,
           "tolerance": TOL}
    print(json.dumps(doc), flush=True)
    ok = all(math.isfinite(x) for x in (with_lora, full, base_gap))
    return 0 if ok and with_lora <= TOL and full <= TOL and base_gap > 10 * TOL else 1


if __name__ == "__main__":
    main()
