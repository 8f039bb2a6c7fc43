//! Backend selection: maps a recipe's `[backend] device` to what this build was compiled with.
//! The CPU backend is always available; every GPU backend is a cargo feature of this crate
//! (forwarded by `fuserl-cli`), so that nobody pays for a CUDA or Vulkan build they do not use.
//! Asking for a device that was not compiled in is an error that names the feature to enable.
//!
//! ```
//! use fuserl_core::recipe::Device;
//! assert!(fuserl_backends::check_device(Device::Cpu).is_ok());
//! assert_eq!(fuserl_backends::cargo_feature(Device::Cuda), Some("cuda"));
//! ```

use fuserl_core::recipe::Device;

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
}
