//! Dynamic plugins end to end: the example plugin loaded from its shared library and run
//! through the same code paths as built-ins, and every way a library is refused.

use std::path::Path;

use crate::common::{fuserl, fuserl_env, line_of, plugin, repo, sandbox, text};
use fuserl_core::extension::ObjectiveBatch;
use fuserl_core::registry::BuildContext;

fn table(text: &str) -> toml::Table {
    toml::from_str(text).expect("toml")
}

fn ctx() -> BuildContext {
    BuildContext::default()
}

#[test]
fn plugins_list_shows_dynamic_plugins_with_their_file() {
    let lib = plugin("fuserl_example");
    let out = fuserl(&["--plugin", &lib.display().to_string(), "plugins", "list"], &repo());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listing = text(&out.stdout);
    for (point, name) in [("weighting", "margin"), ("objective", "ranking-hinge"), ("source", "templated")] {
        let line = listing
            .lines()
            .find(|l| l.split_whitespace().take(2).collect::<Vec<_>>() == [point, name])
            .unwrap_or_else(|| panic!("no {point} {name} in\n{listing}"));
        assert!(line.contains(&lib.display().to_string()) && line.contains("plugin `fuserl-example`"), "{line}");
    }
    // Built-ins are still there, and a bare name is found on FUSERL_PLUGIN_PATH.
    assert!(listing.contains("built-in (fuserl-builtin)"));
    let by_name = fuserl(&["--plugin", "fuserl_example", "plugins", "list"], &repo());
    assert!(text(&by_name.stdout).contains("ranking-hinge"), "{}", text(&by_name.stderr));
}

#[test]
fn a_recipe_loads_its_plugins_and_runs_their_components() {
    let out = fuserl(&["recipe", "check", "recipes/plugin-example.toml"], &repo());
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("weighting: margin; sft: sft; po: ranking-hinge"), "{}", text(&out.stdout));
    // The plugin's weighting scheme and objective build real examples through the pipeline.
    let dir = tempfile::tempdir().expect("tmp");
    for stage in ["sft", "po"] {
        let file = dir.path().join(format!("{stage}.jsonl"));
        let out = fuserl(
            &["examples", "recipes/plugin-example.toml", "--stage", stage, "--out", &file.display().to_string()],
            &repo(),
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&file)
            .expect("out")
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
        assert!(!lines.is_empty());
        if stage == "po" {
            assert!(
                lines
                    .iter()
                    .all(|e| e["objective"] == "ranking-hinge" && e["sequences"].as_array().map(Vec::len) == Some(2))
            );
            assert_eq!(lines.len(), 10, "one best-vs-worst pair per prompt");
        } else {
            // margin 0.05 below the best: capital-france keeps model-a (0.998, 0.988), model-b's
            // 0.968 and model-c's 0.992.
            let capital: Vec<&serde_json::Value> =
                lines.iter().filter(|e| e["prompt_id"] == "capital-france").collect();
            assert_eq!(capital.len(), 4);
        }
    }
    // The resolved recipe keeps the plugin and the plugin's resolved keys.
    let show = fuserl(&["recipe", "show", "recipes/plugin-example.toml"], &repo());
    let shown = text(&show.stdout);
    assert!(shown.contains("plugins = [\"fuserl_example\"]") && shown.contains("min_gap = 0.01"), "{shown}");
}

#[test]
fn plugin_components_evaluate_like_builtins() {
    let mut registry = fuserl_builtin::registry().expect("registry");
    let lib = plugin("fuserl_example");
    assert_eq!(fuserl_abi::host::load_library(&lib, &mut registry), Ok(3));
    // Loading the same file again is a no-op.
    assert_eq!(fuserl_abi::host::load_library(&lib, &mut registry), Ok(0));
    let hinge = registry
        .build_objective_from(&table("kind = \"ranking-hinge\"\ngamma = 0.5"), &ctx())
        .expect("build")
        .component;
    let batch = ObjectiveBatch {
        example_offsets: &[0, 2, 4],
        example_weights: &[1.0, 1.0],
        policy_logps: &[-10.0, -12.0, -2.0, -30.0],
        reference_logps: None,
        token_counts: &[5.0, 6.0, 4.0, 5.0],
        rewards: &[1.0, 0.0, 1.0, 0.0],
        normalizer: 2.0,
        progress: 0.0,
    };
    let out = hinge.loss(&batch).expect("loss");
    assert!((out.loss - 0.25).abs() < 1e-15, "{}", out.loss);
    assert_eq!(out.grad, vec![-0.1, 0.5 / 6.0, 0.0, 0.0]);
    assert_eq!(out.metrics, vec![("hinge/active_fraction".to_owned(), 0.5)]);
}

