//! Reward models.

pub mod precomputed;
