//! Memory plans of a recipe's training stages (`fuserl plan`, `fuserl recipe check`, and the
//! line each stage logs when it starts): [`fuserl_train::plan`] on the stage's largest
//! micro-batch, from its examples when the run has made them, else the worst case the recipe
//! allows (every sequence `max_length` tokens, examples as the objective builds them from a
//! group of the recipe's size).

use fuserl_backends::memory;
use fuserl_core::data::StageName;
use fuserl_core::extension::{GroupData, PreferenceObjective};
use fuserl_io::artifacts::StageExample;
use fuserl_io::run_dir::RunDir;
use fuserl_model::config::LlamaConfig;
use fuserl_recipe::{LoadedRecipe, StageConfig};
use fuserl_train::Result;
use fuserl_train::plan::{self, PlanInput};
pub use fuserl_train::plan::{MemoryPlan, count, gb};

/// What a GPU's runtime holds before a stage (the CUDA context, cuBLAS and kernel workspaces,
/// the allocator's slack): an allowance, not a measurement, until a GPU run measures it.
pub const GPU_RUNTIME: u64 = 1 << 30;

/// Where a plan's micro-batch came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Basis {
    /// The stage's examples (made by an earlier run, or by the stage now).
    Examples,
    /// The recipe's worst case: every sequence `max_length` tokens.
    WorstCase,
}

/// One stage's plan.
#[derive(Clone, Debug)]
pub struct StagePlan {
    /// The stage.
    pub stage: StageName,
    /// Sequences of the largest micro-batch.
    pub sequences: usize,
    /// Their length in tokens.
    pub length: usize,
    /// Where those came from.
    pub basis: Basis,
    /// The plan.
    pub plan: MemoryPlan,
    /// What to change when it does not fit, most effective first.
    pub levers: Vec<String>,
}

/// The plan of `stage` for a micro-batch of `sequences` x `length` tokens, with `runtime`
/// bytes held before it.
pub fn plan_stage(
    loaded: &LoadedRecipe,
    model: &LlamaConfig,
    stage: StageName,
    (sequences, length): (usize, usize),
    basis: Basis,
    runtime: u64,
) -> StagePlan {
    let recipe = &loaded.recipe;
    let (config, reference) = match stage {
        StageName::Po => (&recipe.po, loaded.components.po_objective.needs_reference()),
        _ => (&recipe.sft, false),
    };
    let input = PlanInput {
        model,
        config,
        backend: &recipe.backend,
        sequences,
        length,
        // FusePO's reference log-probs run in batches of twice the stage's batch size.
        reference_sequences: reference.then_some(config.batch_size as usize * 2),
        runtime,
        lora: recipe.target.lora.as_ref(),
        gguf_bytes: fuserl_model::checkpoint::gguf_weights(&loaded.base_dir.join(&recipe.target.checkpoint))
            .and_then(|f| std::fs::metadata(f).ok())
            .map(|m| m.len()),
    };
    let plan = plan::plan(&input);
    let levers = plan.levers(&input);
    StagePlan { stage, sequences, length, basis, plan, levers }
}

/// When `p` is planned past `capacity` bytes: what to say, with the settings that would make it
/// fit (a stage on a GPU is refused with it; on the CPU it is a warning).
pub fn does_not_fit(p: &StagePlan, device: &str, index: u32, capacity: u64) -> Option<String> {
    (p.plan.peak() > capacity).then(|| {
        format!(
            "the {} stage is planned to need {} on {device} {index}, which has {} ({}); to fit, try {}",
            p.stage.as_str(),
            gb(p.plan.peak()),
            gb(capacity),
            p.plan.summary(),
            p.levers.join("; or ")
        )
    })
}

/// What the process or device holds before a stage: the process's resident memory on the CPU,
/// [`GPU_RUNTIME`] on a GPU.
pub fn runtime(loaded: &LoadedRecipe) -> u64 {
    if memory::is_host(loaded.recipe.backend.device) { memory::resident().unwrap_or(0) } else { GPU_RUNTIME }
}

/// The plans of the recipe's enabled training stages, before they run: from the stage's
/// `examples.jsonl` when the run directory has one, else the worst case.
pub fn plan_recipe(loaded: &LoadedRecipe) -> Result<Vec<StagePlan>> {
    let recipe = &loaded.recipe;
    let model = LlamaConfig::from_file(&loaded.base_dir.join(&recipe.target.checkpoint).join("config.json"))?;
    let run = RunDir::new(loaded.output_dir());
    let runtime = runtime(loaded);
    let mut plans = Vec::new();
    let stages = [
        (StageName::Sft, &recipe.sft, loaded.components.sft_objective.as_ref(), 0),
        (StageName::Po, &recipe.po, loaded.components.po_objective.as_ref(), recipe.po.target_samples),
    ];
    for (stage, config, objective, own) in stages {
        if !config.enabled {
            continue;
        }
        let (batch, basis) = match from_examples(&run.stage(stage).examples(), config) {
            Some(b) => (b, Basis::Examples),
            None => (worst_case(loaded, config, objective, own), Basis::WorstCase),
        };
        plans.push(plan_stage(loaded, &model, stage, batch, basis, runtime));
    }
    Ok(plans)
}

