//! The CPU backend's forward of causal grouped-query attention (issue #35): what
//! [`crate::attention::attention_fwd`] computes, in one pass per query head and tile of query rows
//! instead of a dozen Burn operations over the whole tile.
//!
//! Why: profiling classifier scoring on an AMD EPYC put a quarter of its time around attention's
//! softmax: glibc's scalar `expf` once per score, flex's element-wise passes (the bias added, the
//! maximum, the exponent, the sum, the division, each over the whole `[batch, heads, rows, keys]`
//! tile) and the copies of permuted views (docs/benchmarks.md). Here each `(batch, head)` is one
//! task on flex's thread pool; for each tile of query rows it multiplies the rows by the keys they
//! may see (the gemm crate, on one thread, reading `q`, `k` and `v` where they lie), adds the mask,
//! and makes the softmax in three vectorised passes over the row in cache (maximum, exponentials,
//! sum), with the exponential below; then the probabilities times the values (gemm again).
//!
//! Keys a causal or window limit hides from every row of a tile are not multiplied at all (their
//! probability is exactly 0, as in the tiles: `exp` of `f32::MIN` less a row's maximum is +0),
//! which halves the products of a causal prefill. The results are those of the tiles up to the
//! rounding of a sum's order and of the exponential (within 2 units in the last place, tested):
//! the same masking (a masked score is `f32::MIN`; a row that sees no key at all, a left pad's
//! query, is uniform over every key), the same statistics (`[2, batch, heads, seq]`: each row's
//! largest masked score and the log of its sum of exponentials), which the backward (the tiles')
//! uses to recompute the probabilities.

use rayon::prelude::*;

/// Scores one tile may hold (`rows * keys`, f32): 128 KiB, in a core's L2 cache with its rows
/// of `q`.
const TILE_SCORES: usize = 32 * 1024;

/// At most this many query rows per tile.
const TILE_ROWS: usize = 64;

/// Lanes of the vectorised reductions (one AVX-512 register of f32).
const LANES: usize = 16;

/// A tensor's values as the kernel reads them: the buffer from the tensor's first element, and
/// its strides in elements (the last one 1).
#[derive(Clone, Copy, Debug)]
pub struct View<'a> {
    /// The values, from the tensor's first element on.
    pub data: &'a [f32],
    /// Strides in elements, one per dimension.
    pub strides: [usize; 4],
}

impl View<'_> {
    /// Whether every element of a tensor of `dims` lies inside `data`, and the last dimension is
    /// in order (what gemm is given).
    fn fits(&self, dims: [usize; 4]) -> bool {
        if dims.contains(&0) {
            return true;
        }
        let last: usize = dims.iter().zip(&self.strides).map(|(n, s)| (n - 1) * s).sum();
        self.strides[3] == 1 && last < self.data.len()
    }
}

/// The shapes: `q [batch, seq, heads, dim]`, `k`, `v [batch, kv_heads, keys, dim]`.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    /// Sequences.
    pub batch: usize,
    /// Query rows.
    pub seq: usize,
    /// Query heads.
    pub heads: usize,
    /// Key and value heads (a divisor of `heads`).
    pub kv_heads: usize,
    /// Keys (cached ones first).
    pub keys: usize,
    /// Head dimension.
    pub dim: usize,
}

