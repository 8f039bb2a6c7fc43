//! The four extension points. Each is a small, object-safe trait over plain host data (no
//! tensors), so that built-in plugins and dynamically loaded ones implement the same thing.
//!
//! Data flow: [`SourceAdapter`] collects completions, [`RewardModel`] scores them,
//! [`WeightingScheme`] weighs one prompt's scored completions, and [`PreferenceObjective`]
//! builds training examples from a weighted group and turns the per-sequence log-probs of a
//! batch into a loss and its derivative with respect to each policy log-prob.

use std::fmt::Debug;

use crate::data::{ChatMessage, Completion, Prompt, SamplingParams};
use crate::error::{Error, Result};

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
    /// Produce completions: a source that brings its own data (a file) returns it here. A
    /// source that answers prompts is a [`Generator`] and is asked through the collect stage;
    /// it leaves this as it is (an error saying so).
    fn collect(&self, request: &CollectRequest<'_>) -> Result<Collected> {
        let _ = request;
        Err(Error::Component {
            point: "source",
            name: self.name().to_owned(),
            message: "answers prompts in the collect stage (`fuserl collect`), not from a file".into(),
        })
    }
    /// The source as a generator of answers to the recipe's prompts, if it is one.
    fn generator(&self) -> Option<&dyn Generator> {
        None
    }
}

/// One answer to produce: which prompt, which of its samples, and the seed to ask with (the
/// same on every run, so that a rerun asks the same questions).
#[derive(Clone, Copy, Debug)]
pub struct SampleJob<'a> {
    /// The prompt.
    pub prompt: &'a Prompt,
    /// Index of the sample among the source's samples for the prompt (0-based).
    pub sample_index: u32,
    /// The seed for this (prompt, sample).
    pub seed: u64,
}

/// One answer as a generator hands it over.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Generated {
    /// The prompt it answers.
    pub prompt_id: String,
    /// Its sample index.
    pub sample_index: u32,
    /// The seed it was asked with.
    pub seed: u64,
    /// The answer.
    pub text: String,
    /// Why generation stopped: `stop`, `length` (cut by `max_tokens`), or what the server said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// The model id the server reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Prompt tokens, as the server counted them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u64>,
    /// Completion tokens, as the server counted them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_tokens: Option<u64>,
    /// Seconds from the request to its answer.
    #[serde(default)]
    pub latency_s: f64,
}

/// What a generator counted while answering.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GenerateStats {
    /// Requests sent again after a retryable failure (429, 5xx, time-out, dropped connection,
    /// malformed reply).
    pub retries: u64,
    /// Requests sent in all.
    pub requests: u64,
}

/// Receives each answer as soon as it is done (from any thread); an error stops the generator.
pub type GeneratedSink<'a> = dyn Fn(Generated) -> Result<()> + Send + Sync + 'a;

/// A source that answers prompts: an OpenAI-compatible server, a local checkpoint.
pub trait Generator: Send + Sync + Debug {
    /// The source name its completions carry in the data (a recipe's `name`).
    fn source_name(&self) -> &str;
    /// The settings that decide its answers (model, endpoint, sampling) as text: a collection
    /// made with other settings is not mixed with this one. Never holds a secret.
    fn fingerprint(&self, sampling: &SamplingParams) -> String;
    /// Whether answers cut by the token limit (`finish_reason = "length"`) go on to scoring and
    /// training; they stay in the store, marked, either way.
    fn keep_truncated(&self) -> bool {
        true
    }
    /// Answer every job, handing each answer to `sink` as soon as it is done, in any order.
    /// Sampling settings of the recipe's `[data.sampling]`; the source may override them.
    fn generate(
        &self,
        jobs: &[SampleJob<'_>],
        sampling: &SamplingParams,
        sink: &GeneratedSink<'_>,
    ) -> Result<GenerateStats>;
}

/// One (prompt, completion) pair to score.
#[derive(Clone, Copy, Debug)]
pub struct ScoreItem<'a> {
    /// The conversation.
    pub messages: &'a [ChatMessage],
    /// The completion to score.
    pub completion: &'a Completion,
}

