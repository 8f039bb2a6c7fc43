//! The Llama family as Hugging Face configures it: `config.json` (the wire format) resolved
//! into a [`LlamaConfig`] that the model is built from. Both ways transformers has written RoPE
//! settings are read: `rope_theta` + `rope_scaling` (transformers 4) and `rope_parameters`
//! (transformers 5). Anything outside the supported set is an error that names it.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{ModelError, Result};

/// Architectures this crate implements.
pub const SUPPORTED_ARCHITECTURES: [&str; 3] = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];

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
}

/// A resolved model configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// `LlamaForCausalLM`, `MistralForCausalLM` or `Qwen2ForCausalLM`.
    pub architecture: String,
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
    /// Mistral's sliding attention window, if any.
    pub sliding_window: Option<usize>,
    /// Longest context.
    pub max_position_embeddings: usize,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens.
    pub eos_token_ids: Vec<u32>,
}

impl LlamaConfig {
    /// Read and resolve `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let value: Value =
            serde_json::from_str(&text).map_err(|e| ModelError::format(path, format!("not valid JSON: {e}")))?;
        Self::from_json(&value, path)
    }

    /// Resolve a parsed `config.json`; `file` names it in errors.
    pub fn from_json(v: &Value, file: &Path) -> Result<Self> {
        let unsupported = |what: String| ModelError::Unsupported { file: file.to_path_buf(), what };
        let bad = |message: String| ModelError::format(file, message);
        let architecture = match v.get("architectures").and_then(Value::as_array).and_then(|a| a.first()) {
            Some(Value::String(a)) => a.clone(),
            _ => match v.get("model_type").and_then(Value::as_str) {
                Some("llama") => "LlamaForCausalLM".into(),
                Some("mistral") => "MistralForCausalLM".into(),
                Some("qwen2") => "Qwen2ForCausalLM".into(),
                Some(other) => {
                    return Err(unsupported(format!("model_type `{other}`; supported: llama, mistral, qwen2")));
                }
                None => return Err(bad("neither `architectures` nor `model_type` says what the model is".into())),
            },
        };
        if !SUPPORTED_ARCHITECTURES.contains(&architecture.as_str()) {
            return Err(unsupported(format!(
                "architecture `{architecture}`; supported: {}",
                SUPPORTED_ARCHITECTURES.join(", ")
            )));
        }
        let usize_key = |key: &str| -> Result<usize> {
            v.get(key)
                .and_then(Value::as_u64)
                .map(|n| n as usize)
                .ok_or_else(|| bad(format!("`{key}`: expected a non-negative integer")))
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
        let head_dim = match v.get("head_dim") {
            Some(Value::Number(_)) => usize_key("head_dim")?,
            _ => hidden_size / num_heads,
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(bad(format!("head_dim {head_dim} must be even and positive")));
        }
        if let Some(act) = v.get("hidden_act").and_then(Value::as_str)
            && act != "silu"
        {
            return Err(unsupported(format!("hidden_act `{act}`; supported: silu")));
        }
        if v.get("mlp_bias").and_then(Value::as_bool) == Some(true) {
            return Err(unsupported("option mlp_bias = true".into()));
        }
        if v.get("pretraining_tp").and_then(Value::as_u64).is_some_and(|tp| tp > 1) {
            return Err(unsupported("option pretraining_tp > 1".into()));
        }
        let (rope_theta, rope_scaling) = rope(v, file)?;
        let attention_bias = v.get("attention_bias").and_then(Value::as_bool).unwrap_or(false);
        let is_qwen2 = architecture == "Qwen2ForCausalLM";
        let sliding_window = match architecture.as_str() {
            "MistralForCausalLM" => v.get("sliding_window").and_then(Value::as_u64).map(|w| w as usize),
            "Qwen2ForCausalLM" if v.get("use_sliding_window").and_then(Value::as_bool) == Some(true) => {
                return Err(unsupported("option use_sliding_window = true (Qwen2)".into()));
            }
            _ => None,
        };
        let token = |key: &str| -> Vec<u32> {
            match v.get(key) {
                Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
                Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
                _ => Vec::new(),
            }
        };
        Ok(Self {
            vocab_size: usize_key("vocab_size")?,
            hidden_size,
            intermediate_size: usize_key("intermediate_size")?,
            num_layers: usize_key("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: v.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
            qkv_bias: is_qwen2 || attention_bias,
            o_bias: !is_qwen2 && attention_bias,
            sliding_window,
            max_position_embeddings: v.get("max_position_embeddings").and_then(Value::as_u64).unwrap_or(2048) as usize,
            bos_token_id: token("bos_token_id").first().copied(),
            eos_token_ids: token("eos_token_id"),
            architecture,
        })
    }

    /// The inverse frequencies of RoPE, `head_dim / 2` of them, with the configured scaling
    /// (transformers' `_compute_default_rope_parameters` / `_compute_llama3_parameters`).
    pub fn inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim as f64;
        let base: Vec<f64> = (0..self.head_dim / 2).map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / d)).collect();
        match &self.rope_scaling {
            RopeScaling::Default => base,
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

    /// `config.json` in Hugging Face's layout (transformers 4 style RoPE keys, which both
    /// transformers 4 and 5 read).
    pub fn to_hf_json(&self) -> Value {
        let model_type = match self.architecture.as_str() {
            "MistralForCausalLM" => "mistral",
            "Qwen2ForCausalLM" => "qwen2",
            _ => "llama",
        };
        let mut v = serde_json::json!({
            "architectures": [self.architecture],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "torch_dtype": "float32",
        });
        let map = v.as_object_mut().expect("object");
        if let RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } =
            &self.rope_scaling
        {
            map.insert(
                "rope_scaling".into(),
                serde_json::json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_position_embeddings}),
            );
        }
        if self.architecture == "LlamaForCausalLM" {
            map.insert("attention_bias".into(), Value::Bool(self.qkv_bias));
            map.insert("mlp_bias".into(), Value::Bool(false));
        }
        if self.architecture == "MistralForCausalLM" {
            map.insert("sliding_window".into(), self.sliding_window.map_or(Value::Null, |w| Value::from(w as u64)));
        }
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
        v
    }
}

