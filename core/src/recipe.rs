//! Recipes, schema version 1: one TOML file describes a whole two-stage run.
//!
//! Parsing is strict: unknown keys and wrong types are errors, every component validates its
//! own table, and every error names the file, line and column, the key path, what was
//! expected and, for closed sets, the valid choices. A loaded recipe can be written back with
//! every default filled in ([`LoadedRecipe::resolved_toml`]); that text is itself a valid recipe.
//!
//! ```toml
//! schema_version = 1
//! [run]        # name, output_dir, seed
//! [backend]    # device, dtype
//! [target]     # checkpoint, chat_template, max_length
//! [data]       # prompts, split between stages, sampling for generative sources
//! [[sources]]  # kind = "jsonl" | <plugin>, with the plugin's own keys
//! [reward]     # kind = "precomputed" | <plugin>
//! [weighting]  # kind = "softmax" | "best-only" | "uniform" | "rank" | <plugin>
//! [sft]        # training settings; [sft.objective] kind = "sft" | <plugin>
//! [po]         # training settings; [po.objective] kind = "dpo" | "simpo" | "rloo" | "wrpo" | <plugin>
//! [eval]       # evaluation prompts and settings
//! [export]     # format and path of the fused model
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, KeyPath, check, parse_table};
use crate::data::SamplingParams;
use crate::error::{Error, Result};
use crate::extension::{PreferenceObjective, RewardModel, SourceAdapter, WeightingScheme};
use crate::location::Locator;
use crate::registry::{BuildContext, BuildError, Built, Registry, split_kind};

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
    /// TensorBoard event files in `runs/NAME/tensorboard/` ([`crate::tensorboard`]).
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

/// Where the tensors live. Which of these a build can use depends on its cargo features.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Device {
    /// The CPU (Burn's flex backend), always available.
    #[default]
    Cpu,
    /// wgpu with its default adapter (Vulkan, Metal, DX12 or WebGPU).
    Wgpu,
    /// wgpu on Vulkan with cubecl's SPIR-V compiler.
    Vulkan,
    /// wgpu on Metal.
    Metal,
    /// WebGPU.
    Webgpu,
    /// NVIDIA CUDA.
    Cuda,
    /// AMD ROCm (HIP).
    Rocm,
}

/// Floating-point type of the weights and activations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DType {
    /// 32-bit float.
    #[default]
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16.
    Bf16,
}

/// `[backend]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// The device kind.
    #[serde(default)]
    pub device: Device,
    /// Which device of that kind (0 for the first).
    #[serde(default)]
    pub device_index: u32,
    /// Floating-point type.
    #[serde(default)]
    pub dtype: DType,
    /// How training computes per-token log-probs.
    #[serde(default)]
    pub logprobs: LogProbPath,
}

