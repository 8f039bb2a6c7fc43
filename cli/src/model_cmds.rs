//! `fuserl convert`, `fuserl logprobs` and `fuserl generate`.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use fuserl_backends::{LogProbBackend, OnBackend};
use fuserl_core::backend::{DType, Device};
use fuserl_core::data::ChatMessage;
use fuserl_core::paths::Shown;
use fuserl_model::chat::ChatTokenizer;
use fuserl_model::checkpoint::load_frozen;
use fuserl_model::generate::{GenerateConfig, generate_streaming};
use fuserl_model::logprobs::response_logprobs;

/// Bad input (exit status 2) with a message.
pub fn bad_input(message: String) -> anyhow::Error {
    fuserl_core::Error::Config(fuserl_core::config::ConfigError::new(fuserl_core::config::KeyPath::root(), message))
        .into()
}

/// Map model errors: files and formats are the user's input.
pub fn model_error(e: fuserl_model::ModelError) -> anyhow::Error {
    match e {
        // A missing input is bad input (exit 2); other I/O failures are the machine's (exit 1).
        fuserl_model::ModelError::Io { ref source, .. } if source.kind() != std::io::ErrorKind::NotFound => e.into(),
        other => bad_input(other.to_string()),
    }
}

#[derive(Debug, Subcommand)]
pub enum ConvertCommand {
    /// Convert a llama.cpp GGUF file (llama, qwen2, qwen3, gemma3; F32, F16, BF16, Q4_0, Q4_1,
    /// Q5_0, Q5_1, Q8_0 and the K-quants Q2_K to Q8_K) into a Hugging Face checkpoint folder with
    /// config.json, safetensors, tokenizer and chat template.
    #[command(
        after_help = "Examples:\n  fuserl convert gguf SmolLM2-135M-Instruct.Q4_1.gguf models/SmolLM2-135M-Instruct\n  fuserl convert gguf qwen2.5-coder-0.5b-instruct-q4_k_m.gguf models/qwen-q4km --keep-quantized"
    )]
    Gguf {
        /// The GGUF file.
        input: PathBuf,
        /// The folder to write.
        output: PathBuf,
        /// Keep the weights quantised: the folder holds the GGUF file itself (model.gguf) beside
        /// config.json and the tokenizer. Every command loads it (dequantised); QLoRA trains on
        /// its blocks as they are (`[target.lora] quantize_base = "gguf"`).
        #[arg(long)]
        keep_quantized: bool,
    },
}

pub fn convert(cmd: &ConvertCommand) -> anyhow::Result<()> {
    match cmd {
        ConvertCommand::Gguf { input, output, keep_quantized } => {
            let config = fuserl_model::gguf::convert_with(input, output, *keep_quantized).map_err(model_error)?;
            eprintln!(
                "converted {} ({}, {} layers, vocab {}) -> {}",
                Shown(input),
                config.architecture,
                config.num_layers,
                config.vocab_size,
                Shown(output)
            );
            Ok(())
        }
    }
}

#[derive(Debug, Args)]
pub struct ExportGgufArgs {
    /// The Hugging Face checkpoint folder (config.json, safetensors, tokenizer.json).
    model: PathBuf,
    /// The GGUF file to write.
    output: PathBuf,
    /// What to write: f16 (llama.cpp's converter's default), bf16, f32, q8_0, or llama.cpp's
    /// quantisation mixes q4_k_m, q5_k_m, q6_k.
    #[arg(long = "type", default_value = "f16")]
    ty: String,
}

pub fn export_gguf(args: &ExportGgufArgs) -> anyhow::Result<()> {
    use fuserl_model::gguf_export::GgufType;
    let ty = GgufType::from_name(&args.ty)
        .ok_or_else(|| bad_input(format!("--type {}: expected one of {}", args.ty, GgufType::NAMES)))?;
    let done = fuserl_model::gguf_export::export(&args.model, &args.output, ty).map_err(model_error)?;
    let types: Vec<String> = done.types.iter().map(|(t, n)| format!("{n} {t}")).collect();
    eprintln!(
        "wrote {} ({ty}, {:.1} MiB; tensors: {})",
        Shown(&done.file),
        done.bytes as f64 / (1u64 << 20) as f64,
        types.join(", ")
    );
    Ok(())
}

