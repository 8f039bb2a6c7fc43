//! The typed files of a run directory that one part writes and another reads: each is one serde
//! definition shared by its writer and its readers (the report, the command line), so that a
//! field renamed or removed is a compile error in the reader, never a report that silently
//! shows nothing. Fields added after a file's first version have defaults, so that older files
//! still read; a file the definition cannot read is named in the report's section instead of
//! being shown empty.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A mean with its confidence interval and how many values it rests on. In eval.json a mean of
/// no values (NaN) is written `null`, and read back as NaN.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Estimate {
    /// The mean of the values.
    #[serde(deserialize_with = "null_as_nan")]
    pub mean: f64,
    /// Lower end of the interval.
    #[serde(deserialize_with = "null_as_nan")]
    pub low: f64,
    /// Upper end.
    #[serde(deserialize_with = "null_as_nan")]
    pub high: f64,
    /// Number of values (prompts).
    pub n: usize,
}

fn null_as_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(<Option<f64> as Deserialize>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// `data.json`: what the scoring stage saw, per source, for the report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataSummary {
    /// Prompts answered (both training stages' prompts).
    pub prompts: usize,
    /// The reward's scorer id.
    pub reward: String,
    /// Per source, in the order their answers first appear.
    pub sources: Vec<SourceData>,
}

/// One source's answers in [`DataSummary`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceData {
    /// The source's name.
    pub name: String,
    /// Prompts it answered.
    pub prompts: usize,
    /// Its answers.
    pub answers: usize,
    /// Answers the reward gave no score (a reward that skips some).
    pub unscored: usize,
    /// The scores of the scored answers.
    pub rewards: Vec<f64>,
    /// Prompts it answered two or more times (sampled).
    #[serde(default)]
    pub sampled_prompts: usize,
    /// Of those, prompts whose answers are all the same text (samples that are not samples: a
    /// server decoding greedily whatever the sampling settings).
    #[serde(default)]
    pub identical_samples: usize,
}

impl DataSummary {
    /// The summary of scored groups: per source, in order of first appearance.
    pub fn of(groups: &[fuserl_core::data::ScoredGroup], reward: String) -> Self {
        let mut sources: Vec<SourceData> = Vec::new();
        // Indexes by name (many sources must not cost a search per answer).
        let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        for g in groups {
            let mut texts: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
            for c in &g.completions {
                let name = c.completion.id.source.as_str();
                let i = match index.get(name) {
                    Some(&i) => i,
                    None => {
                        sources.push(SourceData { name: name.to_owned(), ..SourceData::default() });
                        index.insert(name.to_owned(), sources.len() - 1);
                        sources.len() - 1
                    }
                };
                let answers = texts.entry(i).or_default();
                let s = &mut sources[i];
                if answers.is_empty() {
                    s.prompts += 1;
                }
                answers.push(c.completion.text.as_str());
                s.answers += 1;
                match &c.reward {
                    Some(r) => s.rewards.push(r.value),
                    None => s.unscored += 1,
                }
            }
            for (i, t) in texts.into_iter().filter(|(_, t)| t.len() >= 2) {
                sources[i].sampled_prompts += 1;
                sources[i].identical_samples += usize::from(t.iter().all(|x| *x == t[0]));
            }
        }
        Self { prompts: groups.len(), reward, sources }
    }
}

/// `eval/eval.json`: the evaluation's measures (`fuserl_run::eval`), read by the report and printed
/// by `fuserl eval`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// The held-out prompts file, as shown to people.
    pub prompts: String,
    /// How many prompts it holds.
    pub n_prompts: usize,
    /// Answers per prompt and model.
    #[serde(default = "one")]
    pub samples: u32,
    /// The reward that scored the answers (its scorer id).
    pub reward: String,
    /// The pairwise judge (`[eval.judge]`), if any.
    #[serde(default)]
    pub judge: Option<String>,
    /// Whether the reward is a verifier (the models then have `pass_at_K`).
    #[serde(default)]
    pub verifier: bool,
    /// How the intervals were made.
    pub interval: IntervalMethod,
    /// The fused model first, then the baselines.
    pub models: Vec<ModelEval>,
    /// The fused model against each baseline, by the reward and by the judge.
    #[serde(default)]
    pub comparisons: Vec<Comparison>,
    /// The validation prompts (the fused model alone), when `[eval] validation` names them.
    #[serde(default)]
    pub validation: Option<Validation>,
    /// A few held-out prompts with every model's first answer and its reward, side by side.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub examples: Vec<EvalExample>,
}

