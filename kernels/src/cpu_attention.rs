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
//! largest masked score and the log of its sum of exponentials), which the backward uses to
//! recompute the probabilities.
//!
//! The backward ([`backward`]) is made the same way, one task per `(batch, key/value head)` (the
//! task sums the gradients of its keys and values over the query heads that read them): per tile,
//! the probabilities recomputed from the statistics, then FlashAttention's products `dV += P^T
//! dO`, `dP = dO V^T`, `dS = P (dP - rowsum(dO O))`, `dQ = dS K`, `dK += dS^T Q`.

use rayon::prelude::*;

/// Scores one tile may hold (`rows * keys`, f32): 128 KiB, in a core's L2 cache with its rows
/// of `q`.
const TILE_SCORES: usize = 32 * 1024;

/// At most this many query rows per tile.
const TILE_ROWS: usize = 64;

/// Lanes of the vectorised reductions (one AVX-512 register of f32).
pub(crate) const LANES: usize = 16;

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

    /// Row `i` of `[_, rows, _, dim]` at `(a, c)`: `(values from it on, its row stride)` as gemm
    /// takes an operand whose rows are dimension 1 (`q`, the output and its gradient).
    fn rows_of(&self, a: usize, c: usize, i: usize) -> (&[f32], usize) {
        (&self.data[a * self.strides[0] + i * self.strides[1] + c * self.strides[2]..], self.strides[1])
    }

    /// Row `j` of `[_, _, keys, dim]` at `(a, b)` (keys and values).
    fn keys_of(&self, a: usize, b: usize, j: usize) -> (&[f32], usize) {
        (&self.data[a * self.strides[0] + b * self.strides[1] + j * self.strides[2]..], self.strides[2])
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

/// Where queries may look: `past` cached keys before the first query, an optional sliding
/// `window` ([`crate::AttentionMask`]), and the keys' own bias `[batch, keys]` (row-major; 0, or
/// `f32::MIN` for a padding key).
#[derive(Clone, Copy, Debug)]
pub struct Mask<'a> {
    /// Keys before the first query.
    pub past: usize,
    /// A sliding-window layer's window.
    pub window: Option<usize>,
    /// `[batch, keys]`.
    pub key_bias: &'a [f32],
}

