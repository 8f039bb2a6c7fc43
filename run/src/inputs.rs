//! A recipe's inputs, opened before any stage runs (`fuserl recipe check`, and first in every
//! command that runs stages): the target checkpoint (its `config.json` read, its tokenizer
//! there), the chat template, every prompt file of `[data]` and `[eval]` read to its last record,
//! the file sources' records (for `recipe check`: a run reads them once, first, anyway), and the
//! checkpoints `[eval] baselines` names, and where the export may write. Every problem is
//! returned, each at its recipe line, so that a mistake is found before hours of training, not
//! after them.

use std::path::Path;

use fuserl_core::Error;
use fuserl_core::config::KeyPath;
use fuserl_core::paths::{Shown, cannot_read};
use fuserl_recipe::{LoadedRecipe, ParsedRecipe};

/// Every problem with the recipe's inputs (none: all of them can be read); with `file_sources`,
/// the file sources' records are read too.
pub fn check_inputs(loaded: &LoadedRecipe, file_sources: bool) -> Vec<Error> {
    let mut problems = check_recipe_inputs(&loaded.parsed());
    if file_sources && let Err(e) = crate::collect::read_file_sources(loaded) {
        problems.push(e);
    }
    problems
}

/// Every problem with the inputs the recipe's own settings name (the target, its chat template,
/// prompt files, evaluation baselines, the export folder): what can be checked without its
/// components, also when one of them could not be built.
pub fn check_recipe_inputs(loaded: &ParsedRecipe) -> Vec<Error> {
    let recipe = &loaded.recipe;
    let mut problems = Vec::new();
    let at = |path: KeyPath, message: String| loaded.error_at(&path, message);
    let target = loaded.base_dir.join(&recipe.target.checkpoint);
    let template = recipe.target.chat_template.as_ref().map(|t| loaded.base_dir.join(t));
    let problem = if fuserl_model::lora::is_adapter_dir(&target) {
        // Adapters are trained on a full checkpoint: the target is one (an adapter folder can be
        // a baseline, or merged by an export first).
        Some(format!(
            "{} is a PEFT adapter folder: the target is the full checkpoint it sits on ({}), or a merged \
             export of it ([export] lora = \"merged\")",
            Shown(&target),
            Shown(&fuserl_model::lora::base_of(&target))
        ))
    } else {
        checkpoint_problem(&target, template.as_deref())
    };
    if let Some(problem) = problem {
        problems.push(at(KeyPath::keys(&["target", "checkpoint"]), problem));
    }
    if let Some(template) = &recipe.target.chat_template {
        let file = loaded.base_dir.join(template);
        if let Err(e) = fuserl_core::paths::read_regular_string(&file) {
            problems.push(at(
                KeyPath::keys(&["target", "chat_template"]),
                format!("cannot read {}: {}", Shown(&file), cannot_read(&file, &e)),
            ));
        }
    }
    for (i, prompts) in recipe.data.prompts.iter().enumerate() {
        if let Some(problem) = prompts_problem(&loaded.base_dir.join(prompts)) {
            problems.push(at(KeyPath::keys(&["data", "prompts"]).index(i), problem));
        }
    }
    let eval = &recipe.eval;
    if eval.enabled {
        match &eval.prompts {
            Some(prompts) => {
                if let Some(problem) = prompts_problem(&loaded.base_dir.join(prompts)) {
                    problems.push(at(KeyPath::keys(&["eval", "prompts"]), problem));
                }
            }
            None => problems.push(at(
                KeyPath::keys(&["eval", "enabled"]),
                "the evaluation needs held-out prompts: set [eval] prompts".into(),
            )),
        }
    }
    if let Some(validation) = &eval.validation
        && let Some(problem) = prompts_problem(&loaded.base_dir.join(validation))
    {
        problems.push(at(KeyPath::keys(&["eval", "validation"]), problem));
    }
    for (i, baseline) in eval.baselines.iter().enumerate() {
        // `target`, `sft` and `source:NAME` are checked where they are made; anything else names
        // a checkpoint folder.
        if matches!(baseline.as_str(), "target" | "sft") || baseline.starts_with("source:") {
            continue;
        }
        if let Some(problem) = checkpoint_problem(&loaded.base_dir.join(baseline), None) {
            problems.push(at(KeyPath::keys(&["eval", "baselines"]).index(i), problem));
        }
    }
    if recipe.export.enabled
        && let Some(problem) = export_problem(loaded)
    {
        problems.push(at(KeyPath::keys(&["export", "path"]), problem));
    }
    problems
}