/// `(out [batch, seq, heads, dim], stats [2, batch, heads, seq])` for `q` (already scaled), `k`,
/// `v` and `key_bias [batch, keys]` (row-major; 0, or `f32::MIN` for a padding key), with `past`
/// cached keys before the first query and an optional sliding `window` ([`crate::AttentionMask`]).
///
/// # Panics
/// If a view does not hold its shape's elements or `heads` is not a multiple of `kv_heads`.
pub fn forward(
    (q, k, v): (View<'_>, View<'_>, View<'_>),
    key_bias: &[f32],
    dims: Dims,
    past: usize,
    window: Option<usize>,
) -> (Vec<f32>, Vec<f32>) {
    let Dims { batch: b, seq: t, heads: nh, kv_heads: nkv, keys, dim: d } = dims;
    assert!(nkv > 0 && nh.is_multiple_of(nkv), "attention: {nh} heads for {nkv} key/value heads");
    assert!(q.fits([b, t, nh, d]) && k.fits([b, nkv, keys, d]) && v.fits([b, nkv, keys, d]), "attention: views");
    assert!(key_bias.len() == b * keys, "attention: key_bias holds {} values for [{b}, {keys}]", key_bias.len());
    assert!(keys >= past + t, "attention: {keys} keys for {past} cached and {t} queries");
    // Each (batch, head)'s output rows `[seq, dim]` and statistics, then laid out as asked.
    let mut by_head = vec![0.0f32; b * nh * t * d];
    let mut stats = vec![0.0f32; 2 * b * nh * t];
    let (maxes, logs) = stats.split_at_mut(b * nh * t);
    if t > 0 && d > 0 {
        let ctx = Ctx { q, k, v, key_bias, dims, past, window };
        by_head
            .par_chunks_mut(t * d)
            .zip(maxes.par_chunks_mut(t))
            .zip(logs.par_chunks_mut(t))
            .enumerate()
            .for_each(|(unit, ((out, max), log))| ctx.head(unit / nh, unit % nh, out, (max, log)));
    }
    let mut out = vec![0.0f32; b * t * nh * d];
    if d > 0 {
        out.par_chunks_mut(nh * d).enumerate().for_each(|(row, dst)| {
            let (bi, i) = (row / t, row % t);
            for (h, dst) in dst.chunks_exact_mut(d).enumerate() {
                let src = ((bi * nh + h) * t + i) * d;
                dst.copy_from_slice(&by_head[src..src + d]);
            }
        });
    }
    (out, stats)
}

/// The inputs one `(batch, head)` task reads.
struct Ctx<'a> {
    q: View<'a>,
    k: View<'a>,
    v: View<'a>,
    key_bias: &'a [f32],
    dims: Dims,
    past: usize,
    window: Option<usize>,
}

impl Ctx<'_> {
    /// Query head `h` of sequence `bi`: its rows `out [seq, dim]` and their statistics.
    fn head(&self, bi: usize, h: usize, out: &mut [f32], (maxes, logs): (&mut [f32], &mut [f32])) {
        let Dims { seq: t, heads: nh, kv_heads: nkv, keys, dim: d, .. } = self.dims;
        let g = h / (nh / nkv);
        let q0 = bi * self.q.strides[0] + h * self.q.strides[2];
        let k0 = bi * self.k.strides[0] + g * self.k.strides[1];
        let v0 = bi * self.v.strides[0] + g * self.v.strides[1];
        let bias = &self.key_bias[bi * keys..(bi + 1) * keys];
        let rows = (TILE_SCORES / keys.max(1)).clamp(1, TILE_ROWS);
        let mut scores = Vec::new();
        for r0 in (0..t).step_by(rows) {
            let r1 = (r0 + rows).min(t);
            // The keys some row of the tile may see: up to the last row's position, from the first
            // row's window on.
            let hi = (self.past + r1).min(keys);
            let lo = self.window.map_or(0, |w| (self.past + r0 + 1).saturating_sub(w)).min(hi);
            let kl = hi - lo;
            scores.clear();
            scores.resize((r1 - r0) * kl, 0.0f32);
            // scores [rows, kl] = q[r0..r1] [rows, d] @ k[lo..hi]^T [d, kl]
            gemm_into(
                &mut scores,
                (r1 - r0, kl, d),
                (&self.q.data[q0 + r0 * self.q.strides[1]..], 1, self.q.strides[1]),
                (&self.k.data[k0 + lo * self.k.strides[2]..], self.k.strides[2], 1),
            );
            let mut uniform = Vec::new();
            for (i, row) in (r0..r1).zip(scores.chunks_exact_mut(kl.max(1))) {
                let at = self.past + i;
                let limit = |j: usize| j <= at && self.window.is_none_or(|w| at - j < w);
                for (j, s) in (lo..hi).zip(row.iter_mut()) {
                    let l = if limit(j) { 0.0 } else { f32::MIN };
                    *s += (l + bias[j]).max(f32::MIN);
                }
                // Keys outside lo..hi are masked: their score is `f32::MIN` (when there are any).
                let max = if kl < keys { row_max(row).max(f32::MIN) } else { row_max(row) };
                let (m, l) = if max > f32::MIN {
                    let sum = softmax_row(row, max);
                    (max, sum.ln())
                } else {
                    // No key visible: every score is `f32::MIN`, the row uniform over all keys.
                    row.fill(0.0);
                    uniform.push(i);
                    (max, (keys as f32).ln())
                };
                maxes[i] = m;
                logs[i] = l;
            }
            // out[r0..r1] [rows, d] = p [rows, kl] @ v[lo..hi] [kl, d]
            gemm_into(
                &mut out[r0 * d..r1 * d],
                (r1 - r0, d, kl),
                (&scores, 1, kl),
                (&self.v.data[v0 + lo * self.v.strides[2]..], 1, self.v.strides[2]),
            );
            for i in uniform {
                let p = 1.0 / keys as f32;
                let dst = &mut out[i * d..(i + 1) * d];
                dst.fill(0.0);
                for j in 0..keys {
                    let src = &self.v.data[v0 + j * self.v.strides[2]..][..d];
                    for (o, x) in dst.iter_mut().zip(src) {
                        *o += p * x;
                    }
                }
            }
        }
    }
}

