//! The host side: load a plugin library, check its declaration, and register each of its
//! components in the registry behind a proxy that implements the same trait as a built-in.
//! Libraries are never unloaded (their code may still be referenced by live components).

use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuserl_core::config::{ConfigError, KeyPath};
use fuserl_core::data::Prompt;
use fuserl_core::extension::{
    CollectRequest, Collected, ExampleSpec, GenerateStats, Generated, GeneratedSink, Generator, GroupView, LossOutput,
    ObjectiveBatch, PreferenceObjective, RewardModel, SampleJob, ScoreItem, SourceAdapter, WeightingScheme,
};
use fuserl_core::registry::{BuildContext, Built, Entry, ExtensionPoint, Factory, Registry};
use fuserl_core::{Error, Result};

use crate::types::*;
use fuserl_core::paths::Shown;

/// The callbacks every plugin gets.
static HOST_API: HostApi = HostApi {
    abi_version: ABI_VERSION,
    struct_size: size_of::<HostApi>() as u32,
    log: host_log,
    set_error: host_set_error,
    set_text: host_set_text,
    push_example: host_push_example,
    push_metric: host_push_metric,
    push_answer: host_push_answer,
};

/// The callbacks, for [`crate::testing`].
pub(crate) fn host_api_ptr() -> *const HostApi {
    &HOST_API
}

/// Where `push_answer` delivers during one `generate` call: the proxy's sink, with its
/// lifetime erased (it outlives the call, and only the call uses it).
#[derive(Clone, Copy)]
struct SinkPtr(*const (dyn Fn(&str) -> i32 + Send + Sync + 'static));

impl std::fmt::Debug for SinkPtr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SinkPtr")
    }
}

/// The host's side of [`Out`]: what one call returned.
#[derive(Debug, Default)]
struct Output {
    error: Option<(String, String)>,
    text: Option<String>,
    examples: Vec<ExampleSpec>,
    metrics: Vec<(String, f64)>,
    sink: Option<SinkPtr>,
}

impl Output {
    fn ptr(&mut self) -> *mut Out {
        (self as *mut Output).cast()
    }
}

fn output<'a>(out: *mut Out) -> Option<&'a mut Output> {
    // SAFETY: `out` is always a pointer to a live `Output` made by this module for the call in
    // progress (plugins only pass it back); null is tolerated.
    unsafe { out.cast::<Output>().as_mut() }
}

fn lossy(s: Str<'_>) -> String {
    String::from_utf8_lossy(s.bytes.as_slice()).into_owned()
}

extern "C" fn host_log(level: u32, plugin: Str<'_>, message: Str<'_>) {
    let (plugin, message) = (lossy(plugin), lossy(message));
    match level {
        LOG_ERROR => tracing::error!(plugin = %plugin, "{message}"),
        LOG_WARN => tracing::warn!(plugin = %plugin, "{message}"),
        LOG_INFO => tracing::info!(plugin = %plugin, "{message}"),
        _ => tracing::debug!(plugin = %plugin, "{message}"),
    }
}

extern "C" fn host_set_error(out: *mut Out, path: Str<'_>, message: Str<'_>) {
    if let Some(o) = output(out) {
        o.error = Some((lossy(path), lossy(message)));
    }
}

extern "C" fn host_set_text(out: *mut Out, text: Str<'_>) {
    if let Some(o) = output(out) {
        o.text = Some(lossy(text));
    }
}

extern "C" fn host_push_example(
    out: *mut Out,
    members: Slice<'_, u64>,
    weight: f64,
    note_names: Slice<'_, Str<'_>>,
    note_values: Slice<'_, f64>,
) {
    if let Some(o) = output(out) {
        o.examples.push(ExampleSpec {
            members: members.as_slice().iter().map(|m| usize::try_from(*m).unwrap_or(usize::MAX)).collect(),
            weight,
            notes: note_names
                .as_slice()
                .iter()
                .map(|n| lossy(*n))
                .zip(note_values.as_slice().iter().copied())
                .collect(),
        });
    }
}

