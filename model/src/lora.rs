//! LoRA adapters on the decoder's linear layers, as PEFT's `LoraConfig` defines them: a linear
//! layer `y = x W` becomes `y = x W + s (dropout(x) A) B` with `A: [in, r]`, `B: [r, out]` and
//! `s = alpha / r` (`alpha / sqrt(r)` with rsLoRA). `A` starts Kaiming-uniform (PEFT's default:
//! `kaiming_uniform_(a = sqrt(5))`, uniform in `±1 / sqrt(in)`) and `B` at zero, so a new adapter
//! changes nothing until it is trained.
//!
//! An adapter folder is PEFT's own layout, what `PeftModel.save_pretrained` writes and
//! `PeftModel.from_pretrained` reads: `adapter_config.json` (`peft_type = "LORA"`, `r`,
//! `lora_alpha`, `target_modules`, `use_rslora`, `base_model_name_or_path`) and
//! `adapter_model.safetensors` with `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`
//! (`[r, in]`) and `...lora_B.weight` (`[out, r]`). [`crate::checkpoint::load`] loads such a folder
//! on top of its base, so every command that takes a checkpoint takes an adapter folder too.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, ElementConversion, Int, IntDType, Tensor, TensorData};
use safetensors::{Dtype as StDtype, SafeTensors};
use serde_json::Value;

use crate::error::{ModelError, Result};
use crate::llama::{Linear, Llama, LlamaModel, in_dtype};
use fuserl_io::fs::{write_atomic, write_atomic_with};
use fuserl_kernels::LogProbBackend;

/// The linear layers an adapter can sit on, by PEFT's names, in the order of a decoder layer.
pub const MODULES: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// PEFT's default `target_modules` for every family fuserl runs (its table for llama, mistral,
/// qwen2, qwen3 and gemma3_text).
pub const DEFAULT_MODULES: [&str; 2] = ["q_proj", "v_proj"];

/// The adapter file of an adapter folder.
pub const ADAPTER_FILE: &str = "adapter_model.safetensors";
/// The settings file of an adapter folder.
pub const CONFIG_FILE: &str = "adapter_config.json";

/// One adapter's settings (`[target.lora]`, or an adapter folder's `adapter_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// Rank.
    pub r: usize,
    /// `lora_alpha`.
    pub alpha: f64,
    /// Dropout probability on the adapter's input while training.
    pub dropout: f64,
    /// Which linear layers get an adapter (PEFT's names, in [`MODULES`] order).
    pub targets: Vec<String>,
    /// rsLoRA: scale by `alpha / sqrt(r)` instead of `alpha / r`.
    pub rslora: bool,
}

impl LoraSpec {
    /// The adapter's scale `s`.
    pub fn scale(&self) -> f64 {
        if self.rslora { self.alpha / (self.r as f64).sqrt() } else { self.alpha / self.r as f64 }
    }

    /// `target_modules` as written in a recipe or `adapter_config.json`: a list of [`MODULES`]
    /// names, or `"all-linear"` (every one of them; PEFT leaves the output head out too).
    pub fn targets_from(names: &[String]) -> std::result::Result<Vec<String>, String> {
        if names.len() == 1 && names[0] == "all-linear" {
            return Ok(MODULES.iter().map(|m| (*m).to_owned()).collect());
        }
        if names.is_empty() {
            return Err(format!("expected at least one of {} (or \"all-linear\")", MODULES.join(", ")));
        }
        for n in names {
            if !MODULES.contains(&n.as_str()) {
                return Err(format!("unknown module `{n}`; expected {} or \"all-linear\"", MODULES.join(", ")));
            }
        }
        Ok(MODULES.iter().filter(|m| names.iter().any(|n| n == *m)).map(|m| (*m).to_owned()).collect())
    }
}

