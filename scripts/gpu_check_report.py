#!/usr/bin/env python3
"""report.md of a scripts/gpu-check.sh run from its STEP.json files (standard library only), and
summary.json beside them: the steps that failed or timed out and the parity checks past their
tolerance (log-probs: 1e-4 absolute per token; step-0 loss and gradient norm in f32: 1e-4
relative), which make the run fail.

    python3 scripts/gpu_check_report.py OUT_DIR DEV > OUT_DIR/report.md
"""
import json
import pathlib
import sys

LOGPROB_TOL = 1e-4
STEP0_TOL = 1e-4
# Dense peak FLOP/s by GPU name (NVIDIA's data sheets): bf16 tensor cores, and f32 without
# tensor cores (fuserl's f32 does not use TF32; PyTorch's is told not to for parity only).
PEAKS = {"H200": (989.4e12, 66.9e12), "H100": (989.4e12, 66.9e12), "A100": (312e12, 19.5e12)}


def fmt(x, spec=".3g"):
    return "" if x is None else format(x, spec)


def ratio(a, b):
    return a / b if a and b else None


def main():
    out, dev = pathlib.Path(sys.argv[1]), sys.argv[2]
    # In the order they ran.
    files = sorted((p for p in out.glob("*.json") if p.name != "summary.json"), key=lambda p: p.stat().st_mtime)
    steps = [j for j in (json.loads(p.read_text()) for p in files) if isinstance(j, dict) and "step" in j]
    env = next((s for s in steps if s["step"] == "environment"), None)
    gpu = ""
    if env:
        for line in env["log_tail"]:
            if "," in line and ("NVIDIA" in line or "H200" in line or "H100" in line):
                gpu = line
    peak = next((v for k, v in PEAKS.items() if k in gpu), None)
    failures, lines = [], []
    w = lines.append
    w(f"# gpu-check ({dev})\n")
    if env:
        w("```")
        lines.extend(l for l in env["log_tail"])
        w("```\n")
    spent = [s["step"] for s in steps if s["status"] == "budget"]
    if spent:
        w(f"{len(spent)} steps not run or cut short by the run's budget (GPU_CHECK_BUDGET): {', '.join(spent)}.\n")
    w("| step | status | seconds |")
    w("|---|---|---|")
    for s in steps:
        w(f"| {s['step']} | {s['status']} | {s['seconds']} |")
        if s["status"] in ("failed", "timeout"):
            failures.append(f"{s['step']}: {s['status']}")
    w("")

    w("## Per-token log-probs against transformers (f32, TF32 off)\n")
    w("| step | pairs | tokens | max abs difference | within 1e-4 |")
    w("|---|---|---|---|---|")
    for s in steps:
        if s["step"].startswith("logprobs-") and s["results"] and "max_abs_logp_difference" in s["results"][-1]:
            r = s["results"][-1]
            ok = r["max_abs_logp_difference"] <= LOGPROB_TOL
            if not ok:
                failures.append(f"{s['step']}: log-probs differ by {r['max_abs_logp_difference']:.2e}")
            w(f"| {s['step']} | {r['pairs']} | {r['tokens']} | {r['max_abs_logp_difference']:.2e} | {'yes' if ok else 'NO'} |")
    w("")

    w("## Step-0 loss and gradient norm against PyTorch (f32)\n")
    w("| step | fuserl loss | PyTorch loss | relative | fuserl grad norm | PyTorch grad norm | relative |")
    w("|---|---|---|---|---|---|---|")
    for s in steps:
        if s["step"].startswith("step0-") and len(s["results"]) >= 2 and all("step0_loss" in r for r in s["results"][:2]):
            f, t = s["results"][0], s["results"][1]
            rl = abs(f["step0_loss"] - t["step0_loss"]) / max(abs(t["step0_loss"]), 1e-12)
            rg = abs(f["step0_grad_norm"] - t["step0_grad_norm"]) / max(abs(t["step0_grad_norm"]), 1e-12)
            if max(rl, rg) > STEP0_TOL:
                failures.append(f"{s['step']}: step-0 loss/grad norm differ by {rl:.1e}/{rg:.1e}")
            w(f"| {s['step']} | {f['step0_loss']:.6f} | {t['step0_loss']:.6f} | {rl:.1e} | {f['step0_grad_norm']:.6f} | {t['step0_grad_norm']:.6f} | {rg:.1e} |")
    w("")

    w("## A FusePO-DPO step next to PyTorch eager\n")
    w("| step | sequences x tokens | fuserl tokens/s | PyTorch tokens/s | ratio | fuserl peak | PyTorch peak | ratio | fuserl MFU | PyTorch MFU | step-0 grad norm (fuserl / PyTorch) |")
    w("|---|---|---|---|---|---|---|---|---|---|---|")
    for s in steps:
        if not s["step"].startswith("dpo-step-") or not s["results"]:
            continue
        runs = [r for r in s["results"] if "bench" in r]
        peaks = [r.get("device_peak_bytes") for r in s["results"] if "device_peak_bytes" in r]
        if not runs:
            continue
        f = runs[0]
        t = runs[1] if len(runs) > 1 else {}
        fp = peaks[0] if peaks else f.get("peak_resident_bytes")
        tp = peaks[1] if len(peaks) > 1 else t.get("peak_bytes")
        flops = peak[0 if f["dtype"] == "bf16" else 1] if peak else None
        mfu = lambda r: ratio(r.get("model_flops_per_second"), flops) if flops else None
        w(f"| {s['step']} | {f['sequences']} x {f['tokens_per_sequence']} | {f['tokens_per_second']:.0f} | {fmt(t.get('tokens_per_second'), '.0f')} "
          f"| {fmt(ratio(f['tokens_per_second'], t.get('tokens_per_second')), '.2f')} | {fmt(fp and fp / 2**30, '.2f')} GiB | {fmt(tp and tp / 2**30, '.2f')} GiB "
          f"| {fmt(ratio(fp, tp), '.2f')} | {fmt(mfu(f), '.1%')} | {fmt(mfu(t), '.1%')} | {f['step0_grad_norm']:.4f} / {fmt(t.get('step0_grad_norm'), '.4f')} |")
    w("")

    w("## LoRA and QLoRA: the bf16 DPO step with rank-16 adapters, beside the full step\n")
    w("| step | trained parameters | tokens/s | peak | the full bf16 step's peak | ratio |")
    w("|---|---|---|---|---|---|")
    full = {}
    for s in steps:
        if s["step"].startswith("dpo-step-") and s["step"].endswith("-bf16") and s["results"]:
            peaks = [r.get("device_peak_bytes") for r in s["results"] if "device_peak_bytes" in r]
            runs = [r for r in s["results"] if "bench" in r]
            if runs:
                full[s["step"][len("dpo-step-"):-len("-bf16")]] = peaks[0] if peaks else runs[0].get("peak_resident_bytes")
    for s in steps:
        if not (s["step"].startswith("lora-step-") or s["step"].startswith("qlora-step-")) or not s["results"]:
            continue
        runs = [r for r in s["results"] if "bench" in r]
        if not runs:
            continue
        f = runs[0]
        peaks = [r.get("device_peak_bytes") for r in s["results"] if "device_peak_bytes" in r]
        fp = peaks[0] if peaks else f.get("peak_resident_bytes")
        name = s["step"].split("-step-", 1)[1][: -len("-bf16")]
        w(f"| {s['step']} | {f['trained_parameters']} | {f['tokens_per_second']:.0f} | {fmt(fp and fp / 2**30, '.2f')} GiB "
          f"| {fmt(full.get(name) and full[name] / 2**30, '.2f')} GiB | {fmt(ratio(fp, full.get(name)), '.2f')} |")
    w("")

    w("## Generation (greedy, KV cache) next to transformers' generate\n")
    w("| step | batch | fuserl tokens/s | transformers tokens/s | ratio |")
    w("|---|---|---|---|---|")
    for s in steps:
        if s["step"].startswith("generate-") and s["results"] and "tokens_per_second" in s["results"][0]:
            f = s["results"][0]
            t = s["results"][1] if len(s["results"]) > 1 else {}
            w(f"| {s['step']} | {f['batch']} | {f['tokens_per_second']:.0f} | {fmt(t.get('tokens_per_second'), '.0f')} | {fmt(ratio(f['tokens_per_second'], t.get('tokens_per_second')), '.2f')} |")
    w("")
    if failures:
        w("## Failures\n")
        lines.extend(f"- {x}" for x in failures)
    (out / "summary.json").write_text(json.dumps({"failures": failures}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
