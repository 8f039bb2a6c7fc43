//! The reference implementation, in plain Burn tensor ops: what every backend without cubecl
//! kernels runs, and what the kernels are tested against. It follows the same chunked
//! algorithm (online log-sum-exp over vocabulary chunks, gradients recomputed per chunk), so it
//! has the same memory bound.

use burn::tensor::backend::Backend;
use burn::tensor::{BasicOps, DType, IndexingUpdateOp, Int, Tensor, TensorPrimitive};

use crate::qweight::QuantLayout;
use crate::{Chunks, Want};

/// Stands for minus infinity in the running maximum: finite, so that `exp(m - m')` never
/// computes `inf - inf`.
pub const NEG_BIG: f32 = -3.0e38;

/// The online log-sum-exp of one block of rows, over the vocabulary chunks seen so far.
#[derive(Debug, Clone)]
pub struct LseState<B: Backend> {
    /// Running maximum `[R]`.
    pub max: Tensor<B, 1>,
    /// Running `sum exp(x - max)` `[R]`.
    pub sum: Tensor<B, 1>,
    /// The target's logit once its chunk has been seen `[R]`.
    pub target: Tensor<B, 1>,
}

impl<B: Backend> LseState<B> {
    /// Nothing seen yet.
    pub fn new(rows: usize, device: &B::Device) -> Self {
        Self {
            max: Tensor::full([rows], NEG_BIG, (device, DType::F32)),
            sum: Tensor::zeros([rows], (device, DType::F32)),
            target: Tensor::zeros([rows], (device, DType::F32)),
        }
    }

    /// Takes in the f32 logits `[R, C]` of vocabulary entries `offset..offset + C`.
    pub fn update(self, logits: Tensor<B, 2>, targets: &Tensor<B, 1, Int>, offset: usize) -> Self {
        let c = logits.dims()[1];
        let chunk_max = logits.clone().max_dim(1).squeeze_dim(1);
        let max = self.max.clone().max_pair(chunk_max);
        let sum = self.sum * (self.max - max.clone()).exp()
            + (logits.clone() - max.clone().unsqueeze_dim(1)).exp().sum_dim(1).squeeze_dim(1);
        let local = targets.clone().sub_scalar(offset as i64);
        let inside = local.clone().greater_equal_elem(0).bool_and(local.clone().lower_elem(c as i64));
        let picked = logits.gather(1, local.clamp(0, c as i64 - 1).unsqueeze_dim(1)).squeeze_dim(1);
        Self { max, sum, target: self.target.mask_where(inside, picked) }
    }

    /// `(logp [R], stats [2, R])`, where `stats` holds each row's max and `ln sum exp(x - max)`
    /// (their sum is the log-sum-exp; kept apart, `x - max` stays exact for large logits).
    /// Padding rows (negative targets) get log-prob 0.
    pub fn finish(self, targets: &Tensor<B, 1, Int>) -> (Tensor<B, 1>, Tensor<B, 2>) {
        let log_sum = self.sum.log();
        let logp = (self.target - self.max.clone() - log_sum.clone()).mask_fill(targets.clone().lower_elem(0), 0.0);
        (logp, Tensor::stack(vec![self.max, log_sum], 0))
    }
}

fn rows_of<B: Backend, const D: usize, K: BasicOps<B>>(t: Tensor<B, D, K>, r0: usize, r1: usize) -> Tensor<B, D, K> {
    t.narrow(0, r0, r1 - r0)
}

fn row_ranges(n: usize, step: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n).step_by(step.max(1)).map(move |r0| (r0, (r0 + step).min(n)))
}

/// The output gradient with padding rows zeroed, in f32.
fn masked_grad<B: Backend>(grad: Tensor<B, 1>, targets: &Tensor<B, 1, Int>) -> Tensor<B, 1> {
    grad.cast(DType::F32).mask_fill(targets.clone().lower_elem(0), 0.0)
}

/// The two per-row steps of both operations, on f32 logits `[R, C]` of vocabulary entries
/// `offset..offset + C`. [`Plain`] does them in Burn tensor ops; cubecl backends with kernels.
pub trait RowOps<B: Backend> {
    /// Folds the logits into the running log-sum-exp and picks the targets' logits.
    fn update(
        &self,
        state: LseState<B>,
        logits: Tensor<B, 2>,
        targets: &Tensor<B, 1, Int>,
        offset: usize,
    ) -> LseState<B>;

    /// `g * (onehot(t - offset) - exp(logits - max - log_sum))`, in f32 (`g` already zero on
    /// padding; `stats` as from [`LseState::finish`]).
    fn grad(
        &self,
        logits: Tensor<B, 2>,
        targets: &Tensor<B, 1, Int>,
        stats: &Tensor<B, 2>,
        g: &Tensor<B, 1>,
        offset: usize,
    ) -> Tensor<B, 2>;
}

/// The row steps in plain Burn tensor ops.
#[derive(Debug, Clone, Copy, Default)]
pub struct Plain;

