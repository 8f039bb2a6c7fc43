//! The trainer's first optimiser steps against PyTorch (fixtures/train/make_first_steps.py:
//! transformers' Llama in float64, torch AdamW, clip_grad_norm_) on the committed tiny target:
//! step-1 loss and gradient norm within 1e-4 relative for sft, dpo, simpo and rloo, and the
//! losses of 10 steps within 2e-3 relative (fuserl trains in f32, the oracle in f64). Each case
//! runs with fused and with naive log-probs, and with gradient checkpointing by layer.
//!
//! Mixed precision (`[backend] dtype = "bf16"` / `"f16"`: f32 master weights, compute in the
//! 16-bit type): step 0 against `torch.autocast` (fixtures/train/make_autocast_steps.py) within
//! 2e-2, the updates of 5 DPO steps at lr 1e-6 against the f32 run's, and f16 loss scaling
//! recovering from an overflow.

use std::collections::HashMap;

use burn::tensor::DType;
use fuserl_core::data::{CompletionId, Example, ExampleSequence, Origin};
use fuserl_core::registry::BuildContext;
use fuserl_model::checkpoint::load;
use fuserl_recipe::{LogProbPath, Schedule, StageConfig};
use fuserl_train::data::{SeqTokens, TrainExample, completion_key};
use fuserl_train::trainer::{LossScale, StepSettings, TrainBackend, new_optimizer, optimizer_step};

use crate::common::repo;

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs().max(1e-12)
}

/// One case of fixtures/train/first_steps.json: an objective, its examples and their reference
/// log-probs.
struct Case {
    kind: String,
    objective: Box<dyn fuserl_core::extension::PreferenceObjective>,
    examples: Vec<TrainExample>,
    reference: HashMap<String, f64>,
    losses: Vec<f64>,
    grad_norm: f64,
}

fn fixture() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(repo().join("fixtures/train/first_steps.json")).expect("fixture"))
        .expect("json")
}

/// A training example from a fixture's JSON sequences (`{prompt, response, reward}`), its
/// completions named `p{e}`/`s{i}`; each sequence's reference log-prob, when `refs` has one, goes
/// into `reference`.
fn fixture_example(
    kind: &str,
    e: usize,
    weight: f64,
    seqs_json: &[serde_json::Value],
    refs: impl Fn(usize) -> Option<f64>,
    reference: &mut HashMap<String, f64>,
) -> TrainExample {
    let mut seqs = Vec::new();
    let mut sequences = Vec::new();
    for (i, s) in seqs_json.iter().enumerate() {
        let id = CompletionId { prompt_id: format!("p{e}"), source: format!("s{i}"), sample_index: 0 };
        if let Some(r) = refs(i) {
            reference.insert(completion_key(&id), r);
        }
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
    let example =
        Example { prompt_id: format!("p{e}"), objective: kind.into(), weight, sequences, notes: Default::default() };
    TrainExample { example, seqs }
}

fn cases(fixture: &serde_json::Value) -> Vec<Case> {
    let registry = fuserl_builtin::registry().expect("registry");
    let mut out = Vec::new();
    for case in fixture["cases"].as_array().expect("cases") {
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
            let weight = ex["weight"].as_f64().expect("weight");
            let seqs = ex["seqs"].as_array().expect("seqs");
            examples.push(fixture_example(kind, e, weight, seqs, |i| refs[i].as_f64(), &mut reference));
        }
        out.push(Case {
            kind: kind.to_owned(),
            objective,
            examples,
            reference,
            losses: serde_json::from_value(case["losses"].clone()).expect("losses"),
            grad_norm: case["grad_norms"][0].as_f64().expect("norm"),
        });
    }
    out
}

/// The stage settings of the fixture (batch 2, accumulation 2, constant schedule).
fn stage_config(fixture: &serde_json::Value) -> StageConfig {
    let mut base: StageConfig = fuserl_core::config::parse_table(&toml::Table::new()).expect("defaults");
    base.batch_size = 2;
    base.grad_accum = 2;
    base.max_grad_norm = fixture["max_grad_norm"].as_f64().expect("norm");
    base.adam_eps = 1e-8;
    base.weight_decay = 0.0;
    base.schedule = Schedule::Constant;
    base
}

/// The committed tiny target with its weights in `master` and computing in `compute` (what the
/// trainer does with `[backend] dtype`).
fn target(master: DType, compute: DType) -> fuserl_model::llama::LlamaModel<TrainBackend> {
    let mut model =
        load::<TrainBackend>(&repo().join("checkpoints/tiny-chat"), &Default::default(), master).expect("model");
    model.dtype = compute;
    model
}

fn settings<'a>(case: &'a Case, config: &'a StageConfig, lr: f64, loss_scale: f64) -> StepSettings<'a> {
    StepSettings {
        objective: case.objective.as_ref(),
        reference: case.objective.needs_reference().then_some(&case.reference),
        config,
        progress: 0.0,
        lr,
        logprobs: LogProbPath::Fused,
        loss_scale,
        dropout_key: 0,
    }
}

