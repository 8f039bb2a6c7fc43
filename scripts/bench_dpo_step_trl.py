#!/usr/bin/env python3
"""One DPO optimiser step with TRL's DPOTrainer on SmolLM2-135M-Instruct, CPU: the same work as
train/benches/dpo_step.rs (2 pairs, every sequence 64 prompt + 192 response tokens from the same
LCG, f32 weights, AdamW, precomputed reference log-probs). Prints the median time of the steps
after the first (FUSERL_BENCH_STEPS of them, default 3), the process's peak resident memory and
the settings that were in effect.

    ~/.cache/fuserl-oracle/venv/bin/python scripts/bench_dpo_step_trl.py [CONVERTED_DIR] [f32] [checkpointing|no-checkpointing] [lora]

Without options this is DPOConfig's defaults, which in TRL 1.16 are bf16 autocast and gradient
checkpointing by decoder layer. `f32` turns autocast off (bf16=False); `checkpointing` /
`no-checkpointing` set gradient checkpointing; `lora` trains peft's LoraConfig(r=16, lora_alpha=32,
target_modules="all-linear") adapters (TRL's reference is then the model with the adapters off).
"""
import os
import pathlib
import resource
import statistics
import sys
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer

options = {"f32", "checkpointing", "no-checkpointing", "lora"}
positional = [a for a in sys.argv[1:] if a not in options]
folder = pathlib.Path(positional[0] if positional else os.path.expanduser("~/.cache/fuserl/models/SmolLM2-135M-Instruct"))
settings = {}
if "f32" in sys.argv[1:]:
    settings["bf16"] = False
if "checkpointing" in sys.argv[1:]:
    settings["gradient_checkpointing"] = True
if "no-checkpointing" in sys.argv[1:]:
    settings["gradient_checkpointing"] = False
torch.set_num_threads(os.cpu_count())
state = 2024


def ids(n):
    global state
    out = []
    for _ in range(n):
        state = (state * 6364136223846793005 + 1442695040888963407) % 2**64
        out.append((state >> 33) % 49152)
    return out


rows = []
for _ in range(2):
    prompt = ids(64)
    rows.append({"prompt_input_ids": prompt, "chosen_input_ids": ids(192), "rejected_input_ids": ids(192)})
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
peft_config = None
if "lora" in sys.argv[1:]:
    from peft import LoraConfig
    peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def hwm_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# The peak from here on (the training's, with the model resident), as fuserl's bench measures it.
loading_peak = hwm_mib()
open("/proc/self/clear_refs", "w").write("5")


class Timer(TrainerCallback):
    def __init__(self):
        self.starts, self.times = [], []

    def on_step_begin(self, args, state, control, **kw):
        self.starts.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self.starts[-1])


timer = Timer()
timed = int(os.environ.get("FUSERL_BENCH_STEPS", "3"))
args = DPOConfig(output_dir="/tmp/trl-dpo-bench", per_device_train_batch_size=2, max_steps=1 + timed, learning_rate=1e-6,
                 beta=0.1, loss_type="sigmoid", precompute_ref_log_probs=True, logging_steps=1, save_strategy="no",
                 report_to=[], use_cpu=True, max_length=512, dataloader_num_workers=0, seed=0, **settings)
raw = Dataset.from_list([{"prompt": tok.decode(r["prompt_input_ids"]), "chosen": tok.decode(r["chosen_input_ids"]),
                          "rejected": tok.decode(r["rejected_input_ids"])} for r in rows])
trainer = DPOTrainer(model=model, args=args, train_dataset=raw, processing_class=tok, callbacks=[timer],
                     peft_config=peft_config)
trainer.train()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
what = "peft LoRA r 16 all-linear" if peft_config else "every weight"
print(f"TRL {__import__('trl').__version__} DPOTrainer (torch {torch.__version__}, {torch.get_num_threads()} threads, "
      f"f32 weights, {what}, bf16 autocast {args.bf16}, gradient checkpointing {args.gradient_checkpointing}): "
      f"one DPO step, 2 pairs x ~256 tokens: {statistics.median(timer.times[1:]):.2f} s (median of {timed}; steps: {', '.join(f'{x:.2f}' for x in timer.times)}), "
      f"peak RSS {hwm_mib():.0f} MiB since the model was loaded ({loading_peak:.0f} MiB loading it; process peak {peak:.0f} MiB)")
