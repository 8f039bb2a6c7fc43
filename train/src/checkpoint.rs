//! Training-state checkpoints of a stage (what `burn-train`'s `checkpoint` module keeps): the
//! weights, the optimiser's state and the step, every `checkpoint_every` steps, in
//! `sft/checkpoints/` or `po/checkpoints/` of the run directory:
//!
//! ```text
//! checkpoints/LATEST             the name of the newest complete checkpoint
//! checkpoints/step-000050/       model.mpk, optim.mpk, state.json ({stage, step, total})
//!                                (a LoRA stage: adapters.mpk, its adapters alone, for model.mpk)
//! ```
//!
//! A checkpoint is written under `step-NNNNNN.tmp/` and renamed whole, then `LATEST` is
//! rewritten atomically, so a kill at any point leaves the previous checkpoint usable. (Gradient
//! checkpointing, which trades compute for activation memory, is [`crate::layerwise`].)

use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, Param};
use burn::optim::Optimizer;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder, RecorderError};
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;
use fuserl_core::data::StageName;
use fuserl_io::fs::write_atomic;
use fuserl_model::llama::Llama;
use fuserl_model::lora;

use crate::adamw::Optim;
use crate::error::{Result, TrainError};

/// What a checkpoint records beside the weights and the optimiser: where the stage was.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct CheckpointState {
    pub stage: StageName,
    pub step: u64,
    pub total: u64,
}

fn recorder() -> MpkRecorder {
    MpkRecorder
}

/// Burn's named-MessagePack checkpoint format (`NamedMpkFileRecorder`'s files, which it reads),
/// written by fuserl: Burn's recorder drops its buffered writer without flushing it explicitly
/// (the error of the last write, a full disk's, was lost and a truncated file kept) and reports
/// any write error as a MessagePack one. This one keeps the I/O error, flushes, and syncs the
/// file before the checkpoint is renamed into place.
#[derive(Debug, Clone, Default)]
pub(crate) struct MpkRecorder;

/// A recorder error's own message (its `Display` is `Unknown("...")`).
fn recorder_message(e: RecorderError) -> String {
    match e {
        RecorderError::FileNotFound(m) | RecorderError::DeserializeError(m) | RecorderError::Unknown(m) => m,
    }
}

/// A writer that remembers the I/O error under the encoder's own error.
struct KeepError<W> {
    inner: W,
    error: Option<std::io::Error>,
}

impl<W: std::io::Write> std::io::Write for KeepError<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.inner.write(buf).inspect_err(|e| self.error = Some(std::io::Error::new(e.kind(), e.to_string())))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl<B: burn::tensor::backend::Backend> Recorder<B> for MpkRecorder {
    type Settings = FullPrecisionSettings;
    type RecordArgs = PathBuf;
    type RecordOutput = ();
    type LoadArgs = PathBuf;

    fn save_item<I: serde::Serialize>(&self, item: I, file: PathBuf) -> std::result::Result<(), RecorderError> {
        let path = file.with_extension("mpk");
        let io = |e: std::io::Error| RecorderError::Unknown(fuserl_core::paths::io_reason(&e));
        let f = std::fs::File::create(&path).map_err(io)?;
        let mut w = KeepError { inner: std::io::BufWriter::with_capacity(1 << 20, f), error: None };
        if let Err(e) = rmp_serde::encode::write_named(&mut w, &item) {
            return Err(match w.error.take() {
                Some(cause) => io(cause),
                None => RecorderError::Unknown(e.to_string()),
            });
        }
        let f = w.inner.into_inner().map_err(|e| io(e.into_error()))?;
        f.sync_all().map_err(io)
    }

    fn load_item<I: serde::de::DeserializeOwned>(&self, file: &mut PathBuf) -> std::result::Result<I, RecorderError> {
        <NamedMpkFileRecorder<FullPrecisionSettings> as Recorder<B>>::load_item(
            &NamedMpkFileRecorder::<FullPrecisionSettings>::new(),
            file,
        )
    }
}

/// The latest complete checkpoint of a stage, if any. `LATEST` must hold a checkpoint's name
/// (`step-NNNNNN`) and nothing else: a path in it would resume from (and later delete) a folder
/// outside the run directory.
pub fn latest_checkpoint(dir: &Path) -> Result<Option<PathBuf>> {
    let pointer = dir.join("LATEST");
    let Ok(text) = std::fs::read_to_string(&pointer) else { return Ok(None) };
    let name = text.trim();
    let digits = name.strip_prefix("step-").unwrap_or("");
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TrainError::Checkpoint {
            file: pointer,
            message: format!(
                "expected the name of a checkpoint of this folder (step-NNNNNN), found `{}`",
                name.escape_debug()
            ),
        });
    }
    let p = dir.join(name);
    Ok(p.join("state.json").is_file().then_some(p))
}

