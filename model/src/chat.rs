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

/// What fuserl checks of tokenizer.json before the tokenizers crate reads it (everything else
/// is skipped unread).
#[derive(serde::Deserialize)]
struct TokenizerShape {
    #[serde(default)]
    normalizer: Option<Value>,
    #[serde(default)]
    added_tokens: Option<Vec<Value>>,
    #[serde(default)]
    pre_tokenizer: Option<Value>,
    #[serde(default)]
    decoder: Option<Value>,
    #[serde(default)]
    model: Option<ModelShape>,
}

/// What fuserl checks of tokenizer.json's model: its vocabulary's entries.
#[derive(serde::Deserialize)]
struct ModelShape {
    #[serde(default)]
    vocab: Option<VocabShape>,
}

/// A vocabulary: token to id (BPE, WordPiece, WordLevel) or `[piece, score]` pairs (Unigram).
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum VocabShape {
    Map(std::collections::HashMap<String, serde::de::IgnoredAny>),
    List(Vec<(String, serde::de::IgnoredAny)>),
    Other(serde::de::IgnoredAny),
}

/// The longest vocabulary entry accepted, in characters: real vocabularies' longest have about
/// 130; the crate builds a trie of a Unigram vocabulary, one node a character, whose drop
/// recursed once a node (a 40,000-character entry overflowed the stack: structure-aware fuzzing).
const MAX_VOCAB_CHARS: usize = 1024;

/// The longest string accepted in a normaliser or decoder (a `Prepend`, a `Replace`'s pattern
/// and content), in characters: real ones hold one or two (`▁`). A normaliser's strings are
/// applied to every added token marked `normalized` before the crate builds its automaton of
/// them: a `Prepend` of 35,000 characters made that take minutes (structure-aware fuzzing).
const MAX_NORMALIZER_CHARS: usize = 256;

/// The longest string accepted in a pre-tokeniser (a `Split`'s regex), in characters: the
/// longest real ones (GPT-4o's) have about 500.
const MAX_PRE_TOKENIZER_CHARS: usize = 4096;

/// The first string in `v` (at any depth) longer than `cap` characters, but for the
/// `precompiled_charsmap` (checked by [`check_charsmaps`]): its place and length.
fn long_string(v: &Value, cap: usize, place: &str) -> Option<(String, usize)> {
    match v {
        Value::String(s) => Some(s.chars().count()).filter(|&n| n > cap).map(|n| (place.to_owned(), n)),
        Value::Array(items) => {
            items.iter().enumerate().find_map(|(i, x)| long_string(x, cap, &format!("{place}[{i}]")))
        }
        Value::Object(map) => map
            .iter()
            .filter(|(k, _)| k.as_str() != "precompiled_charsmap")
            .find_map(|(k, x)| long_string(x, cap, &format!("{place}.{k}"))),
        _ => None,
    }
}

/// The longest added token accepted, in characters: real tokenizers' longest have about 30
/// (`<|reserved_special_token_250|>`); the crate builds one automaton of all of them, whose
/// construction took minutes for one entry of 35,000 characters (structure-aware fuzzing).
const MAX_ADDED_TOKEN_CHARS: usize = 1024;

/// The `Precompiled` normalisers in `normalizer` (at any depth of `Sequence`s): a SentencePiece
/// charsmap begins with the byte size of its trie, which the crate reserves before reading (a
/// 96-byte charsmap asked for 7.8 GB, found by the structure-aware fuzz target): it must fit in
/// the charsmap.
fn check_charsmaps(normalizer: &Value) -> std::result::Result<(), String> {
    use base64::Engine;
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    // As lenient as any decoder the crate could use: whatever it reads, this reads.
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new()
            .with_decode_padding_mode(DecodePaddingMode::Indifferent)
            .with_decode_allow_trailing_bits(true),
    );
    match normalizer.get("type").and_then(Value::as_str) {
        Some("Sequence") => {
            for n in normalizer.get("normalizers").and_then(Value::as_array).into_iter().flatten() {
                check_charsmaps(n)?;
            }
        }
        Some("Precompiled") => {
            let charsmap = normalizer.get("precompiled_charsmap").and_then(Value::as_str);
            let Some(Ok(map)) = charsmap.map(|s| LENIENT.decode(s)) else {
                return Ok(()); // not base64: the crate's own error says so
            };
            let trie = map.get(..4).map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize);
            if trie > map.len().saturating_sub(4) {
                return Err(format!(
                    "Precompiled: precompiled_charsmap declares a trie of {trie} bytes, but holds {} bytes in all",
                    map.len()
                ));
            }
        }
        _ => {}
    }
    Ok(())
}

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

