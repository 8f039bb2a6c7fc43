//! GGUF export (`fuserl export-gguf MODEL_DIR OUT.gguf`, `[export] format = "gguf"`): a Hugging
//! Face checkpoint folder written as one llama.cpp GGUF file, loadable by llama.cpp, its server,
//! Ollama and LM Studio without llama.cpp's Python converter.
//!
//! What is written, as llama.cpp's `convert_hf_to_gguf.py` and `llama-quantize` write it:
//! - the architecture (`llama` for Llama and Mistral, `qwen2`, `qwen3`, `gemma3`) and its
//!   hyperparameters under llama.cpp's keys;
//! - the tensors under llama.cpp's names ([`crate::gguf::gguf_name`]), Llama's Q/K rows permuted
//!   for llama.cpp's RoPE layout, Gemma's norm weights with the 1 of `1 + weight` added, Llama
//!   3.1's RoPE scaling as the `rope_freqs` tensor;
//! - the tokenizer: byte-level BPE as llama.cpp's `gpt2` model with the pre-tokenizer named as
//!   llama.cpp names it, or Gemma's SentencePiece vocabulary as its `llama` model (scores from the
//!   merge order); special tokens, `add_bos_token` and the chat template;
//! - the types of [`GgufType`], with llama.cpp's per-tensor choices for the K-quant mixes (norms
//!   and biases f32; the output matrix, and in `_M` mixes some layers' `attn_v` and `ffn_down`, in
//!   Q6_K; rows that are not whole 256-value super-blocks in Q5_0 / Q5_1 / Q8_0).
//!
//! The file is streamed: one safetensors shard and one tensor at a time in memory, written to a
//! temporary file renamed over `out` when complete.

use std::collections::BTreeMap;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use fuserl_core::paths::Shown;

use crate::checkpoint::TensorStore;
use crate::config::{Architecture, LlamaConfig, RopeScaling};
use crate::error::{ModelError, Result};
use crate::gguf::{gguf_name, permute_rows};
use crate::quant::GgmlType;
use crate::quantize::quantize_parallel;

/// What the export writes: a float type or one of llama.cpp's quantisation mixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufType {
    /// Every matrix f32.
    F32,
    /// Every matrix f16 (llama.cpp's converter's default).
    F16,
    /// Every matrix bf16.
    Bf16,
    /// Every matrix Q8_0.
    Q8_0,
    /// llama.cpp's Q4_K_M mix.
    Q4KM,
    /// llama.cpp's Q5_K_M mix.
    Q5KM,
    /// Every matrix Q6_K.
    Q6K,
}

impl GgufType {
    /// Every type.
    pub const ALL: [Self; 7] = [Self::F32, Self::F16, Self::Bf16, Self::Q8_0, Self::Q4KM, Self::Q5KM, Self::Q6K];

    /// The names [`GgufType::from_name`] accepts, for messages.
    pub const NAMES: &'static str = "f32, f16, bf16, q8_0, q4_k_m, q5_k_m, q6_k";

    /// The type of a name as llama.cpp's tools spell it (any case).
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name.to_ascii_lowercase().as_str() {
            "f32" => Self::F32,
            "f16" => Self::F16,
            "bf16" => Self::Bf16,
            "q8_0" => Self::Q8_0,
            "q4_k_m" => Self::Q4KM,
            "q5_k_m" => Self::Q5KM,
            "q6_k" => Self::Q6K,
            _ => return None,
        })
    }

    /// The name, as llama.cpp's file names spell it (`Q4_K_M`).
    pub fn label(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Bf16 => "BF16",
            Self::Q8_0 => "Q8_0",
            Self::Q4KM => "Q4_K_M",
            Self::Q5KM => "Q5_K_M",
            Self::Q6K => "Q6_K",
        }
    }

    /// llama.cpp's `llama_ftype` code (`general.file_type`).
    fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q8_0 => 7,
            Self::Q4KM => 15,
            Self::Q5KM => 17,
            Self::Q6K => 18,
            Self::Bf16 => 32,
        }
    }

    /// The type of a matrix no rule singles out.
    fn base(self) -> GgmlType {
        match self {
            Self::F32 => GgmlType::F32,
            Self::F16 => GgmlType::F16,
            Self::Bf16 => GgmlType::Bf16,
            Self::Q8_0 => GgmlType::Q8_0,
            Self::Q4KM => GgmlType::Q4K,
            Self::Q5KM => GgmlType::Q5K,
            Self::Q6K => GgmlType::Q6K,
        }
    }
}

impl std::fmt::Display for GgufType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third between.
fn use_more_bits(i: usize, n: usize) -> bool {
    let eighth = n / 8;
    i < eighth || i >= 7 * n / 8 || (i - eighth) % 3 == 2
}

