//! Append-only JSONL stores in the run directory, for what a run must never lose or redo: the
//! collect stage's answers and the scoring stage's scores.
//!
//! ```text
//! DIR/NAME.jsonl           one record per line, appended and flushed as it is made
//! DIR/NAME.settings.json   the settings the records were made with
//! ```
//!
//! A line torn by a kill (the last one, without its newline or not JSON) is cut off and its
//! record made again; a bad line elsewhere is an error naming the file and line. Records made
//! with other settings are never mixed in: the store refuses to open, or sets them aside (renamed
//! with a `.old-N` suffix, never deleted) and starts afresh.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;
use serde::de::DeserializeOwned;

use fuserl_core::error::{Error, Result};
use fuserl_core::paths::Shown;

/// A record of a store: serialisable, with a key that identifies it (a second record with the
/// same key is not kept).
pub trait StoreRecord: Serialize + DeserializeOwned + Clone {
    /// What identifies a record.
    type Key: Ord + Clone;
    /// This record's key.
    fn key(&self) -> Self::Key;
    /// What a record is, for messages (for example "a collected answer").
    const WHAT: &'static str;
    /// What records are, for messages (for example "answers").
    const MANY: &'static str;
}

/// The collect stage's records: a source's answers, keyed by (prompt id, sample index).
impl StoreRecord for fuserl_core::extension::Generated {
    type Key = (String, u32);
    fn key(&self) -> (String, u32) {
        (self.prompt_id.clone(), self.sample_index)
    }
    const WHAT: &'static str = "a collected answer";
    const MANY: &'static str = "answers";
}

/// What to do when a store holds records made with other settings.
#[derive(Clone, Copy, Debug)]
pub enum OnChange<'a> {
    /// Refuse to open; the error says what the records are and ends with this hint.
    Refuse {
        /// Who the store belongs to, for example "source `smollm2`".
        owner: &'a str,
        /// How to go on, for example "start this source afresh with `fuserl collect --redo smollm2`".
        hint: &'a str,
    },
    /// Set them aside and start afresh.
    Restart,
}

/// One append-only store.
#[derive(Debug)]
pub struct Store<T: StoreRecord> {
    file: PathBuf,
    /// What the file holds: read once at opening, then kept with every append.
    records: Mutex<BTreeMap<T::Key, T>>,
    writer: Mutex<std::fs::File>,
}

impl<T: StoreRecord> Store<T> {
    /// Open (or create) the store `name` in `dir`, made with `fingerprint`. `redo` sets what it
    /// holds aside and starts afresh whatever the settings.
    pub fn open(dir: &Path, name: &str, fingerprint: &str, on_change: OnChange<'_>, redo: bool) -> Result<Self> {
        fuserl_core::paths::check_file_name(name)
            .map_err(|message| Error::Path { file: dir.join(name), message: format!("a store name: {message}") })?;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let file = dir.join(format!("{name}.jsonl"));
        let settings = dir.join(format!("{name}.settings.json"));
        let wanted = serde_json::json!({ "source": name, "settings": fingerprint }).to_string();
        match std::fs::read_to_string(&settings) {
            Ok(previous) if previous.trim() != wanted => {
                if let (OnChange::Refuse { owner, hint }, false) = (on_change, redo) {
                    return Err(Error::Config(fuserl_core::config::ConfigError::new(
                        fuserl_core::config::KeyPath::root(),
                        format!(
                            "{owner}: {} holds {many} made with other settings ({}); now: {fingerprint}. \
                             Keep the old settings, or {hint} (the old {many} are kept beside it)",
                            Shown(&file),
                            Shown(&settings),
                            many = T::MANY
                        ),
                    )));
                }
                tracing::info!(file = %Shown(&file), "settings changed: starting afresh");
                set_aside(&file)?;
                set_aside(&settings)?;
            }
            Ok(_) if redo => {
                set_aside(&file)?;
                set_aside(&settings)?;
            }
            _ => {}
        }
        if !settings.is_file() {
            crate::fs::write_atomic(&settings, format!("{wanted}\n").as_bytes())?;
        }
        let records = read_store::<T>(&file)?;
        let writer =
            std::fs::OpenOptions::new().create(true).append(true).open(&file).map_err(|e| Error::io(&file, e))?;
        Ok(Self { file, records: Mutex::new(records), writer: Mutex::new(writer) })
    }

