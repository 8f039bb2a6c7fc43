//! Fuzz targets: one per parser of untrusted input (issue #13, docs/reliability.md).
//!
//! Each target takes the fuzzer's bytes as the content of one file (or one server reply), runs
//! the parser that fuserl runs on it, and says whether the input was accepted. A target must
//! return for every input: a panic, an abort (an allocation past the harness's 1 GiB cap), or a
//! run longer than 10 s is a finding. `scripts/fuzz.sh TARGET SECONDS` runs one under AFL++
//! (the binary in `src/main.rs`); the tests in `tests/fuzz.rs` (at the top level) replay every seed and every
//! committed finding (`fuzz/regressions/TARGET/`) through the same functions on every
//! `cargo test`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use fuserl_core::data::ChatMessage;
use fuserl_core::registry::Registry;
use fuserl_model::chat::ChatTokenizer;
use fuserl_model::checkpoint::TensorStore;
use fuserl_model::config::LlamaConfig;
use fuserl_model::gguf::{Gguf, write_tokenizer};

pub mod structured;

/// The harness's generation, recorded with every run in `fuzz/runs.jsonl`: raised when the
/// targets change so much that earlier hours no longer count towards the goal of 30 CPU-minutes
/// a target (`scripts/fuzz.sh topup` and the table count the current generation's runs only).
/// 1: issue #13's byte-level targets (runs recorded without the field). 2 (issue #33): the
/// structure-aware targets (`structured`), the binary's memory budget allocator in the harness,
/// and every parser fix of issue #33.
pub const HARNESS: u32 = 2;

/// A fuzz target.
#[derive(Debug)]
pub struct Target {
    /// Its name, as `scripts/fuzz.sh` takes it.
    pub name: &'static str,
    /// What it parses.
    pub parser: &'static str,
    /// Where its seeds come from, in the repository: a file; `DIR/*.EXT`, the files of that
    /// extension in DIR and below; or `DIR/**/NAME`, the files called NAME in DIR and below.
    pub seeds: &'static [&'static str],
    /// Run the parser on one input; `true` when it was accepted.
    pub run: fn(&[u8]) -> bool,
}

/// Every target.
pub static TARGETS: &[Target] = &[
    Target {
        name: "recipe",
        parser: "recipe TOML: parse, validate, build every component (fuserl_recipe::parse_recipe)",
        seeds: &["recipes/*.toml"],
        run: recipe,
    },
    Target {
        name: "prompts",
        parser: "JSONL prompt files (fuserl_io::prompts::read_prompts, fuserl_io::jsonl's line reader)",
        seeds: &["data/*.jsonl"],
        run: prompts_jsonl,
    },
    Target {
        name: "parquet",
        parser: "Parquet prompt files (fuserl_io::prompts::read_prompts)",
        seeds: &["fixtures/prompts/*.parquet"],
        run: prompts_parquet,
    },
    Target {
        name: "records",
        parser: "lines of `jsonl` source files and `python-tests` tests files",
        seeds: &["data/*.jsonl", "data/code-tasks/tests.jsonl"],
        run: records,
    },
    Target {
        name: "gguf",
        parser: "GGUF header, metadata, tensor table, dequantisation, tokenizer rebuilt from metadata",
        seeds: &["fixtures/gguf/*.gguf"],
        run: gguf,
    },
    Target {
        name: "safetensors",
        parser: "safetensors header and tensors (fuserl_model::checkpoint::TensorStore)",
        seeds: &["fixtures/*.safetensors", "checkpoints/*.safetensors"],
        run: safetensors,
    },
    Target {
        name: "model-config",
        parser: "config.json of every supported architecture (LlamaConfig::from_json, fuserl_model::hf_config)",
        seeds: &["fixtures/**/config.json", "checkpoints/**/config.json"],
        run: model_config,
    },
    Target {
        name: "tokenizer",
        parser: "tokenizer.json, then a chat rendered, encoded and decoded",
        seeds: &["checkpoints/**/tokenizer.json", "fixtures/**/tokenizer.json"],
        run: tokenizer,
    },
    Target {
        name: "template",
        parser: "chat templates (minijinja with fuel), rendered with and without the generation prompt",
        seeds: &["recipes/templates/*.jinja", "fuzz/seeds/template/*.jinja"],
        run: template,
    },
    Target {
        name: "gguf-structured",
        parser: "GGUF files built from the fuzzer's choices (hyperparameters, vocabulary, nested metadata, tensor table), converted as `fuserl convert gguf` does, with and without --keep-quantized, and the tokenizer it writes used",
        seeds: &["fuzz/seeds/structured/*.bin"],
        run: gguf_structured,
    },
    Target {
        name: "tokenizer-structured",
        parser: "tokenizer folders built from the fuzzer's choices (tokenizer.json's model, normalizers, regex splits, decoders, added tokens, truncation, padding; tokenizer_config.json's special tokens and template), loaded and used",
        seeds: &["fuzz/seeds/structured/*.bin"],
        run: tokenizer_structured,
    },
    Target {
        name: "template-structured",
        parser: "chat templates built from the fuzzer's choices (loops, namespaces that grow strings, recursive macros, filters, slices), rendered under fuel and the memory budget",
        seeds: &["fuzz/seeds/structured/*.bin"],
        run: template_structured,
    },
    Target {
        name: "plugin-declaration",
        parser: "the host's check of a plugin library's declaration (fuserl_abi::host)",
        seeds: &["fuzz/seeds/plugin-declaration/*.bin"],
        run: plugin_declaration,
    },
    Target {
        name: "openai-reply",
        parser: "OpenAI-API replies read by the `openai` source and the `judge` reward",
        seeds: &["fuzz/seeds/openai-reply/*.json"],
        run: openai_reply,
    },
    Target {
        name: "reward-reply",
        parser: "reward-server replies read by the `http` reward",
        seeds: &["fuzz/seeds/reward-reply/*.json"],
        run: reward_reply,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("fuzz/ is in the repository").to_path_buf()
}

/// The seed files of a target, sorted.
pub fn seed_files(target: &Target) -> Vec<PathBuf> {
    let root = repo_root();
    let mut out = Vec::new();
    for spec in target.seeds {
        if let Some((dir, name)) = spec.split_once("**/") {
            collect_files(&root.join(dir), &|p| p.file_name().is_some_and(|n| n == name), &mut out);
        } else if let Some((dir, ext)) = spec.split_once("*.") {
            collect_files(&root.join(dir), &|p| p.extension().is_some_and(|e| e == ext), &mut out);
        } else {
            out.push(root.join(spec));
        }
    }
    out.sort();
    out.dedup();
    out
}

fn collect_files(dir: &Path, keep: &dyn Fn(&Path) -> bool, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            collect_files(&path, keep, out);
        } else if keep(&path) {
            out.push(path);
        }
    }
}

