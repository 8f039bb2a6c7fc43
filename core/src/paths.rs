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
    fn normalize_keeps_leading_parent_dirs_and_the_root() {
        assert_eq!(normalize(Path::new("../../a/b/..")), PathBuf::from("../../a"));
        assert_eq!(normalize(Path::new("/../a")), PathBuf::from("/a"));
        assert_eq!(normalize(Path::new("a/..")), PathBuf::from(""));
    }
}
