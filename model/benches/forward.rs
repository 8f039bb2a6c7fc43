#![allow(clippy::print_stdout)] // A benchmark binary reports on stdout.
//! Forward throughput of SmolLM2-135M-Instruct on the CPU backend (logits for every position).
//!
//!     scripts/fetch-smollm2.sh
//!     cargo bench --profile dev --workspace --bench forward
//!
//! (The dev profile builds dependencies at opt-level 3; see Cargo.toml.) Same input as
//! scripts/bench_forward_torch.py: batch 1, 256 tokens from a fixed LCG. Prints tokens/s.

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::DType;
use fuserl_model::Cpu;
use fuserl_model::checkpoint::load;
use fuserl_model::llama::Inputs;

fn main() {
    let models = std::env::var_os("FUSERL_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/fuserl/models"));
    let dir = models.join("SmolLM2-135M-Instruct");
    let model = load::<Cpu>(&dir, &Default::default(), DType::F32)
        .unwrap_or_else(|e| panic!("{e} (run scripts/fetch-smollm2.sh)"));
    let (batch, len, runs) = (1usize, 256usize, 5usize);
    let mut state: u64 = 12345;
    let ids: Vec<Vec<u32>> = (0..batch)
        .map(|_| {
            (0..len)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((state >> 33) % 49152) as u32
                })
                .collect()
        })
        .collect();
    let inputs = Inputs::right_padded(&ids, 0);
    let run = || {
        let logits = model.forward(&inputs);
        // Bring one value to the host so that the work is done.
        let _ = logits.narrow(2, 0, 1).into_data();
    };
    run();
    let start = Instant::now();
    for _ in 0..runs {
        run();
    }
    let secs = start.elapsed().as_secs_f64() / runs as f64;
    let tokens = (batch * len) as f64;
    // Where the time goes: the decoder layers (hidden states) against the LM head.
    let start = Instant::now();
    for _ in 0..runs {
        let h = model.hidden(&inputs, &inputs.valid, None);
        let _ = h.narrow(2, 0, 1).into_data();
    }
    let hidden_secs = start.elapsed().as_secs_f64() / runs as f64;
    println!(
        "  of which decoder layers {:.1} ms, LM head and the rest {:.1} ms",
        hidden_secs * 1e3,
        (secs - hidden_secs) * 1e3
    );
    println!(
        "fuserl (burn flex, f32): batch {batch} x {len} tokens: {:.1} ms per forward, {:.0} tokens/s",
        secs * 1e3,
        tokens / secs
    );
}
