//! `keywords`: a rule-based verifier. Each prompt has a list of key facts (a JSONL file of
//! `{"id": PROMPT_ID, "facts": ["...", ...]}`); an answer's reward is the fraction of the facts
//! it contains (case-insensitive) minus `length_penalty` per word. It can score any answer,
//! also ones generated during a run (the target's own samples).
//!
//! A fact is found where it stands on its own ([`contains_fact`]): a fact that starts with a
//! letter must start a word ("eight" is not in "weight", "reverse" is in "reversed"), and one
//! that starts or ends with a digit must not be part of a longer number ("0" is not in
//! "100 °C", "300" is in "300,000 km/s").

use std::collections::HashMap;
use std::path::PathBuf;

use fuserl_core::config::{ConfigError, check};
use fuserl_core::extension::{RewardModel, ScoreItem};
use fuserl_core::paths::Shown;
use fuserl_core::registry::{BuildContext, Built, PluginDescriptor, StaticFactory, build_component};
use fuserl_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// `[reward] kind = "keywords"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeywordsConfig {
    /// The facts file, relative to the recipe.
    pub path: String,
    /// Subtracted per word of the answer.
    #[serde(default = "default_penalty")]
    pub length_penalty: f64,
}

fn default_penalty() -> f64 {
    0.002
}

/// Rule-based verifier.
#[derive(Clone, Debug)]
pub struct KeywordsReward {
    facts: HashMap<String, Vec<String>>,
    /// The facts file's text (the scores depend on it).
    text: String,
    file: PathBuf,
    length_penalty: f64,
}

impl KeywordsReward {
    /// Read the facts file; a malformed line is an error naming the file and line.
    pub fn new(config: KeywordsConfig, ctx: &BuildContext) -> Result<Self, ConfigError> {
        check::non_negative("length_penalty", config.length_penalty)?;
        let file = ctx.resolve(&config.path);
        let text = fuserl_core::paths::read_regular_string(&file).map_err(|e| {
            ConfigError::at(
                "path",
                format!("cannot read {}: {}", Shown(&file), fuserl_core::paths::cannot_read(&file, &e)),
            )
        })?;
        let mut facts = HashMap::new();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            #[derive(Deserialize)]
            struct Line {
                id: String,
                facts: Vec<String>,
            }
            let l: Line = serde_json::from_str(line).map_err(|e| {
                ConfigError::at(
                    "path",
                    format!("{}:{}: expected {{\"id\": ..., \"facts\": [...]}}: {e}", Shown(&file), i + 1),
                )
            })?;
            if l.facts.is_empty() {
                return Err(ConfigError::at(
                    "path",
                    format!("{}:{}: prompt `{}` has no facts", Shown(&file), i + 1, l.id),
                ));
            }
            facts.insert(l.id, l.facts.into_iter().map(|f| f.to_lowercase()).collect());
        }
        Ok(Self { facts, text, file, length_penalty: config.length_penalty })
    }
}

impl RewardModel for KeywordsReward {
    fn name(&self) -> &str {
        "keywords"
    }
    fn fingerprint(&self) -> String {
        // `match`: how facts are found (scores made by substring matching are not reused).
        serde_json::json!({"facts": self.text, "length_penalty": self.length_penalty, "match": "standing-alone"})
            .to_string()
    }
    fn score(&self, items: &[ScoreItem<'_>]) -> Result<Vec<f64>> {
        items
            .iter()
            .map(|item| {
                let id = &item.completion.id.prompt_id;
                let facts = self.facts.get(id).ok_or_else(|| Error::Record {
                    record: item.completion.describe(),
                    message: format!("{} lists no facts for prompt `{id}`", Shown(&self.file)),
                })?;
                let text = item.completion.text.to_lowercase();
                let found = facts.iter().filter(|f| contains_fact(&text, f)).count() as f64;
                let words = item.completion.text.split_whitespace().count() as f64;
                Ok(found / facts.len() as f64 - self.length_penalty * words)
            })
            .collect()
    }
}

/// Whether `fact` occurs in `text` on its own (both lowercase already): not inside a longer
/// number where it starts or ends with a digit, at the start of a word where it starts with a
/// letter. Other facts (`[::-1]`) match anywhere.
pub fn contains_fact(text: &str, fact: &str) -> bool {
    let (Some(first), Some(last)) = (fact.chars().next(), fact.chars().next_back()) else {
        return false;
    };
    let mut start = 0;
    while let Some(found) = text[start..].find(fact) {
        let at = start + found;
        let before = text[..at].chars().next_back();
        let after = text[at + fact.len()..].chars().next();
        let starts_ok = match before {
            None => true,
            Some(b) if first.is_ascii_digit() => !b.is_ascii_digit(),
            Some(b) if first.is_alphanumeric() => !b.is_alphanumeric(),
            Some(_) => true,
        };
        let ends_ok = !(last.is_ascii_digit() && after.is_some_and(|a| a.is_ascii_digit()));
        if starts_ok && ends_ok {
            return true;
        }
        // Overlapping occurrences count too: go on from the next character.
        start = at + first.len_utf8();
    }
    false
}

fn build(t: &toml::Table, ctx: &BuildContext) -> Result<Built<dyn RewardModel>, ConfigError> {
    build_component(t, ctx, |c: KeywordsConfig, ctx| Ok(Box::new(KeywordsReward::new(c, ctx)?) as Box<dyn RewardModel>))
}

inventory::submit! { PluginDescriptor { name: "keywords", origin: crate::ORIGIN,
summary: "rule-based verifier: fraction of a prompt's key facts in the answer, minus a length penalty",
factory: StaticFactory::Reward(build) } }

#[cfg(test)]
mod tests {
    use super::contains_fact;

    #[test]
    fn facts_are_found_where_they_stand_on_their_own() {
        // Numbers are not found inside longer numbers (the quick start's freezing point).
        assert!(!contains_fact("water boils at 100 °c.", "0"));
        assert!(contains_fact("it freezes at 0 °c.", "0"));
        assert!(contains_fact("0°c", "0"));
        assert!(contains_fact("about 300,000 km/s", "300") && contains_fact("about 300,000 km/s", "000"));
        assert!(!contains_fact("1440", "144") && contains_fact("sqrt(144) = 12.", "12"));
        // Words start a word; endings may follow.
        assert!(!contains_fact("a weight of eight", "weight of ten"));
        assert!(!contains_fact("her weight", "eight") && contains_fact("eight planets", "eight"));
        assert!(contains_fact("use reversed(xs)", "reverse") && contains_fact("xs.reverse()", "reverse"));
        // Punctuation-edged facts match anywhere.
        assert!(contains_fact("xs[::-1]", "[::-1]"));
        assert!(!contains_fact("anything", ""));
    }
}
