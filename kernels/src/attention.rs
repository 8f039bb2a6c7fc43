//! Causal grouped-query attention that never holds a `[seq, seq]` score tensor for the whole
//! sequence (issue #37): the queries are walked in tiles of rows, each tile's scores made,
//! masked and turned into probabilities, and only the output and each row's statistics (its
//! largest score and the log of its sum of exponentials, `[2, batch, heads, seq]`) are kept for the
//! backward, which recomputes each tile's probabilities (FlashAttention's recomputation, tiled
//! over query rows). The two are kept apart rather than as one log-sum-exp: for a row with no
//! visible key the largest score is `f32::MIN`, and `f32::MIN + ln(keys)` rounds back to
//! `f32::MIN`, which would make every probability of that row 1.
//!
//! The mask is described, not materialised: query `i` sits at key index `past + i` (keys before
//! it come from a cache) and may see key `j` when `j <= past + i`, the key is not padding (a
//! per-key additive bias, 0 or `f32::MIN`), and, for a sliding-window layer, `past + i - j <
//! window`. A masked score becomes `f32::MIN` (not minus infinity), so a row with no visible key
//! (a padding query) is uniform, exactly as a materialised mask makes it.
//!
//! Layouts are the model's, so that nothing is copied to enter or leave: queries and the output
//! `[batch, seq, heads, dim]` (the projections' own), keys and values `[batch, kv_heads, keys,
//! dim]` (the KV cache's). Grouped-query attention without repeating keys and values: query
//! head `h` reads key/value head `h / rep`; a tile's queries are viewed as `[batch, kv_heads, rep,
//! rows, dim]` and the keys and values broadcast over `rep` in the batched matmuls (strided
//! views: no copies; their gradients are summed over `rep`). Scores, softmax and every
//! accumulation are f32 whatever the inputs' dtype.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData};

/// Where a query may look (see the module's documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionMask {
    /// Keys before the first query (a KV cache's length): query `i` sits at key index `past + i`.
    pub past: usize,
    /// A sliding-window layer's window (the query's own key included); `None`: every earlier key.
    pub window: Option<usize>,
    /// Query rows per tile.
    pub rows: usize,
}

impl AttentionMask {
    /// A mask for queries after `past` cached keys, with tiles of at most `max_elems` scores
    /// (`batch * heads * rows * keys`).
    pub fn new(
        past: usize,
        window: Option<usize>,
        (batch, heads, keys): (usize, usize, usize),
        max_elems: usize,
    ) -> Self {
        let per_row = (batch * heads * keys).max(1);
        Self { past, window, rows: (max_elems / per_row).max(1) }
    }

    /// The query rows of each tile of `t` queries.
    fn tiles(&self, t: usize) -> impl Iterator<Item = (usize, usize)> {
        let rows = self.rows.max(1);
        (0..t).step_by(rows).map(move |r0| (r0, (r0 + rows).min(t)))
    }
}

/// The additive bias of query rows `r0..r1`, `[batch, 1, 1, rows, keys]`: the keys' own bias
/// (`key_bias [batch, keys]`, 0 or `f32::MIN`) and the causal and window limits, at least
/// `f32::MIN` (two `f32::MIN` would add up to minus infinity).
fn tile_bias<B: Backend>(key_bias: &Tensor<B, 2>, (r0, r1): (usize, usize), mask: &AttentionMask) -> Tensor<B, 5> {
    let [b, tk] = key_bias.dims();
    let rows = r1 - r0;
    let mut limits = Vec::with_capacity(rows * tk);
    for i in r0..r1 {
        let q = mask.past + i;
        limits.extend((0..tk).map(|j| {
            let allowed = j <= q && mask.window.is_none_or(|w| q - j < w);
            if allowed { 0.0f32 } else { f32::MIN }
        }));
    }
    let limits =
        Tensor::<B, 5>::from_data(TensorData::new(limits, [1, 1, 1, rows, tk]), (&key_bias.device(), DType::F32));
    (limits + key_bias.clone().cast(DType::F32).reshape([b, 1, 1, 1, tk])).clamp_min(f32::MIN)
}

/// Rows `r0..r1` of `x [batch, seq, heads, dim]` as `[batch, kv_heads, rep, rows, dim]` in f32
/// (a view where `x` is contiguous and whole: query head `h` is `rep` heads of key/value head
/// `h / rep`).
fn grouped<B: Backend>(x: &Tensor<B, 4>, (r0, r1): (usize, usize), nkv: usize) -> Tensor<B, 5> {
    let [b, t, nh, d] = x.dims();
    let rows = if (r0, r1) == (0, t) { x.clone() } else { x.clone().slice([0..b, r0..r1, 0..nh, 0..d]) };
    rows.cast(DType::F32).reshape([b, r1 - r0, nkv, nh / nkv, d]).permute([0, 2, 3, 1, 4])
}

