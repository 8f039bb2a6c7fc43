//! Sequence classifiers (`*ForSequenceClassification`), the usual shape of a reward model
//! (Skywork-Reward, the RLHF reward heads of TRL's `RewardTrainer`): the decoder of any supported
//! family, then a linear `score` head `[num_labels, hidden]` without bias, read at one token per
//! sequence.
//!
//! Which token: transformers' rule, followed exactly. With a pad id in the config, the rightmost
//! token that is not the pad id (so a conversation that itself ends in the pad token is scored
//! before it; a sequence of nothing but pad tokens at index 0); without one, the last token.
//! transformers refuses batches without a pad id; here every sequence is padded by length, so a
//! batch gives what each sequence alone gives.
//!
//! | architecture | decoder |
//! |---|---|
//! | `LlamaForSequenceClassification` | `LlamaForCausalLM` |
//! | `MistralForSequenceClassification` | `MistralForCausalLM` |
//! | `Qwen2ForSequenceClassification` | `Qwen2ForCausalLM` |
//! | `Qwen3ForSequenceClassification` | `Qwen3ForCausalLM` |
//! | `Gemma3TextForSequenceClassification` | `Gemma3ForCausalLM` |
//! | `Gemma3ForSequenceClassification` | `Gemma3ForConditionalGeneration` (its text part) |

use std::path::Path;

use burn::tensor::{DType, Int, Tensor, TensorData};
use fuserl_kernels::LogProbBackend;
use serde_json::Value;

use crate::checkpoint::{TensorStore, build_frozen};
use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::llama::{Inputs, LlamaModel};
use fuserl_core::paths::Shown;

/// Sequence-classification architectures, each with the causal LM whose decoder it uses.
pub const CLASSIFIER_ARCHITECTURES: [(&str, &str); 6] = [
    ("LlamaForSequenceClassification", "LlamaForCausalLM"),
    ("MistralForSequenceClassification", "MistralForCausalLM"),
    ("Qwen2ForSequenceClassification", "Qwen2ForCausalLM"),
    ("Qwen3ForSequenceClassification", "Qwen3ForCausalLM"),
    ("Gemma3TextForSequenceClassification", "Gemma3ForCausalLM"),
    ("Gemma3ForSequenceClassification", "Gemma3ForConditionalGeneration"),
];

/// The head of a sequence classifier, from its `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassifierHead {
    /// The checkpoint's architecture (for example `Qwen2ForSequenceClassification`).
    pub architecture: String,
    /// One name per label, in order (`id2label`, or `LABEL_i`).
    pub labels: Vec<String>,
    /// The pad id transformers reads the scored token by; `None`: the last token.
    pub pad_token_id: Option<u32>,
}

/// A decoder with a `score` head.
#[derive(Debug)]
pub struct SequenceClassifier<B: burn::tensor::backend::Backend> {
    /// The decoder (its language-model head is not used and not loaded).
    pub model: LlamaModel<B>,
    /// `[hidden, num_labels]`.
    pub score: Tensor<B, 2>,
    /// Labels and the pad id.
    pub head: ClassifierHead,
}

/// Whether `config.json` (parsed) describes a sequence classifier.
pub fn is_classifier(v: &Value) -> bool {
    first_architecture(v).is_some_and(|a| CLASSIFIER_ARCHITECTURES.iter().any(|(c, _)| *c == a))
}

fn first_architecture(v: &Value) -> Option<&str> {
    v.get("architectures").and_then(|a| a.get(0)).and_then(Value::as_str)
}

