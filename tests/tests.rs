//! fuserl's integration tests, one binary (as ripgrep's `tests/tests.rs`): each linked test
//! binary costs a link of Burn, most of an incremental test build. Each module is one area; the
//! helpers they share are in `common`. Run one area with `cargo test -p fuserl-cli --test tests
//! collect::` (or `model::`, `kernels::`, ...).
//!
//! The command-line areas drive the `fuserl` binary; the crate areas (`model`, `kernels`, `train`,
//! `run`, `builtin`, `fuzz`) test a library crate through its public API. The example plugin keeps
//! its own small test (`plugins/example/tests/abi.rs`, no Burn in it): it is what a plugin author
//! copies.

mod common;

// The `fuserl` binary.
mod collect;
mod e2e;
mod eval;
mod gguf_export;
mod gpu_check;
mod plugins;
mod real_models;
mod score;
mod train_kill;
mod trl_formats;

// The library crates.
mod builtin;
mod fuzz;
mod kernels;
mod model;
mod run;
mod train;