/// The stage's weights and optimiser from its latest checkpoint in `dir`, with the step it
/// reached and the checkpoint's folder; `weights` and `optim` unchanged when there is none.
#[allow(clippy::type_complexity)]
pub(crate) fn resume<B: AutodiffBackend>(
    dir: &Path,
    weights: Llama<B>,
    optim: Optim<B>,
) -> Result<(Llama<B>, Optim<B>, Option<(u64, PathBuf)>)> {
    let Some(ckpt) = latest_checkpoint(dir)? else { return Ok((weights, optim, None)) };
    let state: CheckpointState = serde_json::from_slice(
        &std::fs::read(ckpt.join("state.json")).map_err(|e| TrainError::io(ckpt.join("state.json"), e))?,
    )
    .map_err(|e| TrainError::Checkpoint { file: ckpt.join("state.json"), message: e.to_string() })?;
    let device = weights.embed_tokens.val().device();
    // The recorder writes f32 (full precision); weights kept in a 16-bit master type (the lean
    // option) are cast back to it, or the resumed run would train in f32 from here on.
    let master = weights.embed_tokens.val().dtype();
    let fail = |file: PathBuf, e: RecorderError| TrainError::Checkpoint { file, message: recorder_message(e) };
    let weights = if lora::has_adapters(&weights) {
        // A LoRA stage keeps its adapters only (the base is frozen, and is the stage's start).
        let mut weights = weights;
        let adapters = lora::adapters(&weights);
        let master = adapters.first().map_or(master, |a| a.a.val().dtype());
        let record = recorder().load(ckpt.join("adapters"), &device).map_err(|e| fail(ckpt.join("adapters.mpk"), e))?;
        let adapters = adapters.load_record(record).map(&mut InDType(master));
        lora::set_adapters(&mut weights, adapters);
        weights
    } else {
        let record = recorder().load(ckpt.join("model"), &device).map_err(|e| fail(ckpt.join("model.mpk"), e))?;
        weights.load_record(record).map(&mut InDType(master))
    };
    let orecord = recorder().load(ckpt.join("optim"), &device).map_err(|e| fail(ckpt.join("optim.mpk"), e))?;
    Ok((weights, optim.load_record(orecord), Some((state.step, ckpt))))
}

/// Casts every parameter to one dtype, keeping it a leaf that requires a gradient.
struct InDType(burn::tensor::DType);

impl<B: AutodiffBackend> ModuleMapper<B> for InDType {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        if tensor.dtype() == self.0 {
            return Param::from_mapped_value(id, tensor, mapper);
        }
        let grad = tensor.is_require_grad();
        let cast = Tensor::from_inner(tensor.inner().cast(self.0));
        Param::from_mapped_value(id, if grad { cast.require_grad() } else { cast }, mapper)
    }
}

