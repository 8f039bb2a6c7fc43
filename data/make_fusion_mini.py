#!/usr/bin/env python3
"""Build data/fusion-mini.jsonl: a tiny multi-source fusion dataset (see data/README.md).

The responses below were written by hand for fuserl's tests, in the styles of three source
models (`model-a`: concise and accurate, `model-b`: long-winded, `model-c`: quick and
sometimes wrong). Each prompt lists the key facts a good answer contains. The reward is a
rule-based verifier, deterministic and reproducible:

    reward = (key facts found, case-insensitive) / (key facts)  -  0.002 * words

rounded to 4 decimals, where a fact is found where it stands on its own: one that starts with a
letter starts a word, one that starts or ends with a digit is not part of a longer number ("0" is
not in "100 degrees"). Run `python3 data/make_fusion_mini.py` to rebuild the files (the facts also feed the
`keywords` reward model, which scores new answers the same way).
"""
import json
import pathlib

HERE = pathlib.Path(__file__).resolve().parent

DATA = [
    ("capital-france", "What is the capital of France?", ["paris"], {
        "model-a": ["The capital of France is Paris.", "Paris."],
        "model-b": ["France's capital city is Paris, which has been the political and cultural centre of the country for centuries and is home to landmarks such as the Eiffel Tower, the Louvre and Notre-Dame, along with the seat of the national government.",
                    "The capital of France is Paris, located on the Seine in the north of the country."],
        "model-c": ["The capital of France is Lyon.", "Paris is the capital."],
    }),
    ("water-boil", "At what temperature does water boil at sea level, in Celsius?", ["100"], {
        "model-a": ["Water boils at 100 degrees Celsius at sea level.", "100 °C."],
        "model-b": ["At standard atmospheric pressure, which is the pressure at sea level, pure water boils at 100 degrees Celsius; at higher altitudes the pressure is lower and water boils at a lower temperature, which is why cooking takes longer in the mountains and why pressure cookers speed things up.",
                    "At sea level water boils at 100 °C, or 212 °F."],
        "model-c": ["Around 90 degrees Celsius.", "It boils at 100 degrees."],
    }),
    ("planets-count", "How many planets are in the Solar System?", ["eight"], {
        "model-a": ["There are eight planets in the Solar System.", "Eight planets."],
        "model-b": ["The Solar System has eight planets: Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune. Pluto was reclassified as a dwarf planet by the International Astronomical Union in 2006, so it is no longer counted among them, even though many people still remember nine.",
                    "There are eight recognised planets orbiting the Sun."],
        "model-c": ["There are nine planets.", "Eight, since Pluto was demoted."],
    }),
    ("python-list-reverse", "How do I reverse a list `xs` in Python?", ["reverse", "[::-1]"], {
        "model-a": ["Use `xs.reverse()` to reverse in place, or `xs[::-1]` for a reversed copy.", "`xs[::-1]` returns a reversed copy; `xs.reverse()` reverses in place."],
        "model-b": ["There are several ways to reverse a list in Python. The method `xs.reverse()` reverses the list in place and returns None. The slice `xs[::-1]` creates a new reversed list. You can also use `list(reversed(xs))`, which works with any sequence and is often considered the most readable option by many developers.",
                    "You can call `xs.reverse()` or build a copy with `xs[::-1]`."],
        "model-c": ["Use `xs.sort(reverse=True)`.", "Write `xs[::-1]`."],
    }),
    ("photosynthesis", "In one sentence, what does photosynthesis produce?", ["glucose", "oxygen"], {
        "model-a": ["Photosynthesis produces glucose and oxygen from carbon dioxide and water using light energy.", "It makes glucose and releases oxygen."],
        "model-b": ["Photosynthesis is the process by which green plants, algae and some bacteria use the energy of sunlight, captured by chlorophyll, to turn carbon dioxide and water into glucose, a sugar they use for energy and growth, while releasing oxygen into the atmosphere as a by-product of splitting water molecules.",
                    "Photosynthesis produces sugar (glucose) and oxygen."],
        "model-c": ["It produces carbon dioxide.", "Oxygen."],
    }),
    ("speed-of-light", "Roughly how fast does light travel in a vacuum, in km/s?", ["300", "000"], {
        "model-a": ["About 300,000 km/s (299,792 km/s exactly).", "Roughly 300 000 km per second."],
        "model-b": ["Light in a vacuum travels at exactly 299,792,458 metres per second, which is about 300,000 kilometres per second; this constant, written c, is fixed by the definition of the metre and is the upper speed limit for anything carrying information in the universe according to special relativity.",
                    "It travels at roughly 300,000 km/s."],
        "model-c": ["About 30,000 km/s.", "Around 300,000 km/s."],
    }),
    ("dna-bases", "Name the four bases of DNA.", ["adenine", "thymine", "guanine", "cytosine"], {
        "model-a": ["Adenine, thymine, guanine and cytosine.", "A (adenine), T (thymine), G (guanine), C (cytosine)."],
        "model-b": ["DNA is built from four nucleotide bases: adenine and guanine, which are purines, and thymine and cytosine, which are pyrimidines. Adenine pairs with thymine through two hydrogen bonds and guanine pairs with cytosine through three, which is what holds the two strands of the famous double helix together.",
                    "The bases are adenine, thymine, guanine and cytosine."],
        "model-c": ["Adenine, uracil, guanine and cytosine.", "A, T, G and C."],
    }),
    ("shakespeare-hamlet", "Who wrote Hamlet?", ["shakespeare"], {
        "model-a": ["William Shakespeare wrote Hamlet.", "Shakespeare."],
        "model-b": ["Hamlet, whose full title is The Tragedy of Hamlet, Prince of Denmark, was written by William Shakespeare around 1600. It is one of his longest plays and among the most performed and studied works in the English language, famous for the soliloquy that begins with to be, or not to be.",
                    "It was written by William Shakespeare around 1600."],
        "model-c": ["Christopher Marlowe.", "Shakespeare wrote it."],
    }),
    ("sqrt-144", "What is the square root of 144?", ["12"], {
        "model-a": ["The square root of 144 is 12.", "12."],
        "model-b": ["The square root of 144 is 12, because 12 multiplied by 12 equals 144. Strictly speaking, -12 is also a square root since (-12) times (-12) is 144 as well, but the principal square root, which is what the radical sign denotes, is the non-negative one, namely 12.",
                    "It is 12, since 12 × 12 = 144."],
        "model-c": ["It is 14.", "12."],
    }),
    ("largest-ocean", "Which is the largest ocean on Earth?", ["pacific"], {
        "model-a": ["The Pacific Ocean is the largest.", "The Pacific."],
        "model-b": ["The Pacific Ocean is by far the largest and deepest of Earth's oceans, covering about 165 million square kilometres, which is more than all of the planet's land area combined, and containing the Mariana Trench, whose Challenger Deep is the deepest known point on Earth.",
                    "The largest ocean is the Pacific Ocean."],
        "model-c": ["The Atlantic Ocean.", "The Pacific Ocean."],
    }),
]


