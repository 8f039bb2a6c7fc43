//! One trainer for both stages, driven by the objective plugins: examples are batched by length
//! and padded to the batch maximum; the model gives each sequence's log-prob (sum over response
//! tokens); the objective returns the loss and `dL/dlogp` per sequence; the trainer
//! backpropagates `sum_i dL/dlogp_i * logp_i`. AdamW, warm-up + constant/linear/cosine schedule,
//! gradient accumulation, clipping by global norm (reported before clipping), checkpoints every
//! N steps (model, optimiser, step) written atomically, resume from the last one.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param, ParamId};
use burn::optim::{GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Tensor, TensorData};
use fuserl_core::data::StageName;
use fuserl_core::extension::{ObjectiveBatch, PreferenceObjective};
use fuserl_kernels::LogProbBackend;
use fuserl_model::llama::{Llama, LlamaModel};
use fuserl_model::logprobs::hidden_logprobs;
use fuserl_recipe::{LogProbPath, StageConfig};

use crate::adamw::{AdamW, Optim};
use crate::checkpoint::{self, CheckpointState};
use crate::data::{SeqTokens, TrainExample, completion_key, padded_batch, score_targets};
use crate::error::{Result, TrainError};
use crate::layerwise::layerwise_backward;
use crate::schedule::learning_rate;
use fuserl_core::paths::Shown;
use fuserl_io::artifacts::MetricsLine;

pub use crate::TrainBackend;

/// Log-prob of each sequence (sum over response tokens), differentiable, and the token counts.
///
/// # Shapes
/// `seqs: S sequences` -> `[S]`
pub fn sequence_logps<B: LogProbBackend>(
    model: &LlamaModel<B>,
    seqs: &[SeqTokens],
    path: LogProbPath,
) -> (Tensor<B, 1>, Vec<f64>) {
    let inputs = padded_batch(seqs);
    let (s, t) = (seqs.len(), inputs.ids[0].len());
    let hidden = model.hidden(&inputs, &inputs.valid, None);
    let targets = score_targets(seqs, &inputs, &model.device());
    let picked = hidden_logprobs(model, hidden.narrow(1, 0, t - 1), targets, path);
    let logps = picked.sum_dim(1).reshape([s]);
    (logps, seqs.iter().map(|q| q.response.len() as f64).collect())
}

/// Reference log-probs of every sequence of `examples` under `model` (no gradient), keyed by
/// completion, computed in batches.
pub fn reference_logps<B: LogProbBackend>(
    model: &LlamaModel<B>,
    examples: &[TrainExample],
    batch: usize,
    path: LogProbPath,
) -> HashMap<String, f64> {
    let mut seen: HashMap<String, SeqTokens> = HashMap::new();
    for e in examples {
        for (seq, tokens) in e.example.sequences.iter().zip(&e.seqs) {
            seen.entry(completion_key(&seq.completion)).or_insert_with(|| tokens.clone());
        }
    }
    let mut keys: Vec<String> = seen.keys().cloned().collect();
    keys.sort();
    let mut out = HashMap::new();
    for chunk in keys.chunks(batch.max(1)) {
        let seqs: Vec<SeqTokens> = chunk.iter().map(|k| seen[k].clone()).collect();
        let (logps, _) = sequence_logps(model, &seqs, path);
        let values: Vec<f32> = logps.into_data().iter::<f32>().collect();
        for (k, v) in chunk.iter().zip(values) {
            out.insert(k.clone(), f64::from(v));
        }
    }
    out
}

/// What the caller sees after each optimiser step.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Stage.
    pub stage: StageName,
    /// Steps done.
    pub step: u64,
    /// Steps in the stage.
    pub total: u64,
    /// Loss of the step.
    pub loss: f64,
}

