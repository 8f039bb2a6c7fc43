//! How paths are shown to people, in messages and logs: as the user would write them.
//!
//! Recipes name files relative to their own folder, so the paths that reach a message look like
//! `recipes/../data/fusion-mini.jsonl`. [`shown`] resolves `.` and `..` (lexically: the file is
//! only named, never opened) and prints the path relative to the working folder when it lies
//! under it, else absolute:
//!
//! ```
//! use std::path::Path;
//! use fuserl_core::paths::shown;
//! assert_eq!(shown(Path::new("recipes/../data/fusion-mini.jsonl")), "data/fusion-mini.jsonl");
//! assert_eq!(shown(Path::new("./runs/quickstart/")), "runs/quickstart");
//! ```
//!
//! Only for display: opening `a/../b` follows a symlinked `a`, and the lexical form may not.

use std::fmt;
use std::path::{Component, Path, PathBuf};

/// `path` with `.` removed and each `..` cancelling the component before it (lexically).
/// A `..` that climbs above the start of a relative path is kept.
pub fn normalize(path: &Path) -> PathBuf {
    let mut out: Vec<Component<'_>> = Vec::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => match out.last() {
                Some(Component::Normal(_)) => {
                    out.pop();
                }
                Some(Component::RootDir | Component::Prefix(_)) => {}
                _ => out.push(c),
            },
            other => out.push(other),
        }
    }
    out.iter().map(|c| c.as_os_str()).collect()
}

/// `path` as a person would write it: relative to the working folder when it lies under it,
/// else absolute, with `.` and `..` resolved; `.` for the working folder itself.
pub fn shown(path: &Path) -> String {
    let Ok(cwd) = std::env::current_dir() else {
        return display_or_dot(&normalize(path));
    };
    let absolute = normalize(&cwd.join(path));
    match absolute.strip_prefix(normalize(&cwd)) {
        Ok(rel) => display_or_dot(rel),
        Err(_) => absolute.display().to_string(),
    }
}

fn display_or_dot(path: &Path) -> String {
    if path.as_os_str().is_empty() { ".".to_owned() } else { path.display().to_string() }
}

/// A path that formats with [`shown`], for `tracing` fields and `format!`.
#[derive(Debug, Clone, Copy)]
pub struct Shown<'a>(pub &'a Path);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&shown(self.0))
    }
}

/// Refuse a run directory that holds a symbolic link leading outside it, so that nothing
/// fuserl writes there (stores, checkpoints, the report) can land elsewhere (issue #13). The
/// folder is walked without following links; a link inside that points inside is fine, and so
/// is a run directory that is itself a link. A folder that does not exist yet holds none.
pub fn check_links_stay_inside(root: &Path) -> crate::Result<()> {
    let Ok(base) = root.canonicalize() else { return Ok(()) };
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| crate::Error::io(&dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| crate::Error::io(&dir, e))?;
            let path = entry.path();
            let kind = entry.file_type().map_err(|e| crate::Error::io(&path, e))?;
            if kind.is_dir() {
                stack.push(path);
            } else if kind.is_symlink() {
                let target = std::fs::read_link(&path).map_err(|e| crate::Error::io(&path, e))?;
                // A broken link: where it would point, from its (real) folder.
                let resolved = path.canonicalize().unwrap_or_else(|_| {
                    let from = dir.canonicalize().unwrap_or_else(|_| dir.clone());
                    normalize(&from.join(&target))
                });
                if !resolved.starts_with(&base) {
                    return Err(crate::Error::Path {
                        file: path,
                        message: format!(
                            "a symbolic link to {}, outside the run directory {}: fuserl writes nothing \
                             through a link that leaves the run directory; remove the link",
                            target.display(),
                            Shown(root)
                        ),
                    });
                }
            }
        }
    }
    Ok(())
}

/// Check that `name` can name a file in its folder and nothing else: not empty, no path
/// separator, not `.`, `..` or hidden.
pub fn check_file_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.contains(['/', '\\', '\0']) || name.starts_with('.') {
        return Err(format!(
            "`{name}` cannot name a file: expected a name without slashes that does not start with `.`"
        ));
    }
    Ok(())
}

