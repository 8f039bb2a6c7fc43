//! `judge`: an LLM behind an OpenAI-compatible endpoint grades each answer, pointwise on a scale
//! (1 to 10 by default), in the manner of MT-Bench's single-answer grading: it is asked for a
//! short explanation and then a rating written `[[N]]`. Optionally the rating is the
//! probability-weighted mean over the rating token's `top_logprobs` (G-Eval's way), when the
//! server gives them.
//!
//! ```toml
//! [reward]
//! kind = "judge"
//! base_url = "http://127.0.0.1:8080/v1"
//! model = "judge"
//! template = "templates/judge.jinja"   # default: the built-in grading prompt (below)
//! endpoint = "chat"                    # or "completions": rendered here with chat_template,
//! # chat_template = "../models/judge"  # then `response_prefix` is appended (for example
//! # response_prefix = "Rating: [["    # "Rating: [[" so that the next token is the rating)
//! max_tokens = 512
//! logprobs = false                     # the probability-weighted rating from top_logprobs
//! on_unparseable = "fail"              # or "min": score the scale's minimum, or "skip": leave the
//!                                      # answer out of training (each said per answer)
//! unparseable_retries = 2              # asked again (another seed) before that
//! concurrency = 4
//! timeout_s = 120
//! max_retries = 5
//! api_key_env = "JUDGE_API_KEY"
//! ```
//!
//! The template is Jinja, rendered with `question` (the last user message), `answer`, `messages`
//! (the whole prompt), `min` and `max`; its output is the user message sent to the judge (after a
//! `system` message when one is set). Requests are deterministic (temperature 0 by default, and a
//! seed per answer and attempt).
//!
//! With `mode = "pairwise"` the judge compares two answers to one prompt, in the manner of
//! Arena-Hard: the template gets `answer_a` and `answer_b` (the built-in one:
//! [`DEFAULT_PAIRWISE_TEMPLATE`], after [`DEFAULT_PAIRWISE_SYSTEM`]), and the verdict ends with one
//! of the labels `[[A>>B]]`, `[[A>B]]`, `[[A=B]]`, `[[B>A]]`, `[[B>>A]]`: a preference for A of
//! 1, 1, 0.5, 0, 0 (a win, a tie counted half, a loss). Such a judge cannot score a single answer;
//! it is `[eval.judge]`, and the evaluation asks it both orders of every pair to cancel the
//! judge's position bias.

use std::path::PathBuf;

use fuserl_core::config::ConfigError;
use fuserl_core::data::ChatMessage;
use fuserl_core::extension::{PairItem, RewardModel, RewardTraits, ScoreItem, ScoreSink};
use fuserl_core::paths::Shown;
use fuserl_core::registry::{BuildContext, Built, PluginDescriptor, StaticFactory};
use fuserl_core::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::http::{Http, HttpSettings, WithHttp, build_with_http};
use crate::sources::openai::{Endpoint, load_template, render_with};

/// The built-in grading prompt.
pub const DEFAULT_TEMPLATE: &str = "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the \
response provided by an AI assistant to the user question displayed below. Consider its helpfulness, relevance, \
accuracy, depth and level of detail. Begin your evaluation with a short explanation, and be as objective as \
possible. After the explanation, rate the response on a scale of {{ min }} to {{ max }} in exactly this format: \
\"[[rating]]\", for example: \"Rating: [[5]]\".\n\n[Question]\n{{ question }}\n\n[The Start of Assistant's Answer]\n\
{{ answer }}\n[The End of Assistant's Answer]";

/// The built-in system message of the pairwise judge.
pub const DEFAULT_PAIRWISE_SYSTEM: &str = "You are an impartial judge of two AI assistants' answers to the same user \
prompt. Compare them for helpfulness, correctness, relevance and concision; do not let the order in which they are \
shown, their length or the assistants' names sway you. First explain your comparison briefly, then end with exactly \
one verdict label: [[A>>B]] if Assistant A is much better, [[A>B]] if A is better, [[A=B]] if they are about equally \
good, [[B>A]] if B is better, [[B>>A]] if B is much better. For example: \"My verdict: [[A=B]]\".";