extern "C" fn host_push_answer(out: *mut Out, answer: Str<'_>) -> i32 {
    // SAFETY: as `output`, read through a shared reference only: the plugin may call this from
    // several threads during one `generate` call, and nothing writes the `Output` meanwhile.
    let Some(o) = (unsafe { out.cast::<Output>().as_ref() }) else { return 1 };
    match o.sink {
        // SAFETY: set by `DynSource::generate` to a closure that lives until its call returns,
        // and the plugin calls this only during that call.
        Some(SinkPtr(f)) => unsafe { (*f)(&lossy(answer)) },
        None => 1,
    }
}

extern "C" fn host_push_metric(out: *mut Out, name: Str<'_>, value: f64) {
    if let Some(o) = output(out) {
        o.metrics.push((lossy(name), value));
    }
}

/// The file name of a plugin library called `name` on this platform (`libNAME.so`, …).
pub fn library_file_name(name: &str) -> String {
    format!("{}{}{}", std::env::consts::DLL_PREFIX, name.replace('-', "_"), std::env::consts::DLL_SUFFIX)
}

/// Where a plugin named in a recipe or on the command line is: a path (anything with a path
/// separator or the platform's library suffix), relative to `base_dir`; or a bare library name,
/// looked up as `libNAME.so` (platform naming) in `$FUSERL_PLUGIN_PATH` and then beside the
/// running executable.
pub fn resolve_plugin(spec: &str, base_dir: &Path) -> std::result::Result<PathBuf, String> {
    let is_path = spec.contains('/') || spec.contains('\\') || spec.ends_with(std::env::consts::DLL_SUFFIX);
    if is_path {
        let p = PathBuf::from(spec);
        return Ok(if p.is_absolute() { p } else { base_dir.join(p) });
    }
    let file = library_file_name(spec);
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("FUSERL_PLUGIN_PATH").map(|v| std::env::split_paths(&v).collect()).unwrap_or_default();
    if let Some(exe_dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        dirs.push(exe_dir);
    }
    dirs.iter().map(|d| d.join(&file)).find(|p| p.is_file()).ok_or_else(|| {
        format!(
            "no plugin library `{file}` in $FUSERL_PLUGIN_PATH or beside the fuserl executable (searched: {}); {}",
            dirs.iter().map(|d| Shown(d).to_string()).collect::<Vec<_>>().join(", "),
            build_hint(spec),
        )
    })
}

/// How to get a missing plugin library: cargo builds a workspace's cdylib beside the binary
/// only when asked for that crate (issue 18: the README's example recipe names one).
fn build_hint(spec: &str) -> String {
    let crate_name = spec.replace('_', "-");
    if crate_name == "fuserl-example" {
        "it is built by `cargo build -p fuserl-example`".to_owned()
    } else {
        "a plugin from a Cargo crate is built by `cargo build -p CRATE` (into the folder of target/debug/fuserl)"
            .to_owned()
    }
}

/// The signature of [`ENTRY_SYMBOL`].
pub type EntryFn = unsafe extern "C" fn(*const HostApi) -> *const PluginDeclaration;

/// Load the library at `path` and register its components. A file already loaded into this
/// registry is not loaded again. Returns the number of components registered.
pub fn load_library(path: &Path, registry: &mut Registry) -> std::result::Result<usize, String> {
    let key =
        path.canonicalize().map_err(|e| format!("{}: {}", Shown(path), fuserl_core::paths::cannot_read(path, &e)))?;
    if !registry.note_loaded(&key) {
        return Ok(0);
    }
    // SAFETY: loading a library runs its initialisers; that is the contract of a plugin, which
    // the user named explicitly.
    let library = unsafe { libloading::Library::new(&key) }
        .map_err(|e| format!("{}: not a loadable library: {e}", Shown(path)))?;
    // SAFETY: the symbol, if present, has the ABI's entry signature; a library that exports the
    // name with another signature breaks the plugin contract.
    let entry: EntryFn = unsafe { library.get::<EntryFn>(ENTRY_SYMBOL.as_bytes()) }.map(|s| *s).map_err(|_| {
        format!("{}: a library, but not a fuserl plugin: it has no `{ENTRY_SYMBOL}` symbol", Shown(path))
    })?;
    // Never unloaded: components and their code may live as long as the process.
    std::mem::forget(library);
    // SAFETY: the plugin's contract: the entry takes the host's callbacks (static) and returns
    // its declaration; then the pointer is what the entry symbol returned.
    unsafe {
        let declaration = entry(&HOST_API);
        register_declaration(declaration, &path.display().to_string(), registry)
    }
}