/// `(out [batch, seq, heads, dim], stats [2, batch, heads, seq])` for `q` (already scaled), `k`
/// and `v`.
///
/// # Panics
/// If a view does not hold its shape's elements or `heads` is not a multiple of `kv_heads`.
pub fn forward((q, k, v): (View<'_>, View<'_>, View<'_>), mask: Mask<'_>, dims: Dims) -> (Vec<f32>, Vec<f32>) {
    let ctx = Ctx::new((q, k, v), mask, dims);
    let Dims { batch: b, seq: t, heads: nh, dim: d, .. } = dims;
    // Each (batch, head)'s output rows `[seq, dim]` and statistics, then laid out as asked.
    let mut by_head = vec![0.0f32; b * nh * t * d];
    let mut stats = vec![0.0f32; 2 * b * nh * t];
    let (maxes, logs) = stats.split_at_mut(b * nh * t);
    if t > 0 && d > 0 {
        by_head
            .par_chunks_mut(t * d)
            .zip(maxes.par_chunks_mut(t))
            .zip(logs.par_chunks_mut(t))
            .enumerate()
            .for_each(|(unit, ((out, max), log))| ctx.head_forward(unit / nh, unit % nh, out, (max, log)));
    }
    (heads_inside(&by_head, dims), stats)
}

/// The gradients `(dq [batch, seq, heads, dim], dk, dv [batch, kv_heads, keys, dim])` for the
/// output's gradient `grad`, from the forward's `out` and `stats` (`[2, batch, heads, seq]`,
/// row-major).
///
/// # Panics
/// As [`forward`]; also if `out`, `grad` or `stats` do not hold their shapes.
pub fn backward(
    (q, k, v): (View<'_>, View<'_>, View<'_>),
    (out, grad): (View<'_>, View<'_>),
    stats: &[f32],
    mask: Mask<'_>,
    dims: Dims,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let ctx = Ctx::new((q, k, v), mask, dims);
    let Dims { batch: b, seq: t, heads: nh, kv_heads: nkv, keys, dim: d } = dims;
    assert!(out.fits([b, t, nh, d]) && grad.fits([b, t, nh, d]), "attention: views");
    assert!(stats.len() == 2 * b * nh * t, "attention: stats hold {} values for [2, {b}, {nh}, {t}]", stats.len());
    let rep = nh / nkv;
    // dq by head (`[batch, kv_heads, rep, seq, dim]`: a task's heads together), dk and dv.
    let mut dq = vec![0.0f32; b * nh * t * d];
    let mut dk = vec![0.0f32; b * nkv * keys * d];
    let mut dv = vec![0.0f32; b * nkv * keys * d];
    if t > 0 && d > 0 && keys > 0 {
        let grads = Grads { out, grad, stats };
        dq.par_chunks_mut(rep * t * d)
            .zip(dk.par_chunks_mut(keys * d))
            .zip(dv.par_chunks_mut(keys * d))
            .enumerate()
            .for_each(|(unit, ((dq, dk), dv))| ctx.group_backward(unit / nkv, unit % nkv, &grads, (dq, dk, dv)));
    }
    (heads_inside(&dq, dims), dk, dv)
}

/// `[batch, heads, seq, dim]` as `[batch, seq, heads, dim]`.
fn heads_inside(by_head: &[f32], Dims { seq: t, heads: nh, dim: d, .. }: Dims) -> Vec<f32> {
    let mut out = vec![0.0f32; by_head.len()];
    if d > 0 && t > 0 {
        out.par_chunks_mut(nh * d).enumerate().for_each(|(row, dst)| {
            let (bi, i) = (row / t, row % t);
            for (h, dst) in dst.chunks_exact_mut(d).enumerate() {
                let src = ((bi * nh + h) * t + i) * d;
                dst.copy_from_slice(&by_head[src..src + d]);
            }
        });
    }
    out
}

/// What the backward reads besides the inputs.
struct Grads<'a> {
    out: View<'a>,
    grad: View<'a>,
    stats: &'a [f32],
}

/// The inputs every task reads.
struct Ctx<'a> {
    q: View<'a>,
    k: View<'a>,
    v: View<'a>,
    mask: Mask<'a>,
    dims: Dims,
    /// Query rows per tile.
    rows: usize,
    /// Each sequence's leading padding keys (bias `f32::MIN`), which no row sees: left padding,
    /// and in continuous batching the columns of the rows that came before.
    padding: Vec<usize>,
}

impl<'a> Ctx<'a> {
    fn new((q, k, v): (View<'a>, View<'a>, View<'a>), mask: Mask<'a>, dims: Dims) -> Self {
        let Dims { batch: b, seq: t, heads: nh, kv_heads: nkv, keys, dim: d } = dims;
        assert!(nkv > 0 && nh.is_multiple_of(nkv), "attention: {nh} heads for {nkv} key/value heads");
        assert!(q.fits([b, t, nh, d]) && k.fits([b, nkv, keys, d]) && v.fits([b, nkv, keys, d]), "attention: views");
        let bias = mask.key_bias.len();
        assert!(bias == b * keys, "attention: key_bias holds {bias} values for [{b}, {keys}]");
        assert!(keys >= mask.past + t, "attention: {keys} keys for {} cached and {t} queries", mask.past);
        let padding = (0..b)
            .map(|bi| mask.key_bias[bi * keys..][..keys].iter().position(|&x| x > f32::MIN).unwrap_or(keys))
            .collect();
        Self { q, k, v, mask, dims, rows: (TILE_SCORES / keys.max(1)).clamp(1, TILE_ROWS), padding }
    }

    /// The tiles of query rows.
    fn tiles(&self) -> impl Iterator<Item = (usize, usize)> + use<'_> {
        let (t, rows) = (self.dims.seq, self.rows);
        (0..t).step_by(rows).map(move |r0| (r0, (r0 + rows).min(t)))
    }

