//! `classifier`: a Hugging Face `*ForSequenceClassification` reward model (Skywork-Reward, a
//! TRL `RewardTrainer` model) run by fuserl itself, on the recipe's backend or its own device.
//!
//! ```toml
//! [reward]
//! kind = "classifier"
//! checkpoint = "models/Skywork-Reward-V2-Qwen3-0.6B"
//! batch_size = 8                  # conversations per forward pass (batched by length)
//! label = "helpfulness"           # with several labels: which one is the score (name or index)
//! # label_weights = { helpfulness = 1.0, verbosity = -0.5 }   # or a weighted sum of labels
//! device = "cpu"                  # default: the recipe's [backend] device and dtype
//! ```
//!
//! Each answer is scored as the conversation (the prompt's messages, then the answer as the
//! assistant's turn) rendered with the reward model's own chat template and tokenized as
//! transformers' `apply_chat_template(conversation, tokenize=True)` does; the score head is read
//! at the token transformers reads it at ([`fuserl_model::classifier`]).

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::tensor::DType;
use fuserl_backends::{LogProbBackend, OnBackend};
use fuserl_core::backend::{DType as RecipeDType, Device};
use fuserl_core::config::ConfigError;
use fuserl_core::data::ChatMessage;
use fuserl_core::extension::{RewardModel, ScoreItem, ScoreSink};
use fuserl_core::paths::Shown;
use fuserl_core::registry::{BuildContext, Built, PluginDescriptor, StaticFactory, build_component};
use fuserl_core::{Error, Result};
use fuserl_model::chat::ChatTokenizer;
use fuserl_model::classifier::{ClassifierHead, classifier_config, load_classifier};
use serde::{Deserialize, Serialize};

/// `[reward] kind = "classifier"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifierConfig {
    /// A `*ForSequenceClassification` checkpoint folder, relative to the recipe.
    pub checkpoint: String,
    /// A chat template file instead of the checkpoint's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    /// Conversations per forward pass.
    #[serde(default = "default_batch")]
    pub batch_size: u32,
    /// Which label is the score (its name in `id2label`, or its index); default: the only one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The score as a weighted sum of labels (by name); instead of `label`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub label_weights: BTreeMap<String, f64>,
    /// The device (default: the recipe's `[backend] device`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<Device>,
    /// The floating-point type (default: the recipe's `[backend] dtype`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<RecipeDType>,
}

fn default_batch() -> u32 {
    8
}

/// Where and how a classifier runs.
#[derive(Clone, Debug)]
pub struct Placement {
    /// The device.
    pub device: Device,
    /// Its index.
    pub device_index: u32,
    /// The floating-point type.
    pub dtype: RecipeDType,
    /// Burn's fusion backend on a GPU device (`[backend] fusion`).
    pub fusion: bool,
}

/// A reward model checkpoint that fuserl runs.
#[derive(Debug)]
pub struct ClassifierReward {
    checkpoint: PathBuf,
    template: Option<PathBuf>,
    batch_size: usize,
    /// One weight per label: the score is their weighted sum.
    weights: Vec<f64>,
    head: ClassifierHead,
    placement: Placement,
    /// Computed once: hashing the weights reads every byte of them.
    fingerprint: std::sync::OnceLock<String>,
}

impl ClassifierReward {
    /// Build: read the checkpoint's config and check the label choice; the weights are loaded
    /// when scoring starts.
    pub fn new(config: ClassifierConfig, ctx: &BuildContext) -> Result<Self, ConfigError> {
        let checkpoint = ctx.resolve(&config.checkpoint);
        let file = checkpoint.join("config.json");
        let json = fuserl_model::config::read_json(&file).map_err(|e| ConfigError::at("checkpoint", e.to_string()))?;
        let (_, head) = classifier_config(&json, &file).map_err(|e| ConfigError::at("checkpoint", e.to_string()))?;
        if config.batch_size == 0 {
            return Err(ConfigError::at("batch_size", "expected at least 1"));
        }
        let weights = label_weights(&head, config.label.as_deref(), &config.label_weights)?;
        let (device, device_index) = match config.device {
            Some(d) => (d, 0),
            None => (ctx.backend.device, ctx.backend.device_index),
        };
        let dtype = config.dtype.unwrap_or(ctx.backend.dtype);
        fuserl_backends::check(device, dtype).map_err(|e| ConfigError::at("device", e.to_string()))?;
        Ok(Self {
            checkpoint,
            template: config.chat_template.as_deref().map(|t| ctx.resolve(t)),
            batch_size: config.batch_size as usize,
            weights,
            head,
            placement: Placement { device, device_index, dtype, fusion: ctx.backend.fusion },
            fingerprint: std::sync::OnceLock::new(),
        })
    }

