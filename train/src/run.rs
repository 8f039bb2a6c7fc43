//! A run directory for a recipe, and the stages in it:
//!
//! ```text
//! runs/NAME/
//!   recipe.toml            the resolved recipe (a rerun with another recipe is refused)
//!   metrics.jsonl          one line per logged optimiser step, both stages
//!   sft/examples.jsonl     the stage's training examples, each traced to its source answers
//!   sft/checkpoints/       step-N/ {model.mpk, optim.mpk, state.json} and LATEST
//!   sft/final/             the FuseSFT model (Hugging Face layout); sft/DONE when finished
//!   po/target-samples.json   the FuseSFT model's own samples ([po] target_samples), with their key
//!   po/reference-logps.json  reference log-probs (frozen FuseSFT model), keyed by checkpoint and data
//!   po/checkpoints/, po/final/, po/DONE
//!   export/                the fused model (or [export] path)
//! ```
//!
//! Running the same command again resumes: a finished stage is not redone, an interrupted one
//! continues from its last checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::DType;
use fuserl_core::data::{Completion, CompletionId, Origin};
use fuserl_core::extension::Collected;
use fuserl_core::pipeline::{StageName, prepare, prepare_with};
use fuserl_core::recipe::{DType as RecipeDType, LoadedRecipe, ReferenceModel};
use fuserl_model::chat::ChatTokenizer;
use fuserl_model::checkpoint::{load, save, save_as};

use crate::data::tokenize;
use crate::error::{Result, TrainError};
use crate::trainer::{Progress, Stage, inference_model, reference_logps, train_stage, write_atomic};
use burn::backend::Autodiff;
use fuserl_backends::{LogProbBackend, OnBackend};

/// Load `start`, train it on `stage`, and save the result as a Hugging Face checkpoint in
/// `out` (gradient checkpointing, when the stage asks for it, is the trainer's: by layer).
fn train_and_save<B: LogProbBackend>(
    start: &Path,
    stage: Stage<'_>,
    (device, dt): (&B::Device, DType),
    out: &Path,
    side_files: &Path,
    progress: &mut dyn FnMut(&Progress),
) -> Result<()> {
    let model = train_stage(load::<Autodiff<B>>(start, device, dt)?, stage, progress)?;
    save(&inference_model(&model), out, 2 << 30, Some(side_files))?;
    Ok(())
}

/// What to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    /// FuseSFT only.
    Sft,
    /// FusePO only (FuseSFT must be done when enabled).
    Po,
    /// Both stages, then export.
    All,
}

/// Where a run put things.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// The run directory.
    pub dir: PathBuf,
    /// `metrics.jsonl`.
    pub metrics: PathBuf,
    /// The exported model, when exported.
    pub export: Option<PathBuf>,
    /// Stages that were already finished and skipped.
    pub skipped: Vec<StageName>,
}

fn dtype(d: RecipeDType) -> DType {
    match d {
        RecipeDType::F32 => DType::F32,
        RecipeDType::F16 => DType::F16,
        RecipeDType::Bf16 => DType::BF16,
    }
}