#[test]
fn a_file_that_is_not_a_library_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let fake = dir.path().join("libfake.so");
    std::fs::write(&fake, "not a library").expect("write");
    let out = fuserl(&["--plugin", &fake.display().to_string(), "plugins", "list"], &repo());
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("libfake.so: not a loadable library"), "{}", text(&out.stderr));
    let missing = fuserl(&["--plugin", "no_such_plugin", "plugins", "list"], &repo());
    assert_eq!(missing.status.code(), Some(2));
    assert!(text(&missing.stderr).contains("no plugin library `libno_such_plugin.so`"), "{}", text(&missing.stderr));
    assert!(text(&missing.stderr).contains("`cargo build -p CRATE`"), "{}", text(&missing.stderr));
}

/// Issue 18: the README's recipe check on the plugin example, before the plugin was built,
/// says how to build it.
#[test]
fn a_missing_example_plugin_says_how_to_build_it() {
    // `cargo test --workspace` puts the example beside target/debug/fuserl: run a link of the
    // binary from a folder of its own, as on a machine where the plugin was never built.
    let alone = tempfile::tempdir_in(Path::new(env!("CARGO_BIN_EXE_fuserl")).parent().expect("bin dir")).expect("tmp");
    let exe = alone.path().join("fuserl");
    std::fs::hard_link(env!("CARGO_BIN_EXE_fuserl"), &exe).expect("link the binary");
    let out = std::process::Command::new(&exe)
        .args(["recipe", "check", "recipes/plugin-example.toml"])
        .current_dir(repo())
        .env("FUSERL_PLUGIN_PATH", alone.path())
        .output()
        .expect("run fuserl");
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(err.contains("it is built by `cargo build -p fuserl-example`"), "{err}");
}

#[test]
fn a_library_without_the_entry_symbol_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let src = dir.path().join("plain.c");
    std::fs::write(&src, "int plain_function(void) { return 42; }\n").expect("write");
    let lib = dir.path().join("libplain.so");
    let cc = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&src)
        .status()
        .expect("cc (a C compiler) is needed to build a plain shared library");
    assert!(cc.success());
    let out = fuserl(&["--plugin", &lib.display().to_string(), "plugins", "list"], &repo());
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr)
            .contains("libplain.so: a library, but not a fuserl plugin: it has no `fuserl_plugin_declare` symbol"),
        "{}",
        text(&out.stderr)
    );
}

fn with_testkit(mode: &str, args: &[&str], dir: &Path) -> (Option<i32>, String) {
    let lib = plugin("fuserl_testkit").display().to_string();
    let mut all = vec!["--plugin", lib.as_str()];
    all.extend_from_slice(args);
    let out = fuserl_env(&all, dir, &[("FUSERL_TEST_PLUGIN_MODE", mode)]);
    (out.status.code(), text(&out.stderr))
}

#[test]
fn newer_older_and_wrongly_sized_declarations_are_refused() {
    let (code, err) = with_testkit("newer-abi", &["plugins", "list"], &repo());
    assert_eq!(code, Some(2));
    assert!(err.contains("built for plugin ABI version 3, newer than this fuserl's (2); upgrade fuserl"), "{err}");
    let (code, err) = with_testkit("older-abi", &["plugins", "list"], &repo());
    assert_eq!(code, Some(2));
    assert!(
        err.contains("built for plugin ABI version 0, older than the oldest this fuserl loads (1); rebuild the plugin"),
        "{err}"
    );
    let (code, err) = with_testkit("wrong-size", &["plugins", "list"], &repo());
    assert_eq!(code, Some(2));
    assert!(err.contains("its declaration is") && err.contains("not a fuserl plugin of this version"), "{err}");
}