/// [`EvalReport::examples`]: one held-out prompt and each model's first answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalExample {
    /// The prompt's id.
    pub prompt_id: String,
    /// Its last user message (cut to [`EvalExample::MAX_CHARS`] characters).
    pub prompt: String,
    /// The models in [`EvalReport::models`]' order.
    pub answers: Vec<EvalAnswer>,
}

/// One model's answer in an [`EvalExample`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalAnswer {
    /// The model's name.
    pub model: String,
    /// The answer (cut to [`EvalExample::MAX_CHARS`] characters, `…` marking the cut).
    pub text: String,
    /// Its reward (`None`: not scored).
    pub reward: Option<f64>,
}

impl EvalExample {
    /// How many prompts eval.json keeps examples of.
    pub const PROMPTS: usize = 4;
    /// Characters kept of a prompt or an answer.
    pub const MAX_CHARS: usize = 1200;

    /// `text` cut to [`Self::MAX_CHARS`] characters.
    pub fn cut(text: &str) -> String {
        match text.char_indices().nth(Self::MAX_CHARS) {
            Some((at, _)) => format!("{}…", &text[..at]),
            None => text.to_owned(),
        }
    }
}

/// [`EvalReport::interval`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntervalMethod {
    /// The confidence level (0.95).
    pub level: f64,
    /// In words.
    pub method: String,
    /// Bootstrap resamples.
    pub resamples: usize,
    /// Their seed.
    pub seed: u64,
}

/// One model's measures on the held-out prompts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelEval {
    /// `fused`, `target`, `sft`, a source's name or a checkpoint's.
    pub name: String,
    /// Its answers.
    #[serde(default)]
    pub answers: usize,
    /// The mean over prompts of each prompt's mean reward.
    pub mean_reward: Estimate,
    /// The mean over prompts of each prompt's mean answer length in tokens.
    pub mean_length_tokens: Estimate,
    /// Every scored answer's reward (for the report's box plot).
    #[serde(default)]
    pub rewards: Vec<f64>,
    /// `pass_at_K` for a verifier: pass@K with its interval.
    #[serde(flatten)]
    pub pass_at: BTreeMap<String, Estimate>,
}

impl ModelEval {
    /// The pass@k measures, by k in increasing order.
    pub fn passes(&self) -> Vec<(u64, &Estimate)> {
        let mut out: Vec<(u64, &Estimate)> =
            self.pass_at.iter().filter_map(|(key, e)| Some((key.strip_prefix("pass_at_")?.parse().ok()?, e))).collect();
        out.sort_by_key(|p| p.0);
        out
    }

    /// The key of pass@k in eval.json.
    pub fn pass_key(k: u64) -> String {
        format!("pass_at_{k}")
    }
}

/// The fused model against one baseline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// Always `fused`.
    pub model: String,
    /// The baseline's name.
    pub baseline: String,
    /// `reward`, or the pairwise judge's label.
    #[serde(default = "by_reward")]
    pub by: String,
    /// The win rate over prompts (ties count half); `null` when no prompt has an outcome.
    pub win_rate: Option<Estimate>,
    /// The length-controlled win rate; `null` when it cannot be fitted.
    pub length_controlled_win_rate: Option<Estimate>,
    /// A judge's comparisons: the share of prompts whose two orders agreed (`null` when none had
    /// both); absent for comparisons by the reward.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "present")]
    pub orders_agree: Option<Option<f64>>,
}

/// [`EvalReport::validation`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Validation {
    /// The validation prompts file, as shown to people.
    pub prompts: String,
    /// How many prompts it holds.
    pub n_prompts: usize,
    /// The training reward's scorer id.
    pub reward: String,
    /// The fused model's mean reward.
    pub mean_reward: Estimate,
    /// Its pass@1, when the training reward is a verifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pass_at_1: Option<Estimate>,
}

fn one() -> u32 {
    1
}

fn by_reward() -> String {
    "reward".into()
}

