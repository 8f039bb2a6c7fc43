//! `sft`: weighted supervised fine-tuning (FuseSFT, method.md):
//! `L = - sum_e w_e * ell(y_e) / normalizer`, with `ell` the token-mean log-likelihood
//! (default) or its sum. One example per candidate with a positive weight.

use fuserl_core::config::ConfigError;
use fuserl_core::extension::{ExampleSpec, GroupView, LossOutput, ObjectiveBatch, PreferenceObjective};
use fuserl_core::registry::{BuildContext, Built, PluginDescriptor, StaticFactory, build_component};
use fuserl_core::{Error, Result};
use serde::{Deserialize, Serialize};

use super::{Accumulator, Arity, validate_batch};

/// `kind = "sft"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftConfig {
    /// Divide each sequence's log-likelihood by its token count (token mean).
    #[serde(default = "yes")]
    pub length_average: bool,
}

fn yes() -> bool {
    true
}

impl Default for SftConfig {
    fn default() -> Self {
        Self { length_average: true }
    }
}

/// Weighted SFT.
#[derive(Clone, Debug, Default)]
pub struct SftObjective {
    config: SftConfig,
}

impl SftObjective {
    /// Build.
    pub fn new(config: SftConfig) -> Self {
        Self { config }
    }
}

impl PreferenceObjective for SftObjective {
    fn name(&self) -> &str {
        "sft"
    }
    fn needs_reference(&self) -> bool {
        false
    }
    fn build_examples(&self, group: &GroupView<'_>) -> Result<Vec<ExampleSpec>> {
        if group.weights.len() != group.len() {
            return Err(Error::Component {
                point: "preference objective",
                name: self.name().into(),
                message: "needs a weighted group".into(),
            });
        }
        Ok((0..group.len())
            .filter(|&i| group.weights[i] > 0.0)
            .map(|i| ExampleSpec { members: vec![i], weight: group.weights[i], notes: Vec::new() })
            .collect())
    }
    fn loss(&self, b: &ObjectiveBatch<'_>) -> Result<LossOutput> {
        validate_batch(self.name(), b, Arity::Exactly(1), false)?;
        let mut acc = Accumulator::new(b, &["sft/nll_per_token"]);
        for e in 0..b.num_examples() {
            let i = b.example_offsets[e];
            let scale = b.example_weights[e] / b.normalizer;
            let n = b.token_counts[i];
            let div = if self.config.length_average { n } else { 1.0 };
            acc.loss += -scale * b.policy_logps[i] / div;
            acc.grad[i] += -scale / div;
            acc.metric(0, -b.policy_logps[i] / n);
        }
        Ok(acc.finish())
    }
}

fn build(t: &toml::Table, ctx: &BuildContext) -> Result<Built<dyn PreferenceObjective>, ConfigError> {
    build_component(t, ctx, |c: SftConfig, _| Ok(Box::new(SftObjective::new(c)) as Box<dyn PreferenceObjective>))
}

inventory::submit! { PluginDescriptor { name: "sft", origin: crate::ORIGIN,
summary: "weighted SFT over the weighted candidates (FuseSFT)",
factory: StaticFactory::Objective(build) } }
