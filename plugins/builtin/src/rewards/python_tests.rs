//! `python-tests`: a code verifier. The answer's code (its first fenced Python block that defines
//! the entry point, else its first block, else the whole answer) runs with the prompt's tests in a
//! Python subprocess of its own; the reward is the fraction of tests passed.
//!
//! ```toml
//! [reward]
//! kind = "python-tests"
//! tests = "../data/code-tests.jsonl"   # one record per prompt id (below)
//! python = "python3"                   # the interpreter
//! timeout_s = 10                       # wall clock per answer
//! memory_mb = 1024                     # address space per answer
//! concurrency = 4                      # answers run at once (default: the CPU count)
//! ```
//!
//! The tests file has one JSON object per line, keyed by `id` (or HumanEval's `task_id`), either
//! in HumanEval's format: `test` (defining `check(candidate)`), `entry_point`, and optionally
//! `prompt` (the function's signature and docstring: put before an answer that only completes
//! it; its imports are put before an answer that defines the function itself), which counts as
//! one test; or `tests`: a list of Python statements (`assert f(1) == 2`), each a test.
//!
//! Every answer runs in a fresh temporary folder (removed after), with `python -I -B`, under
//! rlimits on memory, CPU time and file size, its own process group (killed whole when the wall
//! clock runs out), standard output read up to 64 KiB, and an audit hook that refuses starting
//! processes, network connections, C libraries and writes outside its folder (the answer then
//! scores 0). The hook is Python's own mechanism, not an OS sandbox: run untrusted code on a
//! machine you can afford to lose, as with HumanEval's own harness.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fuserl_core::config::ConfigError;
use fuserl_core::extension::{RewardModel, RewardTraits, ScoreItem};
use fuserl_core::paths::Shown;
use fuserl_core::registry::{BuildContext, Built, PluginDescriptor, StaticFactory, build_component};
use fuserl_core::{Error, Result};
use serde::{Deserialize, Serialize};

const HARNESS: &str = include_str!("python_harness.py");
const MAX_OUTPUT: usize = 64 << 10;

/// `[reward] kind = "python-tests"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PythonTestsConfig {
    /// The tests file (JSONL), relative to the recipe.
    pub tests: String,
    /// The Python interpreter.
    #[serde(default = "default_python")]
    pub python: String,
    /// Wall-clock seconds per answer.
    #[serde(default = "default_timeout")]
    pub timeout_s: f64,
    /// Address space per answer, in MiB.
    #[serde(default = "default_memory")]
    pub memory_mb: u64,
    /// Answers run at once (default: the number of CPUs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
}

fn default_python() -> String {
    "python3".into()
}
fn default_timeout() -> f64 {
    10.0
}
fn default_memory() -> u64 {
    1024
}

/// One prompt's tests.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeTests {
    /// The prompt id (`id` or `task_id`).
    #[serde(alias = "task_id")]
    pub id: String,
    /// HumanEval: the code defining `check(candidate)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<String>,
    /// HumanEval: the function under test.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry_point: Option<String>,
    /// HumanEval: the signature and docstring the answer completes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    /// Plain statements, each a test.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tests: Vec<String>,
}

/// What one run of an answer gave.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct Verdict {
    /// Tests passed.
    pub passed: u32,
    /// Tests run.
    pub total: u32,
    /// What the answer tried that is not allowed, if anything.
    pub violation: Option<String>,
    /// The first error, if any.
    pub error: Option<String>,
}

impl Verdict {
    /// The reward: the fraction passed, 0 after a violation.
    pub fn reward(&self) -> f64 {
        if self.violation.is_some() || self.total == 0 { 0.0 } else { f64::from(self.passed) / f64::from(self.total) }
    }

    fn failed(error: String) -> Self {
        Self { passed: 0, total: 0, violation: None, error: Some(error) }
    }
}

/// The verifier.
#[derive(Debug)]
pub struct PythonTests {
    tests: HashMap<String, CodeTests>,
    file: PathBuf,
    text: String,
    config: PythonTestsConfig,
    concurrency: usize,
}

static RUNS: AtomicU64 = AtomicU64::new(0);