/// The most components one plugin may declare: far more than any plugin has, few enough that a
/// broken declaration's count is refused before anything is built for it (issue #13).
pub const MAX_COMPONENTS: usize = 4096;

/// Check a plugin declaration and register its components with `origin` (the file). Used by
/// [`load_library`], and by [`crate::testing`] with a plugin linked into the test itself.
///
/// # Safety
///
/// `declaration` is null or what a plugin's entry symbol returned: a pointer to a declaration
/// that starts with its ABI version and size and lives as long as the process.
pub unsafe fn register_declaration(
    declaration: *const PluginDeclaration,
    origin: &str,
    registry: &mut Registry,
) -> std::result::Result<usize, String> {
    if declaration.is_null() {
        return Err(format!("{origin}: the plugin returned no declaration"));
    }
    // The first two fields (version and size) are the same in every ABI version: read them
    // before trusting anything else.
    // SAFETY: non-null, and every declaration starts with two u32.
    let [version, size] = unsafe { *declaration.cast::<[u32; 2]>() };
    if version > ABI_VERSION {
        return Err(format!(
            "{origin}: built for plugin ABI version {version}, newer than this fuserl's ({ABI_VERSION}); upgrade fuserl"
        ));
    }
    if version < MIN_ABI_VERSION {
        return Err(format!(
            "{origin}: built for plugin ABI version {version}, older than the oldest this fuserl loads ({MIN_ABI_VERSION}); \
             rebuild the plugin against fuserl-abi {}",
            env!("CARGO_PKG_VERSION")
        ));
    }
    if size as usize != size_of::<PluginDeclaration>() {
        return Err(format!(
            "{origin}: its declaration is {size} bytes, but ABI version {version} declares {}: not a fuserl plugin of this version",
            size_of::<PluginDeclaration>()
        ));
    }
    // SAFETY: version and size match this build's `PluginDeclaration`; the plugin keeps it alive.
    let decl: &'static PluginDeclaration = unsafe { &*declaration };
    // Fields are only appended: a plugin of an older version has shorter components (read with
    // its own stride, the fields it lacks left empty), never longer ones.
    let expected = if version == 1 { COMPONENT_SIZE_V1 } else { size_of::<ComponentDecl>() };
    if decl.component_size as usize != expected {
        return Err(format!(
            "{origin}: its components are {} bytes, but ABI version {version} declares {expected}",
            decl.component_size,
        ));
    }
    let plugin = decl.plugin_name.to_str().map_err(|_| format!("{origin}: plugin name is not UTF-8"))?.to_owned();
    if decl.components.len() > MAX_COMPONENTS {
        return Err(format!(
            "{origin}: plugin `{plugin}` declares {} components; fuserl loads at most {MAX_COMPONENTS} from one plugin",
            decl.components.len()
        ));
    }
    let mut trial = registry.clone();
    let components: Vec<ComponentDecl> = (0..decl.components.len())
        .map(|i| {
            // SAFETY: the plugin declares `len` components of `component_size` bytes each (checked
            // above to be this version's size), alive as long as the library.
            unsafe { component_at(decl, i, expected) }
        })
        .collect();
    for (index, c) in components.iter().copied().enumerate() {
        let name = c.name.to_str().map_err(|_| format!("{origin}: a component name is not UTF-8"))?.to_owned();
        let summary =
            c.summary.to_str().map_err(|_| format!("{origin}: the summary of `{name}` is not UTF-8"))?.to_owned();
        let meta = Arc::new(Meta {
            plugin: plugin.clone(),
            origin: origin.to_owned(),
            name: name.clone(),
            index: index as u64,
            decl: c,
        });
        let factory = factory(&meta)?;
        trial
            .register(Entry { name, summary, origin: format!("{origin} (plugin `{plugin}`)"), factory })
            .map_err(|e| format!("{origin}: {e}"))?;
    }
    *registry = trial;
    Ok(components.len())
}