/// The built-in user message of the pairwise judge.
pub const DEFAULT_PAIRWISE_TEMPLATE: &str = "[User Prompt]\n{{ question }}\n\n[The Start of Assistant A's Answer]\n\
{{ answer_a }}\n[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n{{ answer_b }}\n\
[The End of Assistant B's Answer]";

/// Pointwise (one answer, a rating) or pairwise (two answers, a verdict label).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JudgeMode {
    /// One answer at a time, rated on the scale: a reward.
    #[default]
    Pointwise,
    /// Two answers to one prompt, compared: `[eval.judge]`.
    Pairwise,
}

/// What to do with a verdict that has no rating after the retries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnUnparseable {
    /// Stop scoring with an error naming the answer and the verdict.
    #[default]
    Fail,
    /// Score the scale's minimum (a warning names the answer).
    Min,
    /// Leave the answer out of training (stored without a score; a warning names it).
    Skip,
}

/// `[reward] kind = "judge"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JudgeConfig {
    /// The API base (up to and including `/v1`).
    pub base_url: String,
    /// The judge model's name on the server.
    pub model: String,
    /// `pointwise` (a rating per answer: a reward) or `pairwise` (a verdict per pair of answers:
    /// `[eval.judge]`).
    #[serde(default)]
    pub mode: JudgeMode,
    /// A Jinja grading prompt file, relative to the recipe (default: [`DEFAULT_TEMPLATE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// A system message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    /// `chat` or `completions`.
    #[serde(default)]
    pub endpoint: Endpoint,
    /// With `completions`: the chat template to render the conversation with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    /// With `completions`: text after the rendered conversation (the verdict starts with it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub response_prefix: String,
    /// The lowest rating.
    #[serde(default = "default_min")]
    pub min: f64,
    /// The highest rating.
    #[serde(default = "default_max")]
    pub max: f64,
    /// Token limit of a verdict.
    #[serde(default = "default_max_tokens")]
    pub max_tokens: u32,
    /// Sampling temperature.
    #[serde(default)]
    pub temperature: f64,
    /// The rating as the probability-weighted mean over the rating token's `top_logprobs`.
    #[serde(default)]
    pub logprobs: bool,
    /// After the retries, a verdict without a rating: `fail` or `min`.
    #[serde(default)]
    pub on_unparseable: OnUnparseable,
    /// Times a verdict without a rating is asked again.
    #[serde(default = "default_unparseable_retries")]
    pub unparseable_retries: u32,
    /// `api_key_env`, `concurrency`, `timeout_s` (120), `max_retries`, beside the keys above.
    #[serde(skip)]
    pub http: HttpSettings,
}

impl WithHttp for JudgeConfig {
    fn http_mut(&mut self) -> &mut HttpSettings {
        &mut self.http
    }
}

fn default_min() -> f64 {
    1.0
}
fn default_max() -> f64 {
    10.0
}
fn default_max_tokens() -> u32 {
    512
}
fn default_unparseable_retries() -> u32 {
    2
}

/// The judge.
#[derive(Debug)]
pub struct Judge {
    config: JudgeConfig,
    template: String,
    template_file: Option<PathBuf>,
    chat_template: Option<String>,
}

/// One verdict as the server gave it: its text and, per token, the token and its alternatives.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Verdict {
    /// The text (after `response_prefix`, which it starts with).
    pub text: String,
    /// `(token, [(alternative, logprob)])` per generated token, when asked for.
    pub tokens: Vec<(String, Vec<(String, f64)>)>,
}

