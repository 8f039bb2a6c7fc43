//! `math`: a final-answer verifier. The answer's final answer (its last `\boxed{...}`, else what
//! follows its last "the answer is" or "####", else its last number) is compared with the
//! prompt's reference answer: as numbers when both evaluate to one (integers, decimals,
//! thousands separators, fractions, `\frac`, `\sqrt`, `\pi`, percentages, simple arithmetic),
//! else as normalised text (LaTeX spacing, `\left`/`\right`, `\text{}`, `$`, a leading `x =`
//! removed). Reward 1 when equal, else 0.
//!
//! ```toml
//! [reward]
//! kind = "math"
//! answers = "../data/math-answers.jsonl"   # {"id": PROMPT_ID, "answer": "3/4"} per line
//! tolerance = 1e-6                          # relative, for numbers
//! ```
//!
//! A reference written as a worked solution (GSM8K's "... #### 72", or one with `\boxed{}`) is
//! read the same way as an answer.

use std::collections::HashMap;
use std::path::PathBuf;

use fuserl_core::config::ConfigError;
use fuserl_core::extension::{RewardModel, RewardTraits, ScoreItem};
use fuserl_core::paths::Shown;
use fuserl_core::registry::{BuildContext, Built, PluginDescriptor, StaticFactory, build_component};
use fuserl_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// `[reward] kind = "math"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MathConfig {
    /// The reference answers (JSONL), relative to the recipe.
    pub answers: String,
    /// Relative tolerance for numbers.
    #[serde(default = "default_tolerance")]
    pub tolerance: f64,
}

fn default_tolerance() -> f64 {
    1e-6
}

/// The verifier.
#[derive(Debug)]
pub struct MathReward {
    answers: HashMap<String, String>,
    file: PathBuf,
    text: String,
    tolerance: f64,
}

impl MathReward {
    /// Read the answers file; a bad line is an error naming the file and line.
    pub fn new(config: MathConfig, ctx: &BuildContext) -> Result<Self, ConfigError> {
        fuserl_core::config::check::non_negative("tolerance", config.tolerance)?;
        let file = ctx.resolve(&config.answers);
        let text = fuserl_core::paths::read_regular_string(&file).map_err(|e| {
            ConfigError::at(
                "answers",
                format!("cannot read {}: {}", Shown(&file), fuserl_core::paths::cannot_read(&file, &e)),
            )
        })?;
        let mut answers = HashMap::new();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            #[derive(Deserialize)]
            struct Line {
                id: String,
                answer: serde_json::Value,
            }
            let l: Line = serde_json::from_str(line).map_err(|e| {
                ConfigError::at(
                    "answers",
                    format!("{}:{}: expected {{\"id\": ..., \"answer\": ...}}: {e}", Shown(&file), i + 1),
                )
            })?;
            let answer = match l.answer {
                serde_json::Value::String(s) => s,
                serde_json::Value::Number(n) => n.to_string(),
                other => {
                    return Err(ConfigError::at(
                        "answers",
                        format!("{}:{}: `answer` is {other}; expected a string or a number", Shown(&file), i + 1),
                    ));
                }
            };
            answers.insert(l.id, answer);
        }
        Ok(Self { answers, file, text, tolerance: config.tolerance })
    }
}

/// The content of the last `\boxed{...}` (or `\fbox{...}`), braces balanced.
fn last_boxed(text: &str) -> Option<String> {
    let start = ["\\boxed{", "\\fbox{"].iter().filter_map(|m| text.rfind(m).map(|i| i + m.len())).max()?;
    let mut depth = 1;
    for (i, c) in text[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(text[start..start + i].to_owned());
                }
            }
            _ => {}
        }
    }
    None
}

/// The last number written in `text` (with a sign, thousands separators, decimals, or `a/b`).
fn last_number(text: &str) -> Option<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut found = None;
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_ascii_digit() {
            let mut start = i;
            if start > 0 && chars[start - 1] == '-' {
                start -= 1;
            }
            let mut j = i;
            while j < chars.len()
                && (chars[j].is_ascii_digit()
                    || (matches!(chars[j], ',' | '.' | '/') && chars.get(j + 1).is_some_and(char::is_ascii_digit)))
            {
                j += 1;
            }
            found = Some(chars[start..j].iter().collect::<String>());
            i = j;
        } else {
            i += 1;
        }
    }
    found
}

