//! The scoring stage with the `classifier` reward (the committed tiny
//! LlamaForSequenceClassification, matched against transformers in tests/model/classifier.rs):
//! `fuserl score` keeps every answer's score in runs/NAME/score/, a rerun scores nothing again,
//! a SIGKILL mid-scoring loses and repeats nothing, a changed reward scores everything afresh,
//! and `fuserl run` trains on the stored scores. No download, no server.

use std::collections::BTreeMap;
use std::path::Path;

use crate::common::{fuserl_env, kill_at_pause, repo, text};

type Key = (String, String, u64, String);

/// The score store: key -> score; every line's key is distinct.
fn scores(dir: &Path) -> BTreeMap<Key, f64> {
    let file = dir.join("runs/reward-classifier/score/classifier.jsonl");
    let body = std::fs::read_to_string(&file).unwrap_or_default();
    let mut out = BTreeMap::new();
    for line in body.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("json");
        let key = (
            v["prompt_id"].as_str().expect("id").to_owned(),
            v["source"].as_str().expect("source").to_owned(),
            v["sample_index"].as_u64().expect("i"),
            v["text_hash"].as_str().expect("hash").to_owned(),
        );
        assert!(out.insert(key.clone(), v["score"].as_f64().expect("score")).is_none(), "{key:?} stored twice");
    }
    out
}

fn recipe() -> String {
    repo().join("recipes/reward-classifier.toml").display().to_string()
}

fn score_ok(dir: &Path, recipe: &str) -> String {
    let out = fuserl_env(&["score", recipe], dir, &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stderr)
}

#[test]
fn scores_are_stored_reused_and_match_fuserl_reward() {
    let dir = tempfile::tempdir().expect("tmp");
    let err = score_ok(dir.path(), &recipe());
    let first = scores(dir.path());
    // 10 prompts: 6 answers each from the file's three sources, 2 from the local source.
    assert_eq!(first.len(), 80, "{err}");
    assert!(err.contains("80 scored now, 0 already scored"), "{err}");
    let again = score_ok(dir.path(), &recipe());
    assert!(!again.contains("scored now"), "a rerun scored again:\n{again}");
    assert_eq!(scores(dir.path()), first);

    // The same conversations through `fuserl reward` give the same scores.
    let prompts: BTreeMap<String, String> = std::fs::read_to_string(repo().join("data/prompts-mini.jsonl"))
        .expect("prompts")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
        .map(|v| (v["id"].as_str().expect("id").to_owned(), v["prompt"].as_str().expect("prompt").to_owned()))
        .collect();
    let collected = std::fs::read_to_string(dir.path().join("runs/reward-classifier/collect/tiny.jsonl")).expect("c");
    let mut pairs = String::new();
    let mut want = Vec::new();
    for line in collected.lines().take(6) {
        let v: serde_json::Value = serde_json::from_str(line).expect("json");
        let (id, i) = (v["prompt_id"].as_str().expect("id"), v["sample_index"].as_u64().expect("i"));
        let stored = first.iter().find(|(k, _)| k.0 == id && k.1 == "tiny" && k.2 == i).expect("scored").1;
        want.push(*stored);
        pairs.push_str(&serde_json::json!({"prompt": prompts[id], "response": v["text"]}).to_string());
        pairs.push('\n');
    }
    std::fs::write(dir.path().join("pairs.jsonl"), pairs).expect("write");
    let model = repo().join("fixtures/rewards/llama-rm").display().to_string();
    let out = fuserl_env(
        &["reward", "--model", &model, "--data", "pairs.jsonl", "--out", "scored.jsonl", "--batch-size", "4"],
        dir.path(),
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let got: Vec<f64> = std::fs::read_to_string(dir.path().join("scored.jsonl"))
        .expect("out")
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json")["score"].as_f64().expect("score"))
        .collect();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-5, "fuserl reward {got:?} vs the scoring stage {want:?}");
    }

    // Another reward setting: the old scores are set aside and every answer is scored afresh.
    let changed = dir.path().join("changed.toml");
    let text_of = std::fs::read_to_string(recipe())
        .expect("recipe")
        .replace("batch_size = 8\n", "batch_size = 8\nlabel_weights = { LABEL_0 = 2.0 }\n");
    let text_of = text_of
        .replace("\"../", &format!("\"{}/", repo().display()))
        .replace("checkpoint = \"../", &format!("checkpoint = \"{}/", repo().display()));
    std::fs::write(&changed, text_of).expect("write");
    let err = score_ok(dir.path(), &changed.display().to_string());
    assert!(err.contains("80 scored now, 0 already scored"), "{err}");
    assert!(dir.path().join("runs/reward-classifier/score/classifier.jsonl.old-1").is_file());
    let doubled = scores(dir.path());
    for (k, v) in &first {
        assert!((doubled[k] - 2.0 * v).abs() < 1e-5, "{k:?}: {} vs 2 x {v}", doubled[k]);
    }
}

