//! The cubecl kernels and their use on Burn's cubecl backends (wgpu, CUDA, ROCm).
//!
//! Two kernels do the per-token work, one cube (workgroup) per row, its units striding over the
//! row's columns:
//! - `lse_update`: folds one chunk of f32 logits `[R, C]` into a running (max, sum of exps) per
//!   row, with a shared-memory tree reduction, and picks the target's logit when it falls in the
//!   chunk;
//! - `logit_grad` (and its in-place twin): `g * (onehot(t) - exp(x - max - log_sum))` (no
//!   one-hot term on a row whose target is outside the chunk, e.g. padding's -1).
//!
//! The projection's matmuls are Burn's (cubecl's tuned matmul); the chunking is the same as the
//! reference's, so no buffer exceeds `max_chunk_elems`, which is kept under the device's largest
//! storage binding.

use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, Int, IntDType, Tensor, TensorMetadata};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::{CubeCount, CubeDim};

use crate::reference::{LseState, RowOps};
use crate::{AttentionMask, DEFAULT_MAX_CHUNK_ELEMS, LogProbBackend, QuantLayout, float, prim};

/// The kernels, apart from Burn's names (both have a `Tensor`).
mod gpu {
    use cubecl::prelude::*;

    use crate::reference::NEG_BIG;

    /// Units per cube (a power of two).
    pub const BLOCK: u32 = 256;

    #[cube]
    fn row_index() -> usize {
        (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize
    }

    /// Merges `(m_b, s_b)` into `(m_a, s_a)`: both are (max, sum of exp(x - max)).
    #[cube]
    fn merge(m_a: f32, s_a: f32, m_b: f32, s_b: f32) -> (f32, f32) {
        let m = f32::max(m_a, m_b);
        (m, s_a * f32::exp(m_a - m) + s_b * f32::exp(m_b - m))
    }

    #[cube(launch)]
    pub fn lse_update(
        logits: &Tensor<f32>,
        targets: &Tensor<i32>,
        run_max: &mut Tensor<f32>,
        run_sum: &mut Tensor<f32>,
        run_target: &mut Tensor<f32>,
        offset: i32,
        #[comptime] block: u32,
    ) {
        let row = row_index();
        if row >= run_max.shape(0) {
            terminate!();
        }
        let cols = logits.shape(1);
        let base = row * logits.stride(0);
        let step = logits.stride(1);
        let mut m = f32::new(NEG_BIG);
        let mut s = f32::new(0.0);
        let mut j = UNIT_POS_X as usize;
        while j < cols {
            let x = logits[base + j * step];
            if x > m {
                s = s * f32::exp(m - x) + f32::new(1.0);
                m = x;
            } else {
                s += f32::exp(x - m);
            }
            j += CUBE_DIM_X as usize;
        }
        let mut sh_m = SharedMemory::<f32>::new(block as usize);
        let mut sh_s = SharedMemory::<f32>::new(block as usize);
        let me = UNIT_POS_X as usize;
        sh_m[me] = m;
        sh_s[me] = s;
        sync_cube();
        let mut stride = (CUBE_DIM_X / 2) as usize;
        while stride > 0 {
            if me < stride {
                let (m2, s2) = merge(sh_m[me], sh_s[me], sh_m[me + stride], sh_s[me + stride]);
                sh_m[me] = m2;
                sh_s[me] = s2;
            }
            sync_cube();
            stride /= 2;
        }
        if me == 0 {
            let (m2, s2) = merge(run_max[row], run_sum[row], sh_m[0], sh_s[0]);
            run_max[row] = m2;
            run_sum[row] = s2;
            let local = targets[row] - offset;
            if local >= 0 && (local as usize) < cols {
                run_target[row] = logits[base + (local as usize) * step];
            }
        }
    }

    #[cube]
    fn grad_of(x: f32, max: f32, log_sum: f32, g: f32, hit: bool) -> f32 {
        let mut out = f32::new(0.0) - g * f32::exp((x - max) - log_sum);
        if hit {
            out += g;
        }
        out
    }

    #[cube(launch)]
    pub fn logit_grad(
        logits: &Tensor<f32>,
        targets: &Tensor<i32>,
        stats: &Tensor<f32>,
        g: &Tensor<f32>,
        out: &mut Tensor<f32>,
        offset: i32,
    ) {
        let row = row_index();
        if row >= g.shape(0) {
            terminate!();
        }
        let (m, ls, gr) = (stats[row], stats[stats.stride(0) + row], g[row]);
        let local = targets[row] - offset;
        let mut j = UNIT_POS_X as usize;
        while j < logits.shape(1) {
            let hit = local >= 0 && (local as usize) == j;
            out[row * out.stride(0) + j * out.stride(1)] =
                grad_of(logits[row * logits.stride(0) + j * logits.stride(1)], m, ls, gr, hit);
            j += CUBE_DIM_X as usize;
        }
    }

    #[cube(launch)]
    pub fn logit_grad_in_place(
        x: &mut Tensor<f32>,
        targets: &Tensor<i32>,
        stats: &Tensor<f32>,
        g: &Tensor<f32>,
        offset: i32,
    ) {
        let row = row_index();
        if row >= g.shape(0) {
            terminate!();
        }
        let (m, ls, gr) = (stats[row], stats[stats.stride(0) + row], g[row]);
        let local = targets[row] - offset;
        let mut j = UNIT_POS_X as usize;
        while j < x.shape(1) {
            let hit = local >= 0 && (local as usize) == j;
            let at = row * x.stride(0) + j * x.stride(1);
            x[at] = grad_of(x[at], m, ls, gr, hit);
            j += CUBE_DIM_X as usize;
        }
    }
}

use gpu::{BLOCK, logit_grad, logit_grad_in_place, lse_update};

type Cube<R, F, I, BT> = CubeBackend<R, F, I, BT>;

/// One cube per row, in two dimensions when there are more rows than one dimension allows.
fn launch_shape<R: CubeRuntime>(t: &CubeTensor<R>, rows: usize) -> (CubeCount, CubeDim) {
    let hw = t.client.properties().hardware.max_cube_count.0.max(1) as usize;
    let x = rows.clamp(1, hw);
    let y = rows.div_ceil(x).max(1);
    (CubeCount::Static(x as u32, y as u32, 1), CubeDim::new_1d(BLOCK))
}

/// A Burn tensor of a cube backend as a contiguous cube tensor.
fn raw<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(
    t: Tensor<Cube<R, F, I, BT>, D>,
) -> CubeTensor<R> {
    into_contiguous(prim(t))
}

fn raw_i32<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    t: &Tensor<Cube<R, F, I, BT>, 1, Int>,
) -> CubeTensor<R> {
    into_contiguous(t.clone().cast(IntDType::I32).into_primitive())
}

