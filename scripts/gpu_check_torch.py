#!/usr/bin/env python3
"""The PyTorch side of scripts/gpu-check.sh: random-weight models made by transformers from a
real config, and the peers of `fuserl logprobs` and `fuserl bench` on the same device. Each
command prints one JSON object.

    gpu_check_torch.py make-model CONFIG_DIR OUT_DIR [--seed 0]
    gpu_check_torch.py logprobs MODEL PAIRS.jsonl FUSERL_OUT.jsonl [--device cuda]
    gpu_check_torch.py train-step MODEL [--device cuda] [--dtype f32|bf16] [--objective dpo|simpo|sft]
                                  [--pairs 8] [--tokens 512] [--steps 3] [--checkpointing 1|0]
    gpu_check_torch.py generate MODEL [--device cuda] [--dtype f32|bf16] [--batch 1] [--new-tokens 128] [--runs 3]

`make-model`: the config's model with transformers' initialisation, the query and key projections
scaled up 8x so that attention is far from uniform, saved in f32 safetensors with the config
folder's tokenizer files. `logprobs`: per-token log-probs of fuserl's pairs (the chat template's
prompt, the response's tokens and EOS, as fuserl tokenizes them) in f32 with TF32 off, against
fuserl's output on the same pairs: the largest absolute difference. `train-step`: the same
optimiser step as `fuserl bench train-step` (the same token ids from the same LCG, the same
objective and reference: the model itself at step 0), on transformers' model with SDPA attention,
bf16 as torch.autocast over f32 weights, AdamW (fused on CUDA), gradient checkpointing as asked.
`generate`: transformers' greedy `generate` with its KV cache on `fuserl bench generate`'s
prompts, left-padded.
"""
import argparse
import json
import os
import pathlib
import shutil
import time

import torch

PROMPTS = [
    "Write a short story about a dragon who learns to read.",
    "Explain how a bicycle works, step by step.",
    "Describe a walk through a forest in autumn.",
    "Write a letter to a friend about your summer holiday.",
    "Explain why the sky is blue to a ten-year-old.",
    "Describe the life cycle of a butterfly in detail.",
    "Write a recipe for a vegetable soup and explain each step.",
    "Tell the history of the printing press.",
]
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "vocab.json", "merges.txt"]


def versions():
    import transformers
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def peak_bytes(dev):
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return None


def reset_peak(dev):
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        try:
            pathlib.Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def make_model(a):
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(a.seed)
    config = AutoConfig.from_pretrained(a.config_dir)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(8.0)
    out = pathlib.Path(a.out_dir)
    model.save_pretrained(out, safe_serialization=True)
    for f in TOKENIZER_FILES:
        src = pathlib.Path(a.config_dir) / f
        if src.is_file():
            shutil.copy(src, out / f)
    n = sum(p.numel() for p in model.parameters())
    return {"model": str(out), "parameters": n, **versions()}


def logprobs(a):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device(a.device)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).to(dev).eval()
    worst, tokens, pairs = 0.0, 0, 0
    for line in pathlib.Path(a.fuserl_out).read_text().splitlines():
        r = json.loads(line)
        prompt = r["prompt"] if isinstance(r["prompt"], list) else [{"role": "user", "content": r["prompt"]}]
        text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        p = tok(text, add_special_tokens=False).input_ids
        ids = torch.tensor([p + tok(r["response"], add_special_tokens=False).input_ids + [tok.eos_token_id]], device=dev)
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0].double(), -1)
        ours = [lp[t - 1, ids[0, t]].item() for t in range(len(p), ids.shape[1])]
        if len(ours) != len(r["token_logps"]):
            raise SystemExit(f"pair {pairs}: {len(ours)} response tokens here, {len(r['token_logps'])} in fuserl's output")
        worst = max(worst, max(abs(x - y) for x, y in zip(ours, r["token_logps"])))
        tokens += len(ours)
        pairs += 1
    return {"pairs": pairs, "tokens": tokens, "max_abs_logp_difference": worst, "tf32": False, **versions()}


