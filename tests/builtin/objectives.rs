//! The built-in objectives against golden values from an independent oracle (PyTorch float64
//! with autograd: fixtures/objectives/make_golden.py), and their analytic derivatives against
//! central finite differences.
//!
//! Tolerances: loss and gradient agree with the oracle to 1e-9 relative (both sides compute in
//! f64; the differences are rounding only); finite differences (step 1e-5) agree to 1e-6.

use fuserl_core::extension::{BatchData, ObjectiveBatch, PreferenceObjective};
use fuserl_core::registry::BuildContext;
use serde_json::Value;

const ORACLE_TOL: f64 = 1e-9;
const FD_TOL: f64 = 1e-6;

struct Case {
    name: String,
    objective: Box<dyn PreferenceObjective>,
    kl: bool,
    data: BatchData,
    loss: f64,
    per_example: Vec<f64>,
    grad: Vec<f64>,
}

impl Case {
    fn batch(&self) -> ObjectiveBatch<'_> {
        self.data.batch()
    }
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number")).collect()
}

fn cases() -> Vec<Case> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/objectives/golden.json");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("fixture")).expect("json");
    let registry = fuserl_builtin::registry().expect("registry");
    let ctx = BuildContext::default();
    doc["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| {
            let table = match toml::Value::try_from(&c["objective"]).expect("toml") {
                toml::Value::Table(t) => t,
                _ => panic!("objective is a table"),
            };
            let objective = registry.build_objective_from(&table, &ctx).expect("objective builds").component;
            let b = &c["batch"];
            Case {
                name: c["name"].as_str().expect("name").to_owned(),
                objective,
                kl: c["objective"].get("kl_coef").is_some(),
                data: BatchData {
                    offsets: b["example_offsets"]
                        .as_array()
                        .expect("offsets")
                        .iter()
                        .map(|x| x.as_u64().expect("u64") as usize)
                        .collect(),
                    weights: floats(&b["example_weights"]),
                    policy: floats(&b["policy_logps"]),
                    reference: (!b["reference_logps"].is_null()).then(|| floats(&b["reference_logps"])),
                    tokens: floats(&b["token_counts"]),
                    rewards: floats(&b["rewards"]),
                    normalizer: b["normalizer"].as_f64().expect("normalizer"),
                    progress: b["progress"].as_f64().expect("progress"),
                },
                loss: c["expected"]["loss"].as_f64().expect("loss"),
                per_example: floats(&c["expected"]["per_example_loss"]),
                grad: floats(&c["expected"]["grad"]),
            }
        })
        .collect()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + a.abs().max(b.abs()))
}

#[test]
fn every_objective_matches_the_oracle() {
    let cases = cases();
    assert!(cases.len() >= 19, "fixture has {} cases", cases.len());
    for kind in ["sft", "dpo", "simpo", "rloo", "wrpo"] {
        assert!(cases.iter().any(|c| c.objective.name() == kind), "no golden case for {kind}");
    }
    for case in &cases {
        let out = case.objective.loss(&case.batch()).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        assert!(close(out.loss, case.loss, ORACLE_TOL), "{}: loss {} vs oracle {}", case.name, out.loss, case.loss);
        assert_eq!(out.grad.len(), case.grad.len());
        for (i, (g, want)) in out.grad.iter().zip(&case.grad).enumerate() {
            assert!(close(*g, *want, ORACLE_TOL), "{}: grad[{i}] {g} vs oracle {want}", case.name);
        }
        // Each example alone, weight 1, normaliser 1: the per-example loss.
        for e in 0..case.data.offsets.len() - 1 {
            let range = case.data.offsets[e]..case.data.offsets[e + 1];
            let offsets = [0, range.len()];
            let one = ObjectiveBatch {
                example_offsets: &offsets,
                example_weights: &[1.0],
                policy_logps: &case.data.policy[range.clone()],
                reference_logps: case.data.reference.as_ref().map(|r| &r[range.clone()]),
                token_counts: &case.data.tokens[range.clone()],
                rewards: &case.data.rewards[range.clone()],
                normalizer: 1.0,
                progress: case.data.progress,
            };
            let got = case.objective.loss(&one).expect("loss").loss;
            assert!(
                close(got, case.per_example[e], ORACLE_TOL),
                "{} example {e}: {got} vs {}",
                case.name,
                case.per_example[e]
            );
        }
    }
}