#[test]
fn first_steps_match_pytorch() {
    let fixture = fixture();
    let base = stage_config(&fixture);
    let lr = fixture["lr"].as_f64().expect("lr");
    let variants = [(LogProbPath::Fused, false), (LogProbPath::Naive, false), (LogProbPath::Fused, true)];
    for (case, (logprobs, checkpointing)) in cases(&fixture).iter().flat_map(|c| variants.map(|v| (c, v))) {
        let config = StageConfig { gradient_checkpointing: checkpointing, ..base.clone() };
        let variant = format!("{logprobs:?}{}", if checkpointing { ", checkpointing" } else { "" });
        let kind = &case.kind;
        let mut model = Some(target(DType::F32, DType::F32));
        let mut optim = new_optimizer(&config);
        let picked: Vec<&TrainExample> = case.examples.iter().collect();
        let want_norm = case.grad_norm;
        for (step, want) in case.losses.iter().enumerate() {
            let settings = StepSettings { logprobs, ..settings(case, &config, lr, 1.0) };
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

/// Mixed precision against PyTorch's autocast (fixtures/train/make_autocast_steps.py:
/// `torch.autocast(cpu, bfloat16)` over the f32 model): step-0 loss and gradient norm of sft,
/// dpo and simpo with bf16 compute over f32 weights, within 2e-2 relative.
#[test]
fn bf16_compute_matches_torch_autocast_at_step_0() {
    let fixture = fixture();
    let config = stage_config(&fixture);
    let oracle: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("fixtures/train/autocast_steps.json")).expect("fixture"),
    )
    .expect("json");
    let cases = cases(&fixture);
    for want in oracle["cases"].as_array().expect("cases") {
        let kind = want["kind"].as_str().expect("kind");
        let case = cases.iter().find(|c| c.kind == kind).expect("case");
        let mut optim = new_optimizer(&config);
        let picked: Vec<&TrainExample> = case.examples.iter().collect();
        let (_, out) =
            optimizer_step(target(DType::F32, DType::BF16), &mut optim, &picked, settings(case, &config, 0.0, 1.0))
                .expect("step");
        let (loss, norm) = (want["loss"].as_f64().expect("loss"), want["grad_norm"].as_f64().expect("norm"));
        assert!(close(out.loss, loss, 2e-2), "{kind}: bf16 step-0 loss {} vs autocast {loss}", out.loss);
        assert!(close(out.grad_norm, norm, 2e-2), "{kind}: bf16 step-0 grad norm {} vs autocast {norm}", out.grad_norm);
    }
}

/// The weights' change over `steps` steps of `case` at `lr`, flattened in name order.
fn update(case: &Case, master: DType, compute: DType, lr: f64, steps: usize) -> Vec<f64> {
    let config = stage_config(&fixture());
    let mut model = target(master, compute);
    let before = fuserl_model::checkpoint::named_tensors(&model);
    let mut optim = new_optimizer(&config);
    let picked: Vec<&TrainExample> = case.examples.iter().collect();
    for _ in 0..steps {
        let out;
        (model, out) = optimizer_step(model, &mut optim, &picked, settings(case, &config, lr, 1.0)).expect("step");
        assert!(!out.skipped && out.loss.is_finite());
    }
    let after = fuserl_model::checkpoint::named_tensors(&model);
    before
        .values()
        .zip(after.values())
        .flat_map(|((_, a), (_, b))| a.iter().zip(b).map(|(x, y)| f64::from(*y) - f64::from(*x)))
        .collect()
}

/// `dtype = "bf16"` keeps the updates (issue #30): 5 FusePO-DPO steps at learning rate 1e-6
/// with bf16 compute over f32 master weights move the weights as the f32 run does (cosine of
/// the updates at least 0.9, norms within 2x), and nearly every weight moves (bf16 weights
/// updated in bf16 moved 0.8% of them).
#[test]
fn bf16_mixed_precision_moves_the_weights_like_f32() {
    let cases = cases(&fixture());
    let dpo = cases.iter().find(|c| c.kind == "dpo").expect("dpo");
    let f32_update = update(dpo, DType::F32, DType::F32, 1e-6, 5);
    let mixed = update(dpo, DType::F32, DType::BF16, 1e-6, 5);
    let dot: f64 = f32_update.iter().zip(&mixed).map(|(a, b)| a * b).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let (nf, nm) = (norm(&f32_update), norm(&mixed));
    let cosine = dot / (nf * nm).max(f64::MIN_POSITIVE);
    assert!(cosine >= 0.9, "cosine of the bf16 and f32 updates {cosine}");
    assert!(nm <= 2.0 * nf && nf <= 2.0 * nm, "update norms: bf16 {nm}, f32 {nf}");
    let moved = mixed.iter().filter(|d| **d != 0.0).count() as f64 / mixed.len() as f64;
    assert!(moved > 0.9, "only {moved} of the weights moved with bf16 compute");
}

/// f16 compute with dynamic loss scaling recovers from an overflow: at a planted loss scale of
/// 2^40 the f16 backward overflows, the step is skipped (the weights stay), the scale is halved
/// until the gradients fit, and then the steps train (finite loss, the weights move).
#[test]
fn f16_loss_scaling_recovers_from_a_planted_overflow() {
    let fixture = fixture();
    let config = stage_config(&fixture);
    let cases = cases(&fixture);
    let sft = cases.iter().find(|c| c.kind == "sft").expect("sft");
    let mut model = target(DType::F32, DType::F16);
    let start = fuserl_model::checkpoint::named_tensors(&model);
    let mut optim = new_optimizer(&config);
    let picked: Vec<&TrainExample> = sft.examples.iter().collect();
    let mut scale = LossScale::new(2f64.powi(40));
    let mut skipped = 0;
    let mut trained = 0;
    for _ in 0..60 {
        let out;
        (model, out) =
            optimizer_step(model, &mut optim, &picked, settings(sft, &config, 1e-3, scale.scale)).expect("step");
        scale.update(out.skipped);
        if out.skipped {
            assert_eq!(trained, 0, "an overflow after training resumed at scale {}", scale.scale);
            assert_eq!(fuserl_model::checkpoint::named_tensors(&model), start, "a skipped step changed the weights");
            skipped += 1;
        } else {
            assert!(out.loss.is_finite() && out.grad_norm.is_finite(), "{out:?}");
            trained += 1;
            if trained == 3 {
                break;
            }
        }
    }
    assert!(skipped > 0, "the planted scale did not overflow");
    assert_eq!(trained, 3, "still overflowing after {skipped} halvings (scale {})", scale.scale);
    assert!(scale.scale < 2f64.powi(40));
    assert_ne!(fuserl_model::checkpoint::named_tensors(&model), start, "the steps after the overflow did not train");
}

/// Mixed precision on a real model (issue #30), against PyTorch on the same batches
/// (fixtures/train/make_smollm2_curves.py): 10-step loss curves of SFT and DPO on
/// SmolLM2-135M-Instruct at the FuseRL recipes' learning rates, two examples a step. The f32 run
/// follows torch's f32 curve within 1e-3 relative; bf16 compute over f32 master weights follows
/// `torch.autocast(bfloat16)`'s curve within the tolerances below. The issue asked for the bf16
/// curve within 2e-2 of the f32 one: PyTorch's own autocast run is 27% (SFT, step 3) and 52%
/// (DPO, step 3) away from its f32 run on these batches (AdamW's first steps are nearly sign
/// steps, and bf16 flips the sign of small gradients), so the oracle is autocast's curve.
#[test]
fn smollm2_bf16_loss_curves_follow_torch_autocast() {
    let dir = crate::real_models::SMOLLM2.dir();
    let fixture: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("fixtures/train/smollm2_curves.json")).expect("fixture"),
    )
    .expect("json");
    let registry = fuserl_builtin::registry().expect("registry");
    let mut config: StageConfig = fuserl_core::config::parse_table(&toml::Table::new()).expect("defaults");
    config.batch_size = 2;
    config.grad_accum = 1;
    config.max_grad_norm = 1.0;
    config.adam_eps = 1e-8;
    config.weight_decay = 0.0;
    config.schedule = Schedule::Constant;
    for case in fixture["cases"].as_array().expect("cases") {
        let kind = case["kind"].as_str().expect("kind");
        let mut table = toml::Table::new();
        table.insert("kind".into(), kind.into());
        if kind == "dpo" {
            table.insert("beta".into(), fixture["beta"].as_f64().expect("beta").into());
        }
        let objective = registry.build_objective_from(&table, &BuildContext::default()).expect("objective").component;
        let mut reference = HashMap::new();
        let mut examples = Vec::new();
        for (e, ex) in case["examples"].as_array().expect("examples").iter().enumerate() {
            let seqs = ex.as_array().expect("seqs");
            let refs = |i: usize| case["reference_logps"][e][i].as_f64();
            examples.push(fixture_example(kind, e, 1.0, seqs, refs, &mut reference));
        }
        let lr = case["lr"].as_f64().expect("lr");
        let curve = |compute: DType| -> Vec<f64> {
            let mut model = load::<TrainBackend>(&dir, &Default::default(), DType::F32).expect("model");
            model.dtype = compute;
            let mut optim = new_optimizer(&config);
            let mut losses = Vec::new();
            for step in 0..10 {
                let n = examples.len();
                let picked = [&examples[(2 * step) % n], &examples[(2 * step + 1) % n]];
                let settings = StepSettings {
                    objective: objective.as_ref(),
                    reference: objective.needs_reference().then_some(&reference),
                    config: &config,
                    progress: 0.0,
                    lr,
                    logprobs: LogProbPath::Fused,
                    loss_scale: 1.0,
                    dropout_key: 0,
                };
                let out;
                (model, out) = optimizer_step(model, &mut optim, &picked, settings).expect("step");
                losses.push(out.loss);
            }
            losses
        };
        let want_f32: Vec<f64> = serde_json::from_value(case["f32"].clone()).expect("f32");
        let want_bf16: Vec<f64> = serde_json::from_value(case["autocast_bf16"].clone()).expect("bf16");
        let (full, mixed) = (curve(DType::F32), curve(DType::BF16));
        eprintln!("{kind}: f32 {full:?}\n{kind}: bf16 {mixed:?}");
        for (step, (got, want)) in full.iter().zip(&want_f32).enumerate() {
            assert!(close(*got, *want, 1e-3), "{kind} step {}: f32 loss {got} vs torch {want}", step + 1);
        }
        for (step, (got, want)) in mixed.iter().zip(&want_bf16).enumerate() {
            assert!(close(*got, *want, 5e-2), "{kind} step {}: bf16 loss {got} vs torch autocast {want}", step + 1);
        }
    }
}

