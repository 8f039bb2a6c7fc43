//! Reward models.

pub mod keywords;
pub mod math;
pub mod precomputed;
pub mod python_tests;
