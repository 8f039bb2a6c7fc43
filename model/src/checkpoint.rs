//! Hugging Face checkpoints in and out: `config.json` plus safetensors, single file or sharded
//! (`model.safetensors.index.json`), in f32, f16 or bf16, loaded into the dtype asked for;
//! saved back in the same layout so that transformers loads the result.
//!
//! Key mapping (checkpoint name -> field; linear weights are transposed to `[in, out]`):
//!
//! | checkpoint | model |
//! |---|---|
//! | `model.embed_tokens.weight` | `embed_tokens` |
//! | `model.layers.N.self_attn.{q,k,v,o}_proj.{weight,bias}` | `layers[N].self_attn.*` |
//! | `model.layers.N.mlp.{gate,up,down}_proj.weight` | `layers[N].mlp.*` |
//! | `model.layers.N.{input,post_attention}_layernorm.weight` | `layers[N].*_layernorm` |
//! | `model.norm.weight` | `norm` |
//! | `lm_head.weight` (untied only) | `lm_head` |

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};
use safetensors::{Dtype as StDtype, SafeTensors};

use crate::config::{Activation, LlamaConfig};
use crate::error::{ModelError, Result};
use crate::llama::{Attention, DecoderLayer, Linear, Llama, LlamaModel, Mlp, QuantWeight, RmsNorm};
use crate::quant::GgmlType;
use fuserl_core::paths::Shown;
use fuserl_io::fs::{write_atomic, write_atomic_with};
use fuserl_kernels::{LogProbBackend, QuantLayout};

/// Files besides the weights that describe a checkpoint (copied when a model is saved).
pub const SIDE_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
    "vocab.json",
];

/// The values of a safetensors tensor as f32 (from F32, F16 or BF16), all finite.
pub(crate) fn values_of(view: &safetensors::tensor::TensorView<'_>, name: &str, file: &Path) -> Result<Vec<f32>> {
    convert(view.dtype(), view.data(), name, file)
}

/// Whether fuserl reads a safetensors dtype (an error naming the tensor otherwise).
fn check_dtype(dtype: StDtype, name: &str, file: &Path) -> Result<()> {
    match dtype {
        StDtype::F32 | StDtype::F16 | StDtype::BF16 => Ok(()),
        other => {
            Err(ModelError::format(file, format!("tensor `{name}` has dtype {other:?}; supported: F32, F16, BF16")))
        }
    }
}

/// A tensor's little-endian `data` of `dtype` as f32 values, all finite.
fn convert(dtype: StDtype, data: &[u8], name: &str, file: &Path) -> Result<Vec<f32>> {
    check_dtype(dtype, name, file)?;
    let values: Vec<f32> = match dtype {
        StDtype::F32 => data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        StDtype::F16 => data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        _ => data.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
    };
    let bad = values.iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        return Err(ModelError::format(
            file,
            format!(
                "tensor `{name}` holds {bad} values that are not finite (NaN or infinity): the weights are damaged"
            ),
        ));
    }
    Ok(values)
}

/// A named host tensor: shape and f32 values.
type HostTensor = (Vec<usize>, Vec<f32>);

/// Where a tensor's values are: as f32 already (converters' tensors), or still as the bytes of
/// its safetensors file, converted when they are taken.
#[derive(Debug)]
enum Values {
    F32(Vec<f32>),
    File { bytes: std::sync::Arc<Vec<u8>>, range: std::ops::Range<usize>, dtype: StDtype },
}

/// A checkpoint's tensors, by name, with their shapes and files: converted to f32 one at a time
/// as they are taken (a file's bytes are let go once all its tensors are taken), so loading
/// holds the files and the model being built, not an f32 copy of every tensor besides.
#[derive(Debug, Default)]
pub struct TensorStore {
    tensors: HashMap<String, (Vec<usize>, Values, PathBuf)>,
}

