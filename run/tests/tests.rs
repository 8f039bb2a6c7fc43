//! The run crate's integration tests, one binary (each linked test binary costs a link of Burn):
//! whole runs on the committed tiny models, and the evaluation's statistics against numpy and
//! statsmodels, and the data stages (reading, scoring, weighing, building examples) over the
//! built-in plugins.

mod combine;
mod jsonl;
mod recipes;
mod run;
mod stats;
mod weighting;
