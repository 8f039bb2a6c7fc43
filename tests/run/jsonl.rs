//! The `jsonl` source adapter and the `precomputed` reward on both layouts, malformed lines
//! and duplicates.

use std::path::Path;

use fuserl_core::data::SamplingParams;
use fuserl_core::extension::{CollectRequest, Collected, SourceAdapter};
use fuserl_core::registry::BuildContext;
use fuserl_run::pipeline::{assemble_groups, score_groups};

fn source(dir: &Path, keys: &[(&str, toml::Value)]) -> Result<Box<dyn SourceAdapter>, String> {
    let mut t = toml::Table::new();
    for (k, v) in keys {
        t.insert((*k).into(), v.clone());
    }
    let registry = fuserl_builtin::registry().expect("registry");
    registry
        .build_source("jsonl", &t, &BuildContext { base_dir: dir.to_path_buf(), ..BuildContext::default() })
        .map(|b| b.component)
        .map_err(|e| e.to_string())
}

fn collect(s: &dyn SourceAdapter) -> fuserl_core::Result<Collected> {
    let sampling = SamplingParams::default();
    s.collect(&CollectRequest { prompts: &[], samples_per_prompt: 1, sampling: &sampling })
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).expect("write");
}

fn data_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data")
}

#[test]
fn both_layouts_of_the_committed_dataset_agree() {
    let dir = data_dir();
    let per_prompt =
        collect(source(&dir, &[("path", "fusion-mini.jsonl".into())]).expect("source").as_ref()).expect("collect");
    let flat = collect(
        source(&dir, &[("path", "fusion-mini-flat.jsonl".into()), ("layout", "flat".into())]).expect("source").as_ref(),
    )
    .expect("collect");
    assert_eq!(per_prompt.prompts, flat.prompts);
    assert_eq!(per_prompt.completions.len(), 60);
    let key = |c: &fuserl_core::data::Completion| (c.id.clone(), c.text.clone(), c.precomputed_score);
    let mut a: Vec<_> = per_prompt.completions.iter().map(key).collect();
    let mut b: Vec<_> = flat.completions.iter().map(key).collect();
    a.sort_by(|x, y| x.0.cmp(&y.0));
    b.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(a, b);
    // Provenance: file and line of every completion; sampling settings from the record.
    let c = &per_prompt.completions[0];
    assert_eq!(c.origin.line, Some(1));
    assert!(c.origin.file.as_deref().is_some_and(|f| f.ends_with("fusion-mini.jsonl")));
    assert_eq!(c.sampling.temperature, Some(0.8));
    assert_eq!(flat.completions[7].origin.line, Some(8));
}

#[test]
fn flat_rows_are_grouped_and_numbered_and_scored() {
    let dir = tempfile::tempdir().expect("tmp");
    write(
        dir.path(),
        "d.jsonl",
        concat!(
            r#"{"prompt": "Hi?", "source": "a", "response": "Hello", "score": 1}"#,
            "\n",
            r#"{"prompt": "Hi?", "source": "b", "response": "Hey", "score": 0.5}"#,
            "\n",
            "\n",
            r#"{"prompt": "Hi?", "source": "a", "response": "Yo", "score": -2.5, "extra": "kept out"}"#,
            "\n",
            r#"{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}], "source": "b", "response": "4", "score": 0.9}"#,
            "\n",
        ),
    );
    let s = source(dir.path(), &[("path", "d.jsonl".into())]).expect("source");
    let collected = collect(s.as_ref()).expect("collect");
    assert_eq!(collected.prompts.len(), 2);
    let mut groups = assemble_groups(vec![collected]).expect("groups");
    let reward = fuserl_builtin::registry()
        .expect("registry")
        .build_reward("precomputed", &toml::Table::new(), &BuildContext::default())
        .expect("reward")
        .component;
    score_groups(reward.as_ref(), &mut groups, 2).expect("score");
    let g = &groups[0];
    let got: Vec<(String, u32, f64, Option<u64>)> = g
        .completions
        .iter()
        .map(|c| {
            (
                c.completion.id.source.clone(),
                c.completion.id.sample_index,
                c.reward.as_ref().expect("reward").value,
                c.completion.origin.line,
            )
        })
        .collect();
    assert_eq!(got, vec![("a".into(), 0, 1.0, Some(1)), ("a".into(), 1, -2.5, Some(4)), ("b".into(), 0, 0.5, Some(2))]);
    assert_eq!(g.completions[0].reward.as_ref().expect("r").scored_by, "precomputed");
    assert_eq!(groups[1].prompt.messages.len(), 2);
}