impl TensorStore {
    /// Read every safetensors file of a checkpoint folder.
    pub fn read_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| ModelError::format(&index, format!("not valid JSON: {e}")))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::format(&index, "missing `weight_map`"))?;
            // Shards are files of the folder itself: a name with a path in it (absolute, `../`)
            // would read whatever it points at.
            let mut files = Vec::with_capacity(map.len());
            for (tensor, f) in map {
                let name = f.as_str().ok_or_else(|| {
                    ModelError::format(&index, format!("weight_map: `{tensor}` names {f}, expected a file name"))
                })?;
                fuserl_core::paths::check_file_name(name)
                    .map_err(|m| ModelError::format(&index, format!("weight_map: `{tensor}`: {m}")))?;
                files.push(dir.join(name));
            }
            files.sort();
            files.dedup();
            files
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut store = Self::default();
        for file in files {
            store.read_file(&file)?;
        }
        Ok(store)
    }

    /// Read one safetensors file.
    pub fn read_file(&mut self, file: &Path) -> Result<()> {
        // Regular files only: a FIFO or a device would block or never end.
        if let Ok(meta) = std::fs::metadata(file)
            && !meta.is_file()
        {
            return Err(ModelError::format(file, "not a regular file (a folder, FIFO or device)"));
        }
        let bytes = std::fs::read(file).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                ModelError::format(file, "missing: the checkpoint has no such weights file")
            } else {
                ModelError::io(file, e)
            }
        })?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| ModelError::format(file, format!("not a valid safetensors file: {e}")))?;
        let mut found = Vec::new();
        for (name, view) in st.tensors() {
            check_dtype(view.dtype(), &name, file)?;
            // The view's bytes as a range of the file's (safetensors checked it lies inside).
            let start = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
            found.push((name, view.shape().to_vec(), start..start + view.data().len(), view.dtype()));
        }
        let bytes = std::sync::Arc::new(bytes);
        for (name, shape, range, dtype) in found {
            let values = Values::File { bytes: bytes.clone(), range, dtype };
            self.tensors.insert(name, (shape, values, file.to_path_buf()));
        }
        Ok(())
    }

    /// Add a tensor (used by converters).
    pub fn insert(&mut self, name: impl Into<String>, shape: Vec<usize>, values: Vec<f32>, file: &Path) {
        self.tensors.insert(name.into(), (shape, Values::F32(values), file.to_path_buf()));
    }

    /// Rename every tensor by `f`, dropping those it maps to `None`.
    pub fn rename(&mut self, f: impl Fn(&str) -> Option<String>) {
        self.tensors = std::mem::take(&mut self.tensors).into_iter().filter_map(|(k, v)| Some((f(&k)?, v))).collect();
    }

    /// Names of the tensors.
    pub fn names(&self) -> Vec<&String> {
        let mut n: Vec<&String> = self.tensors.keys().collect();
        n.sort();
        n
    }

    /// The shape and values of `name` (a copy, converted to f32), if present.
    pub fn get(&self, name: &str) -> Result<Option<HostTensor>> {
        self.tensors
            .get(name)
            .map(|(shape, values, file)| Ok((shape.clone(), f32_values(values, name, file)?)))
            .transpose()
    }

    /// Remove and return `name`, which must have `shape`.
    pub fn take(&mut self, name: &str, shape: &[usize], dir: &Path) -> Result<Vec<f32>> {
        let (got, values, file) = self
            .tensors
            .remove(name)
            .ok_or_else(|| ModelError::format(dir, format!("missing tensor `{name}` (shape {shape:?})")))?;
        if got != shape {
            return Err(ModelError::format(
                file,
                format!("tensor `{name}` has shape {got:?}; the config implies {shape:?}"),
            ));
        }
        match values {
            Values::F32(values) => Ok(values),
            file_values => f32_values(&file_values, name, &file),
        }
    }

    /// Remove and return `name` if present.
    pub fn take_optional(&mut self, name: &str, shape: &[usize], dir: &Path) -> Result<Option<Vec<f32>>> {
        if self.tensors.contains_key(name) { self.take(name, shape, dir).map(Some) } else { Ok(None) }
    }
}

/// `values` as f32 (a copy).
fn f32_values(values: &Values, name: &str, file: &Path) -> Result<Vec<f32>> {
    match values {
        Values::F32(values) => Ok(values.clone()),
        Values::File { bytes, range, dtype } => convert(*dtype, &bytes[range.clone()], name, file),
    }
}

/// The name of a checkpoint folder's GGUF weights (`fuserl convert gguf FILE.gguf DIR
/// --keep-quantized`): read in place of safetensors when the folder has none.
pub const GGUF_FILE: &str = "model.gguf";

/// The GGUF file that holds the weights of the checkpoint folder `dir`: its [`GGUF_FILE`] when it
/// has no safetensors weights (which are read first).
pub fn gguf_weights(dir: &Path) -> Option<PathBuf> {
    let gguf = dir.join(GGUF_FILE);
    let safetensors = dir.join("model.safetensors").is_file() || dir.join("model.safetensors.index.json").is_file();
    (gguf.is_file() && !safetensors).then_some(gguf)
}