#[test]
#[allow(clippy::approx_constant)] // method.md's published values, to six decimals
fn dpo_reproduces_the_public_vector_and_ln2() {
    let cases = cases();
    let public = cases.iter().find(|c| c.name == "dpo-public-vector").expect("case");
    for (got, want) in public.per_example.iter().zip([0.693147, 0.313262, 0.126928]) {
        assert!((got - want).abs() < 5e-7, "{got} vs {want}");
    }
    // Policy equal to reference: ln 2 per pair, for every sigmoid-family objective and weights
    // that sum to one.
    let same = cases.iter().find(|c| c.name == "dpo-policy-equals-reference").expect("case");
    let out = same.objective.loss(&same.batch()).expect("loss");
    assert!((out.loss - std::f64::consts::LN_2).abs() < 1e-15, "{}", out.loss);
    let wrpo = cases.iter().find(|c| c.name.starts_with("wrpo-")).expect("wrpo case");
    let mut at_ref = wrpo.batch();
    let policy = wrpo.data.reference.clone().expect("reference");
    at_ref.policy_logps = &policy;
    at_ref.normalizer = wrpo.data.weights.iter().sum();
    assert!((wrpo.objective.loss(&at_ref).expect("loss").loss - std::f64::consts::LN_2).abs() < 1e-15);
}

#[test]
fn derivatives_agree_with_finite_differences() {
    for case in cases() {
        if case.kl {
            // With a KL term the advantages depend on logp but are held constant (stop-gradient,
            // as REINFORCE): the oracle's autograd with detach() checks those cases instead.
            continue;
        }
        let out = case.objective.loss(&case.batch()).expect("loss");
        let h = 1e-5;
        for i in 0..case.data.policy.len() {
            let mut shifted = case.data.policy.clone();
            shifted[i] += h;
            let mut b = case.batch();
            b.policy_logps = &shifted;
            let plus = case.objective.loss(&b).expect("loss").loss;
            shifted[i] -= 2.0 * h;
            let mut b = case.batch();
            b.policy_logps = &shifted;
            let minus = case.objective.loss(&b).expect("loss").loss;
            let fd = (plus - minus) / (2.0 * h);
            assert!(
                close(out.grad[i], fd, FD_TOL),
                "{}: grad[{i}] {} vs finite difference {fd}",
                case.name,
                out.grad[i]
            );
        }
    }
}

#[test]
fn malformed_batches_are_named_errors() {
    let cases = cases();
    let dpo = cases.iter().find(|c| c.name == "dpo-public-vector").expect("case");
    let mut b = dpo.batch();
    b.reference_logps = None;
    let err = dpo.objective.loss(&b).unwrap_err().to_string();
    assert!(err.contains("preference objective `dpo`") && err.contains("reference"), "{err}");
    let offsets = [0, 3, 6];
    let mut b = dpo.batch();
    b.example_offsets = &offsets;
    b.example_weights = &[1.0, 1.0];
    let err = dpo.objective.loss(&b).unwrap_err().to_string();
    assert!(err.contains("needs exactly 2"), "{err}");
    let nan = [f64::NAN, -1.0, -1.0, -1.0, -1.0, -1.0];
    let mut b = dpo.batch();
    b.policy_logps = &nan;
    assert!(dpo.objective.loss(&b).unwrap_err().to_string().contains("non-finite"));
}

#[test]
fn extreme_log_probs_stay_finite() {
    let registry = fuserl_builtin::registry().expect("registry");
    let ctx = BuildContext::default();
    let mut t = toml::Table::new();
    t.insert("kind".into(), "dpo".into());
    t.insert("beta".into(), 10.0.into());
    let dpo = registry.build_objective_from(&t, &ctx).expect("dpo").component;
    for (pw, pl) in [(-1e6, -1.0), (-1.0, -1e6)] {
        let b = ObjectiveBatch {
            example_offsets: &[0, 2],
            example_weights: &[1.0],
            policy_logps: &[pw, pl],
            reference_logps: Some(&[0.0, 0.0]),
            token_counts: &[1.0, 1.0],
            rewards: &[0.0, 0.0],
            normalizer: 1.0,
            progress: 0.0,
        };
        let out = dpo.loss(&b).expect("loss");
        assert!(out.loss.is_finite() && out.grad.iter().all(|g| g.is_finite()), "{out:?}");
    }
}
