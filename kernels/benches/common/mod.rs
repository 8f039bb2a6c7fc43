//! What the kernel benchmarks share: their inputs, made the same in every process, and the
//! process's resident memory.

/// `n` values uniform in `[-scale, scale)` from a hash of their index: the same inputs in every
/// process (hidden states of unit variance for `scale` 1.7, logits of about unit variance).
pub fn uniform(n: usize, stream: u64, scale: f32) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let mut z = i.wrapping_add(stream << 40).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// `(resident, peak resident)` in bytes, from /proc/self/status.
pub fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|k| k.parse::<u64>().ok())
            .map_or(0, |k| k * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Reset the peak resident set (Linux: `/proc/self/clear_refs`).
pub fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}