/// Block-quantised tensors by checkpoint name: their layout, rows and blocks (row after row).
#[derive(Default, Debug)]
pub struct QuantBlocks(HashMap<String, (QuantLayout, usize, Vec<u8>)>);

impl QuantBlocks {
    /// Add a tensor of `rows` rows.
    pub fn insert(&mut self, name: impl Into<String>, layout: QuantLayout, rows: usize, bytes: Vec<u8>) {
        self.0.insert(name.into(), (layout, rows, bytes));
    }

    /// Remove and return `name`, if present.
    pub fn take(&mut self, name: &str) -> Option<(QuantLayout, usize, Vec<u8>)> {
        self.0.remove(name)
    }

    /// Names left.
    pub fn names(&self) -> Vec<&String> {
        let mut n: Vec<&String> = self.0.keys().collect();
        n.sort();
        n
    }
}

/// How a model's frozen base is kept in memory (QLoRA: `[target.lora] quantize_base`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BaseQuant {
    /// Floats in the dtype asked for.
    #[default]
    None,
    /// The blocks of the folder's GGUF file ([`GGUF_FILE`]) as they are: every weight it holds
    /// block-quantised (the decoder's linear layers, the embeddings, the head) stays so.
    Gguf,
    /// The decoder's linear weights quantised at load to this type (the embeddings and the head
    /// stay floats, as bitsandbytes leaves them); rows that are not whole 256-value super-blocks
    /// take llama.cpp's fallback (Q4_K to Q5_0, Q5_K to Q5_1, Q6_K to Q8_0).
    To(GgmlType),
}

impl BaseQuant {
    /// The type a row of `cols` values is quantised to for `ty` (llama.cpp's fallback when a
    /// K-quant's 256-value super-blocks do not divide it).
    pub fn row_type(ty: GgmlType, cols: usize) -> GgmlType {
        let (block, _) = ty.block();
        if cols.is_multiple_of(block) {
            return ty;
        }
        match ty {
            GgmlType::Q4K => GgmlType::Q5_0,
            GgmlType::Q5K => GgmlType::Q5_1,
            _ => GgmlType::Q8_0,
        }
    }
}

/// `values` (`rows x cols`, row-major) transposed, in 32 x 32 tiles: a row-by-row loop writes a
/// column of the output, one cache line per value (a quarter of a model's load time).
pub(crate) fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const TILE: usize = 32;
    let mut out = vec![0.0; values.len()];
    for r0 in (0..rows).step_by(TILE) {
        let r1 = (r0 + TILE).min(rows);
        let block = &values[r0 * cols..r1 * cols];
        for c0 in (0..cols).step_by(TILE) {
            for c in c0..(c0 + TILE).min(cols) {
                // Output row `c`, columns r0..r1: contiguous; the reads stay within the tile.
                let dst = &mut out[c * rows + r0..c * rows + r1];
                for (d, src) in dst.iter_mut().zip(block[c..].iter().step_by(cols)) {
                    *d = *src;
                }
            }
        }
    }
    out
}

struct Builder<'a, B: Backend> {
    store: TensorStore,
    /// Weights kept in their GGUF blocks.
    blocks: QuantBlocks,
    /// The type the decoder's linear weights are quantised to at load, if any.
    quantize: Option<GgmlType>,
    dir: &'a Path,
    device: &'a B::Device,
    dtype: DType,
    /// Keep a matrix whose every value is a bf16 in bf16 (a frozen model for inference on a
    /// backend whose products widen it on the fly: [`load_frozen`]).
    exact_bf16: bool,
}