/// Read the head's settings and the decoder's config from a classifier's `config.json`.
pub fn classifier_config(v: &Value, file: &Path) -> Result<(LlamaConfig, ClassifierHead)> {
    let architecture = first_architecture(v).unwrap_or("(none)").to_owned();
    let Some((_, causal)) = CLASSIFIER_ARCHITECTURES.iter().find(|(c, _)| *c == architecture) else {
        return Err(ModelError::Unsupported {
            file: file.to_path_buf(),
            what: format!(
                "architecture `{architecture}` for a sequence classifier (reward model); supported: {}",
                CLASSIFIER_ARCHITECTURES.iter().map(|(c, _)| *c).collect::<Vec<_>>().join(", ")
            ),
        });
    };
    let mut decoder = v.clone();
    decoder["architectures"] = serde_json::json!([causal]);
    let mut config = LlamaConfig::from_json(&decoder, file)?;
    // A classifier has no language-model head; the decoder is built as if tied so that none is
    // looked for.
    config.tie_word_embeddings = true;
    let text = if *causal == "Gemma3ForConditionalGeneration" { v.get("text_config").unwrap_or(v) } else { v };
    let pad_token_id = match text.get("pad_token_id").or_else(|| v.get("pad_token_id")) {
        None | Some(Value::Null) => None,
        Some(p) => Some(
            p.as_u64()
                .and_then(|p| u32::try_from(p).ok())
                .ok_or_else(|| ModelError::format(file, format!("`pad_token_id` is {p}; expected a token id")))?,
        ),
    };
    let labels: Vec<String> = match v.get("id2label") {
        Some(Value::Object(map)) if !map.is_empty() => {
            let mut labels = vec![None; map.len()];
            for (k, name) in map {
                let i = k.parse::<usize>().ok().filter(|&i| i < map.len()).ok_or_else(|| {
                    ModelError::format(file, format!("`id2label` has the key `{k}`; expected 0..{}", map.len()))
                })?;
                labels[i] = Some(name.as_str().map_or_else(|| name.to_string(), str::to_owned));
            }
            labels.into_iter().map(|l| l.expect("every index 0..n appears once")).collect()
        }
        _ => {
            // transformers' default when neither is saved: 2 labels.
            let n = v.get("num_labels").and_then(Value::as_u64).unwrap_or(2) as usize;
            (0..n).map(|i| format!("LABEL_{i}")).collect()
        }
    };
    if labels.is_empty() {
        return Err(ModelError::format(file, "the classifier has no labels (`id2label` / `num_labels`)"));
    }
    Ok((config, ClassifierHead { architecture, labels, pad_token_id }))
}

/// Load a `*ForSequenceClassification` checkpoint folder into `dtype` on `device` (frozen: see
/// [`crate::checkpoint::load_frozen`]).
pub fn load_classifier<B: LogProbBackend>(
    dir: &Path,
    device: &B::Device,
    dtype: DType,
) -> Result<SequenceClassifier<B>> {
    let config_file = crate::checkpoint::config_file(dir)?;
    let json = crate::config::read_json(&config_file)?;
    let (config, head) = classifier_config(&json, &config_file)?;
    let mut store = TensorStore::read_dir(dir)?;
    let (h, n) = (config.hidden_size, head.labels.len());
    let score = store.take("score.weight", &[n, h], dir)?;
    if head.architecture == "Gemma3ForSequenceClassification" {
        store.rename(crate::gemma3::text_tensor_name);
    }
    let _span = tracing::info_span!("load", dir = %Shown(dir)).entered();
    // Forward only: a checkpoint stored in bf16 keeps bf16 weights on the CPU (half the memory,
    // the same products), as generation's frozen models do.
    let model = build_frozen(config, store, dir, device, dtype)?;
    // [labels, hidden] -> [hidden, labels]
    let score = Tensor::<B, 2>::from_data(TensorData::new(score, [n, h]), (device, dtype)).transpose();
    tracing::info!(architecture = %head.architecture, labels = n, layers = model.config.num_layers, "loaded reward model");
    Ok(SequenceClassifier { model, score, head })
}

impl<B: LogProbBackend> SequenceClassifier<B> {
    /// Number of labels.
    pub fn num_labels(&self) -> usize {
        self.head.labels.len()
    }

    /// The index of the token each sequence is scored at (transformers' rule; see the module).
    pub fn scored_index(&self, ids: &[u32]) -> usize {
        match self.head.pad_token_id {
            Some(pad) => ids.iter().rposition(|&t| t != pad).unwrap_or(0),
            None => ids.len().saturating_sub(1),
        }
    }

    /// The logits of each sequence, `[labels]` per sequence, in one right-padded batch.
    pub fn logits(&self, seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(i) = seqs.iter().position(Vec::is_empty) {
            return Err(ModelError::Input(format!("sequence {i} of the batch has no tokens")));
        }
        let vocab = self.model.config.vocab_size;
        if let Some(&bad) = seqs.iter().flatten().find(|&&t| t as usize >= vocab) {
            return Err(ModelError::Input(format!("token id {bad} is outside the model's vocabulary of {vocab}")));
        }
        let inputs = Inputs::right_padded(seqs, self.head.pad_token_id.unwrap_or(0));
        let hidden = self.model.hidden(&inputs, &inputs.valid, None);
        let [b, t, h] = hidden.dims();
        let rows: Vec<i64> = seqs.iter().enumerate().map(|(i, s)| (i * t + self.scored_index(s)) as i64).collect();
        let device = self.model.device();
        let index = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [b]), &device);
        let pooled = hidden.reshape([b * t, h]).select(0, index);
        let logits = pooled.matmul(self.score.clone()).cast(DType::F32);
        let n = self.num_labels();
        let values: Vec<f32> = logits.into_data().iter::<f32>().collect();
        Ok(values.chunks(n).map(<[f32]>::to_vec).collect())
    }
}