/// One adapter of a linear layer.
#[derive(Module, Debug)]
pub struct Lora<B: Backend> {
    /// `[in, r]` (PEFT's `lora_A.weight` is its transpose).
    pub a: Param<Tensor<B, 2>>,
    /// `[r, out]` (PEFT's `lora_B.weight` is its transpose).
    pub b: Param<Tensor<B, 2>>,
    /// `s`: `alpha / r` or `alpha / sqrt(r)`.
    pub scale: f64,
    /// Dropout probability on the input while training (inside [`with_dropout`]).
    pub dropout: f64,
    /// Which adapter this is (its linear layer's place in the model, layer by layer): keys its
    /// dropout masks.
    pub site: usize,
}

thread_local! {
    /// The dropout of the training pass running on this thread ([`with_dropout`]).
    static DROPOUT: std::cell::Cell<Option<DropoutKey>> = const { std::cell::Cell::new(None) };
}

/// What an adapter's dropout mask is a function of, with the adapter's site and the place of
/// each value: a training pass's key, and the index in its micro-batch of the first sequence the
/// pass runs (a shard of the micro-batch runs some of its sequences).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropoutKey {
    /// The pass's key ([`dropout_key`] of a stage's seed, the step, the micro-batch).
    pub key: u64,
    /// The micro-batch index of the pass's first sequence.
    pub first_sequence: u64,
}

/// Runs `f` (a training pass on this thread) with LoRA dropout keyed by `key`; outside, adapters
/// run without dropout (inference, reference log-probs, generation). An adapter's mask is a hash
/// of the key, the adapter's site, and each value's sequence, position and column (no random
/// generator is drawn, so the backend is never seeded or synchronised): gradient
/// checkpointing's graph-free forward and its recomputation of a layer draw the same masks, so do
/// a rerun and a resumed run, and so does a machine that cuts the micro-batch into another number
/// of shards (the CPU makes one a core).
pub fn with_dropout<T>(key: DropoutKey, f: impl FnOnce() -> T) -> T {
    /// Puts the enclosing key back, also when `f` unwinds.
    struct Restore(Option<DropoutKey>);
    impl Drop for Restore {
        fn drop(&mut self) {
            DROPOUT.with(|k| k.set(self.0));
        }
    }
    let _restore = Restore(DROPOUT.with(|k| k.replace(Some(key))));
    f()
}

/// A dropout key from its parts (a stage's seed, the step, the micro-batch).
pub fn dropout_key(parts: &[u64]) -> u64 {
    parts.iter().fold(0x6c6f_7261_6472_6f70u64, |h, &p| fuserl_core::maths::SplitMix64::new(h ^ p).next_u64())
}

/// The dropout mask (1 keep, 0 drop) of an adapter at `site` for its input `[rows, cols]`: rows
/// are `batch` sequences of `rows / batch` positions, the first of them the micro-batch's
/// sequence `key.first_sequence`. Each value's bit is a hash of (key, site, sequence, position)
/// (a row's seed, on the host) and its column (on the device, in `u32` tensor ops, whose
/// products and sums wrap on every backend: the CPU's and the GPUs' bits are the same).
pub fn dropout_mask<B: Backend>(
    key: DropoutKey,
    site: usize,
    [rows, cols]: [usize; 2],
    batch: usize,
    keep: f64,
    device: &B::Device,
) -> Tensor<B, 2> {
    let length = (rows / batch.max(1)).max(1);
    let seeds: Vec<u32> = (0..rows)
        .map(|r| {
            let sequence = key.first_sequence + (r / length) as u64;
            (dropout_key(&[key.key, site as u64, sequence, (r % length) as u64]) >> 32) as u32
        })
        .collect();
    let row = Tensor::<B, 2, Int>::from_data(TensorData::new(seeds, [rows, 1]), (device, DType::U32));
    let column = Tensor::<B, 1, Int>::arange(0..cols as i64, device).cast(IntDType::U32).reshape([1, cols]);
    // A 32-bit integer hash: xor-shifts and multiplies by odd constants (below 2^31, so that they
    // are the same scalar in a backend's signed integer type).
    let int = |v: i64| v.elem::<B::IntElem>();
    let shift = |h: Tensor<B, 2, Int>, by: i64| h.clone().bitwise_xor(h.bitwise_right_shift_scalar(int(by)));
    let h = row + column.mul_scalar(0x2c1b_3c6d);
    let h = shift(shift(shift(h, 16).mul_scalar(0x297a_2d39), 15).mul_scalar(0x045d_9f3b), 16);
    let threshold = (keep * f64::from(1 << 24)).round() as i64;
    h.bitwise_right_shift_scalar(int(8)).lower_elem(threshold).float()
}

