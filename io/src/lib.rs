//! fuserl's files, every one of which may come from outside and be hostile:
//!
//! - [`prompts`]: prompt files (JSONL, Parquet), read through [`jsonl`] and the page guard of
//!   [`parquet_pages`], with panics of the readers caught ([`untrusted`]);
//! - [`store`]: the append-only stores of collected answers and scores (a killed run keeps
//!   everything it wrote);
//! - [`fs`]: the one atomic write;
//! - [`run_dir`]: the run directory, the one type that owns every path in it, and
//!   [`artifacts`]: the typed files in it that one part writes and another reads.

pub mod artifacts;
pub mod budget;
pub mod fs;
pub mod jsonl;
pub mod parquet_pages;
pub mod prompts;
pub mod run_dir;
pub mod store;
pub mod untrusted;
