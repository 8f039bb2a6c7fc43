//! The built-in plugins' integration tests, one binary.

mod combine;
mod http_reward;
mod jsonl;
mod objectives;
mod pairs;
mod python_tests;
mod recipes;
mod weighting;
