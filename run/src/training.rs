//! What the two training stages share: a stage's examples (weighed, built, tokenized and kept in
//! the stage's folder), the trainer's settings, and training then saving the model.

use std::path::{Path, PathBuf};

use burn::backend::Autodiff;
use burn::tensor::DType;
use fuserl_backends::LogProbBackend;
use fuserl_core::data::{ScoredGroup, StageName};
use fuserl_core::extension::PreferenceObjective;
use fuserl_io::artifacts::StageExample;
use fuserl_io::fs::write_atomic;
use fuserl_io::run_dir::RunDir;
use fuserl_model::chat::ChatTokenizer;
use fuserl_model::checkpoint::{load, save};
use fuserl_recipe::{LoadedRecipe, StageConfig};
use fuserl_train::data::{TrainExample, tokenize};
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
        let mut model = load::<Autodiff<B>>(start, self.device, master)?;
        model.dtype = self.dtype;
        let model = train_stage(model, stage, progress)?;
        save(&inference_model(&model), out, 2 << 30, Some(&self.target))?;
        Ok(())
    }
}
