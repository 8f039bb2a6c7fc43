//! The recipe's tables as serde types: what each key means and its default.

use serde::{Deserialize, Serialize};

use fuserl_core::backend::{BackendConfig, DType};
use fuserl_core::config::parse_table;
use fuserl_core::data::SamplingParams;

/// The recipe schema this build reads.
pub const SCHEMA_VERSION: u32 = 1;

/// `[run]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// The run's name (default: the recipe file's stem).
    #[serde(default)]
    pub name: Option<String>,
    /// The run directory (default: `runs/<name>`, relative to the working folder).
    #[serde(default)]
    pub output_dir: Option<String>,
    /// Seed of every random choice.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Experiment trackers the per-step metrics also go to (beside `metrics.jsonl`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub report_to: Vec<ReportTo>,
}

/// An experiment tracker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReportTo {
    /// TensorBoard event files in `runs/NAME/tensorboard/` (`fuserl_train::tensorboard`).
    Tensorboard,
}

fn default_seed() -> u64 {
    42
}

impl Default for RunConfig {
    fn default() -> Self {
        Self { name: None, output_dir: None, seed: default_seed(), report_to: Vec::new() }
    }
}

/// `[target]`: the model that is trained.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// A Hugging Face checkpoint folder (config.json, safetensors, tokenizer).
    pub checkpoint: String,
    /// A chat template file that overrides the checkpoint's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    /// Longest prompt + response, in tokens.
    #[serde(default = "default_max_length")]
    pub max_length: u32,
    /// Longest prompt, in tokens (default: no limit of its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_prompt_length: Option<u32>,
    /// `[target.lora]`: train LoRA adapters on the frozen target instead of all its weights.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraConfig>,
}

impl TargetConfig {
    /// The longest prompt the target's own generation takes (evaluation, FusePO's target
    /// samples): `max_prompt_length`, else `max_length - 1` (room for one new token).
    pub fn generation_prompt_length(&self) -> u32 {
        self.max_prompt_length.unwrap_or(self.max_length.saturating_sub(1).max(1))
    }
}

/// `[target.lora]`: PEFT's `LoraConfig`, with its defaults (r 8, alpha 8, no dropout, `q_proj`
/// and `v_proj`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank.
    #[serde(default = "default_lora_r")]
    pub r: u32,
    /// `lora_alpha`: the adapter's output is scaled by `alpha / r`.
    #[serde(default = "default_lora_alpha")]
    pub alpha: f64,
    /// Dropout on the adapter's input while training.
    #[serde(default)]
    pub dropout: f64,
    /// Linear layers that get an adapter (PEFT's names), or `["all-linear"]` (a string is a list
    /// of one).
    #[serde(default = "default_lora_targets", deserialize_with = "fuserl_core::config::one_or_many")]
    pub target_modules: Vec<String>,
    /// rsLoRA: scale by `alpha / sqrt(r)`.
    #[serde(default)]
    pub use_rslora: bool,
    /// QLoRA: keep the frozen base quantised in memory, dequantised a layer at a time where it
    /// is used. Absent: the base in the compute dtype.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantize_base: Option<QuantizeBase>,
}

/// `[target.lora] quantize_base`: how QLoRA keeps the frozen base.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum QuantizeBase {
    /// The blocks of the target folder's `model.gguf` as they are (`fuserl convert gguf FILE.gguf
    /// DIR --keep-quantized`): its linear layers, embeddings and head stay in their GGUF types.
    #[serde(rename = "gguf")]
    Gguf,
    /// The decoder's linear layers quantised at load to Q4_K (4.5 bits a weight; rows that are
    /// not whole 256-value super-blocks to Q5_0, as llama.cpp does).
    #[serde(rename = "q4_k")]
    Q4K,
    /// ... to Q5_K (5.5 bits; Q5_1 for other rows).
    #[serde(rename = "q5_k")]
    Q5K,
    /// ... to Q6_K (6.6 bits; Q8_0 for other rows).
    #[serde(rename = "q6_k")]
    Q6K,
    /// ... to Q8_0 (8.5 bits).
    #[serde(rename = "q8_0")]
    Q8_0,
}

