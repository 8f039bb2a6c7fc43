//! End-to-end tests: the real `fuserl` binary on the committed recipes and on broken copies
//! of them, in temporary folders.

use std::path::PathBuf;

use crate::common::{fuserl, line_of, repo, sandbox, text};

fn recipes() -> Vec<PathBuf> {
    let mut all: Vec<PathBuf> = std::fs::read_dir(repo().join("recipes"))
        .expect("recipes/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        // Other tests' temporary copies (`.test-*.toml`) come and go while this one runs.
        .filter(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .collect();
    all.sort();
    all
}

#[test]
fn recipe_check_passes_on_every_committed_recipe() {
    let files = recipes();
    for name in [
        "fuserl-dpo.toml",
        "fuserl-simpo.toml",
        "fuserl-rloo.toml",
        "fusechat3.toml",
        "wrpo.toml",
        "plugin-example.toml",
    ] {
        assert!(files.iter().any(|f| f.ends_with(name)), "recipes/{name} is missing");
    }
    let mut args = vec!["recipe", "check"];
    let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    args.extend(names.iter().map(String::as_str));
    let out = fuserl(&args, &repo());
    assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(text(&out.stdout).lines().filter(|l| l.starts_with("ok: ")).count(), files.len());
}

#[test]
fn resolved_recipes_are_valid_recipes_and_a_fixed_point() {
    let sandbox = sandbox();
    for file in recipes() {
        let first = fuserl(&["recipe", "show", &file.display().to_string()], &repo());
        assert!(first.status.success(), "{}: {}", file.display(), text(&first.stderr));
        let copy = sandbox.path().join("recipes").join(file.file_name().expect("name"));
        std::fs::write(&copy, &first.stdout).expect("write");
        let check = fuserl(&["recipe", "check", &copy.display().to_string()], sandbox.path());
        assert!(check.status.success(), "{}: {}", file.display(), text(&check.stderr));
        let second = fuserl(&["recipe", "show", &copy.display().to_string()], sandbox.path());
        assert_eq!(text(&first.stdout), text(&second.stdout), "{} is not a fixed point", file.display());
        // Every default is written out, under a comment that says what paths are relative to.
        let shown = text(&first.stdout);
        assert!(
            shown.starts_with("# The resolved recipe") && shown.contains("relative to\n# this file's folder"),
            "{shown}"
        );
        for key in ["output_dir", "device", "adam_eps", "reference", "[export]", "[eval]"] {
            assert!(shown.contains(key), "{}: `{key}` missing from the resolved recipe", file.display());
        }
        assert!(shown.contains("warmup_ratio") || shown.contains("warmup_steps"), "{}: no warm-up", file.display());
        // Nothing the recipe cannot use (issue #34): no empty list, no sampling where nothing
        // samples; where something does, the sampling is shown.
        let table: toml::Table = toml::from_str(&shown).expect("toml");
        let own = std::iter::once(&table).chain(
            ["run", "backend", "target", "data", "sft", "po", "eval", "export"]
                .iter()
                .filter_map(|s| table.get(*s).and_then(toml::Value::as_table)),
        );
        for t in own {
            for (key, value) in t {
                let empty = value.as_array().is_some_and(Vec::is_empty);
                assert!(!empty, "{}: `{key} = []` in\n{shown}", file.display());
            }
        }
        let generative = ["kind = \"local\"", "kind = \"openai\""].iter().any(|k| shown.contains(k));
        let samples =
            generative || shown.lines().any(|l| l.starts_with("target_samples = ") && l.trim() != "target_samples = 0");
        if generative {
            assert!(shown.contains("[data.sampling]"), "{}: no [data.sampling] for its sources", file.display());
        }
        if !samples {
            assert!(!shown.contains("[data.sampling]"), "{}: [data.sampling] that nothing uses", file.display());
            assert!(!shown.contains("samples_per_prompt"), "{}: samples_per_prompt that nothing uses", file.display());
        }
        // A source's empty list that its recipe does not write is its default (a jsonl source's
        // `sources = []`).
        let original = std::fs::read_to_string(&file).expect("recipe");
        for source in table.get("sources").and_then(toml::Value::as_array).into_iter().flatten() {
            for (key, value) in source.as_table().into_iter().flatten() {
                let written = original.lines().any(|l| l.trim_start().starts_with(&format!("{key} =")));
                let empty = value.as_array().is_some_and(Vec::is_empty);
                assert!(!empty || written, "{}: `{key} = []` in a source it does not write", file.display());
            }
        }
    }
}

/// `recipe show` leaves an empty list in a component's table as it is: in `extra` (sent to the
/// server as written) `samplers = []` turns a llama.cpp feature off, which leaving the key out
/// would not.
#[test]
fn recipe_show_keeps_empty_lists_that_mean_something() {
    let sandbox = sandbox();
    let recipe = std::fs::read_to_string(repo().join("recipes/collect-llamacpp.toml")).expect("recipe");
    let recipe = recipe.replace(
        "[sources.sampling]\nstop = [\"<|im_end|>\"]\n",
        "[sources.sampling]\nstop = [\"<|im_end|>\"]\nextra = { samplers = [] }\n",
    );
    assert!(recipe.contains("samplers = []"), "the test needs the recipe's [sources.sampling]");
    std::fs::write(sandbox.path().join("recipes/extra.toml"), recipe).expect("write");
    let shown = fuserl(&["recipe", "show", "recipes/extra.toml"], sandbox.path());
    assert!(shown.status.success(), "{}", text(&shown.stderr));
    assert!(text(&shown.stdout).contains("samplers = []"), "{}", text(&shown.stdout));
    // A component's empty list the recipe writes is shown (one it does not write is left out:
    // resolved_recipes_are_valid_recipes_and_a_fixed_point).
    let quick = std::fs::read_to_string(repo().join("recipes/quickstart.toml")).expect("recipe");
    let quick = quick.replacen("kind = \"jsonl\"\n", "kind = \"jsonl\"\nsources = []\n", 1);
    assert!(quick.contains("sources = []"), "the test needs the quick start's jsonl source");
    std::fs::write(sandbox.path().join("recipes/quick.toml"), quick).expect("write");
    let shown = fuserl(&["recipe", "show", "recipes/quick.toml"], sandbox.path());
    assert!(text(&shown.stdout).contains("sources = []"), "{}", text(&shown.stdout));
}

/// Write a broken copy of fuserl-dpo.toml, check it, and return (exit code, stderr).
fn check_broken(edit: impl Fn(&str) -> String) -> (i32, String, String) {
    let sandbox = sandbox();
    let original = std::fs::read_to_string(repo().join("recipes/fuserl-dpo.toml")).expect("recipe");
    let broken = edit(&original);
    assert_ne!(broken, original, "the edit changed nothing");
    let path = sandbox.path().join("recipes/broken.toml");
    std::fs::write(&path, &broken).expect("write");
    let out = fuserl(&["recipe", "check", "recipes/broken.toml"], sandbox.path());
    (out.status.code().expect("exit code"), text(&out.stderr), broken)
}

/// Issue #34: `run` on a recipe with several mistakes reports each (as `recipe check` does), each
/// once and at its line, and trains nothing.
#[test]
fn run_reports_every_mistake_of_a_recipe() {
    let sandbox = sandbox();
    let original = std::fs::read_to_string(repo().join("recipes/fuserl-dpo.toml")).expect("recipe");
    let broken = original.replacen("beta = 0.1", "betta = 0.1", 1).replacen("seed = 42", "seed = \"x\"", 1);
    assert_eq!(broken.matches("betta").count() + broken.matches("seed = \"x\"").count(), 2, "the test's edits");
    std::fs::write(sandbox.path().join("recipes/broken.toml"), &broken).expect("write");
    let out = fuserl(&["run", "recipes/broken.toml"], sandbox.path());
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    for (needle, key) in [("betta", "betta"), ("seed = \"x\"", "run.seed")] {
        let line = line_of(&broken, needle);
        assert_eq!(err.matches(&format!("broken.toml:{line}:")).count(), 1, "{key} once at line {line}: {err}");
        assert!(err.contains(key), "{key}: {err}");
    }
    assert!(!sandbox.path().join("runs").exists(), "nothing ran");
}

/// Issue #31: `[target.lora]` mistakes are reported at their lines: a module PEFT does not name,
/// rank 0, a dropout that is not a probability, and an adapter export without adapters.
#[test]
fn lora_settings_are_checked_at_their_lines() {
    let lora = "[target.lora]\nr = 8\ntarget_modules = [\"q_proj\", \"qkv_proj\"]\n";
    let (code, err, recipe) = check_broken(|r| r.replacen("[[sources]]", &format!("{lora}\n[[sources]]"), 1));
    assert_eq!(code, 2, "{err}");
    let line = line_of(&recipe, "target_modules");
    assert!(err.contains(&format!("broken.toml:{line}:")) && err.contains("unknown module `qkv_proj`"), "{err}");
    let (code, err, recipe) = check_broken(|r| r.replacen("[[sources]]", "[target.lora]\nr = 0\n\n[[sources]]", 1));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("broken.toml:{}:", line_of(&recipe, "r = 0"))) && err.contains("positive rank"),
        "{err}"
    );
    let (code, err, recipe) =
        check_broken(|r| r.replacen("[[sources]]", "[target.lora]\ndropout = 1.5\n\n[[sources]]", 1));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("broken.toml:{}:", line_of(&recipe, "dropout = 1.5")))
            && err.contains("expected a probability in [0, 1)"),
        "{err}"
    );
    let (code, err, _) = check_broken(|r| format!("{r}\n[export]\nlora = \"adapter\"\n"));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("export.lora: lora = \"adapter\" exports LoRA adapters, and [target.lora] trains none"),
        "{err}"
    );
}

#[test]
fn misspelled_key_is_reported_with_place_path_and_choices() {
    let (code, err, recipe) = check_broken(|r| r.replace("beta = 0.1", "betta = 0.1"));
    assert_eq!(code, 2, "{err}");
    let line = line_of(&recipe, "betta");
    assert!(
        err.contains(&format!("recipes/broken.toml:{line}:1: po.objective.betta: unknown key `betta` (did you mean `beta`?); expected one of: beta, loss, label_smoothing, length_normalize, pairs")),
        "{err}"
    );
    // Also in the core's own sections.
    let (code, err, recipe) = check_broken(|r| r.replace("max_length = 512", "max_lenght = 512"));
    assert_eq!(code, 2);
    let line = line_of(&recipe, "max_lenght");
    assert!(err.contains(&format!("broken.toml:{line}:1: target.max_lenght: unknown key `max_lenght` (did you mean `max_length`?); expected one of: checkpoint, chat_template, max_length, max_prompt_length")), "{err}");
}

