//! `local`: a Hugging Face checkpoint that fuserl loads and samples from itself, in the
//! collect stage, with KV-cache generation and continuous batching (an answer that finishes goes
//! to the store at once and its place in the batch to the next prompt), on the recipe's backend
//! or its own.
//!
//! ```toml
//! [[sources]]
//! kind = "local"
//! name = "tiny"                        # the source name in the data
//! checkpoint = "../checkpoints/tiny-chat"
//! batch_size = 8                       # answers generated together
//! device = "cpu"                       # default: the recipe's [backend] device and dtype
//! [sources.sampling]                   # overrides [data.sampling]
//! temperature = 1.0
//! max_tokens = 64
//! ```
//!
//! Every (prompt, sample) has a sampler of its own, seeded with the collect stage's seed for it,
//! so a run gives the same texts on every machine of the same kind, whichever batch a job lands in
//! up to f32 rounding across batch shapes.

use std::path::{Path, PathBuf};

use fuserl_backends::{LogProbBackend, OnBackend};
use fuserl_core::backend::{DType as RecipeDType, Device};
use fuserl_core::config::{ConfigError, KeyPath};
use fuserl_core::data::{SamplingParams, SourceSampling};
use fuserl_core::extension::{GenerateStats, Generated, GeneratedSink, Generator, SampleJob, SourceAdapter};
use fuserl_core::paths::Shown;
use fuserl_core::registry::{BuildContext, Built, PluginDescriptor, StaticFactory, build_component};
use fuserl_core::{Error, Result};
use fuserl_model::chat::ChatTokenizer;
use fuserl_model::checkpoint::load_frozen;
use fuserl_model::generate::{GenerateConfig, generate_each};
use fuserl_train::plan::gb;
use serde::{Deserialize, Serialize};

/// `[[sources]] kind = "local"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    /// The source name its answers carry in the data.
    pub name: String,
    /// A Hugging Face checkpoint folder, relative to the recipe.
    pub checkpoint: String,
    /// A chat template file instead of the checkpoint's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    /// The device (default: the recipe's `[backend] device`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<Device>,
    /// The floating-point type (default: the recipe's `[backend] dtype`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<RecipeDType>,
    /// Answers generated together (continuous batching: a finished one's place goes to the next).
    #[serde(default = "default_batch")]
    pub batch_size: u32,
    /// Longest prompt in tokens (longer ones keep their end).
    #[serde(default = "default_prompt_len")]
    pub max_prompt_length: u32,
    /// Sampling overrides of `[data.sampling]`.
    #[serde(default, skip_serializing_if = "SourceSampling::is_empty")]
    pub sampling: SourceSampling,
}

/// New tokens at most per answer when neither the source nor `[data.sampling]` sets `max_tokens`.
pub const DEFAULT_MAX_TOKENS: u32 = 256;

fn default_batch() -> u32 {
    8
}
fn default_prompt_len() -> u32 {
    1024
}

/// A checkpoint that answers prompts in-process.
#[derive(Debug)]
pub struct LocalSource {
    config: LocalConfig,
    checkpoint: PathBuf,
    template: Option<PathBuf>,
    device: Device,
    device_index: u32,
    dtype: RecipeDType,
    /// Burn's fusion backend on a GPU device (`[backend] fusion`).
    fusion: bool,
    /// `[backend] attention` (what the memory plan counts on a GPU).
    attention: fuserl_core::backend::AttentionPath,
    /// The weights' hash, computed once: it reads every byte of them.
    weights: std::sync::OnceLock<String>,
    /// The recipe's names of the settings that set the batch, the new tokens and the prompts'
    /// length (what a memory plan that does not fit tells to change).
    setting_names: [String; 3],
}