#[test]
fn malformed_lines_fail_with_their_line_number_or_are_skipped_and_counted() {
    let dir = tempfile::tempdir().expect("tmp");
    let lines = [
        r#"{"id": "q1", "prompt": "Hi?", "responses": {"a": ["x", "y"]}, "scores": {"a": [1, 2]}}"#,
        r#"{"id": "q2", "prompt": "Hi?", "responses": {"a": ["x", "y"]}, "scores": {"a": [1]}}"#,
        r#"not json"#,
        r#"{"id": "q3", "prompt": 5, "responses": {"a": "x"}}"#,
        r#"{"id": "q4", "prompt": "Ok", "responses": {"a": "x"}, "scores": {"b": 1}}"#,
        r#"{"id": "q5", "prompt": "Ok", "text": "neither layout"}"#,
        r#"{"id": "q1", "prompt": "Hi?", "responses": {"a": ["z"]}}"#,
        r#"{"id": "q6", "prompt": "Ok", "responses": {"a": ["x"]}, "scores": {"a": ["high"]}}"#,
        r#"{"id": "q7", "prompt": "Fine", "responses": {"a": ["x", "y"]}, "scores": {"a": [0.1, 0.2]}}"#,
    ];
    write(dir.path(), "bad.jsonl", &(lines.join("\n") + "\n"));
    let fail = source(dir.path(), &[("path", "bad.jsonl".into())]).expect("source");
    let err = collect(fail.as_ref()).unwrap_err().to_string();
    assert!(err.contains("bad.jsonl:2:") && err.contains("`scores.a` has 1 scores for 2 responses"), "{err}");

    let skip = source(dir.path(), &[("path", "bad.jsonl".into()), ("on_error", "skip".into())]).expect("source");
    let got = collect(skip.as_ref()).expect("collect");
    assert_eq!(got.skipped_records, 7);
    assert_eq!(got.prompts.iter().map(|p| p.id.as_str()).collect::<Vec<_>>(), vec!["q1", "q7"]);
    assert_eq!(got.completions.len(), 4);

    // Each kind of problem, alone, is reported with its line and what was expected.
    for (i, expected) in [
        (2, "invalid JSON"),
        (3, "`prompt`: expected a string or a non-empty list of chat messages"),
        (4, "`scores.b`: no responses from source `b`"),
        (
            5,
            "the record has `id`, `prompt`, `text`; expected `responses` (per-prompt layout), `source` and `response` (flat layout), `chosen` and `rejected` (TRL's preference layout), or `completions` (UltraFeedback's layout)",
        ),
        (6, "prompt `q1` was already given on line 1"),
        (7, "`scores.a[0]`: expected a number or null"),
    ] {
        write(dir.path(), "one.jsonl", &format!("{}\n{}\n", lines[0], lines[i]));
        // A record of neither layout is found when the source is built (`recipe check`), the
        // others when it reads the file.
        let err = match source(dir.path(), &[("path", "one.jsonl".into())]) {
            Ok(s) => collect(s.as_ref()).unwrap_err().to_string(),
            Err(e) => e,
        };
        assert!(err.contains("one.jsonl:2: ") && err.contains(expected), "line {i}: {err}");
    }
}

#[test]
fn duplicate_samples_name_both_lines() {
    let dir = tempfile::tempdir().expect("tmp");
    write(
        dir.path(),
        "dup.jsonl",
        concat!(
            r#"{"prompt_id": "p", "prompt": "Q", "source": "a", "sample_index": 0, "response": "x"}"#,
            "\n",
            r#"{"prompt_id": "p", "prompt": "Q", "source": "a", "sample_index": 0, "response": "y"}"#,
            "\n",
        ),
    );
    let s = source(dir.path(), &[("path", "dup.jsonl".into())]).expect("source");
    let err = collect(s.as_ref()).unwrap_err().to_string();
    assert!(err.contains("dup.jsonl:2:") && err.contains("already given on line 1"), "{err}");
    write(
        dir.path(),
        "clash.jsonl",
        concat!(
            r#"{"prompt_id": "p", "prompt": "Q", "source": "a", "response": "x"}"#,
            "\n",
            r#"{"prompt_id": "p", "prompt": "Other", "source": "a", "response": "y"}"#,
            "\n",
        ),
    );
    let s = source(dir.path(), &[("path", "clash.jsonl".into())]).expect("source");
    let err = collect(s.as_ref()).unwrap_err().to_string();
    assert!(err.contains("clash.jsonl:2:") && err.contains("different messages than on line 1"), "{err}");
}