/// An I/O error's reason as a sentence for people, without the standard library's
/// "(os error N)" suffix: `No such file or directory`.
pub fn io_reason(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(i) if text.ends_with(')') => text[..i].to_owned(),
        _ => text,
    }
}

/// Whether `path` is a regular file (after symlinks), as an error when it is not: inputs named
/// by recipes, checkpoints and data are opened only then, because opening a FIFO waits for a
/// writer forever and a device reads forever.
pub fn check_regular(path: &Path) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.is_file() {
        Ok(())
    } else if meta.is_dir() {
        Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "a folder, where a file was expected"))
    } else {
        Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file (a FIFO, socket or device): only files are read",
        ))
    }
}

/// Opens a regular file for reading ([`check_regular`]).
pub fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    check_regular(path)?;
    std::fs::File::open(path)
}

/// Reads a regular file ([`check_regular`]).
pub fn read_regular(path: &Path) -> std::io::Result<Vec<u8>> {
    check_regular(path)?;
    std::fs::read(path)
}

/// Reads a regular file as UTF-8 ([`check_regular`]).
pub fn read_regular_string(path: &Path) -> std::io::Result<String> {
    check_regular(path)?;
    std::fs::read_to_string(path)
}

/// Why `file` could not be read, for a message that names it: the reason and, for a download
/// that is not there yet, how to fetch it ([`fetch_hint`]).
pub fn cannot_read(file: &Path, e: &std::io::Error) -> String {
    let mut reason = io_reason(e);
    if e.kind() == std::io::ErrorKind::NotFound
        && let Some(hint) = fetch_hint(file)
    {
        reason.push_str(&format!(" ({hint})"));
    }
    reason
}

