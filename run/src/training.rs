//! What the two training stages share: a stage's examples (weighed, built, tokenized and kept in
//! the stage's folder), the trainer's settings, and training then saving the model.

use std::path::{Path, PathBuf};

use burn::backend::Autodiff;
use burn::tensor::DType;
use fuserl_backends::{LogProbBackend, memory};
use fuserl_core::data::{ScoredGroup, StageName};
use fuserl_core::extension::PreferenceObjective;
use fuserl_io::artifacts::StageExample;
use fuserl_io::fs::write_atomic;
use fuserl_io::run_dir::RunDir;
use fuserl_model::chat::ChatTokenizer;
use fuserl_model::checkpoint::{load, save};
use fuserl_model::lora;
use fuserl_recipe::{LoadedRecipe, StageConfig};
use fuserl_train::data::{TrainExample, tokenize};
use fuserl_train::plan::{self, MemoryPlan};
use fuserl_train::trainer::{Progress, Stage, inference_model, train_stage};
use fuserl_train::{Result, TrainError};

use crate::pipeline::prepare_stage;

/// A run's training context: the recipe, its run directory, the target and its tokenizer, and
/// the device the stages train on.
pub(crate) struct Training<'a, B: LogProbBackend> {
    pub loaded: &'a LoadedRecipe,
    pub run: RunDir,
    /// The target's checkpoint (its side files, such as the tokenizer, go with every save).
    pub target: PathBuf,
    pub tok: ChatTokenizer,
    pub device: &'a B::Device,
    pub dtype: DType,
    /// Records the sources skipped (for the stages' statistics).
    pub skipped_records: u64,
}

impl<'a, B: LogProbBackend> Training<'a, B> {
    /// The context of `loaded`'s run in `run`: the target's tokenizer is loaded here.
    pub fn new(loaded: &'a LoadedRecipe, run: RunDir, device: &'a B::Device, skipped_records: u64) -> Result<Self> {
        let recipe = &loaded.recipe;
        let target = loaded.base_dir.join(&recipe.target.checkpoint);
        let template = recipe.target.chat_template.as_ref().map(|t| loaded.base_dir.join(t));
        let tok = ChatTokenizer::load(&target, template.as_deref())?;
        let dtype = fuserl_backends::burn_dtype(recipe.backend.dtype);
        Ok(Self { loaded, run, target, tok, device, dtype, skipped_records })
    }

    /// The data stages of a training stage on the scored groups: weigh, build examples, tokenize;
    /// the examples (with their provenance and token counts) are kept in the stage's folder.
    pub fn examples(&self, stage: StageName, groups: Vec<ScoredGroup>) -> Result<Vec<TrainExample>> {
        let target = &self.loaded.recipe.target;
        let mut p = prepare_stage(self.loaded, stage, groups)?;
        p.stats.skipped_records = self.skipped_records;
        p.stats.log(stage);
        let max_prompt = target.max_prompt_length.map(|p| p as usize);
        let examples = tokenize(p.examples, &p.prompts, &p.texts, &self.tok, target.max_length as usize, max_prompt)?;
        let stage_dir = self.run.stage(stage);
        let stage_root = stage_dir.root();
        std::fs::create_dir_all(stage_root).map_err(|e| TrainError::io(stage_root, e))?;
        let mut text = String::new();
        for e in &examples {
            let line = StageExample {
                example: e.example.clone(),
                token_counts: e.seqs.iter().map(|s| (s.prompt.len(), s.response.len())).collect(),
            };
            // Through a JSON value: keys sorted, as in every examples.jsonl so far.
            let v = serde_json::to_value(&line).map_err(|err| TrainError::Data(err.to_string()))?;
            text.push_str(&v.to_string());
            text.push('\n');
        }
        write_atomic(&stage_dir.examples(), text.as_bytes())?;
        Ok(examples)
    }

