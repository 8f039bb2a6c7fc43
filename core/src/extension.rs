//! The four extension points. Each is a small, object-safe trait over plain host data (no
//! tensors), so that built-in plugins and dynamically loaded ones implement the same thing.
//!
//! Data flow: [`SourceAdapter`] collects completions, [`RewardModel`] scores them,
//! [`WeightingScheme`] weighs one prompt's scored completions, and [`PreferenceObjective`]
//! builds training examples from a weighted group and turns the per-sequence log-probs of a
//! batch into a loss and its derivative with respect to each policy log-prob.

use std::fmt::Debug;

use crate::data::{ChatMessage, Completion, Prompt, SamplingParams};
use crate::error::Result;

/// What a source adapter is asked for.
#[derive(Clone, Copy, Debug)]
pub struct CollectRequest<'a> {
    /// Prompts to answer (may be empty when the source brings its own, like a data file).
    pub prompts: &'a [Prompt],
    /// How many samples per prompt.
    pub samples_per_prompt: u32,
    /// Sampling settings.
    pub sampling: &'a SamplingParams,
}

/// What a source adapter returns.
#[derive(Clone, Debug, Default)]
pub struct Collected {
    /// Prompts the source brought with it (for example from a data file); empty for a source
    /// that answered the requested prompts.
    pub prompts: Vec<Prompt>,
    /// The completions.
    pub completions: Vec<Completion>,
    /// Records that were malformed and skipped (the recipe allowed it).
    pub skipped_records: u64,
}

/// Produces completions for prompts: a data file, an OpenAI-compatible server, a local model.
pub trait SourceAdapter: Send + Sync + Debug {
    /// The plugin's registered name.
    fn name(&self) -> &str;
    /// Produce completions.
    fn collect(&self, request: &CollectRequest<'_>) -> Result<Collected>;
}

/// One (prompt, completion) pair to score.
#[derive(Clone, Copy, Debug)]
pub struct ScoreItem<'a> {
    /// The conversation.
    pub messages: &'a [ChatMessage],
    /// The completion to score.
    pub completion: &'a Completion,
}

/// Scores completions: a reward model, an HTTP scorer, a verifier, or precomputed scores.
pub trait RewardModel: Send + Sync + Debug {
    /// The plugin's registered name.
    fn name(&self) -> &str;
    /// Who the scores are attributed to in the data (a model id, or the plugin's name).
    fn scorer_id(&self) -> String {
        self.name().to_owned()
    }
    /// One finite score per item, in order.
    fn score(&self, items: &[ScoreItem<'_>]) -> Result<Vec<f64>>;
}

/// One prompt's scored completions, as a weighting scheme or an objective sees them.
#[derive(Clone, Copy, Debug)]
pub struct GroupView<'a> {
    /// One finite reward per completion.
    pub rewards: &'a [f64],
    /// For each completion, the index of its source in `source_names`.
    pub sources: &'a [u32],
    /// For each completion, its sample index within its source.
    pub sample_indices: &'a [u32],
    /// Distinct source names, in order of first appearance.
    pub source_names: &'a [String],
    /// One weight per completion from the weighting scheme (summing to 1); empty when the
    /// group has not been weighted yet.
    pub weights: &'a [f64],
}

impl GroupView<'_> {
    /// Number of completions.
    pub fn len(&self) -> usize {
        self.rewards.len()
    }

    /// Whether the group has no completions.
    pub fn is_empty(&self) -> bool {
        self.rewards.is_empty()
    }
}

/// Gives each completion of one prompt a weight. Weights are finite, non-negative and sum to
/// 1 over the group (completions that are not candidates get 0).
pub trait WeightingScheme: Send + Sync + Debug {
    /// The plugin's registered name.
    fn name(&self) -> &str;
    /// One weight per completion of `group`.
    fn weigh(&self, group: &GroupView<'_>) -> Result<Vec<f64>>;
}

/// A training example as an objective builds it: indices into the group's completions, in the
/// order the objective expects, and a weight.
#[derive(Clone, Debug, PartialEq)]
pub struct ExampleSpec {
    /// Indices into the group's completions.
    pub members: Vec<usize>,
    /// The example's weight in the loss.
    pub weight: f64,
    /// Extra facts about how it was built (for example `reward_gap`).
    pub notes: Vec<(String, f64)>,
}

/// The per-sequence statistics of one batch, flattened: sequence `s` of example `e` is at
/// `example_offsets[e] + s`.
#[derive(Clone, Copy, Debug)]
pub struct ObjectiveBatch<'a> {
    /// `example_offsets[e]..example_offsets[e + 1]` are the sequences of example `e`
    /// (length: examples + 1).
    pub example_offsets: &'a [usize],
    /// The weight of each example.
    pub example_weights: &'a [f64],
    /// Policy log-prob of each sequence: the sum over its response tokens.
    pub policy_logps: &'a [f64],
    /// Reference log-prob of each sequence (same layout); present when the objective asked.
    pub reference_logps: Option<&'a [f64]>,
    /// Number of response tokens of each sequence.
    pub token_counts: &'a [f64],
    /// Reward of each sequence.
    pub rewards: &'a [f64],
    /// The loss is `sum_e weight_e * loss_e / normalizer`; the trainer passes the total example
    /// weight of the optimiser step, so that `L` is the weighted mean, which equals method.md's
    /// `mean_x sum_k w_k loss_k` when a step holds all of its prompts' examples.
    pub normalizer: f64,
    /// Fraction of training done, in `[0, 1]` (WRPO's alpha schedule).
    pub progress: f64,
}

impl<'a> ObjectiveBatch<'a> {
    /// Number of examples.
    pub fn num_examples(&self) -> usize {
        self.example_offsets.len().saturating_sub(1)
    }

    /// The sequence index range of example `e`.
    pub fn example(&self, e: usize) -> std::ops::Range<usize> {
        self.example_offsets[e]..self.example_offsets[e + 1]
    }
}

/// An objective's answer for one batch.
#[derive(Clone, Debug, PartialEq)]
pub struct LossOutput {
    /// The loss value.
    pub loss: f64,
    /// `d loss / d policy_logp` for every sequence of the batch (same layout). The trainer
    /// backpropagates `sum_i grad_i * logp_i` through the model.
    pub grad: Vec<f64>,
    /// Named metrics (for example `rewards/margins`), averaged over the batch's examples.
    pub metrics: Vec<(String, f64)>,
}

/// Builds training examples from weighted groups and computes the loss of a batch from
/// per-sequence log-probs. Covers SFT, DPO and its variants, SimPO, IPO, RLOO, WRPO, ORPO, KTO:
/// anything that depends on the model only through sequence log-probs.
pub trait PreferenceObjective: Send + Sync + Debug {
    /// The plugin's registered name.
    fn name(&self) -> &str;
    /// Whether `loss` needs reference log-probs.
    fn needs_reference(&self) -> bool;
    /// The training examples of one weighted group (possibly none).
    fn build_examples(&self, group: &GroupView<'_>) -> Result<Vec<ExampleSpec>>;
    /// The loss of a batch and its derivative with respect to every policy log-prob.
    fn loss(&self, batch: &ObjectiveBatch<'_>) -> Result<LossOutput>;
}
