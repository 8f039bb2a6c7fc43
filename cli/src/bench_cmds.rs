//! `fuserl bench`: what one training step and generation cost on a device, as JSON lines (what
//! `scripts/gpu-check.sh` records next to its PyTorch peers, and what a user runs to see how a
//! GPU does before writing a recipe for it).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use burn::backend::Autodiff;
use clap::{Args, Subcommand};
use fuserl_backends::{LogProbBackend, OnBackend};
use fuserl_core::backend::{DType, LogProbPath};
use fuserl_core::data::{ChatMessage, CompletionId, Example, ExampleSequence, Origin};
use fuserl_core::registry::BuildContext;
use fuserl_model::chat::ChatTokenizer;
use fuserl_model::checkpoint::{load, load_frozen};
use fuserl_model::generate::{BENCH_PROMPTS as PROMPTS, GenerateConfig, generate_seeded};
use fuserl_train::data::{SeqTokens, TrainExample};
use fuserl_train::trainer::{StepSettings, inference_model, new_optimizer, optimizer_step, reference_logps};

use crate::model_cmds::{GpuArgs, bad_input, model_error, parse_device};

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Optimiser steps of a preference objective (or SFT) on a model, with random token ids:
    /// seconds per step, tokens/s, step-0 loss and gradient norm, peak memory (the CPU's
    /// resident memory; GPUs: measured from outside, see scripts/gpu-check.sh).
    #[command(
        after_help = "Example:\n  fuserl bench train-step --model models/SmolLM2-135M-Instruct --pairs 2 --tokens 256 --steps 2"
    )]
    TrainStep(TrainStepArgs),
    /// Greedy generation with the KV cache (what the `local` source does): new tokens/s at a batch
    /// size, on prompts of its own.
    #[command(after_help = "Example:\n  fuserl bench generate --model models/SmolLM2-135M-Instruct --batch 8")]
    Generate(GenerateBenchArgs),
}

#[derive(Debug, Args)]
pub struct TrainStepArgs {
    /// Hugging Face checkpoint folder (config.json and weights).
    #[arg(long)]
    model: PathBuf,
    #[arg(help = crate::device_help(), long, default_value = "cpu")]
    device: String,
    /// Compute type: f32, bf16 (mixed precision: f32 master weights) or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// The objective: a built-in's kind (dpo, simpo, sft, ...).
    #[arg(long, default_value = "dpo")]
    objective: String,
    /// Examples a step (pairs for the pairwise objectives).
    #[arg(long, default_value_t = 8, allow_negative_numbers = true)]
    pairs: usize,
    /// Tokens of every sequence (a quarter prompt, the rest response).
    #[arg(long, default_value_t = 512, allow_negative_numbers = true)]
    tokens: usize,
    /// Timed steps after one untimed warm-up step.
    #[arg(long, default_value_t = 3, allow_negative_numbers = true)]
    steps: usize,
    /// Gradient checkpointing by layer (the default of a recipe's stages).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    checkpointing: bool,
    /// The log-prob path: fused (the default) or naive (full logits).
    #[arg(long, default_value = "fused")]
    logprobs: String,
    /// LoRA: train rank-R adapters on every linear layer (PEFT's `LoraConfig(r=R,
    /// lora_alpha=2R, target_modules="all-linear")`), the base frozen in the compute type; 0
    /// trains every weight.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    lora: u32,
    /// QLoRA, with `--lora`: keep the frozen base quantised (`[target.lora] quantize_base`): gguf
    /// (a folder from `fuserl convert gguf --keep-quantized`), q4_k, q5_k, q6_k or q8_0.
    #[arg(long)]
    quantize_base: Option<String>,
    #[command(flatten)]
    gpu: GpuArgs,
}