/// The committed findings of a target (`fuzz/regressions/TARGET/`), replayed by the tests.
pub fn regression_files(target: &Target) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let dir = repo_root().join("fuzz/regressions").join(target.name);
    if let Ok(entries) = std::fs::read_dir(dir) {
        out.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_file()));
    }
    out.sort();
    out
}

/// The folder the targets write their inputs into (in memory where the OS has /dev/shm).
fn work_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let builder = tempfile::Builder::new().prefix("fuserl-fuzz-").tempdir_in(shm);
        builder.or_else(|_| tempfile::tempdir()).expect("a temporary folder")
    })
    .path()
}

/// Write `data` to `name` in the work folder.
fn input_file(name: &str, data: &[u8]) -> PathBuf {
    let path = work_dir().join(name);
    std::fs::write(&path, data).expect("the work folder is writable");
    path
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| fuserl_builtin::registry().expect("the built-ins register"))
}

fn messages() -> Vec<ChatMessage> {
    vec![
        ChatMessage { role: "system".into(), content: "Be brief.".into() },
        ChatMessage { role: "user".into(), content: "Write a Python function add(a, b).".into() },
        ChatMessage { role: "assistant".into(), content: "def add(a, b):\n    return a + b".into() },
    ]
}

/// A recipe, resolved as if it were in `recipes/` (so that the seeds' relative paths find the
/// repository's data and checkpoints; nothing is written).
fn recipe(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else { return false };
    let file = repo_root().join("recipes/fuzz-input.toml");
    fuserl_recipe::parse_recipe(text, &file, registry()).is_ok()
}

fn prompts_jsonl(data: &[u8]) -> bool {
    fuserl_io::prompts::read_prompts(&input_file("prompts.jsonl", data)).is_ok()
}

fn prompts_parquet(data: &[u8]) -> bool {
    fuserl_io::prompts::read_prompts(&input_file("prompts.parquet", data)).is_ok()
}

fn records(data: &[u8]) -> bool {
    std::str::from_utf8(data).is_ok_and(fuserl_builtin::fuzzing::record_lines)
}

/// A GGUF file: parsed, every tensor dequantised, its tokenizer rebuilt from the metadata.
fn gguf(data: &[u8]) -> bool {
    let Ok(g) = Gguf::read(&input_file("model.gguf", data)) else { return false };
    for t in &g.tensors {
        let _ = g.dequantize(t);
    }
    let out = work_dir().join("gguf-out");
    let _ = std::fs::create_dir_all(&out);
    let _ = write_tokenizer(&g, &out);
    true
}

fn safetensors(data: &[u8]) -> bool {
    let mut store = TensorStore::default();
    // Every tensor converted too (the store converts a tensor when it is taken).
    store.read_file(&input_file("model.safetensors", data)).is_ok()
        && store.names().into_iter().all(|n| store.get(n).is_ok())
}

