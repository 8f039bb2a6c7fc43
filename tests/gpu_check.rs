//! Issue #37: the one-call GPU check's dry mode, `DEV=cpu scripts/gpu-check.sh run`, on the
//! `fuserl` binary cargo built, so that the script cannot rot between GPU runs: every step runs
//! (the PyTorch peers when the oracle environment, docs/oracle.md, is there; CI has none, and
//! those halves are skipped) and the report is written.

use crate::common::{repo, text};

/// `DEV=cpu scripts/gpu-check.sh run` into `out` with `PYTHON` and the extra environment, which
/// must succeed: its output, and the report it wrote.
fn dry_run(out: &std::path::Path, python: &str, env: &[(&str, &str)]) -> (String, String) {
    let run = std::process::Command::new("bash")
        .arg(repo().join("scripts/gpu-check.sh"))
        .arg("run")
        .env("DEV", "cpu")
        .env("FUSERL_BIN", env!("CARGO_BIN_EXE_fuserl"))
        .env("GPU_CHECK_OUT", out)
        .env("PYTHON", python)
        // This binary runs the kernel tests itself.
        .env("FUSERL_TESTS_BIN", "none")
        .envs(env.iter().copied())
        .env_remove("OUT")
        .output()
        .expect("run gpu-check.sh");
    let log = format!("{}{}", text(&run.stdout), text(&run.stderr));
    assert!(run.status.success(), "{log}");
    let report = std::fs::read_to_string(out.join("report.md")).expect("report.md");
    (log, report)
}

/// The run's summary.json says no step failed.
fn assert_no_failures(out: &std::path::Path, report: &str) {
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).expect("summary")).expect("json");
    assert_eq!(summary["failures"], serde_json::json!([]), "{report}");
}

#[test]
fn the_gpu_check_runs_on_the_cpu() {
    let out = tempfile::tempdir().expect("tmp");
    let oracle =
        std::path::PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/fuserl-oracle/venv/bin/python");
    let python = if oracle.is_file() { oracle.display().to_string() } else { "python3".to_owned() };
    let (log, report) = dry_run(out.path(), &python, &[]);
    for section in
        ["## Per-token log-probs", "## Step-0 loss", "## A FusePO-DPO step", "## Generation", "## LoRA and QLoRA"]
    {
        assert!(report.contains(section), "{section} missing:\n{report}");
    }
    let step = |name: &str| -> serde_json::Value {
        let file = out.path().join(format!("{name}.json"));
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{name}.json: {e}\n{log}")))
            .expect("json")
    };
    assert_eq!(step("environment")["status"], "ok");
    // fuserl's half of every measuring step ran and gave its numbers.
    for (name, bench) in [
        ("step0-tiny-sft", "train-step"),
        ("step0-tiny-dpo", "train-step"),
        ("step0-tiny-simpo", "train-step"),
        ("dpo-step-tiny-f32", "train-step"),
        ("dpo-step-tiny-bf16", "train-step"),
        ("dpo-step-tiny-bf16-tiles", "train-step"),
        ("generate-tiny-b1", "generate"),
        ("generate-tiny-b4", "generate"),
        ("lora-step-tiny-bf16", "train-step"),
        ("qlora-step-tiny-bf16", "train-step"),
    ] {
        let s = step(name);
        assert_eq!(s["status"], "ok", "{name}: {s}");
        let first = &s["results"][0];
        assert_eq!(first["bench"], bench, "{name}: {s}");
        assert!(first["tokens_per_second"].as_f64().is_some_and(|t| t > 0.0), "{name}: {s}");
    }
    // Only the adapters train: r (in + out) for each of the 7 linear layers of tiny-chat's 2
    // layers (hidden 64, 4 heads and 2 key-value heads of 16, intermediate 128).
    for name in ["lora-step-tiny-bf16", "qlora-step-tiny-bf16"] {
        let s = step(name);
        let adapters = 2 * 16 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 3 * (64 + 128));
        assert_eq!(s["results"][0]["trained_parameters"], adapters, "{name}: {s}");
    }
    assert_eq!(step("qlora-step-tiny-bf16")["results"][0]["quantize_base"], "q4_k");
    let logprobs = step("logprobs-tiny-cpu");
    assert!(["ok", "skipped"].contains(&logprobs["status"].as_str().expect("status")), "{logprobs}");
    assert_no_failures(out.path(), &report);
}

/// `GPU_CHECK_BUDGET`: the device machine is lent for minutes, so the run stops starting steps
/// when its budget is spent and still writes its report, in which those steps say why they did
/// not run (status `budget`, not a failure).
#[test]
fn the_gpu_check_keeps_to_its_budget() {
    let out = tempfile::tempdir().expect("tmp");
    let (log, report) = dry_run(out.path(), "python3", &[("GPU_CHECK_BUDGET", "1")]);
    assert!(report.contains("not run or cut short by the run's budget"), "{report}");
    let mut steps = 0;
    for entry in std::fs::read_dir(out.path()).expect("out") {
        let path = entry.expect("entry").path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        if !name.ends_with(".json") || name == "summary.json" {
            continue;
        }
        let step: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("step")).expect("json");
        // The environment is always recorded; nothing else fits in one second.
        let want = if name == "environment.json" { "ok" } else { "budget" };
        assert_eq!(step["status"], want, "{name}: {step}");
        steps += 1;
    }
    assert!(steps > 10, "{steps} steps written:\n{log}");
    assert_no_failures(out.path(), &report);
}
