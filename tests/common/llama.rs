//! llama.cpp's OpenAI-compatible server (`llama-cpp-python[server]`, scripts/setup-llama-server.sh)
//! for the tests that talk to it: started on a free port of 127.0.0.1, stopped when dropped.
//! Without it a test skips, unless `FUSERL_REQUIRE_LLAMA_SERVER` is set (CI), where it fails.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A llama.cpp server on a free port of 127.0.0.1, stopped when dropped.
pub struct Server {
    pub child: Child,
    pub port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// fuserl's cache (`FUSERL_CACHE`, default `~/.cache/fuserl`).
pub fn cache() -> PathBuf {
    std::env::var_os("FUSERL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/fuserl"))
}

/// The model cache (`FUSERL_MODELS`, default `~/.cache/fuserl/models`).
pub fn models() -> PathBuf {
    std::env::var_os("FUSERL_MODELS").map(PathBuf::from).unwrap_or_else(|| cache().join("models"))
}

/// The Python of the llama.cpp server's environment (`FUSERL_LLAMA_PYTHON`).
pub fn llama_python() -> PathBuf {
    std::env::var_os("FUSERL_LLAMA_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache().join("llama-server/bin/python"))
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A blocking HTTP GET on 127.0.0.1 with a deadline; the status code, if any reply came.
fn get_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
    let mut head = String::new();
    BufReader::new(s).read_line(&mut head).ok()?;
    head.split_whitespace().nth(1)?.parse().ok()
}

/// Whether the server's Python is there: `false` (with a message) means skip, and fails the test
/// under `FUSERL_REQUIRE_LLAMA_SERVER`. `needs` names what else must exist and the script that
/// makes it.
pub fn available(needs: &[(&Path, &str)]) -> bool {
    let python = llama_python();
    let mut missing: Vec<String> = Vec::new();
    if !python.is_file() {
        missing.push(format!("{} (scripts/setup-llama-server.sh)", python.display()));
    }
    for (path, script) in needs {
        if !path.exists() {
            missing.push(format!("{} ({script})", path.display()));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let what = format!("no llama.cpp server: missing {}", missing.join(", "));
    assert!(std::env::var_os("FUSERL_REQUIRE_LLAMA_SERVER").is_none(), "{what}");
    #[allow(clippy::print_stderr)] // the skip is the test's message to whoever runs it
    {
        eprintln!("skipped: {what}");
    }
    false
}

/// Start the server on `gguf` under the name `alias` (`None`: skip, see [`available`]; `script`
/// makes the file).
pub fn llama_server(gguf: &Path, alias: &str, script: &str) -> Option<Server> {
    if !available(&[(gguf, script)]) {
        return None;
    }
    let port = free_port();
    let child = Command::new(llama_python())
        .args(["-m", "llama_cpp.server", "--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--model", &gguf.display().to_string(), "--model_alias", alias])
        .args(["--n_ctx", "1024", "--n_threads", "2", "--verbose", "false"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the llama.cpp server");
    let mut server = Server { child, port };
    let deadline = Instant::now() + Duration::from_secs(180);
    while Instant::now() < deadline {
        if get_status(port, "/v1/models") == Some(200) {
            return Some(server);
        }
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!("the llama.cpp server exited at start on {}: {status}", gguf.display());
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let _ = server.child.kill();
    panic!("the llama.cpp server did not answer /v1/models within 180 s");
}