/// `dst [m, n] = lhs [m, k] @ rhs [k, n]`, row-major `dst`; `lhs` and `rhs` given as (values from
/// the first element, column stride, row stride), on this thread.
fn gemm_into(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        dst.fill(0.0);
        return;
    }
    let last = |(data, cs, rs): (&[f32], usize, usize), rows: usize, cols: usize| {
        data.len() > (rows - 1) * rs + (cols - 1) * cs
    };
    assert!(dst.len() == m * n && last(lhs, m, k) && last(rhs, k, n), "attention: gemm operands");
    // SAFETY: every index gemm forms from these sizes and strides is checked above to lie inside
    // its slice; `dst` is row-major `[m, n]` and is not read (`read_dst` false).
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            false,
            lhs.0.as_ptr(),
            lhs.1 as isize,
            lhs.2 as isize,
            rhs.0.as_ptr(),
            rhs.1 as isize,
            rhs.2 as isize,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// The largest value of `row` (minus infinity when empty; NaN is passed over, as `f32::max` does).
fn row_max(row: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features the function is compiled for.
            #[allow(unsafe_code)]
            return unsafe { row_max_avx512(row) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            #[allow(unsafe_code)]
            return unsafe { row_max_avx2(row) };
        }
    }
    row_max_with(row)
}

