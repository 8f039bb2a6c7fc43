//! Every supported architecture and option against transformers (fixtures/models/make_tiny.py):
//! per-token log-probs of fixed sequences agree within 1e-4 (f32 model, oracle in f64 from the
//! same saved weights).

use std::path::{Path, PathBuf};

use burn::tensor::DType;
use fuserl_model::Cpu;
use fuserl_model::checkpoint::load;
use fuserl_model::logprobs::{response_logprobs, sequence_token_logprobs};

const TOL: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models").join(name)
}

fn check(name: &str) {
    let dir = fixture(name);
    let model = load::<Cpu>(&dir, &Default::default(), DType::F32).unwrap_or_else(|e| panic!("{e}"));
    check_model(name, &model);
}

fn check_model<B: fuserl_kernels::LogProbBackend>(name: &str, model: &fuserl_model::llama::LlamaModel<B>) {
    let dir = fixture(name);
    let oracle: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("logprobs.json")).expect("fixture")).expect("json");
    let seqs: Vec<Vec<u32>> = serde_json::from_value(oracle["sequences"].clone()).expect("sequences");
    let want: Vec<Vec<f32>> = serde_json::from_value(oracle["token_logps"].clone()).expect("logps");
    // All sequences in one padded batch: padding must not change anything.
    let got = sequence_token_logprobs(model, &seqs).expect("logprobs");
    let mut worst = 0.0f32;
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g.len(), w.len());
        for (a, b) in g.iter().zip(w) {
            worst = worst.max((a - b).abs());
        }
    }
    assert!(worst < TOL, "{name}: max |fuserl - transformers| = {worst}");
    // One at a time gives the same numbers, to f32 rounding: another padded length changes the
    // matmul shapes and where the SIMD reductions (softmax, log-sum-exp) switch to their scalar
    // tails, so sums associate differently (a few tens of ulps of values near 5; a padding
    // leak would be orders of magnitude larger).
    let alone = sequence_token_logprobs(model, &seqs[1..2]).expect("logprobs");
    for (a, b) in alone[0].iter().zip(&got[1]) {
        assert!((a - b).abs() < 3e-5, "{name}: batch vs alone {a} vs {b}");
    }
    // Split into (prompt, response): the response part of the same numbers.
    let s = &seqs[1];
    let pair = response_logprobs(model, &[(s[..4].to_vec(), s[4..].to_vec())]).expect("pair");
    assert_eq!(pair[0].n_tokens, s.len() - 4);
    for (a, b) in pair[0].token_logps.iter().zip(&want[1][3..]) {
        assert!((a - b).abs() < TOL);
    }
}

#[test]
fn llama_with_tied_embeddings_and_gqa() {
    check("llama-tied");
}

#[test]
fn llama3_rope_scaling_explicit_head_dim_untied_transformers4_config() {
    check("llama3-rope-head-dim");
}

#[test]
fn mistral_f16_sharded() {
    check("mistral-f16-sharded");
}

#[test]
fn qwen2_bf16_with_qkv_bias() {
    check("qwen2-bf16");
}

#[test]
fn qwen3_with_qk_norms_and_explicit_head_dim() {
    check("qwen3");
    greedy_with_cache::<Cpu>("qwen3", &Default::default());
}

#[test]
fn gemma3_with_sliding_and_full_layers() {
    check("gemma3");
    greedy_with_cache::<Cpu>("gemma3", &Default::default());
    one_token_at_a_time_through_the_cache::<Cpu>("gemma3", &Default::default());
}

