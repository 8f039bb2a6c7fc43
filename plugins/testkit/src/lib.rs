//! A deliberately faulty plugin for the host's tests. Its behaviour at load time is chosen by
//! the environment variable `FUSERL_TEST_PLUGIN_MODE`:
//!
//! - unset: weighting `panicky` (panics when it weighs) and objective `failing` (returns an
//!   error from `loss`, and refuses `fail_create = true` at construction);
//! - `newer-abi` / `older-abi`: declares ABI version `ABI_VERSION + 1` / `0`;
//! - `wrong-size`: declares a declaration size that is not this ABI's;
//! - `duplicate`: also declares a weighting named `softmax`, which collides with the built-in;
//! - `abi-v1`: declares ABI version 1, with version-1 components (without the generator fields).

use fuserl_abi::types::{ABI_VERSION, COMPONENT_SIZE_V1, ComponentDecl, Components, HostApi, PluginDeclaration};
use fuserl_core::config::ConfigError;
use fuserl_core::extension::{
    ExampleSpec, GroupView, LossOutput, ObjectiveBatch, PreferenceObjective, WeightingScheme,
};
use fuserl_core::registry::{BuildContext, Built, PluginDescriptor, StaticFactory};
use fuserl_core::{Error, Result};

#[derive(Debug)]
struct Panicky;

impl WeightingScheme for Panicky {
    fn name(&self) -> &str {
        "panicky"
    }
    fn weigh(&self, _group: &GroupView<'_>) -> Result<Vec<f64>> {
        panic!("panicky weighting was asked to weigh");
    }
}

#[derive(Debug)]
struct Failing;

impl PreferenceObjective for Failing {
    fn name(&self) -> &str {
        "failing"
    }
    fn needs_reference(&self) -> bool {
        false
    }
    fn build_examples(&self, _group: &GroupView<'_>) -> Result<Vec<ExampleSpec>> {
        Ok(Vec::new())
    }
    fn loss(&self, _batch: &ObjectiveBatch<'_>) -> Result<LossOutput> {
        Err(Error::Component {
            point: "preference objective",
            name: "failing".into(),
            message: "this objective always fails".into(),
        })
    }
}

fn build_panicky(_t: &toml::Table, _c: &BuildContext) -> Result<Built<dyn WeightingScheme>, ConfigError> {
    Ok(Built { component: Box::new(Panicky), resolved: toml::Table::new() })
}

fn build_failing(t: &toml::Table, _c: &BuildContext) -> Result<Built<dyn PreferenceObjective>, ConfigError> {
    if t.get("fail_create").and_then(toml::Value::as_bool) == Some(true) {
        return Err(ConfigError::at("fail_create", "refused on purpose"));
    }
    Ok(Built { component: Box::new(Failing), resolved: t.clone() })
}

const PANICKY: PluginDescriptor = PluginDescriptor {
    name: "panicky",
    summary: "panics",
    origin: "testkit",
    factory: StaticFactory::Weighting(build_panicky),
};
const FAILING: PluginDescriptor = PluginDescriptor {
    name: "failing",
    summary: "returns errors",
    origin: "testkit",
    factory: StaticFactory::Objective(build_failing),
};
const SOFTMAX: PluginDescriptor = PluginDescriptor {
    name: "softmax",
    summary: "collides",
    origin: "testkit",
    factory: StaticFactory::Weighting(build_panicky),
};

static NORMAL: [PluginDescriptor; 2] = [PANICKY, FAILING];
static WITH_DUPLICATE: [PluginDescriptor; 3] = [PANICKY, FAILING, SOFTMAX];

/// The entry symbol, written by hand so that it can misreport the declaration.
///
/// # Safety
///
/// `host` is null or points to a valid `HostApi`.
#[allow(unsafe_code)] // The entry symbol is inherently unsafe; the export macro does the same.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn fuserl_plugin_declare(host: *const HostApi) -> *const PluginDeclaration {
    let mode = std::env::var("FUSERL_TEST_PLUGIN_MODE").unwrap_or_default();
    let descriptors: &'static [PluginDescriptor] = if mode == "duplicate" { &WITH_DUPLICATE } else { &NORMAL };
    // SAFETY: fuserl passes its own static `HostApi`.
    let Some(real) = (unsafe { fuserl_abi::plugin::declaration(host, "fuserl-testkit", descriptors) }) else {
        return std::ptr::null();
    };
    if mode == "abi-v1" {
        // A plugin built against ABI version 1: components without the version-2 fields.
        let stride = COMPONENT_SIZE_V1;
        // SAFETY: `real` is this build's own declaration: `len` components of this build's layout,
        // leaked by the export macro.
        let comps = unsafe { std::slice::from_raw_parts(real.components.as_ptr(), real.components.len()) };
        let mut bytes: Vec<u8> = Vec::with_capacity(stride * comps.len());
        for c in comps {
            // SAFETY: reading the first `stride` bytes of a live `ComponentDecl`, which is larger.
            let raw = unsafe { std::slice::from_raw_parts((c as *const ComponentDecl).cast::<u8>(), stride) };
            bytes.extend_from_slice(raw);
        }
        // Aligned like `ComponentDecl` (u64 words), leaked: the library is never unloaded.
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        // SAFETY: `words` has at least `bytes.len()` bytes.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), words.as_mut_ptr().cast::<u8>(), bytes.len()) };
        let words: &'static [u64] = Box::leak(words.into_boxed_slice());
        return Box::leak(Box::new(PluginDeclaration {
            abi_version: 1,
            struct_size: real.struct_size,
            component_size: stride as u32,
            fuserl_version: real.fuserl_version,
            plugin_name: real.plugin_name,
            // SAFETY: `words` (leaked, so `'static`; u64 words, aligned for `ComponentDecl`) holds
            // `comps.len()` version-1 components of `stride` bytes each.
            components: unsafe { Components::from_raw_parts(words.as_ptr().cast::<ComponentDecl>(), comps.len()) },
        }));
    }
    let (abi_version, struct_size) = match mode.as_str() {
        "newer-abi" => (ABI_VERSION + 1, real.struct_size),
        "older-abi" => (0, real.struct_size),
        "wrong-size" => (real.abi_version, real.struct_size + 8),
        _ => return real,
    };
    Box::leak(Box::new(PluginDeclaration {
        abi_version,
        struct_size,
        component_size: real.component_size,
        fuserl_version: real.fuserl_version,
        plugin_name: real.plugin_name,
        components: real.components,
    }))
}
