//! TRL's preference datasets as users have them (fixtures/trl/make_trl_preference.py writes
//! them with Hugging Face `datasets` and checks them with TRL's `is_conversational`): the
//! `jsonl` source reads the standard and conversational formats with an explicit prompt and the
//! implicit-prompt format with scores (UltraFeedback-binarized's shape), and a FusePO-DPO step
//! trains on each, from JSONL and from Parquet; a file in a shape the source does not read is refused by `recipe check`,
//! naming the keys found and the shapes accepted.

use std::path::Path;

use crate::common::{fuserl, repo, text};

fn recipe(out: &Path, data: &Path) -> String {
    format!(
        "schema_version = 1\n[run]\nname = \"trl\"\noutput_dir = \"{}\"\nseed = 1\n[target]\ncheckpoint = \"{}\"\nmax_length = 256\n\
         [[sources]]\nkind = \"jsonl\"\npath = \"{}\"\n[reward]\nkind = \"precomputed\"\n[weighting]\nkind = \"softmax\"\n\
         [sft]\nenabled = false\n[po]\nmax_steps = 1\nbatch_size = 2\n[po.objective]\nkind = \"dpo\"\n[export]\nenabled = false\n",
        out.display(),
        repo().join("checkpoints/tiny-chat").display(),
        data.display()
    )
}

#[test]
fn trl_preference_formats_train_a_fusepo_step() {
    let dir = tempfile::tempdir().expect("tmp");
    for format in ["standard", "conversational", "implicit"].into_iter().flat_map(|f| [(f, "jsonl"), (f, "parquet")]) {
        let (format, ext) = format;
        let data = repo().join("fixtures/trl").join(format!("{format}.{ext}"));
        let format = format!("{format}.{ext}");
        let out = dir.path().join(&format);
        let file = dir.path().join(format!("{format}.toml"));
        std::fs::write(&file, recipe(&out, &data)).expect("write");
        let run = fuserl(&["run", &file.display().to_string()], dir.path());
        assert!(run.status.success(), "{format}: {}", text(&run.stderr));
        assert!(out.join("po/DONE").is_file(), "{format}: no FusePO model");
        // Every pair is (chosen, rejected) of one row: the chosen answer has the higher reward.
        let examples = std::fs::read_to_string(out.join("po/examples.jsonl")).expect("examples");
        let mut pairs = 0;
        for line in examples.lines() {
            let e: serde_json::Value = serde_json::from_str(line).expect("json");
            let seqs = e["sequences"].as_array().expect("sequences");
            assert_eq!(seqs.len(), 2, "{format}: {line}");
            assert!(seqs[0]["reward"].as_f64() > seqs[1]["reward"].as_f64(), "{format}: {line}");
            assert_eq!(seqs[0]["completion"]["source"], "dataset");
            pairs += 1;
        }
        assert!(pairs > 0, "{format}: no pairs");
    }
}

#[test]
fn a_file_in_another_shape_is_refused_by_recipe_check_with_its_keys() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("sharegpt.jsonl");
    std::fs::write(&data, "{\"conversations\": [{\"from\": \"human\", \"value\": \"Hi\"}], \"id\": 1}\n")
        .expect("write");
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, recipe(&dir.path().join("out"), &data)).expect("write");
    let check = fuserl(&["recipe", "check", &file.display().to_string()], dir.path());
    let err = text(&check.stderr);
    assert_eq!(check.status.code(), Some(2), "{err}");
    assert!(
        err.contains(
            "sharegpt.jsonl:1: the record has `conversations`, `id`; expected `responses` (per-prompt layout)"
        ) && err.contains("`chosen` and `rejected` (TRL's preference layout)"),
        "{err}"
    );
}