#[test]
fn wrong_type_is_reported_with_what_was_expected() {
    let (code, err, recipe) = check_broken(|r| r.replace("temperature = 0.5", "temperature = \"hot\""));
    assert_eq!(code, 2, "{err}");
    let line = line_of(&recipe, "\"hot\"");
    assert!(
        err.contains(&format!("broken.toml:{line}:1: weighting.temperature: expected a number, found string \"hot\"")),
        "{err}"
    );
    let (code, err, _) = check_broken(|r| r.replace("device = \"cpu\"", "device = \"tpu\""));
    assert_eq!(code, 2);
    assert!(
        err.contains(
            "backend.device: unknown value `tpu`; expected one of: cpu, wgpu, vulkan, metal, webgpu, cuda, rocm"
        ),
        "{err}"
    );
    let (code, err, _) =
        check_broken(|r| r.replace("batch_size = 4\n\n[po.objective]", "batch_size = -4\n\n[po.objective]"));
    assert_eq!(code, 2);
    assert!(err.contains("po.batch_size: expected a non-negative integer"), "{err}");
}

#[test]
fn unknown_plugin_lists_the_registered_ones() {
    let (code, err, recipe) = check_broken(|r| r.replace("kind = \"dpo\"", "kind = \"dpp\""));
    assert_eq!(code, 2, "{err}");
    let line = line_of(&recipe, "\"dpp\"");
    assert!(
        err.contains(&format!("broken.toml:{line}:1: po.objective.kind: unknown preference objective `dpp`; expected one of: dpo, rloo, sft, simpo, wrpo")),
        "{err}"
    );
    let (code, err, _) = check_broken(|r| r.replace("kind = \"softmax\"", "kind = \"softmin\""));
    assert_eq!(code, 2);
    assert!(
        err.contains(
            "weighting.kind: unknown weighting scheme `softmin` (did you mean `softmax`?); expected one of: best-only, rank, softmax, uniform"
        ),
        "{err}"
    );
}

#[test]
fn missing_required_field_is_reported_at_its_table() {
    let (code, err, recipe) = check_broken(|r| r.replace("checkpoint = \"../models/SmolLM2-135M-Instruct\"\n", ""));
    assert_eq!(code, 2, "{err}");
    let line = line_of(&recipe, "[target]");
    assert!(
        err.contains(&format!("broken.toml:{line}:2: target.checkpoint: missing required key `checkpoint`")),
        "{err}"
    );
    let (code, err, recipe) = check_broken(|r| r.replace("path = \"../data/fusion-mini.jsonl\"\n", ""));
    assert_eq!(code, 2);
    let line = line_of(&recipe, "kind = \"jsonl\"");
    assert!(err.contains(&format!("broken.toml:{line}:1: sources[0].path: missing required key `path`")), "{err}");
}

#[test]
fn component_validation_and_syntax_errors_point_at_the_place() {
    let (code, err, recipe) = check_broken(|r| r.replace("min_gap = 0.005", "min_gap = -1.0"));
    assert_eq!(code, 2);
    let line = line_of(&recipe, "min_gap");
    assert!(
        err.contains(&format!(
            "broken.toml:{line}:1: po.objective.pairs.min_gap: expected a finite number >= 0, found -1"
        )),
        "{err}"
    );
    let (code, err, _) =
        check_broken(|r| r.replace("path = \"../data/fusion-mini.jsonl\"", "path = \"../data/none.jsonl\""));
    assert_eq!(code, 2);
    assert!(err.contains("sources[0].path: no such data file"), "{err}");
    let (code, err, recipe) = check_broken(|r| r.replace("seed = 42", "seed = = 42"));
    assert_eq!(code, 2);
    let line = line_of(&recipe, "seed = =");
    assert!(err.contains(&format!("broken.toml:{line}:")) && err.contains("invalid TOML"), "{err}");
    let (code, err, _) = check_broken(|r| r.replace("schema_version = 1", "schema_version = 2"));
    assert_eq!(code, 2);
    assert!(
        err.contains("broken.toml:4:1: schema_version: unsupported schema version 2; this fuserl reads version 1"),
        "{err}"
    );
}

#[test]
fn check_reports_every_bad_file_and_a_missing_file_is_bad_input() {
    let out = fuserl(&["recipe", "check", "recipes/fuserl-dpo.toml", "recipes/does-not-exist.toml"], &repo());
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stdout).contains("ok: recipes/fuserl-dpo.toml"));
    assert!(text(&out.stderr).contains("recipes/does-not-exist.toml"), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("1 of 2 recipes failed"));
}

#[test]
fn plugins_list_shows_every_builtin() {
    let out = fuserl(&["plugins", "list"], &repo());
    assert!(out.status.success());
    let listing = text(&out.stdout);
    for (point, name) in [
        ("source", "jsonl"),
        ("reward", "precomputed"),
        ("weighting", "softmax"),
        ("weighting", "best-only"),
        ("weighting", "uniform"),
        ("weighting", "rank"),
        ("objective", "sft"),
        ("objective", "dpo"),
        ("objective", "simpo"),
        ("objective", "rloo"),
        ("objective", "wrpo"),
        ("source", "openai"),
        ("source", "local"),
        ("reward", "keywords"),
        ("reward", "classifier"),
        ("reward", "http"),
        ("reward", "judge"),
        ("reward", "python-tests"),
        ("reward", "math"),
        ("reward", "combine"),
    ] {
        let line = listing
            .lines()
            .find(|l| l.split_whitespace().take(2).collect::<Vec<_>>() == [point, name])
            .unwrap_or_else(|| panic!("no line for {point} {name} in\n{listing}"));
        // `local` and `classifier` run a model, so they live beside the trainer; `combine` is an
        // ordinary built-in (it builds its parts through the registry in its build context).
        let origin = match name {
            "local" | "classifier" => "built-in (fuserl-run)",
            _ => "built-in (fuserl-builtin)",
        };
        assert!(line.contains(origin), "{line}");
        assert!(line.split(origin).nth(1).is_some_and(|s| s.trim().len() > 10), "no summary: {line}");
    }
    // A plugin library that is not there is said to be missing, in words (issue #34).
    let missing = fuserl(&["--plugin", "./nope.so", "plugins", "list"], &repo());
    let err = text(&missing.stderr);
    assert!(!missing.status.success() && err.contains("nope.so: ") && !err.contains("os error"), "{err}");
}