/// `[backend] logprobs`: the path from hidden states to per-token log-probs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogProbPath {
    /// The LM-head projection fused with the log-prob, in vocabulary chunks with an online
    /// log-sum-exp: never holds the `[tokens, vocab]` logits (cubecl kernels on GPU backends).
    #[default]
    Fused,
    /// Full logits, `log_softmax` and `gather` through Burn's autodiff (for comparison).
    Naive,
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
fn default_sampling() -> SamplingParams {
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
struct RawRecipe {
    schema_version: u32,
    #[serde(default)]
    plugins: Vec<String>,
    #[serde(default)]
    run: RunConfig,
    #[serde(default)]
    backend: BackendConfig,
    target: TargetConfig,
    #[serde(default)]
    data: DataConfig,
    sources: Vec<toml::Table>,
    reward: toml::Table,
    #[serde(default)]
    weighting: Option<toml::Table>,
    #[serde(default)]
    sft: StageConfig,
    #[serde(default)]
    po: StageConfig,
    #[serde(default)]
    eval: EvalConfig,
    #[serde(default)]
    export: ExportConfig,
}

/// A recipe with every default filled in; serialises to a valid recipe.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Recipe {
    /// Always [`SCHEMA_VERSION`].
    pub schema_version: u32,
    /// Plugin libraries loaded before the components are built.
    #[serde(skip_serializing_if = "Vec::is_empty")]
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

/// The components a recipe names, built.
#[derive(Debug)]
pub struct Components {
    /// One per `[[sources]]`.
    pub sources: Vec<Box<dyn SourceAdapter>>,
    /// `[reward]`.
    pub reward: Box<dyn RewardModel>,
    /// `[weighting]`.
    pub weighting: Box<dyn WeightingScheme>,
    /// `[sft.objective]`.
    pub sft_objective: Box<dyn PreferenceObjective>,
    /// `[po.objective]`.
    pub po_objective: Box<dyn PreferenceObjective>,
    /// `[eval.reward]`, when the recipe has one.
    pub eval_reward: Option<Box<dyn RewardModel>>,
    /// `[eval.judge]`, when the recipe has one (a pairwise judge).
    pub eval_judge: Option<Box<dyn RewardModel>>,
}

/// A parsed, validated recipe and its built components.
#[derive(Debug)]
pub struct LoadedRecipe {
    /// The recipe file.
    pub file: PathBuf,
    /// The resolved recipe.
    pub recipe: Recipe,
    /// Its components.
    pub components: Components,
    /// Relative paths in the recipe are resolved against this folder.
    pub base_dir: PathBuf,
}

impl LoadedRecipe {
    /// The resolved recipe as TOML text: a valid recipe with every default written out.
    pub fn resolved_toml(&self) -> Result<String> {
        toml::to_string(&self.recipe).map_err(|e| Error::Component {
            point: "recipe",
            name: self.file.display().to_string(),
            message: format!("cannot write the resolved recipe: {e}"),
        })
    }

    /// The run directory. Outputs (`[run] output_dir`, `[export] path`) are relative to the
    /// working folder, like TRL's `output_dir`; inputs (data, checkpoints) to the recipe's folder.
    pub fn output_dir(&self) -> PathBuf {
        PathBuf::from(self.recipe.run.output_dir.as_deref().unwrap_or("runs"))
    }

    /// The export folder (relative to the working folder, like [`LoadedRecipe::output_dir`]).
    pub fn export_dir(&self) -> PathBuf {
        self.recipe.export.path.as_deref().map_or_else(|| self.output_dir().join("export"), PathBuf::from)
    }
}

/// Loads the plugin libraries a recipe names in `plugins = [...]` (implemented by the plugin ABI
/// crate, which the core cannot depend on).
pub trait PluginLoader {
    /// Load the plugin `spec` (a path relative to `base_dir`, or a bare library name) into
    /// `registry`; a message on failure.
    fn load(&self, spec: &str, base_dir: &Path, registry: &mut Registry) -> std::result::Result<(), String>;
}

/// Read, parse, validate and build the recipe at `path`. A recipe that names plugins needs
/// [`load_recipe_with`].
pub fn load_recipe(path: &Path, registry: &Registry) -> Result<LoadedRecipe> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_recipe(&text, path, registry)
}

/// Like [`load_recipe`], loading the recipe's plugins into `registry` with `loader` first.
pub fn load_recipe_with(path: &Path, registry: &mut Registry, loader: &dyn PluginLoader) -> Result<LoadedRecipe> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_recipe_with(&text, path, registry, Some(loader))
}

/// Parse, validate and build a recipe from `text`; `file` is used in messages and to resolve
/// relative paths.
pub fn parse_recipe(text: &str, file: &Path, registry: &Registry) -> Result<LoadedRecipe> {
    parse_recipe_with(text, file, &mut registry.clone(), None)
}

