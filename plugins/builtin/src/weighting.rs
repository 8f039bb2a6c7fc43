//! Weighting schemes: one prompt's scored completions -> a weight per completion.
//!
//! `softmax` is FuseSFT's default (method.md): `w(y) = exp(r(y)/tau) / sum exp(r(y')/tau)`
//! over the candidate set, after an optional per-prompt reward normalisation. As `tau` falls
//! it tends to `best-only`, as it rises to `uniform`. Completions that are not candidates get
//! weight 0. Ties at the top share the mass equally, in every scheme.

use fuserl_core::config::{ConfigError, check};
use fuserl_core::extension::{GroupView, WeightingScheme};
use fuserl_core::maths::softmax;
use fuserl_core::registry::{BuildContext, Built, PluginDescriptor, StaticFactory, build_component};
use fuserl_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// Which completions of a prompt take part.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Candidates {
    /// Each source's best-rewarded sample (ties: the lowest sample index). The default.
    #[default]
    PerSourceBest,
    /// Every sample of every source.
    All,
}

/// Per-prompt normalisation of the candidates' rewards before weighting (our choice:
/// makes the temperature independent of the reward model's scale).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Normalize {
    /// Raw rewards.
    #[default]
    None,
    /// `(r - mean) / std` (population std); all zeros when every reward is equal.
    Zscore,
    /// `(r - min) / (max - min)`; all zeros when every reward is equal.
    Minmax,
}

/// Indices of the candidates of `group`.
pub fn candidate_indices(group: &GroupView<'_>, candidates: Candidates) -> Vec<usize> {
    match candidates {
        Candidates::All => (0..group.len()).collect(),
        Candidates::PerSourceBest => {
            let mut best: Vec<Option<usize>> = vec![None; group.source_names.len()];
            for i in 0..group.len() {
                let s = group.sources[i] as usize;
                if s >= best.len() {
                    best.resize(s + 1, None);
                }
                match best[s] {
                    Some(b) if group.rewards[b] >= group.rewards[i] => {}
                    _ => best[s] = Some(i),
                }
            }
            best.into_iter().flatten().collect()
        }
    }
}

/// Normalise `rewards` as `how` says.
pub fn normalize(rewards: &[f64], how: Normalize) -> Vec<f64> {
    match how {
        Normalize::None => rewards.to_vec(),
        Normalize::Zscore => {
            let n = rewards.len() as f64;
            let mean = rewards.iter().sum::<f64>() / n;
            let var = rewards.iter().map(|r| (r - mean) * (r - mean)).sum::<f64>() / n;
            let std = var.sqrt();
            if std > 0.0 && std.is_finite() {
                rewards.iter().map(|r| (r - mean) / std).collect()
            } else {
                vec![0.0; rewards.len()]
            }
        }
        Normalize::Minmax => {
            let lo = rewards.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = rewards.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let range = hi - lo;
            if range > 0.0 && range.is_finite() {
                rewards.iter().map(|r| (r - lo) / range).collect()
            } else {
                vec![0.0; rewards.len()]
            }
        }
    }
}

/// Scatter candidate weights back into a weight per completion.
fn scatter(len: usize, candidates: &[usize], weights: &[f64]) -> Vec<f64> {
    let mut out = vec![0.0; len];
    for (&i, &w) in candidates.iter().zip(weights) {
        out[i] = w;
    }
    out
}

fn check_rewards(name: &str, group: &GroupView<'_>) -> Result<()> {
    if let Some(r) = group.rewards.iter().find(|r| !r.is_finite()) {
        return Err(Error::Component {
            point: "weighting scheme",
            name: name.into(),
            message: format!("got the non-finite reward {r}"),
        });
    }
    Ok(())
}

/// `[weighting] kind = "softmax"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SoftmaxConfig {
    /// Temperature `tau` (> 0).
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Reward normalisation before the softmax.
    #[serde(default = "default_normalize")]
    pub normalize: Normalize,
    /// The candidate set.
    #[serde(default)]
    pub candidates: Candidates,
}

fn default_temperature() -> f64 {
    1.0
}
fn default_normalize() -> Normalize {
    Normalize::Zscore
}

/// Softmax over the candidates' (normalised) rewards.
#[derive(Clone, Debug)]
pub struct SoftmaxWeighting {
    config: SoftmaxConfig,
}

impl SoftmaxWeighting {
    /// Validate and build.
    pub fn new(config: SoftmaxConfig) -> Result<Self, ConfigError> {
        check::positive("temperature", config.temperature)?;
        Ok(Self { config })
    }
}

impl WeightingScheme for SoftmaxWeighting {
    fn name(&self) -> &str {
        "softmax"
    }
    fn weigh(&self, group: &GroupView<'_>) -> Result<Vec<f64>> {
        check_rewards(self.name(), group)?;
        if group.is_empty() {
            return Ok(Vec::new());
        }
        let cand = candidate_indices(group, self.config.candidates);
        let rewards: Vec<f64> = cand.iter().map(|&i| group.rewards[i]).collect();
        let scores = normalize(&rewards, self.config.normalize);
        Ok(scatter(group.len(), &cand, &softmax(&scores, self.config.temperature)))
    }
}

/// `[weighting] kind = "best-only"`: takes no keys.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BestOnlyConfig {}