impl LocalSource {
    /// Build: the folder must be a checkpoint; nothing is loaded yet.
    pub fn new(config: LocalConfig, ctx: &BuildContext) -> Result<Self, ConfigError> {
        fuserl_core::data::check_source_name(&config.name)?;
        let checkpoint = ctx.resolve(&config.checkpoint);
        if !checkpoint.join("config.json").is_file() && !fuserl_model::lora::is_adapter_dir(&checkpoint) {
            return Err(ConfigError::at(
                "checkpoint",
                format!(
                    "{}: not a Hugging Face checkpoint folder (no config.json) nor a PEFT adapter folder",
                    Shown(&checkpoint)
                ),
            ));
        }
        if config.batch_size == 0 {
            return Err(ConfigError::at("batch_size", "expected at least 1"));
        }
        if let Some(key) = config.sampling.extra.keys().next() {
            return Err(ConfigError::new(
                KeyPath::keys(&["sampling", "extra", key]),
                "the local source sends no requests: expected only temperature, top_p, top_k, max_tokens and stop",
            ));
        }
        let template = config.chat_template.as_deref().map(|t| ctx.resolve(t));
        let (device, device_index) = match config.device {
            Some(d) => (d, 0),
            None => (ctx.backend.device, ctx.backend.device_index),
        };
        let dtype = config.dtype.unwrap_or(ctx.backend.dtype);
        fuserl_backends::check(device, dtype).map_err(|e| ConfigError::at("device", e.to_string()))?;
        let fusion = ctx.backend.fusion;
        Ok(Self {
            config,
            checkpoint,
            template,
            device,
            device_index,
            dtype,
            fusion,
            attention: ctx.backend.attention,
            weights: std::sync::OnceLock::new(),
            setting_names: [
                "batch_size".into(),
                "sampling.max_tokens` or `[data.sampling] max_new_tokens".into(),
                "max_prompt_length".into(),
            ],
        })
    }

    /// A source named `name` that samples from `checkpoint` (the target's own samples of
    /// WRPO and on-policy RLOO: the FuseSFT model; evaluation's models), `batch_size` answers
    /// together (`None`: the `local` source's default).
    /// `settings` names the recipe's settings of the batch, the new tokens and the prompts' length.
    pub fn for_checkpoint(
        name: &str,
        checkpoint: &Path,
        max_prompt_length: u32,
        batch_size: Option<u32>,
        settings: [&str; 3],
        ctx: &BuildContext,
    ) -> Result<Self, ConfigError> {
        let config = LocalConfig {
            name: name.to_owned(),
            checkpoint: checkpoint.display().to_string(),
            chat_template: None,
            device: None,
            dtype: None,
            batch_size: batch_size.unwrap_or_else(default_batch),
            max_prompt_length,
            sampling: SourceSampling::default(),
        };
        let mut source = Self::new(config, &BuildContext { base_dir: PathBuf::from("."), ..ctx.clone() })?;
        source.setting_names = settings.map(str::to_owned);
        Ok(source)
    }

    fn error(&self, message: String) -> Error {
        Error::Component { point: "source", name: self.config.name.clone(), message }
    }

    /// The memory plan of answering `prompts` (their longest, at most `batch_size` at once, each
    /// up to `new_tokens`), logged; on a GPU whose memory is known, a plan past it is refused
    /// before the model is loaded, naming the settings that would make it fit (on the CPU, a
    /// warning).
    fn memory_plan(&self, prompts: &[Vec<u32>], new_tokens: usize) -> Result<()> {
        use fuserl_backends::memory;
        let backend = fuserl_core::backend::BackendConfig {
            device: self.device,
            device_index: self.device_index,
            dtype: self.dtype,
            attention: self.attention,
            ..Default::default()
        };
        let host = memory::is_host(self.device);
        let runtime = if host { memory::resident().unwrap_or(0) } else { crate::memory::GPU_RUNTIME };
        let batch = (self.config.batch_size as usize).min(prompts.len()).max(1);
        let prompt = prompts.iter().map(Vec::len).max().unwrap_or(1);
        let [batch_name, new_name, prompt_name] = &self.setting_names;
        let settings =
            crate::memory::GenerationSettings { batch: batch_name, new_tokens: new_name, prompt: prompt_name };
        let planned = crate::memory::plan_generation(
            format!("source {}", self.config.name),
            &self.checkpoint,
            &backend,
            (batch, prompt, new_tokens),
            prompts.len() > batch,
            runtime,
            &settings,
        )
        .map_err(|e| self.error(e.to_string()))?;
        let device = format!("{:?}", self.device).to_lowercase();
        tracing::info!(source = %self.config.name, device = %device, "memory plan: {}", planned.plan.summary());
        let capacity = memory::device_capacity(self.device, self.device_index);
        if let Some(c) = capacity.filter(|&c| planned.plan.peak() > c) {
            let what = format!(
                "generating {batch} answers at once of up to {new_tokens} new tokens after prompts of up to {prompt} tokens is planned to need {} on {device} {}, which has {} ({}); to fit, try {}",
                gb(planned.plan.peak()),
                self.device_index,
                gb(c),
                planned.plan.summary(),
                planned.levers.join("; or ")
            );
            if host {
                tracing::warn!(source = %self.config.name, "{what} (on the CPU it goes on: the system may swap)");
            } else {
                return Err(self.error(what));
            }
        }
        Ok(())
    }

