//! Training on the committed tiny target and data: a DPO stage starts at ln 2 and its loss falls;
//! the same recipe and seed give the same losses and weights bit for bit on the CPU.

use std::path::{Path, PathBuf};

use fuserl_recipe::parse_recipe;
use fuserl_run::{Reporters, RunSummary, Which, run};

/// Run the recipe's stages with no progress shown.
fn run_quietly(loaded: &fuserl_recipe::LoadedRecipe, which: Which) -> fuserl_run::Result<RunSummary> {
    let reporters =
        Reporters { step: &mut |_| {}, collect: &|_| {}, score: &|_| {}, eval_collect: &|_| {}, eval_score: &|_| {} };
    run(loaded, which, reporters)
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("root").to_path_buf()
}

/// The quick-start recipe with absolute inputs, writing to `out`, with `extra` appended.
fn recipe(out: &Path, sft_epochs: u32, po_epochs: u32) -> String {
    let r = repo();
    format!(
        r#"schema_version = 1
[run]
name = "t"
output_dir = "{out}"
seed = 7
[target]
checkpoint = "{ckpt}"
max_length = 256
[[sources]]
kind = "jsonl"
path = "{data}"
[reward]
kind = "precomputed"
[weighting]
kind = "softmax"
temperature = 0.5
[sft]
epochs = {sft_epochs}
learning_rate = 3e-3
warmup_ratio = 0.0
batch_size = 4
grad_accum = 2
checkpoint_every = 3
[po]
epochs = {po_epochs}
learning_rate = 3e-4
warmup_ratio = 0.0
batch_size = 4
checkpoint_every = 3
[po.objective]
kind = "dpo"
beta = 0.1
[po.objective.pairs]
min_gap = 0.005
"#,
        out = out.display(),
        ckpt = r.join("checkpoints/tiny-chat").display(),
        data = r.join("data/fusion-mini.jsonl").display(),
    )
}

fn train(out: &Path, sft_epochs: u32, po_epochs: u32) -> Vec<serde_json::Value> {
    train_text(out, &recipe(out, sft_epochs, po_epochs))
}

/// Run the recipe `text` (both stages and export) into `out`; its metrics lines.
fn train_text(out: &Path, text: &str) -> Vec<serde_json::Value> {
    let registry = fuserl_builtin::registry().expect("registry");
    let loaded = parse_recipe(text, &out.join("recipe.toml"), &registry).expect("recipe");
    run_quietly(&loaded, Which::All).expect("run");
    read_metrics(out)
}

fn read_metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .expect("metrics")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect()
}

fn losses(rows: &[serde_json::Value], stage: &str) -> Vec<f64> {
    rows.iter().filter(|r| r["stage"] == stage).map(|r| r["loss"].as_f64().expect("loss")).collect()
}

/// Both stages log as many steps in `other` as in `reference`, each loss within `rel` of the
/// reference's (relative, or absolute below 1).
fn assert_losses_close(reference: &[serde_json::Value], other: &[serde_json::Value], rel: f64, what: &str) {
    for stage in ["sft", "po"] {
        let (r, o) = (losses(reference, stage), losses(other, stage));
        assert_eq!(r.len(), o.len(), "{what}, {stage}: step counts");
        for (x, y) in r.iter().zip(&o) {
            assert!((x - y).abs() <= rel * x.abs().max(1.0), "{what}, {stage}: {r:?} vs {o:?}");
        }
    }
}

#[test]
fn dpo_starts_at_ln2_and_falls() {
    let dir = tempfile::tempdir().expect("tmp");
    let rows = train(&dir.path().join("run"), 4, 6);
    let po = losses(&rows, "po");
    // Policy = reference, up to f32 rounding: the sequence log-probs (sums near -100 to -300,
    // where an f32 step is 1e-5 to 3e-5) come from differently padded batches for the
    // reference cache and for training, which changes the order of additions.
    assert!((po[0] - std::f64::consts::LN_2).abs() < 1e-5, "first DPO loss {}", po[0]);
    let tail: f64 = po[po.len() - 4..].iter().sum::<f64>() / 4.0;
    assert!(tail < 0.6 * po[0], "DPO loss did not fall: {po:?}");
    let sft = losses(&rows, "sft");
    assert!(sft[sft.len() - 1] < sft[0], "{sft:?}");
    // Every logged step has the metrics a user expects.
    for r in &rows {
        for key in ["step", "stage", "loss", "grad_norm", "lr", "tokens_per_s"] {
            assert!(!r[key].is_null(), "{key} missing in {r}");
        }
        if r["stage"] == "po" {
            for key in ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"] {
                assert!(!r[key].is_null(), "{key} missing in {r}");
            }
        }
    }
    assert!(dir.path().join("run/export/model.safetensors").is_file());
    assert!(dir.path().join("run/po/reference-logps.json").is_file());
    let examples = std::fs::read_to_string(dir.path().join("run/po/examples.jsonl")).expect("examples");
    let first: serde_json::Value = serde_json::from_str(examples.lines().next().expect("line")).expect("json");
    assert_eq!(first["sequences"][0]["origin"]["adapter"], "jsonl");
    assert!(first["token_counts"][0][1].as_u64().expect("count") > 0);
}