/// Everything one stage needs.
#[derive(Debug)]
pub struct Stage<'a> {
    /// Which stage.
    pub name: StageName,
    /// Its settings.
    pub config: &'a StageConfig,
    /// Its objective.
    pub objective: &'a dyn PreferenceObjective,
    /// Its examples, tokenized.
    pub examples: Vec<TrainExample>,
    /// Reference log-probs by completion key, when the objective needs them.
    pub reference: Option<HashMap<String, f64>>,
    /// Seed of the data order.
    pub seed: u64,
    /// Folder for the stage's checkpoints.
    pub dir: PathBuf,
    /// The run's `metrics.jsonl`.
    pub metrics: PathBuf,
    /// A folder for TensorBoard event files of the same metrics (`[run] report_to`).
    pub tensorboard: Option<PathBuf>,
    /// How the policy's log-probs are computed (`[backend] logprobs`).
    pub logprobs: LogProbPath,
}

/// Numbers of optimiser steps: total and warm-up.
pub fn step_counts(config: &StageConfig, n_examples: usize) -> (u64, u64) {
    let per_step = (config.batch_size as u64 * config.grad_accum as u64).max(1);
    let epochs = u64::from(config.epochs.unwrap_or(1));
    let total = config.max_steps.unwrap_or_else(|| (n_examples as u64 * epochs).div_ceil(per_step)).max(1);
    let warmup =
        config.warmup_steps.unwrap_or_else(|| (config.warmup_ratio.unwrap_or(0.0) * total as f64).ceil() as u64);
    (total, warmup)
}

/// Example indices in the order an epoch visits them (a seeded Fisher-Yates shuffle).
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng =
        fuserl_core::maths::SplitMix64::new(seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xd1b5_4a32_d192_ed03);
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// Elements per slice when summing a gradient's squares.
const NORM_CHUNK: usize = 1 << 20;

/// Sum of squares of all gradients, and optionally scales them.
struct GradNorm<'a> {
    grads: &'a mut GradientsParams,
    sum_sq: f64,
    scale: Option<f64>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for GradNorm<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let id: ParamId = param.id;
        match self.scale {
            None => {
                if let Some(g) = self.grads.get::<B::InnerBackend, D>(id) {
                    // In slices of at most NORM_CHUNK elements, so that squaring the largest
                    // gradient (the embeddings') needs no second tensor of its size while every
                    // gradient is alive; slice sums are f32, their total f64.
                    let n = g.shape().num_elements();
                    let flat = g.reshape([n]);
                    for start in (0..n).step_by(NORM_CHUNK) {
                        let slice = flat.clone().narrow(0, start, NORM_CHUNK.min(n - start));
                        let sq = slice.cast(DType::F32).powi_scalar(2).sum().into_data().iter::<f32>().next();
                        self.sum_sq += f64::from(sq.unwrap_or(0.0));
                    }
                }
            }
            Some(s) => {
                if let Some(g) = self.grads.remove::<B::InnerBackend, D>(id) {
                    self.grads.register(id, g.mul_scalar(s));
                }
            }
        }
    }
}

/// Whether every weight is finite, in slices as [`GradNorm`]: `sum(w * 0)` is 0 for finite
/// weights and NaN when one is NaN or infinite (a maximum would let a NaN pass: SIMD `max`
/// drops NaNs).
struct Finite(bool);

impl<B: burn::tensor::backend::Backend> ModuleVisitor<B> for Finite {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if !self.0 {
            return;
        }
        let t = param.val();
        let n = t.shape().num_elements();
        let flat = t.reshape([n]);
        for start in (0..n).step_by(NORM_CHUNK) {
            let slice = flat.clone().narrow(0, start, NORM_CHUNK.min(n - start));
            let zero = slice.cast(DType::F32).mul_scalar(0.0).sum().into_data().iter::<f32>().next().unwrap_or(0.0);
            if !zero.is_finite() {
                self.0 = false;
                return;
            }
        }
    }
}

/// Whether every weight of `weights` is finite.
pub fn weights_finite<B: burn::tensor::backend::Backend>(weights: &Llama<B>) -> bool {
    let mut check = Finite(true);
    weights.visit(&mut check);
    check.0
}

