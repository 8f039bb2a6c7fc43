//! `jsonl`: completions precomputed by other tools, one JSON object per line (or one Parquet row
//! per record, when the file's name ends in `.parquet`, as Hugging Face datasets ship), in one of
//! three layouts:
//!
//! - **per-prompt**: `{"id": "q1", "prompt": "…" | [messages], "responses": {"src-a": ["…", "…"],
//!   "src-b": "…"}, "scores": {"src-a": [0.7, 0.2], "src-b": 0.5}, "sampling": {"src-a": {"temperature": 0.8}}}`
//! - **flat**: `{"prompt_id": "q1", "prompt": "…" | [messages], "source": "src-a", "response": "…",
//!   "score": 0.7, "sample_index": 0, "sampling": {…}}`
//! - **preference** (TRL's preference datasets): `{"prompt": "…" | [messages], "chosen": "…" |
//!   [messages], "rejected": "…" | [messages], "score_chosen": 8.0, "score_rejected": 3.5}` with an
//!   explicit prompt (standard or conversational), or without `prompt` (implicit: `chosen` and
//!   `rejected` are whole conversations that share every turn but the last, as
//!   UltraFeedback-binarized writes them). The answer is the last turn of `chosen` / `rejected`
//!   (an assistant turn); earlier turns of a multi-turn answer join the prompt. Scores are optional
//!   (1 for chosen, 0 for rejected without them). Both answers belong to the record's `source`, or
//!   to the recipe's `source` setting (default `dataset`), numbered in file order.
//! - **completions** (UltraFeedback's: several models answer one instruction): `{"instruction":
//!   "…" (or "prompt"), "completions": [{"model": "…", "response": "…", "overall_score": 8.5}, …]}`.
//!   Each completion is an answer of the source named by its `model`, scored by `overall_score`
//!   (else `fine-grained_score`; none: unscored); one record per prompt.
//!
//! `id` / `prompt_id`, `scores` / `score`, `sample_index` and `sampling` are optional (an absent id
//! is derived from the messages; flat rows without `sample_index` are numbered per prompt and
//! source in file order). Other keys are ignored. With `layout = "auto"` each line's layout is
//! recognised by its keys. A malformed line is an error naming the file and line, or, with
//! `on_error = "skip"`, skipped and counted.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use fuserl_core::config::ConfigError;
use fuserl_core::data::{ChatMessage, Completion, CompletionId, Origin, Prompt, SamplingParams};
use fuserl_core::extension::{CollectRequest, Collected, SourceAdapter};
use fuserl_core::paths::Shown;
use fuserl_core::registry::{BuildContext, Built, PluginDescriptor, StaticFactory, build_component};
use fuserl_core::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Record layout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Layout {
    /// Recognise each line by its keys (`responses`: per-prompt; `source` + `response`: flat).
    #[default]
    Auto,
    /// One record per prompt with per-source lists.
    PerPrompt,
    /// One record per (prompt, source, sample).
    Flat,
    /// TRL's preference rows: a prompt (explicit or implicit), `chosen`, `rejected`.
    Preference,
    /// UltraFeedback's rows: an instruction and the completions of several models, rated.
    Completions,
}

/// What to do with a malformed line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnError {
    /// Stop with an error naming the file and line.
    #[default]
    Fail,
    /// Skip the line, log it, and count it.
    Skip,
}

/// `[[sources]] kind = "jsonl"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonlConfig {
    /// The data file, relative to the recipe.
    pub path: String,
    /// Record layout.
    #[serde(default)]
    pub layout: Layout,
    /// What to do with a malformed line.
    #[serde(default)]
    pub on_error: OnError,
    /// Keep only these sources (default: every source in the file).
    #[serde(default)]
    pub sources: Vec<String>,
    /// How the file's completions were sampled, recorded with each one unless a record says.
    #[serde(default, skip_serializing_if = "is_unset")]
    pub sampling: SamplingParams,
    /// The source of preference rows that do not name one (`source` key). Left out of the
    /// resolved recipe when it is the default, so that run directories made before the setting
    /// existed still match their recipe.
    #[serde(default = "default_source", skip_serializing_if = "is_default_source")]
    pub source: String,
}

