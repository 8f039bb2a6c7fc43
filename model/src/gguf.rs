//! GGUF import (`fuserl convert gguf IN.gguf OUT_DIR`): read a llama.cpp GGUF file, dequantise
//! its tensors (the types of [`crate::quant`]), map llama.cpp names to Hugging Face names, undo
//! llama.cpp's row permutation of Q and K, and rebuild `config.json`, `tokenizer.json`,
//! `tokenizer_config.json` and `chat_template.jinja` from the metadata. The result is an ordinary
//! Hugging Face checkpoint folder.
//!
//! Format: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md> (version 2 and 3).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use fuserl_io::fs::write_atomic;

use crate::checkpoint::{QuantBlocks, TensorStore};
use crate::config::{Architecture, LlamaConfig, RopeScaling};
use crate::error::{ModelError, Result};
use crate::quant::GgmlType;
use fuserl_kernels::QuantLayout;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Meta {
    /// Any integer type.
    Int(i64),
    /// Any float type.
    Float(f64),
    /// Boolean.
    Bool(bool),
    /// UTF-8 string.
    Str(String),
    /// Array.
    Array(Vec<Meta>),
}

impl Meta {
    fn as_i64(&self) -> Option<i64> {
        match self {
            Self::Int(i) => Some(*i),
            _ => None,
        }
    }
    fn as_f64(&self) -> Option<f64> {
        match self {
            Self::Float(f) => Some(*f),
            Self::Int(i) => Some(*i as f64),
            _ => None,
        }
    }
    fn as_str(&self) -> Option<&str> {
        match self {
            Self::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// A metadata value as a message shows it.
fn shown_meta(m: &Meta) -> String {
    match m {
        Meta::Int(i) => i.to_string(),
        Meta::Float(f) => f.to_string(),
        Meta::Bool(b) => b.to_string(),
        Meta::Str(s) => format!("the text `{}`", fuserl_core::text::printable(&s.chars().take(40).collect::<String>())),
        Meta::Array(a) => format!("an array of {}", a.len()),
    }
}

/// One tensor's entry in the header.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// llama.cpp name.
    pub name: String,
    /// Dimensions, fastest first (ggml order).
    pub dims: Vec<u64>,
    /// ggml type code.
    pub ggml_type: u32,
    /// Offset from the start of the data section.
    pub offset: u64,
}

/// A parsed GGUF file (the whole file in memory).
#[derive(Debug)]
pub struct Gguf {
    /// The file.
    pub file: PathBuf,
    /// Metadata.
    pub meta: BTreeMap<String, Meta>,
    /// Tensor entries.
    pub tensors: Vec<TensorInfo>,
    bytes: Vec<u8>,
    data_start: usize,
}

/// The longest vocabulary entry read (in characters): Qwen2.5's longest has 128, Gemma 3's 31.
const MAX_TOKEN_CHARS: usize = 1024;

/// Arrays within arrays deeper than this are refused (llama.cpp writes one level; a reader that
/// recursed without a limit overflowed its stack on a hand-made file).
const MAX_META_DEPTH: usize = 4;
/// Metadata values in all (array elements count one each) before the file is refused: the
/// largest real vocabularies hold under a million entries in all their arrays (Gemma 3: 262,144
/// tokens, scores and types), and each value costs tens of bytes in memory.
const MAX_META_VALUES: u64 = 1 << 22;

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    file: &'a Path,
    /// Metadata values still allowed ([`MAX_META_VALUES`]).
    budget: u64,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.b.len()).ok_or_else(|| {
            ModelError::format(
                self.file,
                format!("truncated: needs {n} bytes at offset {}, the file has {}", self.pos, self.b.len()),
            )
        })?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()? as usize;
        let pos = self.pos;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| ModelError::format(self.file, format!("string at offset {pos} is not UTF-8")))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Meta> {
        if self.budget == 0 {
            return Err(ModelError::format(
                self.file,
                format!("more than {MAX_META_VALUES} metadata values (at offset {}): not a model's metadata", self.pos),
            ));
        }
        self.budget -= 1;
        Ok(match ty {
            0 => Meta::Int(i64::from(self.take(1)?[0])),
            1 => Meta::Int(i64::from(self.take(1)?[0] as i8)),
            2 => Meta::Int(i64::from(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))),
            3 => Meta::Int(i64::from(i16::from_le_bytes(self.take(2)?.try_into().expect("2")))),
            4 => Meta::Int(i64::from(self.u32()?)),
            5 => Meta::Int(i64::from(self.u32()? as i32)),
            6 => Meta::Float(f64::from(f32::from_le_bytes(self.take(4)?.try_into().expect("4")))),
            7 => Meta::Bool(self.take(1)?[0] != 0),
            8 => Meta::Str(self.string()?),
            9 => {
                let at = self.pos;
                if depth >= MAX_META_DEPTH {
                    return Err(ModelError::format(
                        self.file,
                        format!("metadata array at offset {at} is nested deeper than {MAX_META_DEPTH} levels"),
                    ));
                }
                let inner = self.u32()?;
                let n = self.u64()?;
                if n > self.budget {
                    return Err(ModelError::format(
                        self.file,
                        format!(
                            "metadata array at offset {at} claims {n} values; at most {MAX_META_VALUES} in all are read"
                        ),
                    ));
                }
                let mut items = Vec::with_capacity(n.min(1 << 20) as usize);
                for _ in 0..n {
                    items.push(self.value(inner, depth + 1)?);
                }
                Meta::Array(items)
            }
            10 => Meta::Int(self.u64()? as i64),
            11 => Meta::Int(self.u64()? as i64),
            12 => Meta::Float(f64::from_le_bytes(self.take(8)?.try_into().expect("8"))),
            other => {
                return Err(ModelError::format(
                    self.file,
                    format!("unknown metadata value type {other} at offset {}", self.pos),
                ));
            }
        })
    }
}

