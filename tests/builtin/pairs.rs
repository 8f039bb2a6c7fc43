//! Example construction (method.md): per-source pairs with a minimum gap and per-source
//! weights, FuseChat-3.0's same-source pair with a gap window, best-of-all, WRPO triplets and
//! RLOO groups.

use fuserl_builtin::pairs::{PairConfig, PairStrategy, PairWeights};
use fuserl_core::extension::GroupData;
use fuserl_core::extension::PreferenceObjective;
use fuserl_core::registry::BuildContext;

/// Sources a (3 samples), b (2), c (1), target (3).
fn group() -> GroupData {
    GroupData::new(&[
        ("a", 0.9),
        ("a", 0.2),
        ("a", 0.5),
        ("b", 0.7),
        ("b", 0.65),
        ("c", 0.99),
        ("target", 0.4),
        ("target", 0.1),
        ("target", 0.3),
    ])
}

#[test]
fn per_source_pairs_take_each_sources_best_and_worst() {
    let mut g = group();
    // Weights as a softmax over per-source bests would give: on a's best, b's best, c, target's best.
    g.weights = vec![0.4, 0.0, 0.0, 0.3, 0.0, 0.1, 0.2, 0.0, 0.0];
    let pairs = PairConfig::default().build(&g.view()).expect("pairs");
    let members: Vec<Vec<usize>> = pairs.iter().map(|p| p.members.clone()).collect();
    assert_eq!(members, vec![vec![0, 1], vec![3, 4], vec![6, 7]]);
    let total = 0.4 + 0.3 + 0.2;
    let weights: Vec<f64> = pairs.iter().map(|p| p.weight).collect();
    assert_eq!(weights, vec![0.4 / total, 0.3 / total, 0.2 / total]);
    assert!((pairs[0].notes[0].1 - 0.7).abs() < 1e-12);
}

#[test]
fn min_gap_drops_pairs_and_weights_renormalise() {
    let mut g = group();
    g.weights = vec![0.4, 0.0, 0.0, 0.3, 0.0, 0.1, 0.2, 0.0, 0.0];
    let config = PairConfig { min_gap: 0.1, ..PairConfig::default() };
    let pairs = config.build(&g.view()).expect("pairs");
    // b's gap is 0.05 < 0.1: dropped.
    assert_eq!(pairs.iter().map(|p| p.members.clone()).collect::<Vec<_>>(), vec![vec![0, 1], vec![6, 7]]);
    assert!((pairs.iter().map(|p| p.weight).sum::<f64>() - 1.0).abs() < 1e-15);
    let uniform = PairConfig { weights: PairWeights::Uniform, ..config.clone() }.build(&g.view()).expect("pairs");
    assert!(uniform.iter().all(|p| p.weight == 0.5));
    let gaps = PairConfig { weights: PairWeights::GapSoftmax, tau: 0.5, ..config }.build(&g.view()).expect("pairs");
    let (a, t) = ((0.7f64 / 0.5).exp(), (0.3f64 / 0.5).exp());
    assert!((gaps[0].weight - a / (a + t)).abs() < 1e-12);
}

#[test]
fn fusechat_window_keeps_one_same_source_pair() {
    let g = group();
    // Gaps: a 0.7, b 0.05, target 0.3. Window [0.01, 0.1] keeps only b.
    let pairs = PairConfig::fusechat3().build(&g.view()).expect("pairs");
    assert_eq!(pairs.len(), 1);
    assert_eq!(pairs[0].members, vec![3, 4]);
    assert_eq!(pairs[0].weight, 1.0);
    // A wider window keeps a, b and target; the pair whose chosen reward is highest wins (a: 0.9).
    let wide = PairConfig { max_gap: Some(1.0), ..PairConfig::fusechat3() };
    assert_eq!(wide.build(&g.view()).expect("pairs")[0].members, vec![0, 1]);
    // No source in the window: no example.
    let none = PairConfig {
        strategy: PairStrategy::SameSourceWindow,
        min_gap: 0.8,
        max_gap: Some(0.9),
        ..PairConfig::default()
    };
    assert!(none.build(&g.view()).expect("pairs").is_empty());
}

#[test]
fn best_of_all_pairs_the_global_extremes() {
    let g = group();
    let pairs =
        PairConfig { strategy: PairStrategy::BestOfAll, ..PairConfig::default() }.build(&g.view()).expect("pairs");
    assert_eq!(pairs.len(), 1);
    assert_eq!(pairs[0].members, vec![5, 7]);
}

#[test]
fn equal_rewards_make_no_pair() {
    let mut g = group();
    g.rewards = vec![0.5; 9];
    g.weights = vec![1.0 / 9.0; 9];
    for strategy in [PairStrategy::PerSource, PairStrategy::SameSourceWindow, PairStrategy::BestOfAll] {
        let c = PairConfig { strategy, max_gap: None, ..PairConfig::default() };
        assert!(c.build(&g.view()).expect("pairs").is_empty(), "{strategy:?}");
    }
}

fn objective(kind: &str, keys: &[(&str, toml::Value)]) -> Box<dyn PreferenceObjective> {
    let mut t = toml::Table::new();
    t.insert("kind".into(), kind.into());
    for (k, v) in keys {
        t.insert((*k).into(), v.clone());
    }
    fuserl_builtin::registry()
        .expect("registry")
        .build_objective_from(&t, &BuildContext::default())
        .unwrap_or_else(|e| panic!("{kind}: {e}"))
        .component
}

#[test]
fn wrpo_builds_source_best_target_best_target_worst() {
    let g = group();
    let ex = objective("wrpo", &[]).build_examples(&g.view()).expect("examples");
    assert_eq!(ex.len(), 1);
    // Best non-target: c's 0.99 (index 5); target best 0.4 (6), worst 0.1 (7).
    assert_eq!(ex[0].members, vec![5, 6, 7]);
    let other = objective("wrpo", &[("target_source", "nobody".into())]).build_examples(&g.view()).expect("examples");
    assert!(other.is_empty());
}

#[test]
fn rloo_groups_all_samples_or_per_source_bests() {
    let g = group();
    let all = objective("rloo", &[]).build_examples(&g.view()).expect("examples");
    assert_eq!(all[0].members, (0..9).collect::<Vec<_>>());
    let bests = objective("rloo", &[("group", "per-source-best".into())]).build_examples(&g.view()).expect("examples");
    assert_eq!(bests[0].members, vec![0, 3, 5, 6]);
    let own = objective("rloo", &[("sources", toml::Value::Array(vec!["target".into()]))])
        .build_examples(&g.view())
        .expect("examples");
    assert_eq!(own[0].members, vec![6, 7, 8]);
}

#[test]
fn sft_examples_are_the_weighted_candidates() {
    let mut g = group();
    g.weights = vec![0.5, 0.0, 0.0, 0.25, 0.0, 0.25, 0.0, 0.0, 0.0];
    let ex = objective("sft", &[]).build_examples(&g.view()).expect("examples");
    assert_eq!(ex.iter().map(|e| (e.members[0], e.weight)).collect::<Vec<_>>(), vec![(0, 0.5), (3, 0.25), (5, 0.25)]);
}