/// Component `i` of a declaration whose components are `stride` bytes long, as this build's
/// `ComponentDecl`: a copy whose fields beyond `stride` are empty (`None`). (A copy, not a
/// reference: nothing is leaked per component, however many a declaration has.)
///
/// # Safety
///
/// The declaration's `components` points to `len` components of `stride` bytes, `stride` at
/// least [`COMPONENT_SIZE_V1`] and at most `size_of::<ComponentDecl>()`.
unsafe fn component_at(decl: &'static PluginDeclaration, i: usize, stride: usize) -> ComponentDecl {
    if stride == size_of::<ComponentDecl>() {
        // SAFETY: component `i` of this build's layout, within the `len` the caller checked.
        return unsafe { *decl.components.as_ptr().add(i) };
    }
    let base = decl.components.as_ptr().cast::<u8>();
    let mut copy = std::mem::MaybeUninit::<ComponentDecl>::zeroed();
    // SAFETY: the source holds `stride` readable bytes (the caller's contract); the destination
    // is a zeroed `ComponentDecl`, at least `stride` bytes long; an all-zero `Option<fn>` is `None`,
    // and the fields before `stride` (every non-optional one) come from the plugin.
    unsafe {
        std::ptr::copy_nonoverlapping(base.add(i * stride), copy.as_mut_ptr().cast::<u8>(), stride);
        copy.assume_init()
    }
}

/// What a proxy knows about its component.
#[derive(Debug)]
struct Meta {
    plugin: String,
    origin: String,
    name: String,
    index: u64,
    decl: ComponentDecl,
}

impl Meta {
    fn point(&self) -> &'static str {
        point_of(self.decl.point).map_or("component", ExtensionPoint::noun)
    }

    /// The error of a failed call, naming plugin, component and file.
    fn error(&self, status: i32, out: &Output) -> Error {
        let message = out
            .error
            .as_ref()
            .map_or_else(|| format!("failed with status {status} and no message"), |(_, m)| m.clone());
        Error::Component {
            point: self.point(),
            name: self.name.clone(),
            message: format!("{message} [plugin `{}`, {}]", self.plugin, self.origin),
        }
    }

    fn missing(&self, what: &str) -> Error {
        Error::Component {
            point: self.point(),
            name: self.name.clone(),
            message: format!("the plugin declares no `{what}` function [plugin `{}`, {}]", self.plugin, self.origin),
        }
    }
}

/// A component instance owned by the plugin; destroyed when the proxy is dropped.
#[derive(Debug)]
struct Instance {
    meta: Arc<Meta>,
    handle: *mut c_void,
}

// SAFETY: components are `Send + Sync` on the plugin's side (the traits require it), and the
// handle is only passed back to the plugin's own functions.
unsafe impl Send for Instance {}
// SAFETY: as above.
unsafe impl Sync for Instance {}

impl Drop for Instance {
    fn drop(&mut self) {
        (self.meta.decl.destroy)(self.handle);
    }
}

