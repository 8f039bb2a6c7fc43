//! `openai`: a served model behind an OpenAI-compatible API (vLLM, SGLang, TGI, llama.cpp's
//! server, Ollama, a hosted API) answers the recipe's prompts in the collect stage.
//!
//! ```toml
//! [[sources]]
//! kind = "openai"
//! name = "qwen-coder"                      # the source name in the data
//! base_url = "http://127.0.0.1:8080/v1"    # or a list: requests are spread over them
//! model = "qwen2.5-coder-0.5b"
//! api_key_env = "OPENAI_API_KEY"           # the variable's name; the key is never in a file
//! endpoint = "chat"                        # or "completions" (with chat_template)
//! concurrency = 4
//! timeout_s = 120
//! max_retries = 5
//! [sources.sampling]                       # overrides [data.sampling] for this source
//! temperature = 0.8
//! max_tokens = 512
//! stop = ["\n\n\n"]
//! extra = { repeat_penalty = 1.1 }         # server-specific body fields
//! ```
//!
//! Each prompt is asked for all its missing samples at once (`n`); a server that returns fewer
//! choices (llama.cpp ignores `n`) is asked again for the rest, and from then on once per answer
//! (the first request with `n` > 1 goes alone, to learn which kind of server it is). Every request carries the seed
//! of its first (prompt, sample), so that a rerun asks the same questions. 429, 5xx, time-outs,
//! dropped connections and replies that are not the OpenAI schema are retried with exponential
//! backoff and jitter, honouring `Retry-After`; other 4xx replies stop the source with the URL
//! and the server's words (for 401/403, the name of the key variable, never its value).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};

use fuserl_core::config::ConfigError;
use fuserl_core::data::{ChatMessage, SamplingParams, SourceSampling};
use fuserl_core::extension::{GenerateStats, Generated, GeneratedSink, Generator, SampleJob, SourceAdapter};
use fuserl_core::registry::{BuildContext, Built, PluginDescriptor, StaticFactory};

use crate::http::{HttpSettings, WithHttp, build_with_http};
use fuserl_core::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// Which API the requests go to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Endpoint {
    /// `/chat/completions`: the server applies the model's chat template.
    #[default]
    Chat,
    /// `/completions`: the prompt is rendered here with `chat_template` (base models, few-shot).
    Completions,
}

/// `[[sources]] kind = "openai"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiConfig {
    /// The source name its answers carry in the data.
    pub name: String,
    /// The API base (up to and including `/v1`), or a list of them.
    #[serde(deserialize_with = "fuserl_core::config::one_or_many")]
    pub base_url: Vec<String>,
    /// The model name the server knows.
    pub model: String,
    /// `chat` or `completions`.
    #[serde(default)]
    pub endpoint: Endpoint,
    /// With `endpoint = "completions"`: a Jinja chat template (a file, or a checkpoint folder
    /// whose tokenizer_config.json has one), rendered with `messages` and
    /// `add_generation_prompt = true`, relative to the recipe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    /// Sampling overrides.
    #[serde(default, skip_serializing_if = "SourceSampling::is_empty")]
    pub sampling: SourceSampling,
    /// Keep answers cut by the token limit (`finish_reason = "length"`); they are marked either way.
    #[serde(default = "yes")]
    pub keep_truncated: bool,
    /// `api_key_env`, `concurrency`, `timeout_s` (600 here), `max_retries`, beside the keys above.
    #[serde(skip)]
    pub http: HttpSettings,
}

impl WithHttp for OpenAiConfig {
    fn http_mut(&mut self) -> &mut HttpSettings {
        &mut self.http
    }
}

fn yes() -> bool {
    true
}

/// A served model as a source.
#[derive(Debug)]
pub struct OpenAiSource {
    config: OpenAiConfig,
    template: Option<String>,
}

impl OpenAiSource {
    /// Build: the settings are checked, nothing is sent.
    pub fn new(config: OpenAiConfig, ctx: &BuildContext) -> Result<Self, ConfigError> {
        fuserl_core::data::check_source_name(&config.name)?;
        if config.base_url.is_empty() {
            return Err(ConfigError::at("base_url", "expected at least one URL"));
        }
        for (i, url) in config.base_url.iter().enumerate() {
            crate::http::check_url(url, "http://127.0.0.1:8080/v1")
                .map_err(|m| ConfigError::new(fuserl_core::config::KeyPath::keys(&["base_url"]).index(i), m))?;
        }
        config.http.check()?;
        let template = match (config.endpoint, &config.chat_template) {
            (Endpoint::Completions, None) => {
                return Err(ConfigError::at(
                    "chat_template",
                    "endpoint = \"completions\" renders the prompt here: name a Jinja template file or a checkpoint folder",
                ));
            }
            (Endpoint::Chat, Some(_)) => {
                return Err(ConfigError::at(
                    "chat_template",
                    "only used with endpoint = \"completions\" (the chat endpoint applies the server's template)",
                ));
            }
            (_, Some(t)) => Some(load_template(&ctx.resolve(t)).map_err(|m| ConfigError::at("chat_template", m))?),
            (_, None) => None,
        };
        if let Some(t) = &template {
            render(t, &[ChatMessage::user("check")]).map_err(|m| ConfigError::at("chat_template", m))?;
        }
        Ok(Self { config, template })
    }

