//! `dpo`: FusePO-DPO and its variants (method.md). With `h(y) = logp(y) - logp_ref(y)`
//! (divided by `|y|` when `length_normalize`), per pair
//!
//! - `sigmoid`: `-(1 - eps) ln sigma(beta (h_w - h_l)) - eps ln sigma(-beta (h_w - h_l))`
//!   (`eps` = `label_smoothing`: conservative DPO);
//! - `hinge`: `max(0, 1 - beta (h_w - h_l))`;
//! - `ipo`: `(h_w/|y_w| - h_l/|y_l| - 1/(2 beta))^2` (always per-token, as TRL and IPO's
//!   authors do).
//!
//! Pairs come from [`crate::pairs`]. With policy equal to reference, `sigmoid` is exactly
//! `ln 2` per pair.

use fuserl_core::Result;
use fuserl_core::config::{ConfigError, KeyPath, check};
use fuserl_core::extension::{ExampleSpec, GroupView, LossOutput, ObjectiveBatch, PreferenceObjective};
use fuserl_core::registry::{BuildContext, Built, PluginDescriptor, StaticFactory, build_component};
use serde::{Deserialize, Serialize};

use super::{Accumulator, Arity, PAIR_METRICS, smoothed_sigmoid_loss, validate_batch};
use crate::pairs::PairConfig;

/// The DPO-family loss.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DpoLoss {
    /// Bradley-Terry (DPO).
    #[default]
    Sigmoid,
    /// SLiC's hinge.
    Hinge,
    /// IPO's squared loss.
    Ipo,
}

/// `kind = "dpo"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpoConfig {
    /// Strength of the KL regularisation.
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// The loss.
    #[serde(default)]
    pub loss: DpoLoss,
    /// Label smoothing `eps` in `[0, 0.5)` (`sigmoid` only).
    #[serde(default)]
    pub label_smoothing: f64,
    /// Divide each log-ratio by the response's token count (FuseChat-3.0 with beta 10).
    #[serde(default)]
    pub length_normalize: bool,
    /// Pair construction.
    #[serde(default)]
    pub pairs: PairConfig,
}

fn default_beta() -> f64 {
    0.1
}

impl Default for DpoConfig {
    fn default() -> Self {
        Self {
            beta: 0.1,
            loss: DpoLoss::Sigmoid,
            label_smoothing: 0.0,
            length_normalize: false,
            pairs: PairConfig::default(),
        }
    }
}

/// FusePO-DPO.
#[derive(Clone, Debug)]
pub struct DpoObjective {
    config: DpoConfig,
}

impl DpoObjective {
    /// Validate and build.
    pub fn new(config: DpoConfig) -> Result<Self, ConfigError> {
        check::positive("beta", config.beta)?;
        check::in_half_open("label_smoothing", config.label_smoothing, 0.0, 0.5)?;
        if config.loss != DpoLoss::Sigmoid && config.label_smoothing != 0.0 {
            return Err(ConfigError::at("label_smoothing", "only the sigmoid loss takes label smoothing"));
        }
        config.pairs.validate().map_err(|e| e.prefixed(&KeyPath::keys(&["pairs"])))?;
        Ok(Self { config })
    }
}

impl PreferenceObjective for DpoObjective {
    fn name(&self) -> &str {
        "dpo"
    }
    fn needs_reference(&self) -> bool {
        true
    }
    fn build_examples(&self, group: &GroupView<'_>) -> Result<Vec<ExampleSpec>> {
        self.config.pairs.build(group)
    }
    fn loss(&self, b: &ObjectiveBatch<'_>) -> Result<LossOutput> {
        validate_batch(self.name(), b, Arity::Exactly(2), true)?;
        let reference = b.reference_logps.unwrap_or_default();
        let beta = self.config.beta;
        let mut acc = Accumulator::new(b, &PAIR_METRICS);
        for e in 0..b.num_examples() {
            let (w, l) = (b.example_offsets[e], b.example_offsets[e] + 1);
            let scale = b.example_weights[e] / b.normalizer;
            let (hw, hl) = (b.policy_logps[w] - reference[w], b.policy_logps[l] - reference[l]);
            // d h_norm / d logp for each side.
            let per_token = self.config.length_normalize || self.config.loss == DpoLoss::Ipo;
            let (dw, dl) = if per_token { (1.0 / b.token_counts[w], 1.0 / b.token_counts[l]) } else { (1.0, 1.0) };
            let delta = hw * dw - hl * dl;
            let (loss, d_delta) = match self.config.loss {
                DpoLoss::Sigmoid => {
                    let (loss, dz) = smoothed_sigmoid_loss(beta * delta, self.config.label_smoothing);
                    (loss, beta * dz)
                }
                DpoLoss::Hinge => {
                    let m = 1.0 - beta * delta;
                    if m > 0.0 { (m, -beta) } else { (0.0, 0.0) }
                }
                DpoLoss::Ipo => {
                    let u = delta - 1.0 / (2.0 * beta);
                    (u * u, 2.0 * u)
                }
            };
            acc.loss += scale * loss;
            acc.grad[w] += scale * d_delta * dw;
            acc.grad[l] -= scale * d_delta * dl;
            let (rc, rr) = (beta * hw, beta * hl);
            acc.pair(0, (rc, rr), (b.policy_logps[w], b.policy_logps[l]));
        }
        Ok(acc.finish())
    }
}

fn build(t: &toml::Table, ctx: &BuildContext) -> Result<Built<dyn PreferenceObjective>, ConfigError> {
    build_component(t, ctx, |c: DpoConfig, _| Ok(Box::new(DpoObjective::new(c)?) as Box<dyn PreferenceObjective>))
}

inventory::submit! { PluginDescriptor { name: "dpo", origin: crate::ORIGIN,
summary: "FusePO-DPO over per-source pairs: sigmoid (label smoothing), hinge or IPO; optional length normalisation",
factory: StaticFactory::Objective(build) } }
