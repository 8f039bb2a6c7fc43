//! Gemma 3 (text): what sets it apart from Llama, as transformers' `modeling_gemma3.py` computes
//! it, and how its `config.json` (`Gemma3ForCausalLM`, `model_type` `gemma3_text`, or the text
//! part of a `Gemma3ForConditionalGeneration`) resolves into the shared decoder's options:
//!
//! - embeddings multiplied by `sqrt(hidden_size)` (rounded to the weights' dtype);
//! - RMSNorm computed in f32 and scaled by `1 + weight`;
//! - RMSNorm of each query and key head before RoPE;
//! - four norms per layer: before and after attention, before and after the MLP;
//! - GeGLU with the tanh approximation of GELU (`gelu_pytorch_tanh`);
//! - queries scaled by `query_pre_attn_scalar^-1/2`;
//! - `layer_types` mixing sliding-window and full attention (older configs: every
//!   `sliding_window_pattern`-th layer full), the sliding layers with their own RoPE base
//!   (`rope_local_base_freq`, or `rope_parameters.sliding_attention` in transformers 5) and the full
//!   layers with `rope_theta` and `rope_scaling` (`rope_parameters.full_attention`).
//!
//! Logit soft-capping (Gemma 2's `final_logit_softcapping`, `attn_logit_softcapping`) and
//! bidirectional attention are refused by name: Gemma 3 does not use them.

use std::path::Path;

use serde_json::Value;

use crate::config::{Activation, Architecture, LlamaConfig, RopeScaling, rope_scaling, rope_scaling_json};
use crate::error::{ModelError, Result};

/// Gemma 3's RoPE bases when the config gives none (transformers' `default_theta`).
const GLOBAL_THETA: f64 = 1_000_000.0;
const LOCAL_THETA: f64 = 10_000.0;

/// Resolve a Gemma 3 `config.json` (`architecture` is `Gemma3ForCausalLM` or
/// `Gemma3ForConditionalGeneration`, whose `text_config` is read).
pub fn config(v: &Value, architecture: Architecture, file: &Path) -> Result<LlamaConfig> {
    let unsupported = |what: String| ModelError::Unsupported { file: file.to_path_buf(), what };
    let bad = |message: String| ModelError::format(file, message);
    let text = if architecture == Architecture::Gemma3Multimodal {
        v.get("text_config").filter(|t| t.is_object()).ok_or_else(|| {
            bad("a Gemma3ForConditionalGeneration config needs `text_config` (the language model's settings)".into())
        })?
    } else {
        v
    };
    for key in
        ["hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size", "vocab_size", "head_dim"]
    {
        if text.get(key).and_then(Value::as_u64).is_none() {
            return Err(bad(format!("Gemma 3 needs `{key}` (a non-negative integer) in its config")));
        }
    }
    // The text config of a multimodal checkpoint may leave the token ids to the outer one.
    let mut merged = text.clone();
    if let (Some(m), Some(outer)) = (merged.as_object_mut(), v.as_object()) {
        for key in ["bos_token_id", "eos_token_id", "tie_word_embeddings"] {
            if !m.contains_key(key)
                && let Some(x) = outer.get(key)
            {
                m.insert(key.into(), x.clone());
            }
        }
    }
    let text = &merged;
    let mut c = LlamaConfig::common(text, Architecture::Gemma3, file)?;
    match text.get("hidden_activation").or_else(|| text.get("hidden_act")).and_then(Value::as_str) {
        None | Some("gelu_pytorch_tanh") => {}
        Some(other) => {
            return Err(unsupported(format!("Gemma 3 hidden_activation `{other}`; supported: gelu_pytorch_tanh")));
        }
    }
    for key in ["final_logit_softcapping", "attn_logit_softcapping"] {
        if text.get(key).is_some_and(|x| !x.is_null()) {
            return Err(unsupported(format!("option {key} (logit soft-capping)")));
        }
    }
    if text.get("use_bidirectional_attention").and_then(Value::as_bool) == Some(true) {
        return Err(unsupported("option use_bidirectional_attention = true".into()));
    }
    if text.get("attention_bias").and_then(Value::as_bool) == Some(true) {
        return Err(unsupported("option attention_bias = true (Gemma 3)".into()));
    }
    c.tie_word_embeddings = text.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(true);
    c.qk_norm = true;
    c.gemma_norms = true;
    c.hidden_act = Activation::GeluTanh;
    c.query_pre_attn_scalar = Some(text.get("query_pre_attn_scalar").and_then(Value::as_f64).ok_or_else(|| {
        bad("Gemma 3 needs `query_pre_attn_scalar` (the queries' scale is its inverse square root)".into())
    })?);
    let window = text
        .get("sliding_window")
        .and_then(Value::as_u64)
        .filter(|&w| w > 0)
        .ok_or_else(|| bad("Gemma 3 needs `sliding_window` (a positive integer)".into()))?;
    c.sliding_window = Some(window as usize);
    c.sliding_layers = match text.get("layer_types") {
        Some(Value::Array(types)) => {
            if types.len() != c.num_layers {
                return Err(bad(format!("`layer_types` has {} entries for {} layers", types.len(), c.num_layers)));
            }
            types
                .iter()
                .map(|t| match t.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => {
                        Err(bad(format!("`layer_types`: {t} is neither \"sliding_attention\" nor \"full_attention\"")))
                    }
                })
                .collect::<Result<_>>()?
        }
        _ => {
            let pattern = text.get("sliding_window_pattern").and_then(Value::as_u64).unwrap_or(6).max(1) as usize;
            (0..c.num_layers).map(|i| !(i + 1).is_multiple_of(pattern)).collect()
        }
    };
    // RoPE: transformers 5 nests one entry per layer type; transformers 4 has rope_theta and
    // rope_scaling for the full layers, rope_local_base_freq for the sliding ones.
    let params = text.get("rope_parameters").filter(|p| p.get("full_attention").is_some());
    let (global, local) = match params {
        Some(p) => {
            let theta = |kind: &str, default: f64| {
                p.get(kind).and_then(|k| k.get("rope_theta")).and_then(Value::as_f64).unwrap_or(default)
            };
            let scaling = |kind: &str| p.get(kind).map(|k| rope_scaling(k, file)).transpose();
            (
                (theta("full_attention", GLOBAL_THETA), scaling("full_attention")?.unwrap_or(RopeScaling::Default)),
                (
                    theta("sliding_attention", LOCAL_THETA),
                    scaling("sliding_attention")?.unwrap_or(RopeScaling::Default),
                ),
            )
        }
        None => (
            (
                text.get("rope_theta").and_then(Value::as_f64).unwrap_or(GLOBAL_THETA),
                text.get("rope_scaling")
                    .filter(|s| s.is_object())
                    .map(|s| rope_scaling(s, file))
                    .transpose()?
                    .unwrap_or(RopeScaling::Default),
            ),
            (text.get("rope_local_base_freq").and_then(Value::as_f64).unwrap_or(LOCAL_THETA), RopeScaling::Default),
        ),
    };
    (c.rope_theta, c.rope_scaling) = global;
    c.local_rope = Some(local);
    Ok(c)
}