/// `x` with its values in order in memory: a broadcast operand of an element-wise op over a whole
/// tile must be (Burn's CPU backend takes a slow element-by-element path for a strided one; the
/// copy of a small tensor costs next to nothing).
fn dense<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let dims = x.dims();
    x.reshape([dims.iter().product::<usize>()]).reshape(dims)
}

/// `[batch, kv_heads, rep, rows, z]` as `[batch, kv_heads, rep * rows, z]` (a copy in order when
/// `x` is a strided view).
fn fold<B: Backend>(x: Tensor<B, 5>) -> Tensor<B, 4> {
    let [b, nkv, rep, n, z] = x.dims();
    dense(x).reshape([b, nkv, rep * n, z])
}

/// `[batch, kv_heads, rep, rows, dim]` back to `[batch, rows, heads, dim]`.
fn ungrouped<B: Backend>(x: Tensor<B, 5>) -> Tensor<B, 4> {
    let [b, nkv, rep, n, d] = x.dims();
    x.permute([0, 3, 1, 2, 4]).reshape([b, n, nkv * rep, d])
}

/// Each query row's largest score and the log of its sum of exponentials, `[batch, kv_heads,
/// rep, rows, 1]`.
type RowStats<B> = (Tensor<B, 5>, Tensor<B, 5>);

/// `exp(z)` of scores less their row's maximum, with every `z` below -104 made minus infinity
/// first. The values are the same (f32's exponential of anything below about -103.97 is +0),
/// but glibc's `expf`, which the CPU backend calls per element, returns 0 at once for minus
/// infinity and takes its slow out-of-range path (it sets `errno`) for a finite `z` that far
/// down, which every masked score is (masks add `f32::MIN`): with a causal mask, about half of
/// them (docs/benchmarks.md, classifier scoring on the AMD EPYC).
fn exp_scores<B: Backend>(z: Tensor<B, 5>) -> Tensor<B, 5> {
    let far = z.clone().lower_elem(-104.0);
    z.mask_fill(far, f32::NEG_INFINITY).exp()
}

/// One tile's probabilities `[batch, kv_heads, rep, rows, keys]` (f32): from the scores and the
/// mask, with the rows' statistics given (backward) or made (forward, returned).
fn tile_probs<B: Backend>(
    q: &Tensor<B, 5>,
    k32: &Tensor<B, 5>,
    key_bias: &Tensor<B, 2>,
    rows: (usize, usize),
    mask: &AttentionMask,
    stats: Option<RowStats<B>>,
) -> (Tensor<B, 5>, Option<RowStats<B>>) {
    let scores = q.clone().matmul(k32.clone().swap_dims(3, 4));
    // The bias written out to the scores' shape: an element-wise op between tensors of one
    // shape is Burn's CPU fast path, a broadcast over two dimensions its slowest.
    let [_, nkv, rep, _, _] = scores.dims();
    let scores = scores + tile_bias(key_bias, rows, mask).repeat_dim(1, nkv).repeat_dim(2, rep);
    match stats {
        Some((max, log_sum)) => (exp_scores((scores - max) - log_sum), None),
        None => {
            let max = scores.clone().max_dim(4);
            let e = exp_scores(scores - max.clone());
            let sum = e.clone().sum_dim(4);
            (e / sum.clone(), Some((max, sum.log())))
        }
    }
}

/// Forward: `(out [batch, seq, heads, dim] in q's dtype, stats [2, batch, heads, seq] f32: each
/// row's largest score and the log of its sum of exponentials)` for `q [batch, seq, heads, dim]`
/// (already scaled), `k`, `v [batch, kv_heads, keys, dim]` and `key_bias [batch, keys]`.
pub fn attention_fwd<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    key_bias: Tensor<B, 2>,
    mask: &AttentionMask,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let [b, t, nh, _] = q.dims();
    let nkv = k.dims()[1];
    let dtype = q.dtype();
    let (k32, v32) = (k.cast(DType::F32).unsqueeze_dim::<5>(2), v.cast(DType::F32).unsqueeze_dim::<5>(2));
    let mut outs = Vec::new();
    let mut stats = Vec::new();
    for rows in mask.tiles(t) {
        let n = rows.1 - rows.0;
        let (p, row_stats) = tile_probs(&grouped(&q, rows, nkv), &k32, &key_bias, rows, mask, None);
        let (max, log_sum) = row_stats.expect("the forward makes the rows' statistics");
        outs.push(ungrouped(p.matmul(v32.clone())).cast(dtype));
        stats.push(Tensor::stack::<4>(vec![max.reshape([b, nh, n]), log_sum.reshape([b, nh, n])], 0));
    }
    if outs.is_empty() {
        return (q, Tensor::empty([2, b, nh, 0], &key_bias.device()));
    }
    let out = if outs.len() == 1 { outs.remove(0) } else { Tensor::cat(outs, 1) };
    let stats = if stats.len() == 1 { stats.remove(0) } else { Tensor::cat(stats, 3) };
    (out, stats)
}