/// The type llama.cpp's quantiser gives a matrix of `row`-value rows named `name` (llama.cpp's
/// name) in the mix `ty`; `layer` of `layers`; `output`: the matrix that makes the logits (the
/// output matrix, or the embeddings when they are tied).
pub fn tensor_type(
    ty: GgufType,
    name: &str,
    row: usize,
    layer: Option<usize>,
    layers: usize,
    output: bool,
) -> GgmlType {
    let t = mix_type(ty, name, row, layer, layers, output);
    // Blocks never straddle rows: a row that is not whole blocks of the chosen type is written in
    // f16, as llama.cpp's converter and quantiser do.
    if row.is_multiple_of(t.block().0) { t } else { GgmlType::F16 }
}

fn mix_type(ty: GgufType, name: &str, row: usize, layer: Option<usize>, layers: usize, output: bool) -> GgmlType {
    let mut t = ty.base();
    if !matches!(ty, GgufType::Q4KM | GgufType::Q5KM | GgufType::Q6K) {
        return t;
    }
    let mixed = matches!(ty, GgufType::Q4KM | GgufType::Q5KM);
    if output {
        return if !row.is_multiple_of(256) { GgmlType::Q8_0 } else { GgmlType::Q6K };
    }
    if mixed
        && (name.contains(".attn_v.") || name.contains(".ffn_down."))
        && layer.is_some_and(|i| use_more_bits(i, layers))
    {
        t = GgmlType::Q6K;
    }
    // K-quant rows are whole 256-value super-blocks; llama.cpp falls back for others.
    if !row.is_multiple_of(256) {
        t = match t {
            GgmlType::Q4K => GgmlType::Q5_0,
            GgmlType::Q5K => GgmlType::Q5_1,
            _ => GgmlType::Q8_0,
        };
    }
    t
}

/// A metadata value to write.
#[derive(Debug, Clone)]
enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
    F32s(Vec<f32>),
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

