//! Helpers shared by the end-to-end test binaries.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub mod browser;

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

/// A temporary copy of the layout recipes expect: `recipes/` (with its `templates/`) beside
/// `data/`, `checkpoints/` and `fixtures/` (the tiny reward model).
pub fn sandbox() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::create_dir(dir.path().join("recipes")).expect("mkdir");
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

/// Start `fuserl ARGS` in `dir` with `FUSERL_DEBUG_PAUSE=label`, wait (reading at most 10,000
/// lines of its log) until it says it paused there, and SIGKILL it.
pub fn kill_at_pause(args: &[&str], dir: &Path, label: &str) {
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
    let stderr = child.stderr.take().expect("stderr");
    let paused = BufReader::new(stderr)
        .lines()
        .take(10_000)
        .map_while(Result::ok)
        .any(|line| line.contains(&format!("paused at {label}")));
    child.kill().expect("SIGKILL");
    child.wait().expect("wait");
    assert!(paused, "never paused at {label}");
}

/// A scripted HTTP server on 127.0.0.1 that answers `replies` requests (then stops accepting),
/// recording each JSON request body: `f(body, n) -> (status, reply body)`.
pub fn serve(
    replies: usize,
    f: impl Fn(&serde_json::Value, usize) -> (u16, String) + Send + 'static,
) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for (n, stream) in listener.incoming().take(replies).enumerate() {
            let Ok(mut s) = stream else { continue };
            let mut reader = BufReader::new(s.try_clone().expect("clone"));
            let mut length = 0usize;
            for _ in 0..100 {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0u8; length];
            if reader.read_exact(&mut body).is_err() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
            let (status, reply) = f(&v, n);
            record.lock().expect("lock").push(v);
            let _ = write!(
                s,
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                reply.len()
            );
        }
    });
    (port, seen)
}
