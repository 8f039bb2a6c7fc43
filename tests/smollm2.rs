//! SmolLM2-135M-Instruct, converted from its GGUF by `fuserl convert gguf` (scripts/fetch-smollm2.sh,
//! run by the README's test command), against transformers reading the same GGUF
//! (fixtures/smollm2/make_reference.py): chat template, token ids, per-token log-probs, and a
//! greedy answer.
//!
//! Tolerance for log-probs: 1e-3 absolute per token (fuserl in f32 against the oracle in f64,
//! through 30 layers; 2.6e-4 was the worst seen; the test prints it).

mod common;

use std::path::PathBuf;

use common::{fuserl, repo, text};
use fuserl_core::data::ChatMessage;
use fuserl_model::chat::ChatTokenizer;

const TOL: f64 = 1e-3;

fn model_dir() -> PathBuf {
    let models = std::env::var_os("FUSERL_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/fuserl/models"));
    let dir = models.join("SmolLM2-135M-Instruct");
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} is missing: run scripts/fetch-smollm2.sh first (the README's test command does)",
        dir.display()
    );
    dir
}

fn reference() -> serde_json::Value {
    let path = repo().join("fixtures/smollm2/reference.json");
    serde_json::from_str(&std::fs::read_to_string(path).expect("reference")).expect("json")
}

#[test]
fn chat_template_and_token_ids_match_transformers() {
    let tok = ChatTokenizer::load(&model_dir(), None).expect("tokenizer");
    let reference = reference();
    for pair in reference["pairs"].as_array().expect("pairs") {
        let messages: Vec<ChatMessage> = serde_json::from_value(pair["messages"].clone()).expect("messages");
        let rendered = tok.render(&messages, true).expect("render");
        assert_eq!(rendered, pair["prompt_text"].as_str().expect("text"));
        let want_prompt: Vec<u32> = serde_json::from_value(pair["prompt_ids"].clone()).expect("ids");
        let want_response: Vec<u32> = serde_json::from_value(pair["response_ids"].clone()).expect("ids");
        assert_eq!(tok.prompt_ids(&messages).expect("ids"), want_prompt, "{rendered}");
        assert_eq!(tok.response_ids(pair["response"].as_str().expect("response")).expect("ids"), want_response);
    }
}

#[test]
fn logprobs_command_matches_transformers() {
    let reference = reference();
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("pairs.jsonl");
    let mut lines = String::new();
    for pair in reference["pairs"].as_array().expect("pairs") {
        lines.push_str(
            &serde_json::json!({"prompt": pair["messages"], "response": pair["response"], "id": "kept"}).to_string(),
        );
        lines.push('\n');
    }
    std::fs::write(&data, lines).expect("write");
    let out = dir.path().join("scored.jsonl");
    let model = model_dir().display().to_string();
    let run = fuserl(
        &[
            "logprobs",
            "--model",
            &model,
            "--data",
            &data.display().to_string(),
            "--out",
            &out.display().to_string(),
            "--batch-size",
            "3",
        ],
        &repo(),
    );
    assert!(run.status.success(), "{}", text(&run.stderr));
    let scored: Vec<serde_json::Value> =
        std::fs::read_to_string(&out).expect("out").lines().map(|l| serde_json::from_str(l).expect("json")).collect();
    let mut worst = 0.0f64;
    for (s, pair) in scored.iter().zip(reference["pairs"].as_array().expect("pairs")) {
        assert_eq!(s["id"], "kept");
        let want: Vec<f64> = serde_json::from_value(pair["token_logps"].clone()).expect("logps");
        let got: Vec<f64> = serde_json::from_value(s["token_logps"].clone()).expect("logps");
        assert_eq!(got.len(), want.len());
        assert_eq!(s["n_tokens"].as_u64(), Some(want.len() as u64));
        for (g, w) in got.iter().zip(&want) {
            worst = worst.max((g - w).abs());
        }
        let sum: f64 = want.iter().sum();
        assert!((s["logp_sum"].as_f64().expect("sum") - sum).abs() < TOL * want.len() as f64);
    }
    eprintln!("worst |fuserl - transformers| per token: {worst:.2e}");
    assert!(worst < TOL, "worst per-token difference {worst}");
    // The model prefers the right answer by several nats.
    let (paris, berlin) = (scored[0]["logp_sum"].as_f64().expect("p"), scored[1]["logp_sum"].as_f64().expect("b"));
    assert!(paris > berlin + 3.0, "Paris {paris} vs Berlin {berlin}");
}