impl Meta {
    fn write(&self, out: &mut Vec<u8>) {
        let array = |out: &mut Vec<u8>, inner: u32, n: usize| {
            out.extend(9u32.to_le_bytes());
            out.extend(inner.to_le_bytes());
            out.extend((n as u64).to_le_bytes());
        };
        match self {
            Self::U32(v) => {
                out.extend(4u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            Self::F32(v) => {
                out.extend(6u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
            Self::Bool(v) => {
                out.extend(7u32.to_le_bytes());
                out.push(u8::from(*v));
            }
            Self::Str(s) => {
                out.extend(8u32.to_le_bytes());
                put_str(out, s);
            }
            Self::Strs(v) => {
                array(out, 8, v.len());
                v.iter().for_each(|s| put_str(out, s));
            }
            Self::I32s(v) => {
                array(out, 5, v.len());
                v.iter().for_each(|x| out.extend(x.to_le_bytes()));
            }
            Self::F32s(v) => {
                array(out, 6, v.len());
                v.iter().for_each(|x| out.extend(x.to_le_bytes()));
            }
        }
    }
}

/// How a tensor is changed on its way out.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Change {
    None,
    /// llama.cpp's Q/K row order with this many heads.
    Permute(usize),
    /// Gemma's norms: `1 + weight`.
    AddOne,
}

/// One tensor of the file.
#[derive(Debug, Clone)]
struct Planned {
    gguf: String,
    /// Its Hugging Face name (empty for tensors made here: `rope_freqs`).
    hf: String,
    /// The safetensors file it is in.
    file: PathBuf,
    /// Hugging Face shape (row-major, rows first).
    shape: Vec<usize>,
    ty: GgmlType,
    change: Change,
}

impl Planned {
    fn bytes(&self) -> usize {
        let (block, bytes) = self.ty.block();
        self.shape.iter().product::<usize>() / block * bytes
    }
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct Exported {
    /// The file.
    pub file: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// How many tensors of each ggml type.
    pub types: BTreeMap<&'static str, usize>,
}

/// A safetensors file and its tensors' names, shapes and stored dtypes (`F32`, `BF16`, ...).
pub type Shard = (PathBuf, Vec<(String, Vec<usize>, String)>);

/// The safetensors files of a checkpoint folder (its index's, or `model.safetensors`) and the
/// tensors in each (name, shape, dtype), read from their headers only.
pub fn shard_headers(dir: &Path) -> Result<Vec<Shard>> {
    let index = dir.join("model.safetensors.index.json");
    let mut files: Vec<PathBuf> = if index.is_file() {
        let v = crate::config::read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| ModelError::format(&index, "missing `weight_map`"))?;
        let mut files = Vec::new();
        for (tensor, f) in map {
            let name = f.as_str().ok_or_else(|| {
                ModelError::format(&index, format!("weight_map: `{tensor}` names {f}, expected a file name"))
            })?;
            fuserl_core::paths::check_file_name(name)
                .map_err(|m| ModelError::format(&index, format!("weight_map: `{tensor}`: {m}")))?;
            files.push(dir.join(name));
        }
        files
    } else {
        vec![dir.join("model.safetensors")]
    };
    files.sort();
    files.dedup();
    let mut out = Vec::new();
    for file in files {
        let mut f = fuserl_core::paths::open_regular(&file).map_err(|e| ModelError::io(&file, e))?;
        let mut n = [0u8; 8];
        f.read_exact(&mut n).map_err(|e| ModelError::io(&file, e))?;
        let n = u64::from_le_bytes(n);
        if n > 100 << 20 {
            return Err(ModelError::format(&file, format!("safetensors header of {n} bytes: not a checkpoint")));
        }
        let mut header = vec![0u8; n as usize];
        f.read_exact(&mut header).map_err(|e| ModelError::io(&file, e))?;
        let v: Value = serde_json::from_slice(&header)
            .map_err(|e| ModelError::format(&file, format!("safetensors header is not valid JSON: {e}")))?;
        let map = v.as_object().ok_or_else(|| ModelError::format(&file, "safetensors header is not an object"))?;
        let mut tensors = Vec::new();
        for (name, t) in map.iter().filter(|(k, _)| *k != "__metadata__") {
            let shape = t
                .get("shape")
                .and_then(Value::as_array)
                .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect::<Option<Vec<_>>>())
                .ok_or_else(|| ModelError::format(&file, format!("tensor `{name}`: no `shape` list")))?;
            let dtype = t.get("dtype").and_then(Value::as_str).unwrap_or_default().to_owned();
            tensors.push((name.clone(), shape, dtype));
        }
        out.push((file, tensors));
    }
    Ok(out)
}

/// llama.cpp's name for the architecture.
fn arch_name(a: Architecture) -> &'static str {
    match a {
        Architecture::Llama | Architecture::Mistral => "llama",
        Architecture::Qwen2 => "qwen2",
        Architecture::Qwen3 => "qwen3",
        Architecture::Gemma3 | Architecture::Gemma3Multimodal => "gemma3",
    }
}

/// The architecture's keys, with what llama.cpp takes as given checked instead of written.
fn arch_meta(c: &LlamaConfig, dir: &Path) -> Result<Vec<(String, Meta)>> {
    let arch = arch_name(c.architecture);
    let unsupported = |what: String| ModelError::Unsupported { file: dir.join("config.json"), what };
    let k = |key: &str| format!("{arch}.{key}");
    let mut m = vec![
        (k("context_length"), Meta::U32(c.max_position_embeddings as u32)),
        (k("embedding_length"), Meta::U32(c.hidden_size as u32)),
        (k("block_count"), Meta::U32(c.num_layers as u32)),
        (k("feed_forward_length"), Meta::U32(c.intermediate_size as u32)),
        (k("attention.head_count"), Meta::U32(c.num_heads as u32)),
        (k("attention.head_count_kv"), Meta::U32(c.num_kv_heads as u32)),
        (k("attention.key_length"), Meta::U32(c.head_dim as u32)),
        (k("attention.value_length"), Meta::U32(c.head_dim as u32)),
        (k("rope.dimension_count"), Meta::U32(c.head_dim as u32)),
        (k("rope.freq_base"), Meta::F32(c.rope_theta as f32)),
        (k("attention.layer_norm_rms_epsilon"), Meta::F32(c.rms_norm_eps as f32)),
        (k("vocab_size"), Meta::U32(c.vocab_size as u32)),
    ];
    match &c.rope_scaling {
        RopeScaling::Default => {}
        RopeScaling::Linear { factor } => {
            m.push((k("rope.scaling.type"), Meta::Str("linear".into())));
            m.push((k("rope.scaling.factor"), Meta::F32(*factor as f32)));
        }
        // Written as the `rope_freqs` tensor.
        RopeScaling::Llama3 { .. } => {}
    }
    if c.architecture.is_gemma3() {
        // llama.cpp's gemma3 model: every sixth layer global, the others sliding with RoPE base
        // 10,000; queries scaled by head_dim^-1/2 (hidden / heads for the 62-layer 27B).
        let pattern: Vec<bool> = (0..c.num_layers).map(|i| !(i + 1).is_multiple_of(6)).collect();
        if !c.sliding_layers.is_empty() && c.sliding_layers != pattern {
            return Err(unsupported(
                "a Gemma 3 layer pattern other than five sliding layers and one global: llama.cpp's gemma3 \
                 model assumes that one"
                    .into(),
            ));
        }
        if c.local_rope.as_ref().is_some_and(|(theta, s)| *theta != 10_000.0 || *s != RopeScaling::Default) {
            return Err(unsupported(
                "a Gemma 3 sliding-layer RoPE other than base 10,000 unscaled: llama.cpp's gemma3 model assumes \
                 that one"
                    .into(),
            ));
        }
        let scalar = if c.num_layers == 62 { c.hidden_size / c.num_heads } else { c.head_dim };
        if c.query_pre_attn_scalar.is_some_and(|q| q != scalar as f64) {
            return Err(unsupported(format!(
                "query_pre_attn_scalar {:?}: llama.cpp's gemma3 model scales queries by {scalar}^-1/2",
                c.query_pre_attn_scalar
            )));
        }
        let window = c.sliding_window.ok_or_else(|| unsupported("a Gemma 3 config without a sliding window".into()))?;
        m.push((k("attention.sliding_window"), Meta::U32(window as u32)));
    } else if let Some(w) = c.sliding_window
        && w < c.max_position_embeddings
    {
        // llama.cpp's llama model attends over the whole context (as its converter writes
        // Mistral): answers longer than the window differ from transformers'.
        tracing::warn!(window = w, "llama.cpp ignores the sliding window of this model: it attends over everything");
    }
    Ok(m)
}

/// The text of a `tokenizer.json` merge (`"a b"` or `["a", "b"]`).
fn merge_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Array(a) if a.len() == 2 => Some(format!("{} {}", a[0].as_str()?, a[1].as_str()?)),
        _ => None,
    }
}