/// The final answer of a worked answer (see the module), if it gives one.
pub fn final_answer(text: &str) -> Option<String> {
    if let Some(b) = last_boxed(text) {
        return Some(b);
    }
    let lower = text.to_lowercase();
    for marker in ["the answer is", "the final answer is", "####"] {
        if let Some(i) = lower.rfind(marker) {
            let rest = &text[i + marker.len()..];
            let rest = rest.trim_start_matches([':', ' ']);
            let line = rest.lines().next().unwrap_or("").trim();
            let line = line.strip_suffix('.').unwrap_or(line).trim();
            if !line.is_empty() {
                return Some(line.to_owned());
            }
        }
    }
    last_number(text)
}

/// Normalised text of an answer: LaTeX spacing and decoration removed.
pub fn normalise(answer: &str) -> String {
    let mut s = answer.trim().to_owned();
    for (from, to) in [
        ("\\left", ""),
        ("\\right", ""),
        ("\\!", ""),
        ("\\,", ""),
        ("\\;", ""),
        ("\\ ", ""),
        ("\\dfrac", "\\frac"),
        ("\\tfrac", "\\frac"),
        ("^\\circ", ""),
        ("^{\\circ}", ""),
        ("\\%", "%"),
        ("\\$", ""),
        ("$", ""),
        ("\\(", ""),
        ("\\)", ""),
    ] {
        s = s.replace(from, to);
    }
    for wrapper in ["\\text{", "\\mathrm{", "\\textbf{", "\\mbox{"] {
        while let Some(i) = s.find(wrapper) {
            let inner_start = i + wrapper.len();
            let Some(close) = s[inner_start..].find('}') else { break };
            let inner = s[inner_start..inner_start + close].to_owned();
            s.replace_range(i..inner_start + close + 1, &inner);
        }
    }
    let mut s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    // A leading `x=`.
    let b = s.as_bytes();
    if b.len() > 2 && b[0].is_ascii_alphabetic() && b[1] == b'=' {
        s.drain(..2);
    }
    s.strip_suffix('.').map(str::to_owned).unwrap_or(s)
}

/// The value of a normalised answer, when it is a number or simple arithmetic.
pub fn value(normalised: &str) -> Option<f64> {
    let (s, percent) = match normalised.strip_suffix('%') {
        Some(s) => (s.to_owned(), true),
        None => (normalised.to_owned(), false),
    };
    // Thousands separators: a comma between digits followed by exactly three digits.
    let chars: Vec<char> = s.chars().collect();
    let mut plain = String::new();
    for (i, &c) in chars.iter().enumerate() {
        let separator = c == ','
            && i > 0
            && chars[i - 1].is_ascii_digit()
            && chars.len() >= i + 4
            && chars[i + 1..i + 4].iter().all(char::is_ascii_digit)
            && chars.get(i + 4).is_none_or(|c| !c.is_ascii_digit());
        if !separator {
            plain.push(c);
        }
    }
    if plain.contains(',') {
        return None;
    }
    let mut e = plain;
    // \frac{a}{b} -> ((a)/(b)), \sqrt{x} -> math::sqrt(x); braces become parentheses.
    e = e.replace("\\frac", "").replace("}{", ")/(").replace("\\sqrt", "math::sqrt");
    e = e.replace(['{', '['], "(").replace(['}', ']'], ")");
    e = e.replace("\\cdot", "*").replace("\\times", "*").replace("\\pi", "(3.141592653589793)");
    if e.contains('\\') || e.chars().any(|c| c.is_ascii_alphabetic() && !"mathsqrte:".contains(c)) {
        return None;
    }
    // Integers become floats (no integer division); implicit products get their `*`.
    let chars: Vec<char> = e.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
            let mut j = i;
            while j < chars.len() && (chars[j].is_ascii_digit() || chars[j] == '.') {
                j += 1;
            }
            let mut number: String = chars[i..j].iter().collect();
            if !number.contains('.') {
                number.push_str(".0");
            }
            if out.ends_with(')') {
                out.push('*');
            }
            out.push_str(&number);
            i = j;
        } else {
            if (c == '(' || c == 'm') && out.chars().last().is_some_and(|p| p.is_ascii_digit() || p == ')') {
                out.push('*');
            }
            out.push(c);
            i += 1;
        }
    }
    let v = evalexpr::eval_number(&out).ok()?;
    let v = if percent { v / 100.0 } else { v };
    v.is_finite().then_some(v)
}

