//! fuserl-run: the stages of a run, from a recipe, in a run directory that resumes: collect
//! (the generative sources answer the recipe's prompts; [`fuserl_core::collect`]), score (the
//! reward scores every answer; [`fuserl_core::score`]), FuseSFT and FusePO (the trainer,
//! [`fuserl_train`]), export. `fuserl run|collect|score|sft|po` call [`run`], [`collect_stage`]
//! and [`score_stage`]; the `local` source ([`local`]) and the `classifier` reward
//! ([`classifier`]) live here because they run a model.
//!
//! The run directory's layout is [`run_dir::RunDir`], the one type that names its paths.
//!
//! Running the same command again resumes: a finished stage is not redone, an interrupted one
//! continues from its last checkpoint.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::DType;
use fuserl_core::collect::{CollectPlan, CollectProgress, collect, collect_with};
use fuserl_core::data::Prompt;
use fuserl_core::extension::Collected;
use fuserl_core::extension::Generator;
use fuserl_core::registry::BuildContext;

use crate::local::LocalSource;
use crate::run_dir::RunDir;
use fuserl_core::pipeline::{StageName, gather_groups, prepare_with};
use fuserl_core::recipe::{LoadedRecipe, ReferenceModel};
use fuserl_core::score::{ScoreProgress, ScoreSummary};
use fuserl_model::chat::ChatTokenizer;
use fuserl_model::checkpoint::{load, save};

use fuserl_core::fs::write_atomic;
use fuserl_train::data::tokenize;
pub use fuserl_train::trainer::Progress;
use fuserl_train::trainer::{Stage, inference_model, reference_logps, train_stage};
pub use fuserl_train::{Result, TrainError};

pub mod artifacts;
pub mod classifier;
pub mod eval;
pub mod export;
pub mod local;
pub mod report;
pub mod run_dir;
pub mod stats;
use burn::backend::Autodiff;
use fuserl_backends::{LogProbBackend, OnBackend};
use fuserl_core::paths::Shown;

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
    /// eval.json, when `[eval] enabled`.
    pub eval: Option<PathBuf>,
    /// Stages that were already finished and skipped.
    pub skipped: Vec<StageName>,
}

/// A key for cached reference log-probs: a hash of the reference checkpoint's weight files and of
/// every sequence's tokens.
fn reference_key(checkpoint: &Path, examples: &[fuserl_train::data::TrainExample]) -> Result<String> {
    let weights = local::weights_hash(checkpoint).map_err(|e| TrainError::io(checkpoint, e))?;
    let mut d = fuserl_core::maths::Fnv1a::new();
    for e in examples {
        for s in &e.seqs {
            for id in s.prompt.iter().chain(&s.response) {
                d.update(&id.to_le_bytes());
            }
            d.update(&[0xff]);
        }
    }
    Ok(format!("weights:{weights:016x};data:{:016x}", d.finish()))
}

/// The target's own samples for the PO stage's prompts: `n` per prompt from the model at
/// `start` (the FuseSFT model), under the source name `target`, by the `local` source through
/// the collect stage: stored in `dir` as they are made, resumed after a kill, made afresh when
/// the model changed.
fn target_samples(
    loaded: &LoadedRecipe,
    start: &Path,
    n: u32,
    dir: &Path,
    collected: &[Collected],
    progress: &(dyn Fn(&CollectProgress<'_>) + Sync),
) -> Result<Collected> {
    let recipe = &loaded.recipe;
    let prepared = prepare_with(loaded, StageName::Po, collected.to_vec(), Some(&loaded.output_dir().join("score")))?;
    let mut prompts: Vec<Prompt> = prepared.prompts.into_iter().map(|(id, messages)| Prompt { id, messages }).collect();
    prompts.sort_by(|a, b| a.id.cmp(&b.id));
    let ctx =
        BuildContext { base_dir: loaded.base_dir.clone(), seed: recipe.run.seed, backend: recipe.backend.clone() };
    let max_prompt = recipe.target.max_prompt_length.unwrap_or(recipe.target.max_length.saturating_sub(1).max(1));
    let source = LocalSource::for_checkpoint("target", start, max_prompt, &ctx)
        .map_err(|e| TrainError::Data(format!("[po] target_samples: {e}")))?;
    let plan = CollectPlan {
        prompts: &prompts,
        samples_per_prompt: n,
        sampling: &recipe.data.sampling,
        run_seed: recipe.run.seed,
        restart_changed: true,
    };
    let mut got = collect_with(&[&source as &dyn Generator], &plan, dir, &[], progress)?;
    let mut samples = got.pop().unwrap_or_default();
    // The prompts are the stage's own already.
    samples.prompts.clear();
    Ok(samples)
}

/// How a run reports progress: training steps, answers collected, answers scored.
pub struct Reporters<'a> {
    /// After each optimiser step.
    pub step: &'a mut dyn FnMut(&Progress),
    /// After each answer a generative source hands over.
    pub collect: &'a (dyn Fn(&CollectProgress<'_>) + Sync),
    /// After each batch the reward scores.
    pub score: &'a dyn Fn(&ScoreProgress<'_>),
}