/// Write a checkpoint of the stage in `dir` (`step-NNNNNN/`, made under a temporary name and
/// renamed whole), point `LATEST` at it, and remove the previous one.
pub(crate) fn save<B: AutodiffBackend>(
    dir: &Path,
    weights: &Llama<B>,
    optim: &Optim<B>,
    state: &CheckpointState,
) -> Result<()> {
    let name = format!("step-{:06}", state.step);
    let tmp = dir.join(format!("{name}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    let fail = |file: PathBuf, e: RecorderError| TrainError::Checkpoint { file, message: recorder_message(e) };
    if lora::has_adapters(weights) {
        let file = tmp.join("adapters");
        recorder()
            .record(lora::adapters(weights).into_record(), file)
            .map_err(|e| fail(tmp.join("adapters.mpk"), e))?;
    } else {
        recorder()
            .record(weights.clone().into_record(), tmp.join("model"))
            .map_err(|e| fail(tmp.join("model.mpk"), e))?;
    }
    fuserl_core::debug_pause(&format!("{}-checkpoint-{}", state.stage.as_str(), state.step));
    recorder().record(optim.to_record(), tmp.join("optim")).map_err(|e| fail(tmp.join("optim.mpk"), e))?;
    let json = serde_json::to_vec(state).map_err(|e| TrainError::Data(e.to_string()))?;
    write_atomic(&tmp.join("state.json"), &json)?;
    let done = dir.join(&name);
    let _ = std::fs::remove_dir_all(&done);
    std::fs::rename(&tmp, &done).map_err(|e| TrainError::io(&done, e))?;
    // A pointer that names no checkpoint of this folder is replaced (and points at nothing to remove).
    let previous = latest_checkpoint(dir).ok().flatten();
    write_atomic(&dir.join("LATEST"), name.as_bytes())?;
    if let Some(prev) = previous.filter(|p| *p != done) {
        let _ = std::fs::remove_dir_all(prev);
    }
    Ok(())
}

/// Keep only the metrics lines of other stages, and of this stage up to `step` (lines written
/// after the checkpoint a run resumes from would otherwise be repeated).
pub(crate) fn trim_metrics(file: &Path, stage: StageName, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(file) else { return Ok(()) };
    let kept: String = text
        .lines()
        .filter(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
            v["stage"].as_str() != Some(stage.as_str()) || v["step"].as_u64().is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    Ok(write_atomic(file, kept.as_bytes())?)
}

#[cfg(test)]
mod write_tests {
    use super::{MpkRecorder, Recorder, recorder_message};

    /// A full disk (`/dev/full` behind the checkpoint file's name) is said as such, whether the
    /// write fails while encoding or at the final flush (which Burn's recorder let pass).
    #[test]
    #[cfg(target_os = "linux")]
    fn a_full_disk_is_named_not_lost() {
        let dir = tempfile::tempdir().expect("tmp");
        std::os::unix::fs::symlink("/dev/full", dir.path().join("model.mpk")).expect("link");
        for bytes in [16usize, 4 << 20] {
            let item = vec![7u8; bytes];
            let err =
                <MpkRecorder as Recorder<burn::backend::Flex>>::save_item(&MpkRecorder, item, dir.path().join("model"))
                    .expect_err("a full disk");
            let message = recorder_message(err);
            assert!(message.to_lowercase().contains("no space left on device"), "{bytes} bytes: {message}");
        }
    }
}

#[cfg(test)]
mod pointer_tests {
    use super::latest_checkpoint;

    /// Issue #33: `LATEST` holding a path (`../../..`, an absolute one) is refused with the file
    /// named, instead of resuming from (and later deleting) a folder outside the run directory.
    #[test]
    fn a_pointer_that_leaves_its_folder_is_refused() {
        let root = tempfile::tempdir().expect("tmp");
        let outside = root.path().join("outside");
        std::fs::create_dir_all(&outside).expect("mkdir");
        std::fs::write(outside.join("state.json"), "{}").expect("write");
        let dir = root.path().join("run/sft/checkpoints");
        std::fs::create_dir_all(dir.join("step-000003")).expect("mkdir");
        std::fs::write(dir.join("step-000003/state.json"), "{}").expect("write");
        for bad in ["../../../outside", "/etc", "step-3/../../x", "", "step-"] {
            std::fs::write(dir.join("LATEST"), bad).expect("write");
            let err = latest_checkpoint(&dir).expect_err(bad).to_string();
            assert!(err.contains("LATEST") && err.contains("expected the name of a checkpoint"), "{bad}: {err}");
        }
        std::fs::write(dir.join("LATEST"), "step-000003\n").expect("write");
        assert_eq!(latest_checkpoint(&dir).expect("ok"), Some(dir.join("step-000003")));
        std::fs::remove_file(dir.join("LATEST")).expect("rm");
        assert_eq!(latest_checkpoint(&dir).expect("ok"), None);
        assert!(outside.join("state.json").is_file());
    }
}

#[cfg(test)]
mod dtype_tests {
    use burn::tensor::DType;
    use fuserl_core::data::StageName;

    use super::{CheckpointState, resume, save};
    use crate::TrainBackend;
    use crate::trainer::new_optimizer;

    /// A run with the lean option (`master_weights = "bf16"`) resumes with its weights in bf16:
    /// the recorder writes f32, and without the cast back the resumed run would keep f32
    /// weights (16 bytes a parameter instead of 8) for the rest of the stage.
    #[test]
    fn lean_weights_resume_in_bf16() {
        let tiny = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../checkpoints/tiny-chat");
        let config: fuserl_recipe::StageConfig =
            fuserl_core::config::parse_table(&toml::Table::new()).expect("defaults");
        let dir = tempfile::tempdir().expect("tmp");
        for master in [DType::BF16, DType::F32] {
            let model =
                fuserl_model::checkpoint::load::<TrainBackend>(&tiny, &Default::default(), master).expect("load");
            let optim = new_optimizer::<TrainBackend>(&config);
            let state = CheckpointState { stage: StageName::Sft, step: 1, total: 2 };
            save(dir.path(), &model.weights, &optim, &state).expect("save");
            let fresh =
                fuserl_model::checkpoint::load::<TrainBackend>(&tiny, &Default::default(), master).expect("load");
            let (weights, _, resumed) = resume(dir.path(), fresh.weights, new_optimizer(&config)).expect("resume");
            assert_eq!(resumed.map(|r| r.0), Some(1));
            assert_eq!(weights.embed_tokens.val().dtype(), master);
            let q = weights.layers[0].self_attn.q_proj.weight.val();
            assert_eq!(q.dtype(), master);
            assert!(q.is_require_grad(), "a resumed weight is still trained");
        }
    }
}