#[test]
fn same_recipe_and_seed_give_identical_losses_and_weights() {
    let a = tempfile::tempdir().expect("tmp");
    let b = tempfile::tempdir().expect("tmp");
    let ra = train(&a.path().join("run"), 2, 1);
    let rb = train(&b.path().join("run"), 2, 1);
    for stage in ["sft", "po"] {
        let (la, lb) = (losses(&ra, stage), losses(&rb, stage));
        assert_eq!(
            la.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            lb.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }
    let wa = std::fs::read(a.path().join("run/export/model.safetensors")).expect("a");
    let wb = std::fs::read(b.path().join("run/export/model.safetensors")).expect("b");
    assert!(wa == wb, "exported weights differ");
    // Running again resumes: finished stages are not redone and nothing changes.
    let again = train(&a.path().join("run"), 2, 1);
    assert_eq!(again.len(), ra.len());
    assert_eq!(std::fs::read(a.path().join("run/export/model.safetensors")).expect("a"), wa);
}

#[test]
fn gradient_checkpointing_gives_the_same_training() {
    let run_with = |out: &Path, checkpointing: bool| -> Vec<serde_json::Value> {
        let setting = format!("gradient_checkpointing = {checkpointing}\n");
        let text = recipe(out, 1, 1)
            .replace("[sft]\n", &format!("[sft]\n{setting}"))
            .replace("[po]\n", &format!("[po]\n{setting}"));
        assert_eq!(text.matches("gradient_checkpointing").count(), 2, "both stages get the setting");
        train_text(out, &text)
    };
    let dir = tempfile::tempdir().expect("tmp");
    let plain = run_with(&dir.path().join("plain"), false);
    let ckpt = run_with(&dir.path().join("ckpt"), true);
    // The same gradients up to f32 rounding: the forward pass without a graph runs the CPU
    // backend's fused kernels (softmax, sigmoid) where the autodiff graph composes them from
    // primitive ops, and the layer-by-layer backward sums gradients in another order (each
    // layer's residual branches, the tied embeddings' two contributions).
    // A sequence's log-prob is an f32 sum of a few hundred terms (a rounding step of about
    // 3e-5), and preference losses are functions of differences of them.
    assert_losses_close(&plain, &ckpt, 1e-5, "plain vs checkpointing");
}

#[test]
fn wrpo_trains_on_the_targets_own_samples_scored_by_a_verifier() {
    let r = repo();
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("run");
    let text = format!(
        r#"schema_version = 1
[run]
output_dir = "{out}"
seed = 5
[target]
checkpoint = "{ckpt}"
max_length = 128
[data.sampling]
temperature = 1.0
top_p = 0.95
max_new_tokens = 12
[[sources]]
kind = "jsonl"
path = "{data}"
[reward]
kind = "keywords"
path = "{facts}"
[weighting]
kind = "best-only"
[sft]
epochs = 1
learning_rate = 3e-3
batch_size = 4
[po]
epochs = 1
learning_rate = 1e-4
batch_size = 4
target_samples = 3
[po.objective]
kind = "wrpo"
beta = 0.1
"#,
        out = out.display(),
        ckpt = r.join("checkpoints/tiny-chat").display(),
        data = r.join("data/fusion-mini.jsonl").display(),
        facts = r.join("data/fusion-mini-facts.jsonl").display(),
    );
    let registry = fuserl_builtin::registry().expect("registry");
    let loaded = parse_recipe(&text, &out.join("recipe.toml"), &registry).expect("recipe");
    run_quietly(&loaded, Which::All).expect("run");
    let samples = std::fs::read_to_string(out.join("po/collect/target.jsonl")).expect("samples");
    assert_eq!(samples.lines().count(), 30, "3 samples for each of 10 prompts");
    let examples: Vec<serde_json::Value> = std::fs::read_to_string(out.join("po/examples.jsonl"))
        .expect("examples")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert!(!examples.is_empty(), "no WRPO triplet: the samples all scored the same");
    for e in &examples {
        let seqs = e["sequences"].as_array().expect("seqs");
        assert_eq!(seqs.len(), 3);
        assert_ne!(seqs[0]["completion"]["source"], "target");
        for s in &seqs[1..] {
            assert_eq!(s["completion"]["source"], "target");
            assert_eq!(s["origin"]["adapter"], "collect");
        }
        assert!(seqs[1]["reward"].as_f64() > seqs[2]["reward"].as_f64());
    }
    let po = losses(&read_metrics(&out), "po");
    // The reference and the policy see the same weights in differently padded batches: equal up
    // to f32 rounding, which depends on the CPU's kernels (the DPO test above says the same).
    assert!((po[0] - std::f64::consts::LN_2).abs() < 1e-5, "{}", po[0]);
    // A rerun does not generate again: the cached samples are reused as they are.
    let before = std::fs::read(out.join("po/collect/target.jsonl")).expect("samples");
    std::fs::remove_file(out.join("po/DONE")).expect("rm");
    run_quietly(&loaded, Which::Po).expect("rerun");
    assert_eq!(std::fs::read(out.join("po/collect/target.jsonl")).expect("samples"), before);
}

#[test]
fn export_writes_the_requested_dtype() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("run");
    train_text(&out, &(recipe(&out, 1, 1) + "[export]\ndtype = \"bf16\"\n"));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("export/config.json")).expect("cfg")).expect("json");
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    let bytes = std::fs::read(out.join("export/model.safetensors")).expect("weights");
    let header_len = u64::from_le_bytes(bytes[..8].try_into().expect("8")) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).expect("header");
    assert!(
        header
            .as_object()
            .expect("obj")
            .iter()
            .filter(|(k, _)| *k != "__metadata__")
            .all(|(_, v)| v["dtype"] == "BF16")
    );
}