impl Judge {
    /// Build: check settings, read and try the templates; nothing is sent.
    pub fn new(config: JudgeConfig, ctx: &BuildContext) -> Result<Self, ConfigError> {
        crate::http::check_url(&config.base_url, "http://127.0.0.1:8080/v1")
            .map_err(|m| ConfigError::at("base_url", m))?;
        config.http.check()?;
        if !(config.min.is_finite() && config.max.is_finite() && config.min < config.max) {
            return Err(ConfigError::at("max", "expected finite `min` < `max`"));
        }
        let template_file = config.template.as_deref().map(|t| ctx.resolve(t));
        let pairwise = config.mode == JudgeMode::Pairwise;
        if pairwise && config.logprobs {
            return Err(ConfigError::at(
                "logprobs",
                "a pairwise verdict is a label, not a rating: logprobs needs mode = \"pointwise\"",
            ));
        }
        if pairwise && config.on_unparseable == OnUnparseable::Min {
            return Err(ConfigError::at(
                "on_unparseable",
                "a pairwise verdict has no minimum: use \"fail\" or \"skip\" (the pair is left out)",
            ));
        }
        let template = match &template_file {
            Some(f) => fuserl_core::paths::read_regular_string(f).map_err(|e| {
                ConfigError::at(
                    "template",
                    format!("cannot read {}: {}", Shown(f), fuserl_core::paths::cannot_read(f, &e)),
                )
            })?,
            None if pairwise => DEFAULT_PAIRWISE_TEMPLATE.to_owned(),
            None => DEFAULT_TEMPLATE.to_owned(),
        };
        let chat_template = match (config.endpoint, &config.chat_template) {
            (Endpoint::Completions, None) => {
                return Err(ConfigError::at(
                    "chat_template",
                    "endpoint = \"completions\" renders the conversation here: name a Jinja template file or a checkpoint folder",
                ));
            }
            (Endpoint::Chat, Some(_)) => {
                return Err(ConfigError::at("chat_template", "only used with endpoint = \"completions\""));
            }
            (_, Some(t)) => Some(load_template(&ctx.resolve(t)).map_err(|m| ConfigError::at("chat_template", m))?),
            (_, None) => None,
        };
        let judge = Self { config, template, template_file, chat_template };
        let probe = [ChatMessage::user("check")];
        judge.messages(&probe, &["check", "check"]).map_err(|e| ConfigError::at("template", e.to_string()))?;
        Ok(judge)
    }

    fn error(&self, message: String) -> Error {
        Error::Component { point: "reward model", name: "judge".into(), message }
    }

    /// The messages sent to the judge for one answer (pointwise: `answers[0]`) or a pair.
    fn messages(&self, prompt: &[ChatMessage], answers: &[&str]) -> Result<Vec<ChatMessage>> {
        let question = prompt.iter().rev().find(|m| m.role == "user").map_or("", |m| m.content.as_str());
        let mut env = minijinja::Environment::new();
        env.set_fuel(Some(1_000_000));
        let shown =
            self.template_file.as_ref().map_or_else(|| "the built-in template".to_owned(), |f| Shown(f).to_string());
        let bad = |e: minijinja::Error| self.error(format!("{shown}: {e}"));
        env.add_template("judge", &self.template).map_err(bad)?;
        let text = env
            .get_template("judge")
            .and_then(|t| {
                t.render(minijinja::context! {
                    question => question, answer => answers[0], messages => prompt,
                    answer_a => answers[0], answer_b => answers.get(1).copied().unwrap_or_default(),
                    min => self.config.min, max => self.config.max,
                })
            })
            .map_err(bad)?;
        let mut out = Vec::new();
        let system = match (&self.config.system, self.config.mode) {
            (Some(s), _) => Some(s.as_str()),
            (None, JudgeMode::Pairwise) => Some(DEFAULT_PAIRWISE_SYSTEM),
            (None, JudgeMode::Pointwise) => None,
        };
        if let Some(s) = system {
            out.push(ChatMessage { role: "system".into(), content: s.to_owned() });
        }
        out.push(ChatMessage::user(text));
        Ok(out)
    }

