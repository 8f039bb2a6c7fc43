//! Weighting schemes: limits, normalisation and robustness (method.md, issue #2).

use fuserl_core::extension::GroupData;
use fuserl_core::extension::WeightingScheme;
use fuserl_core::registry::BuildContext;

fn scheme(kind: &str, keys: &[(&str, toml::Value)]) -> Box<dyn WeightingScheme> {
    let mut t = toml::Table::new();
    t.insert("kind".into(), kind.into());
    for (k, v) in keys {
        t.insert((*k).into(), v.clone());
    }
    let registry = fuserl_builtin::registry().expect("registry");
    registry.build_weighting_from(&t, &BuildContext::default()).unwrap_or_else(|e| panic!("{kind}: {e}")).component
}

/// Three sources with two, three and one samples.
fn group(rewards: &[f64]) -> GroupData {
    let sources = ["a", "a", "b", "b", "b", "c"];
    assert_eq!(rewards.len(), sources.len());
    let items: Vec<(&str, f64)> = sources.iter().copied().zip(rewards.iter().copied()).collect();
    GroupData::new(&items)
}

fn assert_distribution(w: &[f64]) {
    assert!(w.iter().all(|x| x.is_finite() && *x >= 0.0), "{w:?}");
    assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12, "{w:?} sums to {}", w.iter().sum::<f64>());
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

const REWARDS: [f64; 6] = [0.10, 0.35, 0.20, 0.05, 0.30, 0.25];

#[test]
fn softmax_matches_the_formula() {
    // Per-source bests: a -> 0.35 (index 1), b -> 0.30 (index 4), c -> 0.25 (index 5).
    let g = group(&REWARDS);
    let w = scheme("softmax", &[("temperature", 0.1.into()), ("normalize", "none".into())])
        .weigh(&g.view())
        .expect("weigh");
    let e: Vec<f64> = [0.35f64, 0.30, 0.25].iter().map(|r| (r / 0.1).exp()).collect();
    let z: f64 = e.iter().sum();
    let want = [0.0, e[0] / z, 0.0, 0.0, e[1] / z, e[2] / z];
    assert!(max_abs_diff(&w, &want) < 1e-15, "{w:?} vs {want:?}");
    // All samples as candidates, z-scored.
    let w = scheme("softmax", &[("candidates", "all".into())]).weigh(&g.view()).expect("weigh");
    let mean = REWARDS.iter().sum::<f64>() / 6.0;
    let std = (REWARDS.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / 6.0).sqrt();
    let e: Vec<f64> = REWARDS.iter().map(|r| ((r - mean) / std).exp()).collect();
    let z: f64 = e.iter().sum();
    for (got, e) in w.iter().zip(&e) {
        assert!((got - e / z).abs() < 1e-12);
    }
}

#[test]
fn softmax_tends_to_best_only_as_temperature_falls_and_to_uniform_as_it_rises() {
    let g = group(&REWARDS);
    let best = scheme("best-only", &[]).weigh(&g.view()).expect("weigh");
    let uniform = scheme("uniform", &[]).weigh(&g.view()).expect("weigh");
    let mut last_to_best = f64::INFINITY;
    let mut last_to_uniform = 0.0;
    for t in [10.0, 1.0, 0.1, 0.01, 1e-3, 1e-6] {
        let w = scheme("softmax", &[("temperature", t.into())]).weigh(&g.view()).expect("weigh");
        assert_distribution(&w);
        let d = max_abs_diff(&w, &best);
        assert!(d <= last_to_best, "distance to best-only grew at t={t}");
        last_to_best = d;
        let u = max_abs_diff(&w, &uniform);
        assert!(u >= last_to_uniform, "distance to uniform shrank at t={t}");
        last_to_uniform = u;
    }
    assert!(last_to_best < 1e-12, "{last_to_best}");
    let hot = scheme("softmax", &[("temperature", 1e9.into())]).weigh(&g.view()).expect("weigh");
    assert!(max_abs_diff(&hot, &uniform) < 1e-8, "{hot:?}");
    // With every sample a candidate, the limits are best-of-all and uniform over all.
    let all_uniform = scheme("uniform", &[("candidates", "all".into())]).weigh(&g.view()).expect("weigh");
    let hot_all = scheme("softmax", &[("temperature", 1e9.into()), ("candidates", "all".into())])
        .weigh(&g.view())
        .expect("weigh");
    assert!(max_abs_diff(&hot_all, &all_uniform) < 1e-8);
}

