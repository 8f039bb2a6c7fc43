//! fuserl's integration tests, one binary (as ripgrep's `tests/tests.rs`): each linked test
//! binary costs a link of Burn, most of an incremental test build. Each module is one area; the
//! helpers they share are in `common`. Run one area with `cargo test -p fuserl-cli --test tests
//! collect::`.

mod common;

mod collect;
mod e2e;
mod eval;
mod plugins;
mod real_models;
mod score;
mod train_kill;