/// Parse, validate and build a recipe, loading the plugins it names with `loader`.
pub fn parse_recipe_with(
    text: &str,
    file: &Path,
    registry: &mut Registry,
    loader: Option<&dyn PluginLoader>,
) -> Result<LoadedRecipe> {
    let locator = Locator::new(text);
    let at = |err: ConfigError| -> Error {
        let (line, column) = locator.locate(&err.path);
        Error::Recipe { file: file.to_path_buf(), line, column, path: err.path.to_string(), message: err.message }
    };

    let table: toml::Table = toml::from_str(text).map_err(|e| {
        let (line, column) = locator.line_col(e.span().map_or(0, |s| s.start));
        Error::Recipe {
            file: file.to_path_buf(),
            line,
            column,
            path: String::new(),
            message: format!("invalid TOML: {}", e.message().trim()),
        }
    })?;
    // Look at the version first: a newer recipe should say so, not list unknown keys.
    match table.get("schema_version") {
        Some(toml::Value::Integer(v)) if *v == i64::from(SCHEMA_VERSION) => {}
        Some(toml::Value::Integer(v)) => {
            return Err(at(ConfigError::at(
                "schema_version",
                format!("unsupported schema version {v}; this fuserl reads version {SCHEMA_VERSION}"),
            )));
        }
        _ => {}
    }
    let raw: RawRecipe = parse_table(&table).map_err(at)?;
    if raw.schema_version != SCHEMA_VERSION {
        return Err(at(ConfigError::at(
            "schema_version",
            format!("unsupported schema version {}; this fuserl reads version {SCHEMA_VERSION}", raw.schema_version),
        )));
    }

    let stem = file.file_stem().map_or_else(|| "run".to_owned(), |s| s.to_string_lossy().into_owned());
    let mut run = raw.run;
    let name = run.name.clone().unwrap_or(stem);
    if name.is_empty() || name.contains(['/', '\\']) {
        return Err(at(ConfigError::new(KeyPath::keys(&["run", "name"]), "expected a non-empty name without slashes")));
    }
    run.name = Some(name.clone());
    let output_dir = run.output_dir.clone().unwrap_or_else(|| format!("runs/{name}"));
    run.output_dir = Some(output_dir.clone());

    validate_target(&raw.target).map_err(|e| at(e.prefixed(&KeyPath::keys(&["target"]))))?;
    let data = validate_data(raw.data).map_err(|e| at(e.prefixed(&KeyPath::keys(&["data"]))))?;
    let sft = resolve_stage(raw.sft, Stage::Sft).map_err(|e| at(e.prefixed(&KeyPath::keys(&["sft"]))))?;
    let mut po = resolve_stage(raw.po, Stage::Po).map_err(|e| at(e.prefixed(&KeyPath::keys(&["po"]))))?;
    // The reference defaults to the model FusePO starts from, as TRL's `ref_model=None` does:
    // the FuseSFT checkpoint, or the target when FuseSFT is disabled.
    let explicit_reference = po.reference.is_some();
    po.reference =
        Some(po.reference.unwrap_or(if sft.enabled { ReferenceModel::SftCheckpoint } else { ReferenceModel::Target }));
    validate_eval(&raw.eval).map_err(|e| at(e.prefixed(&KeyPath::keys(&["eval"]))))?;
    let mut export = raw.export;
    validate_export(&export).map_err(|e| at(e.prefixed(&KeyPath::keys(&["export"]))))?;
    export.path = Some(export.path.unwrap_or_else(|| format!("{output_dir}/export")));
    export.dtype = Some(export.dtype.unwrap_or(raw.backend.dtype));

    let base_dir = file.parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let base_dir = if base_dir.as_os_str().is_empty() { PathBuf::from(".") } else { base_dir };
    let ctx = BuildContext { base_dir: base_dir.clone(), seed: run.seed, backend: raw.backend.clone() };

    for (i, spec) in raw.plugins.iter().enumerate() {
        let here = KeyPath::keys(&["plugins"]).index(i);
        let Some(loader) = loader else {
            return Err(at(ConfigError::new(here, "this program cannot load plugin libraries")));
        };
        loader.load(spec, &base_dir, registry).map_err(|message| at(ConfigError::new(here, message)))?;
    }
    let registry: &Registry = registry;

    if raw.sources.is_empty() {
        return Err(at(ConfigError::at("sources", "expected at least one [[sources]] table")));
    }
    let mut sources = Vec::new();
    let mut resolved_sources = Vec::new();
    for (i, table) in raw.sources.iter().enumerate() {
        let prefix = KeyPath::keys(&["sources"]).index(i);
        let (built, resolved) = build_with(table, &prefix, |k, t| registry.build_source(k, t, &ctx)).map_err(at)?;
        sources.push(built);
        resolved_sources.push(resolved);
    }
    let (reward, reward_table) =
        build_with(&raw.reward, &KeyPath::keys(&["reward"]), |k, t| registry.build_reward(k, t, &ctx)).map_err(at)?;
    let mut eval = raw.eval;
    // A pairwise judge compares two answers: it is [eval.judge], never a reward.
    let pairwise_only = |r: &dyn RewardModel, at_key: &[&str]| {
        if r.pairwise() {
            Err(ConfigError::new(
                KeyPath::keys(at_key).key("mode"),
                "a pairwise judge compares two answers and cannot score one: use it as [eval.judge]",
            ))
        } else {
            Ok(())
        }
    };
    pairwise_only(reward.as_ref(), &["reward"]).map_err(at)?;
    let eval_reward = match eval.reward.take() {
        Some(table) => {
            let (built, resolved) =
                build_with(&table, &KeyPath::keys(&["eval", "reward"]), |k, t| registry.build_reward(k, t, &ctx))
                    .map_err(at)?;
            pairwise_only(built.as_ref(), &["eval", "reward"]).map_err(at)?;
            eval.reward = Some(resolved);
            Some(built)
        }
        None => None,
    };
    let eval_judge = match eval.judge.take() {
        Some(table) => {
            let here = KeyPath::keys(&["eval", "judge"]);
            let (built, resolved) = build_with(&table, &here, |k, t| registry.build_reward(k, t, &ctx)).map_err(at)?;
            if !built.pairwise() {
                return Err(at(ConfigError::new(
                    here.key("mode"),
                    "expected a pairwise judge (kind = \"judge\" with mode = \"pairwise\"); a reward that scores single answers is [eval.reward]",
                )));
            }
            eval.judge = Some(resolved);
            Some(built)
        }
        None => None,
    };
    let weighting_table = raw.weighting.unwrap_or_else(|| kind_table("softmax"));
    let (weighting, weighting_table) =
        build_with(&weighting_table, &KeyPath::keys(&["weighting"]), |k, t| registry.build_weighting(k, t, &ctx))
            .map_err(at)?;

    let mut stages = Vec::new();
    let sft_enabled = sft.enabled;
    for (stage, config) in [(Stage::Sft, sft), (Stage::Po, po)] {
        let mut config = config;
        let table = config.objective.take().unwrap_or_else(|| kind_table(stage.default_objective()));
        let prefix = KeyPath::keys(&[stage.key(), "objective"]);
        let (objective, resolved) =
            build_with(&table, &prefix, |k, t| registry.build_objective(k, t, &ctx)).map_err(at)?;
        if stage == Stage::Sft && config.enabled && objective.needs_reference() {
            return Err(at(ConfigError::new(
                prefix.key("kind"),
                format!(
                    "objective `{}` needs a reference model, which the SFT stage does not have; \
                     use it in [po] (with reference = \"target\" to skip SFT)",
                    objective.name()
                ),
            )));
        }
        // Only an objective with a reference needs one that exists (SimPO has none).
        if stage == Stage::Po
            && config.enabled
            && objective.needs_reference()
            && explicit_reference
            && config.reference == Some(ReferenceModel::SftCheckpoint)
            && !sft_enabled
        {
            return Err(at(ConfigError::new(
                KeyPath::keys(&["po", "reference"]),
                format!(
                    "objective `{}` compares against the FuseSFT checkpoint, but [sft] is disabled; \
                     set reference = \"target\" (or leave it out: it defaults to the model FusePO starts from)",
                    objective.name()
                ),
            )));
        }
        config.objective = Some(resolved);
        stages.push((config, objective));
    }
    let (po, po_objective) = stages.pop().expect("two stages");
    let (sft, sft_objective) = stages.pop().expect("two stages");

    let recipe = Recipe {
        schema_version: SCHEMA_VERSION,
        plugins: raw.plugins,
        run,
        backend: raw.backend,
        target: raw.target,
        data,
        sources: resolved_sources,
        reward: reward_table,
        weighting: weighting_table,
        sft,
        po,
        eval,
        export,
    };
    Ok(LoadedRecipe {
        file: file.to_path_buf(),
        recipe,
        components: Components { sources, reward, weighting, sft_objective, po_objective, eval_reward, eval_judge },
        base_dir,
    })
}