/// Greedy decoding through fuserl's KV cache gives transformers' greedy ids (16 new tokens from
/// a 6-token prompt: past Gemma 3's window of 4).
fn greedy_with_cache<B: fuserl_kernels::LogProbBackend>(name: &str, device: &B::Device) {
    use fuserl_model::llama::Inputs;
    let dir = fixture(name);
    let model = load::<B>(&dir, device, DType::F32).expect("load");
    let oracle: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("logprobs.json")).expect("fixture")).expect("json");
    let prompt: Vec<u32> = serde_json::from_value(oracle["greedy"]["prompt"].clone()).expect("prompt");
    let want: Vec<u32> = serde_json::from_value(oracle["greedy"]["new_ids"].clone()).expect("ids");
    let mut cache = model.empty_cache(1);
    let mut inputs = Inputs::right_padded(std::slice::from_ref(&prompt), 0);
    let mut key_valid = inputs.valid.clone();
    let mut got = Vec::new();
    for step in 0..want.len() {
        let hidden = model.hidden(&inputs, &key_valid, Some(&mut cache));
        let t = hidden.dims()[1];
        let last: Vec<f32> = model.logits(hidden.narrow(1, t - 1, 1)).into_data().iter::<f32>().collect();
        let next = last.iter().enumerate().fold((0, f32::MIN), |m, (i, &v)| if v > m.1 { (i, v) } else { m }).0 as u32;
        got.push(next);
        let pos = prompt.len() + step;
        inputs = Inputs { ids: vec![vec![next]], positions: vec![vec![pos]], valid: vec![vec![true]] };
        key_valid[0].push(true);
    }
    assert_eq!(got, want, "{name}: greedy ids through the cache");
}

/// The longest sequence fed one token at a time through the cache gives the log-probs of the
/// whole-sequence pass (both checked against transformers), well past the sliding window.
fn one_token_at_a_time_through_the_cache<B: fuserl_kernels::LogProbBackend>(name: &str, device: &B::Device) {
    use fuserl_model::llama::Inputs;
    let dir = fixture(name);
    let model = load::<B>(&dir, device, DType::F32).expect("load");
    let oracle: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("logprobs.json")).expect("fixture")).expect("json");
    let seq: Vec<u32> = serde_json::from_value(oracle["sequences"][3].clone()).expect("sequence");
    let want: Vec<f32> = serde_json::from_value(oracle["token_logps"][3].clone()).expect("logps");
    let mut cache = model.empty_cache(1);
    let mut key_valid = vec![Vec::new()];
    for (pos, pair) in seq.windows(2).enumerate() {
        let inputs = Inputs { ids: vec![vec![pair[0]]], positions: vec![vec![pos]], valid: vec![vec![true]] };
        key_valid[0].push(true);
        let logits: Vec<f32> =
            model.logits(model.hidden(&inputs, &key_valid, Some(&mut cache))).into_data().iter::<f32>().collect();
        let max = logits.iter().copied().fold(f32::MIN, f32::max);
        let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f32>().ln();
        let got = logits[pair[1] as usize] - lse;
        assert!((got - want[pos]).abs() < TOL, "{name}: position {pos}: cached {got} vs transformers {}", want[pos]);
    }
}

/// Gemma 3 as transformers 4 configured it (rope_theta + rope_scaling for the full layers,
/// rope_local_base_freq, sliding_window_pattern instead of layer_types), and as the text part of
/// a `Gemma3ForConditionalGeneration` checkpoint (tensors under `model.language_model.`, a vision
/// tower beside it): the same model, the same log-probs.
#[test]
fn gemma3_transformers4_config_and_multimodal_checkpoint() {
    let src = fixture("gemma3");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).expect("config")).expect("json");
    let mut old = config.clone();
    let o = old.as_object_mut().expect("object");
    o.remove("rope_parameters");
    o.remove("layer_types");
    o.insert("rope_theta".into(), 1_000_000.0.into());
    o.insert("rope_scaling".into(), serde_json::json!({"rope_type": "linear", "factor": 2.0}));
    o.insert("rope_local_base_freq".into(), 10_000.0.into());
    // Layers 0, 1, 3 sliding and 2 full is not a pattern; with pattern 3, layer 2 is full and so
    // is layer 5 (there is none): the same layer types.
    o.insert("sliding_window_pattern".into(), 3.into());
    let a = fuserl_model::config::LlamaConfig::from_json(&config, &src.join("config.json")).expect("new style");
    let b = fuserl_model::config::LlamaConfig::from_json(&old, &src.join("config.json")).expect("old style");
    assert_eq!(a, b);

    // The multimodal layout: rename every tensor and wrap the config.
    let dir = tempfile::tempdir().expect("tmp");
    let bytes = std::fs::read(src.join("model.safetensors")).expect("weights");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut renamed: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| (name.replacen("model.", "model.language_model.", 1), view))
        .collect();
    let vision = vec![0u8; 16];
    renamed.push((
        "model.vision_tower.vision_model.post_layernorm.weight".into(),
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4], &vision).expect("view"),
    ));
    safetensors::serialize_to_file(renamed, None, &dir.path().join("model.safetensors")).expect("write");
    let wrapped = serde_json::json!({"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "text_config": old, "vision_config": {"hidden_size": 4}});
    std::fs::write(dir.path().join("config.json"), wrapped.to_string()).expect("config");
    std::fs::copy(src.join("logprobs.json"), dir.path().join("logprobs.json")).expect("copy");
    let model = load::<Cpu>(dir.path(), &Default::default(), DType::F32).expect("multimodal");
    assert_eq!(model.config, a);
    let oracle: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("logprobs.json")).expect("fixture")).expect("json");
    let seqs: Vec<Vec<u32>> = serde_json::from_value(oracle["sequences"].clone()).expect("sequences");
    let want: Vec<Vec<f32>> = serde_json::from_value(oracle["token_logps"].clone()).expect("logps");
    let got = sequence_token_logprobs(&model, &seqs).expect("logprobs");
    for (g, w) in got.iter().zip(&want) {
        for (x, y) in g.iter().zip(w) {
            assert!((x - y).abs() < TOL);
        }
    }
}

