//! fuserl-run: the stages of a run, from a recipe, in a run directory that resumes: collect
//! (the generative sources answer the recipe's prompts; [`crate::collect`]), score (the
//! reward scores every answer; [`crate::score`]), FuseSFT and FusePO (the trainer,
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

use burn::backend::Autodiff;
use burn::tensor::DType;
use fuserl_backends::{LogProbBackend, OnBackend};
use fuserl_core::data::{Prompt, ScoredGroup, StageName};
use fuserl_core::extension::{Collected, Generator};
use fuserl_core::paths::Shown;
use fuserl_core::registry::BuildContext;
use fuserl_io::artifacts::{ReferenceLogps, StageExample};
use fuserl_io::fs::write_atomic;
use fuserl_io::run_dir::RunDir;
use fuserl_model::chat::ChatTokenizer;
use fuserl_model::checkpoint::{load, save};
use fuserl_recipe::{LoadedRecipe, ReferenceModel};
use fuserl_train::data::tokenize;
pub use fuserl_train::trainer::Progress;
use fuserl_train::trainer::{Stage, inference_model, reference_logps, train_stage};
pub use fuserl_train::{Result, TrainError};

use crate::collect::{CollectPlan, CollectProgress, collect_stage, collect_with};
use crate::collect::{gather_groups, read_file_sources};
use crate::local::LocalSource;
use crate::pipeline::{in_stage, prepare_stage};
use crate::score::{ScoreProgress, score_stage};

