//! The resolved runtime configuration of the decoder families, [`LlamaConfig`], that the model is
//! built from, with the pieces of `config.json` every family shares (RoPE scaling). Reading and
//! writing `config.json` (the wire format) is [`crate::hf_config`]; Gemma 3's dialect of it is
//! [`crate::gemma3`]. Neither is imported here: the dependency runs one way, from them to this.
//!
//! The families share one decoder ([`crate::llama`]); what tells them apart is a handful of
//! options here (q/k norms, Gemma's norms and embedding scale, the activation, per-layer sliding
//! windows with their own RoPE), so the trainer, the kernels and generation serve all of them.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{ModelError, Result};

/// The architectures this crate implements, named in files (config.json's `architectures`,
/// checkpoints' state) as transformers names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Architecture {
    /// Llama 2 and 3.
    #[serde(rename = "LlamaForCausalLM")]
    Llama,
    /// Mistral (a sliding window over all layers).
    #[serde(rename = "MistralForCausalLM")]
    Mistral,
    /// Qwen2 and Qwen2.5 (q/k/v biases).
    #[serde(rename = "Qwen2ForCausalLM")]
    Qwen2,
    /// Qwen3 (q/k norms).
    #[serde(rename = "Qwen3ForCausalLM")]
    Qwen3,
    /// Gemma 3's text model.
    #[serde(rename = "Gemma3ForCausalLM")]
    Gemma3,
    /// Gemma 3 with its vision tower, of which the text model is used.
    #[serde(rename = "Gemma3ForConditionalGeneration")]
    Gemma3Multimodal,
}

impl Architecture {
    /// Every architecture, in the order messages list them.
    pub const ALL: [Self; 6] =
        [Self::Llama, Self::Mistral, Self::Qwen2, Self::Qwen3, Self::Gemma3, Self::Gemma3Multimodal];

    /// transformers' name: `LlamaForCausalLM`, ….
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Mistral => "MistralForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Qwen3 => "Qwen3ForCausalLM",
            Self::Gemma3 => "Gemma3ForCausalLM",
            Self::Gemma3Multimodal => "Gemma3ForConditionalGeneration",
        }
    }

    /// The architecture transformers calls `name`, if this crate implements it.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == name)
    }

    /// Gemma 3, text-only or multimodal (its own config dialect: [`crate::gemma3`]).
    pub fn is_gemma3(self) -> bool {
        matches!(self, Self::Gemma3 | Self::Gemma3Multimodal)
    }
}

impl std::fmt::Display for Architecture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for Architecture {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// The feed-forward activation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// SiLU (SwiGLU): Llama, Mistral, Qwen.
    #[default]
    Silu,
    /// GELU with the tanh approximation (GeGLU): Gemma's `gelu_pytorch_tanh`.
    GeluTanh,
}

/// RoPE frequency scaling.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 {
        /// Scale factor for low frequencies.
        factor: f64,
        /// Wavelength threshold factor (low).
        low_freq_factor: f64,
        /// Wavelength threshold factor (high).
        high_freq_factor: f64,
        /// Context length the model was pre-trained with.
        original_max_position_embeddings: f64,
    },
    /// Positions divided by `factor` (Gemma 3's global layers in the larger models).
    Linear {
        /// Scale factor.
        factor: f64,
    },
}

/// The most decoder layers a config may declare.
pub const MAX_LAYERS: usize = 4096;

/// The largest value of any other size in a config (vocabulary, hidden and intermediate sizes,
/// heads, head dimension).
pub const MAX_SIZE: usize = 1 << 24;

/// A resolved model configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// The architecture (the family).
    pub architecture: Architecture,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// MLP inner size.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Size of one head (may differ from `hidden_size / num_heads`).
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Whether the LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Bias on the q, k and v projections (Qwen2; Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama's `attention_bias`).
    pub o_bias: bool,
    /// The sliding attention window: every layer's (Mistral) or, with `sliding_layers`, that of
    /// the layers marked sliding (Gemma 3).
    pub sliding_window: Option<usize>,
    /// Per layer, whether it attends within the sliding window (empty: every layer alike).
    #[serde(default)]
    pub sliding_layers: Vec<bool>,
    /// RoPE base and scaling of the sliding layers where they differ from the others (Gemma 3's
    /// `rope_local_base_freq`).
    #[serde(default)]
    pub local_rope: Option<(f64, RopeScaling)>,
    /// RMSNorm of each query and key head before RoPE (Qwen3, Gemma 3).
    #[serde(default)]
    pub qk_norm: bool,
    /// Gemma's conventions: RMSNorm scales by `1 + weight`, the embeddings are multiplied by
    /// `sqrt(hidden_size)`, and the attention and MLP outputs are normalised too (pre- and
    /// post-feed-forward norms).
    #[serde(default)]
    pub gemma_norms: bool,
    /// The feed-forward activation.
    #[serde(default)]
    pub hidden_act: Activation,
    /// Queries are scaled by `query_pre_attn_scalar^-1/2` instead of `head_dim^-1/2` (Gemma).
    #[serde(default)]
    pub query_pre_attn_scalar: Option<f64>,
    /// Longest context.
    pub max_position_embeddings: usize,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens.
    pub eos_token_ids: Vec<u32>,
}