#[test]
fn missing_file_and_unknown_source_filter_are_reported() {
    let dir = data_dir();
    let err = source(&dir, &[("path", "nope.jsonl".into())]).unwrap_err();
    assert!(err.starts_with("path: no such data file") && err.contains("nope.jsonl"), "{err}");
    let s =
        source(&dir, &[("path", "fusion-mini.jsonl".into()), ("sources", toml::Value::Array(vec!["model-z".into()]))])
            .expect("source");
    let err = collect(s.as_ref()).unwrap_err().to_string();
    assert!(err.contains("source `model-z`") && err.contains("model-a, model-b, model-c"), "{err}");
    let only =
        source(&dir, &[("path", "fusion-mini.jsonl".into()), ("sources", toml::Value::Array(vec!["model-a".into()]))])
            .expect("source");
    assert_eq!(collect(only.as_ref()).expect("collect").completions.len(), 20);
}

#[test]
fn missing_precomputed_score_names_the_record() {
    let dir = tempfile::tempdir().expect("tmp");
    write(
        dir.path(),
        "d.jsonl",
        "{\"id\": \"q\", \"prompt\": \"Hi\", \"responses\": {\"a\": [\"x\", \"y\"]}, \"scores\": {\"a\": [1, null]}}\n",
    );
    let s = source(dir.path(), &[("path", "d.jsonl".into())]).expect("source");
    let mut groups = assemble_groups(vec![collect(s.as_ref()).expect("collect")]).expect("groups");
    let reward = fuserl_builtin::registry()
        .expect("registry")
        .build_reward("precomputed", &toml::Table::new(), &BuildContext::default())
        .expect("reward")
        .component;
    let err = score_groups(reward.as_ref(), &mut groups, 8).unwrap_err().to_string();
    assert!(
        err.contains("prompt `q`, source `a`, sample 1")
            && err.contains("d.jsonl:1")
            && err.contains("no precomputed score"),
        "{err}"
    );
}

#[test]
fn keywords_verifier_reproduces_the_dataset_scores() {
    let dir = data_dir();
    let s = source(&dir, &[("path", "fusion-mini.jsonl".into())]).expect("source");
    let mut groups = assemble_groups(vec![collect(s.as_ref()).expect("collect")]).expect("groups");
    let mut t = toml::Table::new();
    t.insert("path".into(), "fusion-mini-facts.jsonl".into());
    let reward = fuserl_builtin::registry()
        .expect("registry")
        .build_reward("keywords", &t, &BuildContext { base_dir: dir.clone(), ..BuildContext::default() })
        .expect("reward")
        .component;
    score_groups(reward.as_ref(), &mut groups, 16).expect("score");
    let mut n = 0;
    for g in &groups {
        for c in &g.completions {
            let want = c.completion.precomputed_score.expect("precomputed");
            let got = c.reward.as_ref().expect("reward").value;
            // The data file rounds to 4 decimals.
            assert!((got - want).abs() < 5e-5, "{}: {got} vs {want}", c.completion.describe());
            n += 1;
        }
    }
    assert_eq!(n, 60);
}