/// For a file under a `data/external/` folder (downloads, never committed): the script that
/// fetches it, found by its name in the repository's `scripts/fetch-*.sh`, or where those
/// scripts are. `None` for any other file.
pub fn fetch_hint(file: &Path) -> Option<String> {
    let parts: Vec<Component<'_>> = file.components().collect();
    let at = parts.windows(2).rposition(
        |w| matches!((w[0], w[1]), (Component::Normal(a), Component::Normal(b)) if a == "data" && b == "external"),
    )?;
    let data: PathBuf = parts[..=at].iter().map(|c| c.as_os_str()).collect();
    // `recipes/../data` may name a folder that is not there; `data` itself is.
    let repo = data.canonicalize().or_else(|_| normalize(&data).canonicalize()).ok()?.parent()?.to_path_buf();
    let name = file.file_name()?.to_string_lossy().into_owned();
    let mut scripts: Vec<PathBuf> = std::fs::read_dir(repo.join("scripts"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("fetch-")))
        .collect();
    scripts.sort();
    // The name as a whole word of the script (`Tasks.jsonl` is not `MyTasks.jsonl`).
    let names_it = |text: &str| {
        text.match_indices(name.as_str()).any(|(at, _)| {
            let before = text[..at].chars().next_back();
            let after = text[at + name.len()..].chars().next();
            let part = |c: char| c.is_alphanumeric() || matches!(c, '_' | '-' | '.');
            !before.is_some_and(part) && !after.is_some_and(|c| c.is_alphanumeric() || c == '_')
        })
    };
    let fetching = scripts.iter().find(|s| std::fs::read_to_string(s).is_ok_and(|text| names_it(&text)));
    Some(match fetching {
        Some(script) => format!("{name} is a download: run {} first", shown(script)),
        None => format!("data/external/ holds downloads: the scripts/fetch-*.sh in {} make them", shown(&repo)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dots_are_resolved_and_paths_under_the_working_folder_are_relative() {
        let cwd = std::env::current_dir().expect("cwd");
        assert_eq!(shown(Path::new("recipes/../data/x.jsonl")), "data/x.jsonl");
        assert_eq!(shown(Path::new("a/./b/../c")), "a/c");
        assert_eq!(shown(Path::new(".")), ".");
        assert_eq!(shown(&cwd.join("runs/q")), "runs/q");
        let parent = cwd.parent().expect("parent");
        assert_eq!(shown(Path::new("../elsewhere")), parent.join("elsewhere").display().to_string());
        assert_eq!(shown(Path::new("/tmp/../etc/./hosts")), "/etc/hosts");
    }

    #[test]
    fn links_out_of_the_run_directory_are_refused_and_links_inside_are_not() {
        let tmp = tempfile::tempdir().expect("tmp");
        let run = tmp.path().join("runs/x");
        std::fs::create_dir_all(run.join("collect")).expect("mkdir");
        std::fs::write(run.join("recipe.toml"), "").expect("write");
        let outside = tmp.path().join("outside.jsonl");
        std::fs::write(&outside, "").expect("write");
        assert!(check_links_stay_inside(&tmp.path().join("runs/none")).is_ok());
        std::os::unix::fs::symlink("../recipe.toml", run.join("collect/inside")).expect("link");
        assert!(check_links_stay_inside(&run).is_ok());
        // The run directory itself may be a link (runs on another disk).
        std::os::unix::fs::symlink(&run, tmp.path().join("alias")).expect("link");
        assert!(check_links_stay_inside(&tmp.path().join("alias")).is_ok());
        for (name, target) in [("a.jsonl", outside.clone()), ("broken.jsonl", tmp.path().join("nowhere/b.jsonl"))] {
            let link = run.join("collect").join(name);
            std::os::unix::fs::symlink(&target, &link).expect("link");
            let err = check_links_stay_inside(&run).expect_err("a link out").to_string();
            assert!(err.contains(&format!("collect/{name}: a symbolic link to {}", target.display())), "{err}");
            assert!(err.contains("outside the run directory"), "{err}");
            std::fs::remove_file(&link).expect("rm");
        }
        // A linked folder that leaves.
        std::os::unix::fs::symlink(tmp.path(), run.join("score")).expect("link");
        assert!(check_links_stay_inside(&run).is_err());
    }

    #[test]
    fn file_names_cannot_leave_their_folder() {
        for bad in ["", "..", ".", "../x", "a/b", "a\\b", ".hidden", "a\0b"] {
            assert!(check_file_name(bad).is_err(), "{bad:?}");
        }
        for good in ["qwen-coder", "source:smollm2", "judge", "a.b"] {
            assert!(check_file_name(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn normalize_keeps_leading_parent_dirs_and_the_root() {
        assert_eq!(normalize(Path::new("../../a/b/..")), PathBuf::from("../../a"));
        assert_eq!(normalize(Path::new("/../a")), PathBuf::from("/a"));
        assert_eq!(normalize(Path::new("a/..")), PathBuf::from(""));
    }

    #[test]
    fn io_reasons_lose_the_os_error_number_and_downloads_name_their_script() {
        let e = std::io::Error::from_raw_os_error(2);
        assert!(e.to_string().ends_with("(os error 2)"));
        assert_eq!(io_reason(&e), "No such file or directory");
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::create_dir_all(dir.path().join("data/external")).expect("mkdir");
        std::fs::create_dir_all(dir.path().join("scripts")).expect("mkdir");
        std::fs::write(dir.path().join("scripts/fetch-tasks.sh"), "out=data/external/Tasks.jsonl\n").expect("write");
        let missing = dir.path().join("recipes/../data/external/Tasks.jsonl");
        let reason = cannot_read(&missing, &e);
        assert!(reason.starts_with("No such file or directory (Tasks.jsonl is a download: run "), "{reason}");
        assert!(reason.ends_with("scripts/fetch-tasks.sh first)"), "{reason}");
        let other = cannot_read(&dir.path().join("data/external/Other.jsonl"), &e);
        assert!(other.contains("data/external/ holds downloads"), "{other}");
        assert_eq!(cannot_read(&dir.path().join("data/mine.jsonl"), &e), "No such file or directory");
    }
}
