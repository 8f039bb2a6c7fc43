//! The FuseSFT stage: weighted SFT of the target on the sources' scored answers, into
//! `sft/final` (resumes from `sft/checkpoints`; `sft/DONE` when finished).

use fuserl_backends::LogProbBackend;
use fuserl_core::data::{ScoredGroup, StageName};
use fuserl_io::fs::write_atomic;
use fuserl_train::Result;
use fuserl_train::trainer::Progress;

use crate::training::Training;

/// Run (or resume) FuseSFT on every prompt's scored group (the stage keeps its own prompts).
/// Returns false when the stage was already done (nothing is redone).
pub(crate) fn sft_stage<B: LogProbBackend>(
    t: &Training<'_, B>,
    groups: Vec<ScoredGroup>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<bool> {
    let sft = t.run.stage(StageName::Sft);
    if sft.done().is_file() {
        return Ok(false);
    }
    let _span = tracing::info_span!("stage", name = "sft").entered();
    let recipe = &t.loaded.recipe;
    crate::stages::recorded(t.run.root(), &recipe.backend, "sft", || sft_work(t, groups, progress))?;
    Ok(true)
}

fn sft_work<B: LogProbBackend>(
    t: &Training<'_, B>,
    groups: Vec<ScoredGroup>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<()> {
    let sft = t.run.stage(StageName::Sft);
    let recipe = &t.loaded.recipe;
    t.tok.check_fits(fuserl_model::config::LlamaConfig::from_file(&t.target.join("config.json"))?.vocab_size)?;
    let examples = t.examples(StageName::Sft, groups)?;
    let planned = t.memory_plan(StageName::Sft, &recipe.sft, &examples)?;
    let stage = t.stage(StageName::Sft, &recipe.sft, t.loaded.components.sft_objective.as_ref(), examples, None);
    t.train_and_save(&t.target, stage, &sft.final_model(), progress)?;
    t.memory_measured(StageName::Sft, &planned)?;
    write_atomic(&sft.done(), b"done\n")?;
    Ok(())
}
