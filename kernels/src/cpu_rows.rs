//! The fused log-prob's two per-row steps ([`RowOps`]) on the CPU backend (issue #35).
//!
//! Why: [`Plain`] makes each step of a vocabulary chunk `[rows, C]` in a handful of flex
//! operations, each a pass over the whole chunk with a buffer of its own (the maximum, the
//! difference, glibc's scalar `expf` once per logit, the sum; for the gradient two differences, the
//! exponential, a product and a scatter). A DPO step of SmolLM2-135M takes about 10^8 of those
//! exponentials (1024 rows, 49,152 words, forward and backward); profiled on an AMD EPYC, `expf`
//! alone held 7% of a bf16 step. Here each row is one pass in cache, vectorised (the exponential
//! of [`crate::cpu_attention::exp`], within 2 units in the last place) and rows run on every core.
//!
//! The results are [`Plain`]'s up to the rounding of a sum's order and of the exponential (tested
//! against it). Anything other than f32 logits and i32/i64 targets goes to [`Plain`].

use burn::backend::Flex;
use burn::tensor::{DType, Int, Tensor, TensorData};
use rayon::prelude::*;

use crate::cpu_attention::{LANES, exp, row_max, vectorised};
use crate::reference::{LseState, Plain, RowOps};

/// [`RowOps`] for flex: one vectorised pass per row, rows on every core.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuRows;

vectorised! {
    /// `sum exp(x - max)` over `row`.
    fn exp_sum(row: &[f32], max: f32) -> f32 = exp_sum_with;
}

vectorised! {
    /// `out = exp((x - max) - log_sum) * minus_g` for the logits `row`.
    fn scaled_probs(out: &mut [f32], row: &[f32], max: f32, log_sum: f32, minus_g: f32) = scaled_probs_with;
}

#[inline(always)]
fn exp_sum_with(row: &[f32], max: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += exp(x - max);
        }
    }
    chunks.remainder().iter().fold(acc.iter().sum::<f32>(), |a, &x| a + exp(x - max))
}

#[inline(always)]
fn scaled_probs_with(out: &mut [f32], row: &[f32], max: f32, log_sum: f32, minus_g: f32) {
    for (o, &x) in out.iter_mut().zip(row) {
        *o = exp((x - max) - log_sum) * minus_g;
    }
}

/// Where target `t` falls in a chunk of `c` words from `offset`.
fn local(t: i64, offset: usize, c: usize) -> Option<usize> {
    usize::try_from(t).ok()?.checked_sub(offset).filter(|&i| i < c)
}

/// The running state of each row `(max, sum, target)` with the logits `[R, C]` of words
/// `offset..offset + C` folded in (what [`LseState::update`] does).
pub fn fold(logits: &[f32], c: usize, targets: &[i64], offset: usize, state: (&mut [f32], &mut [f32], &mut [f32])) {
    let (max, sum, picked) = state;
    let rows = targets.len();
    assert!(
        logits.len() == rows * c && max.len() == rows && sum.len() == rows && picked.len() == rows,
        "cpu_rows::fold: {rows} targets, {} logits of {c} words, a state of {} rows",
        logits.len(),
        max.len()
    );
    if c == 0 {
        return;
    }
    let rows = logits.par_chunks_exact(c).zip(targets).zip(max).zip(sum).zip(picked);
    rows.for_each(|((((row, &t), m), s), p)| {
        let new = m.max(row_max(row));
        *s = *s * exp(*m - new) + exp_sum(row, new);
        *m = new;
        if let Some(i) = local(t, offset, c) {
            *p = row[i];
        }
    });
}

