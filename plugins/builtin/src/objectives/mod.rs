//! Preference objectives: each builds its examples from a weighted group and, for a batch of
//! per-sequence statistics, returns `L = sum_e w_e * loss_e / normalizer` and
//! `dL / d policy_logp` for every sequence (method.md). The maths are pure functions on `f64`,
//! checked against a PyTorch autograd oracle (`fixtures/objectives/`).

pub mod dpo;
pub mod rloo;
pub mod sft;
pub mod simpo;
pub mod wrpo;

use fuserl_core::extension::{LossOutput, ObjectiveBatch};
use fuserl_core::{Error, Result};

/// How many sequences each example of an objective has.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arity {
    Exactly(usize),
    AtLeast(usize),
}

/// Check a batch's layout and values before any maths, so that a trainer bug is named instead
/// of turning into NaN.
pub(crate) fn validate_batch(name: &str, b: &ObjectiveBatch<'_>, arity: Arity, needs_reference: bool) -> Result<()> {
    let fail = |message: String| Error::Component { point: "preference objective", name: name.to_owned(), message };
    let n = b.policy_logps.len();
    if b.example_offsets.first() != Some(&0) || b.example_offsets.last() != Some(&n) {
        return Err(fail(format!("example offsets must start at 0 and end at {n} (the number of sequences)")));
    }
    if b.example_offsets.windows(2).any(|w| w[1] < w[0]) {
        return Err(fail("example offsets must not decrease".into()));
    }
    if b.example_weights.len() != b.num_examples() {
        return Err(fail(format!("{} example weights for {} examples", b.example_weights.len(), b.num_examples())));
    }
    if b.token_counts.len() != n || b.rewards.len() != n {
        return Err(fail(format!(
            "{n} policy log-probs but {} token counts and {} rewards",
            b.token_counts.len(),
            b.rewards.len()
        )));
    }
    for e in 0..b.num_examples() {
        let len = b.example(e).len();
        let ok = match arity {
            Arity::Exactly(k) => len == k,
            Arity::AtLeast(k) => len >= k,
        };
        if !ok {
            let want = match arity {
                Arity::Exactly(k) => format!("exactly {k}"),
                Arity::AtLeast(k) => format!("at least {k}"),
            };
            return Err(fail(format!("example {e} has {len} sequences; this objective needs {want}")));
        }
    }
    match (needs_reference, b.reference_logps) {
        (true, None) => return Err(fail("needs reference log-probs, and the batch has none".into())),
        (_, Some(r)) if r.len() != n => {
            return Err(fail(format!("{} reference log-probs for {n} sequences", r.len())));
        }
        _ => {}
    }
    let all = b.policy_logps.iter().chain(b.reference_logps.unwrap_or(&[])).chain(b.rewards).chain(b.example_weights);
    if let Some(v) = all.clone().find(|v| !v.is_finite()) {
        return Err(fail(format!("got the non-finite input {v}")));
    }
    if let Some(t) = b.token_counts.iter().find(|t| !(t.is_finite() && **t >= 1.0)) {
        return Err(fail(format!("got a sequence with {t} tokens; every sequence needs at least one")));
    }
    if !(b.normalizer.is_finite() && b.normalizer > 0.0) {
        return Err(fail(format!("normalizer must be > 0, got {}", b.normalizer)));
    }
    if !(0.0..=1.0).contains(&b.progress) {
        return Err(fail(format!("progress must be in [0, 1], got {}", b.progress)));
    }
    Ok(())
}

/// Accumulates the loss, gradient and metrics of a batch.
#[derive(Debug)]
pub(crate) struct Accumulator {
    pub loss: f64,
    pub grad: Vec<f64>,
    metrics: Vec<(String, f64)>,
    examples: usize,
}

impl Accumulator {
    pub fn new(b: &ObjectiveBatch<'_>, metric_names: &[&str]) -> Self {
        Self {
            loss: 0.0,
            grad: vec![0.0; b.policy_logps.len()],
            metrics: metric_names.iter().map(|m| ((*m).to_owned(), 0.0)).collect(),
            examples: b.num_examples(),
        }
    }

    /// Add to metric `i` (averaged over examples in `finish`).
    pub fn metric(&mut self, i: usize, value: f64) {
        self.metrics[i].1 += value;
    }

    pub fn finish(mut self) -> LossOutput {
        let n = self.examples.max(1) as f64;
        for m in &mut self.metrics {
            m.1 /= n;
        }
        LossOutput { loss: self.loss, grad: self.grad, metrics: self.metrics }
    }
}

/// The metrics every pairwise objective reports, as TRL names them: the implicit rewards, and
/// the policy's log-probs of the chosen and rejected answers (summed over their tokens).
pub(crate) const PAIR_METRICS: [&str; 6] =
    ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"];

impl Accumulator {
    /// Record one pair's implicit rewards (`chosen`, `rejected`) and the policy's log-probs of
    /// its two answers (`logps`) at `offset` in the metric list ([`PAIR_METRICS`] order).
    pub fn pair(&mut self, offset: usize, (chosen, rejected): (f64, f64), logps: (f64, f64)) {
        self.metric(offset, chosen);
        self.metric(offset + 1, rejected);
        self.metric(offset + 2, chosen - rejected);
        self.metric(offset + 3, if chosen > rejected { 1.0 } else { 0.0 });
        self.metric(offset + 4, logps.0);
        self.metric(offset + 5, logps.1);
    }
}

/// Sigmoid-family loss of a margin `z` with label smoothing `eps`:
/// `-(1 - eps) ln sigma(z) - eps ln sigma(-z)`, and its derivative in `z`.
pub(crate) fn smoothed_sigmoid_loss(z: f64, eps: f64) -> (f64, f64) {
    use fuserl_core::maths::{log_sigmoid, sigmoid};
    let loss = -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z);
    let d = -(1.0 - eps) * sigmoid(-z) + eps * sigmoid(z);
    (loss, d)
}