pub mod classifier;
pub mod collect;
pub mod eval;
pub mod export;
pub mod inputs;
pub mod local;
pub mod pairwise;
pub mod pipeline;
pub mod score;
pub mod stats;

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
    groups: &[ScoredGroup],
    progress: &(dyn Fn(&CollectProgress<'_>) + Sync),
) -> Result<Collected> {
    let recipe = &loaded.recipe;
    let mut prompts: Vec<Prompt> = groups
        .iter()
        .filter(|g| in_stage(&recipe.data, recipe.run.seed, &g.prompt.id, StageName::Po))
        .map(|g| g.prompt.clone())
        .collect();
    prompts.sort_by(|a, b| a.id.cmp(&b.id));
    let ctx = BuildContext::new(loaded.base_dir.clone(), recipe.run.seed, recipe.backend.clone());
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

/// The run directory of a recipe, created; a folder that another recipe made (other settings
/// for what is already collected, scored or trained), or that holds a symbolic link leading
/// outside it, is refused, naming the settings that differ. `[eval]` and `[export]` may change:
/// their stages keep their own records and redo what the change concerns; the recipe kept in the
/// folder is then the new one.
pub fn claim_run_dir(loaded: &LoadedRecipe) -> Result<PathBuf> {
    let dir = loaded.output_dir();
    std::fs::create_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
    fuserl_core::paths::check_links_stay_inside(&dir)?;
    let resolved = loaded.resolved_toml()?;
    let recipe_file = RunDir::new(&dir).recipe();
    match std::fs::read_to_string(&recipe_file) {
        Ok(previous) => {
            let changed = changed_settings(&previous, &resolved);
            if !changed.is_empty() {
                const SHOWN: usize = 6;
                let more = changed.len().saturating_sub(SHOWN);
                let mut list = changed.into_iter().take(SHOWN).collect::<Vec<_>>().join(", ");
                if more > 0 {
                    list.push_str(&format!(" and {more} more"));
                }
                return Err(TrainError::Data(format!(
                    "{} was made by a different recipe ({list} changed); choose another [run] output_dir or remove the folder to start over",
                    Shown(&recipe_file)
                )));
            }
            if !same_toml(&previous, &resolved) {
                tracing::info!(file = %Shown(&recipe_file), "the recipe's [eval] or [export] changed: kept the new one");
                write_atomic(&recipe_file, resolved.as_bytes())?;
            }
        }
        Err(_) => write_atomic(&recipe_file, resolved.as_bytes())?,
    }
    Ok(dir)
}

/// The settings (dotted key paths, sorted) in which two resolved recipes differ, leaving out
/// `[eval]` and `[export]`, whose stages follow a change on their own. A text that is not TOML
/// differs as a whole.
fn changed_settings(previous: &str, now: &str) -> Vec<String> {
    fn diff(prefix: &str, a: &toml::Table, b: &toml::Table, out: &mut Vec<String>) {
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        for key in keys {
            let path = if prefix.is_empty() { key.clone() } else { format!("{prefix}.{key}") };
            match (a.get(key), b.get(key)) {
                (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => diff(&path, x, y, out),
                (x, y) if x == y => {}
                _ => out.push(path),
            }
        }
    }
    let (Ok(mut a), Ok(mut b)) = (previous.parse::<toml::Table>(), now.parse::<toml::Table>()) else {
        return if previous == now { Vec::new() } else { vec!["the recipe".to_owned()] };
    };
    for free in ["eval", "export"] {
        a.remove(free);
        b.remove(free);
    }
    let mut out = Vec::new();
    diff("", &a, &b, &mut out);
    out
}

/// Whether two TOML texts hold the same tables and values, whatever the order of keys within a
/// table (arrays keep their order); text that does not parse is compared as text.
fn same_toml(a: &str, b: &str) -> bool {
    match (a.parse::<toml::Table>(), b.parse::<toml::Table>()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Rebuild the run's report (`report/`), as after every stage: a report that cannot be built is
/// a warning, never the end of a run (`fuserl report` rebuilds it and says why).
pub fn refresh_report(run_dir: &Path) {
    if let Err(e) = fuserl_report::write_report(run_dir) {
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
    // Every source's answers, each read or generated once: the file sources' records, then the
    // collect stage's answers; scored once, for both training stages.
    let mut answers = read_file_sources(loaded)?;
    answers.extend(collect_stage(loaded, &[], report.collect)?.1);
    // FusePO's own samples join these answers later; otherwise they are needed no more.
    let keep = recipe.po.target_samples > 0 && recipe.po.enabled;
    let scored = score_stage(loaded, if keep { answers.clone() } else { std::mem::take(&mut answers) }, report.score)?;
    refresh_report(&dir);
    let progress = report.step;
    let metrics = run.metrics();
    let tensorboard = recipe.run.report_to.contains(&fuserl_recipe::ReportTo::Tensorboard).then(|| run.tensorboard());
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

    // The data stages of a training stage on the scored groups: weigh, build examples; the
    // examples (with their provenance and token counts) are kept in the stage's folder.
    let tokenized = |stage: StageName, groups: Vec<ScoredGroup>| -> Result<Vec<fuserl_train::data::TrainExample>> {
        let mut p = prepare_stage(loaded, stage, groups)?;
        p.stats.skipped_records = scored.skipped_records;
        p.stats.log(stage);
        let examples = tokenize(p.examples, &p.prompts, &p.texts, &tok, max_len, max_prompt)?;
        let stage_dir = run.stage(stage);
        let stage_root = stage_dir.root();
        std::fs::create_dir_all(stage_root).map_err(|e| TrainError::io(stage_root, e))?;
        let mut text = String::new();
        for e in &examples {
            let line = StageExample {
                example: e.example.clone(),
                token_counts: e.seqs.iter().map(|s| (s.prompt.len(), s.response.len())).collect(),
            };
            // Through a JSON value: keys sorted, as in every examples.jsonl so far.
            let v = serde_json::to_value(&line).map_err(|err| TrainError::Data(err.to_string()))?;
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
                examples: tokenized(StageName::Sft, scored.groups.clone())?,
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
            let groups = if recipe.po.target_samples > 0 {
                // The target's own answers join the sources'; only they are scored now (the
                // others' scores are in the store).
                let n = recipe.po.target_samples;
                let own = target_samples(loaded, &start, n, &po.collect(), &scored.groups, report.collect)?;
                // Every prompt's group, as the scoring stage made them (prepare_stage keeps the PO
                // ones and counts them all); the others' scores come from the store.
                let (mut groups, _) = gather_groups(loaded, answers.iter().cloned().chain([own]).collect())?;
                let reward = loaded.components.reward.as_ref();
                let batch = recipe.data.score_batch_size as usize;
                score::score_answers(reward, &mut groups, Some(&run.score()), batch, &|_| {})?;
                groups
            } else {
                scored.groups.clone()
            };
            let examples = tokenized(StageName::Po, groups)?;
            let objective = loaded.components.po_objective.as_ref();
            let reference = if objective.needs_reference() {
                let cache = po.reference_logps();
                let key = reference_key(&reference_from, &examples)?;
                let cached: Option<HashMap<String, f64>> = std::fs::read(&cache)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<ReferenceLogps>(&b).ok())
                    .filter(|r| r.key == key)
                    .map(|r| r.logps);
                Some(match cached {
                    Some(r) => r,
                    None => {
                        tracing::info!(reference = %Shown(&reference_from), "computing reference log-probs");
                        let reference_model = load::<B>(&reference_from, device, dt)?;
                        let batch = recipe.po.batch_size as usize * 2;
                        let r = reference_logps(&reference_model, &examples, batch, path);
                        drop(reference_model);
                        std::fs::create_dir_all(po.root()).map_err(|e| TrainError::io(po.root(), e))?;
                        let doc = ReferenceLogps { key, reference: reference_from.display().to_string(), logps: r };
                        let text = serde_json::to_value(&doc).map_err(|e| TrainError::Data(e.to_string()))?.to_string();
                        write_atomic(&cache, text.as_bytes())?;
                        doc.logps
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

#[cfg(test)]
mod tests {
    #[test]
    fn a_changed_recipe_names_its_changed_settings_but_eval_and_export_may_change() {
        let a = "[run]\nname = \"x\"\n[sft]\nlearning_rate = 1e-5\nepochs = 1\n[eval]\nsamples = 1\n[export]\nformat = \"safetensors\"\n";
        assert!(super::changed_settings(a, a).is_empty());
        let eval_only = a.replace("samples = 1", "samples = 4").replace("safetensors", "gguf");
        assert!(super::changed_settings(a, &eval_only).is_empty());
        let trained = a.replace("1e-5", "2e-5").replace("[run]\n", "[run]\nseed = 7\n");
        assert_eq!(super::changed_settings(a, &trained), ["run.seed", "sft.learning_rate"]);
        assert_eq!(super::changed_settings(a, "not = [toml"), ["the recipe"]);
    }

    #[test]
    fn recipes_are_compared_as_toml_not_as_text() {
        let a = "[run]\nname = \"x\"\nseed = 1\n[[sources]]\nkind = \"a\"\n[[sources]]\nkind = \"b\"\n";
        let reordered = "[run]\nseed = 1\nname = \"x\"\n[[sources]]\nkind = \"a\"\n[[sources]]\nkind = \"b\"\n";
        assert!(super::same_toml(a, reordered));
        assert!(!super::same_toml(a, &a.replace("seed = 1", "seed = 2")));
        assert!(!super::same_toml(a, &a.replace("\"a\"", "\"c\"")));
        let swapped = "[run]\nname = \"x\"\nseed = 1\n[[sources]]\nkind = \"b\"\n[[sources]]\nkind = \"a\"\n";
        assert!(!super::same_toml(a, swapped), "the order of sources counts");
    }
}