fn default_source() -> String {
    "dataset".to_owned()
}

fn is_default_source(s: &str) -> bool {
    s == "dataset"
}

/// How many records of the file are looked at when the source is built, so that `recipe check`
/// finds a file in a shape the source does not read.
const CHECKED_LINES: usize = 5;

fn is_unset(s: &SamplingParams) -> bool {
    *s == SamplingParams::default()
}

/// Reads precomputed multi-source completions.
#[derive(Clone, Debug)]
pub struct JsonlSource {
    config: JsonlConfig,
    file: PathBuf,
}

impl JsonlSource {
    /// Build; the file must exist.
    pub fn new(config: JsonlConfig, ctx: &BuildContext) -> Result<Self, ConfigError> {
        let file = ctx.resolve(&config.path);
        match fuserl_core::paths::check_regular(&file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ConfigError::at("path", format!("no such data file: {}", Shown(&file))));
            }
            Err(e) => {
                return Err(ConfigError::at(
                    "path",
                    format!("{}: {}", Shown(&file), fuserl_core::paths::cannot_read(&file, &e)),
                ));
            }
        }
        if config.source.is_empty() {
            return Err(ConfigError::at("source", "expected a non-empty source name"));
        }
        // The first records' shape: a file in a layout the source does not read is found here
        // (by `recipe check` too); what is wrong inside a record is found by the collect stage.
        // (With `on_error = "skip"` bad records are the user's to skip, and are counted.)
        if config.on_error == OnError::Fail
            && let Ok(lines) = fuserl_io::prompts::record_lines(&file)
        {
            for (n, line) in lines.iter().filter(|(_, l)| !l.trim().is_empty()).take(CHECKED_LINES) {
                if let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(line)
                    && let Some(message) = shape_error(&obj, config.layout)
                {
                    return Err(ConfigError::at("path", format!("{}:{n}: {message}", Shown(&file))));
                }
            }
        }
        Ok(Self { config, file })
    }
}

/// One completion of a parsed line: (source, explicit sample index, response, score, sampling).
type Item = (String, Option<u32>, String, Option<f64>, Option<SamplingParams>);

/// One parsed line.
pub(crate) struct Record {
    prompt: Prompt,
    items: Vec<Item>,
    per_prompt: bool,
}

fn parse_messages(v: &Value) -> Result<Vec<ChatMessage>, String> {
    match v {
        Value::String(s) => Ok(vec![ChatMessage::user(s.clone())]),
        Value::Array(items) if !items.is_empty() => items
            .iter()
            .enumerate()
            .map(|(i, m)| {
                serde_json::from_value::<ChatMessage>(m.clone())
                    .map_err(|e| format!("`prompt[{i}]`: expected {{\"role\": …, \"content\": …}}: {e}"))
            })
            .collect(),
        _ => Err("`prompt`: expected a string or a non-empty list of chat messages".into()),
    }
}

fn parse_id(obj: &serde_json::Map<String, Value>, keys: &[&str]) -> Result<Option<String>, String> {
    for key in keys {
        match obj.get(*key) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if !s.is_empty() => return Ok(Some(s.clone())),
            Some(Value::Number(n)) => return Ok(Some(n.to_string())),
            Some(_) => return Err(format!("`{key}`: expected a non-empty string or a number")),
        }
    }
    Ok(None)
}

fn parse_score(v: Option<&Value>, what: &str) -> Result<Option<f64>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(x) if x.is_finite() => Ok(Some(x)),
            _ => Err(format!("{what}: expected a finite number")),
        },
        Some(_) => Err(format!("{what}: expected a number or null")),
    }
}

