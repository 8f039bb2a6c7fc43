//! An example fuserl plugin, built as a shared library and loaded at run time
//! (`plugins = ["fuserl_example"]` in a recipe, or `fuserl --plugin PATH`). It provides:
//!
//! - weighting `margin`: every completion whose reward is within `margin` of the best gets a
//!   weight proportional to how close it is, `w ∝ max(0, margin - (best - r))`;
//! - objective `ranking-hinge`: one pair per prompt, the best and worst answers over all
//!   sources, with the reference-free hinge loss
//!   `max(0, gamma - (logp_w / |y_w| - logp_l / |y_l|))`;
//! - source `templated`: a generative source (plugin ABI version 2) that answers every prompt
//!   from a template, in the collect stage, without a model.
//!
//! The components are ordinary implementations of fuserl's traits; `export_plugin!` turns them
//! into the C ABI. No `unsafe` here.

use fuserl_abi::plugin::log;
use fuserl_abi::types::LOG_DEBUG;
use fuserl_core::config::{ConfigError, check};
use fuserl_core::data::SamplingParams;
use fuserl_core::extension::{
    ExampleSpec, GenerateStats, Generated, GeneratedSink, Generator, GroupView, LossOutput, ObjectiveBatch,
    PreferenceObjective, SampleJob, SourceAdapter, WeightingScheme,
};
use fuserl_core::registry::{BuildContext, Built, PluginDescriptor, StaticFactory, build_component};
use fuserl_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// `kind = "margin"`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MarginConfig {
    /// How far below the best reward a completion still gets weight.
    #[serde(default = "default_margin")]
    pub margin: f64,
}

fn default_margin() -> f64 {
    0.1
}

/// Margin weighting.
#[derive(Clone, Debug)]
pub struct MarginWeighting {
    margin: f64,
}

impl WeightingScheme for MarginWeighting {
    fn name(&self) -> &str {
        "margin"
    }
    fn weigh(&self, group: &GroupView<'_>) -> Result<Vec<f64>> {
        let best = group.rewards.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let raw: Vec<f64> = group.rewards.iter().map(|r| (self.margin - (best - r)).max(0.0)).collect();
        let total: f64 = raw.iter().sum();
        Ok(raw.iter().map(|w| w / total).collect())
    }
}

fn build_margin(t: &toml::Table, ctx: &BuildContext) -> Result<Built<dyn WeightingScheme>, ConfigError> {
    build_component(t, ctx, |c: MarginConfig, _| {
        check::positive("margin", c.margin)?;
        log(LOG_DEBUG, &format!("margin weighting with margin {}", c.margin));
        Ok(Box::new(MarginWeighting { margin: c.margin }) as Box<dyn WeightingScheme>)
    })
}

/// `kind = "ranking-hinge"`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HingeConfig {
    /// Required margin between the per-token log-likelihoods of chosen and rejected.
    #[serde(default = "default_gamma")]
    pub gamma: f64,
    /// Smallest reward gap that makes a pair.
    #[serde(default)]
    pub min_gap: f64,
}

fn default_gamma() -> f64 {
    0.5
}

/// Reference-free ranking hinge.
#[derive(Clone, Debug)]
pub struct RankingHingeObjective {
    config: HingeConfig,
}

impl PreferenceObjective for RankingHingeObjective {
    fn name(&self) -> &str {
        "ranking-hinge"
    }
    fn needs_reference(&self) -> bool {
        false
    }
    fn build_examples(&self, group: &GroupView<'_>) -> Result<Vec<ExampleSpec>> {
        if group.is_empty() {
            return Ok(Vec::new());
        }
        let mut best = 0;
        let mut worst = 0;
        for i in 0..group.len() {
            if group.rewards[i] > group.rewards[best] {
                best = i;
            }
            if group.rewards[i] < group.rewards[worst] {
                worst = i;
            }
        }
        let gap = group.rewards[best] - group.rewards[worst];
        if gap <= self.config.min_gap || gap <= 0.0 {
            return Ok(Vec::new());
        }
        Ok(vec![ExampleSpec { members: vec![best, worst], weight: 1.0, notes: vec![("reward_gap".into(), gap)] }])
    }
    fn loss(&self, b: &ObjectiveBatch<'_>) -> Result<LossOutput> {
        let mut loss = 0.0;
        let mut grad = vec![0.0; b.policy_logps.len()];
        let mut active = 0.0;
        for e in 0..b.num_examples() {
            let r = b.example(e);
            if r.len() != 2 {
                return Err(Error::Component {
                    point: "preference objective",
                    name: self.name().into(),
                    message: format!("example {e} has {} sequences; needs 2", r.len()),
                });
            }
            let (w, l) = (r.start, r.start + 1);
            let scale = b.example_weights[e] / b.normalizer;
            let margin = b.policy_logps[w] / b.token_counts[w] - b.policy_logps[l] / b.token_counts[l];
            let h = self.config.gamma - margin;
            if h > 0.0 {
                loss += scale * h;
                grad[w] -= scale / b.token_counts[w];
                grad[l] += scale / b.token_counts[l];
                active += 1.0;
            }
        }
        let n = b.num_examples().max(1) as f64;
        Ok(LossOutput { loss, grad, metrics: vec![("hinge/active_fraction".into(), active / n)] })
    }
}

