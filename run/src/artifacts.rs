//! The typed files of a run directory that one part writes and another reads: each is one serde
//! definition shared by its writer and its readers (the report, the command line), so that a
//! field renamed or removed is a compile error in the reader, never a report that silently
//! shows nothing. Files of runs made before a field was added still read (`#[serde(default)]`).

use serde::{Deserialize, Serialize};

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
}

impl DataSummary {
    /// The summary of scored groups: per source, in order of first appearance.
    pub fn of(groups: &[fuserl_core::data::ScoredGroup], reward: String) -> Self {
        let mut sources: Vec<SourceData> = Vec::new();
        for g in groups {
            let mut seen: Vec<&str> = Vec::new();
            for c in &g.completions {
                let name = c.completion.id.source.as_str();
                let i = match sources.iter().position(|s| s.name == name) {
                    Some(i) => i,
                    None => {
                        sources.push(SourceData { name: name.to_owned(), ..SourceData::default() });
                        sources.len() - 1
                    }
                };
                let s = &mut sources[i];
                if !seen.contains(&name) {
                    seen.push(name);
                    s.prompts += 1;
                }
                s.answers += 1;
                match &c.reward {
                    Some(r) => s.rewards.push(r.value),
                    None => s.unscored += 1,
                }
            }
        }
        Self { prompts: groups.len(), reward, sources }
    }
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
            SourceData { name: "a".into(), prompts: 2, answers: 3, unscored: 1, rewards: vec![0.5, 1.0] }
        );
        assert_eq!(serde_json::from_str::<DataSummary>(&serde_json::to_string(&d).expect("json")).expect("again"), d);
    }
}