#[derive(Debug, Args)]
pub struct GenerateBenchArgs {
    /// Hugging Face checkpoint folder (config.json, weights and tokenizer).
    #[arg(long)]
    model: PathBuf,
    #[arg(help = crate::device_help(), long, default_value = "cpu")]
    device: String,
    /// Compute type: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Prompts generated at once.
    #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
    batch: usize,
    /// New tokens at most per prompt (greedy; a row stops at its end-of-sequence token).
    #[arg(long, default_value_t = 128, allow_negative_numbers = true)]
    new_tokens: usize,
    /// Timed runs after one untimed warm-up (the median is reported).
    #[arg(long, default_value_t = 3, allow_negative_numbers = true)]
    runs: usize,
    #[command(flatten)]
    gpu: GpuArgs,
}

fn parse_dtype(s: &str) -> anyhow::Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::Bf16),
        "f16" => Ok(DType::F16),
        _ => Err(bad_input(format!("--dtype {s}: expected f32, bf16 or f16"))),
    }
}

pub fn bench(cmd: &BenchCommand) -> anyhow::Result<()> {
    let (device, dtype, gpu) = match cmd {
        BenchCommand::TrainStep(a) => (&a.device, &a.dtype, &a.gpu),
        BenchCommand::Generate(a) => (&a.device, &a.dtype, &a.gpu),
    };
    let (dev, dt) = (parse_device(device)?, parse_dtype(dtype)?);
    gpu.apply();
    let fusion = gpu.fusion;
    let line = match cmd {
        BenchCommand::TrainStep(a) => {
            fuserl_backends::on_backend_with(dev, 0, dt, fusion, TrainStep { args: a, dtype: dt })
        }
        BenchCommand::Generate(a) => {
            fuserl_backends::on_backend_with(dev, 0, dt, fusion, Generate { args: a, dtype: dt })
        }
    }
    .map_err(|e| bad_input(format!("--device {device}: {e}")))??;
    println!("{line}");
    Ok(())
}

/// `[target.lora]` as `--lora` and `--quantize-base` ask (read as a recipe's table is).
fn lora_config(a: &TrainStepArgs) -> anyhow::Result<Option<fuserl_recipe::LoraConfig>> {
    if a.lora == 0 {
        if let Some(q) = &a.quantize_base {
            return Err(bad_input(format!("--quantize-base {q}: QLoRA needs --lora R (the adapters' rank)")));
        }
        return Ok(None);
    }
    let mut table = toml::Table::new();
    table.insert("r".into(), i64::from(a.lora).into());
    table.insert("alpha".into(), (2.0 * f64::from(a.lora)).into());
    table.insert("target_modules".into(), "all-linear".into());
    if let Some(q) = &a.quantize_base {
        table.insert("quantize_base".into(), q.clone().into());
    }
    fuserl_core::config::parse_table(&table)
        .map(Some)
        .map_err(|e| bad_input(format!("--lora, --quantize-base (as `[target.lora]`): {e}")))
}

/// A 64-bit LCG's token ids below `vocab` (the same stream on every machine), the padding id
/// replaced by the next one: transformers' embeddings give the padding id's row no gradient
/// (`nn.Embedding(padding_idx)`), fuserl's do, so the PyTorch peer would differ wherever it
/// appears.
fn lcg_ids(state: &mut u64, n: usize, vocab: usize, pad: Option<u64>) -> Vec<u32> {
    (0..n)
        .map(|_| {
            *state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let id = (*state >> 33) % vocab as u64;
            (if Some(id) == pad { (id + 1) % vocab as u64 } else { id }) as u32
        })
        .collect()
}

