//! The trainer's error type.

/// What can stop a training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Data stages or a plugin failed.
    #[error(transparent)]
    Core(#[from] fuserl_core::Error),
    /// The model, tokenizer or a checkpoint failed.
    #[error(transparent)]
    Model(#[from] fuserl_model::ModelError),
    /// Inconsistent data.
    #[error("{0}")]
    Data(String),
    /// A recipe setting that this build cannot honour.
    #[error("{0}")]
    Unsupported(String),
    /// A run-directory file.
    #[error("{}: {}", fuserl_core::paths::shown(file), fuserl_core::paths::cannot_read(file, source))]
    Io {
        /// The file.
        file: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Training produced a loss, gradient or weight that is not finite (the stage stops; its
    /// last checkpoint is kept and nothing after it is written).
    #[error("{0}")]
    Diverged(String),
    /// The stage's memory plan does not fit on its device (the message names the settings to
    /// change).
    #[error("{0}")]
    DoesNotFit(String),
    /// A training checkpoint could not be written or read.
    #[error("{}: {message}", fuserl_core::paths::shown(file))]
    Checkpoint {
        /// The file.
        file: std::path::PathBuf,
        /// What went wrong.
        message: String,
    },
}

impl TrainError {
    /// I/O error on `file`.
    pub fn io(file: impl Into<std::path::PathBuf>, source: std::io::Error) -> Self {
        Self::Io { file: file.into(), source }
    }

    /// Whether the error is the user's input (exit status 2).
    pub fn is_bad_input(&self) -> bool {
        match self {
            Self::Core(e) => e.is_bad_input(),
            Self::Model(fuserl_model::ModelError::Io { .. }) => false,
            Self::Model(_) | Self::Data(_) | Self::Unsupported(_) | Self::DoesNotFit(_) => true,
            Self::Io { .. } | Self::Checkpoint { .. } | Self::Diverged(_) => false,
        }
    }
}

/// Result alias.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;

impl From<fuserl_io::fs::WriteFailure> for TrainError {
    fn from(f: fuserl_io::fs::WriteFailure) -> Self {
        Self::io(f.file, f.source)
    }
}