fn model_config(data: &[u8]) -> bool {
    LlamaConfig::from_file(&input_file("config.json", data)).is_ok()
}

/// A folder with the tiny chat checkpoint's tokenizer files, made once.
fn tokenizer_dir(name: &str) -> PathBuf {
    let dir = work_dir().join(name);
    if !dir.is_dir() {
        std::fs::create_dir_all(&dir).expect("the work folder is writable");
        let tiny = repo_root().join("checkpoints/tiny-chat");
        for f in ["tokenizer.json", "tokenizer_config.json", "config.json"] {
            std::fs::copy(tiny.join(f), dir.join(f)).expect("checkpoints/tiny-chat is in the repository");
        }
    }
    dir
}

/// Render, encode and decode a chat with a loaded tokenizer, as fuserl does (a prompt's last
/// 4,096 tokens, a conversation of at most 4,096 positions); `true` when all went through.
fn use_tokenizer(tok: &ChatTokenizer) -> bool {
    const POSITIONS: usize = 4096;
    let prompt = tok.prompt_ids(&messages(), POSITIONS).map(|(ids, _)| ids);
    let conversation = tok.conversation_ids(&messages(), POSITIONS);
    [prompt, conversation].into_iter().all(|ids| ids.is_ok_and(|ids| tok.decode(&ids, false).is_ok()))
}

/// A `tokenizer.json` (with the tiny chat checkpoint's tokenizer_config.json and template).
fn tokenizer(data: &[u8]) -> bool {
    let dir = tokenizer_dir("tokenizer");
    std::fs::write(dir.join("tokenizer.json"), data).expect("the work folder is writable");
    ChatTokenizer::load(&dir, None).is_ok_and(|tok| use_tokenizer(&tok))
}

/// A chat template (with the tiny chat checkpoint's tokenizer).
fn template(data: &[u8]) -> bool {
    let dir = tokenizer_dir("template");
    let file = input_file("template.jinja", data);
    ChatTokenizer::load(&dir, Some(&file)).is_ok_and(|tok| use_tokenizer(&tok))
}

/// The files a structure-aware target builds from `data` (name, content), for looking at a
/// finding (`fuserl-fuzz --expand TARGET INPUT DIR`); `None` for the byte-level targets.
pub fn expand(target: &str, data: &[u8]) -> Option<Vec<(&'static str, Vec<u8>)>> {
    let mut c = structured::Choices::new(data);
    Some(match target {
        "gguf-structured" => vec![("model.gguf", structured::gguf(&mut c))],
        "tokenizer-structured" => {
            let (tokenizer, config) = structured::tokenizer(&mut c);
            vec![("tokenizer.json", tokenizer), ("tokenizer_config.json", config)]
        }
        "template-structured" => vec![("template.jinja", structured::template(&mut c).into_bytes())],
        _ => return None,
    })
}

/// A GGUF file from choices, converted into a checkpoint folder; the folder's tokenizer used.
fn gguf_structured(data: &[u8]) -> bool {
    let mut c = structured::Choices::new(data);
    let file = input_file("structured.gguf", &structured::gguf(&mut c));
    let out = work_dir().join("structured-gguf-out");
    let _ = std::fs::remove_dir_all(&out);
    let keep_quantized = c.one_in(2);
    fuserl_model::gguf::convert_with(&file, &out, keep_quantized).is_ok()
        && ChatTokenizer::load(&out, None).is_ok_and(|tok| use_tokenizer(&tok))
}

/// A tokenizer folder from choices (with the tiny chat checkpoint's config.json), loaded and used.
fn tokenizer_structured(data: &[u8]) -> bool {
    let dir = tokenizer_dir("tokenizer-structured");
    let (tokenizer, config) = structured::tokenizer(&mut structured::Choices::new(data));
    std::fs::write(dir.join("tokenizer.json"), tokenizer).expect("the work folder is writable");
    std::fs::write(dir.join("tokenizer_config.json"), config).expect("the work folder is writable");
    ChatTokenizer::load(&dir, None).is_ok_and(|tok| use_tokenizer(&tok))
}

/// A chat template from choices (with the tiny chat checkpoint's tokenizer).
fn template_structured(data: &[u8]) -> bool {
    template(structured::template(&mut structured::Choices::new(data)).as_bytes())
}

fn plugin_declaration(data: &[u8]) -> bool {
    fuserl_abi::fuzzing::register_bytes(data).is_ok()
}

fn openai_reply(data: &[u8]) -> bool {
    std::str::from_utf8(data).is_ok_and(fuserl_builtin::fuzzing::openai_reply)
}

fn reward_reply(data: &[u8]) -> bool {
    std::str::from_utf8(data).is_ok_and(fuserl_builtin::fuzzing::reward_reply)
}
