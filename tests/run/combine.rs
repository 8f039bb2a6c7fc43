//! `combine` in a recipe: a gate (the keyword verifier's pass mark) times a weighted sum (the
//! data's precomputed scores), each part built through the registry; errors in a part name its
//! place in the recipe.

use std::path::Path;

use fuserl_core::registry::BuildContext;
use fuserl_recipe::parse_recipe;
use fuserl_run::pipeline::{assemble_groups, score_groups};

const RECIPE: &str = r#"
schema_version = 1
[target]
checkpoint = "model"
[[sources]]
kind = "jsonl"
path = "fusion-mini.jsonl"
[reward]
kind = "combine"
[[reward.parts]]
name = "facts"
gate = true
threshold = 0.3
[reward.parts.reward]
kind = "keywords"
path = "fusion-mini-facts.jsonl"
[[reward.parts]]
name = "given"
weight = 2.0
[reward.parts.reward]
kind = "precomputed"
"#;

fn data() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data")
}

fn parse(text: &str) -> Result<fuserl_recipe::LoadedRecipe, String> {
    let registry = fuserl_builtin::registry().expect("registry");
    parse_recipe(text, &data().join("recipe.toml"), &registry).map_err(|e| e.to_string())
}

#[test]
fn a_gate_times_a_weighted_sum() {
    let loaded = parse(RECIPE).expect("recipe");
    let collected = loaded.components.sources[0]
        .collect(&fuserl_core::extension::CollectRequest {
            prompts: &[],
            samples_per_prompt: 1,
            sampling: &Default::default(),
        })
        .expect("collect");
    let mut groups = assemble_groups(vec![collected]).expect("groups");
    let mut by_keywords = groups.clone();
    score_groups(loaded.components.reward.as_ref(), &mut groups, 4).expect("score");
    let mut t = toml::Table::new();
    t.insert("path".into(), "fusion-mini-facts.jsonl".into());
    let keywords = fuserl_builtin::registry()
        .expect("registry")
        .build_reward("keywords", &t, &BuildContext { base_dir: data(), ..BuildContext::default() })
        .expect("keywords")
        .component;
    score_groups(keywords.as_ref(), &mut by_keywords, 4).expect("score");
    let (mut gated, mut passed) = (0, 0);
    for (g, k) in groups.iter().zip(&by_keywords) {
        for (c, kc) in g.completions.iter().zip(&k.completions) {
            let facts = kc.reward.as_ref().expect("scored").value;
            let given = c.completion.precomputed_score.expect("precomputed");
            let want = if facts >= 0.3 { 2.0 * given } else { 0.0 };
            let got = c.reward.as_ref().expect("scored");
            assert!((got.value - want).abs() < 1e-12, "{}: {} vs {want}", c.completion.describe(), got.value);
            assert!(got.scored_by.starts_with("combine(facts=keywords,given=precomputed"), "{}", got.scored_by);
            if facts >= 0.3 { passed += 1 } else { gated += 1 }
        }
    }
    assert!(gated > 0 && passed > 0, "both sides of the gate: {gated} gated, {passed} passed");
}

#[test]
fn a_bad_part_is_named_by_its_place() {
    let err = parse(&RECIPE.replace("path = \"fusion-mini-facts.jsonl\"", "path = \"missing.jsonl\"")).unwrap_err();
    assert!(err.contains("reward.parts[0].reward.path: cannot read"), "{err}");
    let err = parse(&RECIPE.replace("kind = \"precomputed\"", "kind = \"nope\"")).unwrap_err();
    assert!(err.contains("reward.parts[1].reward.kind") && err.contains("nope"), "{err}");
    let err = parse(&RECIPE.replace("name = \"given\"", "name = \"facts\"")).unwrap_err();
    assert!(err.contains("reward.parts[1].name: a second part named `facts`"), "{err}");
}
