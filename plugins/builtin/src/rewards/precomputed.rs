//! `precomputed`: the scores that came with the data (read by the `jsonl` source from a
//! record's `scores` or `score`). A completion without one is an error that names it.

use fuserl_core::config::ConfigError;
use fuserl_core::extension::{RewardModel, RewardTraits, ScoreItem};
use fuserl_core::registry::{BuildContext, Built, PluginDescriptor, StaticFactory, build_component};
use fuserl_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// `[reward] kind = "precomputed"`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrecomputedConfig {
    /// Who made the scores (for example `ArmoRM-Llama3-8B-v0.1`); recorded with every reward.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// Reads scores attached to the completions.
#[derive(Clone, Debug)]
pub struct PrecomputedReward {
    config: PrecomputedConfig,
}

impl PrecomputedReward {
    /// Build.
    pub fn new(config: PrecomputedConfig) -> Self {
        Self { config }
    }
}

impl RewardModel for PrecomputedReward {
    fn name(&self) -> &str {
        "precomputed"
    }
    fn scorer_id(&self) -> String {
        match &self.config.label {
            Some(label) => format!("precomputed:{label}"),
            None => "precomputed".into(),
        }
    }
    fn traits(&self) -> RewardTraits {
        RewardTraits { stored: false, ..RewardTraits::default() }
    }
    fn score(&self, items: &[ScoreItem<'_>]) -> Result<Vec<f64>> {
        items
            .iter()
            .map(|item| {
                item.completion.precomputed_score.ok_or_else(|| Error::Record {
                    record: item.completion.describe(),
                    message: "has no precomputed score (the data gave no `scores` / `score` for it); \
                              give one or use a reward model that scores"
                        .into(),
                })
            })
            .collect()
    }
}

fn build(t: &toml::Table, ctx: &BuildContext) -> Result<Built<dyn RewardModel>, ConfigError> {
    build_component(t, ctx, |c: PrecomputedConfig, _| Ok(Box::new(PrecomputedReward::new(c)) as Box<dyn RewardModel>))
}

inventory::submit! { PluginDescriptor { name: "precomputed", origin: crate::ORIGIN,
summary: "scores that came with the data (the jsonl source's `scores` / `score`)",
factory: StaticFactory::Reward(build) } }
