//! run/src/stats.rs against numpy and statsmodels on fixed data (fixtures/stats/make_stats.py):
//! pass@k to 1e-12, the bootstrap interval within 0.005 (the Monte-Carlo error of either side),
//! the length-controlled win rate within 1e-8 (the same maximum-likelihood fit).

use fuserl_run::stats::{bootstrap_mean, length_controlled_win_rate, pass_at_k};

fn oracle() -> serde_json::Value {
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/stats/stats.json");
    serde_json::from_str(&std::fs::read_to_string(file).expect("fixture")).expect("json")
}

#[test]
fn pass_at_k_matches_the_papers_estimator() {
    let doc = oracle();
    let cases = doc["pass_at_k"].as_array().expect("cases");
    assert!(cases.len() > 40);
    for c in cases {
        let n = c[0].as_u64().expect("n");
        let (passed, k, want) = (c[1].as_u64().expect("c"), c[2].as_u64().expect("k"), c[3].as_f64().expect("v"));
        let got = pass_at_k(n, passed, k);
        assert!((got - want).abs() < 1e-12, "pass@{k} n={n} c={passed}: {got} vs {want}");
    }
}

#[test]
fn the_bootstrap_interval_matches_numpys() {
    let doc = oracle();
    let b = &doc["bootstrap"];
    let values: Vec<f64> = serde_json::from_value(b["values"].clone()).expect("values");
    let e = bootstrap_mean(&values, 200_000, 0.95, 7);
    assert!((e.mean - b["mean"].as_f64().expect("mean")).abs() < 1e-12);
    assert!((e.low - b["low"].as_f64().expect("low")).abs() < 0.005, "{e:?} vs {b}");
    assert!((e.high - b["high"].as_f64().expect("high")).abs() < 0.005, "{e:?} vs {b}");
    assert_eq!(e.n, values.len());
}

#[test]
fn the_length_controlled_win_rate_matches_statsmodels() {
    let doc = oracle();
    let w = &doc["lc_win_rate"];
    let outcomes: Vec<f64> = serde_json::from_value(w["outcomes"].clone()).expect("outcomes");
    let diff: Vec<f64> = serde_json::from_value(w["length_difference"].clone()).expect("diff");
    let lc = length_controlled_win_rate(&outcomes, &diff).expect("converges");
    let want = w["lc"].as_f64().expect("lc");
    assert!((lc - want).abs() < 1e-8, "{lc} vs {want}");
    // Every comparison won: the fit has no finite answer.
    assert_eq!(length_controlled_win_rate(&[1.0, 1.0, 1.0], &[1.0, 2.0, 3.0]), None);
}
