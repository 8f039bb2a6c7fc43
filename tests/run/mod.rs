//! fuserl-run: whole runs on the committed tiny models, and the evaluation's statistics against numpy and
//! statsmodels, and the data stages (reading, scoring, weighing, building examples) over the
//! built-in plugins.

mod combine;
mod jsonl;
mod recipes;
mod runs;
mod stats;
mod weighting;
