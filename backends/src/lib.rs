//! Backend selection: maps a recipe's `[backend] device` and `dtype` to a Burn backend.
//! The CPU backend (Burn's flex) is always available; every GPU backend is a cargo feature of
//! this crate (forwarded by `fuserl-cli`, whose defaults are `wgpu` and `cuda`). Asking for a
//! device that was not compiled in is an error that names the feature to enable; asking for a
//! dtype the device cannot do names the ones it can.
//!
//! Code that runs on "whatever backend the recipe names" implements [`OnBackend`] (generic over
//! the backend type) and is called through [`on_backend`].
//!
//! ```
//! use fuserl_core::backend::{DType, Device};
//! assert!(fuserl_backends::check_device(Device::Cpu).is_ok());
//! assert_eq!(fuserl_backends::cargo_feature(Device::Cuda), Some("cuda"));
//! assert!(fuserl_backends::check(Device::Cpu, DType::Bf16).is_ok());
//! ```

use fuserl_core::backend::{DType, Device};
pub use fuserl_kernels::LogProbBackend;

pub mod memory;

/// Makes the C allocator keep freed memory for reuse (glibc only; elsewhere it does nothing and
/// returns false). A training step on the CPU frees and allocates tensors of the same sizes
/// over and over, up to the embeddings' `[vocab, hidden]`; glibc's defaults give every block
/// over 32 MiB back to the system when it is freed, and keep only a little free memory at the
/// top of the heap, so each new tensor starts as fresh pages that the kernel must fault in and
/// zero (about 10% of a DPO step on SmolLM2-135M, docs/benchmarks.md). This sets: blocks up to
/// 1 GiB come from the heap, free memory stays there, and one arena for every thread (a second
/// arena cannot reuse the first one's free memory, and allocations over 64 MiB from a thread's
/// arena are always fresh pages). Peak memory is what it was; the process keeps it until it
/// ends. Call it once at the start of `main`, before other threads start. Nothing is changed
/// when `MALLOC_ARENA_MAX`, `MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_` or
/// `GLIBC_TUNABLES` is set: the user's settings win.
pub fn keep_freed_memory() -> bool {
    let user = ["MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"];
    if user.iter().any(|name| std::env::var_os(name).is_some()) {
        return false;
    }
    tune_glibc()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)] // The one call into the C library outside the plugin ABI; see below.
fn tune_glibc() -> bool {
    let settings = [(libc::M_MMAP_THRESHOLD, 1 << 30), (libc::M_TRIM_THRESHOLD, i32::MAX), (libc::M_ARENA_MAX, 1)];
    // Every setting is tried; true when glibc took them all.
    settings.iter().fold(true, |all, &(param, value)| {
        // SAFETY: mallopt only sets glibc's malloc parameters (under its own lock); the values
        // are in the ranges glibc documents, and it returns 0 for any it refuses.
        let ok = unsafe { libc::mallopt(param, value) } == 1;
        if !ok {
            tracing::debug!(param, value, "glibc refused a malloc setting");
        }
        all && ok
    })
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_glibc() -> bool {
    false
}

/// Gives the memory the C allocator keeps free back to the system (glibc's `malloc_trim`;
/// elsewhere nothing). [`keep_freed_memory`] keeps freed blocks for the next step's tensors of the
/// same sizes; after a one-off like loading a checkpoint (its f32 file read, then converted to
/// the master type) the freed memory may never be reused at those sizes, and the process would
/// keep it to the end: with the lean option it was half of the stage's peak.
pub fn release_freed_memory() {
    trim_glibc();
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)] // The second call into the C library; see `tune_glibc`.
fn trim_glibc() {
    // SAFETY: malloc_trim only returns free heap pages to the system (under malloc's lock).
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_glibc() {}

/// Every device kind a recipe can name.
pub const ALL_DEVICES: [Device; 7] =
    [Device::Cpu, Device::Wgpu, Device::Vulkan, Device::Metal, Device::Webgpu, Device::Cuda, Device::Rocm];

/// The cargo feature that compiles `device` in (`None` for the CPU, which is always built).
pub fn cargo_feature(device: Device) -> Option<&'static str> {
    match device {
        Device::Cpu => None,
        Device::Wgpu => Some("wgpu"),
        Device::Vulkan => Some("vulkan"),
        Device::Metal => Some("metal"),
        Device::Webgpu => Some("webgpu"),
        Device::Cuda => Some("cuda"),
        Device::Rocm => Some("rocm"),
    }
}

/// The name a recipe uses for `device`.
pub fn device_name(device: Device) -> &'static str {
    match device {
        Device::Cpu => "cpu",
        Device::Wgpu => "wgpu",
        Device::Vulkan => "vulkan",
        Device::Metal => "metal",
        Device::Webgpu => "webgpu",
        Device::Cuda => "cuda",
        Device::Rocm => "rocm",
    }
}

