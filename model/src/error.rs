//! The model crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong loading, saving or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("{}: {}", fuserl_core::paths::shown(file), fuserl_core::paths::cannot_read(file, source))]
    Io {
        /// The file.
        file: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint, config or tokenizer file is malformed or does not fit the model.
    #[error("{}: {message}", fuserl_core::paths::shown(file))]
    Format {
        /// The file.
        file: PathBuf,
        /// What was wrong and what was expected.
        message: String,
    },
    /// The checkpoint asks for something this crate does not implement.
    #[error("{}: unsupported {what}", fuserl_core::paths::shown(file))]
    Unsupported {
        /// The file (usually config.json).
        file: PathBuf,
        /// Which architecture or option, and what is supported.
        what: String,
    },
    /// Bad arguments to a model call (for example an empty batch).
    #[error("{0}")]
    Input(String),
}

impl ModelError {
    /// An I/O error on `file`.
    pub fn io(file: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { file: file.into(), source }
    }

    /// A format error in `file`.
    pub fn format(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Self::Format { file: file.into(), message: message.into() }
    }
}

/// Result alias.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl From<fuserl_io::fs::WriteFailure> for ModelError {
    fn from(f: fuserl_io::fs::WriteFailure) -> Self {
        Self::io(f.file, f.source)
    }
}