/// Which of llama.cpp's pre-tokenizers splits text as `tokenizer.json`'s `pre_tokenizer` does.
fn pre_tokenizer_name(t: &Value, file: &Path) -> Result<&'static str> {
    let pre = &t["pre_tokenizer"];
    let kind = |v: &Value| v.get("type").and_then(Value::as_str).unwrap_or("").to_owned();
    let parts: Vec<&Value> = match kind(pre).as_str() {
        "Sequence" => {
            pre.get("pretokenizers").and_then(Value::as_array).map(|a| a.iter().collect()).unwrap_or_default()
        }
        _ => vec![pre],
    };
    let kinds: Vec<String> = parts.iter().map(|p| kind(p)).collect();
    let regex = |p: &Value| p.pointer("/pattern/Regex").and_then(Value::as_str).map(str::to_owned);
    let named = match kinds.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["ByteLevel"] if parts[0].get("use_regex").and_then(Value::as_bool) != Some(false) => Some("gpt-2"),
        ["Digits", "ByteLevel"] if parts[0].get("individual_digits").and_then(Value::as_bool) == Some(true) => {
            Some("smollm")
        }
        ["Split", "ByteLevel"] => match regex(parts[0]).as_deref() {
            Some(r) if r == crate::gguf::QWEN2_SPLIT => Some("qwen2"),
            Some(r) if r == crate::gguf::LLAMA3_SPLIT => Some("llama-bpe"),
            _ => None,
        },
        _ => None,
    };
    named.ok_or_else(|| ModelError::Unsupported {
        file: file.to_path_buf(),
        what: format!(
            "pre-tokenizer {}: none of llama.cpp's this export knows (GPT-2's byte level, SmolLM's digits, \
             Qwen2's and Llama 3's splits)",
            fuserl_core::text::printable(&pre.to_string().chars().take(300).collect::<String>())
        ),
    })
}

