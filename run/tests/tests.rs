//! The run crate's integration tests, one binary (each linked test binary costs a link of Burn):
//! whole runs on the committed tiny models, and the evaluation's statistics against numpy and
//! statsmodels.

mod run;
mod stats;
