//! Sequence classifiers (reward models) against transformers (fixtures/rewards/make_tiny_classifiers.py):
//! the conversation's token ids equal `apply_chat_template(conversation, tokenize=True)`, and the
//! logits agree within 1e-4 with transformers' in f64 for each conversation alone and with its
//! f32 padded batch, for Llama, Qwen2, Qwen3 and Gemma 3 heads (1, 2 and 3 labels, with and
//! without a pad id, a pad id that ends every conversation, a sliding window).

use std::path::{Path, PathBuf};

use burn::tensor::DType;
use fuserl_core::data::ChatMessage;
use fuserl_model::Cpu;
use fuserl_model::chat::ChatTokenizer;
use fuserl_model::classifier::{SequenceClassifier, load_classifier};

const TOL: f32 = 1e-4;
const FIXTURES: [&str; 4] = ["llama-rm", "qwen2-rm", "qwen3-rm", "gemma3-rm"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/rewards").join(name)
}

fn oracle(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("scores.json")).expect("fixture")).expect("json")
}

fn close(name: &str, what: &str, got: &[Vec<f32>], want: &[Vec<f64>]) {
    assert_eq!(got.len(), want.len(), "{name} {what}");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{name} {what} [{i}]: labels");
        for (a, b) in g.iter().zip(w) {
            assert!((f64::from(*a) - b).abs() < f64::from(TOL), "{name} {what} [{i}]: {g:?} vs {w:?}");
        }
    }
}

fn check<B: fuserl_kernels::LogProbBackend>(name: &str, rm: &SequenceClassifier<B>) {
    let doc = oracle(name);
    let conversations: Vec<Vec<ChatMessage>> = serde_json::from_value(doc["conversations"].clone()).expect("conv");
    let want_ids: Vec<Vec<u32>> = serde_json::from_value(doc["ids"].clone()).expect("ids");
    let alone: Vec<Vec<f64>> = serde_json::from_value(doc["alone"].clone()).expect("alone");
    let tok = ChatTokenizer::load(&fixture(name), None).unwrap_or_else(|e| panic!("{name}: {e}"));
    let ids: Vec<Vec<u32>> =
        conversations.iter().map(|c| tok.conversation_ids(c, usize::MAX).unwrap_or_else(|e| panic!("{e}"))).collect();
    assert_eq!(ids, want_ids, "{name}: token ids differ from apply_chat_template's");
    let one_by_one: Vec<Vec<f32>> =
        ids.iter().map(|s| rm.logits(std::slice::from_ref(s)).expect("logits")[0].clone()).collect();
    close(name, "alone", &one_by_one, &alone);
    let batch = rm.logits(&ids).expect("logits");
    close(name, "batch vs alone", &batch, &alone);
    if let Some(b) = doc.get("batch") {
        let padded: Vec<Vec<f64>> = serde_json::from_value(b.clone()).expect("batch");
        close(name, "batch vs transformers' batch", &batch, &padded);
    }
}

#[test]
fn every_classifier_matches_transformers_on_cpu() {
    for name in FIXTURES {
        let rm = load_classifier::<Cpu>(&fixture(name), &Default::default(), DType::F32)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        // Frozen: qwen2-rm is stored in bf16 and keeps bf16 weights on the CPU (the scores
        // above are transformers' all the same); the others' f32 values stay f32.
        let kept = if name == "qwen2-rm" { DType::BF16 } else { DType::F32 };
        let layer = &rm.model.weights.layers[0];
        assert_eq!(layer.mlp.down_proj.weight.val().dtype(), kept, "{name}: down_proj");
        assert_eq!(rm.model.weights.embed_tokens.val().dtype(), kept, "{name}: embeddings");
        check(name, &rm);
    }
}

#[test]
fn heads_labels_and_pad_ids_are_read_as_transformers_does() {
    let load = |n: &str| load_classifier::<Cpu>(&fixture(n), &Default::default(), DType::F32).expect("load");
    let qwen2 = load("qwen2-rm");
    assert_eq!(qwen2.head.labels, ["helpfulness", "correctness", "verbosity"]);
    // The pad id ends every conversation: the token before it is scored.
    let ids = &oracle("qwen2-rm")["ids"][0];
    let ids: Vec<u32> = serde_json::from_value(ids.clone()).expect("ids");
    assert_eq!(qwen2.head.pad_token_id, ids.last().copied());
    assert_eq!(qwen2.scored_index(&ids), ids.len() - 2);
    let qwen3 = load("qwen3-rm");
    assert_eq!((qwen3.head.labels.len(), qwen3.head.pad_token_id), (2, None));
    assert_eq!(qwen3.scored_index(&ids), ids.len() - 1);
    assert_eq!(load("llama-rm").head.labels, ["LABEL_0"]);
}

#[test]
fn a_classifier_is_not_a_causal_lm_and_the_reverse() {
    let err = fuserl_model::checkpoint::load::<Cpu>(&fixture("llama-rm"), &Default::default(), DType::F32)
        .expect_err("refused")
        .to_string();
    assert!(err.contains("LlamaForSequenceClassification") && err.contains("sequence classifier"), "{err}");
    let causal = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models/qwen3");
    let err = load_classifier::<Cpu>(&causal, &Default::default(), DType::F32).expect_err("refused").to_string();
    assert!(err.contains("Qwen3ForCausalLM") && err.contains("Qwen3ForSequenceClassification"), "{err}");
}

#[test]
fn a_missing_score_head_is_named() {
    let dir = tempfile::tempdir().expect("tmp");
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("llama-rm").join(f), dir.path().join(f)).expect("copy");
    }
    // The causal fixture's weights have no `score.weight`.
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("llama-rm").join("config.json")).expect("read"))
            .expect("json");
    let causal = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models/llama-tied");
    let causal_config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(causal.join("config.json")).expect("read")).expect("json");
    for k in ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_key_value_heads"] {
        config[k] = causal_config[k].clone();
    }
    std::fs::write(dir.path().join("config.json"), config.to_string()).expect("write");
    std::fs::copy(causal.join("model.safetensors"), dir.path().join("model.safetensors")).expect("copy");
    let err = load_classifier::<Cpu>(dir.path(), &Default::default(), DType::F32).expect_err("refused").to_string();
    assert!(err.contains("missing tensor `score.weight`"), "{err}");
}

/// The same on wgpu (lavapipe in CI).
#[cfg(feature = "wgpu")]
#[test]
fn every_classifier_matches_transformers_on_wgpu() {
    use burn::backend::Wgpu;
    use burn::backend::wgpu::WgpuDevice;
    let device = WgpuDevice::default();
    for name in FIXTURES {
        let rm = load_classifier::<Wgpu>(&fixture(name), &device, DType::F32).unwrap_or_else(|e| panic!("{name}: {e}"));
        check(name, &rm);
    }
}