/// Gradient checkpointing by layer gives the gradients of the plain backward on every family
/// the fixtures hold (Gemma 3 scales its embeddings by sqrt(hidden), Llama ties its head to
/// them): the same step-1 loss and gradient norm, within f32 rounding.
#[test]
fn checkpointing_by_layer_gives_the_plain_gradients_on_every_family() {
    let registry = fuserl_builtin::registry().expect("registry");
    let mut table = toml::Table::new();
    table.insert("kind".into(), "sft".into());
    let objective = registry.build_objective_from(&table, &BuildContext::default()).expect("objective").component;
    for family in ["gemma3", "llama-tied", "qwen3"] {
        let dir = repo().join("fixtures/models").join(family);
        let examples: Vec<TrainExample> = (0..3u32)
            .map(|e| TrainExample {
                example: Example {
                    prompt_id: format!("p{e}"),
                    objective: "sft".into(),
                    weight: 1.0,
                    sequences: vec![ExampleSequence {
                        completion: CompletionId { prompt_id: format!("p{e}"), source: "s".into(), sample_index: 0 },
                        origin: Origin { adapter: "fixture".into(), file: None, line: None },
                        reward: 1.0,
                    }],
                    notes: Default::default(),
                },
                seqs: vec![SeqTokens {
                    prompt: (0..4 + e).map(|i| (i * 7 + e) % 60 + 1).collect(),
                    response: (0..5 + e).map(|i| (i * 11 + 3 * e) % 60 + 1).collect(),
                }],
            })
            .collect();
        let picked: Vec<&TrainExample> = examples.iter().collect();
        let mut norms = Vec::new();
        for checkpointing in [false, true] {
            let mut config: StageConfig = fuserl_core::config::parse_table(&toml::Table::new()).expect("defaults");
            config.batch_size = 3;
            config.gradient_checkpointing = checkpointing;
            config.max_grad_norm = 1e9;
            let model = load::<TrainBackend>(&dir, &Default::default(), DType::F32).expect("model");
            let mut optim = new_optimizer(&config);
            let settings = StepSettings {
                objective: objective.as_ref(),
                reference: None,
                config: &config,
                progress: 0.0,
                lr: 1e-3,
                logprobs: LogProbPath::Fused,
                loss_scale: 1.0,
                dropout_key: 0,
            };
            let (_, out) = optimizer_step(model, &mut optim, &picked, settings).expect("step");
            norms.push((out.loss, out.grad_norm));
        }
        let ((l0, g0), (l1, g1)) = (norms[0], norms[1]);
        assert!(close(l1, l0, 1e-5), "{family}: loss {l1} with checkpointing, {l0} without");
        assert!(close(g1, g0, 1e-4), "{family}: gradient norm {g1} with checkpointing, {g0} without");
    }
}

