//! The C types of the plugin ABI. Every struct is `#[repr(C)]`; fields are only ever appended,
//! and each struct that can grow carries its size so that the host can tell which fields a
//! plugin knows. Only plain data crosses: `(pointer, length)` slices of numbers, UTF-8 text,
//! and status codes. Output crosses through host callbacks into host-owned memory, so the
//! plugin never hands over memory for the host to free (and the other way round).
//!
//! # ABI version record
//!
//! | version | fuserl | change |
//! |---|---|---|
//! | 1 | 0.1.0 | first version: the four extension points, logging callback |
//! | 2 | 0.1.0 | generative sources: `ComponentDecl::generator_info` and `::generate` and `HostApi::push_answer` appended; version-1 plugins (shorter components) keep loading, without them |

use std::ffi::c_void;
use std::marker::PhantomData;

/// The ABI version this build speaks.
pub const ABI_VERSION: u32 = 2;
/// `size_of::<ComponentDecl>()` in ABI version 1 (the fields before `generator_info`): a
/// version-1 plugin's components are this long, and the host reads them with this stride.
pub const COMPONENT_SIZE_V1: usize = std::mem::offset_of!(ComponentDecl, generator_info);
/// The oldest plugin ABI version this host still loads.
pub const MIN_ABI_VERSION: u32 = 1;
/// The symbol every plugin exports: `extern "C" fn(*const HostApi) -> *const PluginDeclaration`.
pub const ENTRY_SYMBOL: &str = "fuserl_plugin_declare";

/// Call succeeded.
pub const STATUS_OK: i32 = 0;
/// The component returned an error (the message was passed to `HostApi::set_error`).
pub const STATUS_ERROR: i32 = 1;
/// The component panicked; the panic was caught on the plugin's side.
pub const STATUS_PANIC: i32 = 2;

/// Extension point codes of [`ComponentDecl::point`].
pub const POINT_SOURCE: u32 = 0;
/// Reward model.
pub const POINT_REWARD: u32 = 1;
/// Weighting scheme.
pub const POINT_WEIGHTING: u32 = 2;
/// Preference objective.
pub const POINT_OBJECTIVE: u32 = 3;

/// Log levels of [`HostApi::log`].
pub const LOG_ERROR: u32 = 1;
/// Warning.
pub const LOG_WARN: u32 = 2;
/// Information.
pub const LOG_INFO: u32 = 3;
/// Debugging detail.
pub const LOG_DEBUG: u32 = 4;

/// A borrowed slice: `ptr` to `len` elements, valid for the duration of the call.
#[repr(C)]
#[derive(Debug)]
pub struct Slice<'a, T> {
    /// First element (may dangle when `len == 0`, never null). Private, as is `len`: a `Slice`
    /// made in safe code always borrows a real slice (`new`), so `as_slice` is sound; the one
    /// way to make another is the `unsafe` [`Slice::from_raw_parts`], which takes the obligation.
    ptr: *const T,
    len: usize,
    _life: PhantomData<&'a [T]>,
}

impl<T> Clone for Slice<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Slice<'_, T> {}

impl<'a, T> Slice<'a, T> {
    /// Borrow a Rust slice.
    pub fn new(s: &'a [T]) -> Self {
        Self { ptr: s.as_ptr(), len: s.len(), _life: PhantomData }
    }

    /// A slice of `len` elements at `ptr`, as the other side of the ABI declared it.
    ///
    /// # Safety
    ///
    /// Unless `len` is 0, `ptr` points to `len` initialised values of `T`'s `#[repr(C)]` layout,
    /// properly aligned, with `len * size_of::<T>()` at most `isize::MAX`, that stay valid and
    /// unchanged for `'a` ([`Slice::as_slice`] reads them as a `&'a [T]`).
    #[allow(unsafe_code)]
    pub unsafe fn from_raw_parts(ptr: *const T, len: usize) -> Self {
        Self { ptr, len, _life: PhantomData }
    }

    /// The empty slice.
    pub fn empty() -> Self {
        Self::new(&[])
    }

    /// The first element's address (for a reader of an older, shorter layout of `T`).
    pub fn as_ptr(&self) -> *const T {
        self.ptr
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Back to a Rust slice.
    pub fn as_slice(&self) -> &'a [T] {
        if self.len == 0 || self.ptr.is_null() {
            return &[];
        }
        // SAFETY: a `Slice` comes from `new` (a real `&'a [T]`), from `from_raw_parts` (whose
        // caller promised the same), or across the C ABI from the other side, whose contract
        // (docs/plugins.md) is the same promise for the duration of the call.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts(self.ptr, self.len)
        }
    }
}