#[test]
fn help_has_examples_and_usage_errors_exit_2() {
    let out = fuserl(&["--help"], &repo());
    assert!(out.status.success());
    assert!(text(&out.stdout).contains("fuserl recipe check recipes/*.toml"));
    let out = fuserl(&["recipe", "frobnicate"], &repo());
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn examples_trace_back_to_the_source_answers() {
    let dir = tempfile::tempdir().expect("tmp");
    let out_file = dir.path().join("po.jsonl");
    let out = fuserl(
        &["examples", "recipes/fuserl-dpo.toml", "--stage", "po", "--out", &out_file.display().to_string()],
        &repo(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let data = std::fs::read_to_string(repo().join("data/fusion-mini.jsonl")).expect("data");
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out_file)
        .expect("out")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    // 10 prompts; every source has a pair except those whose two samples tie or are within
    // min_gap 0.005 (model-a on 4 prompts, model-c on one).
    assert!(lines.len() >= 15 && lines.len() <= 30, "{} examples", lines.len());
    let mut total_by_prompt = std::collections::BTreeMap::<String, f64>::new();
    for e in &lines {
        assert_eq!(e["objective"], "dpo");
        let seqs = e["sequences"].as_array().expect("sequences");
        assert_eq!(seqs.len(), 2);
        assert!(seqs[0]["reward"].as_f64() > seqs[1]["reward"].as_f64());
        assert_eq!(seqs[0]["completion"]["source"], seqs[1]["completion"]["source"]);
        // Provenance: the line named holds the prompt the example is about.
        let line = seqs[0]["origin"]["line"].as_u64().expect("line") as usize;
        let record: serde_json::Value = serde_json::from_str(data.lines().nth(line - 1).expect("line")).expect("json");
        assert_eq!(record["id"], e["prompt_id"]);
        let source = seqs[0]["completion"]["source"].as_str().expect("source");
        let sample = seqs[0]["completion"]["sample_index"].as_u64().expect("sample") as usize;
        assert_eq!(record["scores"][source][sample].as_f64(), seqs[0]["reward"].as_f64());
        *total_by_prompt.entry(e["prompt_id"].as_str().expect("id").to_owned()).or_default() +=
            e["weight"].as_f64().expect("w");
    }
    for (prompt, total) in total_by_prompt {
        assert!((total - 1.0).abs() < 1e-9, "weights of {prompt} sum to {total}");
    }
    assert!(text(&out.stderr).contains("po examples from 10 of 10 prompts"), "{}", text(&out.stderr));
}

#[test]
#[cfg(not(feature = "rocm"))]
fn a_backend_that_was_not_compiled_in_names_its_cargo_feature() {
    let (code, err, recipe) = check_broken(|r| r.replace("device = \"cpu\"", "device = \"rocm\""));
    assert_eq!(code, 2, "{err}");
    let line = line_of(&recipe, "device = \"rocm\"");
    assert!(
        err.contains(&format!(
            "broken.toml:{line}:1: backend.device: device `rocm` is not compiled into this build of fuserl; rebuild with `cargo build --features rocm`"
        )),
        "{err}"
    );
}

#[test]
#[cfg(feature = "wgpu")]
fn a_dtype_the_backend_cannot_do_names_the_ones_it_can() {
    let (code, err, recipe) = check_broken(|r| {
        r.replace("device = \"cpu\"", "device = \"wgpu\"").replace("dtype = \"f32\"", "dtype = \"bf16\"")
    });
    assert_eq!(code, 2, "{err}");
    let line = line_of(&recipe, "dtype = \"bf16\"");
    assert!(
        err.contains(&format!(
            "broken.toml:{line}:1: backend.dtype: device `wgpu` cannot run dtype `bf16`; it supports: f32, f16"
        )),
        "{err}"
    );
}

#[test]
fn out_to_a_pipe_writes_through_it_instead_of_replacing_it() {
    // Regression: an atomic rename over `--out /dev/null` replaced the device with a regular
    // file. Checked on a named pipe of our own instead of a system device.
    let dir = tempfile::tempdir().expect("tmp");
    let fifo = dir.path().join("pipe");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo").success());
    // Held open read-write and non-blocking, so that neither side can hang whatever fuserl does.
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    const O_NONBLOCK: i32 = 0o4000;
    let mut pipe =
        std::fs::OpenOptions::new().read(true).write(true).custom_flags(O_NONBLOCK).open(&fifo).expect("open pipe");
    let out = fuserl(&["examples", "recipes/fuserl-dpo.toml", "--out", &fifo.display().to_string()], &repo());
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(std::fs::metadata(&fifo).expect("pipe").file_type().is_fifo(), "the pipe was replaced");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(String::from_utf8_lossy(&got).lines().count(), 28);
}

#[test]
fn the_readme_main_command_runs_the_quickstart_and_a_rerun_resumes() {
    let dir = tempfile::tempdir().expect("tmp");
    let recipe = repo().join("recipes/quickstart.toml").display().to_string();
    let out = fuserl(&["run", &recipe], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("fused model: runs/quickstart/export")
            && stdout.contains("report: runs/quickstart/report/index.html"),
        "{stdout}"
    );
    // Issue 34: `run` prints the evaluation's summary as `fuserl eval` does (each model's reward,
    // the fused model's win rates), once: the evaluation's own collect and score lines are not
    // printed.
    assert!(stdout.contains("evaluation: runs/quickstart/eval/eval.json (6 prompts, reward keywords"), "{stdout}");
    for model in ["fused", "target", "sft"] {
        assert!(
            stdout.lines().any(|l| l.trim_start().starts_with(model) && l.contains(" reward ")),
            "{model}: {stdout}"
        );
    }
    assert!(stdout.contains("fused vs target") && stdout.contains("fused vs sft"), "{stdout}");
    assert!(!text(&out.stderr).contains("collect fused"), "{}", text(&out.stderr));
    assert!(dir.path().join("runs/quickstart/export/model.safetensors").is_file());
    assert!(dir.path().join("runs/quickstart/export/tokenizer.json").is_file());
    // Issue 18: what the first run shows; issue 34: the stage lines and the summary, at most 12
    // lines, and no log lines (they come with -v).
    let stderr = text(&out.stderr);
    assert!(!stderr.contains("/../") && !stdout.contains("/../"), "{stderr}{stdout}");
    assert!(!stderr.contains(" INFO ") && !stderr.contains("INFO "), "{stderr}");
    assert!(stderr.lines().count() + stdout.lines().count() <= 12, "{stderr}{stdout}");
    // With -v, fuserl's log lines: fields, not Debug dumps; paths with `..` resolved (the
    // recipe's `../data/...` lies outside this folder, so it is shown absolute).
    let examples = dir.path().join("sft-examples.jsonl").display().to_string();
    let verbose = fuserl(&["-v", "examples", &recipe, "--stage", "sft", "--out", &examples], dir.path());
    let stderr = text(&verbose.stderr);
    assert!(verbose.status.success(), "{stderr}");
    assert!(stderr.contains("prepared examples") && stderr.contains(" prompts="), "{stderr}");
    assert!(!stderr.contains("PrepareStats"), "{stderr}");
    let data = repo().join("data/fusion-mini.jsonl");
    assert!(stderr.contains(&format!("file={}", data.display())), "{stderr}");
    assert!(!stderr.contains("/../"), "{stderr}");
    let stderr = text(&out.stderr);
    // Each stage ends at its true last step (the bars draw nothing off a terminal; one line
    // per stage stands for them).
    let metrics = std::fs::read_to_string(dir.path().join("runs/quickstart/metrics.jsonl")).expect("metrics");
    for stage in ["sft", "po"] {
        let last = metrics
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
            .filter(|v| v["stage"] == stage)
            .map(|v| v["step"].as_u64().expect("step"))
            .max()
            .expect("steps");
        assert!(stderr.contains(&format!("{stage}: {last}/{last} steps, loss ")), "{stage}: {stderr}");
    }
    // Issue #30: each training stage keeps its memory plan, and on the CPU (Linux) the measured
    // peak beside it.
    for stage in ["sft", "po"] {
        let file = dir.path().join(format!("runs/quickstart/{stage}/memory.json"));
        let memory: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).expect("memory.json")).expect("json");
        assert!(memory["planned_peak_bytes"].as_u64().is_some_and(|b| b > 0), "{memory}");
        if cfg!(target_os = "linux") {
            assert!(memory["measured_peak_bytes"].as_u64().is_some_and(|b| b > 0), "{memory}");
        }
    }
    // Issue #32: the export has a model card in the Hugging Face format, with the evaluation's
    // table (written again after the evaluation); the report shows it.
    let card = std::fs::read_to_string(dir.path().join("runs/quickstart/export/README.md")).expect("README.md");
    let header = card.strip_prefix("---\n").and_then(|r| r.split_once("\n---\n")).expect("a YAML header").0;
    for line in [
        "base_model: \"tiny-chat\"",
        "library_name: transformers",
        "- \"fuserl\"",
        "- \"dpo\"",
        "datasets:",
        "- \"fusion-mini.jsonl\"",
    ] {
        assert!(header.lines().any(|l| l == line), "{line:?} missing from the card's header:\n{header}");
    }
    for part in [
        "# quickstart",
        "## Training",
        "| sft | sft | ",
        "| po | dpo | ",
        "## Evaluation",
        "| fused | ",
        "## Recipe",
        "```toml",
    ] {
        assert!(card.contains(part), "{part:?} missing from the card:\n{card}");
    }
    // huggingface_hub's own parser, from the environment scripts/setup-llama-server.sh makes (the
    // README's test command runs it; under FUSERL_REQUIRE_LLAMA_SERVER it must be there).
    let hub = crate::common::llama::llama_python();
    if crate::common::llama::available(&[]) {
        let check = std::process::Command::new(&hub)
            .args([
                "-c",
                "import sys; from huggingface_hub import ModelCard; c = ModelCard.load(sys.argv[1]); \
                assert c.data.base_model == 'tiny-chat', c.data; assert 'fuserl' in c.data.tags; \
                assert c.data.library_name == 'transformers'; print('ok')",
            ])
            .arg(dir.path().join("runs/quickstart/export/README.md"))
            .output()
            .expect("python");
        assert!(check.status.success(), "{}{}", text(&check.stdout), text(&check.stderr));
    }
    let html = std::fs::read_to_string(dir.path().join("runs/quickstart/report/index.html")).expect("report");
    let shown = html.split("<div class=\"card\">").nth(1).expect("the report shows the model card");
    assert!(shown.contains("<h4>Training</h4>") && shown.contains("<table>"), "the card is not rendered: {shown}");
    // The plan of a run that made its examples is theirs, not the worst case.
    let planned = fuserl(&["plan", &recipe, "--json"], dir.path());
    assert!(planned.status.success(), "{}", text(&planned.stderr));
    let planned: serde_json::Value = serde_json::from_slice(&planned.stdout).expect("json");
    assert_eq!(planned["stages"][0]["worst_case"], false, "{planned}");
    // The quick start evaluates ([eval] enabled) and reports, with no download.
    assert!(stdout.contains("evaluation: runs/quickstart/eval/eval.json"), "{stdout}");
    assert!(stdout.contains("report: runs/quickstart/report/index.html"), "{stdout}");
    let again = fuserl(&["run", &recipe], dir.path());
    assert!(again.status.success());
    assert!(text(&again.stdout).contains("sft was already finished"), "{}", text(&again.stdout));
    // Issue 34: scores that come with the data are not "scored now" on a rerun.
    let err = text(&again.stderr);
    assert!(
        err.contains("score precomputed: 60/60 answers (scores from the data)") && !err.contains("scored now"),
        "{err}"
    );
    // -q: nothing but errors.
    let quiet = fuserl(&["-q", "run", &recipe], dir.path());
    assert!(quiet.status.success(), "{}", text(&quiet.stderr));
    assert_eq!((text(&quiet.stdout), text(&quiet.stderr)), (String::new(), String::new()));
    // `fuserl eval` again: every answer and score is in the stores, nothing is redone.
    let eval = fuserl(&["eval", &recipe], dir.path());
    assert!(eval.status.success(), "{}", text(&eval.stderr));
    assert!(text(&eval.stdout).contains("fused vs target"), "{}", text(&eval.stdout));
    let report = fuserl(&["report", "runs/quickstart"], dir.path());
    assert!(report.status.success(), "{}", text(&report.stderr));
    assert!(text(&report.stdout).contains("report: runs/quickstart/report/index.html"), "{}", text(&report.stdout));
    check_report_in_browser(&dir.path().join("runs/quickstart"));
    // The fused model is an ordinary checkpoint: it scores and generates.
    let model = dir.path().join("runs/quickstart/export").display().to_string();
    let reply = fuserl(
        &["generate", "--model", &model, "--prompt", "What is the capital of France?", "--max-new-tokens", "8"],
        dir.path(),
    );
    assert!(reply.status.success(), "{}", text(&reply.stderr));
}