impl QuantizeBase {
    /// The name as recipes spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Gguf => "gguf",
            Self::Q4K => "q4_k",
            Self::Q5K => "q5_k",
            Self::Q6K => "q6_k",
            Self::Q8_0 => "q8_0",
        }
    }
}

fn default_lora_r() -> u32 {
    8
}
fn default_lora_alpha() -> f64 {
    8.0
}
fn default_lora_targets() -> Vec<String> {
    vec!["q_proj".into(), "v_proj".into()]
}

fn default_max_length() -> u32 {
    2048
}

/// How prompts are divided between the two stages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Split {
    /// Both stages train on every prompt (FuseRL).
    #[default]
    Shared,
    /// Each prompt goes to one stage, chosen by a seeded hash (FuseChat-3.0).
    Disjoint,
}

/// `[data]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Prompt files (JSONL) for sources that generate; sources that read data files bring
    /// their own prompts.
    #[serde(default)]
    pub prompts: Vec<String>,
    /// How prompts are divided between the stages.
    #[serde(default)]
    pub split: Split,
    /// With `split = "disjoint"`: the fraction of prompts that go to preference optimisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub po_fraction: Option<f64>,
    /// Use at most this many prompts (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_prompts: Option<u64>,
    /// Samples per prompt asked of each generative source.
    #[serde(default = "default_samples")]
    pub samples_per_prompt: u32,
    /// Completions per call of the reward model.
    #[serde(default = "default_score_batch")]
    pub score_batch_size: u32,
    /// Sampling settings asked of generative sources.
    #[serde(default = "default_sampling")]
    pub sampling: SamplingParams,
}

fn default_samples() -> u32 {
    5
}
fn default_score_batch() -> u32 {
    64
}
pub(crate) fn default_sampling() -> SamplingParams {
    SamplingParams {
        temperature: Some(0.8),
        top_p: Some(0.95),
        max_new_tokens: Some(2048),
        ..SamplingParams::default()
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            prompts: Vec::new(),
            split: Split::Shared,
            po_fraction: None,
            max_prompts: None,
            samples_per_prompt: default_samples(),
            score_batch_size: default_score_batch(),
            sampling: default_sampling(),
        }
    }
}

/// Learning-rate schedule after warm-up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    /// Constant.
    Constant,
    /// Linear decay to 0.
    Linear,
    /// Cosine decay to 0.
    #[default]
    Cosine,
}

/// The model that FusePO's implicit rewards are measured against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReferenceModel {
    /// The frozen FuseSFT checkpoint (method.md).
    SftCheckpoint,
    /// The target checkpoint as loaded (when the SFT stage is skipped).
    Target,
}

/// `[sft]` and `[po]`: one training stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    /// Whether the stage runs.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Passes over the stage's examples (default: 3 for SFT, 1 for PO, as published).
    #[serde(default)]
    pub epochs: Option<u32>,
    /// Stop after this many optimiser steps (overrides `epochs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<u64>,
    /// Peak learning rate (default: 5e-6 for SFT, 8e-7 for PO, as published).
    #[serde(default)]
    pub learning_rate: Option<f64>,
    /// Schedule after warm-up.
    #[serde(default)]
    pub schedule: Schedule,
    /// Warm-up as a fraction of the optimiser steps (default 0.1 unless `warmup_steps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_ratio: Option<f64>,
    /// Warm-up in optimiser steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<u64>,
    /// Examples per micro-batch.
    #[serde(default = "default_batch")]
    pub batch_size: u32,
    /// Micro-batches per optimiser step.
    #[serde(default = "one")]
    pub grad_accum: u32,
    /// Clip the global gradient norm to this value.
    #[serde(default = "one_f")]
    pub max_grad_norm: f64,
    /// AdamW weight decay.
    #[serde(default)]
    pub weight_decay: f64,
    /// AdamW beta 1.
    #[serde(default = "beta1")]
    pub adam_beta1: f64,
    /// AdamW beta 2.
    #[serde(default = "beta2")]
    pub adam_beta2: f64,
    /// AdamW epsilon.
    #[serde(default = "adam_eps")]
    pub adam_eps: f64,
    /// Keep only each decoder layer's input from the forward pass and re-run one layer at a
    /// time in the backward pass (on by default, as in TRL's configs).
    #[serde(default = "default_true")]
    pub gradient_checkpointing: bool,
    /// Write a checkpoint every this many optimiser steps.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// Log metrics every this many optimiser steps.
    #[serde(default = "one_u64")]
    pub log_every: u64,
    /// `[po]` only: samples per prompt that the FuseSFT model generates before the stage, with
    /// `[data.sampling]`, scored by `[reward]` and added to each prompt's group under the source
    /// name `target` (WRPO's own samples, on-policy RLOO). 0: none.
    #[serde(default)]
    pub target_samples: u32,
    /// `[po]` only: the reference model (default: the model FusePO starts from: the FuseSFT
    /// checkpoint, or the target when `[sft]` is disabled). Unused by objectives without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<ReferenceModel>,
    /// The objective, `kind = "..."` plus its own keys.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub objective: Option<toml::Table>,
}