impl LlamaConfig {
    /// Llama's options and no sizes: the base every family's resolution (and the GGUF import)
    /// fills in.
    pub(crate) fn blank(architecture: Architecture) -> Self {
        Self {
            architecture,
            vocab_size: 0,
            hidden_size: 0,
            intermediate_size: 0,
            num_layers: 0,
            num_heads: 0,
            num_kv_heads: 0,
            head_dim: 0,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::Default,
            tie_word_embeddings: false,
            qkv_bias: false,
            o_bias: false,
            sliding_window: None,
            sliding_layers: Vec::new(),
            local_rope: None,
            qk_norm: false,
            gemma_norms: false,
            hidden_act: Activation::Silu,
            query_pre_attn_scalar: None,
            max_position_embeddings: 2048,
            bos_token_id: None,
            eos_token_ids: Vec::new(),
        }
    }

    /// An optional key of `config.json`: absent or null is `None`; present with another type than
    /// `get` accepts is an error naming the key and what was expected (a wrong type used to fall
    /// back to the default silently).
    pub(crate) fn opt<T>(
        v: &Value,
        key: &str,
        file: &Path,
        expected: &str,
        get: impl Fn(&Value) -> Option<T>,
    ) -> Result<Option<T>> {
        match v.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => get(x).map(Some).ok_or_else(|| {
                let found = match x {
                    Value::Bool(_) => "true or false",
                    Value::Number(_) => "a number",
                    Value::String(_) => "a string",
                    Value::Array(_) => "a list",
                    Value::Object(_) => "an object",
                    Value::Null => "null",
                };
                ModelError::format(file, format!("`{key}`: expected {expected}, found {found}"))
            }),
        }
    }

    /// What every family spells alike: sizes, heads, norms' epsilon, embeddings, tokens. RoPE,
    /// biases and the family's own options are left at Llama's defaults for the caller to set.
    pub(crate) fn common(v: &Value, architecture: Architecture, file: &Path) -> Result<Self> {
        let unsupported = |what: String| ModelError::Unsupported { file: file.to_path_buf(), what };
        let bad = |message: String| ModelError::format(file, message);
        // Sizes are bounded before anything is sized by them (a config is read before the
        // weights that would show it wrong): far above any released model, far below what would
        // strain memory.
        let usize_key = |key: &str| -> Result<usize> {
            let n = v
                .get(key)
                .and_then(Value::as_u64)
                .ok_or_else(|| bad(format!("`{key}`: expected a non-negative integer")))?;
            let cap = if key == "num_hidden_layers" { MAX_LAYERS } else { MAX_SIZE };
            if n > cap as u64 {
                return Err(bad(format!("`{key}`: {n} is more than the {cap} fuserl accepts")));
            }
            Ok(n as usize)
        };
        let hidden_size = usize_key("hidden_size")?;
        let num_heads = usize_key("num_attention_heads")?;
        let num_kv_heads = if v.get("num_key_value_heads").is_some_and(|x| !x.is_null()) {
            usize_key("num_key_value_heads")?
        } else {
            num_heads
        };
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(bad(format!(
                "num_attention_heads ({num_heads}) must be a positive multiple of num_key_value_heads ({num_kv_heads})"
            )));
        }
        let head_dim = match Self::opt(v, "head_dim", file, "a non-negative integer", Value::as_u64)? {
            Some(_) => usize_key("head_dim")?,
            None => hidden_size / num_heads,
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(bad(format!("head_dim {head_dim} must be even and positive")));
        }
        if Self::opt(v, "mlp_bias", file, "true or false", Value::as_bool)? == Some(true) {
            return Err(unsupported("option mlp_bias = true".into()));
        }
        if Self::opt(v, "pretraining_tp", file, "a non-negative integer", Value::as_u64)?.is_some_and(|tp| tp > 1) {
            return Err(unsupported("option pretraining_tp > 1".into()));
        }
        let id = |x: &Value| x.as_u64().filter(|&i| i <= u64::from(u32::MAX)).map(|i| i as u32);
        let token = |key: &str| -> Result<Vec<u32>> {
            let ids = Self::opt(v, key, file, "a token id or a list of token ids", |x| match x {
                Value::Array(a) => a.iter().map(id).collect::<Option<Vec<u32>>>(),
                one => id(one).map(|i| vec![i]),
            })?;
            Ok(ids.unwrap_or_default())
        };
        let rms_norm_eps = Self::opt(v, "rms_norm_eps", file, "a number", Value::as_f64)?.unwrap_or(1e-6);
        if !(rms_norm_eps.is_finite() && rms_norm_eps >= 0.0) {
            return Err(bad(format!("`rms_norm_eps`: {rms_norm_eps} is not a non-negative number")));
        }
        Ok(Self {
            vocab_size: usize_key("vocab_size")?,
            hidden_size,
            intermediate_size: usize_key("intermediate_size")?,
            num_layers: usize_key("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps,
            tie_word_embeddings: Self::opt(v, "tie_word_embeddings", file, "true or false", Value::as_bool)?
                .unwrap_or(false),
            max_position_embeddings: Self::opt(v, "max_position_embeddings", file, "a non-negative integer", |x| {
                x.as_u64().filter(|&n| n <= MAX_SIZE as u64)
            })?
            .unwrap_or(2048) as usize,
            bos_token_id: token("bos_token_id")?.first().copied(),
            eos_token_ids: token("eos_token_id")?,
            ..Self::blank(architecture)
        })
    }

    /// `bos_token_id` and `eos_token_id` (one id or a list) into a `config.json` object.
    pub(crate) fn insert_token_ids(&self, map: &mut serde_json::Map<String, Value>) {
        if let Some(b) = self.bos_token_id {
            map.insert("bos_token_id".into(), Value::from(b));
        }
        match self.eos_token_ids.as_slice() {
            [] => {}
            [one] => {
                map.insert("eos_token_id".into(), Value::from(*one));
            }
            many => {
                map.insert("eos_token_id".into(), Value::from(many.to_vec()));
            }
        }
    }

    /// Whether decoder layer `layer` attends within the sliding window.
    pub fn layer_is_sliding(&self, layer: usize) -> bool {
        self.sliding_window.is_some() && self.sliding_layers.get(layer).copied().unwrap_or(true)
    }

    /// Whether some layers attend within a window and others do not (two masks per pass).
    pub fn mixes_layer_types(&self) -> bool {
        self.sliding_window.is_some()
            && self.sliding_layers.iter().any(|&s| s)
            && self.sliding_layers.iter().any(|&s| !s)
    }

    /// The factor queries are scaled by before the scores.
    pub fn query_scale(&self) -> f64 {
        self.query_pre_attn_scalar.unwrap_or(self.head_dim as f64).powf(-0.5)
    }

    /// The inverse frequencies of RoPE, `head_dim / 2` of them, with the configured scaling
    /// (transformers' `_compute_default_rope_parameters` / `_compute_llama3_parameters`).
    pub fn inv_freq(&self) -> Vec<f64> {
        self.inv_freq_of(false)
    }

    /// The inverse frequencies of the sliding layers (`sliding`) or of the others.
    pub fn inv_freq_of(&self, sliding: bool) -> Vec<f64> {
        let (theta, scaling) = match &self.local_rope {
            Some((theta, scaling)) if sliding => (*theta, scaling),
            _ => (self.rope_theta, &self.rope_scaling),
        };
        let d = self.head_dim as f64;
        let base: Vec<f64> = (0..self.head_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / d)).collect();
        match scaling {
            RopeScaling::Default => base,
            RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let low_wavelen = original_max_position_embeddings / low_freq_factor;
                let high_wavelen = original_max_position_embeddings / high_freq_factor;
                base.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen > low_wavelen {
                            f / factor
                        } else if wavelen < high_wavelen {
                            f
                        } else {
                            let smooth = (original_max_position_embeddings / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

/// Read and parse a JSON file.
pub fn read_json(path: &Path) -> Result<Value> {
    let text = fuserl_core::paths::read_regular_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| ModelError::format(path, format!("not valid JSON: {e}")))
}

/// The scaling a `rope_scaling` / `rope_parameters` object describes.
pub(crate) fn rope_scaling(s: &Value, file: &Path) -> Result<RopeScaling> {
    let unsupported = |what: String| ModelError::Unsupported { file: file.to_path_buf(), what };
    let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("default");
    let num = |key: &str| -> Result<f64> {
        s.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| ModelError::format(file, format!("rope scaling `{kind}` needs `{key}`")))
    };
    match kind {
        "default" => Ok(RopeScaling::Default),
        "linear" => Ok(RopeScaling::Linear { factor: num("factor")? }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => Err(unsupported(format!("RoPE scaling `{other}`; supported: default, linear, llama3"))),
    }
}

/// `rope_scaling` in transformers 4's layout (`None`: plain RoPE).
pub(crate) fn rope_scaling_json(s: &RopeScaling) -> Option<Value> {
    match s {
        RopeScaling::Default => None,
        RopeScaling::Linear { factor } => Some(serde_json::json!({"rope_type": "linear", "factor": factor})),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            Some(serde_json::json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings}))
        }
    }
}
