"""The fuzzing table of docs/reliability.md, from the runs scripts/fuzz.sh recorded in
fuzz/runs.jsonl and the findings kept in fuzz/regressions/. Replaces what lies between the
`<!-- fuzz-table -->` markers. Run: python3 scripts/fuzz_table.py (or scripts/fuzz.sh table)."""
import json
import os
import subprocess

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
runs_file = os.path.join(root, "fuzz/runs.jsonl")
doc = os.path.join(root, "docs/reliability.md")
GOAL_MINUTES = 30

runs = []
if os.path.exists(runs_file):
    for n, line in enumerate(open(runs_file), 1):
        line = line.strip()
        if line:
            try:
                runs.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SystemExit(f"{runs_file}:{n}: not JSON ({e})")

# The targets and what each parses, in the harness's order.
target_dir = os.environ.get("FUSERL_FUZZ_TARGET_DIR", os.path.expanduser("~/.cache/fuserl-fuzz-target"))
harness = os.path.join(target_dir, "debug/fuserl-fuzz")
targets = [l.split("\t", 1) for l in subprocess.run([harness, "--list"], check=True, capture_output=True,
                                                   text=True).stdout.splitlines()]
# The harness's generation (fuserl_fuzz::HARNESS): the goal counts its runs only.
current = int(subprocess.run([harness, "--harness"], check=True, capture_output=True, text=True).stdout)

rows = [f"| target | parser | fuzzer | CPU-minutes, harness {current} | executions, harness {current} | runs, harness {current} | "
        "CPU-minutes, earlier harnesses | findings (crash/hang), all runs | fixed, replayed by |",
        "|---|---|---|---:|---:|---:|---:|---|---|"]
short = []
for name, parser in targets:
    every = [r for r in runs if r["target"] == name]
    mine = [r for r in every if r.get("harness", 1) == current]
    minutes = sum(r["cpu_seconds"] for r in mine) / 60
    earlier = sum(r["cpu_seconds"] for r in every if r.get("harness", 1) != current) / 60
    execs = sum(r["executions"] for r in mine)
    found_dir = os.path.join(root, "fuzz/regressions", name)
    found = sorted(os.listdir(found_dir)) if os.path.isdir(found_dir) else []
    crashes = sum(f.startswith("crash-") for f in found)
    hangs = sum(f.startswith("hang-") for f in found)
    fuzzers = sorted({r["fuzzer"] for r in every}) or ["AFL++"]
    replay = "`tests/fuzz.rs`" + (f" ({len(found)} files in `fuzz/regressions/{name}/`)" if found else "")
    rows.append(f"| `{name}` | {parser} | {', '.join(fuzzers)} | {minutes:.1f} | {execs:,} | {len(mine)} | "
                f"{earlier:.1f} | {crashes}/{hangs} | {replay} |")
    if minutes < GOAL_MINUTES:
        short.append(f"`{name}` ({minutes:.1f})")

cpus = sorted({r.get("cpu", "") for r in runs} - {""})
sampled = sum(r.get("cpu_accounting") != "rusage" for r in runs)
notes = [f"CPU: {', '.join(cpus) or 'none yet'}. One AFL++ instance per run (two runs at a time with "
         "`scripts/fuzz.sh topup`); CPU-minutes are the user and system time of AFL++ and of every harness "
         "process it ran, as the kernel accounts them to `scripts/fuzz.sh` (getrusage of its children; it takes "
         "in the fork server AFL++ leaves behind), summed over the runs recorded in `fuzz/runs.jsonl`. "
         f"Harness {current} counts from the change that its number marks (`fuserl_fuzz::HARNESS`); hours on "
         "earlier harnesses are shown apart and do not count towards the goal."]
if sampled:
    notes.append(f"{sampled} of the runs, recorded before that accounting, sampled /proc once a second instead, "
                 "which misses most of the harness processes (each lives for 1000 inputs, often well under a "
                 "second): their minutes are lower bounds.")
notes.append("The first Parquet and tokenizer findings came from unrecorded trial runs of the targets (8 to 60 s "
             "each) while the harness was being written.")
if short:
    notes.append(f"Below the {GOAL_MINUTES} CPU-minutes on harness {current} that issues #13 and #33 ask for: "
                 + ", ".join(short) + ". `scripts/fuzz.sh topup 30 JOBS` goes on from here.")
else:
    notes.append(f"Every target has run at least {GOAL_MINUTES} CPU-minutes on harness {current}.")
table = "\n".join(rows) + "\n\n" + " ".join(notes) + "\n"

text = open(doc).read()
start, end = "<!-- fuzz-table -->", "<!-- /fuzz-table -->"
if start not in text or end not in text:
    raise SystemExit(f"{doc}: no {start} ... {end} markers")
head, rest = text.split(start, 1)
_, tail = rest.split(end, 1)
open(doc, "w").write(head + start + "\n" + table + end + tail)
print(table)
