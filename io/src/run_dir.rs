//! The run directory, as one type (as uv's `uv-cache` owns its cache layout): every path of a
//! run is a method here, so that the layout is written once and a renamed file is renamed for
//! every stage, the command line and the report at once.
//!
//! ```text
//! runs/NAME/
//!   .lock                  held by the command using the folder ([`RunDir::lock`])
//!   recipe.toml            the resolved recipe (a rerun with another recipe is refused)
//!   collect/SOURCE.jsonl   each generative source's answers, appended as they arrive, with
//!                          SOURCE.settings.json
//!   score/REWARD.jsonl     the reward's score of every answer, appended batch by batch, with
//!                          REWARD.settings.json
//!   data.json              per source: prompts, answers and their scores (for the report)
//!   metrics.jsonl          one line per logged optimiser step, both stages
//!   stages.jsonl           each stage's start (fuserl's version, the machine), end or failure
//!   tensorboard/           the same as TensorBoard event files (`[run] report_to = ["tensorboard"]`)
//!   sft/examples.jsonl     the stage's training examples, each traced to its source answers
//!   sft/checkpoints/       step-N/ {model.mpk, optim.mpk, state.json} and LATEST
//!   sft/final/             the FuseSFT model (Hugging Face layout); sft/DONE when finished
//!   po/collect/target.jsonl  the FuseSFT model's own samples ([po] target_samples)
//!   po/reference-logps.json  reference log-probs (frozen FuseSFT model), keyed by checkpoint and data
//!   po/examples.jsonl, po/checkpoints/, po/final/, po/DONE
//!   export/                the fused model (or [export] path)
//!   export.json            what the finished export wrote (a rerun with the same settings skips it)
//!   eval/                  collect/, score/, judge/, validation/{collect,score}/ and eval.json
//!   report/                index.html, report.md and plots/
//! ```
//!
//! ```
//! use fuserl_core::data::StageName;
//! let run = fuserl_io::run_dir::RunDir::new("runs/quickstart");
//! assert!(run.stage(StageName::Sft).done().ends_with("sft/DONE"));
//! assert!(run.eval().json().ends_with("eval/eval.json"));
//! ```

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use fuserl_core::data::StageName;
use fuserl_core::paths::Shown;

use fuserl_core::{Error, Result};

/// A run's folder (`[run] output_dir`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDir {
    root: PathBuf,
}

impl RunDir {
    /// The run directory at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The lock file: held (an advisory lock of the operating system) by the command that uses the
    /// folder, and naming it (`process PID (COMMAND)`).
    pub fn lock_file(&self) -> PathBuf {
        self.root.join(".lock")
    }

    /// Hold the run directory for one command (`fuserl run`, `collect`, `score`, ...) until the
    /// returned guard is dropped: a second command on the same folder stops at once, naming the
    /// process that holds it, instead of both writing the same files (issue #34). The lock is the
    /// operating system's (`flock` on Unix), so a killed process never leaves it held; a lock
    /// file still naming a process that has ended is taken over with a warning. Once held, the
    /// temporary files that writes killed before their rename left in the folder are removed.
    pub fn lock(&self, command: &str) -> Result<RunLock> {
        std::fs::create_dir_all(&self.root).map_err(|e| Error::io(&self.root, e))?;
        // Before the lock file is opened for writing: a `.lock` (or the folder) that is a link
        // leading out of the run folder would have it truncate a file elsewhere.
        fuserl_core::paths::check_links_stay_inside(&self.root)?;
        let path = self.lock_file();
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        let mut holder = String::new();
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                let holder = if holder.is_empty() { "another process" } else { holder };
                return Err(Error::io(
                    &path,
                    std::io::Error::new(
                        std::io::ErrorKind::WouldBlock,
                        format!(
                            "{} is in use by {holder}; wait for it to end or stop it (two commands on one run folder would write the same files)",
                            Shown(&self.root)
                        ),
                    ),
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
        }
        let _ = file.read_to_string(&mut holder);
        if !holder.trim().is_empty() {
            tracing::warn!(
                dir = %Shown(&self.root),
                "took over the run folder from {}, which ended without releasing it (killed?)",
                holder.trim()
            );
        }
        let me = format!("process {} ({command})\n", std::process::id());
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| file.write_all(me.as_bytes()))
            .and_then(|()| file.flush())
            .map_err(|e| Error::io(&path, e))?;
        // Held alone now: what a killed write left behind (`NAME.tmp-PID-N`) goes.
        let removed = crate::fs::remove_temporaries(&self.root);
        if removed > 0 {
            tracing::info!(dir = %Shown(&self.root), removed, "removed temporary files left by an interrupted run");
        }
        held_locks().push(path.clone());
        Ok(RunLock { file, path })
    }

    /// The folder itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The resolved recipe the run was made with.
    pub fn recipe(&self) -> PathBuf {
        self.root.join("recipe.toml")
    }

