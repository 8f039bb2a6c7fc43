//! The one atomic write of fuserl (as uv's `uv-fs::write_atomic`): every file that a run, a
//! conversion or a command writes whole goes through [`write_atomic`] or
//! [`write_atomic_with`], so that there is one durability rule.
//!
//! The rule: the bytes go to a temporary file beside the target (`NAME.tmp-PID-N`, same folder, so
//! the rename never crosses file systems), which is flushed to disk (`fsync`) and then renamed
//! over the target; the folder is then synced too (best effort: not every file system allows
//! opening a folder for it). A process killed at any point leaves either the old file or the new
//! one, never a torn one. A target that exists and is not a regular file (`/dev/null`, a pipe)
//! is written to directly: renaming over it would replace it.
//!
//! ```
//! let dir = tempfile::tempdir().unwrap();
//! let file = dir.path().join("eval.json");
//! fuserl_io::fs::write_atomic(&file, b"{}").unwrap();
//! assert_eq!(std::fs::read(&file).unwrap(), b"{}");
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

/// A write that failed: the file that was being written (the target or its temporary file) and
/// the cause. Each crate's error type converts it into its own I/O error.
#[derive(Debug)]
pub struct WriteFailure {
    /// The file.
    pub file: PathBuf,
    /// The cause.
    pub source: std::io::Error,
}

/// Write `bytes` to `path` atomically (see the module's rule).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WriteFailure> {
    write_atomic_with(path, |tmp| {
        let mut f = std::fs::File::create(tmp)?;
        f.write_all(bytes)
    })
}

/// Like [`write_atomic`], for a writer that streams into the file itself (a safetensors shard
/// too big for a second copy in memory): `write` creates and fills the temporary file it is given;
/// it is then synced and renamed over `path`.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> std::io::Result<()>) -> Result<(), WriteFailure> {
    if path.metadata().is_ok_and(|m| !m.is_file()) {
        return write(path).map_err(|source| failure(path, source));
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    // The process id and a counter: two threads writing the same file never share a temporary.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_file_name(format!("{name}.tmp-{}-{n}", std::process::id()));
    let written = write(&tmp).and_then(|()| std::fs::File::options().write(true).open(&tmp)?.sync_all());
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(failure(&tmp, e));
    }
    if let Err(source) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(failure(path, source));
    }
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Whether `name` is a temporary file of [`write_atomic_with`] (`NAME.tmp-PID-N`).
fn is_temporary(name: &str) -> bool {
    let Some((_, tail)) = name.rsplit_once(".tmp-") else { return false };
    let mut parts = tail.split('-');
    let digits = |p: Option<&str>| p.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    digits(parts.next()) && digits(parts.next()) && parts.next().is_none()
}

/// Remove the temporary files that writes killed before their rename left under `root` (not
/// following links); returns how many. Only for a folder this process holds alone (a run
/// directory under its lock): another writer's temporary would be removed under it.
pub fn remove_temporaries(root: &Path) -> usize {
    let mut removed = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else { continue };
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file()
                && is_temporary(&entry.file_name().to_string_lossy())
                && std::fs::remove_file(entry.path()).is_ok()
            {
                removed += 1;
            }
        }
    }
    removed
}

fn failure(file: &Path, source: std::io::Error) -> WriteFailure {
    WriteFailure { file: file.to_path_buf(), source }
}

impl From<WriteFailure> for fuserl_core::Error {
    fn from(f: WriteFailure) -> Self {
        Self::io(f.file, f.source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Temporaries left by a killed write are removed, at any depth; nothing else is.
    #[test]
    fn temporaries_of_killed_writes_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().expect("tmp");
        let deep = dir.path().join("score/reward");
        std::fs::create_dir_all(&deep).expect("mkdir");
        let keep = ["eval.json", "notes.tmp", "a.tmp-12", "b.tmp-x-1", "c.tmp-1-2-3", "scores.jsonl"];
        let gone = ["eval.json.tmp-4242-0", "model.safetensors.tmp-1-17"];
        for name in keep.iter().chain(&gone) {
            std::fs::write(dir.path().join(name), "x").expect("write");
        }
        std::fs::write(deep.join("store.jsonl.tmp-99-3"), "x").expect("write");
        std::fs::create_dir(dir.path().join("step-000003.tmp-1-1")).expect("a folder is left alone");
        assert_eq!(remove_temporaries(dir.path()), 3);
        for name in keep {
            assert!(dir.path().join(name).is_file(), "{name} was removed");
        }
        assert!(dir.path().join("step-000003.tmp-1-1").is_dir());
        assert!(!deep.join("store.jsonl.tmp-99-3").exists());
    }

    #[test]
    fn replaces_the_file_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("data.json");
        std::fs::write(&file, "old").expect("write");
        write_atomic(&file, b"new").expect("atomic");
        assert_eq!(std::fs::read_to_string(&file).expect("read"), "new");
        let names: Vec<_> = std::fs::read_dir(dir.path()).expect("dir").map(|e| e.expect("e").file_name()).collect();
        assert_eq!(names, ["data.json"]);
    }

    #[test]
    fn a_failed_write_names_the_file_and_keeps_the_old_one() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("model.safetensors");
        std::fs::write(&file, "old").expect("write");
        let err = write_atomic_with(&file, |tmp| {
            std::fs::write(tmp, "half")?;
            Err(std::io::Error::other("disk full"))
        })
        .expect_err("fails");
        let name = err.file.file_name().expect("name").to_string_lossy().into_owned();
        assert!(name.starts_with(&format!("model.safetensors.tmp-{}-", std::process::id())), "{err:?}");
        assert_eq!(std::fs::read_to_string(&file).expect("read"), "old");
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 1, "the temporary file is removed");
    }

    #[test]
    fn a_missing_folder_is_an_error_on_the_temporary_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let err = write_atomic(&dir.path().join("no/such/file"), b"x").expect_err("fails");
        assert_eq!(err.source.kind(), std::io::ErrorKind::NotFound);
    }

    #[test]
    fn a_device_is_written_in_place() {
        write_atomic(Path::new("/dev/null"), b"x").expect("/dev/null");
    }
}
