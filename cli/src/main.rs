//! `fuserl`: the command line of fuserl. A thin `main`: parse arguments, install logging, run
//! one command, map its error to an exit status (0 success, 2 bad input, 1 anything else).
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

mod bench_cmds;
mod model_cmds;
use fuserl_core::data::StageName;
use fuserl_core::paths::Shown;
use fuserl_core::registry::Registry;
use fuserl_io::run_dir::RunDir;
use fuserl_recipe::load_recipe_with;
use fuserl_run::pipeline::{prepare_with, read_file_sources};

const EXAMPLES: &str = "\
Examples:
  fuserl recipe check recipes/*.toml      validate recipes and build every component
  fuserl recipe show recipes/fuserl-dpo.toml
                                          print the recipe with every default filled in
  fuserl plugins list                     list source adapters, reward models, weighting
                                          schemes and objectives
  fuserl --plugin ./libmy_plugin.so plugins list
                                          include a plugin library's components
  fuserl examples recipes/fuserl-dpo.toml --stage po --out pairs.jsonl
                                          build the FusePO training examples of a recipe";

/// Heterogeneous LLM fusion by FuseRL: weighted SFT over many source models' answers, then
/// weighted multi-source preference optimisation.
#[derive(Debug, Parser)]
#[command(name = "fuserl", version, after_help = EXAMPLES, propagate_version = true)]
struct Cli {
    /// More log output: -v fuserl's info lines (what was read, prepared, loaded), -vv its debug
    /// lines, -vvv everything (the libraries' too). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count, help_heading = "Global options")]
    verbose: u8,
    /// Only errors: no progress, no summaries.
    #[arg(short, long, global = true, conflicts_with = "verbose", help_heading = "Global options")]
    quiet: bool,
    /// Load a plugin library: a path, or a name in $FUSERL_PLUGIN_PATH (repeatable)
    #[arg(long = "plugin", global = true, value_name = "PATH", help_heading = "Global options")]
    plugins: Vec<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a recipe: collect, score, FuseSFT, FusePO, export, evaluate. Running it again resumes.
    #[command(after_help = "Example:\n  fuserl run recipes/quickstart.toml")]
    Run(TrainArgs),
    /// Run only the FuseSFT stage of a recipe (resumes).
    Sft(TrainArgs),
    /// Run only the FusePO stage of a recipe (after FuseSFT; resumes).
    Po(TrainArgs),
    /// Validate and inspect recipes.
    #[command(subcommand)]
    Recipe(RecipeCommand),
    /// The memory plan of a recipe's training stages: the estimated peak of each stage on its
    /// device, broken down (weights, gradients, AdamW moments, activations, log-probs), and
    /// whether it fits; and of what generates in-process (`local` sources, evaluation's models:
    /// weights, KV cache, prefill).
    #[command(
        after_help = "Examples:\n  fuserl plan recipes/smollm2-fuserl-dpo.toml\n  fuserl plan recipes/smollm2-fuserl-dpo.toml --memory-gb 24"
    )]
    Plan(PlanArgs),
    /// Inspect plugins.
    #[command(subcommand)]
    Plugins(PluginsCommand),
    /// Run a recipe's data stages (collect, score, weigh) and write one stage's training
    /// examples as JSONL, each with the source answers it came from.
    #[command(after_help = "Example:\n  fuserl examples recipes/fuserl-dpo.toml --stage po --out pairs.jsonl")]
    Examples(ExamplesArgs),
    /// Run the collect stage alone: every generative source (`openai`, ...) answers the
    /// recipe's prompts into runs/NAME/collect/. Running it again asks only what is missing.
    #[command(
        after_help = "Example:\n  fuserl collect recipes/collect-llamacpp.toml\n  fuserl collect recipes/collect-llamacpp.toml --redo smollm2"
    )]
    Collect(CollectArgs),
    /// Run the collect and scoring stages: the recipe's reward scores every answer into
    /// runs/NAME/score/. Running it again scores only what is missing.
    #[command(after_help = "Example:\n  fuserl score recipes/collect-llamacpp.toml")]
    Score(TrainArgs),
    /// Evaluate: the fused model and the [eval] baselines answer the held-out prompts, the reward
    /// scores them; measures with 95% intervals in runs/NAME/eval/eval.json. Resumes.
    #[command(after_help = "Example:\n  fuserl eval recipes/collect-local.toml")]
    Eval(TrainArgs),
    /// Rebuild a run's report (RUN_DIR/report/index.html and report.md) from what the run
    /// directory holds; the run itself rebuilds it after every stage. It only reads the run's
    /// files and writes report/ atomically, so it also works on a run in progress.
    #[command(after_help = "Example:\n  fuserl report runs/quickstart")]
    Report {
        /// The run directory (runs/NAME, or the recipe's [run] output_dir).
        run_dir: PathBuf,
    },
    /// Convert checkpoints into Hugging Face folders.
    #[command(subcommand)]
    Convert(model_cmds::ConvertCommand),
    /// Write a Hugging Face checkpoint folder as a llama.cpp GGUF file (for llama.cpp, Ollama,
    /// LM Studio), in f16, bf16, f32, q8_0 or llama.cpp's q4_k_m / q5_k_m / q6_k mixes.
    #[command(
        name = "export-gguf",
        after_help = "Example:\n  fuserl export-gguf runs/quickstart/export runs/quickstart/model-Q4_K_M.gguf --type q4_k_m"
    )]
    ExportGguf(model_cmds::ExportGgufArgs),
    /// Per-token log-probs of (prompt, response) pairs (also how FusePO's reference log-probs
    /// are computed).
    #[command(
        after_help = "Example:\n  fuserl logprobs --model models/SmolLM2-135M-Instruct --data pairs.jsonl --out scored.jsonl"
    )]
    Logprobs(model_cmds::LogprobsArgs),
    /// Score (prompt, response) pairs with a reward model (a `*ForSequenceClassification`
    /// checkpoint).
    #[command(
        after_help = "Example:\n  fuserl reward --model fixtures/rewards/llama-rm --data pairs.jsonl --out scored.jsonl"
    )]
    Reward(model_cmds::RewardArgs),
    /// Measure a training step or generation on a device (JSON on standard output).
    #[command(subcommand)]
    Bench(bench_cmds::BenchCommand),
    /// Reply to one user message (through the chat template) and print the reply.
    #[command(
        after_help = "Example:\n  fuserl generate --model models/SmolLM2-135M-Instruct --prompt \"What is the capital of France?\""
    )]
    Generate(model_cmds::GenerateArgs),
}

#[derive(Debug, Subcommand)]
enum RecipeCommand {
    /// Parse each recipe and build every component it names, without running anything.
    #[command(after_help = "Example:\n  fuserl recipe check recipes/*.toml")]
    Check {
        /// Recipe files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print the resolved recipe: every default filled in. The output is itself a valid recipe
    /// whose paths are as written: inputs relative to the recipe file's folder (save it beside
    /// the original), outputs (output_dir, [export] path) to the working folder.
    #[command(after_help = "Example:\n  fuserl recipe show recipes/fuserl-dpo.toml > recipes/fuserl-dpo.resolved.toml")]
    Show {
        /// Recipe file.
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum PluginsCommand {
    /// One line per plugin: extension point, name, origin, summary.
    List,
}

#[derive(Debug, Args)]
struct ExamplesArgs {
    /// Recipe file.
    recipe: PathBuf,
    /// Which stage's objective builds the examples.
    #[arg(long, value_enum, default_value_t = StageArg::Po)]
    stage: StageArg,
    /// Write here instead of standard output (atomically: a temporary file, then a rename).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct PlanArgs {
    /// Recipe file.
    recipe: PathBuf,
    /// The device's memory in GB (10^9 bytes), for a device other than this machine's or one
    /// whose memory fuserl cannot read (wgpu, ROCm).
    #[arg(long, value_name = "GB")]
    memory_gb: Option<f64>,
    /// Print the plans as JSON (one object: device, capacity, and per stage its peak, phases and
    /// parts in bytes).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct TrainArgs {
    /// Recipe file.
    recipe: PathBuf,
}

#[derive(Debug, Args)]
struct CollectArgs {
    /// Recipe file.
    recipe: PathBuf,
    /// Start this source afresh (its old answers are kept beside the new file); repeatable.
    #[arg(long, value_name = "SOURCE")]
    redo: Vec<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum StageArg {
    Sft,
    Po,
}

/// The system allocator, counting what a chat template's rendering allocates (a template that
/// builds strings without bound stops the process with an error naming it: fuserl_io::budget).
#[global_allocator]
static ALLOC: fuserl_io::budget::BudgetAlloc = fuserl_io::budget::BudgetAlloc;

fn main() -> ExitCode {
    // Before any other thread starts (see its docs: page faults on every re-allocation).
    fuserl_backends::keep_freed_memory();
    let cli = Cli::parse();
    QUIET.store(cli.quiet, std::sync::atomic::Ordering::Relaxed);
    if cli.quiet {
        BARS.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    init_logging(cli.verbose, cli.quiet);
    // A panic inside a third-party parser is caught at its call and comes back as an error that
    // names the file (fuserl_io::untrusted): print that error, not the panic as well.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if closed_output(info) {
            // Nobody reads any more: end as a command-line tool ends on SIGPIPE (128 + 13), the
            // run folder given back; what was collected, scored or checkpointed is kept.
            fuserl_io::run_dir::release_held_locks();
            std::process::exit(141);
        }
        if !fuserl_io::untrusted::catching_panic() {
            default_hook(info);
        }
    }));
    on_ctrl_c(&cli.command);
    match run(cli.command, &cli.plugins) {
        Ok(code) => code,
        Err(err) => {
            let code = match err.downcast_ref::<fuserl_core::Error>() {
                Some(e) if e.is_bad_input() => 2,
                _ => 1,
            };
            print_error(err.chain());
            ExitCode::from(code)
        }
    }
}

/// Ctrl-C says what became of the work, once, then exits with 130 (the shell's code for SIGINT).
/// Nothing needs flushing: stores are append-only and every artifact is written to a temporary
/// file and renamed, so a run stopped anywhere resumes from what it had kept.
/// `--device`'s help: the devices this build has (the others need a build with their feature).
pub(crate) fn device_help() -> String {
    let compiled = fuserl_backends::compiled_devices();
    let names: Vec<&str> = compiled.iter().copied().map(fuserl_backends::device_name).collect();
    let others: Vec<&str> = fuserl_backends::ALL_DEVICES
        .into_iter()
        .filter(|d| !compiled.contains(d))
        .map(fuserl_backends::device_name)
        .collect();
    if others.is_empty() {
        format!("Device: {}", names.join(", "))
    } else {
        format!("Device: {} ({} need a build with their cargo feature)", names.join(", "), others.join(", "))
    }
}

/// Whether a panic is Rust's on a write to a closed standard output or error (a pipe whose
/// reader has gone: `fuserl run | head -1`). Rust ignores SIGPIPE, so the write fails and
/// `println!` panics; restoring SIGPIPE's default would also kill the process on a write to a
/// subprocess that has ended (the python-tests reward writes its job to python's stdin).
fn closed_output(info: &std::panic::PanicHookInfo<'_>) -> bool {
    let payload = info.payload();
    let message =
        payload.downcast_ref::<String>().map(String::as_str).or_else(|| payload.downcast_ref::<&str>().copied());
    message.is_some_and(|m| m.starts_with("failed printing to std") && m.contains("Broken pipe"))
}

fn on_ctrl_c(command: &Command) {
    let message = match command {
        Command::Run(_)
        | Command::Sft(_)
        | Command::Po(_)
        | Command::Collect(_)
        | Command::Score(_)
        | Command::Eval(_) => {
            "interrupted: what was already collected, scored or checkpointed is kept; the same command resumes from there"
        }
        _ => "interrupted",
    };
    let set = ctrlc::set_handler(move || {
        // A clean stop: the run folder's lock is given back as on a normal exit.
        fuserl_io::run_dir::release_held_locks();
        eprintln!("\n{message}");
        std::process::exit(130);
    });
    if let Err(e) = set {
        tracing::debug!(error = %e, "no Ctrl-C handler");
    }
}

/// Each distinct message of an error chain once (issue 18): a cause whose text an earlier
/// message already contains (a wrapper that prints its source in its own message) is not repeated.
fn error_lines<'a>(chain: impl Iterator<Item = &'a (dyn std::error::Error + 'static)>) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for e in chain {
        // An I/O cause reads as its reason, which the message above it already gives.
        let message = match e.downcast_ref::<std::io::Error>() {
            Some(io) => fuserl_core::paths::io_reason(io),
            None => e.to_string(),
        };
        if !lines.iter().any(|seen| seen.contains(&message)) {
            lines.push(message);
        }
    }
    lines
}

/// `error: ...` and one `caused by: ...` line per further distinct cause.
fn print_error<'a>(chain: impl Iterator<Item = &'a (dyn std::error::Error + 'static)>) {
    for (i, line) in error_lines(chain).iter().enumerate() {
        // Names from files (a GGUF architecture, a source's name) can hold escape sequences:
        // shown escaped, never interpreted by the terminal.
        let line = fuserl_core::text::printable_lines(line);
        if i == 0 {
            eprintln!("error: {line}");
        } else {
            eprintln!("  caused by: {line}");
        }
    }
}

/// The chain of `e` and its sources.
/// Print a stage's error once and give the exit status: 2 for bad input, 1 for anything else.
fn stage_failed(e: &fuserl_run::TrainError) -> ExitCode {
    print_error(chain_of(e));
    ExitCode::from(if e.is_bad_input() { 2 } else { 1 })
}

fn chain_of<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |e| e.source())
}

/// fuserl's own crates, whose lines `-v` and `-vv` show (the libraries under them stay at warn).
const OWN_CRATES: [&str; 12] = [
    "fuserl",
    "fuserl_core",
    "fuserl_io",
    "fuserl_recipe",
    "fuserl_builtin",
    "fuserl_abi",
    "fuserl_run",
    "fuserl_train",
    "fuserl_model",
    "fuserl_backends",
    "fuserl_kernels",
    "fuserl_report",
];

/// `-q`: no progress and no summaries, only errors.
static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn quiet() -> bool {
    QUIET.load(std::sync::atomic::Ordering::Relaxed)
}

/// Every progress bar of the process: lines printed while bars are drawn (stage lines, summaries,
/// log lines) go above the bars through it, instead of into them.
static BARS: std::sync::LazyLock<indicatif::MultiProgress> = std::sync::LazyLock::new(indicatif::MultiProgress::new);

/// A summary line on standard output, unless `-q`.
macro_rules! say {
    ($($t:tt)*) => { if !quiet() { let line = format!($($t)*); BARS.suspend(|| println!("{line}")); } };
}

/// A stage line on standard error, unless `-q`.
macro_rules! note {
    ($($t:tt)*) => { if !quiet() { let line = format!($($t)*); BARS.suspend(|| eprintln!("{line}")); } };
}

/// Progress bars draw only on a terminal, and not with `-q`. A finished bar is cleared and its
/// stage's summary line printed in its place, so that a terminal shows what a pipe gets.
fn bar(len: u64) -> indicatif::ProgressBar {
    if quiet() { indicatif::ProgressBar::hidden() } else { BARS.add(indicatif::ProgressBar::new(len)) }
}

/// Log lines written above the progress bars.
struct AboveBars;

impl Write for AboveBars {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        BARS.suspend(|| std::io::stderr().write_all(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

fn init_logging(verbose: u8, quiet: bool) {
    let own = |libraries: &str, level: &str| {
        std::iter::once(libraries.to_owned())
            .chain(OWN_CRATES.iter().map(|c| format!("{c}={level}")))
            .collect::<Vec<_>>()
            .join(",")
    };
    // By default the stage lines and summaries the binary prints, and fuserl's warnings (the
    // libraries' only when they are errors): no log lines.
    let default = match (quiet, verbose) {
        (true, _) => "error".to_owned(),
        (false, 0) => own("error", "warn"),
        (false, 1) => own("warn", "info"),
        (false, 2) => own("warn", "debug"),
        (false, _) => "trace".to_owned(),
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Field values come from files too (a source's name, a path): their control characters
    // are escaped, as in error messages.
    use tracing_subscriber::field::MakeExt;
    let fields = tracing_subscriber::fmt::format::debug_fn(|w, field, value| {
        // The `log` bridge's own fields (target, module, file, line) are not shown, as the
        // default formatter does not show them.
        if field.name().starts_with("log.") {
            return Ok(());
        }
        let v = format!("{value:?}");
        let v = fuserl_core::text::printable(&v);
        if field.name() == "message" { write!(w, "{v}") } else { write!(w, "{}={v}", field.name()) }
    })
    .delimited(" ");
    let builder = tracing_subscriber::fmt()
        .fmt_fields(fields)
        .with_env_filter(filter)
        .with_writer(|| AboveBars)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false);
    // Times to the microsecond help only where lines are many.
    if verbose >= 2 { builder.init() } else { builder.without_time().init() }
}

/// The built-ins plus the plugins given with `--plugin` (paths relative to the working folder).
fn registry(plugins: &[String]) -> anyhow::Result<Registry> {
    let mut registry = fuserl_builtin::registry()?;
    let here = Path::new(".");
    for spec in plugins {
        let loaded = fuserl_abi::host::resolve_plugin(spec, here)
            .and_then(|path| fuserl_abi::host::load_library(&path, &mut registry));
        if let Err(message) = loaded {
            return Err(fuserl_core::Error::Config(fuserl_core::config::ConfigError::new(
                fuserl_core::config::KeyPath::root(),
                format!("--plugin {spec}: {message}"),
            ))
            .into());
        }
    }
    Ok(registry)
}

/// Load a recipe; when it has mistakes, every one of its settings' problems is printed (as
/// `recipe check` finds them) and the last returned, not just the first.
/// Loads a recipe (every problem printed when it has several) and applies its process-wide
/// settings (`[backend] attention`).
fn load(file: &Path, registry: &Registry) -> fuserl_core::Result<fuserl_recipe::LoadedRecipe> {
    let loaded = load_reporting(file, registry)?;
    fuserl_backends::set_attention(loaded.recipe.backend.attention);
    Ok(loaded)
}

fn load_reporting(file: &Path, registry: &Registry) -> fuserl_core::Result<fuserl_recipe::LoadedRecipe> {
    match load_recipe_with(file, &mut registry.clone(), &fuserl_abi::host::Loader) {
        Err(first) if first.is_bad_input() => {
            let mut problems =
                fuserl_recipe::check_recipe(file, &mut registry.clone(), &fuserl_abi::host::Loader).problems;
            match problems.pop() {
                Some(last) if !problems.is_empty() => {
                    for problem in &problems {
                        print_error(chain_of(problem));
                    }
                    Err(last)
                }
                _ => Err(first),
            }
        }
        other => other,
    }
}

fn run(command: Command, plugins: &[String]) -> anyhow::Result<ExitCode> {
    match command {
        Command::Recipe(RecipeCommand::Check { files }) => recipe_check(&files, plugins),
        Command::Recipe(RecipeCommand::Show { file }) => {
            let registry = registry(plugins)?;
            let loaded = load(&file, &registry)?;
            println!(
                "# The resolved recipe: every default filled in. Inputs (data, checkpoints) are relative to\n\
                 # this file's folder, so keep it beside the original; outputs (output_dir, [export] path)\n\
                 # are relative to the working folder."
            );
            print!("{}", loaded.shown_toml()?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Plugins(PluginsCommand::List) => {
            let registry = registry(plugins)?;
            let entries = registry.entries();
            let w_point = entries.iter().map(|e| e.point().as_str().len()).max().unwrap_or(0);
            let w_name = entries.iter().map(|e| e.name.len()).max().unwrap_or(0);
            let w_origin = entries.iter().map(|e| e.origin.len()).max().unwrap_or(0);
            for e in entries {
                println!(
                    "{:<w_point$}  {:<w_name$}  {:<w_origin$}  {}",
                    e.point().as_str(),
                    e.name,
                    e.origin,
                    e.summary
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan(args) => plan(&args, plugins),
        Command::Examples(args) => examples(&args, plugins),
        Command::Collect(args) => collect(&args, plugins),
        Command::Score(args) => score(&args, plugins),
        Command::Eval(args) => eval(&args, plugins),
        Command::Reward(args) => model_cmds::reward(&args).map(|()| ExitCode::SUCCESS),
        Command::Report { run_dir } => match fuserl_report::write_report(&run_dir) {
            Ok(files) => {
                println!("report: {}", Shown(&files.html));
                println!("report (Markdown): {}", Shown(&files.markdown));
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => Ok(stage_failed(&e.into())),
        },
        Command::Run(args) => train(&args, plugins, fuserl_run::Which::All),
        Command::Sft(args) => train(&args, plugins, fuserl_run::Which::Sft),
        Command::Po(args) => train(&args, plugins, fuserl_run::Which::Po),
        Command::Convert(cmd) => model_cmds::convert(&cmd).map(|()| ExitCode::SUCCESS),
        Command::ExportGguf(args) => model_cmds::export_gguf(&args).map(|()| ExitCode::SUCCESS),
        Command::Logprobs(args) => model_cmds::logprobs(&args).map(|()| ExitCode::SUCCESS),
        Command::Generate(args) => model_cmds::generate_cmd(&args).map(|()| ExitCode::SUCCESS),
        Command::Bench(cmd) => bench_cmds::bench(&cmd).map(|()| ExitCode::SUCCESS),
    }
}

fn recipe_check(files: &[PathBuf], plugins: &[String]) -> anyhow::Result<ExitCode> {
    let registry = registry(plugins)?;
    let mut failed = 0usize;
    for file in files {
        // Every problem at once: the settings, every component, the inputs, the device.
        let mut plugin_registry = registry.clone();
        let checked = fuserl_recipe::check_recipe(file, &mut plugin_registry, &fuserl_abi::host::Loader);
        let mut problems = checked.problems;
        if let Some(parsed) = &checked.parsed {
            let b = &parsed.recipe.backend;
            let key = |e: &fuserl_backends::BackendError| {
                if matches!(e, fuserl_backends::BackendError::Dtype { .. }) { "dtype" } else { "device" }
            };
            let backend = fuserl_backends::check(b.device, b.dtype).map_err(|e| {
                parsed.error_at(&fuserl_core::config::KeyPath::keys(&["backend", key(&e)]), e.to_string())
            });
            problems.extend(fuserl_run::inputs::check_recipe_inputs(parsed));
            // The device too, as `run` starts it first: a device this machine lacks is found
            // here, at its line, not only when the run starts.
            match backend {
                Err(e) => problems.push(e),
                Ok(()) => {
                    if let Err(e) = fuserl_backends::probe(b.device, b.device_index, b.dtype) {
                        let at = fuserl_core::config::KeyPath::keys(&["backend", "device"]);
                        problems.push(parsed.error_at(&at, e.to_string()));
                    }
                }
            }
        }
        if let Some(loaded) = &checked.loaded
            && let Err(e) = read_file_sources(loaded)
        {
            problems.push(e);
        }
        if let Some(fatal) = problems.iter().find(|e| !e.is_bad_input()) {
            for problem in &problems {
                print_error(chain_of(problem));
            }
            return Err(anyhow::anyhow!("{fatal}"));
        }
        let Some(loaded) = checked.loaded.filter(|_| problems.is_empty()) else {
            failed += 1;
            for problem in &problems {
                print_error(chain_of(problem));
            }
            continue;
        };
        let c = &loaded.components;
        println!(
            "ok: {} (sources: {}; reward: {}; weighting: {}; sft: {}; po: {})",
            Shown(file),
            c.sources.iter().map(|s| s.name()).collect::<Vec<_>>().join(", "),
            c.reward.name(),
            c.weighting.name(),
            stage_summary(loaded.recipe.sft.enabled, c.sft_objective.name()),
            stage_summary(loaded.recipe.po.enabled, c.po_objective.name()),
        );
        match fuserl_run::memory::plan_recipe(&loaded) {
            Ok(plans) if !plans.is_empty() => println!("  {}", memory_line(&loaded, &plans)),
            Ok(_) => {}
            Err(e) => {
                failed += 1;
                print_error(chain_of(&e));
            }
        }
    }
    if failed > 0 {
        eprintln!("{failed} of {} recipes failed", files.len());
        Ok(ExitCode::from(2))
    } else {
        Ok(ExitCode::SUCCESS)
    }
}

fn train(args: &TrainArgs, plugins: &[String], which: fuserl_run::Which) -> anyhow::Result<ExitCode> {
    let registry = registry(plugins)?;
    let loaded = load(&args.recipe, &registry).and_then(check_backend)?;
    if let Some(code) = inputs_fail(&loaded) {
        return Ok(code);
    }
    // The device starts before any stage (a device the machine lacks is named at its line).
    let b = &loaded.recipe.backend;
    if let Err(e) = fuserl_backends::probe(b.device, b.device_index, b.dtype) {
        let err = loaded.error_at(&fuserl_core::config::KeyPath::keys(&["backend", "device"]), e.to_string());
        print_error(chain_of(&err));
        return Ok(ExitCode::from(2));
    }
    let command = match which {
        fuserl_run::Which::All => "fuserl run",
        fuserl_run::Which::Sft => "fuserl sft",
        fuserl_run::Which::Po => "fuserl po",
    };
    let _lock = hold(&loaded, command)?;
    let mut bars = StageBars::default();
    let collect_bars = CollectBars::default();
    let score_bar = ScoreBar::default();
    // The evaluation's bars draw, but its summary is printed once, at the end.
    let eval_bars = CollectBars { silent: true, ..CollectBars::default() };
    let eval_bar = ScoreBar { silent: true, ..ScoreBar::default() };
    let report = fuserl_run::Reporters {
        step: &mut |p| bars.step(p),
        collect: &|p| collect_bars.update(p),
        score: &|p| score_bar.update(p),
        eval_collect: &|p| eval_bars.update(p),
        eval_score: &|p| eval_bar.update(p),
    };
    let summary = match fuserl_run::run(&loaded, which, report) {
        Ok(s) => s,
        Err(e) => {
            bars.abandon();
            collect_bars.abandon();
            score_bar.abandon();
            eval_bars.abandon();
            eval_bar.abandon();
            return Ok(stage_failed(&e));
        }
    };
    bars.abandon();
    for stage in &summary.skipped {
        say!("{} was already finished in {} (not redone)", stage.as_str(), Shown(&summary.dir));
    }
    if let Some((file, doc)) = &summary.eval {
        eval_summary(file, doc);
    }
    if let Some(export) = &summary.export {
        say!("fused model: {}", Shown(export));
    }
    let report = RunDir::new(&summary.dir).report().index();
    if report.is_file() {
        say!("report: {}", Shown(&report));
    }
    Ok(ExitCode::SUCCESS)
}

fn collect(args: &CollectArgs, plugins: &[String]) -> anyhow::Result<ExitCode> {
    let registry = registry(plugins)?;
    let loaded = load(&args.recipe, &registry)?;
    let _lock = hold(&loaded, "fuserl collect")?;
    let bars = CollectBars::default();
    match fuserl_run::collect::collect_stage(&loaded, &args.redo, &|p| bars.update(p)) {
        Ok((dir, collected)) => {
            if collected.is_empty() {
                say!("the recipe has no generative source: nothing to collect");
            }
            say!("collected answers: {}", Shown(&dir));
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            bars.abandon();
            Ok(stage_failed(&e.into()))
        }
    }
}

fn score(args: &TrainArgs, plugins: &[String]) -> anyhow::Result<ExitCode> {
    let registry = registry(plugins)?;
    let loaded = load(&args.recipe, &registry)?;
    let _lock = hold(&loaded, "fuserl score")?;
    let bars = CollectBars::default();
    let bar = ScoreBar::default();
    let answers = read_file_sources(&loaded).map_err(fuserl_run::TrainError::from).and_then(|mut answers| {
        answers.extend(fuserl_run::collect::collect_stage(&loaded, &[], &|p| bars.update(p))?.1);
        Ok(answers)
    });
    let result = answers.and_then(|answers| fuserl_run::score::score_stage(&loaded, answers, &|p| bar.update(p)));
    match result {
        Ok(fuserl_run::score::Scored { dir, .. }) => {
            fuserl_run::refresh_report(&loaded.output_dir());
            say!("scores: {}", Shown(&dir));
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            bars.abandon();
            bar.abandon();
            Ok(stage_failed(&e))
        }
    }
}

fn eval(args: &TrainArgs, plugins: &[String]) -> anyhow::Result<ExitCode> {
    let registry = registry(plugins)?;
    let loaded = load(&args.recipe, &registry).and_then(check_backend)?;
    let _lock = hold(&loaded, "fuserl eval")?;
    let bars = CollectBars::default();
    let bar = ScoreBar::default();
    match fuserl_run::eval::eval_stage(&loaded, &|p| bars.update(p), &|p| bar.update(p)) {
        Ok((file, doc)) => {
            eval_summary(&file, &doc);
            let run_dir = loaded.output_dir();
            fuserl_run::refresh_report(&run_dir);
            say!("report: {}", Shown(&RunDir::new(&run_dir).report().index()));
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            bars.abandon();
            bar.abandon();
            Ok(stage_failed(&e))
        }
    }
}

/// What `fuserl eval` and `fuserl run` print of an evaluation: where eval.json is, then each
/// model's mean reward (and pass@k) and the fused model's win rates, with their intervals.
fn eval_summary(file: &Path, doc: &fuserl_io::artifacts::EvalReport) {
    let pct = |e: &fuserl_io::artifacts::Estimate| format!("{:.3} [{:.3}, {:.3}]", e.mean, e.low, e.high);
    say!("evaluation: {} ({} prompts, reward {})", Shown(file), doc.n_prompts, doc.reward);
    for m in &doc.models {
        let pass: String = m.passes().iter().map(|(k, e)| format!(", pass@{k} {}", pct(e))).collect();
        say!("  {:<16} reward {}{pass}, {:.0} tokens", m.name, pct(&m.mean_reward), m.mean_length_tokens.mean);
    }
    for c in &doc.comparisons {
        let by = if c.by == "reward" { String::new() } else { format!(" by {}", c.by) };
        say!(
            "  fused vs {:<8} win rate{by} {}, length-controlled {}",
            c.baseline,
            c.win_rate.as_ref().map_or_else(|| "n/a (no prompt judged)".to_owned(), pct),
            c.length_controlled_win_rate.as_ref().map_or_else(|| "n/a".to_owned(), pct)
        );
    }
}

/// The scoring bar's look: its message is the rate ([`rate`]; indicatif's own had four decimals and
/// thousands separators, and a rate of hundreds of thousands a second for scores read from data).
fn score_style() -> indicatif::ProgressStyle {
    indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} answers{msg} ({elapsed})")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// ", N UNIT/s" once a bar has run for a second (before that a rate says little), else nothing.
fn rate(count: f64, elapsed: std::time::Duration, unit: &str) -> String {
    let secs = elapsed.as_secs_f64();
    if secs < 1.0 {
        return String::new();
    }
    let r = count / secs;
    if r >= 10.0 { format!(", {r:.0} {unit}/s") } else { format!(", {r:.1} {unit}/s") }
}

/// The scoring stage's bar (answers scored / to score, answers/s), and a summary line (none
/// when `silent`: the evaluation's, whose summary is printed at the end).
#[derive(Debug, Default)]
struct ScoreBar {
    bar: std::sync::Mutex<Option<indicatif::ProgressBar>>,
    silent: bool,
}

impl ScoreBar {
    fn update(&self, p: &fuserl_run::score::ScoreProgress<'_>) {
        let mut slot = self.bar.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let bar = slot.get_or_insert_with(|| {
            let bar = bar(p.total);
            bar.set_style(score_style());
            bar.set_prefix(format!("score {}", p.reward));
            bar.set_position(p.done);
            bar.reset_elapsed();
            bar
        });
        bar.set_length(p.total);
        bar.set_message(rate(p.done as f64, bar.elapsed(), "answers"));
        bar.set_position(p.done);
        if let Some(s) = &p.finished {
            bar.finish_and_clear();
            if s.scored > 0 && s.from_data == s.scored && !self.silent {
                // Scores that come with the data: read again every run, nothing "scored now".
                note!(
                    "score {}: {}/{} answers (scores from the data) in {:.1} s",
                    p.reward,
                    p.done,
                    p.total,
                    s.seconds
                );
            } else if s.scored > 0 && !self.silent {
                note!(
                    "score {}: {}/{} answers ({} scored now, {} already scored) in {:.1} s",
                    p.reward,
                    p.done,
                    p.total,
                    s.scored,
                    s.reused,
                    s.seconds
                );
            }
            *slot = None;
        }
    }

    fn abandon(&self) {
        if let Some(bar) = self.bar.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            bar.abandon();
        }
    }
}

/// One progress bar per generative source (answers done / wanted, answers/s, tokens/s), and a
/// summary line per source when it is done (none when `silent`).
#[derive(Debug, Default)]
struct CollectBars {
    bars: std::sync::Mutex<std::collections::HashMap<String, indicatif::ProgressBar>>,
    silent: bool,
}

impl CollectBars {
    fn update(&self, p: &fuserl_run::collect::CollectProgress<'_>) {
        let mut bars = self.bars.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let bar = bars.entry(p.source.to_owned()).or_insert_with(|| {
            let bar = bar(p.total);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} answers{msg} ({elapsed})")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.set_prefix(format!("collect {}", p.source));
            bar.set_position(p.done);
            bar.reset_elapsed();
            bar
        });
        bar.set_length(p.total);
        bar.set_message(rate(p.tokens as f64, bar.elapsed(), "tokens"));
        bar.set_position(p.done);
        if p.finished.is_some() {
            bar.finish_and_clear();
        }
        if let Some(s) = p.finished.as_ref().filter(|_| !self.silent) {
            note!(
                "collect {}: {}/{} answers ({} asked now, {} already collected; {} request{}, {} retried; {} cut at the token limit) in {:.1} s",
                p.source,
                p.done,
                p.total,
                s.asked,
                s.reused,
                s.requests,
                if s.requests == 1 { "" } else { "s" },
                s.retries,
                s.truncated,
                s.seconds
            );
        }
    }

    fn abandon(&self) {
        for bar in self.bars.lock().unwrap_or_else(std::sync::PoisonError::into_inner).values() {
            if !bar.is_finished() {
                bar.abandon();
            }
        }
    }
}

/// One progress bar per training stage, finished at the stage's last step (issue 18: a bar
/// reused across stages could be left drawn at a step before the last). Where standard error is
/// not a terminal the bars draw nothing, so each stage's end is printed as one line instead.
#[derive(Debug, Default)]
struct StageBars {
    current: Option<indicatif::ProgressBar>,
}

impl StageBars {
    fn step(&mut self, p: &fuserl_run::Progress) {
        if self.current.is_none() && p.step > 1 {
            // A stage that did not start at its first step resumed from its last checkpoint.
            note!("{}: resuming after step {} of {} (its last checkpoint)", p.stage.as_str(), p.step - 1, p.total);
        }
        let bar = self.current.get_or_insert_with(|| {
            let bar = bar(p.total);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix:>4} [{bar:30}] {pos}/{len} steps{msg} ({elapsed} < {eta})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(p.stage.as_str());
            bar
        });
        bar.set_length(p.total);
        bar.set_message(format!(", loss {:.4}", p.loss));
        bar.set_position(p.step);
        if p.step >= p.total {
            // The finished bar gives its place to the stage's line (the same on a terminal and
            // off one).
            bar.finish_and_clear();
            note!(
                "{}: {}/{} steps, loss {:.4} ({:.1} s)",
                p.stage.as_str(),
                p.step,
                p.total,
                p.loss,
                bar.elapsed().as_secs_f64()
            );
            self.current = None;
        }
    }

    /// Leave an unfinished bar where it stopped (a failed or interrupted stage).
    fn abandon(&mut self) {
        if let Some(bar) = self.current.take() {
            bar.abandon();
        }
    }
}

/// Open the recipe's inputs before any stage; every problem printed, exit status 2.
fn inputs_fail(loaded: &fuserl_recipe::LoadedRecipe) -> Option<ExitCode> {
    let problems = fuserl_run::inputs::check_inputs(loaded, false);
    for problem in &problems {
        print_error(chain_of(problem));
    }
    (!problems.is_empty()).then(|| {
        eprintln!("{} problem(s) with the recipe's inputs: nothing was run", problems.len());
        ExitCode::from(2)
    })
}

/// Hold the recipe's run folder for this command (`RunDir::lock`): a second command on the same
/// folder stops at once, naming this process. Says the folder, absolute.
fn hold(loaded: &fuserl_recipe::LoadedRecipe, command: &str) -> anyhow::Result<fuserl_io::run_dir::RunLock> {
    let dir = loaded.output_dir();
    let lock = RunDir::new(&dir).lock(command)?;
    // Outputs are relative to the working folder (inputs to the recipe's): say where this goes.
    let absolute = std::path::absolute(&dir).map_or(dir, |a| fuserl_core::paths::normalize(&a));
    note!("run folder: {}", absolute.display());
    Ok(lock)
}

/// The recipe's device must be compiled into this build (an error at `[backend] device` that
/// names the cargo feature) and able to do its dtype (an error at `[backend] dtype` that names
/// the ones it can).
fn check_backend(loaded: fuserl_recipe::LoadedRecipe) -> fuserl_core::Result<fuserl_recipe::LoadedRecipe> {
    let backend = &loaded.recipe.backend;
    match fuserl_backends::check(backend.device, backend.dtype) {
        Ok(()) => Ok(loaded),
        Err(e) => {
            let key = if matches!(e, fuserl_backends::BackendError::Dtype { .. }) { "dtype" } else { "device" };
            Err(loaded.error_at(&fuserl_core::config::KeyPath::keys(&["backend", key]), e.to_string()))
        }
    }
}

fn plan(args: &PlanArgs, plugins: &[String]) -> anyhow::Result<ExitCode> {
    use fuserl_run::memory::{count, gb};
    let registry = registry(plugins)?;
    let loaded = load(&args.recipe, &registry).and_then(check_backend)?;
    let b = &loaded.recipe.backend;
    let device = format!("{:?} {}", b.device, b.device_index).to_lowercase();
    let capacity = match args.memory_gb {
        Some(g) if g.is_finite() && g > 0.0 => Some((g * 1e9) as u64),
        Some(g) => anyhow::bail!("--memory-gb {g}: expected a positive number of GB"),
        None => fuserl_backends::memory::device_capacity(b.device, b.device_index),
    };
    let plans = fuserl_run::memory::plan_recipe(&loaded)?;
    let generation = fuserl_run::memory::plan_recipe_generation(&loaded)?;
    if args.json {
        let stages: Vec<serde_json::Value> = plans
            .iter()
            .map(|p| {
                serde_json::json!({
                    "stage": p.stage.as_str(),
                    "peak_bytes": p.plan.peak(),
                    "fits": capacity.map(|c| p.plan.peak() <= c),
                    "sequences": p.sequences,
                    "length": p.length,
                    "worst_case": p.basis == fuserl_run::memory::Basis::WorstCase,
                    "plan": p.plan,
                    "levers": p.levers,
                })
            })
            .collect();
        let generating: Vec<serde_json::Value> = generation
            .iter()
            .map(|g| {
                serde_json::json!({
                    "what": g.what,
                    "peak_bytes": g.plan.peak(),
                    "fits": capacity.map(|c| g.plan.peak() <= c),
                    "batch": g.batch,
                    "prompt_tokens": g.prompt,
                    "new_tokens": g.new_tokens,
                    "plan": g.plan,
                    "levers": g.levers,
                })
            })
            .collect();
        let doc = serde_json::json!({"device": b.device, "device_index": b.device_index, "capacity_bytes": capacity, "stages": stages, "generation": generating});
        println!("{doc:#}");
        return Ok(ExitCode::SUCCESS);
    }
    if plans.is_empty() && generation.is_empty() {
        println!("{}: no training stage is enabled, and nothing generates in-process", Shown(&args.recipe));
    }
    let fits = |peak: u64| match capacity {
        Some(c) if peak > c => format!("does not fit in {}", gb(c)),
        Some(c) => format!("fits in {} ({:.0}%)", gb(c), peak as f64 / c as f64 * 100.0),
        None => "its memory is unknown here: give it with --memory-gb".to_owned(),
    };
    let phases = |plan: &fuserl_run::memory::MemoryPlan| {
        for phase in &plan.phases {
            let parts: Vec<String> =
                phase.parts.iter().filter(|x| x.bytes > 0).map(|x| format!("{} {}", x.name, gb(x.bytes))).collect();
            println!("  {:<33} {:>8}  {}", phase.name, gb(phase.total() + plan.runtime), parts.join(", "));
        }
    };
    let master = match b.master_weights {
        fuserl_core::backend::MasterWeights::F32 => "f32",
        fuserl_core::backend::MasterWeights::Bf16 => "bf16",
    };
    for p in &plans {
        let peak = p.plan.peak();
        let fits = fits(peak);
        let basis = match p.basis {
            fuserl_run::memory::Basis::Examples => "the stage's examples",
            fuserl_run::memory::Basis::WorstCase => "worst case: every sequence max_length tokens",
        };
        println!(
            "{}: {} at peak on {device}: {fits}\n  {} trained parameters, {master} master weights, {} compute; largest micro-batch {} sequences x {} tokens ({basis})",
            p.stage.as_str(),
            gb(peak),
            count(p.plan.parameters),
            format!("{:?}", b.dtype).to_lowercase(),
            p.sequences,
            p.length,
        );
        phases(&p.plan);
        println!("  (each phase includes {} held before the stage)", gb(p.plan.runtime));
        if capacity.is_some_and(|c| peak > c) {
            println!("  to fit, try {}", p.levers.join("; or "));
        }
    }
    for g in &generation {
        let peak = g.plan.peak();
        println!(
            "{}: {} at peak on {device}: {}\n  {} answers at once, prompts of up to {} tokens, up to {} new tokens each (worst case: every answer that long)",
            g.what,
            gb(peak),
            fits(peak),
            g.batch,
            g.prompt,
            g.new_tokens
        );
        phases(&g.plan);
        if capacity.is_some_and(|c| peak > c) {
            println!("  to fit, try {}", g.levers.join("; or "));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `recipe check`'s memory line: each training stage's planned peak, against the device's
/// memory when it is known.
fn memory_line(loaded: &fuserl_recipe::LoadedRecipe, plans: &[fuserl_run::memory::StagePlan]) -> String {
    use fuserl_run::memory::gb;
    let b = &loaded.recipe.backend;
    let stages: Vec<String> = plans.iter().map(|p| format!("{} {}", p.stage.as_str(), gb(p.plan.peak()))).collect();
    let device = format!("{:?} {}", b.device, b.device_index).to_lowercase();
    let capacity = fuserl_backends::memory::device_capacity(b.device, b.device_index);
    let verdict = match capacity {
        Some(c) if plans.iter().any(|p| p.plan.peak() > c) => {
            format!("DOES NOT FIT in {} (`fuserl plan` says what to change)", gb(c))
        }
        Some(c) => format!("of {}", gb(c)),
        None => "(its memory unknown here)".to_owned(),
    };
    format!("memory: {} at peak on {device} {verdict}; `fuserl plan` breaks it down", stages.join(", "))
}

fn stage_summary(enabled: bool, objective: &str) -> String {
    if enabled { objective.to_owned() } else { format!("{objective} (disabled)") }
}

fn examples(args: &ExamplesArgs, plugins: &[String]) -> anyhow::Result<ExitCode> {
    let registry = registry(plugins)?;
    let loaded = load(&args.recipe, &registry)?;
    let _lock = hold(&loaded, "fuserl examples")?;
    let stage = match args.stage {
        StageArg::Sft => StageName::Sft,
        StageArg::Po => StageName::Po,
    };
    // Generative sources answer first (into the run directory, resumably).
    let collect_bars = CollectBars::default();
    let mut answers = read_file_sources(&loaded)?;
    answers.extend(fuserl_run::collect::collect_stage(&loaded, &[], &|p| collect_bars.update(p))?.1);
    let prepared = prepare_with(&loaded, stage, answers, Some(&RunDir::new(loaded.output_dir()).score()))?;
    let (examples, stats) = (prepared.examples, prepared.stats);
    let mut text = String::new();
    for e in &examples {
        text.push_str(&serde_json::to_string(e)?);
        text.push('\n');
    }
    match &args.out {
        Some(path) => write_atomically(path, text.as_bytes())?,
        None => std::io::stdout().lock().write_all(text.as_bytes())?,
    }
    note!(
        "{} {} examples from {} of {} prompts ({} completions; {} prompts gave none; {} records skipped){}",
        stats.examples,
        stage.as_str(),
        stats.stage_prompts - stats.prompts_without_examples,
        stats.prompts,
        stats.completions,
        stats.prompts_without_examples,
        stats.skipped_records,
        args.out.as_ref().map_or(String::new(), |p| format!(" -> {}", Shown(p))),
    );
    Ok(ExitCode::SUCCESS)
}

/// Write a command's output file: its folder made if missing, the file written by the one
/// atomic write (`fuserl_io::fs`).
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    // A file where a folder of the path should be: bad input, said as such (the system's
    // "File exists" named the file, not what was wrong with it).
    if let Some(file) = dir.ancestors().find(|a| a.is_file()) {
        return Err(fuserl_core::Error::Path {
            file: file.to_path_buf(),
            message: format!("a file, where the output path {} needs a folder", Shown(path)),
        }
        .into());
    }
    std::fs::create_dir_all(dir).map_err(|e| fuserl_core::Error::io(dir, e))?;
    fuserl_io::fs::write_atomic(path, bytes).map_err(fuserl_core::Error::from)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    /// A terminal that keeps what is drawn on it.
    #[derive(Debug, Default, Clone)]
    struct Screen(std::sync::Arc<std::sync::Mutex<String>>);

    impl indicatif::TermLike for Screen {
        fn width(&self) -> u16 {
            120
        }
        fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
            Ok(())
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.write_str(&format!("{s}\n"))
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            self.0.lock().expect("screen").push_str(s);
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_score_bar_shows_its_rate_with_one_decimal() {
        let screen = Screen::default();
        let bar = indicatif::ProgressBar::with_draw_target(
            Some(400_000),
            indicatif::ProgressDrawTarget::term_like(Box::new(screen.clone())),
        );
        bar.set_style(score_style());
        bar.set_prefix("score precomputed");
        std::thread::sleep(std::time::Duration::from_millis(20));
        bar.set_position(389_607);
        bar.finish();
        let shown = screen.0.lock().expect("screen").clone();
        let rate = shown.rsplit("answers, ").next().and_then(|r| r.split("/s").next()).expect("a rate");
        let decimals = rate.split_once('.').map_or(0, |(_, d)| d.len());
        assert!(decimals <= 1, "{shown:?}");
    }

    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct Leaf(String);

    /// A wrapper that prints its source in its own message and also returns it as `source()`.
    #[derive(Debug, thiserror::Error)]
    #[error("{prefix}: {inner}")]
    struct Wrapper {
        prefix: &'static str,
        #[source]
        inner: Leaf,
    }

    #[test]
    fn each_distinct_message_of_a_chain_is_printed_once() {
        let same = anyhow::Error::from(Leaf("X.gguf: unsupported GGUF architecture `gemma3`".into()))
            .context("X.gguf: unsupported GGUF architecture `gemma3`");
        assert_eq!(error_lines(same.chain()), ["X.gguf: unsupported GGUF architecture `gemma3`"]);
        let wrapped = Wrapper { prefix: "data/a.jsonl", inner: Leaf("permission denied".into()) };
        assert_eq!(error_lines(chain_of(&wrapped)), ["data/a.jsonl: permission denied"]);
        let distinct = anyhow::Error::from(Leaf("disk full".into())).context("writing runs/q/metrics.jsonl");
        assert_eq!(error_lines(distinct.chain()), ["writing runs/q/metrics.jsonl", "disk full"]);
    }
}
