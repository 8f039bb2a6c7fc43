//! `[data] prompts`: the prompt files that generative sources answer.
//!
//! JSONL, one prompt per line, or Parquet, one prompt per row (its columns as the keys below),
//! in any of the shapes that prompt datasets use:
//!
//! ```text
//! "What is 2 + 2?"                                          a string
//! [{"role": "user", "content": "Hi"}]                       a list of chat messages
//! {"id": "q1", "prompt": "What is 2 + 2?"}                  `prompt`: a string or messages
//! {"messages": [{"role": "user", "content": "Hi"}]}         `messages`
//! {"instruction": "Translate", "input": "chat", "system": "..."}   Alpaca style
//! ```
//!
//! An `id` (string or number) is kept; without one the id is a hash of the messages
//! ([`fuserl_core::data::prompt_id_for`]), so it is the same on every run. Other keys are ignored
//! (they belong to other stages: references, tests). Empty prompts and repeated ones are
//! reported with their file and line and left out; a line that is none of the above is an error
//! that names its place.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use fuserl_core::data::{ChatMessage, Prompt, prompt_id_for};
use fuserl_core::error::{Error, Result};
use fuserl_core::paths::Shown;

/// What [`read_prompts`] found.
#[derive(Clone, Debug, Default)]
pub struct PromptFile {
    /// The prompts, in file order, without empty and repeated ones.
    pub prompts: Vec<Prompt>,
    /// Empty prompts left out.
    pub empty: usize,
    /// Repeated prompts left out (same id, or same messages under another id).
    pub duplicates: usize,
}

fn messages_of(v: &Value) -> std::result::Result<Vec<ChatMessage>, String> {
    match v {
        Value::String(s) => Ok(vec![ChatMessage::user(s.clone())]),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, m)| {
                serde_json::from_value::<ChatMessage>(m.clone())
                    .map_err(|e| format!("message {i}: expected {{\"role\": ..., \"content\": ...}} ({e})"))
            })
            .collect(),
        _ => Err("expected a string or a list of chat messages".into()),
    }
}

/// A conversation of an SFT dataset as a prompt: its final assistant turns (the answer it was
/// written with) are left out, so that the prompt ends where the model is to answer.
fn without_final_answer(mut messages: Vec<ChatMessage>) -> Vec<ChatMessage> {
    while messages.last().is_some_and(|m| m.role == "assistant") {
        messages.pop();
    }
    messages
}

/// ShareGPT's `conversations`: `[{"from": "human" | "gpt" | "system" | ..., "value": "..."}]`,
/// with the roles named as chat templates name them (`human` -> user, `gpt` -> assistant).
fn sharegpt_messages(v: &Value) -> std::result::Result<Vec<ChatMessage>, String> {
    let Value::Array(turns) = v else { return Err("`conversations`: expected a list of turns".into()) };
    turns
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let from = t.get("from").and_then(Value::as_str);
            let value = t.get("value").and_then(Value::as_str);
            let (Some(from), Some(value)) = (from, value) else {
                return Err(format!("`conversations[{i}]`: expected {{\"from\": ..., \"value\": ...}}"));
            };
            let role = match from {
                "human" | "user" => "user",
                "gpt" | "assistant" | "chatgpt" | "bing" | "bard" => "assistant",
                "system" => "system",
                other => {
                    return Err(format!(
                        "`conversations[{i}].from`: `{}` is not a role (expected human, gpt or system)",
                        other.escape_debug()
                    ));
                }
            };
            Ok(ChatMessage { role: role.into(), content: value.to_owned() })
        })
        .collect()
}

fn text_field(obj: &serde_json::Map<String, Value>, key: &str) -> std::result::Result<Option<String>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("`{key}`: expected a string")),
    }
}

/// The id and messages of one JSONL line.
pub fn parse_prompt_line(line: &str) -> std::result::Result<(Option<String>, Vec<ChatMessage>), String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    parse_prompt_value(&v)
}

