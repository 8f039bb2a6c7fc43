//! The built-in plugins' integration tests, one binary.

mod http_reward;
mod objectives;
mod pairs;
mod python_tests;