impl<B: Backend> Builder<'_, B> {
    fn tensor<const D: usize>(&self, values: Vec<f32>, shape: [usize; D]) -> Param<Tensor<B, D>> {
        Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), (self.device, self.dtype)))
    }

    /// A weight matrix: in bf16 when [`Self::exact_bf16`] and every value is one (widening it
    /// back gives the same values), else in the dtype asked for.
    fn matrix(&self, values: Vec<f32>, shape: [usize; 2]) -> Param<Tensor<B, 2>> {
        // The low halves OR-ed 64 values at a time (a loop the compiler vectorises).
        let exact = || values.chunks(64).all(|c| c.iter().fold(0, |acc, v| acc | v.to_bits()) & 0xffff == 0);
        if self.exact_bf16 && exact() {
            let t = Tensor::from_data(TensorData::new(values, shape), (self.device, DType::BF16));
            return Param::from_tensor(t);
        }
        self.tensor(values, shape)
    }

    fn vector(&mut self, name: &str, n: usize) -> Result<Param<Tensor<B, 1>>> {
        let v = self.store.take(name, &[n], self.dir)?;
        Ok(self.tensor(v, [n]))
    }

    /// `name` (`[rows, cols]`) as its GGUF blocks, if they were kept.
    fn blocks(&mut self, name: &str, rows: usize, cols: usize) -> Result<Option<QuantWeight<B>>> {
        let Some((layout, got, bytes)) = self.blocks.take(name) else { return Ok(None) };
        if got != rows || layout.cols != cols {
            return Err(ModelError::format(
                self.dir,
                format!("tensor `{name}` has shape [{got}, {}]; the config implies [{rows}, {cols}]", layout.cols),
            ));
        }
        Ok(Some(QuantWeight::new(layout, &bytes, self.device)))
    }

    fn empty<const D: usize>(&self, shape: [usize; D]) -> Param<Tensor<B, D>> {
        Param::from_tensor(Tensor::zeros(shape, (self.device, self.dtype)))
    }

    fn linear(&mut self, prefix: &str, inp: usize, out: usize, bias: bool) -> Result<Linear<B>> {
        let name = format!("{prefix}.weight");
        let (weight, quant) = match self.blocks(&name, out, inp)? {
            Some(q) => (self.empty([0, 0]), Some(q)),
            None => {
                let w = self.store.take(&name, &[out, inp], self.dir)?;
                // Quantised at load (not the head); rows that are not whole 32-value blocks stay
                // floats (llama.cpp keeps such rows in F16).
                let layout = self
                    .quantize
                    .filter(|_| prefix != "lm_head")
                    .and_then(|ty| QuantLayout::new(BaseQuant::row_type(ty, inp), inp).ok());
                match layout {
                    Some(l) => {
                        let blocks = crate::quantize::quantize_parallel(l.ty, &w);
                        (self.empty([0, 0]), Some(QuantWeight::new(l, &blocks, self.device)))
                    }
                    None => (self.matrix(transpose(&w, out, inp), [inp, out]), None),
                }
            }
        };
        let bias = if bias { Some(self.vector(&format!("{prefix}.bias"), out)?) } else { None };
        Ok(Linear { weight, bias, lora: None, quant })
    }

    fn norm(&mut self, name: &str, n: usize, c: &LlamaConfig) -> Result<RmsNorm<B>> {
        Ok(RmsNorm { weight: self.vector(name, n)?, eps: c.rms_norm_eps, unit_offset: c.gemma_norms })
    }
}

/// [`build_model`] for a model that only runs forward, as [`load_frozen`] loads one: in f32 on
/// a backend whose linear products widen bf16 weights, the weights whose values are all bf16
/// stay bf16.
pub(crate) fn build_frozen<B: LogProbBackend>(
    config: LlamaConfig,
    store: TensorStore,
    dir: &Path,
    device: &B::Device,
    dtype: DType,
) -> Result<LlamaModel<B>> {
    build(config, (store, QuantBlocks::default()), None, dir, (device, dtype), keeps_bf16::<B>(dtype))
}

/// Whether a frozen model in `dtype` keeps its exactly-bf16 weights in bf16 on backend `B`: in
/// f32 on a backend whose linear products widen them as they read them.
fn keeps_bf16<B: LogProbBackend>(dtype: DType) -> bool {
    dtype == DType::F32 && B::mixes_bf16_weights()
}

/// Build a model from host tensors named as in a Hugging Face checkpoint.
pub fn build_model<B: Backend>(
    config: LlamaConfig,
    store: TensorStore,
    dir: &Path,
    device: &B::Device,
    dtype: DType,
) -> Result<LlamaModel<B>> {
    build_quantized(config, (store, QuantBlocks::default()), None, dir, (device, dtype))
}

/// [`build_model`] with weights kept in their GGUF `blocks`, and the decoder's other linear
/// weights quantised to `quantize` (QLoRA's base; [`BaseQuant`]).
pub fn build_quantized<B: Backend>(
    config: LlamaConfig,
    tensors: (TensorStore, QuantBlocks),
    quantize: Option<GgmlType>,
    dir: &Path,
    (device, dtype): (&B::Device, DType),
) -> Result<LlamaModel<B>> {
    build(config, tensors, quantize, dir, (device, dtype), false)
}

