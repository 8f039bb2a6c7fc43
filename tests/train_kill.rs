//! Kill a training run with SIGKILL at several points (between checkpoints, in the middle of
//! writing one, in each stage), rerun the same command each time, and check that it ends with the
//! same final weights as an uninterrupted run, without redoing finished work.

use std::path::Path;

use crate::common::{fuserl, fuserl_env, kill_at_pause, python_with, repo, spawn_paused, text};

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
        kill_at_pause(&["run", &killed.display().to_string()], dir.path(), label);
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
    // The rerun says where FusePO resumed (issue #34: it never said).
    assert!(text(&out.stderr).contains("po: resuming after step "), "{}", text(&out.stderr));
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

/// LoRA (issue #31): the quick start's recipe with `[target.lora]` (r 8, all-linear) killed in
/// both stages and rerun gives the uninterrupted run's adapters bit for bit; its checkpoints keep
/// the adapters alone; FuseSFT and FusePO write PEFT adapter folders on top of the target, which
/// `fuserl logprobs` and `generate` load; `[export] lora = "adapter"` exports one, `"merged"` a
/// full checkpoint. When the oracle environment has peft (docs/oracle.md),
/// scripts/check_lora_export.py loads the adapter export with `PeftModel.from_pretrained` and the
/// merged one with transformers, against fuserl's log-probs of both (1e-4).
#[test]
fn lora_runs_resume_after_sigkill_and_export_peft_adapters() {
    let dir = tempfile::tempdir().expect("tmp");
    let lora = |out: &str, export: &str| {
        let mut r = recipe(&dir.path().join(out));
        r = r.replace(
            "max_length = 256\n",
            "max_length = 256\n[target.lora]\nr = 8\nalpha = 16\ntarget_modules = \"all-linear\"\n",
        );
        r.push_str(&format!("[export]\nlora = \"{export}\"\n"));
        let file = dir.path().join(format!("{out}.toml"));
        std::fs::write(&file, r).expect("write");
        file.display().to_string()
    };
    let clean = lora("clean", "adapter");
    let out = fuserl(&["run", &clean], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let want = std::fs::read(dir.path().join("clean/export/adapter_model.safetensors")).expect("adapter");
    for stage in ["sft", "po"] {
        let folder = dir.path().join(format!("clean/{stage}/final"));
        assert!(folder.join("adapter_config.json").is_file() && !folder.join("config.json").exists(), "{stage}");
    }
    assert!(!dir.path().join("clean/export/config.json").exists());

    let killed = lora("killed", "adapter");
    for label in ["sft-step-5", "sft-checkpoint-6", "po-step-5"] {
        kill_at_pause(&["run", &killed], dir.path(), label);
        if label == "sft-step-5" {
            let ckpt = dir.path().join("killed/sft/checkpoints/step-000003");
            assert!(ckpt.join("adapters.mpk").is_file() && !ckpt.join("model.mpk").exists(), "adapters alone");
        }
    }
    let out = fuserl(&["run", &killed], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let got = std::fs::read(dir.path().join("killed/export/adapter_model.safetensors")).expect("adapter");
    assert!(got == want, "the resumed run's adapters differ from the uninterrupted run's");

    // With dropout (masks keyed by the run's seed, the step, the micro-batch and the shard; with
    // gradient checkpointing, whose recomputed layers draw the forward's masks again): a killed
    // and resumed run still ends with the same adapters.
    let dropout = |out: &str| {
        let r = std::fs::read_to_string(dir.path().join("clean.toml"))
            .expect("recipe")
            .replace("\"all-linear\"\n", "\"all-linear\"\ndropout = 0.1\n")
            .replace(&dir.path().join("clean").display().to_string(), &dir.path().join(out).display().to_string());
        let file = dir.path().join(format!("{out}.toml"));
        std::fs::write(&file, r).expect("write");
        file.display().to_string()
    };
    let (a, b) = (dropout("drop-a"), dropout("drop-b"));
    assert!(fuserl(&["run", &a], dir.path()).status.success());
    kill_at_pause(&["run", &b], dir.path(), "sft-step-5");
    let out = fuserl(&["run", &b], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let adapter =
        |out: &str| std::fs::read(dir.path().join(out).join("export/adapter_model.safetensors")).expect("adapter");
    assert!(adapter("drop-a") == adapter("drop-b"), "with dropout, the resumed run's adapters differ");
    assert!(adapter("drop-a") != want, "dropout changed nothing");

    // The same run exported merged: a full checkpoint, no adapter files.
    let merged = lora("clean", "merged");
    let out = fuserl(&["run", &merged], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let export = dir.path().join("clean/export");
    assert!(export.join("model.safetensors").is_file() && !export.join("adapter_config.json").exists());

    // Adapter folders are models to the commands that take one.
    let pairs = dir.path().join("pairs.jsonl");
    std::fs::write(&pairs, "{\"prompt\": \"What is 2+2?\", \"response\": \"4, of course.\"}\n").expect("write");
    let adapter = dir.path().join("killed/export");
    let scored = |model: &Path, name: &str| {
        let out_file = dir.path().join(name);
        let args = ["logprobs", "--model", &model.display().to_string(), "--data", &pairs.display().to_string()];
        let out = fuserl(&[&args[..], &["--out", &out_file.display().to_string()]].concat(), dir.path());
        assert!(out.status.success(), "{}", text(&out.stderr));
        out_file
    };
    let adapter_scores = scored(&adapter, "adapter.jsonl");
    let merged_scores = scored(&export, "merged.jsonl");
    let generate = fuserl(
        &["generate", "--model", &adapter.display().to_string(), "--prompt", "Hi", "--max-new-tokens", "4"],
        dir.path(),
    );
    assert!(generate.status.success(), "{}", text(&generate.stderr));
    if let Some(python) = python_with("fuserl-oracle/venv", "peft", "LoRA exports loaded in peft") {
        let check = std::process::Command::new(&python)
            .arg(repo().join("scripts/check_lora_export.py"))
            .args([&adapter, &adapter_scores, &export, &merged_scores])
            .output()
            .expect("python");
        assert!(check.status.success(), "{}{}", text(&check.stdout), text(&check.stderr));
    }
}

/// A run directory made before the restructure of issue #36 (fixtures/run-dir-f292813: the quick
/// start killed in FuseSFT after its step-10 checkpoint, by the binary of commit f292813) resumes
/// with today's binary: from the checkpoint, with no step logged twice, to the export, the
/// evaluation and the report. Its weights came from another machine's float rounding, so the
/// result is checked for its shape, not against a fresh run's bits.
#[test]
fn a_run_directory_made_before_the_restructure_resumes() {
    let dir = tempfile::tempdir().expect("tmp");
    let from = repo().join("fixtures/run-dir-f292813/runs");
    copy_tree(&from, &dir.path().join("runs"));
    let run = dir.path().join("runs/quickstart");
    assert!(
        run.join("sft/checkpoints/LATEST").is_file() && !run.join("sft/DONE").exists(),
        "the fixture is mid-FuseSFT"
    );
    let before = std::fs::read_to_string(run.join("metrics.jsonl")).expect("metrics");
    let recipe = repo().join("recipes/quickstart.toml").display().to_string();
    // The trainer says where it resumes at the info level.
    let out = fuserl_env(&["run", &recipe], dir.path(), &[("RUST_LOG", "warn,fuserl_train=info")]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.lines().any(|l| l.contains("resuming") && l.contains("step=10")), "{err}");
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).expect("metrics");
    let steps = |stage: &str| -> Vec<u64> {
        metrics
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
            .filter(|v| v["stage"] == stage)
            .map(|v| v["step"].as_u64().expect("step"))
            .collect()
    };
    let sft = steps("sft");
    assert_eq!(sft, (1..=sft.len() as u64).collect::<Vec<_>>(), "every FuseSFT step once, in order");
    assert!(sft.len() > 10 && !steps("po").is_empty());
    // The steps up to the checkpoint are the old binary's lines, kept as they were.
    let kept: Vec<&str> = before.lines().take(10).collect();
    assert_eq!(metrics.lines().take(10).collect::<Vec<_>>(), kept);
    for done in ["sft/DONE", "po/DONE", "export/model.safetensors", "eval/eval.json", "report/index.html"] {
        assert!(run.join(done).is_file(), "{done} is missing");
    }
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let target = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_tree(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).expect("copy");
        }
    }
}

/// Issue #34: a second command on a run folder in use stops at once, naming the process that holds
/// it; once that process is killed, the next run takes the folder over with a warning and ends
/// with every step logged once.
#[test]
fn a_folder_in_use_is_refused_and_a_killed_runs_folder_is_taken_over() {
    let dir = tempfile::tempdir().expect("tmp");
    let recipe = repo().join("recipes/quickstart.toml").display().to_string();
    let (mut first, _stderr) = spawn_paused(&["run", &recipe], dir.path(), "sft-step-5");
    let pid = first.id();
    for command in ["run", "collect", "eval"] {
        let out = fuserl(&[command, &recipe], dir.path());
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{command}: {err}");
        assert!(err.contains(&format!("is in use by process {pid} (fuserl run)")), "{command}: {err}");
        assert_eq!(err.lines().filter(|l| l.contains("in use")).count(), 1, "said once: {err}");
    }
    // `fuserl report` only reads the run's files and writes report/ atomically: it works on a run
    // in progress.
    let report = fuserl(&["report", "runs/quickstart"], dir.path());
    assert!(report.status.success(), "report of a run in progress: {}", text(&report.stderr));
    assert!(dir.path().join("runs/quickstart/report/index.html").is_file());
    first.kill().expect("SIGKILL");
    first.wait().expect("wait");
    let out = fuserl(&["run", &recipe], dir.path());
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&format!("took over the run folder from process {pid} (fuserl run)")), "{err}");
    let metrics = std::fs::read_to_string(dir.path().join("runs/quickstart/metrics.jsonl")).expect("metrics");
    let sft: Vec<u64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .filter(|v| v["stage"] == "sft")
        .map(|v| v["step"].as_u64().expect("step"))
        .collect();
    assert_eq!(sft, (1..=sft.len() as u64).collect::<Vec<_>>());
    // The folder is free again: a rerun (which finds everything done) is not refused.
    let again = fuserl(&["run", &recipe], dir.path());
    assert!(again.status.success() && !text(&again.stderr).contains("took over"), "{}", text(&again.stderr));
}

