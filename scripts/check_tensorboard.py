#!/usr/bin/env python3
"""Read a run's TensorBoard event files with TensorBoard's own reader and compare every scalar
with the run's metrics.jsonl (the check of fuserl's event writer, train/src/tensorboard.rs).

    ~/.cache/fuserl-oracle/venv/bin/python scripts/check_tensorboard.py runs/NAME

Needs the `tensorboard` package (pip install tensorboard). Prints the number of scalars compared
and exits non-zero on any difference larger than float32 rounding.
"""
import json
import pathlib
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main(run):
    run = pathlib.Path(run)
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    got = {}
    for tag in acc.Tags()["scalars"]:
        for e in acc.Scalars(tag):
            got[(tag, e.step)] = e.value
    want = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        for k, v in m.items():
            if k not in ("step", "stage") and isinstance(v, (int, float)):
                want[(f"{m['stage']}/{k}", m["step"])] = float(v)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    bad = [(k, want[k], got[k]) for k in want if k in got and abs(got[k] - want[k]) > 1e-6 * max(1.0, abs(want[k]))]
    print(json.dumps({"scalars": len(want), "read": len(got), "missing": missing[:5], "extra": extra[:5], "different": bad[:5]}))
    if missing or extra or bad or not want:
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1])