impl Gguf {
    /// Read and parse `file`.
    pub fn read(file: &Path) -> Result<Self> {
        let bytes = fuserl_core::paths::read_regular(file).map_err(|e| ModelError::io(file, e))?;
        let mut c = Cursor { b: &bytes, pos: 0, file, budget: MAX_META_VALUES };
        if c.take(4)? != b"GGUF" {
            return Err(ModelError::format(file, "not a GGUF file (no GGUF magic)"));
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(ModelError::format(file, format!("GGUF version {version}; supported: 2 and 3")));
        }
        let n_tensors = c.u64()?;
        let n_meta = c.u64()?;
        let mut meta = BTreeMap::new();
        for _ in 0..n_meta {
            let at = c.pos;
            let key = c.string()?;
            let ty = c.u32()?;
            let v = c.value(ty, 0)?;
            if meta.insert(key.clone(), v).is_some() {
                return Err(ModelError::format(
                    file,
                    format!(
                        "metadata key `{}` appears twice (again at offset {at})",
                        fuserl_core::text::printable(&key)
                    ),
                ));
            }
        }
        let mut tensors = Vec::new();
        let mut names = std::collections::HashSet::new();
        for _ in 0..n_tensors {
            let at = c.pos;
            let name = c.string()?;
            if !names.insert(name.clone()) {
                return Err(ModelError::format(
                    file,
                    format!("tensor `{}` appears twice (again at offset {at})", fuserl_core::text::printable(&name)),
                ));
            }
            let n_dims = c.u32()?;
            let dims = (0..n_dims).map(|_| c.u64()).collect::<Result<Vec<_>>>()?;
            let ggml_type = c.u32()?;
            let offset = c.u64()?;
            tensors.push(TensorInfo { name, dims, ggml_type, offset });
        }
        let align = meta.get("general.alignment").and_then(Meta::as_i64).unwrap_or(32).max(1) as usize;
        let data_start = c.pos.div_ceil(align) * align;
        Ok(Self { file: file.to_path_buf(), meta, tensors, bytes, data_start })
    }

    /// A required count: an integer from 1 to the cap [`LlamaConfig`]'s sizes have (a head count
    /// of 0 divided by zero, a negative one wrapped around, a huge one sized terabytes).
    fn meta_usize(&self, key: &str) -> Result<usize> {
        match self.meta_count(key)? {
            Some(n) => Ok(n),
            None => Err(ModelError::format(&self.file, format!("missing metadata `{key}`"))),
        }
    }

    /// An optional count (see [`Gguf::meta_usize`]).
    fn meta_count(&self, key: &str) -> Result<Option<usize>> {
        let cap = if key.ends_with(".block_count") { crate::config::MAX_LAYERS } else { crate::config::MAX_SIZE };
        match self.meta.get(key) {
            None => Ok(None),
            Some(Meta::Int(n)) if (1..=cap as i64).contains(n) => Ok(Some(*n as usize)),
            Some(other) => Err(ModelError::format(
                &self.file,
                format!("metadata `{key}`: expected a count from 1 to {cap}, found {}", shown_meta(other)),
            )),
        }
    }

    /// Dequantise one tensor to f32, in row-major order of its Hugging Face shape (the ggml dims
    /// reversed).
    pub fn dequantize(&self, t: &TensorInfo) -> Result<Vec<f32>> {
        let (ty, raw) = self.raw(t)?;
        let (block, _) = ty.block();
        let mut out = Vec::with_capacity(raw.len() / ty.block().1 * block);
        ty.dequantize(raw, &mut out);
        Ok(out)
    }

    /// One tensor's type and bytes (whole rows of whole blocks), checked against the file.
    pub fn raw(&self, t: &TensorInfo) -> Result<(GgmlType, &[u8])> {
        let ty = GgmlType::from_code(t.ggml_type).ok_or_else(|| {
            ModelError::format(
                &self.file,
                format!(
                    "tensor `{}` has ggml type {} ({}); supported: {}",
                    t.name,
                    t.ggml_type,
                    GgmlType::name_of(t.ggml_type),
                    GgmlType::SUPPORTED
                ),
            )
        })?;
        let (block, block_bytes) = ty.block();
        let n = t
            .dims
            .iter()
            .try_fold(1usize, |acc, &d| usize::try_from(d).ok().and_then(|d| acc.checked_mul(d)))
            .ok_or_else(|| {
                ModelError::format(
                    &self.file,
                    format!("tensor `{}`: dims {:?} claim more values than any file can hold", t.name, t.dims),
                )
            })?;
        // Blocks never straddle rows (ggml quantises row by row): the row length, the first
        // dimension, must be whole blocks.
        if !n.is_multiple_of(block) || t.dims.first().is_none_or(|&row| row % block as u64 != 0) {
            return Err(ModelError::format(
                &self.file,
                format!(
                    "tensor `{}`: rows of {} values (dims {:?}) are not a whole number of {block}-value blocks",
                    t.name,
                    t.dims.first().copied().unwrap_or(0),
                    t.dims
                ),
            ));
        }
        // Checked against the file before anything is allocated.
        let len = (n / block).saturating_mul(block_bytes);
        let raw = usize::try_from(t.offset)
            .ok()
            .and_then(|o| self.data_start.checked_add(o))
            .and_then(|start| self.bytes.get(start..start.checked_add(len)?))
            .ok_or_else(|| {
                ModelError::format(
                    &self.file,
                    format!(
                        "tensor `{}` ({} values of {}) runs past the end of the file ({} bytes)",
                        t.name,
                        n,
                        GgmlType::name_of(t.ggml_type),
                        self.bytes.len()
                    ),
                )
            })?;
        Ok((ty, raw))
    }
}

