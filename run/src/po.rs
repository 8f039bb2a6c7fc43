//! The FusePO stage: weighted multi-source preference optimisation (DPO, SimPO, RLOO or a
//! plugin's objective) from the FuseSFT model, into `po/final` (resumes from `po/checkpoints`;
//! `po/DONE` when finished). With `[po] target_samples` the model's own answers join the sources'
//! (kept in `po/collect`); the reference's log-probs are cached in `po/reference_logps.json`.

use std::collections::HashMap;
use std::path::Path;

use fuserl_backends::LogProbBackend;
use fuserl_core::data::{Prompt, ScoredGroup, StageName};
use fuserl_core::extension::{Collected, Generator};
use fuserl_core::paths::Shown;
use fuserl_core::registry::BuildContext;
use fuserl_io::artifacts::ReferenceLogps;
use fuserl_io::fs::write_atomic;
use fuserl_model::checkpoint::load_with;
use fuserl_recipe::{LoadedRecipe, ReferenceModel};
use fuserl_train::data::TrainExample;
use fuserl_train::trainer::{Progress, reference_logps};
use fuserl_train::{Result, TrainError};

use crate::collect::{CollectPlan, CollectProgress, collect_with, gather_groups};
use crate::local::{self, LocalSource};
use crate::pipeline::in_stage;
use crate::score;
use crate::training::Training;