#[test]
fn a_duplicate_component_name_names_both_origins() {
    let (code, err) = with_testkit("duplicate", &["plugins", "list"], &repo());
    assert_eq!(code, Some(2));
    assert!(
        err.contains("weighting scheme `softmax` is registered twice: by built-in (fuserl-builtin) and by")
            && err.contains("libfuserl_testkit.so (plugin `fuserl-testkit`)"),
        "{err}"
    );
}

/// A recipe that uses the test plugin's components.
fn testkit_recipe(weighting: &str, objective: &str) -> (tempfile::TempDir, String) {
    let dir = sandbox();
    let recipe = format!(
        "schema_version = 1\n[target]\ncheckpoint = \"m\"\n[[sources]]\nkind = \"jsonl\"\npath = \"../data/fusion-mini.jsonl\"\n\
         [reward]\nkind = \"precomputed\"\n[weighting]\n{weighting}\n[po.objective]\n{objective}\n"
    );
    std::fs::write(dir.path().join("recipes/t.toml"), &recipe).expect("write");
    (dir, recipe)
}

#[test]
fn a_panicking_component_is_an_error_naming_plugin_and_component() {
    let (dir, _) = testkit_recipe("kind = \"panicky\"", "kind = \"failing\"");
    let (code, err) = with_testkit("", &["examples", "recipes/t.toml", "--stage", "sft"], dir.path());
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(
            "weighting scheme `panicky`: panicked: panicky weighting was asked to weigh [plugin `fuserl-testkit`,"
        ) && err.contains("libfuserl_testkit.so]"),
        "{err}"
    );
    // In-process too: the host survives the panic and keeps working.
    let mut registry = fuserl_builtin::registry().expect("registry");
    fuserl_abi::host::load_library(&plugin("fuserl_testkit"), &mut registry).expect("load");
    let panicky = registry.build_weighting_from(&table("kind = \"panicky\""), &ctx()).expect("build").component;
    let names = vec!["a".to_owned()];
    let view = fuserl_core::extension::GroupView {
        rewards: &[1.0],
        sources: &[0],
        sample_indices: &[0],
        source_names: &names,
        weights: &[],
    };
    for _ in 0..2 {
        let err = panicky.weigh(&view).unwrap_err().to_string();
        assert!(err.contains("panicked: panicky weighting was asked to weigh"), "{err}");
    }
}

#[test]
fn a_component_that_returns_an_error_is_reported() {
    let mut registry = fuserl_builtin::registry().expect("registry");
    fuserl_abi::host::load_library(&plugin("fuserl_testkit"), &mut registry).expect("load");
    let failing = registry.build_objective_from(&table("kind = \"failing\""), &ctx()).expect("build").component;
    let batch = ObjectiveBatch {
        example_offsets: &[0, 1],
        example_weights: &[1.0],
        policy_logps: &[-1.0],
        reference_logps: None,
        token_counts: &[1.0],
        rewards: &[0.0],
        normalizer: 1.0,
        progress: 0.0,
    };
    let err = failing.loss(&batch).unwrap_err().to_string();
    assert!(
        err.starts_with("preference objective `failing`: this objective always fails [plugin `fuserl-testkit`,"),
        "{err}"
    );
    // A constructor's refusal keeps its key path, so the recipe points at the line.
    let (dir, recipe) = testkit_recipe("kind = \"softmax\"", "kind = \"failing\"\nfail_create = true");
    let (code, err) = with_testkit("", &["recipe", "check", "recipes/t.toml"], dir.path());
    assert_eq!(code, Some(2), "{err}");
    let line = line_of(&recipe, "fail_create");
    assert!(err.contains(&format!("t.toml:{line}:1: po.objective.fail_create: refused on purpose")), "{err}");
}