    fn body(&self, messages: &[ChatMessage], seed: u64) -> Result<Value> {
        let mut body = json!({
            "model": self.config.model,
            "max_tokens": self.config.max_tokens,
            "temperature": self.config.temperature,
            "seed": seed,
        });
        match self.config.endpoint {
            Endpoint::Chat => {
                body["messages"] = json!(messages);
                if self.config.logprobs {
                    body["logprobs"] = json!(true);
                    body["top_logprobs"] = json!(20);
                }
            }
            Endpoint::Completions => {
                let t = self.chat_template.as_deref().unwrap_or_default();
                let prompt = render_with(t, messages, true).map_err(|m| self.error(format!("chat_template: {m}")))?;
                body["prompt"] = json!(format!("{prompt}{}", self.config.response_prefix));
                if self.config.logprobs {
                    body["logprobs"] = json!(20);
                }
            }
        }
        Ok(body)
    }

    fn path(&self) -> &'static str {
        match self.config.endpoint {
            Endpoint::Chat => "chat/completions",
            Endpoint::Completions => "completions",
        }
    }

    /// The rating of a verdict, if it has one within the scale.
    pub fn rating(&self, verdict: &Verdict) -> Option<f64> {
        let (value, offset) = parse_rating(&verdict.text, self.config.min, self.config.max)?;
        if !self.config.logprobs {
            return Some(value);
        }
        Some(weighted_rating(verdict, offset, self.config.min, self.config.max).unwrap_or(value))
    }
}

/// The preference for A of a pairwise verdict: its last label among `[[A>>B]]`, `[[A>B]]`,
/// `[[A=B]]`, `[[B>A]]`, `[[B>>A]]` (1, 1, 0.5, 0, 0).
pub fn parse_preference(text: &str) -> Option<f64> {
    const LABELS: [(&str, f64); 5] =
        [("[[A>>B]]", 1.0), ("[[A>B]]", 1.0), ("[[A=B]]", 0.5), ("[[B>A]]", 0.0), ("[[B>>A]]", 0.0)];
    LABELS
        .iter()
        .filter_map(|(label, p)| text.rfind(label).map(|at| (at, *p)))
        .max_by_key(|(at, _)| *at)
        .map(|(_, p)| p)
}

/// The last rating written `[[N]]` (also `[[N]`, as a verdict cut by its token limit ends)
/// within `[min, max]`, else the one after `Rating:`, with the byte offset of its first digit.
pub fn parse_rating(text: &str, min: f64, max: f64) -> Option<(f64, usize)> {
    let number_at = |start: usize| -> Option<(f64, usize)> {
        let rest = &text[start..];
        let skip = rest.len() - rest.trim_start().len();
        let rest = &rest[skip..];
        let end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let v: f64 = rest[..end].trim_end_matches('.').parse().ok()?;
        (v >= min && v <= max).then_some((v, start + skip))
    };
    let mut found = None;
    for (i, _) in text.match_indices("[[") {
        if let Some(r) = number_at(i + 2)
            && text[r.1..]
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .is_some_and(|e| text[r.1 + e..].starts_with(']'))
        {
            found = Some(r);
        }
    }
    if found.is_some() {
        return found;
    }
    let lower = text.to_ascii_lowercase();
    lower.rfind("rating:").and_then(|i| {
        let rest = &text[i + "rating:".len()..];
        let skip = rest.len() - rest.trim_start_matches([' ', '[']).len();
        number_at(i + "rating:".len() + skip)
    })
}

/// The probability-weighted rating from the alternatives of the token at byte `offset`: the
/// mean of the ratings among them, weighted by their probabilities (renormalised).
pub(crate) fn weighted_rating(verdict: &Verdict, offset: usize, min: f64, max: f64) -> Option<f64> {
    let mut at = 0usize;
    for (token, alternatives) in &verdict.tokens {
        let end = at + token.len();
        if offset >= at && offset < end {
            let (mut sum, mut mass) = (0.0, 0.0);
            for (alt, logprob) in alternatives {
                if let Ok(v) = alt.trim().parse::<f64>()
                    && v >= min
                    && v <= max
                    && logprob.is_finite()
                {
                    let p = logprob.exp();
                    sum += p * v;
                    mass += p;
                }
            }
            return (mass > 0.0).then(|| sum / mass);
        }
        at = end;
    }
    None
}

