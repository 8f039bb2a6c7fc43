#!/usr/bin/env python3
"""The `classifier` reward benchmark's data and its PyTorch peer (scripts/bench-reward.sh).

    make OUT N       a random LlamaForSequenceClassification with SmolLM2-135M's shape (1 label,
                     pad id set) in OUT/rm with SmolLM2's tokenizer and chat template, and N
                     conversations of about 512 tokens in OUT/pairs.jsonl ({"prompt", "response"})
    torch OUT B      score them with transformers (f32, batches of B sorted by length, as fuserl
                     batches them); prints one JSON line: sequences/s (loading, tokenizing and
                     scoring, as fuserl's whole process) and the process's peak RSS
"""
import json
import os
import pathlib
import resource
import shutil
import sys
import time

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

SMOLLM2 = pathlib.Path(os.environ.get("FUSERL_MODELS", pathlib.Path.home() / ".cache/fuserl/models")) / "SmolLM2-135M-Instruct"
WORDS = ("the model answers each question with care and the reward model reads every token of the "
         "conversation before it gives one number for the whole answer").split()


def make(out, n):
    out = pathlib.Path(out)
    rm = out / "rm"
    shutil.rmtree(rm, ignore_errors=True)
    cfg = json.loads((SMOLLM2 / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(SMOLLM2)
    config = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype", "model_type")},
                         num_labels=1, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else 2)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    model.save_pretrained(rm)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (SMOLLM2 / f).exists():
            shutil.copy(SMOLLM2 / f, rm / f)
    lines = []
    for i in range(n):
        question = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(40)) + "?"
        k = 300 + (i * 37) % 200
        answer = " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(k))
        conv = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        ids = tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
        # Trim the answer to about 512 tokens in all.
        while len(ids) > 512:
            answer = answer.rsplit(" ", 8)[0]
            conv[1]["content"] = answer
            ids = tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
        lines.append(json.dumps({"prompt": question, "response": answer}))
    (out / "pairs.jsonl").write_text("\n".join(lines) + "\n")


def score(out, batch):
    out = pathlib.Path(out)
    torch.set_num_threads(os.cpu_count())
    # Timed as `fuserl reward` is (its whole process): loading, tokenizing, scoring; only the
    # interpreter's start and the imports are left out.
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(out / "rm")
    model = LlamaForSequenceClassification.from_pretrained(out / "rm", dtype=torch.float32).eval()
    pairs = [json.loads(l) for l in (out / "pairs.jsonl").read_text().splitlines()]
    ids = [tok.apply_chat_template([{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["response"]}],
                                   tokenize=True, return_dict=True)["input_ids"] for p in pairs]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    pad = model.config.pad_token_id
    scores = [None] * len(ids)
    with torch.inference_mode():
        for s in range(0, len(order), batch):
            chunk = order[s:s + batch]
            longest = max(len(ids[i]) for i in chunk)
            x = torch.tensor([ids[i] + [pad] * (longest - len(ids[i])) for i in chunk])
            mask = torch.tensor([[1] * len(ids[i]) + [0] * (longest - len(ids[i])) for i in chunk])
            logits = model(input_ids=x, attention_mask=mask).logits
            for i, l in zip(chunk, logits[:, 0].tolist()):
                scores[i] = l
    secs = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out / "torch-scores.json").write_text(json.dumps(scores))
    print(json.dumps({"impl": "transformers", "sequences": len(ids), "tokens": sum(map(len, ids)), "batch": batch,
                      "seconds": round(secs, 3), "sequences_per_s": round(len(ids) / secs, 3), "peak_rss_mb": round(rss, 1),
                      "torch": torch.__version__, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    {"make": lambda: make(sys.argv[2], int(sys.argv[3])), "torch": lambda: score(sys.argv[2], int(sys.argv[3]))}[sys.argv[1]]()
