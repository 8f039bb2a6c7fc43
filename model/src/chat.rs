//! Tokenizer and chat template, as transformers uses them.
//!
//! The convention for every (prompt, response) in fuserl, as TRL does it: prompt ids are the
//! rendered prompt (messages, `add_generation_prompt = true`) encoded without adding special
//! tokens; response ids are the response text encoded without special tokens, followed by the
//! EOS id.
//!
//! Templates come from `chat_template.jinja` or `tokenizer_config.json` (or a file the recipe
//! names) and are rendered with minijinja configured like transformers' Jinja environment
//! (`trim_blocks`, `lstrip_blocks`, `raise_exception`, Python string methods).

use std::path::{Path, PathBuf};

use fuserl_core::data::ChatMessage;
use serde_json::Value;

use crate::error::{ModelError, Result};

/// A tokenizer with its chat template and special tokens.
#[derive(Debug)]
pub struct ChatTokenizer {
    tokenizer: tokenizers::Tokenizer,
    template: Option<String>,
    template_file: PathBuf,
    bos_token: Option<String>,
    eos_token: Option<String>,
    eos_id: u32,
    dir: PathBuf,
}

fn token_string(v: Option<&Value>) -> Option<String> {
    match v {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

/// Template instructions one rendering may run (real templates use a few thousand per message).
const FUEL: u64 = 50_000_000;

/// The most a chat template's rendering may grow the heap by (live bytes of the rendering
/// thread): eight times the longest data line fuserl reads (64 MiB), far past any real template's
/// needs; past it the process stops (fuserl_io::budget).
const TEMPLATE_BUDGET: usize = 512 << 20;

impl ChatTokenizer {
    /// Load `tokenizer.json`, `tokenizer_config.json` and the chat template from a checkpoint
    /// folder; `template` overrides the folder's template.
    pub fn load(dir: &Path, template: Option<&Path>) -> Result<Self> {
        // A PEFT adapter folder without its own tokenizer uses its base's.
        let base;
        let dir = if !dir.join("tokenizer.json").is_file() && crate::lora::is_adapter_dir(dir) {
            base = crate::lora::read_adapter_config(dir)?.base;
            base.as_path()
        } else {
            dir
        };
        let tj = dir.join("tokenizer.json");
        if !tj.is_file() {
            return Err(ModelError::format(dir, "no tokenizer.json"));
        }
        // JSON first: the tokenizers crate panics on some malformed files (issue #13's fuzzing);
        // what is left of its panics is caught and named.
        let bytes = fuserl_core::paths::read_regular(&tj).map_err(|e| ModelError::io(&tj, e))?;
        serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)
            .map_err(|e| ModelError::format(&tj, format!("not valid JSON: {e}")))?;
        let tokenizer = fuserl_io::untrusted::catch_panic(|| tokenizers::Tokenizer::from_bytes(&bytes))
            .map_err(|m| ModelError::format(&tj, format!("not a valid tokenizer: {m}")))?
            .map_err(|e| ModelError::format(&tj, format!("not a valid tokenizer: {e}")))?;
        // `truncation` and `padding` in tokenizer.json would cut or pad every encoding silently
        // (a fixed padding length of 2^40 aborted on allocation); transformers turns both off
        // unless a call asks for them, and so does fuserl, saying so.
        let mut tokenizer = tokenizer;
        if tokenizer.get_truncation().is_some() {
            tracing::warn!(file = %fuserl_core::paths::Shown(&tj), "the tokenizer's `truncation` is ignored, as transformers ignores it");
            let _ = tokenizer.with_truncation(None);
        }
        if tokenizer.get_padding().is_some() {
            tracing::warn!(file = %fuserl_core::paths::Shown(&tj), "the tokenizer's `padding` is ignored, as transformers ignores it");
            tokenizer.with_padding(None);
        }
        let tc_file = dir.join("tokenizer_config.json");
        let tc: Value = if tc_file.is_file() {
            let text = fuserl_core::paths::read_regular_string(&tc_file).map_err(|e| ModelError::io(&tc_file, e))?;
            serde_json::from_str(&text).map_err(|e| ModelError::format(&tc_file, format!("not valid JSON: {e}")))?
        } else {
            Value::Null
        };
        let (template_text, template_file) = match template {
            Some(p) => {
                (Some(fuserl_core::paths::read_regular_string(p).map_err(|e| ModelError::io(p, e))?), p.to_path_buf())
            }
            None => {
                let jinja = dir.join("chat_template.jinja");
                if jinja.is_file() {
                    (
                        Some(fuserl_core::paths::read_regular_string(&jinja).map_err(|e| ModelError::io(&jinja, e))?),
                        jinja,
                    )
                } else {
                    let t = match tc.get("chat_template") {
                        Some(Value::String(s)) => Some(s.clone()),
                        // A list of named templates: the one named "default".
                        Some(Value::Array(list)) => list
                            .iter()
                            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                            .and_then(|t| t.get("template").and_then(Value::as_str))
                            .map(str::to_owned),
                        _ => None,
                    };
                    (t, tc_file.clone())
                }
            }
        };
        let bos_token = token_string(tc.get("bos_token"));
        let eos_token = token_string(tc.get("eos_token"));
        let eos_id = match &eos_token {
            Some(t) => tokenizer
                .token_to_id(t)
                .ok_or_else(|| ModelError::format(&tc_file, format!("eos_token `{t}` is not in tokenizer.json")))?,
            None => {
                let cfg = crate::config::LlamaConfig::from_file(&crate::checkpoint::config_file(dir)?)?;
                *cfg.eos_token_ids
                    .first()
                    .ok_or_else(|| ModelError::format(dir, "no EOS token in tokenizer_config.json or config.json"))?
            }
        };
        Ok(Self {
            tokenizer,
            template: template_text,
            template_file,
            bos_token,
            eos_token,
            eos_id,
            dir: dir.to_path_buf(),
        })
    }

    /// The EOS id appended to responses.
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Check that every token id fits a model with `vocab_size` embeddings.
    pub fn check_fits(&self, vocab_size: usize) -> Result<()> {
        let max = self.tokenizer.get_vocab(true).values().copied().max().map_or(0, |m| m as usize + 1);
        if max > vocab_size {
            return Err(ModelError::format(
                self.dir.join("tokenizer.json"),
                format!("the tokenizer has token ids up to {}, but the model's vocab_size is {vocab_size}", max - 1),
            ));
        }
        Ok(())
    }

    /// Render `messages` with the chat template.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self.template.as_deref().ok_or_else(|| {
            ModelError::format(
                &self.dir,
                "no chat template (chat_template.jinja, tokenizer_config.json, or [target] chat_template)",
            )
        })?;
        let mut env = minijinja::Environment::new();
        // A template from a downloaded checkpoint that loops or recurses without end is stopped
        // with an error (fuel: instructions; the recursion limit is minijinja's own).
        env.set_fuel(Some(FUEL));
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        let bad = |e: minijinja::Error| ModelError::format(&self.template_file, format!("chat template: {e:#}"));
        env.add_template("chat", template).map_err(bad)?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
        };
        // minijinja's and its regex's panics (a hostile template) come back as errors naming it.
        // Fuel counts instructions, not bytes: a template that doubles a string in a loop is
        // stopped by a memory budget (exit status 2, the file named; fuserl_io::budget).
        let over = format!(
            "error: {}: chat template: rendering grew past {} MiB of memory (a template that builds strings without \
             bound); stopped",
            fuserl_core::paths::Shown(&self.template_file),
            TEMPLATE_BUDGET >> 20
        );
        fuserl_io::budget::with_budget(TEMPLATE_BUDGET, &over, || {
            fuserl_io::untrusted::catch_panic(|| env.get_template("chat").and_then(|t| t.render(ctx)))
        })
        .map_err(|m| ModelError::format(&self.template_file, format!("chat template: {m}")))?
        .map_err(bad)
    }

    /// Encode text without adding special tokens (special tokens written in the text are still
    /// recognised, as transformers does).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        // The tokenizer's split regex (Oniguruma) can panic inside `encode` on a hostile
        // tokenizer.json: an error naming the file, not a crash.
        let file = || self.dir.join("tokenizer.json");
        fuserl_io::untrusted::catch_panic(|| self.tokenizer.encode(text, false))
            .map_err(|m| ModelError::format(file(), format!("cannot encode: {m}")))?
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ModelError::format(file(), format!("cannot encode: {e}")))
    }

    /// Decode ids.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        let file = || self.dir.join("tokenizer.json");
        fuserl_io::untrusted::catch_panic(|| self.tokenizer.decode(ids, skip_special_tokens))
            .map_err(|m| ModelError::format(file(), format!("cannot decode: {m}")))?
            .map_err(|e| ModelError::format(file(), format!("cannot decode: {e}")))
    }

    /// Prompt ids: the rendered conversation with the generation prompt.
    pub fn prompt_ids(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        self.encode(&self.render(messages, true)?)
    }

    /// A whole conversation's ids, as transformers' `apply_chat_template(conversation,
    /// tokenize=True)` gives them (no generation prompt; what a reward model scores).
    pub fn conversation_ids(&self, messages: &[ChatMessage]) -> Result<Vec<u32>> {
        self.encode(&self.render(messages, false)?)
    }

    /// Response ids: the text followed by EOS.
    pub fn response_ids(&self, response: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode(response)?;
        ids.push(self.eos_id);
        Ok(ids)
    }
}
