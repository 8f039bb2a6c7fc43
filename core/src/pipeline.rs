//! The host-side data stages that connect the extension points: merge what the sources
//! collected into per-prompt groups, score them, weigh them, and build training examples.
//! Every stage checks what a plugin returned, so a faulty plugin is named instead of
//! corrupting training.

use std::collections::{BTreeMap, HashMap};

use crate::data::{Completion, Example, ExampleSequence, Prompt, ScoredCompletion, ScoredGroup, WeightedGroup};
use crate::error::{Error, Result};
use crate::extension::{Collected, GroupView, PreferenceObjective, RewardModel, WeightingScheme};

/// Merge what several sources collected into one group per prompt, in order of first
/// appearance. The same prompt id with different messages, or the same completion id twice,
/// is an error that names both records.
pub fn assemble_groups(collected: Vec<Collected>) -> Result<Vec<ScoredGroup>> {
    let mut order: Vec<String> = Vec::new();
    let mut prompts: HashMap<String, Prompt> = HashMap::new();
    let mut members: HashMap<String, Vec<Completion>> = HashMap::new();
    for c in collected {
        for p in c.prompts {
            match prompts.get(&p.id) {
                Some(existing) if existing.messages != p.messages => {
                    return Err(Error::Record {
                        record: format!("prompt `{}`", p.id),
                        message: "appears twice with different messages".into(),
                    });
                }
                Some(_) => {}
                None => {
                    order.push(p.id.clone());
                    prompts.insert(p.id.clone(), p);
                }
            }
        }
        for completion in c.completions {
            members.entry(completion.id.prompt_id.clone()).or_default().push(completion);
        }
    }
    let mut groups = Vec::with_capacity(order.len());
    for id in &order {
        let prompt = prompts.remove(id).expect("every id in `order` has a prompt");
        let mut completions = members.remove(id).unwrap_or_default();
        // Sources in order of first appearance, then sample index.
        let mut source_rank: HashMap<String, usize> = HashMap::new();
        for c in &completions {
            let next = source_rank.len();
            source_rank.entry(c.id.source.clone()).or_insert(next);
        }
        completions.sort_by_key(|c| (source_rank[&c.id.source], c.id.sample_index));
        for pair in completions.windows(2) {
            if pair[0].id == pair[1].id {
                return Err(Error::Record {
                    record: pair[1].describe(),
                    message: format!("duplicates {}", pair[0].describe()),
                });
            }
        }
        groups.push(ScoredGroup {
            prompt,
            completions: completions
                .into_iter()
                .map(|completion| ScoredCompletion { completion, reward: None })
                .collect(),
        });
    }
    if let Some((id, orphans)) = members.into_iter().next() {
        return Err(Error::Record {
            record: orphans[0].describe(),
            message: format!("answers prompt `{id}`, which no source provided"),
        });
    }
    Ok(groups)
}

/// Score every completion of every group with `reward`, in batches of `batch_size`, in memory
/// (the scoring stage with no store: [`crate::score::score_stage`]).
pub fn score_groups(reward: &dyn RewardModel, groups: &mut [ScoredGroup], batch_size: usize) -> Result<()> {
    crate::score::score_stage(reward, groups, None, batch_size, &|_| {}).map(|_| ())
}

/// The plain-data view of a group that plugins see.
#[derive(Debug, Clone)]
pub struct GroupData {
    /// Rewards (finite).
    pub rewards: Vec<f64>,
    /// Source index per completion.
    pub sources: Vec<u32>,
    /// Sample index per completion.
    pub sample_indices: Vec<u32>,
    /// Source names.
    pub source_names: Vec<String>,
    /// Weights (empty before weighting).
    pub weights: Vec<f64>,
}

impl GroupData {
    /// Extract the view's data from a scored group; a missing reward is an error naming it.
    pub fn from_group(group: &ScoredGroup) -> Result<Self> {
        let rewards = group.rewards()?;
        let (source_names, sources) = group.source_table();
        let sample_indices = group.completions.iter().map(|c| c.completion.id.sample_index).collect();
        Ok(Self { rewards, sources, sample_indices, source_names, weights: Vec::new() })
    }

    /// A group from `(source name, reward)` per completion, sample indices counted per source
    /// in order, no weights yet (for tests of weighting schemes and objectives).
    pub fn new(items: &[(&str, f64)]) -> Self {
        let mut g = Self {
            rewards: Vec::new(),
            sources: Vec::new(),
            sample_indices: Vec::new(),
            source_names: Vec::new(),
            weights: Vec::new(),
        };
        for (source, reward) in items {
            let s = match g.source_names.iter().position(|n| n == source) {
                Some(i) => i,
                None => {
                    g.source_names.push((*source).to_owned());
                    g.source_names.len() - 1
                }
            };
            g.sample_indices.push(g.sources.iter().filter(|x| **x as usize == s).count() as u32);
            g.sources.push(s as u32);
            g.rewards.push(*reward);
        }
        g
    }