/// Settings of one optimiser step.
#[derive(Debug, Clone, Copy)]
pub struct StepSettings<'a> {
    /// The objective.
    pub objective: &'a dyn PreferenceObjective,
    /// Reference log-probs by completion key.
    pub reference: Option<&'a HashMap<String, f64>>,
    /// Stage settings (batch size, clipping).
    pub config: &'a StageConfig,
    /// Fraction of training done.
    pub progress: f64,
    /// Learning rate of this step.
    pub lr: f64,
    /// How the policy's log-probs are computed.
    pub logprobs: LogProbPath,
    /// The loss scale (1 without loss scaling; [`LossScale`] with f16 compute): the backward
    /// pass starts from the loss times this, and the gradients are divided by it before
    /// clipping and the update.
    pub loss_scale: f64,
    /// The key of this step's LoRA dropout masks (with the micro-batch, and each value's place:
    /// [`fuserl_model::lora::with_dropout`]).
    pub dropout_key: u64,
}

/// Dynamic loss scaling for f16 compute, as PyTorch's `GradScaler`: the loss is multiplied by
/// the scale before the backward pass (so that small gradients do not flush to zero in f16), and
/// a step whose gradients overflowed is skipped and halves the scale; after `GROWTH_INTERVAL`
/// steps without overflow the scale doubles.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScale {
    /// The current scale.
    pub scale: f64,
    good_steps: u32,
}

impl LossScale {
    /// Steps without an overflow before the scale grows (GradScaler's `growth_interval`).
    pub const GROWTH_INTERVAL: u32 = 2000;

    /// Starting at `scale` (GradScaler's default is 2^16).
    pub fn new(scale: f64) -> Self {
        Self { scale, good_steps: 0 }
    }

    /// Loss scaling for a compute dtype: f16 only (bf16 has f32's range).
    pub fn for_dtype(dtype: DType) -> Option<Self> {
        (dtype == DType::F16).then(|| Self::new(65536.0))
    }

    /// After a step: halve on an overflow (the step was skipped), double after
    /// `GROWTH_INTERVAL` good steps.
    pub fn update(&mut self, overflowed: bool) {
        if overflowed {
            self.scale = (self.scale * 0.5).max(1.0);
            self.good_steps = 0;
        } else {
            self.good_steps += 1;
            if self.good_steps >= Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        }
    }
}

/// What one optimiser step did.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// Loss (sum over micro-batches, each normalised by the step's total example weight).
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens processed.
    pub tokens: usize,
    /// Objective metrics averaged over the step's examples.
    pub metrics: Vec<(String, f64)>,
    /// The gradients overflowed (f16 loss scaling): the weights were not updated.
    pub skipped: bool,
}

/// The AdamW optimiser of a model.
pub fn new_optimizer<B: AutodiffBackend>(c: &StageConfig) -> Optim<B> {
    AdamW {
        beta_1: c.adam_beta1 as f32,
        beta_2: c.adam_beta2 as f32,
        eps: c.adam_eps as f32,
        weight_decay: c.weight_decay as f32,
    }
    .init()
}

