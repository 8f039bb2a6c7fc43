//! Component configuration: strict deserialisation of a TOML table into a typed config, with
//! errors that carry the key path so the recipe layer can point at the file, line and column.

use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// One step of a key path: a table key or an array index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathSegment {
    /// A key in a table.
    Key(String),
    /// An index in an array.
    Index(usize),
}

/// A key path such as `po.objective.pairs.min_gap` or `sources[1].path`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyPath(pub Vec<PathSegment>);

impl KeyPath {
    /// The empty path (the table itself).
    pub fn root() -> Self {
        Self(Vec::new())
    }

    /// A path from dotted keys, for example `KeyPath::keys(&["po", "objective"])`.
    pub fn keys(keys: &[&str]) -> Self {
        Self(keys.iter().map(|k| PathSegment::Key((*k).to_owned())).collect())
    }

    /// This path followed by `key`.
    pub fn key(mut self, key: &str) -> Self {
        self.0.push(PathSegment::Key(key.to_owned()));
        self
    }

    /// This path followed by `[index]`.
    pub fn index(mut self, index: usize) -> Self {
        self.0.push(PathSegment::Index(index));
        self
    }

    /// Parse a dotted path such as `pairs.min_gap` or `sources[1].path` (as [`fmt::Display`]
    /// writes it). Empty text is the root.
    pub fn parse(text: &str) -> Self {
        let mut segments = Vec::new();
        for part in text.split('.').filter(|p| !p.is_empty()) {
            let (key, rest) = part.split_once('[').map_or((part, ""), |(k, r)| (k, r));
            if !key.is_empty() {
                segments.push(PathSegment::Key(key.to_owned()));
            }
            for index in rest.split('[') {
                if let Ok(n) = index.trim_end_matches(']').parse() {
                    segments.push(PathSegment::Index(n));
                }
            }
        }
        Self(segments)
    }