    fn body(&self, messages: &[ChatMessage], n: u32, seed: u64, sampling: &SamplingParams) -> Result<Value> {
        let s = &self.config.sampling;
        let mut body = serde_json::Map::new();
        body.insert("model".into(), json!(self.config.model));
        match self.config.endpoint {
            Endpoint::Chat => {
                body.insert("messages".into(), json!(messages));
            }
            Endpoint::Completions => {
                let t = self.template.as_deref().unwrap_or_default();
                let prompt = render(t, messages).map_err(|m| self.error(format!("chat_template: {m}")))?;
                body.insert("prompt".into(), json!(prompt));
            }
        }
        body.insert("n".into(), json!(n));
        body.insert("seed".into(), json!(seed));
        let in_effect = s.over(sampling);
        if let Some(t) = in_effect.temperature {
            body.insert("temperature".into(), json!(t));
        }
        if let Some(p) = in_effect.top_p {
            body.insert("top_p".into(), json!(p));
        }
        if let Some(m) = in_effect.max_new_tokens {
            body.insert("max_tokens".into(), json!(m));
        }
        if let Some(k) = in_effect.top_k {
            body.insert("top_k".into(), json!(k));
        }
        if !s.stop.is_empty() {
            body.insert("stop".into(), json!(s.stop));
        }
        for (k, v) in &s.extra {
            body.insert(k.clone(), serde_json::to_value(v).unwrap_or(Value::Null));
        }
        Ok(Value::Object(body))
    }

    fn error(&self, message: String) -> Error {
        Error::Component { point: "source", name: self.config.name.clone(), message }
    }

    fn path(&self) -> &'static str {
        match self.config.endpoint {
            Endpoint::Chat => "chat/completions",
            Endpoint::Completions => "completions",
        }
    }
}

pub(crate) fn load_template(path: &std::path::Path) -> std::result::Result<String, String> {
    let shown = fuserl_core::paths::Shown(path);
    if path.is_dir() {
        let cfg = path.join("tokenizer_config.json");
        let text = fuserl_core::paths::read_regular_string(&cfg).map_err(|e| {
            format!("{}: {}", fuserl_core::paths::Shown(&cfg), fuserl_core::paths::cannot_read(&cfg, &e))
        })?;
        let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", fuserl_core::paths::Shown(&cfg)))?;
        return v
            .get("chat_template")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| format!("{}: no `chat_template` string", fuserl_core::paths::Shown(&cfg)));
    }
    fuserl_core::paths::read_regular_string(path)
        .map_err(|e| format!("{shown}: {}", fuserl_core::paths::cannot_read(path, &e)))
}

/// Render a Hugging Face style chat template (`messages`, `add_generation_prompt`,
/// `bos_token`/`eos_token` empty, `raise_exception`).
fn render(template: &str, messages: &[ChatMessage]) -> std::result::Result<String, String> {
    render_with(template, messages, true)
}

/// [`render`] with or without the generation prompt.
pub(crate) fn render_with(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
) -> std::result::Result<String, String> {
    let mut env = minijinja::Environment::new();
    env.set_fuel(Some(1_000_000));
    env.add_function("raise_exception", |m: String| -> std::result::Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, m))
    });
    env.add_template("chat", template).map_err(|e| format!("not a valid template: {e}"))?;
    let t = env.get_template("chat").map_err(|e| e.to_string())?;
    t.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => "",
        eos_token => "",
    })
    .map_err(|e| format!("rendering failed: {e}"))
}

impl SourceAdapter for OpenAiSource {
    fn name(&self) -> &str {
        "openai"
    }

    fn generator(&self) -> Option<&dyn Generator> {
        Some(self)
    }
}

/// One request: a prompt and the jobs (indices into the job list) it should answer.
#[derive(Debug)]
struct Ask {
    jobs: Vec<usize>,
}

/// What one request brought back.
#[derive(Debug)]
pub(crate) struct Reply {
    choices: Vec<(String, Option<String>)>,
    model: Option<String>,
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    latency_s: f64,
}