fn parse_sampling(v: Option<&Value>, what: &str) -> Result<Option<SamplingParams>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone()).map(Some).map_err(|e| format!("{what}: {e}")),
    }
}

/// A `chosen` / `rejected` value: a string (the answer), or a list of chat messages whose last one
/// is the answer (an assistant turn) and whose earlier ones continue the prompt.
fn parse_answer(v: Option<&Value>, key: &str) -> Result<(Vec<ChatMessage>, String), String> {
    match v {
        Some(Value::String(s)) => Ok((Vec::new(), s.clone())),
        Some(Value::Array(items)) if !items.is_empty() => {
            let mut messages = Vec::with_capacity(items.len());
            for (i, m) in items.iter().enumerate() {
                messages.push(
                    serde_json::from_value::<ChatMessage>(m.clone())
                        .map_err(|e| format!("`{key}[{i}]`: expected {{\"role\": …, \"content\": …}}: {e}"))?,
                );
            }
            let last = messages.pop().expect("not empty");
            if last.role != "assistant" {
                return Err(format!(
                    "`{key}`: the last message is the answer and must have role `assistant`, found `{}`",
                    last.role.escape_debug()
                ));
            }
            Ok((messages, last.content))
        }
        Some(_) => Err(format!("`{key}`: expected a string or a non-empty list of chat messages")),
        None => Err(format!("missing `{key}`")),
    }
}

/// A TRL preference row: the prompt (explicit, or the turns `chosen` and `rejected` share) and
/// the two answers of `source` with their scores.
fn parse_preference(obj: &serde_json::Map<String, Value>, source: &str) -> Result<Record, String> {
    let (chosen_turns, chosen) = parse_answer(obj.get("chosen"), "chosen")?;
    let (rejected_turns, rejected) = parse_answer(obj.get("rejected"), "rejected")?;
    if chosen_turns != rejected_turns {
        return Err("`chosen` and `rejected` differ before their last turn: expected the same conversation \
                    with another final answer"
            .into());
    }
    // A `prompt` beside whole conversations that already begin with it (HuggingFaceH4's
    // ultrafeedback_binarized has both) is that beginning, not more turns: as TRL extracts it.
    let messages = match obj.get("prompt") {
        Some(v) => {
            let prompt = parse_messages(v)?;
            if chosen_turns.starts_with(&prompt) {
                chosen_turns
            } else {
                prompt.into_iter().chain(chosen_turns).collect()
            }
        }
        None => chosen_turns,
    };
    if messages.is_empty() {
        return Err("no prompt: expected `prompt`, or `chosen` and `rejected` conversations that begin with it".into());
    }
    let id = parse_id(obj, &["id", "prompt_id"])?;
    let prompt = match id {
        Some(id) => Prompt { id, messages },
        None => Prompt::from_messages(messages),
    };
    let source = match obj.get("source") {
        None | Some(Value::Null) => source.to_owned(),
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(_) => return Err("`source`: expected a non-empty string".into()),
    };
    let score_chosen = parse_score(obj.get("score_chosen"), "`score_chosen`")?;
    let score_rejected = parse_score(obj.get("score_rejected"), "`score_rejected`")?;
    let (score_chosen, score_rejected) = match (score_chosen, score_rejected) {
        (Some(c), Some(r)) => (c, r),
        (None, None) => (1.0, 0.0),
        _ => return Err("expected both `score_chosen` and `score_rejected`, or neither".into()),
    };
    let items = vec![
        (source.clone(), None, chosen, Some(score_chosen), None),
        (source, None, rejected, Some(score_rejected), None),
    ];
    Ok(Record { prompt, items, per_prompt: false })
}