/// A key that is present, its value possibly `null`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<f64>>, D::Error> {
    Ok(Some(Option::deserialize(d)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data.json as runs before the typed definition wrote it (`json!`, keys sorted) reads back.
    #[test]
    fn an_older_data_json_reads() {
        let old = r#"{"prompts":2,"reward":"keywords","sources":[{"answers":3,"name":"a","prompts":2,"rewards":[0.5,1.0],"unscored":1}]}"#;
        let d: DataSummary = serde_json::from_str(old).expect("reads");
        assert_eq!(
            d.sources[0],
            SourceData {
                name: "a".into(),
                prompts: 2,
                answers: 3,
                unscored: 1,
                rewards: vec![0.5, 1.0],
                ..SourceData::default()
            }
        );
        assert_eq!(serde_json::from_str::<DataSummary>(&serde_json::to_string(&d).expect("json")).expect("again"), d);
    }

    /// An eval.json as fuserl wrote it before the typed definition (keys sorted, a judge's
    /// comparison with `orders_agree`, a mean of no values as null) reads, and writes back the
    /// same measures.
    #[test]
    fn an_older_eval_json_reads() {
        let est = |m: &str| format!(r#"{{"high":{m},"low":{m},"mean":{m},"n":2}}"#);
        let old = format!(
            r#"{{"comparisons":[{{"baseline":"target","by":"reward","length_controlled_win_rate":null,"model":"fused","win_rate":{w}}},
            {{"baseline":"target","by":"judge (pairwise)","length_controlled_win_rate":null,"model":"fused","orders_agree":null,"win_rate":null}}],
            "interval":{{"level":0.95,"method":"percentile bootstrap over prompts","resamples":10000,"seed":42}},"judge":"judge","models":[{{"answers":4,
            "mean_length_tokens":{l},"mean_reward":{r},"name":"fused","pass_at_1":{p},"pass_at_2":{p},"rewards":[1.0,0.0]}}],
            "n_prompts":2,"prompts":"data/p.jsonl","reward":"python-tests","samples":2,"validation":null,"verifier":true}}"#,
            w = est("0.5"),
            l = est("12.0"),
            r = est("null"),
            p = est("0.25")
        );
        let doc: EvalReport = serde_json::from_str(&old).expect("reads");
        assert!(doc.models[0].mean_reward.mean.is_nan());
        assert_eq!(doc.models[0].passes().iter().map(|p| p.0).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(doc.comparisons[0].orders_agree, None);
        assert_eq!(doc.comparisons[1].orders_agree, Some(None));
        let again: serde_json::Value = serde_json::to_value(&doc).expect("json");
        let before: serde_json::Value = serde_json::from_str(&old).expect("json");
        assert_eq!(again, before, "the same keys and values");
    }
}

/// One line of `metrics.jsonl`: a training step's measures, written by the trainer every
/// `log_every` steps and read by the report (and TensorBoard's event files hold the same).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricsLine {
    /// Optimiser steps done.
    pub step: u64,
    /// Which stage.
    pub stage: fuserl_core::data::StageName,
    /// The step's loss (a non-finite value is written `null` and read back as NaN, as in
    /// every float here).
    #[serde(deserialize_with = "null_as_nan")]
    pub loss: f64,
    /// The gradient's norm before clipping.
    #[serde(deserialize_with = "null_as_nan")]
    pub grad_norm: f64,
    /// The learning rate of the step.
    #[serde(deserialize_with = "null_as_nan")]
    pub lr: f64,
    /// Tokens per second since the stage (re)started.
    #[serde(deserialize_with = "null_as_nan")]
    pub tokens_per_s: f64,
    /// Examples in the step.
    pub examples: usize,
    /// The objective's own measures (`rewards/chosen`, `rewards/margins`, …; `None`: not finite).
    #[serde(flatten)]
    pub objective: BTreeMap<String, Option<f64>>,
}

impl MetricsLine {
    /// The line as written: one JSON object, keys sorted (as every metrics.jsonl so far).
    pub fn to_json_line(&self) -> String {
        serde_json::to_value(self).map_or_else(|e| format!("{{\"error\": \"{e}\"}}"), |v| v.to_string())
    }

