//! The data model of a fusion dataset: prompts, the completions that source models gave,
//! the rewards that scored them, the weights a weighting scheme gave them, and the training
//! examples an objective built from them. Every example can be traced back, through
//! [`CompletionId`] and [`Origin`], to the source answer (file and line) it came from.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One chat message, as in the OpenAI / Hugging Face chat format.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self { role: "user".into(), content: content.into() }
    }
}

/// A prompt: an identifier and the conversation so far.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prompt {
    /// Stable identifier, unique within a dataset.
    pub id: String,
    /// The conversation the completions answer.
    pub messages: Vec<ChatMessage>,
}

impl Prompt {
    /// A prompt whose id is derived from its messages ([`prompt_id_for`]).
    pub fn from_messages(messages: Vec<ChatMessage>) -> Self {
        Self { id: prompt_id_for(&messages), messages }
    }
}

/// A stable id for a conversation: `p` followed by the 64-bit FNV-1a hash (hex) of the
/// messages' roles and contents. Used when a data file gives prompts without ids.
pub fn prompt_id_for(messages: &[ChatMessage]) -> String {
    let mut hash = crate::maths::Fnv1a::new();
    for m in messages {
        hash.update(m.role.as_bytes()).update(&[0]).update(m.content.as_bytes()).update(&[1]);
    }
    format!("p{:016x}", hash.finish())
}

/// How a completion was sampled (all optional: a data file may not say).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Top-k cut-off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    /// Maximum number of generated tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_new_tokens: Option<u32>,
    /// Random seed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

/// A generative source's own sampling settings (`[[sources]] sampling = {...}`), each over the
/// recipe's `[data.sampling]` ([`SamplingParams`]); named as in OpenAI's API (`max_tokens`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSampling {
    /// Softmax temperature (0: greedy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Nucleus mass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Top-k cut-off (0: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<u32>,
    /// Most new tokens per answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Stop strings (the answer is cut there).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<String>,
    /// Further fields of a server's request body, sent as given (server-specific options, such
    /// as vLLM's `min_p`); a source that sends no requests refuses them.
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    pub extra: toml::Table,
}

impl SourceSampling {
    /// Whether nothing is set (the recipe's `[data.sampling]` holds throughout).
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// The settings in effect: each of these over the recipe's `base`.
    pub fn over(&self, base: &SamplingParams) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature.or(base.temperature),
            top_p: self.top_p.or(base.top_p),
            top_k: self.top_k.or(base.top_k),
            max_new_tokens: self.max_tokens.or(base.max_new_tokens),
            seed: base.seed,
        }
    }
}

/// Which answer a completion is: prompt, source model and sample index.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CompletionId {
    /// The prompt it answers.
    pub prompt_id: String,
    /// The source model (or the target itself, for on-policy samples).
    pub source: String,
    /// Index of this sample among the source's samples for the prompt (0-based).
    pub sample_index: u32,
}

impl fmt::Display for CompletionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "prompt `{}`, source `{}`, sample {}", self.prompt_id, self.source, self.sample_index)
    }
}

/// Where a completion came from: the adapter that produced it and, for files, the place.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// The source adapter's name, for example `jsonl`.
    pub adapter: String,
    /// The file it was read from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// The 1-based line of the record, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => write!(f, "{file}:{line}"),
            (Some(file), None) => write!(f, "{file}"),
            _ => write!(f, "source adapter `{}`", self.adapter),
        }
    }
}

/// One answer of one source model to one prompt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// Which answer this is.
    pub id: CompletionId,
    /// The answer's text.
    pub text: String,
    /// How it was sampled.
    #[serde(default)]
    pub sampling: SamplingParams,
    /// Where it came from.
    pub origin: Origin,
    /// A score that came with the data (read by the `precomputed` reward model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precomputed_score: Option<f64>,
}

