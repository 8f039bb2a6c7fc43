//! Recipe-level rules that involve several sections, on top of the built-in registry.

use std::path::Path;

use fuserl_core::data::StageName;
use fuserl_recipe::{ReferenceModel, parse_recipe};
use fuserl_run::pipeline::{in_stage, prepare_examples};

const BASE: &str = r#"
schema_version = 1
[target]
checkpoint = "model"
[[sources]]
kind = "jsonl"
path = "fusion-mini.jsonl"
[reward]
kind = "precomputed"
"#;

fn parse(extra: &str) -> Result<fuserl_recipe::LoadedRecipe, String> {
    let registry = fuserl_builtin::registry().expect("registry");
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/recipe.toml");
    parse_recipe(&format!("{BASE}{extra}"), &file, &registry).map_err(|e| e.to_string())
}

#[test]
fn defaults_follow_the_published_settings() {
    let r = parse("").expect("recipe").recipe;
    assert_eq!((r.sft.epochs, r.sft.learning_rate), (Some(3), Some(5e-6)));
    assert_eq!((r.po.epochs, r.po.learning_rate), (Some(1), Some(8e-7)));
    assert_eq!(r.po.reference, Some(ReferenceModel::SftCheckpoint));
    assert_eq!(r.weighting.get("kind").and_then(|k| k.as_str()), Some("softmax"));
    assert_eq!(r.po.objective.as_ref().and_then(|o| o.get("kind")).and_then(|k| k.as_str()), Some("dpo"));
    assert_eq!(r.run.name.as_deref(), Some("recipe"));
    assert_eq!(r.export.path.as_deref(), Some("runs/recipe/export"));
}

#[test]
fn cross_section_rules() {
    let err = parse("[po]\nwarmup_ratio = 0.1\nwarmup_steps = 10\n").unwrap_err();
    assert!(err.contains(":12:1: po.warmup_steps: give either warmup_ratio or warmup_steps, not both"), "{err}");
    // Issue 18: without FuseSFT the reference defaults to the model FusePO starts from.
    let err = parse("[sft]\nenabled = false\n[po]\nreference = \"sft-checkpoint\"\n").unwrap_err();
    assert!(
        err.contains("po.reference: objective `dpo` compares against the FuseSFT checkpoint, but [sft] is disabled"),
        "{err}"
    );
    assert!(parse("[sft]\nenabled = false\n").is_ok());
    assert!(parse("[sft]\nenabled = false\n[po]\nreference = \"target\"\n").is_ok());
    let simpo = "[sft]\nenabled = false\n[po]\nreference = \"sft-checkpoint\"\n[po.objective]\nkind = \"simpo\"\n";
    assert!(parse(simpo).is_ok(), "SimPO has no reference model");
    let err = parse("[sft.objective]\nkind = \"dpo\"\n").unwrap_err();
    assert!(err.contains("sft.objective.kind: objective `dpo` needs a reference model"), "{err}");
    let err = parse("[sft]\nreference = \"target\"\n").unwrap_err();
    assert!(err.contains("sft.reference: only [po] has a reference model"), "{err}");
    let err = parse("[data]\npo_fraction = 0.3\n").unwrap_err();
    assert!(err.contains("data.po_fraction: only meaningful with split = \"disjoint\""), "{err}");
    let err = parse("[po.objective]\nkind = \"dpo\"\n[po.objective.pairs]\nstrategy = \"per-prompt\"\n").unwrap_err();
    assert!(err.contains("po.objective.pairs.strategy: unknown value `per-prompt`; expected one of: per-source, same-source-window, best-of-all"), "{err}");
    let err = parse("[weighting]\ntemperature = 0.5\n").unwrap_err();
    assert!(err.contains("weighting.kind: missing required key `kind`"), "{err}");
}

#[test]
fn disjoint_split_sends_each_prompt_to_one_stage() {
    let loaded = parse("[data]\nsplit = \"disjoint\"\npo_fraction = 0.3\n").expect("recipe");
    let data = &loaded.recipe.data;
    let ids: Vec<String> = (0..2000).map(|i| format!("prompt-{i}")).collect();
    let po = ids.iter().filter(|id| in_stage(data, 42, id, StageName::Po)).count();
    for id in &ids {
        assert_ne!(in_stage(data, 42, id, StageName::Po), in_stage(data, 42, id, StageName::Sft));
    }
    assert!((500..700).contains(&po), "{po} of 2000 prompts went to po with po_fraction 0.3");
    let (sft, _) = prepare_examples(&loaded, StageName::Sft).expect("sft");
    let (po, _) = prepare_examples(&loaded, StageName::Po).expect("po");
    let sft_prompts: std::collections::BTreeSet<_> = sft.iter().map(|e| e.prompt_id.clone()).collect();
    assert!(po.iter().all(|e| !sft_prompts.contains(&e.prompt_id)));
}

#[test]
fn sft_examples_carry_the_weighting() {
    let loaded = parse("[weighting]\nkind = \"best-only\"\n").expect("recipe");
    let (examples, stats) = prepare_examples(&loaded, StageName::Sft).expect("sft");
    // Best-only over 10 prompts: one example of weight 1 per prompt, except two prompts whose
    // best reward is tied between two sources (photosynthesis, sqrt-144): two of weight 1/2.
    assert_eq!(stats.prompts, 10);
    assert_eq!(examples.len(), 12);
    assert!(examples.iter().all(|e| e.sequences.len() == 1));
    for tied in ["photosynthesis", "sqrt-144"] {
        let w: Vec<f64> = examples.iter().filter(|e| e.prompt_id == tied).map(|e| e.weight).collect();
        assert_eq!(w, vec![0.5, 0.5], "{tied}");
    }
    assert_eq!(examples.iter().filter(|e| e.weight == 1.0).count(), 8);
    let capital = examples.iter().find(|e| e.prompt_id == "capital-france").expect("example");
    assert_eq!(capital.sequences[0].completion.source, "model-a");
    assert_eq!(capital.sequences[0].completion.sample_index, 1);
}