fn kind_table(kind: &str) -> toml::Table {
    let mut t = toml::Table::new();
    t.insert("kind".into(), toml::Value::String(kind.into()));
    t
}

/// Build one component from its table: split off `kind`, build, and return the component with
/// its resolved table (`kind` first). Errors carry the full key path from the recipe's root.
fn build_with<T: ?Sized>(
    table: &toml::Table,
    prefix: &KeyPath,
    build: impl FnOnce(&str, &toml::Table) -> Result<Built<T>, BuildError>,
) -> Result<(Box<T>, toml::Table), ConfigError> {
    let (kind, rest) = split_kind(table).map_err(|e| e.prefixed(prefix))?;
    match build(&kind, &rest) {
        Ok(built) => {
            let mut resolved = kind_table(&kind);
            resolved.extend(built.resolved);
            Ok((built.component, resolved))
        }
        Err(BuildError::UnknownKind { point, kind, choices }) => Err(ConfigError::new(
            prefix.clone().key("kind"),
            format!("unknown {} `{kind}`; expected one of: {}", point.noun(), choices.join(", ")),
        )),
        Err(BuildError::Config(e)) => Err(e.prefixed(prefix)),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Sft,
    Po,
}

impl Stage {
    fn key(self) -> &'static str {
        match self {
            Self::Sft => "sft",
            Self::Po => "po",
        }
    }
    fn default_objective(self) -> &'static str {
        match self {
            Self::Sft => "sft",
            Self::Po => "dpo",
        }
    }
}

