//! `fuserl export-gguf` on the three real models (SmolLM2-135M-Instruct: Llama with its Q/K
//! permutation; Qwen2.5-Coder-0.5B-Instruct: Qwen2 with biases and padded vocabulary; Gemma 3
//! 270M: SentencePiece vocabulary, Gemma's norms, sliding layers), checked against llama.cpp
//! itself through its server (`llama-cpp-python[server]`, scripts/setup-llama-server.sh):
//!
//! - the f16 export tokenises the 20 prompts of `fixtures/gguf_export/greedy.json` as
//!   transformers does (all 20) and answers greedily as transformers (at least 19 of 20 identical:
//!   f16 weights and another CPU's arithmetic may move one argmax late in an answer);
//! - the q8_0 and q4_k_m exports load and answer (SmolLM2's q5_k_m, q6_k and bf16 too);
//! - the f16 export converts back (`fuserl convert gguf`) to the checkpoint's weights rounded to
//!   f16, exactly;
//! - the q4_k_m, q5_k_m, q6_k and q8_0 exports give every tensor the type llama.cpp's own
//!   quantiser gives it from the f16 export, with no more error (within 10%) than llama.cpp's;
//! - every architecture's f32 export of the tiny oracle models computes in llama.cpp the
//!   per-token log-probs transformers computed (within 1e-4).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use fuserl_model::gguf::Gguf;
use serde_json::{Value, json};

use crate::common::llama::{available, llama_python, llama_server, models};
use crate::common::{fuserl, repo, text};

/// What differs is printed for whoever reads a failure (the assertions count it).
#[allow(clippy::print_stderr)]
fn note(line: String) {
    eprintln!("{line}");
}

/// A blocking JSON POST to 127.0.0.1 (the reply body as JSON).
fn post(port: u16, path: &str, body: &Value) -> Value {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(300))).expect("timeout");
    let body = body.to_string();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("send");
    let mut reply = Vec::new();
    s.take(64 << 20).read_to_end(&mut reply).expect("reply");
    let reply = String::from_utf8_lossy(&reply);
    let (head, json) = reply.split_once("\r\n\r\n").expect("HTTP reply");
    assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}\n{json}");
    serde_json::from_str(json).unwrap_or_else(|e| panic!("{path}: {e}: {json}"))
}

fn model(folder: &str, script: &str) -> PathBuf {
    let dir = models().join(folder);
    assert!(dir.join("config.json").is_file(), "{} is missing: run {script} first", dir.display());
    dir
}

fn export(dir: &Path, out: &Path, ty: &str) {
    let o = fuserl(&["export-gguf", &dir.display().to_string(), &out.display().to_string(), "--type", ty], &repo());
    assert!(o.status.success(), "export-gguf --type {ty}: {}", text(&o.stderr));
    assert!(text(&o.stderr).contains("wrote"), "{}", text(&o.stderr));
}

/// The f16 export against transformers' fixture, then the `others` load and answer.
fn answers_as_transformers(folder: &str, script: &str, others: &[&str]) {
    let dir = model(folder, script);
    if !available(&[]) {
        return;
    }
    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("fixtures/gguf_export/greedy.json")).expect("fixture"),
    )
    .expect("json");
    let rows = fixture["models"][folder].as_array().expect("the model's rows").clone();
    let new_tokens = fixture["made_with"]["new_tokens"].as_u64().expect("new_tokens");
    let tmp = tempfile::tempdir().expect("tmp");
    let f16 = tmp.path().join("model-F16.gguf");
    export(&dir, &f16, "f16");
    let server = llama_server(&f16, "m", script).expect("server");
    let mut same_tokens = 0;
    let mut same_text = Vec::new();
    for r in &rows {
        let prompt = r["prompt"].as_str().expect("prompt");
        // The server's tokeniser puts BOS first when the file says so, as transformers does.
        let tokens = post(server.port, "/extras/tokenize", &json!({"input": prompt}))["tokens"].clone();
        if tokens == r["ids"] {
            same_tokens += 1;
        } else {
            note(format!("{folder}: {prompt:?}: llama.cpp tokens {tokens}, transformers {}", r["ids"]));
        }
        let reply = post(
            server.port,
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": new_tokens, "temperature": 0.0, "repeat_penalty": 1.0, "seed": 0}),
        );
        let answer = reply["choices"][0]["text"].as_str().expect("text").to_owned();
        // transformers' greedy answer with the checkpoint's weights, or with them rounded to f16
        // as the file holds them (both computing in f32).
        let identical = answer == r["text"] || answer == r["text_f16_weights"];
        if !identical {
            note(format!("{folder}: {prompt:?}: llama.cpp {answer:?}, transformers {:?}", r["text"]));
        }
        same_text.push(identical);
    }
    drop(server);
    assert_eq!(same_tokens, rows.len(), "{folder}: every prompt tokenised as transformers does");
    let n = same_text.iter().filter(|s| **s).count();
    assert!(n + 1 >= rows.len(), "{folder}: {n} of {} greedy answers identical to transformers'", rows.len());

    for ty in others {
        let file = tmp.path().join(format!("model-{ty}.gguf"));
        export(&dir, &file, ty);
        let server = llama_server(&file, "m", script).expect("server");
        for r in rows.iter().take(2) {
            let reply = post(
                server.port,
                "/v1/completions",
                &json!({"prompt": r["prompt"], "max_tokens": 12, "temperature": 0.0, "repeat_penalty": 1.0}),
            );
            let answer = reply["choices"][0]["text"].as_str().expect("text");
            assert!(!answer.trim().is_empty(), "{folder} {ty}: an empty answer to {}", r["prompt"]);
            assert!(reply["usage"]["completion_tokens"].as_u64().unwrap_or(0) > 0, "{folder} {ty}: {reply}");
        }
    }
}

