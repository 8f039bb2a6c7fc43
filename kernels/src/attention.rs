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
//! (a padding query) is uniform, exactly as the model's materialised mask makes it.
//!
//! Grouped-query attention without repeating keys and values: query head `h` reads key/value
//! head `h / rep`; the queries of a tile are viewed as `[batch, kv_heads, rep * rows, head_dim]`
//! so that one batched matmul serves all `rep` heads, and the keys' and values' gradients sum
//! over them. Scores, softmax and every accumulation are f32 whatever the inputs' dtype.

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
}

/// The additive bias of query rows `r0..r1`, `[batch, 1, rows, keys]`: the keys' own bias
/// (`key_bias [batch, keys]`, 0 or `f32::MIN`) and the causal and window limits, at least
/// `f32::MIN` (two `f32::MIN` would add up to minus infinity).
fn tile_bias<B: Backend>(key_bias: &Tensor<B, 2>, (r0, r1): (usize, usize), mask: &AttentionMask) -> Tensor<B, 4> {
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
    let limits = Tensor::<B, 4>::from_data(TensorData::new(limits, [1, 1, rows, tk]), (&key_bias.device(), DType::F32));
    (limits + key_bias.clone().cast(DType::F32).reshape([b, 1, 1, tk])).clamp_min(f32::MIN)
}

/// Query rows `r0..r1` of `x [batch, heads, seq, dim]` as `[batch, kv_heads, rep * rows, dim]`
/// in f32 (query head `h` is `rep` heads of key/value head `h / rep`).
fn grouped<B: Backend>(x: &Tensor<B, 4>, (r0, r1): (usize, usize), nkv: usize) -> Tensor<B, 4> {
    let [b, nh, _, d] = x.dims();
    x.clone().slice([0..b, 0..nh, r0..r1, 0..d]).cast(DType::F32).reshape([b, nkv, (nh / nkv) * (r1 - r0), d])
}

/// Each query row's largest score and the log of its sum of exponentials, `[batch, heads, rows, 1]`.
type RowStats<B> = (Tensor<B, 4>, Tensor<B, 4>);

/// One tile's probabilities `[batch, heads, rows, keys]` (f32): from the scores and the mask,
/// with the rows' `(max, ln sum)` given (backward) or made (forward, returned).
fn tile_probs<B: Backend>(
    q: &Tensor<B, 4>,
    k32: &Tensor<B, 4>,
    key_bias: &Tensor<B, 2>,
    rows: (usize, usize),
    mask: &AttentionMask,
    stats: Option<RowStats<B>>,
) -> (Tensor<B, 4>, Option<RowStats<B>>) {
    let [b, nh, _, _] = q.dims();
    let nkv = k32.dims()[1];
    let tk = k32.dims()[2];
    let n = rows.1 - rows.0;
    let scores = grouped(q, rows, nkv).matmul(k32.clone().swap_dims(2, 3)).reshape([b, nh, n, tk])
        + tile_bias(key_bias, rows, mask);
    match stats {
        Some((max, log_sum)) => (((scores - max) - log_sum).exp(), None),
        None => {
            let max = scores.clone().max_dim(3);
            let e = (scores - max.clone()).exp();
            let sum = e.clone().sum_dim(3);
            (e / sum.clone(), Some((max, sum.log())))
        }
    }
}

