//! Helpers for plugin authors: run your components through the C ABI, in-process, the way
//! fuserl will, and evaluate them on statistics you choose.
//!
//! ```text
//! use fuserl_abi::testing::{Stats, plugin_registry, objective, weighting};
//! let registry = plugin_registry(my_plugin::fuserl_plugin_declare).unwrap();
//! let hinge = objective(&registry, "kind = \"ranking-hinge\"\ngamma = 0.5").unwrap();
//! let stats = Stats::pairs(&[(-10.0, 5.0, -12.0, 6.0)]);
//! let out = hinge.loss(&stats.batch()).unwrap();
//! fuserl_abi::testing::assert_gradient(hinge.as_ref(), &stats, 1e-6);
//! ```

use fuserl_core::extension::{PreferenceObjective, WeightingScheme};
use fuserl_core::registry::{BuildContext, Registry};

use crate::host::{EntryFn, register_declaration};
use crate::types::HostApi;

/// A registry with only the components of a plugin linked into the test, registered through
/// the same handshake and proxies as a loaded library.
pub fn plugin_registry(entry: EntryFn) -> Result<Registry, String> {
    let mut registry = Registry::empty();
    let host: *const HostApi = host_api();
    // SAFETY: the entry gets the host's static callbacks; the pointer it returns is its
    // declaration.
    unsafe { register_declaration(entry(host), "(linked into the test)", &mut registry)? };
    Ok(registry)
}

fn host_api() -> *const HostApi {
    // The host's callbacks live in `host`; reach them through a loader-free declaration.
    crate::host::host_api_ptr()
}

fn table(toml_text: &str) -> Result<toml::Table, String> {
    toml::from_str(toml_text).map_err(|e| format!("not TOML: {e}"))
}

fn ctx() -> BuildContext {
    BuildContext::default()
}

/// Build an objective from a TOML table (with `kind`) through `registry`.
pub fn objective(registry: &Registry, toml_text: &str) -> Result<Box<dyn PreferenceObjective>, String> {
    registry.build_objective_from(&table(toml_text)?, &ctx()).map(|b| b.component).map_err(|e| e.to_string())
}

/// Build a weighting scheme from a TOML table (with `kind`) through `registry`.
pub fn weighting(registry: &Registry, toml_text: &str) -> Result<Box<dyn WeightingScheme>, String> {
    registry.build_weighting_from(&table(toml_text)?, &ctx()).map(|b| b.component).map_err(|e| e.to_string())
}

/// Owned per-sequence statistics of a batch: `Stats::pairs(&[...])`, `stats.batch()`.
pub use fuserl_core::extension::BatchData as Stats;

/// Panic unless the objective's derivatives agree with central finite differences (step 1e-5)
/// within `tol` (relative).
pub fn assert_gradient(objective: &dyn PreferenceObjective, stats: &Stats, tol: f64) {
    let out = objective.loss(&stats.batch()).unwrap_or_else(|e| panic!("{e}"));
    let h = 1e-5;
    for i in 0..stats.policy.len() {
        let mut plus = stats.clone();
        plus.policy[i] += h;
        let mut minus = stats.clone();
        minus.policy[i] -= h;
        let value = |s: &Stats| objective.loss(&s.batch()).unwrap_or_else(|e| panic!("{e}")).loss;
        let fd = (value(&plus) - value(&minus)) / (2.0 * h);
        assert!(
            (fd - out.grad[i]).abs() <= tol * (1.0 + fd.abs()),
            "{}: d loss / d logp[{i}] is {} but finite differences give {fd}",
            objective.name(),
            out.grad[i]
        );
    }
}

/// One prompt's group for a weighting scheme or `build_examples`: `Group::new(&[("src", reward), ...])`.
pub use fuserl_core::extension::GroupData as Group;
