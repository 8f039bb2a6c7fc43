//! The export stage: the last trained model (FusePO's, else FuseSFT's) written as a Hugging Face
//! folder (`[export] path`, default `runs/NAME/export/`) in `[export] dtype`, sharded at
//! `max_shard_size_mb`, with the target's tokenizer files. When it has finished, the run directory
//! records what it exported (`export.json`: the model and a hash of its weights, the folder, dtype,
//! shard size, and a hash of the files written); a rerun with the same model and settings whose
//! export is still there as written skips it, as the other stages skip on their `DONE`.
//!
//! With `[target.lora]` the adapters are merged into the target's weights (`[export] lora =
//! "merged"`, a full checkpoint), or written alone as PEFT's adapter folder (`"adapter"`).
//!
//! With `[export] format = "gguf"` the folder also gets `model-<TYPE>.gguf`, llama.cpp's file of
//! the same weights ([`fuserl_model::gguf_export`]), written from the folder.

use std::path::{Path, PathBuf};

use burn::tensor::DType;
use fuserl_core::paths::Shown;
use fuserl_io::fs::write_atomic;
use fuserl_model::checkpoint::{BaseQuant, load_with, save_as};
use fuserl_model::lora;
use fuserl_recipe::LoadedRecipe;
use serde::{Deserialize, Serialize};

use crate::{Result, TrainError};
use fuserl_io::run_dir::RunDir;

/// `export.json`: what the finished export wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportRecord {
    /// The trained model it came from.
    pub from: String,
    /// The hash of its weight files (a model trained again is exported again).
    pub weights: String,
    /// The export folder.
    pub to: String,
    /// The dtype written.
    pub dtype: String,
    /// The shard size in bytes.
    pub max_shard_bytes: usize,
    /// The hash of the weight files written (an export changed or removed since is written again).
    #[serde(default)]
    pub exported: String,
    /// The GGUF file written in the folder (`format = "gguf"`): its name, type and size in bytes.
    #[serde(default)]
    pub gguf: Option<(String, String, u64)>,
    /// With `[target.lora]`: how the adapters were exported (`merged` or `adapter`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<String>,
}

/// The GGUF file `format = "gguf"` asks for: its name in the export folder and its type.
fn gguf_wanted(loaded: &LoadedRecipe) -> Option<(String, fuserl_model::gguf_export::GgufType)> {
    let e = &loaded.recipe.export;
    if e.format != fuserl_recipe::ExportFormat::Gguf {
        return None;
    }
    let name = e.gguf_type.unwrap_or_default().as_str();
    let ty = fuserl_model::gguf_export::GgufType::from_name(name).expect("the recipe's GGUF types are the model's");
    Some((format!("model-{}.gguf", ty.label()), ty))
}