/// Two answers to one prompt, for a pairwise judge: `a` is shown first.
#[derive(Clone, Copy, Debug)]
pub struct PairItem<'a> {
    /// The conversation.
    pub messages: &'a [ChatMessage],
    /// The answer shown first ("assistant A").
    pub a: &'a Completion,
    /// The answer shown second ("assistant B").
    pub b: &'a Completion,
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
    /// What the scores depend on besides the data (files, model weights, settings): the scoring
    /// stage keeps scores in the run directory under it, and scores everything afresh when it
    /// changes. Default: the scorer id.
    fn fingerprint(&self) -> String {
        self.scorer_id()
    }
    /// What kind of scores these are ([`RewardTraits`]: a verifier's verdicts, skips, kept in
    /// the run directory, pairwise). Default: plain scores of single answers, stored.
    fn traits(&self) -> RewardTraits {
        RewardTraits::default()
    }
    /// A reward made of other rewards (`combine`): the scoring stage scores and stores each
    /// part on its own (so a changed part alone is scored again), then combines. Default: none.
    fn composite(&self) -> Option<&dyn CompositeReward> {
        None
    }
    /// Score `items` in batches of about `batch_size`, handing each batch's scores to `sink` as
    /// `(indices into items, scores)` as soon as they are known, so that a stopped run keeps
    /// them. Default: [`RewardModel::score`] on consecutive chunks; a reward that loads a model
    /// overrides it to load it once (and may batch in any order, for example by length).
    fn score_batches(&self, items: &[ScoreItem<'_>], batch_size: usize, sink: &mut ScoreSink<'_>) -> Result<()> {
        let n = batch_size.max(1);
        for (b, chunk) in items.chunks(n).enumerate() {
            let indices: Vec<usize> = (b * n..b * n + chunk.len()).collect();
            sink(&indices, self.score(chunk)?)?;
        }
        Ok(())
    }
    /// A pairwise judge's verdicts: for each pair, the preference for `a` over `b` in [0, 1]
    /// (when [`RewardTraits::pairwise`]; 1: `a` is better, 0.5: a tie, 0: `b` is better; NaN: no verdict, when the reward
    /// [skips](RewardTraits::skips)), handed to `sink` as `(indices, preferences)` as they come.
    /// Default: an error, a reward that scores single answers cannot compare two.
    fn compare_batches(&self, items: &[PairItem<'_>], sink: &mut ScoreSink<'_>) -> Result<()> {
        let _ = (items, sink);
        Err(Error::Component {
            point: "reward model",
            name: self.name().to_owned(),
            message: "cannot compare two answers (a `judge` with mode = \"pairwise\" can)".into(),
        })
    }
}

/// Properties of a reward's scores, for the stages that use them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RewardTraits {
    /// The scores are verdicts of a verifier: 1 for an answer that passed, below 1 for one that
    /// did not (the evaluation then reports pass@k).
    pub verifier: bool,
    /// A NaN score means "no score: leave this answer out of training" (a judge told to skip
    /// answers it could not grade); otherwise a non-finite score is an error.
    pub skips: bool,
    /// The scoring stage keeps the scores in the run directory (`precomputed`, scores that came
    /// with the data, is not).
    pub stored: bool,
    /// It judges pairs of answers ([`RewardModel::compare_batches`]) rather than scoring one
    /// answer at a time (a pairwise judge: `[eval.judge]`).
    pub pairwise: bool,
}

impl Default for RewardTraits {
    fn default() -> Self {
        Self { verifier: false, skips: false, stored: true, pairwise: false }
    }
}

/// A reward made of named parts, each a reward of its own ([`RewardModel::composite`]).
pub trait CompositeReward: Send + Sync + Debug {
    /// The parts, each with its name (the name of its store).
    fn parts(&self) -> Vec<(&str, &dyn RewardModel)>;
    /// One answer's score from its parts' scores (in the order of [`CompositeReward::parts`]).
    fn combine(&self, part_scores: &[f64]) -> f64;
}

/// Receives a reward's scores batch by batch: `(indices of the items, their scores)`.
pub type ScoreSink<'a> = dyn FnMut(&[usize], Vec<f64>) -> Result<()> + 'a;