/// The plan of one model generating answers: a `local` source, or one of evaluation's own models.
#[derive(Clone, Debug)]
pub struct GenerationPlan {
    /// What generates (`collect: local source NAME`, `eval: the fused model`, ...).
    pub what: String,
    /// Answers generated at once.
    pub batch: usize,
    /// The longest prompt (tokens).
    pub prompt: usize,
    /// New tokens at most per answer.
    pub new_tokens: usize,
    /// The plan.
    pub plan: MemoryPlan,
    /// What to change when it does not fit, most effective first.
    pub levers: Vec<String>,
}

/// The settings a generation plan's levers name: the batch's and the new tokens'.
#[derive(Clone, Copy, Debug)]
pub struct GenerationSettings<'a> {
    /// `[[sources]] batch_size`, `[eval] batch_size`.
    pub batch: &'a str,
    /// `sampling.max_tokens`, `[eval] max_new_tokens`.
    pub new_tokens: &'a str,
    /// `max_prompt_length`, `[target] max_prompt_length`.
    pub prompt: &'a str,
}

/// The plan of the checkpoint `dir` (a folder, or a PEFT adapter folder on its base) generating
/// `batch` answers at once to prompts of up to `prompt` tokens, `new_tokens` each, on
/// `backend`'s device in its compute type; with `admissions`, new prompts are admitted into
/// finished rows while others still answer (more prompts than the batch).
#[allow(clippy::too_many_arguments)]
pub fn plan_generation(
    what: String,
    dir: &std::path::Path,
    backend: &fuserl_core::backend::BackendConfig,
    (batch, prompt, new_tokens): (usize, usize, usize),
    admissions: bool,
    runtime: u64,
    settings: &GenerationSettings<'_>,
) -> Result<GenerationPlan> {
    use fuserl_core::backend::{DType, Device};
    let model = LlamaConfig::from_file(&fuserl_model::checkpoint::config_file(dir)?)?;
    let weights_dir = if fuserl_model::lora::is_adapter_dir(dir) {
        fuserl_model::lora::read_adapter_config(dir)?.base
    } else {
        dir.to_path_buf()
    };
    // The weight files loading reads: the folder's GGUF (QLoRA's folders) or its safetensors.
    let gguf = fuserl_model::checkpoint::gguf_weights(&weights_dir);
    let shards = if gguf.is_some() { Vec::new() } else { fuserl_model::gguf_export::shard_headers(&weights_dir)? };
    let size = |f: &std::path::Path| std::fs::metadata(f).map_or(0, |m| m.len());
    let file_bytes = gguf.as_deref().map_or_else(|| shards.iter().map(|(f, _)| size(f)).sum(), size);
    // On the CPU in f32 a checkpoint stored in bf16 keeps its weights in bf16
    // (`checkpoint::load_frozen`); otherwise they are in the compute type.
    let stored_bf16 = !shards.is_empty()
        && shards.iter().flat_map(|(_, t)| t).all(|(_, _, dtype)| dtype == "BF16" || !dtype.starts_with('F'));
    let compute = if backend.dtype == DType::F32 { 4 } else { 2 };
    let weight_bytes =
        if backend.device == Device::Cpu && backend.dtype == DType::F32 && stored_bf16 { 2 } else { compute };
    let input = plan::GenerationInput {
        model: &model,
        backend,
        batch,
        prompt,
        new_tokens,
        admissions,
        weight_bytes,
        file_bytes,
        runtime,
    };
    let planned = plan::generation_plan(&input);
    let levers = plan::generation_levers(&planned, &input, [settings.batch, settings.new_tokens, settings.prompt]);
    Ok(GenerationPlan { what, batch, prompt, new_tokens, plan: planned, levers })
}