/// SIGKILL after some batches are stored: the rerun scores only the rest, and the store ends
/// with every answer once; then `fuserl run` trains on the stored scores without scoring again.
#[test]
fn a_killed_scoring_resumes_without_losing_or_repeating_scores() {
    let dir = tempfile::tempdir().expect("tmp");
    let recipe = recipe();
    for label in ["score-8", "score-40"] {
        let before = scores(dir.path());
        kill_at_pause(&["score", &recipe], dir.path(), label);
        let now = scores(dir.path());
        for (k, v) in &before {
            assert_eq!(now.get(k), Some(v), "{label}: {k:?} lost or changed");
        }
        let n: usize = label.trim_start_matches("score-").parse().expect("n");
        assert_eq!(now.len(), n, "{label}: the batches scored before the kill are kept");
    }
    let err = score_ok(dir.path(), &recipe);
    assert!(err.contains("40 scored now, 40 already scored"), "{err}");
    assert_eq!(scores(dir.path()).len(), 80);
    let run = fuserl_env(&["run", &recipe], dir.path(), &[]);
    let err = text(&run.stderr);
    assert!(run.status.success(), "{err}");
    assert!(!err.contains("scored now"), "the run scored again:\n{err}");
    let examples = std::fs::read_to_string(dir.path().join("runs/reward-classifier/sft/examples.jsonl")).expect("ex");
    // The training examples carry the stored scores.
    let stored = scores(dir.path());
    let mut checked = 0;
    for line in examples.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("json");
        for s in v["sequences"].as_array().expect("sequences") {
            let c = &s["completion"];
            let (id, source, i) = (c["prompt_id"].as_str(), c["source"].as_str(), c["sample_index"].as_u64());
            let want =
                stored.iter().find(|(k, _)| Some(k.0.as_str()) == id && Some(k.1.as_str()) == source && Some(k.2) == i);
            assert_eq!(s["reward"].as_f64(), want.map(|w| *w.1), "{line}");
            checked += 1;
        }
    }
    assert!(checked >= 10, "{examples}");
}

/// Issue #13: nothing is written through a symbolic link that leaves the run directory. A
/// `score` folder linked to a folder elsewhere is refused, by name, before anything is scored;
/// the folder it points to stays empty; the same link pointing inside the run is fine.
#[test]
fn a_link_out_of_the_run_directory_is_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let run = dir.path().join("runs/reward-classifier");
    std::fs::create_dir_all(&run).expect("mkdir");
    let outside = dir.path().join("elsewhere");
    std::fs::create_dir_all(&outside).expect("mkdir");
    std::os::unix::fs::symlink(&outside, run.join("score")).expect("link");
    let out = fuserl_env(&["score", &recipe()], dir.path(), &[]);
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "runs/reward-classifier/score: a symbolic link to {}, outside the run directory",
            outside.display()
        )),
        "{err}"
    );
    assert_eq!(err.matches("symbolic link").count(), 1, "said once:\n{err}");
    assert_eq!(std::fs::read_dir(&outside).expect("ls").count(), 0, "something was written through the link");

    // The run folder's lock file is a link too: nothing is truncated through it.
    std::fs::remove_file(run.join("score")).expect("rm");
    let victim = outside.join("precious.txt");
    std::fs::write(&victim, "keep me").expect("write");
    std::os::unix::fs::symlink(&victim, run.join(".lock")).expect("link");
    let out = fuserl_env(&["score", &recipe()], dir.path(), &[]);
    let err = text(&out.stderr);
    assert!(!out.status.success() && err.contains("runs/reward-classifier/.lock: a symbolic link"), "{err}");
    assert_eq!(std::fs::read_to_string(&victim).expect("read"), "keep me");
    std::fs::remove_file(run.join(".lock")).expect("rm");

    std::fs::create_dir_all(run.join("scores-elsewhere")).expect("mkdir");
    std::os::unix::fs::symlink("scores-elsewhere", run.join("score")).expect("link");
    score_ok(dir.path(), &recipe());
    assert!(run.join("scores-elsewhere/classifier.jsonl").is_file());
}