/// TRL's preference rows (issue #32): a multi-turn answer's earlier turns join the prompt,
/// scores default to 1 (chosen) and 0 (rejected), the recipe's `source` names the answers'
/// source unless a row has one, and rows that cannot be a preference are refused, each with
/// its line and what was expected.
#[test]
fn preference_rows_become_two_scored_answers_of_one_source() {
    let dir = tempfile::tempdir().expect("tmp");
    let turns = r#"[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"}]"#;
    let lines = [
        r#"{"prompt": "Q1", "chosen": "good", "rejected": "bad"}"#.to_owned(),
        format!(
            r#"{{"prompt": {turns}, "chosen": [{{"role": "assistant", "content": "Let me see."}}, {{"role": "user", "content": "Go on"}}, {{"role": "assistant", "content": "4"}}], "rejected": [{{"role": "assistant", "content": "Let me see."}}, {{"role": "user", "content": "Go on"}}, {{"role": "assistant", "content": "5"}}], "score_chosen": 9, "score_rejected": 2.5, "source": "model-x"}}"#
        ),
    ];
    write(dir.path(), "pref.jsonl", &(lines.join("\n") + "\n"));
    let s = source(dir.path(), &[("path", "pref.jsonl".into()), ("source", "ufb".into())]).expect("source");
    let got = collect(s.as_ref()).expect("collect");
    assert_eq!(got.prompts.len(), 2);
    assert_eq!(got.prompts[1].messages.len(), 5, "the multi-turn answer's earlier turns are in the prompt");
    assert_eq!(got.prompts[1].messages[4].content, "Go on");
    let answers: Vec<(&str, u32, &str, Option<f64>)> = got
        .completions
        .iter()
        .map(|c| (c.id.source.as_str(), c.id.sample_index, c.text.as_str(), c.precomputed_score))
        .collect();
    assert_eq!(
        answers,
        vec![
            ("ufb", 0, "good", Some(1.0)),
            ("ufb", 1, "bad", Some(0.0)),
            ("model-x", 0, "4", Some(9.0)),
            ("model-x", 1, "5", Some(2.5))
        ]
    );

    // HuggingFaceH4/ultrafeedback_binarized's rows: a `prompt` string and whole conversations
    // that begin with it; the prompt is not doubled.
    let binarized = r#"{"prompt": "Q?", "prompt_id": "u1", "chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "yes"}], "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "no"}], "score_chosen": 8.0, "score_rejected": 5.0}"#;
    write(dir.path(), "ufb.jsonl", &format!("{binarized}\n"));
    let got = collect(source(dir.path(), &[("path", "ufb.jsonl".into())]).expect("source").as_ref()).expect("collect");
    assert_eq!(got.prompts[0].messages, vec![fuserl_core::data::ChatMessage::user("Q?")]);
    assert_eq!(got.completions.len(), 2);

    for (line, expected) in [
        (
            r#"{"prompt": "Q", "chosen": "a", "rejected": "b", "score_chosen": 1}"#,
            "both `score_chosen` and `score_rejected`",
        ),
        (
            r#"{"chosen": [{"role": "user", "content": "A"}, {"role": "assistant", "content": "x"}], "rejected": [{"role": "user", "content": "B"}, {"role": "assistant", "content": "y"}]}"#,
            "`chosen` and `rejected` differ before their last turn",
        ),
        (
            r#"{"prompt": "Q", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"}"#,
            "must have role `assistant`",
        ),
        (r#"{"chosen": "a", "rejected": "b"}"#, "no prompt"),
    ] {
        write(dir.path(), "bad.jsonl", &format!("{}\n{line}\n", lines[0]));
        let s = source(dir.path(), &[("path", "bad.jsonl".into())]).expect("source");
        let err = collect(s.as_ref()).unwrap_err().to_string();
        assert!(err.contains("bad.jsonl:2: ") && err.contains(expected), "{line}: {err}");
    }
}

/// UltraFeedback's rows (issue #32): each model's completion becomes an answer of the source
/// named by the model, scored by its `overall_score` (else `fine-grained_score`): the per-model
/// ratings become per-source scores.
#[test]
fn ultrafeedback_completions_become_per_source_scored_answers() {
    let dir = tempfile::tempdir().expect("tmp");
    let line = r#"{"source": "evol_instruct", "instruction": "Name a prime.", "models": ["m-a", "m-b"], "completions": [{"model": "m-a", "response": "7", "overall_score": 8.5, "fine-grained_score": 4.0}, {"model": "m-b", "response": "9", "fine-grained_score": 1.5}, {"model": "m-a", "response": "2", "overall_score": 9}]}"#;
    write(dir.path(), "uf.jsonl", &format!("{line}\n"));
    let got = collect(source(dir.path(), &[("path", "uf.jsonl".into())]).expect("source").as_ref()).expect("collect");
    assert_eq!(got.prompts.len(), 1);
    assert_eq!(got.prompts[0].messages[0].content, "Name a prime.");
    let answers: Vec<(&str, u32, &str, Option<f64>)> = got
        .completions
        .iter()
        .map(|c| (c.id.source.as_str(), c.id.sample_index, c.text.as_str(), c.precomputed_score))
        .collect();
    assert_eq!(answers, vec![("m-a", 0, "7", Some(8.5)), ("m-b", 0, "9", Some(1.5)), ("m-a", 1, "2", Some(9.0))]);
    write(
        dir.path(),
        "bad.jsonl",
        &format!("{line}\n{}\n", r#"{"instruction": "Q", "completions": [{"response": "x"}]}"#),
    );
    let err =
        collect(source(dir.path(), &[("path", "bad.jsonl".into())]).expect("source").as_ref()).unwrap_err().to_string();
    assert!(
        err.contains("bad.jsonl:2: ") && err.contains("`completions[0].model`: expected a non-empty string"),
        "{err}"
    );
}
