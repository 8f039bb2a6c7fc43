//! The evaluation stage on the committed tiny models (recipes/collect-local.toml, no download):
//! `fuserl run` ends with it; eval.json has every model's mean reward with its interval and the
//! fused model's win rate against each baseline, recomputable from the stores; a SIGKILL during
//! evaluation loses nothing and a rerun asks only what is missing. Then, on the same run, a
//! pairwise judge (`[eval.judge]`, a scripted OpenAI-compatible server on 127.0.0.1 that always
//! prefers the answer shown first) is asked both orders of every pair, so its position bias
//! cancels; several samples per prompt with a verifier reward give pass@k.

use std::collections::BTreeMap;
use std::path::Path;

use crate::common::server::serve;
use crate::common::{fuserl_env, kill_at_pause, repo, text};

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
    assert_eq!(doc["n_prompts"], 6);
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
        assert_eq!(s.len(), 6);
        let r = &m["mean_reward"];
        let mean = s.iter().sum::<f64>() / 6.0;
        assert!((r["mean"].as_f64().expect("mean") - mean).abs() < 1e-12, "{m}");
        assert!(r["low"].as_f64().expect("low") <= mean && mean <= r["high"].as_f64().expect("high"), "{m}");
        assert_eq!(r["n"], 6);
    }
    let comparisons = doc["comparisons"].as_array().expect("comparisons");
    assert_eq!(comparisons.len(), 3);
    for c in comparisons {
        let w = c["win_rate"]["mean"].as_f64().expect("win rate");
        assert!((0.0..=1.0).contains(&w), "{c}");
    }

    // Killed half-way through the target's answers: the rerun asks only the rest, then nothing.
    std::fs::remove_dir_all(dir.path().join("runs/collect-local/eval")).expect("rm");
    kill_at_pause(&["eval", &recipe()], dir.path(), "collect-target-3");
    // The report says the evaluation was cut short (issue 34: not "not yet").
    let report_md = || std::fs::read_to_string(dir.path().join("runs/collect-local/report/report.md")).expect("report");
    assert!(fuserl_env(&["report", "runs/collect-local"], dir.path(), &[]).status.success());
    assert!(report_md().contains("| evaluation | interrupted (or running) |"), "{}", report_md());
    let again = fuserl_env(&["eval", &recipe()], dir.path(), &[]);
    let err = text(&again.stderr);
    assert!(again.status.success(), "{err}");
    assert!(err.contains("collect fused: 6/6 answers (0 asked now, 6 already collected"), "{err}");
    assert!(err.contains("collect target: 6/6 answers (3 asked now, 3 already collected"), "{err}");
    assert_eq!(eval_json(dir.path()), doc, "the same answers give the same evaluation");
    let third = fuserl_env(&["eval", &recipe()], dir.path(), &[]);
    let err = text(&third.stderr);
    assert!(third.status.success() && !err.contains("scored now") && !err.contains(" asked now, 0 already"), "{err}");
    assert!(report_md().contains("| evaluation | done |"), "{}", report_md());

    // A failed evaluation shows as failed, with its error, in the report the failure rebuilt.
    let sft = dir.path().join("runs/collect-local/sft/final");
    let aside = dir.path().join("runs/collect-local/sft/final.aside");
    std::fs::rename(&sft, &aside).expect("move the FuseSFT model away");
    let failed = fuserl_env(&["eval", &recipe()], dir.path(), &[]);
    assert!(!failed.status.success(), "{}", text(&failed.stdout));
    let shown = report_md();
    assert!(
        shown.contains("| evaluation | failed (what it shows is from an earlier run): [eval]: model `sft`: "),
        "{shown}"
    );
    std::fs::rename(&aside, &sft).expect("move it back");
}