/// The quick-start recipe with a `[backend]` table.
fn recipe_on(out: &Path, backend: &str) -> String {
    format!("{}[backend]\n{backend}\n", recipe(out, 1, 1))
}

#[test]
fn fused_and_naive_log_probs_train_alike() {
    let a = tempfile::tempdir().expect("tmp");
    let b = tempfile::tempdir().expect("tmp");
    let fused = train_text(&a.path().join("run"), &recipe_on(&a.path().join("run"), "logprobs = \"fused\""));
    let naive = train_text(&b.path().join("run"), &recipe_on(&b.path().join("run"), "logprobs = \"naive\""));
    assert_losses_close(&naive, &fused, 1e-5, "naive vs fused");
}

/// The whole run on wgpu (lavapipe in CI): the fused kernels in training, reference log-probs and
/// export, with losses close to the CPU's (f32 on both, different summation orders).
#[test]
fn a_run_on_wgpu_tracks_the_cpu() {
    use fuserl_recipe::Device;
    let gpu = tempfile::tempdir().expect("tmp");
    let out = gpu.path().join("run");
    let text = recipe_on(&out, "device = \"wgpu\"");
    if !fuserl_backends::is_compiled(Device::Wgpu) {
        let registry = fuserl_builtin::registry().expect("registry");
        let loaded = parse_recipe(&text, &out.join("recipe.toml"), &registry).expect("recipe");
        let err = run_quietly(&loaded, Which::All).expect_err("no wgpu in this build").to_string();
        assert!(err.contains("--features wgpu"), "{err}");
        return;
    }
    let on_gpu = train_text(&out, &text);
    let cpu = tempfile::tempdir().expect("tmp");
    let on_cpu = train_text(&cpu.path().join("run"), &recipe_on(&cpu.path().join("run"), "device = \"cpu\""));
    assert_losses_close(&on_cpu, &on_gpu, 1e-3, "cpu vs wgpu");
    assert!((losses(&on_gpu, "po")[0] - std::f64::consts::LN_2).abs() < 1e-5);
    assert!(out.join("export/model.safetensors").is_file());
}

