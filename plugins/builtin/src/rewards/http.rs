//! `http`: a scoring server. Batches of answers are POSTed as JSON; the reply carries one reward
//! per answer. The default protocol is OpenRLHF's remote reward model (`--remote_rm_url`):
//!
//! ```text
//! -> {"query": [prompt + answer, ...], "prompts": [prompt, ...], "labels": [label, ...]}
//! <- {"rewards": [r, ...]}          (a bare list [r, ...] is read too)
//! ```
//!
//! ```toml
//! [reward]
//! kind = "http"
//! url = "http://127.0.0.1:5000/get_reward"
//! batch_size = 16                   # answers per request
//! chat_template = "../models/rm"    # render prompt and query with this template (a file or a
//!                                   # checkpoint folder); without it the prompt is the messages'
//!                                   # text and the query the prompt followed by the answer
//! labels = "../data/labels.jsonl"   # {"id": PROMPT_ID, "label": ...} per line: sent as `labels`
//! concurrency = 4
//! timeout_s = 120
//! max_retries = 5
//! api_key_env = "RM_API_KEY"
//! [reward.fields]                   # other servers: rename the fields, or leave one out with ""
//! query = "query"
//! prompts = "prompts"
//! labels = "labels"
//! responses = ""                    # the answers alone (not sent by default)
//! rewards = "rewards"               # in the reply
//! ```
//!
//! Retries, time-outs and keys as the `openai` source does them ([`crate::http`]). A reply with
//! the wrong number of rewards, or a reward that is not a finite number (`NaN`, `Infinity`,
//! `null`), stops scoring with a message naming the reward, the URL and the batch.

use std::collections::HashMap;
use std::path::PathBuf;

use fuserl_core::config::ConfigError;
use fuserl_core::data::ChatMessage;
use fuserl_core::extension::{RewardModel, ScoreItem, ScoreSink};
use fuserl_core::paths::Shown;
use fuserl_core::registry::{BuildContext, Built, PluginDescriptor, StaticFactory};
use fuserl_core::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::http::{Http, HttpSettings, WithHttp, build_with_http};
use crate::sources::openai::{load_template, render_with};

/// Field names of the request and reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fields {
    /// Prompt and answer together (empty: not sent).
    #[serde(default = "query")]
    pub query: String,
    /// The prompts (empty: not sent).
    #[serde(default = "prompts")]
    pub prompts: String,
    /// The labels, when a labels file is given (empty: not sent).
    #[serde(default = "labels")]
    pub labels: String,
    /// The answers alone (empty: not sent).
    #[serde(default)]
    pub responses: String,
    /// The rewards in the reply.
    #[serde(default = "rewards")]
    pub rewards: String,
}

fn query() -> String {
    "query".into()
}
fn prompts() -> String {
    "prompts".into()
}
fn labels() -> String {
    "labels".into()
}
fn rewards() -> String {
    "rewards".into()
}

impl Default for Fields {
    fn default() -> Self {
        Self { query: query(), prompts: prompts(), labels: labels(), responses: String::new(), rewards: rewards() }
    }
}

/// `[reward] kind = "http"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRewardConfig {
    /// Where to POST.
    pub url: String,
    /// Answers per request.
    #[serde(default = "default_batch")]
    pub batch_size: u32,
    /// A chat template (file, or checkpoint folder) for prompts and queries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    /// Labels per prompt (JSONL `{"id", "label"}`), relative to the recipe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<String>,
    /// Field names.
    #[serde(default)]
    pub fields: Fields,
    /// `api_key_env`, `concurrency`, `timeout_s` (120), `max_retries`, beside the keys above.
    #[serde(skip)]
    pub http: HttpSettings,
}

impl WithHttp for HttpRewardConfig {
    fn http_mut(&mut self) -> &mut HttpSettings {
        &mut self.http
    }
}

fn default_batch() -> u32 {
    16
}

/// The scoring server as a reward.
#[derive(Debug)]
pub struct HttpReward {
    config: HttpRewardConfig,
    template: Option<String>,
    labels: HashMap<String, Value>,
    labels_file: Option<PathBuf>,
}

