//! The plugin side: turn ordinary trait implementations into the C ABI. A plugin author writes
//! `PluginDescriptor`s exactly as built-ins do and exports them with [`crate::export_plugin!`];
//! no `unsafe` in their code. Every exported function catches panics and reports them as
//! [`STATUS_PANIC`] with the message; errors come back as [`STATUS_ERROR`].

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::OnceLock;

use fuserl_core::config::ConfigError;
use fuserl_core::data::{ChatMessage, Completion, Prompt, SamplingParams};
use fuserl_core::extension::{
    CollectRequest, Generated, GroupView, ObjectiveBatch, PreferenceObjective, RewardModel, SampleJob, ScoreItem,
    SourceAdapter, WeightingScheme,
};
use fuserl_core::registry::{BuildContext, PluginDescriptor, StaticFactory};
use serde_json::json;

use crate::types::*;

static HOST: OnceLock<HostApi> = OnceLock::new();
static NAME: OnceLock<&'static str> = OnceLock::new();
static DESCRIPTORS: OnceLock<&'static [PluginDescriptor]> = OnceLock::new();
static DECLARATION: OnceLock<&'static PluginDeclaration> = OnceLock::new();

/// Build (once) and return the plugin's declaration. Called by the entry symbol that
/// [`crate::export_plugin!`] generates.
///
/// # Safety
///
/// `host` is null or points to a valid [`HostApi`] (the host passes its own, static one).
pub unsafe fn declare(
    host: *const HostApi,
    name: &'static str,
    descriptors: &'static [PluginDescriptor],
) -> *const PluginDeclaration {
    let result = catch_unwind(|| {
        if !host.is_null() {
            // SAFETY: the host passes a pointer to its `HostApi`, which lives as long as the
            // process; we only copy it, and only when it is at least as large as ours.
            #[allow(unsafe_code)]
            let api = unsafe { *host };
            if api.struct_size as usize >= size_of::<HostApi>() {
                let _ = HOST.set(api);
            }
        }
        let _ = NAME.set(name);
        let _ = DESCRIPTORS.set(descriptors);
        let decl: &'static PluginDeclaration = DECLARATION.get_or_init(|| {
            let components: Vec<ComponentDecl> = descriptors.iter().map(component_decl).collect();
            Box::leak(Box::new(PluginDeclaration {
                abi_version: ABI_VERSION,
                struct_size: size_of::<PluginDeclaration>() as u32,
                component_size: size_of::<ComponentDecl>() as u32,
                fuserl_version: Str::new(env!("CARGO_PKG_VERSION")),
                plugin_name: Str::new(name),
                components: Components::new(Box::leak(components.into_boxed_slice())),
            }))
        });
        decl as *const PluginDeclaration
    });
    result.unwrap_or(std::ptr::null())
}

/// The declaration [`declare`] built, for tools that wrap it (for example a test plugin that
/// misreports its version).
///
/// # Safety
///
/// As [`declare`].
pub unsafe fn declaration(
    host: *const HostApi,
    name: &'static str,
    descriptors: &'static [PluginDescriptor],
) -> Option<&'static PluginDeclaration> {
    // SAFETY: forwarded from the caller.
    unsafe { declare(host, name, descriptors) };
    DECLARATION.get().copied()
}

fn component_decl(d: &PluginDescriptor) -> ComponentDecl {
    let mut c = ComponentDecl {
        point: POINT_SOURCE,
        name: Str::new(d.name),
        summary: Str::new(d.summary),
        create,
        destroy,
        collect: None,
        score: None,
        scorer_id: None,
        weigh: None,
        needs_reference: None,
        build_examples: None,
        loss: None,
        generator_info: None,
        generate: None,
    };
    match d.factory {
        StaticFactory::Source(_) => {
            c.collect = Some(collect);
            c.generator_info = Some(generator_info);
            c.generate = Some(generate);
        }
        StaticFactory::Reward(_) => {
            c.point = POINT_REWARD;
            c.score = Some(score);
            c.scorer_id = Some(scorer_id);
        }
        StaticFactory::Weighting(_) => {
            c.point = POINT_WEIGHTING;
            c.weigh = Some(weigh);
        }
        StaticFactory::Objective(_) => {
            c.point = POINT_OBJECTIVE;
            c.needs_reference = Some(needs_reference);
            c.build_examples = Some(build_examples);
            c.loss = Some(loss);
        }
    }
    c
}