/// Whether `answer`'s final answer equals `reference`'s.
pub fn equivalent(answer: &str, reference: &str, tolerance: f64) -> bool {
    let reference = if reference.contains("\\boxed") || reference.contains("####") {
        final_answer(reference).unwrap_or_else(|| reference.to_owned())
    } else {
        reference.to_owned()
    };
    let Some(got) = final_answer(answer) else { return false };
    let (got, want) = (normalise(&got), normalise(&reference));
    match (value(&got), value(&want)) {
        (Some(a), Some(b)) => (a - b).abs() <= tolerance * b.abs().max(1.0),
        _ => got == want,
    }
}

impl RewardModel for MathReward {
    fn name(&self) -> &str {
        "math"
    }

    fn traits(&self) -> RewardTraits {
        RewardTraits { verifier: true, ..RewardTraits::default() }
    }

    fn fingerprint(&self) -> String {
        serde_json::json!({"answers": self.text, "tolerance": self.tolerance}).to_string()
    }

    fn score(&self, items: &[ScoreItem<'_>]) -> Result<Vec<f64>> {
        items
            .iter()
            .map(|item| {
                let id = &item.completion.id.prompt_id;
                let reference = self.answers.get(id).ok_or_else(|| Error::Record {
                    record: item.completion.describe(),
                    message: format!("{} has no reference answer for prompt `{id}`", Shown(&self.file)),
                })?;
                Ok(if equivalent(&item.completion.text, reference, self.tolerance) { 1.0 } else { 0.0 })
            })
            .collect()
    }
}

fn build(t: &toml::Table, ctx: &BuildContext) -> Result<Built<dyn RewardModel>, ConfigError> {
    build_component(t, ctx, |c: MathConfig, ctx| Ok(Box::new(MathReward::new(c, ctx)?) as Box<dyn RewardModel>))
}

inventory::submit! { PluginDescriptor { name: "math", origin: crate::ORIGIN,
summary: "final-answer verifier: \\boxed{} / \"the answer is\" / last number, compared with the reference as numbers or normalised text",
factory: StaticFactory::Reward(build) } }

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn final_answers_are_found() {
        assert_eq!(final_answer("so x = \\boxed{\\frac{3}{4}} and done").as_deref(), Some("\\frac{3}{4}"));
        assert_eq!(final_answer("\\boxed{1} then \\boxed{{2}}").as_deref(), Some("{2}"));
        assert_eq!(final_answer("Step 1... The answer is 42.").as_deref(), Some("42"));
        assert_eq!(final_answer("Natalia sold 48/2 = 24 clips.\n#### 72").as_deref(), Some("72"));
        assert_eq!(final_answer("It costs $1,250.50 in total").as_deref(), Some("1,250.50"));
        assert_eq!(final_answer("from -3 to 7/8").as_deref(), Some("7/8"));
        assert_eq!(final_answer("no number here"), None);
    }

    #[test]
    fn equal_answers_are_recognised_and_others_not() {
        let same = [
            ("The answer is 0.75", "3/4"),
            ("\\boxed{\\dfrac{3}{4}}", "0.75"),
            ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),
            ("\\boxed{1,000}", "1000"),
            ("\\boxed{50\\%}", "0.5"),
            ("\\boxed{x = 5}", "5"),
            ("\\boxed{\\text{(B)}}", "(B)"),
            ("\\boxed{2\\pi}", "6.283185307179586"),
            ("so #### 72", "Natalia sold 48 clips... #### 72"),
            ("\\boxed{\\left( 1, 2 \\right)}", "(1,2)"),
        ];
        for (answer, reference) in same {
            assert!(equivalent(answer, reference, 1e-6), "{answer} vs {reference}");
        }
        let different = [
            ("The answer is 0.7", "3/4"),
            ("\\boxed{(1,3)}", "(1,2)"),
            ("\\boxed{B}", "C"),
            ("nothing", "1"),
            ("\\boxed{1/0}", "1"),
        ];
        for (answer, reference) in different {
            assert!(!equivalent(answer, reference, 1e-6), "{answer} vs {reference}");
        }
    }
}