    /// Borrow as a [`GroupView`].
    pub fn view(&self) -> GroupView<'_> {
        GroupView {
            rewards: &self.rewards,
            sources: &self.sources,
            sample_indices: &self.sample_indices,
            source_names: &self.source_names,
            weights: &self.weights,
        }
    }
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

/// Which training stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StageName {
    /// FuseSFT.
    Sft,
    /// FusePO.
    Po,
}

impl StageName {
    /// `sft` or `po`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Sft => "sft",
            Self::Po => "po",
        }
    }
}

/// Whether `prompt_id` belongs to `stage` under the recipe's split: every prompt with
/// `split = "shared"`; with `"disjoint"`, a seeded hash of the id decides, so that the
/// split is stable when prompts are added or reordered.
pub fn in_stage(data: &crate::recipe::DataConfig, seed: u64, prompt_id: &str, stage: StageName) -> bool {
    match data.split {
        crate::recipe::Split::Shared => true,
        crate::recipe::Split::Disjoint => {
            let mut hash = crate::maths::Fnv1a::salted(seed).update(prompt_id.as_bytes()).finish();
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
    pub prompts: HashMap<String, Vec<crate::data::ChatMessage>>,
    /// Text of every completion of the stage.
    pub texts: HashMap<crate::data::CompletionId, String>,
    /// Counts.
    pub stats: PrepareStats,
}

/// Run a recipe's data stages for one training stage: collect from every source, score,
/// weigh, and build the stage objective's examples.
pub fn prepare_examples(
    loaded: &crate::recipe::LoadedRecipe,
    stage: StageName,
) -> Result<(Vec<Example>, PrepareStats)> {
    let p = prepare(loaded, stage)?;
    Ok((p.examples, p.stats))
}

/// Like [`prepare_examples`], keeping the prompts and texts the examples refer to.
pub fn prepare(loaded: &crate::recipe::LoadedRecipe, stage: StageName) -> Result<Prepared> {
    prepare_with(loaded, stage, Vec::new(), None)
}

/// Every prompt's group of answers, unscored, before the split into stages: the file sources'
/// records read now, and `extra` (the collect stage's answers of the generative sources, the
/// target's own samples); at most `[data] max_prompts` prompts. Also returns the count of
/// records the file sources skipped.
pub fn gather_groups(loaded: &crate::recipe::LoadedRecipe, extra: Vec<Collected>) -> Result<(Vec<ScoredGroup>, u64)> {
    let recipe = &loaded.recipe;
    let c = &loaded.components;
    let request = crate::extension::CollectRequest {
        prompts: &[],
        samples_per_prompt: recipe.data.samples_per_prompt,
        sampling: &recipe.data.sampling,
    };
    let mut skipped = 0;
    let mut collected = Vec::with_capacity(c.sources.len());
    // Generative sources answered in the collect stage: their answers come in `extra`.
    for source in c.sources.iter().filter(|s| s.generator().is_none()) {
        let got = source.collect(&request)?;
        skipped += got.skipped_records;
        collected.push(got);
    }
    collected.extend(extra);
    let mut groups = assemble_groups(collected)?;
    if let Some(max) = recipe.data.max_prompts {
        groups.truncate(usize::try_from(max).unwrap_or(usize::MAX));
    }
    Ok((groups, skipped))
}

/// Like [`prepare`], with more completions added to the sources' before scoring: the collect
/// stage's answers of the generative sources ([`crate::collect::collect`]), the target's own
/// samples. With `score_dir` (`runs/NAME/score`), scores are kept there and reused
/// ([`crate::score`]).
pub fn prepare_with(
    loaded: &crate::recipe::LoadedRecipe,
    stage: StageName,
    extra: Vec<Collected>,
    score_dir: Option<&std::path::Path>,
) -> Result<Prepared> {
    let recipe = &loaded.recipe;
    let c = &loaded.components;
    let _span = tracing::info_span!("prepare", stage = stage.as_str()).entered();
    let mut stats = PrepareStats::default();
    let (mut groups, skipped) = gather_groups(loaded, extra)?;
    stats.skipped_records = skipped;
    stats.prompts = groups.len();
    stats.completions = groups.iter().map(|g| g.completions.len()).sum();
    let seed = recipe.run.seed;
    groups.retain(|g| in_stage(&recipe.data, seed, &g.prompt.id, stage));
    stats.stage_prompts = groups.len();
    let scored = crate::score::score_stage(
        c.reward.as_ref(),
        &mut groups,
        score_dir,
        recipe.data.score_batch_size as usize,
        &|_| {},
    )?;
    if scored.skipped > 0 {
        // Answers the reward skipped are left out.
        for g in &mut groups {
            g.completions.retain(|c| c.reward.is_some());
        }
        stats.skipped_by_reward = scored.skipped;
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
    tracing::info!(
        stage = stage.as_str(),
        prompts = stats.prompts,
        completions = stats.completions,
        skipped_records = stats.skipped_records,
        stage_prompts = stats.stage_prompts,
        prompts_without_examples = stats.prompts_without_examples,
        skipped_by_reward = stats.skipped_by_reward,
        examples = stats.examples,
        "prepared examples"
    );
    Ok(Prepared { examples, prompts, texts, stats })
}
