//! Helpers shared by the test areas.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod browser;
pub mod llama;
pub mod server;

/// The workspace root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// Where cargo put the plugin libraries the tests depend on (`target/debug/deps`).
pub fn plugin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_fuserl")).parent().expect("bin dir").join("deps")
}

/// The path of a plugin library built for the tests.
pub fn plugin(name: &str) -> PathBuf {
    let file = format!("{}{name}{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX);
    let path = plugin_dir().join(file);
    assert!(path.is_file(), "{} was not built (it is a dev-dependency of fuserl-cli)", path.display());
    path
}

/// Run `fuserl` in `dir`, with the test plugins on `FUSERL_PLUGIN_PATH`.
pub fn fuserl_env(args: &[&str], dir: &Path, env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fuserl"));
    cmd.args(args).current_dir(dir).env("FUSERL_PLUGIN_PATH", plugin_dir()).env_remove("FUSERL_TEST_PLUGIN_MODE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run fuserl")
}

/// Run `fuserl` in `dir`.
pub fn fuserl(args: &[&str], dir: &Path) -> Output {
    fuserl_env(args, dir, &[])
}

/// Lossy UTF-8.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The Python of a virtual environment under `~/.cache` (`fuserl-oracle/venv`: docs/oracle.md;
/// `fuserl-vllm/venv`: scripts/setup-vllm.sh) when it imports `module`; `None` otherwise, after
/// telling whoever runs the test what was skipped (`what`) and why.
pub fn python_with(venv: &str, module: &str, what: &str) -> Option<PathBuf> {
    let python = PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache").join(venv).join("bin/python");
    let ok = Command::new(&python).args(["-c", &format!("import {module}")]).output().is_ok_and(|o| o.status.success());
    if !ok {
        #[allow(clippy::print_stderr)] // the skipped part is the test's message to whoever runs it
        {
            eprintln!("{what}: skipped, no {module} in ~/.cache/{venv} (docs/oracle.md)");
        }
    }
    ok.then_some(python)
}

/// A temporary copy of the layout recipes expect: `recipes/` (with its `templates/`) beside
/// `data/`, `checkpoints/`, `fixtures/` (the tiny reward model) and, once fetched, `models/`.
pub fn sandbox() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::create_dir(dir.path().join("recipes")).expect("mkdir");
    if repo().join("models").is_dir() {
        std::os::unix::fs::symlink(repo().join("models"), dir.path().join("models")).expect("symlink");
    }
    std::os::unix::fs::symlink(repo().join("data"), dir.path().join("data")).expect("symlink");
    std::os::unix::fs::symlink(repo().join("checkpoints"), dir.path().join("checkpoints")).expect("symlink");
    std::os::unix::fs::symlink(repo().join("fixtures"), dir.path().join("fixtures")).expect("symlink");
    std::os::unix::fs::symlink(repo().join("recipes/templates"), dir.path().join("recipes/templates"))
        .expect("symlink");
    dir
}

/// 1-based line of the first line containing `needle`.
pub fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).expect("needle") + 1
}

/// Start `fuserl ARGS` in `dir` paused at `label` (`FUSERL_DEBUG_PAUSE`) and wait until it says
/// so (at most 10,000 lines); the process and the rest of its standard error, line by line.
pub fn spawn_paused(
    args: &[&str],
    dir: &Path,
    label: &str,
) -> (std::process::Child, impl Iterator<Item = String> + use<>) {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_fuserl"))
        .args(args)
        .current_dir(dir)
        .env("FUSERL_DEBUG_PAUSE", label)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr")).lines().map_while(Result::ok);
    let mut seen = Vec::new();
    let paused = lines.by_ref().take(10_000).any(|line| {
        let hit = line.contains(&format!("paused at {label}"));
        seen.push(line);
        hit
    });
    if !paused {
        let _ = child.kill();
        let _ = child.wait();
        panic!("never paused at {label}; it printed:\n{}", seen.join("\n"));
    }
    (child, lines)
}

/// Run `fuserl ARGS` in `dir` until it pauses at `label`, then SIGKILL it.
pub fn kill_at_pause(args: &[&str], dir: &Path, label: &str) {
    let (mut child, _) = spawn_paused(args, dir, label);
    child.kill().expect("SIGKILL");
    child.wait().expect("wait");
}