/// Open the run's report in headless Chromium: no console error, nothing fetched, every plot
/// drawn with its series, and every number of the evaluation table equal to eval.json's.
fn check_report_in_browser(run_dir: &std::path::Path) {
    let report = run_dir.join("report/index.html");
    let markdown = std::fs::read_to_string(run_dir.join("report/report.md")).expect("report.md");
    assert!(markdown.contains("## Evaluation") && markdown.contains("(plots/eval-rewards.svg)"), "{markdown}");
    // The main settings, without sampling settings where nothing sampled (no generative source,
    // no FusePO samples: issue #34).
    assert!(markdown.contains("max_length 256") && !markdown.contains("samples a prompt"), "{markdown}");
    let Some((chromium, driver)) = crate::common::browser::chromium() else {
        #[allow(clippy::print_stderr)] // the skipped part is the test's message to whoever runs it
        {
            eprintln!("report not opened in a browser: install chromium and chromium-driver (what .ci/run does)");
        }
        return;
    };
    let browser = crate::common::browser::Browser::start(&chromium, &driver);
    // The console check can fail: a page with an error is caught.
    browser.open("data:text/html,<script>console.error('planted')</script><p>x</p>");
    let planted = browser.console_errors();
    assert!(planted.iter().any(|e| e["message"].as_str().is_some_and(|m| m.contains("planted"))), "{planted:?}");

    browser.open(&format!("file://{}", report.display()));
    let facts = browser.eval(crate::common::browser::REPORT_FACTS);
    let errors = browser.console_errors();
    assert!(errors.is_empty(), "console errors: {errors:?}");
    assert_eq!(facts["fetched"], serde_json::json!([]), "the report fetched something");
    assert_eq!(facts["title"], "fuserl run report: quickstart");
    let figures = facts["figures"].as_array().expect("figures");
    let series_of = |id: &str| -> Vec<String> {
        let f =
            figures.iter().find(|f| f["id"] == format!("plot-{id}")).unwrap_or_else(|| panic!("no plot {id}: {facts}"));
        f["series"].as_array().expect("series").iter().map(|s| s.as_str().expect("name").to_owned()).collect()
    };
    // The plots the quick start must have, with their series.
    for (id, series) in [
        ("data-rewards", vec!["model-a", "model-b", "model-c"]),
        ("data-sft-weight", vec!["model-a", "model-b", "model-c"]),
        ("data-po-chosen", vec!["model-a", "model-b", "model-c"]),
        ("sft-loss", vec!["loss"]),
        ("sft-grad-norm", vec!["grad_norm"]),
        ("sft-lr", vec!["lr"]),
        ("po-loss", vec!["loss"]),
        ("po-rewards", vec!["rewards/chosen", "rewards/rejected"]),
        ("po-rewards-margins", vec!["rewards/margins"]),
        ("po-rewards-accuracies", vec!["rewards/accuracies"]),
        ("po-logps", vec!["logps/chosen", "logps/rejected"]),
        ("eval-win-rates", vec!["target", "sft"]),
        ("eval-rewards", vec!["fused", "target", "sft"]),
    ] {
        assert_eq!(series_of(id), series, "{id}");
    }
    for f in figures {
        assert!(f["width"].as_f64() > Some(100.0) && f["height"].as_f64() > Some(100.0), "{f}");
        for name in f["series"].as_array().expect("series") {
            let name = name.as_str().expect("name");
            assert!(f["drawn"][name].as_u64() >= Some(1), "{}: series {name} not drawn: {f}", f["id"]);
            assert!(
                f["texts"].as_array().expect("texts").iter().any(|t| t.as_str() == Some(name)),
                "{}: series {name} not labelled: {f}",
                f["id"]
            );
        }
    }
    // The table: every number shown is eval.json's, to the 3 decimals shown.
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("eval/eval.json")).expect("eval.json"))
            .expect("json");
    // Issue 34: a model has one colour in every plot; every mark of a box plot (box, median,
    // whiskers, outliers) lies within the range of the values it shows (rendered geometry
    // mapped back through the figure's axis; 4.5 pixels for a point's radius of 3 and plotters'
    // rounding to whole pixels).
    let mut colour_of: std::collections::BTreeMap<String, String> = std::collections::BTreeMap::new();
    for f in figures {
        for (name, c) in f["colors"].as_object().expect("colors") {
            let c = c.as_str().expect("colour").to_owned();
            let first = colour_of.entry(name.clone()).or_insert_with(|| c.clone());
            assert_eq!(*first, c, "{name} has two colours: {facts}");
        }
    }
    let data: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("data.json")).expect("data.json")).expect("json");
    for (id, list, key) in [("data-rewards", &data["sources"], "name"), ("eval-rewards", &eval["models"], "name")] {
        let f = figures.iter().find(|f| f["id"] == format!("plot-{id}")).expect("box plot");
        let pixel = f["pixel"].as_f64().expect("the box plot declares its axis");
        for item in list.as_array().expect("list") {
            let values: Vec<f64> =
                item["rewards"].as_array().expect("rewards").iter().map(|v| v.as_f64().expect("f64")).collect();
            let (lo, hi) = values.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(*v), b.max(*v)));
            let name = item[key].as_str().expect("name");
            let spans = f["spans"][name].as_array().expect("spans");
            assert!(spans.len() >= 4, "{id}: {name}: box, median and whiskers: {f}");
            for s in spans {
                let (bottom, top) = (s[0].as_f64().expect("y"), s[1].as_f64().expect("y"));
                assert!(
                    bottom >= lo - 4.5 * pixel && top <= hi + 4.5 * pixel,
                    "{id}: {name}: a mark spans {bottom}..{top}, the data {lo}..{hi}"
                );
            }
        }
    }
    // Sample answers: the first prompts, every model's answer side by side.
    let models: Vec<&str> =
        eval["models"].as_array().expect("models").iter().map(|m| m["name"].as_str().expect("name")).collect();
    let examples = facts["examples"].as_array().expect("examples");
    assert_eq!(examples.len(), 4, "{facts}");
    for e in examples {
        let shown: Vec<&str> = e.as_array().expect("rows").iter().map(|m| m.as_str().expect("model")).collect();
        assert_eq!(shown, models, "{facts}");
    }
    // The stage table: every stage done, with its dates and time.
    let stages = facts["stages"].as_array().expect("stages");
    let names: Vec<&str> = stages.iter().map(|r| r[0].as_str().expect("stage")).collect();
    assert_eq!(names, ["scoring", "FuseSFT", "FusePO", "export", "evaluation"], "{facts}");
    for r in stages {
        assert_eq!(r[1], "done", "{r}");
        assert!(
            r[2].as_str().is_some_and(|d| d.ends_with(" UTC")) && r[4].as_str().is_some_and(|t| t.ends_with(" s")),
            "{r}"
        );
    }
    // Answers of at most max_new_tokens (32) tokens have mean lengths of at most 32 (issue #34:
    // encoding the decoded text again made 46.8).
    for m in eval["models"].as_array().expect("models") {
        let mean = m["mean_length_tokens"]["mean"].as_f64().expect("mean length");
        assert!(mean <= 32.0, "{}: mean length {mean} tokens with max_new_tokens = 32", m["name"]);
    }
    let numbers = facts["numbers"].as_array().expect("numbers");
    let models = eval["models"].as_array().expect("models").len();
    assert!(numbers.len() >= models * 4, "{numbers:?}");
    for n in numbers {
        let pointer = n["pointer"].as_str().expect("pointer");
        let want = eval
            .pointer(pointer)
            .and_then(serde_json::Value::as_f64)
            .unwrap_or_else(|| panic!("{pointer} not in eval.json"));
        let shown: f64 = n["text"].as_str().expect("text").parse().unwrap_or_else(|_| panic!("{n}"));
        assert!((shown - want).abs() <= 5e-4, "{pointer}: page shows {shown}, eval.json has {want}");
    }
}

/// Issue #34: `fuserl generate` prints the reply as it is made. Stopped (FUSERL_DEBUG_PAUSE) right
/// after its first piece, it has printed a strict prefix of the whole greedy reply: printing the
/// reply only at the end would have printed all of it by then.
#[test]
fn generate_streams_its_reply() {
    use std::io::{BufRead, BufReader, Read};
    use std::process::Stdio;
    let dir = tempfile::tempdir().expect("tmp");
    let model = repo().join("checkpoints/tiny-chat").display().to_string();
    let args = ["generate", "--model", model.as_str(), "--prompt", "Hi", "--max-new-tokens", "16"];
    let whole = fuserl(&args, dir.path());
    assert!(whole.status.success(), "{}", text(&whole.stderr));
    let whole = text(&whole.stdout);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fuserl"))
        .args(args)
        .current_dir(dir.path())
        .env("FUSERL_DEBUG_PAUSE", "generate-first-piece")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let paused = stderr.lines().map_while(Result::ok).take(1000).any(|l| l.contains("paused at generate-first-piece"));
    // What is in the pipe now (read on a thread, so that a pipe with nothing in it cannot hang the
    // test: the child is killed after 60 s, which ends the read).
    let mut stdout = child.stdout.take().expect("stdout");
    let (send, receive) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        let n = stdout.read(&mut buf).unwrap_or(0);
        let _ = send.send(String::from_utf8_lossy(&buf[..n]).into_owned());
    });
    let printed = receive.recv_timeout(std::time::Duration::from_secs(60));
    let _ = child.kill();
    let _ = child.wait();
    assert!(paused, "never paused after its first piece");
    let printed = printed.expect("nothing printed before the pause");
    assert!(!printed.is_empty() && whole.starts_with(&printed), "{printed:?} is not the start of {whole:?}");
    assert!(printed.len() < whole.trim_end().len(), "the whole reply {whole:?} was printed at once");
}

