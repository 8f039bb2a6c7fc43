//! The host-side data stages that connect the extension points: merge what the sources
//! collected into per-prompt groups, score them, weigh them, and build training examples.
//! Every stage checks what a plugin returned, so a faulty plugin is named instead of
//! corrupting training.

use std::collections::{BTreeMap, HashMap};

use fuserl_core::data::StageName;
use fuserl_core::data::{Example, ExampleSequence, ScoredGroup, WeightedGroup};
use fuserl_core::error::{Error, Result};

pub use crate::collect::{assemble_groups, gather_groups, read_file_sources};
use fuserl_core::extension::{Collected, GroupData, PreferenceObjective, RewardModel, WeightingScheme};

/// Score every completion of every group with `reward`, in batches of `batch_size`, in memory
/// (the scoring stage with no store: [`crate::score::score_answers`]).
pub fn score_groups(reward: &dyn RewardModel, groups: &mut [ScoredGroup], batch_size: usize) -> Result<()> {
    crate::score::score_answers(reward, groups, None, batch_size, &|_| {}).map(|_| ())
}

/// Weigh one group. The scheme's answer is checked: one finite, non-negative weight per
/// completion, summing to 1 (within 1e-9).
pub fn weigh_group(scheme: &dyn WeightingScheme, group: ScoredGroup) -> Result<WeightedGroup> {
    let data = GroupData::from_group(&group)?;
    let weights = scheme.weigh(&data.view())?;
    let fail = |message: String| Error::Component {
        point: "weighting scheme",
        name: scheme.name().to_owned(),
        message: format!("{message} (prompt `{}`)", group.prompt.id),
    };
    if weights.len() != data.rewards.len() {
        return Err(fail(format!("returned {} weights for {} completions", weights.len(), data.rewards.len())));
    }
    if let Some(w) = weights.iter().find(|w| !w.is_finite() || **w < 0.0) {
        return Err(fail(format!("returned the weight {w}; weights must be finite and >= 0")));
    }
    let total: f64 = weights.iter().sum();
    if !weights.is_empty() && (total - 1.0).abs() > 1e-9 {
        return Err(fail(format!("returned weights that sum to {total}, not 1")));
    }
    Ok(WeightedGroup { group, weights, weighted_by: scheme.name().to_owned() })
}

/// Build the training examples of one weighted group, with provenance for every sequence.
pub fn build_examples(objective: &dyn PreferenceObjective, weighted: &WeightedGroup) -> Result<Vec<Example>> {
    let mut data = GroupData::from_group(&weighted.group)?;
    data.weights.clone_from(&weighted.weights);
    let specs = objective.build_examples(&data.view())?;
    let fail = |message: String| Error::Component {
        point: "preference objective",
        name: objective.name().to_owned(),
        message: format!("{message} (prompt `{}`)", weighted.group.prompt.id),
    };
    let mut examples = Vec::with_capacity(specs.len());
    for spec in specs {
        if !spec.weight.is_finite() || spec.weight < 0.0 {
            return Err(fail(format!("built an example with weight {}", spec.weight)));
        }
        if spec.members.is_empty() {
            return Err(fail("built an example with no sequences".into()));
        }
        let mut sequences = Vec::with_capacity(spec.members.len());
        for &m in &spec.members {
            let Some(sc) = weighted.group.completions.get(m) else {
                return Err(fail(format!("referred to completion {m} of a group of {}", data.rewards.len())));
            };
            sequences.push(ExampleSequence {
                completion: sc.completion.id.clone(),
                origin: sc.completion.origin.clone(),
                reward: data.rewards[m],
            });
        }
        examples.push(Example {
            prompt_id: weighted.group.prompt.id.clone(),
            objective: objective.name().to_owned(),
            weight: spec.weight,
            sequences,
            notes: spec.notes.into_iter().collect::<BTreeMap<_, _>>(),
        });
    }
    Ok(examples)
}

/// Whether `prompt_id` belongs to `stage` under the recipe's split: every prompt with
/// `split = "shared"`; with `"disjoint"`, a seeded hash of the id decides, so that the
/// split is stable when prompts are added or reordered.
pub fn in_stage(data: &fuserl_recipe::DataConfig, seed: u64, prompt_id: &str, stage: StageName) -> bool {
    match data.split {
        fuserl_recipe::Split::Shared => true,
        fuserl_recipe::Split::Disjoint => {
            let mut hash = fuserl_core::maths::Fnv1a::salted(seed).update(prompt_id.as_bytes()).finish();
            // FNV's high bits barely depend on the last bytes: finish with splitmix64's mixer.
            hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            hash ^= hash >> 31;
            let u = (hash >> 11) as f64 / (1u64 << 53) as f64;
            let po = u < data.po_fraction.unwrap_or(0.5);
            po == (stage == StageName::Po)
        }
    }
}

/// Counts of what [`prepare_examples`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PrepareStats {
    /// Prompts read from the sources.
    pub prompts: usize,
    /// Completions read.
    pub completions: usize,
    /// Malformed records skipped (the recipe allowed it).
    pub skipped_records: u64,
    /// Prompts that belong to the stage.
    pub stage_prompts: usize,
    /// Prompts of the stage that gave no example (for example no pair had a large enough gap).
    pub prompts_without_examples: usize,
    /// Answers the reward skipped (left out).
    pub skipped_by_reward: u64,
    /// Examples built.
    pub examples: usize,
}