    /// The keys some row of tile `r0..r1` of sequence `bi` may see: up to the last row's
    /// position, from the first row's window and the end of the leading padding on. (A row that
    /// sees some key gives the others exactly 0: leaving them out changes nothing.)
    fn visible(&self, bi: usize, (r0, r1): (usize, usize)) -> (usize, usize) {
        let hi = (self.mask.past + r1).min(self.dims.keys);
        let window = self.mask.window.map_or(0, |w| (self.mask.past + r0 + 1).saturating_sub(w));
        // The padding only when the tile sees past it: a tile whose rows all lie in it sees no
        // key, and its rows are uniform over every key (as in the tiles).
        let padding = if self.padding[bi] < hi { self.padding[bi] } else { 0 };
        let lo = window.max(padding).min(hi);
        (lo, hi)
    }

    /// `scores [rows, hi - lo]` of query head `h` of sequence `bi` against keys `lo..hi` (of
    /// key/value head `g`), with the mask added: every masked score is `f32::MIN` (for scores
    /// much smaller than it), as in the tiles.
    fn masked_scores(
        &self,
        (bi, h, g): (usize, usize, usize),
        (r0, r1): (usize, usize),
        (lo, hi): (usize, usize),
        scores: &mut Vec<f32>,
    ) {
        let kl = hi - lo;
        scores.clear();
        scores.resize((r1 - r0) * kl, 0.0f32);
        let (q, q_rs) = self.q.rows_of(bi, h, r0);
        let (k, k_rs) = self.k.keys_of(bi, g, lo);
        // scores [rows, kl] = q[r0..r1] [rows, d] @ k[lo..hi]^T [d, kl]
        gemm_into(scores, (r1 - r0, kl, self.dims.dim), (q, 1, q_rs), (k, k_rs, 1), false);
        let bias = &self.mask.key_bias[bi * self.dims.keys..][lo..hi];
        for (i, row) in (r0..r1).zip(scores.chunks_exact_mut(kl.max(1))) {
            let at = self.mask.past + i;
            // Keys lo..=at are causally visible; those before the window's start are not.
            let from = self.mask.window.map_or(0, |w| (at + 1).saturating_sub(w)).clamp(lo, hi) - lo;
            let to = (at + 1).clamp(lo, hi) - lo;
            add_bias(row, bias, (from, to));
        }
    }