/// An UltraFeedback row: the instruction (or `prompt`) and each model's completion, rated.
fn parse_completions(obj: &serde_json::Map<String, Value>) -> Result<Record, String> {
    let messages = match (obj.get("prompt"), obj.get("instruction")) {
        (Some(p), _) if !p.is_null() => parse_messages(p)?,
        (_, Some(Value::String(i))) => vec![ChatMessage::user(i.clone())],
        _ => return Err("expected an `instruction` string or a `prompt`".into()),
    };
    let id = parse_id(obj, &["id", "prompt_id"])?;
    let prompt = match id {
        Some(id) => Prompt { id, messages },
        None => Prompt::from_messages(messages),
    };
    let Some(Value::Array(list)) = obj.get("completions") else {
        return Err("`completions`: expected a list of {\"model\", \"response\", \"overall_score\"}".into());
    };
    let mut items = Vec::with_capacity(list.len());
    for (i, c) in list.iter().enumerate() {
        let model = match c.get("model") {
            Some(Value::String(m)) if !m.is_empty() => m.clone(),
            _ => return Err(format!("`completions[{i}].model`: expected a non-empty string")),
        };
        let Some(Value::String(response)) = c.get("response") else {
            return Err(format!("`completions[{i}].response`: expected a string"));
        };
        let score = match parse_score(c.get("overall_score"), &format!("`completions[{i}].overall_score`"))? {
            Some(s) => Some(s),
            None => parse_score(c.get("fine-grained_score"), &format!("`completions[{i}].fine-grained_score`"))?,
        };
        items.push((model, None, response.clone(), score, None));
    }
    Ok(Record { prompt, items, per_prompt: true })
}

/// The layouts a line may have, for messages about one that has none of them.
const SHAPES: &str = "`responses` (per-prompt layout), `source` and `response` (flat layout), `chosen` and \
                      `rejected` (TRL's preference layout), or `completions` (UltraFeedback's layout)";

/// Why a record has none of the keys of `layout` (of any layout with `auto`), naming the keys it
/// has; `None` when it has them.
fn shape_error(obj: &serde_json::Map<String, Value>, layout: Layout) -> Option<String> {
    let has = |k: &str| obj.contains_key(k);
    let fits = match layout {
        Layout::Auto => {
            has("responses")
                || (has("source") && has("response"))
                || (has("chosen") && has("rejected"))
                || has("completions")
        }
        Layout::PerPrompt => has("responses"),
        Layout::Flat => has("source") && has("response"),
        Layout::Preference => has("chosen") && has("rejected"),
        Layout::Completions => has("completions"),
    };
    let expected = match layout {
        Layout::Auto => SHAPES,
        Layout::PerPrompt => "`responses` (layout = \"per-prompt\")",
        Layout::Flat => "`source` and `response` (layout = \"flat\")",
        Layout::Preference => "`chosen` and `rejected` (layout = \"preference\")",
        Layout::Completions => "`completions` (layout = \"completions\")",
    };
    (!fits).then(|| {
        let keys: Vec<String> = obj.keys().take(12).map(|k| format!("`{}`", k.escape_debug())).collect();
        let keys = if keys.is_empty() { "no keys".to_owned() } else { keys.join(", ") };
        format!("the record has {keys}; expected {expected}")
    })
}