impl<B: LogProbBackend> Lora<B> {
    /// `s (dropout(x) A) B` in `x`'s dtype (the adapter's weights are cast to it: f32 master
    /// weights give f32 gradients); `x`'s rows are `batch` sequences of equal length (the mask is
    /// a function of each row's sequence and position).
    ///
    /// # Shapes
    /// `x: [rows, in]` -> `[rows, out]`
    pub fn forward(&self, x: Tensor<B, 2>, batch: usize) -> Tensor<B, 2> {
        let dtype = x.dtype();
        let key = DROPOUT.with(std::cell::Cell::get).filter(|_| self.dropout > 0.0);
        let x = match key {
            Some(key) => {
                let keep = 1.0 - self.dropout;
                let mask = dropout_mask::<B>(key, self.site, x.dims(), batch, keep, &x.device());
                x * in_dtype(mask, dtype).mul_scalar(1.0 / keep)
            }
            None => x,
        };
        // `linear_matmul` casts each weight to `x`'s dtype (on the CPU in bf16: fuserl's kernel).
        let down = fuserl_kernels::linear_matmul(x, self.a.val());
        fuserl_kernels::linear_matmul(down, self.b.val()).mul_scalar(self.scale)
    }
}

/// Every linear layer an adapter can sit on, with its checkpoint name (`model.layers.N.mlp.up_proj`)
/// and its PEFT module name (`up_proj`).
fn linears_mut<B: Backend>(weights: &mut Llama<B>) -> Vec<(String, &'static str, &mut Linear<B>)> {
    let mut out = Vec::new();
    for (l, layer) in weights.layers.iter_mut().enumerate() {
        let a = &mut layer.self_attn;
        let m = &mut layer.mlp;
        for (group, name, linear) in [
            ("self_attn", "q_proj", &mut a.q_proj),
            ("self_attn", "k_proj", &mut a.k_proj),
            ("self_attn", "v_proj", &mut a.v_proj),
            ("self_attn", "o_proj", &mut a.o_proj),
            ("mlp", "gate_proj", &mut m.gate_proj),
            ("mlp", "up_proj", &mut m.up_proj),
            ("mlp", "down_proj", &mut m.down_proj),
        ] {
            out.push((format!("model.layers.{l}.{group}.{name}"), name, linear));
        }
    }
    out
}

/// Like [`linears_mut`], read-only.
pub fn linears<B: Backend>(weights: &Llama<B>) -> Vec<(String, &'static str, &Linear<B>)> {
    let mut out = Vec::new();
    for (l, layer) in weights.layers.iter().enumerate() {
        let a = &layer.self_attn;
        let m = &layer.mlp;
        for (group, name, linear) in [
            ("self_attn", "q_proj", &a.q_proj),
            ("self_attn", "k_proj", &a.k_proj),
            ("self_attn", "v_proj", &a.v_proj),
            ("self_attn", "o_proj", &a.o_proj),
            ("mlp", "gate_proj", &m.gate_proj),
            ("mlp", "up_proj", &m.up_proj),
            ("mlp", "down_proj", &m.down_proj),
        ] {
            out.push((format!("model.layers.{l}.{group}.{name}"), name, linear));
        }
    }
    out
}

/// Whether the model carries adapters.
pub fn has_adapters<B: Backend>(weights: &Llama<B>) -> bool {
    linears(weights).iter().any(|(_, _, l)| l.lora.is_some())
}

