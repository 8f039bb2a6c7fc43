//! The collect stage: every generative source ([`Generator`]) answers the recipe's prompts
//! (`[data] prompts`), `samples_per_prompt` times each, into a store of its own in the run
//! directory:
//!
//! ```text
//! runs/NAME/collect/SOURCE.jsonl           one line per answer, appended and flushed as it arrives
//! runs/NAME/collect/SOURCE.settings.json   the settings the answers were made with
//! ```
//!
//! A rerun asks only for the (prompt, sample) pairs still missing. A line torn by a kill (the
//! last one, without its newline) is dropped and asked again. Answers made with other settings
//! are not mixed in: the stage refuses, or starts that source afresh when told to (`redo`).

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use fuserl_core::data::{Completion, CompletionId, Origin, Prompt, SamplingParams, ScoredCompletion, ScoredGroup};
use fuserl_core::error::{Error, Result};
use fuserl_core::extension::{Collected, GenerateStats, Generated, Generator, SampleJob};
use fuserl_core::paths::Shown;
use fuserl_recipe::LoadedRecipe;

/// The seed asked for sample `sample_index` of `prompt_id`: a hash of the run's seed, the prompt
/// id and the sample index, below 2^31 (servers differ in what they accept).
pub fn sample_seed(run_seed: u64, prompt_id: &str, sample_index: u32) -> u64 {
    let mut hash = fuserl_core::maths::Fnv1a::salted(run_seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    hash.update(prompt_id.as_bytes()).update(&sample_index.to_le_bytes());
    hash.finish() % (1 << 31)
}

/// One source's answers on disk, keyed by (prompt id, sample index).
pub type Store = fuserl_io::store::Store<Generated>;

/// Open (or create) the store of `source` in `dir`, made with `fingerprint`. Answers made with
/// another fingerprint are refused, or set aside (`redo`, or `restart_changed` for answers a
/// run derives from its own models) and the source starts afresh.
pub fn open_store(dir: &Path, source: &str, fingerprint: &str, redo: bool, restart_changed: bool) -> Result<Store> {
    let owner = format!("source `{source}`");
    let hint = format!("start this source afresh with `fuserl collect --redo {source}`");
    let on_change = if restart_changed {
        fuserl_io::store::OnChange::Restart
    } else {
        fuserl_io::store::OnChange::Refuse { owner: &owner, hint: &hint }
    };
    Store::open(dir, source, fingerprint, on_change, redo)
}

/// The collect stage (`fuserl collect`, and first in `fuserl run`): every generative source
/// answers the recipe's prompts into `runs/NAME/collect/` (resumes; `redo` names sources to start
/// afresh). Returns the folder and each generative source's answers.
pub fn collect_stage(
    loaded: &LoadedRecipe,
    redo: &[String],
    progress: &(dyn Fn(&CollectProgress<'_>) + Sync),
) -> Result<(PathBuf, Vec<Collected>)> {
    // Each store guards its own settings (a source whose settings changed is refused, or started
    // afresh with `redo`), so collecting needs no claim on the run directory; the training
    // stages make that claim.
    fuserl_core::paths::check_links_stay_inside(&loaded.output_dir())?;
    let dir = fuserl_io::run_dir::RunDir::new(loaded.output_dir()).collect();
    // A recipe without a generative source has no collect stage to log.
    if !loaded.components.sources.iter().any(|s| s.generator().is_some()) {
        let collected = collect(loaded, &dir, redo, progress)?;
        return Ok((dir, collected));
    }
    let collected = crate::stages::recorded(&loaded.output_dir(), &loaded.recipe.backend, "collect", || {
        collect(loaded, &dir, redo, progress)
    })?;
    Ok((dir, collected))
}

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

/// The records of the recipe's file sources (those that do not generate: `jsonl`, plugins that
/// read files), each read once; the generative sources answer in the collect stage
/// ([`crate::collect::collect_stage`]).
pub fn read_file_sources(loaded: &LoadedRecipe) -> Result<Vec<Collected>> {
    let recipe = &loaded.recipe;
    let request = fuserl_core::extension::CollectRequest {
        prompts: &[],
        samples_per_prompt: recipe.data.samples_per_prompt,
        sampling: &recipe.data.sampling,
    };
    let sources = loaded.components.sources.iter().filter(|s| s.generator().is_none());
    sources.map(|source| source.collect(&request)).collect()
}

/// Every prompt's group of answers, unscored, before the split into stages, from every source's
/// answers (the file sources' records, the collect stage's answers, the target's own samples);
/// at most `[data] max_prompts` prompts. Also returns the count of records the sources skipped.
pub fn gather_groups(loaded: &LoadedRecipe, answers: Vec<Collected>) -> Result<(Vec<ScoredGroup>, u64)> {
    let skipped = answers.iter().map(|c| c.skipped_records).sum();
    let mut groups = assemble_groups(answers)?;
    if let Some(max) = loaded.recipe.data.max_prompts {
        groups.truncate(usize::try_from(max).unwrap_or(usize::MAX));
    }
    Ok((groups, skipped))
}

/// The prompts of a recipe's `[data] prompts` files, in order, at most `max_prompts`.
pub fn recipe_prompts(loaded: &LoadedRecipe) -> Result<Vec<Prompt>> {
    let data = &loaded.recipe.data;
    let mut prompts: Vec<Prompt> = Vec::new();
    let mut seen = HashSet::new();
    for name in &data.prompts {
        let file = loaded.base_dir.join(name);
        let got = fuserl_io::prompts::read_prompts(&file)?;
        for p in got.prompts {
            if seen.insert(p.id.clone()) {
                prompts.push(p);
            } else {
                tracing::warn!(file = %Shown(&file), prompt = %p.id, "prompt already read from an earlier file, left out");
            }
        }
    }
    if let Some(max) = data.max_prompts {
        prompts.truncate(usize::try_from(max).unwrap_or(usize::MAX));
    }
    Ok(prompts)
}

/// Progress of one source, reported after every answer.
#[derive(Clone, Debug)]
pub struct CollectProgress<'a> {
    /// The source name.
    pub source: &'a str,
    /// Answers present (including those from earlier runs).
    pub done: u64,
    /// Answers wanted.
    pub total: u64,
    /// Completion tokens received in this run.
    pub tokens: u64,
    /// Set once, when the source is finished: what it counted.
    pub finished: Option<SourceSummary>,
}

/// What one source did in one run of the stage.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SourceSummary {
    /// Answers asked for in this run.
    pub asked: u64,
    /// Answers already in the store.
    pub reused: u64,
    /// Requests retried.
    pub retries: u64,
    /// Requests sent.
    pub requests: u64,
    /// Answers cut by the token limit.
    pub truncated: u64,
    /// Prompts whose samples (two or more) are all the same text.
    pub identical_samples: u64,
    /// Seconds.
    pub seconds: f64,
}

/// Above this share of prompts with identical samples, a sampled source is warned about.
pub const IDENTICAL_SAMPLES_WARNING: f64 = 0.5;

/// How many prompts (of those with two or more samples) got the same text for every sample.
fn identical_sample_prompts(answers: &[Completion]) -> (u64, u64) {
    let mut by_prompt: std::collections::BTreeMap<&str, Vec<&str>> = std::collections::BTreeMap::new();
    for a in answers {
        by_prompt.entry(a.id.prompt_id.as_str()).or_default().push(a.text.as_str());
    }
    let several: Vec<&Vec<&str>> = by_prompt.values().filter(|t| t.len() >= 2).collect();
    let identical = several.iter().filter(|t| t.iter().all(|x| *x == t[0])).count();
    (identical as u64, several.len() as u64)
}

/// Run the collect stage into `dir` (usually `runs/NAME/collect`): every generative source
/// answers every prompt `samples_per_prompt` times. Returns, per generative source, what its
/// store holds for the recipe's prompts, ready for the data stages. `redo` names sources to
/// start afresh.
pub fn collect(
    loaded: &LoadedRecipe,
    dir: &Path,
    redo: &[String],
    progress: &(dyn Fn(&CollectProgress<'_>) + Sync),
) -> Result<Vec<Collected>> {
    let generators: Vec<&dyn Generator> = loaded.components.sources.iter().filter_map(|s| s.generator()).collect();
    for name in redo {
        if !generators.iter().any(|g| g.source_name() == name) {
            return Err(Error::Config(fuserl_core::config::ConfigError::new(
                fuserl_core::config::KeyPath::root(),
                format!(
                    "--redo {name}: no generative source of that name; the recipe has: {}",
                    generators.iter().map(|g| g.source_name()).collect::<Vec<_>>().join(", ")
                ),
            )));
        }
    }
    if generators.is_empty() {
        return Ok(Vec::new());
    }
    let recipe = &loaded.recipe;
    let prompts = recipe_prompts(loaded)?;
    if prompts.is_empty() {
        return Err(Error::Config(fuserl_core::config::ConfigError::new(
            fuserl_core::config::KeyPath::keys(&["data", "prompts"]),
            "the recipe has generative sources but no prompts: name one or more prompt files in [data] prompts",
        )));
    }
    let plan = CollectPlan {
        prompts: &prompts,
        samples_per_prompt: recipe.data.samples_per_prompt,
        sampling: &recipe.data.sampling,
        run_seed: recipe.run.seed,
        restart_changed: false,
    };
    collect_with(&generators, &plan, dir, redo, progress)
}

/// What the collect stage asks of each generator.
#[derive(Clone, Copy, Debug)]
pub struct CollectPlan<'a> {
    /// The prompts.
    pub prompts: &'a [Prompt],
    /// Answers per prompt.
    pub samples_per_prompt: u32,
    /// Sampling settings (each generator may override them).
    pub sampling: &'a SamplingParams,
    /// The run's seed (the seed of each answer derives from it).
    pub run_seed: u64,
    /// Start a source afresh, without asking, when its settings changed (answers a run derives
    /// from its own models, such as the FuseSFT model's samples).
    pub restart_changed: bool,
}

/// The collect stage for the given generators (the recipe's, or another stage's own such as the
/// FuseSFT model's samples), into stores in `dir`.
pub fn collect_with(
    generators: &[&dyn Generator],
    plan: &CollectPlan<'_>,
    dir: &Path,
    redo: &[String],
    progress: &(dyn Fn(&CollectProgress<'_>) + Sync),
) -> Result<Vec<Collected>> {
    let (prompts, n, sampling) = (plan.prompts, plan.samples_per_prompt, plan.sampling);
    let mut out = Vec::new();
    for &g in generators {
        let source = g.source_name();
        let _span = tracing::info_span!("collect", source).entered();
        let redo_this = redo.iter().any(|r| r == source);
        let store = open_store(dir, source, &g.fingerprint(sampling), redo_this, plan.restart_changed)?;
        let mut jobs = Vec::new();
        for p in prompts {
            for i in 0..n {
                if !store.has(&(p.id.clone(), i)) {
                    jobs.push(SampleJob { prompt: p, sample_index: i, seed: sample_seed(plan.run_seed, &p.id, i) });
                }
            }
        }
        let total = prompts.len() as u64 * u64::from(n);
        let reused = total - jobs.len() as u64;
        let wanted: HashSet<(&str, u32)> = jobs.iter().map(|j| (j.prompt.id.as_str(), j.sample_index)).collect();
        let done = Mutex::new((reused, 0u64, HashSet::<(String, u32)>::new()));
        progress(&CollectProgress { source, done: reused, total, tokens: 0, finished: None });
        let t0 = Instant::now();
        let stats = if jobs.is_empty() {
            GenerateStats::default()
        } else {
            tracing::info!(source, asked = jobs.len(), already_collected = reused, file = %Shown(store.file()), "collecting");
            let sink = |answer: Generated| -> Result<()> {
                let key = (answer.prompt_id.clone(), answer.sample_index);
                if !wanted.contains(&(key.0.as_str(), key.1)) {
                    return Err(Error::Component {
                        point: "source",
                        name: source.to_owned(),
                        message: format!("answered prompt `{}`, sample {}, which was not asked for", key.0, key.1),
                    });
                }
                let mut d = done.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if !d.2.insert(key) {
                    // A second answer to one job (a retried request that had arrived): keep the first.
                    return Ok(());
                }
                store.append(&answer)?;
                d.0 += 1;
                d.1 += answer.completion_tokens.unwrap_or(0);
                progress(&CollectProgress { source, done: d.0, total, tokens: d.1, finished: None });
                fuserl_core::debug_pause(&format!("collect-{source}-{}", d.0));
                Ok(())
            };
            g.generate(&jobs, sampling, &sink)?
        };
        let answers = store.records();
        let missing: Vec<String> = prompts
            .iter()
            .flat_map(|p| (0..n).map(move |i| (p, i)))
            .filter(|(p, i)| !answers.contains_key(&(p.id.clone(), *i)))
            .take(3)
            .map(|(p, i)| format!("prompt `{}` sample {i}", p.id))
            .collect();
        if !missing.is_empty() {
            return Err(Error::Component {
                point: "source",
                name: source.to_owned(),
                message: format!("finished without answering {} (and maybe more)", missing.join(", ")),
            });
        }
        let mut collected = Collected { prompts: prompts.to_vec(), ..Collected::default() };
        let mut truncated = 0;
        let keep_truncated = g.keep_truncated();
        let file_name = Shown(store.file()).to_string();
        for p in prompts {
            for i in 0..n {
                let a = &answers[&(p.id.clone(), i)];
                if a.finish_reason.as_deref() == Some("length") {
                    truncated += 1;
                    if !keep_truncated {
                        continue;
                    }
                }
                collected.completions.push(Completion {
                    id: CompletionId { prompt_id: p.id.clone(), source: source.to_owned(), sample_index: i },
                    text: a.text.clone(),
                    sampling: SamplingParams { seed: Some(a.seed), ..sampling.clone() },
                    origin: Origin { adapter: "collect".into(), file: Some(file_name.clone()), line: None },
                    precomputed_score: None,
                });
            }
        }
        // Samples that are not samples: a server that ignores the sampling settings (greedy
        // decoding) gives every sample of a prompt the same text.
        let (identical, several) = identical_sample_prompts(&collected.completions);
        let sampled = sampling.temperature.is_none_or(|t| t > 0.0);
        if sampled && several > 0 && identical as f64 > IDENTICAL_SAMPLES_WARNING * several as f64 {
            tracing::warn!(
                source,
                "every sample was the same text for {identical} of {several} prompts: the source seems to ignore the \
                 sampling settings (temperature {}, a seed per sample) and decode greedily; `transformers serve`, for \
                 one, samples only when the model folder's generation_config.json says do_sample = true. The answers \
                 are kept as given",
                sampling.temperature.map_or_else(|| "the server's default".to_owned(), |t| t.to_string())
            );
        }
        let summary = SourceSummary {
            asked: jobs.len() as u64,
            reused,
            retries: stats.retries,
            requests: stats.requests,
            truncated,
            identical_samples: identical,
            seconds: t0.elapsed().as_secs_f64(),
        };
        tracing::info!(
            source,
            asked = summary.asked,
            reused = summary.reused,
            requests = summary.requests,
            retries = summary.retries,
            cut_by_max_tokens = summary.truncated,
            "collected"
        );
        progress(&CollectProgress { source, done: total, total, tokens: 0, finished: Some(summary) });
        out.push(collected);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(p: &str, i: u32) -> Generated {
        Generated { prompt_id: p.into(), sample_index: i, text: format!("{p}-{i}"), ..Generated::default() }
    }

    #[test]
    fn a_torn_last_line_is_dropped_and_appending_continues() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = open_store(dir.path(), "s", "v1", false, false).expect("open");
        store.append(&answer("a", 0)).expect("append");
        store.append(&answer("a", 1)).expect("append");
        drop(store);
        let file = dir.path().join("s.jsonl");
        let mut bytes = std::fs::read(&file).expect("read");
        bytes.extend_from_slice(b"{\"prompt_id\": \"b\", \"sam");
        std::fs::write(&file, &bytes).expect("write");
        let store = open_store(dir.path(), "s", "v1", false, false).expect("reopen");
        assert!(store.has(&("a".into(), 0)) && store.has(&("a".into(), 1)) && !store.has(&("b".into(), 0)));
        store.append(&answer("b", 0)).expect("append");
        assert_eq!(store.records().len(), 3);
        drop(store);
        assert_eq!(open_store(dir.path(), "s", "v1", false, false).expect("reopen").records().len(), 3);
        assert_eq!(std::fs::read_to_string(&file).expect("read").lines().count(), 3);
    }

    #[test]
    fn other_settings_are_refused_or_set_aside() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = open_store(dir.path(), "s", "model=a", false, false).expect("open");
        store.append(&answer("a", 0)).expect("append");
        drop(store);
        let err = open_store(dir.path(), "s", "model=b", false, false).expect_err("refused").to_string();
        assert!(err.contains("answers made with other settings") && err.contains("--redo s"), "{err}");
        let store = open_store(dir.path(), "s", "model=b", true, false).expect("redo");
        assert!(!store.has(&("a".into(), 0)));
        assert!(dir.path().join("s.jsonl.old-1").is_file());
    }

    #[test]
    fn a_bad_line_in_the_middle_names_its_place() {
        let dir = tempfile::tempdir().expect("tmp");
        open_store(dir.path(), "s", "v", false, false).expect("open");
        std::fs::write(
            dir.path().join("s.jsonl"),
            "not json\n{\"prompt_id\": \"a\", \"sample_index\": 0, \"seed\": 1, \"text\": \"x\"}\n",
        )
        .expect("write");
        let err = open_store(dir.path(), "s", "v", false, false).expect_err("bad").to_string();
        assert!(err.contains("s.jsonl:1: not a collected answer"), "{err}");
    }

    #[test]
    fn seeds_are_stable_distinct_and_small() {
        let a = sample_seed(42, "p1", 0);
        assert_eq!(a, sample_seed(42, "p1", 0));
        assert_ne!(a, sample_seed(42, "p1", 1));
        assert_ne!(a, sample_seed(42, "p2", 0));
        assert_ne!(a, sample_seed(43, "p1", 0));
        assert!(a < 1 << 31);
    }
}
