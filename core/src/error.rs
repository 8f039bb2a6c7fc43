//! The one error type of the core, shared by built-in plugins.

use std::path::PathBuf;

use crate::config::ConfigError;
use crate::paths::shown;

/// Result alias used throughout the core and the plugins.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the core, with enough context to find the cause.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A recipe (or another TOML file) is malformed: names file, line, column and key path.
    #[error("{}:{line}:{column}: {}{message}", shown(file), path_prefix(path))]
    Recipe {
        /// The recipe file.
        file: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column (in characters).
        column: usize,
        /// Dotted key path, for example `po.objective.beta`; empty for syntax errors.
        path: String,
        /// What was wrong and what was expected.
        message: String,
    },
    /// A data file has a malformed record.
    #[error("{}{}: {message}", shown(file), line_suffix(*line))]
    Data {
        /// The data file.
        file: PathBuf,
        /// 1-based line of the record (or row, in a Parquet file); 0 when the whole file is at
        /// fault (it is then left out of the message).
        line: u64,
        /// What was wrong and what was expected.
        message: String,
    },
    /// A record of the fusion dataset is inconsistent (for example a missing reward).
    #[error("{record}: {message}")]
    Record {
        /// Which record: prompt, source, sample and where it came from.
        record: String,
        /// What was wrong.
        message: String,
    },
    /// A component refused its configuration outside of a recipe (no file to point at).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A component failed while running.
    #[error("{point} `{name}`: {message}")]
    Component {
        /// Extension point of the component, for example `weighting scheme`.
        point: &'static str,
        /// The component's registered name.
        name: String,
        /// What went wrong.
        message: String,
    },
    /// Two plugins registered the same name for one extension point.
    #[error("{point} `{name}` is registered twice: by {first} and by {second}")]
    DuplicatePlugin {
        /// Extension point.
        point: &'static str,
        /// The contested name.
        name: String,
        /// Origin of the first registration.
        first: String,
        /// Origin of the second registration.
        second: String,
    },
    /// A file could not be read or written.
    /// A path fuserl refuses to write to: a symbolic link that leads out of the run directory,
    /// a store name that would leave its folder.
    #[error("{}: {message}", shown(file))]
    Path {
        /// The path.
        file: PathBuf,
        /// Why.
        message: String,
    },

    #[error("{}: {}", shown(file), crate::paths::cannot_read(file, source))]
    Io {
        /// The file.
        file: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn line_suffix(line: u64) -> String {
    if line == 0 { String::new() } else { format!(":{line}") }
}

fn path_prefix(path: &str) -> String {
    if path.is_empty() { String::new() } else { format!("{path}: ") }
}

impl Error {
    /// An I/O error on `file`.
    pub fn io(file: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { file: file.into(), source }
    }

    /// Whether this error is the user's input (recipe, data, configuration) rather than a
    /// failure of the machine or of a component at run time (a file that does not exist counts as
    /// input, and so does a folder given for a file). The binary maps it to exit code 2.
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Self::Recipe { .. }
                | Self::Data { .. }
                | Self::Record { .. }
                | Self::Config(_)
                | Self::Path { .. }
                | Self::DuplicatePlugin { .. }
        ) || matches!(
            self,
            Self::Io { source, .. } if matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::IsADirectory | std::io::ErrorKind::NotADirectory
            )
        )
    }
}
