//! fuserl-run: the stages of a run, from a recipe, in a run directory that resumes: collect
//! (the generative sources answer the recipe's prompts; [`crate::collect`]), score (the
//! reward scores every answer; [`crate::score`]), FuseSFT (`sft.rs`) and FusePO (`po.rs`) on the
//! trainer ([`fuserl_train`]; what both share is in `training.rs`), export ([`crate::export`]),
//! evaluation ([`crate::eval`]). `fuserl run|collect|score|sft|po` call [`run`], [`collect_stage`]
//! and [`score_stage`]; the `local` source ([`local`]) and the `classifier` reward
//! ([`classifier`]) live here because they run a model.
//!
//! The run directory's layout is [`run_dir::RunDir`], the one type that names its paths.
//!
//! Running the same command again resumes: a finished stage is not redone, an interrupted one
//! continues from its last checkpoint.

use std::path::{Path, PathBuf};

use fuserl_backends::{LogProbBackend, OnBackend};
use fuserl_core::data::StageName;
use fuserl_core::paths::Shown;
use fuserl_io::fs::write_atomic;
use fuserl_io::run_dir::RunDir;
use fuserl_recipe::LoadedRecipe;
pub use fuserl_train::trainer::Progress;
pub use fuserl_train::{Result, TrainError};

use crate::collect::{CollectProgress, collect_stage, read_file_sources};
use crate::score::{ScoreProgress, score_stage};
use crate::training::Training;

pub mod card;
pub mod classifier;
pub mod collect;
pub mod eval;
pub mod export;
pub mod inputs;
pub mod local;
pub mod memory;
pub mod pairwise;
pub mod pipeline;
mod po;
pub mod score;
mod sft;
pub mod stages;
pub mod stats;
mod training;

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
    /// eval.json and what it holds, when `[eval] enabled`.
    pub eval: Option<(PathBuf, fuserl_io::artifacts::EvalReport)>,
    /// Stages that were already finished and skipped.
    pub skipped: Vec<StageName>,
}

/// How a run reports progress: training steps, answers collected, answers scored.
pub struct Reporters<'a> {
    /// After each optimiser step.
    pub step: &'a mut dyn FnMut(&Progress),
    /// After each answer a generative source hands over.
    pub collect: &'a (dyn Fn(&CollectProgress<'_>) + Sync),
    /// After each batch the reward scores.
    pub score: &'a dyn Fn(&ScoreProgress<'_>),
    /// After each answer a model gives in the evaluation (`[eval] enabled`).
    pub eval_collect: &'a (dyn Fn(&CollectProgress<'_>) + Sync),
    /// After each batch of the evaluation's answers scored.
    pub eval_score: &'a dyn Fn(&ScoreProgress<'_>),
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
    fuserl_backends::on_backend_with(b.device, b.device_index, b.dtype, b.fusion, Job { loaded, which, report })
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
            // Settings added since the folder was made count with their defaults.
            let previous = LoadedRecipe::with_current_defaults(&previous).unwrap_or(previous);
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
    let mut skipped = Vec::new();
    let training = Training::<B>::new(loaded, run, device, scored.skipped_records)?;
    if recipe.sft.enabled && matches!(which, Which::Sft | Which::All) {
        if sft::sft_stage(&training, scored.groups.clone(), progress)? {
            refresh_report(&dir);
        } else {
            skipped.push(StageName::Sft);
        }
    }
    if recipe.po.enabled && matches!(which, Which::Po | Which::All) {
        if po::po_stage(&training, scored.groups, &answers, report.collect, progress)? {
            refresh_report(&dir);
        } else {
            skipped.push(StageName::Po);
        }
    }
    let run = training.run;
    let metrics = run.metrics();
    let target = training.target;

    let mut export = None;
    if which == Which::All && recipe.export.enabled {
        let _span = tracing::info_span!("stage", name = "export").entered();
        let last = if recipe.po.enabled { StageName::Po } else { StageName::Sft };
        export = stages::recorded(&dir, &recipe.backend, "export", || {
            let export = export::export_stage(loaded, &run.stage(last).final_model(), &target)?;
            if let Some(to) = &export {
                card::write_card(loaded, to)?;
            }
            Ok::<_, TrainError>(export)
        })?;
    }
    let mut eval = None;
    if which == Which::All && recipe.eval.enabled {
        let _span = tracing::info_span!("stage", name = "eval").entered();
        eval = Some(eval::eval_stage(loaded, report.eval_collect, report.eval_score)?);
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