/// Forward: `(out [batch, heads, seq, dim] in q's dtype, stats [2, batch, heads, seq] f32: each
/// row's largest score and the log of its sum of exponentials)` for
/// `q [batch, heads, seq, dim]` (already scaled), `k`, `v [batch, kv_heads, keys, dim]` and
/// `key_bias [batch, keys]`.
pub fn attention_fwd<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    key_bias: Tensor<B, 2>,
    mask: &AttentionMask,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let [b, nh, t, d] = q.dims();
    let nkv = k.dims()[1];
    let dtype = q.dtype();
    let (k32, v32) = (k.cast(DType::F32), v.cast(DType::F32));
    let mut outs = Vec::new();
    let mut stats = Vec::new();
    for r0 in (0..t).step_by(mask.rows.max(1)) {
        let r1 = (r0 + mask.rows.max(1)).min(t);
        let (p, row_stats) = tile_probs(&q, &k32, &key_bias, (r0, r1), mask, None);
        let (max, log_sum) = row_stats.expect("the forward makes the rows' statistics");
        let tk = p.dims()[3];
        let o = p.reshape([b, nkv, (nh / nkv) * (r1 - r0), tk]).matmul(v32.clone()).reshape([b, nh, r1 - r0, d]);
        outs.push(o.cast(dtype));
        stats.push(Tensor::stack::<4>(vec![max.reshape([b, nh, r1 - r0]), log_sum.reshape([b, nh, r1 - r0])], 0));
    }
    if outs.is_empty() {
        return (q, Tensor::empty([2, b, nh, 0], &key_bias.device()));
    }
    (Tensor::cat(outs, 2), Tensor::cat(stats, 3))
}

/// Backward: the gradients of `q`, `k` and `v` (in their dtypes) for the output's gradient
/// `grad [batch, heads, seq, dim]`, from the forward's `out` and `stats`.
#[allow(clippy::too_many_arguments)]
pub fn attention_bwd<B: Backend>(
    (q, k, v): (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>),
    key_bias: Tensor<B, 2>,
    out: Tensor<B, 4>,
    stats: Tensor<B, 4>,
    grad: Tensor<B, 4>,
    mask: &AttentionMask,
) -> (Tensor<B, 4>, Tensor<B, 4>, Tensor<B, 4>) {
    let [b, nh, t, d] = q.dims();
    let [_, nkv, tk, _] = k.dims();
    let rep = nh / nkv;
    let (q_dtype, k_dtype, v_dtype) = (q.dtype(), k.dtype(), v.dtype());
    let (k32, v32) = (k.cast(DType::F32), v.cast(DType::F32));
    let grad = grad.cast(DType::F32);
    // D_i = sum_d dO_id O_id: softmax's backward without the probabilities' row sums.
    let delta = (grad.clone() * out.cast(DType::F32)).sum_dim(3);
    let device = key_bias.device();
    let mut dk = Tensor::<B, 4>::zeros([b, nkv, tk, d], (&device, DType::F32));
    let mut dv = Tensor::<B, 4>::zeros([b, nkv, tk, d], (&device, DType::F32));
    let mut dqs = Vec::new();
    for r0 in (0..t).step_by(mask.rows.max(1)) {
        let r1 = (r0 + mask.rows.max(1)).min(t);
        let n = r1 - r0;
        let row = |i: usize| stats.clone().slice([i..i + 1, 0..b, 0..nh, r0..r1]).reshape([b, nh, n, 1]);
        let (p, _) = tile_probs(&q, &k32, &key_bias, (r0, r1), mask, Some((row(0), row(1))));
        let g = grouped(&grad, (r0, r1), nkv);
        let pg = p.clone().reshape([b, nkv, rep * n, tk]);
        dv = dv + pg.swap_dims(2, 3).matmul(g.clone());
        let dp = g.matmul(v32.clone().swap_dims(2, 3)).reshape([b, nh, n, tk]);
        let tile_delta = delta.clone().slice([0..b, 0..nh, r0..r1, 0..1]);
        let ds = (p * (dp - tile_delta)).reshape([b, nkv, rep * n, tk]);
        dqs.push(ds.clone().matmul(k32.clone()).reshape([b, nh, n, d]).cast(q_dtype));
        dk = dk + ds.swap_dims(2, 3).matmul(grouped(&q, (r0, r1), nkv));
    }
    let dq = if dqs.is_empty() { q } else { Tensor::cat(dqs, 2) };
    (dq, dk.cast(k_dtype), dv.cast(v_dtype))
}