/// Whether this build can run on `device`.
pub fn is_compiled(device: Device) -> bool {
    match device {
        Device::Cpu => true,
        Device::Wgpu => cfg!(feature = "wgpu"),
        Device::Vulkan => cfg!(feature = "vulkan"),
        Device::Metal => cfg!(feature = "metal"),
        Device::Webgpu => cfg!(feature = "webgpu"),
        Device::Cuda => cfg!(feature = "cuda"),
        Device::Rocm => cfg!(feature = "rocm"),
    }
}

/// The devices this build can run on.
pub fn compiled_devices() -> Vec<Device> {
    ALL_DEVICES.into_iter().filter(|d| is_compiled(*d)).collect()
}

/// A device that this build cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "device `{device}` is not compiled into this build of fuserl; rebuild with \
     `cargo build --features {feature}` (this build has: {available})"
)]
pub struct NotCompiled {
    /// The device asked for.
    pub device: &'static str,
    /// The cargo feature that compiles it in.
    pub feature: &'static str,
    /// The devices this build has.
    pub available: String,
}

/// `Ok` when this build can run on `device`, else an error naming the cargo feature.
pub fn check_device(device: Device) -> Result<(), NotCompiled> {
    match cargo_feature(device) {
        Some(feature) if !is_compiled(device) => Err(NotCompiled {
            device: device_name(device),
            feature,
            available: compiled_devices().into_iter().map(device_name).collect::<Vec<_>>().join(", "),
        }),
        _ => Ok(()),
    }
}

/// The dtypes `device` can train in.
pub fn supported_dtypes(device: Device) -> &'static [DType] {
    match device {
        Device::Cpu | Device::Cuda | Device::Rocm => &[DType::F32, DType::F16, DType::Bf16],
        // WGSL has no bfloat16; f16 needs the adapter's shader-f16 feature.
        Device::Wgpu | Device::Vulkan | Device::Metal | Device::Webgpu => &[DType::F32, DType::F16],
    }
}

/// The Burn dtype of a recipe's dtype (the one place this mapping is written).
pub fn burn_dtype(d: DType) -> burn::tensor::DType {
    match d {
        DType::F32 => burn::tensor::DType::F32,
        DType::F16 => burn::tensor::DType::F16,
        DType::Bf16 => burn::tensor::DType::BF16,
    }
}

/// The dtype the trainer keeps the trained weights in (`[backend] master_weights`).
pub fn master_dtype(b: &fuserl_core::backend::BackendConfig) -> burn::tensor::DType {
    match b.master_weights {
        fuserl_core::backend::MasterWeights::F32 => burn::tensor::DType::F32,
        fuserl_core::backend::MasterWeights::Bf16 => burn::tensor::DType::BF16,
    }
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::Bf16 => "bf16",
    }
}

/// Why a recipe's backend cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The device is not compiled in.
    #[error(transparent)]
    NotCompiled(#[from] NotCompiled),
    /// The device is compiled in but could not start (no driver, no such device).
    #[error("device `{device}` is compiled into this build but could not start: {message}")]
    Unavailable {
        /// The device asked for.
        device: &'static str,
        /// What went wrong.
        message: String,
    },
    /// The device cannot do the dtype.
    #[error("device `{device}` cannot run dtype `{dtype}`; it supports: {supported}")]
    Dtype {
        /// The device asked for.
        device: &'static str,
        /// The dtype asked for.
        dtype: &'static str,
        /// What it supports.
        supported: String,
    },
}

/// `Ok` when this build can run `dtype` on `device`.
pub fn check(device: Device, dtype: DType) -> Result<(), BackendError> {
    check_device(device)?;
    let supported = supported_dtypes(device);
    if supported.contains(&dtype) {
        Ok(())
    } else {
        Err(BackendError::Dtype {
            device: device_name(device),
            dtype: dtype_name(dtype),
            supported: supported.iter().map(|d| dtype_name(*d)).collect::<Vec<_>>().join(", "),
        })
    }
}

/// Applies `[backend] attention` to every model this process runs from now on (a process-wide
/// choice, as PyTorch's `torch.backends.cuda.enable_flash_sdp`).
pub fn set_attention(path: fuserl_core::backend::AttentionPath) {
    fuserl_kernels::use_attention_kernel(path == fuserl_core::backend::AttentionPath::Kernel);
}

/// Code generic over the backend, run by [`on_backend`] on the one a recipe names. Training
/// wraps `B` in `burn::backend::Autodiff`.
pub trait OnBackend {
    /// What the code returns.
    type Output;
    /// Runs on backend `B`, device `device`.
    fn run<B: LogProbBackend>(self, device: B::Device) -> Self::Output;
}