/// The export stage records what it wrote (`export.json`): a rerun skips it, a model trained
/// again is exported again, and an export folder that was removed is written anew.
#[test]
fn export_is_done_once_and_again_when_its_model_changes() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("run");
    let loaded = parse_recipe(
        &recipe(&out, 1, 1),
        &dir.path().join("recipe.toml"),
        &fuserl_builtin::registry().expect("registry"),
    )
    .expect("recipe");
    let go = || run_quietly(&loaded, Which::All).expect("run");
    go();
    let weights = out.join("export/model.safetensors");
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("export.json")).expect("export.json")).expect("json");
    assert!(record["from"].as_str().expect("from").ends_with("po/final"), "{record}");
    let written = std::fs::metadata(&weights).expect("weights").modified().expect("mtime");
    std::thread::sleep(std::time::Duration::from_millis(20));
    go();
    assert_eq!(std::fs::metadata(&weights).expect("weights").modified().expect("mtime"), written, "exported again");
    // Other weights in FusePO's model (as after training it again): exported again.
    let before = std::fs::read(&weights).expect("weights");
    std::fs::copy(out.join("sft/final/model.safetensors"), out.join("po/final/model.safetensors")).expect("copy");
    go();
    assert_ne!(std::fs::read(&weights).expect("weights"), before, "the changed model was not exported");
    // Weights changed in the export folder (another run writing there): written again.
    std::fs::write(&weights, b"not a model").expect("write");
    go();
    assert_ne!(std::fs::read(&weights).expect("weights"), b"not a model");
    // A removed export folder is written anew.
    std::fs::remove_dir_all(out.join("export")).expect("rm");
    go();
    assert!(weights.is_file());
}

/// `[export] format = "gguf"`: the export folder also holds llama.cpp's file of the weights, in
/// the type asked for, which reads back as the exported weights (Q8_0: within its rounding); a
/// rerun skips it, and a removed GGUF file is written again.
#[test]
fn a_gguf_export_is_written_beside_the_folder_and_kept_on_rerun() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("run");
    let text = recipe(&out, 1, 1) + "[export]\nformat = \"gguf\"\ngguf_type = \"q8_0\"\n";
    let loaded = parse_recipe(&text, &dir.path().join("recipe.toml"), &fuserl_builtin::registry().expect("registry"))
        .expect("recipe");
    let go = || run_quietly(&loaded, Which::All).expect("run");
    go();
    let file = out.join("export/model-Q8_0.gguf");
    let g = fuserl_model::gguf::Gguf::read(&file).expect("the GGUF file");
    assert_eq!(g.meta.get("general.architecture"), Some(&fuserl_model::gguf::Meta::Str("llama".into())));
    let store = fuserl_model::checkpoint::TensorStore::read_dir(&out.join("export")).expect("export");
    let (_, down) = store.get("model.layers.1.mlp.down_proj.weight").expect("readable").expect("down_proj");
    let t = g.tensors.iter().find(|t| t.name == "blk.1.ffn_down.weight").expect("ffn_down");
    assert_eq!(fuserl_model::quant::GgmlType::name_of(t.ggml_type), "Q8_0");
    let back = g.dequantize(t).expect("dequantise");
    let amax = down.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = down.iter().zip(&back).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst <= amax / 127.0, "Q8_0 error {worst} above a level ({})", amax / 127.0);
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("export.json")).expect("export.json")).expect("json");
    assert_eq!(record["gguf"][0], "model-Q8_0.gguf", "{record}");
    let card = std::fs::read_to_string(out.join("export/README.md")).expect("model card");
    assert!(card.contains("- \"gguf\"\n") && card.contains("`model-Q8_0.gguf`"), "{card}");
    // The file's inode: a rewrite renames a new file into place.
    let inode = |f: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(f).expect("gguf"));
    let written = inode(&file);
    go();
    assert_eq!(inode(&file), written, "exported again");
    std::fs::remove_file(&file).expect("rm");
    go();
    assert!(file.is_file(), "a removed GGUF file is written again");
    // Another type: the old file goes, the new one comes; no GGUF asked for: none left.
    let f16 = recipe(&out, 1, 1) + "[export]\nformat = \"gguf\"\ngguf_type = \"f16\"\n";
    let f16 = parse_recipe(&f16, &dir.path().join("recipe.toml"), &fuserl_builtin::registry().expect("registry"))
        .expect("recipe");
    run_quietly(&f16, Which::All).expect("run");
    assert!(out.join("export/model-F16.gguf").is_file() && !file.exists());
    let plain = parse_recipe(
        &recipe(&out, 1, 1),
        &dir.path().join("recipe.toml"),
        &fuserl_builtin::registry().expect("registry"),
    )
    .expect("recipe");
    run_quietly(&plain, Which::All).expect("run");
    assert!(!out.join("export/model-F16.gguf").exists(), "a GGUF file no longer asked for is removed");
    // A type without the format is refused by the recipe.
    let wrong = recipe(&out, 1, 1) + "[export]\ngguf_type = \"q8_0\"\n";
    let err = parse_recipe(&wrong, &dir.path().join("recipe.toml"), &fuserl_builtin::registry().expect("registry"))
        .expect_err("refused")
        .to_string();
    assert!(err.contains("export.gguf_type") && err.contains("format = \"gguf\""), "{err}");
}