    fn generate_config(&self, sampling: &SamplingParams) -> GenerateConfig {
        let s = self.config.sampling.over(sampling);
        GenerateConfig {
            max_new_tokens: s.max_new_tokens.map_or(DEFAULT_MAX_TOKENS as usize, |m| m as usize),
            temperature: s.temperature.unwrap_or(1.0),
            top_p: s.top_p.unwrap_or(1.0),
            top_k: s.top_k.unwrap_or(0) as usize,
            seed: 0,
            stop: self.config.sampling.stop.clone(),
        }
    }
}

/// The bytes of a checkpoint's weight files, hashed (FNV-1a): a changed model is another source.
pub(crate) fn weights_hash(checkpoint: &Path) -> std::io::Result<u64> {
    let mut h = fuserl_core::maths::Fnv1a::new();
    let safetensors = |dir: &Path| -> std::io::Result<Vec<PathBuf>> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            // The weights: safetensors, or a folder's GGUF file (`convert gguf --keep-quantized`;
            // not GGUF exports beside safetensors).
            .filter(|p| {
                p.extension().is_some_and(|x| x == "safetensors")
                    || p.file_name().is_some_and(|n| n == fuserl_model::checkpoint::GGUF_FILE)
            })
            .collect();
        files.sort();
        Ok(files)
    };
    // An adapter folder's weights are its base's and its own: the base (a run's target, not
    // written by fuserl) is named by its folder and its files' sizes and times, the adapter read.
    let base = fuserl_model::lora::base_of(checkpoint);
    if base != checkpoint {
        h.update(base.display().to_string().as_bytes());
        for f in safetensors(&base)? {
            let meta = std::fs::metadata(&f)?;
            let modified = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
            h.update(&meta.len().to_le_bytes());
            h.update(&modified.map_or(0, |d| d.as_nanos()).to_le_bytes());
        }
    }
    let files = safetensors(checkpoint)?;
    // In chunks (the same hash as the whole file's: FNV-1a goes byte by byte): reading a file
    // whole would allocate its size, 2 GB for a 0.5B model in f32.
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        let mut file = std::fs::File::open(&f)?;
        loop {
            match std::io::Read::read(&mut file, &mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    h.update(&buf[..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(h.finish())
}

impl SourceAdapter for LocalSource {
    fn name(&self) -> &str {
        "local"
    }

    fn generator(&self) -> Option<&dyn Generator> {
        Some(self)
    }
}

struct Job<'a> {
    source: &'a LocalSource,
    jobs: &'a [SampleJob<'a>],
    cfg: GenerateConfig,
    sink: &'a GeneratedSink<'a>,
}

impl OnBackend for Job<'_> {
    type Output = Result<GenerateStats>;

    fn run<B: LogProbBackend>(self, device: B::Device) -> Result<GenerateStats> {
        let s = self.source;
        let model_error = |e: fuserl_model::ModelError| s.error(e.to_string());
        let tok = ChatTokenizer::load(&s.checkpoint, s.template.as_deref()).map_err(model_error)?;
        let dtype = fuserl_backends::burn_dtype(s.dtype);
        let max_prompt = s.config.max_prompt_length as usize;
        let mut prompts = Vec::with_capacity(self.jobs.len());
        let mut cut = 0;
        for j in self.jobs {
            let (ids, was_cut) = tok.prompt_ids(&j.prompt.messages, max_prompt).map_err(model_error)?;
            cut += usize::from(was_cut);
            prompts.push(ids);
        }
        s.memory_plan(&prompts, self.cfg.max_new_tokens)?;
        // Frozen: a checkpoint stored in bf16 stays bf16 on the CPU (half the memory).
        let model = load_frozen::<B>(&s.checkpoint, &device, dtype).map_err(model_error)?;
        // What loading read and converted is given back (glibc would keep it resident).
        fuserl_backends::release_freed_memory();
        tok.check_fits(model.config.vocab_size).map_err(model_error)?;
        if cut > 0 {
            tracing::warn!(
                source = %s.config.name,
                "{cut} of {} prompts are longer than max_prompt_length = {max_prompt} tokens: their first tokens were cut \
                 (raise [target] max_length or max_prompt_length)",
                prompts.len()
            );
        }
        let seeds: Vec<u64> = self.jobs.iter().map(|j| j.seed).collect();
        // Continuous batching: each answer goes to the sink (the store) as soon as it is done,
        // and its place in the batch to the next prompt.
        let mut failed = None;
        let mut on_done = |i: usize, reply: fuserl_model::generate::Generation| {
            let j = &self.jobs[i];
            let sent = (self.sink)(Generated {
                prompt_id: j.prompt.id.clone(),
                sample_index: j.sample_index,
                seed: j.seed,
                text: reply.text,
                finish_reason: Some(if reply.finish_reason == "eos" { "stop" } else { reply.finish_reason }.to_owned()),
                model: Some(s.config.checkpoint.clone()),
                prompt_tokens: Some(prompts[i].len() as u64),
                completion_tokens: Some(reply.ids.len() as u64),
                latency_s: reply.seconds,
            });
            sent.map_err(|e| failed = Some(e)).is_ok()
        };
        let batch = s.config.batch_size as usize;
        let prefills =
            generate_each(&model, &tok, &prompts, &self.cfg, &seeds, batch, &mut on_done).map_err(model_error)?;
        if let Some(e) = failed {
            return Err(e);
        }
        // A request: one prefill, of the prompts admitted together into the places free then.
        let stats = GenerateStats { requests: prefills as u64, ..GenerateStats::default() };
        Ok(stats)
    }
}