/// Templates that build strings without bound are stopped at the rendering's memory budget (exit
/// status 2, the template named once, no panic text, within 10 s): 40 doublings of a string ask
/// for a terabyte of live memory (fuel counts instructions, and 40 doublings are few); appending
/// to a string in a loop of 100,000 turns keeps a megabyte live but copies 90 GB (structure-aware
/// fuzzing found it), stopped by the budget of bytes allocated in all.
#[test]
fn templates_that_grow_strings_without_bound_are_stopped_at_their_budget() {
    let dir = tempfile::tempdir().expect("tmp");
    let model = dir.path().join("model");
    std::fs::create_dir(&model).expect("mkdir");
    for f in std::fs::read_dir(repo().join("checkpoints/tiny-chat")).expect("tiny-chat") {
        let f = f.expect("entry").path();
        if f.is_file() {
            std::fs::copy(&f, model.join(f.file_name().expect("name"))).expect("copy");
        }
    }
    let data = dir.path().join("pairs.jsonl");
    std::fs::write(&data, "{\"prompt\": \"Hi\", \"response\": \"Hello\"}\n").expect("write");
    let bombs = [
        (
            "{% set ns = namespace(s='abcdefgh') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}\
             {{ ns.s | length }}",
            "rendering grew past 512 MiB of live memory",
        ),
        (
            "{% set ns = namespace(s='') %}{% for i in range(100000) %}{% set ns.s = ns.s ~ 'assistant' %}{% endfor %}\
             {{ ns.s | length }}",
            "rendering allocated more than 16384 MiB in all",
        ),
    ];
    for (bomb, expected) in bombs {
        std::fs::write(model.join("chat_template.jinja"), bomb).expect("write");
        let out = dir.path().join("out.jsonl").display().to_string();
        let t0 = std::time::Instant::now();
        let args =
            ["logprobs", "--model", &model.display().to_string(), "--data", &data.display().to_string(), "--out", &out];
        let run = fuserl(&args, dir.path());
        let err = text(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{err}");
        assert!(t0.elapsed().as_secs() < 10, "took {:?}", t0.elapsed());
        assert!(err.contains(&format!("chat_template.jinja: chat template: {expected}")), "{err}");
        assert_eq!(err.matches("chat template: rendering").count(), 1, "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn logprobs_and_generate_report_bad_input_with_its_place() {
    let dir = tempfile::tempdir().expect("tmp");
    let model = repo().join("checkpoints/tiny-chat").display().to_string();
    let data = dir.path().join("pairs.jsonl");
    std::fs::write(&data, "{\"prompt\": \"Hi\", \"response\": \"Hello\"}\n{not json}\n").expect("write");
    let out = dir.path().join("out.jsonl").display().to_string();
    let run =
        fuserl(&["logprobs", "--model", &model, "--data", &data.display().to_string(), "--out", &out], dir.path());
    assert_eq!(run.status.code(), Some(2), "{}", text(&run.stderr));
    assert!(text(&run.stderr).contains("pairs.jsonl:2: invalid JSON"), "{}", text(&run.stderr));
    std::fs::write(&data, "{\"prompt\": \"Hi\"}\n").expect("write");
    let run =
        fuserl(&["logprobs", "--model", &model, "--data", &data.display().to_string(), "--out", &out], dir.path());
    assert_eq!(run.status.code(), Some(2));
    assert!(text(&run.stderr).contains("pairs.jsonl:1: `response`: expected a string"), "{}", text(&run.stderr));
    // An output path through a file: said as such, bad input (it was "File exists", exit 1).
    std::fs::write(&data, "{\"prompt\": \"Hi\", \"response\": \"Hello\"}\n").expect("write");
    let under_file = dir.path().join("pairs.jsonl/out.jsonl").display().to_string();
    let run = fuserl(
        &["logprobs", "--model", &model, "--data", &data.display().to_string(), "--out", &under_file],
        dir.path(),
    );
    assert_eq!(run.status.code(), Some(2), "{}", text(&run.stderr));
    assert!(text(&run.stderr).contains("pairs.jsonl: a file, where the output path"), "{}", text(&run.stderr));
    // An empty file is bad input, not an empty success (issue #34).
    std::fs::write(&data, "\n").expect("write");
    let run =
        fuserl(&["logprobs", "--model", &model, "--data", &data.display().to_string(), "--out", &out], dir.path());
    assert_eq!(run.status.code(), Some(2));
    assert!(text(&run.stderr).contains("pairs.jsonl: no records in it"), "{}", text(&run.stderr));
    // A good file: every line gets its log-probs, other keys kept.
    std::fs::write(&data, "{\"prompt\": \"Hi\", \"response\": \"Hello\", \"id\": 7}\n{\"prompt\": [{\"role\": \"user\", \"content\": \"2+2?\"}], \"response\": \"4\"}\n").expect("write");
    let run =
        fuserl(&["logprobs", "--model", &model, "--data", &data.display().to_string(), "--out", &out], dir.path());
    assert!(run.status.success(), "{}", text(&run.stderr));
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&out).expect("out").lines().map(|l| serde_json::from_str(l).expect("json")).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["id"], 7);
    assert_eq!(lines[0]["token_logps"].as_array().map(Vec::len), lines[0]["n_tokens"].as_u64().map(|n| n as usize));
    let sum: f64 = lines[0]["token_logps"].as_array().expect("arr").iter().map(|x| x.as_f64().expect("f")).sum();
    assert!((sum - lines[0]["logp_sum"].as_f64().expect("sum")).abs() < 1e-4);
    // A prompt past the model's positions (512): refused as such, after tokenizing only as much
    // of it as the positions need (issue #33).
    let long = "word ".repeat(20_000); // 100 KB: an argument may have at most 128 KiB
    let run = fuserl(&["generate", "--model", &model, "--prompt", &long, "--max-new-tokens", "1"], dir.path());
    assert_eq!(run.status.code(), Some(2), "{}", text(&run.stderr));
    assert!(
        text(&run.stderr).contains("the prompt is longer than the model's 512 positions (max_position_embeddings)"),
        "{}",
        text(&run.stderr)
    );
    // A device this build lacks names its feature; one it has but this machine lacks (CUDA on
    // CI) is a clear error too, not a crash. On a CUDA machine the command simply works.
    #[cfg(not(feature = "rocm"))]
    {
        let on_rocm = fuserl(&["generate", "--model", &model, "--prompt", "Hi", "--device", "rocm"], dir.path());
        assert_eq!(on_rocm.status.code(), Some(2));
        assert!(text(&on_rocm.stderr).contains("--device rocm: device `rocm` is not compiled into this build of fuserl; rebuild with `cargo build --features rocm`"), "{}", text(&on_rocm.stderr));
    }
    #[cfg(feature = "cuda")]
    {
        let on_cuda = fuserl(
            &["generate", "--model", &model, "--prompt", "Hi", "--device", "cuda", "--max-new-tokens", "4"],
            dir.path(),
        );
        if !on_cuda.status.success() {
            assert_eq!(on_cuda.status.code(), Some(2), "{}", text(&on_cuda.stderr));
            assert!(
                text(&on_cuda.stderr)
                    .contains("--device cuda: device `cuda` is compiled into this build but could not start:"),
                "{}",
                text(&on_cuda.stderr)
            );
        }
    }
    let missing = fuserl(&["generate", "--model", "/nonexistent/model", "--prompt", "Hi"], dir.path());
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        text(&missing.stderr).contains("/nonexistent/model: no such checkpoint folder"),
        "{}",
        text(&missing.stderr)
    );
}

/// Issue 18: an error whose cause prints the same text is shown once.
#[test]
fn an_error_is_printed_once_not_again_as_its_own_cause() {
    let dir = tempfile::tempdir().expect("tmp");
    // A GGUF (version 3) with no tensors and one metadata entry: an architecture fuserl lacks.
    let mut gguf = b"GGUF".to_vec();
    gguf.extend(3u32.to_le_bytes());
    gguf.extend(0u64.to_le_bytes());
    gguf.extend(1u64.to_le_bytes());
    {
        let s = "general.architecture";
        gguf.extend((s.len() as u64).to_le_bytes());
        gguf.extend(s.as_bytes());
    }
    gguf.extend(8u32.to_le_bytes());
    gguf.extend(5u64.to_le_bytes());
    gguf.extend(b"mamba");
    std::fs::write(dir.path().join("x.gguf"), &gguf).expect("write");
    let out = fuserl(&["convert", "gguf", "x.gguf", "out"], dir.path());
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert_eq!(err.matches("unsupported GGUF architecture `mamba`").count(), 1, "{err}");
    assert!(err.starts_with("error: x.gguf: unsupported GGUF architecture `mamba`; supported: "), "{err}");
    assert!(!err.contains("caused by"), "{err}");
}

/// Issue 18: an objective without a reference model (SimPO) needs no `[po] reference` when
/// FuseSFT is disabled; DPO's reference defaults to the model FusePO starts from (the target);
/// naming the FuseSFT checkpoint without FuseSFT is still an error for DPO.
#[test]
fn po_without_sft_needs_no_reference_key() {
    let sandbox = sandbox();
    let check = |name: &str, recipe: &str| {
        let path = sandbox.path().join("recipes").join(name);
        std::fs::write(&path, recipe).expect("write");
        let shown = fuserl(&["recipe", "show", &format!("recipes/{name}")], sandbox.path());
        (shown.status.code(), text(&shown.stdout), text(&shown.stderr))
    };
    let simpo = std::fs::read_to_string(repo().join("recipes/fuserl-simpo.toml")).expect("recipe");
    assert!(!simpo.lines().any(|l| l.starts_with("reference")), "the test needs a recipe without the key");
    let simpo = simpo.replace("[sft]\n", "[sft]\nenabled = false\n");
    let (code, shown, err) = check("simpo.toml", &simpo);
    assert_eq!(code, Some(0), "{err}");
    assert!(shown.contains("reference = \"target\""), "{shown}");
    let dpo = std::fs::read_to_string(repo().join("recipes/fuserl-dpo.toml")).expect("recipe");
    let dpo = dpo.replace("[sft]\n", "[sft]\nenabled = false\n");
    let (code, shown, err) = check("dpo.toml", &dpo);
    assert_eq!(code, Some(0), "{err}");
    assert!(shown.contains("reference = \"target\""), "{shown}");
    let explicit = dpo.replace("[po]\n", "[po]\nreference = \"sft-checkpoint\"\n");
    let (code, _, err) = check("explicit.toml", &explicit);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("po.reference: objective `dpo` compares against the FuseSFT checkpoint, but [sft] is disabled"),
        "{err}"
    );
}