/// `pad_token_id` of a checkpoint's config.json, if it has one.
fn pad_id(model: &std::path::Path) -> Option<u64> {
    let text = fuserl_core::paths::read_regular_string(&model.join("config.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?.get("pad_token_id")?.as_u64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

struct TrainStep<'a> {
    args: &'a TrainStepArgs,
    dtype: DType,
}

impl OnBackend for TrainStep<'_> {
    type Output = anyhow::Result<serde_json::Value>;

    fn run<B: LogProbBackend>(self, device: B::Device) -> Self::Output {
        let a = self.args;
        let compute = fuserl_backends::burn_dtype(self.dtype);
        let lora = lora_config(a)?;
        let mut model = match &lora {
            // As a recipe's stage loads its target: every weight trained in f32 (the master
            // copy), or with LoRA the base frozen in the compute type (or quantised) and the
            // adapters trained in f32.
            None => load::<Autodiff<B>>(&a.model, &device, burn::tensor::DType::F32).map_err(model_error)?,
            Some(l) => fuserl_train::trainer::load_lora_target::<Autodiff<B>>(
                &a.model,
                &device,
                (compute, burn::tensor::DType::F32),
                l,
                0,
            )
            .map_err(model_error)?,
        };
        model.dtype = compute;
        fuserl_backends::release_freed_memory();
        let vocab = model.config.vocab_size;
        let pad = pad_id(&a.model);
        let registry = fuserl_builtin::registry()?;
        let mut table = toml::Table::new();
        table.insert("kind".into(), a.objective.clone().into());
        let objective = registry
            .build_objective_from(&table, &BuildContext::default())
            .map_err(|e| bad_input(format!("--objective {}: {e}", a.objective)))?
            .component;
        let per_example = if objective.name() == "sft" { 1 } else { 2 };
        let prompt_len = (a.tokens / 4).max(1);
        let response_len = a.tokens.saturating_sub(prompt_len).max(1);
        let mut state = 2024u64;
        let mut examples = Vec::with_capacity(a.pairs);
        for e in 0..a.pairs {
            let prompt = lcg_ids(&mut state, prompt_len, vocab, pad);
            let mut seqs = Vec::new();
            let mut sequences = Vec::new();
            for i in 0..per_example {
                let id = CompletionId { prompt_id: format!("p{e}"), source: format!("s{i}"), sample_index: 0 };
                seqs.push(SeqTokens {
                    prompt: prompt.clone(),
                    response: lcg_ids(&mut state, response_len, vocab, pad),
                });
                sequences.push(ExampleSequence {
                    completion: id,
                    origin: Origin { adapter: "bench".into(), file: None, line: None },
                    reward: 1.0 - i as f64,
                });
            }
            let example = Example {
                prompt_id: format!("p{e}"),
                objective: objective.name().to_owned(),
                weight: 1.0,
                sequences,
                notes: Default::default(),
            };
            examples.push(TrainExample { example, seqs });
        }
        let mut config: fuserl_recipe::StageConfig = fuserl_core::config::parse_table(&toml::Table::new())?;
        config.batch_size = a.pairs as u32;
        config.gradient_checkpointing = a.checkpointing;
        // The reference is the model itself at step 0 (as FusePO's is the FuseSFT model), its
        // log-probs cached before the first step (not timed).
        let reference: Option<HashMap<String, f64>> = objective
            .needs_reference()
            .then(|| reference_logps(&inference_model(&model), &examples, a.pairs * 2, LogProbPath::Fused));
        let path = match a.logprobs.as_str() {
            "fused" => LogProbPath::Fused,
            "naive" => LogProbPath::Naive,
            other => return Err(bad_input(format!("--logprobs {other}: expected fused or naive"))),
        };
        let mut optim = new_optimizer(&config);
        let picked: Vec<&TrainExample> = examples.iter().collect();
        let settings = StepSettings {
            objective: objective.as_ref(),
            reference: reference.as_ref(),
            config: &config,
            progress: 0.0,
            lr: 1e-6,
            logprobs: path,
            loss_scale: 1.0,
            dropout_key: 0,
        };
        fuserl_backends::memory::reset_peak();
        let mut times = Vec::with_capacity(a.steps);
        let mut first = None;
        let parameters = fuserl_train::plan::parameters(&model.config);
        // Counted on the model, not planned.
        let trained = fuserl_train::trainer::trained_parameters(&model);
        for step in 0..=a.steps {
            let start = Instant::now();
            let (next, out) = optimizer_step(model, &mut optim, &picked, settings)?;
            B::sync(&device).map_err(|e| anyhow::anyhow!("synchronising the device: {e:?}"))?;
            let secs = start.elapsed().as_secs_f64();
            model = next;
            if step == 0 {
                first = Some(out);
            } else {
                times.push(secs);
            }
        }
        let first = first.expect("step 0 ran");
        let tokens = a.pairs * per_example * a.tokens;
        let secs = median(times.clone());
        Ok(serde_json::json!({
            "bench": "train-step",
            "objective": objective.name(),
            "device": a.device,
            "dtype": a.dtype,
            "fusion": a.gpu.fusion_on(&a.device),
            // The CPU runs the tiles whatever was asked.
            "attention": a.gpu.attention_on(&a.device),
            "model": a.model.display().to_string(),
            "parameters": parameters,
            "lora_rank": a.lora,
            "quantize_base": a.quantize_base,
            "trained_parameters": trained,
            "sequences": a.pairs * per_example,
            "tokens_per_sequence": a.tokens,
            "gradient_checkpointing": a.checkpointing,
            "step_seconds": times,
            "median_step_seconds": secs,
            "tokens_per_second": tokens as f64 / secs,
            // 6 flops a parameter a token (forward 2, backward 4), the usual MFU numerator.
            "model_flops_per_second": 6.0 * parameters as f64 * tokens as f64 / secs,
            "step0_loss": first.loss,
            "step0_grad_norm": first.grad_norm,
            "peak_resident_bytes": fuserl_backends::memory::peak_resident(),
        }))
    }
}

struct Generate<'a> {
    args: &'a GenerateBenchArgs,
    dtype: DType,
}