/// The logits' gradient `g * (onehot(t - offset) - exp(x - max - log_sum))` of the rows `[R, C]`
/// (what [`Plain`]'s `grad` makes); `g` zero on padding rows.
pub fn gradient(
    logits: &[f32],
    c: usize,
    targets: &[i64],
    offset: usize,
    stats: (&[f32], &[f32]),
    g: &[f32],
) -> Vec<f32> {
    let (max, log_sum) = stats;
    let rows = targets.len();
    assert!(
        logits.len() == rows * c && max.len() == rows && log_sum.len() == rows && g.len() == rows,
        "cpu_rows::gradient: {rows} targets, {} logits of {c} words, {} statistics, {} gradients",
        logits.len(),
        max.len(),
        g.len()
    );
    let mut out = vec![0.0f32; logits.len()];
    if c == 0 {
        return out;
    }
    let rows = out.par_chunks_exact_mut(c).zip(logits.par_chunks_exact(c)).zip(targets).zip(max).zip(log_sum).zip(g);
    rows.for_each(|(((((o, row), &t), &m), &l), &g)| {
        scaled_probs(o, row, m, l, -g);
        if let Some(i) = local(t, offset, c) {
            o[i] += g;
        }
    });
    out
}

/// A float tensor's values in order (a copy).
fn values<const D: usize>(x: Tensor<Flex, D>) -> Vec<f32> {
    x.into_data().to_vec::<f32>().expect("cpu_rows: f32 values")
}

/// The ids of an i32 or i64 tensor (`None` for another dtype).
fn ids(x: &Tensor<Flex, 1, Int>) -> Option<Vec<i64>> {
    let data = x.clone().into_data();
    match data.dtype {
        DType::I64 => data.to_vec::<i64>().ok(),
        DType::I32 => data.to_vec::<i32>().ok().map(|v| v.into_iter().map(i64::from).collect()),
        _ => None,
    }
}

fn tensor<const D: usize>(v: Vec<f32>, shape: [usize; D], device: &burn::tensor::Device<Flex>) -> Tensor<Flex, D> {
    Tensor::from_data(TensorData::new(v, shape), device)
}

/// The logits' values, borrowed where they lie when contiguous (the chunk's products make them so).
fn with_logits<R>(logits: Tensor<Flex, 2>, f: impl FnOnce(&[f32], usize) -> R) -> R {
    let [r, c] = logits.dims();
    let x = logits.into_primitive().tensor().to_contiguous();
    f(&x.storage::<f32>()[x.layout().start_offset()..][..r * c], c)
}

impl RowOps<Flex> for CpuRows {
    fn update(
        &self,
        state: LseState<Flex>,
        logits: Tensor<Flex, 2>,
        targets: &Tensor<Flex, 1, Int>,
        offset: usize,
    ) -> LseState<Flex> {
        let f32s = [logits.dtype(), state.max.dtype(), state.sum.dtype(), state.target.dtype()];
        let Some(t) = ids(targets).filter(|_| f32s.iter().all(|&d| d == DType::F32)) else {
            return Plain.update(state, logits, targets, offset);
        };
        let device = logits.device();
        let rows = t.len();
        let (mut max, mut sum, mut picked) = (values(state.max), values(state.sum), values(state.target));
        with_logits(logits, |l, c| fold(l, c, &t, offset, (&mut max, &mut sum, &mut picked)));
        LseState {
            max: tensor(max, [rows], &device),
            sum: tensor(sum, [rows], &device),
            target: tensor(picked, [rows], &device),
        }
    }

    fn grad(
        &self,
        logits: Tensor<Flex, 2>,
        targets: &Tensor<Flex, 1, Int>,
        stats: &Tensor<Flex, 2>,
        g: &Tensor<Flex, 1>,
        offset: usize,
    ) -> Tensor<Flex, 2> {
        let f32s = [logits.dtype(), stats.dtype(), g.dtype()].iter().all(|&d| d == DType::F32);
        let Some(t) = ids(targets).filter(|_| f32s) else {
            return Plain.grad(logits, targets, stats, g, offset);
        };
        let (device, shape) = (logits.device(), logits.dims());
        let stats = values(stats.clone());
        let (max, log_sum) = stats.split_at(t.len());
        let g = values(g.clone());
        let out = with_logits(logits, |l, c| gradient(l, c, &t, offset, (max, log_sum), &g));
        tensor(out, shape, &device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits(rows: usize, c: usize, seed: usize, device: &burn::tensor::Device<Flex>) -> Tensor<Flex, 2> {
        // Spread over [-30, 30], a few far below the rest (as masked or very unlikely words are).
        let v = (0..rows * c)
            .map(|i| {
                let x = ((i * 7919 + seed * 104_729) % 6007) as f32 / 6007.0 * 60.0 - 30.0;
                if i % 97 == 5 { x - 200.0 } else { x }
            })
            .collect();
        tensor(v, [rows, c], device)
    }

    fn close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            let tol = 1e-6 * b.abs().max(1.0);
            assert!((a - b).abs() <= tol, "{what}[{i}]: {a} against plain's {b}");
        }
    }