/// Read a chat or completions reply: the first choice's text and its token log-probs.
pub(crate) fn parse_verdict(text: &str, endpoint: Endpoint, prefix: &str) -> std::result::Result<Verdict, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON ({e})"))?;
    let choice = v.get("choices").and_then(|c| c.get(0)).ok_or("no `choices[0]`")?;
    let content = match endpoint {
        Endpoint::Chat => choice.get("message").and_then(|m| m.get("content")),
        Endpoint::Completions => choice.get("text"),
    };
    let content = match content {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) => String::new(),
        _ => return Err("choice 0 has no text".into()),
    };
    let mut tokens: Vec<(String, Vec<(String, f64)>)> = Vec::new();
    match (endpoint, choice.get("logprobs")) {
        (Endpoint::Chat, Some(lp)) => {
            for t in lp.get("content").and_then(Value::as_array).into_iter().flatten() {
                let token = t.get("token").and_then(Value::as_str).unwrap_or("").to_owned();
                let alts = t
                    .get("top_logprobs")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|a| Some((a.get("token")?.as_str()?.to_owned(), a.get("logprob")?.as_f64()?)))
                    .collect();
                tokens.push((token, alts));
            }
        }
        (Endpoint::Completions, Some(lp)) => {
            let toks = lp.get("tokens").and_then(Value::as_array).cloned().unwrap_or_default();
            let tops = lp.get("top_logprobs").and_then(Value::as_array).cloned().unwrap_or_default();
            for (i, t) in toks.iter().enumerate() {
                let alts = tops
                    .get(i)
                    .and_then(Value::as_object)
                    .map(|o| o.iter().filter_map(|(k, v)| Some((k.clone(), v.as_f64()?))).collect())
                    .unwrap_or_default();
                tokens.push((t.as_str().unwrap_or("").to_owned(), alts));
            }
        }
        _ => {}
    }
    if !prefix.is_empty() {
        tokens.insert(0, (prefix.to_owned(), Vec::new()));
    }
    Ok(Verdict { text: format!("{prefix}{content}"), tokens })
}

impl RewardModel for Judge {
    fn name(&self) -> &str {
        "judge"
    }

    fn scorer_id(&self) -> String {
        format!("judge:{}", self.config.model)
    }

    fn fingerprint(&self) -> String {
        let c = &self.config;
        json!({
            "model": c.model, "mode": c.mode, "base_url": c.base_url, "template": self.template, "system": c.system,
            "endpoint": self.path(), "chat_template": self.chat_template, "response_prefix": c.response_prefix,
            "min": c.min, "max": c.max, "max_tokens": c.max_tokens, "temperature": c.temperature,
            "logprobs": c.logprobs, "on_unparseable": c.on_unparseable,
        })
        .to_string()
    }

    fn traits(&self) -> RewardTraits {
        RewardTraits {
            skips: self.config.on_unparseable == OnUnparseable::Skip,
            pairwise: self.config.mode == JudgeMode::Pairwise,
            ..RewardTraits::default()
        }
    }