impl PythonTests {
    /// Read the tests file and check the interpreter runs.
    pub fn new(config: PythonTestsConfig, ctx: &BuildContext) -> Result<Self, ConfigError> {
        fuserl_core::config::check::positive("timeout_s", config.timeout_s)?;
        if config.memory_mb < 64 {
            return Err(ConfigError::at("memory_mb", "expected at least 64 (Python itself needs that much)"));
        }
        let file = ctx.resolve(&config.tests);
        let text = std::fs::read_to_string(&file).map_err(|e| {
            ConfigError::at(
                "tests",
                format!("cannot read {}: {}", Shown(&file), fuserl_core::paths::cannot_read(&file, &e)),
            )
        })?;
        let tests = parse_tests(&text)
            .map_err(|(line, msg)| ConfigError::at("tests", format!("{}:{line}: {msg}", Shown(&file))))?;
        let concurrency = match config.concurrency {
            Some(0) => return Err(ConfigError::at("concurrency", "expected at least 1")),
            Some(n) => n as usize,
            None => std::thread::available_parallelism().map_or(1, usize::from),
        };
        Ok(Self { tests, file, text, config, concurrency })
    }

    /// Run `answer` against the tests of prompt `id`.
    pub fn verify(&self, id: &str, answer: &str) -> Result<Verdict> {
        let t = self.tests.get(id).ok_or_else(|| Error::Component {
            point: "reward model",
            name: "python-tests".into(),
            message: format!("{} has no tests for prompt `{id}`", Shown(&self.file)),
        })?;
        run_answer(t, answer, &self.config)
    }
}

/// Parse a tests file: `(line, message)` on a bad line.
pub fn parse_tests(text: &str) -> std::result::Result<HashMap<String, CodeTests>, (usize, String)> {
    let mut out = HashMap::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let t: CodeTests = serde_json::from_str(line).map_err(|e| {
            (i + 1, format!("expected {{\"id\", \"test\", \"entry_point\"}} or {{\"id\", \"tests\": [...]}}: {e}"))
        })?;
        match (&t.test, &t.entry_point, t.tests.is_empty()) {
            // A tests list may name its entry point too (it picks the answer's code block).
            (Some(_), Some(_), true) | (None, _, false) => {}
            _ => {
                return Err((
                    i + 1,
                    format!(
                        "prompt `{}`: give `test` with `entry_point` (HumanEval), or a non-empty `tests` list (with an optional `entry_point`)",
                        t.id
                    ),
                ));
            }
        }
        out.insert(t.id.clone(), t);
    }
    Ok(out)
}

/// The answer's code: its first fenced block that defines `entry_point` (when given), else its
/// first fenced block, else the whole text. Fences labelled with another language are skipped.
pub fn extract_code(answer: &str, entry_point: Option<&str>) -> String {
    let mut blocks = Vec::new();
    let mut rest = answer;
    while let Some(start) = rest.find("```") {
        let after = &rest[start + 3..];
        let Some(eol) = after.find('\n') else { break };
        let lang = after[..eol].trim().to_ascii_lowercase();
        let body = &after[eol + 1..];
        let (code, next) = match body.find("```") {
            Some(end) => (&body[..end], &body[end + 3..]),
            None => (body, ""),
        };
        if lang.is_empty() || lang == "python" || lang == "py" || lang == "python3" {
            blocks.push(code.to_owned());
        }
        rest = next;
    }
    if blocks.is_empty() {
        return answer.to_owned();
    }
    if let Some(f) = entry_point {
        let def = format!("def {f}(");
        if let Some(b) = blocks.iter().find(|b| b.contains(&def)) {
            return b.clone();
        }
    }
    blocks.swap_remove(0)
}

fn program(t: &CodeTests, answer: &str) -> String {
    let code = extract_code(answer, t.entry_point.as_deref());
    match (&t.prompt, &t.entry_point) {
        (Some(prompt), Some(f)) if !code.contains(&format!("def {f}(")) => format!("{prompt}{code}"),
        (Some(prompt), Some(_)) => {
            let imports: Vec<&str> =
                prompt.lines().filter(|l| l.starts_with("import ") || l.starts_with("from ")).collect();
            format!("{}\n{code}", imports.join("\n"))
        }
        _ => code,
    }
}

