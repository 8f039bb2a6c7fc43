//! fuserl's built-in plugins: pure maths on host data, registered with the core's registry
//! through `inventory` as soon as this crate is linked into a program.
//!
//! | extension point | plugins |
//! |---|---|
//! | source adapter | `jsonl` |
//! | reward model | `precomputed` |
//! | weighting scheme | `softmax`, `best-only`, `uniform`, `rank` |
//! | preference objective | `sft`, `dpo`, `simpo`, `rloo`, `wrpo` |
//!
//! ```
//! let registry = fuserl_builtin::registry().unwrap();
//! assert!(registry.names(fuserl_core::registry::ExtensionPoint::Objective).contains(&"dpo".to_string()));
//! ```

#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod objectives;
pub mod pairs;
pub mod rewards;
pub mod sources;
pub mod weighting;

use fuserl_core::registry::Registry;

/// A registry with every built-in plugin. Calling it also guarantees that this crate, and so
/// its `inventory` registrations, is linked into the program.
pub fn registry() -> fuserl_core::Result<Registry> {
    Registry::with_builtins()
}

/// The name under which built-ins report their origin.
pub(crate) const ORIGIN: &str = env!("CARGO_PKG_NAME");