/// Log through the host (a no-op when the host gave no logger). Levels: `LOG_*`.
pub fn log(level: u32, message: &str) {
    if let Some(host) = HOST.get() {
        (host.log)(level, Str::new(NAME.get().copied().unwrap_or("?")), Str::new(message));
    }
}

enum Instance {
    Source(Box<dyn SourceAdapter>),
    Reward(Box<dyn RewardModel>),
    Weighting(Box<dyn WeightingScheme>),
    Objective(Box<dyn PreferenceObjective>),
}

enum CallError {
    Config(ConfigError),
    Other(String),
}

impl From<fuserl_core::Error> for CallError {
    fn from(e: fuserl_core::Error) -> Self {
        match e {
            // Report a component's own message, without the host-side prefix.
            fuserl_core::Error::Component { message, .. } => Self::Other(message),
            other => Self::Other(other.to_string()),
        }
    }
}

impl From<&str> for CallError {
    fn from(e: &str) -> Self {
        Self::Other(e.to_owned())
    }
}

impl From<String> for CallError {
    fn from(e: String) -> Self {
        Self::Other(e)
    }
}

fn report(out: *mut Out, path: &str, message: &str) {
    if let Some(host) = HOST.get() {
        (host.set_error)(out, Str::new(path), Str::new(message));
    }
}

fn set_text(out: *mut Out, text: &str) {
    if let Some(host) = HOST.get() {
        (host.set_text)(out, Str::new(text));
    }
}

/// Run `f`, turning errors and panics into a status and a message for the host.
fn guard(out: *mut Out, f: impl FnOnce() -> Result<(), CallError>) -> i32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => STATUS_OK,
        Ok(Err(CallError::Config(e))) => {
            report(out, &e.path.to_string(), &e.message);
            STATUS_ERROR
        }
        Ok(Err(CallError::Other(message))) => {
            report(out, "", &message);
            STATUS_ERROR
        }
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            report(out, "", &format!("panicked: {message}"));
            STATUS_PANIC
        }
    }
}

fn text(s: Str<'_>, what: &str) -> Result<String, CallError> {
    s.to_str().map(str::to_owned).map_err(|_| CallError::Other(format!("{what} is not UTF-8")))
}

/// The instance behind a handle, borrowed for one call.
///
/// # Safety
///
/// `handle` came from `create` (`Box<Instance>::into_raw`) and `destroy` has not been called on
/// it; the reference is not kept past the call that received the handle.
#[allow(unsafe_code)]
unsafe fn instance<'a>(handle: Handle) -> &'a Instance {
    // SAFETY: the caller's contract.
    unsafe { &*(handle as *const Instance) }
}

/// The host's output buffer of `n` values, borrowed for one call.
///
/// # Safety
///
/// Unless `n` is 0 or `ptr` is null, `ptr` points to `n` f64 that the host owns, that nothing
/// else reads or writes during the call, and the slice is not kept past it.
#[allow(unsafe_code)]
unsafe fn out_slice<'a>(ptr: *mut f64, n: u64) -> &'a mut [f64] {
    if n == 0 || ptr.is_null() {
        return &mut [];
    }
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts_mut(ptr, n as usize) }
}

extern "C" fn create(
    component: u64,
    config: Str<'_>,
    base_dir: Str<'_>,
    seed: u64,
    out: *mut Out,
    handle: *mut Handle,
) -> i32 {
    guard(out, || {
        let d = DESCRIPTORS
            .get()
            .and_then(|all| all.get(component as usize))
            .ok_or_else(|| format!("no component {component}"))?;
        let table: toml::Table =
            toml::from_str(&text(config, "configuration")?).map_err(|e| format!("configuration is not TOML: {e}"))?;
        let ctx =
            BuildContext { base_dir: PathBuf::from(text(base_dir, "base folder")?), seed, ..BuildContext::default() };
        let (inst, resolved) = match d.factory {
            StaticFactory::Source(f) => f(&table, &ctx).map(|b| (Instance::Source(b.component), b.resolved)),
            StaticFactory::Reward(f) => f(&table, &ctx).map(|b| (Instance::Reward(b.component), b.resolved)),
            StaticFactory::Weighting(f) => f(&table, &ctx).map(|b| (Instance::Weighting(b.component), b.resolved)),
            StaticFactory::Objective(f) => f(&table, &ctx).map(|b| (Instance::Objective(b.component), b.resolved)),
        }
        .map_err(CallError::Config)?;
        let resolved =
            toml::to_string(&resolved).map_err(|e| format!("cannot write the resolved configuration: {e}"))?;
        set_text(out, &resolved);
        if handle.is_null() {
            return Err("null handle pointer".to_owned().into());
        }
        // SAFETY: the host passes a valid pointer to write the handle to.
        #[allow(unsafe_code)]
        unsafe {
            *handle = Box::into_raw(Box::new(inst)) as Handle;
        }
        Ok(())
    })
}

