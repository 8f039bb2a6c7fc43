//! Frozen weights kept in ggml's blocks (QLoRA's base): a `[rows, cols]` weight held as its
//! quantised blocks, dequantised a chunk of rows at a time when it is used, so that the whole
//! float weight never exists.
//!
//! The blocks live on the device as `words [rows, row_words]`: each row's blocks as bytes,
//! little-endian in 32-bit words, the last word of a row padded with zeros (a row of 28 Q5_0
//! blocks is 616 bytes; of 28 Q4_0 blocks, 504). Whole words per row let a chunk of rows be a
//! plain `narrow` of the tensor and let a GPU kernel, which reads 32-bit words, find any byte.
//!
//! - [`dequantize`]: the f32 values of some rows: on the host exactly as ggml's reference code
//!   ([`crate::quant`]); cubecl backends with a kernel that performs the same operations in the
//!   same order (checked against the host on lavapipe by `tests/kernels.rs`).
//! - [`quant_matmul`]: `x W^T`, the weight dequantised in chunks of at most
//!   [`LogProbBackend::max_chunk_elems`] values, each cast to `x`'s dtype; on `Autodiff` its
//!   backward gives `x` the gradient `g W` by dequantising again (the dequantised weight is not
//!   kept between the passes: that is the memory QLoRA saves). The weight gets no gradient.
//! - [`quant_linear_logprobs`]: [`crate::linear_logprobs`] with a quantised output head.

use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, Int, Tensor, TensorData};
use rayon::prelude::*;

use crate::quant::GgmlType;
use crate::{LogProbBackend, float, int, prim};

/// Where a quantised weight's values are: its ggml type and row length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantLayout {
    /// The blocks' type.
    pub ty: GgmlType,
    /// Values a row (a whole number of blocks).
    pub cols: usize,
}

impl QuantLayout {
    /// The layout of rows of `cols` values of `ty`: `ty` must be a block quantisation this
    /// crate reads and `cols` whole blocks of it.
    pub fn new(ty: GgmlType, cols: usize) -> Result<Self, String> {
        if matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16) {
            return Err(format!("{ty:?} is not a block quantisation"));
        }
        let (block, _) = ty.block();
        if cols == 0 || !cols.is_multiple_of(block) {
            return Err(format!("rows of {cols} values are not whole {block}-value blocks of {ty:?}"));
        }
        Ok(Self { ty, cols })
    }

    /// Bytes of one row's blocks.
    pub fn row_bytes(&self) -> usize {
        let (block, bytes) = self.ty.block();
        self.cols / block * bytes
    }

    /// 32-bit words a row takes on the device.
    pub fn row_words(&self) -> usize {
        self.row_bytes().div_ceil(4)
    }

    /// Rows of blocks (`rows * row_bytes` bytes, row after row, as a GGUF file holds them) as
    /// words, each row padded to whole words.
    pub fn pack(&self, bytes: &[u8]) -> Vec<i32> {
        let (rb, rw) = (self.row_bytes(), self.row_words());
        assert!(bytes.len().is_multiple_of(rb), "{} bytes are not whole rows of {rb}", bytes.len());
        let mut out = Vec::with_capacity(bytes.len() / rb * rw);
        for row in bytes.chunks_exact(rb) {
            out.extend(row.chunks(4).map(|c| {
                let mut w = [0u8; 4];
                w[..c.len()].copy_from_slice(c);
                i32::from_le_bytes(w)
            }));
        }
        out
    }

    /// The values of packed rows (`rows * row_words` words), dequantised on the host (ggml's
    /// reference code, a row per task).
    pub fn dequantize_host(&self, words: &[i32]) -> Vec<f32> {
        let (rb, rw) = (self.row_bytes(), self.row_words());
        let rows = words.len() / rw.max(1);
        let mut out = vec![0f32; rows * self.cols];
        out.par_chunks_mut(self.cols).zip(words.par_chunks(rw)).for_each_init(
            || (Vec::with_capacity(rw * 4), Vec::with_capacity(self.cols)),
            |(bytes, values), (dst, src)| {
                bytes.clear();
                bytes.extend(src.iter().flat_map(|w| w.to_le_bytes()));
                values.clear();
                self.ty.dequantize(&bytes[..rb], values);
                dst.copy_from_slice(values);
            },
        );
        out
    }
}

/// A frozen `[rows, cols]` weight's blocks put on `device` (`bytes`: the rows' blocks, as a
/// GGUF file or [`crate::quant`]'s writer holds them).
pub fn upload<B: Backend>(layout: QuantLayout, bytes: &[u8], device: &B::Device) -> Tensor<B, 2, Int> {
    let words = layout.pack(bytes);
    let rows = words.len() / layout.row_words();
    Tensor::from_data(TensorData::new(words, [rows, layout.row_words()]), (device, DType::I32))
}

/// The f32 values `[rows, cols]` of the blocks `words [rows, row_words]`.
pub fn dequantize<B: LogProbBackend>(words: Tensor<B, 2, Int>, layout: QuantLayout) -> Tensor<B, 2> {
    float(B::dequantize_blocks(words.into_primitive(), layout))
}

/// `x W^T` for `x [N, cols]` and the quantised `W [rows, cols]`: `[N, rows]` in `x`'s dtype
/// (differentiable in `x` on `Autodiff`).
pub fn quant_matmul<B: LogProbBackend>(x: Tensor<B, 2>, words: Tensor<B, 2, Int>, layout: QuantLayout) -> Tensor<B, 2> {
    float(B::quant_matmul(prim(x), words.into_primitive(), layout))
}