impl OnBackend for Generate<'_> {
    type Output = anyhow::Result<serde_json::Value>;

    fn run<B: LogProbBackend>(self, device: B::Device) -> Self::Output {
        let a = self.args;
        let model =
            load_frozen::<B>(&a.model, &device, fuserl_backends::burn_dtype(self.dtype)).map_err(model_error)?;
        let tok = ChatTokenizer::load(&a.model, None).map_err(model_error)?;
        let cfg = GenerateConfig { max_new_tokens: a.new_tokens, temperature: 0.0, ..GenerateConfig::default() };
        let prompts: Vec<Vec<u32>> = (0..a.batch.max(1))
            .map(|i| tok.prompt_ids(&[ChatMessage::user(PROMPTS[i % PROMPTS.len()])], usize::MAX).map(|(ids, _)| ids))
            .collect::<Result<_, _>>()
            .map_err(model_error)?;
        let seeds: Vec<u64> = (0..prompts.len() as u64).collect();
        let mut runs = Vec::new();
        for run in 0..=a.runs.max(1) {
            let start = Instant::now();
            let out = generate_seeded(&model, &tok, &prompts, &cfg, &seeds).map_err(model_error)?;
            let secs = start.elapsed().as_secs_f64();
            if run > 0 {
                runs.push((secs, out.iter().map(|g| g.ids.len()).sum::<usize>()));
            }
        }
        runs.sort_by(|x, y| x.0.total_cmp(&y.0));
        let (secs, tokens) = runs[runs.len() / 2];
        Ok(serde_json::json!({
            "bench": "generate",
            "device": a.device,
            "dtype": a.dtype,
            "fusion": a.gpu.fusion_on(&a.device),
            // The CPU runs the tiles whatever was asked.
            "attention": a.gpu.attention_on(&a.device),
            "model": a.model.display().to_string(),
            "batch": prompts.len(),
            "new_tokens": tokens,
            "seconds": secs,
            "tokens_per_second": tokens as f64 / secs,
            "run_seconds": runs.iter().map(|r| r.0).collect::<Vec<_>>(),
        }))
    }
}