/// The row steps as cubecl kernels.
#[derive(Debug, Clone, Copy)]
struct Kernels;

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> RowOps<Cube<R, F, I, BT>> for Kernels {
    fn update(
        &self,
        state: LseState<Cube<R, F, I, BT>>,
        logits: Tensor<Cube<R, F, I, BT>, 2>,
        targets: &Tensor<Cube<R, F, I, BT>, 1, Int>,
        offset: usize,
    ) -> LseState<Cube<R, F, I, BT>> {
        let rows = logits.dims()[0];
        let logits = raw(logits.cast(DType::F32));
        let (max, sum, target) = (raw(state.max), raw(state.sum), raw(state.target));
        let (count, dim) = launch_shape(&logits, rows);
        lse_update::launch::<R>(
            &logits.client.clone(),
            count,
            dim,
            logits.into_tensor_arg(),
            raw_i32(targets).into_tensor_arg(),
            max.clone().into_tensor_arg(),
            sum.clone().into_tensor_arg(),
            target.clone().into_tensor_arg(),
            offset as i32,
            BLOCK,
        );
        LseState { max: float(max), sum: float(sum), target: float(target) }
    }

    /// Written over the logits when nothing else holds them, else into a new tensor.
    fn grad(
        &self,
        logits: Tensor<Cube<R, F, I, BT>, 2>,
        targets: &Tensor<Cube<R, F, I, BT>, 1, Int>,
        stats: &Tensor<Cube<R, F, I, BT>, 2>,
        g: &Tensor<Cube<R, F, I, BT>, 1>,
        offset: usize,
    ) -> Tensor<Cube<R, F, I, BT>, 2> {
        let rows = logits.dims()[0];
        let x = raw(logits.cast(DType::F32));
        let (count, dim) = launch_shape(&x, rows);
        let (t, offset) = (raw_i32(targets), offset as i32);
        let (client, l, g) = (x.client.clone(), raw(stats.clone()), raw(g.clone()));
        if x.can_mut() {
            let out = x.clone();
            logit_grad_in_place::launch::<R>(
                &client,
                count,
                dim,
                x.into_tensor_arg(),
                t.into_tensor_arg(),
                l.into_tensor_arg(),
                g.into_tensor_arg(),
                offset,
            );
            float(out)
        } else {
            let out = empty_device_dtype::<R>(client.clone(), x.device.clone(), x.shape(), DType::F32);
            logit_grad::launch::<R>(
                &client,
                count,
                dim,
                x.into_tensor_arg(),
                t.into_tensor_arg(),
                l.into_tensor_arg(),
                g.into_tensor_arg(),
                out.clone().into_tensor_arg(),
                offset,
            );
            float(out)
        }
    }
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> LogProbBackend for Cube<R, F, I, BT> {
    fn row_ops() -> impl RowOps<Self> {
        Kernels
    }

    fn max_chunk_elems(device: &Self::Device) -> usize {
        let binding = R::client(device).properties().memory.max_page_size as usize / 4;
        DEFAULT_MAX_CHUNK_ELEMS.min(binding.max(1 << 16))
    }

    fn max_attention_elems(device: &Self::Device) -> usize {
        let binding = R::client(device).properties().memory.max_page_size as usize / 4;
        crate::DEFAULT_MAX_ATTENTION_ELEMS.min(binding.max(1 << 16))
    }

    fn causal_attention_fwd(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        mask: AttentionMask,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if crate::attention_kernel() {
            crate::cube_attention::attention_fwd::<R, F, I, BT>(q, k, v, key_bias, &mask)
        } else {
            crate::tiled_attention_fwd::<Self>(q, k, v, key_bias, &mask)
        }
    }

    fn causal_attention_bwd(
        qkv: (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>),
        key_bias: FloatTensor<Self>,
        out: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        mask: AttentionMask,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        if crate::attention_kernel() {
            crate::cube_attention::attention_bwd::<R, F, I, BT>(qkv, key_bias, out, stats, grad, &mask)
        } else {
            crate::tiled_attention_bwd::<Self>(qkv, key_bias, out, stats, grad, &mask)
        }
    }

    fn dequantizes_on_device(layout: QuantLayout) -> bool {
        crate::cube_quant::reads(layout.ty)
    }

    fn dequantize_blocks(words: IntTensor<Self>, layout: QuantLayout) -> FloatTensor<Self> {
        if crate::cube_quant::reads(layout.ty) {
            crate::cube_quant::dequantize::<R, F, I, BT>(words, layout)
        } else {
            crate::qweight::dequantize_on_host::<Self>(words, layout)
        }
    }
}