/// Put a new adapter on every linear layer `spec` targets: `A` Kaiming-uniform (seeded), `B`
/// zero, both in `dtype` (the master weights' type) and trainable. Layers that already have one
/// keep it.
pub fn add_adapters<B: Backend>(weights: &mut Llama<B>, spec: &LoraSpec, seed: u64, dtype: DType) {
    // (SplitMix64: the same values on every machine and backend, so an adapter's start does not
    // depend on where it is made.)
    let mut rng = fuserl_core::maths::SplitMix64::new(seed ^ 0x4c6f_5241);
    let device = weights.embed_tokens.val().device();
    for (site, (_, name, linear)) in linears_mut(weights).into_iter().enumerate() {
        if linear.lora.is_some() || !spec.targets.iter().any(|t| t == name) {
            continue;
        }
        let [inp, out] = linear.dims();
        // kaiming_uniform_(a = sqrt(5)) on PEFT's [r, in] weight: gain sqrt(2 / (1 + 5)), bound
        // gain * sqrt(3 / fan_in) = 1 / sqrt(in).
        let bound = 1.0 / (inp as f64).sqrt();
        let a: Vec<f32> = (0..inp * spec.r).map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32).collect();
        let a = Tensor::<B, 2>::from_data(TensorData::new(a, [inp, spec.r]), (&device, dtype));
        let b = Tensor::<B, 2>::zeros([spec.r, out], (&device, dtype));
        linear.lora = Some(Lora {
            a: Param::from_tensor(a),
            b: Param::from_tensor(b),
            scale: spec.scale(),
            dropout: spec.dropout,
            site,
        });
    }
}

/// The model with its adapters merged into the linear layers' weights (`W + s A B`, computed in
/// f32; those weights are f32 afterwards) and removed. Weights without an adapter are kept as
/// they are.
pub fn merged<B: LogProbBackend>(mut weights: Llama<B>) -> Llama<B> {
    for (_, _, linear) in linears_mut(&mut weights) {
        if let Some(lora) = linear.lora.take() {
            let delta = lora.a.val().cast(DType::F32).matmul(lora.b.val().cast(DType::F32)).mul_scalar(lora.scale);
            let w = linear.dense_weight().cast(DType::F32) + delta;
            linear.weight = Param::from_tensor(w.detach());
            linear.quant = None;
        }
    }
    weights
}

/// The model without its adapters (the base they sit on: what FusePO's reference is with LoRA).
pub fn without_adapters<B: Backend>(mut weights: Llama<B>) -> Llama<B> {
    for (_, _, linear) in linears_mut(&mut weights) {
        linear.lora = None;
    }
    weights
}

/// Whether `dir` is a PEFT adapter folder: an `adapter_config.json` and no model weights of its
/// own (`model.safetensors`, its sharded index, or fuserl's `model.gguf`). Adapter folders saved
/// by TRL, Unsloth or the Hub often carry the base's `config.json` beside the adapter, as
/// transformers' PEFT integration reads them; a folder with whole weights is the checkpoint they
/// make (an `adapter_config.json` beside them is left alone: [`crate::checkpoint::load`] warns).
pub fn is_adapter_dir(dir: &Path) -> bool {
    if !dir.join(CONFIG_FILE).is_file() {
        return false;
    }
    !has_own_weights(dir)
}

/// Whether the checkpoint folder `dir` has whole model weights of its own.
pub(crate) fn has_own_weights(dir: &Path) -> bool {
    ["model.safetensors", "model.safetensors.index.json", crate::checkpoint::GGUF_FILE]
        .iter()
        .any(|f| dir.join(f).is_file())
}

/// An adapter folder's `adapter_config.json`, read and checked: what fuserl can apply (LoRA, no
/// DoRA, no bias, no per-module ranks) and the base model's folder.
#[derive(Debug, Clone)]
pub struct AdapterConfig {
    /// The adapter's settings.
    pub spec: LoraSpec,
    /// The base checkpoint's folder.
    pub base: PathBuf,
}

