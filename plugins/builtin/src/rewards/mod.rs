//! Reward models.

pub mod keywords;
pub mod precomputed;