/// LoRA against PEFT (issue #31): fixtures/train/lora_steps.json (fixtures/train/make_lora_steps.py:
/// PEFT r 8, alpha 16, all-linear, on transformers' models in float64, adapters from a closed
/// formula both sides compute).
fn lora_fixture() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(repo().join("fixtures/train/lora_steps.json")).expect("fixture"))
        .expect("json")
}

/// The fixture's model folder: the committed tiny target, or SmolLM2 from the model cache.
fn lora_model_dir(name: &str) -> std::path::PathBuf {
    match name {
        "tiny-chat" => repo().join("checkpoints/tiny-chat"),
        _ => crate::real_models::SMOLLM2.dir(),
    }
}

/// The (prompt, response) token ids of a fixture model's `sequences`.
fn fixture_pairs(m: &serde_json::Value) -> Vec<(Vec<u32>, Vec<u32>)> {
    let ids = |v: &serde_json::Value| serde_json::from_value(v.clone()).expect("token ids");
    m["sequences"].as_array().expect("sequences").iter().map(|s| (ids(&s["prompt"]), ids(&s["response"]))).collect()
}

/// `model`'s per-token log-probs of `pairs` within 1e-4 of PEFT's (`want`: one list per pair).
fn assert_peft_logps<B: fuserl_kernels::LogProbBackend>(
    model: &fuserl_model::llama::LlamaModel<B>,
    pairs: &[(Vec<u32>, Vec<u32>)],
    want: &serde_json::Value,
    what: &str,
) {
    let got = fuserl_model::logprobs::response_logprobs(model, pairs).expect("logprobs");
    let want = want.as_array().expect("log-probs");
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        let w: Vec<f64> = serde_json::from_value(w.clone()).expect("values");
        assert_eq!(g.token_logps.len(), w.len(), "{what}");
        for (a, b) in g.token_logps.iter().zip(&w) {
            assert!((f64::from(*a) - b).abs() <= 1e-4, "{what}: {a} vs PEFT {b}");
        }
    }
}

/// `[target.lora]` of the fixture: r 8, alpha 16, every linear layer.
fn lora_spec() -> fuserl_model::lora::LoraSpec {
    fuserl_model::lora::LoraSpec {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        targets: fuserl_model::lora::MODULES.iter().map(|m| (*m).to_owned()).collect(),
        rslora: false,
    }
}