# Stand-ins for the target's own samples (WRPO needs two per prompt). In a real run they come
# from the target model's generation; here they are hand-written like the sources' answers.
TARGET = {
    "capital-france": ["Paris is the capital of France.", "I think it is Marseille."],
    "water-boil": ["Water boils at 100 degrees Celsius.", "Water boils at 50 degrees."],
    "planets-count": ["There are eight planets.", "There are ten planets."],
    "python-list-reverse": ["Call `xs.reverse()`.", "Use `sorted(xs)`."],
    "photosynthesis": ["Glucose and oxygen.", "It produces nitrogen."],
    "speed-of-light": ["About 300,000 km/s.", "About 3,000 km/s."],
    "dna-bases": ["Adenine, thymine, guanine, cytosine.", "Alanine and glycine."],
    "shakespeare-hamlet": ["Shakespeare.", "Charles Dickens."],
    "sqrt-144": ["12.", "72."],
    "largest-ocean": ["The Pacific.", "The Indian Ocean."],
}

# Held-out prompts for evaluation (`prompts-heldout.jsonl`): no answers, only the key facts the
# `keywords` reward looks for; none of them is a training prompt.
HELDOUT = [
    ("capital-japan", "What is the capital of Japan?", ["tokyo"]),
    ("freeze-water", "At what temperature does water freeze, in Celsius?", ["0"]),
    ("moon-earth", "What is the name of Earth's natural satellite?", ["moon"]),
    ("python-len", "How do I get the number of items in a list `xs` in Python?", ["len(xs)"]),
    ("largest-planet", "What is the largest planet in the Solar System?", ["jupiter"]),
    ("speed-light", "Roughly how fast does light travel, in kilometres per second?", ["300"]),
]