    /// Three chunks of 37, 40 and 1 words, 6 rows: targets in each chunk, past the last word, and
    /// padding.
    #[test]
    fn cpu_rows_match_plain_ops() {
        let device = Default::default();
        let targets = Tensor::<Flex, 1, Int>::from_ints([3, 40, 77, -1, 60, 78], &device);
        rows_match_plain(&targets, &device);
    }

    fn rows_match_plain(targets: &Tensor<Flex, 1, Int>, device: &burn::tensor::Device<Flex>) {
        let n = targets.dims()[0];
        let chunks = [(0, 37), (37, 77), (77, 78)];
        let (mut mine, mut plain) = (LseState::new(n, device), LseState::new(n, device));
        for (k, &(c0, c1)) in chunks.iter().enumerate() {
            let l = logits(n, c1 - c0, k, device);
            mine = CpuRows.update(mine, l.clone(), targets, c0);
            plain = Plain.update(plain, l, targets, c0);
        }
        let ((logp, stats), (want_logp, want_stats)) = (mine.finish(targets), plain.finish(targets));
        close(&values(logp), &values(want_logp), "logp");
        close(&values(stats.clone()), &values(want_stats), "stats");
        let g = Tensor::<Flex, 1>::from_floats([0.5, -2.0, 1.0, 0.0, 3.0, 0.25], device);
        for (k, &(c0, c1)) in chunks.iter().enumerate() {
            let l = logits(n, c1 - c0, k, device);
            let got = values(CpuRows.grad(l.clone(), targets, &stats, &g, c0));
            let want = values(Plain.grad(l, targets, &stats, &g, c0));
            close(&got, &want, "grad");
        }
    }

    /// The fused operations on flex (which use [`CpuRows`]) against the same operations in
    /// [`Plain`]'s ops, forward and backward, over several chunks.
    #[test]
    fn flex_linear_logprobs_match_plain_ops() {
        use crate::{Chunks, Want, reference};
        let device = Default::default();
        let (n, h, v) = (6, 8, 50);
        let hidden = logits(n, h, 1, &device).div_scalar(10.0);
        let weight = logits(v, h, 2, &device).div_scalar(10.0);
        let targets = Tensor::<Flex, 1, Int>::from_ints([0, 49, 17, -1, 25, 31], &device);
        let chunks = Chunks { rows: 4, vocab: 16 };
        let (logp, stats) = reference::linear_fwd(&CpuRows, hidden.clone(), weight.clone(), targets.clone(), chunks);
        let (want_logp, want_stats) =
            reference::linear_fwd(&Plain, hidden.clone(), weight.clone(), targets.clone(), chunks);
        close(&values(logp), &values(want_logp), "logp");
        close(&values(stats.clone()), &values(want_stats), "stats");
        let grad = Tensor::<Flex, 1>::from_floats([1.0, -0.5, 2.0, 1.0, 0.25, -1.0], &device);
        let want = Want { hidden: true, weight: true };
        let inputs = (hidden, weight, targets);
        let (dh, dw) = reference::linear_bwd(&CpuRows, inputs.clone(), stats.clone(), grad.clone(), chunks, want);
        let (want_dh, want_dw) = reference::linear_bwd(&Plain, inputs, stats, grad, chunks, want);
        close(&values(dh.expect("dh")), &values(want_dh.expect("dh")), "dh");
        close(&values(dw.expect("dw")), &values(want_dw.expect("dw")), "dw");
    }
}