/// Borrowed UTF-8 text.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Str<'a> {
    /// The bytes.
    pub bytes: Slice<'a, u8>,
}

impl<'a> Str<'a> {
    /// Borrow a Rust string.
    pub fn new(s: &'a str) -> Self {
        Self { bytes: Slice::new(s.as_bytes()) }
    }

    /// Back to a Rust string; invalid UTF-8 is an error.
    pub fn to_str(&self) -> Result<&'a str, std::str::Utf8Error> {
        std::str::from_utf8(self.bytes.as_slice())
    }
}

/// Host-owned output of a call; the plugin only passes it back to the host's callbacks.
#[repr(C)]
#[derive(Debug)]
pub struct Out {
    _private: [u8; 0],
}

/// What the host gives a plugin when it loads it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct HostApi {
    /// [`ABI_VERSION`] of the host.
    pub abi_version: u32,
    /// `size_of::<HostApi>()` as the host was compiled.
    pub struct_size: u32,
    /// Log a message under the plugin's name.
    pub log: extern "C" fn(level: u32, plugin: Str<'_>, message: Str<'_>),
    /// Report an error: a key path relative to the component's table (may be empty) and a message.
    pub set_error: extern "C" fn(out: *mut Out, path: Str<'_>, message: Str<'_>),
    /// Return text (a resolved TOML table, or JSON).
    pub set_text: extern "C" fn(out: *mut Out, text: Str<'_>),
    /// Return one training example: member indices, weight, and named notes.
    pub push_example: extern "C" fn(
        out: *mut Out,
        members: Slice<'_, u64>,
        weight: f64,
        note_names: Slice<'_, Str<'_>>,
        note_values: Slice<'_, f64>,
    ),
    /// Return one named metric.
    pub push_metric: extern "C" fn(out: *mut Out, name: Str<'_>, value: f64),
    /// Version 2. Hand over one answer of a generative source as soon as it is done (JSON of
    /// `fuserl_core::extension::Generated`); any thread may call it during `generate`. A
    /// non-zero return means the host could not keep it (the plugin stops and returns an error).
    pub push_answer: extern "C" fn(out: *mut Out, answer_json: Str<'_>) -> i32,
}

/// One prompt's scored completions (see `fuserl_core::extension::GroupView`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct GroupC<'a> {
    /// Rewards.
    pub rewards: Slice<'a, f64>,
    /// Source index per completion.
    pub sources: Slice<'a, u32>,
    /// Sample index per completion.
    pub sample_indices: Slice<'a, u32>,
    /// Source names.
    pub source_names: Slice<'a, Str<'a>>,
    /// Weights (empty before weighting).
    pub weights: Slice<'a, f64>,
}

/// Per-sequence statistics of a batch (see `fuserl_core::extension::ObjectiveBatch`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BatchC<'a> {
    /// Example offsets (examples + 1).
    pub example_offsets: Slice<'a, u64>,
    /// Example weights.
    pub example_weights: Slice<'a, f64>,
    /// Policy log-probs.
    pub policy_logps: Slice<'a, f64>,
    /// 1 when `reference_logps` is present.
    pub has_reference: u8,
    /// Reference log-probs.
    pub reference_logps: Slice<'a, f64>,
    /// Token counts.
    pub token_counts: Slice<'a, f64>,
    /// Rewards.
    pub rewards: Slice<'a, f64>,
    /// Loss normaliser.
    pub normalizer: f64,
    /// Fraction of training done.
    pub progress: f64,
}

/// Opaque component instance, owned by the plugin.
pub type Handle = *mut c_void;