#[test]
fn a_recipe_plugin_that_cannot_be_loaded_points_at_its_line() {
    let dir = sandbox();
    let recipe = "schema_version = 1\nplugins = [\"./libnothing.so\"]\n[target]\ncheckpoint = \"m\"\n[[sources]]\nkind = \"jsonl\"\npath = \"../data/fusion-mini.jsonl\"\n[reward]\nkind = \"precomputed\"\n";
    std::fs::write(dir.path().join("recipes/p.toml"), recipe).expect("write");
    let out = fuserl(&["recipe", "check", "recipes/p.toml"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("recipes/p.toml:2:") && err.contains("plugins[0]:") && err.contains("libnothing.so"), "{err}");
}

#[test]
fn plugins_log_through_the_host() {
    // In a folder of its own: its run folder (runs/plugin-example-mini) is not the one another
    // test's `examples` on the same recipe holds (a run folder takes one command at a time).
    let dir = sandbox();
    let recipe = dir.path().join("recipes/plugin-example.toml");
    std::fs::copy(repo().join("recipes/plugin-example.toml"), &recipe).expect("copy the recipe");
    let file = dir.path().join("sft.jsonl").display().to_string();
    let out = fuserl(&["-vv", "examples", "recipes/plugin-example.toml", "--stage", "sft", "--out", &file], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.lines().any(|l| l.contains("margin weighting with margin 0.05") && l.contains("plugin=fuserl-example")),
        "{err}"
    );
}

/// ABI version 2 appended the generator fields: a version-1 plugin (shorter components) still
/// loads, and its components still work.
#[test]
fn a_version_1_plugin_keeps_loading() {
    let (code, err) = with_testkit("abi-v1", &["plugins", "list"], &repo());
    assert_eq!(code, Some(0), "{err}");
    let (dir, _) = testkit_recipe("kind = \"softmax\"", "kind = \"failing\"\nfail_create = true");
    let (code, err) = with_testkit("abi-v1", &["recipe", "check", "recipes/t.toml"], dir.path());
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("po.objective.fail_create: refused on purpose"), "{err}");
}

/// A plugin's generative source (ABI version 2) answers in the collect stage like a built-in.
#[test]
fn a_plugin_generator_collects_and_resumes() {
    let dir = sandbox();
    let recipe = format!(
        "schema_version = 1\nplugins = [\"{}\"]\n[run]\nname = \"g\"\n[target]\ncheckpoint = \"../checkpoints/tiny-chat\"\n\
         [data]\nprompts = [\"../data/prompts-mini.jsonl\"]\nsamples_per_prompt = 3\n\
         [[sources]]\nkind = \"templated\"\nname = \"echo\"\ntemplate = \"Answer {{sample}} to: {{prompt}}\"\n\
         [reward]\nkind = \"keywords\"\npath = \"../data/fusion-mini-facts.jsonl\"\n",
        plugin("fuserl_example").display()
    );
    std::fs::write(dir.path().join("recipes/g.toml"), recipe).expect("write");
    let out = fuserl(&["collect", "recipes/g.toml"], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("collect echo: 30/30 answers (30 asked now, 0 already collected;"),
        "{}",
        text(&out.stderr)
    );
    let store = std::fs::read_to_string(dir.path().join("runs/g/collect/echo.jsonl")).expect("store");
    assert_eq!(store.lines().count(), 30);
    assert!(store.contains("Answer 2 to: What is the capital of France?"), "{store}");
    let again = fuserl(&["collect", "recipes/g.toml"], dir.path());
    assert!(
        text(&again.stderr).contains("collect echo: 30/30 answers (0 asked now, 30 already collected;"),
        "{}",
        text(&again.stderr)
    );
    // The answers flow on into the data stages.
    let examples = fuserl(&["examples", "recipes/g.toml", "--stage", "sft"], dir.path());
    assert!(examples.status.success(), "{}", text(&examples.stderr));
    assert!(text(&examples.stdout).contains("\"echo\""));
}