impl<B: Backend> RowOps<B> for Plain {
    fn update(
        &self,
        state: LseState<B>,
        logits: Tensor<B, 2>,
        targets: &Tensor<B, 1, Int>,
        offset: usize,
    ) -> LseState<B> {
        state.update(logits, targets, offset)
    }

    fn grad(
        &self,
        logits: Tensor<B, 2>,
        targets: &Tensor<B, 1, Int>,
        stats: &Tensor<B, 2>,
        g: &Tensor<B, 1>,
        offset: usize,
    ) -> Tensor<B, 2> {
        let c = logits.dims()[1];
        let rows = stats.dims()[1];
        let col = |i| stats.clone().narrow(0, i, 1).reshape([rows, 1]);
        let minus_gp = (logits - col(0) - col(1)).exp() * g.clone().neg().unsqueeze_dim(1);
        // Plus `g` at the target when it falls in this chunk.
        let local = targets.clone().sub_scalar(offset as i64);
        let outside = local.clone().lower_elem(0).bool_or(local.clone().greater_equal_elem(c as i64));
        let hit = g.clone().mask_fill(outside, 0.0).unsqueeze_dim(1);
        let index = local.clamp(0, c as i64 - 1).unsqueeze_dim(1);
        minus_gp.scatter(1, index, hit, IndexingUpdateOp::Add)
    }
}

