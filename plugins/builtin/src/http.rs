//! What every built-in that talks to a server shares (the `openai` source, the `http` and
//! `judge` rewards): the settings (`concurrency`, `timeout_s`, `max_retries`, `api_key_env`), one
//! `reqwest` client on a current-thread `tokio` runtime, and one request with its retries: 429,
//! 5xx, time-outs, dropped connections and replies the caller cannot parse are retried with
//! exponential backoff and jitter, honouring `Retry-After`; other 4xx replies fail at once with
//! the URL and the server's words (for 401/403, the name of the key variable, never its value).
//! A reply body larger than 64 MiB is cut off with an error.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use fuserl_core::config::{ConfigError, parse_table, to_table};
use fuserl_core::registry::{BuildContext, Built};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The connection settings of a component that talks to a server, written in its table beside
/// its own keys and read by [`build_with_http`] (serde's `flatten` cannot be combined with
/// `deny_unknown_fields`). A component's config holds them as `#[serde(skip)] http`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HttpSettings {
    /// The environment variable that holds the API key (sent as a bearer token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// Requests in flight.
    pub concurrency: u32,
    /// Seconds a request may take.
    pub timeout_s: f64,
    /// Retries of one request after a retryable failure.
    pub max_retries: u32,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self { api_key_env: None, concurrency: 4, timeout_s: 120.0, max_retries: 5 }
    }
}

/// [`HttpSettings`] as written: what is missing takes the component's defaults.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpKeys {
    api_key_env: Option<String>,
    concurrency: Option<u32>,
    timeout_s: Option<f64>,
    max_retries: Option<u32>,
}

/// A component config that holds [`HttpSettings`] (as `#[serde(skip)] http`).
pub trait WithHttp {
    /// Where its settings go.
    fn http_mut(&mut self) -> &mut HttpSettings;
}

/// Build a component whose table holds [`HttpSettings`]'s keys beside its own (config `C`):
/// each part is parsed strictly (an unknown key lists both parts' keys), missing settings take
/// `defaults`, and the resolved table has the component's keys followed by the settings.
pub fn build_with_http<C, T: ?Sized>(
    table: &toml::Table,
    ctx: &BuildContext,
    defaults: HttpSettings,
    make: impl FnOnce(C, &BuildContext) -> Result<Box<T>, ConfigError>,
) -> Result<Built<T>, ConfigError>
where
    C: DeserializeOwned + Serialize + WithHttp,
{
    const KEYS: [&str; 4] = ["api_key_env", "concurrency", "timeout_s", "max_retries"];
    let (settings, own): (toml::Table, toml::Table) =
        table.clone().into_iter().partition(|(k, _)| KEYS.contains(&k.as_str()));
    let mut config: C = parse_table(&own).map_err(|mut e| {
        // An unknown key of this table (not of a table inside it) may be one of the settings.
        if e.message.starts_with("unknown key") && e.path.0.len() == 1 {
            e.message = format!("{}, {}", e.message, KEYS.join(", "));
        }
        e
    })?;
    let keys: HttpKeys = parse_table(&settings)?;
    let http = HttpSettings {
        api_key_env: keys.api_key_env,
        concurrency: keys.concurrency.unwrap_or(defaults.concurrency),
        timeout_s: keys.timeout_s.unwrap_or(defaults.timeout_s),
        max_retries: keys.max_retries.unwrap_or(defaults.max_retries),
    };
    let mut resolved = to_table(&config)?;
    resolved.extend(to_table(&http)?);
    *config.http_mut() = http;
    let component = make(config, ctx)?;
    Ok(Built { component, resolved })
}

impl HttpSettings {
    /// Check the settings (errors at the component's keys).
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.concurrency == 0 {
            return Err(ConfigError::at("concurrency", "expected at least 1"));
        }
        if !(self.timeout_s.is_finite() && self.timeout_s > 0.0) {
            return Err(ConfigError::at("timeout_s", "expected a positive number of seconds"));
        }
        if let Some(var) = &self.api_key_env
            && (var.is_empty() || var.contains('='))
        {
            return Err(ConfigError::at("api_key_env", "expected the name of an environment variable"));
        }
        Ok(())
    }
}

/// Check that `url` is an http(s) URL; `example` shows what one looks like.
pub fn check_url(url: &str, example: &str) -> Result<(), String> {
    let ok = reqwest::Url::parse(url).is_ok_and(|u| matches!(u.scheme(), "http" | "https"));
    if ok { Ok(()) } else { Err(format!("`{url}`: expected an http:// or https:// URL such as {example}")) }
}

/// Why one attempt failed.
#[derive(Debug)]
pub enum Failure {
    /// Worth another try (after `after`, when the server said).
    Retry {
        /// What happened.
        why: String,
        /// The server's `Retry-After`.
        after: Option<Duration>,
    },
    /// Not worth retrying.
    Fatal(String),
}

/// A client for one component: the HTTP client, the runtime, the API key, the counters.
#[derive(Debug)]
pub struct Http {
    client: reqwest::Client,
    runtime: tokio::runtime::Runtime,
    key: Option<String>,
    settings: HttpSettings,
    /// Requests sent.
    pub requests: AtomicU64,
    /// Requests sent again after a retryable failure.
    pub retries: AtomicU64,
}

/// Cap on a reply body.
pub const MAX_REPLY_BYTES: usize = 64 << 20;