impl Generator for LocalSource {
    fn source_name(&self) -> &str {
        &self.config.name
    }

    fn fingerprint(&self, sampling: &SamplingParams) -> String {
        let weights = self.weights.get_or_init(|| {
            weights_hash(&self.checkpoint).map_or_else(|e| format!("unreadable: {e}"), |h| format!("{h:016x}"))
        });
        let template = self.template.as_ref().and_then(|t| std::fs::read_to_string(t).ok());
        let cfg = self.generate_config(sampling);
        serde_json::json!({
            "kind": "local",
            "weights": weights,
            "chat_template": template,
            "dtype": self.dtype,
            "max_prompt_length": self.config.max_prompt_length,
            "max_tokens": cfg.max_new_tokens,
            "temperature": cfg.temperature,
            "top_p": cfg.top_p,
            "top_k": cfg.top_k,
            "stop": cfg.stop,
        })
        .to_string()
    }

    fn generate(
        &self,
        jobs: &[SampleJob<'_>],
        sampling: &SamplingParams,
        sink: &GeneratedSink<'_>,
    ) -> Result<GenerateStats> {
        let job = Job { source: self, jobs, cfg: self.generate_config(sampling), sink };
        fuserl_backends::on_backend_with(self.device, self.device_index, self.dtype, self.fusion, job)
            .map_err(|e| self.error(format!("device: {e}")))?
    }
}

fn build(t: &toml::Table, ctx: &BuildContext) -> Result<Built<dyn SourceAdapter>, ConfigError> {
    build_component(t, ctx, |c: LocalConfig, ctx| Ok(Box::new(LocalSource::new(c, ctx)?) as Box<dyn SourceAdapter>))
}

inventory::submit! { PluginDescriptor { name: "local", origin: env!("CARGO_PKG_NAME"),
summary: "answers sampled in-process from a Hugging Face checkpoint (batched KV-cache generation)",
factory: StaticFactory::Source(build) } }

#[cfg(test)]
mod tests {
    use super::weights_hash;

    /// Hashing in chunks gives the hash of the weight files' bytes one after the other (what
    /// earlier versions stored in collect-store fingerprints), across a chunk boundary.
    #[test]
    fn weights_hash_is_the_hash_of_the_files_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let a: Vec<u8> = (0..(1 << 20) + 4097).map(|i| (i * 7 % 251) as u8).collect();
        let b: Vec<u8> = (0..1000).map(|i| (i % 13) as u8).collect();
        std::fs::write(dir.path().join("model-00002-of-00002.safetensors"), &b).unwrap();
        std::fs::write(dir.path().join("model-00001-of-00002.safetensors"), &a).unwrap();
        std::fs::write(dir.path().join("config.json"), b"{}").unwrap();
        let whole = fuserl_core::maths::fnv1a(&[a, b].concat());
        assert_eq!(weights_hash(dir.path()).unwrap(), whole);
    }
}