/// `config.json` of a `Gemma3ForCausalLM` (transformers 4 keys, which transformers 5 reads too).
pub fn to_hf_json(c: &LlamaConfig) -> Value {
    let (local_theta, _) = c.local_rope.clone().unwrap_or((LOCAL_THETA, RopeScaling::Default));
    let layer_types: Vec<&str> =
        (0..c.num_layers).map(|l| if c.layer_is_sliding(l) { "sliding_attention" } else { "full_attention" }).collect();
    let mut v = serde_json::json!({
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_local_base_freq": local_theta,
        // An integer where it is one: transformers' config class checks the type.
        "query_pre_attn_scalar": c.query_pre_attn_scalar.map(|x| {
            if x.fract() == 0.0 && x >= 0.0 { Value::from(x as u64) } else { Value::from(x) }
        }),
        "sliding_window": c.sliding_window,
        "layer_types": layer_types,
        "final_logit_softcapping": null,
        "attn_logit_softcapping": null,
        "attention_bias": false,
        "tie_word_embeddings": c.tie_word_embeddings,
        "max_position_embeddings": c.max_position_embeddings,
        "torch_dtype": "float32",
    });
    let map = v.as_object_mut().expect("object");
    if let Some(scaling) = rope_scaling_json(&c.rope_scaling) {
        map.insert("rope_scaling".into(), scaling);
    }
    c.insert_token_ids(map);
    v
}

/// Whether a `config.json` describes a `Gemma3ForConditionalGeneration` (whose tensors need
/// [`text_tensor_name`]); resolution maps it to the text model, so this reads the raw config.
pub fn is_multimodal(v: &Value) -> bool {
    match v.get("architectures").and_then(|a| a.get(0)).and_then(Value::as_str) {
        Some(a) => a == "Gemma3ForConditionalGeneration",
        None => v.get("model_type").and_then(Value::as_str) == Some("gemma3"),
    }
}

/// Checkpoint tensor names of a `Gemma3ForConditionalGeneration` mapped to the causal LM's:
/// `model.language_model.X` (transformers 5) or `language_model.model.X` (transformers 4) to
/// `model.X`, `language_model.lm_head.weight` to `lm_head.weight`. `None`: a tensor of the vision
/// tower or projector, which a text model does not use.
pub fn text_tensor_name(name: &str) -> Option<String> {
    if let Some(rest) =
        name.strip_prefix("model.language_model.").or_else(|| name.strip_prefix("language_model.model."))
    {
        return Some(format!("model.{rest}"));
    }
    if name == "language_model.lm_head.weight" || name == "lm_head.weight" {
        return Some("lm_head.weight".into());
    }
    None
}