fn fnv(hash: &mut u64, bytes: &[u8]) {
    for b in bytes {
        *hash ^= u64::from(*b);
        *hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
}

/// A key for cached reference log-probs: a hash of the reference checkpoint's weight files and of
/// every sequence's tokens.
fn reference_key(checkpoint: &Path, examples: &[crate::data::TrainExample]) -> Result<String> {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut files: Vec<PathBuf> = std::fs::read_dir(checkpoint)
        .map_err(|e| TrainError::io(checkpoint, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    for f in files {
        fnv(&mut h, &std::fs::read(&f).map_err(|e| TrainError::io(&f, e))?);
    }
    let weights = h;
    let mut d = 0xcbf2_9ce4_8422_2325u64;
    for e in examples {
        for s in &e.seqs {
            for id in s.prompt.iter().chain(&s.response) {
                fnv(&mut d, &id.to_le_bytes());
            }
            fnv(&mut d, &[0xff]);
        }
    }
    Ok(format!("weights:{weights:016x};data:{d:016x}"))
}

/// The target's own samples for the PO stage's prompts: `n` per prompt from the model at `start`,
/// with `[data.sampling]`; cached in `cache` (keyed by the weights, the prompts and the settings)
/// so that a resumed run does not generate again.
fn target_samples<B: LogProbBackend>(
    loaded: &LoadedRecipe,
    (start, device): (&Path, &B::Device),
    tok: &ChatTokenizer,
    n: u32,
    cache: &Path,
) -> Result<Collected> {
    let recipe = &loaded.recipe;
    let sampling = &recipe.data.sampling;
    let prepared = prepare(loaded, StageName::Po)?;
    let mut prompt_ids: Vec<&String> = prepared.prompts.keys().collect();
    prompt_ids.sort();
    let mut key_hash = 0xcbf2_9ce4_8422_2325u64;
    fnv(&mut key_hash, format!("{n}|{sampling:?}|{}|{:?}", recipe.run.seed, prompt_ids).as_bytes());
    let key = format!("{}|settings:{key_hash:016x}", reference_key(start, &[])?);
    if let Some(completions) = std::fs::read(cache)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .filter(|v| v["key"].as_str() == Some(key.as_str()))
        .and_then(|v| serde_json::from_value::<Vec<Completion>>(v["completions"].clone()).ok())
    {
        return Ok(Collected { prompts: Vec::new(), completions, skipped_records: 0 });
    }
    let model = load::<B>(start, device, dtype(recipe.backend.dtype))?;
    let max_len = recipe.target.max_length as usize;
    let mut completions = Vec::new();
    for (i, id) in prompt_ids.iter().enumerate() {
        let mut ids = tok.prompt_ids(&prepared.prompts[*id])?;
        let cap = recipe.target.max_prompt_length.map_or(max_len - 1, |p| p as usize).min(max_len - 1);
        if ids.len() > cap {
            ids.drain(..ids.len() - cap);
        }
        let seed = recipe.run.seed.wrapping_add(i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let cfg = fuserl_model::generate::GenerateConfig {
            max_new_tokens: sampling.max_new_tokens.map_or(256, |m| m as usize).min(max_len - ids.len()),
            temperature: sampling.temperature.unwrap_or(1.0),
            top_p: sampling.top_p.unwrap_or(1.0),
            top_k: sampling.top_k.unwrap_or(0) as usize,
            seed,
            stop: Vec::new(),
        };
        let batch = vec![ids; n as usize];
        let replies = fuserl_model::generate::generate(&model, tok, &batch, &cfg)?;
        for (s, reply) in replies.into_iter().enumerate() {
            let mut params = sampling.clone();
            params.seed = Some(seed);
            completions.push(Completion {
                id: CompletionId { prompt_id: (*id).clone(), source: "target".into(), sample_index: s as u32 },
                text: reply.text,
                sampling: params,
                origin: Origin { adapter: "generate".into(), file: Some(start.display().to_string()), line: None },
                precomputed_score: None,
            });
        }
        tracing::info!(prompt = %id, done = i + 1, total = prompt_ids.len(), "generated target samples");
    }
    let doc = serde_json::json!({"key": key, "completions": completions});
    write_atomic(cache, doc.to_string().as_bytes())?;
    Ok(Collected { prompts: Vec::new(), completions, skipped_records: 0 })
}

/// Run (or resume) the recipe's stages, on the backend its `[backend]` names.
pub fn run(loaded: &LoadedRecipe, which: Which, progress: &mut dyn FnMut(&Progress)) -> Result<RunSummary> {
    struct Job<'a, 'p> {
        loaded: &'a LoadedRecipe,
        which: Which,
        progress: &'p mut dyn FnMut(&Progress),
    }
    impl OnBackend for Job<'_, '_> {
        type Output = Result<RunSummary>;
        fn run<B: LogProbBackend>(self, device: B::Device) -> Result<RunSummary> {
            run_on::<B>(self.loaded, self.which, self.progress, &device)
        }
    }
    let b = &loaded.recipe.backend;
    fuserl_backends::on_backend(b.device, b.device_index, b.dtype, Job { loaded, which, progress })
        .map_err(|e| TrainError::Unsupported(format!("[backend]: {e}")))?
}

fn run_on<B: LogProbBackend>(
    loaded: &LoadedRecipe,
    which: Which,
    progress: &mut dyn FnMut(&Progress),
    device: &B::Device,
) -> Result<RunSummary> {
    let recipe = &loaded.recipe;
    let dir = loaded.output_dir();
    std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
    let resolved = loaded.resolved_toml()?;
    let recipe_file = dir.join("recipe.toml");
    match std::fs::read_to_string(&recipe_file) {
        Ok(previous) if previous != resolved => {
            return Err(TrainError::Data(format!(
                "{} was made by a different recipe; choose another [run] output_dir or remove the folder to start over",
                recipe_file.display()
            )));
        }
        Ok(_) => {}
        Err(_) => write_atomic(&recipe_file, resolved.as_bytes())?,
    }
    let metrics = dir.join("metrics.jsonl");
    let target = loaded.base_dir.join(&recipe.target.checkpoint);
    let template = recipe.target.chat_template.as_ref().map(|t| loaded.base_dir.join(t));
    let tok = ChatTokenizer::load(&target, template.as_deref())?;
    let dt = dtype(recipe.backend.dtype);
    let path = recipe.backend.logprobs;
    let max_len = recipe.target.max_length as usize;
    let max_prompt = recipe.target.max_prompt_length.map(|p| p as usize);
    let mut skipped = Vec::new();
    let sft_final = dir.join("sft/final");
    let po_final = dir.join("po/final");

    // The data stages of a training stage: collect, score, weigh, build examples; the examples
    // (with their provenance and token counts) are kept in the stage's folder.
    let tokenized = |stage: StageName, extra: Vec<Collected>| -> Result<Vec<crate::data::TrainExample>> {
        let p = prepare_with(loaded, stage, extra)?;
        let examples = tokenize(p.examples, &p.prompts, &p.texts, &tok, max_len, max_prompt)?;
        let stage_dir = dir.join(stage.as_str());
        std::fs::create_dir_all(&stage_dir).map_err(|e| TrainError::io(&stage_dir, e))?;
        let mut text = String::new();
        for e in &examples {
            let mut v = serde_json::to_value(&e.example).map_err(|err| TrainError::Data(err.to_string()))?;
            v["token_counts"] = e.seqs.iter().map(|s| serde_json::json!([s.prompt.len(), s.response.len()])).collect();
            text.push_str(&v.to_string());
            text.push('\n');
        }
        write_atomic(&stage_dir.join("examples.jsonl"), text.as_bytes())?;
        Ok(examples)
    };

    let do_sft = recipe.sft.enabled && matches!(which, Which::Sft | Which::All);
    if do_sft {
        if dir.join("sft/DONE").is_file() {
            skipped.push(StageName::Sft);
        } else {
            let _span = tracing::info_span!("stage", name = "sft").entered();
            tok.check_fits(fuserl_model::config::LlamaConfig::from_file(&target.join("config.json"))?.vocab_size)?;
            let stage = Stage {
                name: StageName::Sft,
                config: &recipe.sft,
                objective: loaded.components.sft_objective.as_ref(),
                examples: tokenized(StageName::Sft, Vec::new())?,
                reference: None,
                seed: recipe.run.seed,
                dir: dir.join("sft/checkpoints"),
                metrics: metrics.clone(),
                logprobs: path,
            };
            train_and_save::<B>(&target, stage, (device, dt), &sft_final, &target, progress)?;
            write_atomic(&dir.join("sft/DONE"), b"done\n")?;
        }
    }

    let do_po = recipe.po.enabled && matches!(which, Which::Po | Which::All);
    if do_po {
        if dir.join("po/DONE").is_file() {
            skipped.push(StageName::Po);
        } else {
            let _span = tracing::info_span!("stage", name = "po").entered();
            let start = if recipe.sft.enabled {
                if !dir.join("sft/DONE").is_file() {
                    return Err(TrainError::Data(format!(
                        "FusePO starts from the FuseSFT model, and {} has none yet: run `fuserl sft` (or `fuserl run`) first",
                        dir.display()
                    )));
                }
                sft_final.clone()
            } else {
                target.clone()
            };
            let reference_from = match recipe.po.reference {
                Some(ReferenceModel::Target) => target.clone(),
                _ => start.clone(),
            };
            let extra = if recipe.po.target_samples > 0 {
                std::fs::create_dir_all(dir.join("po")).map_err(|e| TrainError::io(dir.join("po"), e))?;
                vec![target_samples::<B>(
                    loaded,
                    (&start, device),
                    &tok,
                    recipe.po.target_samples,
                    &dir.join("po/target-samples.json"),
                )?]
            } else {
                Vec::new()
            };
            let examples = tokenized(StageName::Po, extra)?;
            let objective = loaded.components.po_objective.as_ref();
            let reference = if objective.needs_reference() {
                let cache = dir.join("po/reference-logps.json");
                let key = reference_key(&reference_from, &examples)?;
                let cached: Option<HashMap<String, f64>> = std::fs::read(&cache)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .filter(|v| v["key"].as_str() == Some(key.as_str()))
                    .and_then(|v| serde_json::from_value(v["logps"].clone()).ok());
                Some(match cached {
                    Some(r) => r,
                    None => {
                        tracing::info!(reference = %reference_from.display(), "computing reference log-probs");
                        let reference_model = load::<B>(&reference_from, device, dt)?;
                        let batch = recipe.po.batch_size as usize * 2;
                        let r = reference_logps(&reference_model, &examples, batch, path);
                        drop(reference_model);
                        std::fs::create_dir_all(dir.join("po")).map_err(|e| TrainError::io(dir.join("po"), e))?;
                        let doc = serde_json::json!({"key": key, "reference": reference_from.display().to_string(), "logps": r});
                        write_atomic(&cache, doc.to_string().as_bytes())?;
                        r
                    }
                })
            } else {
                None
            };
            let stage = Stage {
                name: StageName::Po,
                config: &recipe.po,
                objective,
                examples,
                reference,
                seed: recipe.run.seed,
                dir: dir.join("po/checkpoints"),
                metrics: metrics.clone(),
                logprobs: path,
            };
            train_and_save::<B>(&start, stage, (device, dt), &po_final, &target, progress)?;
            write_atomic(&dir.join("po/DONE"), b"done\n")?;
        }
    }

    let mut export = None;
    if which == Which::All && recipe.export.enabled {
        let from = if recipe.po.enabled { &po_final } else { &sft_final };
        let to = loaded.export_dir();
        if from.is_dir() {
            let model = load::<burn::backend::Flex>(from, &Default::default(), DType::F32)?;
            let as_dtype = dtype(recipe.export.dtype.unwrap_or(recipe.backend.dtype));
            save_as(&model, &to, (recipe.export.max_shard_size_mb as usize) << 20, Some(&target), as_dtype)?;
            export = Some(to);
        }
    }
    Ok(RunSummary { dir, metrics, export, skipped })
}
