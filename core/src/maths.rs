//! Numerically stable scalar helpers shared by the built-in objectives and weighting schemes.

/// `ln(sigma(z))`, exact for large `|z|` (no overflow, no `ln(0)`).
pub fn log_sigmoid(z: f64) -> f64 {
    // ln sigma(z) = min(z, 0) - ln(1 + e^{-|z|})
    z.min(0.0) - (-z.abs()).exp().ln_1p()
}

/// `sigma(z) = 1 / (1 + e^{-z})`, without overflow.
pub fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// Softmax of `scores / temperature`, shifted by the maximum so that it never overflows.
/// Entries equal to the maximum share the mass when the temperature is tiny.
pub fn softmax(scores: &[f64], temperature: f64) -> Vec<f64> {
    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = scores
        .iter()
        .map(|s| {
            let shifted = (s - max) / temperature;
            // s == max gives exactly 0 even when the division by a tiny temperature would give NaN.
            if *s == max { 1.0 } else { shifted.exp() }
        })
        .collect();
    let total: f64 = exps.iter().sum();
    exps.iter().map(|e| e / total).collect()
}

/// Mean of `xs` (0 for an empty slice).
pub fn mean(xs: &[f64]) -> f64 {
    if xs.is_empty() { 0.0 } else { xs.iter().sum::<f64>() / xs.len() as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_sigmoid_is_stable() {
        assert!((log_sigmoid(0.0) + std::f64::consts::LN_2).abs() < 1e-15);
        assert_eq!(log_sigmoid(1e4), -0.0_f64.max((-1e4_f64).exp().ln_1p()));
        assert!((log_sigmoid(-1e4) + 1e4).abs() < 1e-9);
        assert!(log_sigmoid(-1e308).is_finite());
    }

    #[test]
    fn softmax_is_finite_for_huge_scores_and_tiny_temperatures() {
        let w = softmax(&[1e300, -1e300, 1e300], 1e-300);
        assert_eq!(w, vec![0.5, 0.0, 0.5]);
        let w = softmax(&[1.0, 2.0, 3.0], 1.0);
        assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-15);
    }

    #[test]
    fn fnv1a_has_the_published_values() {
        // The FNV reference test vectors (Fowler, Noll, Vo).
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(Fnv1a::new().update(b"foo").update(b"bar").finish(), fnv1a(b"foobar"));
    }
}

/// SplitMix64: a small seedable generator with the same stream on every platform (sampling in
/// generation, bootstrap resampling in evaluation).
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`, 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `0..n` (multiply-shift; the bias is below 2^-32 for `n` below 2^32).
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }
}

/// 64-bit FNV-1a: the stable hash of ids, seeds, texts and weights in stores and caches (the same
/// value on every platform and in every version, unlike `std`'s hasher).
#[derive(Clone, Copy, Debug)]
pub struct Fnv1a(u64);

impl Fnv1a {
    /// FNV-1a's offset basis.
    pub const BASIS: u64 = 0xcbf2_9ce4_8422_2325;

    /// A hasher starting from the offset basis.
    pub fn new() -> Self {
        Self(Self::BASIS)
    }

    /// A hasher starting from the offset basis mixed with `salt` (`BASIS ^ salt`).
    pub fn salted(salt: u64) -> Self {
        Self(Self::BASIS ^ salt)
    }

    /// Feed bytes.
    pub fn update(&mut self, bytes: &[u8]) -> &mut Self {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self
    }

    /// The hash so far.
    pub fn finish(&self) -> u64 {
        self.0
    }
}

impl Default for Fnv1a {
    fn default() -> Self {
        Self::new()
    }
}

/// FNV-1a of `bytes`.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    Fnv1a::new().update(bytes).finish()
}