/// All of `items`' scores from [`RewardModel::score_batches`], in order: the `score` of a
/// reward whose own way of scoring is by batches.
pub fn collect_scores(reward: &dyn RewardModel, items: &[ScoreItem<'_>], batch_size: usize) -> Result<Vec<f64>> {
    let mut out = vec![f64::NAN; items.len()];
    reward.score_batches(items, batch_size, &mut |indices, scores| {
        for (&i, s) in indices.iter().zip(scores) {
            out[i] = s;
        }
        Ok(())
    })?;
    Ok(out)
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

/// The plain-data view of a group that plugins see.
#[derive(Debug, Clone)]
pub struct GroupData {
    /// Rewards (finite).
    pub rewards: Vec<f64>,
    /// Source index per completion.
    pub sources: Vec<u32>,
    /// Sample index per completion.
    pub sample_indices: Vec<u32>,
    /// Source names.
    pub source_names: Vec<String>,
    /// Weights (empty before weighting).
    pub weights: Vec<f64>,
}

impl GroupData {
    /// Extract the view's data from a scored group; a missing reward is an error naming it.
    pub fn from_group(group: &crate::data::ScoredGroup) -> Result<Self> {
        let rewards = group.rewards()?;
        let (source_names, sources) = group.source_table();
        let sample_indices = group.completions.iter().map(|c| c.completion.id.sample_index).collect();
        Ok(Self { rewards, sources, sample_indices, source_names, weights: Vec::new() })
    }

    /// A group from `(source name, reward)` per completion, sample indices counted per source
    /// in order, no weights yet (for tests of weighting schemes and objectives).
    pub fn new(items: &[(&str, f64)]) -> Self {
        let mut g = Self {
            rewards: Vec::new(),
            sources: Vec::new(),
            sample_indices: Vec::new(),
            source_names: Vec::new(),
            weights: Vec::new(),
        };
        for (source, reward) in items {
            let s = match g.source_names.iter().position(|n| n == source) {
                Some(i) => i,
                None => {
                    g.source_names.push((*source).to_owned());
                    g.source_names.len() - 1
                }
            };
            g.sample_indices.push(g.sources.iter().filter(|x| **x as usize == s).count() as u32);
            g.sources.push(s as u32);
            g.rewards.push(*reward);
        }
        g
    }

    /// Borrow as a [`GroupView`].
    pub fn view(&self) -> GroupView<'_> {
        GroupView {
            rewards: &self.rewards,
            sources: &self.sources,
            sample_indices: &self.sample_indices,
            source_names: &self.source_names,
            weights: &self.weights,
        }
    }
}

/// The owned data of an [`ObjectiveBatch`] (for tests of objectives, built-in or plugin).
#[derive(Clone, Debug, Default)]
pub struct BatchData {
    /// Example offsets.
    pub offsets: Vec<usize>,
    /// Example weights.
    pub weights: Vec<f64>,
    /// Policy log-probs.
    pub policy: Vec<f64>,
    /// Reference log-probs.
    pub reference: Option<Vec<f64>>,
    /// Token counts.
    pub tokens: Vec<f64>,
    /// Rewards.
    pub rewards: Vec<f64>,
    /// Loss normaliser.
    pub normalizer: f64,
    /// Fraction of training done.
    pub progress: f64,
}

impl BatchData {
    /// Pairs `(policy_chosen, tokens_chosen, policy_rejected, tokens_rejected)`, weight 1
    /// each, normaliser = number of pairs, reference log-probs 0.
    pub fn pairs(pairs: &[(f64, f64, f64, f64)]) -> Self {
        let mut s = Self { offsets: vec![0], normalizer: pairs.len() as f64, ..Self::default() };
        for &(pw, tw, pl, tl) in pairs {
            s.policy.extend([pw, pl]);
            s.tokens.extend([tw, tl]);
            s.rewards.extend([1.0, 0.0]);
            s.weights.push(1.0);
            s.offsets.push(s.policy.len());
        }
        s.reference = Some(vec![0.0; s.policy.len()]);
        s
    }

    /// Borrow as an [`ObjectiveBatch`].
    pub fn batch(&self) -> ObjectiveBatch<'_> {
        ObjectiveBatch {
            example_offsets: &self.offsets,
            example_weights: &self.weights,
            policy_logps: &self.policy,
            reference_logps: self.reference.as_deref(),
            token_counts: &self.tokens,
            rewards: &self.rewards,
            normalizer: self.normalizer,
            progress: self.progress,
        }
    }
}