/// Export `from` (a trained model of the run) as the recipe says, with `target`'s tokenizer
/// files; `None` when `from` does not exist (a stage that did not run).
pub fn export_stage(loaded: &LoadedRecipe, from: &Path, target: &Path) -> Result<Option<PathBuf>> {
    if !from.is_dir() {
        return Ok(None);
    }
    let recipe = &loaded.recipe;
    let to = loaded.export_dir();
    let dtype = fuserl_backends::burn_dtype(recipe.export.dtype.unwrap_or(recipe.backend.dtype));
    let record = ExportRecord {
        from: from.display().to_string(),
        weights: format!("{:016x}", crate::local::weights_hash(from).map_err(|e| TrainError::io(from, e))?),
        to: to.display().to_string(),
        dtype: format!("{dtype:?}"),
        max_shard_bytes: (recipe.export.max_shard_size_mb as usize) << 20,
        exported: String::new(),
        gguf: None,
        lora: recipe.target.lora.as_ref().map(|_| {
            match recipe.export.lora {
                fuserl_recipe::LoraExport::Merged => "merged",
                fuserl_recipe::LoraExport::Adapter => "adapter",
            }
            .to_owned()
        }),
    };
    let gguf = gguf_wanted(loaded);
    let hash = |dir: &Path| crate::local::weights_hash(dir).map(|h| format!("{h:016x}"));
    let marker = RunDir::new(loaded.output_dir()).export_record();
    let done = std::fs::read(&marker).ok().and_then(|b| serde_json::from_slice::<ExportRecord>(&b).ok());
    let gguf_there = |d: &ExportRecord| match (&gguf, &d.gguf) {
        (None, None) => true,
        // Written before, no longer asked for: exported again (and the file removed).
        (None, Some(_)) => false,
        (Some((name, ty)), Some((written, written_ty, bytes))) => {
            name == written
                && ty.label() == written_ty
                && std::fs::metadata(to.join(name)).is_ok_and(|m| m.is_file() && m.len() == *bytes)
        }
        (Some(_), None) => false,
    };
    let unchanged = done.as_ref().is_some_and(|d| {
        ExportRecord { exported: String::new(), gguf: None, ..d.clone() } == record
            && fuserl_model::checkpoint::is_checkpoint(&to)
            && hash(&to).is_ok_and(|h| h == d.exported)
            && gguf_there(d)
    });
    if unchanged {
        tracing::info!(to = %Shown(&to), "already exported");
        return Ok(Some(to));
    }
    // A pending record (no hash of what was written) before the files: an export killed part-way
    // is this run's own folder to a rerun (which writes it again), not a stranger's files.
    let pending = serde_json::to_string(&record).map_err(|e| TrainError::Data(e.to_string()))?;
    write_atomic(&marker, pending.as_bytes())?;
    let adapter = match &recipe.target.lora {
        Some(l) if recipe.export.lora == fuserl_recipe::LoraExport::Adapter => Some(crate::training::lora_spec(l)),
        _ => None,
    };
    // An adapter export writes the adapters alone: a quantised base (QLoRA) stays in its blocks.
    let quant = match (&adapter, &recipe.target.lora) {
        (Some(_), Some(l)) => crate::training::base_quant(l),
        _ => BaseQuant::None,
    };
    let model = load_with::<burn::backend::Flex>(from, &Default::default(), DType::F32, quant)?;
    // What the other kind of export left in the folder goes (transformers reads a folder with an
    // adapter_config.json as an adapter).
    let stale: Vec<PathBuf> = std::fs::read_dir(&to)
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    for f in stale {
        let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let merged_file = name == "config.json" || (name.starts_with("model") && name.contains(".safetensors"));
        let adapter_file = name == lora::CONFIG_FILE || name == lora::ADAPTER_FILE;
        if (adapter.is_some() && merged_file) || (adapter.is_none() && adapter_file) {
            let _ = std::fs::remove_file(f);
        }
    }
    match &adapter {
        // PEFT's adapter folder on top of the target (f32 adapters, as PEFT saves them).
        Some(spec) => {
            let base = std::fs::canonicalize(target).map_err(|e| TrainError::io(target, e))?;
            let json = fuserl_model::config::read_json(&target.join("config.json"))?;
            let multimodal = fuserl_model::gemma3::is_multimodal(&json);
            lora::save_adapter_dir(&model, spec, &to, &base, multimodal, Some(target))?;
        }
        // The adapters merged into the weights (in f32, then written in the export's dtype).
        None => save_as(&model, &to, record.max_shard_bytes, Some(target), dtype)?,
    }
    drop(model);
    // GGUF files of other types this export wrote before (a changed `gguf_type`, or no GGUF
    // asked for now): removed, so the folder holds what the recipe asks for.
    for t in fuserl_model::gguf_export::GgufType::ALL {
        let name = format!("model-{}.gguf", t.label());
        if gguf.as_ref().is_none_or(|(wanted, _)| *wanted != name) {
            let _ = std::fs::remove_file(to.join(name));
        }
    }
    let gguf = match gguf {
        Some((name, ty)) => {
            let done = fuserl_model::gguf_export::export(&to, &to.join(&name), ty)?;
            Some((name, ty.label().to_owned(), done.bytes))
        }
        None => None,
    };
    let record = ExportRecord { exported: hash(&to).map_err(|e| TrainError::io(&to, e))?, gguf, ..record };
    let text = serde_json::to_string(&record).map_err(|e| TrainError::Data(e.to_string()))?;
    write_atomic(&marker, text.as_bytes())?;
    Ok(Some(to))
}
