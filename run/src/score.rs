//! The scoring stage: the recipe's reward scores every collected answer, into a store of its own
//! in the run directory ([`fuserl_io::store`]):
//!
//! ```text
//! runs/NAME/score/REWARD.jsonl           one line per scored answer, appended batch by batch
//! runs/NAME/score/REWARD.settings.json   the reward's fingerprint (model weights, files, settings)
//! ```
//!
//! A score is keyed by the answer (prompt, source, sample) and a hash of its text, so an answer
//! made again (a source redone) is scored again, and a rerun after a kill scores only what is
//! missing. When the reward's fingerprint changes, the old scores are set aside and everything is
//! scored afresh. Rewards that say they need no store (`precomputed`) score in memory. An answer a
//! reward skips (a judge told to skip what it cannot grade) is stored with a `null` score and left
//! out of training.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use fuserl_core::data::{Completion, Reward, ScoredGroup};
use fuserl_core::error::{Error, Result};
use fuserl_core::extension::{Collected, RewardModel, ScoreItem};
use fuserl_core::paths::Shown;
use fuserl_io::run_dir::RunDir;
use fuserl_io::store::{OnChange, Store, StoreRecord};
use fuserl_recipe::LoadedRecipe;

/// One stored score.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredScore {
    /// The prompt the answer answers.
    pub prompt_id: String,
    /// The answer's source.
    pub source: String,
    /// Its sample index.
    pub sample_index: u32,
    /// FNV-1a of its text, in hex.
    pub text_hash: String,
    /// The score; `null`: the reward skipped the answer (it is left out of training).
    pub score: Option<f64>,
}

impl StoreRecord for StoredScore {
    type Key = (String, String, u32, String);
    fn key(&self) -> Self::Key {
        (self.prompt_id.clone(), self.source.clone(), self.sample_index, self.text_hash.clone())
    }
    const WHAT: &'static str = "a stored score";
    const MANY: &'static str = "scores";
}

fn key_of(c: &Completion) -> (String, String, u32, String) {
    let h = fuserl_core::maths::fnv1a(c.text.as_bytes());
    (c.id.prompt_id.clone(), c.id.source.clone(), c.id.sample_index, format!("{h:016x}"))
}

/// Progress of the scoring stage, reported after every batch.
#[derive(Clone, Debug)]
pub struct ScoreProgress<'a> {
    /// The reward's name.
    pub reward: &'a str,
    /// Answers scored (including those from earlier runs).
    pub done: u64,
    /// Answers to score.
    pub total: u64,
    /// Set once, at the end.
    pub finished: Option<ScoreSummary>,
}

/// What one run of the stage did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ScoreSummary {
    /// Answers scored in this run.
    pub scored: u64,
    /// Scores found in the store.
    pub reused: u64,
    /// Answers the reward skipped (left out of training).
    pub skipped: u64,
    /// Of the answers scored, those of a reward that keeps no store: its scores come with the
    /// data (`precomputed`), so every run reads them again.
    pub from_data: u64,
    /// Seconds.
    pub seconds: f64,
}

/// Score every answer of `groups` with `reward` in batches of `batch_size`. With `dir` (usually
/// `runs/NAME/score`), scores are kept there and only the missing ones are computed. A reward made
/// of parts (`combine`) has each part scored and stored on its own (`REWARD.PART.jsonl`).
pub fn score_answers(
    reward: &dyn RewardModel,
    groups: &mut [ScoredGroup],
    dir: Option<&Path>,
    batch_size: usize,
    progress: &dyn Fn(&ScoreProgress<'_>),
) -> Result<ScoreSummary> {
    let t0 = Instant::now();
    let scorer = reward.scorer_id();
    let items: Vec<ScoreItem<'_>> = groups
        .iter()
        .flat_map(|g| {
            g.completions.iter().map(|c| ScoreItem { messages: &g.prompt.messages, completion: &c.completion })
        })
        .collect();
    let mut summary = ScoreSummary::default();
    let scores = if let Some(composite) = reward.composite() {
        let parts = composite.parts();
        let mut by_part = Vec::with_capacity(parts.len());
        for (part, r) in &parts {
            let name = format!("{}.{part}", reward.name());
            by_part.push(score_items(*r, &name, &items, dir, batch_size, progress, &mut summary)?);
        }
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let row: Vec<f64> = by_part.iter().map(|p| p[i]).collect();
            let value = if row.iter().any(|v| v.is_nan()) { f64::NAN } else { composite.combine(&row) };
            if !value.is_finite() && !value.is_nan() {
                return Err(Error::Record {
                    record: item.completion.describe(),
                    message: format!("reward `{}` combined its parts' scores {row:?} into {value}", reward.name()),
                });
            }
            out.push(value);
        }
        out
    } else {
        score_items(reward, reward.name(), &items, dir, batch_size, progress, &mut summary)?
    };
    drop(items);
    let mut values = scores.into_iter();
    for g in groups.iter_mut() {
        for c in &mut g.completions {
            let value = values.next().expect("one score per answer");
            // NaN: skipped by the reward (left unscored, and so out of training).
            c.reward = (!value.is_nan()).then(|| Reward { value, scored_by: scorer.clone() });
            if value.is_nan() {
                summary.skipped += 1;
            }
        }
    }
    summary.seconds = t0.elapsed().as_secs_f64();
    Ok(summary)
}