/// Read `dir/adapter_config.json`. `base_model_name_or_path` is a folder: absolute, or relative to
/// the adapter folder (else to the working folder, as PEFT reads it); a Hub id cannot be fetched.
pub fn read_adapter_config(dir: &Path) -> Result<AdapterConfig> {
    let file = dir.join(CONFIG_FILE);
    let v = crate::config::read_json(&file)?;
    let bad = |what: String| ModelError::format(&file, what);
    let peft_type = v.get("peft_type").and_then(Value::as_str).unwrap_or("LORA");
    if peft_type != "LORA" {
        return Err(bad(format!("peft_type is `{peft_type}`; fuserl applies LoRA adapters only")));
    }
    for (key, ok) in [
        ("use_dora", v.get("use_dora").is_none_or(|d| d == &Value::Bool(false) || d.is_null())),
        ("bias", v.get("bias").is_none_or(|b| b == "none" || b.is_null())),
        ("fan_in_fan_out", v.get("fan_in_fan_out").is_none_or(|b| b == &Value::Bool(false) || b.is_null())),
        (
            "rank_pattern",
            v.get("rank_pattern").is_none_or(|p| p.is_null() || p.as_object().is_some_and(|o| o.is_empty())),
        ),
        (
            "alpha_pattern",
            v.get("alpha_pattern").is_none_or(|p| p.is_null() || p.as_object().is_some_and(|o| o.is_empty())),
        ),
        (
            "modules_to_save",
            v.get("modules_to_save").is_none_or(|p| p.is_null() || p.as_array().is_some_and(|a| a.is_empty())),
        ),
        ("layers_to_transform", v.get("layers_to_transform").is_none_or(Value::is_null)),
    ] {
        if !ok {
            return Err(bad(format!("`{key}` = {}: not supported (fuserl applies plain LoRA adapters)", v[key])));
        }
    }
    let r = v
        .get("r")
        .and_then(Value::as_u64)
        .filter(|r| *r > 0)
        .ok_or_else(|| bad("expected `r`, a positive integer".into()))?;
    let alpha = v.get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0);
    let dropout = v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0);
    let rslora = v.get("use_rslora").and_then(Value::as_bool).unwrap_or(false);
    let names: Vec<String> = match v.get("target_modules") {
        Some(Value::String(s)) if s != "all-linear" && !MODULES.contains(&s.as_str()) => {
            modules_matching(s).map_err(|m| bad(format!("target_modules: {m}")))?
        }
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
        _ => DEFAULT_MODULES.iter().map(|m| (*m).to_owned()).collect(),
    };
    let targets = LoraSpec::targets_from(&names).map_err(|m| bad(format!("target_modules: {m}")))?;
    let base_name = v
        .get("base_model_name_or_path")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("expected `base_model_name_or_path`, the base checkpoint's folder".into()))?;
    let candidates = [dir.join(base_name), PathBuf::from(base_name)];
    // The base is a whole checkpoint: an adapter folder as the base (the folder itself, `.`, or
    // another adapter) would be loaded on top of itself without end.
    if let Some(adapter) = candidates.iter().find(|p| is_adapter_dir(p)) {
        return Err(bad(format!(
            "base_model_name_or_path `{base_name}` is an adapter folder ({}): the base must be a whole checkpoint \
             (fuserl applies one adapter on its base)",
            fuserl_core::paths::Shown(adapter)
        )));
    }
    let base = candidates.into_iter().find(|p| p.join("config.json").is_file()).ok_or_else(|| {
        bad(format!(
            "base_model_name_or_path `{base_name}` is not a checkpoint folder here (looked beside the adapter and in \
             the working folder; a Hub id is not fetched)"
        ))
    })?;
    Ok(AdapterConfig { spec: LoraSpec { r: r as usize, alpha, dropout, targets, rslora }, base })
}

/// The module path of a linear layer of kind `module` (one of [`MODULES`]) in layer `layer` of the
/// text model, as PEFT matches it: `model.layers.0.self_attn.q_proj`; with `multimodal`, Gemma
/// 3's `model.language_model.layers.0...`.
fn module_path(module: &str, layer: &str, multimodal: bool) -> String {
    let model = if multimodal { "model.language_model" } else { "model" };
    format!("{model}.layers.{layer}.{}.{module}", block_of(module))
}

/// The block of a layer that holds a module of kind `module`: `self_attn` or `mlp`.
fn block_of(module: &str) -> &'static str {
    if matches!(module, "q_proj" | "k_proj" | "v_proj" | "o_proj") { "self_attn" } else { "mlp" }
}

