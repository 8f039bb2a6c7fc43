//! Pairwise judging with a store: a pairwise judge ([`RewardModel::compare_batches`]) gives its
//! verdict on pairs of answers, each kept in an append-only store as it comes
//! ([`fuserl_io::store`]), so that a rerun after a kill asks only for the verdicts still missing:
//!
//! ```text
//! DIR/NAME.jsonl           one line per verdict (the pair, in the order it was shown)
//! DIR/NAME.settings.json   the judge's fingerprint (a changed judge starts afresh)
//! ```

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::score::{ScoreProgress, ScoreSummary};
use fuserl_core::data::Completion;
use fuserl_core::error::{Error, Result};
use fuserl_core::extension::{PairItem, RewardModel};
use fuserl_core::maths::fnv1a;
use fuserl_io::store::{OnChange, Store, StoreRecord};

/// One stored verdict.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredVerdict {
    /// The prompt both answers answer.
    pub prompt_id: String,
    /// The answer shown first: source, sample index, FNV-1a of its text.
    pub a: (String, u32, String),
    /// The answer shown second.
    pub b: (String, u32, String),
    /// The preference for `a` (1 better, 0.5 tie, 0 worse); `null`: no verdict (skipped).
    pub preference: Option<f64>,
}

impl StoreRecord for StoredVerdict {
    type Key = (String, (String, u32, String), (String, u32, String));
    fn key(&self) -> Self::Key {
        (self.prompt_id.clone(), self.a.clone(), self.b.clone())
    }
    const WHAT: &'static str = "a stored verdict";
    const MANY: &'static str = "verdicts";
}

fn side(c: &Completion) -> (String, u32, String) {
    (c.id.source.clone(), c.id.sample_index, format!("{:016x}", fnv1a(c.text.as_bytes())))
}

/// The judge's preference for `a` in each pair (NaN: no verdict), through the store `name` in
/// `dir`, and what this call did (verdicts asked now, found in the store, skipped); `progress`
/// after every verdict, with `finished` set at the end.
pub fn compare_stage(
    judge: &dyn RewardModel,
    items: &[PairItem<'_>],
    dir: &Path,
    name: &str,
    progress: &dyn Fn(&ScoreProgress<'_>),
) -> Result<(Vec<f64>, ScoreSummary)> {
    let t0 = std::time::Instant::now();
    let fingerprint = format!("{}; {}", judge.scorer_id(), judge.fingerprint());
    let store = Store::<StoredVerdict>::open(dir, name, &fingerprint, OnChange::Restart, false)?;
    let stored = store.records();
    let key = |p: &PairItem<'_>| (p.a.id.prompt_id.clone(), side(p.a), side(p.b));
    let mut out: Vec<Option<f64>> =
        items.iter().map(|p| stored.get(&key(p)).map(|v| v.preference.unwrap_or(f64::NAN))).collect();
    let todo: Vec<usize> = (0..items.len()).filter(|&i| out[i].is_none()).collect();
    let total = items.len() as u64;
    let reused = total - todo.len() as u64;
    let mut done = reused;
    progress(&ScoreProgress { reward: name, done, total, finished: None });
    if !todo.is_empty() {
        tracing::info!(judge = %judge.scorer_id(), to_judge = todo.len(), already_judged = done, "judging pairs");
        let asked: Vec<PairItem<'_>> = todo.iter().map(|&i| items[i]).collect();
        let mut sink = |indices: &[usize], values: Vec<f64>| -> Result<()> {
            if indices.len() != values.len() || indices.iter().any(|&i| i >= asked.len()) {
                return Err(Error::Component {
                    point: "reward model",
                    name: judge.name().to_owned(),
                    message: format!("returned {} verdicts for {} pairs", values.len(), indices.len()),
                });
            }
            let mut records = Vec::with_capacity(values.len());
            for (&i, value) in indices.iter().zip(values) {
                let skipped = value.is_nan() && judge.traits().skips;
                if !skipped && !(0.0..=1.0).contains(&value) {
                    return Err(Error::Component {
                        point: "reward model",
                        name: judge.name().to_owned(),
                        message: format!("gave the preference {value} (expected 0 to 1) for {}", asked[i].a.describe()),
                    });
                }
                if out[todo[i]].replace(value).is_none() {
                    done += 1;
                }
                let p = &asked[i];
                records.push(StoredVerdict {
                    prompt_id: p.a.id.prompt_id.clone(),
                    a: side(p.a),
                    b: side(p.b),
                    preference: (!skipped).then_some(value),
                });
            }
            store.append_all(&records)?;
            progress(&ScoreProgress { reward: name, done, total, finished: None });
            fuserl_core::debug_pause(&format!("judge-{done}"));
            Ok(())
        };
        judge.compare_batches(&asked, &mut sink)?;
    }
    let preferences = out
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            v.ok_or_else(|| Error::Component {
                point: "reward model",
                name: judge.name().to_owned(),
                message: format!(
                    "finished without a verdict on {} against {}",
                    items[i].a.describe(),
                    items[i].b.id.source
                ),
            })
        })
        .collect::<Result<Vec<f64>>>()?;
    let summary = ScoreSummary {
        scored: total - reused,
        reused,
        skipped: preferences.iter().filter(|p| p.is_nan()).count() as u64,
        from_data: 0,
        seconds: t0.elapsed().as_secs_f64(),
    };
    progress(&ScoreProgress { reward: name, done: total, total, finished: Some(summary.clone()) });
    Ok((preferences, summary))
}