/// [`crate::linear_logprobs`] with a quantised head `[V, H]` (differentiable in `hidden` on
/// `Autodiff`).
pub fn quant_linear_logprobs<B: LogProbBackend>(
    hidden: Tensor<B, 2>,
    words: Tensor<B, 2, Int>,
    layout: QuantLayout,
    targets: Tensor<B, 1, Int>,
) -> Tensor<B, 1> {
    let device = hidden.device();
    let chunks = crate::Chunks::plan(hidden.dims()[0], words.dims()[0], B::max_chunk_elems(&device));
    float(B::quant_linear_logprobs(prim(hidden), words.into_primitive(), layout, targets.into_primitive(), chunks))
}

/// Rows of the weight dequantised at a time: at most `max_chunk_elems` values.
fn row_step<B: LogProbBackend>(device: &B::Device, layout: QuantLayout) -> usize {
    (B::max_chunk_elems(device) / layout.cols).max(1)
}

/// The host dequantisation behind [`LogProbBackend::dequantize_blocks`]'s default.
pub(crate) fn dequantize_on_host<B: Backend>(words: IntTensor<B>, layout: QuantLayout) -> FloatTensor<B> {
    let words = int::<B, 2>(words);
    let device = words.device();
    let [rows, rw] = words.dims();
    assert_eq!(rw, layout.row_words(), "quantised rows of {rw} words; the layout has {}", layout.row_words());
    let data = words.into_data();
    let values = match data.as_slice::<i32>() {
        Ok(w) => layout.dequantize_host(w),
        Err(_) => layout.dequantize_host(&data.iter::<i64>().map(|w| w as i32).collect::<Vec<_>>()),
    };
    prim(Tensor::<B, 2>::from_data(TensorData::new(values, [rows, layout.cols]), (&device, DType::F32)))
}

/// The forward behind [`LogProbBackend::quant_matmul`]'s default.
pub(crate) fn matmul_fwd<B: LogProbBackend>(
    x: FloatTensor<B>,
    words: IntTensor<B>,
    layout: QuantLayout,
) -> FloatTensor<B> {
    let (x, words) = (float::<B, 2>(x), int::<B, 2>(words));
    let (dtype, rows) = (x.dtype(), words.dims()[0]);
    let step = row_step::<B>(&x.device(), layout);
    let parts: Vec<Tensor<B, 2>> = (0..rows)
        .step_by(step)
        .map(|r0| {
            let r1 = (r0 + step).min(rows);
            // A linear layer's product (fuserl's kernel where the dense weight's would take it,
            // and then the same sums as the dequantised model's wherever the register kernel
            // takes both: many f32 rows on AVX-512).
            let w = dequantize(words.clone().narrow(0, r0, r1 - r0), layout).cast(dtype);
            crate::linear_matmul(x.clone(), w.transpose())
        })
        .collect();
    prim(if parts.len() == 1 { parts.into_iter().next().expect("one part") } else { Tensor::cat(parts, 1) })
}

/// The backward behind [`LogProbBackend::quant_matmul_bwd`]'s default: `g W` for `g [N, rows]`.
pub(crate) fn matmul_bwd<B: LogProbBackend>(
    grad: FloatTensor<B>,
    words: IntTensor<B>,
    layout: QuantLayout,
) -> FloatTensor<B> {
    let (g, words) = (float::<B, 2>(grad), int::<B, 2>(words));
    let (dtype, rows) = (g.dtype(), words.dims()[0]);
    let step = row_step::<B>(&g.device(), layout);
    let mut acc: Option<Tensor<B, 2>> = None;
    for r0 in (0..rows).step_by(step) {
        let r1 = (r0 + step).min(rows);
        let w = dequantize(words.clone().narrow(0, r0, r1 - r0), layout).cast(dtype);
        // Summed in f32: a 16-bit sum would round once per chunk (the dense path rounds once).
        let part = crate::linear_matmul(g.clone().narrow(1, r0, r1 - r0), w).cast(DType::F32);
        acc = Some(match acc {
            Some(a) => a + part,
            None => part,
        });
    }
    prim(acc.expect("a weight has rows").cast(dtype))
}

/// The forward behind [`LogProbBackend::quant_linear_logprobs_fwd`]'s default, with `ops`.
pub(crate) fn logprobs_fwd<B: LogProbBackend>(
    ops: &impl crate::reference::RowOps<B>,
    hidden: FloatTensor<B>,
    (words, layout): (IntTensor<B>, QuantLayout),
    targets: IntTensor<B>,
    chunks: crate::Chunks,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let head = crate::reference::Head::Quant(int(words), layout);
    let (logp, stats) = crate::reference::head_fwd(ops, float(hidden), &head, int(targets), chunks);
    (prim(logp), prim(stats))
}

/// The backward behind [`LogProbBackend::quant_linear_logprobs_bwd`]'s default, with `ops`:
/// the hidden states' gradient.
#[allow(clippy::too_many_arguments)]
pub(crate) fn logprobs_bwd<B: LogProbBackend>(
    ops: &impl crate::reference::RowOps<B>,
    hidden: FloatTensor<B>,
    (words, layout): (IntTensor<B>, QuantLayout),
    targets: IntTensor<B>,
    stats: FloatTensor<B>,
    grad: FloatTensor<B>,
    chunks: crate::Chunks,
) -> FloatTensor<B> {
    let head = crate::reference::Head::Quant(int(words), layout);
    let want = crate::Want { hidden: true, weight: false };
    let (dh, _) =
        crate::reference::head_bwd(ops, (float(hidden), &head, int(targets)), float(stats), float(grad), chunks, want);
    prim(dh.expect("asked for the hidden states' gradient"))
}