fn yes() -> bool {
    true
}
fn one() -> u32 {
    1
}
fn one_u64() -> u64 {
    1
}
fn one_f() -> f64 {
    1.0
}
fn beta1() -> f64 {
    0.9
}
fn beta2() -> f64 {
    0.999
}
fn adam_eps() -> f64 {
    1e-8
}
fn default_batch() -> u32 {
    8
}
fn default_true() -> bool {
    true
}
fn default_checkpoint_every() -> u64 {
    100
}

impl Default for StageConfig {
    fn default() -> Self {
        parse_table(&toml::Table::new()).expect("every stage key has a default")
    }
}

/// `[eval]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Whether to evaluate after training.
    #[serde(default)]
    pub enabled: bool,
    /// Evaluation prompts (JSONL); required when enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompts: Option<String>,
    /// Longest generated reply.
    #[serde(default = "default_eval_tokens")]
    pub max_new_tokens: u32,
    /// Sampling temperature (0: greedy).
    #[serde(default)]
    pub temperature: f64,
    /// Other models to compare against: `target`, `sft`, `source:NAME` or a checkpoint folder.
    #[serde(default)]
    pub baselines: Vec<String>,
    /// Answers per prompt and model (more than 1 needs a temperature above 0; verifier rewards
    /// then get pass@k for every k up to it, the HumanEval paper's unbiased estimator).
    #[serde(default = "default_eval_samples")]
    pub samples: u32,
    /// Answers fuserl's own models (the fused model, `target`, `sft`, checkpoint folders)
    /// generate together; a finished answer's place goes to the next prompt at once (continuous
    /// batching). `source:` baselines answer with their own settings.
    #[serde(default = "default_eval_batch")]
    pub batch_size: u32,
    /// A validation prompts file: the fused model alone answers it too, scored by `[reward]`
    /// (the training reward), for choosing hyperparameters without looking at the test prompts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<String>,
    /// `[eval.reward]`: the reward that scores the held-out answers (any `[reward]` kind), when
    /// not the recipe's own `[reward]` (which must then be able to score new answers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<toml::Table>,
    /// `[eval.judge]`: a pairwise judge (`kind = "judge"`, `mode = "pairwise"`) that also decides
    /// the fused model's win rate against each baseline, asked both orders of every pair.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge: Option<toml::Table>,
}

fn default_eval_samples() -> u32 {
    1
}

/// 32: evaluation answers many prompts, where larger batches pay (on a 2-core AMD EPYC, the
/// evaluation of HumanEval's 164 prompts with SmolLM2-135M took 0.78x the time of batches of 8,
/// with the same answers; docs/benchmarks.md); the KV cache of 32 answers of 1,000 positions is
/// about 1.5 GB for SmolLM2-135M in f32 and 4.2 GB for an 8B Llama in bf16 (the buffers hold up
/// to a quarter more: room to grow).
fn default_eval_batch() -> u32 {
    32
}

fn default_eval_tokens() -> u32 {
    512
}

impl Default for EvalConfig {
    fn default() -> Self {
        parse_table(&toml::Table::new()).expect("every eval key has a default")
    }
}

/// Checkpoint formats fuserl exports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExportFormat {
    /// Hugging Face folder: config.json, safetensors, tokenizer and template files.
    #[default]
    HfSafetensors,
    /// The Hugging Face folder and, in it, one llama.cpp GGUF file of `gguf_type`
    /// (`model-<TYPE>.gguf`) for llama.cpp, Ollama and LM Studio.
    Gguf,
}

