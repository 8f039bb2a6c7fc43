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
    let oracle: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("logprobs.json")).expect("fixture")).expect("json");
    let seqs: Vec<Vec<u32>> = serde_json::from_value(oracle["sequences"].clone()).expect("sequences");
    let want: Vec<Vec<f32>> = serde_json::from_value(oracle["token_logps"].clone()).expect("logps");
    // All sequences in one padded batch: padding must not change anything.
    let got = sequence_token_logprobs(&model, &seqs).expect("logprobs");
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
    let alone = sequence_token_logprobs(&model, &seqs[1..2]).expect("logprobs");
    for (a, b) in alone[0].iter().zip(&got[1]) {
        assert!((a - b).abs() < 3e-5, "{name}: batch vs alone {a} vs {b}");
    }
    // Split into (prompt, response): the response part of the same numbers.
    let s = &seqs[1];
    let pair = response_logprobs(&model, &[(s[..4].to_vec(), s[4..].to_vec())]).expect("pair");
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