/// One optimiser step over `picked` (already in micro-batch order): micro-batches of
/// `batch_size`, gradients accumulated, clipped by global norm, AdamW. Takes the model and gives
/// back the updated one, so that no second copy of the weights is alive while AdamW writes them.
pub fn optimizer_step<B: AutodiffBackend<InnerBackend: LogProbBackend> + LogProbBackend>(
    model: LlamaModel<B>,
    optim: &mut Optim<B>,
    picked: &[&TrainExample],
    s: StepSettings<'_>,
) -> Result<(LlamaModel<B>, StepOutput)> {
    let device = model.device();
    let c = s.config;
    // The step's loss is the weighted mean over its examples, sum_e w_e loss_e / sum_e w_e: with
    // every example of a prompt in the step this is method.md's mean over prompts of
    // sum_k w_k loss_k (the weights of a prompt sum to 1), and it stays an average when a step
    // holds only some of a prompt's examples (our choice).
    let normalizer: f64 = picked.iter().map(|e| e.example.weight).sum::<f64>().max(f64::MIN_POSITIVE);
    let mut accumulator = GradientsAccumulator::<Llama<B>>::new();
    let mut loss = 0.0;
    let mut tokens = 0usize;
    let mut metric_sums: Vec<(String, f64)> = Vec::new();
    for (micro_index, micro) in picked.chunks(c.batch_size as usize).enumerate() {
        let key = fuserl_model::lora::dropout_key(&[s.dropout_key, micro_index as u64]);
        let mut seqs = Vec::new();
        let mut offsets = vec![0usize];
        let mut weights = Vec::with_capacity(micro.len());
        let mut rewards = Vec::new();
        let mut refs = Vec::new();
        for e in micro {
            for (seq, tokens_of) in e.example.sequences.iter().zip(&e.seqs) {
                seqs.push(tokens_of.clone());
                rewards.push(seq.reward);
                if let Some(r) = s.reference {
                    let key = completion_key(&seq.completion);
                    refs.push(
                        *r.get(&key)
                            .ok_or_else(|| TrainError::Data(format!("no reference log-prob for {}", seq.completion)))?,
                    );
                }
            }
            offsets.push(seqs.len());
            weights.push(e.example.weight);
        }
        tokens += seqs.iter().map(|q| q.prompt.len() + q.response.len()).sum::<usize>();
        let counts: Vec<f64> = seqs.iter().map(|q| q.response.len() as f64).collect();
        // The objective's loss and dL/dlogp for the micro-batch's log-probs.
        let mut coefficients = |host: &[f64]| -> Result<Vec<f32>> {
            let out = s.objective.loss(&ObjectiveBatch {
                example_offsets: &offsets,
                example_weights: &weights,
                policy_logps: host,
                reference_logps: s.reference.map(|_| refs.as_slice()),
                token_counts: &counts,
                rewards: &rewards,
                normalizer,
                progress: s.progress,
            })?;
            loss += out.loss;
            for (name, value) in out.metrics {
                match metric_sums.iter_mut().find(|(n, _)| *n == name) {
                    Some(m) => m.1 += value * micro.len() as f64,
                    None => metric_sums.push((name, value * micro.len() as f64)),
                }
            }
            Ok(out.grad.iter().map(|g| (*g * s.loss_scale) as f32).collect())
        };
        if c.gradient_checkpointing {
            layerwise_backward(&model, &seqs, s.logprobs, key, &mut accumulator, coefficients)?;
        } else {
            // Every sequence at once: the masks the checkpointed path's shards draw for them.
            let all = fuserl_model::lora::DropoutKey { key, first_sequence: 0 };
            let (logps, _) = fuserl_model::lora::with_dropout(all, || sequence_logps(&model, &seqs, s.logprobs));
            let host: Vec<f64> = logps.clone().into_data().iter::<f32>().map(f64::from).collect();
            let coef = coefficients(&host)?;
            let coef = Tensor::<B, 1>::from_data(TensorData::new(coef, [seqs.len()]), (&device, DType::F32));
            let grads = GradientsParams::from_grads((logps * coef).sum().backward(), &model.weights);
            accumulator.accumulate(&model.weights, grads);
        }
    }
    let mut grads = accumulator.grads();
    let mut norm = GradNorm { grads: &mut grads, sum_sq: 0.0, scale: None };
    model.weights.visit(&mut norm);
    let n = picked.len().max(1) as f64;
    let metrics = metric_sums.into_iter().map(|(k, v)| (k, v / n)).collect();
    // The norm of the unscaled gradients.
    let grad_norm = norm.sum_sq.sqrt() / s.loss_scale;
    if !loss.is_finite() || (!grad_norm.is_finite() && s.loss_scale == 1.0) {
        return Err(TrainError::Diverged(format!("the loss is {loss} and the gradients' norm {grad_norm}")));
    }
    if !grad_norm.is_finite() {
        // Overflowed under loss scaling: no update (the caller lowers the scale).
        return Ok((model, StepOutput { loss, grad_norm, tokens, metrics, skipped: true }));
    }
    // Unscale and clip in one pass.
    let clip = if grad_norm > c.max_grad_norm { c.max_grad_norm / (grad_norm + 1e-6) } else { 1.0 };
    let factor = clip / s.loss_scale;
    if factor != 1.0 {
        let mut scale = GradNorm { grads: &mut grads, sum_sq: 0.0, scale: Some(factor) };
        model.weights.visit(&mut scale);
    }
    let LlamaModel { config, weights, dtype } = model;
    let model = LlamaModel { config, weights: optim.step(s.lr, weights, grads), dtype };
    Ok((model, StepOutput { loss, grad_norm, tokens, metrics, skipped: false }))
}

