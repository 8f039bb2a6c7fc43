//! The `http` reward against a small scoring server started here on 127.0.0.1 (OpenRLHF's
//! remote reward model protocol): the request carries queries, prompts and labels; a reply is read
//! into one score per answer, batch by batch, in order; a server error is retried; a wrong number
//! of rewards, a non-finite reward, or a refused request is a message naming the reward, the URL
//! and the batch. Every accept loop is bounded.

use crate::common::server::serve;
use std::net::TcpListener;

use fuserl_core::data::{ChatMessage, Completion, CompletionId, Origin, SamplingParams};
use fuserl_core::extension::{RewardModel, ScoreItem};
use fuserl_core::registry::BuildContext;

fn reward(port: u16, extra: &str, dir: &std::path::Path) -> Box<dyn RewardModel> {
    let text = format!("url = \"http://127.0.0.1:{port}/get_reward\"\nbatch_size = 2\nconcurrency = 1\n{extra}");
    let table: toml::Table = toml::from_str(&text).expect("toml");
    fuserl_builtin::registry()
        .expect("registry")
        .build_reward("http", &table, &BuildContext { base_dir: dir.to_path_buf(), ..BuildContext::default() })
        .unwrap_or_else(|e| panic!("{e}"))
        .component
}

fn answers() -> (Vec<Vec<ChatMessage>>, Vec<Completion>) {
    let prompts = vec![vec![ChatMessage::user("What is 2+2?")], vec![ChatMessage::user("Name a colour.")]];
    let completions = ["4", "Four.", "Blue", "red, maybe green"]
        .iter()
        .enumerate()
        .map(|(i, t)| Completion {
            id: CompletionId {
                prompt_id: if i < 2 { "sum" } else { "colour" }.into(),
                source: "s".into(),
                sample_index: i as u32 % 2,
            },
            text: (*t).into(),
            sampling: SamplingParams::default(),
            origin: Origin { adapter: "test".into(), file: None, line: None },
            precomputed_score: None,
        })
        .collect();
    (prompts, completions)
}

fn items<'a>(prompts: &'a [Vec<ChatMessage>], completions: &'a [Completion]) -> Vec<ScoreItem<'a>> {
    completions.iter().enumerate().map(|(i, c)| ScoreItem { messages: &prompts[i / 2], completion: c }).collect()
}

/// Score: the length of each query.
fn lengths(body: &serde_json::Value) -> Vec<f64> {
    body["query"]
        .as_array()
        .map(|q| q.iter().map(|s| s.as_str().unwrap_or("").len() as f64).collect())
        .unwrap_or_default()
}

#[test]
fn batches_are_sent_in_openrlhf_form_and_scored_in_order() {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(
        dir.path().join("labels.jsonl"),
        "{\"id\": \"sum\", \"label\": \"4\"}\n{\"id\": \"colour\", \"label\": \"any\"}\n",
    )
    .expect("write");
    // The first request fails with a 500 and is retried.
    let (port, seen) = serve(3, |b, n| {
        if n == 0 { (500, "oops".into()) } else { (200, serde_json::json!({"rewards": lengths(b)}).to_string()) }
    });
    let r = reward(port, "labels = \"labels.jsonl\"\n[fields]\nresponses = \"responses\"\n", dir.path());
    let (p, c) = answers();
    let scores = r.score(&items(&p, &c)).expect("score");
    assert_eq!(scores, [15.0, 19.0, 20.0, 32.0]);
    let seen = seen.lock().expect("lock");
    assert_eq!(seen.len(), 3, "one retried request and two batches");
    assert_eq!(seen[1]["query"], serde_json::json!(["What is 2+2?\n\n4", "What is 2+2?\n\nFour."]));
    assert_eq!(seen[1]["prompts"], serde_json::json!(["What is 2+2?", "What is 2+2?"]));
    assert_eq!(seen[1]["labels"], serde_json::json!(["4", "4"]));
    assert_eq!(seen[2]["responses"], serde_json::json!(["Blue", "red, maybe green"]));
}

/// How the test server answers request `n` with body `b`.
type Reply = dyn Fn(&serde_json::Value, usize) -> (u16, String) + Send;

#[test]
fn bad_replies_are_named_with_the_reward_and_the_batch() {
    let dir = tempfile::tempdir().expect("tmp");
    let (p, c) = answers();
    let cases: Vec<(Box<Reply>, &str)> = vec![
        (
            Box::new(
                |_, n| if n == 0 { (200, "{\"rewards\": [1, 2]}".into()) } else { (200, "{\"rewards\": [1]}".into()) },
            ),
            "batch 2 (answers 3..4): the server returned 1 rewards for 2 answers",
        ),
        (
            Box::new(|_, _| (200, "{\"rewards\": [1, NaN]}".into())),
            "batch 1 (answers 1..2): reward 1 of the batch is null, not a finite number",
        ),
        (Box::new(|_, _| (400, "{\"error\": \"bad input\"}".into())), "batch 1 (answers 1..2): http://127.0.0.1"),
        (Box::new(|_, _| (200, "{\"scores\": [1, 2]}".into())), "no `rewards` list (keys: scores)"),
        // #13: a reply past the 64 MiB cap is cut off, not read whole.
        (
            Box::new(|_, _| (200, format!("{{\"rewards\": [1, 2], \"pad\": \"{}\"}}", "x".repeat(65 << 20)))),
            "the reply is larger than 67108864 bytes",
        ),
    ];
    for (f, want) in cases {
        let (port, _) = serve(2, f);
        let r = reward(port, "", dir.path());
        let err = r.score(&items(&p, &c)).expect_err("bad reply").to_string();
        assert!(err.contains("reward model `http`") && err.contains(want), "{err}\nwanted: {want}");
    }
    // Nothing listening: retried, then named.
    let port = TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let r = reward(port, "max_retries = 0\n", dir.path());
    let err = r.score(&items(&p, &c)).expect_err("unreachable").to_string();
    assert!(err.contains(&format!("127.0.0.1:{port}/get_reward: gave up after 1 attempt: cannot connect")), "{err}");
}
