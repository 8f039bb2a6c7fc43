#![allow(clippy::print_stdout)] // A benchmark binary reports on stdout.
//! One DPO optimiser step on SmolLM2-135M-Instruct, CPU: 2 pairs, every sequence 64 prompt +
//! 192 response tokens (fixed LCG ids), reference log-probs precomputed (not timed), f32, AdamW.
//! Same work as scripts/bench_dpo_step_trl.py. Prints the median time of the steps after the
//! first (FUSERL_BENCH_STEPS of them, default 3; the first warms up) and the process's peak
//! resident memory.
//!
//!     scripts/fetch-smollm2.sh
//!     cargo bench --profile dev --workspace --bench dpo_step [-- naive]
//!
//! `naive` computes the log-probs through full logits (`[backend] logprobs = "naive"`); the
//! default is the fused projection + log-prob. `checkpointing` recomputes activations in backward
//! (`gradient_checkpointing = true`: by decoder layer). `lora` trains LoRA adapters (r 16, alpha
//! 32, every linear layer: PEFT's `LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")`)
//! on the frozen model instead of every weight.
//!
//! `qlora` does the `lora` step on Qwen2.5-Coder-0.5B-Instruct's Q4_K_M GGUF kept in its blocks
//! (`[target.lora] quantize_base = "gguf"`; scripts/fetch-qwen-coder.sh writes the folder), and
//! `dequantised` on the same file dequantised to an f32 base at load: the peer issue #31 measures
//! QLoRA's memory against (scripts/bench-dpo-step.sh runs both).
//!
//! `bf16` computes in bf16 over the f32 master weights (`[backend] dtype = "bf16"`: mixed
//! precision), the peer of TRL's default bf16 autocast (issue #35 measures it on CPUs with AMX).
//!
//! Besides the process's peak, the peak since the model was loaded (the training's, with the
//! model resident: loading reads the checkpoint file whole, which a LoRA step's peak is below).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::DType;
use fuserl_core::backend::LogProbPath;
use fuserl_core::data::{CompletionId, Example, ExampleSequence, Origin};
use fuserl_core::registry::BuildContext;
use fuserl_model::checkpoint::{BaseQuant, load_with};
use fuserl_train::data::{SeqTokens, TrainExample, completion_key};
use fuserl_train::trainer::{StepSettings, TrainBackend, new_optimizer, optimizer_step};

/// The process's peak resident memory in MiB (NaN where the system does not say).
fn peak_rss_mb() -> f64 {
    fuserl_backends::memory::peak_resident().map_or(f64::NAN, |b| b as f64 / f64::from(1 << 20))
}

fn main() {
    // As `fuserl` does; a setting of the user's (MALLOC_* variables) turns it off.
    let kept = fuserl_backends::keep_freed_memory();
    bench::<TrainBackend>(if kept { "freed memory kept" } else { "default malloc settings" });
}

fn bench<
    B: burn::tensor::backend::AutodiffBackend<InnerBackend: fuserl_kernels::LogProbBackend>
        + fuserl_kernels::LogProbBackend,