/// The fixture's adapter values (its docstring's formula) on every adapter of `weights`.
fn formula_adapters<B: burn::tensor::backend::Backend>(weights: &mut fuserl_model::llama::Llama<B>, nonzero_b: bool) {
    use burn::module::Param;
    use burn::tensor::{Tensor, TensorData};
    let adapters = fuserl_model::lora::adapters(weights);
    let device = weights.embed_tokens.val().device();
    let set: Vec<_> = adapters
        .into_iter()
        .enumerate()
        .map(|(m, l)| {
            let [inp, r] = l.a.val().dims();
            let out = l.b.val().dims()[1];
            let m = (m + 1) as f64;
            let mut a = vec![0f32; inp * r];
            for i in 0..inp {
                for k in 0..r {
                    let v = (0.37 * (k + 1) as f64 + 0.011 * (i + 1) as f64 + 0.5 * m).sin() / (inp as f64).sqrt();
                    a[i * r + k] = v as f32;
                }
            }
            let mut b = vec![0f32; r * out];
            if nonzero_b {
                for k in 0..r {
                    for o in 0..out {
                        b[k * out + o] =
                            (0.02 * (0.29 * (k + 1) as f64 + 0.013 * (o + 1) as f64 + 0.3 * m).cos()) as f32;
                    }
                }
            }
            let param = |v: Vec<f32>, shape: [usize; 2]| {
                Param::from_tensor(Tensor::<B, 2>::from_data(TensorData::new(v, shape), (&device, DType::F32)))
            };
            fuserl_model::lora::Lora { a: param(a, [inp, r]), b: param(b, [r, out]), ..l }
        })
        .collect();
    fuserl_model::lora::set_adapters(weights, set);
}

/// LoRA dropout with gradient checkpointing: the recomputed layers draw the masks of the
/// graph-free forward, so a step's loss and gradient norm are those of the whole graph with the
/// same masks (two sequences a micro-batch: on a machine with two cores or more, the checkpointed
/// path cuts them into two shards and the whole graph runs them at once, and the masks are the
/// same, being a function of each value's sequence and position); the masks are a function of the
/// step's key (the same step twice gives the same numbers, another key others) and they change
/// the gradients (against no dropout).
#[test]
fn lora_dropout_with_checkpointing_is_the_whole_graph() {
    let fixture = lora_fixture();
    let m = &fixture["models"][0];
    assert_eq!(m["name"], "tiny-chat");
    let dir = lora_model_dir("tiny-chat");
    let all = cases(m);
    let case = all.iter().find(|c| c.kind == "sft").expect("an sft case");
    let lr = fixture["lr"].as_f64().expect("lr");
    let step = |dropout: f64, checkpointing: bool, key: u64| {
        let config = StageConfig { gradient_checkpointing: checkpointing, batch_size: 2, ..stage_config(&fixture) };
        let mut model = load::<TrainBackend>(&dir, &Default::default(), DType::F32).expect("model");
        model.weights = fuserl_model::lora::freeze_base(model.weights, DType::F32);
        let spec = fuserl_model::lora::LoraSpec { dropout, ..lora_spec() };
        fuserl_model::lora::add_adapters(&mut model.weights, &spec, 0, DType::F32);
        formula_adapters(&mut model.weights, true);
        let mut optim = new_optimizer(&config);
        let picked: Vec<&TrainExample> = case.examples.iter().take(2).collect();
        let settings = StepSettings { dropout_key: key, ..settings(case, &config, lr, 1.0) };
        let (_, out) = optimizer_step(model, &mut optim, &picked, settings).expect("step");
        (out.loss, out.grad_norm)
    };
    let whole = step(0.3, false, 7);
    let checkpointed = step(0.3, true, 7);
    for (what, a, b) in [("loss", whole.0, checkpointed.0), ("gradient norm", whole.1, checkpointed.1)] {
        assert!(close(a, b, 1e-5), "{what}: whole graph {a} vs checkpointed {b}");
    }
    assert_eq!(step(0.3, true, 7), checkpointed, "the same key, other masks");
    let other = step(0.3, true, 8);
    assert!(!close(other.1, checkpointed.1, 1e-4), "another key, the same masks: {other:?}");
    let none = step(0.0, true, 7);
    assert!(!close(none.1, checkpointed.1, 1e-4), "dropout changed nothing: {none:?} vs {checkpointed:?}");
}