/// Why the export may not write to its folder, if it may not: outside the run directory, the
/// folder must be new or empty, or this run's earlier export (an export into the target
/// checkpoint, or any other folder of files, would overwrite them).
fn export_problem(loaded: &ParsedRecipe) -> Option<String> {
    let absolute =
        |p: &Path| fuserl_core::paths::normalize(&std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()));
    let to = loaded.export_dir();
    let run = loaded.output_dir();
    if absolute(&to).starts_with(absolute(&run)) {
        return None;
    }
    let meta = std::fs::symlink_metadata(&to).ok()?;
    if !meta.is_dir() {
        return Some(format!("{} exists and is not a folder: the export writes a folder there", Shown(&to)));
    }
    let empty = std::fs::read_dir(&to).is_ok_and(|mut d| d.next().is_none());
    if empty {
        return None;
    }
    let record = fuserl_io::run_dir::RunDir::new(&run).export_record();
    let earlier = std::fs::read(&record)
        .ok()
        .and_then(|b| serde_json::from_slice::<crate::export::ExportRecord>(&b).ok())
        .is_some_and(|r| absolute(Path::new(&r.to)) == absolute(&to));
    (!earlier).then(|| {
        format!(
            "{} is a folder with files in it, and not an earlier export of this run: the export would overwrite them \
             (the target checkpoint, for one); name a new or empty folder, or leave `path` out (the export then goes \
             into the run directory)",
            Shown(&to)
        )
    })
}

/// What is wrong with a checkpoint folder, if anything: no such folder, a `config.json` that
/// does not read or describes no model fuserl runs, a `tokenizer.json` that is missing or does
/// not load, no chat template. A PEFT adapter folder is checked with its base.
fn checkpoint_problem(folder: &Path, template: Option<&Path>) -> Option<String> {
    if !folder.is_dir() {
        return Some(format!("{}: no such checkpoint folder", Shown(folder)));
    }
    if fuserl_model::lora::is_adapter_dir(folder) {
        return match fuserl_model::lora::read_adapter_config(folder) {
            Err(e) => Some(e.to_string()),
            Ok(adapter) => checkpoint_problem(&adapter.base, template),
        };
    }
    let config = folder.join("config.json");
    match fuserl_core::paths::read_regular_string(&config) {
        Err(e) => return Some(format!("cannot read {}: {}", Shown(&config), cannot_read(&config, &e))),
        Ok(text) => match serde_json::from_str::<serde_json::Value>(&text) {
            Err(e) => return Some(format!("{}: expected a JSON config: {e}", Shown(&config))),
            Ok(json) => {
                if let Err(e) = fuserl_model::config::LlamaConfig::from_json(&json, &config) {
                    return Some(e.to_string());
                }
            }
        },
    }
    let tokenizer = folder.join("tokenizer.json");
    if !tokenizer.is_file() {
        return Some(format!("{}: no tokenizer.json (a Hugging Face checkpoint folder has one)", Shown(folder)));
    }
    // The tokenizer as a run loads it (JSON, vocabulary, the chat template's presence; with the
    // recipe's template file when it names one that reads: one that does not is its own problem).
    let template = template.filter(|t| fuserl_core::paths::read_regular_string(t).is_ok());
    fuserl_model::chat::ChatTokenizer::load(folder, template).err().map(|e| e.to_string())
}

/// What is wrong with a prompt file, if anything: unreadable, a bad record, or no prompt at all.
fn prompts_problem(file: &Path) -> Option<String> {
    match fuserl_io::prompts::read_prompts(file) {
        Err(e) => Some(e.to_string()),
        Ok(read) if read.prompts.is_empty() => Some(format!("{}: no prompts in it", Shown(file))),
        Ok(_) => None,
    }
}