/// Runs `code` on the backend and device (`index`: which one of its kind) that a recipe names,
/// after checking that this build has it and that it can do `dtype`.
pub fn on_backend<O: OnBackend>(device: Device, index: u32, dtype: DType, code: O) -> Result<O::Output, BackendError> {
    on_backend_with(device, index, dtype, true, code)
}

/// [`on_backend`], with `fusion` saying whether a GPU device runs Burn's fusion backend (in a
/// build with the `fusion` feature; `[backend] fusion`) or the plain cubecl one.
pub fn on_backend_with<O: OnBackend>(
    device: Device,
    index: u32,
    dtype: DType,
    fusion: bool,
    code: O,
) -> Result<O::Output, BackendError> {
    check(device, dtype)?;
    let _ = (index, fusion); // unused in a build with no GPU feature
    match device {
        #[cfg(feature = "wgpu")]
        Device::Wgpu => {
            start_wgpu(device, fusion, code, || wgpu_device::<burn::backend::wgpu::graphics::AutoGraphicsApi>(index))
        }
        #[cfg(feature = "vulkan")]
        Device::Vulkan => {
            start_wgpu(device, fusion, code, || wgpu_device::<burn::backend::wgpu::graphics::Vulkan>(index))
        }
        #[cfg(feature = "metal")]
        Device::Metal => {
            start_wgpu(device, fusion, code, || wgpu_device::<burn::backend::wgpu::graphics::Metal>(index))
        }
        #[cfg(feature = "webgpu")]
        Device::Webgpu => {
            start_wgpu(device, fusion, code, || wgpu_device::<burn::backend::wgpu::graphics::WebGpu>(index))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda => {
            let make = || burn::backend::cuda::CudaDevice::new(index as usize);
            #[cfg(feature = "fusion")]
            if fusion {
                return start::<fuserl_kernels::backends::FusedCuda, O>(device, code, make);
            }
            start::<fuserl_kernels::backends::PlainCuda, O>(device, code, make)
        }
        #[cfg(feature = "rocm")]
        Device::Rocm => {
            start::<burn::backend::Rocm, O>(device, code, || burn::backend::rocm::RocmDevice::new(index as usize))
        }
        // `check` has refused every device this build lacks.
        _ => Ok(code.run::<burn::backend::Flex>(Default::default())),
    }
}

/// Starts the device a recipe names, as a run would, and runs nothing on it: a run checks this
/// before its first stage, so that a device the machine lacks is named at once.
pub fn probe(device: Device, index: u32, dtype: DType) -> Result<(), BackendError> {
    struct Nothing;
    impl OnBackend for Nothing {
        type Output = ();
        fn run<B: LogProbBackend>(self, _device: B::Device) {}
    }
    on_backend(device, index, dtype, Nothing)
}

/// A wgpu device: on the fusion backend when `fusion` (and the build has it), else the plain one.
#[cfg(feature = "wgpu")]
fn start_wgpu<O: OnBackend>(
    device: Device,
    fusion: bool,
    code: O,
    make: impl FnOnce() -> burn::backend::wgpu::WgpuDevice,
) -> Result<O::Output, BackendError> {
    #[cfg(feature = "fusion")]
    if fusion {
        return start::<fuserl_kernels::backends::FusedWgpu, O>(device, code, make);
    }
    let _ = fusion;
    start::<fuserl_kernels::backends::PlainWgpu, O>(device, code, make)
}

/// What to look at when a device's runtime does not start.
#[cfg(any(feature = "wgpu", feature = "cuda", feature = "rocm"))]
fn start_hint(device: Device) -> &'static str {
    match device {
        Device::Cuda => "is there an NVIDIA GPU with its driver on this machine? `nvidia-smi` lists them",
        Device::Rocm => "is there an AMD GPU with ROCm on this machine? `rocm-smi` lists them",
        _ => "is there a GPU adapter with its driver on this machine? (Vulkan: `vulkaninfo --summary`)",
    }
}

/// Makes the device and moves one value to it and back before handing it to `code`: a runtime
/// that cannot start (no driver, no adapter) panics inside Burn, which becomes
/// [`BackendError::Unavailable`] here instead of a crash in the middle of a run.
#[cfg(any(feature = "wgpu", feature = "cuda", feature = "rocm"))]
fn start<B: LogProbBackend, O: OnBackend>(
    device: Device,
    code: O,
    make: impl FnOnce() -> B::Device,
) -> Result<O::Output, BackendError> {
    use std::panic::{AssertUnwindSafe, catch_unwind};
    #[cfg(feature = "cuda")]
    if device == Device::Cuda {
        cuda_driver().map_err(|message| BackendError::Unavailable { device: device_name(device), message })?;
    }
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let probe = catch_unwind(AssertUnwindSafe(|| {
        let d = make();
        burn::tensor::Tensor::<B, 1>::ones([1], &d).into_data();
        d
    }));
    std::panic::set_hook(quiet);
    match probe {
        Ok(d) => Ok(code.run::<B>(d)),
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "it panicked while starting".into());
            // A runtime whose own thread died while starting leaves the caller a bare RecvError.
            let message =
                if message.contains("RecvError") { "its thread stopped while starting".to_owned() } else { message };
            let message = format!("{} (the runtime said: {message})", start_hint(device));
            Err(BackendError::Unavailable { device: device_name(device), message })
        }
    }
}