extern "C" fn destroy(handle: Handle) {
    if handle.is_null() {
        return;
    }
    let _ = catch_unwind(|| {
        // SAFETY: `handle` came from `create`'s Box::into_raw and the host destroys it once.
        #[allow(unsafe_code)]
        drop(unsafe { Box::from_raw(handle as *mut Instance) });
    });
}

extern "C" fn collect(handle: Handle, request: Str<'_>, out: *mut Out) -> i32 {
    guard(out, || {
        // SAFETY: the host's handle of a live instance, for this call (the ABI's contract, docs/plugins.md).
        #[allow(unsafe_code)]
        let Instance::Source(s) = (unsafe { instance(handle) }) else {
            return Err("not a source adapter".to_owned().into());
        };
        let v: serde_json::Value = serde_json::from_str(&text(request, "request")?).map_err(|e| e.to_string())?;
        let prompts: Vec<Prompt> = serde_json::from_value(v["prompts"].clone()).map_err(|e| e.to_string())?;
        let sampling: SamplingParams = serde_json::from_value(v["sampling"].clone()).map_err(|e| e.to_string())?;
        let samples = v["samples_per_prompt"].as_u64().unwrap_or(1) as u32;
        let got = s.collect(&CollectRequest { prompts: &prompts, samples_per_prompt: samples, sampling: &sampling })?;
        let answer =
            json!({"prompts": got.prompts, "completions": got.completions, "skipped_records": got.skipped_records});
        set_text(out, &answer.to_string());
        Ok(())
    })
}

extern "C" fn generator_info(handle: Handle, sampling: Str<'_>, out: *mut Out) -> i32 {
    guard(out, || {
        // SAFETY: the host's handle of a live instance, for this call (the ABI's contract, docs/plugins.md).
        #[allow(unsafe_code)]
        let Instance::Source(s) = (unsafe { instance(handle) }) else {
            return Err("not a source adapter".to_owned().into());
        };
        let sampling: SamplingParams =
            serde_json::from_str(&text(sampling, "sampling")?).map_err(|e| format!("sampling: {e}"))?;
        let info = s.generator().map_or(serde_json::Value::Null, |g| {
            json!({
                "source_name": g.source_name(),
                "fingerprint": g.fingerprint(&sampling),
                "keep_truncated": g.keep_truncated(),
            })
        });
        set_text(out, &info.to_string());
        Ok(())
    })
}

/// One job as it crosses the ABI.
#[derive(serde::Deserialize)]
struct JobC {
    prompt: Prompt,
    sample_index: u32,
    seed: u64,
}

extern "C" fn generate(handle: Handle, jobs: Str<'_>, sampling: Str<'_>, out: *mut Out) -> i32 {
    guard(out, || {
        // SAFETY: the host's handle of a live instance, for this call (the ABI's contract, docs/plugins.md).
        #[allow(unsafe_code)]
        let Instance::Source(s) = (unsafe { instance(handle) }) else {
            return Err("not a source adapter".to_owned().into());
        };
        let g = s.generator().ok_or("this source is not a generator")?;
        let jobs: Vec<JobC> = serde_json::from_str(&text(jobs, "jobs")?).map_err(|e| format!("jobs: {e}"))?;
        let sampling: SamplingParams =
            serde_json::from_str(&text(sampling, "sampling")?).map_err(|e| format!("sampling: {e}"))?;
        let views: Vec<SampleJob<'_>> =
            jobs.iter().map(|j| SampleJob { prompt: &j.prompt, sample_index: j.sample_index, seed: j.seed }).collect();
        let host = *HOST.get().ok_or("the host gave no callbacks")?;
        let out_addr = out as usize;
        let sink = move |answer: Generated| -> fuserl_core::Result<()> {
            let json = serde_json::to_string(&answer).map_err(|e| fuserl_core::Error::Component {
                point: "source",
                name: answer.prompt_id.clone(),
                message: e.to_string(),
            })?;
            if (host.push_answer)(out_addr as *mut Out, Str::new(&json)) == 0 {
                Ok(())
            } else {
                Err(fuserl_core::Error::Component {
                    point: "source",
                    name: g.source_name().to_owned(),
                    message: "the host could not keep an answer".into(),
                })
            }
        };
        let stats = g.generate(&views, &sampling, &sink)?;
        set_text(out, &json!({"retries": stats.retries, "requests": stats.requests}).to_string());
        Ok(())
    })
}

