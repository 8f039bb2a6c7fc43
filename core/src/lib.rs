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
//! ```
//! use fuserl_core::registry::Registry;
//! // Built-in plugins register themselves once their crate is linked.
//! let registry = Registry::with_builtins().unwrap();
//! assert!(registry.entries().iter().all(|e| !e.name.is_empty()));
//! ```

pub mod config;
pub mod data;
pub mod error;
pub mod extension;
pub mod location;
pub mod maths;
pub mod pipeline;
pub mod recipe;
pub mod registry;

pub use error::{Error, Result};
pub use extension::{PreferenceObjective, RewardModel, SourceAdapter, WeightingScheme};
pub use inventory;
