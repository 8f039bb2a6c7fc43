//! `rloo`: FusePO-RLOO, offline (method.md, our choice): the group is the source responses.
//! For a group `G` with rewards `r_i`:
//!
//! ```text
//! r~_i = r_i - kl_coef * (logp_i - logp_ref_i)      (when kl_coef > 0)
//! A_i  = r~_i - mean_{j != i} r~_j                  (optionally standardised in the group)
//! loss = -(1/|G|) sum_i A_i * x_i,   x_i = logp_i or logp_i / |y_i|
//! ```
//!
//! Advantages are constants (stop-gradient, as in REINFORCE and TRL's RLOO): the derivative
//! returned is `-(A_i / |G|) dx_i/dlogp_i`, also when the KL term makes `A` depend on `logp`.

use fuserl_core::Result;
use fuserl_core::config::{ConfigError, check};
use fuserl_core::extension::{ExampleSpec, GroupView, LossOutput, ObjectiveBatch, PreferenceObjective};
use fuserl_core::registry::{BuildContext, Built, PluginDescriptor, StaticFactory, build_component};
use serde::{Deserialize, Serialize};

use super::{Accumulator, Arity, validate_batch};
use crate::weighting::{Candidates, candidate_indices};

/// `kind = "rloo"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RlooConfig {
    /// The group: every sample (`all`) or each source's best (`per-source-best`).
    #[serde(default = "default_group")]
    pub group: Candidates,
    /// Only completions from these sources join the group (default: every source). With
    /// `["target"]` and `[po] target_samples`, this is on-policy RLOO on the target's own samples.
    #[serde(default)]
    pub sources: Vec<String>,
    /// Smallest group that makes an example (at least 2: leave-one-out needs another).
    #[serde(default = "default_min_group")]
    pub min_group_size: u32,
    /// Use `logp / |y|` instead of `logp`.
    #[serde(default)]
    pub length_normalize: bool,
    /// `beta_kl`: subtract `kl_coef * (logp - logp_ref)` from each reward (needs reference log-probs).
    #[serde(default)]
    pub kl_coef: f64,
    /// Standardise advantages within each group: `(A - mean) / (std + 1e-8)` (unbiased std).
    #[serde(default)]
    pub normalize_advantages: bool,
}

fn default_group() -> Candidates {
    Candidates::All
}
fn default_min_group() -> u32 {
    2
}

/// Offline RLOO.
#[derive(Clone, Debug)]
pub struct RlooObjective {
    config: RlooConfig,
}

impl RlooObjective {
    /// Validate and build.
    pub fn new(config: RlooConfig) -> Result<Self, ConfigError> {
        check::non_negative("kl_coef", config.kl_coef)?;
        if config.min_group_size < 2 {
            return Err(ConfigError::at("min_group_size", "expected at least 2 (leave-one-out needs another sample)"));
        }
        Ok(Self { config })
    }
}

/// Leave-one-out advantages of `rewards`.
pub fn rloo_advantages(rewards: &[f64]) -> Vec<f64> {
    let k = rewards.len() as f64;
    let total: f64 = rewards.iter().sum();
    rewards.iter().map(|r| r - (total - r) / (k - 1.0)).collect()
}

impl PreferenceObjective for RlooObjective {
    fn name(&self) -> &str {
        "rloo"
    }
    fn needs_reference(&self) -> bool {
        self.config.kl_coef > 0.0
    }
    fn build_examples(&self, group: &GroupView<'_>) -> Result<Vec<ExampleSpec>> {
        let allowed = |i: usize| {
            self.config.sources.is_empty()
                || group.source_names.get(group.sources[i] as usize).is_some_and(|s| self.config.sources.contains(s))
        };
        let members: Vec<usize> =
            candidate_indices(group, self.config.group).into_iter().filter(|&i| allowed(i)).collect();
        if members.len() < self.config.min_group_size as usize {
            return Ok(Vec::new());
        }
        Ok(vec![ExampleSpec { members, weight: 1.0, notes: Vec::new() }])
    }
    fn loss(&self, b: &ObjectiveBatch<'_>) -> Result<LossOutput> {
        validate_batch(self.name(), b, Arity::AtLeast(2), self.needs_reference())?;
        let mut acc = Accumulator::new(b, &["rloo/reward_mean", "rloo/advantage_abs_mean", "rloo/kl"]);
        for e in 0..b.num_examples() {
            let range = b.example(e);
            let k = range.len() as f64;
            let scale = b.example_weights[e] / b.normalizer;
            let kl: Vec<f64> = match b.reference_logps {
                Some(r) => range.clone().map(|i| b.policy_logps[i] - r[i]).collect(),
                None => vec![0.0; range.len()],
            };
            let shaped: Vec<f64> =
                range.clone().zip(&kl).map(|(i, kl)| b.rewards[i] - self.config.kl_coef * kl).collect();
            let mut adv = rloo_advantages(&shaped);
            if self.config.normalize_advantages {
                let mean = adv.iter().sum::<f64>() / k;
                let var = adv.iter().map(|a| (a - mean) * (a - mean)).sum::<f64>() / (k - 1.0);
                let std = var.sqrt();
                for a in &mut adv {
                    *a = (*a - mean) / (std + 1e-8);
                }
            }
            for (j, i) in range.clone().enumerate() {
                let d = if self.config.length_normalize { 1.0 / b.token_counts[i] } else { 1.0 };
                acc.loss -= scale * adv[j] * b.policy_logps[i] * d / k;
                acc.grad[i] -= scale * adv[j] * d / k;
            }
            acc.metric(0, range.clone().map(|i| b.rewards[i]).sum::<f64>() / k);
            acc.metric(1, adv.iter().map(|a| a.abs()).sum::<f64>() / k);
            acc.metric(2, kl.iter().sum::<f64>() / k);
        }
        Ok(acc.finish())
    }
}

fn build(t: &toml::Table, ctx: &BuildContext) -> Result<Built<dyn PreferenceObjective>, ConfigError> {
    build_component(t, ctx, |c: RlooConfig, _| Ok(Box::new(RlooObjective::new(c)?) as Box<dyn PreferenceObjective>))
}

inventory::submit! { PluginDescriptor { name: "rloo", origin: crate::ORIGIN,
summary: "FusePO-RLOO: leave-one-out REINFORCE over the source responses, optional KL and advantage normalisation",
factory: StaticFactory::Objective(build) } }