    /// `prefix` followed by this path.
    pub fn prefixed(&self, prefix: &KeyPath) -> KeyPath {
        let mut segments = prefix.0.clone();
        segments.extend(self.0.iter().cloned());
        KeyPath(segments)
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                PathSegment::Key(k) if i == 0 => write!(f, "{k}")?,
                PathSegment::Key(k) => write!(f, ".{k}")?,
                PathSegment::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// A configuration value was refused. `path` is relative to the table that was parsed; the
/// recipe layer prefixes it and turns it into a file position.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", if path.0.is_empty() { String::new() } else { format!("{path}: ") })]
pub struct ConfigError {
    /// Where the problem is, relative to the parsed table.
    pub path: KeyPath,
    /// What was wrong and what was expected.
    pub message: String,
    /// Whether `path` names a key that is absent (the position is then the enclosing table's).
    pub missing: bool,
}

impl ConfigError {
    /// An error at `path`.
    pub fn new(path: KeyPath, message: impl Into<String>) -> Self {
        Self { path, message: message.into(), missing: false }
    }

    /// An error at the key `key` of the parsed table.
    pub fn at(key: &str, message: impl Into<String>) -> Self {
        Self::new(KeyPath::keys(&[key]), message)
    }

    /// The same error with `prefix` in front of its path.
    pub fn prefixed(mut self, prefix: &KeyPath) -> Self {
        self.path = self.path.prefixed(prefix);
        self
    }
}

/// A setting that takes one string or a list of them, read as a list (`stop = "x"`,
/// `target_modules = "all-linear"`): for `#[serde(deserialize_with = "...")]`.
pub fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    // A string or a list of strings is one open shape, not a closed set of variants.
    Ok(match <OneOrMany as serde::Deserialize>::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

/// Deserialise `table` into `T`, strictly: `T` should use `#[serde(deny_unknown_fields)]`.
/// Errors name the key path, what was expected and, for closed sets and misspelt keys, the
/// valid choices.
pub fn parse_table<T: DeserializeOwned>(table: &toml::Table) -> Result<T, ConfigError> {
    let value = toml::Value::Table(table.clone());
    serde_path_to_error::deserialize::<_, T>(value).map_err(|err| {
        let mut path = KeyPath(
            err.path()
                .iter()
                .filter_map(|seg| match seg {
                    serde_path_to_error::Segment::Seq { index } => Some(PathSegment::Index(*index)),
                    serde_path_to_error::Segment::Map { key } => Some(PathSegment::Key(key.clone())),
                    serde_path_to_error::Segment::Enum { .. } | serde_path_to_error::Segment::Unknown => None,
                })
                .collect(),
        );
        let inner = err.into_inner();
        let raw = inner.message().trim().to_owned();
        let (message, missing) = rewrite_serde_message(&raw, &mut path);
        ConfigError { path, message, missing }
    })
}

/// Turn serde's messages into ours, moving the offending key into the path.
fn rewrite_serde_message(raw: &str, path: &mut KeyPath) -> (String, bool) {
    if let Some(rest) = raw.strip_prefix("unknown field `")
        && let Some((name, tail)) = rest.split_once('`')
    {
        push_key(path, name);
        let choices = tail.trim_start_matches(", ").replace("expected one of ", "");
        let choices = choices.replace("expected ", "");
        let message = if choices.trim().is_empty() || choices.contains("there are no fields") {
            format!("unknown key `{name}`: this table takes no keys")
        } else {
            format!("unknown key `{name}`{}; expected one of: {}", did_you_mean(name, &choices), choice_list(&choices))
        };
        return (message, false);
    }
    if let Some(rest) = raw.strip_prefix("missing field `")
        && let Some((name, _)) = rest.split_once('`')
    {
        push_key(path, name);
        return (format!("missing required key `{name}`"), true);
    }
    if let Some(rest) = raw.strip_prefix("unknown variant `")
        && let Some((name, tail)) = rest.split_once('`')
    {
        let choices = tail.trim_start_matches(", ").replace("expected one of ", "");
        let choices = choices.replace("expected ", "");
        return (
            format!(
                "unknown value `{name}`{}; expected one of: {}",
                did_you_mean(name, &choices),
                choice_list(&choices)
            ),
            false,
        );
    }
    if let Some(rest) = raw.strip_prefix("invalid value: ")
        && let Some((found, expected)) = rest.split_once(", expected ")
    {
        return (format!("expected {}, found {}", friendly_type(expected), found.replace('`', "")), false);
    }
    if let Some(rest) = raw.strip_prefix("invalid type: ")
        && let Some((found, expected)) = rest.split_once(", expected ")
    {
        return (format!("expected {}, found {found}", friendly_type(expected)), false);
    }
    (raw.to_owned(), false)
}

/// ` (did you mean `x`?)` when one of the choices is a likely misspelling of `name`: the nearest
/// by Damerau-Levenshtein distance (a swap of two letters counts one), if under a third of the
/// longer word's length; else nothing.
pub(crate) fn did_you_mean(name: &str, choices: &str) -> String {
    let list = choice_list(choices);
    list.split(", ")
        .map(|c| (strsim::damerau_levenshtein(&name.to_lowercase(), &c.to_lowercase()), c))
        .filter(|(d, c)| 3 * d < name.chars().count().max(c.chars().count()))
        .min_by_key(|(d, _)| *d)
        .map_or_else(String::new, |(_, c)| format!(" (did you mean `{c}`?)"))
}

/// serde lists choices as "`a`, `b`, `c`" or "`a` or `b`": make it "a, b, c".
fn choice_list(raw: &str) -> String {
    raw.replace("` or `", "`, `").replace('`', "").trim().to_owned()
}

/// Add `name` to the path unless serde_path_to_error already put it there (it does for some
/// keys and not others, depending on where the error is raised).
fn push_key(path: &mut KeyPath, name: &str) {
    if path.0.last() != Some(&PathSegment::Key(name.to_owned())) {
        path.0.push(PathSegment::Key(name.to_owned()));
    }
}

fn friendly_type(expected: &str) -> String {
    match expected {
        "f64" | "f32" => "a number".to_owned(),
        "u64" | "u32" | "usize" | "u16" | "u8" => "a non-negative integer".to_owned(),
        "i64" | "i32" | "isize" => "an integer".to_owned(),
        "a boolean" => "true or false".to_owned(),
        other => other.to_owned(),
    }
}

/// Serialise a resolved config back into a TOML table (every default filled in).
pub fn to_table<T: Serialize>(config: &T) -> Result<toml::Table, ConfigError> {
    match toml::Value::try_from(config) {
        Ok(toml::Value::Table(t)) => Ok(t),
        Ok(other) => Err(ConfigError::new(
            KeyPath::root(),
            format!("a configuration serialised to a {} instead of a table", other.type_str()),
        )),
        Err(e) => Err(ConfigError::new(KeyPath::root(), format!("cannot serialise configuration: {e}"))),
    }
}

/// Checks shared by many components' `validate`.
pub mod check {
    use super::ConfigError;

    /// `value` must be finite and strictly positive.
    pub fn positive(key: &str, value: f64) -> Result<(), ConfigError> {
        if value.is_finite() && value > 0.0 {
            Ok(())
        } else {
            Err(ConfigError::at(key, format!("expected a finite number > 0, found {value}")))
        }
    }

    /// `value` must be finite and `>= 0`.
    pub fn non_negative(key: &str, value: f64) -> Result<(), ConfigError> {
        if value.is_finite() && value >= 0.0 {
            Ok(())
        } else {
            Err(ConfigError::at(key, format!("expected a finite number >= 0, found {value}")))
        }
    }

    /// `value` must lie in `[lo, hi)`.
    pub fn in_half_open(key: &str, value: f64, lo: f64, hi: f64) -> Result<(), ConfigError> {
        if value.is_finite() && value >= lo && value < hi {
            Ok(())
        } else {
            Err(ConfigError::at(key, format!("expected a number in [{lo}, {hi}), found {value}")))
        }
    }

    /// `value` must lie in `[lo, hi]`.
    pub fn in_closed(key: &str, value: f64, lo: f64, hi: f64) -> Result<(), ConfigError> {
        if value.is_finite() && value >= lo && value <= hi {
            Ok(())
        } else {
            Err(ConfigError::at(key, format!("expected a number in [{lo}, {hi}], found {value}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        beta: f64,
        mode: Mode,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    enum Mode {
        Fast,
        Slow,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        inner: Inner,
        list: Vec<Inner>,
    }

    fn parse(text: &str) -> Result<Outer, ConfigError> {
        let table: toml::Table = toml::from_str(text).expect("valid toml");
        parse_table(&table)
    }

    #[test]
    fn unknown_key_names_the_key_and_the_choices() {
        let err = parse("list = []\n[inner]\nbetta = 1.0\nmode = 'fast'").unwrap_err();
        assert_eq!(err.path.to_string(), "inner.betta");
        assert!(err.message.contains("expected one of: beta, mode"), "{}", err.message);
    }

    #[test]
    fn wrong_type_names_what_was_expected() {
        let err = parse("list = []\n[inner]\nbeta = 'x'\nmode = 'fast'").unwrap_err();
        assert_eq!(err.path.to_string(), "inner.beta");
        assert!(err.message.starts_with("expected a number, found string"), "{}", err.message);
    }

    #[test]
    fn bad_variant_lists_choices_and_arrays_are_indexed() {
        let err = parse("[inner]\nbeta = 1\nmode = 'fast'\n[[list]]\nbeta = 1\nmode = 'medium'").unwrap_err();
        assert_eq!(err.path.to_string(), "list[0].mode");
        assert!(err.message.contains("expected one of: fast, slow"), "{}", err.message);
    }

    #[test]
    fn paths_parse_back_from_their_display() {
        for text in ["", "a", "a.b", "sources[1].path", "x[0][2].y"] {
            assert_eq!(KeyPath::parse(text).to_string(), text);
        }
    }

    #[test]
    fn missing_key_is_flagged() {
        let err = parse("list = []\n[inner]\nmode = 'slow'").unwrap_err();
        assert_eq!(err.path.to_string(), "inner.beta");
        assert!(err.missing);
    }
}