extern "C" fn score(handle: Handle, items: Str<'_>, scores: *mut f64, n: u64, out: *mut Out) -> i32 {
    guard(out, || {
        // SAFETY: the host's handle of a live instance, for this call (the ABI's contract, docs/plugins.md).
        #[allow(unsafe_code)]
        let Instance::Reward(r) = (unsafe { instance(handle) }) else {
            return Err("not a reward model".to_owned().into());
        };
        let parsed: Vec<(Vec<ChatMessage>, Completion)> =
            serde_json::from_str(&text(items, "items")?).map_err(|e| e.to_string())?;
        let items: Vec<ScoreItem<'_>> = parsed.iter().map(|(m, c)| ScoreItem { messages: m, completion: c }).collect();
        let got = r.score(&items)?;
        // SAFETY: the host's buffer of `n` values, for this call (the ABI's contract, docs/plugins.md).
        #[allow(unsafe_code)]
        let dst = unsafe { out_slice(scores, n) };
        if got.len() != dst.len() {
            return Err(format!("returned {} scores for {} items", got.len(), dst.len()).into());
        }
        dst.copy_from_slice(&got);
        Ok(())
    })
}

extern "C" fn scorer_id(handle: Handle, out: *mut Out) -> i32 {
    guard(out, || {
        // SAFETY: the host's handle of a live instance, for this call (the ABI's contract, docs/plugins.md).
        #[allow(unsafe_code)]
        let Instance::Reward(r) = (unsafe { instance(handle) }) else {
            return Err("not a reward model".to_owned().into());
        };
        set_text(out, &r.scorer_id());
        Ok(())
    })
}