/// llama.cpp's permutation of Llama's Q/K rows for its RoPE layout (the inverse of
/// [`unpermute_rows`]): rows `[n_head, 2, head_dim/2]` written as `[n_head, head_dim/2, 2]`.
pub fn permute_rows(w: &[f32], n_head: usize, rows: usize, cols: usize) -> Vec<f32> {
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = vec![0.0; w.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                // GGUF row (h, i, j) <- HF row (h, j, i)
                let src = h * hd + j * half + i;
                let dst = h * hd + i * 2 + j;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Undo llama.cpp's permutation of Q/K rows: view `[n_head, 2, head_dim/2, cols]` was written as
/// `[n_head, head_dim/2, 2, cols]`.
pub fn unpermute_rows<T: Copy + Default>(w: &[T], n_head: usize, rows: usize, cols: usize) -> Vec<T> {
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = vec![T::default(); w.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                // HF row (h, j, i) <- GGUF row (h, i, j)
                let src = h * hd + i * 2 + j;
                let dst = h * hd + j * half + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// Which families a row of [`NAMES`] applies to.
#[derive(Clone, Copy, PartialEq)]
enum Family {
    Any,
    Gemma,
    NotGemma,
}

/// Whole-model tensors: (llama.cpp name, Hugging Face name).
const MODEL_NAMES: [(&str, &str); 3] =
    [("token_embd", "model.embed_tokens"), ("output_norm", "model.norm"), ("output", "lm_head")];

/// Per-layer parts: (llama.cpp part, Hugging Face part, the families it names). Both directions
/// of the mapping ([`hf_name`], [`gguf_name`]) read this one table.
const NAMES: [(&str, &str, Family); 14] = [
    ("attn_q", "self_attn.q_proj", Family::Any),
    ("attn_k", "self_attn.k_proj", Family::Any),
    ("attn_v", "self_attn.v_proj", Family::Any),
    ("attn_output", "self_attn.o_proj", Family::Any),
    ("ffn_gate", "mlp.gate_proj", Family::Any),
    ("ffn_up", "mlp.up_proj", Family::Any),
    ("ffn_down", "mlp.down_proj", Family::Any),
    ("attn_norm", "input_layernorm", Family::Any),
    ("ffn_norm", "pre_feedforward_layernorm", Family::Gemma),
    ("ffn_norm", "post_attention_layernorm", Family::NotGemma),
    ("post_attention_norm", "post_attention_layernorm", Family::Gemma),
    ("post_ffw_norm", "post_feedforward_layernorm", Family::Gemma),
    ("attn_q_norm", "self_attn.q_norm", Family::Any),
    ("attn_k_norm", "self_attn.k_norm", Family::Any),
];

fn applies(f: Family, gemma: bool) -> bool {
    match f {
        Family::Any => true,
        Family::Gemma => gemma,
        Family::NotGemma => !gemma,
    }
}

/// The Hugging Face name of a llama.cpp tensor (`gemma`: Gemma's four norms per layer).
pub fn hf_name(name: &str, gemma: bool) -> Option<String> {
    let (stem, kind) = name.rsplit_once('.')?;
    if let Some((_, hf)) = MODEL_NAMES.iter().find(|(g, _)| *g == stem) {
        return Some(format!("{hf}.{kind}"));
    }
    let (layer, part) = stem.strip_prefix("blk.")?.split_once('.')?;
    let (_, hf, _) = NAMES.iter().find(|(g, _, f)| *g == part && applies(*f, gemma))?;
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// The llama.cpp name of a Hugging Face tensor: the inverse of [`hf_name`].
pub fn gguf_name(name: &str, gemma: bool) -> Option<String> {
    let (stem, kind) = name.rsplit_once('.')?;
    if let Some((g, _)) = MODEL_NAMES.iter().find(|(_, hf)| *hf == stem) {
        return Some(format!("{g}.{kind}"));
    }
    let (layer, part) = stem.strip_prefix("model.layers.")?.split_once('.')?;
    layer.parse::<usize>().ok()?;
    let (g, _, _) = NAMES.iter().find(|(_, hf, f)| *hf == part && applies(*f, gemma))?;
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// The tensors of `g` under their Hugging Face names, as the model of `config` (read from `g`)
/// expects them: llama.cpp's row permutation of Llama's Q and K undone, Gemma's norms without
/// their added 1. With `keep_blocks`, the block-quantised weights of linear layers, the
/// embeddings and the head are left in their blocks (rows permuted back as whole rows of
/// blocks) and returned apart; everything else is dequantised into the store.
pub fn tensors(g: &Gguf, config: &LlamaConfig, keep_blocks: bool) -> Result<(TensorStore, QuantBlocks)> {
    let input = &g.file;
    let gemma = config.gemma_norms;
    let llama = config.architecture == Architecture::Llama;
    let mut store = TensorStore::default();
    let mut blocks = QuantBlocks::default();
    for t in &g.tensors {
        let Some(name) = hf_name(&t.name, gemma) else {
            if t.name == "rope_freqs.weight" {
                return Err(ModelError::Unsupported {
                    file: input.to_path_buf(),
                    what: "GGUF tensor `rope_freqs.weight` (llama3 RoPE factors)".into(),
                });
            }
            tracing::warn!(tensor = %t.name, "skipping a GGUF tensor with no Hugging Face counterpart");
            continue;
        };
        let shape: Vec<usize> = t.dims.iter().rev().map(|&d| d as usize).collect();
        // llama.cpp permutes Q and K rows of Llama models for its RoPE layout (not Qwen2's), and
        // their biases (one value a row).
        let heads = if !llama || shape.is_empty() {
            None
        } else if name.ends_with("self_attn.q_proj.weight") || name.ends_with("self_attn.q_proj.bias") {
            Some(config.num_heads)
        } else if name.ends_with("self_attn.k_proj.weight") || name.ends_with("self_attn.k_proj.bias") {
            Some(config.num_kv_heads)
        } else {
            None
        };
        let keepable =
            name.ends_with("_proj.weight") || name == "model.embed_tokens.weight" || name == "lm_head.weight";
        if keep_blocks && keepable && shape.len() == 2 {
            let (ty, raw) = g.raw(t)?;
            if let Ok(layout) = QuantLayout::new(ty, shape[1]) {
                let rb = layout.row_bytes();
                let bytes = match heads {
                    Some(n) => unpermute_rows(raw, n, shape[0], rb),
                    None => raw.to_vec(),
                };
                blocks.insert(name, layout, shape[0], bytes);
                continue;
            }
        }
        let mut values = g.dequantize(t)?;
        if let Some(n) = heads {
            values = unpermute_rows(&values, n, shape[0], shape.get(1).copied().unwrap_or(1));
        }
        // llama.cpp stores Gemma's norm weights with the 1 of `1 + weight` added.
        if gemma && name.ends_with("norm.weight") {
            values.iter_mut().for_each(|v| *v -= 1.0);
        }
        store.insert(name, shape, values, input);
    }
    Ok((store, blocks))
}

/// Convert a GGUF file into a Hugging Face checkpoint folder `out` (written atomically file by
/// file; the folder is created). Returns the resolved config.
pub fn convert(input: &Path, out: &Path) -> Result<LlamaConfig> {
    convert_with(input, out, false)
}

/// [`convert`], or with `keep_quantized` a folder whose weights are the GGUF file itself
/// (copied in as [`crate::checkpoint::GGUF_FILE`] beside config.json and the tokenizer): loaded
/// dequantised by every command, or kept in its blocks by QLoRA (`[target.lora] quantize_base
/// = "gguf"`).
pub fn convert_with(input: &Path, out: &Path, keep_quantized: bool) -> Result<LlamaConfig> {
    let g = Gguf::read(input)?;
    let arch = g.meta.get("general.architecture").and_then(Meta::as_str).unwrap_or("");
    let architecture = match arch {
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        "qwen3" => Architecture::Qwen3,
        "gemma3" => Architecture::Gemma3,
        other => {
            return Err(ModelError::Unsupported {
                file: input.to_path_buf(),
                what: format!(
                    "GGUF architecture `{}`; supported: llama, qwen2, qwen3, gemma3",
                    fuserl_core::text::printable(other)
                ),
            });
        }
    };
    let gemma = arch == "gemma3";
    let key = |k: &str| format!("{arch}.{k}");
    let n_head = g.meta_usize(&key("attention.head_count"))?;
    let n_kv = g.meta_count(&key("attention.head_count_kv"))?.unwrap_or(n_head);
    let hidden = g.meta_usize(&key("embedding_length"))?;
    let tokens = match g.meta.get("tokenizer.ggml.tokens") {
        Some(Meta::Array(t)) => t.iter().map(|x| x.as_str().unwrap_or("").to_owned()).collect::<Vec<_>>(),
        _ => return Err(ModelError::format(input, "missing metadata `tokenizer.ggml.tokens`")),
    };
    let vocab = g.meta_count(&key("vocab_size"))?.unwrap_or(tokens.len());
    let head_dim = match g.meta_count(&key("attention.key_length"))? {
        Some(d) => d,
        None => g.meta_count(&key("rope.dimension_count"))?.unwrap_or(hidden / n_head),
    };
    let tied = !g.tensors.iter().any(|t| t.name == "output.weight");
    let id = |k: &str| g.meta.get(k).and_then(Meta::as_i64).map(|v| v as u32);
    let mut config = LlamaConfig {
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: g.meta_usize(&key("feed_forward_length"))?,
        num_layers: g.meta_usize(&key("block_count"))?,
        num_heads: n_head,
        num_kv_heads: n_kv,
        head_dim,
        rms_norm_eps: g.meta.get(&key("attention.layer_norm_rms_epsilon")).and_then(Meta::as_f64).unwrap_or(1e-5),
        rope_theta: g.meta.get(&key("rope.freq_base")).and_then(Meta::as_f64).unwrap_or(10000.0),
        tie_word_embeddings: tied,
        qkv_bias: architecture == Architecture::Qwen2,
        max_position_embeddings: g.meta_count(&key("context_length"))?.unwrap_or(2048),
        bos_token_id: id("tokenizer.ggml.bos_token_id"),
        eos_token_ids: id("tokenizer.ggml.eos_token_id").into_iter().collect(),
        ..LlamaConfig::blank(architecture)
    };
    if let Some(kind) = g.meta.get(&key("rope.scaling.type")) {
        match kind.as_str() {
            Some("none") => {}
            Some("linear") => {
                let factor = g.meta.get(&key("rope.scaling.factor")).and_then(Meta::as_f64).ok_or_else(|| {
                    ModelError::format(input, format!("linear RoPE scaling without `{}`", key("rope.scaling.factor")))
                })?;
                config.rope_scaling = RopeScaling::Linear { factor };
            }
            other => {
                return Err(ModelError::Unsupported {
                    file: input.to_path_buf(),
                    what: format!("GGUF RoPE scaling `{}`", other.unwrap_or("?")),
                });
            }
        }
    }
    config.qk_norm = matches!(arch, "qwen3" | "gemma3");
    if gemma {
        // What llama.cpp's gemma3 model takes as given, not from the metadata: every sixth layer
        // full, the others sliding with RoPE base 10,000 (and no scaling), queries scaled by
        // head_dim^-1/2 (hidden / heads for the 62-layer 27B), tied embeddings.
        let window = g.meta_usize(&key("attention.sliding_window"))?;
        config.sliding_window = Some(window);
        config.sliding_layers = (0..config.num_layers).map(|i| !(i + 1).is_multiple_of(6)).collect();
        config.local_rope = Some((10_000.0, RopeScaling::Default));
        config.gemma_norms = true;
        config.hidden_act = crate::config::Activation::GeluTanh;
        let scalar = if config.num_layers == 62 { hidden / n_head } else { head_dim };
        config.query_pre_attn_scalar = Some(scalar as f64);
        config.rms_norm_eps =
            g.meta.get(&key("attention.layer_norm_rms_epsilon")).and_then(Meta::as_f64).unwrap_or(1e-6);
    }
    // The checks config.json gets (heads a multiple of the key/value heads, an even head size,
    // finite epsilon, ...), through the same path: the config as config.json, read back.
    LlamaConfig::from_json(&config.to_hf_json(), input).map_err(|e| match e {
        ModelError::Format { message, .. } => {
            ModelError::format(input, format!("its metadata describes an impossible model: {message}"))
        }
        other => other,
    })?;
    // The tokenizer first: a vocabulary this crate cannot rebuild fails before the slow part.
    std::fs::create_dir_all(out).map_err(|e| ModelError::io(out, e))?;
    write_tokenizer(&g, out)?;
    let (store, blocks) = tensors(&g, &config, keep_quantized)?;
    if keep_quantized {
        // Built once on the CPU with its blocks (every tensor there, with the right shape).
        crate::checkpoint::build_quantized::<crate::Cpu>(
            config.clone(),
            (store, blocks),
            None,
            input,
            (&Default::default(), burn::tensor::DType::F32),
        )?;
        drop(g);
        let file = out.join(crate::checkpoint::GGUF_FILE);
        // A copy (a hard link would tie the folder to later changes of the input, and a
        // read-only input could not be opened to sync it).
        fuserl_io::fs::write_atomic_with(&file, |tmp| std::fs::copy(input, tmp).map(|_| ()))?;
        // The folder's weights are the GGUF from now on: the safetensors an earlier conversion
        // wrote (`model.safetensors`, or the shards and their index) would be read first.
        remove_weights(out, |name| {
            name == "model.safetensors.index.json" || (name.starts_with("model") && name.ends_with(".safetensors"))
        });
        let json =
            serde_json::to_string_pretty(&config.to_hf_json()).map_err(|e| ModelError::format(out, e.to_string()))?;
        write_atomic(&out.join("config.json"), json.as_bytes())?;
        return Ok(config);
    }
    // An earlier `--keep-quantized` conversion's GGUF goes: the safetensors are the weights now.
    remove_weights(out, |name| name == crate::checkpoint::GGUF_FILE);
    // Build the model once on the CPU to check every tensor is there with the right shape, then
    // save it like any checkpoint.
    let model = crate::checkpoint::build_model::<crate::Cpu>(
        config.clone(),
        store,
        input,
        &Default::default(),
        burn::tensor::DType::F32,
    )?;
    crate::checkpoint::save(&model, out, 2 << 30, None)?;
    Ok(config)
}

/// Remove the weight files of the folder `out` that `stale` names (what an earlier conversion
/// into the same folder left).
fn remove_weights(out: &Path, stale: impl Fn(&str) -> bool) {
    let Ok(entries) = std::fs::read_dir(out) else { return };
    for e in entries.flatten() {
        if e.file_name().to_str().is_some_and(&stale) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// The split before byte-level BPE of Qwen2's tokenizer (its `tokenizer.json`).
pub(crate) const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// The same for Llama 3 (numbers in groups of up to three digits).
pub(crate) const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// `tokenizer.json` of a byte-level BPE vocabulary (llama.cpp's `gpt2` tokenizer model).
fn byte_level_tokenizer(g: &Gguf, tokens: &[String], types: &[i64], merges: Vec<String>) -> Result<Value> {
    let file = &g.file;
    // The pre-tokenizer llama.cpp calls `pre`: which regex splits text before BPE.
    let pre = g.meta.get("tokenizer.ggml.pre").and_then(Meta::as_str).unwrap_or("default");
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let split = |regex: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]})
    };
    let mut normalizer = Value::Null;
    let pre_tokenizer = match pre {
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level]}),
        "gpt2" | "gpt-2" | "default" => byte_level,
        // Qwen2's own tokenizer.json: this split, then bytes, after NFC.
        "qwen2" | "deepseek-r1-qwen" => {
            normalizer = json!({"type": "NFC"});
            split(QWEN2_SPLIT)
        }
        "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" => split(LLAMA3_SPLIT),
        other => {
            return Err(ModelError::Unsupported {
                file: file.clone(),
                what: format!(
                    "GGUF pre-tokenizer `{other}`; supported: smollm, starcoder, refact, gpt-2, gpt2, default, qwen2, \
                     deepseek-r1-qwen, llama3, llama-v3, llama-bpe, smaug-bpe"
                ),
            });
        }
    };
    let vocab: serde_json::Map<String, Value> =
        tokens.iter().enumerate().map(|(i, t)| (t.clone(), Value::from(i as u64))).collect();
    // Control (3) and user-defined (4) tokens are added tokens, matched before BPE.
    let added = added_tokens(tokens, types, |_| true);
    Ok(json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": normalizer, "pre_tokenizer": pre_tokenizer,
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges},
    }))
}