pub(crate) fn parse_reply(text: &str, endpoint: Endpoint) -> std::result::Result<Reply, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON ({e})"))?;
    let choices = v.get("choices").and_then(Value::as_array).ok_or("no `choices` list")?;
    let mut out = Vec::with_capacity(choices.len());
    let mut indexed: Vec<(u64, (String, Option<String>))> = Vec::new();
    for (i, c) in choices.iter().enumerate() {
        let text = match endpoint {
            Endpoint::Chat => c.get("message").and_then(|m| m.get("content")),
            Endpoint::Completions => c.get("text"),
        };
        let text = match text {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) => String::new(),
            _ => {
                let key = if endpoint == Endpoint::Chat { "message.content" } else { "text" };
                return Err(format!("choice {i} has no `{key}` string"));
            }
        };
        let finish = c.get("finish_reason").and_then(Value::as_str).map(str::to_owned);
        let index = c.get("index").and_then(Value::as_u64).unwrap_or(i as u64);
        indexed.push((index, (text, finish)));
    }
    indexed.sort_by_key(|(i, _)| *i);
    out.extend(indexed.into_iter().map(|(_, c)| c));
    let usage = v.get("usage");
    Ok(Reply {
        choices: out,
        model: v.get("model").and_then(Value::as_str).map(str::to_owned),
        prompt_tokens: usage.and_then(|u| u.get("prompt_tokens")).and_then(Value::as_u64),
        completion_tokens: usage.and_then(|u| u.get("completion_tokens")).and_then(Value::as_u64),
        latency_s: 0.0,
    })
}

impl Generator for OpenAiSource {
    fn source_name(&self) -> &str {
        &self.config.name
    }

    fn fingerprint(&self, sampling: &SamplingParams) -> String {
        let s = &self.config.sampling;
        let in_effect = s.over(sampling);
        json!({
            "kind": "openai",
            "model": self.config.model,
            "endpoint": self.path(),
            "chat_template": self.template,
            "temperature": in_effect.temperature,
            "top_p": in_effect.top_p,
            "top_k": in_effect.top_k,
            "max_tokens": in_effect.max_new_tokens,
            "stop": s.stop,
            "extra": s.extra,
        })
        .to_string()
    }

    fn keep_truncated(&self) -> bool {
        self.config.keep_truncated
    }