/// All the weight on the best-rewarded completion (shared equally on ties): best-of-all SFT,
/// as in FuseChat-3.0 and WRPO.
#[derive(Clone, Debug)]
pub struct BestOnlyWeighting;

impl WeightingScheme for BestOnlyWeighting {
    fn name(&self) -> &str {
        "best-only"
    }
    fn weigh(&self, group: &GroupView<'_>) -> Result<Vec<f64>> {
        check_rewards(self.name(), group)?;
        let max = group.rewards.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let ties = group.rewards.iter().filter(|r| **r == max).count() as f64;
        Ok(group.rewards.iter().map(|r| if *r == max { 1.0 / ties } else { 0.0 }).collect())
    }
}

/// `[weighting] kind = "uniform"`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UniformConfig {
    /// The candidate set.
    #[serde(default)]
    pub candidates: Candidates,
}

/// Equal weights over the candidates.
#[derive(Clone, Debug)]
pub struct UniformWeighting {
    config: UniformConfig,
}

impl WeightingScheme for UniformWeighting {
    fn name(&self) -> &str {
        "uniform"
    }
    fn weigh(&self, group: &GroupView<'_>) -> Result<Vec<f64>> {
        check_rewards(self.name(), group)?;
        let cand = candidate_indices(group, self.config.candidates);
        let w = vec![1.0 / cand.len() as f64; cand.len()];
        Ok(scatter(group.len(), &cand, &w))
    }
}

/// `[weighting] kind = "rank"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RankConfig {
    /// The candidate set.
    #[serde(default)]
    pub candidates: Candidates,
    /// `w ∝ rank^exponent` (0: uniform; larger: sharper).
    #[serde(default = "default_exponent")]
    pub exponent: f64,
}

fn default_exponent() -> f64 {
    1.0
}

/// Weights proportional to `rank^exponent`, rank 1 for the worst candidate and `n` for the
/// best; tied rewards share their average rank. Insensitive to the reward model's scale.
#[derive(Clone, Debug)]
pub struct RankWeighting {
    config: RankConfig,
}

impl RankWeighting {
    /// Validate and build.
    pub fn new(config: RankConfig) -> Result<Self, ConfigError> {
        check::non_negative("exponent", config.exponent)?;
        Ok(Self { config })
    }
}

/// Average ranks (1-based, ascending reward, ties averaged).
pub fn average_ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[a].total_cmp(&values[b]));
    let mut ranks = vec![0.0; values.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && values[order[j + 1]] == values[order[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for k in i..=j {
            ranks[order[k]] = avg;
        }
        i = j + 1;
    }
    ranks
}

impl WeightingScheme for RankWeighting {
    fn name(&self) -> &str {
        "rank"
    }
    fn weigh(&self, group: &GroupView<'_>) -> Result<Vec<f64>> {
        check_rewards(self.name(), group)?;
        let cand = candidate_indices(group, self.config.candidates);
        let rewards: Vec<f64> = cand.iter().map(|&i| group.rewards[i]).collect();
        let raw: Vec<f64> = average_ranks(&rewards).iter().map(|r| r.powf(self.config.exponent)).collect();
        let total: f64 = raw.iter().sum();
        let w: Vec<f64> = raw.iter().map(|r| r / total).collect();
        Ok(scatter(group.len(), &cand, &w))
    }
}

fn build_softmax(t: &toml::Table, ctx: &BuildContext) -> Result<Built<dyn WeightingScheme>, ConfigError> {
    build_component(t, ctx, |c: SoftmaxConfig, _| Ok(Box::new(SoftmaxWeighting::new(c)?) as Box<dyn WeightingScheme>))
}
fn build_best_only(t: &toml::Table, ctx: &BuildContext) -> Result<Built<dyn WeightingScheme>, ConfigError> {
    build_component(t, ctx, |_: BestOnlyConfig, _| Ok(Box::new(BestOnlyWeighting) as Box<dyn WeightingScheme>))
}
fn build_uniform(t: &toml::Table, ctx: &BuildContext) -> Result<Built<dyn WeightingScheme>, ConfigError> {
    build_component(t, ctx, |config: UniformConfig, _| {
        Ok(Box::new(UniformWeighting { config }) as Box<dyn WeightingScheme>)
    })
}
fn build_rank(t: &toml::Table, ctx: &BuildContext) -> Result<Built<dyn WeightingScheme>, ConfigError> {
    build_component(t, ctx, |c: RankConfig, _| Ok(Box::new(RankWeighting::new(c)?) as Box<dyn WeightingScheme>))
}

inventory::submit! { PluginDescriptor { name: "softmax", origin: crate::ORIGIN,
summary: "softmax over rewards at a temperature, optional per-prompt normalisation (FuseSFT default)",
factory: StaticFactory::Weighting(build_softmax) } }
inventory::submit! { PluginDescriptor { name: "best-only", origin: crate::ORIGIN,
summary: "all weight on the best-rewarded completion (best-of-all SFT)",
factory: StaticFactory::Weighting(build_best_only) } }
inventory::submit! { PluginDescriptor { name: "uniform", origin: crate::ORIGIN,
summary: "equal weight on every candidate",
factory: StaticFactory::Weighting(build_uniform) } }
inventory::submit! { PluginDescriptor { name: "rank", origin: crate::ORIGIN,
summary: "weights proportional to reward rank (scale-free)",
factory: StaticFactory::Weighting(build_rank) } }
