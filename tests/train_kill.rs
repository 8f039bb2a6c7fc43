//! Kill a training run with SIGKILL at several points (between checkpoints, in the middle of
//! writing one, in each stage), rerun the same command each time, and check that it ends with the
//! same final weights as an uninterrupted run, without redoing finished work.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use common::{fuserl, repo, text};

fn recipe(out: &Path) -> String {
    let r = repo();
    format!(
        "schema_version = 1\n[run]\nname = \"k\"\noutput_dir = \"{}\"\nseed = 3\n[target]\ncheckpoint = \"{}\"\nmax_length = 256\n\
         [[sources]]\nkind = \"jsonl\"\npath = \"{}\"\n[reward]\nkind = \"precomputed\"\n[weighting]\nkind = \"softmax\"\n\
         [sft]\nepochs = 3\nlearning_rate = 3e-3\nbatch_size = 4\ngrad_accum = 2\ncheckpoint_every = 3\n\
         [po]\nepochs = 2\nlearning_rate = 3e-4\nbatch_size = 4\ncheckpoint_every = 3\n[po.objective]\nkind = \"dpo\"\n",
        out.display(),
        r.join("checkpoints/tiny-chat").display(),
        r.join("data/fusion-mini.jsonl").display()
    )
}

/// Start `fuserl run`, wait until it pauses at `label`, and SIGKILL it.
fn kill_at(recipe: &Path, label: &str) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fuserl"))
        .args(["run", &recipe.display().to_string()])
        .env("FUSERL_DEBUG_PAUSE", label)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("stderr");
    let mut seen = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.expect("line");
        if line.contains(&format!("paused at {label}")) {
            child.kill().expect("SIGKILL");
            child.wait().expect("wait");
            return;
        }
        seen.push(line);
    }
    let status = child.wait().expect("wait");
    panic!("the run ended ({status}) without pausing at {label}:\n{}", seen.join("\n"));
}

#[test]
fn sigkill_at_any_point_then_rerun_gives_the_uninterrupted_result() {
    let dir = tempfile::tempdir().expect("tmp");
    // Uninterrupted.
    let clean = dir.path().join("clean.toml");
    std::fs::write(&clean, recipe(&dir.path().join("clean"))).expect("write");
    let out = fuserl(&["run", &clean.display().to_string()], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let want = std::fs::read(dir.path().join("clean/export/model.safetensors")).expect("weights");
    let want_metrics = std::fs::read_to_string(dir.path().join("clean/metrics.jsonl")).expect("metrics");

    // Killed four times, rerun each time.
    let killed = dir.path().join("killed.toml");
    std::fs::write(&killed, recipe(&dir.path().join("killed"))).expect("write");
    for label in ["sft-step-5", "sft-checkpoint-6", "po-checkpoint-3", "po-step-5"] {
        kill_at(&killed, label);
        let run_dir = dir.path().join("killed");
        if label == "sft-checkpoint-6" {
            // Killed mid-write: the half-written checkpoint is not the one a rerun trusts.
            assert!(run_dir.join("sft/checkpoints/step-000006.tmp").is_dir());
            assert_eq!(
                std::fs::read_to_string(run_dir.join("sft/checkpoints/LATEST")).expect("latest").trim(),
                "step-000003"
            );
        }
        if label.starts_with("po") {
            assert!(run_dir.join("sft/DONE").is_file(), "SFT should be finished before {label}");
        }
    }
    let out = fuserl(&["run", &killed.display().to_string()], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let got = std::fs::read(dir.path().join("killed/export/model.safetensors")).expect("weights");
    assert!(got == want, "final weights differ from the uninterrupted run");
    // The metrics log has each step once, with the same numbers.
    let got_metrics = std::fs::read_to_string(dir.path().join("killed/metrics.jsonl")).expect("metrics");
    let strip = |m: &str| -> Vec<(String, u64, u64)> {
        m.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("json");
                (
                    v["stage"].as_str().expect("stage").to_owned(),
                    v["step"].as_u64().expect("step"),
                    v["loss"].as_f64().expect("loss").to_bits(),
                )
            })
            .collect()
    };
    assert_eq!(strip(&got_metrics), strip(&want_metrics));
    // A finished run is not redone.
    let again = fuserl(&["run", &killed.display().to_string()], dir.path());
    assert!(
        text(&again.stdout).contains("sft was already finished")
            && text(&again.stdout).contains("po was already finished")
    );
}
