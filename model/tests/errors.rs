//! Bad checkpoints are errors that name the file and the problem.

use std::path::{Path, PathBuf};

use burn::tensor::DType;
use fuserl_model::Cpu;
use fuserl_model::checkpoint::{load, save};
use fuserl_model::logprobs::sequence_token_logprobs;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models").join(name)
}

/// A writable copy of a fixture.
fn copy(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tmp");
    for entry in std::fs::read_dir(fixture(name)).expect("fixture") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copy");
    }
    dir
}

fn load_err(dir: &Path) -> String {
    load::<Cpu>(dir, &Default::default(), DType::F32).expect_err("should fail").to_string()
}

#[test]
fn missing_and_corrupt_safetensors() {
    let dir = copy("llama-tied");
    std::fs::remove_file(dir.path().join("model.safetensors")).expect("rm");
    let err = load_err(dir.path());
    assert!(err.contains("model.safetensors: missing: the checkpoint has no such weights file"), "{err}");

    let dir = copy("llama-tied");
    std::fs::write(dir.path().join("model.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}").expect("write");
    let err = load_err(dir.path());
    assert!(err.contains("model.safetensors: not a valid safetensors file"), "{err}");

    let dir = copy("mistral-f16-sharded");
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).expect("rm");
    let err = load_err(dir.path());
    assert!(err.contains("model-00002-of-00002.safetensors: missing"), "{err}");

    let empty = tempfile::tempdir().expect("tmp");
    assert!(load_err(empty.path()).contains("not a Hugging Face checkpoint folder: it has no config.json"));
}

#[test]
fn wrong_shape_names_the_tensor_and_both_shapes() {
    let dir = copy("llama-tied");
    let cfg_path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).expect("cfg")).expect("json");
    cfg["intermediate_size"] = 40.into();
    std::fs::write(&cfg_path, cfg.to_string()).expect("write");
    let err = load_err(dir.path());
    assert!(
        err.contains("model.safetensors: tensor `model.layers.0.mlp.gate_proj.weight` has shape [48, 32]; the config implies [40, 32]"),
        "{err}"
    );
}

#[test]
fn unsupported_architecture_is_named() {
    let dir = copy("llama-tied");
    let cfg_path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).expect("cfg")).expect("json");
    cfg["architectures"] = serde_json::json!(["FalconForCausalLM"]);
    std::fs::write(&cfg_path, cfg.to_string()).expect("write");
    let err = load_err(dir.path());
    assert!(
        err.contains("config.json: unsupported architecture `FalconForCausalLM`; supported: LlamaForCausalLM"),
        "{err}"
    );
}

#[test]
fn a_tokenizer_too_big_for_the_model_is_refused() {
    // SmolLM2-sized tokenizers do not fit the 64-token test model: use a tiny tokenizer.json.
    let dir = copy("llama-tied");
    let vocab: serde_json::Map<String, serde_json::Value> = (0..100).map(|i| (format!("t{i}"), i.into())).collect();
    let tokenizer = serde_json::json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}});
    std::fs::write(dir.path().join("tokenizer.json"), tokenizer.to_string()).expect("write");
    std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"eos_token": "t2"}"#).expect("write");
    let tok = fuserl_model::chat::ChatTokenizer::load(dir.path(), None).expect("tokenizer");
    let err = tok.check_fits(64).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer.json: the tokenizer has token ids up to 99, but the model's vocab_size is 64"),
        "{err}"
    );
    assert!(tok.check_fits(100).is_ok());
}