fn build_hinge(t: &toml::Table, ctx: &BuildContext) -> Result<Built<dyn PreferenceObjective>, ConfigError> {
    build_component(t, ctx, |c: HingeConfig, _| {
        check::non_negative("gamma", c.gamma)?;
        check::non_negative("min_gap", c.min_gap)?;
        Ok(Box::new(RankingHingeObjective { config: c }) as Box<dyn PreferenceObjective>)
    })
}

/// `kind = "templated"`: a generative source without a model, to show the generator API
/// (plugin ABI version 2): it answers every prompt with `template`, in which `{prompt}` is the
/// last user message, `{sample}` the sample index and `{seed}` the seed the job was asked with.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplatedConfig {
    /// The source name its answers carry.
    pub name: String,
    /// The answer, with `{prompt}`, `{sample}` and `{seed}` filled in.
    pub template: String,
}

/// A source that answers from a template.
#[derive(Clone, Debug)]
pub struct TemplatedSource {
    config: TemplatedConfig,
}

impl SourceAdapter for TemplatedSource {
    fn name(&self) -> &str {
        "templated"
    }
    fn generator(&self) -> Option<&dyn Generator> {
        Some(self)
    }
}

impl Generator for TemplatedSource {
    fn source_name(&self) -> &str {
        &self.config.name
    }
    fn fingerprint(&self, _sampling: &SamplingParams) -> String {
        format!("templated: {}", self.config.template)
    }
    fn generate(
        &self,
        jobs: &[SampleJob<'_>],
        _sampling: &SamplingParams,
        sink: &GeneratedSink<'_>,
    ) -> Result<GenerateStats> {
        for j in jobs {
            let prompt = j.prompt.messages.iter().rev().find(|m| m.role == "user").map_or("", |m| m.content.as_str());
            let text = self
                .config
                .template
                .replace("{prompt}", prompt)
                .replace("{sample}", &j.sample_index.to_string())
                .replace("{seed}", &j.seed.to_string());
            sink(Generated {
                prompt_id: j.prompt.id.clone(),
                sample_index: j.sample_index,
                seed: j.seed,
                text,
                finish_reason: Some("stop".into()),
                ..Generated::default()
            })?;
        }
        Ok(GenerateStats { retries: 0, requests: jobs.len() as u64 })
    }
}

fn build_templated(t: &toml::Table, ctx: &BuildContext) -> Result<Built<dyn SourceAdapter>, ConfigError> {
    build_component(t, ctx, |c: TemplatedConfig, _| {
        fuserl_core::data::check_source_name(&c.name)?;
        Ok(Box::new(TemplatedSource { config: c }) as Box<dyn SourceAdapter>)
    })
}

fuserl_abi::export_plugin! {
    name: "fuserl-example",
    components: [
        PluginDescriptor {
            name: "margin",
            summary: "weights proportional to how close each reward is to the best, within a margin",
            origin: "fuserl-example",
            factory: StaticFactory::Weighting(build_margin),
        },
        PluginDescriptor {
            name: "ranking-hinge",
            summary: "reference-free hinge on per-token log-likelihoods of the best and worst answers",
            origin: "fuserl-example",
            factory: StaticFactory::Objective(build_hinge),
        },
        PluginDescriptor {
            name: "templated",
            summary: "a generative source without a model: answers every prompt from a template",
            origin: "fuserl-example",
            factory: StaticFactory::Source(build_templated),
        },
    ],
}