>(
    malloc: &str,
) {
    let models = std::env::var_os("FUSERL_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/fuserl/models"));
    let arg = |name: &str| std::env::args().any(|a| a == name);
    let (qlora, dequantised) = (arg("qlora"), arg("dequantised"));
    let (dir, quant, fetch) = if qlora || dequantised {
        let quant = if qlora { BaseQuant::Gguf } else { BaseQuant::None };
        (models.join("Qwen2.5-Coder-0.5B-Instruct-Q4_K_M"), quant, "scripts/fetch-qwen-coder.sh")
    } else {
        (models.join("SmolLM2-135M-Instruct"), BaseQuant::None, "scripts/fetch-smollm2.sh")
    };
    let lora = arg("lora") || qlora || dequantised;
    let compute = if arg("bf16") { DType::BF16 } else { DType::F32 };
    // As `fuserl train` loads the target: trained weights in f32 (the master copy) computing in
    // `compute`; with LoRA the frozen base in `compute`, the adapters in f32.
    let loaded = if lora {
        let quant = if quant == BaseQuant::Gguf { "\nquantize_base = \"gguf\"" } else { "" };
        let table = format!("r = 16\nalpha = 32\ntarget_modules = \"all-linear\"{quant}");
        let config: fuserl_recipe::LoraConfig =
            fuserl_core::config::parse_table(&toml::from_str(&table).expect("toml")).expect("lora");
        fuserl_train::trainer::load_lora_target::<B>(&dir, &Default::default(), (compute, DType::F32), &config, 0)
    } else {
        load_with::<B>(&dir, &Default::default(), DType::F32, quant)
    };
    let mut model = loaded.unwrap_or_else(|e| panic!("{e} (run {fetch})"));
    model.dtype = compute;
    let process_peak = peak_rss_mb();
    fuserl_backends::release_freed_memory();
    fuserl_backends::memory::reset_peak();
    let mut state: u64 = 2024;
    let mut ids = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 33) % 49152) as u32
            })
            .collect()
    };
    let mut reference = HashMap::new();
    let mut examples = Vec::new();
    for e in 0..2 {
        let prompt = ids(64);
        let mut seqs = Vec::new();
        let mut sequences = Vec::new();
        for i in 0..2 {
            let id = CompletionId { prompt_id: format!("p{e}"), source: "s".into(), sample_index: i };
            reference.insert(completion_key(&id), -400.0);
            seqs.push(SeqTokens { prompt: prompt.clone(), response: ids(192) });
            sequences.push(ExampleSequence {
                completion: id,
                origin: Origin { adapter: "bench".into(), file: None, line: None },
                reward: 1.0 - f64::from(i),
            });
        }
        let example = Example {
            prompt_id: format!("p{e}"),
            objective: "dpo".into(),
            weight: 1.0,
            sequences,
            notes: Default::default(),
        };
        examples.push(TrainExample { example, seqs });
    }
    let registry = fuserl_builtin::registry().expect("registry");
    let mut t = toml::Table::new();
    t.insert("kind".into(), "dpo".into());
    let dpo = registry.build_objective_from(&t, &BuildContext::default()).expect("dpo").component;
    let mut config: fuserl_recipe::StageConfig =
        fuserl_core::config::parse_table(&toml::Table::new()).expect("defaults");
    config.batch_size = 2;
    config.gradient_checkpointing = std::env::args().any(|a| a == "checkpointing");
    let mode = if config.gradient_checkpointing { "gradient checkpointing" } else { "no checkpointing" };
    let mut optim = new_optimizer(&config);
    let picked: Vec<&TrainExample> = examples.iter().collect();
    let logprobs = if std::env::args().any(|a| a == "naive") { LogProbPath::Naive } else { LogProbPath::Fused };
    let settings = StepSettings {
        objective: dpo.as_ref(),
        reference: Some(&reference),
        config: &config,
        progress: 0.0,
        lr: 1e-6,
        logprobs,
        loss_scale: 1.0,
        dropout_key: 0,
    };
    let (mut model, first) = optimizer_step(model, &mut optim, &picked, settings).expect("warm-up step");
    let steps: usize = std::env::var("FUSERL_BENCH_STEPS").ok().and_then(|v| v.parse().ok()).unwrap_or(3).max(1);
    let mut times = Vec::with_capacity(steps);
    let mut out = None;
    for _ in 0..steps {
        let start = Instant::now();
        let (next, step) = optimizer_step(model, &mut optim, &picked, settings).expect("step");
        times.push(start.elapsed().as_secs_f64());
        (model, out) = (next, Some(step));
    }
    let each: Vec<String> = times.iter().map(|t| format!("{t:.2}")).collect();
    times.sort_by(f64::total_cmp);
    let secs = times[times.len() / 2];
    let out = out.expect("at least one step");
    let what = match (qlora, dequantised, lora) {
        (true, _, _) => "QLoRA r 16 all-linear on Qwen2.5-Coder-0.5B Q4_K_M kept in its blocks",
        (_, true, _) => "LoRA r 16 all-linear on Qwen2.5-Coder-0.5B Q4_K_M dequantised to f32",
        (_, _, true) => "LoRA r 16 all-linear",
        _ => "every weight",
    };
    println!(
        "fuserl (burn flex autodiff, {}, {what}, {:?} log-probs, {mode}, {malloc}): one DPO step, 2 pairs x 256 tokens: {:.2} s (median of {}; timed steps: {}), loss {:.4} at the first step and {:.4} at the last, peak RSS {:.0} MiB since the model was loaded ({:.0} MiB loading it)",
        match compute {
            // Asked after the steps: the first bf16 product decided it.
            DType::BF16 if fuserl_kernels::cpu_amx::enabled() => "bf16 compute over f32 master weights, on AMX tiles",
            DType::BF16 => "bf16 compute over f32 master weights",
            _ => "f32",
        },
        logprobs,
        secs,
        steps,
        each.join(", "),
        first.loss,
        out.loss,
        peak_rss_mb(),
        process_peak
    );
}
