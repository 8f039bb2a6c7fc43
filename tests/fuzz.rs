//! Every fuzz target on its seeds and on every committed finding (`fuzz/regressions/TARGET/`):
//! none may panic, and each target must accept at least one of its seeds (so that the fuzzer
//! starts past the parser's first error, and a harness that lost its way fails here).

use fuserl_fuzz::{TARGETS, regression_files, seed_files};

#[test]
fn every_target_accepts_a_seed_and_survives_all_of_them() {
    for target in TARGETS {
        let seeds = seed_files(target);
        assert!(!seeds.is_empty(), "target `{}` has no seeds ({:?})", target.name, target.seeds);
        let mut accepted = 0;
        for seed in &seeds {
            let data = std::fs::read(seed).unwrap_or_else(|e| panic!("{}: {e}", seed.display()));
            accepted += usize::from((target.run)(&data));
        }
        assert!(accepted > 0, "target `{}` accepted none of its {} seeds", target.name, seeds.len());
    }
}

#[test]
fn every_committed_finding_is_refused_without_a_crash() {
    for target in TARGETS {
        for file in regression_files(target) {
            let data = std::fs::read(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            // A finding was a crash, hang or unbounded allocation; now it must come back.
            let _ = (target.run)(&data);
        }
    }
}

/// The Parquet files on which the `parquet` crate panics (found by the `parquet` target) are
/// refused with an error that names the file.
#[test]
fn parquet_findings_are_named_errors() {
    let target = fuserl_fuzz::target("parquet").expect("target");
    let dir = tempfile::tempdir().expect("tmp");
    let findings = regression_files(target);
    assert!(!findings.is_empty());
    for finding in findings {
        let file = dir.path().join("prompts.parquet");
        std::fs::copy(&finding, &file).expect("copy");
        let err = fuserl_io::prompts::read_prompts(&file).expect_err("refused").to_string();
        assert!(err.contains("prompts.parquet") && err.contains("not a readable Parquet file"), "{err}");
    }
}

/// The tokenizer.json files on which the `tokenizers` crate panics (found by the `tokenizer`
/// target) are refused with an error that names the file.
#[test]
fn tokenizer_findings_are_named_errors() {
    let target = fuserl_fuzz::target("tokenizer").expect("target");
    let findings = regression_files(target);
    assert!(!findings.is_empty());
    for finding in findings {
        let dir = tempfile::tempdir().expect("tmp");
        let tiny = fuserl_fuzz::repo_root().join("checkpoints/tiny-chat");
        for f in ["tokenizer_config.json", "config.json"] {
            std::fs::copy(tiny.join(f), dir.path().join(f)).expect("copy");
        }
        std::fs::copy(&finding, dir.path().join("tokenizer.json")).expect("copy");
        let err = fuserl_model::chat::ChatTokenizer::load(dir.path(), None).expect_err("refused").to_string();
        assert!(err.contains("tokenizer.json: not"), "{}: {err}", finding.display());
    }
}

/// The tokenizer folders the structure-aware target found (a SentencePiece charsmap declaring a
/// trie of gigabytes; a `Prepend` of 35,000 characters, applied to every normalised added token
/// before the crate builds its automaton of them, which took minutes; Unigram vocabularies with
/// entries of 40,000 characters and more, whose trie overflowed the stack when dropped, or made
/// encoding take seconds) are refused at once with an error naming tokenizer.json and the place.
#[test]
fn structured_tokenizer_findings_are_named_errors() {
    let target = fuserl_fuzz::target("tokenizer-structured").expect("target");
    let findings = regression_files(target);
    assert!(!findings.is_empty());
    let mut refused = 0;
    for finding in &findings {
        let dir = tempfile::tempdir().expect("tmp");
        let data = std::fs::read(finding).expect("read");
        for (name, content) in fuserl_fuzz::expand(target.name, &data).expect("a structured target") {
            std::fs::write(dir.path().join(name), content).expect("write");
        }
        let tiny = fuserl_fuzz::repo_root().join("checkpoints/tiny-chat");
        std::fs::copy(tiny.join("config.json"), dir.path().join("config.json")).expect("copy");
        let t0 = std::time::Instant::now();
        // Findings of the later steps (rendering, encoding) load: replayed by the test above.
        let Err(err) = fuserl_model::chat::ChatTokenizer::load(dir.path(), None) else { continue };
        let err = err.to_string();
        refused += 1;
        assert!(t0.elapsed().as_secs() < 2, "{}: took {:?}", finding.display(), t0.elapsed());
        let named = (err.contains("tokenizer.json: normalizer")
            && (err.contains("precompiled_charsmap declares a trie of") || err.contains("characters; at most 256")))
            || err.contains("tokenizer.json: model.vocab: an entry of");
        assert!(named, "{}: {err}", finding.display());
    }
    // (The others are findings of rendering and encoding, which the replay above runs.)
    assert!(refused > 0, "none of the {} findings refused when loaded", findings.len());
}