/// `[run] report_to = ["tensorboard"]`: every logged step's metrics also go to TensorBoard event
/// files. When the oracle environment has the `tensorboard` package (docs/oracle.md), TensorBoard's
/// own reader reads them back with the same values (scripts/check_tensorboard.py).
#[test]
fn metrics_also_go_to_tensorboard_event_files() {
    let dir = tempfile::tempdir().expect("tmp");
    let text_of = std::fs::read_to_string(repo().join("recipes/quickstart.toml")).expect("recipe");
    assert!(text_of.contains("[run]\n"), "the quick start has a [run] table");
    let recipe = repo().join(format!("recipes/.test-tensorboard-{}.toml", std::process::id()));
    let out_dir = dir.path().join("run");
    std::fs::write(
        &recipe,
        text_of.replace(
            "[run]\n",
            &format!("[run]\nreport_to = [\"tensorboard\"]\noutput_dir = \"{}\"\n", out_dir.display()),
        ),
    )
    .expect("write");
    let out = fuserl(&["run", &recipe.display().to_string()], dir.path());
    let _ = std::fs::remove_file(&recipe);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let files: Vec<_> = std::fs::read_dir(out_dir.join("tensorboard"))
        .expect("tensorboard folder")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("events.out.tfevents.")))
        .collect();
    assert_eq!(files.len(), 2, "one event file per stage: {files:?}");
    let python = std::env::var_os("FUSERL_ORACLE_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/fuserl-oracle/venv/bin/python")
    });
    let has_tensorboard = std::process::Command::new(&python)
        .args(["-c", "import tensorboard"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_tensorboard {
        #[allow(clippy::print_stderr)] // the skipped part is the test's message to whoever runs it
        {
            eprintln!("not read back: {} has no `tensorboard` package (docs/oracle.md)", python.display());
        }
        return;
    }
    let check = std::process::Command::new(&python)
        .arg(repo().join("scripts/check_tensorboard.py"))
        .arg(&out_dir)
        .output()
        .expect("run the check");
    assert!(check.status.success(), "{}{}", text(&check.stdout), text(&check.stderr));
}

/// Issue #34, first hour: where a run goes is said at its start (absolute); a changed recipe is
/// refused naming the settings that changed, unless only [eval] or [export] changed; a folder
/// given for the recipe is bad input (exit 2), and no message carries "(os error N)".
#[test]
fn a_run_says_where_it_goes_and_a_changed_recipe_names_what_changed() {
    let sandbox = sandbox();
    let quick = std::fs::read_to_string(repo().join("recipes/quickstart.toml")).expect("recipe");
    let recipe = sandbox.path().join("recipes/q.toml");
    let run = |text: &str| {
        std::fs::write(&recipe, text).expect("write");
        fuserl(&["run", "recipes/q.toml"], sandbox.path())
    };
    let first = run(&quick);
    assert!(first.status.success(), "{}", text(&first.stderr));
    let folder = sandbox.path().join("runs/quickstart");
    assert!(text(&first.stderr).contains(&format!("run folder: {}\n", folder.display())), "{}", text(&first.stderr));
    // Only the evaluation changed: the run goes on (and evaluates anew).
    assert!(quick.contains("max_new_tokens = 32\n"), "the quick start sets [eval] max_new_tokens");
    let eval_changed = run(&quick.replace("max_new_tokens = 32\n", "max_new_tokens = 16\n"));
    assert!(eval_changed.status.success(), "{}", text(&eval_changed.stderr));
    let kept = std::fs::read_to_string(folder.join("recipe.toml")).expect("recipe.toml");
    assert!(kept.contains("max_new_tokens = 16"), "{kept}");
    // A training setting changed: refused, by name, before anything is done.
    assert!(quick.contains("learning_rate = 3e-3\n"), "the quick start sets [sft] learning_rate");
    let trained = run(&quick.replace("learning_rate = 3e-3\n", "learning_rate = 1e-3\n"));
    let err = text(&trained.stderr);
    assert_eq!(trained.status.code(), Some(2), "{err}");
    assert!(err.contains("was made by a different recipe (sft.learning_rate changed)"), "{err}");
    // A folder for the recipe.
    let folder_given = fuserl(&["recipe", "check", "recipes"], sandbox.path());
    let err = text(&folder_given.stderr);
    assert_eq!(folder_given.status.code(), Some(2), "{err}");
    assert!(err.contains("recipes: Is a directory") && !err.contains("os error"), "{err}");
}

/// Issue #34: prompts longer than `max_length` leaves them are cut, and the run says so (once
/// for training, once per evaluated model), instead of training and evaluating on them in silence.
#[test]
fn prompts_cut_by_max_length_are_warned_of() {
    let sandbox = sandbox();
    let quick = std::fs::read_to_string(repo().join("recipes/quickstart.toml")).expect("recipe");
    assert!(quick.contains("max_length = 256\n"), "the quick start sets [target] max_length");
    std::fs::write(sandbox.path().join("recipes/q.toml"), quick.replace("max_length = 256\n", "max_length = 8\n"))
        .expect("write");
    let out = fuserl(&["run", "recipes/q.toml"], sandbox.path());
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("prompts are longer than the room max_length = 8 leaves them"), "{err}");
    assert!(err.contains("prompts are longer than max_prompt_length = 7 tokens"), "{err}");
    // At the quick start's own length nothing is cut: no warning there (the README test).
}

/// Issue #34: a file of data/external/ (downloads, never committed) that is not there names the
/// script that fetches it, at its recipe line.
#[test]
fn a_missing_download_names_the_script_that_fetches_it() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::create_dir_all(dir.path().join("data/external")).expect("mkdir");
    std::fs::create_dir(dir.path().join("recipes")).expect("mkdir");
    for entry in ["checkpoints", "scripts"] {
        std::os::unix::fs::symlink(repo().join(entry), dir.path().join(entry)).expect("symlink");
    }
    for entry in std::fs::read_dir(repo().join("data")).expect("data") {
        let entry = entry.expect("entry");
        if entry.file_name() != "external" {
            std::os::unix::fs::symlink(entry.path(), dir.path().join("data").join(entry.file_name())).expect("symlink");
        }
    }
    let quick = std::fs::read_to_string(repo().join("recipes/quickstart.toml")).expect("recipe");
    let reward = "[eval.reward]\nkind = \"keywords\"\npath = \"../data/fusion-mini-facts.jsonl\"\n";
    assert!(quick.contains(reward), "the quick start's [eval.reward]");
    let code =
        quick.replace(reward, "[eval.reward]\nkind = \"python-tests\"\ntests = \"../data/external/HumanEval.jsonl\"\n");
    std::fs::write(dir.path().join("recipes/code.toml"), &code).expect("write");
    let out = fuserl(&["recipe", "check", "recipes/code.toml"], dir.path());
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let line = line_of(&code, "tests = ");
    assert!(err.contains(&format!("recipes/code.toml:{line}:")), "{err}");
    assert!(err.contains("No such file or directory (HumanEval.jsonl is a download: run "), "{err}");
    assert!(err.contains("scripts/fetch-humaneval.sh first)") && !err.contains("os error"), "{err}");
}

/// Issue #34: the inputs a recipe names are opened before anything runs: `recipe check` reports
/// every problem at once, each at its recipe line, and `run` stops on them before it makes a run
/// folder (a misspelt target folder and an empty [eval] prompts file were found only after
/// training).
#[test]
fn recipe_check_opens_every_input_and_run_stops_before_training() {
    let sandbox = sandbox();
    std::fs::write(sandbox.path().join("recipes/empty.jsonl"), "").expect("write");
    let quick = std::fs::read_to_string(repo().join("recipes/quickstart.toml")).expect("recipe");
    assert!(quick.contains("checkpoint = \"../checkpoints/tiny-chat\"\n"));
    assert!(quick.contains("prompts = \"../data/prompts-heldout.jsonl\"\n"));
    let broken = quick
        .replace("checkpoint = \"../checkpoints/tiny-chat\"\n", "checkpoint = \"../checkpoints/tiny-chta\"\n")
        .replace("prompts = \"../data/prompts-heldout.jsonl\"\n", "prompts = \"empty.jsonl\"\n");
    std::fs::write(sandbox.path().join("recipes/broken.toml"), &broken).expect("write");
    let check = fuserl(&["recipe", "check", "recipes/broken.toml"], sandbox.path());
    let err = text(&check.stderr);
    assert_eq!(check.status.code(), Some(2), "{err}");
    let target_line = line_of(&broken, "tiny-chta");
    let prompts_line = line_of(&broken, "empty.jsonl");
    assert!(
        err.contains(&format!(
            "recipes/broken.toml:{target_line}:1: target.checkpoint: checkpoints/tiny-chta: no such checkpoint folder"
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "recipes/broken.toml:{prompts_line}:1: eval.prompts: recipes/empty.jsonl: no prompts in it"
        )),
        "{err}"
    );
    let run = fuserl(&["run", "recipes/broken.toml"], sandbox.path());
    let err = text(&run.stderr);
    assert_eq!(run.status.code(), Some(2), "{err}");
    assert!(
        err.contains("target.checkpoint") && err.contains("eval.prompts") && err.contains("nothing was run"),
        "{err}"
    );
    assert!(!sandbox.path().join("runs").exists(), "no run folder is made");
    // Every problem at once, of every kind: a misspelt key, a value of the wrong type and a
    // source without its required file do not hide each other nor the inputs' problems.
    let worse = broken
        .replace("max_length = 256\n", "max_lenght = 256\n")
        .replace("learning_rate = 3e-3\n", "learning_rate = \"fast\"\n")
        .replace("path = \"../data/fusion-mini.jsonl\"\n", "");
    std::fs::write(sandbox.path().join("recipes/worse.toml"), &worse).expect("write");
    let check = fuserl(&["recipe", "check", "recipes/worse.toml"], sandbox.path());
    let err = text(&check.stderr);
    assert_eq!(check.status.code(), Some(2), "{err}");
    for (line, said) in [
        (
            line_of(&worse, "max_lenght"),
            "target.max_lenght: unknown key `max_lenght` (did you mean `max_length`?)".to_owned(),
        ),
        (line_of(&worse, "\"fast\""), "sft.learning_rate: expected a number, found string \"fast\"".to_owned()),
        // A missing key is located at its table's first key.
        (line_of(&worse, "kind = \"jsonl\""), "sources[0].path: missing required key `path`".to_owned()),
        (
            line_of(&worse, "tiny-chta"),
            "target.checkpoint: checkpoints/tiny-chta: no such checkpoint folder".to_owned(),
        ),
        (line_of(&worse, "empty.jsonl"), "eval.prompts: recipes/empty.jsonl: no prompts in it".to_owned()),
    ] {
        assert!(err.contains(&format!("recipes/worse.toml:{line}:1: {said}")), "{said:?} at line {line}:\n{err}");
    }
}