/// [`build_quantized`], with matrices that are exactly bf16 kept so when `exact_bf16`.
fn build<B: Backend>(
    config: LlamaConfig,
    (mut store, blocks): (TensorStore, QuantBlocks),
    quantize: Option<GgmlType>,
    dir: &Path,
    (device, dtype): (&B::Device, DType),
    exact_bf16: bool,
) -> Result<LlamaModel<B>> {
    let c = &config;
    // The rotary tables some exports carry are not used: dropped first, so that they do not keep
    // their files' bytes alive while the model is built (every shard of older Llama exports has
    // some).
    store.rename(|n| (!n.ends_with("rotary_emb.inv_freq")).then(|| n.to_owned()));
    let mut b = Builder::<B> { store, blocks, quantize, dir, device, dtype, exact_bf16 };
    let (h, q_out, kv_out) = (c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    let embed_quant = b.blocks("model.embed_tokens.weight", c.vocab_size, h)?;
    let embed_tokens = if embed_quant.is_some() {
        b.empty([0, h])
    } else {
        let embed = b.store.take("model.embed_tokens.weight", &[c.vocab_size, h], dir)?;
        b.matrix(embed, [c.vocab_size, h])
    };
    let mut layers = Vec::with_capacity(c.num_layers);
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}");
        let head_norm = |b: &mut Builder<'_, B>, which: &str| -> Result<Option<RmsNorm<B>>> {
            c.qk_norm.then(|| b.norm(&format!("{p}.self_attn.{which}.weight"), c.head_dim, c)).transpose()
        };
        let gemma_norm = |b: &mut Builder<'_, B>, which: &str| -> Result<Option<RmsNorm<B>>> {
            c.gemma_norms.then(|| b.norm(&format!("{p}.{which}.weight"), h, c)).transpose()
        };
        layers.push(DecoderLayer {
            self_attn: Attention {
                q_proj: b.linear(&format!("{p}.self_attn.q_proj"), h, q_out, c.qkv_bias)?,
                k_proj: b.linear(&format!("{p}.self_attn.k_proj"), h, kv_out, c.qkv_bias)?,
                v_proj: b.linear(&format!("{p}.self_attn.v_proj"), h, kv_out, c.qkv_bias)?,
                o_proj: b.linear(&format!("{p}.self_attn.o_proj"), q_out, h, c.o_bias)?,
                q_norm: head_norm(&mut b, "q_norm")?,
                k_norm: head_norm(&mut b, "k_norm")?,
                num_heads: c.num_heads,
                num_kv_heads: c.num_kv_heads,
                head_dim: c.head_dim,
            },
            mlp: Mlp {
                gate_proj: b.linear(&format!("{p}.mlp.gate_proj"), h, c.intermediate_size, false)?,
                up_proj: b.linear(&format!("{p}.mlp.up_proj"), h, c.intermediate_size, false)?,
                down_proj: b.linear(&format!("{p}.mlp.down_proj"), c.intermediate_size, h, false)?,
                gelu_tanh: c.hidden_act == Activation::GeluTanh,
            },
            input_layernorm: b.norm(&format!("{p}.input_layernorm.weight"), h, c)?,
            post_attention_layernorm: b.norm(&format!("{p}.post_attention_layernorm.weight"), h, c)?,
            pre_feedforward_layernorm: gemma_norm(&mut b, "pre_feedforward_layernorm")?,
            post_feedforward_layernorm: gemma_norm(&mut b, "post_feedforward_layernorm")?,
            sliding: c.layer_is_sliding(l),
        });
    }
    let norm = b.norm("model.norm.weight", h, c)?;
    let lm_head = if c.tie_word_embeddings {
        // Some tied checkpoints still carry a copy of the head; it must equal the embeddings'
        // shape, and is not used.
        b.store.take_optional("lm_head.weight", &[c.vocab_size, h], dir)?;
        b.blocks.take("lm_head.weight");
        None
    } else {
        Some(b.linear("lm_head", h, c.vocab_size, false)?)
    };
    let mut leftover: Vec<String> = b.store.names().into_iter().cloned().collect();
    leftover.extend(b.blocks.names().into_iter().cloned());
    if !leftover.is_empty() {
        tracing::warn!(dir = %Shown(dir), unused = %leftover.join(", "), "checkpoint tensors the model does not use");
    }
    Ok(LlamaModel { config, weights: Llama { embed_tokens, embed_quant, layers, norm, lm_head }, dtype })
}

/// Whether `dir` holds a model: a Hugging Face checkpoint (`config.json`) or a PEFT adapter folder.
pub fn is_checkpoint(dir: &Path) -> bool {
    dir.join("config.json").is_file() || crate::lora::is_adapter_dir(dir)
}