#[test]
fn saved_checkpoints_reload_with_the_same_logprobs() {
    for (name, shard) in
        [("qwen2-bf16", 1 << 30), ("llama3-rope-head-dim", 40_000), ("qwen3", 1 << 30), ("gemma3", 1 << 30)]
    {
        let model = load::<Cpu>(&fixture(name), &Default::default(), DType::F32).expect("load");
        let out = tempfile::tempdir().expect("tmp");
        save(&model, out.path(), shard, Some(&fixture(name))).expect("save");
        if shard < 1 << 20 {
            assert!(out.path().join("model.safetensors.index.json").is_file(), "{name} should be sharded");
        }
        let again = load::<Cpu>(out.path(), &Default::default(), DType::F32).expect("reload");
        assert_eq!(again.config, model.config);
        let seqs = vec![vec![1, 5, 9, 33, 2, 7], vec![4, 4, 60]];
        let a = sequence_token_logprobs(&model, &seqs).expect("a");
        let b = sequence_token_logprobs(&again, &seqs).expect("b");
        assert_eq!(a, b, "{name}");
    }
}

#[test]
fn saving_in_half_precision_writes_half_precision() {
    let model = load::<Cpu>(&fixture("llama-tied"), &Default::default(), DType::F32).expect("load");
    let out = tempfile::tempdir().expect("tmp");
    fuserl_model::checkpoint::save_as(&model, out.path(), 1 << 30, None, DType::BF16).expect("save");
    let bytes = std::fs::read(out.path().join("model.safetensors")).expect("weights");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    assert!(st.tensors().iter().all(|(_, v)| v.dtype() == safetensors::Dtype::BF16));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).expect("cfg")).expect("json");
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    let again = load::<Cpu>(out.path(), &Default::default(), DType::F32).expect("reload");
    let seqs = vec![vec![1, 5, 9, 33, 2, 7]];
    let a = sequence_token_logprobs(&model, &seqs).expect("a");
    let b = sequence_token_logprobs(&again, &seqs).expect("b");
    assert!(a[0].iter().zip(&b[0]).all(|(x, y)| (x - y).abs() < 0.3), "{a:?} vs {b:?}");
}

#[test]
fn half_precision_dtypes_load_and_run() {
    let dir = fixture("llama-tied");
    let seqs = vec![vec![1, 5, 9, 33, 2, 7, 11, 40]];
    let full =
        sequence_token_logprobs(&load::<Cpu>(&dir, &Default::default(), DType::F32).expect("f32"), &seqs).expect("f32");
    for dtype in [DType::F16, DType::BF16] {
        let model = load::<Cpu>(&dir, &Default::default(), dtype).expect("load");
        assert_eq!(model.weights.embed_tokens.val().dtype(), dtype);
        let half = sequence_token_logprobs(&model, &seqs).expect("logprobs");
        let worst = half[0].iter().zip(&full[0]).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        // A check that half dtypes load and run close to f32 (exactness is checked in f32): f16
        // keeps 11 bits of mantissa, bf16 8, and this model's logits are large (std-0.35 weights).
        let tol = if dtype == DType::F16 { 0.03 } else { 0.3 };
        eprintln!("{dtype:?}: worst per-token difference from f32 {worst}");
        assert!(worst < tol, "{dtype:?}: {worst}");
    }
}

/// A chat template that loops or recurses without end is stopped with an error naming the file,
/// not a hang or a stack overflow.
#[test]
fn a_template_that_never_ends_is_stopped() {
    let tokenizer = Path::new(env!("CARGO_MANIFEST_DIR")).join("../checkpoints/tiny-chat");
    for (what, template) in [
        ("recursion", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"),
        ("a loop of a billion", "{% for i in range(1000000000) %}{{ i }}{% endfor %}"),
    ] {
        let dir = tempfile::tempdir().expect("tmp");
        for f in ["tokenizer.json", "tokenizer_config.json", "config.json"] {
            std::fs::copy(tokenizer.join(f), dir.path().join(f)).expect("copy");
        }
        std::fs::write(dir.path().join("chat_template.jinja"), template).expect("write");
        let tok = fuserl_model::chat::ChatTokenizer::load(dir.path(), None).expect("load");
        let t0 = std::time::Instant::now();
        let err = tok.render(&[fuserl_core::data::ChatMessage::user("hi")], true).expect_err(what).to_string();
        assert!(err.contains("chat_template.jinja: chat template:"), "{what}: {err}");
        assert!(t0.elapsed().as_secs() < 60, "{what}: took {:?}", t0.elapsed());
    }
}
