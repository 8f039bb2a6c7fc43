//! Source adapters.

pub mod jsonl;