/// Run (or resume) FusePO. `groups` are every prompt's scored groups and `answers` every
/// source's answers (kept only when `[po] target_samples` adds the target's own). Returns false
/// when the stage was already done (nothing is redone).
pub(crate) fn po_stage<B: LogProbBackend>(
    t: &Training<'_, B>,
    groups: Vec<ScoredGroup>,
    answers: &[Collected],
    collect_progress: &(dyn Fn(&CollectProgress<'_>) + Sync),
    progress: &mut dyn FnMut(&Progress),
) -> Result<bool> {
    let po = t.run.stage(StageName::Po);
    if po.done().is_file() {
        return Ok(false);
    }
    let _span = tracing::info_span!("stage", name = "po").entered();
    let backend = &t.loaded.recipe.backend;
    crate::stages::recorded(t.run.root(), backend, "po", || po_work(t, groups, answers, collect_progress, progress))?;
    Ok(true)
}

fn po_work<B: LogProbBackend>(
    t: &Training<'_, B>,
    groups: Vec<ScoredGroup>,
    answers: &[Collected],
    collect_progress: &(dyn Fn(&CollectProgress<'_>) + Sync),
    progress: &mut dyn FnMut(&Progress),
) -> Result<()> {
    let po = t.run.stage(StageName::Po);
    let loaded = t.loaded;
    let recipe = &loaded.recipe;
    let start = if recipe.sft.enabled {
        let sft = t.run.stage(StageName::Sft);
        if !sft.done().is_file() {
            return Err(TrainError::Data(format!(
                "FusePO starts from the FuseSFT model, and {} has none yet: run `fuserl sft` (or `fuserl run`) first",
                Shown(t.run.root())
            )));
        }
        sft.final_model()
    } else {
        t.target.clone()
    };
    let reference_from = match recipe.po.reference {
        Some(ReferenceModel::Target) => t.target.clone(),
        _ => start.clone(),
    };
    let groups = if recipe.po.target_samples > 0 {
        // The target's own answers join the sources'; only they are scored now (the others'
        // scores are in the store).
        let own = target_samples(loaded, &start, recipe.po.target_samples, &po.collect(), &groups, collect_progress)?;
        // Every prompt's group, as the scoring stage made them (prepare_stage keeps the PO ones
        // and counts them all); the others' scores come from the store.
        let (mut groups, _) = gather_groups(loaded, answers.iter().cloned().chain([own]).collect())?;
        let reward = loaded.components.reward.as_ref();
        let batch = recipe.data.score_batch_size as usize;
        score::score_answers(reward, &mut groups, Some(&t.run.score()), batch, &|_| {})?;
        groups
    } else {
        groups
    };
    let examples = t.examples(StageName::Po, groups)?;
    let objective = loaded.components.po_objective.as_ref();
    let planned = t.memory_plan(StageName::Po, &recipe.po, &examples)?;
    let reference =
        if objective.needs_reference() { Some(reference_logps_cached(t, &reference_from, &examples)?) } else { None };
    let stage = t.stage(StageName::Po, &recipe.po, objective, examples, reference);
    t.train_and_save(&start, stage, &po.final_model(), progress)?;
    t.memory_measured(StageName::Po, &planned)?;
    write_atomic(&po.done(), b"done\n")?;
    Ok(())
}

/// The reference model's log-prob of every sequence of `examples`, from `po/reference_logps.json`
/// when it was made from the same weights and tokens, computed (and kept there) otherwise.
fn reference_logps_cached<B: LogProbBackend>(
    t: &Training<'_, B>,
    reference_from: &Path,
    examples: &[TrainExample],
) -> Result<HashMap<String, f64>> {
    let po = t.run.stage(StageName::Po);
    let cache = po.reference_logps();
    // A quantised base (QLoRA) gives other log-probs than the same weights in floats.
    let quant = recipe_base_quant(t);
    let key =
        format!("{}{}", reference_key(reference_from, examples)?, quant.map_or(String::new(), |q| format!("-{q}")));
    let cached = std::fs::read(&cache)
        .ok()
        .and_then(|b| serde_json::from_slice::<ReferenceLogps>(&b).ok())
        .filter(|r| r.key == key)
        .map(|r| r.logps);
    if let Some(r) = cached {
        return Ok(r);
    }
    tracing::info!(reference = %Shown(reference_from), "computing reference log-probs");
    let recipe = &t.loaded.recipe;
    // Loaded as the policy is (weights in the master type, computing in the compute dtype), so
    // that the policy and the reference give the same log-probs at step 0.
    // With LoRA the policy's base is in the compute dtype (its adapters in f32, as an adapter
    // folder loads).
    let weights = if recipe.target.lora.is_some() { t.dtype } else { fuserl_backends::master_dtype(&recipe.backend) };
    let base = t.loaded.recipe.target.lora.as_ref().map(crate::training::base_quant).unwrap_or_default();
    let mut reference_model = load_with::<B>(reference_from, t.device, weights, base)?;
    reference_model.dtype = t.dtype;
    // What loading read and converted is given back (as for the policy, `Training::train_and_save`).
    fuserl_backends::release_freed_memory();
    let batch = recipe.po.batch_size as usize * 2;
    let r = reference_logps(&reference_model, examples, batch, recipe.backend.logprobs);
    drop(reference_model);
    fuserl_backends::release_freed_memory();
    std::fs::create_dir_all(po.root()).map_err(|e| TrainError::io(po.root(), e))?;
    let doc = ReferenceLogps { key, reference: reference_from.display().to_string(), logps: r };
    let text = serde_json::to_value(&doc).map_err(|e| TrainError::Data(e.to_string()))?.to_string();
    write_atomic(&cache, text.as_bytes())?;
    Ok(doc.logps)
}

/// `quantize_base` as the recipe spells it, when the reference's base is quantised.
fn recipe_base_quant<B: LogProbBackend>(t: &Training<'_, B>) -> Option<&'static str> {
    t.loaded.recipe.target.lora.as_ref().and_then(|l| l.quantize_base).map(|q| q.as_str())
}

/// A key for cached reference log-probs: a hash of the reference checkpoint's weight files and of
/// every sequence's tokens.
fn reference_key(checkpoint: &Path, examples: &[TrainExample]) -> Result<String> {
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
    let max_prompt = recipe.target.generation_prompt_length();
    let source = LocalSource::for_checkpoint(
        "target",
        start,
        max_prompt,
        None,
        ["", "[data.sampling] max_new_tokens", "[target] max_prompt_length"],
        &ctx,
    )
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