/// The device `--device` names.
pub fn parse_device(device: &str) -> anyhow::Result<Device> {
    serde_json::from_value(serde_json::Value::String(device.to_owned())).map_err(|_| {
        bad_input(format!("--device {device}: expected one of cpu, wgpu, vulkan, metal, webgpu, cuda, rocm"))
    })
}

/// How a GPU device runs a command: the `[backend]` settings `fusion` and `attention` as
/// options (on the CPU they change nothing).
#[derive(Debug, Clone, Args)]
pub struct GpuArgs {
    /// On a GPU device, Burn's fusion backend (the default in a build with the `fusion` feature)
    /// or, with `false`, the plain cubecl backend (`[backend] fusion`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub fusion: bool,
    /// On a GPU device, attention by fuserl's kernel or in tiles of Burn operations
    /// (`[backend] attention`).
    #[arg(long, value_enum, default_value_t = Attention::Kernel)]
    pub attention: Attention,
}

/// `--attention`'s values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Attention {
    /// fuserl's cubecl attention kernel (FlashAttention's online softmax).
    Kernel,
    /// Tiles of Burn operations (whose matmuls use tensor cores).
    Tiles,
}

impl GpuArgs {
    /// Sets the process's attention path (fuserl_backends::set_attention), as a recipe does.
    pub fn apply(&self) {
        fuserl_backends::set_attention(match self.attention {
            Attention::Kernel => fuserl_core::backend::AttentionPath::Kernel,
            Attention::Tiles => fuserl_core::backend::AttentionPath::Tiles,
        });
    }

    /// The attention path a run on `device` took (the CPU always runs the tiles).
    pub fn attention_on(&self, device: &str) -> &'static str {
        if device == "cpu" || self.attention == Attention::Tiles { "tiles" } else { "kernel" }
    }

    /// Whether a run on `device` ran Burn's fusion backend (a GPU device of a build that has it;
    /// ROCm runs fused whatever `--fusion` says).
    pub fn fusion_on(&self, device: &str) -> bool {
        cfg!(feature = "fusion") && device != "cpu" && (self.fusion || device == "rocm")
    }
}

/// Runs `code` on the device `--device` names (f32) as `gpu` says, or says why it cannot.
fn on_device<O: OnBackend<Output = anyhow::Result<T>>, T>(device: &str, gpu: &GpuArgs, code: O) -> anyhow::Result<T> {
    gpu.apply();
    fuserl_backends::on_backend_with(parse_device(device)?, 0, DType::F32, gpu.fusion, code)
        .map_err(|e| bad_input(format!("--device {device}: {e}")))?
}

#[derive(Debug, Args)]
pub struct LogprobsArgs {
    /// Hugging Face checkpoint folder, or a PEFT adapter folder (on top of its base).
    #[arg(long)]
    model: PathBuf,
    /// JSONL: {"prompt": [chat messages] or "a user message", "response": "..."} per line.
    #[arg(long)]
    data: PathBuf,
    /// JSONL output: each input line with `logp_sum`, `n_tokens` and `token_logps` added.
    #[arg(long)]
    out: PathBuf,
    #[arg(help = crate::device_help(), long, default_value = "cpu")]
    device: String,
    #[command(flatten)]
    gpu: GpuArgs,
    /// Pairs per forward pass.
    #[arg(long, default_value_t = 8, allow_negative_numbers = true)]
    batch_size: usize,
    /// Chat template file (default: the checkpoint's).
    #[arg(long)]
    chat_template: Option<PathBuf>,
}

fn messages(v: &serde_json::Value, file: &Path, line: usize) -> anyhow::Result<Vec<ChatMessage>> {
    match v {
        serde_json::Value::String(s) => Ok(vec![ChatMessage::user(s.clone())]),
        serde_json::Value::Array(_) => serde_json::from_value(v.clone())
            .map_err(|e| bad_input(format!("{}:{line}: `prompt`: expected chat messages ({e})", Shown(file)))),
        _ => Err(bad_input(format!("{}:{line}: `prompt`: expected a string or a list of chat messages", Shown(file)))),
    }
}