/// What a GGUF export holds: a float type or one of llama.cpp's quantisation mixes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum GgufType {
    /// f32.
    #[serde(rename = "f32")]
    F32,
    /// f16 (llama.cpp's converter's default).
    #[default]
    #[serde(rename = "f16")]
    F16,
    /// bf16.
    #[serde(rename = "bf16")]
    Bf16,
    /// Q8_0.
    #[serde(rename = "q8_0")]
    Q8_0,
    /// llama.cpp's Q4_K_M mix.
    #[serde(rename = "q4_k_m")]
    Q4KM,
    /// llama.cpp's Q5_K_M mix.
    #[serde(rename = "q5_k_m")]
    Q5KM,
    /// Q6_K.
    #[serde(rename = "q6_k")]
    Q6K,
}

impl GgufType {
    /// The name as recipes and `fuserl export-gguf --type` spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
            Self::Q8_0 => "q8_0",
            Self::Q4KM => "q4_k_m",
            Self::Q5KM => "q5_k_m",
            Self::Q6K => "q6_k",
        }
    }
}

/// `[export]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// Whether to export after training.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The format.
    #[serde(default)]
    pub format: ExportFormat,
    /// Destination folder (default: `<output_dir>/export`).
    #[serde(default)]
    pub path: Option<String>,
    /// Floating-point type of the exported weights (default: the backend's).
    #[serde(default)]
    pub dtype: Option<DType>,
    /// Start a new safetensors shard above this size.
    #[serde(default = "default_shard_mb")]
    pub max_shard_size_mb: u64,
    /// What the GGUF file holds (`format = "gguf"`; default f16).
    #[serde(default)]
    pub gguf_type: Option<GgufType>,
    /// With `[target.lora]`: the adapters merged into the base's weights (a full checkpoint), or
    /// the adapter alone in PEFT's layout.
    #[serde(default)]
    pub lora: LoraExport,
}

/// `[export] lora`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoraExport {
    /// `W + s A B` written as a full checkpoint, loadable as any (transformers, vLLM, GGUF).
    #[default]
    Merged,
    /// PEFT's adapter folder (`adapter_config.json`, `adapter_model.safetensors`) on top of the
    /// target: `PeftModel.from_pretrained`, vLLM's LoRA support.
    Adapter,
}

fn default_shard_mb() -> u64 {
    5000
}

impl Default for ExportConfig {
    fn default() -> Self {
        parse_table(&toml::Table::new()).expect("every export key has a default")
    }
}

/// The recipe as written, components still as tables.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRecipe {
    pub(crate) schema_version: u32,
    #[serde(default)]
    pub(crate) plugins: Vec<String>,
    #[serde(default)]
    pub(crate) run: RunConfig,
    #[serde(default)]
    pub(crate) backend: BackendConfig,
    pub(crate) target: TargetConfig,
    #[serde(default)]
    pub(crate) data: DataConfig,
    pub(crate) sources: Vec<toml::Table>,
    pub(crate) reward: toml::Table,
    #[serde(default)]
    pub(crate) weighting: Option<toml::Table>,
    #[serde(default)]
    pub(crate) sft: StageConfig,
    #[serde(default)]
    pub(crate) po: StageConfig,
    #[serde(default)]
    pub(crate) eval: EvalConfig,
    #[serde(default)]
    pub(crate) export: ExportConfig,
}

/// A recipe with every default filled in; serialises to a valid recipe, which is written into
/// the run directory (`recipe.toml`) and read back from there by the report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    /// Always [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// Plugin libraries loaded before the components are built.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub plugins: Vec<String>,
    /// `[run]`.
    pub run: RunConfig,
    /// `[backend]`.
    pub backend: BackendConfig,
    /// `[target]`.
    pub target: TargetConfig,
    /// `[data]`.
    pub data: DataConfig,
    /// `[[sources]]`, each `kind` plus its resolved keys.
    pub sources: Vec<toml::Table>,
    /// `[reward]`.
    pub reward: toml::Table,
    /// `[weighting]`.
    pub weighting: toml::Table,
    /// `[sft]`.
    pub sft: StageConfig,
    /// `[po]`.
    pub po: StageConfig,
    /// `[eval]`.
    pub eval: EvalConfig,
    /// `[export]`.
    pub export: ExportConfig,
}