    /// Whether a record with `key` is stored.
    pub fn has(&self, key: &T::Key) -> bool {
        self.records.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains_key(key)
    }

    /// Append records (one line each, flushed together). A second record with a key already
    /// stored is not written.
    pub fn append_all(&self, records: &[T]) -> Result<()> {
        let mut kept = self.records.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut text = String::new();
        for r in records {
            if kept.contains_key(&r.key()) {
                continue;
            }
            let line = serde_json::to_string(r).map_err(|e| Error::Component {
                point: "store",
                name: Shown(&self.file).to_string(),
                message: format!("cannot write {}: {e}", T::WHAT),
            })?;
            text.push_str(&line);
            text.push('\n');
            kept.insert(r.key(), r.clone());
        }
        let mut w = self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        w.write_all(text.as_bytes()).and_then(|()| w.flush()).map_err(|e| Error::io(&self.file, e))
    }

    /// Append one record.
    pub fn append(&self, record: &T) -> Result<()> {
        self.append_all(std::slice::from_ref(record))
    }

    /// The file.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Every record, by key.
    pub fn records(&self) -> BTreeMap<T::Key, T> {
        self.records.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

fn set_aside(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let mut n = 1;
    loop {
        let old = PathBuf::from(format!("{}.old-{n}", path.display()));
        if !old.exists() {
            tracing::info!(file = %Shown(path), kept_as = %Shown(&old), "setting old records aside");
            return std::fs::rename(path, &old).map_err(|e| Error::io(path, e));
        }
        n += 1;
    }
}

/// Every complete line of a store. The last line, if torn by a kill (no newline, or not JSON),
/// is cut off the file so that appending continues cleanly; a bad line elsewhere is an error.
/// The records of the store `name` in `dir` as they are (none when it does not exist), without
/// opening it for appending.
pub fn read_records<T: StoreRecord>(dir: &Path, name: &str) -> Result<BTreeMap<T::Key, T>> {
    fuserl_core::paths::check_file_name(name)
        .map_err(|message| Error::Path { file: dir.join(name), message: format!("a store name: {message}") })?;
    read_store::<T>(&dir.join(format!("{name}.jsonl")))
}

fn read_store<T: StoreRecord>(file: &Path) -> Result<BTreeMap<T::Key, T>> {
    let mut records = BTreeMap::new();
    let bytes = match std::fs::read(file) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(records),
        Err(e) => return Err(Error::io(file, e)),
    };
    let mut good_end = 0usize;
    let mut start = 0usize;
    let mut line_no = 0u64;
    while start < bytes.len() {
        line_no += 1;
        let end = bytes[start..].iter().position(|&b| b == b'\n').map(|i| start + i);
        let Some(end) = end else {
            tracing::warn!(file = %Shown(file), line = line_no, "dropping a torn last line (it will be made again)");
            break;
        };
        let line = &bytes[start..end];
        if line.iter().all(u8::is_ascii_whitespace) {
            good_end = end + 1;
            start = end + 1;
            continue;
        }
        match serde_json::from_slice::<T>(line) {
            Ok(r) => {
                records.entry(r.key()).or_insert(r);
                good_end = end + 1;
            }
            Err(e) if end + 1 == bytes.len() => {
                tracing::warn!(file = %Shown(file), line = line_no, error = %e, "dropping a torn last line (it will be made again)");
                break;
            }
            Err(e) => {
                return Err(Error::Data {
                    file: file.to_path_buf(),
                    line: line_no,
                    message: format!("not {}: {e}", T::WHAT),
                });
            }
        }
        start = end + 1;
    }
    if good_end < bytes.len() {
        let f = std::fs::OpenOptions::new().write(true).open(file).map_err(|e| Error::io(file, e))?;
        f.set_len(good_end as u64).map_err(|e| Error::io(file, e))?;
    }
    Ok(records)
}