#[test]
fn smollm2_exports_that_llama_cpp_loads_and_answers_as_transformers() {
    answers_as_transformers(
        "SmolLM2-135M-Instruct",
        "scripts/fetch-smollm2.sh",
        &["q8_0", "q4_k_m", "q5_k_m", "q6_k", "bf16"],
    );
}

#[test]
fn qwen_coder_exports_that_llama_cpp_loads_and_answers_as_transformers() {
    answers_as_transformers("Qwen2.5-Coder-0.5B-Instruct", "scripts/fetch-qwen-coder.sh", &["q8_0", "q4_k_m"]);
}

#[test]
fn gemma3_exports_that_llama_cpp_loads_and_answers_as_transformers() {
    answers_as_transformers("gemma-3-270m", "scripts/fetch-gemma3.sh", &["q8_0", "q4_k_m"]);
}

#[test]
fn an_f16_export_converts_back_to_the_weights_rounded_to_f16() {
    let dir = model("SmolLM2-135M-Instruct", "scripts/fetch-smollm2.sh");
    let tmp = tempfile::tempdir().expect("tmp");
    let file = tmp.path().join("smollm2.gguf");
    export(&dir, &file, "f16");
    let back = tmp.path().join("back");
    let o = fuserl(&["convert", "gguf", &file.display().to_string(), &back.display().to_string()], &repo());
    assert!(o.status.success(), "{}", text(&o.stderr));
    let original = fuserl_model::checkpoint::TensorStore::read_dir(&dir).expect("original");
    let read = fuserl_model::checkpoint::TensorStore::read_dir(&back).expect("converted back");
    let names: Vec<String> = original.names().into_iter().cloned().collect();
    assert_eq!(names, read.names().into_iter().cloned().collect::<Vec<_>>());
    for name in names {
        let (shape, want) = original.get(&name).expect("readable").expect("original tensor");
        let (got_shape, got) = read.get(&name).expect("readable").expect("converted tensor");
        assert_eq!(shape, got_shape, "{name}");
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            let rounded = half::f16::from_f32(*w).to_f32();
            assert!(rounded.to_bits() == g.to_bits(), "{name}[{i}]: {g}, expected f16({w}) = {rounded}");
        }
    }
    // The tokenizer and template came back too.
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"] {
        assert!(back.join(f).is_file(), "{f}");
    }
    assert_eq!(
        std::fs::read_to_string(back.join("chat_template.jinja")).expect("template"),
        std::fs::read_to_string(dir.join("chat_template.jinja")).expect("template")
    );
}

/// Relative RMS error of `q`'s matrices of ggml type `ty` against `reference`'s.
fn error_against(q: &Gguf, reference: &Gguf, ty: u32) -> f64 {
    let (mut err, mut norm) = (0f64, 0f64);
    for t in q.tensors.iter().filter(|t| t.dims.len() == 2 && t.ggml_type == ty) {
        let r = reference.tensors.iter().find(|r| r.name == t.name).expect("same tensors");
        let a = q.dequantize(t).expect("dequantise");
        let b = reference.dequantize(r).expect("dequantise");
        for (x, y) in a.iter().zip(&b) {
            err += f64::from(x - y).powi(2);
            norm += f64::from(*y).powi(2);
        }
    }
    (err / norm).sqrt()
}