fn create(
    meta: &Arc<Meta>,
    table: &toml::Table,
    ctx: &BuildContext,
) -> std::result::Result<(Instance, toml::Table), ConfigError> {
    let text = toml::to_string(table).map_err(|e| ConfigError::new(KeyPath::root(), e.to_string()))?;
    let base = ctx.base_dir.display().to_string();
    let mut out = Output::default();
    let mut handle: *mut c_void = std::ptr::null_mut();
    let status = (meta.decl.create)(meta.index, Str::new(&text), Str::new(&base), ctx.seed, out.ptr(), &mut handle);
    if status != STATUS_OK || handle.is_null() {
        let (path, message) = out.error.clone().unwrap_or_default();
        let message = if status == STATUS_PANIC {
            format!("{message} [plugin `{}`, {}]", meta.plugin, meta.origin)
        } else {
            message
        };
        return Err(ConfigError::new(KeyPath::parse(&path), message));
    }
    let instance = Instance { meta: meta.clone(), handle };
    let resolved: toml::Table = toml::from_str(out.text.as_deref().unwrap_or("")).map_err(|e| {
        ConfigError::new(KeyPath::root(), format!("the plugin returned an unreadable configuration: {e}"))
    })?;
    Ok((instance, resolved))
}

fn factory(meta: &Arc<Meta>) -> std::result::Result<Factory, String> {
    let m = meta.clone();
    let need = |f: bool, what: &str| {
        if f { Ok(()) } else { Err(format!("{}: component `{}` has no `{what}` function", meta.origin, meta.name)) }
    };
    Ok(match meta.decl.point {
        POINT_SOURCE => {
            need(meta.decl.collect.is_some(), "collect")?;
            Factory::Source(Arc::new(move |t: &toml::Table, ctx: &BuildContext| {
                let (inner, resolved) = create(&m, t, ctx)?;
                let mut source = DynSource { inner, generator: None };
                source.generator = source
                    .generator_info(&fuserl_core::data::SamplingParams::default())
                    .map_err(|e| ConfigError::new(KeyPath::root(), e.to_string()))?
                    .map(|info| info.source_name);
                Ok(Built { component: Box::new(source) as Box<dyn SourceAdapter>, resolved })
            }))
        }
        POINT_REWARD => {
            need(meta.decl.score.is_some(), "score")?;
            Factory::Reward(Arc::new(move |t: &toml::Table, ctx: &BuildContext| {
                let (inner, resolved) = create(&m, t, ctx)?;
                // The scoring stage keeps scores under the plugin's resolved settings: other
                // settings score afresh.
                let settings = serde_json::to_string(&resolved).unwrap_or_default();
                Ok(Built { component: Box::new(DynReward { inner, settings }) as Box<dyn RewardModel>, resolved })
            }))
        }
        POINT_WEIGHTING => {
            need(meta.decl.weigh.is_some(), "weigh")?;
            Factory::Weighting(Arc::new(move |t: &toml::Table, ctx: &BuildContext| {
                let (inner, resolved) = create(&m, t, ctx)?;
                Ok(Built { component: Box::new(DynWeighting { inner }) as Box<dyn WeightingScheme>, resolved })
            }))
        }
        POINT_OBJECTIVE => {
            need(meta.decl.loss.is_some() && meta.decl.build_examples.is_some(), "loss")?;
            Factory::Objective(Arc::new(move |t: &toml::Table, ctx: &BuildContext| {
                let (inner, resolved) = create(&m, t, ctx)?;
                let needs_reference = m.decl.needs_reference.is_some_and(|f| f(inner.handle) != 0);
                Ok(Built {
                    component: Box::new(DynObjective { inner, needs_reference }) as Box<dyn PreferenceObjective>,
                    resolved,
                })
            }))
        }
        other => {
            return Err(format!(
                "{}: component `{}` has the unknown extension point code {other}",
                meta.origin, meta.name
            ));
        }
    })
}

/// Run one call with a fresh [`Output`], mapping a failed status to an error.
fn call(inner: &Instance, f: impl FnOnce(*mut Out) -> i32) -> Result<Output> {
    let mut out = Output::default();
    let status = f(out.ptr());
    if status == STATUS_OK { Ok(out) } else { Err(inner.meta.error(status, &out)) }
}