pub(crate) fn parse_line(text: &str, layout: Layout, source: &str) -> Result<Record, String> {
    let value: Value = serde_json::from_str(text).map_err(|e| format!("invalid JSON: {e}"))?;
    let Value::Object(obj) = value else { return Err("expected a JSON object".into()) };
    let preference = match layout {
        Layout::Preference => true,
        Layout::Auto => obj.contains_key("chosen") && obj.contains_key("rejected"),
        _ => false,
    };
    if preference {
        return parse_preference(&obj, source);
    }
    let completions = match layout {
        Layout::Completions => true,
        Layout::Auto => !obj.contains_key("responses") && obj.contains_key("completions"),
        _ => false,
    };
    if completions {
        return parse_completions(&obj);
    }
    if let Some(message) = shape_error(&obj, layout) {
        return Err(message);
    }
    let messages = parse_messages(obj.get("prompt").ok_or("missing `prompt`")?)?;
    let id = parse_id(&obj, &["id", "prompt_id"])?;
    let prompt = match id {
        Some(id) => Prompt { id, messages },
        None => Prompt::from_messages(messages),
    };
    let per_prompt = match layout {
        Layout::PerPrompt => true,
        Layout::Flat | Layout::Preference | Layout::Completions => false,
        Layout::Auto if obj.contains_key("responses") => true,
        Layout::Auto if obj.contains_key("source") && obj.contains_key("response") => false,
        Layout::Auto => return Err(format!("expected {SHAPES}")),
    };
    let mut items = Vec::new();
    if per_prompt {
        let Some(Value::Object(responses)) = obj.get("responses") else {
            return Err("`responses`: expected an object mapping each source to its responses".into());
        };
        let scores = match obj.get("scores") {
            None | Some(Value::Null) => None,
            Some(Value::Object(s)) => Some(s),
            Some(_) => return Err("`scores`: expected an object mapping each source to its scores".into()),
        };
        let sampling = match obj.get("sampling") {
            None | Some(Value::Null) => None,
            Some(Value::Object(s)) => Some(s),
            Some(_) => return Err("`sampling`: expected an object mapping each source to its settings".into()),
        };
        if let Some(scores) = scores
            && let Some(extra) = scores.keys().find(|k| !responses.contains_key(*k))
        {
            return Err(format!("`scores.{extra}`: no responses from source `{extra}`"));
        }
        for (source, texts) in responses {
            let texts: Vec<&Value> = match texts {
                Value::Array(a) => a.iter().collect(),
                other => vec![other],
            };
            let sc: Vec<Option<&Value>> = match scores.and_then(|s| s.get(source)) {
                None | Some(Value::Null) => vec![None; texts.len()],
                Some(Value::Array(a)) => a.iter().map(Some).collect(),
                Some(single) => vec![Some(single)],
            };
            if sc.len() != texts.len() {
                return Err(format!("`scores.{source}` has {} scores for {} responses", sc.len(), texts.len()));
            }
            let smp = parse_sampling(sampling.and_then(|s| s.get(source)), &format!("`sampling.{source}`"))?;
            for (i, (t, s)) in texts.into_iter().zip(sc).enumerate() {
                let Value::String(t) = t else {
                    return Err(format!("`responses.{source}[{i}]`: expected a string"));
                };
                let score = parse_score(s, &format!("`scores.{source}[{i}]`"))?;
                items.push((source.clone(), Some(u32::try_from(i).unwrap_or(u32::MAX)), t.clone(), score, smp.clone()));
            }
        }
    } else {
        let source = match obj.get("source") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err("`source`: expected a non-empty string".into()),
        };
        let response = match obj.get("response") {
            Some(Value::String(s)) => s.clone(),
            _ => return Err("`response`: expected a string".into()),
        };
        let sample_index = match obj.get("sample_index") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or("`sample_index`: expected a non-negative integer")?,
            ),
        };
        let score = parse_score(obj.get("score"), "`score`")?;
        let smp = parse_sampling(obj.get("sampling"), "`sampling`")?;
        items.push((source, sample_index, response, score, smp));
    }
    Ok(Record { prompt, items, per_prompt })
}

impl SourceAdapter for JsonlSource {
    fn name(&self) -> &str {
        "jsonl"
    }

