//! FuseSFT and FusePO: one trainer for both stages (see [`trainer`]), driven by the objective
//! plugins, with cached reference log-probs, checkpoints and resume.
//!
//! Where it sits: the run (`fuserl-run`) prepares each stage's examples and calls
//! [`trainer::train_stage`]; the model comes from `fuserl_model`.

pub mod adamw;
pub mod checkpoint;
pub mod data;
pub mod error;
mod layerwise;
pub mod plan;
pub mod schedule;
pub mod tensorboard;
pub mod trainer;

pub use error::{Result, TrainError};

/// The CPU training backend.
pub type TrainBackend = burn::backend::Autodiff<burn::backend::Flex>;