    /// Query head `h` of sequence `bi`: its rows `out [seq, dim]` and their statistics.
    fn head_forward(&self, bi: usize, h: usize, out: &mut [f32], (maxes, logs): (&mut [f32], &mut [f32])) {
        let Dims { heads: nh, kv_heads: nkv, keys, dim: d, .. } = self.dims;
        let g = h / (nh / nkv);
        let mut scores = Vec::new();
        for (r0, r1) in self.tiles() {
            let (lo, hi) = self.visible(bi, (r0, r1));
            let kl = hi - lo;
            self.masked_scores((bi, h, g), (r0, r1), (lo, hi), &mut scores);
            let mut uniform = Vec::new();
            for (i, row) in (r0..r1).zip(scores.chunks_exact_mut(kl.max(1))) {
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
            let (v, v_rs) = self.v.keys_of(bi, g, lo);
            gemm_into(&mut out[r0 * d..r1 * d], (r1 - r0, d, kl), (&scores, 1, kl), (v, 1, v_rs), false);
            for i in uniform {
                let p = 1.0 / keys as f32;
                let dst = &mut out[i * d..(i + 1) * d];
                dst.fill(0.0);
                for j in 0..keys {
                    for (o, x) in dst.iter_mut().zip(self.v.keys_of(bi, g, j).0) {
                        *o += p * x;
                    }
                }
            }
        }
    }

    /// Key/value head `g` of sequence `bi`: the gradients of its query heads' rows (`dq [rep,
    /// seq, dim]`) and of its keys and values (`[keys, dim]` each, summed over those heads).
    fn group_backward(
        &self,
        bi: usize,
        g: usize,
        grads: &Grads<'_>,
        (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
    ) {
        let Dims { batch: b, seq: t, heads: nh, kv_heads: nkv, keys, dim: d } = self.dims;
        let rep = nh / nkv;
        let (mut p, mut ds) = (Vec::new(), Vec::new());
        for (hh, dq) in dq.chunks_exact_mut(t * d).enumerate().take(rep) {
            let h = g * rep + hh;
            let at = (bi * nh + h) * t;
            let (maxes, logs) = (&grads.stats[at..at + t], &grads.stats[b * nh * t + at..][..t]);
            for (r0, r1) in self.tiles() {
                // A row that sees no key (its maximum `f32::MIN`) is uniform over every key:
                // then the tile takes them all (the others' masked keys get 0).
                let none = maxes[r0..r1].iter().any(|&m| m <= f32::MIN);
                let (lo, hi) = if none { (0, keys) } else { self.visible(bi, (r0, r1)) };
                let kl = hi - lo;
                self.masked_scores((bi, h, g), (r0, r1), (lo, hi), &mut p);
                for ((row, &m), &l) in p.chunks_exact_mut(kl.max(1)).zip(&maxes[r0..r1]).zip(&logs[r0..r1]) {
                    probs_row(row, m, l);
                }
                let n = r1 - r0;
                let (go, go_rs) = grads.grad.rows_of(bi, h, r0);
                let (v, v_rs) = self.v.keys_of(bi, g, lo);
                let (k, k_rs) = self.k.keys_of(bi, g, lo);
                let (q, q_rs) = self.q.rows_of(bi, h, r0);
                // dv[lo..hi] += p^T [kl, rows] @ dO [rows, d]
                gemm_into(&mut dv[lo * d..hi * d], (kl, d, n), (&p, kl, 1), (go, 1, go_rs), true);
                // dp [rows, kl] = dO @ v[lo..hi]^T, then ds = p (dp - rowsum(dO O)) in place
                ds.clear();
                ds.resize(n * kl, 0.0f32);
                gemm_into(&mut ds, (n, kl, d), (go, 1, go_rs), (v, v_rs, 1), false);
                for (i, (ds, p)) in (r0..r1).zip(ds.chunks_exact_mut(kl.max(1)).zip(p.chunks_exact(kl.max(1)))) {
                    let delta = dot(&grads.grad.rows_of(bi, h, i).0[..d], &grads.out.rows_of(bi, h, i).0[..d]);
                    softmax_grad_row(ds, p, delta);
                }
                // dq[r0..r1] = ds [rows, kl] @ k[lo..hi] [kl, d]
                gemm_into(&mut dq[r0 * d..r1 * d], (n, d, kl), (&ds, 1, kl), (k, 1, k_rs), false);
                // dk[lo..hi] += ds^T [kl, rows] @ q[r0..r1] [rows, d]
                gemm_into(&mut dk[lo * d..hi * d], (kl, d, n), (&ds, kl, 1), (q, 1, q_rs), true);
            }
        }
    }
}

/// `dst [m, n] = lhs [m, k] @ rhs [k, n]` (`accumulate`: `dst +=`), row-major `dst`; `lhs` and
/// `rhs` given as (values from the first element, column stride, row stride), on this thread.
fn gemm_into(
    dst: &mut [f32],
    (m, n, k): (usize, usize, usize),
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    let last = |(data, cs, rs): (&[f32], usize, usize), rows: usize, cols: usize| {
        data.len() > (rows - 1) * rs + (cols - 1) * cs
    };
    assert!(dst.len() == m * n && last(lhs, m, k) && last(rhs, k, n), "attention: gemm operands");
    // SAFETY: every index gemm forms from these sizes and strides is checked above to lie inside
    // its slice; `dst` is row-major `[m, n]`, read only when accumulating.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.0.as_ptr(),
            lhs.1 as isize,
            lhs.2 as isize,
            rhs.0.as_ptr(),
            rhs.1 as isize,
            rhs.2 as isize,
            if accumulate { 1.0f32 } else { 0.0 },
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Defines `$name` as `$with` (an `#[inline(always)]` function whose loops vectorise) compiled
/// for the widest vector unit the CPU has, chosen at run time.
macro_rules! vectorised {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? = $with:ident;) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $with($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $with($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features the function is compiled for.
                    #[allow(unsafe_code)]
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: as above.
                    #[allow(unsafe_code)]
                    return unsafe { avx2($($arg),*) };
                }
            }
            $with($($arg),*)
        }
    };
}

