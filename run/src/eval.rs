//! The evaluation stage (`fuserl eval`, and the last stage of `fuserl run` when `[eval] enabled`):
//! the fused model (the export, else the FusePO or FuseSFT model) and every baseline answer the
//! held-out prompts (`[eval] prompts`) once each, the recipe's reward scores the answers, and
//! `runs/NAME/eval/eval.json` gets, per model, the
//! mean reward with its 95% bootstrap interval over prompts, the mean answer length in tokens
//! (the target's tokenizer, the same for every model) and, for verifier rewards (`python-tests`,
//! `math`), pass@1; per baseline, the fused model's win rate against it (by reward, ties counted
//! half) with its interval, and a length-controlled win rate ([`fuserl_core::stats`]).
//!
//! ```text
//! runs/NAME/eval/collect/MODEL.jsonl   each model's answers (the collect stage's store: resumes,
//!                                      made afresh when the model changed)
//! runs/NAME/eval/score/REWARD.jsonl    their scores (the scoring stage's store)
//! runs/NAME/eval/eval.json             the measures (written atomically)
//! ```
//!
//! Baselines (`[eval] baselines`): `target` (the model before fusion), `sft` (the FuseSFT model),
//! `source:NAME` (a generative source of the recipe, asked the same prompts), or a checkpoint
//! folder relative to the recipe. Checkpoints answer through the `local` source with
//! `[eval] temperature` and `max_new_tokens`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use fuserl_core::collect::{CollectPlan, CollectProgress, collect_with};
use fuserl_core::data::{Prompt, SamplingParams};
use fuserl_core::extension::Generator;
use fuserl_core::paths::Shown;
use fuserl_core::pipeline::assemble_groups;
use fuserl_core::recipe::LoadedRecipe;
use fuserl_core::registry::BuildContext;
use fuserl_core::score::ScoreProgress;
use fuserl_core::stats::{Estimate, bootstrap_mean, length_controlled_win_rate};
use fuserl_model::chat::ChatTokenizer;
use fuserl_train::trainer::write_atomic;
use serde_json::{Value, json};

use crate::local::LocalSource;
use crate::{Result, TrainError};

/// Resamples of every bootstrap interval.
const RESAMPLES: usize = 10_000;

fn estimate(e: &Estimate) -> Value {
    json!({"mean": e.mean, "low": e.low, "high": e.high, "n": e.n})
}