fn with_group<T>(
    group: *const GroupC<'_>,
    f: impl FnOnce(&GroupView<'_>) -> Result<T, CallError>,
) -> Result<T, CallError> {
    if group.is_null() {
        return Err("null group".to_owned().into());
    }
    // SAFETY: the host passes a valid group for the duration of the call.
    #[allow(unsafe_code)]
    let g = unsafe { &*group };
    let names: Vec<String> =
        g.source_names.as_slice().iter().map(|s| text(*s, "source name")).collect::<Result<_, _>>()?;
    let view = GroupView {
        rewards: g.rewards.as_slice(),
        sources: g.sources.as_slice(),
        sample_indices: g.sample_indices.as_slice(),
        source_names: &names,
        weights: g.weights.as_slice(),
    };
    f(&view)
}

extern "C" fn weigh(handle: Handle, group: *const GroupC<'_>, weights: *mut f64, n: u64, out: *mut Out) -> i32 {
    guard(out, || {
        // SAFETY: the host's handle of a live instance, for this call (the ABI's contract, docs/plugins.md).
        #[allow(unsafe_code)]
        let Instance::Weighting(w) = (unsafe { instance(handle) }) else {
            return Err("not a weighting scheme".to_owned().into());
        };
        let got = with_group(group, |view| Ok(w.weigh(view)?))?;
        // SAFETY: the host's buffer of `n` values, for this call (the ABI's contract, docs/plugins.md).
        #[allow(unsafe_code)]
        let dst = unsafe { out_slice(weights, n) };
        if got.len() != dst.len() {
            return Err(format!("returned {} weights for {} completions", got.len(), dst.len()).into());
        }
        dst.copy_from_slice(&got);
        Ok(())
    })
}

extern "C" fn needs_reference(handle: Handle) -> u8 {
    catch_unwind(|| {
        // SAFETY: the host's handle of a live instance, for this call (the ABI's contract).
        #[allow(unsafe_code)]
        let inst = unsafe { instance(handle) };
        match inst {
            Instance::Objective(o) => u8::from(o.needs_reference()),
            _ => 0,
        }
    })
    .unwrap_or(0)
}

extern "C" fn build_examples(handle: Handle, group: *const GroupC<'_>, out: *mut Out) -> i32 {
    guard(out, || {
        // SAFETY: the host's handle of a live instance, for this call (the ABI's contract, docs/plugins.md).
        #[allow(unsafe_code)]
        let Instance::Objective(o) = (unsafe { instance(handle) }) else {
            return Err("not an objective".to_owned().into());
        };
        let specs = with_group(group, |view| Ok(o.build_examples(view)?))?;
        let host = HOST.get().ok_or("the host gave no callbacks")?;
        for spec in specs {
            let members: Vec<u64> = spec.members.iter().map(|m| *m as u64).collect();
            let names: Vec<Str<'_>> = spec.notes.iter().map(|(n, _)| Str::new(n)).collect();
            let values: Vec<f64> = spec.notes.iter().map(|(_, v)| *v).collect();
            (host.push_example)(out, Slice::new(&members), spec.weight, Slice::new(&names), Slice::new(&values));
        }
        Ok(())
    })
}

extern "C" fn loss(
    handle: Handle,
    batch: *const BatchC<'_>,
    loss: *mut f64,
    grad: *mut f64,
    n: u64,
    out: *mut Out,
) -> i32 {
    guard(out, || {
        // SAFETY: the host's handle of a live instance, for this call (the ABI's contract, docs/plugins.md).
        #[allow(unsafe_code)]
        let Instance::Objective(o) = (unsafe { instance(handle) }) else {
            return Err("not an objective".to_owned().into());
        };
        if batch.is_null() || loss.is_null() {
            return Err("null batch or loss pointer".to_owned().into());
        }
        // SAFETY: the host passes a valid batch for the duration of the call.
        #[allow(unsafe_code)]
        let b = unsafe { &*batch };
        let offsets: Vec<usize> = b.example_offsets.as_slice().iter().map(|o| *o as usize).collect();
        let reference = b.reference_logps.as_slice();
        let got = o.loss(&ObjectiveBatch {
            example_offsets: &offsets,
            example_weights: b.example_weights.as_slice(),
            policy_logps: b.policy_logps.as_slice(),
            reference_logps: (b.has_reference != 0).then_some(reference),
            token_counts: b.token_counts.as_slice(),
            rewards: b.rewards.as_slice(),
            normalizer: b.normalizer,
            progress: b.progress,
        })?;
        // SAFETY: the host's buffer of `n` values, for this call (the ABI's contract, docs/plugins.md).
        #[allow(unsafe_code)]
        let dst = unsafe { out_slice(grad, n) };
        if got.grad.len() != dst.len() {
            return Err(format!("returned {} derivatives for {} sequences", got.grad.len(), dst.len()).into());
        }
        dst.copy_from_slice(&got.grad);
        // SAFETY: checked non-null above; the host owns the f64.
        #[allow(unsafe_code)]
        unsafe {
            *loss = got.loss;
        }
        let host = HOST.get().ok_or("the host gave no callbacks")?;
        for (name, value) in &got.metrics {
            (host.push_metric)(out, Str::new(name), *value);
        }
        Ok(())
    })
}

/// Export a plugin: generates the `fuserl_plugin_declare` entry symbol.
///
/// ```text
/// fuserl_abi::export_plugin! {
///     name: "my-plugin",
///     components: [
///         PluginDescriptor { name: "margin", summary: "…", origin: "my-plugin", factory: StaticFactory::Weighting(build_margin) },
///     ],
/// }
/// ```
#[macro_export]
macro_rules! export_plugin {
    (name: $name:expr, components: [$($descriptor:expr),* $(,)?] $(,)?) => {
        /// The plugin's entry symbol (fuserl plugin ABI).
        ///
        /// # Safety
        ///
        /// `host` is null or points to a valid `HostApi` (fuserl passes its own).
        #[unsafe(no_mangle)]
        pub unsafe extern "C" fn fuserl_plugin_declare(
            host: *const $crate::types::HostApi,
        ) -> *const $crate::types::PluginDeclaration {
            static DESCRIPTORS: &[$crate::fuserl_core::registry::PluginDescriptor] = &[$($descriptor),*];
            // SAFETY: forwarded from this function's contract.
            unsafe { $crate::plugin::declare(host, $name, DESCRIPTORS) }
        }
    };
}