/// The `config.json` of the checkpoint folder `dir`, or an error that says what `dir` is instead
/// (no such folder, a file, a folder without config.json).
pub fn config_file(dir: &Path) -> Result<PathBuf> {
    if crate::lora::is_adapter_dir(dir) {
        // A PEFT adapter folder: its base's configuration.
        return config_file(&crate::lora::read_adapter_config(dir)?.base);
    }
    if !dir.exists() {
        return Err(ModelError::format(dir, "no such checkpoint folder"));
    }
    if !dir.is_dir() {
        return Err(ModelError::format(
            dir,
            "not a folder: a checkpoint is a Hugging Face folder (config.json, tokenizer.json, *.safetensors)",
        ));
    }
    let file = dir.join("config.json");
    if !file.is_file() {
        return Err(ModelError::format(dir, "not a Hugging Face checkpoint folder: it has no config.json"));
    }
    Ok(file)
}

/// Load a Hugging Face checkpoint folder into `dtype` on `device`.
///
/// A PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`) is loaded on top of
/// its base (`base_model_name_or_path`): the base's weights in `dtype`, the adapters in f32 (the
/// trainer freezes the base and trains them).
pub fn load<B: Backend>(dir: &Path, device: &B::Device, dtype: DType) -> Result<LlamaModel<B>> {
    load_with(dir, device, dtype, BaseQuant::None)
}

/// [`load`] with the weights kept as `quant` says (QLoRA's base). A folder holding
/// [`GGUF_FILE`] and no safetensors is read from it (dequantised, unless `quant` keeps its
/// blocks).
pub fn load_with<B: Backend>(dir: &Path, device: &B::Device, dtype: DType, quant: BaseQuant) -> Result<LlamaModel<B>> {
    load_kept(dir, device, dtype, quant, false)
}

/// [`load`] for a model that only runs forward (generation, log-probs, evaluation): in f32, on
/// a backend whose linear products widen bf16 weights as they read them (the CPU's:
/// [`LogProbBackend::mixes_bf16_weights`]), the weight matrices and embeddings whose values are
/// all bf16 (a checkpoint stored in bf16) stay bf16: half the memory and the bytes read, the
/// same products.
pub fn load_frozen<B: LogProbBackend>(dir: &Path, device: &B::Device, dtype: DType) -> Result<LlamaModel<B>> {
    load_kept(dir, device, dtype, BaseQuant::None, keeps_bf16::<B>(dtype))
}

fn load_kept<B: Backend>(
    dir: &Path,
    device: &B::Device,
    dtype: DType,
    quant: BaseQuant,
    exact_bf16: bool,
) -> Result<LlamaModel<B>> {
    if crate::lora::is_adapter_dir(dir) {
        let adapter = crate::lora::read_adapter_config(dir)?;
        let mut model = load_kept::<B>(&adapter.base, device, dtype, quant, exact_bf16)?;
        let json = crate::config::read_json(&adapter.base.join("config.json"))?;
        let multimodal = crate::gemma3::is_multimodal(&json);
        crate::lora::apply_adapter_dir(&mut model.weights, dir, &adapter, multimodal, DType::F32)?;
        tracing::info!(adapter = %Shown(dir), r = adapter.spec.r, "loaded LoRA adapter");
        return Ok(model);
    }
    if dir.join(crate::lora::CONFIG_FILE).is_file() {
        tracing::warn!(
            dir = %Shown(dir),
            "a checkpoint folder with whole weights and an adapter_config.json: the weights are read, the adapter is \
             not applied"
        );
    }
    let config_file = config_file(dir)?;
    let json = crate::config::read_json(&config_file)?;
    let config = LlamaConfig::from_json(&json, &config_file)?;
    let gguf = gguf_weights(dir);
    if quant == BaseQuant::Gguf && gguf.is_none() {
        return Err(ModelError::format(
            dir,
            format!(
                "quantize_base = \"gguf\" keeps the blocks of the folder's {GGUF_FILE}, and it has none (write one \
                 with `fuserl convert gguf FILE.gguf DIR --keep-quantized`); a safetensors checkpoint is quantised at \
                 load with quantize_base = \"q4_k\" (or q5_k, q6_k, q8_0)"
            ),
        ));
    }
    let _span = tracing::info_span!("load", dir = %Shown(dir)).entered();
    let tensors = if let Some(gguf) = gguf {
        if let BaseQuant::To(ty) = quant {
            tracing::warn!(
                dir = %Shown(dir),
                "the folder's weights are a GGUF file: its blocks are dequantised and quantised again to {ty:?} \
                 (quantize_base = \"gguf\" keeps them as they are)"
            );
        }
        let g = crate::gguf::Gguf::read(&gguf)?;
        crate::gguf::tensors(&g, &config, quant == BaseQuant::Gguf)?
    } else {
        let mut store = TensorStore::read_dir(dir)?;
        if crate::gemma3::is_multimodal(&json) {
            store.rename(crate::gemma3::text_tensor_name);
        }
        (store, QuantBlocks::default())
    };
    let quantize = match quant {
        BaseQuant::To(ty) => Some(ty),
        _ => None,
    };
    let model = build(config, tensors, quantize, dir, (device, dtype), exact_bf16)?;
    tracing::info!(architecture = %model.config.architecture, layers = model.config.num_layers, "loaded checkpoint");
    Ok(model)
}

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().iter::<f32>().collect()
}