/// `tokenizer.json` of Gemma's SentencePiece vocabulary (llama.cpp's `llama` tokenizer model in a
/// `gemma3` file), as transformers rebuilds it from a GGUF (`GemmaTokenizer`): BPE with byte
/// fallback over the vocabulary; spaces become `▁` before the model; tokens of two or more real
/// spaces are spelled with `▁`; the file has no merges, so they are derived from the vocabulary,
/// best first in the order the tokens appear in the file (not by their scores, which do not
/// follow Gemma's merge order).
fn gemma_tokenizer(g: &Gguf, tokens: &[String], types: &[i64]) -> Result<Value> {
    let respelled: Vec<String> = tokens
        .iter()
        .map(|t| if t.contains(' ') && t.trim().is_empty() { "\u{2581}".repeat(t.chars().count()) } else { t.clone() })
        .collect();
    let merges = merges_from_vocabulary(&respelled);
    let vocab: serde_json::Map<String, Value> =
        respelled.iter().enumerate().map(|(i, t)| (t.clone(), Value::from(i as u64))).collect();
    let unk = g
        .meta
        .get("tokenizer.ggml.unknown_token_id")
        .and_then(Meta::as_i64)
        .and_then(|i| respelled.get(i as usize))
        .cloned()
        .unwrap_or_else(|| "<unk>".into());
    // As transformers: a user-defined token is added only under the spelling the vocabulary
    // has (the whitespace tokens, respelled, are left to the model).
    let added = added_tokens(&respelled, types, |i| types[i] == 3 || respelled[i] == tokens[i]);
    // BOS before every sequence when the file says so (encoding with special tokens).
    let bos = g.meta.get("tokenizer.ggml.bos_token_id").and_then(Meta::as_i64);
    let post_processor = match (bos, g.meta.get("tokenizer.ggml.add_bos_token")) {
        (Some(id), Some(Meta::Bool(true))) => {
            let token = respelled.get(id as usize).cloned().unwrap_or_default();
            json!({"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": token, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": token, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                    {"SpecialToken": {"id": token, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {token.clone(): {"id": token, "ids": [id], "tokens": [token]}}})
        }
        _ => Value::Null,
    };
    Ok(json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
        "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false},
        "post_processor": post_processor,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": merges},
    }))
}

