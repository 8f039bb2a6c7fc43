//! How much memory a device has, and on the CPU how much the process used: what the memory plan
//! (`fuserl plan`, `fuserl_train::plan`) compares its estimate with.
//!
//! The CPU side reads Linux's `/proc` (elsewhere the answers are `None`): the machine's memory
//! from `/proc/meminfo`, the process's resident memory and its peak from `/proc/self/status`;
//! the peak is reset by writing `5` to `/proc/self/clear_refs` (proc(5)), so that each stage
//! measures its own. A CUDA device's memory comes from `nvidia-smi` (the driver's tool, present
//! wherever the driver is); other GPU backends do not tell it, and `[backend] memory_gb`-style
//! overrides come from the caller.

use fuserl_core::backend::Device;

/// The memory of `device` number `index` in bytes, when it can be found: the machine's for the
/// CPU, the card's for CUDA (through `nvidia-smi`), none for the wgpu and ROCm backends.
pub fn device_capacity(device: Device, index: u32) -> Option<u64> {
    match device {
        Device::Cpu => host_total(),
        Device::Cuda => nvidia_smi_total(index),
        _ => None,
    }
}

/// Whether `device` is the CPU: its memory is the machine's, shared with everything else, and
/// a plan over it is a warning, not a refusal (the system can swap).
pub fn is_host(device: Device) -> bool {
    device == Device::Cpu
}

fn nvidia_smi_total(index: u32) -> Option<u64> {
    // CUDA numbers the devices that CUDA_VISIBLE_DEVICES lists (ids or UUIDs), nvidia-smi all of
    // them: device `index` is the `index`th entry of that list when it is set.
    let id = match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(list) if !list.trim().is_empty() => list.split(',').nth(index as usize)?.trim().to_owned(),
        _ => index.to_string(),
    };
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", &id])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let mib: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    Some(mib << 20)
}

/// The machine's memory (`MemTotal`).
pub fn host_total() -> Option<u64> {
    kib_field("/proc/meminfo", "MemTotal:")
}

/// The process's resident memory now (`VmRSS`).
pub fn resident() -> Option<u64> {
    kib_field("/proc/self/status", "VmRSS:")
}

/// The process's peak resident memory since it started or since the last [`reset_peak`]
/// (`VmHWM`).
pub fn peak_resident() -> Option<u64> {
    kib_field("/proc/self/status", "VmHWM:")
}

/// Resets the peak that [`peak_resident`] reports to the resident memory now. False where the
/// system does not allow it (then the peak is the process's since it started).
pub fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn kib_field(file: &str, name: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line[name.len()..].split_whitespace().next()?.parse().ok()?;
    Some(kib << 10)
}

#[cfg(test)]
mod tests {
    #[cfg(target_os = "linux")]
    #[test]
    fn the_peak_follows_an_allocation_and_resets() {
        use super::{peak_resident, reset_peak, resident};
        let before = resident().expect("VmRSS");
        // 64 MiB touched page by page.
        let block = vec![1u8; 64 << 20];
        let peak = peak_resident().expect("VmHWM");
        assert!(peak >= before + (48 << 20), "peak {peak} after a 64 MiB block over {before}");
        drop(block);
        if reset_peak() {
            let after = peak_resident().expect("VmHWM");
            assert!(after < peak, "the peak after a reset ({after}) is below the block's ({peak})");
        }
        assert!(super::host_total().expect("MemTotal") > 0);
    }
}
