//! The evaluation stage (`fuserl eval`, and the last stage of `fuserl run` when `[eval] enabled`):
//! the fused model (the export, else the FusePO or FuseSFT model) and every baseline answer the
//! held-out prompts (`[eval] prompts`), `[eval] samples` answers each, the reward (`[eval.reward]`,
//! else the recipe's `[reward]`) scores the answers, and `runs/NAME/eval/eval.json` gets, per
//! model, the mean reward (per prompt over its answers, then over prompts) with its 95% bootstrap
//! interval over prompts, every reward (for the report's distributions), the mean answer length
//! in tokens (as the model generated them where that was counted: fuserl's own models, servers
//! that report usage; else the target's tokenizer on the text; with its interval) and, for verifier rewards
//! (`python-tests`, `math`), pass@k for k = 1, 2, 5, 10, ... up to `samples` (the HumanEval
//! paper's unbiased estimator, per prompt, then averaged); per baseline, the fused model's win
//! rate against it (by mean reward per prompt, ties counted half) with its interval, and a
//! length-controlled win rate ([`crate::stats`]) with an interval from refitting it on
//! each bootstrap resample. With `[eval.judge]` (a pairwise judge),
//! each baseline also gets the judge's win rate: both orders of every pair asked, to cancel
//! position bias, as Arena-Hard does.
//!
//! ```text
//! runs/NAME/eval/collect/MODEL.jsonl   each model's answers (the collect stage's store: resumes,
//!                                      made afresh when the model changed)
//! runs/NAME/eval/score/REWARD.jsonl    their scores (the scoring stage's store)
//! runs/NAME/eval/judge/judge.jsonl     the pairwise judge's verdicts ([eval.judge]; a store too)
//! runs/NAME/eval/eval.json             the measures (written atomically)
//! ```
//!
//! Baselines (`[eval] baselines`): `target` (the model before fusion), `sft` (the FuseSFT model),
//! `source:NAME` (a generative source of the recipe, asked the same prompts), or a checkpoint
//! folder relative to the recipe. Checkpoints answer through the `local` source with
//! `[eval] temperature`, `max_new_tokens` and `batch_size`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::collect::{CollectPlan, CollectProgress, collect_with};
use crate::pairwise::compare_stage;
use crate::pipeline::assemble_groups;
use crate::score::ScoreProgress;
use crate::stats::{Estimate, bootstrap, bootstrap_mean, length_controlled_win_rate, pass_at_k};
use fuserl_core::data::StageName;
use fuserl_core::data::{Completion, ScoredGroup};
use fuserl_core::data::{Prompt, SamplingParams};
use fuserl_core::extension::Generator;
use fuserl_core::extension::{PairItem, RewardModel};
use fuserl_core::paths::Shown;
use fuserl_core::registry::BuildContext;
use fuserl_io::fs::write_atomic;
use fuserl_model::chat::ChatTokenizer;
use fuserl_recipe::LoadedRecipe;

use crate::local::LocalSource;
use crate::{Result, TrainError};
use fuserl_io::artifacts::{Comparison, EvalAnswer, EvalExample, EvalReport, IntervalMethod, ModelEval, Validation};
use fuserl_io::run_dir::{EvalDir, RunDir};

/// Resamples of every bootstrap interval.
const RESAMPLES: usize = 10_000;

/// One answer's reward (none when the reward skipped it) and length in tokens.
type Answer = (Option<f64>, f64);

/// The length-controlled win rate with its bootstrap interval over prompts (the regression fitted
/// again on each resample); `null` when it cannot be fitted.
fn lc_win_rate(outcomes: &[f64], diffs: &[f64], seed: u64) -> Option<Estimate> {
    let fit = |idx: &[usize]| {
        let o: Vec<f64> = idx.iter().map(|&i| outcomes[i]).collect();
        let d: Vec<f64> = idx.iter().map(|&i| diffs[i]).collect();
        length_controlled_win_rate(&o, &d)
    };
    bootstrap(outcomes.len(), fit, RESAMPLES, 0.95, seed)
}

/// A win rate with its interval; `null` when no prompt has an outcome.
fn win_rate(outcomes: &[f64], seed: u64) -> Option<Estimate> {
    (!outcomes.is_empty()).then(|| bootstrap_mean(outcomes, RESAMPLES, 0.95, seed))
}

