//! `combine`: one reward from several, each named: a weighted sum, optionally gated by verifiers
//! (a gate part's pass, its score at or above `threshold`, multiplies the sum).
//!
//! ```toml
//! [reward]
//! kind = "combine"
//!
//! [[reward.parts]]
//! name = "tests"
//! gate = true                 # 0 unless the tests pass; does not add to the sum
//! [reward.parts.reward]
//! kind = "python-tests"
//! tests = "../data/code-tests.jsonl"
//!
//! [[reward.parts]]
//! name = "judge"
//! weight = 0.1
//! [reward.parts.reward]
//! kind = "judge"
//! # ...
//! ```
//!
//! The score is `prod(gates passed) * sum(weight * score)` over the parts that are not gates
//! (with only gates: their product). The scoring stage scores and stores each part on its own
//! (`runs/NAME/score/combine.PART.jsonl`), so changing one part scores only that part again. The
//! parts are built through the registry like any `[reward]`, so a plugin's reward can be one.

use serde::{Deserialize, Serialize};

use fuserl_core::config::{ConfigError, KeyPath, parse_table, to_table};
use fuserl_core::extension::{CompositeReward, RewardModel, RewardTraits, ScoreItem};
use fuserl_core::registry::{BuildContext, BuildError, Built, split_kind};
use fuserl_core::{Error, Result};

/// One part's settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartConfig {
    /// The part's name (its store's name: no slashes).
    pub name: String,
    /// Its weight in the sum.
    #[serde(default = "one")]
    pub weight: f64,
    /// A gate: the sum counts only when this part's score is at least `threshold`.
    #[serde(default)]
    pub gate: bool,
    /// A gate's pass mark.
    #[serde(default = "one")]
    pub threshold: f64,
    /// The part's own reward table (with its `kind`).
    pub reward: toml::Table,
}

fn one() -> f64 {
    1.0
}

/// `[reward] kind = "combine"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CombineConfig {
    /// The parts, at least one.
    pub parts: Vec<PartConfig>,
}

/// The combined reward.
#[derive(Debug)]
pub struct Combine {
    parts: Vec<(PartConfig, Box<dyn RewardModel>)>,
}

impl Combine {
    fn score_of(&self, scores: &[f64]) -> f64 {
        let mut gate = 1.0;
        let mut sum = 0.0;
        let mut summed = false;
        for ((p, _), s) in self.parts.iter().zip(scores) {
            if p.gate {
                if *s < p.threshold {
                    gate = 0.0;
                }
            } else {
                sum += p.weight * s;
                summed = true;
            }
        }
        if summed { gate * sum } else { gate }
    }
}

impl RewardModel for Combine {
    fn name(&self) -> &str {
        "combine"
    }

    fn scorer_id(&self) -> String {
        let parts: Vec<String> = self.parts.iter().map(|(p, r)| format!("{}={}", p.name, r.scorer_id())).collect();
        format!("combine({})", parts.join(","))
    }

    fn traits(&self) -> RewardTraits {
        RewardTraits {
            stored: false,
            skips: self.parts.iter().any(|(_, r)| r.traits().skips),
            ..RewardTraits::default()
        }
    }

    fn composite(&self) -> Option<&dyn CompositeReward> {
        Some(self)
    }

    fn score(&self, items: &[ScoreItem<'_>]) -> Result<Vec<f64>> {
        let mut by_part = Vec::with_capacity(self.parts.len());
        for (p, r) in &self.parts {
            let s = r.score(items)?;
            if s.len() != items.len() {
                return Err(Error::Component {
                    point: "reward model",
                    name: format!("combine.{}", p.name),
                    message: format!("returned {} scores for {} answers", s.len(), items.len()),
                });
            }
            by_part.push(s);
        }
        Ok((0..items.len()).map(|i| self.score_of(&by_part.iter().map(|s| s[i]).collect::<Vec<_>>())).collect())
    }
}

impl CompositeReward for Combine {
    fn parts(&self) -> Vec<(&str, &dyn RewardModel)> {
        self.parts.iter().map(|(p, r)| (p.name.as_str(), r.as_ref())).collect()
    }

    fn combine(&self, part_scores: &[f64]) -> f64 {
        self.score_of(part_scores)
    }
}

/// Build a `combine` reward: each part through `registry`. Errors name the part's keys
/// (`parts[1].reward.tests`).
fn build(table: &toml::Table, ctx: &BuildContext) -> Result<Built<dyn RewardModel>, ConfigError> {
    let Some(registry) = ctx.registry() else {
        return Err(ConfigError::at("kind", "`combine` builds its parts through a registry (Registry::build_reward)"));
    };
    let config: CombineConfig = parse_table(table)?;
    if config.parts.is_empty() {
        return Err(ConfigError::at("parts", "expected at least one part"));
    }
    let mut parts = Vec::with_capacity(config.parts.len());
    let mut resolved_parts = Vec::with_capacity(config.parts.len());
    let mut names = std::collections::HashSet::new();
    for (i, p) in config.parts.into_iter().enumerate() {
        let here = KeyPath::root().key("parts").index(i);
        if p.name.is_empty() || p.name.contains(['/', '\\', '.']) {
            return Err(ConfigError::new(
                here.clone().key("name"),
                "expected a non-empty name without slashes or dots",
            ));
        }
        if !names.insert(p.name.clone()) {
            return Err(ConfigError::new(here.clone().key("name"), format!("a second part named `{}`", p.name)));
        }
        if !p.weight.is_finite() || !p.threshold.is_finite() {
            return Err(ConfigError::new(here.clone().key("weight"), "expected finite `weight` and `threshold`"));
        }
        let (kind, rest) = split_kind(&p.reward).map_err(|e| e.prefixed(&here.clone().key("reward")))?;
        let built = registry.build_reward(&kind, &rest, ctx).map_err(|e| match e {
            BuildError::Config(c) => c.prefixed(&here.clone().key("reward")),
            other => ConfigError::new(here.clone().key("reward").key("kind"), other.to_string()),
        })?;
        let mut resolved_reward = built.resolved;
        resolved_reward.insert("kind".into(), toml::Value::String(kind));
        let resolved = PartConfig { reward: resolved_reward, ..p.clone() };
        resolved_parts.push(resolved);
        parts.push((p, built.component));
    }
    let resolved = to_table(&CombineConfig { parts: resolved_parts })?;
    Ok(Built { component: Box::new(Combine { parts }), resolved })
}

inventory::submit! { fuserl_core::registry::PluginDescriptor { name: "combine", origin: env!("CARGO_PKG_NAME"),
summary: "several named rewards in one: a weighted sum, gated by verifiers' pass/fail",
factory: fuserl_core::registry::StaticFactory::Reward(build) } }