fn rope(v: &Value, file: &Path) -> Result<(f64, RopeScaling)> {
    let unsupported = |what: String| ModelError::Unsupported { file: file.to_path_buf(), what };
    // transformers 5: everything in `rope_parameters`; transformers 4: `rope_theta` + `rope_scaling`.
    let params = v.get("rope_parameters").filter(|p| p.is_object());
    let theta = params
        .and_then(|p| p.get("rope_theta"))
        .or_else(|| v.get("rope_theta"))
        .and_then(Value::as_f64)
        .unwrap_or(10000.0);
    let scaling = params.or_else(|| v.get("rope_scaling").filter(|s| s.is_object()));
    let Some(s) = scaling else { return Ok((theta, RopeScaling::Default)) };
    let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("default");
    let num = |key: &str| -> Result<f64> {
        s.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| ModelError::format(file, format!("rope scaling `llama3` needs `{key}`")))
    };
    match kind {
        "default" => Ok((theta, RopeScaling::Default)),
        "llama3" => Ok((
            theta,
            RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            },
        )),
        other => Err(unsupported(format!("RoPE scaling `{other}`; supported: default, llama3"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Value {
        serde_json::json!({"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2})
    }

    #[test]
    fn both_rope_styles_resolve_the_same() {
        let scaling = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let mut old = base();
        old["rope_theta"] = 500000.0.into();
        old["rope_scaling"] = scaling.clone();
        let mut new = base();
        let mut params = scaling;
        params["rope_theta"] = 500000.0.into();
        new["rope_parameters"] = params;
        let a = LlamaConfig::from_json(&old, Path::new("c.json")).unwrap();
        let b = LlamaConfig::from_json(&new, Path::new("c.json")).unwrap();
        assert_eq!(a, b);
        assert!(matches!(a.rope_scaling, RopeScaling::Llama3 { .. }));
    }

    #[test]
    fn unsupported_things_are_named() {
        let mut v = base();
        v["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
        let err = LlamaConfig::from_json(&v, Path::new("m/config.json")).unwrap_err().to_string();
        assert_eq!(
            err,
            "m/config.json: unsupported architecture `GPT2LMHeadModel`; supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"
        );
        let mut v = base();
        v["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
        let err = LlamaConfig::from_json(&v, Path::new("c.json")).unwrap_err().to_string();
        assert!(err.contains("unsupported RoPE scaling `yarn`"), "{err}");
        let mut v = base();
        v["hidden_act"] = "gelu".into();
        assert!(LlamaConfig::from_json(&v, Path::new("c.json")).unwrap_err().to_string().contains("hidden_act `gelu`"));
    }
}