#[test]
fn generate_answers_paris() {
    let model = model_dir().display().to_string();
    let run = fuserl(
        &["generate", "--model", &model, "--prompt", "What is the capital of France?", "--max-new-tokens", "24"],
        &repo(),
    );
    assert!(run.status.success(), "{}", text(&run.stderr));
    let reply = text(&run.stdout);
    assert!(reply.contains("Paris"), "{reply}");
    assert_eq!(reply.trim(), reference()["greedy_reply"].as_str().expect("reply").trim());
}

#[test]
fn batched_generation_with_cache_matches_one_at_a_time_and_full_recompute() {
    use burn::tensor::DType;
    use fuserl_model::generate::{GenerateConfig, generate};
    use fuserl_model::llama::Inputs;
    let dir = model_dir();
    let model =
        fuserl_model::checkpoint::load::<fuserl_model::Cpu>(&dir, &Default::default(), DType::F32).expect("load");
    let tok = ChatTokenizer::load(&dir, None).expect("tokenizer");
    let prompts: Vec<Vec<u32>> = ["What is the capital of France?", "Name one primary colour."]
        .iter()
        .map(|q| tok.prompt_ids(&[ChatMessage::user(*q)]).expect("ids"))
        .collect();
    assert_ne!(prompts[0].len(), prompts[1].len(), "different lengths exercise left padding");
    let cfg = GenerateConfig { max_new_tokens: 8, ..GenerateConfig::default() };
    let batched = generate(&model, &tok, &prompts, &cfg).expect("batched");
    for (p, b) in prompts.iter().zip(&batched) {
        let alone = generate(&model, &tok, std::slice::from_ref(p), &cfg).expect("alone");
        assert_eq!(alone[0].ids, b.ids);
        // Without a cache: greedy by recomputing the whole sequence at every step.
        let mut seq = p.clone();
        for &next in &b.ids {
            let logits = model.forward(&Inputs::right_padded(std::slice::from_ref(&seq), 0));
            let t = seq.len();
            let last: Vec<f32> = logits.narrow(1, t - 1, 1).into_data().iter::<f32>().collect();
            let argmax =
                last.iter().enumerate().fold((0, f32::MIN), |m, (i, &v)| if v > m.1 { (i, v) } else { m }).0 as u32;
            assert_eq!(argmax, next);
            seq.push(next);
        }
    }
}

#[test]
fn smollm2_recipe_trains_both_stages_and_exports_a_model_that_generates() {
    let _ = model_dir();
    let dir = tempfile::tempdir().expect("tmp");
    let recipe = repo().join("recipes/smollm2-fuserl-dpo.toml").display().to_string();
    let run = fuserl(&["run", &recipe], dir.path());
    assert!(run.status.success(), "{}", text(&run.stderr));
    assert!(text(&run.stdout).contains("fused model: runs/smollm2-fuserl-dpo/export"), "{}", text(&run.stdout));
    let metrics: Vec<serde_json::Value> =
        std::fs::read_to_string(dir.path().join("runs/smollm2-fuserl-dpo/metrics.jsonl"))
            .expect("metrics")
            .lines()
            .map(|l| serde_json::from_str(l).expect("json"))
            .collect();
    assert_eq!(metrics.iter().filter(|m| m["stage"] == "sft").count(), 2);
    let po: Vec<&serde_json::Value> = metrics.iter().filter(|m| m["stage"] == "po").collect();
    assert_eq!(po.len(), 2);
    assert!((po[0]["loss"].as_f64().expect("loss") - std::f64::consts::LN_2).abs() < 1e-4, "{}", po[0]);
    let export = dir.path().join("runs/smollm2-fuserl-dpo/export");
    let reply = fuserl(
        &[
            "generate",
            "--model",
            &export.display().to_string(),
            "--prompt",
            "What is the capital of France?",
            "--max-new-tokens",
            "16",
        ],
        dir.path(),
    );
    assert!(reply.status.success(), "{}", text(&reply.stderr));
    assert!(text(&reply.stdout).contains("Paris"), "{}", text(&reply.stdout));
}