impl HttpReward {
    /// Build: check the settings and read the template and labels; nothing is sent.
    pub fn new(config: HttpRewardConfig, ctx: &BuildContext) -> Result<Self, ConfigError> {
        crate::http::check_url(&config.url, "http://127.0.0.1:5000/get_reward")
            .map_err(|m| ConfigError::at("url", m))?;
        if config.batch_size == 0 {
            return Err(ConfigError::at("batch_size", "expected at least 1"));
        }
        config.http.check()?;
        if config.fields.rewards.is_empty() {
            return Err(ConfigError::new(
                fuserl_core::config::KeyPath::keys(&["fields", "rewards"]),
                "expected the name of the reply's rewards field",
            ));
        }
        let template = match &config.chat_template {
            Some(t) => Some(load_template(&ctx.resolve(t)).map_err(|m| ConfigError::at("chat_template", m))?),
            None => None,
        };
        let labels_file = config.labels.as_deref().map(|l| ctx.resolve(l));
        let mut labels = HashMap::new();
        if let Some(file) = &labels_file {
            let text = fuserl_core::paths::read_regular_string(file).map_err(|e| {
                ConfigError::at(
                    "labels",
                    format!("cannot read {}: {}", Shown(file), fuserl_core::paths::cannot_read(file, &e)),
                )
            })?;
            for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                #[derive(Deserialize)]
                struct Line {
                    id: String,
                    label: Value,
                }
                let l: Line = serde_json::from_str(line).map_err(|e| {
                    ConfigError::at(
                        "labels",
                        format!("{}:{}: expected {{\"id\": ..., \"label\": ...}}: {e}", Shown(file), i + 1),
                    )
                })?;
                labels.insert(l.id, l.label);
            }
        }
        Ok(Self { config, template, labels, labels_file })
    }

    fn error(&self, message: String) -> Error {
        Error::Component { point: "reward model", name: "http".into(), message }
    }

    fn prompt_text(&self, messages: &[ChatMessage]) -> Result<String> {
        match &self.template {
            Some(t) => render_with(t, messages, true).map_err(|m| self.error(format!("chat_template: {m}"))),
            None => Ok(messages.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n\n")),
        }
    }

    fn query_text(&self, item: &ScoreItem<'_>) -> Result<String> {
        match &self.template {
            Some(t) => {
                let mut c = item.messages.to_vec();
                c.push(ChatMessage { role: "assistant".into(), content: item.completion.text.clone() });
                render_with(t, &c, false).map_err(|m| self.error(format!("chat_template: {m}")))
            }
            None => Ok(format!("{}\n\n{}", self.prompt_text(item.messages)?, item.completion.text)),
        }
    }

    fn body(&self, items: &[ScoreItem<'_>]) -> Result<Value> {
        let f = &self.config.fields;
        let mut body = serde_json::Map::new();
        if !f.query.is_empty() {
            body.insert(f.query.clone(), json!(items.iter().map(|i| self.query_text(i)).collect::<Result<Vec<_>>>()?));
        }
        if !f.prompts.is_empty() {
            body.insert(
                f.prompts.clone(),
                json!(items.iter().map(|i| self.prompt_text(i.messages)).collect::<Result<Vec<_>>>()?),
            );
        }
        if !f.responses.is_empty() {
            body.insert(f.responses.clone(), json!(items.iter().map(|i| &i.completion.text).collect::<Vec<_>>()));
        }
        if let (false, Some(file)) = (f.labels.is_empty(), &self.labels_file) {
            let labels = items
                .iter()
                .map(|i| {
                    let id = &i.completion.id.prompt_id;
                    self.labels.get(id).cloned().ok_or_else(|| Error::Record {
                        record: i.completion.describe(),
                        message: format!("{} has no label for prompt `{id}`", Shown(file)),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            body.insert(f.labels.clone(), Value::Array(labels));
        }
        Ok(Value::Object(body))
    }
}

/// JSON, also as Python's `json` writes non-finite numbers (`NaN`, `Infinity`: read as null, so
/// that they are reported as not finite rather than retried as malformed).
pub(crate) fn parse_lenient(text: &str) -> std::result::Result<Value, String> {
    serde_json::from_str(text).or_else(|e| {
        let patched = text.replace("-Infinity", "null").replace("Infinity", "null").replace("NaN", "null");
        serde_json::from_str(&patched).map_err(|_| format!("not JSON ({e})"))
    })
}

/// The rewards of a reply: `field` of an object, or a bare list.
pub(crate) fn rewards_of(reply: &Value, field: &str, n: usize) -> std::result::Result<Vec<f64>, String> {
    let list = match reply {
        Value::Array(a) => a,
        Value::Object(o) => match o.get(field) {
            Some(Value::Array(a)) => a,
            _ => {
                return Err(format!(
                    "the reply has no `{field}` list (keys: {})",
                    o.keys().cloned().collect::<Vec<_>>().join(", ")
                ));
            }
        },
        _ => return Err(format!("the reply is neither an object with `{field}` nor a list")),
    };
    if list.len() != n {
        return Err(format!("the server returned {} rewards for {n} answers", list.len()));
    }
    list.iter()
        .enumerate()
        .map(|(i, v)| {
            // A one-element list per answer (some servers) counts as its number.
            let v = match v {
                Value::Array(a) if a.len() == 1 => &a[0],
                other => other,
            };
            v.as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| format!("reward {i} of the batch is {v}, not a finite number"))
        })
        .collect()
}

impl RewardModel for HttpReward {
    fn name(&self) -> &str {
        "http"
    }

    fn scorer_id(&self) -> String {
        format!("http:{}", self.config.url)
    }

    fn fingerprint(&self) -> String {
        let labels = self.labels_file.as_ref().and_then(|f| std::fs::read_to_string(f).ok());
        json!({"url": self.config.url, "fields": self.config.fields, "chat_template": self.template, "labels": labels})
            .to_string()
    }

    fn score(&self, items: &[ScoreItem<'_>]) -> Result<Vec<f64>> {
        fuserl_core::extension::collect_scores(self, items, 0)
    }

    fn score_batches(&self, items: &[ScoreItem<'_>], _batch_size: usize, sink: &mut ScoreSink<'_>) -> Result<()> {
        let http = Http::new(&self.config.http).map_err(|m| self.error(m))?;
        let size = self.config.batch_size as usize;
        let batches: Vec<(usize, &[ScoreItem<'_>])> = items.chunks(size).enumerate().collect();
        let url = &self.config.url;
        let field = &self.config.fields.rewards;
        let limit = self.config.http.concurrency as usize;
        http.block_on(async {
            let mut queue = batches.into_iter();
            let mut in_flight = futures_util::stream::FuturesUnordered::new();
            loop {
                while in_flight.len() < limit {
                    let Some((b, chunk)) = queue.next() else { break };
                    let body = self.body(chunk)?;
                    let http = &http;
                    in_flight.push(async move {
                        let got = http.send("http", url, &body, &parse_lenient, "", b as u64).await;
                        (b, chunk.len(), got)
                    });
                }
                let Some((b, n, got)) = futures_util::StreamExt::next(&mut in_flight).await else { break };
                let first = b * size;
                let place = format!("batch {} (answers {}..{})", b + 1, first + 1, first + n);
                let (reply, _) = got.map_err(|m| self.error(format!("{place}: {m}")))?;
                let scores = rewards_of(&reply, field, n).map_err(|m| self.error(format!("{url}: {place}: {m}")))?;
                let indices: Vec<usize> = (first..first + n).collect();
                sink(&indices, scores)?;
            }
            Ok::<(), Error>(())
        })
    }
}

fn build(t: &toml::Table, ctx: &BuildContext) -> Result<Built<dyn RewardModel>, ConfigError> {
    build_with_http(t, ctx, HttpSettings::default(), |c: HttpRewardConfig, ctx| {
        Ok(Box::new(HttpReward::new(c, ctx)?) as Box<dyn RewardModel>)
    })
}

inventory::submit! { PluginDescriptor { name: "http", origin: crate::ORIGIN,
summary: "a scoring server: batches POSTed as OpenRLHF's remote reward model protocol (fields renameable)",
factory: StaticFactory::Reward(build) } }

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_read_and_bad_ones_named() {
        let r = |t: &str, n| rewards_of(&parse_lenient(t).expect("json"), "rewards", n);
        assert_eq!(r(r#"{"rewards": [1, 2.5], "extra_logs": {}}"#, 2), Ok(vec![1.0, 2.5]));
        assert_eq!(r("[0.5, [1.5]]", 2), Ok(vec![0.5, 1.5]));
        assert_eq!(r(r#"{"rewards": [1]}"#, 2), Err("the server returned 1 rewards for 2 answers".into()));
        assert_eq!(r(r#"{"rewards": [1, NaN]}"#, 2), Err("reward 1 of the batch is null, not a finite number".into()));
        assert_eq!(
            r(r#"{"rewards": [-Infinity]}"#, 1),
            Err("reward 0 of the batch is null, not a finite number".into())
        );
        assert!(r(r#"{"scores": [1]}"#, 1).expect_err("bad").contains("no `rewards` list (keys: scores)"));
        assert!(parse_lenient("<html>").is_err());
    }

    #[test]
    fn connection_settings_sit_beside_the_own_keys_with_this_components_defaults() {
        let table = |text: &str| -> toml::Table { text.parse().expect("toml") };
        let ctx = BuildContext::default();
        let built = build(&table("url = \"http://127.0.0.1:9/r\"\nconcurrency = 2"), &ctx).expect("build");
        let r = &built.resolved;
        assert_eq!((r["concurrency"].as_integer(), r["timeout_s"].as_float()), (Some(2), Some(120.0)));
        assert_eq!(r["max_retries"].as_integer(), Some(5));
        let err = build(&table("url = \"http://127.0.0.1:9/r\"\ntimeout = 3"), &ctx).expect_err("unknown").to_string();
        assert!(err.contains("unknown key `timeout`") && err.contains("url") && err.contains("timeout_s"), "{err}");
        let err = build(&table("url = \"http://127.0.0.1:9/r\"\nconcurrency = 0"), &ctx).expect_err("0").to_string();
        assert!(err.starts_with("concurrency: expected at least 1"), "{err}");
        let err = build(&table("url = \"http://127.0.0.1:9/r\"\ntimeout_s = \"long\""), &ctx).expect_err("type");
        assert!(err.to_string().starts_with("timeout_s: "), "{err}");
    }
}