/// Backward: the gradients of `q`, `k` and `v` (in their dtypes) for the output's gradient
/// `grad [batch, seq, heads, dim]`, from the forward's `out` and `stats`.
pub fn attention_bwd<B: Backend>(
    (q, k, v): (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>),
    key_bias: Tensor<B, 2>,
    out: Tensor<B, 4>,
    stats: Tensor<B, 4>,
    grad: Tensor<B, 4>,
    mask: &AttentionMask,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
    let [b, t, nh, _] = q.dims();
    let nkv = k.dims()[1];
    let rep = nh / nkv;
    let (q_dtype, k_dtype, v_dtype) = (q.dtype(), k.dtype(), v.dtype());
    let (k32, v32) = (k.cast(DType::F32).unsqueeze_dim::<5>(2), v.cast(DType::F32).unsqueeze_dim::<5>(2));
    let (grad, out) = (grad.cast(DType::F32), out.cast(DType::F32));
    let (mut dk, mut dv): (Option<Tensor<B, 4>>, Option<Tensor<B, 4>>) = (None, None);
    let mut dqs = Vec::new();
    for rows in mask.tiles(t) {
        let (r0, r1) = rows;
        let n = r1 - r0;
        let row = |i: usize| dense(stats.clone().slice([i..i + 1, 0..b, 0..nh, r0..r1]).reshape([b, nkv, rep, n, 1]));
        let qg = grouped(&q, rows, nkv);
        let (p, _) = tile_probs(&qg, &k32, &key_bias, rows, mask, Some((row(0), row(1))));
        let g = grouped(&grad, rows, nkv);
        // Summed over the `rep` query heads of each key/value head inside the matmul: `rep` and
        // the rows folded into one contracted dimension (a `[rep, keys, dim]` product summed
        // afterwards was `rep` times the gradient's size, past the tile's bound).
        let tile_dv = fold(p.clone()).swap_dims(2, 3).matmul(fold(g.clone()));
        // D_i = sum_d dO_id O_id: softmax's backward without the probabilities' row sums, made
        // in the tile's layout (a permuted view reshaped is not read in order by every backend).
        let tile_delta = (g.clone() * grouped(&out, rows, nkv)).sum_dim(4);
        let dp = g.matmul(v32.clone().swap_dims(3, 4));
        let ds = p * (dp - tile_delta);
        dqs.push(ungrouped(ds.clone().matmul(k32.clone())).cast(q_dtype));
        let tile_dk = fold(ds).swap_dims(2, 3).matmul(fold(qg));
        dk = Some(match dk {
            Some(acc) => acc + tile_dk,
            None => tile_dk,
        });
        dv = Some(match dv {
            Some(acc) => acc + tile_dv,
            None => tile_dv,
        });
    }
    let device = key_bias.device();
    let [_, _, _, tk, d] = k32.dims();
    let zeros = || Tensor::<B, 4>::zeros([b, nkv, tk, d], (&device, DType::F32));
    let dq = match dqs.len() {
        0 => q,
        1 => dqs.remove(0),
        _ => Tensor::cat(dqs, 1),
    };
    (dq, dk.unwrap_or_else(zeros).cast(k_dtype), dv.unwrap_or_else(zeros).cast(v_dtype))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `exp_scores` gives the exponential's own bits for every exponent: those it turns into
    /// minus infinity first are the ones whose exponential is +0 anyway.
    #[test]
    fn exp_scores_is_the_exponential_bit_for_bit() {
        type B = burn::backend::Flex;
        let values: Vec<f32> = vec![
            0.0,
            -1.5,
            -87.0,
            -88.0,
            -90.0,
            -103.9,
            -103.98,
            -104.0,
            -104.5,
            -1e4,
            f32::MIN,
            f32::MIN + 3.0e38,
            f32::NEG_INFINITY,
            2.0,
        ];
        let n = values.len();
        let z = || Tensor::<B, 5>::from_data(TensorData::new(values.clone(), [1, 1, 1, 1, n]), &Default::default());
        let got = exp_scores(z()).into_data().to_vec::<f32>().expect("f32");
        let want = z().exp().into_data().to_vec::<f32>().expect("f32");
        for ((g, w), v) in got.iter().zip(&want).zip(&values) {
            assert_eq!(g.to_bits(), w.to_bits(), "exp({v}): {g:e} against {w:e}");
        }
        // The values near the edge are not all zero (-90 is a subnormal): the test sees the edge.
        assert!(want[4] > 0.0 && want[9] == 0.0);
    }
}
