//! The evaluation stage on the committed tiny models (recipes/collect-local.toml, no download):
//! `fuserl run` ends with it; eval.json has every model's mean reward with its interval and the
//! fused model's win rate against each baseline, recomputable from the stores; a SIGKILL during
//! evaluation loses nothing and a rerun asks only what is missing.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{fuserl_env, kill_at_pause, repo, text};

fn recipe() -> String {
    repo().join("recipes/collect-local.toml").display().to_string()
}

fn eval_json(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("runs/collect-local/eval/eval.json")).expect("eval.json"))
        .expect("json")
}

#[test]
fn a_run_ends_with_an_evaluation_that_the_stores_reproduce_and_that_resumes() {
    let dir = tempfile::tempdir().expect("tmp");
    let run = fuserl_env(&["run", &recipe()], dir.path(), &[]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    assert!(text(&run.stdout).contains("evaluation: runs/collect-local/eval/eval.json"), "{}", text(&run.stdout));
    let doc = eval_json(dir.path());
    let names: Vec<&str> =
        doc["models"].as_array().expect("models").iter().map(|m| m["name"].as_str().expect("name")).collect();
    assert_eq!(names, ["fused", "target", "sft", "tiny"]);
    assert_eq!(doc["n_prompts"], 10);
    // Each model's mean reward is the mean of its stored scores, inside its interval.
    let scores =
        std::fs::read_to_string(dir.path().join("runs/collect-local/eval/score/keywords.jsonl")).expect("scores");
    let mut by_model: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for line in scores.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("json");
        by_model
            .entry(v["source"].as_str().expect("source").to_owned())
            .or_default()
            .push(v["score"].as_f64().expect("score"));
    }
    for m in doc["models"].as_array().expect("models") {
        let s = &by_model[m["name"].as_str().expect("name")];
        assert_eq!(s.len(), 10);
        let r = &m["mean_reward"];
        let mean = s.iter().sum::<f64>() / 10.0;
        assert!((r["mean"].as_f64().expect("mean") - mean).abs() < 1e-12, "{m}");
        assert!(r["low"].as_f64().expect("low") <= mean && mean <= r["high"].as_f64().expect("high"), "{m}");
        assert_eq!(r["n"], 10);
    }
    let comparisons = doc["comparisons"].as_array().expect("comparisons");
    assert_eq!(comparisons.len(), 3);
    for c in comparisons {
        let w = c["win_rate"]["mean"].as_f64().expect("win rate");
        assert!((0.0..=1.0).contains(&w), "{c}");
    }

    // Killed half-way through the target's answers: the rerun asks only the rest, then nothing.
    std::fs::remove_dir_all(dir.path().join("runs/collect-local/eval")).expect("rm");
    kill_at_pause(&["eval", &recipe()], dir.path(), "collect-target-5");
    let again = fuserl_env(&["eval", &recipe()], dir.path(), &[]);
    let err = text(&again.stderr);
    assert!(again.status.success(), "{err}");
    assert!(err.contains("collect fused: 10/10 answers (0 asked now, 10 already collected"), "{err}");
    assert!(err.contains("collect target: 10/10 answers (5 asked now, 5 already collected"), "{err}");
    assert_eq!(eval_json(dir.path()), doc, "the same answers give the same evaluation");
    let third = fuserl_env(&["eval", &recipe()], dir.path(), &[]);
    let err = text(&third.stderr);
    assert!(third.status.success() && !err.contains("scored now") && !err.contains(" asked now, 0 already"), "{err}");
}