/// The lines of a JSONL file of `{"prompt": [chat messages] or "a user message", "response":
/// "..."}`: each line's JSON (other keys are kept in the output), messages and response.
fn read_pairs(data: &Path) -> anyhow::Result<Vec<(serde_json::Value, Vec<ChatMessage>, String)>> {
    // Lines of at most fuserl_io::jsonl::MAX_LINE bytes, from a regular file.
    let mut out = Vec::new();
    for (n, line) in fuserl_io::jsonl::lines(data)? {
        let i = n as usize - 1;
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .map_err(|e| bad_input(format!("{}:{}: invalid JSON: {e}", Shown(data), i + 1)))?;
        let msgs = messages(v.get("prompt").unwrap_or(&serde_json::Value::Null), data, i + 1)?;
        let response = v
            .get("response")
            .and_then(|r| r.as_str())
            .ok_or_else(|| bad_input(format!("{}:{}: `response`: expected a string", Shown(data), i + 1)))?
            .to_owned();
        out.push((v, msgs, response));
    }
    if out.is_empty() {
        // Nothing to score is a mistake in the input, not a success with an empty output.
        return Err(bad_input(format!(
            "{}: no records in it: expected JSONL lines {{\"prompt\": ..., \"response\": \"...\"}}",
            Shown(data)
        )));
    }
    Ok(out)
}

#[derive(Debug, Args)]
pub struct RewardArgs {
    /// A `*ForSequenceClassification` checkpoint folder (a reward model).
    #[arg(long)]
    model: PathBuf,
    /// JSONL: {"prompt": [chat messages] or "a user message", "response": "..."} per line.
    #[arg(long)]
    data: PathBuf,
    /// JSONL output: each input line with `score` and `logits` (one per label) added.
    #[arg(long)]
    out: PathBuf,
    #[arg(help = crate::device_help(), long, default_value = "cpu")]
    device: String,
    #[command(flatten)]
    gpu: GpuArgs,
    /// Conversations per forward pass.
    #[arg(long, default_value_t = 8, allow_negative_numbers = true)]
    batch_size: usize,
    /// Which label is `score` (name or index; default: the first).
    #[arg(long)]
    label: Option<String>,
    /// Chat template file (default: the checkpoint's).
    #[arg(long)]
    chat_template: Option<PathBuf>,
}

/// `fuserl reward`: score (prompt, response) pairs with a reward model.
pub fn reward(args: &RewardArgs) -> anyhow::Result<()> {
    if args.batch_size == 0 {
        return Err(bad_input("--batch-size must be at least 1".into()));
    }
    if fuserl_model::lora::is_adapter_dir(&args.model) {
        return Err(bad_input(format!(
            "{}: a PEFT adapter folder; a reward model is loaded whole (merge the adapter into its base first)",
            Shown(&args.model)
        )));
    }
    let file = fuserl_model::checkpoint::config_file(&args.model).map_err(model_error)?;
    let json = fuserl_model::config::read_json(&file).map_err(model_error)?;
    let (_, head) = fuserl_model::classifier::classifier_config(&json, &file).map_err(model_error)?;
    let label = match &args.label {
        None => 0,
        Some(l) => head
            .labels
            .iter()
            .position(|x| x == l)
            .or_else(|| l.parse::<usize>().ok().filter(|&i| i < head.labels.len()))
            .ok_or_else(|| {
                bad_input(format!("--label {l}: the reward model's labels are {}", head.labels.join(", ")))
            })?,
    };
    let device = parse_device(&args.device)?;
    fuserl_backends::check(device, DType::F32).map_err(|e| bad_input(format!("--device {}: {e}", args.device)))?;
    let records = read_pairs(&args.data)?;
    let conversations: Vec<Vec<ChatMessage>> = records
        .iter()
        .map(|(_, msgs, response)| {
            let mut c = msgs.clone();
            c.push(ChatMessage { role: "assistant".into(), content: response.clone() });
            c
        })
        .collect();
    args.gpu.apply();
    let placement =
        fuserl_run::classifier::Placement { device, device_index: 0, dtype: DType::F32, fusion: args.gpu.fusion };
    let mut logits: Vec<Option<Vec<f32>>> = vec![None; records.len()];
    let total = records.len();
    let mut done = 0;
    fuserl_run::classifier::classify(
        &args.model,
        args.chat_template.as_deref(),
        &placement,
        &conversations,
        args.batch_size,
        &mut |indices, batch| {
            for (&i, l) in indices.iter().zip(batch) {
                logits[i] = Some(l);
            }
            done += indices.len();
            tracing::info!(done, total, "scored");
            Ok(())
        },
    )?;
    let mut out = String::new();
    for ((v, _, _), l) in records.into_iter().zip(logits) {
        let l = l.expect("every conversation is scored");
        let mut v = v;
        if let Some(obj) = v.as_object_mut() {
            obj.insert("score".into(), f64::from(l[label]).into());
            obj.insert("logits".into(), l.into());
        }
        out.push_str(&v.to_string());
        out.push('\n');
    }
    crate::write_atomically(&args.out, out.as_bytes())?;
    eprintln!("{total} responses scored by {} -> {}", Shown(&args.model), Shown(&args.out));
    Ok(())
}