def lcg_ids(state, n, vocab, pad):
    """fuserl bench's ids: the padding id replaced by the next (its embedding row gets no
    gradient in transformers, `nn.Embedding(padding_idx)`, and does in fuserl)."""
    out = []
    for _ in range(n):
        state[0] = (state[0] * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        i = (state[0] >> 33) % vocab
        out.append((i + 1) % vocab if i == pad else i)
    return out


def train_step(a):
    from transformers import AutoModelForCausalLM
    dev = torch.device(a.device)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa").to(dev)
    if a.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    vocab = model.config.vocab_size
    pad = model.config.pad_token_id
    per_example = 1 if a.objective == "sft" else 2
    prompt_len = max(a.tokens // 4, 1)
    response_len = max(a.tokens - prompt_len, 1)
    state = [2024]
    rows = []
    for _ in range(a.pairs):
        prompt = lcg_ids(state, prompt_len, vocab, pad)
        for _ in range(per_example):
            rows.append(prompt + lcg_ids(state, response_len, vocab, pad))
    ids = torch.tensor(rows, device=dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.dtype == "bf16")

    def sequence_logps():
        with autocast:
            logits = model(ids).logits
        lp = torch.log_softmax(logits[:, prompt_len - 1:-1].float(), -1)
        return lp.gather(-1, ids[:, prompt_len:].unsqueeze(-1)).squeeze(-1).sum(-1)

    with torch.no_grad():
        reference = sequence_logps().detach()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                              fused=dev.type == "cuda")
    n = float(response_len)

    def loss_of(logps):
        if a.objective == "sft":
            return (-logps / n).mean()
        w, l = logps[0::2], logps[1::2]
        if a.objective == "dpo":
            z = 0.1 * ((w - reference[0::2]) - (l - reference[1::2]))
        elif a.objective == "simpo":
            z = 2.0 * (w / n - l / n) - 1.0
        else:
            raise SystemExit(f"objective {a.objective}: dpo, simpo or sft")
        return -torch.nn.functional.logsigmoid(z).mean()

    reset_peak(dev)
    times, first = [], None
    for step in range(a.steps + 1):
        sync(dev)
        start = time.perf_counter()
        optim.zero_grad(set_to_none=True)
        loss = loss_of(sequence_logps())
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sync(dev)
        secs = time.perf_counter() - start
        if step == 0:
            first = (loss.item(), norm.item())
        else:
            times.append(secs)
    tokens = ids.numel()
    params = sum(p.numel() for p in model.parameters())
    med = sorted(times)[len(times) // 2]
    return {"bench": "train-step", "peer": "pytorch eager", "objective": a.objective, "device": a.device,
            "dtype": a.dtype, "parameters": params, "sequences": ids.shape[0], "tokens_per_sequence": ids.shape[1],
            "gradient_checkpointing": bool(a.checkpointing), "step_seconds": times, "median_step_seconds": med,
            "tokens_per_second": tokens / med, "model_flops_per_second": 6.0 * params * tokens / med,
            "step0_loss": first[0], "step0_grad_norm": first[1], "peak_bytes": peak_bytes(dev), **versions()}


def generate(a):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    tok = AutoTokenizer.from_pretrained(a.model, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype).to(dev).eval()
    texts = [tok.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                     add_generation_prompt=True, tokenize=False) for i in range(a.batch)]
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
    runs = []
    for run in range(a.runs + 1):
        sync(dev)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=a.new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        sync(dev)
        secs = time.perf_counter() - start
        new = out[:, batch.input_ids.shape[1]:]
        # New tokens up to and with each row's EOS (what fuserl counts).
        count = 0
        for row in new.tolist():
            count += row.index(tok.eos_token_id) + 1 if tok.eos_token_id in row else len(row)
        if run > 0:
            runs.append((secs, count))
    runs.sort()
    secs, count = runs[len(runs) // 2]
    return {"bench": "generate", "peer": "transformers generate", "device": a.device, "dtype": a.dtype,
            "batch": a.batch, "new_tokens": count, "seconds": secs, "tokens_per_second": count / secs,
            "run_seconds": [r[0] for r in runs], **versions()}


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make-model")
    m.add_argument("config_dir")
    m.add_argument("out_dir")
    m.add_argument("--seed", type=int, default=0)
    lp = sub.add_parser("logprobs")
    lp.add_argument("model")
    lp.add_argument("pairs")
    lp.add_argument("fuserl_out")
    lp.add_argument("--device", default="cuda")
    t = sub.add_parser("train-step")
    t.add_argument("model")
    t.add_argument("--device", default="cuda")
    t.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    t.add_argument("--objective", default="dpo")
    t.add_argument("--pairs", type=int, default=8)
    t.add_argument("--tokens", type=int, default=512)
    t.add_argument("--steps", type=int, default=3)
    t.add_argument("--checkpointing", type=int, default=1)
    g = sub.add_parser("generate")
    g.add_argument("model")
    g.add_argument("--device", default="cuda")
    g.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    g.add_argument("--batch", type=int, default=1)
    g.add_argument("--new-tokens", type=int, default=128)
    g.add_argument("--runs", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    fn = {"make-model": make_model, "logprobs": logprobs, "train-step": train_step, "generate": generate}[a.command]
    print(json.dumps(fn(a)))


if __name__ == "__main__":
    main()