impl Http {
    /// Start the client; the key variable must be set when one is named.
    pub fn new(settings: &HttpSettings) -> Result<Self, String> {
        let key = match &settings.api_key_env {
            Some(var) => Some(
                std::env::var(var)
                    .map_err(|_| format!("the API key variable ${var} (api_key_env) is not set in the environment"))?,
            ),
            None => None,
        };
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs_f64(settings.timeout_s))
            .build()
            .map_err(|e| format!("cannot start the HTTP client: {e}"))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the async runtime: {e}"))?;
        Ok(Self {
            client,
            runtime,
            key,
            settings: settings.clone(),
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
        })
    }

    /// The settings.
    pub fn settings(&self) -> &HttpSettings {
        &self.settings
    }

    /// Run `f` on the runtime.
    pub fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    /// POST `body` to `url` once; `parse` reads a successful reply (a parse failure is retried);
    /// `not_found` is added to a 404's message. Returns the parsed reply and the seconds taken.
    pub async fn send_once<T>(
        &self,
        url: &str,
        body: &Value,
        parse: &(dyn Fn(&str) -> Result<T, String> + Sync),
        not_found: &str,
    ) -> Result<(T, f64), Failure> {
        let t0 = Instant::now();
        let mut req = self.client.post(url).json(body);
        if let Some(k) = &self.key {
            req = req.bearer_auth(k);
        }
        let timeout_s = self.settings.timeout_s;
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                let why = if e.is_timeout() {
                    format!("no reply within {timeout_s} s")
                } else if e.is_connect() {
                    format!("cannot connect ({})", root_cause(&e))
                } else {
                    format!("request failed ({})", root_cause(&e))
                };
                return Err(Failure::Retry { why, after: None });
            }
        };
        let status = resp.status();
        let after = retry_after(resp.headers());
        let mut bytes = Vec::new();
        let mut resp = resp;
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if bytes.len() + chunk.len() > MAX_REPLY_BYTES {
                        return Err(Failure::Fatal(format!("{url}: the reply is larger than {MAX_REPLY_BYTES} bytes")));
                    }
                    bytes.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) => {
                    let why = if e.is_timeout() {
                        format!("no complete reply within {timeout_s} s")
                    } else {
                        format!("the connection dropped mid-reply ({})", root_cause(&e))
                    };
                    return Err(Failure::Retry { why, after: None });
                }
            }
        }
        let text = String::from_utf8_lossy(&bytes);
        if status.as_u16() == 429 || status.is_server_error() {
            return Err(Failure::Retry { why: format!("HTTP {status}: {}", snippet(&text)), after });
        }
        if !status.is_success() {
            let hint = match (status.as_u16(), &self.settings.api_key_env) {
                (401 | 403, Some(var)) => format!(" (the API key came from ${var})"),
                (401 | 403, None) => " (no API key was sent: set api_key_env to the variable that holds it)".to_owned(),
                (404, _) => not_found.to_owned(),
                _ => String::new(),
            };
            return Err(Failure::Fatal(format!("{url}: HTTP {status}: {}{hint}", snippet(&text))));
        }
        match parse(&text) {
            Ok(r) => Ok((r, t0.elapsed().as_secs_f64())),
            Err(why) => Err(Failure::Retry { why: format!("{why}: {}", snippet(&text)), after: None }),
        }
    }

    /// [`Http::send_once`] with retries (`max_retries`, backoff salted by `salt`); `who` names the
    /// component in the log. Errors name the URL.
    pub async fn send<T>(
        &self,
        who: &str,
        url: &str,
        body: &Value,
        parse: &(dyn Fn(&str) -> Result<T, String> + Sync),
        not_found: &str,
        salt: u64,
    ) -> Result<(T, f64), String> {
        let mut attempt = 0u32;
        loop {
            self.requests.fetch_add(1, Ordering::Relaxed);
            match self.send_once(url, body, parse, not_found).await {
                Ok(r) => return Ok(r),
                Err(Failure::Fatal(m)) => return Err(m),
                Err(Failure::Retry { why, after }) => {
                    if attempt >= self.settings.max_retries {
                        let tries = fuserl_core::text::counted(u64::from(attempt) + 1, "attempt");
                        return Err(format!("{url}: gave up after {tries}: {why}"));
                    }
                    let wait = after.unwrap_or_else(|| backoff(attempt, salt));
                    tracing::warn!(component = %who, url = %url, attempt = attempt + 1, wait_s = wait.as_secs_f64(), "retrying: {why}");
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
            }
        }
    }
}

/// Exponential backoff with jitter: 0.5 s, 1 s, 2 s, ... up to 30 s, times 0.5-1.5 (a hash of
/// the request and attempt, so that concurrent retries spread out).
pub fn backoff(attempt: u32, salt: u64) -> Duration {
    let base = (0.5 * 2f64.powi(attempt.min(10) as i32)).min(30.0);
    let mut h = salt ^ u64::from(attempt).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    let jitter = 0.5 + (h % 1000) as f64 / 1000.0;
    Duration::from_secs_f64(base * jitter)
}

fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers.get(reqwest::header::RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<f64>().ok().filter(|s| s.is_finite() && *s >= 0.0).map(|s| Duration::from_secs_f64(s.min(300.0)))
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// The start of a reply, for messages.
pub fn snippet(text: &str) -> String {
    let t = text.trim();
    if t.chars().count() > 300 { format!("{}...", t.chars().take(300).collect::<String>()) } else { t.to_owned() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let a: Vec<f64> = (0..12).map(|i| backoff(i, 7).as_secs_f64()).collect();
        assert!(a[0] >= 0.25 && a[0] <= 0.75, "{a:?}");
        assert!(a[3] > a[0], "{a:?}");
        assert!(a.iter().all(|&s| s <= 45.0), "{a:?}");
        assert_ne!(backoff(3, 1), backoff(3, 2));
    }
}