impl std::fmt::Debug for Reporters<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reporters")
    }
}

/// Run (or resume) the recipe's stages, on the backend its `[backend]` names: collect (the
/// generative sources answer the recipe's prompts), FuseSFT, FusePO, export.
pub fn run(loaded: &LoadedRecipe, which: Which, report: Reporters<'_>) -> Result<RunSummary> {
    struct Job<'a, 'p> {
        loaded: &'a LoadedRecipe,
        which: Which,
        report: Reporters<'p>,
    }
    impl OnBackend for Job<'_, '_> {
        type Output = Result<RunSummary>;
        fn run<B: LogProbBackend>(self, device: B::Device) -> Result<RunSummary> {
            run_on::<B>(self.loaded, self.which, self.report, &device)
        }
    }
    let b = &loaded.recipe.backend;
    fuserl_backends::on_backend(b.device, b.device_index, b.dtype, Job { loaded, which, report })
        .map_err(|e| TrainError::Unsupported(format!("[backend]: {e}")))?
}

/// The run directory of a recipe, created; a folder that another recipe made, or that holds a
/// symbolic link leading outside it, is refused.
pub fn claim_run_dir(loaded: &LoadedRecipe) -> Result<PathBuf> {
    let dir = loaded.output_dir();
    std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
    fuserl_core::paths::check_links_stay_inside(&dir)?;
    let resolved = loaded.resolved_toml()?;
    let recipe_file = RunDir::new(&dir).recipe();
    match std::fs::read_to_string(&recipe_file) {
        Ok(previous) if previous != resolved => {
            return Err(TrainError::Data(format!(
                "{} was made by a different recipe; choose another [run] output_dir or remove the folder to start over",
                Shown(&recipe_file)
            )));
        }
        Ok(_) => {}
        Err(_) => write_atomic(&recipe_file, resolved.as_bytes())?,
    }
    Ok(dir)
}

