//! The small core of fuserl: no tensor code, no `unsafe`.
//!
//! fuserl fuses several source LLMs into one target by FuseRL (FuseSFT then FusePO). This
//! crate holds what every other part agrees on:
//!
//! - [`data`]: prompts, completions with their source and sample index, rewards, weights and
//!   training examples, each traceable to the source answer it came from;
//! - [`extension`]: the four extension points ([`SourceAdapter`], [`RewardModel`],
//!   [`WeightingScheme`], [`PreferenceObjective`]) over plain host data;
//! - [`registry`]: components registered with `inventory` (built-ins) or at run time;
//! - [`recipe`]: TOML recipes, strictly parsed, with file:line:column errors;
//! - [`pipeline`]: the host-side stages that connect the extension points.
//!
//! Errors in recipes point at a key path, which the recipe layer turns into file:line:column:
//!
//! ```
//! use fuserl_core::config::KeyPath;
//! let path = KeyPath::keys(&["sources"]).index(1).key("path");
//! assert_eq!(path.to_string(), "sources[1].path");
//! ```

pub mod collect;
pub mod combine;
pub mod config;
pub mod data;
pub mod error;
pub mod extension;
pub mod fs;
pub mod jsonl;
pub mod location;
pub mod maths;
pub mod pairwise;
pub mod parquet_pages;
pub mod paths;
pub mod pipeline;
pub mod prompts;
pub mod recipe;
pub mod registry;
pub mod score;
pub mod store;
pub mod untrusted;

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