    /// The trainer's settings for `name`: the run's seed, metrics and log-prob path, checkpoints
    /// in the stage's folder.
    pub fn stage<'s>(
        &self,
        name: StageName,
        config: &'s StageConfig,
        objective: &'s dyn PreferenceObjective,
        examples: Vec<TrainExample>,
        reference: Option<std::collections::HashMap<String, f64>>,
    ) -> Stage<'s> {
        let recipe = &self.loaded.recipe;
        let tensorboard =
            recipe.run.report_to.contains(&fuserl_recipe::ReportTo::Tensorboard).then(|| self.run.tensorboard());
        Stage {
            name,
            config,
            objective,
            examples,
            reference,
            seed: recipe.run.seed,
            dir: self.run.stage(name).checkpoints(),
            metrics: self.run.metrics(),
            tensorboard,
            logprobs: recipe.backend.logprobs,
        }
    }

    /// The memory plan of a training stage from its examples (their largest micro-batch),
    /// logged. On a GPU whose memory is known, a stage planned past it is refused with the
    /// settings that would make it fit; on the CPU a plan past the machine's memory is a
    /// warning, and the process's peak is measured from here on ([`Training::memory_measured`]).
    pub fn memory_plan(&self, name: StageName, config: &StageConfig, examples: &[TrainExample]) -> Result<MemoryPlan> {
        let backend = &self.loaded.recipe.backend;
        let model = fuserl_model::config::LlamaConfig::from_file(&self.target.join("config.json"))?;
        let batch = plan::largest_micro_batch(examples, config.batch_size as usize);
        let runtime = crate::memory::runtime(self.loaded);
        let planned =
            crate::memory::plan_stage(self.loaded, &model, name, batch, crate::memory::Basis::Examples, runtime);
        let device = format!("{:?}", backend.device).to_lowercase();
        tracing::info!(stage = name.as_str(), device = %device, "memory plan: {}", planned.plan.summary());
        let host = memory::is_host(backend.device);
        let capacity = memory::device_capacity(backend.device, backend.device_index);
        if let Some(what) =
            capacity.and_then(|c| crate::memory::does_not_fit(&planned, &device, backend.device_index, c))
        {
            if host {
                tracing::warn!(stage = name.as_str(), "{what} (on the CPU the run goes on: the system may swap)");
            } else {
                return Err(TrainError::DoesNotFit(what));
            }
        }
        if host {
            memory::reset_peak();
        }
        Ok(planned.plan)
    }

    /// On the CPU, the stage's measured peak next to its plan: logged, and kept with the plan
    /// in the stage's `memory.json` (what `scripts/bench-memory-plan.sh` tabulates).
    pub fn memory_measured(&self, name: StageName, planned: &MemoryPlan) -> Result<()> {
        let backend = &self.loaded.recipe.backend;
        let measured = memory::is_host(backend.device).then(memory::peak_resident).flatten();
        if let Some(m) = measured {
            tracing::info!(
                stage = name.as_str(),
                "peak memory: {} measured (resident), {} planned ({:+.0}%)",
                plan::gb(m),
                plan::gb(planned.peak()),
                (planned.peak() as f64 / m as f64 - 1.0) * 100.0
            );
        }
        let doc = serde_json::json!({
            "device": backend.device,
            "planned_peak_bytes": planned.peak(),
            "measured_peak_bytes": measured,
            "plan": planned,
        });
        let file = self.run.stage(name).root().join("memory.json");
        write_atomic(&file, format!("{doc:#}\n").as_bytes())?;
        Ok(())
    }

    /// Load `start`, train it on `stage`, and save the result as a Hugging Face checkpoint in
    /// `out` with the target's side files (gradient checkpointing, when the stage asks for it,
    /// is the trainer's: by layer).
    pub fn train_and_save(
        &self,
        start: &Path,
        stage: Stage<'_>,
        out: &Path,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<()> {
        // The trained weights in the master type (f32 unless `[backend] master_weights` says
        // otherwise), used in the compute dtype (`self.dtype`): mixed precision when it is 16-bit.
        let master = fuserl_backends::master_dtype(&self.loaded.recipe.backend);
        let recipe = &self.loaded.recipe;
        let model = match &recipe.target.lora {
            None => {
                let mut model = load::<Autodiff<B>>(start, self.device, master)?;
                model.dtype = self.dtype;
                model
            }
            Some(l) => {
                // LoRA: the base frozen in the compute dtype, the adapters trained in the master
                // type. FusePO starts from FuseSFT's adapter folder and goes on training its
                // adapters (as full fine-tuning goes on from FuseSFT's weights); a stage that
                // starts from the target puts new ones on it.
                // QLoRA: the base kept quantised (`quantize_base`).
                fuserl_train::trainer::load_lora_target::<Autodiff<B>>(
                    start,
                    self.device,
                    (self.dtype, master),
                    l,
                    recipe.run.seed,
                )?
            }
        };
        // What loading read and converted is freed: give it back before the stage's peak.
        fuserl_backends::release_freed_memory();
        let model = train_stage(model, stage, progress)?;
        match &recipe.target.lora {
            None => save(&inference_model(&model), out, 2 << 30, Some(&self.target))?,
            Some(l) => {
                // The adapters alone, in PEFT's layout, on top of the target.
                let base = std::fs::canonicalize(&self.target).map_err(|e| TrainError::io(&self.target, e))?;
                let json = fuserl_model::config::read_json(&self.target.join("config.json"))?;
                let multimodal = fuserl_model::gemma3::is_multimodal(&json);
                lora::save_adapter_dir(
                    &inference_model(&model),
                    &lora_spec(l),
                    out,
                    &base,
                    multimodal,
                    Some(&self.target),
                )?;
            }
        }
        Ok(())
    }
}

pub(crate) use fuserl_train::plan::{base_quant, lora_spec};