#[test]
fn quantised_types_and_error_match_llama_cpps_own_quantiser() {
    let dir = model("SmolLM2-135M-Instruct", "scripts/fetch-smollm2.sh");
    if !available(&[]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let f16 = tmp.path().join("f16.gguf");
    export(&dir, &f16, "f16");
    let reference = Gguf::read(&f16).expect("f16");
    let type_of = |g: &Gguf| -> Vec<(String, u32)> {
        let mut v: Vec<(String, u32)> = g.tensors.iter().map(|t| (t.name.clone(), t.ggml_type)).collect();
        v.sort();
        v
    };
    for mix in ["q4_k_m", "q5_k_m", "q6_k", "q8_0"] {
        let ours = tmp.path().join(format!("ours-{mix}.gguf"));
        export(&dir, &ours, mix);
        let theirs = tmp.path().join(format!("llama-{mix}.gguf"));
        let o = std::process::Command::new(llama_python())
            .arg(repo().join("scripts/llama_quantize.py"))
            .args([&f16, &theirs])
            .arg(mix)
            .output()
            .expect("run llama.cpp's quantiser");
        assert!(o.status.success(), "{mix}: {}", text(&o.stderr));
        let (ours, theirs) = (Gguf::read(&ours).expect("ours"), Gguf::read(&theirs).expect("llama.cpp's"));
        assert_eq!(type_of(&ours), type_of(&theirs), "{mix}: per-tensor types");
        // Per type (SmolLM2's rows of 576 values fall back from the K-quants).
        for (ty, name) in [(12, "Q4_K"), (13, "Q5_K"), (14, "Q6_K"), (6, "Q5_0"), (7, "Q5_1"), (8, "Q8_0")] {
            if !ours.tensors.iter().any(|t| t.ggml_type == ty) {
                continue;
            }
            let (e_ours, e_theirs) = (error_against(&ours, &reference, ty), error_against(&theirs, &reference, ty));
            note(format!(
                "{mix} {name}: relative RMS error against the f16 weights: fuserl {e_ours:.5}, llama.cpp {e_theirs:.5}"
            ));
            assert!(e_ours <= e_theirs * 1.10, "{mix} {name}: fuserl's error {e_ours} against llama.cpp's {e_theirs}");
        }
    }
}

/// A byte-level tokenizer of `n` single-character tokens and no merges, for the tiny oracle
/// models (which have none): enough for llama.cpp to load the file; the test feeds token ids.
fn tiny_tokenizer(n: usize) -> Value {
    let vocab: serde_json::Map<String, Value> =
        (0..n).map(|i| (char::from(b'!' + i as u8).to_string(), Value::from(i as u64))).collect();
    json!({"version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null, "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": []}})
}

/// Every architecture's export, in f32, computes in llama.cpp the per-token log-probs
/// transformers computed for the tiny oracle models (fixtures/models: Llama with tied embeddings,
/// Llama 3.1's RoPE scaling with an explicit head_dim, Mistral in f16 shards, Qwen2 in bf16 with
/// biases, Qwen3 with q/k norms); the tiny Gemma 3, whose layer pattern and query scale llama.cpp's
/// gemma3 model cannot express, is refused with the reason.
#[test]
fn every_architecture_computes_in_llama_cpp_what_transformers_computed() {
    if !available(&[]) {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    for name in ["llama-tied", "llama3-rope-head-dim", "mistral-f16-sharded", "qwen2-bf16", "qwen3", "gemma3"] {
        let fixture = repo().join("fixtures/models").join(name);
        let dir = tmp.path().join(name);
        std::fs::create_dir(&dir).expect("mkdir");
        for f in std::fs::read_dir(&fixture).expect("fixture") {
            let f = f.expect("entry").path();
            std::fs::copy(&f, dir.join(f.file_name().expect("name"))).expect("copy");
        }
        std::fs::write(dir.join("tokenizer.json"), tiny_tokenizer(64).to_string()).expect("tokenizer");
        let file = tmp.path().join(format!("{name}.gguf"));
        let o =
            fuserl(&["export-gguf", &dir.display().to_string(), &file.display().to_string(), "--type", "f32"], &repo());
        if name == "gemma3" {
            let err = text(&o.stderr);
            assert!(!o.status.success() && err.contains("layer pattern"), "{err}");
            continue;
        }
        assert!(o.status.success(), "{name}: {}", text(&o.stderr));
        let oracle: Value =
            serde_json::from_str(&std::fs::read_to_string(fixture.join("logprobs.json")).expect("oracle"))
                .expect("json");
        let seqs = tmp.path().join(format!("{name}.json"));
        std::fs::write(&seqs, oracle["sequences"].to_string()).expect("sequences");
        let o = std::process::Command::new(llama_python())
            .arg(repo().join("scripts/gguf_logprobs.py"))
            .args([&file, &seqs])
            .output()
            .expect("run llama.cpp");
        assert!(o.status.success(), "{name}: {}", text(&o.stderr));
        let got: Vec<Vec<f64>> = serde_json::from_slice(&o.stdout).expect("log-probs");
        let want: Vec<Vec<f64>> = serde_json::from_value(oracle["token_logps"].clone()).expect("oracle log-probs");
        assert_eq!(got.len(), want.len(), "{name}: log-probs of every sequence");
        let mut worst = 0f64;
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g.len(), w.len(), "{name}");
            for (a, b) in g.iter().zip(w) {
                worst = worst.max((a - b).abs());
            }
        }
        note(format!("{name}: max |llama.cpp - transformers| = {worst:.2e}"));
        assert!(worst < 1e-4, "{name}: llama.cpp's log-probs differ from transformers' by up to {worst}");
    }
}