    fn collect(&self, _request: &CollectRequest<'_>) -> Result<Collected> {
        let lines = fuserl_io::prompts::record_lines(&self.file)?;
        let file_name = Shown(&self.file).to_string();
        let mut out = Collected::default();
        // prompt id -> (line first seen, messages, given by a per-prompt record)
        let mut prompts: HashMap<String, (u64, usize, bool)> = HashMap::new();
        let mut seen: HashMap<(String, String, u32), u64> = HashMap::new();
        let mut next_index: HashMap<(String, String), u32> = HashMap::new();
        let mut found_sources: BTreeMap<String, ()> = BTreeMap::new();
        for (line_no, line) in &lines {
            let (line_no, line) = (*line_no, line.as_str());
            if line.trim().is_empty() {
                continue;
            }
            let result = parse_line(line, self.config.layout, &self.config.source).and_then(|record| {
                // Consistency with earlier lines, checked before anything is kept.
                if let Some(&(first, idx, per_prompt)) = prompts.get(&record.prompt.id) {
                    if record.per_prompt || per_prompt {
                        return Err(format!("prompt `{}` was already given on line {first}", record.prompt.id));
                    }
                    if out.prompts[idx].messages != record.prompt.messages {
                        return Err(format!(
                            "prompt `{}` has different messages than on line {first}",
                            record.prompt.id
                        ));
                    }
                }
                for (source, index, ..) in &record.items {
                    if let Some(i) = index
                        && let Some(first) = seen.get(&(record.prompt.id.clone(), source.clone(), *i))
                    {
                        return Err(format!(
                            "prompt `{}`, source `{source}`, sample {i} was already given on line {first}",
                            record.prompt.id
                        ));
                    }
                }
                Ok(record)
            });
            let record = match result {
                Ok(r) => r,
                Err(message) => match self.config.on_error {
                    OnError::Fail => return Err(Error::Data { file: self.file.clone(), line: line_no, message }),
                    OnError::Skip => {
                        tracing::warn!(file = %file_name, line = line_no, "skipping malformed record: {message}");
                        out.skipped_records += 1;
                        continue;
                    }
                },
            };
            if !prompts.contains_key(&record.prompt.id) {
                prompts.insert(record.prompt.id.clone(), (line_no, out.prompts.len(), record.per_prompt));
                out.prompts.push(record.prompt.clone());
            }
            for (source, index, response, score, sampling) in record.items {
                found_sources.insert(source.clone(), ());
                if !self.config.sources.is_empty() && !self.config.sources.contains(&source) {
                    continue;
                }
                let key = (record.prompt.id.clone(), source.clone());
                let sample_index = match index {
                    Some(i) => i,
                    None => {
                        let next = next_index.entry(key.clone()).or_insert(0);
                        while seen.contains_key(&(key.0.clone(), key.1.clone(), *next)) {
                            *next += 1;
                        }
                        *next
                    }
                };
                seen.insert((key.0.clone(), key.1.clone(), sample_index), line_no);
                out.completions.push(Completion {
                    id: CompletionId { prompt_id: record.prompt.id.clone(), source, sample_index },
                    text: response,
                    sampling: sampling.unwrap_or_else(|| self.config.sampling.clone()),
                    origin: Origin { adapter: "jsonl".into(), file: Some(file_name.clone()), line: Some(line_no) },
                    precomputed_score: score,
                });
            }
        }
        if let Some(missing) = self.config.sources.iter().find(|s| !found_sources.contains_key(*s)) {
            return Err(Error::Data {
                file: self.file.clone(),
                line: 0,
                message: format!(
                    "source `{missing}` (from the recipe's `sources` list) does not occur; the file has: {}",
                    found_sources.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            });
        }
        if out.skipped_records > 0 {
            tracing::warn!(file = %file_name, skipped = out.skipped_records, "skipped malformed records");
        }
        tracing::info!(
            file = %file_name,
            prompts = out.prompts.len(),
            completions = out.completions.len(),
            "read precomputed completions"
        );
        Ok(out)
    }
}

fn build(t: &toml::Table, ctx: &BuildContext) -> Result<Built<dyn SourceAdapter>, ConfigError> {
    build_component(t, ctx, |c: JsonlConfig, ctx| Ok(Box::new(JsonlSource::new(c, ctx)?) as Box<dyn SourceAdapter>))
}

inventory::submit! { PluginDescriptor { name: "jsonl", origin: crate::ORIGIN,
summary: "precomputed multi-source completions from a JSONL file (per-prompt or flat rows)",
factory: StaticFactory::Source(build) } }