/// Issue #33: a stage whose training diverges (a learning rate of 1e30: the weights overflow)
/// stops at the step with exit status 1 and a message naming the stage and step, writes nothing
/// after it (no final model, no DONE), and the run exports nothing.
#[test]
fn a_diverging_stage_stops_at_its_step_and_exports_nothing() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("diverge.toml");
    let out_dir = dir.path().join("diverge");
    std::fs::write(&file, recipe(&out_dir).replace("learning_rate = 3e-3", "learning_rate = 1e30")).expect("write");
    let out = fuserl(&["run", &file.display().to_string()], dir.path());
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("sft step ") && err.contains("the stage stops here"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!out_dir.join("sft/final").exists() && !out_dir.join("sft/DONE").exists());
    assert!(!out_dir.join("export").exists(), "an export was written");
}

/// Issue #33: `[export] path` naming a folder with files in it (here a copy of the target
/// checkpoint) is refused before anything runs, by `recipe check` and by `run` (exit 2, the
/// recipe key named), and nothing in it is touched; a new folder outside the run directory is
/// fine, and so is exporting into it again on a rerun (it is this run's earlier export).
#[test]
fn an_export_path_with_files_in_it_is_refused_before_anything_runs() {
    let dir = tempfile::tempdir().expect("tmp");
    let target = dir.path().join("my-target");
    std::fs::create_dir(&target).expect("mkdir");
    for entry in std::fs::read_dir(repo().join("checkpoints/tiny-chat")).expect("tiny-chat") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), target.join(entry.file_name())).expect("copy");
    }
    let before = std::fs::read(target.join("model.safetensors")).expect("weights");
    let file = dir.path().join("into-target.toml");
    let base = recipe(&dir.path().join("run")).replace("epochs = 3\n", "epochs = 1\nmax_steps = 1\n");
    std::fs::write(&file, format!("{base}[export]\npath = \"{}\"\n", target.display())).expect("write");
    for command in [&["recipe", "check"][..], &["run"][..]] {
        let mut args = command.to_vec();
        let f = file.display().to_string();
        args.push(&f);
        let out = fuserl(&args, dir.path());
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{command:?}: {err}");
        assert!(err.contains("export.path") && err.contains("is a folder with files in it"), "{command:?}: {err}");
    }
    assert_eq!(std::fs::read(target.join("model.safetensors")).expect("weights"), before);
    assert!(!dir.path().join("run/sft").exists(), "a stage ran");

    // A new folder outside the run directory, then the same folder again on a rerun.
    let fresh = dir.path().join("exported");
    let base = base.replace("[po]\nepochs = 2", "[po]\nenabled = false\nepochs = 2");
    std::fs::write(&file, format!("{base}[export]\npath = \"{}\"\n", fresh.display())).expect("write");
    for _ in 0..2 {
        let out = fuserl(&["run", &file.display().to_string()], dir.path());
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(fresh.join("model.safetensors").is_file());
    }
}