/// The tokenizer's metadata from `tokenizer.json`, `tokenizer_config.json` and the chat template.
fn tokenizer_meta(dir: &Path, c: &LlamaConfig) -> Result<Vec<(String, Meta)>> {
    let file = dir.join("tokenizer.json");
    let t = crate::config::read_json(&file)?;
    let tc_file = dir.join("tokenizer_config.json");
    let tc = if tc_file.is_file() { crate::config::read_json(&tc_file)? } else { Value::Null };
    let model = &t["model"];
    let bad = |m: String| ModelError::format(&file, m);
    if model.get("type").and_then(Value::as_str) != Some("BPE") {
        return Err(ModelError::Unsupported {
            file: file.clone(),
            what: format!(
                "tokenizer model {}: the GGUF export writes BPE tokenizers (byte-level, or SentencePiece-style \
                 with byte fallback as Gemma's)",
                model.get("type").unwrap_or(&Value::Null)
            ),
        });
    }
    let sentencepiece = model.get("byte_fallback").and_then(Value::as_bool) == Some(true);
    // Every token by id: the vocabulary, then the added tokens (which may extend it).
    let mut by_id: BTreeMap<usize, String> = BTreeMap::new();
    for (tok, id) in
        model.get("vocab").and_then(Value::as_object).ok_or_else(|| bad("model.vocab is not a map".into()))?
    {
        let id = id.as_u64().ok_or_else(|| bad(format!("model.vocab: `{tok}` has id {id}, expected a number")))?;
        by_id.insert(id as usize, tok.clone());
    }
    let mut special = BTreeMap::new();
    for a in t.get("added_tokens").and_then(Value::as_array).into_iter().flatten() {
        let (Some(id), Some(content)) = (a.get("id").and_then(Value::as_u64), a.get("content").and_then(Value::as_str))
        else {
            return Err(bad(format!("added_tokens: {a} has no `id` and `content`")));
        };
        by_id.insert(id as usize, content.to_owned());
        special.insert(id as usize, a.get("special").and_then(Value::as_bool).unwrap_or(false));
    }
    let n = c.vocab_size.max(by_id.keys().next_back().map_or(0, |m| m + 1));
    if n > c.vocab_size {
        return Err(bad(format!(
            "the tokenizer has {} ids, more than the model's {} embedding rows (config.json vocab_size)",
            n, c.vocab_size
        )));
    }
    let merges: Vec<String> = model
        .get("merges")
        .and_then(Value::as_array)
        .map(|a| a.iter().map(merge_text).collect::<Option<Vec<_>>>())
        .unwrap_or(Some(Vec::new()))
        .ok_or_else(|| bad("model.merges: expected strings `a b` or pairs [a, b]".into()))?;
    let mut tokens = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    for id in 0..n {
        match by_id.get(&id) {
            Some(tok) => {
                tokens.push(tok.clone());
                types.push(match special.get(&id) {
                    Some(true) => 3,
                    Some(false) => 4,
                    None if sentencepiece && is_byte_token(tok) => 6,
                    None => 1,
                });
            }
            // Ids no token uses (embedding rows padded to a round size), as llama.cpp's converter.
            None => {
                tokens.push(format!("[PAD{id}]"));
                types.push(5);
            }
        }
    }
    let mut m: Vec<(String, Meta)> = Vec::new();
    if sentencepiece {
        if !c.architecture.is_gemma3() {
            return Err(ModelError::Unsupported {
                file: file.clone(),
                what: "a SentencePiece-style (byte-fallback) tokenizer outside Gemma 3".into(),
            });
        }
        // llama.cpp's SentencePiece tokenizer merges the pair whose token has the highest score:
        // a merge-made token scores minus the rank of the first merge that makes it; tokens no
        // merge makes score below all of them; control, user-defined and byte tokens as
        // llama.cpp's own Gemma files (-1000, -1000, 0).
        let mut rank: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        for (r, mtext) in merges.iter().enumerate() {
            if let Some((a, b)) = mtext.split_once(' ') {
                rank.entry(format!("{a}{b}")).or_insert(r);
            }
        }
        let scores: Vec<f32> = tokens
            .iter()
            .zip(&types)
            .enumerate()
            .map(|(id, (tok, ty))| match ty {
                3 | 4 => -1000.0,
                6 => 0.0,
                _ => match rank.get(tok) {
                    Some(&r) => -(r as f32),
                    None if tok.chars().count() == 1 => 0.0,
                    None => -((merges.len() + id) as f32),
                },
            })
            .collect();
        m.push(("tokenizer.ggml.model".into(), Meta::Str("llama".into())));
        m.push(("tokenizer.ggml.pre".into(), Meta::Str("default".into())));
        m.push(("tokenizer.ggml.tokens".into(), Meta::Strs(tokens.clone())));
        m.push(("tokenizer.ggml.scores".into(), Meta::F32s(scores)));
        m.push(("tokenizer.ggml.token_type".into(), Meta::I32s(types)));
        m.push(("tokenizer.ggml.add_space_prefix".into(), Meta::Bool(false)));
    } else {
        let pre = pre_tokenizer_name(&t, &file)?;
        m.push(("tokenizer.ggml.model".into(), Meta::Str("gpt2".into())));
        m.push(("tokenizer.ggml.pre".into(), Meta::Str(pre.into())));
        m.push(("tokenizer.ggml.tokens".into(), Meta::Strs(tokens.clone())));
        m.push(("tokenizer.ggml.token_type".into(), Meta::I32s(types)));
        m.push(("tokenizer.ggml.merges".into(), Meta::Strs(merges)));
    }
    // Special tokens: tokenizer_config.json's names (a string or {"content": ...}), else
    // config.json's ids.
    let id_of = |key: &str| -> Option<u32> {
        let v = tc.get(key)?;
        let text = v.as_str().or_else(|| v.get("content").and_then(Value::as_str))?;
        tokens.iter().position(|t| t == text).map(|i| i as u32)
    };
    let bos = id_of("bos_token").or(c.bos_token_id);
    let eos = id_of("eos_token").or(c.eos_token_ids.first().copied());
    for (key, id) in [
        ("bos_token_id", bos),
        ("eos_token_id", eos),
        ("unknown_token_id", id_of("unk_token")),
        ("padding_token_id", id_of("pad_token")),
    ] {
        if let Some(id) = id {
            m.push((format!("tokenizer.ggml.{key}"), Meta::U32(id)));
        }
    }
    // Whether encoding puts BOS first: the post-processor's template (transformers' behaviour),
    // else tokenizer_config.json's `add_bos_token`.
    // The template may be the post-processor itself or one of a Sequence's (Llama 3's).
    let template = match t.pointer("/post_processor/type").and_then(Value::as_str) {
        Some("Sequence") => t
            .pointer("/post_processor/processors")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().find(|p| p.get("type").and_then(Value::as_str) == Some("TemplateProcessing"))),
        _ => t.get("post_processor"),
    };
    let template_bos =
        template.and_then(|p| p.pointer("/single/0/SpecialToken/id")).and_then(Value::as_str).and_then(|s| {
            let id = tokens.iter().position(|t| t == s)? as u32;
            Some(Some(id) == bos)
        });
    let add_bos = template_bos.or_else(|| tc.get("add_bos_token").and_then(Value::as_bool)).unwrap_or(false);
    m.push(("tokenizer.ggml.add_bos_token".into(), Meta::Bool(add_bos)));
    m.push(("tokenizer.ggml.add_eos_token".into(), Meta::Bool(false)));
    let jinja = dir.join("chat_template.jinja");
    let template = if jinja.is_file() {
        Some(fuserl_core::paths::read_regular_string(&jinja).map_err(|e| ModelError::io(&jinja, e))?)
    } else {
        match tc.get("chat_template") {
            Some(Value::String(t)) => Some(t.clone()),
            // Named templates ([{name, template}]): the default one (llama.cpp's key holds one).
            Some(Value::Array(named)) => named
                .iter()
                .find(|n| n.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| named.first())
                .and_then(|n| n.get("template").and_then(Value::as_str))
                .map(str::to_owned),
            _ => None,
        }
    };
    if let Some(template) = template {
        m.push(("tokenizer.chat_template".into(), Meta::Str(template)));
    }
    Ok(m)
}