pub fn logprobs(args: &LogprobsArgs) -> anyhow::Result<()> {
    if args.batch_size == 0 {
        return Err(bad_input("--batch-size must be at least 1".into()));
    }
    // The model's configuration first, so that a wrong folder is reported as such.
    let config = fuserl_model::checkpoint::config_file(&args.model).map_err(model_error)?;
    let tok = ChatTokenizer::load(&args.model, args.chat_template.as_deref()).map_err(model_error)?;
    let positions = fuserl_model::config::LlamaConfig::from_file(&config).map_err(model_error)?.max_position_embeddings;
    let mut records = Vec::new();
    for (v, msgs, response) in read_pairs(&args.data)? {
        // A response longer than the model's positions is refused when scored; cut first, what
        // is tokenized stays bounded (a 60 MB answer took 11 GB in the tokenizer).
        // The same for a prompt (a template can render megabytes): more than the positions
        // is as refused as much more.
        let prompt = tok.prompt_ids(&msgs, positions + 1).map_err(model_error)?.0;
        let ids = (prompt, tok.response_ids_within(&response, positions + 1).map_err(model_error)?.0);
        records.push((v, ids));
    }
    let total = records.len();
    let out = on_device(&args.device, &args.gpu, Score { args, tok: &tok, records: &records })?;
    crate::write_atomically(&args.out, out.as_bytes())?;
    eprintln!("{} scored -> {}", fuserl_core::text::counted(total as u64, "pair"), Shown(&args.out));
    Ok(())
}

/// Pairs of token ids with their input lines.
type Records = [(serde_json::Value, (Vec<u32>, Vec<u32>))];

struct Score<'a> {
    args: &'a LogprobsArgs,
    tok: &'a ChatTokenizer,
    records: &'a Records,
}

impl OnBackend for Score<'_> {
    type Output = anyhow::Result<String>;

    fn run<B: LogProbBackend>(self, device: B::Device) -> anyhow::Result<String> {
        let args = self.args;
        // Forward only: a checkpoint stored in bf16 keeps its weights in bf16 on the CPU (half the
        // memory, the same products: `load_frozen`).
        let model = load_frozen::<B>(&args.model, &device, burn::tensor::DType::F32).map_err(model_error)?;
        // What loading read and converted is given back (glibc would keep it resident).
        fuserl_backends::release_freed_memory();
        self.tok.check_fits(model.config.vocab_size).map_err(model_error)?;
        let mut out = String::new();
        let total = self.records.len();
        for (n, chunk) in self.records.chunks(args.batch_size).enumerate() {
            let pairs: Vec<(Vec<u32>, Vec<u32>)> = chunk.iter().map(|(_, ids)| ids.clone()).collect();
            let scored = response_logprobs(&model, &pairs).map_err(model_error)?;
            for ((v, _), s) in chunk.iter().zip(scored) {
                let mut v = v.clone();
                if let Some(obj) = v.as_object_mut() {
                    obj.insert("logp_sum".into(), s.sum.into());
                    obj.insert("n_tokens".into(), s.n_tokens.into());
                    obj.insert("token_logps".into(), s.token_logps.into());
                }
                out.push_str(&v.to_string());
                out.push('\n');
            }
            tracing::info!(done = ((n + 1) * args.batch_size).min(total), total, "scored");
        }
        Ok(out)
    }
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Hugging Face checkpoint folder, or a PEFT adapter folder (on top of its base).
    #[arg(long)]
    model: PathBuf,
    /// One user message (put through the chat template).
    #[arg(long)]
    prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256, allow_negative_numbers = true)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f64,
    /// Nucleus sampling mass.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f64,
    /// Keep only the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    top_k: usize,
    /// Sampler seed.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    seed: u64,
    /// Stop at this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    #[arg(help = crate::device_help(), long, default_value = "cpu")]
    device: String,
    #[command(flatten)]
    gpu: GpuArgs,
}

