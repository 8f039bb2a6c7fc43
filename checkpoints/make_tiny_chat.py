#!/usr/bin/env python3
"""Build checkpoints/tiny-chat: a tiny random Llama (about 100K parameters) with a 512-token
byte-level BPE tokenizer trained on data/fusion-mini*.jsonl and a ChatML chat template. It is the
target of the quick-start recipe: small enough to commit and to train on 2 CPU cores in minutes.

    ~/.cache/fuserl-oracle/venv/bin/python checkpoints/make_tiny_chat.py
"""
import json
import pathlib
import shutil

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM

HERE = pathlib.Path(__file__).resolve().parent
OUT = HERE / "tiny-chat"
DATA = HERE.parent / "data"
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def corpus():
    for name in ["fusion-mini.jsonl", "fusion-mini-target.jsonl"]:
        for line in (DATA / name).read_text().splitlines():
            r = json.loads(line)
            p = r["prompt"]
            yield p if isinstance(p, str) else " ".join(m["content"] for m in p)
            if "responses" in r:
                for texts in r["responses"].values():
                    yield from (texts if isinstance(texts, list) else [texts])
            else:
                yield r["response"]
            yield "system user assistant"


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    tok.save(str(OUT / "tokenizer.json"))
    (OUT / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "model_max_length": 512,
        "add_bos_token": False, "clean_up_tokenization_spaces": False, "chat_template": TEMPLATE}, indent=1) + "\n")
    torch.manual_seed(1234)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, initializer_range=0.05)
    model = LlamaForCausalLM(config)
    model.save_pretrained(OUT)
    (OUT / "generation_config.json").unlink(missing_ok=True)
    print(sum(p.numel() for p in model.parameters()), "parameters; vocab", tok.get_vocab_size())


if __name__ == "__main__":
    main()