/// `<0x0A>`: SentencePiece's byte-fallback tokens.
fn is_byte_token(t: &str) -> bool {
    t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') && u8::from_str_radix(&t[3..5], 16).is_ok()
}

/// Export the checkpoint folder `dir` as a GGUF file `out` of type `ty` (atomically: a
/// temporary file renamed over `out` when complete).
pub fn export(dir: &Path, out: &Path, ty: GgufType) -> Result<Exported> {
    if crate::lora::is_adapter_dir(dir) {
        return Err(ModelError::format(
            dir,
            "a LoRA adapter folder: a GGUF file holds the whole model; export the run merged \
             ([export] lora = \"merged\", the default) and convert that folder",
        ));
    }
    let config_file = crate::checkpoint::config_file(dir)?;
    let json = crate::config::read_json(&config_file)?;
    let c = LlamaConfig::from_json(&json, &config_file)?;
    let multimodal = crate::gemma3::is_multimodal(&json);
    let gemma = c.architecture.is_gemma3();
    let arch = arch_name(c.architecture);
    let _span = tracing::info_span!("export_gguf", dir = %Shown(dir), ty = %ty).entered();

    let mut meta: Vec<(String, Meta)> = vec![
        ("general.architecture".into(), Meta::Str(arch.into())),
        ("general.type".into(), Meta::Str("model".into())),
        (
            "general.name".into(),
            Meta::Str(
                dir.canonicalize()
                    .ok()
                    .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .unwrap_or_else(|| "model".into()),
            ),
        ),
        ("general.file_type".into(), Meta::U32(ty.file_type())),
        ("general.quantization_version".into(), Meta::U32(2)),
    ];
    meta.extend(arch_meta(&c, dir)?);
    meta.extend(tokenizer_meta(dir, &c)?);

    // The tensors, file by file.
    let shards = shard_headers(dir)?;
    let mut plan: Vec<Planned> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    // Whether the logits have their own matrix: llama.cpp decides by the tensor's presence.
    let has_output = !c.tie_word_embeddings
        && shards.iter().flat_map(|(_, t)| t).any(|(name, _, _)| {
            let hf = if multimodal { crate::gemma3::text_tensor_name(name) } else { Some(name.clone()) };
            hf.as_deref() == Some("lm_head.weight")
        });
    for (file, tensors) in &shards {
        for (name, shape, _) in tensors {
            let hf = if multimodal {
                match crate::gemma3::text_tensor_name(name) {
                    Some(n) => n,
                    None => continue,
                }
            } else {
                name.clone()
            };
            if hf == "lm_head.weight" && c.tie_word_embeddings {
                continue;
            }
            let Some(g) = gguf_name(&hf, gemma) else {
                // A rotary table or another buffer some exports carry.
                if hf.ends_with("rotary_emb.inv_freq") {
                    continue;
                }
                return Err(ModelError::Unsupported {
                    file: file.clone(),
                    what: format!("tensor `{hf}`: it has no llama.cpp counterpart"),
                });
            };
            if !seen.insert(g.clone()) {
                return Err(ModelError::format(file, format!("tensor `{hf}` appears twice in the checkpoint")));
            }
            let layer = g.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|l| l.parse().ok());
            let matrix = shape.len() == 2;
            let row = shape.last().copied().unwrap_or(1);
            let output = g == "output.weight" || (!has_output && g == "token_embd.weight");
            let t = if !matrix { GgmlType::F32 } else { tensor_type(ty, &g, row, layer, c.num_layers, output) };
            // Llama's Q and K rows (and their biases, one value a row) in llama.cpp's order.
            let change = if matches!(c.architecture, Architecture::Llama | Architecture::Mistral) {
                if g.starts_with("blk.") && (g.ends_with(".attn_q.weight") || g.ends_with(".attn_q.bias")) {
                    Change::Permute(c.num_heads)
                } else if g.starts_with("blk.") && (g.ends_with(".attn_k.weight") || g.ends_with(".attn_k.bias")) {
                    Change::Permute(c.num_kv_heads)
                } else {
                    Change::None
                }
            } else if gemma && g.ends_with("norm.weight") {
                Change::AddOne
            } else {
                Change::None
            };
            plan.push(Planned { gguf: g, hf, file: file.clone(), shape: shape.clone(), ty: t, change });
        }
    }
    // Llama 3.1's RoPE scaling: the factor dividing each frequency, as llama.cpp's converter.
    let rope_freqs: Option<Vec<f32>> = match c.rope_scaling {
        RopeScaling::Llama3 { .. } => {
            let plain = LlamaConfig { rope_scaling: RopeScaling::Default, ..c.clone() }.inv_freq();
            Some(plain.iter().zip(c.inv_freq()).map(|(p, s)| (p / s) as f32).collect())
        }
        _ => None,
    };
    if let Some(f) = &rope_freqs {
        plan.push(Planned {
            gguf: "rope_freqs.weight".into(),
            hf: String::new(),
            file: PathBuf::new(),
            shape: vec![f.len()],
            ty: GgmlType::F32,
            change: Change::None,
        });
    }
    for (must, hf) in [("token_embd.weight", "model.embed_tokens.weight"), ("output_norm.weight", "model.norm.weight")]
    {
        if !seen.contains(must) {
            return Err(ModelError::format(
                dir,
                format!("the checkpoint has no tensor `{hf}` (llama.cpp's `{must}`), which every model needs"),
            ));
        }
    }

    // The header: metadata, then each tensor's name, dims (fastest first), type and offset.
    let mut header = Vec::new();
    header.extend(b"GGUF");
    header.extend(3u32.to_le_bytes());
    header.extend((plan.len() as u64).to_le_bytes());
    header.extend((meta.len() as u64).to_le_bytes());
    for (k, v) in &meta {
        put_str(&mut header, k);
        v.write(&mut header);
    }
    const ALIGN: usize = 32;
    let mut offset = 0usize;
    for p in &plan {
        put_str(&mut header, &p.gguf);
        header.extend((p.shape.len() as u32).to_le_bytes());
        for d in p.shape.iter().rev() {
            header.extend((*d as u64).to_le_bytes());
        }
        header.extend(p.ty.code().to_le_bytes());
        header.extend((offset as u64).to_le_bytes());
        offset = (offset + p.bytes()).div_ceil(ALIGN) * ALIGN;
    }
    header.resize(header.len().div_ceil(ALIGN) * ALIGN, 0);

    let mut types: BTreeMap<&'static str, usize> = BTreeMap::new();
    for p in &plan {
        *types.entry(GgmlType::name_of(p.ty.code())).or_default() += 1;
    }
    let total = plan.len();
    // A checkpoint file that fails to read is reported as itself, not as the temporary file.
    let mut failed: Option<ModelError> = None;
    let written = fuserl_io::fs::write_atomic_with(out, |tmp| {
        let mut w = BufWriter::with_capacity(1 << 22, std::fs::File::create(tmp)?);
        w.write_all(&header)?;
        let mut written = 0usize;
        let mut store = TensorStore::default();
        let mut loaded: Option<PathBuf> = None;
        for (i, p) in plan.iter().enumerate() {
            let values = if p.hf.is_empty() {
                rope_freqs.clone().unwrap_or_default()
            } else {
                if loaded.as_ref() != Some(&p.file) {
                    store = TensorStore::default();
                    if let Err(e) = store.read_file(&p.file) {
                        failed = Some(e);
                        return Err(std::io::Error::other("checkpoint read failed"));
                    }
                    if multimodal {
                        store.rename(crate::gemma3::text_tensor_name);
                    }
                    loaded = Some(p.file.clone());
                }
                match store.take(&p.hf, &p.shape, dir) {
                    Ok(v) => v,
                    Err(e) => {
                        failed = Some(e);
                        return Err(std::io::Error::other("checkpoint read failed"));
                    }
                }
            };
            let values = match p.change {
                Change::None => values,
                Change::Permute(heads) => {
                    permute_rows(&values, heads, p.shape[0], p.shape.get(1).copied().unwrap_or(1))
                }
                Change::AddOne => values.into_iter().map(|v| v + 1.0).collect(),
            };
            let bytes = quantize_parallel(p.ty, &values);
            debug_assert_eq!(bytes.len(), p.bytes());
            w.write_all(&bytes)?;
            written += bytes.len();
            let padded = written.div_ceil(ALIGN) * ALIGN;
            w.write_all(&vec![0u8; padded - written])?;
            written = padded;
            tracing::debug!(tensor = %p.gguf, ty = GgmlType::name_of(p.ty.code()), done = i + 1, total, "tensor written");
        }
        w.flush()?;
        Ok(())
    });
    if let Some(e) = failed {
        return Err(e);
    }
    written?;
    let bytes = std::fs::metadata(out).map_err(|e| ModelError::io(out, e))?.len();
    tracing::info!(file = %Shown(out), ty = %ty, tensors = total, mib = bytes >> 20, "exported GGUF");
    Ok(Exported { file: out.to_path_buf(), bytes, types })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_bits_as_llama_cpp_for_18_and_24_layers() {
        // Counted on llama.cpp's own Q4_K_M files of Gemma 3 270M (18 layers) and
        // Qwen2.5-Coder-0.5B (24): nine and twelve layers get more bits.
        assert_eq!((0..18).filter(|&i| use_more_bits(i, 18)).count(), 9);
        assert_eq!((0..24).filter(|&i| use_more_bits(i, 24)).count(), 12);
        assert!(use_more_bits(0, 24) && use_more_bits(23, 24) && !use_more_bits(3, 24) && use_more_bits(5, 24));
    }

    #[test]
    fn tensor_types_follow_llama_cpp_mixes() {
        let q4 = |name: &str, row: usize, layer: Option<usize>, output: bool| {
            GgmlType::name_of(tensor_type(GgufType::Q4KM, name, row, layer, 24, output).code())
        };
        assert_eq!(q4("blk.3.attn_q.weight", 896, Some(3), false), "Q5_0");
        assert_eq!(q4("blk.3.attn_q.weight", 1024, Some(3), false), "Q4_K");
        assert_eq!(q4("blk.0.attn_v.weight", 896, Some(0), false), "Q8_0");
        assert_eq!(q4("blk.0.ffn_down.weight", 4864, Some(0), false), "Q6_K");
        assert_eq!(q4("blk.3.ffn_down.weight", 4864, Some(3), false), "Q4_K");
        assert_eq!(q4("output.weight", 896, None, true), "Q8_0");
        assert_eq!(q4("output.weight", 1024, None, true), "Q6_K");
        let q5 = tensor_type(GgufType::Q5KM, "blk.3.ffn_up.weight", 896, Some(3), 24, false);
        assert_eq!(q5, GgmlType::Q5_1);
        assert_eq!(tensor_type(GgufType::F16, "output.weight", 896, None, 24, true), GgmlType::F16);
        assert_eq!(tensor_type(GgufType::Q8_0, "output.weight", 1024, None, 24, true), GgmlType::Q8_0);
        // Rows that are not whole 32-value blocks: f16, whatever the mix.
        assert_eq!(tensor_type(GgufType::Q8_0, "blk.0.ffn_down.weight", 48, Some(0), 2, false), GgmlType::F16);
        assert_eq!(tensor_type(GgufType::Q4KM, "blk.1.ffn_up.weight", 48, Some(1), 2, false), GgmlType::F16);
    }

    #[test]
    fn type_names_round_trip() {
        for name in GgufType::NAMES.split(", ") {
            let t = GgufType::from_name(name).expect(name);
            assert_eq!(t.label().to_ascii_lowercase(), name);
        }
        assert_eq!(GgufType::from_name("Q4_K_M"), Some(GgufType::Q4KM));
        assert_eq!(GgufType::from_name("q4_k_s"), None);
    }
}