    /// The head: labels and pad id.
    pub fn head(&self) -> &ClassifierHead {
        &self.head
    }
}

/// One weight per label from the recipe's choice: a label (name or index), weights by name, or
/// (neither) the only label.
fn label_weights(
    head: &ClassifierHead,
    label: Option<&str>,
    by_name: &BTreeMap<String, f64>,
) -> Result<Vec<f64>, ConfigError> {
    let n = head.labels.len();
    let names = || head.labels.iter().enumerate().map(|(i, l)| format!("{i}: {l}")).collect::<Vec<_>>().join(", ");
    let find = |name: &str| {
        head.labels.iter().position(|l| l == name).or_else(|| name.parse::<usize>().ok().filter(|&i| i < n))
    };
    match (label, by_name.is_empty()) {
        (Some(_), false) => Err(ConfigError::at("label", "give `label` or `label_weights`, not both")),
        (Some(l), true) => {
            let i = find(l).ok_or_else(|| {
                ConfigError::at("label", format!("the reward model has no label `{l}`; its labels: {}", names()))
            })?;
            Ok((0..n).map(|j| if j == i { 1.0 } else { 0.0 }).collect())
        }
        (None, false) => {
            let mut w = vec![0.0; n];
            for (name, weight) in by_name {
                let i = find(name).ok_or_else(|| {
                    ConfigError::at(
                        "label_weights",
                        format!("the reward model has no label `{name}`; its labels: {}", names()),
                    )
                })?;
                if !weight.is_finite() {
                    return Err(ConfigError::at("label_weights", format!("`{name}`: expected a finite weight")));
                }
                w[i] = *weight;
            }
            Ok(w)
        }
        (None, true) if n == 1 => Ok(vec![1.0]),
        (None, true) => Err(ConfigError::at(
            "label",
            format!(
                "the reward model has {n} labels ({}); say which is the score (`label`) or weigh them (`label_weights`)",
                names()
            ),
        )),
    }
}

/// Receives a batch's indices (into the conversations) and logits (one row per label).
pub type OnBatch<'a> = dyn FnMut(&[usize], Vec<Vec<f32>>) -> Result<()> + 'a;

/// Run a classifier checkpoint over `conversations` in batches of `batch_size` sequences, the
/// longest first; `on_batch` gets each batch's indices into `conversations` and logits.
pub fn classify(
    checkpoint: &std::path::Path,
    template: Option<&std::path::Path>,
    placement: &Placement,
    conversations: &[Vec<ChatMessage>],
    batch_size: usize,
    on_batch: &mut OnBatch<'_>,
) -> Result<()> {
    struct Job<'a> {
        checkpoint: &'a std::path::Path,
        template: Option<&'a std::path::Path>,
        dtype: DType,
        conversations: &'a [Vec<ChatMessage>],
        batch_size: usize,
        on_batch: &'a mut OnBatch<'a>,
    }
    impl OnBackend for Job<'_> {
        type Output = Result<()>;
        fn run<B: LogProbBackend>(self, device: B::Device) -> Result<()> {
            let model_error = |e: fuserl_model::ModelError| Error::Component {
                point: "reward model",
                name: "classifier".into(),
                message: e.to_string(),
            };
            let tok = ChatTokenizer::load(self.checkpoint, self.template).map_err(model_error)?;
            let rm = load_classifier::<B>(self.checkpoint, &device, self.dtype).map_err(model_error)?;
            tok.check_fits(rm.model.config.vocab_size).map_err(model_error)?;
            // Conversations are scored whole, past the model's positions too, as transformers
            // does; the bound is only for what tokenizing may cost (a conversation's text is
            // not tokenized past it: a hostile template or normaliser can make gigabytes).
            let most = rm.model.config.max_position_embeddings.saturating_mul(4).max(1 << 17);
            let mut ids = Vec::with_capacity(self.conversations.len());
            for (i, c) in self.conversations.iter().enumerate() {
                // A template or tokenizer error is the checkpoint's; a conversation too long is
                // named with the bound.
                ids.push(tok.conversation_ids(c, most).map_err(|e| match e {
                    fuserl_model::ModelError::Input(m) => model_error(fuserl_model::ModelError::Input(format!(
                        "conversation {} of the batch: {m} (four times the model's positions, at least 131072), \
                         refused before tokenizing all of it",
                        i + 1
                    ))),
                    other => model_error(other),
                })?);
            }
            let mut order: Vec<usize> = (0..ids.len()).collect();
            order.sort_by_key(|&i| std::cmp::Reverse(ids[i].len()));
            // On the CPU a batch is cut into shards, one per thread, each padded on its own: most
            // of the CPU backend's element-wise kernels run on the calling thread only.
            let shards = B::host_shards(&device).max(1);
            for chunk in order.chunks(self.batch_size.max(1)) {
                let seqs: Vec<Vec<u32>> = chunk.iter().map(|&i| ids[i].clone()).collect();
                let parts: Vec<&[Vec<u32>]> = seqs.chunks(seqs.len().div_ceil(shards).max(1)).collect();
                // Each shard's forward on a thread of the backend's pool (`in_pool`): the products
                // inside split by work-stealing instead of waking the pool for each.
                let logits = if parts.len() <= 1 {
                    B::in_pool(|| rm.logits(&seqs)).map_err(model_error)?
                } else {
                    let rm = &rm;
                    let results: Vec<fuserl_model::Result<Vec<Vec<f32>>>> = std::thread::scope(|scope| {
                        let handles: Vec<_> =
                            parts.iter().map(|part| scope.spawn(move || B::in_pool(|| rm.logits(part)))).collect();
                        handles
                            .into_iter()
                            .map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
                            .collect()
                    });
                    let mut all = Vec::with_capacity(seqs.len());
                    for r in results {
                        all.extend(r.map_err(model_error)?);
                    }
                    all
                };
                (self.on_batch)(chunk, logits)?;
            }
            Ok(())
        }
    }
    let job = Job {
        checkpoint,
        template,
        dtype: fuserl_backends::burn_dtype(placement.dtype),
        conversations,
        batch_size,
        on_batch,
    };
    let p = placement;
    fuserl_backends::on_backend_with(p.device, p.device_index, p.dtype, p.fusion, job).map_err(|e| {
        Error::Component { point: "reward model", name: "classifier".into(), message: format!("device: {e}") }
    })?
}

