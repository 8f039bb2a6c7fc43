"""Write the generated fuzz seeds: chat templates in the styles checkpoints ship (ChatML from
checkpoints/tiny-chat, a default system prompt as Qwen's, Gemma's turns) and plugin declarations
in the byte layout of fuserl_abi::fuzzing::register_bytes. The JSON replies beside them
are written by hand. Run from the repository root: python3 fuzz/seeds/make_seeds.py"""
import json
import os

here = os.path.dirname(os.path.abspath(__file__))
tc = json.load(open("checkpoints/tiny-chat/tokenizer_config.json"))
templates = {
    "chatml.jinja": tc["chat_template"],
    "system-default.jinja": (
        "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}{%- set rest = messages[1:] %}"
        "{%- else %}{%- set system = 'You are a helpful assistant.' %}{%- set rest = messages %}{%- endif %}"
        "{{- '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}"
        "{%- for m in rest %}{%- if m.role == 'assistant' %}{{- '<|im_start|>assistant\\n' + m.content | trim + '<|im_end|>\\n' }}"
        "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
    "gemma.jinja": (
        "{{ bos_token }}{%- for message in messages -%}{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
        "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
    ),
}
for name, text in templates.items():
    open(os.path.join(here, "template", name), "w").write(text)


def declaration(version, components, plugin=b"fuzz-plugin"):
    """Byte 0: ABI version; bytes 1, 2: XOR on the declared sizes (0: right); then NUL-separated
    fields: the plugin name, and per component (point, function mask, name) then its summary."""
    out = bytes([version, 0, 0]) + plugin
    for point, mask, name, summary in components:
        out += b"\0" + bytes([point, mask]) + name + b"\0" + summary
    return out


# Function mask bits: 0 collect, 1 score, 2 scorer_id, 3 weigh, 4 needs_reference,
# 5 build_examples, 6 loss, 7 generator_info + generate.
declarations = {
    "v2.bin": declaration(2, [(0, 0b10000001, b"my-source", b"a source"), (1, 0b110, b"my-reward", b"a reward"),
                              (3, 0b1110000, b"my-objective", b"an objective")]),
    "v1.bin": declaration(1, [(2, 0b1000, b"my-weighting", b"weights")]),
    "dup.bin": declaration(2, [(3, 0b1110000, b"twice", b"one"), (3, 0b1110000, b"twice", b"two")]),
}
for name, data in declarations.items():
    open(os.path.join(here, "plugin-declaration", name), "wb").write(data)


# Seeds of the structure-aware targets (fuzz/src/structured.rs): their bytes are choices, so a
# seed is any bytes. All zeros builds the smallest well-formed input of each grammar (every
# choice its first option); the others are fixed pseudo-random bytes that pick other branches.
import random

structured = os.path.join(here, "structured")
os.makedirs(structured, exist_ok=True)
open(os.path.join(structured, "zeros.bin"), "wb").write(bytes(64))
rng = random.Random(33)
for n in (64, 512, 4096):
    open(os.path.join(structured, f"random-{n}.bin"), "wb").write(bytes(rng.randrange(256) for _ in range(n)))