/// Forward of the per-token log-probs from whole logits `[N, V]`.
pub fn token_fwd<B: Backend>(
    ops: &impl RowOps<B>,
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> (Tensor<B, 1>, Tensor<B, 2>) {
    let rows = logits.dims()[0];
    ops.update(LseState::new(rows, &logits.device()), logits.cast(DType::F32), &targets, 0).finish(&targets)
}

/// Backward of the per-token log-probs: the logits' gradient, in their dtype.
pub fn token_bwd<B: Backend>(
    ops: &impl RowOps<B>,
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    stats: Tensor<B, 2>,
    grad: Tensor<B, 1>,
) -> Tensor<B, 2> {
    let dtype = logits.dtype();
    let g = masked_grad(grad, &targets);
    ops.grad(logits.cast(DType::F32), &targets, &stats, &g, 0).cast(dtype)
}

/// The output projection of the fused log-prob: a weight `[V, H]` (which can get a gradient),
/// or a frozen one kept in ggml blocks ([`crate::qweight`], QLoRA's base), dequantised one
/// vocabulary chunk at a time.
#[derive(Debug, Clone)]
pub enum Head<B: Backend> {
    /// A float weight `[V, H]`.
    Dense(Tensor<B, 2>),
    /// ggml blocks `[V, row_words]` of a `[V, H]` weight.
    Quant(Tensor<B, 2, Int>, QuantLayout),
}

impl<B: crate::LogProbBackend> Head<B> {
    /// `V`.
    pub fn vocab(&self) -> usize {
        match self {
            Self::Dense(w) => w.dims()[0],
            Self::Quant(w, _) => w.dims()[0],
        }
    }

    /// `H`.
    pub fn hidden(&self) -> usize {
        match self {
            Self::Dense(w) => w.dims()[1],
            Self::Quant(_, layout) => layout.cols,
        }
    }

    /// Vocabulary entries `c0..c1`: `[c1 - c0, H]`, a quantised head's in `dtype`.
    pub fn rows(&self, c0: usize, c1: usize, dtype: DType) -> Tensor<B, 2> {
        match self {
            Self::Dense(w) => w.clone().narrow(0, c0, c1 - c0),
            Self::Quant(w, layout) => crate::qweight::dequantize(w.clone().narrow(0, c0, c1 - c0), *layout).cast(dtype),
        }
    }
}

/// The f32 logits of rows `h` against a chunk `w [C, H]` of the head (in `h`'s dtype, then
/// widened: through the backend's linear product, fuserl's bf16 kernel on the CPU).
fn chunk_logits<B: crate::LogProbBackend>(h: &Tensor<B, 2>, w: &Tensor<B, 2>) -> Tensor<B, 2> {
    crate::cast(crate::linear_matmul(h.clone(), w.clone().transpose()), DType::F32)
}

/// Forward of the fused projection + log-prob.
pub fn linear_fwd<B: crate::LogProbBackend>(
    ops: &impl RowOps<B>,
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    chunks: Chunks,
) -> (Tensor<B, 1>, Tensor<B, 2>) {
    head_fwd(ops, hidden, &Head::Dense(weight), targets, chunks)
}

/// [`linear_fwd`] with any [`Head`].
pub fn head_fwd<B: crate::LogProbBackend>(
    ops: &impl RowOps<B>,
    hidden: Tensor<B, 2>,
    head: &Head<B>,
    targets: Tensor<B, 1, Int>,
    chunks: Chunks,
) -> (Tensor<B, 1>, Tensor<B, 2>) {
    let (n, v) = (hidden.dims()[0], head.vocab());
    let (device, dtype) = (hidden.device(), hidden.dtype());
    let row_chunks: Vec<_> = row_ranges(n, chunks.rows).collect();
    let mut states: Vec<LseState<B>> = row_chunks.iter().map(|(r0, r1)| LseState::new(r1 - r0, &device)).collect();
    let hs: Vec<_> = row_chunks.iter().map(|&(r0, r1)| rows_of(hidden.clone(), r0, r1)).collect();
    let ts: Vec<_> = row_chunks.iter().map(|&(r0, r1)| rows_of(targets.clone(), r0, r1)).collect();
    // Vocabulary chunks outside: a quantised head's chunk is dequantised once.
    for (c0, c1) in row_ranges(v, chunks.vocab) {
        let w = head.rows(c0, c1, dtype);
        for ((state, h), t) in states.iter_mut().zip(&hs).zip(&ts) {
            let s = std::mem::replace(state, LseState::new(0, &device));
            *state = ops.update(s, chunk_logits(h, &w), t, c0);
        }
    }
    let (mut logps, mut lses) = (Vec::new(), Vec::new());
    for (state, t) in states.into_iter().zip(&ts) {
        let (logp, lse) = state.finish(t);
        logps.push(logp);
        lses.push(lse);
    }
    (Tensor::cat(logps, 0), Tensor::cat(lses, 1))
}

/// Backward of the fused projection + log-prob. Vocabulary chunks outside, token chunks
/// inside: each chunk of the weight's gradient is finished before the next begins and written
/// into its rows of one `[V, H]` buffer (in place where the backend can: [`crate::LogProbBackend::write_rows`]), each token chunk's hidden-state gradient accumulates
/// over the vocabulary. Each chunk's logit gradient carries the one-hot term `g` at the targets
/// that fall in it, so both gradients get it through the same products.
pub fn linear_bwd<B: crate::LogProbBackend>(
    ops: &impl RowOps<B>,
    (hidden, weight, targets): (Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 1, Int>),
    stats: Tensor<B, 2>,
    grad: Tensor<B, 1>,
    chunks: Chunks,
    want: Want,
) -> (Option<Tensor<B, 2>>, Option<Tensor<B, 2>>) {
    let dtype = weight.dtype();
    let (dh, dw) = head_bwd(ops, (hidden, &Head::Dense(weight), targets), stats, grad, chunks, want);
    (dh, dw.map(|dw| crate::cast(dw, dtype)))
}

/// [`linear_bwd`] with any [`Head`]; the weight's gradient (f32) only for a dense head.
pub fn head_bwd<B: crate::LogProbBackend>(
    ops: &impl RowOps<B>,
    (hidden, head, targets): (Tensor<B, 2>, &Head<B>, Tensor<B, 1, Int>),
    stats: Tensor<B, 2>,
    grad: Tensor<B, 1>,
    chunks: Chunks,
    want: Want,
) -> (Option<Tensor<B, 2>>, Option<Tensor<B, 2>>) {
    let (n, v, h_dim) = (hidden.dims()[0], head.vocab(), head.hidden());
    let want_weight = want.weight && matches!(head, Head::Dense(_));
    let g = masked_grad(grad, &targets);
    let rows: Vec<_> = row_ranges(n, chunks.rows)
        .map(|(r0, r1)| {
            let h = rows_of(hidden.clone(), r0, r1);
            let st = stats.clone().narrow(1, r0, r1 - r0);
            (h, st, rows_of(g.clone(), r0, r1), rows_of(targets.clone(), r0, r1))
        })
        .collect();
    let mut dh: Vec<Option<Tensor<B, 2>>> = vec![None; rows.len()];
    // Each vocabulary chunk's rows are written into one buffer (no list of chunks to
    // concatenate, no second copy for the one-hot term, which each chunk's gradient holds).
    let mut dw = want_weight.then(|| Tensor::<B, 2>::zeros([v, h_dim], (&hidden.device(), DType::F32)));
    for (c0, c1) in row_ranges(v, chunks.vocab) {
        let w = head.rows(c0, c1, hidden.dtype());
        let mut dw_c: Option<Tensor<B, 2>> = None;
        for ((h, st, gr, tg), dh_r) in rows.iter().zip(dh.iter_mut()) {
            let gl = crate::cast(ops.grad(chunk_logits(h, &w), tg, st, gr, c0), hidden.dtype());
            if want.hidden {
                let part = crate::cast(crate::linear_matmul(gl.clone(), w.clone()), DType::F32);
                *dh_r = Some(match dh_r.take() {
                    Some(acc) => acc + part,
                    None => part,
                });
            }
            if want_weight {
                let part = crate::cast(crate::linear_matmul(gl.transpose(), h.clone()), DType::F32);
                dw_c = Some(match dw_c {
                    Some(acc) => acc + part,
                    None => part,
                });
            }
        }
        if let (Some(all), Some(part)) = (dw.take(), dw_c) {
            let rows = B::write_rows(all.into_primitive().tensor(), c0, part.into_primitive().tensor());
            dw = Some(Tensor::from_primitive(TensorPrimitive::Float(rows)));
        }
    }
    let dh = want.hidden.then(|| crate::cast(Tensor::cat(dh.into_iter().flatten().collect(), 0), hidden.dtype()));
    (dh, dw)
}
