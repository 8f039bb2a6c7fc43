//! A page opened in headless Chromium through ChromeDriver (W3C WebDriver over HTTP on
//! 127.0.0.1), for the tests of the run report: what the page shows, and what the browser
//! logged on its console. Debian's `chromium` and `chromium-driver` packages (installed by
//! `.ci/run`); without them the caller skips, unless `FUSERL_REQUIRE_CHROMIUM=1`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

/// Chromium and ChromeDriver, if installed.
pub fn chromium() -> Option<(PathBuf, PathBuf)> {
    let find = |names: &[&str]| names.iter().map(|n| Path::new("/usr/bin").join(n)).find(|p| p.is_file());
    let found = find(&["chromium", "chromium-browser"]).zip(find(&["chromedriver"]));
    if found.is_none() {
        assert!(
            std::env::var("FUSERL_REQUIRE_CHROMIUM").as_deref() != Ok("1"),
            "FUSERL_REQUIRE_CHROMIUM=1 but /usr/bin/chromium or /usr/bin/chromedriver is missing (apt-get install chromium chromium-driver)"
        );
    }
    found
}

/// A running ChromeDriver with one headless Chromium session.
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    client: reqwest::Client,
    runtime: tokio::runtime::Runtime,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Start ChromeDriver on a free port of 127.0.0.1 and open a session (bounded waits).
    pub fn start(chromium: &Path, chromedriver: &Path) -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let client = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("client");
        let profile = tempfile::tempdir().expect("profile dir");
        let mut browser = Browser {
            driver,
            base: format!("http://127.0.0.1:{port}"),
            session: String::new(),
            client,
            runtime,
            _profile: profile,
        };
        let ready = (0..100).any(|_| {
            let ok = browser.call(reqwest::Method::GET, "/status", None).is_some_and(|v| v["value"]["ready"] == true);
            if !ok {
                std::thread::sleep(Duration::from_millis(100));
            }
            ok
        });
        assert!(ready, "chromedriver did not answer on {}", browser.base);
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": chromium.display().to_string(),
                // As root, without a display and without the network: the flags this machine's
                // notes give (background networking off, or Chromium keeps dialling out).
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                         "--disable-background-networking", "--disable-component-update", "--disable-sync",
                         "--window-size=1400,1000",
                         format!("--user-data-dir={}", browser._profile.path().display())],
            },
        }}});
        let reply = browser.call(reqwest::Method::POST, "/session", Some(caps)).expect("new session");
        browser.session =
            reply["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {reply}")).to_owned();
        browser
    }

    fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Option<Value> {
        self.runtime.block_on(async {
            let mut req = self.client.request(method, format!("{}{path}", self.base));
            if let Some(b) = body {
                req = req.json(&b);
            }
            let resp = req.send().await.ok()?;
            resp.json::<Value>().await.ok()
        })
    }

    fn session_call(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let path = format!("/session/{}{path}", self.session);
        let reply = self.call(method, &path, Some(body)).unwrap_or_else(|| panic!("no reply to {path}"));
        assert!(reply["value"].get("error").is_none(), "{path}: {reply}");
        reply["value"].clone()
    }

    /// Load a URL and wait for it (WebDriver's navigation waits for the load event).
    pub fn open(&self, url: &str) {
        self.session_call(reqwest::Method::POST, "/url", json!({"url": url}));
    }

    /// Run a script in the page; its return value.
    pub fn eval(&self, script: &str) -> Value {
        self.session_call(reqwest::Method::POST, "/execute/sync", json!({"script": script, "args": []}))
    }

    /// The browser's console and page errors since the last call (ChromeDriver's log endpoint).
    pub fn console(&self) -> Vec<Value> {
        self.session_call(reqwest::Method::POST, "/se/log", json!({"type": "browser"}))
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The console entries at level SEVERE (errors).
    pub fn console_errors(&self) -> Vec<Value> {
        self.console().into_iter().filter(|e| e["level"] == "SEVERE").collect()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.call(reqwest::Method::DELETE, &format!("/session/{}", self.session), None);
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// What a report page shows, collected in the browser: per plot figure, its declared series
/// with their colours and, per series colour, how many SVG marks of that colour have a
/// non-empty box and the values their boxes span on the y axis (from the rendered geometry,
/// through the two points of the axis the figure declares); every number that names its place
/// in eval.json; the sample answers' models per prompt; the stage table; and the resources the
/// page fetched.
pub const REPORT_FACTS: &str = r#"
const figures = [...document.querySelectorAll('figure.plot')].map(fig => {
  const series = JSON.parse(fig.dataset.series);
  const svg = fig.querySelector('svg');
  const box = svg ? svg.getBoundingClientRect() : {width: 0, height: 0};
  const marks = svg ? [...svg.querySelectorAll('polyline, rect, line, circle, path, polygon')] : [];
  const texts = svg ? [...svg.querySelectorAll('text')].map(t => t.textContent.trim()) : [];
  const axis = fig.dataset.yAxis ? JSON.parse(fig.dataset.yAxis) : null;
  const value = px => axis[0][0] + (px - axis[0][1]) * (axis[1][0] - axis[0][0]) / (axis[1][1] - axis[0][1]);
  const drawn = {};
  const spans = {};
  const colors = {};
  for (const s of series) {
    const c = s.color.toUpperCase();
    colors[s.name] = c;
    const mine = marks.filter(m => {
      const paint = [(m.getAttribute('stroke') || ''), (m.getAttribute('fill') || '')].map(x => x.toUpperCase());
      if (!paint.includes(c)) return false;
      const b = m.getBBox();
      return b.width + b.height > 0;
    });
    drawn[s.name] = mine.length;
    if (axis) spans[s.name] = mine.map(m => { const b = m.getBBox(); return [value(b.y + b.height), value(b.y)]; });
  }
  const pixel = axis ? Math.abs((axis[1][0] - axis[0][0]) / (axis[1][1] - axis[0][1])) : null;
  return {id: fig.id, series: series.map(s => s.name), colors, drawn, spans, pixel, texts, width: box.width, height: box.height};
});
const examples = [...document.querySelectorAll('div.example')].map(d => [...d.querySelectorAll('tbody tr')].map(tr => tr.cells[0].textContent));
const stages = [...document.querySelectorAll('table')].filter(t => t.querySelector('th') && t.querySelector('th').textContent === 'stage' && t.rows[0].cells[1].textContent === 'state')
  .flatMap(t => [...t.querySelectorAll('tbody tr')].map(tr => [...tr.cells].map(c => c.textContent)));
const numbers = [...document.querySelectorAll('[data-json-pointer]')].map(e => ({pointer: e.dataset.jsonPointer, text: e.textContent}));
const fetched = performance.getEntriesByType('resource').map(r => r.name);
return {figures, numbers, fetched, examples, stages, title: document.title};
"#;