fn validate_target(t: &TargetConfig) -> Result<(), ConfigError> {
    if t.checkpoint.trim().is_empty() {
        return Err(ConfigError::at("checkpoint", "expected the path of a Hugging Face checkpoint folder"));
    }
    if t.max_length == 0 {
        return Err(ConfigError::at("max_length", "expected a positive number of tokens"));
    }
    if let Some(p) = t.max_prompt_length
        && (p == 0 || p >= t.max_length)
    {
        return Err(ConfigError::at(
            "max_prompt_length",
            format!("expected a number of tokens in [1, max_length = {}), found {p}", t.max_length),
        ));
    }
    Ok(())
}

fn validate_data(mut d: DataConfig) -> Result<DataConfig, ConfigError> {
    match (d.split, d.po_fraction) {
        (Split::Shared, Some(_)) => {
            return Err(ConfigError::at("po_fraction", "only meaningful with split = \"disjoint\""));
        }
        (Split::Disjoint, f) => {
            let f = f.unwrap_or(0.5);
            if !(f > 0.0 && f < 1.0) {
                return Err(ConfigError::at("po_fraction", format!("expected a fraction in (0, 1), found {f}")));
            }
            d.po_fraction = Some(f);
        }
        (Split::Shared, None) => {}
    }
    if d.samples_per_prompt == 0 {
        return Err(ConfigError::at("samples_per_prompt", "expected at least 1"));
    }
    if d.score_batch_size == 0 {
        return Err(ConfigError::at("score_batch_size", "expected at least 1"));
    }
    if let Some(t) = d.sampling.temperature {
        check::non_negative("temperature", t).map_err(|e| e.prefixed(&KeyPath::keys(&["sampling"])))?;
    }
    if let Some(p) = d.sampling.top_p
        && !(p > 0.0 && p <= 1.0)
    {
        return Err(ConfigError::new(
            KeyPath::keys(&["sampling", "top_p"]),
            format!("expected a number in (0, 1], found {p}"),
        ));
    }
    Ok(d)
}

