//! `wrpo`: weighted-reward preference optimisation (method.md's WRPO baseline). Per prompt the
//! triplet `(y_ws, y_wt, y_l)`: the best source response, and the best and worst of the
//! target's own samples (completions whose source is `target_source`). With
//! `h = logp - logp_ref` (per token when `length_normalize`):
//!
//! ```text
//! loss = -ln sigma(alpha * beta * h(y_ws) + (1 - alpha) * beta * h(y_wt) - beta * h(y_l))
//! alpha = alpha_end * progress       (rises linearly from 0 over all optimiser steps)
//! ```

use fuserl_core::Result;
use fuserl_core::config::{ConfigError, check};
use fuserl_core::extension::{ExampleSpec, GroupView, LossOutput, ObjectiveBatch, PreferenceObjective};
use fuserl_core::maths::{log_sigmoid, sigmoid};
use fuserl_core::registry::{BuildContext, Built, PluginDescriptor, StaticFactory, build_component};
use serde::{Deserialize, Serialize};

use super::{Accumulator, Arity, PAIR_METRICS, validate_batch};
use crate::pairs::extremes;

/// `kind = "wrpo"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WrpoConfig {
    /// `beta` (WRPO: 0.01 with summed log-probs).
    #[serde(default = "default_beta")]
    pub beta: f64,
    /// Final value of `alpha` (WRPO: 0.1).
    #[serde(default = "default_alpha_end")]
    pub alpha_end: f64,
    /// The source name under which the target's own samples appear in the data.
    #[serde(default = "default_target_source")]
    pub target_source: String,
    /// Divide each log-ratio by the response's token count.
    #[serde(default)]
    pub length_normalize: bool,
}

fn default_beta() -> f64 {
    0.01
}
fn default_alpha_end() -> f64 {
    0.1
}
fn default_target_source() -> String {
    "target".into()
}

/// WRPO.
#[derive(Clone, Debug)]
pub struct WrpoObjective {
    config: WrpoConfig,
}

impl WrpoObjective {
    /// Validate and build.
    pub fn new(config: WrpoConfig) -> Result<Self, ConfigError> {
        check::positive("beta", config.beta)?;
        check::in_closed("alpha_end", config.alpha_end, 0.0, 1.0)?;
        if config.target_source.trim().is_empty() {
            return Err(ConfigError::at("target_source", "expected the source name of the target's own samples"));
        }
        Ok(Self { config })
    }
}

impl PreferenceObjective for WrpoObjective {
    fn name(&self) -> &str {
        "wrpo"
    }
    fn needs_reference(&self) -> bool {
        true
    }
    fn build_examples(&self, group: &GroupView<'_>) -> Result<Vec<ExampleSpec>> {
        let target = group.source_names.iter().position(|s| *s == self.config.target_source);
        let is_target = |i: usize| target.is_some_and(|t| group.sources[i] as usize == t);
        let own: Vec<usize> = (0..group.len()).filter(|&i| is_target(i)).collect();
        let others: Vec<usize> = (0..group.len()).filter(|&i| !is_target(i)).collect();
        if own.len() < 2 || others.is_empty() {
            return Ok(Vec::new());
        }
        let (ws, _) = extremes(group, others);
        let (wt, l) = extremes(group, own);
        if group.rewards[wt] <= group.rewards[l] {
            return Ok(Vec::new());
        }
        Ok(vec![ExampleSpec {
            members: vec![ws, wt, l],
            weight: 1.0,
            notes: vec![("reward_gap".into(), group.rewards[wt] - group.rewards[l])],
        }])
    }
    fn loss(&self, b: &ObjectiveBatch<'_>) -> Result<LossOutput> {
        validate_batch(self.name(), b, Arity::Exactly(3), true)?;
        let reference = b.reference_logps.unwrap_or_default();
        let beta = self.config.beta;
        let alpha = self.config.alpha_end * b.progress;
        let names: Vec<&str> = std::iter::once("wrpo/alpha").chain(PAIR_METRICS).collect();
        let mut acc = Accumulator::new(b, &names);
        for e in 0..b.num_examples() {
            let start = b.example_offsets[e];
            let idx = [start, start + 1, start + 2];
            let d: Vec<f64> =
                idx.iter().map(|&i| if self.config.length_normalize { 1.0 / b.token_counts[i] } else { 1.0 }).collect();
            let h: Vec<f64> = idx.iter().zip(&d).map(|(&i, d)| (b.policy_logps[i] - reference[i]) * d).collect();
            let coef = [alpha * beta, (1.0 - alpha) * beta, -beta];
            let z: f64 = coef.iter().zip(&h).map(|(c, h)| c * h).sum();
            let scale = b.example_weights[e] / b.normalizer;
            acc.loss += -scale * log_sigmoid(z);
            let dz = -sigmoid(-z);
            for k in 0..3 {
                acc.grad[idx[k]] += scale * dz * coef[k] * d[k];
            }
            let chosen = alpha * beta * h[0] + (1.0 - alpha) * beta * h[1];
            let rejected = beta * h[2];
            acc.metric(0, alpha);
            // The chosen side's log-prob mixes its two answers as its reward does.
            let lp = |k: usize| b.policy_logps[idx[k]];
            acc.pair(1, (chosen, rejected), (alpha * lp(0) + (1.0 - alpha) * lp(1), lp(2)));
        }
        Ok(acc.finish())
    }
}

fn build(t: &toml::Table, ctx: &BuildContext) -> Result<Built<dyn PreferenceObjective>, ConfigError> {
    build_component(t, ctx, |c: WrpoConfig, _| Ok(Box::new(WrpoObjective::new(c)?) as Box<dyn PreferenceObjective>))
}

inventory::submit! { PluginDescriptor { name: "wrpo", origin: crate::ORIGIN,
summary: "WRPO: source best and target best vs target worst, alpha rising linearly over training",
factory: StaticFactory::Objective(build) } }