/// The id and messages of one record (a JSONL line or a Parquet row as JSON).
pub fn parse_prompt_value(v: &Value) -> std::result::Result<(Option<String>, Vec<ChatMessage>), String> {
    let obj = match v {
        Value::Object(obj) => obj,
        other => return messages_of(other).map(|m| (None, m)),
    };
    let id = match obj.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(_) => return Err("`id`: expected a non-empty string or a number".into()),
    };
    // A null column (Parquet rows have every column) counts as absent.
    let get = |key: &str| obj.get(key).filter(|v| !v.is_null());
    let messages = if let Some(m) = get("messages") {
        without_final_answer(messages_of(m).map_err(|e| format!("`messages`: {e}"))?)
    } else if let Some(c) = get("conversations") {
        without_final_answer(sharegpt_messages(c)?)
    } else if let Some(p) = get("prompt") {
        messages_of(p).map_err(|e| format!("`prompt`: {e}"))?
    } else if let Some(instruction) = text_field(obj, "instruction")? {
        let input = text_field(obj, "input")?.unwrap_or_default();
        let user = if input.trim().is_empty() { instruction } else { format!("{instruction}\n\n{input}") };
        let mut m = Vec::new();
        if let Some(system) = text_field(obj, "system")?.filter(|s| !s.is_empty()) {
            m.push(ChatMessage { role: "system".into(), content: system });
        }
        m.push(ChatMessage::user(user));
        m
    } else {
        return Err(
            "expected a `prompt`, `messages` or `instruction` key (or a string, or a list of messages; or ShareGPT's `conversations`)"
                .into(),
        );
    };
    Ok((id, messages))
}

/// One record of a prompt file: its 1-based line (JSONL) or row (Parquet), and its content.
type Records = Vec<(u64, std::result::Result<(Option<String>, Vec<ChatMessage>), String>)>;

fn jsonl_records(file: &Path) -> Result<Records> {
    Ok(crate::jsonl::lines(file)?
        .into_iter()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| (n, parse_prompt_line(&l)))
        .collect())
}

/// The most the parquet crate may allocate parsing a footer (at most
/// [`crate::parquet_pages::MAX_FOOTER_BYTES`], 16 MiB; the metadata it decodes into is a few
/// times that): live and in all.
const FOOTER_BUDGET: crate::budget::Budget = crate::budget::Budget { live: 512 << 20, total: 2 << 30 };

/// A Parquet file (the format of most Hugging Face datasets), read row by row with the
/// `parquet` crate's record reader; each row is the JSON object of its columns, with its 1-based
/// row number.
pub fn parquet_rows(file: &Path) -> Result<Vec<(u64, Value)>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let f = fuserl_core::paths::open_regular(file).map_err(|e| Error::io(file, e))?;
    let bad = |message: String| Error::Data { file: file.to_path_buf(), line: 0, message };
    // The parquet crate panics on some malformed files (issue #13's fuzzing): caught, and named.
    crate::untrusted::catch_panic(|| -> Result<Vec<(u64, Value)>> {
        let len = f.metadata().map_err(|e| Error::io(file, e))?.len();
        let mut pages = f.try_clone().map_err(|e| Error::io(file, e))?;
        crate::parquet_pages::check_footer(&mut pages, len)
            .map_err(|m| bad(format!("not a readable Parquet file: {m}")))?;
        // The footer is checked as the crate reads it, but where the two readings could still
        // part (nested unions), the crate's parse runs under a memory budget: a few megabytes
        // of footer decode into tens of megabytes, never gigabytes.
        let over = format!("error: {}: not a readable Parquet file: its footer", Shown(file));
        let reader = crate::budget::with_budget(FOOTER_BUDGET, &over, || SerializedFileReader::new(f))
            .map_err(|e| bad(format!("not a readable Parquet file: {e}")))?;
        crate::parquet_pages::check(&mut pages, len, reader.metadata())
            .map_err(|m| bad(format!("not a readable Parquet file: {m}")))?;
        let rows = reader.get_row_iter(None).map_err(|e| bad(format!("cannot read the rows: {e}")))?;
        let mut out = Vec::new();
        for (n, row) in rows.enumerate() {
            let row_no = n as u64 + 1;
            let row = row.map_err(|e| Error::Data {
                file: file.to_path_buf(),
                line: row_no,
                message: format!("row {row_no}: {e}"),
            })?;
            out.push((row_no, row.to_json_value()));
        }
        Ok(out)
    })
    .map_err(|m| bad(format!("not a readable Parquet file: {m}")))?
}