/// BPE merges implied by a vocabulary listed best first (transformers' `generate_merges` with
/// each token's score the negated position of its last occurrence): every split of a token into
/// two tokens of the vocabulary is a merge; merges are ordered by their token's position, then
/// longer left parts first; within a token, splits are first ordered by the parts' ids.
pub fn merges_from_vocabulary(tokens: &[String]) -> Vec<[String; 2]> {
    let mut id: std::collections::HashMap<&str, usize> = std::collections::HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        id.insert(t, i);
    }
    let mut seen = std::collections::HashSet::with_capacity(tokens.len());
    // (score position, left length, right length, left, right), in dictionary order.
    let mut merges: Vec<(usize, usize, usize, &str, &str)> = Vec::new();
    for t in tokens {
        if !seen.insert(t.as_str()) {
            continue;
        }
        let position = id[t.as_str()];
        let mut local: Vec<(usize, usize, &str, &str)> = t
            .char_indices()
            .skip(1)
            .filter_map(|(cut, _)| {
                let (l, r) = t.split_at(cut);
                Some((*id.get(l)?, *id.get(r)?, l, r))
            })
            .collect();
        local.sort_by_key(|&(li, ri, _, _)| (li, ri));
        merges.extend(local.into_iter().map(|(_, _, l, r)| (position, l.chars().count(), r.chars().count(), l, r)));
    }
    // Python's sorted(key=(score, len l, len r), reverse=True) with score = -position: positions
    // ascending, lengths descending; stable.
    merges.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)).then(b.2.cmp(&a.2)));
    merges.into_iter().map(|(_, _, _, l, r)| [l.to_owned(), r.to_owned()]).collect()
}