/// Train `model` on one stage, resuming from the stage's last checkpoint if there is one.
pub fn train_stage<B: AutodiffBackend<InnerBackend: LogProbBackend> + LogProbBackend>(
    mut model: LlamaModel<B>,
    stage: Stage<'_>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<LlamaModel<B>> {
    let c = stage.config;
    let n = stage.examples.len();
    if n == 0 {
        return Err(TrainError::Data(format!("the {} stage has no training examples", stage.name.as_str())));
    }
    let (total, warmup) = step_counts(c, n);
    let per_step = c.batch_size as usize * c.grad_accum as usize;
    let lr_peak = c.learning_rate.unwrap_or(1e-5);
    let mut optim = new_optimizer::<B>(c);
    std::fs::create_dir_all(&stage.dir).map_err(|e| TrainError::io(&stage.dir, e))?;
    let mut start = 0;
    let (weights, loaded, resumed) = checkpoint::resume(&stage.dir, model.weights, optim)?;
    (model.weights, optim) = (weights, loaded);
    if let Some((step, ckpt)) = resumed {
        start = step;
        tracing::info!(stage = stage.name.as_str(), step = start, checkpoint = %Shown(&ckpt), "resuming");
    }
    checkpoint::trim_metrics(&stage.metrics, stage.name, start)?;
    let mut events = match &stage.tensorboard {
        Some(dir) => Some(crate::tensorboard::EventWriter::create(dir)?),
        None => None,
    };
    let mut metrics_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&stage.metrics)
        .map_err(|e| TrainError::io(&stage.metrics, e))?;
    let mut orders: HashMap<u64, Vec<usize>> = HashMap::new();
    // f16 compute: dynamic loss scaling (it starts afresh on resume).
    let mut loss_scale = LossScale::for_dtype(model.dtype);
    let model_dtype = model.dtype;
    let device = model.device();
    for step in start..total {
        let t0 = Instant::now();
        // The backend's generator seeded per step from the run's seed, for any draw a step makes
        // (LoRA dropout's masks are keyed on their own: `dropout_key` below).
        <B as burn::tensor::backend::Backend>::seed(
            &device,
            stage.seed ^ (step + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ stage.name.as_str().len() as u64,
        );
        let mut picked: Vec<&TrainExample> = Vec::with_capacity(per_step);
        for k in 0..per_step as u64 {
            let pos = step * per_step as u64 + k;
            let (epoch, i) = (pos / n as u64, (pos % n as u64) as usize);
            if c.max_steps.is_none() && epoch >= u64::from(c.epochs.unwrap_or(1)) {
                break;
            }
            let order = orders.entry(epoch).or_insert_with(|| epoch_order(n, stage.seed, epoch));
            picked.push(&stage.examples[order[i]]);
        }
        // Batched by length: sort the step's examples, then cut micro-batches.
        picked.sort_by_key(|e| e.len());
        let progress_frac = if total > 1 { step as f64 / (total - 1) as f64 } else { 1.0 };
        let lr = learning_rate(c.schedule, lr_peak, step, warmup, total);
        let out;
        let settings = StepSettings {
            objective: stage.objective,
            reference: stage.reference.as_ref(),
            config: c,
            progress: progress_frac,
            lr,
            logprobs: stage.logprobs,
            loss_scale: loss_scale.map_or(1.0, |l| l.scale),
            dropout_key: fuserl_model::lora::dropout_key(&[
                stage.seed,
                step,
                stage.name.as_str().bytes().fold(0, |h, b| h * 31 + u64::from(b)),
            ]),
        };
        let diverged = |what: String| {
            let kept = match checkpoint::latest_checkpoint(&stage.dir) {
                Ok(Some(dir)) => format!("its last checkpoint, {}, is kept", Shown(&dir)),
                _ => "no checkpoint was written yet".to_owned(),
            };
            let dtype = if model_dtype == DType::F32 { "" } else { ", or compute in f32 (dtype = \"f32\")" };
            TrainError::Diverged(format!(
                "{} step {}: {what}; the stage stops here ({kept}; nothing after it is saved or exported). Rerunning \
                 the same recipe diverges again: train with a lower learning rate or max_grad_norm{dtype}, in a new \
                 [run] output_dir",
                stage.name.as_str(),
                step + 1
            ))
        };
        (model, out) = match optimizer_step(model, &mut optim, &picked, settings) {
            Err(TrainError::Diverged(what)) => return Err(diverged(what)),
            other => other?,
        };
        let last = step + 1 == total || (step + 1) % c.checkpoint_every == 0;
        if last && !weights_finite(&model.weights) {
            return Err(diverged("the update made weights that are not finite".to_owned()));
        }
        if let Some(l) = &mut loss_scale {
            l.update(out.skipped);
            if out.skipped {
                tracing::warn!(
                    stage = stage.name.as_str(),
                    step = step + 1,
                    scale = l.scale,
                    "f16 gradients overflowed: step skipped, loss scale lowered"
                );
            }
        }
        let (loss, grad_norm, tokens, metric_sums) = (out.loss, out.grad_norm, out.tokens, out.metrics);
        let done = step + 1;
        if done % c.log_every == 0 || done == total {
            let secs = t0.elapsed().as_secs_f64();
            let line = MetricsLine {
                step: done,
                stage: stage.name,
                loss,
                grad_norm,
                lr,
                tokens_per_s: tokens as f64 / secs.max(1e-9),
                examples: picked.len(),
                objective: metric_sums.iter().map(|(name, value)| (name.clone(), Some(*value))).collect(),
            };
            writeln!(metrics_file, "{}", line.to_json_line())
                .and_then(|()| metrics_file.flush())
                .map_err(|e| TrainError::io(&stage.metrics, e))?;
            if let Some(w) = &mut events {
                let tags: Vec<(String, f64)> =
                    line.scalars().into_iter().map(|(k, v)| (format!("{}/{k}", stage.name.as_str()), v)).collect();
                let scalars: Vec<(&str, f64)> = tags.iter().map(|(k, v)| (k.as_str(), *v)).collect();
                w.scalars(done, &scalars)?;
            }
        }
        progress(&Progress { stage: stage.name, step: done, total, loss });
        fuserl_core::debug_pause(&format!("{}-step-{done}", stage.name.as_str()));
        if done % c.checkpoint_every == 0 && done < total {
            checkpoint::save(
                &stage.dir,
                &model.weights,
                &optim,
                &CheckpointState { stage: stage.name, step: done, total },
            )?;
        }
    }
    Ok(model)
}