/// Step-1 loss and adapter gradient norm within 1e-4 relative of PEFT's, 10 losses within 2e-3,
/// for SFT and DPO, from PEFT's start (B = 0) and from one where B is not 0, on the tiny target
/// (fused and naive log-probs, gradient checkpointing by layer) and on SmolLM2 (checkpointing).
/// The base is frozen: its weights do not move, and only the adapters have optimiser state.
#[test]
fn lora_steps_match_peft() {
    let fixture = lora_fixture();
    let base = stage_config(&fixture);
    let lr = fixture["lr"].as_f64().expect("lr");
    for m in fixture["models"].as_array().expect("models") {
        let name = m["name"].as_str().expect("name");
        let dir = lora_model_dir(name);
        let variants: &[(LogProbPath, bool)] = if name == "tiny-chat" {
            &[(LogProbPath::Fused, false), (LogProbPath::Naive, false), (LogProbPath::Fused, true)]
        } else {
            &[(LogProbPath::Fused, true)]
        };
        for (case, raw) in cases(m).iter().zip(m["cases"].as_array().expect("cases")) {
            let start = raw["start"].as_str().expect("start");
            // SmolLM2 (a 135M model, slow in a test): SFT from PEFT's start, DPO from the other.
            if name != "tiny-chat" && (case.kind == "sft") != (start == "zero-b") {
                continue;
            }
            for &(logprobs, checkpointing) in variants {
                let config = StageConfig { gradient_checkpointing: checkpointing, ..base.clone() };
                let what = format!("{name} {} from {start} ({logprobs:?}, checkpointing {checkpointing})", case.kind);
                let mut model = load::<TrainBackend>(&dir, &Default::default(), DType::F32).expect("model");
                let q_before = model.weights.layers[0].self_attn.q_proj.weight.val().into_data();
                model.weights = fuserl_model::lora::freeze_base(model.weights, DType::F32);
                fuserl_model::lora::add_adapters(&mut model.weights, &lora_spec(), 0, DType::F32);
                formula_adapters(&mut model.weights, start == "nonzero-b");
                let mut model = Some(model);
                let mut optim = new_optimizer(&config);
                let picked: Vec<&TrainExample> = case.examples.iter().collect();
                for (step, want) in case.losses.iter().enumerate() {
                    let settings = StepSettings { logprobs, ..settings(case, &config, lr, 1.0) };
                    let (next, out) =
                        optimizer_step(model.take().expect("model"), &mut optim, &picked, settings).expect("step");
                    model = Some(next);
                    if step == 0 {
                        assert!(close(out.loss, *want, 1e-4), "{what}: step-1 loss {} vs PEFT {want}", out.loss);
                        assert!(
                            close(out.grad_norm, case.grad_norm, 1e-4),
                            "{what}: step-1 adapter gradient norm {} vs PEFT {}",
                            out.grad_norm,
                            case.grad_norm
                        );
                    } else {
                        assert!(
                            close(out.loss, *want, 2e-3),
                            "{what}: step {} loss {} vs PEFT {want}",
                            step + 1,
                            out.loss
                        );
                    }
                }
                let model = model.expect("model");
                let q_after = model.weights.layers[0].self_attn.q_proj.weight.val().into_data();
                assert_eq!(q_before, q_after, "{what}: the frozen base moved");
                // Optimiser state for the adapters only: two moments per adapter tensor.
                let adapters = fuserl_model::lora::adapters(&model.weights).len();
                assert_eq!(
                    burn::optim::Optimizer::to_record(&optim).len(),
                    2 * adapters,
                    "{what}: optimiser state of frozen weights"
                );
            }
        }
    }
}

/// The adapter export in PEFT's layout: the tensor names and shapes PEFT's save_pretrained writes,
/// and, loaded back on its base, the per-token log-probs PEFT computes with the same adapter
/// (1e-4); the merged export (`W + s A B`) gives PEFT's merge_and_unload() log-probs (1e-4).
#[test]
fn lora_export_matches_peft_layout_and_logprobs() {
    use fuserl_model::Cpu;
    let fixture = lora_fixture();
    for m in fixture["models"].as_array().expect("models") {
        let name = m["name"].as_str().expect("name");
        let dir = lora_model_dir(name);
        let mut model = load::<Cpu>(&dir, &Default::default(), DType::F32).expect("model");
        fuserl_model::lora::add_adapters(&mut model.weights, &lora_spec(), 0, DType::F32);
        formula_adapters(&mut model.weights, true);
        let tmp = tempfile::tempdir().expect("tmp");
        let adapter = tmp.path().join("adapter");
        fuserl_model::lora::save_adapter_dir(&model, &lora_spec(), &adapter, &dir, false, Some(&dir)).expect("export");
        // PEFT's names and shapes, exactly.
        let bytes = std::fs::read(adapter.join("adapter_model.safetensors")).expect("adapter file");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
        let mut ours: Vec<(String, Vec<usize>)> =
            st.tensors().into_iter().map(|(n, v)| (n, v.shape().to_vec())).collect();
        ours.sort();
        let mut peft: Vec<(String, Vec<usize>)> = m["export"]["tensors"]
            .as_object()
            .expect("tensors")
            .iter()
            .map(|(n, s)| (n.clone(), serde_json::from_value(s.clone()).expect("shape")))
            .collect();
        peft.sort();
        assert_eq!(ours, peft, "{name}: the adapter file's tensors");
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(adapter.join("adapter_config.json")).expect("config"))
                .expect("json");
        // task_type: PEFT writes what its LoraConfig was given (none in the fixture); fuserl
        // writes CAUSAL_LM, which makes from_pretrained build a PeftModelForCausalLM.
        assert_eq!(config["task_type"], "CAUSAL_LM");
        for (key, want) in m["export"]["config"].as_object().expect("config").iter().filter(|(k, _)| *k != "task_type")
        {
            let got = &config[key];
            let same = got == want || got.as_f64().zip(want.as_f64()).is_some_and(|(a, b)| a == b);
            assert!(same, "{name}: adapter_config.json {key} = {got}, PEFT writes {want}");
        }
        let seqs = fixture_pairs(m);
        let merged = tmp.path().join("merged");
        fuserl_model::checkpoint::save(&model, &merged, 2 << 30, Some(&dir)).expect("merged export");
        assert!(!merged.join("adapter_config.json").exists());
        // An adapter folder as the Hub and TRL's save_model often hold it: the base's config.json
        // (and tokenizer) beside the adapter, no weights of its own. transformers' PEFT
        // integration applies the adapter; so does fuserl.
        let hub = tmp.path().join("hub-adapter");
        std::fs::create_dir(&hub).expect("mkdir");
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(adapter.join(f), hub.join(f)).expect("copy adapter");
        }
        for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            if dir.join(f).is_file() {
                std::fs::copy(dir.join(f), hub.join(f)).expect("copy base file");
            }
        }
        assert!(fuserl_model::lora::is_adapter_dir(&hub), "{name}: config.json beside an adapter");
        // Such a folder naming itself as its base (`.`) is refused, not loaded on top of itself
        // without end.
        let itself = tmp.path().join("itself");
        std::fs::create_dir(&itself).expect("mkdir");
        for f in ["adapter_model.safetensors", "config.json"] {
            std::fs::copy(hub.join(f), itself.join(f)).expect("copy");
        }
        let mut config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(hub.join("adapter_config.json")).expect("config"))
                .expect("json");
        config["base_model_name_or_path"] = ".".into();
        std::fs::write(itself.join("adapter_config.json"), config.to_string()).expect("write");
        let err = load::<Cpu>(&itself, &Default::default(), DType::F32).expect_err("itself as its base").to_string();
        assert!(err.contains("base_model_name_or_path `.` is an adapter folder"), "{err}");
        for (folder, key) in [(&adapter, "token_logps"), (&hub, "token_logps"), (&merged, "merged_token_logps")] {
            let loaded = load::<Cpu>(folder, &Default::default(), DType::F32).expect("load the export");
            assert_peft_logps(&loaded, &seqs, &m["export"][key], &format!("{name} ({key}, {})", folder.display()));
        }
    }
}

