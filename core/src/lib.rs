//! The small core of fuserl: no tensor code, no `unsafe`.
//!
//! fuserl fuses several source LLMs into one target by FuseRL (FuseSFT then FusePO). This
//! crate holds what every other part agrees on:
//!
//! - [`data`]: prompts, completions with their source and sample index, rewards, weights and
//!   training examples, each traceable to the source answer it came from;
//! - [`extension`]: the four extension points ([`SourceAdapter`], [`RewardModel`],
//!   [`WeightingScheme`], [`PreferenceObjective`]) over plain host data;
//! - [`registry`]: components registered with `inventory` (built-ins) or at run time, and
//!   the context they are built in ([`backend`]: where a model-backed component runs);
//! - [`config`]: strict parsing of a component's TOML table, with key paths for errors.
//!
//! It is what a plugin links: no Parquet, HTTP, tensors or plugin loading. The recipe parser
//! is `fuserl-recipe`, the file readers and stores `fuserl-io`, the stages `fuserl-run`.
//!
//! Errors in recipes point at a key path, which the recipe layer turns into file:line:column:
//!
//! ```
//! use fuserl_core::config::KeyPath;
//! let path = KeyPath::keys(&["sources"]).index(1).key("path");
//! assert_eq!(path.to_string(), "sources[1].path");
//! ```

pub mod backend;
pub mod config;
pub mod data;
pub mod error;
pub mod extension;
pub mod maths;
pub mod paths;
pub mod registry;
pub mod text;

pub use error::{Error, Result};
pub use extension::{PreferenceObjective, RewardModel, SourceAdapter, WeightingScheme};
pub use inventory;

/// Test hook for the kill-and-resume tests: when `FUSERL_DEBUG_PAUSE` equals `label`, log that
/// and sleep for ten minutes (the test kills the process meanwhile). Costs one variable lookup.
pub fn debug_pause(label: &str) {
    if std::env::var("FUSERL_DEBUG_PAUSE").is_ok_and(|v| v == label) {
        tracing::warn!("FUSERL_DEBUG_PAUSE: paused at {label}");
        std::thread::sleep(std::time::Duration::from_secs(600));
    }
}