fn parquet_records(file: &Path) -> Result<Records> {
    Ok(parquet_rows(file)?
        .into_iter()
        .map(|(row_no, v)| (row_no, parse_prompt_value(&v).map_err(|m| format!("row {row_no}: {m}"))))
        .collect())
}

/// Whether `file` is read as Parquet (its name ends in `.parquet`).
pub fn is_parquet(file: &Path) -> bool {
    file.extension().is_some_and(|e| e.eq_ignore_ascii_case("parquet"))
}

/// The records of a data file as lines of JSON with their 1-based line (JSONL) or row
/// (Parquet: each row the JSON object of its columns), so that one reader of records serves
/// both formats.
pub fn record_lines(file: &Path) -> Result<Vec<(u64, String)>> {
    if is_parquet(file) {
        Ok(parquet_rows(file)?.into_iter().map(|(n, v)| (n, v.to_string())).collect())
    } else {
        crate::jsonl::lines(file)
    }
}

/// Read one prompt file: JSONL, or Parquet when its name ends in `.parquet`. Places in messages
/// are lines for JSONL and rows (1-based) for Parquet.
pub fn read_prompts(file: &Path) -> Result<PromptFile> {
    let records = if is_parquet(file) { parquet_records(file)? } else { jsonl_records(file)? };
    let mut out = PromptFile::default();
    let mut ids: HashMap<String, u64> = HashMap::new();
    let mut contents: HashMap<String, u64> = HashMap::new();
    for (line_no, record) in records {
        let (id, messages) =
            record.map_err(|message| Error::Data { file: file.to_path_buf(), line: line_no, message })?;
        if messages.is_empty() || messages.iter().all(|m| m.content.trim().is_empty()) {
            tracing::warn!(file = %Shown(file), line = line_no, "empty prompt left out");
            out.empty += 1;
            continue;
        }
        let content_key = prompt_id_for(&messages);
        let id = id.unwrap_or_else(|| content_key.clone());
        if let Some(first) = ids.get(&id).or_else(|| contents.get(&content_key)) {
            tracing::warn!(file = %Shown(file), line = line_no, first_line = *first, prompt = %id, "repeated prompt left out");
            out.duplicates += 1;
            continue;
        }
        ids.insert(id.clone(), line_no);
        contents.insert(content_key, line_no);
        out.prompts.push(Prompt { id, messages });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_one_gib_json_line_is_refused_after_reading_only_the_bound() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = dir.path().join("huge.jsonl");
        // A sparse file: `{"id": "` and then 1 GiB of NUL bytes, no line end.
        std::fs::write(&f, "{\"id\": \"").expect("write");
        std::fs::OpenOptions::new().write(true).open(&f).and_then(|h| h.set_len(1 << 30)).expect("grow");
        let err = read_prompts(&f).expect_err("refused").to_string();
        assert!(err.contains("huge.jsonl:1: a line longer than 64 MiB"), "{err}");
    }

    /// ShareGPT's `conversations` and SFT `messages` conversations (issue #32): the roles are
    /// mapped, and the final assistant turn (the answer the conversation was written with) is
    /// left out of the prompt; an unknown role is named.
    #[test]
    fn sharegpt_and_sft_conversations_give_their_prompt() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("c.jsonl");
        std::fs::write(
            &file,
            concat!(
                r#"{"id": "s1", "conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}"#,
                "\n",
                r#"{"id": "m1", "messages": [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "Apple."}]}"#,
                "\n",
            ),
        )
        .expect("write");
        let got = read_prompts(&file).expect("read");
        let roles: Vec<&str> = got.prompts[0].messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert_eq!(got.prompts[0].messages[3].content, "2+2?");
        assert_eq!(got.prompts[1].messages, vec![ChatMessage::user("Name a fruit.")]);
        std::fs::write(&file, r#"{"conversations": [{"from": "robot", "value": "x"}]}"#).expect("write");
        let err = read_prompts(&file).expect_err("unknown role").to_string();
        assert!(err.contains("c.jsonl:1") && err.contains("`robot` is not a role"), "{err}");
    }

    #[test]
    fn every_prompt_shape_is_read_and_ids_are_kept_or_stable() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("p.jsonl");
        std::fs::write(
            &file,
            concat!(
                "\"What is 2 + 2?\"\n",
                "[{\"role\": \"system\", \"content\": \"Be brief.\"}, {\"role\": \"user\", \"content\": \"Hi\"}]\n",
                "{\"id\": \"q3\", \"prompt\": \"Name a colour.\", \"test\": \"ignored\"}\n",
                "{\"id\": 4, \"messages\": [{\"role\": \"user\", \"content\": \"Count to 3.\"}]}\n",
                "{\"instruction\": \"Translate to French\", \"input\": \"cat\", \"system\": \"You translate.\"}\n",
                "\n",
                "{\"prompt\": \"   \"}\n",
                "{\"id\": \"q3\", \"prompt\": \"Another text, same id.\"}\n",
                "\"What is 2 + 2?\"\n",
            ),
        )
        .expect("write");
        let got = read_prompts(&file).expect("read");
        assert_eq!(got.prompts.len(), 5);
        assert_eq!((got.empty, got.duplicates), (1, 2));
        assert_eq!(got.prompts[0].id, prompt_id_for(&[ChatMessage::user("What is 2 + 2?")]));
        assert_eq!(got.prompts[1].messages.len(), 2);
        assert_eq!(got.prompts[2].id, "q3");
        assert_eq!(got.prompts[3].id, "4");
        assert_eq!(got.prompts[4].messages[0].role, "system");
        assert_eq!(got.prompts[4].messages[1].content, "Translate to French\n\ncat");
        // Same file, same ids.
        let again = read_prompts(&file).expect("read");
        assert_eq!(again.prompts, got.prompts);
    }

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/prompts").join(name)
    }

    /// Files written by pyarrow (fixtures/prompts/make_parquet.py), snappy and zstd.
    #[test]
    fn parquet_rows_read_like_jsonl_lines() {
        let got = read_prompts(&fixture("prompts.parquet")).expect("read");
        assert_eq!((got.prompts.len(), got.duplicates, got.empty), (3, 1, 1));
        assert_eq!(got.prompts[0].id, "capital-france");
        assert_eq!(got.prompts[0].messages, [ChatMessage::user("What is the capital of France?")]);
        assert_eq!(got.prompts[1].id, "chat-1");
        assert_eq!(got.prompts[1].messages[0], ChatMessage { role: "system".into(), content: "Be brief.".into() });
        assert_eq!(got.prompts[2].messages, [ChatMessage::user("Translate to French\n\ncat")]);
        assert_eq!(got.prompts[2].id, prompt_id_for(&got.prompts[2].messages));
        let zstd = read_prompts(&fixture("prompts-zstd.parquet")).expect("read zstd");
        assert_eq!(zstd.prompts, got.prompts);
        let err = read_prompts(&fixture("bad.parquet")).expect_err("bad").to_string();
        assert!(err.contains("bad.parquet:2: row 2: expected a `prompt`, `messages` or `instruction` key"), "{err}");
        let dir = tempfile::tempdir().expect("tmp");
        let fake = dir.path().join("x.parquet");
        std::fs::write(&fake, "not parquet").expect("write");
        let err = read_prompts(&fake).expect_err("not parquet").to_string();
        assert!(err.contains("x.parquet: not a readable Parquet file"), "the whole file, no line 0: {err}");
    }

    #[test]
    fn a_bad_line_names_its_place() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("p.jsonl");
        std::fs::write(&file, "\"ok\"\n{\"question\": \"no known key\"}\n").expect("write");
        let err = read_prompts(&file).expect_err("bad").to_string();
        assert!(
            err.ends_with(
                "p.jsonl:2: expected a `prompt`, `messages` or `instruction` key (or a string, or a list of messages; or ShareGPT's `conversations`)"
            ),
            "{err}"
        );
        std::fs::write(&file, "{\"prompt\": [{\"role\": \"user\"}]}\n").expect("write");
        let err = read_prompts(&file).expect_err("bad").to_string();
        assert!(err.contains("p.jsonl:1: `prompt`: message 0: expected"), "{err}");
    }
}