    /// The generative sources' answer stores.
    pub fn collect(&self) -> PathBuf {
        self.root.join("collect")
    }

    /// The reward's score stores.
    pub fn score(&self) -> PathBuf {
        self.root.join("score")
    }

    /// Per source: prompts, answers and their scores (written by the scoring stage).
    pub fn data_json(&self) -> PathBuf {
        self.root.join("data.json")
    }

    /// One line per stage started, finished or failed (`artifacts::StageEvent`).
    pub fn stages(&self) -> PathBuf {
        self.root.join("stages.jsonl")
    }

    /// One line per logged optimiser step of both stages.
    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }

    /// TensorBoard event files.
    pub fn tensorboard(&self) -> PathBuf {
        self.root.join("tensorboard")
    }

    /// A training stage's folder.
    pub fn stage(&self, stage: StageName) -> StageDir {
        StageDir { dir: self.root.join(stage.as_str()) }
    }

    /// What the finished export wrote (`fuserl_run::export`); the export itself is `[export] path`.
    pub fn export_record(&self) -> PathBuf {
        self.root.join("export.json")
    }

    /// The evaluation's folder.
    pub fn eval(&self) -> EvalDir {
        EvalDir { dir: self.root.join("eval") }
    }

    /// The report's folder.
    pub fn report(&self) -> ReportDir {
        ReportDir { dir: self.root.join("report") }
    }
}

/// The hold of [`RunDir::lock`]: released (and the lock file emptied) when dropped, or by the
/// operating system when the process ends in any other way.
#[derive(Debug)]
pub struct RunLock {
    file: std::fs::File,
    path: PathBuf,
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
        let _ = self.file.unlock();
        let mut held = held_locks();
        if let Some(i) = held.iter().position(|p| *p == self.path) {
            held.remove(i);
        }
    }
}

/// The lock files this process holds (a [`RunLock`] adds its own and removes it when dropped).
fn held_locks() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    static HELD: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    HELD.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Empty the lock files this process holds, for an exit that runs no destructors (Ctrl-C's
/// handler): the operating system releases the locks themselves when the process ends, and an
/// empty lock file is not taken for one a killed process left (no "took over" warning next time).
pub fn release_held_locks() {
    for path in held_locks().iter() {
        if let Ok(file) = std::fs::OpenOptions::new().write(true).open(path) {
            let _ = file.set_len(0);
        }
    }
}

/// `sft/` or `po/` of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageDir {
    dir: PathBuf,
}

impl StageDir {
    /// The folder itself.
    pub fn root(&self) -> &Path {
        &self.dir
    }

    /// The stage's training examples.
    pub fn examples(&self) -> PathBuf {
        self.dir.join("examples.jsonl")
    }

    /// Training-state checkpoints (`fuserl_train::checkpoint`).
    pub fn checkpoints(&self) -> PathBuf {
        self.dir.join("checkpoints")
    }

    /// The trained model, in Hugging Face's layout.
    pub fn final_model(&self) -> PathBuf {
        self.dir.join("final")
    }

    /// Present when the stage has finished.
    pub fn done(&self) -> PathBuf {
        self.dir.join("DONE")
    }

    /// The target's own samples (FusePO's `target_samples`), a collect store folder.
    pub fn collect(&self) -> PathBuf {
        self.dir.join("collect")
    }

    /// Cached reference log-probs (FusePO).
    pub fn reference_logps(&self) -> PathBuf {
        self.dir.join("reference-logps.json")
    }
}

/// `eval/` of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalDir {
    dir: PathBuf,
}

impl EvalDir {
    /// The folder itself.
    pub fn root(&self) -> &Path {
        &self.dir
    }

    /// The held-out answers of every model compared.
    pub fn collect(&self) -> PathBuf {
        self.dir.join("collect")
    }

    /// Their scores.
    pub fn score(&self) -> PathBuf {
        self.dir.join("score")
    }

    /// The pairwise judge's verdicts.
    pub fn judge(&self) -> PathBuf {
        self.dir.join("judge")
    }

    /// The validation split's answers and scores (`validation/collect`, `validation/score`).
    pub fn validation(&self) -> EvalDir {
        EvalDir { dir: self.dir.join("validation") }
    }

    /// The measures.
    pub fn json(&self) -> PathBuf {
        self.dir.join("eval.json")
    }
}

/// `report/` of a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportDir {
    dir: PathBuf,
}

impl ReportDir {
    /// The self-contained page.
    pub fn index(&self) -> PathBuf {
        self.dir.join("index.html")
    }

    /// The same as Markdown.
    pub fn markdown(&self) -> PathBuf {
        self.dir.join("report.md")
    }

    /// One SVG file per plot.
    pub fn plots(&self) -> PathBuf {
        self.dir.join("plots")
    }
}