    fn score(&self, items: &[ScoreItem<'_>]) -> Result<Vec<f64>> {
        fuserl_core::extension::collect_scores(self, items, 0)
    }

    fn score_batches(&self, items: &[ScoreItem<'_>], _batch_size: usize, sink: &mut ScoreSink<'_>) -> Result<()> {
        if self.config.mode == JudgeMode::Pairwise {
            return Err(self.error(
                "mode = \"pairwise\" compares two answers and cannot score one: use it as [eval.judge], or mode = \"pointwise\" as a reward".into(),
            ));
        }
        self.ask_all(
            items.len(),
            |i| {
                let item = &items[i];
                let messages = self.messages(item.messages, &[&item.completion.text])?;
                let seed =
                    item.completion.sampling.seed.unwrap_or(0) ^ (u64::from(item.completion.id.sample_index) << 32);
                Ok((messages, seed, item.completion.describe()))
            },
            |v| self.rating(v),
            sink,
        )
    }

    fn compare_batches(&self, items: &[PairItem<'_>], sink: &mut ScoreSink<'_>) -> Result<()> {
        if self.config.mode != JudgeMode::Pairwise {
            return Err(self.error("compares two answers only with mode = \"pairwise\"".into()));
        }
        self.ask_all(
            items.len(),
            |i| {
                let p = &items[i];
                let messages = self.messages(p.messages, &[&p.a.text, &p.b.text])?;
                let mut h = fuserl_core::maths::Fnv1a::new();
                h.update(p.a.id.prompt_id.as_bytes()).update(&[0xff]);
                for c in [p.a, p.b] {
                    h.update(c.id.source.as_bytes()).update(&c.id.sample_index.to_le_bytes()).update(&[0xff]);
                }
                Ok((messages, h.finish(), format!("{} against {}", p.a.describe(), p.b.describe())))
            },
            |v| parse_preference(&v.text),
            sink,
        )
    }
}

impl Judge {
    /// Ask the judge about items `0..n` (`job(i)`: the messages, a seed, what the item is),
    /// `concurrency` at a time, and hand each item's value (`value` of its verdict) to `sink` as
    /// it comes; a verdict without a value is asked again, then settled by `on_unparseable`.
    fn ask_all(
        &self,
        n: usize,
        job: impl Fn(usize) -> Result<(Vec<ChatMessage>, u64, String)>,
        value: impl Fn(&Verdict) -> Option<f64>,
        sink: &mut ScoreSink<'_>,
    ) -> Result<()> {
        let http = Http::new(&self.config.http).map_err(|m| self.error(m))?;
        let url = format!("{}/{}", self.config.base_url.trim_end_matches('/'), self.path());
        let (endpoint, prefix) = (self.config.endpoint, self.config.response_prefix.clone());
        let path = self.path();
        let parse = move |text: &str| {
            parse_verdict(text, endpoint, &prefix)
                .map_err(|why| format!("the reply is not an OpenAI {path} reply: {why}"))
        };
        let not_found = format!(" (is `{}` a model this server has, and the URL its /v1 base?)", self.config.model);
        let limit = self.config.http.concurrency as usize;
        let expected = match self.config.mode {
            JudgeMode::Pointwise => format!("no rating in [{}, {}]", self.config.min, self.config.max),
            JudgeMode::Pairwise => "no verdict label ([[A>>B]], [[A>B]], [[A=B]], [[B>A]] or [[B>>A]])".to_owned(),
        };
        http.block_on(async {
            let mut queue = 0..n;
            let mut in_flight = futures_util::stream::FuturesUnordered::new();
            loop {
                while in_flight.len() < limit {
                    let Some(i) = queue.next() else { break };
                    let (messages, seed, what) = job(i)?;
                    let (http, url, parse, not_found, value, expected) = (&http, &url, &parse, &not_found, &value, &expected);
                    in_flight.push(async move {
                        let mut last = String::new();
                        for attempt in 0..=self.config.unparseable_retries {
                            let body = self.body(&messages, seed.wrapping_add(u64::from(attempt)) % (1 << 31))?;
                            let (verdict, _) = http
                                .send("judge", url, &body, parse, not_found, seed)
                                .await
                                .map_err(|m| self.error(format!("{what}: {m}")))?;
                            if let Some(r) = value(&verdict) {
                                return Ok((i, r));
                            }
                            last = verdict.text;
                        }
                        let snippet = crate::http::snippet(&last);
                        match self.config.on_unparseable {
                            OnUnparseable::Fail => Err(Error::Record {
                                record: what,
                                message: format!(
                                    "the judge gave {expected} after {}; last verdict: {snippet:?} \
                                     (on_unparseable = \"skip\" leaves such answers out{})",
                                    fuserl_core::text::counted(u64::from(self.config.unparseable_retries) + 1, "attempt"),
                                    if self.config.mode == JudgeMode::Pointwise { ", \"min\" scores them the minimum" } else { "" }
                                ),
                            }),
                            OnUnparseable::Min => {
                                tracing::warn!(answer = %what, verdict = %snippet, "the judge gave no rating: scored the minimum");
                                Ok((i, self.config.min))
                            }
                            OnUnparseable::Skip => {
                                tracing::warn!(answer = %what, verdict = %snippet, "the judge gave no verdict: left out");
                                Ok((i, f64::NAN))
                            }
                        }
                    });
                }
                let Some(done) = futures_util::StreamExt::next(&mut in_flight).await else { break };
                let (i, r) = done?;
                sink(&[i], vec![r])?;
            }
            Ok::<(), Error>(())
        })
    }
}

fn build(t: &toml::Table, ctx: &BuildContext) -> Result<Built<dyn RewardModel>, ConfigError> {
    build_with_http(t, ctx, HttpSettings::default(), |c: JudgeConfig, ctx| {
        Ok(Box::new(Judge::new(c, ctx)?) as Box<dyn RewardModel>)
    })
}

inventory::submit! { PluginDescriptor { name: "judge", origin: crate::ORIGIN,
summary: "an LLM judge behind an OpenAI-compatible API grades each answer 1-10 (MT-Bench style; optionally logprob-weighted), or compares two (pairwise, for [eval.judge])",
factory: StaticFactory::Reward(build) } }

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratings_are_found_within_the_scale() {
        assert_eq!(parse_rating("Good answer. Rating: [[7]]", 1.0, 10.0), Some((7.0, 23)));
        assert_eq!(parse_rating("[[3]] then [[8.5]]", 1.0, 10.0).map(|r| r.0), Some(8.5));
        assert_eq!(parse_rating("Rating: 6/10", 1.0, 10.0).map(|r| r.0), Some(6.0));
        assert_eq!(parse_rating("[[11]]", 1.0, 10.0), None);
        assert_eq!(parse_rating("Rating: [[1.0]", 1.0, 10.0), Some((1.0, 10)));
        assert_eq!(parse_rating("[[x]] no rating", 1.0, 10.0), None);
    }

    #[test]
    fn pairwise_verdicts_are_read_from_their_last_label() {
        assert_eq!(parse_preference("A is clearer. My verdict: [[A>B]]"), Some(1.0));
        assert_eq!(parse_preference("[[A>>B]] at first, but on reflection [[B>>A]]"), Some(0.0));
        assert_eq!(parse_preference("Tie: [[A=B]]"), Some(0.5));
        assert_eq!(parse_preference("[[B>A]]"), Some(0.0));
        assert_eq!(parse_preference("B is better"), None);
        assert_eq!(parse_preference("[[A>C]]"), None);
    }

    #[test]
    fn the_weighted_rating_reads_the_rating_tokens_alternatives() {
        let body = r#"{"choices": [{"message": {"content": "Fine. [[8]]"}, "logprobs": {"content": [
            {"token": "Fine.", "logprob": -0.1, "top_logprobs": []},
            {"token": " [[", "logprob": -0.1, "top_logprobs": []},
            {"token": "8", "logprob": -0.2, "top_logprobs": [{"token": "8", "logprob": -0.6931471805599453},
                {"token": "6", "logprob": -0.6931471805599453}, {"token": "x", "logprob": -1.0}]},
            {"token": "]]", "logprob": 0.0, "top_logprobs": []}]}}]}"#;
        let v = parse_verdict(body, Endpoint::Chat, "").expect("parse");
        let (value, offset) = parse_rating(&v.text, 1.0, 10.0).expect("rating");
        assert_eq!(value, 8.0);
        assert!((weighted_rating(&v, offset, 1.0, 10.0).expect("weighted") - 7.0).abs() < 1e-12);
        let prefixed = parse_verdict(r#"{"choices": [{"text": "4]] because"}]}"#, Endpoint::Completions, "Rating: [[")
            .expect("parse");
        assert_eq!(parse_rating(&prefixed.text, 1.0, 10.0).map(|r| r.0), Some(4.0));
    }
}