/// One component a plugin provides, with its functions. Entries for other extension points
/// are `None`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ComponentDecl {
    /// `POINT_*`.
    pub point: u32,
    /// Kebab-case name.
    pub name: Str<'static>,
    /// One-line summary.
    pub summary: Str<'static>,
    /// Build from the component's TOML table (as text); on success write the handle and pass
    /// the resolved table (TOML text) to `set_text`.
    pub create: extern "C" fn(
        component: u64,
        config_toml: Str<'_>,
        base_dir: Str<'_>,
        seed: u64,
        out: *mut Out,
        handle: *mut Handle,
    ) -> i32,
    /// Free a handle made by `create`.
    pub destroy: extern "C" fn(handle: Handle),
    /// Source adapter: collect. Request and answer are JSON text (answer via `set_text`).
    pub collect: Option<extern "C" fn(handle: Handle, request_json: Str<'_>, out: *mut Out) -> i32>,
    /// Reward model: score `n` items given as a JSON array; scores into `scores[0..n]`.
    pub score:
        Option<extern "C" fn(handle: Handle, items_json: Str<'_>, scores: *mut f64, n: u64, out: *mut Out) -> i32>,
    /// Reward model: who the scores are attributed to (via `set_text`).
    pub scorer_id: Option<extern "C" fn(handle: Handle, out: *mut Out) -> i32>,
    /// Weighting scheme: one weight per completion into `weights[0..n]`.
    pub weigh: Option<
        extern "C" fn(handle: Handle, group: *const GroupC<'_>, weights: *mut f64, n: u64, out: *mut Out) -> i32,
    >,
    /// Objective: 1 when it needs reference log-probs.
    pub needs_reference: Option<extern "C" fn(handle: Handle) -> u8>,
    /// Objective: examples of a weighted group (via `push_example`).
    pub build_examples: Option<extern "C" fn(handle: Handle, group: *const GroupC<'_>, out: *mut Out) -> i32>,
    /// Objective: loss into `*loss`, gradient into `grad[0..n]`, metrics via `push_metric`.
    pub loss: Option<
        extern "C" fn(
            handle: Handle,
            batch: *const BatchC<'_>,
            loss: *mut f64,
            grad: *mut f64,
            n: u64,
            out: *mut Out,
        ) -> i32,
    >,
    /// Version 2. Source adapter: whether it is a generator, as JSON via `set_text`: `null`, or
    /// `{"source_name", "fingerprint", "keep_truncated"}` for the sampling settings given
    /// (JSON of `fuserl_core::data::SamplingParams`).
    pub generator_info: Option<extern "C" fn(handle: Handle, sampling_json: Str<'_>, out: *mut Out) -> i32>,
    /// Version 2. Source adapter: answer the jobs (JSON list of `{"prompt", "sample_index",
    /// "seed"}`) with the sampling settings, each answer through `HostApi::push_answer`; the
    /// counts (`{"retries", "requests"}`) via `set_text`.
    pub generate:
        Option<extern "C" fn(handle: Handle, jobs_json: Str<'_>, sampling_json: Str<'_>, out: *mut Out) -> i32>,
}

/// What a plugin's entry symbol returns. Lives as long as the library (never unloaded).
#[repr(C)]
#[derive(Debug)]
pub struct PluginDeclaration {
    /// [`ABI_VERSION`] the plugin was built with.
    pub abi_version: u32,
    /// `size_of::<PluginDeclaration>()` as the plugin was compiled.
    pub struct_size: u32,
    /// `size_of::<ComponentDecl>()` as the plugin was compiled.
    pub component_size: u32,
    /// fuserl version the plugin was built against.
    pub fuserl_version: Str<'static>,
    /// The plugin's name.
    pub plugin_name: Str<'static>,
    /// Its components.
    pub components: Components,
}

/// [`PluginDeclaration::components`]: `(pointer, length)` like a [`Slice`], but with no safe way
/// to read it as a `&[ComponentDecl]`, because a plugin of an older ABI version lays out shorter
/// components (`component_size` bytes each) than this build's `ComponentDecl`: the host reads
/// them one by one with the declared stride.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Components {
    ptr: *const ComponentDecl,
    len: usize,
}

impl Components {
    /// This build's components (the layout of the current ABI version).
    pub fn new(s: &'static [ComponentDecl]) -> Self {
        Self { ptr: s.as_ptr(), len: s.len() }
    }

    /// `len` components at `ptr`, laid out as the declaration's `abi_version` and
    /// `component_size` say.
    ///
    /// # Safety
    ///
    /// `ptr` points to `len * component_size` readable bytes, aligned for `ComponentDecl`, that
    /// stay valid and unchanged for as long as anything reads the declaration.
    #[allow(unsafe_code)]
    pub unsafe fn from_raw_parts(ptr: *const ComponentDecl, len: usize) -> Self {
        Self { ptr, len }
    }

    /// The first component's address.
    pub fn as_ptr(&self) -> *const ComponentDecl {
        self.ptr
    }

    /// The number of components.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

// SAFETY: a component declaration is immutable data that lives as long as the library (which is
// never unloaded) and points only to static text and functions.
unsafe impl Sync for ComponentDecl {}
// SAFETY: as above.
unsafe impl Send for ComponentDecl {}

// SAFETY: a declaration is immutable static data that points only to other static data.
#[allow(unsafe_code)]
unsafe impl Sync for PluginDeclaration {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl Send for PluginDeclaration {}