/// LoRA on wgpu (lavapipe in CI): the adapter's log-probs are PEFT's (1e-4), and the first
/// optimiser step of SFT and DPO (PEFT's start, with gradient checkpointing) has PEFT's loss and
/// adapter gradient norm (1e-4) with the base frozen.
#[cfg(feature = "wgpu")]
#[test]
fn lora_on_wgpu_matches_peft() {
    use burn::backend::wgpu::WgpuDevice;
    use burn::backend::{Autodiff, Wgpu};
    let fixture = lora_fixture();
    let m = &fixture["models"][0];
    assert_eq!(m["name"], "tiny-chat");
    let dir = lora_model_dir("tiny-chat");
    let device = WgpuDevice::default();
    let mut model = load::<Wgpu>(&dir, &device, DType::F32).expect("model");
    fuserl_model::lora::add_adapters(&mut model.weights, &lora_spec(), 0, DType::F32);
    formula_adapters(&mut model.weights, true);
    assert_peft_logps(&model, &fixture_pairs(m), &m["export"]["token_logps"], "wgpu");
    let config = StageConfig { gradient_checkpointing: true, ..stage_config(&fixture) };
    let lr = fixture["lr"].as_f64().expect("lr");
    for (case, raw) in cases(m).iter().zip(m["cases"].as_array().expect("cases")) {
        if raw["start"] != "zero-b" {
            continue;
        }
        let mut model = load::<Autodiff<Wgpu>>(&dir, &device, DType::F32).expect("model");
        model.weights = fuserl_model::lora::freeze_base(model.weights, DType::F32);
        fuserl_model::lora::add_adapters(&mut model.weights, &lora_spec(), 0, DType::F32);
        formula_adapters(&mut model.weights, false);
        let mut optim = new_optimizer(&config);
        let picked: Vec<&TrainExample> = case.examples.iter().collect();
        let (_, out) = optimizer_step(model, &mut optim, &picked, settings(case, &config, lr, 1.0)).expect("step");
        let kind = &case.kind;
        assert!(close(out.loss, case.losses[0], 1e-4), "wgpu {kind}: loss {} vs PEFT {}", out.loss, case.losses[0]);
        assert!(
            close(out.grad_norm, case.grad_norm, 1e-4),
            "wgpu {kind}: norm {} vs PEFT {}",
            out.grad_norm,
            case.grad_norm
        );
    }
}

/// `n` optimiser steps of `case` with LoRA from PEFT's start on `dir` loaded with `quant`:
/// each step's loss and gradient norm.
#[cfg(feature = "wgpu")]
fn lora_steps<B: burn::tensor::backend::AutodiffBackend + fuserl_kernels::LogProbBackend>(
    dir: &std::path::Path,
    device: &B::Device,
    quant: fuserl_model::checkpoint::BaseQuant,
    case: &Case,
    config: &StageConfig,
    lr: f64,
    n: usize,
) -> Vec<(f64, f64)>
where
    B::InnerBackend: fuserl_kernels::LogProbBackend,
{
    let mut model = fuserl_model::checkpoint::load_with::<B>(dir, device, DType::F32, quant).expect("model");
    model.weights = fuserl_model::lora::freeze_base(model.weights, DType::F32);
    fuserl_model::lora::add_adapters(&mut model.weights, &lora_spec(), 0, DType::F32);
    formula_adapters(&mut model.weights, false);
    let mut optim = new_optimizer(config);
    let picked: Vec<&TrainExample> = case.examples.iter().collect();
    let mut out = Vec::new();
    for _ in 0..n {
        let (next, o) = optimizer_step(model, &mut optim, &picked, settings(case, config, lr, 1.0)).expect("step");
        model = next;
        out.push((o.loss, o.grad_norm));
    }
    out
}