pub(crate) use vectorised;

vectorised! {
    /// The largest value of `row` (minus infinity when empty; NaN is passed over, as `f32::max`
    /// does).
    pub(crate) fn row_max(row: &[f32]) -> f32 = row_max_with;
}

vectorised! {
    /// `row` made its probabilities `exp(z - max) / sum` in place; returns the sum.
    fn softmax_row(row: &mut [f32], max: f32) -> f32 = softmax_with;
}

vectorised! {
    /// `row` made `exp((z - max) - log_sum)` in place: the probabilities again, from the forward's
    /// statistics (as the tiles' backward makes them).
    fn probs_row(row: &mut [f32], max: f32, log_sum: f32) = probs_with;
}

vectorised! {
    /// `dp` made `p (dp - delta)` in place: softmax's backward for a row.
    fn softmax_grad_row(dp: &mut [f32], p: &[f32], delta: f32) = softmax_grad_with;
}

vectorised! {
    /// `sum_i a_i b_i`.
    fn dot(a: &[f32], b: &[f32]) -> f32 = dot_with;
}

vectorised! {
    /// The mask added to a row of scores: `bias` (the keys' own) to keys `from..to`, `f32::MIN`
    /// to every score outside them; each mask at least `f32::MIN` (as the tiles make it).
    fn add_bias(row: &mut [f32], bias: &[f32], visible: (usize, usize)) = add_bias_with;
}

/// The lanes' partial results of `f` over `row` in blocks of [`LANES`], then folded.
#[inline(always)]
fn lanes(row: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *a = f(*a, *x);
        }
    }
    chunks.remainder().iter().fold(acc.iter().fold(init, |a, x| f(a, *x)), |a, x| f(a, *x))
}

#[inline(always)]
fn row_max_with(row: &[f32]) -> f32 {
    lanes(row, f32::NEG_INFINITY, f32::max)
}

#[inline(always)]
fn softmax_with(row: &mut [f32], max: f32) -> f32 {
    for z in row.iter_mut() {
        *z = exp(*z - max);
    }
    let sum = lanes(row, 0.0, |a, x| a + x);
    for z in row.iter_mut() {
        *z /= sum;
    }
    sum
}

#[inline(always)]
fn probs_with(row: &mut [f32], max: f32, log_sum: f32) {
    for z in row.iter_mut() {
        *z = exp((*z - max) - log_sum);
    }
}

#[inline(always)]
fn softmax_grad_with(dp: &mut [f32], p: &[f32], delta: f32) {
    for (d, p) in dp.iter_mut().zip(p) {
        *d = p * (*d - delta);
    }
}

#[inline(always)]
fn dot_with(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (mut ca, mut cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (x, y) in (&mut ca).zip(&mut cb) {
        for ((s, x), y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    ca.remainder().iter().zip(cb.remainder()).fold(acc.iter().sum::<f32>(), |s, (x, y)| s + x * y)
}

#[inline(always)]
fn add_bias_with(row: &mut [f32], bias: &[f32], (from, to): (usize, usize)) {
    // In three stretches rather than a test per key (the loops stay branch-free).
    let (head, rest) = row.split_at_mut(from);
    let (seen, tail) = rest.split_at_mut(to - from);
    for (s, b) in head.iter_mut().zip(bias).chain(tail.iter_mut().zip(&bias[to..])) {
        *s += (f32::MIN + b).max(f32::MIN);
    }
    for (s, b) in seen.iter_mut().zip(&bias[from..to]) {
        *s += b.max(f32::MIN);
    }
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

    /// Units in the last place between `got` and the exact `want` (f64): the spacing of the f32
    /// values in `want`'s binade (the subnormals' below the normal range).
    fn ulps(got: f32, want: f64) -> f64 {
        let binade = want.abs().max(f64::from(f32::MIN_POSITIVE)).log2().floor();
        (f64::from(got) - want).abs() / 2f64.powf(binade - 23.0)
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