/// The [`MODULES`] a `target_modules` regular expression selects: PEFT matches a string against
/// each module's whole path (`re.fullmatch`); fuserl applies adapters to every layer alike, so
/// the kinds whose path in the first layer matches, in the text model's layout or in Gemma 3's
/// multimodal one (a pattern that selects some layers only is refused when the adapters are
/// applied: the others have none).
fn modules_matching(pattern: &str) -> std::result::Result<Vec<String>, String> {
    let unreadable =
        |e: regex::Error| format!("`{pattern}` is neither a module name nor a regular expression fuserl reads: {e}");
    // The pattern alone first (an unbalanced one such as `a)|(b` would otherwise compile inside
    // the anchors), then anchored at both ends, as Python's re.fullmatch; a line break before
    // the closing parenthesis ends a `(?x)` comment the pattern may end with.
    regex::Regex::new(pattern).map_err(unreadable)?;
    let end = if pattern.contains("(?x") { "\n" } else { "" };
    let re = regex::Regex::new(&format!(r"\A(?:{pattern}{end})\z")).map_err(unreadable)?;
    // Gemma 3's text model sits at `model.language_model` (transformers 4.52 on) or
    // `language_model.model` (4.50 and 4.51).
    let layouts = |m: &str| {
        let plain = module_path(m, "0", false);
        [module_path(m, "0", true), plain.replacen("model.", "language_model.model.", 1), plain]
    };
    let found: Vec<String> =
        MODULES.iter().filter(|m| layouts(m).iter().any(|p| re.is_match(p))).map(|m| (*m).to_owned()).collect();
    if found.is_empty() {
        return Err(format!(
            "the regular expression `{pattern}` selects none of the text model's linear layers (e.g. `{}`)",
            module_path("q_proj", "0", false)
        ));
    }
    Ok(found)
}

/// The `target_modules` an adapter export writes: PEFT's module names; for a multimodal base, a
/// regular expression over the text model's paths, which PEFT matches whole, so that it wraps
/// neither the vision tower's `q_proj`/`k_proj`/`v_proj` (bare names would give them adapters
/// that the file does not hold: B zero, harmless but not what was trained) nor its projector.
pub fn exported_target_modules(targets: &[String], multimodal: bool) -> Value {
    if !multimodal {
        return serde_json::json!(targets);
    }
    let kinds: Vec<String> = targets.iter().map(|m| format!(r"{}\.{m}", block_of(m))).collect();
    Value::String(format!(r"model\.language_model\.layers\.\d+\.({})", kinds.join("|")))
}

/// What an adapter file's tensor is.
enum AdapterTensor {
    /// `lora_A` (true) or `lora_B` (false) of the layer with this checkpoint name.
    Layer(String, bool),
    /// An adapter of a multimodal base's vision tower or projector, which the text model does
    /// not have (PEFT puts one there when `target_modules` names `q_proj` and the like).
    Vision,
}

/// The checkpoint name of an adapter tensor's layer: `base_model.model.X.lora_A.weight` -> (`X`,
/// A) (and Gemma 3's multimodal names to the text model's, as the base's are). `None`: not an
/// adapter's weight.
fn adapter_tensor_name(name: &str, multimodal: bool) -> Option<AdapterTensor> {
    let rest = name.strip_prefix("base_model.model.")?;
    let (layer, is_a) = if let Some(l) = rest.strip_suffix(".lora_A.weight") {
        (l, true)
    } else {
        (rest.strip_suffix(".lora_B.weight")?, false)
    };
    if !multimodal {
        return Some(AdapterTensor::Layer(layer.to_owned(), is_a));
    }
    Some(match crate::gemma3::text_tensor_name(&format!("{layer}.weight")) {
        Some(text) => AdapterTensor::Layer(text.strip_suffix(".weight")?.to_owned(), is_a),
        None => AdapterTensor::Vision,
    })
}