/// QLoRA on wgpu (lavapipe in CI): tiny-chat's linear layers quantised at load (Q8_0, Q4_K's
/// fallback Q5_0 at its widths) are dequantised by the cubecl kernel; the first SFT and DPO steps
/// (gradient checkpointing) give the loss and adapter gradient norm of the same steps on the CPU
/// (1e-4), and those differ from LoRA on the float base (the quantisation is real).
#[cfg(feature = "wgpu")]
#[test]
fn qlora_on_wgpu_matches_the_cpu() {
    use burn::backend::wgpu::WgpuDevice;
    use burn::backend::{Autodiff, Wgpu};
    use fuserl_model::checkpoint::BaseQuant;
    use fuserl_model::quant::GgmlType;
    let fixture = lora_fixture();
    let m = &fixture["models"][0];
    let dir = lora_model_dir("tiny-chat");
    let device = WgpuDevice::default();
    let config = StageConfig { gradient_checkpointing: true, ..stage_config(&fixture) };
    let lr = fixture["lr"].as_f64().expect("lr");
    let step = |quant, case: &Case, on_gpu: bool| {
        let run = if on_gpu {
            lora_steps::<Autodiff<Wgpu>>(&dir, &device, quant, case, &config, lr, 1)
        } else {
            lora_steps::<TrainBackend>(&dir, &Default::default(), quant, case, &config, lr, 1)
        };
        run[0]
    };
    for (case, raw) in cases(m).iter().zip(m["cases"].as_array().expect("cases")) {
        if raw["start"] != "zero-b" {
            continue;
        }
        for ty in [GgmlType::Q8_0, GgmlType::Q4K] {
            let quant = BaseQuant::To(ty);
            let (gpu_loss, gpu_norm) = step(quant, case, true);
            let (cpu_loss, cpu_norm) = step(quant, case, false);
            let kind = &case.kind;
            assert!(close(gpu_loss, cpu_loss, 1e-4), "wgpu {kind} {ty:?}: loss {gpu_loss} vs CPU {cpu_loss}");
            assert!(close(gpu_norm, cpu_norm, 1e-4), "wgpu {kind} {ty:?}: norm {gpu_norm} vs CPU {cpu_norm}");
            let (float_loss, _) = step(BaseQuant::None, case, false);
            assert!(!close(cpu_loss, float_loss, 1e-7), "{kind} {ty:?}: the quantised base gives the float loss");
        }
    }
}

/// Burn's fusion backend on wgpu (lavapipe in CI; `[backend] fusion`, the default on GPU
/// devices): two optimiser steps of SFT and DPO on tiny-chat (LoRA from PEFT's start, on the
/// float base and on one quantised at load; gradient checkpointing) give the plain cubecl
/// backend's losses and gradient norms within f32 rounding (1e-5). scripts/count-kernels.sh
/// counts the kernels a step launches on each.
#[cfg(all(feature = "wgpu", feature = "fusion"))]
#[test]
fn fusion_on_wgpu_trains_as_the_plain_backend() {
    use burn::backend::Autodiff;
    use burn::backend::wgpu::WgpuDevice;
    use fuserl_kernels::backends::{FusedWgpu, PlainWgpu};
    use fuserl_model::checkpoint::BaseQuant;
    let fixture = lora_fixture();
    let m = &fixture["models"][0];
    let dir = lora_model_dir("tiny-chat");
    let device = WgpuDevice::default();
    let config = StageConfig { gradient_checkpointing: true, ..stage_config(&fixture) };
    let lr = fixture["lr"].as_f64().expect("lr");
    let mut compared = 0;
    for (case, raw) in cases(m).iter().zip(m["cases"].as_array().expect("cases")) {
        if raw["start"] != "zero-b" {
            continue;
        }
        for quant in [BaseQuant::None, BaseQuant::To(fuserl_model::quant::GgmlType::Q8_0)] {
            let fused = lora_steps::<Autodiff<FusedWgpu>>(&dir, &device, quant, case, &config, lr, 2);
            let plain = lora_steps::<Autodiff<PlainWgpu>>(&dir, &device, quant, case, &config, lr, 2);
            for (i, ((fl, fg), (pl, pg))) in fused.iter().zip(&plain).enumerate() {
                let kind = &case.kind;
                assert!(close(*fl, *pl, 1e-5), "{kind} {quant:?} step {}: loss {fl} fused, {pl} plain", i + 1);
                assert!(close(*fg, *pg, 1e-5), "{kind} {quant:?} step {}: norm {fg} fused, {pg} plain", i + 1);
            }
            compared += 1;
        }
    }
    assert!(compared >= 2, "SFT and DPO cases: {compared}");
}
