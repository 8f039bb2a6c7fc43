#![allow(clippy::print_stdout)] // A benchmark binary reports on stdout.
//! Generation throughput of SmolLM2-135M-Instruct on the CPU backend: what the `local` source
//! does (batched KV-cache generation, one sampler per row), greedy and sampled (temperature
//! 0.8, no top-k or top-p), 128 new tokens at most, batch 1, 8 and 32 (the 8 prompts repeated).
//!
//!     scripts/fetch-smollm2.sh
//!     cargo bench --profile dev --workspace --bench generate
//!
//! Same prompts, chat template and settings as scripts/bench_generate_torch.py; greedy, both
//! produce the same tokens and stop at the same EOS; sampled, each counts the tokens it made.
//! Prints one line per setting and batch size: new tokens, seconds (median of 3 after a
//! warm-up), tokens/s.

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::DType;
use fuserl_core::data::ChatMessage;
use fuserl_model::Cpu;
use fuserl_model::chat::ChatTokenizer;
use fuserl_model::checkpoint::{load, load_frozen};
use fuserl_model::generate::{BENCH_PROMPTS as PROMPTS, GenerateConfig, generate_seeded};

fn main() {
    let models = std::env::var_os("FUSERL_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/fuserl/models"));
    let dir = models.join("SmolLM2-135M-Instruct");
    // As the `local` source loads its model (`load_frozen`: a checkpoint's bf16 weights kept in
    // bf16, the same products); FUSERL_BENCH_WEIGHTS=f32 widens every weight to f32 at load.
    let f32_weights = std::env::var("FUSERL_BENCH_WEIGHTS").is_ok_and(|w| w == "f32");
    let model = if f32_weights {
        load::<Cpu>(&dir, &Default::default(), DType::F32)
    } else {
        load_frozen::<Cpu>(&dir, &Default::default(), DType::F32)
    }
    .unwrap_or_else(|e| panic!("{e} (run scripts/fetch-smollm2.sh)"));
    let weights = if f32_weights { "f32 weights" } else { "weights as the local source keeps them" };
    let tok = ChatTokenizer::load(&dir, None).expect("tokenizer");
    // FUSERL_BENCH_BATCHES=1,8 limits the batch sizes (default 1, 8 and 32).
    let batches: Vec<usize> = std::env::var("FUSERL_BENCH_BATCHES")
        .unwrap_or_else(|_| "1,8,32".into())
        .split(',')
        .map(|b| b.trim().parse().expect("FUSERL_BENCH_BATCHES: batch sizes separated by commas"))
        .collect();
    let greedy = GenerateConfig { max_new_tokens: 128, temperature: 0.0, ..GenerateConfig::default() };
    let sampled = GenerateConfig { temperature: 0.8, ..greedy.clone() };
    // FUSERL_BENCH_MODES=greedy (or sampled) runs one of the two.
    let modes = std::env::var("FUSERL_BENCH_MODES").unwrap_or_else(|_| "greedy,sampled".into());
    for (mode, cfg) in [("greedy", &greedy), ("sampled", &sampled)] {
        if !modes.split(',').any(|m| m.trim() == mode) {
            continue;
        }
        for &batch in &batches {
            let prompts: Vec<Vec<u32>> = (0..batch)
                .map(|i| {
                    tok.prompt_ids(&[ChatMessage::user(PROMPTS[i % PROMPTS.len()])], usize::MAX).expect("prompt").0
                })
                .collect();
            let seeds: Vec<u64> = (0..batch as u64).collect();
            let run = || {
                let start = Instant::now();
                let out = generate_seeded(&model, &tok, &prompts, cfg, &seeds).expect("generate");
                (start.elapsed().as_secs_f64(), out.iter().map(|g| g.ids.len()).sum::<usize>())
            };
            run();
            let mut times: Vec<(f64, usize)> = (0..3).map(|_| run()).collect();
            times.sort_by(|a, b| a.0.total_cmp(&b.0));
            let (secs, tokens) = times[1];
            println!(
                "fuserl (burn flex, f32, {weights}): {mode} batch {batch}: {tokens} new tokens in {secs:.2} s, {:.1} tokens/s (runs: {})",
                tokens as f64 / secs,
                times.iter().map(|t| format!("{:.2}", t.0)).collect::<Vec<_>>().join(" ")
            );
        }
    }
}
