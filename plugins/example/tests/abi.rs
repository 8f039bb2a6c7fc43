//! The example plugin through the C ABI, in-process, with the plugin-author test helpers.

use fuserl_abi::testing::{Group, Stats, assert_gradient, objective, plugin_registry, weighting};

#[test]
fn ranking_hinge_through_the_abi() {
    let registry = plugin_registry(fuserl_example::fuserl_plugin_declare).expect("registry");
    let hinge = objective(&registry, "kind = \"ranking-hinge\"\ngamma = 0.5").expect("objective");
    assert!(!hinge.needs_reference());
    // Pair 1: margin -10/5 - (-12/6) = 0 -> hinge 0.5 active; pair 2: margin -2/4 - (-30/5) = 5.5 -> inactive.
    let stats = Stats::pairs(&[(-10.0, 5.0, -12.0, 6.0), (-2.0, 4.0, -30.0, 5.0)]);
    let out = hinge.loss(&stats.batch()).expect("loss");
    assert!((out.loss - 0.25).abs() < 1e-15, "{}", out.loss);
    assert_eq!(out.grad, vec![-0.5 / 5.0, 0.5 / 6.0, 0.0, 0.0]);
    assert_eq!(out.metrics, vec![("hinge/active_fraction".to_owned(), 0.5)]);
    assert_gradient(hinge.as_ref(), &stats, 1e-6);
    let g = Group::new(&[("a", 0.9), ("a", 0.2), ("b", 0.5)]);
    let examples = hinge.build_examples(&g.view()).expect("examples");
    assert_eq!(examples.len(), 1);
    assert_eq!(examples[0].members, vec![0, 1]);
    assert_eq!(examples[0].notes[0].0, "reward_gap");
}

#[test]
fn margin_weighting_through_the_abi() {
    let registry = plugin_registry(fuserl_example::fuserl_plugin_declare).expect("registry");
    let margin = weighting(&registry, "kind = \"margin\"\nmargin = 0.2").expect("weighting");
    let g = Group::new(&[("a", 0.9), ("a", 0.2), ("b", 0.8), ("c", 0.75)]);
    let w = margin.weigh(&g.view()).expect("weigh");
    // max(0, 0.2 - (0.9 - r)): 0.2, 0, 0.1, 0.05 -> / 0.35
    let want = [0.2 / 0.35, 0.0, 0.1 / 0.35, 0.05 / 0.35];
    for (a, b) in w.iter().zip(want) {
        assert!((a - b).abs() < 1e-12, "{w:?}");
    }
}

#[test]
fn configuration_errors_keep_their_key_path() {
    let registry = plugin_registry(fuserl_example::fuserl_plugin_declare).expect("registry");
    let err = weighting(&registry, "kind = \"margin\"\nmargn = 0.2").unwrap_err();
    assert!(err.starts_with("margn: unknown key `margn` (did you mean `margin`?); expected one of: margin"), "{err}");
    let err = weighting(&registry, "kind = \"margin\"\nmargin = -1.0").unwrap_err();
    assert!(err.starts_with("margin: expected a finite number > 0"), "{err}");
}
