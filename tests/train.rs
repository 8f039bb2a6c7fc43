//! The trainer's first optimiser steps against PyTorch (fixtures/train/make_first_steps.py:
//! transformers' Llama in float64, torch AdamW, clip_grad_norm_) on the committed tiny target:
//! step-1 loss and gradient norm within 1e-4 relative for sft, dpo, simpo and rloo, and the
//! losses of 10 steps within 2e-3 relative (fuserl trains in f32, the oracle in f64). Each case
//! runs with fused and with naive log-probs, and with gradient checkpointing by layer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::DType;
use fuserl_core::data::{CompletionId, Example, ExampleSequence, Origin};
use fuserl_core::registry::BuildContext;
use fuserl_model::checkpoint::load;
use fuserl_recipe::{LogProbPath, Schedule, StageConfig};
use fuserl_train::data::{SeqTokens, TrainExample, completion_key};
use fuserl_train::trainer::{StepSettings, TrainBackend, new_optimizer, optimizer_step};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("root").to_path_buf()
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs().max(1e-12)
}

#[test]
fn first_steps_match_pytorch() {
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("fixtures/train/first_steps.json")).expect("fixture"),
    )
    .expect("json");
    let registry = fuserl_builtin::registry().expect("registry");
    let mut base: StageConfig = fuserl_core::config::parse_table(&toml::Table::new()).expect("defaults");
    base.batch_size = 2;
    base.grad_accum = 2;
    base.max_grad_norm = fixture["max_grad_norm"].as_f64().expect("norm");
    base.adam_eps = 1e-8;
    base.weight_decay = 0.0;
    base.schedule = Schedule::Constant;
    let lr = fixture["lr"].as_f64().expect("lr");
    let variants = [(LogProbPath::Fused, false), (LogProbPath::Naive, false), (LogProbPath::Fused, true)];
    for (case, (logprobs, checkpointing)) in
        fixture["cases"].as_array().expect("cases").iter().flat_map(|c| variants.map(|v| (c, v)))
    {
        let config = StageConfig { gradient_checkpointing: checkpointing, ..base.clone() };
        let variant = format!("{logprobs:?}{}", if checkpointing { ", checkpointing" } else { "" });
        let kind = case["kind"].as_str().expect("kind");
        let table = match toml::Value::try_from(&case["objective"]).expect("toml") {
            toml::Value::Table(t) => t,
            _ => unreachable!(),
        };
        let objective = registry.build_objective_from(&table, &BuildContext::default()).expect("objective").component;
        let mut reference = HashMap::new();
        let mut examples = Vec::new();
        for (e, (ex, refs)) in case["examples"]
            .as_array()
            .expect("examples")
            .iter()
            .zip(case["reference_logps"].as_array().expect("refs"))
            .enumerate()
        {
            let mut seqs = Vec::new();
            let mut sequences = Vec::new();
            for (i, (s, r)) in
                ex["seqs"].as_array().expect("seqs").iter().zip(refs.as_array().expect("ref")).enumerate()
            {
                let id = CompletionId { prompt_id: format!("p{e}"), source: format!("s{i}"), sample_index: 0 };
                reference.insert(completion_key(&id), r.as_f64().expect("ref"));
                seqs.push(SeqTokens {
                    prompt: serde_json::from_value(s["prompt"].clone()).expect("prompt"),
                    response: serde_json::from_value(s["response"].clone()).expect("response"),
                });
                sequences.push(ExampleSequence {
                    completion: id,
                    origin: Origin { adapter: "fixture".into(), file: None, line: None },
                    reward: s["reward"].as_f64().expect("reward"),
                });
            }
            let example = Example {
                prompt_id: format!("p{e}"),
                objective: kind.into(),
                weight: ex["weight"].as_f64().expect("weight"),
                sequences,
                notes: Default::default(),
            };
            examples.push(TrainExample { example, seqs });
        }
        let mut model = Some(
            load::<TrainBackend>(&repo().join("checkpoints/tiny-chat"), &Default::default(), DType::F32)
                .expect("model"),
        );
        let mut optim = new_optimizer(&config);
        let picked: Vec<&TrainExample> = examples.iter().collect();
        let want_losses: Vec<f64> = serde_json::from_value(case["losses"].clone()).expect("losses");
        let want_norm = case["grad_norms"][0].as_f64().expect("norm");
        for (step, want) in want_losses.iter().enumerate() {
            let settings = StepSettings {
                objective: objective.as_ref(),
                reference: objective.needs_reference().then_some(&reference),
                config: &config,
                progress: 0.0,
                lr,
                logprobs,
            };
            let (next, out) =
                optimizer_step(model.take().expect("model"), &mut optim, &picked, settings).expect("step");
            model = Some(next);
            if step == 0 {
                assert!(close(out.loss, *want, 1e-4), "{kind} ({variant}): step-1 loss {} vs oracle {want}", out.loss);
                assert!(
                    close(out.grad_norm, want_norm, 1e-4),
                    "{kind} ({variant}): step-1 grad norm {} vs oracle {want_norm}",
                    out.grad_norm
                );
            } else {
                assert!(
                    close(out.loss, *want, 2e-3),
                    "{kind} ({variant}): step-{} loss {} vs oracle {want}",
                    step + 1,
                    out.loss
                );
            }
        }
    }
}