#[test]
fn a_pairwise_judge_is_asked_both_orders_so_its_position_bias_cancels() {
    let dir = tempfile::tempdir().expect("tmp");
    let run = fuserl_env(&["run", &recipe()], dir.path(), &[]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    // A judge that always prefers the answer it is shown first.
    let (port, seen) = serve(200, |_body, _n| {
        (200, r#"{"choices": [{"index": 0, "message": {"role": "assistant", "content": "The first one. [[A>B]]"}, "finish_reason": "stop"}]}"#.to_owned())
    });
    // The same run (the evaluation does not claim the run directory), evaluated on code tasks
    // with two answers per prompt, the python-tests verifier and the judge.
    let text_of = std::fs::read_to_string(recipe()).expect("recipe");
    let eval_at = text_of.find("[eval]").expect("[eval]");
    let variant = format!(
        "{}[eval]\nprompts = \"../data/code-mini.jsonl\"\nvalidation = \"../data/prompts-mini.jsonl\"\nmax_new_tokens = 16\nsamples = 2\ntemperature = 0.8\nbaselines = [\"target\", \"sft\"]\n\n\
         [eval.reward]\nkind = \"python-tests\"\ntests = \"../data/code-mini-tests.jsonl\"\ntimeout_s = 10\n\n\
         [eval.judge]\nkind = \"judge\"\nmode = \"pairwise\"\nbase_url = \"http://127.0.0.1:{port}/v1\"\nmodel = \"judge\"\nconcurrency = 1\n",
        &text_of[..eval_at]
    );
    let path = repo().join(format!("recipes/.test-judge-{}.toml", std::process::id()));
    std::fs::write(&path, variant).expect("write");
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _cleanup = Cleanup(path.clone());
    let p = path.display().to_string();
    // Killed after 5 verdicts: the rerun asks only for the others.
    kill_at_pause(&["eval", &p], dir.path(), "judge-5");
    let asked_before = seen.lock().expect("lock").len();
    assert_eq!(asked_before, 5, "one request per verdict");
    let out = fuserl_env(&["eval", &p], dir.path(), &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let prompts = 8;
    // Two baselines, two orders, one pair per prompt (the first answers).
    assert_eq!(seen.lock().expect("lock").len(), prompts * 2 * 2, "every verdict asked exactly once");
    let bodies = seen.lock().expect("lock").clone();
    // Both orders of a pair: the same two answers, swapped.
    let shown = |b: &serde_json::Value| b["messages"][1]["content"].as_str().expect("user message").to_owned();
    assert!(
        bodies
            .iter()
            .all(|b| b["messages"][0]["role"] == "system" && shown(b).contains("[The Start of Assistant B's Answer]"))
    );
    let doc = eval_json(dir.path());
    assert_eq!(doc["samples"], 2);
    for m in doc["models"].as_array().expect("models") {
        assert_eq!(m["answers"], prompts * 2, "{m}");
        for k in ["pass_at_1", "pass_at_2"] {
            let p = m[k]["mean"].as_f64().unwrap_or_else(|| panic!("{k} in {m}"));
            assert!((0.0..=1.0).contains(&p) && m[k]["n"] == prompts, "{m}");
        }
        assert!(m["pass_at_1"]["mean"].as_f64() <= m["pass_at_2"]["mean"].as_f64(), "{m}");
    }
    let judged: Vec<&serde_json::Value> =
        doc["comparisons"].as_array().expect("comparisons").iter().filter(|c| c["by"] != "reward").collect();
    assert_eq!(judged.len(), 2);
    for c in judged {
        // Fused first, it wins; baseline first, it loses: a tie on every prompt.
        assert_eq!(c["win_rate"]["mean"], 0.5, "{c}");
        assert_eq!((c["win_rate"]["low"].as_f64(), c["win_rate"]["high"].as_f64()), (Some(0.5), Some(0.5)), "{c}");
        assert_eq!(c["orders_agree"], 0.0, "{c}");
        assert_eq!(c["win_rate"]["n"], prompts, "{c}");
    }
    // The validation prompts: the fused model alone, scored by the training reward (keywords),
    // each prompt's mean over its answers averaged, as stored.
    let v = &doc["validation"];
    assert_eq!((v["n_prompts"].as_u64(), v["mean_reward"]["n"].as_u64()), (Some(10), Some(10)), "{v}");
    let stored = std::fs::read_to_string(dir.path().join("runs/collect-local/eval/validation/score/keywords.jsonl"))
        .expect("validation scores");
    let mut per_prompt: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for line in stored.lines() {
        let s: serde_json::Value = serde_json::from_str(line).expect("json");
        assert_eq!(s["source"], "fused", "{line}");
        per_prompt
            .entry(s["prompt_id"].as_str().expect("id").to_owned())
            .or_default()
            .push(s["score"].as_f64().expect("score"));
    }
    let want = per_prompt.values().map(|r| r.iter().sum::<f64>() / r.len() as f64).sum::<f64>() / 10.0;
    assert!((v["mean_reward"]["mean"].as_f64().expect("mean") - want).abs() < 1e-12, "{v}");
    assert!(v.get("pass_at_1").is_none(), "keywords is not a pass/fail verifier: {v}");
    // Nothing is asked again.
    let again = fuserl_env(&["eval", &p], dir.path(), &[]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert_eq!(seen.lock().expect("lock").len(), prompts * 2 * 2);
}