def contains_fact(text: str, fact: str) -> bool:
    """The `keywords` reward's rule (plugins/builtin/src/rewards/keywords.rs, `contains_fact`)."""
    digit = lambda c: c is not None and c.isascii() and c.isdigit()  # noqa: E731
    start = 0
    while fact and (at := text.find(fact, start)) >= 0:
        before = text[at - 1] if at > 0 else None
        after = text[at + len(fact)] if at + len(fact) < len(text) else None
        if before is None:
            starts_ok = True
        elif digit(fact[0]):
            starts_ok = not digit(before)
        elif fact[0].isalnum():
            starts_ok = not before.isalnum()
        else:
            starts_ok = True
        ends_ok = not (digit(fact[-1]) and digit(after))
        if starts_ok and ends_ok:
            return True
        start = at + 1
    return False


def reward(text: str, facts: list[str]) -> float:
    found = sum(1 for f in facts if contains_fact(text.lower(), f.lower()))
    words = len(text.split())
    return round(found / len(facts) - 0.002 * words, 4)


def main() -> None:
    per_prompt, flat = [], []
    for pid, prompt, facts, responses in DATA:
        scores = {src: [reward(t, facts) for t in texts] for src, texts in responses.items()}
        per_prompt.append({"id": pid, "prompt": [{"role": "user", "content": prompt}],
                           "responses": responses, "scores": scores,
                           "sampling": {src: {"temperature": 0.8, "top_p": 0.95} for src in responses}})
        for src, texts in responses.items():
            for i, t in enumerate(texts):
                flat.append({"prompt_id": pid, "prompt": prompt, "source": src, "sample_index": i,
                             "response": t, "score": scores[src][i]})
    target = []
    for pid, prompt, facts, _ in DATA:
        for i, t in enumerate(TARGET[pid]):
            target.append({"prompt_id": pid, "prompt": prompt, "source": "target", "sample_index": i,
                           "response": t, "score": reward(t, facts)})
    facts = [{"id": pid, "facts": f} for pid, _, f, _ in DATA] + [{"id": pid, "facts": f} for pid, _, f in HELDOUT]
    (HERE / "fusion-mini-facts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in facts))
    (HERE / "fusion-mini-target.jsonl").write_text("".join(json.dumps(r) + "\n" for r in target))
    (HERE / "fusion-mini.jsonl").write_text("".join(json.dumps(r) + "\n" for r in per_prompt))
    (HERE / "fusion-mini-flat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in flat))
    prompts = [{"id": pid, "prompt": prompt} for pid, prompt, _, _ in DATA]
    (HERE / "prompts-mini.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    heldout = [{"id": pid, "prompt": prompt} for pid, prompt, _ in HELDOUT]
    assert not {r["id"] for r in heldout} & {r["id"] for r in prompts}, "a held-out prompt is a training prompt"
    (HERE / "prompts-heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in heldout))


if __name__ == "__main__":
    main()