/// Ctrl-C (SIGINT) in the middle of FuseSFT: one line on what was kept, exit code 130; the same
/// command then resumes and finishes (issue #34: it died silently).
#[test]
fn ctrl_c_says_what_was_kept_and_the_same_command_resumes() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("int.toml");
    std::fs::write(&file, recipe(&dir.path().join("int"))).expect("write");
    let file = file.display().to_string();
    let (mut child, lines) = spawn_paused(&["run", &file], dir.path(), "sft-step-5");
    let sent = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().expect("kill");
    assert!(sent.success());
    let rest: Vec<String> = lines.take(10_000).collect();
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(130), "{rest:?}");
    let said: Vec<&String> = rest.iter().filter(|l| l.contains("interrupted")).collect();
    assert_eq!(said.len(), 1, "{rest:?}");
    assert!(said[0].contains("the same command resumes from there"), "{said:?}");
    // A clean stop gives the run folder back: the next run takes no lock over from a "killed" one.
    let lock = std::fs::read_to_string(dir.path().join("int/.lock")).expect("lock file");
    assert_eq!(lock, "", "the lock file still names its holder after Ctrl-C");
    let out = fuserl(&["run", &file], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!text(&out.stderr).contains("took over"), "{}", text(&out.stderr));
    assert!(dir.path().join("int/sft/DONE").is_file() && dir.path().join("int/export/model.safetensors").is_file());
}

/// A closed output pipe (`fuserl run ... | head -1`) ends the process with 141, as SIGPIPE ends any
/// tool: no panic message (it was `failed printing to stdout: Broken pipe`, exit 134), the run
/// folder given back (no "took over" next time); the run resumes.
#[test]
fn a_closed_output_pipe_ends_the_run_without_a_panic() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("pipe.toml");
    std::fs::write(&file, recipe(&dir.path().join("pipe"))).expect("write");
    let file = file.display().to_string();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fuserl"))
        .args(["run", &file])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    // The reader goes before anything is written (as `head -1` goes after its line).
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let err = text(&out.stderr);
    assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{err}");
    assert_eq!(out.status.code(), Some(141), "{:?}: {err}", out.status);
    let again = fuserl(&["run", &file], dir.path());
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(!text(&again.stderr).contains("took over"), "{}", text(&again.stderr));
}