#[test]
fn weights_are_finite_and_sum_to_one_for_equal_huge_and_tiny_rewards() {
    let cases: [[f64; 6]; 5] = [
        [0.5; 6],
        [1e300, -1e300, 1e300, 0.0, -1e308, 1e308],
        [1e-300, 2e-300, 0.0, -1e-300, 5e-324, 0.0],
        [f64::MAX, f64::MIN, 0.0, 1.0, -1.0, f64::MAX],
        [3.0, 3.0, 3.0, 3.0, 3.0, 2.0],
    ];
    let schemes = [
        scheme("softmax", &[]),
        scheme("softmax", &[("temperature", 1e-300.into()), ("normalize", "none".into())]),
        scheme(
            "softmax",
            &[("temperature", 1e300.into()), ("normalize", "minmax".into()), ("candidates", "all".into())],
        ),
        scheme("best-only", &[]),
        scheme("uniform", &[("candidates", "all".into())]),
        scheme("rank", &[]),
        scheme("rank", &[("exponent", 3.0.into()), ("candidates", "all".into())]),
    ];
    for rewards in cases {
        let g = group(&rewards);
        for s in &schemes {
            let w = s.weigh(&g.view()).unwrap_or_else(|e| panic!("{}: {e}", s.name()));
            assert_distribution(&w);
        }
    }
    // Equal rewards: every scheme is uniform over its candidates.
    let g = group(&[0.5; 6]);
    for s in &schemes[..3] {
        let w = s.weigh(&g.view()).expect("weigh");
        let nonzero: Vec<f64> = w.iter().copied().filter(|x| *x > 0.0).collect();
        assert!(nonzero.iter().all(|x| (x - nonzero[0]).abs() < 1e-15), "{}: {w:?}", s.name());
    }
}

#[test]
fn ties_share_the_mass() {
    let g = group(&[1.0, 0.0, 1.0, 0.0, 0.0, 0.5]);
    let w = scheme("best-only", &[]).weigh(&g.view()).expect("weigh");
    assert_eq!(w, vec![0.5, 0.0, 0.5, 0.0, 0.0, 0.0]);
    let w = scheme("softmax", &[("temperature", 1e-9.into())]).weigh(&g.view()).expect("weigh");
    assert_eq!(w, vec![0.5, 0.0, 0.5, 0.0, 0.0, 0.0]);
}

#[test]
fn rank_weights_follow_average_ranks() {
    let g = group(&[0.1, 0.4, 0.4, 0.2, 0.3, 0.0]);
    let w = scheme("rank", &[("candidates", "all".into())]).weigh(&g.view()).expect("weigh");
    // ranks ascending: 0.0->1, 0.1->2, 0.2->3, 0.3->4, 0.4,0.4 -> 5.5 each; total 21
    let want = [2.0, 5.5, 5.5, 3.0, 4.0, 1.0].map(|r| r / 21.0);
    assert!(max_abs_diff(&w, &want) < 1e-15, "{w:?}");
}

#[test]
fn missing_rewards_are_errors_that_name_the_record() {
    use fuserl_core::data::{Completion, CompletionId, Origin, Prompt, ScoredCompletion, ScoredGroup};
    let completion = |source: &str, i: u32| Completion {
        id: CompletionId { prompt_id: "q7".into(), source: source.into(), sample_index: i },
        text: "answer".into(),
        sampling: Default::default(),
        origin: Origin { adapter: "jsonl".into(), file: Some("data.jsonl".into()), line: Some(7) },
        precomputed_score: None,
    };
    let group = ScoredGroup {
        prompt: Prompt::from_messages(vec![fuserl_core::data::ChatMessage::user("hi")]),
        completions: vec![
            ScoredCompletion {
                completion: completion("a", 0),
                reward: Some(fuserl_core::data::Reward { value: 1.0, scored_by: "x".into() }),
            },
            ScoredCompletion { completion: completion("b", 1), reward: None },
        ],
    };
    let err = fuserl_run::pipeline::weigh_group(scheme("softmax", &[]).as_ref(), group).unwrap_err().to_string();
    assert!(err.contains("prompt `q7`, source `b`, sample 1") && err.contains("data.jsonl:7"), "{err}");
    assert!(err.contains("no reward"), "{err}");
}

#[test]
fn bad_settings_are_refused() {
    let registry = fuserl_builtin::registry().expect("registry");
    let ctx = BuildContext::default();
    for (kind, key, value) in [
        ("softmax", "temperature", toml::Value::from(0.0)),
        ("softmax", "temperature", toml::Value::from(-1.0)),
        ("softmax", "normalize", toml::Value::from("l2")),
        ("rank", "exponent", toml::Value::from(-2.0)),
        ("best-only", "temperature", toml::Value::from(1.0)),
    ] {
        let mut t = toml::Table::new();
        t.insert("kind".into(), kind.into());
        t.insert(key.into(), value);
        let err = registry.build_weighting_from(&t, &ctx).expect_err(kind).to_string();
        assert!(err.contains(key), "{kind}.{key}: {err}");
    }
}
