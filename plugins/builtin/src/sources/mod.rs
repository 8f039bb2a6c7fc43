//! Source adapters.

pub mod jsonl;
pub mod openai;