/// Put the adapters of the folder `dir` on `weights` (in `dtype`, trainable). Every tensor of the
/// file must be an adapter of a layer the config targets, with its shape; every targeted layer
/// must have both of its tensors.
pub fn apply_adapter_dir<B: Backend>(
    weights: &mut Llama<B>,
    dir: &Path,
    config: &AdapterConfig,
    multimodal: bool,
    dtype: DType,
) -> Result<()> {
    let file = dir.join(ADAPTER_FILE);
    let bytes = fuserl_core::paths::read_regular(&file).map_err(|e| ModelError::io(&file, e))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| ModelError::format(&file, format!("not a valid safetensors file: {e}")))?;
    // Per layer: its A and B (shape, values) as found.
    type Found = (Option<(Vec<usize>, Vec<f32>)>, Option<(Vec<usize>, Vec<f32>)>);
    let mut found: HashMap<String, Found> = HashMap::new();
    let mut vision = 0usize;
    for (name, view) in st.tensors() {
        let (layer, is_a) = match adapter_tensor_name(&name, multimodal) {
            Some(AdapterTensor::Layer(layer, is_a)) => (layer, is_a),
            Some(AdapterTensor::Vision) => {
                vision += 1;
                continue;
            }
            None => {
                return Err(ModelError::format(
                    &file,
                    format!("tensor `{name}` is not a LoRA adapter's lora_A/lora_B weight"),
                ));
            }
        };
        let values = crate::checkpoint::values_of(&view, &name, &file)?;
        let entry = found.entry(layer).or_default();
        let slot = if is_a { &mut entry.0 } else { &mut entry.1 };
        *slot = Some((view.shape().to_vec(), values));
    }
    if vision > 0 {
        tracing::warn!(
            file = %fuserl_core::paths::Shown(&file),
            tensors = vision,
            "adapters of the vision tower left out (fuserl runs the text model)"
        );
    }
    let device = weights.embed_tokens.val().device();
    let spec = &config.spec;
    for (site, (layer, name, linear)) in linears_mut(weights).into_iter().enumerate() {
        let targeted = spec.targets.iter().any(|t| t == name);
        let Some((a, b)) = found.remove(&layer) else {
            if targeted {
                return Err(ModelError::format(&file, format!("no adapter for `{layer}`, which target_modules names")));
            }
            continue;
        };
        let [inp, out] = linear.dims();
        let shaped = |t: Option<(Vec<usize>, Vec<f32>)>, which: &str, want: [usize; 2]| -> Result<Vec<f32>> {
            match t {
                Some((shape, values)) if shape == want => Ok(values),
                Some((shape, _)) => Err(ModelError::format(
                    &file,
                    format!("`{layer}.{which}.weight` has shape {shape:?}, expected {want:?}"),
                )),
                None => Err(ModelError::format(&file, format!("`{layer}` has no {which}.weight"))),
            }
        };
        let a = shaped(a, "lora_A", [spec.r, inp])?;
        let b = shaped(b, "lora_B", [out, spec.r])?;
        let make = |values: Vec<f32>, rows: usize, cols: usize| {
            // PEFT's [r, in] / [out, r] transposed to fuserl's [in, r] / [r, out].
            let t = crate::checkpoint::transpose(&values, rows, cols);
            Param::from_tensor(Tensor::<B, 2>::from_data(TensorData::new(t, [cols, rows]), (&device, dtype)))
        };
        linear.lora = Some(Lora {
            a: make(a, spec.r, inp),
            b: make(b, out, spec.r),
            scale: spec.scale(),
            dropout: spec.dropout,
            site,
        });
    }
    if let Some(layer) = found.keys().next() {
        return Err(ModelError::format(
            &file,
            format!("an adapter for `{layer}`, which the model has no such layer for"),
        ));
    }
    Ok(())
}

