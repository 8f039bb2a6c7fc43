//! Example construction shared by the pairwise objectives (`dpo`, `simpo`), as method.md
//! defines it:
//!
//! - `per-source` (FusePO, the default): each source `k` with two or more samples gives the
//!   pair (its best, its worst), weighted by `w_k`; pairs whose reward gap is outside
//!   `[min_gap, max_gap]` are dropped and the remaining weights renormalised to sum to 1.
//!   `w_k` is the weight the weighting scheme gave the pair's chosen response (with the
//!   default `softmax` over per-source bests that is `softmax(r_k+ / tau)`), or a softmax of the
//!   gaps, or uniform.
//! - `same-source-window` (FuseChat-3.0): one pair per prompt, (best, worst) of one source,
//!   with the gap inside `[min_gap, max_gap]`; among the sources that qualify, the one whose
//!   best response has the highest reward (ties: the first source).
//! - `best-of-all`: one pair per prompt, the best and the worst response over all sources.
//!
//! A pair always has a strictly positive reward gap. Best and worst ties go to the first
//! completion in the group's order (source order, then sample index).

use fuserl_core::config::{ConfigError, check};
use fuserl_core::extension::{ExampleSpec, GroupView};
use fuserl_core::maths::softmax;
use fuserl_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// How pairs are chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PairStrategy {
    /// One (best, worst) pair per source (FusePO).
    #[default]
    PerSource,
    /// One same-source pair per prompt with the gap in a window (FuseChat-3.0).
    SameSourceWindow,
    /// One pair per prompt: best and worst over all sources.
    BestOfAll,
}

/// How `per-source` pairs are weighted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PairWeights {
    /// The weighting scheme's weight of the chosen response.
    #[default]
    Weighting,
    /// `softmax(gap / tau)` over the pairs.
    GapSoftmax,
    /// Equal.
    Uniform,
}

/// `pairs` table of a pairwise objective.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairConfig {
    /// Pair construction.
    #[serde(default)]
    pub strategy: PairStrategy,
    /// Smallest reward gap kept.
    #[serde(default)]
    pub min_gap: f64,
    /// Largest reward gap kept (default: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_gap: Option<f64>,
    /// Weights of `per-source` pairs.
    #[serde(default)]
    pub weights: PairWeights,
    /// Temperature of `gap-softmax`.
    #[serde(default = "default_tau")]
    pub tau: f64,
}

fn default_tau() -> f64 {
    1.0
}

impl Default for PairConfig {
    fn default() -> Self {
        Self {
            strategy: PairStrategy::PerSource,
            min_gap: 0.0,
            max_gap: None,
            weights: PairWeights::Weighting,
            tau: 1.0,
        }
    }
}

impl PairConfig {
    /// FuseChat-3.0's setting: one same-source pair with gap in [0.01, 0.1].
    pub fn fusechat3() -> Self {
        Self { strategy: PairStrategy::SameSourceWindow, min_gap: 0.01, max_gap: Some(0.1), ..Self::default() }
    }

    /// Check the values; errors are relative to the `pairs` table.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check::non_negative("min_gap", self.min_gap)?;
        if let Some(max) = self.max_gap
            && !(max.is_finite() && max >= self.min_gap)
        {
            return Err(ConfigError::at(
                "max_gap",
                format!("expected a number >= min_gap ({}), found {max}", self.min_gap),
            ));
        }
        check::positive("tau", self.tau)
    }

    fn gap_ok(&self, gap: f64) -> bool {
        gap > 0.0 && gap >= self.min_gap && self.max_gap.is_none_or(|m| gap <= m)
    }

    /// The pairs of one group, `members = [chosen, rejected]`, each noted with `reward_gap`.
    pub fn build(&self, group: &GroupView<'_>) -> Result<Vec<ExampleSpec>> {
        match self.strategy {
            PairStrategy::PerSource => self.per_source(group),
            PairStrategy::SameSourceWindow => {
                let best = source_pairs(group)
                    .into_iter()
                    .filter(|&(c, r)| self.gap_ok(group.rewards[c] - group.rewards[r]))
                    .fold(None, |acc: Option<(usize, usize)>, p| match acc {
                        Some(a) if group.rewards[a.0] >= group.rewards[p.0] => Some(a),
                        _ => Some(p),
                    });
                Ok(best.map(|(c, r)| pair(group, c, r, 1.0)).into_iter().collect())
            }
            PairStrategy::BestOfAll => {
                if group.is_empty() {
                    return Ok(Vec::new());
                }
                let (c, r) = extremes(group, 0..group.len());
                Ok(if self.gap_ok(group.rewards[c] - group.rewards[r]) {
                    vec![pair(group, c, r, 1.0)]
                } else {
                    Vec::new()
                })
            }
        }
    }

    fn per_source(&self, group: &GroupView<'_>) -> Result<Vec<ExampleSpec>> {
        let kept: Vec<(usize, usize)> = source_pairs(group)
            .into_iter()
            .filter(|&(c, r)| self.gap_ok(group.rewards[c] - group.rewards[r]))
            .collect();
        if kept.is_empty() {
            return Ok(Vec::new());
        }
        let raw: Vec<f64> = match self.weights {
            PairWeights::Weighting => {
                if group.weights.len() != group.len() {
                    return Err(Error::Component {
                        point: "preference objective",
                        name: "pairs".into(),
                        message: "pairs.weights = \"weighting\" needs a weighted group".into(),
                    });
                }
                kept.iter().map(|&(c, _)| group.weights[c]).collect()
            }
            PairWeights::GapSoftmax => {
                let gaps: Vec<f64> = kept.iter().map(|&(c, r)| group.rewards[c] - group.rewards[r]).collect();
                softmax(&gaps, self.tau)
            }
            PairWeights::Uniform => vec![1.0; kept.len()],
        };
        let total: f64 = raw.iter().sum();
        if total.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
            // No kept pair has weight (for example best-only weighting whose best source had
            // no valid pair): the prompt contributes nothing.
            return Ok(Vec::new());
        }
        Ok(kept.iter().zip(raw).filter(|(_, w)| *w > 0.0).map(|(&(c, r), w)| pair(group, c, r, w / total)).collect())
    }
}

fn pair(group: &GroupView<'_>, chosen: usize, rejected: usize, weight: f64) -> ExampleSpec {
    ExampleSpec {
        members: vec![chosen, rejected],
        weight,
        notes: vec![("reward_gap".into(), group.rewards[chosen] - group.rewards[rejected])],
    }
}

/// The first best and the first worst completion among `indices`.
pub fn extremes(group: &GroupView<'_>, indices: impl IntoIterator<Item = usize>) -> (usize, usize) {
    let mut best: Option<usize> = None;
    let mut worst: Option<usize> = None;
    for i in indices {
        if best.is_none_or(|b| group.rewards[i] > group.rewards[b]) {
            best = Some(i);
        }
        if worst.is_none_or(|w| group.rewards[i] < group.rewards[w]) {
            worst = Some(i);
        }
    }
    (best.unwrap_or(0), worst.unwrap_or(0))
}

/// For each source with at least two samples, in source order: (its best, its worst).
pub fn source_pairs(group: &GroupView<'_>) -> Vec<(usize, usize)> {
    let n_sources = group.sources.iter().map(|&s| s as usize + 1).max().unwrap_or(0);
    (0..n_sources)
        .filter_map(|s| {
            let members: Vec<usize> = (0..group.len()).filter(|&i| group.sources[i] as usize == s).collect();
            (members.len() >= 2).then(|| extremes(group, members))
        })
        .collect()
}