fn resolve_stage(mut s: StageConfig, stage: Stage) -> Result<StageConfig, ConfigError> {
    let (epochs, lr) = match stage {
        Stage::Sft => (3, 5e-6),
        Stage::Po => (1, 8e-7),
    };
    s.epochs = Some(s.epochs.unwrap_or(epochs));
    if s.epochs == Some(0) {
        return Err(ConfigError::at("epochs", "expected at least 1"));
    }
    if s.max_steps == Some(0) {
        return Err(ConfigError::at("max_steps", "expected at least 1"));
    }
    let lr = s.learning_rate.unwrap_or(lr);
    check::positive("learning_rate", lr)?;
    s.learning_rate = Some(lr);
    match (s.warmup_ratio, s.warmup_steps) {
        (Some(_), Some(_)) => {
            return Err(ConfigError::at("warmup_steps", "give either warmup_ratio or warmup_steps, not both"));
        }
        (Some(r), None) => check::in_half_open("warmup_ratio", r, 0.0, 1.0)?,
        (None, Some(_)) => {}
        (None, None) => s.warmup_ratio = Some(0.1),
    }
    if s.batch_size == 0 {
        return Err(ConfigError::at("batch_size", "expected at least 1"));
    }
    if s.grad_accum == 0 {
        return Err(ConfigError::at("grad_accum", "expected at least 1"));
    }
    check::positive("max_grad_norm", s.max_grad_norm)?;
    check::non_negative("weight_decay", s.weight_decay)?;
    check::in_half_open("adam_beta1", s.adam_beta1, 0.0, 1.0)?;
    check::in_half_open("adam_beta2", s.adam_beta2, 0.0, 1.0)?;
    check::positive("adam_eps", s.adam_eps)?;
    if s.checkpoint_every == 0 {
        return Err(ConfigError::at("checkpoint_every", "expected at least 1"));
    }
    if s.log_every == 0 {
        return Err(ConfigError::at("log_every", "expected at least 1"));
    }
    match stage {
        Stage::Sft if s.reference.is_some() => {
            return Err(ConfigError::at("reference", "only [po] has a reference model"));
        }
        Stage::Sft if s.target_samples > 0 => {
            return Err(ConfigError::at("target_samples", "only [po] generates target samples"));
        }
        Stage::Po | Stage::Sft => {}
    }
    Ok(s)
}

fn validate_eval(e: &EvalConfig) -> Result<(), ConfigError> {
    if e.enabled && e.prompts.is_none() {
        return Err(ConfigError {
            path: KeyPath::keys(&["prompts"]),
            message: "missing required key `prompts` (eval is enabled)".into(),
            missing: true,
        });
    }
    check::non_negative("temperature", e.temperature)?;
    if e.max_new_tokens == 0 {
        return Err(ConfigError::at("max_new_tokens", "expected at least 1"));
    }
    if e.samples == 0 {
        return Err(ConfigError::at("samples", "expected at least 1"));
    }
    if e.samples > 1 && e.temperature == 0.0 {
        return Err(ConfigError::at(
            "samples",
            format!(
                "{} answers per prompt at temperature 0 would all be the same greedy answer; set [eval] temperature above 0",
                e.samples
            ),
        ));
    }
    Ok(())
}

fn validate_export(e: &ExportConfig) -> Result<(), ConfigError> {
    if e.max_shard_size_mb == 0 {
        return Err(ConfigError::at("max_shard_size_mb", "expected at least 1"));
    }
    if let Some(p) = &e.path
        && p.trim().is_empty()
    {
        return Err(ConfigError::at("path", "expected a folder path"));
    }
    Ok(())
}