#[derive(Debug)]
struct DynSource {
    inner: Instance,
    /// The source name, when the plugin says the source is a generator (ABI version 2).
    generator: Option<String>,
}

/// What `generator_info` returned.
#[derive(Debug, serde::Deserialize)]
struct GeneratorInfo {
    source_name: String,
    fingerprint: String,
    #[serde(default = "yes")]
    keep_truncated: bool,
}

fn yes() -> bool {
    true
}

impl DynSource {
    fn bad(&self, message: String) -> Error {
        self.inner.meta.error(STATUS_ERROR, &Output { error: Some((String::new(), message)), ..Output::default() })
    }

    /// `None` for a version-1 plugin or a source that is not a generator.
    fn generator_info(&self, sampling: &fuserl_core::data::SamplingParams) -> Result<Option<GeneratorInfo>> {
        let Some(f) = self.inner.meta.decl.generator_info else { return Ok(None) };
        let json = serde_json::to_string(sampling).map_err(|e| self.bad(e.to_string()))?;
        let out = call(&self.inner, |o| f(self.inner.handle, Str::new(&json), o))?;
        serde_json::from_str(out.text.as_deref().unwrap_or("null"))
            .map_err(|e| self.bad(format!("returned unreadable generator information: {e}")))
    }
}

impl Generator for DynSource {
    fn source_name(&self) -> &str {
        self.generator.as_deref().unwrap_or_default()
    }

    fn fingerprint(&self, sampling: &fuserl_core::data::SamplingParams) -> String {
        match self.generator_info(sampling) {
            Ok(Some(info)) => info.fingerprint,
            // A fingerprint that matches no store: the collect stage then refuses to mix.
            Ok(None) => "no generator information".into(),
            Err(e) => format!("unreadable: {e}"),
        }
    }

    fn keep_truncated(&self) -> bool {
        self.generator_info(&fuserl_core::data::SamplingParams::default())
            .ok()
            .flatten()
            .is_none_or(|i| i.keep_truncated)
    }