/// Run (or resume) the evaluation; returns the path of eval.json and its contents.
pub fn eval_stage(
    loaded: &LoadedRecipe,
    collect_progress: &(dyn Fn(&CollectProgress<'_>) + Sync),
    score_progress: &dyn Fn(&ScoreProgress<'_>),
) -> Result<(PathBuf, Value)> {
    let recipe = &loaded.recipe;
    let e = &recipe.eval;
    let prompts_file = e.prompts.as_deref().map(|p| loaded.base_dir.join(p)).ok_or_else(|| {
        TrainError::Data(format!("{}: [eval] prompts: name the held-out prompts file", Shown(&loaded.file)))
    })?;
    let reward = loaded.components.reward.as_ref();
    if !reward.stored() && reward.parts().is_empty() {
        return Err(TrainError::Data(format!(
            "{}: [reward] kind = \"{}\" cannot score new answers (its scores come with the data); evaluate with a reward that scores any answer",
            Shown(&loaded.file),
            reward.name()
        )));
    }
    let prompts: Vec<Prompt> = fuserl_core::prompts::read_prompts(&prompts_file)?.prompts;
    if prompts.is_empty() {
        return Err(TrainError::Data(format!("{}: no prompts", Shown(&prompts_file))));
    }
    let dir = loaded.output_dir().join("eval");
    let target = loaded.base_dir.join(&recipe.target.checkpoint);
    let ctx =
        BuildContext { base_dir: loaded.base_dir.clone(), seed: recipe.run.seed, backend: recipe.backend.clone() };
    let max_prompt = recipe.target.max_prompt_length.unwrap_or(recipe.target.max_length.saturating_sub(1).max(1));
    let checkpoint_source = |name: &str, path: &Path| -> Result<LocalSource> {
        if !path.join("config.json").is_file() {
            return Err(TrainError::Data(format!(
                "[eval]: model `{name}`: {} is not a checkpoint yet (run `fuserl run` first, or fix [eval] baselines)",
                Shown(path)
            )));
        }
        LocalSource::for_checkpoint(name, path, max_prompt, &ctx)
            .map_err(|err| TrainError::Data(format!("[eval] {name}: {err}")))
    };
    // The fused model first, then the baselines in the recipe's order.
    // The export, else the last stage's model (a recipe may not export).
    let out = loaded.output_dir();
    let fused = [loaded.export_dir(), out.join("po/final"), out.join("sft/final")]
        .into_iter()
        .find(|p| p.join("config.json").is_file())
        .unwrap_or_else(|| loaded.export_dir());
    let mut locals: Vec<(String, LocalSource)> = vec![("fused".into(), checkpoint_source("fused", &fused)?)];
    let mut sources: Vec<&dyn Generator> = Vec::new();
    for b in &e.baselines {
        if let Some(name) = b.strip_prefix("source:") {
            let g = loaded
                .components
                .sources
                .iter()
                .filter_map(|s| s.generator())
                .find(|g| g.source_name() == name)
                .ok_or_else(|| {
                    TrainError::Data(format!("[eval] baselines: `{b}`: the recipe has no generative source `{name}`"))
                })?;
            sources.push(g);
            continue;
        }
        let (name, path) = match b.as_str() {
            "target" => ("target".to_owned(), target.clone()),
            "sft" => ("sft".to_owned(), loaded.output_dir().join("sft/final")),
            other => {
                let p = loaded.base_dir.join(other);
                let name = p.file_name().map_or_else(|| other.to_owned(), |n| n.to_string_lossy().into_owned());
                (name, p)
            }
        };
        locals.push((name.clone(), checkpoint_source(&name, &path)?));
    }
    let mut generators: Vec<&dyn Generator> = locals.iter().map(|(_, s)| s as &dyn Generator).collect();
    generators.extend(sources);
    let mut names: Vec<&str> = generators.iter().map(|g| g.source_name()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(TrainError::Data(format!("[eval] baselines: two models are named `{}`", w[0])));
    }
    let sampling = SamplingParams {
        temperature: Some(e.temperature),
        max_new_tokens: Some(e.max_new_tokens),
        ..SamplingParams::default()
    };
    let plan = CollectPlan {
        prompts: &prompts,
        samples_per_prompt: 1,
        sampling: &sampling,
        run_seed: recipe.run.seed,
        restart_changed: true,
    };
    let collected = collect_with(&generators, &plan, &dir.join("collect"), &[], collect_progress)?;
    let mut groups = assemble_groups(collected)?;
    let batch = recipe.data.score_batch_size as usize;
    fuserl_core::score::score_stage(reward, &mut groups, Some(&dir.join("score")), batch, score_progress)?;

    // Per model: prompt -> (reward, length in tokens).
    let tok =
        ChatTokenizer::load(&target, recipe.target.chat_template.as_ref().map(|t| loaded.base_dir.join(t)).as_deref())?;
    let mut by_model: BTreeMap<String, HashMap<String, (Option<f64>, f64)>> = BTreeMap::new();
    for g in &groups {
        for c in &g.completions {
            let len = tok.encode(&c.completion.text)?.len() as f64;
            by_model
                .entry(c.completion.id.source.clone())
                .or_default()
                .insert(g.prompt.id.clone(), (c.reward.as_ref().map(|r| r.value), len));
        }
    }
    let order: Vec<String> = generators.iter().map(|g| g.source_name().to_owned()).collect();
    let seed = recipe.run.seed;
    let verifier = matches!(reward.name(), "python-tests" | "math");
    let mut models = Vec::new();
    for name in &order {
        let answers = &by_model[name];
        let rewards: Vec<f64> = prompts.iter().filter_map(|p| answers.get(&p.id).and_then(|a| a.0)).collect();
        let lengths: Vec<f64> = prompts.iter().filter_map(|p| answers.get(&p.id).map(|a| a.1)).collect();
        let mut m = json!({
            "name": name,
            "mean_reward": estimate(&bootstrap_mean(&rewards, RESAMPLES, 0.95, seed)),
            "mean_length_tokens": lengths.iter().sum::<f64>() / lengths.len().max(1) as f64,
        });
        if verifier {
            let passed: Vec<f64> = rewards.iter().map(|r| if *r >= 1.0 { 1.0 } else { 0.0 }).collect();
            m["pass_at_1"] = estimate(&bootstrap_mean(&passed, RESAMPLES, 0.95, seed));
        }
        models.push(m);
    }
    let fused = &by_model["fused"];
    let mut comparisons = Vec::new();
    for name in order.iter().skip(1) {
        let base = &by_model[name];
        let (mut outcomes, mut diffs) = (Vec::new(), Vec::new());
        for p in &prompts {
            if let (Some((Some(a), la)), Some((Some(b), lb))) = (fused.get(&p.id), base.get(&p.id)) {
                outcomes.push(if a > b {
                    1.0
                } else if a < b {
                    0.0
                } else {
                    0.5
                });
                diffs.push(la - lb);
            }
        }
        comparisons.push(json!({
            "model": "fused",
            "baseline": name,
            "win_rate": estimate(&bootstrap_mean(&outcomes, RESAMPLES, 0.95, seed)),
            "length_controlled_win_rate": length_controlled_win_rate(&outcomes, &diffs),
        }));
    }
    let doc = json!({
        "prompts": Shown(&prompts_file).to_string(),
        "n_prompts": prompts.len(),
        "reward": reward.scorer_id(),
        "interval": {"level": 0.95, "method": "percentile bootstrap over prompts", "resamples": RESAMPLES, "seed": seed},
        "models": models,
        "comparisons": comparisons,
    });
    std::fs::create_dir_all(&dir).map_err(|err| TrainError::io(&dir, err))?;
    let file = dir.join("eval.json");
    let text = serde_json::to_string_pretty(&doc).map_err(|err| TrainError::Data(err.to_string()))?;
    write_atomic(&file, text.as_bytes())?;
    Ok((file, doc))
}