/// Whether the NVIDIA driver's library can be loaded (what the CUDA runtime loads first): an
/// error naming it, and why the system's loader could not, when not.
#[cfg(feature = "cuda")]
#[allow(unsafe_code)] // Loading a library is unsafe in libloading's API; see the SAFETY note.
fn cuda_driver() -> Result<(), String> {
    let names: &[&str] = if cfg!(windows) { &["nvcuda.dll"] } else { &["libcuda.so.1", "libcuda.so"] };
    let mut why = String::new();
    for name in names {
        // SAFETY: loading the driver runs its initialisers, as the CUDA runtime does when it
        // loads the same library a moment later; nothing is called from it here.
        match unsafe { libloading::Library::new(*name) } {
            Ok(_) => return Ok(()),
            // libloading's own message is "dlopen failed"; the system's reason is its source.
            Err(e) => why = std::error::Error::source(&e).map_or_else(|| e.to_string(), ToString::to_string),
        }
    }
    Err(format!(
        "the NVIDIA driver's library ({}) is not on this machine: {why}; is there an NVIDIA GPU with its driver? \
         (`nvidia-smi` lists them)",
        names[0]
    ))
}

/// The wgpu device `index` on graphics API `G`: the default adapter for index 0 with the
/// automatic API, else the `index`-th discrete GPU, set up on `G` once per process.
#[cfg(feature = "wgpu")]
fn wgpu_device<G: burn::backend::wgpu::graphics::GraphicsApi + 'static>(index: u32) -> burn::backend::wgpu::WgpuDevice {
    use burn::backend::wgpu::WgpuDevice;
    use std::any::TypeId;
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock};
    let device = if index == 0 { WgpuDevice::DefaultDevice } else { WgpuDevice::DiscreteGpu(index as usize) };
    if TypeId::of::<G>() != TypeId::of::<burn::backend::wgpu::graphics::AutoGraphicsApi>() {
        static DONE: OnceLock<Mutex<HashSet<(TypeId, u32)>>> = OnceLock::new();
        let mut done = DONE.get_or_init(Default::default).lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if done.insert((TypeId::of::<G>(), index)) {
            burn::backend::wgpu::init_setup::<G>(&device, Default::default());
        }
    }
    device
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_device_has_a_name_and_the_cpu_is_always_there() {
        assert!(compiled_devices().contains(&Device::Cpu));
        for d in ALL_DEVICES {
            assert_eq!(cargo_feature(d).is_none(), d == Device::Cpu);
            assert!(!device_name(d).is_empty());
        }
    }

    #[test]
    #[cfg(not(feature = "cuda"))]
    fn a_missing_backend_names_its_feature() {
        let err = check_device(Device::Cuda).unwrap_err().to_string();
        assert!(err.contains("device `cuda` is not compiled into this build"), "{err}");
        assert!(err.contains("--features cuda"), "{err}");
        assert!(err.contains("this build has: cpu"), "{err}");
    }

    #[test]
    fn a_dtype_the_device_cannot_do_names_the_supported_ones() {
        let err = BackendError::Dtype { device: "wgpu", dtype: "bf16", supported: "f32, f16".into() };
        assert_eq!(supported_dtypes(Device::Wgpu), &[DType::F32, DType::F16]);
        #[cfg(feature = "wgpu")]
        assert_eq!(check(Device::Wgpu, DType::Bf16).unwrap_err(), err);
        assert!(err.to_string().contains("device `wgpu` cannot run dtype `bf16`; it supports: f32, f16"));
        assert!(check(Device::Cpu, DType::Bf16).is_ok());
    }

    #[derive(Debug)]
    struct DeviceName;
    impl OnBackend for DeviceName {
        type Output = String;
        fn run<B: LogProbBackend>(self, device: B::Device) -> String {
            B::name(&device).to_string()
        }
    }

    #[test]
    fn the_cpu_runs_on_flex() {
        let name = on_backend(Device::Cpu, 0, DType::F32, DeviceName).unwrap();
        assert!(name.to_lowercase().contains("flex"), "{name}");
    }
}