    /// Every finite measure by name, sorted (`examples`, `grad_norm`, `loss`, `lr`, the
    /// objective's, `tokens_per_s`), without `step`.
    pub fn scalars(&self) -> Vec<(String, f64)> {
        let mut all = vec![
            ("loss".to_owned(), self.loss),
            ("grad_norm".to_owned(), self.grad_norm),
            ("lr".to_owned(), self.lr),
            ("tokens_per_s".to_owned(), self.tokens_per_s),
            ("examples".to_owned(), self.examples as f64),
        ];
        all.extend(self.objective.iter().filter_map(|(k, v)| Some((k.clone(), (*v)?))));
        all.retain(|(_, v)| v.is_finite());
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// A measure by name: one of the fixed ones or the objective's.
    pub fn get(&self, name: &str) -> Option<f64> {
        match name {
            "loss" => Some(self.loss),
            "grad_norm" => Some(self.grad_norm),
            "lr" => Some(self.lr),
            "tokens_per_s" => Some(self.tokens_per_s),
            "examples" => Some(self.examples as f64),
            _ => self.objective.get(name).copied().flatten(),
        }
        .filter(|v| v.is_finite())
    }
}

/// One line of `sft/examples.jsonl` and `po/examples.jsonl`: a training example as the stage
/// built it, with each sequence's (prompt, response) token counts after truncation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageExample {
    /// The example, with its provenance.
    #[serde(flatten)]
    pub example: fuserl_core::data::Example,
    /// `[prompt tokens, response tokens]` per sequence.
    pub token_counts: Vec<(usize, usize)>,
}

/// `po/reference-logps.json`: the reference model's log-probs of FusePO's sequences, kept so that
/// a resumed stage does not compute them again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReferenceLogps {
    /// A hash of the reference's weights and of every sequence's tokens: the cache holds while
    /// it is the same.
    pub key: String,
    /// The reference checkpoint.
    pub reference: String,
    /// Log-prob per sequence key.
    pub logps: std::collections::HashMap<String, f64>,
}

/// One line of `stages.jsonl`: a stage of the run started, finished or failed (append-only; the
/// report's stage table, dates, durations and the machine come from it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageEvent {
    /// `collect`, `score`, `sft`, `po`, `export` or `eval`.
    pub stage: String,
    /// What happened.
    pub event: StageEventKind,
    /// When, in seconds since the Unix epoch (UTC).
    pub at: f64,
    /// What stopped a failed stage (the error as printed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Where a stage started: fuserl's version, the machine, the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<Environment>,
}

/// What happened to a stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StageEventKind {
    /// It began (a rerun that resumes begins again).
    Started,
    /// It ended with its work done.
    Finished,
    /// It stopped on an error.
    Failed,
}

/// The software and machine a stage ran on.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Environment {
    /// fuserl's version.
    pub fuserl: String,
    /// The processor (its model name where the system says it, else the architecture).
    pub cpu: String,
    /// Logical cores available to the process.
    pub cores: usize,
    /// The machine's memory in bytes, where the system says it.
    #[serde(default)]
    pub memory_bytes: Option<u64>,
    /// Operating system and architecture (`linux x86_64`).
    pub os: String,
    /// `[backend]`: device and dtype as the recipe writes them (`cpu, f32`).
    pub device: String,
}

/// Append one event to `stages.jsonl` (one line, written with one call; a torn last line left
/// by a killed process is skipped by its readers).
pub fn append_stage_event(file: &std::path::Path, event: &StageEvent) -> fuserl_core::Result<()> {
    use std::io::Write as _;
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(|e| fuserl_core::Error::io(dir, e))?;
    }
    let mut line = serde_json::to_string(event).map_err(|e| fuserl_core::Error::Path {
        file: file.to_path_buf(),
        message: format!("cannot write a stage event: {e}"),
    })?;
    line.push('\n');
    // After a torn last line (a process killed while writing it), a line of its own: the torn
    // one stays the only line readers skip.
    let torn = std::fs::read(file).is_ok_and(|b| b.last().is_some_and(|c| *c != b'\n'));
    if torn {
        line.insert(0, '\n');
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .map_err(|e| fuserl_core::Error::io(file, e))?;
    f.write_all(line.as_bytes()).and_then(|()| f.flush()).map_err(|e| fuserl_core::Error::io(file, e))
}
