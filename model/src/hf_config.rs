//! `config.json`, the wire format, read into and written from a [`LlamaConfig`]: Llama, Mistral,
//! Qwen2 and Qwen3 here, Gemma 3 in [`crate::gemma3`]. Both ways transformers has written RoPE
//! settings are read: `rope_theta` + `rope_scaling` (transformers 4) and `rope_parameters`
//! (transformers 5). Anything outside the supported set is an error that names it.

use std::path::Path;

use serde_json::Value;

use crate::config::{Architecture, LlamaConfig, RopeScaling, read_json, rope_scaling, rope_scaling_json};
use crate::error::{ModelError, Result};

impl LlamaConfig {
    /// Read and resolve `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_json(&read_json(path)?, path)
    }

    /// Resolve a parsed `config.json`; `file` names it in errors.
    pub fn from_json(v: &Value, file: &Path) -> Result<Self> {
        let unsupported = |what: String| ModelError::Unsupported { file: file.to_path_buf(), what };
        let bad = |message: String| ModelError::format(file, message);
        let name = match v.get("architectures").and_then(Value::as_array).and_then(|a| a.first()) {
            Some(Value::String(a)) => a.clone(),
            _ => match v.get("model_type").and_then(Value::as_str) {
                Some("llama") => "LlamaForCausalLM".into(),
                Some("mistral") => "MistralForCausalLM".into(),
                Some("qwen2") => "Qwen2ForCausalLM".into(),
                Some("qwen3") => "Qwen3ForCausalLM".into(),
                Some("gemma3_text") => "Gemma3ForCausalLM".into(),
                Some("gemma3") => "Gemma3ForConditionalGeneration".into(),
                Some(other) => {
                    return Err(unsupported(format!(
                        "model_type `{other}`; supported: llama, mistral, qwen2, qwen3, gemma3_text, gemma3"
                    )));
                }
                None => return Err(bad("neither `architectures` nor `model_type` says what the model is".into())),
            },
        };
        if name.ends_with("ForSequenceClassification") {
            return Err(unsupported(format!(
                "architecture `{name}` as a causal LM: it is a sequence classifier (a reward model); \
                 load it with fuserl_model::classifier (the `classifier` reward, `fuserl reward`)"
            )));
        }
        let Some(architecture) = Architecture::from_name(&name) else {
            let supported: Vec<&str> = Architecture::ALL.iter().map(|a| a.as_str()).collect();
            return Err(unsupported(format!("architecture `{name}`; supported: {}", supported.join(", "))));
        };
        if architecture.is_gemma3() {
            return crate::gemma3::config(v, architecture, file);
        }
        if let Some(act) = Self::opt(v, "hidden_act", file, "a string", |x| x.as_str().map(str::to_owned))?
            && act != "silu"
        {
            return Err(unsupported(format!("hidden_act `{act}`; supported: silu")));
        }
        let mut c = Self::common(v, architecture, file)?;
        let (rope_theta, rope_scaling) = rope(v, file)?;
        c.rope_theta = rope_theta;
        c.rope_scaling = rope_scaling;
        let attention_bias = Self::opt(v, "attention_bias", file, "true or false", Value::as_bool)?.unwrap_or(false);
        let is_qwen2 = c.architecture == Architecture::Qwen2;
        c.qkv_bias = is_qwen2 || attention_bias;
        c.o_bias = !is_qwen2 && attention_bias;
        c.qk_norm = c.architecture == Architecture::Qwen3;
        c.sliding_window = match c.architecture {
            Architecture::Mistral => {
                Self::opt(v, "sliding_window", file, "a positive integer or null", |x| x.as_u64().filter(|&w| w > 0))?
                    .map(|w| w as usize)
            }
            Architecture::Qwen2 | Architecture::Qwen3
                if Self::opt(v, "use_sliding_window", file, "true or false", Value::as_bool)? == Some(true) =>
            {
                return Err(unsupported(format!("option use_sliding_window = true ({})", c.architecture)));
            }
            _ => None,
        };
        Ok(c)
    }

    /// `config.json` in Hugging Face's layout (transformers 4 style RoPE keys, which both
    /// transformers 4 and 5 read).
    pub fn to_hf_json(&self) -> Value {
        let model_type = match self.architecture {
            Architecture::Gemma3 | Architecture::Gemma3Multimodal => return crate::gemma3::to_hf_json(self),
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Llama => "llama",
        };
        let mut v = serde_json::json!({
            "architectures": [self.architecture.as_str()],
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
        if let Some(scaling) = rope_scaling_json(&self.rope_scaling) {
            map.insert("rope_scaling".into(), scaling);
        }
        if self.architecture == Architecture::Qwen3 {
            map.insert("attention_bias".into(), Value::Bool(self.qkv_bias));
        }
        if self.architecture == Architecture::Llama {
            map.insert("attention_bias".into(), Value::Bool(self.qkv_bias));
            map.insert("mlp_bias".into(), Value::Bool(false));
        }
        if self.architecture == Architecture::Mistral {
            map.insert("sliding_window".into(), self.sliding_window.map_or(Value::Null, |w| Value::from(w as u64)));
        }
        self.insert_token_ids(map);
        v
    }
}

fn rope(v: &Value, file: &Path) -> Result<(f64, RopeScaling)> {
    // transformers 5: everything in `rope_parameters`; transformers 4: `rope_theta` + `rope_scaling`.
    let params = v.get("rope_parameters").filter(|p| p.is_object());
    let positive = |x: &Value| x.as_f64().filter(|t| t.is_finite() && *t > 0.0);
    let theta = match params {
        Some(p) if p.get("rope_theta").is_some() => {
            LlamaConfig::opt(p, "rope_theta", file, "a positive number", positive)?
        }
        _ => LlamaConfig::opt(v, "rope_theta", file, "a positive number", positive)?,
    }
    .unwrap_or(10000.0);
    let scaling = params.or_else(|| v.get("rope_scaling").filter(|s| s.is_object()));
    Ok((theta, scaling.map(|s| rope_scaling(s, file)).transpose()?.unwrap_or(RopeScaling::Default)))
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
            "m/config.json: unsupported architecture `GPT2LMHeadModel`; supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma3ForCausalLM, Gemma3ForConditionalGeneration"
        );
        let mut v = base();
        v["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
        let err = LlamaConfig::from_json(&v, Path::new("c.json")).unwrap_err().to_string();
        assert!(err.contains("unsupported RoPE scaling `yarn`"), "{err}");
        let mut v = base();
        v["hidden_act"] = "gelu".into();
        assert!(LlamaConfig::from_json(&v, Path::new("c.json")).unwrap_err().to_string().contains("hidden_act `gelu`"));
    }

    /// Sizes past the caps are refused before anything is sized by them (the fuzzing found a
    /// Gemma 3 config of 777,777,777,774 layers, whose per-layer attention types were allocated).
    #[test]
    fn sizes_past_the_caps_are_refused() {
        let mut v = base();
        v["num_hidden_layers"] = 777_777_777_774u64.into();
        let err = LlamaConfig::from_json(&v, Path::new("c.json")).unwrap_err().to_string();
        assert_eq!(err, "c.json: `num_hidden_layers`: 777777777774 is more than the 4096 fuserl accepts");
        let mut v = base();
        v["architectures"] = serde_json::json!(["Gemma3ForCausalLM"]);
        v["head_dim"] = 4.into();
        v["num_hidden_layers"] = u64::MAX.into();
        let err = LlamaConfig::from_json(&v, Path::new("c.json")).unwrap_err().to_string();
        assert!(err.contains("more than the 4096"), "{err}");
        let mut v = base();
        v["vocab_size"] = (1u64 << 40).into();
        let err = LlamaConfig::from_json(&v, Path::new("c.json")).unwrap_err().to_string();
        assert!(err.contains("`vocab_size`: 1099511627776 is more than the 16777216"), "{err}");
    }
}