/// The generation plans of a recipe: each `local` source (collect), and evaluation's own models
/// (the fused model, shaped as the target, and checkpoint-folder baselines).
pub fn plan_recipe_generation(loaded: &LoadedRecipe) -> Result<Vec<GenerationPlan>> {
    let recipe = &loaded.recipe;
    let runtime = runtime(loaded);
    let mut plans = Vec::new();
    for table in &recipe.sources {
        if table.get("kind").and_then(|k| k.as_str()) != Some("local") {
            continue;
        }
        let mut table = table.clone();
        table.remove("kind");
        // Checked when the recipe was read.
        let Ok(c) = fuserl_core::config::parse_table::<crate::local::LocalConfig>(&table) else { continue };
        let backend = fuserl_core::backend::BackendConfig {
            device: c.device.unwrap_or(recipe.backend.device),
            dtype: c.dtype.unwrap_or(recipe.backend.dtype),
            ..recipe.backend.clone()
        };
        let new_tokens =
            c.sampling.over(&recipe.data.sampling).max_new_tokens.unwrap_or(crate::local::DEFAULT_MAX_TOKENS);
        plans.push(plan_generation(
            format!("collect: local source {}", c.name),
            &loaded.base_dir.join(&c.checkpoint),
            &backend,
            (c.batch_size as usize, c.max_prompt_length as usize, new_tokens as usize),
            true,
            runtime,
            &GenerationSettings {
                batch: "batch_size",
                new_tokens: "sampling.max_tokens` or `[data.sampling] max_new_tokens",
                prompt: "max_prompt_length",
            },
        )?);
    }
    let e = &recipe.eval;
    if e.enabled {
        let shape =
            (e.batch_size as usize, recipe.target.generation_prompt_length() as usize, e.max_new_tokens as usize);
        let settings = GenerationSettings {
            batch: "[eval] batch_size",
            new_tokens: "[eval] max_new_tokens",
            prompt: "[target] max_prompt_length",
        };
        let eval_plan = |what: String, dir: &std::path::Path| {
            plan_generation(what, dir, &recipe.backend, shape, true, runtime, &settings)
        };
        plans.push(eval_plan("eval: the fused model".into(), &loaded.base_dir.join(&recipe.target.checkpoint))?);
        for b in &e.baselines {
            if b == "target" || b == "sft" || b.starts_with("source:") {
                // The target's shapes (planned above), or a source's own settings.
                continue;
            }
            plans.push(eval_plan(format!("eval: baseline {b}"), &loaded.base_dir.join(b))?);
        }
    }
    Ok(plans)
}

/// The largest micro-batch of a stage's kept examples (`examples.jsonl`), if it has them.
fn from_examples(file: &std::path::Path, config: &StageConfig) -> Option<(usize, usize)> {
    let text = fuserl_core::paths::read_regular_string(file).ok()?;
    let mut counts = Vec::new();
    let mut length = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let e: StageExample = serde_json::from_str(line).ok()?;
        length = e.token_counts.iter().map(|(p, r)| p + r).max().unwrap_or(0).max(length);
        counts.push(e.token_counts.len());
    }
    counts.sort_unstable_by(|a, b| b.cmp(a));
    (!counts.is_empty()).then(|| (counts.iter().take(config.batch_size as usize).sum(), length))
}

/// The worst case: `batch_size` examples of as many sequences as the objective makes from a
/// group of the recipe's size (its sources times `samples_per_prompt`, at least 4, plus the
/// target's own samples), every sequence `max_length` tokens.
fn worst_case(
    loaded: &LoadedRecipe,
    config: &StageConfig,
    objective: &dyn PreferenceObjective,
    own: u32,
) -> (usize, usize) {
    let recipe = &loaded.recipe;
    let sources = recipe.sources.len().max(1);
    let size = (sources * recipe.data.samples_per_prompt.max(1) as usize).max(4) + own as usize;
    let names: Vec<String> = (0..size).map(|i| format!("source-{}", i % sources)).collect();
    let items: Vec<(&str, f64)> = names.iter().enumerate().map(|(i, n)| (n.as_str(), i as f64)).collect();
    let mut group = GroupData::new(&items);
    group.weights = vec![1.0 / size as f64; size];
    let per_example =
        objective.build_examples(&group.view()).ok().and_then(|e| e.iter().map(|x| x.members.len()).max()).unwrap_or(2);
    (per_example * config.batch_size as usize, recipe.target.max_length as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stage planned past the device's memory gets a message with the plan, the device's
    /// memory and the settings to change; one that fits gets none.
    #[test]
    fn a_stage_past_the_device_is_refused_with_the_settings_to_change() {
        let model = LlamaConfig::from_file(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/configs/smollm2-1.7b/config.json"),
        )
        .expect("config");
        let config: StageConfig = fuserl_core::config::parse_table(&toml::Table::new()).expect("defaults");
        let backend = fuserl_core::backend::BackendConfig {
            device: fuserl_core::backend::Device::Cuda,
            dtype: fuserl_core::backend::DType::Bf16,
            ..Default::default()
        };
        let input = PlanInput {
            model: &model,
            config: &config,
            backend: &backend,
            sequences: 16,
            length: 512,
            reference_sequences: Some(16),
            runtime: GPU_RUNTIME,
            lora: None,
            gguf_bytes: None,
        };
        let planned = plan::plan(&input);
        let p = StagePlan {
            stage: StageName::Po,
            sequences: 16,
            length: 512,
            basis: Basis::WorstCase,
            levers: planned.levers(&input),
            plan: planned,
        };
        // 1.71B parameters at 16 bytes: 27 GB of training state alone.
        assert!(does_not_fit(&p, "cuda", 0, 80_000_000_000).is_none());
        let what = does_not_fit(&p, "cuda", 0, 24_000_000_000).expect("does not fit in 24 GB");
        for part in
            ["the po stage", "on cuda 0, which has 24.0 GB", "AdamW moments", "batch_size", "master_weights = \"bf16\""]
        {
            assert!(what.contains(part), "{part:?} missing from: {what}");
        }
    }
}