/// What [`prepare_examples`] produced: the examples, and the prompts and completion texts they
/// refer to.
#[derive(Clone, Debug, Default)]
pub struct Prepared {
    /// The stage's examples.
    pub examples: Vec<Example>,
    /// Messages of every prompt of the stage, by prompt id.
    pub prompts: HashMap<String, Vec<fuserl_core::data::ChatMessage>>,
    /// Text of every completion of the stage.
    pub texts: HashMap<fuserl_core::data::CompletionId, String>,
    /// Counts.
    pub stats: PrepareStats,
}

/// Run a recipe's data stages for one training stage: read every source (generative ones
/// answer now, unstored), score, weigh, and build the stage objective's examples.
pub fn prepare_examples(
    loaded: &fuserl_recipe::LoadedRecipe,
    stage: StageName,
) -> Result<(Vec<Example>, PrepareStats)> {
    let p = prepare(loaded, stage)?;
    Ok((p.examples, p.stats))
}

/// Like [`prepare_examples`], keeping the prompts and texts the examples refer to.
pub fn prepare(loaded: &fuserl_recipe::LoadedRecipe, stage: StageName) -> Result<Prepared> {
    prepare_with(loaded, stage, read_file_sources(loaded)?, None)
}

/// Like [`prepare`], from every source's `answers` ([`read_file_sources`] and the collect stage's
/// [`crate::collect::collect_stage`], the target's own samples). With `score_dir`
/// (`runs/NAME/score`), scores are kept there and reused ([`crate::score`]).
pub fn prepare_with(
    loaded: &fuserl_recipe::LoadedRecipe,
    stage: StageName,
    answers: Vec<Collected>,
    score_dir: Option<&std::path::Path>,
) -> Result<Prepared> {
    let recipe = &loaded.recipe;
    let (mut groups, skipped) = gather_groups(loaded, answers)?;
    let seed = recipe.run.seed;
    let all = (groups.len(), groups.iter().map(|g| g.completions.len()).sum());
    groups.retain(|g| in_stage(&recipe.data, seed, &g.prompt.id, stage));
    crate::score::score_answers(
        loaded.components.reward.as_ref(),
        &mut groups,
        score_dir,
        recipe.data.score_batch_size as usize,
        &|_| {},
    )?;
    let mut prepared = prepare_stage(loaded, stage, groups)?;
    (prepared.stats.prompts, prepared.stats.completions) = all;
    prepared.stats.skipped_records = skipped;
    prepared.stats.log(stage);
    Ok(prepared)
}

/// The data stages of one training stage on scored groups ([`crate::score::score_stage`]): keep
/// the stage's prompts, leave out the answers the reward skipped, weigh each group and build the
/// stage objective's examples. The counts of the sources (`prompts`, `completions`) are those of
/// `groups`, and `skipped_records` is the caller's to set; the caller logs them
/// ([`PrepareStats::log`]).
pub fn prepare_stage(
    loaded: &fuserl_recipe::LoadedRecipe,
    stage: StageName,
    mut groups: Vec<ScoredGroup>,
) -> Result<Prepared> {
    let recipe = &loaded.recipe;
    let c = &loaded.components;
    let _span = tracing::info_span!("prepare", stage = stage.as_str()).entered();
    let mut stats = PrepareStats {
        prompts: groups.len(),
        completions: groups.iter().map(|g| g.completions.len()).sum(),
        ..PrepareStats::default()
    };
    let seed = recipe.run.seed;
    groups.retain(|g| in_stage(&recipe.data, seed, &g.prompt.id, stage));
    stats.stage_prompts = groups.len();
    // Answers the reward skipped are left out.
    for g in &mut groups {
        let before = g.completions.len();
        g.completions.retain(|c| c.reward.is_some());
        stats.skipped_by_reward += (before - g.completions.len()) as u64;
    }
    let objective = match stage {
        StageName::Sft => c.sft_objective.as_ref(),
        StageName::Po => c.po_objective.as_ref(),
    };
    let mut examples = Vec::new();
    let mut prompts = HashMap::new();
    let mut texts = HashMap::new();
    for group in groups {
        prompts.insert(group.prompt.id.clone(), group.prompt.messages.clone());
        for sc in &group.completions {
            texts.insert(sc.completion.id.clone(), sc.completion.text.clone());
        }
        let weighted = weigh_group(c.weighting.as_ref(), group)?;
        let built = build_examples(objective, &weighted)?;
        if built.is_empty() {
            stats.prompts_without_examples += 1;
        }
        examples.extend(built);
    }
    stats.examples = examples.len();
    Ok(Prepared { examples, prompts, texts, stats })
}

impl PrepareStats {
    /// Log the counts (once the caller has set the sources' counts).
    pub fn log(&self, stage: StageName) {
        tracing::info!(
            stage = stage.as_str(),
            prompts = self.prompts,
            completions = self.completions,
            skipped_records = self.skipped_records,
            stage_prompts = self.stage_prompts,
            prompts_without_examples = self.prompts_without_examples,
            skipped_by_reward = self.skipped_by_reward,
            examples = self.examples,
            "prepared examples"
        );
    }
}