impl Completion {
    /// `prompt …, source …, sample … (file:line)`: how errors name this record.
    pub fn describe(&self) -> String {
        format!("{} ({})", self.id, self.origin)
    }
}

/// A reward and who gave it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reward {
    /// The score; always finite.
    pub value: f64,
    /// The reward model that gave it, for example `precomputed` or a model id.
    pub scored_by: String,
}

/// A completion with its reward, if it has been scored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScoredCompletion {
    /// The completion.
    pub completion: Completion,
    /// Its reward; `None` until scored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<Reward>,
}

/// All completions for one prompt, in a fixed order: sources in the order they were first
/// seen, then sample index.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScoredGroup {
    /// The prompt.
    pub prompt: Prompt,
    /// Its completions.
    pub completions: Vec<ScoredCompletion>,
}

impl ScoredGroup {
    /// The rewards of all completions; a missing or non-finite reward is an error that names
    /// the record.
    pub fn rewards(&self) -> Result<Vec<f64>> {
        self.completions
            .iter()
            .map(|c| match &c.reward {
                Some(r) if r.value.is_finite() => Ok(r.value),
                Some(r) => Err(Error::Record {
                    record: c.completion.describe(),
                    message: format!("reward {} from `{}` is not a finite number", r.value, r.scored_by),
                }),
                None => Err(Error::Record {
                    record: c.completion.describe(),
                    message: "has no reward: the reward model did not score it".into(),
                }),
            })
            .collect()
    }

    /// The distinct source names in order of first appearance, and for each completion the
    /// index of its source in that list.
    pub fn source_table(&self) -> (Vec<String>, Vec<u32>) {
        // An index by name: a prompt may have many sources (a search through the names for
        // each completion made 100,000 sources take 10^10 comparisons).
        let mut names: Vec<String> = Vec::new();
        let mut index: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
        let mut ids = Vec::with_capacity(self.completions.len());
        for c in &self.completions {
            let source = c.completion.id.source.as_str();
            let id = *index.entry(source).or_insert_with(|| {
                names.push(source.to_owned());
                names.len() - 1
            });
            ids.push(u32::try_from(id).unwrap_or(u32::MAX));
        }
        (names, ids)
    }
}

/// A scored group with one weight per completion (zero for completions that are not
/// candidates). Weights of a group sum to 1.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WeightedGroup {
    /// The scored group.
    pub group: ScoredGroup,
    /// One weight per completion, in the group's order.
    pub weights: Vec<f64>,
    /// The weighting scheme that gave them.
    pub weighted_by: String,
}

/// The part one completion plays in a training example.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExampleSequence {
    /// Which completion.
    pub completion: CompletionId,
    /// Where it came from.
    pub origin: Origin,
    /// Its reward.
    pub reward: f64,
}

/// One training example: the completions an objective looks at together (one for SFT, a
/// (chosen, rejected) pair for DPO and SimPO, a triplet for WRPO, a group for RLOO), with
/// the example's weight. The meaning of each position is the objective's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Example {
    /// The prompt.
    pub prompt_id: String,
    /// The objective that built it.
    pub objective: String,
    /// The example's weight in the loss.
    pub weight: f64,
    /// The completions, in the order the objective expects.
    pub sequences: Vec<ExampleSequence>,
    /// Extra facts about how it was built (for example the pair's reward gap).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub notes: BTreeMap<String, f64>,
}

/// Which training stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StageName {
    /// FuseSFT.
    Sft,
    /// FusePO.
    Po,
}

impl StageName {
    /// `sft` or `po`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sft => "sft",
            Self::Po => "po",
        }
    }
}

/// Check a generative source's `name` (it names its store file): non-empty, no slashes, not
/// hidden. For the constructors of generative sources, built-in or plugin.
pub fn check_source_name(name: &str) -> std::result::Result<(), crate::config::ConfigError> {
    if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
        return Err(crate::config::ConfigError::at("name", "expected a non-empty source name without slashes"));
    }
    Ok(())
}