/// The model's tensors under their checkpoint names, as f32 `[out, in]` like the checkpoint.
pub fn named_tensors<B: LogProbBackend>(model: &LlamaModel<B>) -> BTreeMap<String, HostTensor> {
    let mut out = BTreeMap::new();
    let w = &model.weights;
    let linear = |out: &mut BTreeMap<String, HostTensor>, prefix: String, l: &Linear<B>| {
        let [inp, o] = l.dims();
        let w = match &l.quant {
            Some(q) => host(q.dequantized()),
            None => transpose(&host(l.weight.val()), inp, o),
        };
        out.insert(format!("{prefix}.weight"), (vec![o, inp], w));
        if let Some(b) = &l.bias {
            out.insert(format!("{prefix}.bias"), (vec![o], host(b.val())));
        }
    };
    let embed = match &w.embed_quant {
        Some(q) => (q.dims().to_vec(), host(q.dequantized())),
        None => (w.embed_tokens.val().dims().to_vec(), host(w.embed_tokens.val())),
    };
    out.insert("model.embed_tokens.weight".into(), embed);
    for (l, layer) in w.layers.iter().enumerate() {
        let p = format!("model.layers.{l}");
        let a = &layer.self_attn;
        linear(&mut out, format!("{p}.self_attn.q_proj"), &a.q_proj);
        linear(&mut out, format!("{p}.self_attn.k_proj"), &a.k_proj);
        linear(&mut out, format!("{p}.self_attn.v_proj"), &a.v_proj);
        linear(&mut out, format!("{p}.self_attn.o_proj"), &a.o_proj);
        linear(&mut out, format!("{p}.mlp.gate_proj"), &layer.mlp.gate_proj);
        linear(&mut out, format!("{p}.mlp.up_proj"), &layer.mlp.up_proj);
        linear(&mut out, format!("{p}.mlp.down_proj"), &layer.mlp.down_proj);
        let norms = [
            ("input_layernorm", Some(&layer.input_layernorm)),
            ("post_attention_layernorm", Some(&layer.post_attention_layernorm)),
            ("pre_feedforward_layernorm", layer.pre_feedforward_layernorm.as_ref()),
            ("post_feedforward_layernorm", layer.post_feedforward_layernorm.as_ref()),
            ("self_attn.q_norm", a.q_norm.as_ref()),
            ("self_attn.k_norm", a.k_norm.as_ref()),
        ];
        for (name, norm) in norms.into_iter().filter_map(|(n, norm)| Some((n, norm?))) {
            out.insert(format!("{p}.{name}.weight"), (norm.weight.val().dims().to_vec(), host(norm.weight.val())));
        }
    }
    out.insert("model.norm.weight".into(), (w.norm.weight.val().dims().to_vec(), host(w.norm.weight.val())));
    if let Some(head) = &w.lm_head {
        linear(&mut out, "lm_head".into(), head);
    }
    out
}

/// Save `model` as a Hugging Face checkpoint in `dir`: config.json, f32 safetensors (sharded
/// above `max_shard_bytes`, with an index), and the side files (tokenizer, template) copied
/// from `side_files_from` when given.
pub fn save<B: LogProbBackend>(
    model: &LlamaModel<B>,
    dir: &Path,
    max_shard_bytes: usize,
    side_files_from: Option<&Path>,
) -> Result<()> {
    save_as(model, dir, max_shard_bytes, side_files_from, DType::F32)
}

