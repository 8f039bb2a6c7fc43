//! Reward models.

pub mod combine;
pub mod http;
pub mod judge;
pub mod keywords;
pub mod math;
pub mod precomputed;
pub mod python_tests;