/// The bytes a token can span, at most, when a text is cut before it is tokenized (no
/// vocabulary of a released model has a longer token: the longest are runs of spaces or symbols
/// of at most 128 bytes).
pub const MAX_TOKEN_BYTES: usize = 256;

/// Tokens encoded past the kept ones, on the side where a text was cut: the cut changes the
/// first tokens after it (a word split in two, a prefix space), and these are dropped.
const CUT_MARGIN: usize = 64;

/// Which end of a text is kept when it is longer than the tokens wanted.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Keep {
    First,
    Last,
}

/// `text`'s first or last `bytes` bytes (at most; cut at a character boundary).
fn part(text: &str, bytes: usize, keep: Keep) -> &str {
    if text.len() <= bytes {
        return text;
    }
    match keep {
        Keep::First => {
            let mut end = bytes;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            &text[..end]
        }
        Keep::Last => {
            let mut start = text.len() - bytes;
            while !text.is_char_boundary(start) {
                start += 1;
            }
            &text[start..]
        }
    }
}

/// Template instructions one rendering may run (real templates use tens to a few thousand per
/// message: ten million is thousands of messages; it renders in about a second in the fuzzing
/// harness's instrumented build, a tenth of that in fuserl's).
const FUEL: u64 = 10_000_000;

/// The most a chat template's rendering may allocate (fuserl_io::budget; past it the process
/// stops): live, 512 MiB, eight times the longest data line fuserl reads (64 MiB); in all,
/// 16 GiB, which a real template rendering the longest line (a few copies of it as strings are
/// joined, the output grown by doubling) stays far below, and which bounds the time of a
/// template that appends to a string in a loop of its fuel (quadratic: 50 million instructions
/// would copy terabytes) to a few seconds.
const TEMPLATE_BUDGET: fuserl_io::budget::Budget = fuserl_io::budget::Budget { live: 512 << 20, total: 16 << 30 };

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
        let shape = serde_json::from_slice::<TokenizerShape>(&bytes)
            .map_err(|e| ModelError::format(&tj, format!("not valid JSON: {e}")))?;
        if let Some(normalizer) = &shape.normalizer {
            check_charsmaps(normalizer).map_err(|m| ModelError::format(&tj, format!("normalizer: {m}")))?;
        }
        let parts = [
            (&shape.normalizer, "normalizer", MAX_NORMALIZER_CHARS),
            (&shape.decoder, "decoder", MAX_NORMALIZER_CHARS),
            (&shape.pre_tokenizer, "pre_tokenizer", MAX_PRE_TOKENIZER_CHARS),
        ];
        for (part, name, cap) in parts {
            if let Some((place, n)) = part.as_ref().and_then(|v| long_string(v, cap, name)) {
                return Err(ModelError::format(
                    &tj,
                    format!("{place}: a string of {n} characters; at most {cap} are accepted there"),
                ));
            }
        }
        let longest = match shape.model.and_then(|m| m.vocab) {
            Some(VocabShape::Map(v)) => v.keys().map(|k| k.chars().count()).max(),
            Some(VocabShape::List(v)) => v.iter().map(|(k, _)| k.chars().count()).max(),
            _ => None,
        };
        if let Some(n) = longest.filter(|&n| n > MAX_VOCAB_CHARS) {
            return Err(ModelError::format(
                &tj,
                format!(
                    "model.vocab: an entry of {n} characters; at most {MAX_VOCAB_CHARS} are accepted (real \
                     vocabularies' longest have about 130)"
                ),
            ));
        }
        for (i, token) in shape.added_tokens.iter().flatten().enumerate() {
            let chars = token.get("content").and_then(Value::as_str).map_or(0, |c| c.chars().count());
            if chars > MAX_ADDED_TOKEN_CHARS {
                return Err(ModelError::format(
                    &tj,
                    format!(
                        "added_tokens[{i}]: a content of {chars} characters; at most {MAX_ADDED_TOKEN_CHARS} are \
                         accepted (real tokenizers' longest have about 30)"
                    ),
                ));
            }
        }
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
        // Fuel counts instructions, not bytes: a template that doubles a string in a loop, or
        // appends to one in a long loop, is stopped by a memory budget (exit status 2, the file
        // named; fuserl_io::budget).
        let over = format!("error: {}: chat template: rendering", fuserl_core::paths::Shown(&self.template_file));
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

    /// The first or last `keep` ids of `text`, and whether there were more. Only as much of the
    /// text is encoded as they need: a part of it, from the kept end, that doubles until it
    /// gives [`CUT_MARGIN`] tokens more than `keep` (or is the whole text, or spans
    /// [`MAX_TOKEN_BYTES`] a token): a 60 MB answer took 11 GB in the tokenizers crate, and a
    /// normaliser can multiply a text's length, so the memory is bounded by tokens, not bytes.
    /// Where a part reaches [`MAX_TOKEN_BYTES`] a token and still gives fewer tokens than
    /// wanted (tokens longer than that on average, or a normaliser that deletes most of the
    /// text), the text counts as longer than `keep` and the first kept ids may differ from the
    /// whole text's: no released tokenizer does that.
    fn encode_end(&self, text: &str, keep: usize, end: Keep) -> Result<(Vec<u32>, bool)> {
        let want = keep.saturating_add(CUT_MARGIN);
        let most = want.saturating_mul(MAX_TOKEN_BYTES);
        let mut bytes = want.saturating_mul(8).max(4096);
        loop {
            let part = part(text, bytes.min(most), end);
            let mut ids = self.encode(part)?;
            let whole = part.len() == text.len();
            if whole || ids.len() >= want || bytes >= most {
                let more = !whole || ids.len() > keep;
                if ids.len() > keep {
                    match end {
                        Keep::First => ids.truncate(keep),
                        Keep::Last => drop(ids.drain(..ids.len() - keep)),
                    }
                }
                return Ok((ids, more));
            }
            bytes = bytes.saturating_mul(2);
        }
    }

    /// The first `keep` ids of `text`, and whether there were more ([`Self::encode_end`]).
    pub fn encode_first(&self, text: &str, keep: usize) -> Result<(Vec<u32>, bool)> {
        self.encode_end(text, keep, Keep::First)
    }

    /// The last `keep` ids of `text`, and whether there were more ([`Self::encode_end`]).
    pub fn encode_last(&self, text: &str, keep: usize) -> Result<(Vec<u32>, bool)> {
        self.encode_end(text, keep, Keep::Last)
    }

    /// Prompt ids: the rendered conversation with the generation prompt, at most the last
    /// `keep` of them, and whether its beginning was cut (fuserl's sources and trainers drop a
    /// long prompt's first tokens). A template can render megabytes: only the end that the
    /// kept ids need is encoded ([`Self::encode_last`]).
    pub fn prompt_ids(&self, messages: &[ChatMessage], keep: usize) -> Result<(Vec<u32>, bool)> {
        self.encode_last(&self.render(messages, true)?, keep)
    }

    /// A whole conversation's ids, as transformers' `apply_chat_template(conversation,
    /// tokenize=True)` gives them (no generation prompt; what a reward model scores); one of
    /// more than `max_tokens` tokens is refused (an input error), found without encoding more
    /// than their worth ([`Self::encode_first`]).
    pub fn conversation_ids(&self, messages: &[ChatMessage], max_tokens: usize) -> Result<Vec<u32>> {
        let (ids, more) = self.encode_first(&self.render(messages, false)?, max_tokens)?;
        if more {
            return Err(ModelError::Input(format!("a conversation of more than {max_tokens} tokens")));
        }
        Ok(ids)
    }

    /// Response ids: the text followed by EOS.
    pub fn response_ids(&self, response: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode(response)?;
        ids.push(self.eos_id);
        Ok(ids)
    }

    /// A response's first `keep` ids ([`Self::encode_first`]), followed by EOS when the text
    /// ends within them (then `false`; `true`: the answer goes on past them, and no EOS).
    pub fn response_ids_within(&self, response: &str, keep: usize) -> Result<(Vec<u32>, bool)> {
        let (mut ids, more) = self.encode_first(response, keep)?;
        if !more {
            ids.push(self.eos_id);
        }
        Ok((ids, more))
    }
}