impl RewardModel for ClassifierReward {
    fn name(&self) -> &str {
        "classifier"
    }

    fn scorer_id(&self) -> String {
        format!(
            "classifier:{}",
            self.checkpoint.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        )
    }

    fn fingerprint(&self) -> String {
        self.fingerprint
            .get_or_init(|| {
                let weights = crate::local::weights_hash(&self.checkpoint)
                    .map_or_else(|e| format!("unreadable: {e}"), |h| format!("{h:016x}"));
                let template = self.template.as_ref().and_then(|t| std::fs::read_to_string(t).ok());
                serde_json::json!({
                    "kind": "classifier",
                    "weights": weights,
                    "chat_template": template,
                    "dtype": self.placement.dtype,
                    "label_weights": self.weights,
                })
                .to_string()
            })
            .clone()
    }

    fn score(&self, items: &[ScoreItem<'_>]) -> Result<Vec<f64>> {
        fuserl_core::extension::collect_scores(self, items, self.batch_size)
    }

    fn score_batches(&self, items: &[ScoreItem<'_>], _batch_size: usize, sink: &mut ScoreSink<'_>) -> Result<()> {
        let conversations: Vec<Vec<ChatMessage>> = items
            .iter()
            .map(|item| {
                let mut c = item.messages.to_vec();
                c.push(ChatMessage { role: "assistant".into(), content: item.completion.text.clone() });
                c
            })
            .collect();
        tracing::info!(checkpoint = %Shown(&self.checkpoint), answers = items.len(), "scoring with a reward model");
        classify(
            &self.checkpoint,
            self.template.as_deref(),
            &self.placement,
            &conversations,
            self.batch_size,
            &mut |indices, logits| {
                let scores = logits
                    .iter()
                    .map(|l| l.iter().zip(&self.weights).map(|(x, w)| f64::from(*x) * w).sum::<f64>())
                    .collect();
                sink(indices, scores)
            },
        )
    }
}

fn build(t: &toml::Table, ctx: &BuildContext) -> Result<Built<dyn RewardModel>, ConfigError> {
    build_component(t, ctx, |c: ClassifierConfig, ctx| {
        Ok(Box::new(ClassifierReward::new(c, ctx)?) as Box<dyn RewardModel>)
    })
}

inventory::submit! { PluginDescriptor { name: "classifier", origin: env!("CARGO_PKG_NAME"),
summary: "a Hugging Face *ForSequenceClassification reward model run in-process (score head at the last token)",
factory: StaticFactory::Reward(build) } }
