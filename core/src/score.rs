//! The scoring stage: the recipe's reward scores every collected answer, into a store of its own
//! in the run directory ([`crate::store`]):
//!
//! ```text
//! runs/NAME/score/REWARD.jsonl           one line per scored answer, appended batch by batch
//! runs/NAME/score/REWARD.settings.json   the reward's fingerprint (model weights, files, settings)
//! ```
//!
//! A score is keyed by the answer (prompt, source, sample) and a hash of its text, so an answer
//! made again (a source redone) is scored again, and a rerun after a kill scores only what is
//! missing. When the reward's fingerprint changes, the old scores are set aside and everything is
//! scored afresh. Rewards that say they need no store (`precomputed`) score in memory.

use std::path::Path;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::data::{Completion, Reward, ScoredGroup};
use crate::error::{Error, Result};
use crate::extension::{RewardModel, ScoreItem};
use crate::paths::Shown;
use crate::store::{OnChange, Store, StoreRecord};

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
    /// The score.
    pub score: f64,
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
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in c.text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
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
    /// Seconds.
    pub seconds: f64,
}

/// Score every answer of `groups` with `reward` in batches of `batch_size`. With `dir` (usually
/// `runs/NAME/score`), scores are kept there and only the missing ones are computed.
pub fn score_stage(
    reward: &dyn RewardModel,
    groups: &mut [ScoredGroup],
    dir: Option<&Path>,
    batch_size: usize,
    progress: &dyn Fn(&ScoreProgress<'_>),
) -> Result<ScoreSummary> {
    let t0 = Instant::now();
    let name = reward.name().to_owned();
    let scorer = reward.scorer_id();
    let store = match dir.filter(|_| reward.stored()) {
        Some(d) => {
            let fingerprint = format!("{scorer}; {}", reward.fingerprint());
            Some(Store::<StoredScore>::open(d, &name, &fingerprint, OnChange::Restart, false)?)
        }
        None => None,
    };
    let stored = store.as_ref().map(Store::records).unwrap_or_default();
    let mut todo: Vec<(usize, usize)> = Vec::new();
    let mut reused = 0u64;
    for (g, group) in groups.iter_mut().enumerate() {
        for (c, sc) in group.completions.iter_mut().enumerate() {
            match stored.get(&key_of(&sc.completion)) {
                Some(s) => {
                    sc.reward = Some(Reward { value: s.score, scored_by: scorer.clone() });
                    reused += 1;
                }
                None => todo.push((g, c)),
            }
        }
    }
    let total = reused + todo.len() as u64;
    progress(&ScoreProgress { reward: &name, done: reused, total, finished: None });
    let mut scores: Vec<Option<f64>> = vec![None; todo.len()];
    if !todo.is_empty() {
        let _span = tracing::info_span!("score", reward = %name).entered();
        tracing::info!(
            reward = %name,
            to_score = todo.len(),
            already_scored = reused,
            store = %store.as_ref().map_or_else(|| "none".to_owned(), |s| Shown(s.file()).to_string()),
            "scoring"
        );
        let items: Vec<ScoreItem<'_>> = todo
            .iter()
            .map(|&(g, c)| ScoreItem {
                messages: &groups[g].prompt.messages,
                completion: &groups[g].completions[c].completion,
            })
            .collect();
        let mut done = reused;
        let mut sink = |indices: &[usize], values: Vec<f64>| -> Result<()> {
            if indices.len() != values.len() || indices.iter().any(|&i| i >= items.len()) {
                return Err(Error::Component {
                    point: "reward model",
                    name: name.clone(),
                    message: format!(
                        "returned {} scores for a batch of {} answers (of {} asked)",
                        values.len(),
                        indices.len(),
                        items.len()
                    ),
                });
            }
            let mut records = Vec::with_capacity(values.len());
            for (&i, value) in indices.iter().zip(values) {
                let item = &items[i];
                if !value.is_finite() {
                    return Err(Error::Record {
                        record: item.completion.describe(),
                        message: format!("reward model `{name}` gave the non-finite score {value}"),
                    });
                }
                if scores[i].replace(value).is_none() {
                    done += 1;
                }
                let (prompt_id, source, sample_index, text_hash) = key_of(item.completion);
                records.push(StoredScore { prompt_id, source, sample_index, text_hash, score: value });
            }
            if let Some(s) = &store {
                s.append_all(&records)?;
            }
            progress(&ScoreProgress { reward: &name, done, total, finished: None });
            crate::debug_pause(&format!("score-{done}"));
            Ok(())
        };
        reward.score_batches(&items, batch_size, &mut sink)?;
        if let Some(i) = scores.iter().position(Option::is_none) {
            return Err(Error::Component {
                point: "reward model",
                name: name.clone(),
                message: format!(
                    "finished without scoring {} of {} answers, for example {}",
                    scores.iter().filter(|s| s.is_none()).count(),
                    items.len(),
                    items[i].completion.describe()
                ),
            });
        }
    }
    for (&(g, c), value) in todo.iter().zip(scores) {
        let value = value.expect("every answer was scored");
        groups[g].completions[c].reward = Some(Reward { value, scored_by: scorer.clone() });
    }
    let summary = ScoreSummary { scored: todo.len() as u64, reused, seconds: t0.elapsed().as_secs_f64() };
    if summary.scored > 0 {
        tracing::info!(reward = %name, scored = summary.scored, reused = summary.reused, seconds = summary.seconds, "scored");
    }
    progress(&ScoreProgress { reward: &name, done: total, total, finished: Some(summary.clone()) });
    Ok(summary)
}
