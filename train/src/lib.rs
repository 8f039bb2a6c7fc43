//! FuseSFT and FusePO: one trainer for both stages (see [`trainer`]), and the run that drives
//! them from a recipe with a run directory that resumes (see [`run`]).
//!
//! Where it sits: `fuserl sft|po|run` call [`run::run`]; the data stages come from
//! `fuserl_core::pipeline`, the model from `fuserl_model`.

pub mod adamw;
mod checkpointing;
pub mod data;
pub mod error;
pub mod local;
pub mod run;
pub mod schedule;
pub mod trainer;

pub use error::{Result, TrainError};