/// Write the model's adapters as a PEFT adapter folder in `dir`: `adapter_config.json` (with
/// `base` as `base_model_name_or_path`) and f32 `adapter_model.safetensors`, each atomically; the
/// side files (tokenizer, template) copied from `side_files_from` when given.
pub fn save_adapter_dir<B: Backend>(
    model: &LlamaModel<B>,
    spec: &LoraSpec,
    dir: &Path,
    base: &Path,
    multimodal: bool,
    side_files_from: Option<&Path>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let host = |t: Tensor<B, 2>| -> Vec<f32> { t.cast(DType::F32).into_data().iter::<f32>().collect() };
    let mut buffers: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
    for (layer, _, linear) in linears(&model.weights) {
        let Some(lora) = &linear.lora else { continue };
        let [inp, r] = lora.a.val().dims();
        let out = lora.b.val().dims()[1];
        let layer = if multimodal { layer.replacen("model.", "model.language_model.", 1) } else { layer };
        let a = crate::checkpoint::transpose(&host(lora.a.val()), inp, r);
        let b = crate::checkpoint::transpose(&host(lora.b.val()), r, out);
        for (which, values, shape) in [("lora_A", a, vec![r, inp]), ("lora_B", b, vec![out, r])] {
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            buffers.push((format!("base_model.model.{layer}.{which}.weight"), bytes, shape));
        }
    }
    if buffers.is_empty() {
        return Err(ModelError::Input("the model has no adapters to save".into()));
    }
    let file = dir.join(ADAPTER_FILE);
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = buffers
        .iter()
        .map(|(name, bytes, shape)| {
            let view = safetensors::tensor::TensorView::new(StDtype::F32, shape.clone(), bytes)
                .map_err(|e| ModelError::format(&file, e.to_string()))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<_>>()?;
    let mut meta = HashMap::new();
    meta.insert("format".to_owned(), "pt".to_owned());
    write_atomic_with(&file, |tmp| {
        safetensors::serialize_to_file(views, Some(meta), tmp).map_err(|e| match e {
            safetensors::SafeTensorError::IoError(io) => io,
            other => std::io::Error::other(other),
        })
    })?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base.display().to_string(),
        "r": spec.r,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": exported_target_modules(&spec.targets, multimodal),
        "use_rslora": spec.rslora,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_dora": false,
        "modules_to_save": null,
        "layers_to_transform": null,
        "rank_pattern": {},
        "alpha_pattern": {},
    });
    let text = serde_json::to_string_pretty(&config).map_err(|e| ModelError::format(dir, e.to_string()))?;
    write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())?;
    if let Some(src) = side_files_from {
        crate::checkpoint::copy_side_files(src, dir)?;
    }
    Ok(())
}

/// The folder whose tokenizer and `config.json` an adapter folder uses: its base's, for what the
/// adapter folder does not have itself. `dir` itself for any other folder.
pub fn base_of(dir: &Path) -> PathBuf {
    if is_adapter_dir(dir) {
        read_adapter_config(dir).map_or_else(|_| dir.to_path_buf(), |c| c.base)
    } else {
        dir.to_path_buf()
    }
}

/// The base frozen (no gradients, no optimiser state) and every adapter trainable in `dtype`
/// (the master weights' type): what LoRA training starts from. Adapters that came with the model
/// (an adapter folder it was loaded from: FusePO continues FuseSFT's) are kept.
pub fn freeze_base<B: Backend>(mut weights: Llama<B>, dtype: DType) -> Llama<B> {
    let taken: Vec<Option<Lora<B>>> = linears_mut(&mut weights).into_iter().map(|(_, _, l)| l.lora.take()).collect();
    let mut weights = weights.no_grad();
    let trainable = |p: Param<Tensor<B, 2>>| Param::from_tensor(p.val().cast(dtype).detach());
    for ((_, _, linear), lora) in linears_mut(&mut weights).into_iter().zip(taken) {
        linear.lora = lora.map(|l| Lora { a: trainable(l.a), b: trainable(l.b), ..l });
    }
    weights
}

/// The model's adapters in layer order (clones sharing the same parameters and ids): what a
/// training checkpoint of a LoRA stage keeps.
pub fn adapters<B: Backend>(weights: &Llama<B>) -> Vec<Lora<B>> {
    linears(weights).into_iter().filter_map(|(_, _, l)| l.lora.clone()).collect()
}

/// Put `adapters` (as [`adapters`] returned them) back on the layers that have one.
pub fn set_adapters<B: Backend>(weights: &mut Llama<B>, adapters: Vec<Lora<B>>) {
    let mut next = adapters.into_iter();
    for (_, _, linear) in linears_mut(weights) {
        if linear.lora.is_some() {
            linear.lora = next.next();
        }
    }
}