/// Score `items` with `reward`, through its store `name` in `dir` when it keeps one.
fn score_items(
    reward: &dyn RewardModel,
    name: &str,
    items: &[ScoreItem<'_>],
    dir: Option<&Path>,
    batch_size: usize,
    progress: &dyn Fn(&ScoreProgress<'_>),
    summary: &mut ScoreSummary,
) -> Result<Vec<f64>> {
    let t0 = Instant::now();
    let store = match dir.filter(|_| reward.traits().stored) {
        Some(d) => {
            let fingerprint = format!("{}; {}", reward.scorer_id(), reward.fingerprint());
            Some(Store::<StoredScore>::open(d, name, &fingerprint, OnChange::Restart, false)?)
        }
        None => None,
    };
    let stored = store.as_ref().map(Store::records).unwrap_or_default();
    // A stored null (an answer the reward skipped) comes back as NaN.
    let mut scores: Vec<Option<f64>> =
        items.iter().map(|i| stored.get(&key_of(i.completion)).map(|s| s.score.unwrap_or(f64::NAN))).collect();
    let todo: Vec<usize> = (0..items.len()).filter(|&i| scores[i].is_none()).collect();
    let reused = (items.len() - todo.len()) as u64;
    let total = items.len() as u64;
    progress(&ScoreProgress { reward: name, done: reused, total, finished: None });
    if !todo.is_empty() {
        let _span = tracing::info_span!("score", reward = %name).entered();
        tracing::info!(
            reward = %name,
            to_score = todo.len(),
            already_scored = reused,
            store = %store.as_ref().map_or_else(|| "none".to_owned(), |s| Shown(s.file()).to_string()),
            "scoring"
        );
        let asked: Vec<ScoreItem<'_>> = todo.iter().map(|&i| items[i]).collect();
        let mut done = reused;
        let mut sink = |indices: &[usize], values: Vec<f64>| -> Result<()> {
            if indices.len() != values.len() || indices.iter().any(|&i| i >= asked.len()) {
                return Err(Error::Component {
                    point: "reward model",
                    name: name.to_owned(),
                    message: format!(
                        "returned {} scores for a batch of {} answers (of {} asked)",
                        values.len(),
                        indices.len(),
                        asked.len()
                    ),
                });
            }
            let mut records = Vec::with_capacity(values.len());
            for (&i, value) in indices.iter().zip(values) {
                let item = &asked[i];
                let skipped = value.is_nan() && reward.traits().skips;
                if !value.is_finite() && !skipped {
                    return Err(Error::Record {
                        record: item.completion.describe(),
                        message: format!("reward model `{name}` gave the non-finite score {value}"),
                    });
                }
                if scores[todo[i]].replace(value).is_none() {
                    done += 1;
                }
                let (prompt_id, source, sample_index, text_hash) = key_of(item.completion);
                let score = (!skipped).then_some(value);
                records.push(StoredScore { prompt_id, source, sample_index, text_hash, score });
            }
            if let Some(s) = &store {
                s.append_all(&records)?;
            }
            progress(&ScoreProgress { reward: name, done, total, finished: None });
            fuserl_core::debug_pause(&format!("score-{done}"));
            Ok(())
        };
        reward.score_batches(&asked, batch_size, &mut sink)?;
        if let Some(&i) = todo.iter().find(|&&i| scores[i].is_none()) {
            return Err(Error::Component {
                point: "reward model",
                name: name.to_owned(),
                message: format!(
                    "finished without scoring {} of {} answers, for example {}",
                    todo.iter().filter(|&&i| scores[i].is_none()).count(),
                    todo.len(),
                    items[i].completion.describe()
                ),
            });
        }
    }
    let part = ScoreSummary {
        scored: todo.len() as u64,
        reused,
        skipped: 0,
        from_data: if store.is_none() { todo.len() as u64 } else { 0 },
        seconds: t0.elapsed().as_secs_f64(),
    };
    if part.scored > 0 {
        tracing::info!(reward = %name, scored = part.scored, reused = part.reused, seconds = part.seconds, "scored");
    }
    summary.scored += part.scored;
    summary.reused += part.reused;
    summary.from_data += part.from_data;
    progress(&ScoreProgress { reward: name, done: total, total, finished: Some(part) });
    Ok(scores.into_iter().map(|s| s.expect("every answer was scored")).collect())
}

/// What the scoring stage made: every prompt's answers, scored.
#[derive(Debug)]
pub struct Scored {
    /// `runs/NAME/score`.
    pub dir: PathBuf,
    /// What was scored now and what was found in the store.
    pub summary: ScoreSummary,
    /// Every prompt's group (both training stages' prompts, at most `[data] max_prompts`).
    pub groups: Vec<ScoredGroup>,
    /// Records the sources skipped.
    pub skipped_records: u64,
}

/// The scoring stage (`fuserl score`, and once in `fuserl run`): the recipe's reward scores every
/// answer of every prompt (both training stages' prompts) into `runs/NAME/score/` (resumes; scores
/// afresh when the reward's settings changed) and writes `data.json` for the report. `answers`
/// are every source's ([`crate::collect::read_file_sources`] and the collect stage's).
pub fn score_stage(
    loaded: &LoadedRecipe,
    answers: Vec<Collected>,
    progress: &dyn Fn(&ScoreProgress<'_>),
) -> crate::Result<Scored> {
    fuserl_core::paths::check_links_stay_inside(&loaded.output_dir())?;
    crate::stages::recorded(&loaded.output_dir(), &loaded.recipe.backend, "score", || {
        score_work(loaded, answers, progress)
    })
}

fn score_work(
    loaded: &LoadedRecipe,
    answers: Vec<Collected>,
    progress: &dyn Fn(&ScoreProgress<'_>),
) -> crate::Result<Scored> {
    let run = RunDir::new(loaded.output_dir());
    let dir = run.score();
    let (mut groups, skipped_records) = crate::collect::gather_groups(loaded, answers)?;
    let reward = loaded.components.reward.as_ref();
    let batch = loaded.recipe.data.score_batch_size as usize;
    let summary = score_answers(reward, &mut groups, Some(&dir), batch, progress)?;
    write_data_summary(&run.data_json(), &groups, reward.scorer_id())?;
    Ok(Scored { dir, summary, groups, skipped_records })
}

/// `data.json` for the report ([`fuserl_io::artifacts::DataSummary`]).
fn write_data_summary(file: &Path, groups: &[ScoredGroup], reward: String) -> crate::Result<()> {
    let doc = fuserl_io::artifacts::DataSummary::of(groups, reward);
    let text = serde_json::to_string(&doc).map_err(|e| crate::TrainError::Data(e.to_string()))?;
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    Ok(fuserl_io::fs::write_atomic(file, text.as_bytes())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fuserl_core::data::{ChatMessage, Completion, CompletionId, Origin, Prompt, SamplingParams, ScoredCompletion};
    use fuserl_core::extension::RewardTraits;

    /// Scores each answer by its length; NaN for answers that say "skip me".
    #[derive(Debug)]
    struct Lengths {
        skips: bool,
    }

    impl RewardModel for Lengths {
        fn name(&self) -> &str {
            "lengths"
        }
        fn traits(&self) -> RewardTraits {
            RewardTraits { skips: self.skips, ..RewardTraits::default() }
        }
        fn score(&self, items: &[ScoreItem<'_>]) -> Result<Vec<f64>> {
            Ok(items
                .iter()
                .map(|i| if i.completion.text == "skip me" { f64::NAN } else { i.completion.text.len() as f64 })
                .collect())
        }
    }

    fn groups() -> Vec<ScoredGroup> {
        let completion = |i: u32, text: &str| ScoredCompletion {
            completion: Completion {
                id: CompletionId { prompt_id: "p".into(), source: "s".into(), sample_index: i },
                text: text.into(),
                sampling: SamplingParams::default(),
                origin: Origin { adapter: "test".into(), file: None, line: None },
                precomputed_score: None,
            },
            reward: None,
        };
        vec![ScoredGroup {
            prompt: Prompt { id: "p".into(), messages: vec![ChatMessage::user("q")] },
            completions: vec![completion(0, "abc"), completion(1, "skip me"), completion(2, "de")],
        }]
    }

    #[test]
    fn skipped_answers_are_stored_without_a_score_and_left_unscored() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut g = groups();
        let summary = score_answers(&Lengths { skips: true }, &mut g, Some(dir.path()), 2, &|_| {}).expect("score");
        assert_eq!((summary.scored, summary.skipped), (3, 1));
        let rewards: Vec<Option<f64>> = g[0].completions.iter().map(|c| c.reward.as_ref().map(|r| r.value)).collect();
        assert_eq!(rewards, [Some(3.0), None, Some(2.0)]);
        let stored = std::fs::read_to_string(dir.path().join("lengths.jsonl")).expect("store");
        assert_eq!(stored.lines().filter(|l| l.contains("\"score\":null")).count(), 1, "{stored}");
        // A rerun reads the skip back without asking again.
        let mut again = groups();
        let summary = score_answers(&Lengths { skips: true }, &mut again, Some(dir.path()), 2, &|_| {}).expect("rerun");
        assert_eq!((summary.scored, summary.reused, summary.skipped), (0, 3, 1));
        assert!(again[0].completions[1].reward.is_none());
        // A reward that does not skip: NaN is an error naming the answer.
        let err =
            score_answers(&Lengths { skips: false }, &mut groups(), None, 2, &|_| {}).expect_err("NaN").to_string();
        assert!(err.contains("sample 1") && err.contains("non-finite score NaN"), "{err}");
    }
}