/// Like [`save`], with the weights written as `dtype` (F32, F16 or BF16).
pub fn save_as<B: LogProbBackend>(
    model: &LlamaModel<B>,
    dir: &Path,
    max_shard_bytes: usize,
    side_files_from: Option<&Path>,
    dtype: DType,
) -> Result<()> {
    let (st_dtype, width, torch_name) = match dtype {
        DType::F32 => (StDtype::F32, 4, "float32"),
        DType::F16 => (StDtype::F16, 2, "float16"),
        DType::BF16 => (StDtype::BF16, 2, "bfloat16"),
        other => return Err(ModelError::Input(format!("cannot save weights as {other:?}; supported: F32, F16, BF16"))),
    };
    let encode = |values: &[f32]| -> Vec<u8> {
        let mut out = Vec::with_capacity(values.len() * width);
        match st_dtype {
            StDtype::F16 => values.iter().for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
            StDtype::BF16 => values.iter().for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
            _ => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        }
        out
    };
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    // A model with adapters is saved merged (`W + s A B`, in f32 before the cast to `dtype`).
    let tensors = if crate::lora::has_adapters(&model.weights) {
        let merged = LlamaModel {
            config: model.config.clone(),
            weights: crate::lora::merged(model.weights.clone()),
            dtype: model.dtype,
        };
        named_tensors(&merged)
    } else {
        named_tensors(model)
    };
    // Shard greedily in name order.
    let mut shards: Vec<Vec<(&String, &HostTensor)>> = vec![Vec::new()];
    let mut size = 0usize;
    for entry in &tensors {
        let bytes = entry.1.1.len() * 4;
        if size > 0 && size + bytes > max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += bytes;
        shards.last_mut().expect("one shard").push(entry);
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for (i, shard) in shards.iter().enumerate() {
        let file =
            if n == 1 { "model.safetensors".to_owned() } else { format!("model-{:05}-of-{n:05}.safetensors", i + 1) };
        let buffers: Vec<(String, Vec<u8>, Vec<usize>)> =
            shard.iter().map(|(name, (shape, values))| ((*name).clone(), encode(values), shape.clone())).collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = buffers
            .iter()
            .map(|(name, bytes, shape)| {
                let view = safetensors::tensor::TensorView::new(st_dtype, shape.clone(), bytes)
                    .map_err(|e| ModelError::format(dir.join(&file), e.to_string()))?;
                Ok((name.clone(), view))
            })
            .collect::<Result<_>>()?;
        let mut meta = HashMap::new();
        meta.insert("format".to_owned(), "pt".to_owned());
        // Streamed to a temporary file (no second copy of the shard in memory), then renamed.
        write_atomic_with(&dir.join(&file), |tmp| {
            safetensors::serialize_to_file(views, Some(meta), tmp).map_err(|e| match e {
                // The I/O error itself (a full disk said as such), not wrapped in the crate's.
                safetensors::SafeTensorError::IoError(io) => io,
                other => std::io::Error::other(other),
            })
        })?;
        for (name, (_, values)) in shard {
            total += values.len() * width;
            weight_map.insert((*name).clone(), serde_json::Value::String(file.clone()));
        }
    }
    if n > 1 {
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_atomic(&dir.join("model.safetensors.index.json"), index.to_string().as_bytes())?;
    }
    let mut hf = model.config.to_hf_json();
    hf["torch_dtype"] = torch_name.into();
    let config = serde_json::to_string_pretty(&hf).map_err(|e| ModelError::format(dir, e.to_string()))?;
    write_atomic(&dir.join("config.json"), config.as_bytes())?;
    if let Some(src) = side_files_from {
        copy_side_files(src, dir)?;
    }
    Ok(())
}

/// Copy the checkpoint side files ([`SIDE_FILES`]: tokenizer, template) that `src` has into `dir`,
/// each atomically. For an adapter folder `src` without them, its base's.
pub fn copy_side_files(src: &Path, dir: &Path) -> Result<()> {
    let base = crate::lora::base_of(src);
    for f in SIDE_FILES {
        let from = [src.join(f), base.join(f)].into_iter().find(|p| p.is_file());
        if let Some(from) = from {
            let bytes = std::fs::read(&from).map_err(|e| ModelError::io(&from, e))?;
            write_atomic(&dir.join(f), &bytes)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn tiled_transpose_is_the_transpose_at_shapes_that_are_not_whole_tiles() {
        for (rows, cols) in [(1, 1), (3, 70), (33, 31), (64, 32), (100, 7)] {
            let values: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let t = super::transpose(&values, rows, cols);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(t[c * rows + r], values[r * cols + c], "{rows}x{cols} at ({r}, {c})");
                }
            }
        }
    }
}