/// What Gemma needs is asked for by name.
#[test]
fn gemma3_config_without_what_gemma_needs_is_refused() {
    let src = fixture("gemma3");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).expect("config")).expect("json");
    let file = Path::new("g/config.json");
    for (key, needle) in [
        ("query_pre_attn_scalar", "Gemma 3 needs `query_pre_attn_scalar`"),
        ("sliding_window", "Gemma 3 needs `sliding_window`"),
        ("head_dim", "Gemma 3 needs `head_dim`"),
    ] {
        let mut v = config.clone();
        v.as_object_mut().expect("object").remove(key);
        let err = fuserl_model::config::LlamaConfig::from_json(&v, file).unwrap_err().to_string();
        assert!(err.starts_with("g/config.json: ") && err.contains(needle), "{err}");
    }
    let mut v = config.clone();
    v["final_logit_softcapping"] = 30.0.into();
    let err = fuserl_model::config::LlamaConfig::from_json(&v, file).unwrap_err().to_string();
    assert!(err.contains("unsupported option final_logit_softcapping"), "{err}");
    let mut v = config;
    v["layer_types"] = serde_json::json!(["sliding_attention"]);
    let err = fuserl_model::config::LlamaConfig::from_json(&v, file).unwrap_err().to_string();
    assert!(err.contains("`layer_types` has 1 entries for 4 layers"), "{err}");
    let wrapped = serde_json::json!({"architectures": ["Gemma3ForConditionalGeneration"]});
    let err = fuserl_model::config::LlamaConfig::from_json(&wrapped, file).unwrap_err().to_string();
    assert!(err.contains("needs `text_config`"), "{err}");
}

/// Every architecture on wgpu (lavapipe in CI): the same numbers within the same tolerance.
#[cfg(feature = "wgpu")]
#[test]
fn every_architecture_on_wgpu() {
    use burn::backend::Wgpu;
    use burn::backend::wgpu::WgpuDevice;
    let device = WgpuDevice::default();
    for name in ["llama-tied", "llama3-rope-head-dim", "mistral-f16-sharded", "qwen2-bf16", "qwen3", "gemma3"] {
        let model = load::<Wgpu>(&fixture(name), &device, DType::F32).unwrap_or_else(|e| panic!("{name}: {e}"));
        check_model(name, &model);
    }
    // Decoding through the KV cache (one query against the cached keys: the attention kernel's
    // `past`), past Gemma 3's sliding window.
    greedy_with_cache::<Wgpu>("qwen3", &device);
    greedy_with_cache::<Wgpu>("gemma3", &device);
    one_token_at_a_time_through_the_cache::<Wgpu>("gemma3", &device);
}
