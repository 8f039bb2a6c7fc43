//! GGUF import of a Qwen3 (`qwen3` architecture: q/k norm tensors, `key_length` as head_dim, no
//! Q/K row permutation): the tiny random Qwen3 written as llama.cpp lays it out
//! (fixtures/gguf/make_tiny_qwen3.py) converts into a checkpoint with the log-probs transformers
//! gives the original (fixtures/models/qwen3), within the oracle tests' 1e-4.

use std::path::Path;

use burn::tensor::DType;
use fuserl_model::Cpu;
use fuserl_model::checkpoint::load;
use fuserl_model::logprobs::sequence_token_logprobs;

#[test]
fn qwen3_gguf_converts_to_the_same_model() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    let out = tempfile::tempdir().expect("tmp");
    let config = fuserl_model::gguf::convert(&fixtures.join("gguf/qwen3-tiny.gguf"), out.path()).expect("convert");
    assert_eq!(config.architecture, "Qwen3ForCausalLM");
    assert!(config.qk_norm && config.head_dim == 16 && !config.tie_word_embeddings);
    let model = load::<Cpu>(out.path(), &Default::default(), DType::F32).expect("load");
    let oracle: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("models/qwen3/logprobs.json")).expect("fixture"))
            .expect("json");
    let seqs: Vec<Vec<u32>> = serde_json::from_value(oracle["sequences"].clone()).expect("sequences");
    let want: Vec<Vec<f32>> = serde_json::from_value(oracle["token_logps"].clone()).expect("logps");
    let got = sequence_token_logprobs(&model, &seqs).expect("logprobs");
    for (g, w) in got.iter().zip(&want) {
        for (a, b) in g.iter().zip(w) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }
    // The tokenizer was rebuilt (byte-level BPE, Qwen2's split).
    let tok = std::fs::read_to_string(out.path().join("tokenizer.json")).expect("tokenizer");
    assert!(tok.contains("\"Split\"") && tok.contains("\"NFC\""));
}