/// Issue #34, help: the main command first, global options one line each, the values an option
/// takes, the GGUF types `convert gguf` reads, and a negative number taken as a value (then
/// refused as one).
#[test]
fn help_puts_run_first_and_says_what_values_are() {
    let help = text(&fuserl(&["--help"], &repo()).stdout);
    let commands: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter(|l| !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(commands.get(..3), Some(&["run", "sft", "po"][..]), "{help}");
    let collect = text(&fuserl(&["collect", "--help"], &repo()).stdout);
    assert_eq!(collect.lines().filter(|l| l.contains("plugin")).count(), 1, "{collect}");
    let generate = text(&fuserl(&["generate", "--help"], &repo()).stdout);
    // The devices this build has, and which others need a build of their own.
    assert!(generate.contains("Device: cpu, wgpu, cuda (vulkan, metal, webgpu, rocm need a build"), "{generate}");
    // The global options under their own heading, after the command's own.
    let global = generate.find("Global options:").expect("a Global options heading");
    for option in ["--verbose", "--quiet", "--plugin"] {
        assert!(
            generate.find(option).is_some_and(|at| at > global),
            "{option} is not under Global options: {generate}"
        );
    }
    assert!(generate.find("--prompt").is_some_and(|at| at < global), "{generate}");
    let convert = text(&fuserl(&["convert", "gguf", "--help"], &repo()).stdout);
    assert!(convert.contains("K-quants Q2_K to Q8_K"), "{convert}");
    let negative =
        fuserl(&["generate", "--model", "checkpoints/tiny-chat", "--prompt", "hi", "--temperature", "-1"], &repo());
    assert_eq!(negative.status.code(), Some(2), "{}", text(&negative.stderr));
    assert!(text(&negative.stderr).contains("--temperature -1: expected a number >= 0"), "{}", text(&negative.stderr));
    // A negative count is a bad value of its option, not an "unexpected argument".
    for (option, value) in [("--top-k", "-1"), ("--max-new-tokens", "-5")] {
        let out = fuserl(&["generate", "--model", "checkpoints/tiny-chat", "--prompt", "hi", option, value], &repo());
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains(&format!("invalid value '{value}' for '{option}")) && !err.contains("unexpected"),
            "{err}"
        );
    }
    // A model folder that does not exist is said to be missing; a missing GGUF file is bad input.
    let nope = fuserl(&["generate", "--model", "nope", "--prompt", "hi"], &repo());
    assert_eq!(nope.status.code(), Some(2), "{}", text(&nope.stderr));
    assert!(text(&nope.stderr).contains("nope: no such checkpoint folder"), "{}", text(&nope.stderr));
    let scratch = tempfile::tempdir().expect("tmp");
    let missing = scratch.path().join("missing.gguf").display().to_string();
    let out_folder = scratch.path().join("out").display().to_string();
    let gguf = fuserl(&["convert", "gguf", &missing, &out_folder], &repo());
    assert_eq!(gguf.status.code(), Some(2), "{}", text(&gguf.stderr));
    assert!(
        text(&gguf.stderr).contains("missing.gguf") && !text(&gguf.stderr).contains("os error"),
        "{}",
        text(&gguf.stderr)
    );
}

/// Issue #34: a device the machine lacks (`device = "cuda"` on a machine without an NVIDIA GPU)
/// is named at its recipe line, with what to check, before anything runs; no runtime noise.
#[test]
fn a_device_the_machine_lacks_is_named_at_its_line_before_anything_runs() {
    if std::process::Command::new("nvidia-smi").output().is_ok_and(|o| o.status.success()) {
        #[allow(clippy::print_stderr)] // the skipped part is the test's message to whoever runs it
        {
            eprintln!("not checked: this machine has an NVIDIA GPU");
        }
        return;
    }
    let sandbox = sandbox();
    let quick = std::fs::read_to_string(repo().join("recipes/quickstart.toml")).expect("recipe");
    assert!(quick.contains("device = \"cpu\"\n"), "the quick start names its device");
    let cuda = quick.replace("device = \"cpu\"\n", "device = \"cuda\"\n");
    std::fs::write(sandbox.path().join("recipes/cuda.toml"), &cuda).expect("write");
    let out = fuserl(&["run", "recipes/cuda.toml"], sandbox.path());
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let line = line_of(&cuda, "device = ");
    assert!(
        err.contains(&format!(
            "recipes/cuda.toml:{line}:1: backend.device: device `cuda` is compiled into this build but could not start: the NVIDIA driver's library (libcuda.so.1) is not on this machine"
        )) && err.contains("nvidia-smi"),
        "{err}"
    );
    assert!(!err.contains("Task failed") && !err.contains("panicked") && !err.contains("RecvError"), "{err}");
    assert!(!sandbox.path().join("runs").exists(), "nothing ran");
    // `recipe check` starts the device too, and says the same at the same line.
    let check = fuserl(&["recipe", "check", "recipes/cuda.toml"], sandbox.path());
    let err = text(&check.stderr);
    assert_eq!(check.status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("recipes/cuda.toml:{line}:1: backend.device: device `cuda`")), "{err}");
}

/// Issue #30: `fuserl plan` breaks each training stage's peak down by phase and part, with the
/// training state counted from the model's parameters (16 bytes each with f32 master weights, 8
/// with the lean option), says whether it fits, and names the settings to change when it does
/// not; `recipe check` has a memory line.
#[test]
fn plan_breaks_each_stage_down_and_names_what_to_change() {
    let sandbox = sandbox();
    let quickstart = std::fs::read_to_string(repo().join("recipes/quickstart.toml")).expect("recipe");
    let lean = quickstart.replace("dtype = \"f32\"", "dtype = \"bf16\"\nmaster_weights = \"bf16\"");
    assert_ne!(lean, quickstart);
    std::fs::write(sandbox.path().join("recipes/lean.toml"), &lean).expect("write");
    std::fs::write(sandbox.path().join("recipes/quickstart.toml"), &quickstart).expect("write");
    let mut parameters = None;
    for (recipe, bytes) in [("recipes/quickstart.toml", 4), ("recipes/lean.toml", 2)] {
        let out = fuserl(&["plan", recipe, "--json", "--memory-gb", "1000"], sandbox.path());
        assert!(out.status.success(), "{recipe}: {}", text(&out.stderr));
        let plan: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        let stages = plan["stages"].as_array().expect("stages");
        assert_eq!(stages.iter().map(|s| s["stage"].as_str().expect("name")).collect::<Vec<_>>(), ["sft", "po"]);
        for stage in stages {
            assert_eq!(stage["fits"], true, "{stage}");
            assert_eq!(stage["worst_case"], true, "{stage}");
            let p = &stage["plan"];
            let n = p["parameters"].as_u64().expect("parameters");
            assert_eq!(*parameters.get_or_insert(n), n);
            let phases = p["phases"].as_array().expect("phases");
            let part = |phase: &str, part: &str| -> u64 {
                let ph = phases.iter().find(|x| x["name"] == phase).unwrap_or_else(|| panic!("{phase}: {p}"));
                ph["parts"]
                    .as_array()
                    .expect("parts")
                    .iter()
                    .filter(|x| x["name"] == part)
                    .map(|x| x["bytes"].as_u64().expect("bytes"))
                    .sum()
            };
            assert_eq!(part("the layers' backward", "trained weights"), n * bytes, "{recipe}");
            assert_eq!(part("the layers' backward", "gradients"), n * bytes, "{recipe}");
            assert_eq!(part("the layers' backward", "AdamW moments"), 2 * n * bytes, "{recipe}");
            let totals: Vec<u64> = phases
                .iter()
                .map(|ph| ph["parts"].as_array().expect("parts").iter().map(|x| x["bytes"].as_u64().expect("b")).sum())
                .collect();
            let runtime = p["runtime"].as_u64().expect("runtime");
            assert_eq!(stage["peak_bytes"].as_u64(), Some(runtime + totals.iter().max().expect("phases")));
            // max_length 256; DPO: 2 sequences an example, 4 examples a micro-batch.
            assert_eq!(stage["length"], 256);
        }
        assert_eq!(stages[1]["sequences"], 8);
        assert!(
            stages[1]["plan"]["phases"].as_array().expect("phases").iter().any(|x| x["name"] == "reference log-probs")
        );
        // Evaluation's generation: 32 answers of up to 32 new tokens after prompts of up to 255
        // (max_length - 1); tiny-chat's KV cache is 2 layers x keys and values x 32 x 2 key-value
        // heads of 16 x 318 columns (the prefill's 255 and a quarter more: room for the 286 that
        // 31 decoding steps reach) x 4 bytes in f32, 2 in bf16.
        let eval = &plan["generation"][0];
        assert_eq!(eval["what"], "eval: the fused model", "{plan}");
        assert_eq!(
            (&eval["batch"], &eval["prompt_tokens"], &eval["new_tokens"]),
            (&32.into(), &255.into(), &32.into())
        );
        let decoding = eval["plan"]["phases"].as_array().expect("phases").iter().find(|x| x["name"] == "decoding");
        let cache =
            decoding.expect("decoding")["parts"].as_array().expect("parts").iter().find(|x| x["name"] == "KV cache");
        assert_eq!(cache.expect("KV cache")["bytes"], 2 * 2 * 32 * 32 * 318 * bytes, "{eval}");
    }
    let local_recipe = repo().join("recipes/collect-local.toml").display().to_string();
    let local = fuserl(&["plan", &local_recipe], sandbox.path());
    assert!(local.status.success(), "{}", text(&local.stderr));
    let shown = text(&local.stdout);
    assert!(
        shown.contains("collect: local source tiny: ")
            && shown.contains("4 answers at once, prompts of up to 1024 tokens, up to 24 new tokens each"),
        "{shown}"
    );
    let tight = fuserl(&["plan", "recipes/quickstart.toml", "--memory-gb", "0.001"], sandbox.path());
    assert!(tight.status.success(), "{}", text(&tight.stderr));
    let shown = text(&tight.stdout);
    for part in [
        "sft: ",
        "does not fit in 1 MB",
        "forward and the head's backward",
        "to fit, try",
        "batch_size",
        "master_weights",
        "eval: the fused model: ",
        "a smaller `[eval] batch_size` (32 now) or `[eval] max_new_tokens` (32 now",
    ] {
        assert!(shown.contains(part), "{part:?} missing from:\n{shown}");
    }
    let bad = fuserl(&["plan", "recipes/quickstart.toml", "--memory-gb", "0"], sandbox.path());
    assert!(!bad.status.success() && text(&bad.stderr).contains("--memory-gb"), "{}", text(&bad.stderr));
    let check = fuserl(&["recipe", "check", "recipes/quickstart.toml"], sandbox.path());
    assert!(check.status.success(), "{}", text(&check.stderr));
    assert!(text(&check.stdout).contains("memory: sft "), "{}", text(&check.stdout));
}

