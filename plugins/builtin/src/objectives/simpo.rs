//! `simpo`: FusePO-SimPO (method.md), reference-free:
//! `-(1 - eps) ln sigma(z) - eps ln sigma(-z)` with
//! `z = beta/|y_w| logp(y_w) - beta/|y_l| logp(y_l) - gamma`.

use fuserl_core::Result;
use fuserl_core::config::{ConfigError, KeyPath, check};
use fuserl_core::extension::{ExampleSpec, GroupView, LossOutput, ObjectiveBatch, PreferenceObjective};
use fuserl_core::registry::{BuildContext, Built, PluginDescriptor, StaticFactory, build_component};
use serde::{Deserialize, Serialize};

use super::{Accumulator, Arity, PAIR_METRICS, smoothed_sigmoid_loss, validate_batch};
use crate::pairs::PairConfig;

/// `kind = "simpo"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimpoConfig {
    /// Scale of the length-normalised log-likelihood reward (SimPO uses 2 to 2.5).
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// Target reward margin `gamma` (SimPO: about `beta / 2`).
    #[serde(default = "default_gamma")]
    pub gamma: f64,
    /// Label smoothing `eps` in `[0, 0.5)`.
    #[serde(default)]
    pub label_smoothing: f64,
    /// Pair construction.
    #[serde(default)]
    pub pairs: PairConfig,
}

fn default_beta() -> f64 {
    2.0
}
fn default_gamma() -> f64 {
    1.0
}

/// FusePO-SimPO.
#[derive(Clone, Debug)]
pub struct SimpoObjective {
    config: SimpoConfig,
}

impl SimpoObjective {
    /// Validate and build.
    pub fn new(config: SimpoConfig) -> Result<Self, ConfigError> {
        check::positive("beta", config.beta)?;
        check::non_negative("gamma", config.gamma)?;
        check::in_half_open("label_smoothing", config.label_smoothing, 0.0, 0.5)?;
        config.pairs.validate().map_err(|e| e.prefixed(&KeyPath::keys(&["pairs"])))?;
        Ok(Self { config })
    }
}

impl PreferenceObjective for SimpoObjective {
    fn name(&self) -> &str {
        "simpo"
    }
    fn needs_reference(&self) -> bool {
        false
    }
    fn build_examples(&self, group: &GroupView<'_>) -> Result<Vec<ExampleSpec>> {
        self.config.pairs.build(group)
    }
    fn loss(&self, b: &ObjectiveBatch<'_>) -> Result<LossOutput> {
        validate_batch(self.name(), b, Arity::Exactly(2), false)?;
        let beta = self.config.beta;
        let mut acc = Accumulator::new(b, &PAIR_METRICS);
        for e in 0..b.num_examples() {
            let (w, l) = (b.example_offsets[e], b.example_offsets[e] + 1);
            let scale = b.example_weights[e] / b.normalizer;
            let (rc, rr) = (beta * b.policy_logps[w] / b.token_counts[w], beta * b.policy_logps[l] / b.token_counts[l]);
            let (loss, dz) = smoothed_sigmoid_loss(rc - rr - self.config.gamma, self.config.label_smoothing);
            acc.loss += scale * loss;
            acc.grad[w] += scale * dz * beta / b.token_counts[w];
            acc.grad[l] -= scale * dz * beta / b.token_counts[l];
            acc.pair(0, (rc, rr), (b.policy_logps[w], b.policy_logps[l]));
        }
        Ok(acc.finish())
    }
}

fn build(t: &toml::Table, ctx: &BuildContext) -> Result<Built<dyn PreferenceObjective>, ConfigError> {
    build_component(t, ctx, |c: SimpoConfig, _| Ok(Box::new(SimpoObjective::new(c)?) as Box<dyn PreferenceObjective>))
}

inventory::submit! { PluginDescriptor { name: "simpo", origin: crate::ORIGIN,
summary: "FusePO-SimPO: reference-free, length-normalised, with a target margin",
factory: StaticFactory::Objective(build) } }