    fn generate(
        &self,
        jobs: &[SampleJob<'_>],
        sampling: &fuserl_core::data::SamplingParams,
        sink: &GeneratedSink<'_>,
    ) -> Result<GenerateStats> {
        let f = self.inner.meta.decl.generate.ok_or_else(|| self.inner.meta.missing("generate"))?;
        let jobs_json = serde_json::Value::Array(
            jobs.iter()
                .map(|j| serde_json::json!({"prompt": j.prompt, "sample_index": j.sample_index, "seed": j.seed}))
                .collect(),
        )
        .to_string();
        let sampling_json = serde_json::to_string(sampling).map_err(|e| self.bad(e.to_string()))?;
        let failed: std::sync::Mutex<Option<Error>> = std::sync::Mutex::new(None);
        let push = |json: &str| -> i32 {
            let result = serde_json::from_str::<Generated>(json)
                .map_err(|e| self.bad(format!("handed over an unreadable answer: {e}")))
                .and_then(sink);
            match result {
                Ok(()) => 0,
                Err(e) => {
                    failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get_or_insert(e);
                    1
                }
            }
        };
        let push: &(dyn Fn(&str) -> i32 + Send + Sync) = &push;
        // SAFETY: only the lifetime is erased; `push` lives until the end of this function, and
        // the pointer is used only by `host_push_answer` during the `generate` call below.
        let erased = unsafe {
            std::mem::transmute::<
                *const (dyn Fn(&str) -> i32 + Send + Sync + '_),
                *const (dyn Fn(&str) -> i32 + Send + Sync + 'static),
            >(push)
        };
        let mut out = Output { sink: Some(SinkPtr(erased)), ..Output::default() };
        let status = f(self.inner.handle, Str::new(&jobs_json), Str::new(&sampling_json), out.ptr());
        if let Some(e) = failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            return Err(e);
        }
        if status != STATUS_OK {
            return Err(self.inner.meta.error(status, &out));
        }
        let v: serde_json::Value = serde_json::from_str(out.text.as_deref().unwrap_or("{}"))
            .map_err(|e| self.bad(format!("returned unreadable counts: {e}")))?;
        Ok(GenerateStats { retries: v["retries"].as_u64().unwrap_or(0), requests: v["requests"].as_u64().unwrap_or(0) })
    }
}

impl SourceAdapter for DynSource {
    fn name(&self) -> &str {
        &self.inner.meta.name
    }

    fn generator(&self) -> Option<&dyn Generator> {
        if self.generator.is_some() { Some(self) } else { None }
    }
    fn collect(&self, request: &CollectRequest<'_>) -> Result<Collected> {
        let f = self.inner.meta.decl.collect.ok_or_else(|| self.inner.meta.missing("collect"))?;
        let json = serde_json::json!({
            "prompts": request.prompts, "samples_per_prompt": request.samples_per_prompt, "sampling": request.sampling,
        })
        .to_string();
        let out = call(&self.inner, |o| f(self.inner.handle, Str::new(&json), o))?;
        let bad = |e: String| {
            self.inner.meta.error(STATUS_ERROR, &Output { error: Some((String::new(), e)), ..Output::default() })
        };
        let v: serde_json::Value = serde_json::from_str(out.text.as_deref().unwrap_or(""))
            .map_err(|e| bad(format!("returned unreadable JSON: {e}")))?;
        let prompts: Vec<Prompt> =
            serde_json::from_value(v["prompts"].clone()).map_err(|e| bad(format!("returned bad prompts: {e}")))?;
        let completions = serde_json::from_value(v["completions"].clone())
            .map_err(|e| bad(format!("returned bad completions: {e}")))?;
        Ok(Collected { prompts, completions, skipped_records: v["skipped_records"].as_u64().unwrap_or(0) })
    }
}

#[derive(Debug)]
struct DynReward {
    inner: Instance,
    settings: String,
}

impl RewardModel for DynReward {
    fn name(&self) -> &str {
        &self.inner.meta.name
    }
    fn scorer_id(&self) -> String {
        match self.inner.meta.decl.scorer_id {
            Some(f) => call(&self.inner, |o| f(self.inner.handle, o))
                .ok()
                .and_then(|o| o.text)
                .unwrap_or_else(|| self.name().to_owned()),
            None => self.name().to_owned(),
        }
    }
    fn fingerprint(&self) -> String {
        format!("{} {}", self.scorer_id(), self.settings)
    }
    fn score(&self, items: &[ScoreItem<'_>]) -> Result<Vec<f64>> {
        let f = self.inner.meta.decl.score.ok_or_else(|| self.inner.meta.missing("score"))?;
        let json =
            serde_json::Value::Array(items.iter().map(|i| serde_json::json!([i.messages, i.completion])).collect())
                .to_string();
        let mut scores = vec![0.0; items.len()];
        call(&self.inner, |o| f(self.inner.handle, Str::new(&json), scores.as_mut_ptr(), scores.len() as u64, o))?;
        Ok(scores)
    }
}

/// A [`GroupView`] as C data (the names borrowed as `Str`).
fn with_group_c<T>(view: &GroupView<'_>, f: impl FnOnce(&GroupC<'_>) -> T) -> T {
    let names: Vec<Str<'_>> = view.source_names.iter().map(|s| Str::new(s)).collect();
    let g = GroupC {
        rewards: Slice::new(view.rewards),
        sources: Slice::new(view.sources),
        sample_indices: Slice::new(view.sample_indices),
        source_names: Slice::new(&names),
        weights: Slice::new(view.weights),
    };
    f(&g)
}

#[derive(Debug)]
struct DynWeighting {
    inner: Instance,
}

impl WeightingScheme for DynWeighting {
    fn name(&self) -> &str {
        &self.inner.meta.name
    }
    fn weigh(&self, group: &GroupView<'_>) -> Result<Vec<f64>> {
        let f = self.inner.meta.decl.weigh.ok_or_else(|| self.inner.meta.missing("weigh"))?;
        let mut weights = vec![0.0; group.len()];
        with_group_c(group, |g| {
            call(&self.inner, |o| f(self.inner.handle, g, weights.as_mut_ptr(), weights.len() as u64, o))
        })?;
        Ok(weights)
    }
}

#[derive(Debug)]
struct DynObjective {
    inner: Instance,
    needs_reference: bool,
}

impl PreferenceObjective for DynObjective {
    fn name(&self) -> &str {
        &self.inner.meta.name
    }
    fn needs_reference(&self) -> bool {
        self.needs_reference
    }
    fn build_examples(&self, group: &GroupView<'_>) -> Result<Vec<ExampleSpec>> {
        let f = self.inner.meta.decl.build_examples.ok_or_else(|| self.inner.meta.missing("build_examples"))?;
        let out = with_group_c(group, |g| call(&self.inner, |o| f(self.inner.handle, g, o)))?;
        Ok(out.examples)
    }
    fn loss(&self, batch: &ObjectiveBatch<'_>) -> Result<LossOutput> {
        let f = self.inner.meta.decl.loss.ok_or_else(|| self.inner.meta.missing("loss"))?;
        let offsets: Vec<u64> = batch.example_offsets.iter().map(|o| *o as u64).collect();
        let b = BatchC {
            example_offsets: Slice::new(&offsets),
            example_weights: Slice::new(batch.example_weights),
            policy_logps: Slice::new(batch.policy_logps),
            has_reference: u8::from(batch.reference_logps.is_some()),
            reference_logps: Slice::new(batch.reference_logps.unwrap_or(&[])),
            token_counts: Slice::new(batch.token_counts),
            rewards: Slice::new(batch.rewards),
            normalizer: batch.normalizer,
            progress: batch.progress,
        };
        let mut loss = 0.0;
        let mut grad = vec![0.0; batch.policy_logps.len()];
        let out = call(&self.inner, |o| f(self.inner.handle, &b, &mut loss, grad.as_mut_ptr(), grad.len() as u64, o))?;
        Ok(LossOutput { loss, grad, metrics: out.metrics })
    }
}

/// Loads plugins named in recipes (see `fuserl_core::registry::PluginLoader`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Loader;

impl fuserl_core::registry::PluginLoader for Loader {
    fn load(&self, spec: &str, base_dir: &Path, registry: &mut Registry) -> std::result::Result<(), String> {
        let path = resolve_plugin(spec, base_dir)?;
        load_library(&path, registry).map(|_| ())
    }
}

/// The extension point of a component code, for messages.
pub fn point_of(code: u32) -> Option<ExtensionPoint> {
    match code {
        POINT_SOURCE => Some(ExtensionPoint::Source),
        POINT_REWARD => Some(ExtensionPoint::Reward),
        POINT_WEIGHTING => Some(ExtensionPoint::Weighting),
        POINT_OBJECTIVE => Some(ExtensionPoint::Objective),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue #13: a plugin *name* (no path separator) is only ever looked up as one file name in
    /// the search folders, whatever dots it holds; a spec with a separator is a path the recipe
    /// gives on purpose, resolved from the recipe's folder.
    #[test]
    fn plugin_names_stay_in_the_search_path() {
        for name in ["..", ".", "...", "..evil", "a..b"] {
            let file = library_file_name(name);
            let parts: Vec<_> = Path::new(&file).components().collect();
            assert_eq!(parts.len(), 1, "{name:?} -> {file:?}");
            assert!(matches!(parts[0], std::path::Component::Normal(_)), "{name:?} -> {file:?}");
            let err = resolve_plugin(name, Path::new("/nonexistent")).expect_err("no such library");
            assert!(err.contains(&format!("no plugin library `{file}` in $FUSERL_PLUGIN_PATH")), "{err}");
        }
        let base = Path::new("/recipes");
        assert_eq!(resolve_plugin("../plugins/libx.so", base).expect("a path"), base.join("../plugins/libx.so"));
    }
}