/// Issue #33: inputs that are not regular files (a FIFO would block the open forever) are refused
/// with the file and the recipe key named, quickly, as data, as a chat template and as a config.
#[test]
fn fifos_named_as_inputs_are_refused_not_waited_on() {
    let sandbox = sandbox();
    let fifo = sandbox.path().join("pipe.jsonl");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    let quickstart = std::fs::read_to_string(repo().join("recipes/quickstart.toml")).expect("recipe");
    let data = quickstart.replace("../data/fusion-mini.jsonl", "../pipe.jsonl");
    std::fs::write(sandbox.path().join("recipes/fifo-data.toml"), data).expect("write");
    let template = quickstart.replace("max_length = 256", "max_length = 256\nchat_template = \"../pipe.jsonl\"");
    std::fs::write(sandbox.path().join("recipes/fifo-template.toml"), template).expect("write");
    for (recipe, command) in [("recipes/fifo-data.toml", "run"), ("recipes/fifo-template.toml", "recipe")] {
        let start = std::time::Instant::now();
        let out = if command == "run" {
            fuserl(&["run", recipe], sandbox.path())
        } else {
            fuserl(&["recipe", "check", recipe], sandbox.path())
        };
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{recipe}: {stderr}");
        assert!(stderr.contains("pipe.jsonl") && stderr.contains("not a regular file"), "{recipe}: {stderr}");
        assert!(start.elapsed() < std::time::Duration::from_secs(10), "{recipe}: {:?}", start.elapsed());
    }
}

/// Issue #33: a prompt answered by 100,000 sources (its source table was built by a search per
/// answer, 10^10 comparisons) is read, scored, weighted and made into examples within seconds.
#[test]
fn a_prompt_with_100k_sources_is_handled_in_linear_time() {
    let dir = tempfile::tempdir().expect("tmp");
    let n = 100_000;
    let responses: serde_json::Map<String, serde_json::Value> =
        (0..n).map(|i| (format!("s{i}"), serde_json::json!([format!("answer {i}")]))).collect();
    let scores: serde_json::Map<String, serde_json::Value> =
        (0..n).map(|i| (format!("s{i}"), serde_json::json!([f64::from(i % 97) / 97.0]))).collect();
    let line = serde_json::json!({"id": "p", "prompt": "Say something.", "responses": responses, "scores": scores});
    std::fs::write(dir.path().join("data.jsonl"), format!("{line}\n")).expect("data");
    let recipe = format!(
        "schema_version = 1\n[run]\nname = \"many\"\noutput_dir = \"{}\"\n[target]\ncheckpoint = \"{}\"\n\
         max_length = 64\n[[sources]]\nkind = \"jsonl\"\npath = \"data.jsonl\"\n[reward]\nkind = \"precomputed\"\n\
         [weighting]\nkind = \"softmax\"\ntemperature = 0.5\n[po]\nenabled = false\n[export]\nenabled = false\n",
        dir.path().join("run").display(),
        repo().join("checkpoints/tiny-chat").display()
    );
    std::fs::write(dir.path().join("recipe.toml"), recipe).expect("recipe");
    let t0 = std::time::Instant::now();
    let out = fuserl(&["examples", "recipe.toml", "--stage", "sft", "--out", "examples.jsonl"], dir.path());
    let took = t0.elapsed();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("100000 sft examples"), "{}", text(&out.stderr));
    assert!(took.as_secs() < 10, "took {took:?}");
}

/// What a terminal shows once `text` has been written to it: a minimal emulator of what the
/// progress bars and the line writers send (newline, carriage return, cursor up and down, erase
/// line, erase to the end of the screen; colours and cursor visibility ignored). Non-empty lines.
fn screen(text: &str) -> Vec<String> {
    let mut lines: Vec<Vec<char>> = vec![Vec::new()];
    let (mut row, mut col) = (0usize, 0usize);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\n' => {
                row += 1;
                col = 0;
                if lines.len() <= row {
                    lines.push(Vec::new());
                }
            }
            '\r' => col = 0,
            '\u{1b}' if chars.peek() == Some(&'[') => {
                chars.next();
                let mut arg = String::new();
                while let Some(&d) = chars.peek().filter(|d| d.is_ascii_digit() || **d == ';' || **d == '?') {
                    arg.push(d);
                    chars.next();
                }
                let n: usize = arg.parse().unwrap_or(1).max(1);
                match chars.next() {
                    Some('A') => row = row.saturating_sub(n),
                    Some('B') => {
                        row += n;
                        while lines.len() <= row {
                            lines.push(Vec::new());
                        }
                    }
                    Some('K') if arg == "2" => lines[row].clear(),
                    Some('K') => lines[row].truncate(col),
                    Some('J') => {
                        lines[row].truncate(col);
                        lines.truncate(row + 1);
                    }
                    Some('G') => col = n - 1,
                    Some('C') => col += n,
                    Some('D') => col = col.saturating_sub(n),
                    _ => {}
                }
            }
            c => {
                let line = &mut lines[row];
                while line.len() < col {
                    line.push(' ');
                }
                if col < line.len() {
                    line[col] = c;
                } else {
                    line.push(c);
                }
                col += 1;
            }
        }
    }
    lines
        .into_iter()
        .map(|l| l.into_iter().collect::<String>().trim_end().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

/// Whether a screen line holds a progress bar (`[` then 30 of `=`, `>` and spaces, then `]`).
fn is_bar(line: &str) -> bool {
    let chars: Vec<char> = line.chars().collect();
    chars.windows(32).any(|w| w[0] == '[' && w[31] == ']' && w[1..31].iter().all(|c| matches!(c, '=' | '>' | ' ')))
}

/// Issue #34: on a terminal (a pseudo-terminal made by util-linux's `script`), the quick start
/// shows what it prints off one: each stage's line once, no finished bar left drawn, at most 12
/// lines; with -v its log lines go above the bars, none inside one.
#[test]
fn the_quick_start_on_a_terminal_shows_its_lines_once() {
    if std::process::Command::new("script").arg("--version").output().is_err() {
        #[allow(clippy::print_stderr)] // the skipped part is the test's message to whoever runs it
        {
            eprintln!("not checked: no `script` (util-linux) to make a terminal");
        }
        return;
    }
    let sandbox = sandbox();
    let recipe = repo().join("recipes/quickstart.toml").display().to_string();
    let on_terminal = |args: &str| {
        let command = format!("stty cols 150 rows 60; {} {args} {recipe}", env!("CARGO_BIN_EXE_fuserl"));
        let out = std::process::Command::new("script")
            .args(["-qec", &command, "/dev/null"])
            .current_dir(sandbox.path())
            .env("FUSERL_PLUGIN_PATH", crate::common::plugin_dir())
            .output()
            .expect("script");
        assert!(out.status.success(), "{}{}", text(&out.stdout), text(&out.stderr));
        let raw = text(&out.stdout);
        // Every bar drawn (they are all in the byte stream): no empty field ("loss  (",
        // "answers,  ("), no rate of an instant ("479,484.7/s" for scores read from the data).
        for bad in ["loss  (", ",  (", "answers, (", "/s (0s)"] {
            assert!(!raw.contains(bad), "{bad:?} drawn in a bar:\n{raw}");
        }
        screen(&raw)
    };
    let shown = on_terminal("run");
    let all = shown.join("\n");
    assert!(shown.len() <= 12, "{} lines on the terminal:\n{all}", shown.len());
    for line in ["sft: 150/150 steps", "po: 28/28 steps", "score precomputed: 60/60", "evaluation: runs/quickstart"] {
        assert_eq!(shown.iter().filter(|l| l.starts_with(line)).count(), 1, "{line:?} in\n{all}");
    }
    assert!(!shown.iter().any(|l| is_bar(l)), "a bar left drawn:\n{all}");
    // With -v (a new run: the stages work again), log lines are whole lines, above the bars.
    std::fs::remove_dir_all(sandbox.path().join("runs")).expect("rm runs");
    let verbose = on_terminal("-v run");
    let all = verbose.join("\n");
    assert!(verbose.iter().any(|l| l.trim_start().starts_with("INFO ")), "{all}");
    assert!(!verbose.iter().any(|l| is_bar(l)), "a bar left drawn:\n{all}");
    assert_eq!(verbose.iter().filter(|l| l.starts_with("sft: 150/150 steps")).count(), 1, "{all}");
}

/// `fuserl logprobs`, `generate` and `reward` take the `[backend]` GPU settings as options, as
/// `fuserl bench` does: on wgpu, `--attention tiles` and `--fusion false` give the log-probs of
/// the kernel on Burn's fusion backend (1e-5), and a value that is neither path is refused by
/// name.
#[test]
#[cfg(feature = "wgpu")]
fn logprobs_take_the_attention_path_and_fusion_as_options() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("pairs.jsonl");
    std::fs::write(&data, "{\"prompt\": \"Write add.\", \"response\": \"def add(a, b):\\n    return a + b\"}\n")
        .expect("write");
    let model = repo().join("checkpoints/tiny-chat").display().to_string();
    let logps = |extra: &[&str]| -> Vec<f64> {
        let out = dir.path().join("out.jsonl");
        let mut args = vec!["logprobs", "--model", &model, "--device", "wgpu", "--data"];
        let (data, out_s) = (data.display().to_string(), out.display().to_string());
        args.extend([data.as_str(), "--out", out_s.as_str()]);
        args.extend(extra);
        let run = fuserl(&args, dir.path());
        assert!(run.status.success(), "{extra:?}: {}", text(&run.stderr));
        let line: serde_json::Value =
            serde_json::from_str(std::fs::read_to_string(&out).expect("out").trim()).expect("json");
        serde_json::from_value(line["token_logps"].clone()).expect("token_logps")
    };
    let kernel = logps(&[]);
    for extra in [&["--attention", "tiles"][..], &["--fusion", "false"], &["--attention", "tiles", "--fusion", "false"]]
    {
        let other = logps(extra);
        assert_eq!(other.len(), kernel.len());
        for (a, b) in kernel.iter().zip(&other) {
            assert!((a - b).abs() < 1e-5, "{extra:?}: {a} vs {b}");
        }
    }
    let run = fuserl(&["generate", "--model", &model, "--prompt", "Hi", "--attention", "flash"], dir.path());
    assert_eq!(run.status.code(), Some(2));
    assert!(
        text(&run.stderr).contains("'flash'") && text(&run.stderr).contains("kernel, tiles"),
        "{}",
        text(&run.stderr)
    );
}