pub fn generate_cmd(args: &GenerateArgs) -> anyhow::Result<()> {
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        return Err(bad_input(format!("--temperature {}: expected a number >= 0", args.temperature)));
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        return Err(bad_input(format!("--top-p {}: expected a number in (0, 1]", args.top_p)));
    }
    let started = std::time::Instant::now();
    let (reply, loaded) = on_device(&args.device, &args.gpu, Generate(args))?;
    writeln!(std::io::stdout().lock())?;
    let seconds = (started.elapsed() - loaded).as_secs_f64();
    if !crate::quiet() {
        eprintln!(
            "{} in {seconds:.1} s ({:.1} tokens/s; the model loaded in {:.1} s); stopped by {}",
            fuserl_core::text::counted(reply.ids.len() as u64, "token"),
            reply.ids.len() as f64 / seconds.max(1e-9),
            loaded.as_secs_f64(),
            match reply.finish_reason {
                "eos" => "the end-of-sequence token",
                "stop" => "a stop string",
                _ => "--max-new-tokens",
            }
        );
    }
    Ok(())
}

struct Generate<'a>(&'a GenerateArgs);

impl OnBackend for Generate<'_> {
    /// The reply (printed as it was made) and how long loading took.
    type Output = anyhow::Result<(fuserl_model::generate::Generation, std::time::Duration)>;

    fn run<B: LogProbBackend>(self, device: B::Device) -> Self::Output {
        let args = self.0;
        let t0 = std::time::Instant::now();
        let model = load_frozen::<B>(&args.model, &device, burn::tensor::DType::F32).map_err(model_error)?;
        // What loading read and converted is given back (glibc would keep it resident).
        fuserl_backends::release_freed_memory();
        let tok = ChatTokenizer::load(&args.model, None).map_err(model_error)?;
        tok.check_fits(model.config.vocab_size).map_err(model_error)?;
        // Past the model's positions the prompt is refused (found without tokenizing all of a
        // longer one).
        let positions = model.config.max_position_embeddings;
        let (prompt, cut) =
            tok.prompt_ids(&[ChatMessage::user(args.prompt.clone())], positions).map_err(model_error)?;
        if cut {
            return Err(bad_input(format!(
                "the prompt is longer than the model's {positions} positions (max_position_embeddings); shorten it"
            )));
        }
        let cfg = GenerateConfig {
            max_new_tokens: args.max_new_tokens,
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
            stop: args.stop.clone(),
        };
        let loaded = t0.elapsed();
        // The reply on stdout as it is made.
        let mut stdout = std::io::stdout();
        let mut pieces = 0u32;
        let mut print = |piece: &str| {
            let _ = stdout.write_all(piece.as_bytes());
            let _ = stdout.flush();
            pieces += 1;
            // The streaming test stops here, with the first piece printed and the rest to come.
            if pieces == 1 {
                fuserl_core::debug_pause("generate-first-piece");
            }
        };
        let reply = generate_streaming(&model, &tok, prompt, &cfg, &mut print).map_err(model_error)?;
        Ok((reply, loaded))
    }
}