/// The collect stage alone (`fuserl collect`): every generative source answers the recipe's
/// prompts into `runs/NAME/collect/` (resumes; `redo` names sources to start afresh).
pub fn collect_stage(
    loaded: &LoadedRecipe,
    redo: &[String],
    progress: &(dyn Fn(&CollectProgress<'_>) + Sync),
) -> Result<(PathBuf, Vec<Collected>)> {
    // Each store guards its own settings (a source whose settings changed is refused, or started
    // afresh with `redo`), so collecting needs no claim on the run directory; the training
    // stages make that claim.
    fuserl_core::paths::check_links_stay_inside(&loaded.output_dir())?;
    let dir = RunDir::new(loaded.output_dir()).collect();
    let collected = collect(loaded, &dir, redo, progress)?;
    Ok((dir, collected))
}

/// The scoring stage alone (`fuserl score`): the recipe's reward scores every answer of every
/// prompt (both training stages' prompts; the collect stage's answers given in `collected`) into
/// `runs/NAME/score/` (resumes; scores afresh when the reward's settings changed).
pub fn score_stage(
    loaded: &LoadedRecipe,
    collected: Vec<Collected>,
    progress: &dyn Fn(&ScoreProgress<'_>),
) -> Result<(PathBuf, ScoreSummary)> {
    fuserl_core::paths::check_links_stay_inside(&loaded.output_dir())?;
    let run = RunDir::new(loaded.output_dir());
    let dir = run.score();
    let (mut groups, _) = gather_groups(loaded, collected)?;
    let reward = loaded.components.reward.as_ref();
    let batch = loaded.recipe.data.score_batch_size as usize;
    let summary = fuserl_core::score::score_stage(reward, &mut groups, Some(&dir), batch, progress)?;
    write_data_summary(&run.data_json(), &groups, reward.scorer_id())?;
    Ok((dir, summary))
}

/// `data.json` for the report ([`artifacts::DataSummary`]).
fn write_data_summary(file: &Path, groups: &[fuserl_core::data::ScoredGroup], reward: String) -> Result<()> {
    let doc = artifacts::DataSummary::of(groups, reward);
    let text = serde_json::to_string(&doc).map_err(|e| TrainError::Data(e.to_string()))?;
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    }
    Ok(write_atomic(file, text.as_bytes())?)
}

/// Rebuild the run's report (`report/`), as after every stage: a report that cannot be built is
/// a warning, never the end of a run (`fuserl report` rebuilds it and says why).
pub fn refresh_report(run_dir: &Path) {
    if let Err(e) = report::write_report(run_dir) {
        tracing::warn!(dir = %Shown(run_dir), error = %e, "the run report could not be rebuilt");
    }
}

fn run_on<B: LogProbBackend>(
    loaded: &LoadedRecipe,
    which: Which,
    report: Reporters<'_>,
    device: &B::Device,
) -> Result<RunSummary> {
    let recipe = &loaded.recipe;
    let dir = claim_run_dir(loaded)?;
    let run = RunDir::new(&dir);
    let (_, collected) = collect_stage(loaded, &[], report.collect)?;
    score_stage(loaded, collected.clone(), report.score)?;
    refresh_report(&dir);
    let progress = report.step;
    let metrics = run.metrics();
    let tensorboard =
        recipe.run.report_to.contains(&fuserl_core::recipe::ReportTo::Tensorboard).then(|| run.tensorboard());
    let target = loaded.base_dir.join(&recipe.target.checkpoint);
    let template = recipe.target.chat_template.as_ref().map(|t| loaded.base_dir.join(t));
    let tok = ChatTokenizer::load(&target, template.as_deref())?;
    let dt = fuserl_backends::burn_dtype(recipe.backend.dtype);
    let path = recipe.backend.logprobs;
    let max_len = recipe.target.max_length as usize;
    let max_prompt = recipe.target.max_prompt_length.map(|p| p as usize);
    let mut skipped = Vec::new();
    let (sft, po) = (run.stage(StageName::Sft), run.stage(StageName::Po));
    let sft_final = sft.final_model();
    let po_final = po.final_model();

    // The data stages of a training stage: collect, score, weigh, build examples; the examples
    // (with their provenance and token counts) are kept in the stage's folder.
    let tokenized = |stage: StageName, extra: Vec<Collected>| -> Result<Vec<fuserl_train::data::TrainExample>> {
        let p = prepare_with(loaded, stage, collected.iter().cloned().chain(extra).collect(), Some(&run.score()))?;
        let examples = tokenize(p.examples, &p.prompts, &p.texts, &tok, max_len, max_prompt)?;
        let stage_dir = run.stage(stage);
        let stage_root = stage_dir.root();
        std::fs::create_dir_all(stage_root).map_err(|e| TrainError::io(stage_root, e))?;
        let mut text = String::new();
        for e in &examples {
            let mut v = serde_json::to_value(&e.example).map_err(|err| TrainError::Data(err.to_string()))?;
            v["token_counts"] = e.seqs.iter().map(|s| serde_json::json!([s.prompt.len(), s.response.len()])).collect();
            text.push_str(&v.to_string());
            text.push('\n');
        }
        write_atomic(&stage_dir.examples(), text.as_bytes())?;
        Ok(examples)
    };

    let do_sft = recipe.sft.enabled && matches!(which, Which::Sft | Which::All);
    if do_sft {
        if sft.done().is_file() {
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
                dir: sft.checkpoints(),
                metrics: metrics.clone(),
                tensorboard: tensorboard.clone(),
                logprobs: path,
            };
            train_and_save::<B>(&target, stage, (device, dt), &sft_final, &target, progress)?;
            write_atomic(&sft.done(), b"done\n")?;
            refresh_report(&dir);
        }
    }

    let do_po = recipe.po.enabled && matches!(which, Which::Po | Which::All);
    if do_po {
        if po.done().is_file() {
            skipped.push(StageName::Po);
        } else {
            let _span = tracing::info_span!("stage", name = "po").entered();
            let start = if recipe.sft.enabled {
                if !sft.done().is_file() {
                    return Err(TrainError::Data(format!(
                        "FusePO starts from the FuseSFT model, and {} has none yet: run `fuserl sft` (or `fuserl run`) first",
                        Shown(&dir)
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
                vec![target_samples(
                    loaded,
                    &start,
                    recipe.po.target_samples,
                    &po.collect(),
                    &collected,
                    report.collect,
                )?]
            } else {
                Vec::new()
            };
            let examples = tokenized(StageName::Po, extra)?;
            let objective = loaded.components.po_objective.as_ref();
            let reference = if objective.needs_reference() {
                let cache = po.reference_logps();
                let key = reference_key(&reference_from, &examples)?;
                let cached: Option<HashMap<String, f64>> = std::fs::read(&cache)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .filter(|v| v["key"].as_str() == Some(key.as_str()))
                    .and_then(|v| serde_json::from_value(v["logps"].clone()).ok());
                Some(match cached {
                    Some(r) => r,
                    None => {
                        tracing::info!(reference = %Shown(&reference_from), "computing reference log-probs");
                        let reference_model = load::<B>(&reference_from, device, dt)?;
                        let batch = recipe.po.batch_size as usize * 2;
                        let r = reference_logps(&reference_model, &examples, batch, path);
                        drop(reference_model);
                        std::fs::create_dir_all(po.root()).map_err(|e| TrainError::io(po.root(), e))?;
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
                dir: po.checkpoints(),
                metrics: metrics.clone(),
                tensorboard: tensorboard.clone(),
                logprobs: path,
            };
            train_and_save::<B>(&start, stage, (device, dt), &po_final, &target, progress)?;
            write_atomic(&po.done(), b"done\n")?;
            refresh_report(&dir);
        }
    }

    let mut export = None;
    if which == Which::All && recipe.export.enabled {
        let _span = tracing::info_span!("stage", name = "export").entered();
        let from = if recipe.po.enabled { &po_final } else { &sft_final };
        export = export::export_stage(loaded, from, &target)?;
    }
    let mut eval = None;
    if which == Which::All && recipe.eval.enabled {
        let _span = tracing::info_span!("stage", name = "eval").entered();
        eval = Some(eval::eval_stage(loaded, report.collect, report.score)?.0);
    }
    refresh_report(&dir);
    Ok(RunSummary { dir, metrics, export, eval, skipped })
}