/// A `[target.lora]` target as a stage trains it: the checkpoint `dir`'s base frozen in `compute`
/// (or kept quantised: `quantize_base`), with new adapters of `lora` in `master` (trainable,
/// initialised from `seed` as PEFT does: A Kaiming-uniform, B zero).
pub fn load_lora_target<B: burn::tensor::backend::Backend>(
    dir: &std::path::Path,
    device: &B::Device,
    (compute, master): (DType, DType),
    lora: &fuserl_recipe::LoraConfig,
    seed: u64,
) -> fuserl_model::Result<LlamaModel<B>> {
    let mut model = fuserl_model::checkpoint::load_with::<B>(dir, device, compute, crate::plan::base_quant(lora))?;
    model.weights = fuserl_model::lora::freeze_base(model.weights, master);
    fuserl_model::lora::add_adapters(&mut model.weights, &crate::plan::lora_spec(lora), seed, master);
    Ok(model)
}

/// The parameters a model trains: its adapters' with LoRA, else all of them.
pub fn trained_parameters<B: burn::tensor::backend::Backend>(model: &LlamaModel<B>) -> u64 {
    let adapters = fuserl_model::lora::adapters(&model.weights);
    if adapters.is_empty() {
        return model.weights.num_params() as u64;
    }
    let count = |p: &Param<Tensor<B, 2>>| p.val().shape().num_elements() as u64;
    adapters.iter().map(|l| count(&l.a) + count(&l.b)).sum()
}

/// The model without autodiff (same weights), for inference and export.
pub fn inference_model<B: AutodiffBackend>(model: &LlamaModel<B>) -> LlamaModel<B::InnerBackend> {
    LlamaModel { config: model.config.clone(), weights: model.weights.valid(), dtype: model.dtype }
}