/// Run one answer in a fresh folder under the limits of `config`.
pub fn run_answer(t: &CodeTests, answer: &str, config: &PythonTestsConfig) -> Result<Verdict> {
    let n = RUNS.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("fuserl-python-tests-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let verdict = run_in(&dir, n, t, answer, config);
    let _ = std::fs::remove_dir_all(&dir);
    verdict
}

fn run_in(dir: &std::path::Path, n: u64, t: &CodeTests, answer: &str, config: &PythonTestsConfig) -> Result<Verdict> {
    let harness = dir.join("fuserl_harness.py");
    std::fs::write(&harness, HARNESS).map_err(|e| Error::io(&harness, e))?;
    // The line the result comes on: an answer's own output is unlikely to start with it.
    let marker =
        format!("FUSERL-RESULT-{:016x}", (n ^ u64::from(std::process::id())).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let job = serde_json::json!({
        "program": program(t, answer),
        "tests": t.tests,
        "check": t.test.as_ref().map(|test| serde_json::json!({"test": test, "entry_point": t.entry_point})),
        "marker": marker,
        "memory_bytes": config.memory_mb << 20,
        "cpu_seconds": config.timeout_s.ceil() as u64 + 1,
        "file_bytes": 16u64 << 20,
    });
    let mut child = Command::new(&config.python)
        .args(["-I", "-B", "fuserl_harness.py"])
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| Error::Component {
            point: "reward model",
            name: "python-tests".into(),
            message: format!("cannot start `{}`: {e}", config.python),
        })?;
    let pid = child.id();
    if let Some(mut stdin) = child.stdin.take() {
        // A closed pipe means the interpreter died at once; the verdict says so below.
        let _ = stdin.write_all(job.to_string().as_bytes());
    }
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 8192];
        // Read until end of file, keeping at most MAX_OUTPUT bytes (the last ones: the result
        // line comes last).
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            kept.extend_from_slice(&buf[..n]);
            if kept.len() > 2 * MAX_OUTPUT {
                kept.drain(..kept.len() - MAX_OUTPUT);
            }
        }
        kept
    });
    let deadline = Instant::now() + Duration::from_secs_f64(config.timeout_s);
    let mut timed_out = false;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() >= deadline => {
                timed_out = true;
                break;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => return Err(Error::io(dir, e)),
        }
    }
    // The whole process group: the harness and anything it left behind.
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let _ = child.kill();
    let _ = child.wait();
    let out = reader.join().unwrap_or_default();
    if timed_out {
        return Ok(Verdict::failed(format!("stopped after {} s", config.timeout_s)));
    }
    let text = String::from_utf8_lossy(&out);
    let verdict = text
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix(&marker))
        .and_then(|json| serde_json::from_str::<Verdict>(json.trim()).ok())
        .unwrap_or_else(|| {
            Verdict::failed("the process ended without a result (crashed, killed, or out of memory)".into())
        });
    Ok(verdict)
}

impl RewardModel for PythonTests {
    fn name(&self) -> &str {
        "python-tests"
    }

    fn traits(&self) -> RewardTraits {
        RewardTraits { verifier: true, ..RewardTraits::default() }
    }

    fn fingerprint(&self) -> String {
        serde_json::json!({
            "tests": self.text,
            "python": self.config.python,
            "timeout_s": self.config.timeout_s,
            "memory_mb": self.config.memory_mb,
        })
        .to_string()
    }

    fn score(&self, items: &[ScoreItem<'_>]) -> Result<Vec<f64>> {
        let next = AtomicUsize::new(0);
        let results: Vec<std::sync::Mutex<Option<Result<Verdict>>>> =
            items.iter().map(|_| std::sync::Mutex::new(None)).collect();
        std::thread::scope(|s| {
            for _ in 0..self.concurrency.min(items.len()) {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break };
                        let v = self.verify(&item.completion.id.prompt_id, &item.completion.text);
                        if let Ok(v) = &v {
                            tracing::debug!(
                                answer = %item.completion.describe(),
                                passed = v.passed,
                                total = v.total,
                                violation = v.violation.as_deref().unwrap_or("none"),
                                error = v.error.as_deref().unwrap_or("none"),
                                "verified"
                            );
                        }
                        *results[i].lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(v);
                    }
                });
            }
        });
        results
            .into_iter()
            .map(|m| {
                m.into_inner()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .expect("every item ran")
                    .map(|v| v.reward())
            })
            .collect()
    }
}

fn build(t: &toml::Table, ctx: &BuildContext) -> Result<Built<dyn RewardModel>, ConfigError> {
    build_component(t, ctx, |c: PythonTestsConfig, ctx| Ok(Box::new(PythonTests::new(c, ctx)?) as Box<dyn RewardModel>))
}

inventory::submit! { PluginDescriptor { name: "python-tests", origin: crate::ORIGIN,
summary: "code verifier: the answer's code runs with the prompt's tests (HumanEval format or asserts) in a limited subprocess; reward = fraction passed",
factory: StaticFactory::Reward(build) } }
