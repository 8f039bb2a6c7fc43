//! Frozen models keep a checkpoint's bf16 weights in bf16 on the CPU (`checkpoint::load_frozen`,
//! issue #35): the linear products widen them as they read them (`fuserl_kernels::cpu_matmul`),
//! so the model computes what the same checkpoint loaded in f32 computes: log-probs within 1e-5
//! (the products' sums in another order) and the same greedy tokens, through the KV cache, for
//! one prompt and for a batch. An untied head (Qwen2, stored in bf16) and a tied one (tiny-chat
//! saved in bf16); a checkpoint whose values are not bf16 stays f32.

use std::path::{Path, PathBuf};

use burn::tensor::DType;
use fuserl_model::Cpu;
use fuserl_model::checkpoint::{load, load_frozen, save_as};
use fuserl_model::llama::{Inputs, LlamaModel};
use fuserl_model::logprobs::sequence_token_logprobs;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// `steps` greedy tokens for each prompt (all the same length), through the cache.
fn greedy(model: &LlamaModel<Cpu>, prompts: &[Vec<u32>], steps: usize) -> Vec<Vec<u32>> {
    let mut cache = model.empty_cache(prompts.len());
    let mut inputs = Inputs::right_padded(prompts, 0);
    let mut key_valid = inputs.valid.clone();
    let mut out = vec![Vec::new(); prompts.len()];
    for step in 0..steps {
        let hidden = model.hidden(&inputs, &key_valid, Some(&mut cache));
        let t = hidden.dims()[1];
        let vocab = model.config.vocab_size;
        let logits: Vec<f32> = model.logits(hidden.narrow(1, t - 1, 1)).into_data().iter::<f32>().collect();
        let next: Vec<u32> = logits
            .chunks(vocab)
            .map(|row| {
                row.iter().enumerate().fold((0, f32::MIN), |m, (i, &v)| if v > m.1 { (i, v) } else { m }).0 as u32
            })
            .collect();
        let pos = prompts[0].len() + step;
        for (o, &n) in out.iter_mut().zip(&next) {
            o.push(n);
        }
        inputs = Inputs {
            ids: next.iter().map(|&n| vec![n]).collect(),
            positions: vec![vec![pos]; prompts.len()],
            valid: vec![vec![true]; prompts.len()],
        };
        key_valid.iter_mut().for_each(|k| k.push(true));
    }
    out
}

fn same_model(dir: &Path, what: &str, kept: DType) {
    let device = Default::default();
    let full = load::<Cpu>(dir, &device, DType::F32).expect("f32");
    let frozen = load_frozen::<Cpu>(dir, &device, DType::F32).expect("frozen");
    let w = &frozen.weights;
    let layer = &w.layers[0];
    for (name, dtype) in [
        ("q_proj", layer.self_attn.q_proj.weight.val().dtype()),
        ("down_proj", layer.mlp.down_proj.weight.val().dtype()),
        ("embeddings", w.embed_tokens.val().dtype()),
    ] {
        assert_eq!(dtype, kept, "{what}: {name}");
    }
    if let Some(head) = &w.lm_head {
        assert_eq!(head.weight.val().dtype(), kept, "{what}: lm_head");
    }
    assert_eq!(layer.input_layernorm.weight.val().dtype(), DType::F32, "{what}: norms stay f32");
    let v = full.config.vocab_size as u32;
    let seqs: Vec<Vec<u32>> = vec![(0..24).map(|i| (i * 7919 + 5) % v).collect(), vec![1, v - 1, 7, v / 2, 3]];
    let (a, b) =
        (sequence_token_logprobs(&full, &seqs).expect("f32"), sequence_token_logprobs(&frozen, &seqs).expect("frozen"));
    let worst = a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    assert!(worst <= 1e-5, "{what}: log-probs differ by {worst}");
    for prompts in [vec![vec![3, 17, 42, 5]], vec![vec![3, 17, 42, 5], vec![9, 8, 7, 6], vec![11, 2, 30, 4]]] {
        assert_eq!(
            greedy(&frozen, &prompts, 12),
            greedy(&full, &prompts, 12),
            "{what}: greedy, {} prompts",
            prompts.len()
        );
    }
}

#[test]
fn frozen_models_keep_bf16_weights_and_compute_the_same() {
    same_model(&repo("fixtures/models/qwen2-bf16"), "qwen2 (bf16 file, untied head)", DType::BF16);
    // tiny-chat's f32 values are not bf16: they stay f32.
    same_model(&repo("checkpoints/tiny-chat"), "tiny-chat (f32 values)", DType::F32);
    // The same model written in bf16 (tied head: the embeddings' rows as the head).
    let tiny = load::<Cpu>(&repo("checkpoints/tiny-chat"), &Default::default(), DType::F32).expect("tiny");
    let dir = tempfile::tempdir().expect("tmp");
    save_as(&tiny, dir.path(), 1 << 30, Some(&repo("checkpoints/tiny-chat")), DType::BF16).expect("save");
    same_model(dir.path(), "tiny-chat saved in bf16 (tied head)", DType::BF16);
}