/// `row` made its probabilities `exp(z - max) / sum` in place; returns the sum.
fn softmax_row(row: &mut [f32], max: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has the features the function is compiled for.
            #[allow(unsafe_code)]
            return unsafe { softmax_avx512(row, max) };
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: as above.
            #[allow(unsafe_code)]
            return unsafe { softmax_avx2(row, max) };
        }
    }
    softmax_with(row, max)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn row_max_avx512(row: &[f32]) -> f32 {
    row_max_with(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn row_max_avx2(row: &[f32]) -> f32 {
    row_max_with(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn softmax_avx512(row: &mut [f32], max: f32) -> f32 {
    softmax_with(row, max)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn softmax_avx2(row: &mut [f32], max: f32) -> f32 {
    softmax_with(row, max)
}

/// [`row_max`] in lanes that vectorise with whatever unit the caller is compiled for.
#[inline(always)]
fn row_max_with(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a = a.max(*x);
        }
    }
    chunks.remainder().iter().fold(acc.iter().fold(f32::NEG_INFINITY, |m, x| m.max(*x)), |m, x| m.max(*x))
}

/// [`softmax_row`] as [`row_max_with`]: the exponentials, their sum in lanes, the division.
#[inline(always)]
fn softmax_with(row: &mut [f32], max: f32) -> f32 {
    for z in row.iter_mut() {
        *z = exp(*z - max);
    }
    let mut acc = [0.0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a += x;
        }
    }
    let sum = chunks.remainder().iter().fold(acc.iter().sum::<f32>(), |s, x| s + x);
    for z in row.iter_mut() {
        *z /= sum;
    }
    sum
}

/// `e^x` in f32 without branches (so that a loop of it vectorises) nor fused multiply-adds (the
/// same bits on every CPU), within 2 units in the last
/// place of the exact value for every x (tested against f64's `exp`): +0 below ln(2^-150), where
/// the exact value rounds to 0, and infinity above ln(f32::MAX); NaN stays NaN.
///
/// Cody and Waite's reduction `x = n ln 2 + r` with `|r| <= ln 2 / 2` (ln 2 in two parts, the
/// first with few bits so that `n ln2_hi` is exact), then `e^r` by Cephes' `expf` polynomial
/// (Moshier's minimax coefficients, a relative error near 1e-7), and `2^n` built in the exponent
/// bits in two halves, so that results down to the smallest subnormal are scaled without an
/// intermediate underflow.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const HI: f32 = 88.722_83; // ln(f32::MAX)
    const LO: f32 = -103.972_08; // ln(2^-150)
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // 355 / 512
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer, held in the low bits.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(LO, HI); // NaN stays NaN
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = 1.987_569_2e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5; // 5.0000001201e-1 in f32
    let p = p * (r * r) + r + 1.0;
    // Wrapping integer arithmetic (it cannot overflow here): the crate's overflow checks would
    // be branches, which keep the loop from vectorising.
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let (n1, n2) = (ni >> 1, ni.wrapping_sub(ni >> 1));
    let scale = |e: i32| f32::from_bits((e.wrapping_add(127) as u32) << 23);
    let y = p * scale(n1) * scale(n2);
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Units in the last place between `got` and the exact `want` (f64), at the spacing of f32
    /// values near `want` (subnormal spacing below the normal range).
    fn ulps(got: f32, want: f64) -> f64 {
        let spacing = (want.abs().max(f64::from(f32::MIN_POSITIVE)) * f64::from(f32::EPSILON)).max(2f64.powi(-149));
        (f64::from(got) - want).abs() / spacing
    }

    #[test]
    fn exp_is_within_two_units_in_the_last_place() {
        let mut worst: (f64, f32) = (0.0, 0.0);
        // Every 97th f32 bit pattern between -110 and 90, and the edges themselves.
        let edges = [0.0f32, -0.0, 1e-30, -1e-30, 88.722_83, 88.73, -103.972_08, -103.98, -87.336_55, -1.0, 1.0];
        let sweep = (0..u32::MAX / 97).map(|i| f32::from_bits(i * 97)).filter(|x| (-110.0..90.0).contains(x));
        for x in edges.into_iter().chain(sweep) {
            let want = f64::from(x).exp();
            let got = exp(x);
            let u = if want > f64::from(f32::MAX) {
                if got == f32::INFINITY { 0.0 } else { f64::INFINITY }
            } else {
                ulps(got, want)
            };
            if u > worst.0 {
                worst = (u, x);
            }
        }
        assert!(worst.0 <= 2.0, "exp({}) is {} units in the last place off", worst.1, worst.0);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(f32::NEG_INFINITY).to_bits(), 0);
        assert_eq!(exp(f32::MIN).to_bits(), 0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
    }

    #[test]
    fn reductions_match_scalar_ones() {
        let row: Vec<f32> = (0..67).map(|i| ((i * 37) % 23) as f32 - 11.5).collect();
        assert_eq!(row_max(&row), 10.5);
        assert_eq!(row_max(&[]), f32::NEG_INFINITY);
        let mut p = row.clone();
        let sum = softmax_row(&mut p, 10.5);
        let want: f64 = row.iter().map(|&x| (f64::from(x) - 10.5).exp()).sum();
        assert!((f64::from(sum) - want).abs() < 1e-5 * want, "{sum} against {want}");
        let total: f32 = p.iter().sum();
        assert!((total - 1.0).abs() < 1e-5, "probabilities sum to {total}");
    }
}