/// Control tokens (type 3, special) and user-defined ones (type 4), matched before the model;
/// `keep(id)` filters them.
fn added_tokens(tokens: &[String], types: &[i64], keep: impl Fn(usize) -> bool) -> Vec<Value> {
    tokens
        .iter()
        .enumerate()
        .filter(|(i, _)| matches!(types.get(*i), Some(3 | 4)) && keep(*i))
        .map(|(i, t)| {
            json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": types[i] == 3})
        })
        .collect()
}

/// Rebuild `tokenizer.json`, `tokenizer_config.json` and `chat_template.jinja` from GGUF metadata
/// (byte-level BPE, llama.cpp's `gpt2` tokenizer model).
pub fn write_tokenizer(g: &Gguf, out: &Path) -> Result<()> {
    let file = &g.file;
    let model = g.meta.get("tokenizer.ggml.model").and_then(Meta::as_str).unwrap_or("");
    let arch = g.meta.get("general.architecture").and_then(Meta::as_str).unwrap_or("");
    let strings = |k: &str| -> Result<Vec<String>> {
        match g.meta.get(k) {
            Some(Meta::Array(a)) => Ok(a.iter().map(|x| x.as_str().unwrap_or("").to_owned()).collect()),
            _ => Err(ModelError::format(file, format!("missing metadata `{k}`"))),
        }
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    // Work grows with the square of an entry's length (Gemma's merges are derived from every
    // split of every entry): a million-character entry would take hours.
    if let Some((i, t)) = tokens.iter().enumerate().find(|(_, t)| t.chars().count() > MAX_TOKEN_CHARS) {
        return Err(ModelError::format(
            file,
            format!(
                "tokenizer.ggml.tokens: entry {i} has {} characters; at most {MAX_TOKEN_CHARS} are accepted (real \
                 vocabularies' longest have about 130)",
                t.chars().count()
            ),
        ));
    }
    let types: Vec<i64> = match g.meta.get("tokenizer.ggml.token_type") {
        Some(Meta::Array(a)) => a.iter().map(|x| x.as_i64().unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    let tokenizer = match model {
        "gpt2" => byte_level_tokenizer(g, &tokens, &types, strings("tokenizer.ggml.merges")?)?,
        "llama" if arch == "gemma3" => gemma_tokenizer(g, &tokens, &types)?,
        other => {
            return Err(ModelError::Unsupported {
                file: file.clone(),
                what: format!(
                    "GGUF tokenizer model `{other}` (architecture `{arch}`); supported: gpt2 (byte-level BPE), \
                     llama (SentencePiece) for gemma3"
                ),
            });
        }
    };
    write_atomic(&out.join("tokenizer.json"), tokenizer.to_string().as_bytes())?;
    let token = |k: &str| g.meta.get(k).and_then(Meta::as_i64).and_then(|i| tokens.get(i as usize)).cloned();
    let mut tc = serde_json::Map::new();
    tc.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
    tc.insert("clean_up_tokenization_spaces".into(), false.into());
    tc.insert(
        "model_max_length".into(),
        Value::from(
            g.meta
                .get(&format!(
                    "{}.context_length",
                    g.meta.get("general.architecture").and_then(Meta::as_str).unwrap_or("llama")
                ))
                .and_then(Meta::as_i64)
                .unwrap_or(2048),
        ),
    );
    for (k, name) in [
        ("tokenizer.ggml.bos_token_id", "bos_token"),
        ("tokenizer.ggml.eos_token_id", "eos_token"),
        ("tokenizer.ggml.unknown_token_id", "unk_token"),
        ("tokenizer.ggml.padding_token_id", "pad_token"),
    ] {
        if let Some(t) = token(k) {
            tc.insert(name.into(), t.into());
        }
    }
    tc.insert(
        "add_bos_token".into(),
        Value::Bool(matches!(g.meta.get("tokenizer.ggml.add_bos_token"), Some(Meta::Bool(true)))),
    );
    if let Some(template) = g.meta.get("tokenizer.chat_template").and_then(Meta::as_str) {
        tc.insert("chat_template".into(), template.into());
        write_atomic(&out.join("chat_template.jinja"), template.as_bytes())?;
    }
    write_atomic(&out.join("tokenizer_config.json"), Value::Object(tc).to_string().as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: reshape(n_head, 2, hd/2, cols).swapaxes(1, 2); build that by hand.
        let (n_head, hd, cols) = (2, 4, 3);
        let rows = n_head * hd;
        let hf: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
        let mut permuted = vec![0.0; hf.len()];
        for h in 0..n_head {
            for j in 0..2 {
                for i in 0..hd / 2 {
                    let src = h * hd + j * (hd / 2) + i;
                    let dst = h * hd + i * 2 + j;
                    permuted[dst * cols..(dst + 1) * cols].copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_eq!(unpermute_rows(&permuted, n_head, rows, cols), hf);
        assert_eq!(permute_rows(&hf, n_head, rows, cols), permuted);
    }

    /// A GGUF file with one tensor of `ggml_type` and the given raw block bytes.
    fn one_tensor_file(ggml_type: u32, n: u64, raw: &[u8]) -> Gguf {
        let mut b = Vec::new();
        b.extend_from_slice(b"GGUF");
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes()); // tensors
        b.extend_from_slice(&0u64.to_le_bytes()); // metadata
        let name = b"t";
        b.extend_from_slice(&(name.len() as u64).to_le_bytes());
        b.extend_from_slice(name);
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
        b.extend_from_slice(&ggml_type.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        while b.len() % 32 != 0 {
            b.push(0);
        }
        b.extend_from_slice(raw);
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("t.gguf");
        std::fs::write(&path, &b).expect("write");
        Gguf::read(&path).expect("parse")
    }

    fn f16(x: f32) -> [u8; 2] {
        half::f16::from_f32(x).to_le_bytes()
    }

    #[test]
    fn q4_0_q4_1_and_q8_0_blocks_dequantise_as_ggml_defines() {
        // Q4_0: x = (q - 8) * d; low nibbles are elements 0..16, high nibbles 16..32.
        let qs: Vec<u8> = (0..16u8).map(|i| i | ((15 - i) << 4)).collect();
        let mut raw = f16(0.5).to_vec();
        raw.extend(&qs);
        let g = one_tensor_file(2, 32, &raw);
        let want: Vec<f32> =
            (0..16).map(|i| (i as f32 - 8.0) * 0.5).chain((0..16).map(|i| ((15 - i) as f32 - 8.0) * 0.5)).collect();
        assert_eq!(g.dequantize(&g.tensors[0]).expect("q4_0"), want);
        // Q4_1: x = q * d + m.
        let mut raw = f16(0.25).to_vec();
        raw.extend(f16(-1.0));
        raw.extend(&qs);
        let g = one_tensor_file(3, 32, &raw);
        let want: Vec<f32> =
            (0..16).map(|i| i as f32 * 0.25 - 1.0).chain((0..16).map(|i| (15 - i) as f32 * 0.25 - 1.0)).collect();
        assert_eq!(g.dequantize(&g.tensors[0]).expect("q4_1"), want);
        // Q8_0: x = q * d with signed q.
        let mut raw = f16(2.0).to_vec();
        raw.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let g = one_tensor_file(8, 32, &raw);
        let want: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) * 2.0).collect();
        assert_eq!(g.dequantize(&g.tensors[0]).expect("q8_0"), want);
        // A type this crate lacks is named in the error.
        let g = one_tensor_file(16, 256, &[0u8; 66]);
        let err = g.dequantize(&g.tensors[0]).unwrap_err().to_string();
        assert!(err.contains("ggml type 16 (IQ2_XXS); supported: F32"), "{err}");
    }

    #[test]
    fn truncated_and_foreign_files_are_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("x.gguf");
        std::fs::write(&p, b"PK\x03\x04 not gguf").expect("write");
        assert!(Gguf::read(&p).unwrap_err().to_string().contains("not a GGUF file"));
        std::fs::write(&p, b"GGUF\x03\x00\x00\x00\x01").expect("write");
        assert!(Gguf::read(&p).unwrap_err().to_string().contains("truncated"));
    }

    #[test]
    fn names_map_to_hugging_face_and_back() {
        for gemma in [false, true] {
            for part in NAMES.iter().filter(|(_, _, f)| applies(*f, gemma)).map(|(g, _, _)| g) {
                let name = format!("blk.7.{part}.weight");
                let hf = hf_name(&name, gemma).expect("mapped");
                assert_eq!(gguf_name(&hf, gemma).as_deref(), Some(name.as_str()), "{hf}");
            }
        }
        assert_eq!(gguf_name("lm_head.weight", false).as_deref(), Some("output.weight"));
        assert_eq!(gguf_name("model.layers.x.mlp.up_proj.weight", false), None);
        let llama = |n: &str| hf_name(n, false);
        assert_eq!(llama("blk.12.attn_output.weight").as_deref(), Some("model.layers.12.self_attn.o_proj.weight"));
        assert_eq!(llama("blk.0.attn_q.bias").as_deref(), Some("model.layers.0.self_attn.q_proj.bias"));
        assert_eq!(llama("blk.3.ffn_norm.weight").as_deref(), Some("model.layers.3.post_attention_layernorm.weight"));
        assert_eq!(llama("token_embd.weight").as_deref(), Some("model.embed_tokens.weight"));
        assert_eq!(llama("blk.1.unknown.weight"), None);
        assert_eq!(llama("blk.2.attn_k_norm.weight").as_deref(), Some("model.layers.2.self_attn.k_norm.weight"));
        let gemma = |n: &str| hf_name(n, true);
        assert_eq!(gemma("blk.3.ffn_norm.weight").as_deref(), Some("model.layers.3.pre_feedforward_layernorm.weight"));
        assert_eq!(
            gemma("blk.3.post_attention_norm.weight").as_deref(),
            Some("model.layers.3.post_attention_layernorm.weight")
        );
        assert_eq!(
            gemma("blk.3.post_ffw_norm.weight").as_deref(),
            Some("model.layers.3.post_feedforward_layernorm.weight")
        );
    }
}
