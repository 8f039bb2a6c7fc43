//! The stage log, `stages.jsonl`: every stage of a run appends when it starts (with fuserl's
//! version, the machine and the device), when it finishes, and when it fails (with the error),
//! so that the report can say when each stage ran, for how long, on what, and that a stage
//! failed rather than "not yet". Writing the log never stops a run: a failed write is a warning.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use fuserl_core::backend::BackendConfig;
use fuserl_core::paths::Shown;
use fuserl_io::artifacts::{Environment, StageEvent, StageEventKind, append_stage_event};
use fuserl_io::run_dir::RunDir;

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// The first line of `file` that starts with `key`, after its colon (`/proc/cpuinfo` style).
fn field_of(file: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    Some(line.split_once(':')?.1.trim().to_owned())
}

/// A `sysctl -n NAME` value (macOS and the BSDs).
fn sysctl(name: &str) -> Option<String> {
    let out = std::process::Command::new("sysctl").args(["-n", name]).output().ok()?;
    let value = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !value.is_empty()).then_some(value)
}

/// The software and machine this process runs on, and the recipe's device.
pub fn environment(backend: &BackendConfig) -> Environment {
    let linux = cfg!(target_os = "linux");
    let cpu = if linux { field_of("/proc/cpuinfo", "model name") } else { sysctl("machdep.cpu.brand_string") };
    let memory_bytes = if linux {
        field_of("/proc/meminfo", "MemTotal")
            .and_then(|kb| kb.trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    } else {
        sysctl("hw.memsize").and_then(|b| b.parse().ok())
    };
    let written = |v: toml::Value| match v {
        toml::Value::String(s) => s,
        other => other.to_string(),
    };
    let device = toml::Value::try_from(backend.device).map_or_else(|_| "?".to_owned(), written);
    let dtype = toml::Value::try_from(backend.dtype).map_or_else(|_| "?".to_owned(), written);
    Environment {
        fuserl: env!("CARGO_PKG_VERSION").to_owned(),
        cpu: fuserl_core::text::printable(&cpu.unwrap_or_else(|| std::env::consts::ARCH.to_owned())).into_owned(),
        cores: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        memory_bytes,
        os: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
        device: if backend.device_index > 0 {
            format!("{device}:{}, {dtype}", backend.device_index)
        } else {
            format!("{device}, {dtype}")
        },
    }
}

fn append(run_dir: &Path, event: &StageEvent) {
    let file = RunDir::new(run_dir).stages();
    if let Err(e) = append_stage_event(&file, event) {
        tracing::warn!(file = %Shown(&file), error = %e, "the stage log could not be written");
    }
}

/// Run `work` as stage `stage` of the run in `run_dir`, logging its start, and its end or its
/// failure (then the report is rebuilt, so that it shows the failure).
pub fn recorded<T, E: std::fmt::Display>(
    run_dir: &Path,
    backend: &BackendConfig,
    stage: &str,
    work: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    let event =
        |event, error, environment| StageEvent { stage: stage.to_owned(), event, at: now(), error, environment };
    append(run_dir, &event(StageEventKind::Started, None, Some(environment(backend))));
    let result = work();
    match &result {
        Ok(_) => append(run_dir, &event(StageEventKind::Finished, None, None)),
        Err(e) => {
            append(run_dir, &event(StageEventKind::Failed, Some(e.to_string()), None));
            crate::refresh_report(run_dir);
        }
    }
    result
}