    fn generate(
        &self,
        jobs: &[SampleJob<'_>],
        sampling: &SamplingParams,
        sink: &GeneratedSink<'_>,
    ) -> Result<GenerateStats> {
        let http = crate::http::Http::new(&self.config.http).map_err(|m| self.error(m))?;
        // One request per prompt for all of its jobs, in job order.
        let mut queue: VecDeque<Ask> = VecDeque::new();
        for (i, j) in jobs.iter().enumerate() {
            match queue.back_mut() {
                Some(ask) if jobs[ask.jobs[0]].prompt.id == j.prompt.id => ask.jobs.push(i),
                _ => queue.push_back(Ask { jobs: vec![i] }),
            }
        }
        let next_url = AtomicU64::new(0);
        let limit = self.config.http.concurrency as usize;
        let not_found = format!(" (is `{}` a model this server has, and the URL its /v1 base?)", self.config.model);
        let (endpoint, path) = (self.config.endpoint, self.path());
        let parse = move |text: &str| {
            parse_reply(text, endpoint).map_err(|why| format!("the reply is not an OpenAI {path} reply: {why}"))
        };
        http.block_on(async {
            let mut in_flight = futures_util::stream::FuturesUnordered::new();
            // Whether the server honours `n`, learnt from the first request that asks for more
            // than one answer (sent alone). A server that ignores it (llama.cpp) is then asked
            // once per answer, the samples of a prompt one after the other, so that its prompt
            // cache holds the prefix, as a client that never sent `n` would.
            let mut honours_n: Option<bool> = None;
            let mut probing = false;
            loop {
                while in_flight.len() < limit && !probing {
                    let Some(mut ask) = queue.pop_front() else { break };
                    if honours_n == Some(false) && ask.jobs.len() > 1 {
                        for rest in ask.jobs.split_off(1).into_iter().rev() {
                            queue.push_front(Ask { jobs: vec![rest] });
                        }
                    }
                    probing = honours_n.is_none() && ask.jobs.len() > 1;
                    let first = &jobs[ask.jobs[0]];
                    let body = self.body(&first.prompt.messages, ask.jobs.len() as u32, first.seed, sampling)?;
                    let base = &self.config.base_url[(next_url.fetch_add(1, Ordering::Relaxed) as usize) % self.config.base_url.len()];
                    let url = format!("{}/{}", base.trim_end_matches('/'), self.path());
                    let (http, parse, not_found) = (&http, &parse, &not_found);
                    let who = &self.config.name;
                    in_flight.push(async move {
                        match http.send(who, &url, &body, parse, not_found, first.seed).await {
                            Ok((mut reply, latency)) => {
                                reply.latency_s = latency;
                                Ok((ask, reply))
                            }
                            Err(m) => Err(self.error(m)),
                        }
                    });
                }
                let Some(done) = futures_util::StreamExt::next(&mut in_flight).await else { break };
                let (ask, reply) = done?;
                let n_choices = reply.choices.len();
                if ask.jobs.len() > 1 && honours_n.is_none() {
                    honours_n = Some(n_choices >= ask.jobs.len());
                    probing = false;
                    tracing::debug!(source = %self.config.name, honours_n = n_choices >= ask.jobs.len(), "learnt how the server treats `n`");
                }
                let mut left = ask.jobs.into_iter();
                for (choice, job) in reply.choices.into_iter().zip(left.by_ref()) {
                    let j = &jobs[job];
                    let (text, finish_reason) = choice;
                    sink(Generated {
                        prompt_id: j.prompt.id.clone(),
                        sample_index: j.sample_index,
                        seed: j.seed,
                        text,
                        finish_reason,
                        model: reply.model.clone(),
                        // Usage counts the whole request: per answer only when it had one.
                        prompt_tokens: reply.prompt_tokens.filter(|_| n_choices == 1),
                        completion_tokens: reply.completion_tokens.filter(|_| n_choices == 1),
                        latency_s: reply.latency_s,
                    })?;
                }
                let rest: Vec<usize> = left.collect();
                if !rest.is_empty() {
                    if n_choices == 0 {
                        return Err(self.error("the server answered with no choices".into()));
                    }
                    // Next, so that a server that ignores `n` sees the same prompt again at once
                    // (its prompt cache then holds the prefix).
                    queue.push_front(Ask { jobs: rest });
                }
            }
            Ok::<(), Error>(())
        })?;
        Ok(GenerateStats { retries: http.retries.into_inner(), requests: http.requests.into_inner() })
    }
}

fn build(t: &toml::Table, ctx: &BuildContext) -> Result<Built<dyn SourceAdapter>, ConfigError> {
    let defaults = HttpSettings { timeout_s: 600.0, ..HttpSettings::default() };
    build_with_http(t, ctx, defaults, |c: OpenAiConfig, ctx| {
        Ok(Box::new(OpenAiSource::new(c, ctx)?) as Box<dyn SourceAdapter>)
    })
}

inventory::submit! { PluginDescriptor { name: "openai", origin: crate::ORIGIN,
summary: "answers from a served model behind an OpenAI-compatible API (vLLM, SGLang, TGI, llama.cpp, Ollama)",
factory: StaticFactory::Source(build) } }

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_code_benchmark_few_shot_template_asks_the_last_user_message() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../recipes/templates/code-fewshot.jinja");
        let template = load_template(&path).expect("template");
        let messages = [ChatMessage::user("first"), ChatMessage::user("Write `f(x)` that doubles `x`.")];
        let text = render_with(&template, &messages, true).expect("render");
        assert!(text.starts_with("You write short, correct Python functions."), "{text}");
        assert!(text.ends_with("Task: Write `f(x)` that doubles `x`.\nSolution:\n```python\n"), "{text:?}");
        assert!(!text.contains("first"), "{text}");
    }

    #[test]
    fn replies_of_both_endpoints_parse_and_other_shapes_are_named() {
        let chat = r#"{"model": "m", "choices": [{"index": 1, "message": {"content": "b"}, "finish_reason": "length"},
            {"index": 0, "message": {"role": "assistant", "content": "a"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7}}"#;
        let r = parse_reply(chat, Endpoint::Chat).expect("chat");
        assert_eq!(r.choices, [("a".into(), Some("stop".into())), ("b".into(), Some("length".into()))]);
        assert_eq!((r.model.as_deref(), r.prompt_tokens, r.completion_tokens), (Some("m"), Some(5), Some(7)));
        let r = parse_reply(r#"{"choices": [{"text": "x"}]}"#, Endpoint::Completions).expect("completions");
        assert_eq!(r.choices, [("x".into(), None)]);
        assert_eq!(parse_reply("{oops", Endpoint::Chat).expect_err("bad").split(' ').next(), Some("not"));
        assert_eq!(parse_reply(r#"{"error": "x"}"#, Endpoint::Chat).expect_err("bad"), "no `choices` list");
        assert_eq!(
            parse_reply(r#"{"choices": [{"text": "x"}]}"#, Endpoint::Chat).expect_err("bad"),
            "choice 0 has no `message.content` string"
        );
    }

    #[test]
    fn templates_render_messages_with_a_generation_prompt() {
        let t = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";
        assert_eq!(render(t, &[ChatMessage::user("Hi")]).expect("render"), "<user>Hi\n<assistant>");
        let looping = "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}";
        assert!(render(looping, &[ChatMessage::user("Hi")]).is_err());
    }
}