/// The k of pass@k for `samples` answers per prompt: 1, 2, 5, 10, 20, 50, ... up to `samples`,
/// and `samples` itself.
fn pass_ks(samples: u32) -> Vec<u64> {
    let n = u64::from(samples);
    let mut ks: Vec<u64> = (0..).flat_map(|d| [1, 2, 5].map(|m| m * 10u64.pow(d))).take_while(|k| *k < n).collect();
    ks.push(n);
    ks
}

/// Run (or resume) the evaluation; returns the path of eval.json and its contents.
pub fn eval_stage(
    loaded: &LoadedRecipe,
    collect_progress: &(dyn Fn(&CollectProgress<'_>) + Sync),
    score_progress: &dyn Fn(&ScoreProgress<'_>),
) -> Result<(PathBuf, EvalReport)> {
    crate::stages::recorded(&loaded.output_dir(), &loaded.recipe.backend, "eval", || {
        eval_work(loaded, collect_progress, score_progress)
    })
}

fn eval_work(
    loaded: &LoadedRecipe,
    collect_progress: &(dyn Fn(&CollectProgress<'_>) + Sync),
    score_progress: &dyn Fn(&ScoreProgress<'_>),
) -> Result<(PathBuf, EvalReport)> {
    let recipe = &loaded.recipe;
    let e = &recipe.eval;
    let prompts_file = e.prompts.as_deref().map(|p| loaded.base_dir.join(p)).ok_or_else(|| {
        TrainError::Data(format!("{}: [eval] prompts: name the held-out prompts file", Shown(&loaded.file)))
    })?;
    // `[eval.reward]`, else the recipe's own reward (which must score new answers).
    let (reward, table) = match &loaded.components.eval_reward {
        Some(r) => (r.as_ref(), "[eval.reward]"),
        None => (loaded.components.reward.as_ref(), "[reward]"),
    };
    if !reward.traits().stored && reward.composite().is_none() {
        return Err(TrainError::Data(format!(
            "{}: {table} kind = \"{}\" cannot score new answers (its scores come with the data); evaluate with a reward that scores any answer ([eval.reward])",
            Shown(&loaded.file),
            reward.name()
        )));
    }
    let prompts: Vec<Prompt> = fuserl_io::prompts::read_prompts(&prompts_file)?.prompts;
    if prompts.is_empty() {
        return Err(TrainError::Data(format!("{}: no prompts", Shown(&prompts_file))));
    }
    fuserl_core::paths::check_links_stay_inside(&loaded.output_dir())?;
    let run = RunDir::new(loaded.output_dir());
    let eval_dir = run.eval();
    let dir = eval_dir.root().to_path_buf();
    let target = loaded.base_dir.join(&recipe.target.checkpoint);
    let ctx = BuildContext::new(loaded.base_dir.clone(), recipe.run.seed, recipe.backend.clone());
    let max_prompt = recipe.target.generation_prompt_length();
    let checkpoint_source = |name: &str, path: &Path| -> Result<LocalSource> {
        if !fuserl_model::checkpoint::is_checkpoint(path) {
            return Err(TrainError::Data(format!(
                "[eval]: model `{name}`: {} is not a checkpoint yet (run `fuserl run` first, or fix [eval] baselines)",
                Shown(path)
            )));
        }
        LocalSource::for_checkpoint(
            name,
            path,
            max_prompt,
            Some(e.batch_size),
            ["[eval] batch_size", "[eval] max_new_tokens", "[target] max_prompt_length"],
            &ctx,
        )
        .map_err(|err| TrainError::Data(format!("[eval] {name}: {err}")))
    };
    // The fused model first, then the baselines in the recipe's order.
    // The export, else the last stage's model (a recipe may not export).
    let fused = [loaded.export_dir(), run.stage(StageName::Po).final_model(), run.stage(StageName::Sft).final_model()]
        .into_iter()
        .find(|p| fuserl_model::checkpoint::is_checkpoint(p))
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
            "sft" => ("sft".to_owned(), run.stage(StageName::Sft).final_model()),
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
        samples_per_prompt: e.samples,
        sampling: &sampling,
        run_seed: recipe.run.seed,
        restart_changed: true,
    };
    let collected = collect_with(&generators, &plan, &eval_dir.collect(), &[], collect_progress)?;
    let mut groups = assemble_groups(collected)?;
    let batch = recipe.data.score_batch_size as usize;
    crate::score::score_answers(reward, &mut groups, Some(&eval_dir.score()), batch, score_progress)?;

    // Per model: prompt -> its answers' (reward, length in tokens).
    let tok =
        ChatTokenizer::load(&target, recipe.target.chat_template.as_ref().map(|t| loaded.base_dir.join(t)).as_deref())?;
    let mut by_model: BTreeMap<String, HashMap<String, Vec<Answer>>> = BTreeMap::new();
    // Each answer's length, for the judge's length-controlled win rate: the tokens the model
    // generated when its store counted them (encoding the decoded text again can give more: a
    // reply cut inside a character decodes to replacement characters of three bytes each), else
    // the target's tokenizer on the text.
    let mut counted: HashMap<String, BTreeMap<(String, u32), fuserl_core::extension::Generated>> = HashMap::new();
    for g in &groups {
        for c in &g.completions {
            let source = &c.completion.id.source;
            if !counted.contains_key(source) {
                let records = fuserl_io::store::read_records(&eval_dir.collect(), source)?;
                counted.insert(source.clone(), records);
            }
        }
    }
    let mut length_of: HashMap<(&str, &str, u32), f64> = HashMap::new();
    for g in &groups {
        for c in &g.completions {
            let id = &c.completion.id;
            let stored = counted
                .get(&id.source)
                .and_then(|r| r.get(&(id.prompt_id.clone(), id.sample_index)))
                .and_then(|a| a.completion_tokens);
            let len = match stored {
                Some(n) => n as f64,
                None => tok.encode(&c.completion.text)?.len() as f64,
            };
            length_of.insert((id.source.as_str(), id.prompt_id.as_str(), id.sample_index), len);
            by_model
                .entry(c.completion.id.source.clone())
                .or_default()
                .entry(g.prompt.id.clone())
                .or_default()
                .push((c.reward.as_ref().map(|r| r.value), len));
        }
    }
    let order: Vec<String> = generators.iter().map(|g| g.source_name().to_owned()).collect();
    let seed = recipe.run.seed;
    let verifier = reward.traits().verifier;
    let ks = pass_ks(e.samples);
    // A prompt's mean reward over its scored answers (None when none was scored).
    let prompt_mean = |answers: &[Answer]| {
        let scored: Vec<f64> = answers.iter().filter_map(|a| a.0).collect();
        (!scored.is_empty()).then(|| scored.iter().sum::<f64>() / scored.len() as f64)
    };
    let mut models = Vec::new();
    for name in &order {
        let answers = &by_model[name];
        let per_prompt: Vec<&[Answer]> = prompts.iter().filter_map(|p| answers.get(&p.id).map(Vec::as_slice)).collect();
        let means: Vec<f64> = per_prompt.iter().filter_map(|a| prompt_mean(a)).collect();
        let rewards: Vec<f64> = per_prompt.iter().flat_map(|a| a.iter().filter_map(|x| x.0)).collect();
        let lengths: Vec<f64> = per_prompt.iter().flat_map(|a| a.iter().map(|x| x.1)).collect();
        let per_prompt_lengths: Vec<f64> =
            per_prompt.iter().map(|a| a.iter().map(|x| x.1).sum::<f64>() / a.len().max(1) as f64).collect();
        let mut m = ModelEval {
            name: name.clone(),
            answers: lengths.len(),
            mean_reward: bootstrap_mean(&means, RESAMPLES, 0.95, seed),
            mean_length_tokens: bootstrap_mean(&per_prompt_lengths, RESAMPLES, 0.95, seed),
            rewards,
            pass_at: BTreeMap::new(),
        };
        if verifier {
            for &k in &ks {
                // Per prompt with all `samples` answers scored: the unbiased estimator.
                let per: Vec<f64> = per_prompt
                    .iter()
                    .filter(|a| a.len() >= e.samples as usize && a.iter().all(|x| x.0.is_some()))
                    .map(|a| {
                        let n = a.len() as u64;
                        let c = a.iter().filter(|x| x.0.is_some_and(|r| r >= 1.0)).count() as u64;
                        pass_at_k(n, c, k)
                    })
                    .collect();
                m.pass_at.insert(ModelEval::pass_key(k), bootstrap_mean(&per, RESAMPLES, 0.95, seed));
            }
        }
        models.push(m);
    }
    let fused = &by_model["fused"];
    let mut comparisons = Vec::new();
    for name in order.iter().skip(1) {
        let base = &by_model[name];
        let (mut outcomes, mut diffs) = (Vec::new(), Vec::new());
        for p in &prompts {
            let (Some(fa), Some(ba)) = (fused.get(&p.id), base.get(&p.id)) else { continue };
            if let (Some(a), Some(b)) = (prompt_mean(fa), prompt_mean(ba)) {
                outcomes.push(if a > b {
                    1.0
                } else if a < b {
                    0.0
                } else {
                    0.5
                });
                let mean_len = |x: &[Answer]| x.iter().map(|y| y.1).sum::<f64>() / x.len() as f64;
                diffs.push(mean_len(fa) - mean_len(ba));
            }
        }
        comparisons.push(Comparison {
            model: "fused".into(),
            baseline: name.clone(),
            by: "reward".into(),
            win_rate: win_rate(&outcomes, seed),
            length_controlled_win_rate: lc_win_rate(&outcomes, &diffs, seed),
            orders_agree: None,
        });
    }
    if let Some(judge) = &loaded.components.eval_judge {
        comparisons.extend(judge_comparisons(
            judge.as_ref(),
            &groups,
            &order,
            &length_of,
            &eval_dir,
            seed,
            score_progress,
        )?);
    }
    // The validation prompts: the fused model alone, scored by the training reward.
    let validation = match &e.validation {
        Some(file) => {
            let file = loaded.base_dir.join(file);
            let val_prompts = fuserl_io::prompts::read_prompts(&file)?.prompts;
            let plan = CollectPlan { prompts: &val_prompts, ..plan };
            let vdir = eval_dir.validation();
            let collected = collect_with(&generators[..1], &plan, &vdir.collect(), &[], collect_progress)?;
            let mut vgroups = assemble_groups(collected)?;
            let train_reward = loaded.components.reward.as_ref();
            crate::score::score_answers(train_reward, &mut vgroups, Some(&vdir.score()), batch, score_progress)?;
            let mut per_prompt: HashMap<&str, Vec<f64>> = HashMap::new();
            for g in &vgroups {
                for c in &g.completions {
                    if let Some(r) = &c.reward {
                        per_prompt.entry(g.prompt.id.as_str()).or_default().push(r.value);
                    }
                }
            }
            let means: Vec<f64> = val_prompts
                .iter()
                .filter_map(|p| per_prompt.get(p.id.as_str()).map(|v| v.iter().sum::<f64>() / v.len() as f64))
                .collect();
            let mut v = Validation {
                prompts: Shown(&file).to_string(),
                n_prompts: val_prompts.len(),
                reward: train_reward.scorer_id(),
                mean_reward: bootstrap_mean(&means, RESAMPLES, 0.95, seed),
                pass_at_1: None,
            };
            if train_reward.traits().verifier {
                let passed: Vec<f64> = val_prompts
                    .iter()
                    .filter_map(|p| per_prompt.get(p.id.as_str()))
                    .map(|v| v.iter().filter(|r| **r >= 1.0).count() as f64 / v.len() as f64)
                    .collect();
                v.pass_at_1 = Some(bootstrap_mean(&passed, RESAMPLES, 0.95, seed));
            }
            Some(v)
        }
        None => None,
    };
    // The first prompts with each model's first answer, side by side (the report's examples).
    let examples: Vec<EvalExample> = prompts
        .iter()
        .take(EvalExample::PROMPTS)
        .filter_map(|p| {
            let group = groups.iter().find(|g| g.prompt.id == p.id)?;
            let answers = order
                .iter()
                .filter_map(|name| {
                    let c = group
                        .completions
                        .iter()
                        .filter(|c| &c.completion.id.source == name)
                        .min_by_key(|c| c.completion.id.sample_index)?;
                    Some(EvalAnswer {
                        model: name.clone(),
                        text: EvalExample::cut(&c.completion.text),
                        reward: c.reward.as_ref().map(|r| r.value),
                    })
                })
                .collect();
            let asked = p.messages.iter().rev().find(|m| m.role == "user").or(p.messages.last());
            Some(EvalExample {
                prompt_id: p.id.clone(),
                prompt: EvalExample::cut(asked.map_or("", |m| m.content.as_str())),
                answers,
            })
        })
        .collect();
    let doc = EvalReport {
        prompts: Shown(&prompts_file).to_string(),
        n_prompts: prompts.len(),
        samples: e.samples,
        reward: reward.scorer_id(),
        judge: loaded.components.eval_judge.as_ref().map(|j| j.scorer_id()),
        verifier,
        interval: IntervalMethod {
            level: 0.95,
            method: "percentile bootstrap over prompts".into(),
            resamples: RESAMPLES,
            seed,
        },
        models,
        comparisons,
        validation,
        examples,
    };
    std::fs::create_dir_all(&dir).map_err(|err| TrainError::io(&dir, err))?;
    let file = eval_dir.json();
    let text = serde_json::to_string_pretty(&doc).map_err(|err| TrainError::Data(err.to_string()))?;
    write_atomic(&file, text.as_bytes())?;
    // The export's model card shows the evaluation's table.
    crate::card::refresh(loaded)?;
    Ok((file, doc))
}

/// The fused model against each baseline by a pairwise judge: for every prompt, the judge
/// compares the two first answers in both orders (fused first, then the baseline first), and the
/// fused model's outcome on the prompt is the mean of its two preferences (one when the judge
/// skipped the other), so a judge that favours a position gains nothing. The verdicts are kept in
/// `eval/judge/judge.jsonl` (a rerun asks only for the missing ones).
fn judge_comparisons(
    judge: &dyn RewardModel,
    groups: &[ScoredGroup],
    order: &[String],
    length_of: &HashMap<(&str, &str, u32), f64>,
    dir: &EvalDir,
    seed: u64,
    progress: &dyn Fn(&ScoreProgress<'_>),
) -> Result<Vec<Comparison>> {
    let first = |g: &'_ ScoredGroup, model: &str| {
        g.completions.iter().map(|c| &c.completion).find(|c| c.id.source == model && c.id.sample_index == 0).cloned()
    };
    // (baseline, prompt index, fused answer, baseline answer)
    let mut pairs = Vec::new();
    for name in order.iter().skip(1) {
        for (gi, g) in groups.iter().enumerate() {
            if let (Some(f), Some(b)) = (first(g, "fused"), first(g, name)) {
                pairs.push((name.clone(), gi, f, b));
            }
        }
    }
    let items: Vec<PairItem<'_>> = pairs
        .iter()
        .flat_map(|(_, gi, f, b)| {
            let messages = groups[*gi].prompt.messages.as_slice();
            [PairItem { messages, a: f, b }, PairItem { messages, a: b, b: f }]
        })
        .collect();
    let label = format!("{} (pairwise)", judge.scorer_id());
    let (prefs, _) = compare_stage(judge, &items, &dir.judge(), "judge", progress)?;
    let mut out = Vec::new();
    for name in order.iter().skip(1) {
        let (mut outcomes, mut diffs, mut both, mut agree) = (Vec::new(), Vec::new(), 0usize, 0usize);
        for (k, (baseline, _, f, b)) in pairs.iter().enumerate() {
            if baseline != name {
                continue;
            }
            // Fused first: its preference; baseline first: one minus it.
            let (p1, p2) = (prefs[2 * k], 1.0 - prefs[2 * k + 1]);
            let known: Vec<f64> = [p1, p2].into_iter().filter(|p| !p.is_nan()).collect();
            if known.is_empty() {
                continue;
            }
            if known.len() == 2 {
                both += 1;
                agree += usize::from(p1 == p2);
            }
            outcomes.push(known.iter().sum::<f64>() / known.len() as f64);
            let len = |c: &Completion| length_of[&(c.id.source.as_str(), c.id.prompt_id.as_str(), c.id.sample_index)];
            diffs.push(len(f) - len(b));
        }
        out.push(Comparison {
            model: "fused".into(),
            baseline: name.clone(),
            by: label.clone(),
            win_rate: win_rate(&outcomes, seed),
            length_controlled_win_rate: lc_win_rate(&outcomes, &diffs, seed),
            orders_agree: Some((both > 0).then(|| agree as f64 / both as f64)),
        });
    }
    Ok(out)
}
