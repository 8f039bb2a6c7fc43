//! Causal grouped-query attention as cubecl kernels (issue #37): FlashAttention's scheme without
//! tensor cores. Nothing of size `[seq, keys]` exists at any time, not even a tile of it in
//! device memory: every score lives in one unit's registers.
//!
//! - `forward`: a cube per (batch, head, block of query rows), a unit per query row holding its
//!   query and its output accumulator. The cube walks the keys in tiles staged in shared memory
//!   (keys, values and the keys' bias, read once per cube from device memory); each unit makes
//!   its scores for the tile, rescales its accumulator once to the tile's new maximum (the
//!   online softmax) and adds the tile's values. It writes the output and the row's statistics
//!   (largest score, log of the sum of exponentials: the reference's `[2, batch, heads, seq]`).
//! - `backward_q`: the same walk, recomputing each probability from the statistics, gives
//!   `dq = sum_j p_ij (dO_i . v_j - D_i) k_j`, with `D_i = dO_i . O_i` made beforehand by Burn.
//! - `backward_kv`: a cube per (batch, key/value head, block of keys), a unit per key, walking
//!   the query rows of every query head of the group in tiles staged in shared memory (queries,
//!   output gradients, statistics and `D`), gives `dv_j = sum_i p_ij dO_i` and
//!   `dk_j = sum_i p_ij (dO_i . v_j - D_i) q_i`, summed over the group's heads in the unit (no
//!   atomics, no repeated keys and values).
//!
//! The mask is the reference's ([`crate::attention`]): a score plus `max(limit + bias, f32::MIN)`
//! with `limit` 0 for a visible key and `f32::MIN` past the causal or window limit, so a row that
//! sees no key is uniform over all keys, exactly as there; every key tile is walked (a tile that
//! no row of the block sees is not skipped, which keeps that rule without a special case).
//!
//! The loops over the head dimension are unrolled (`d` is known when the kernel is compiled):
//! a unit's query, accumulator and gradients are then registers rather than arrays indexed at
//! run time. Mesa's lavapipe (22.3) lost the writes of the rolled loops to such arrays past
//! about 480 query rows at head_dim 64 (only the first element of each row reached memory; the
//! WGSL was right): the test shapes are chosen past that size.
//!
//! Scores, softmax and accumulation are f32 whatever the inputs' dtype: the kernels read f32,
//! f16 or bf16 inputs as they are (no f32 copy of a bf16 KV cache at each decoding step) and
//! stage them in shared memory as f32, which stays within 16 KiB per cube, WebGPU's guaranteed
//! minimum.

use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Shape, Tensor, TensorMetadata};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::{CubeCount, CubeDim};

use crate::{AttentionMask, float, prim};

mod gpu {
    use cubecl::prelude::*;

    /// `f32::MIN`, the masked score.
    const MIN: f32 = f32::MIN;

    /// Score `s` of key `j` for the query at key index `qpos`, masked as the reference masks it:
    /// `s + max(limit + bias, f32::MIN)` (`window` 0: no window).
    #[cube]
    fn masked(s: f32, bias: f32, qpos: usize, j: usize, window: usize) -> f32 {
        let mut limit = f32::new(0.0);
        if j > qpos {
            limit = f32::new(MIN);
        }
        if window > 0 && j + window <= qpos {
            limit = f32::new(MIN);
        }
        s + f32::max(limit + bias, f32::new(MIN))
    }

    /// Copies `n` rows of `d` values starting at `from` into `to` (all of the cube's units).
    #[cube]
    fn stage<E: Float>(from: &Tensor<E>, start: usize, n: usize, to: &mut SharedMemory<f32>, #[comptime] d: usize) {
        let mut e = UNIT_POS_X as usize;
        while e < n * d {
            to[e] = f32::cast_from(from[start + e]);
            e += CUBE_DIM_X as usize;
        }
    }

    /// `q [b, t, nh, d]`, `k`, `v [b, nkv, tk, d]`, `bias [b, tk]` (all f32, contiguous) ->
    /// `out [b, t, nh, d]`, `stats [2, b, nh, t]`. Cube `(block of rows, head, batch)`.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub fn forward<E: Float>(
        q: &Tensor<E>,
        k: &Tensor<E>,
        v: &Tensor<E>,
        bias: &Tensor<f32>,
        out: &mut Tensor<E>,
        stats: &mut Tensor<f32>,
        past: u32,
        window: u32,
        #[comptime] d: usize,
        #[comptime] keys: usize,
        #[define(E)] _dtype: StorageType,
    ) {
        let (bi, h) = (CUBE_POS_Z as usize, CUBE_POS_Y as usize);
        let i = CUBE_POS_X as usize * CUBE_DIM_X as usize + UNIT_POS_X as usize;
        let (t, nh, nkv, tk) = (q.shape(1), q.shape(2), k.shape(1), k.shape(2));
        let kh = h / (nh / nkv);
        let live = i < t;
        let qpos = past as usize + i;
        let row = ((bi * t + i) * nh + h) * d;
        let mut qr = Array::<f32>::new(d);
        let mut acc = Array::<f32>::new(d);
        #[unroll]
        for c in 0..d {
            qr[c] = f32::new(0.0);
            if live {
                qr[c] = f32::cast_from(q[row + c]);
            }
            acc[c] = f32::new(0.0);
        }
        let mut ks = SharedMemory::<f32>::new(keys * d);
        let mut vs = SharedMemory::<f32>::new(keys * d);
        let mut bs = SharedMemory::<f32>::new(keys);
        let mut sc = Array::<f32>::new(keys);
        let mut m = f32::new(MIN);
        let mut l = f32::new(0.0);
        let kv = (bi * nkv + kh) * tk * d;
        let mut j0 = 0usize;
        while j0 < tk {
            let mut n = tk - j0;
            if n > keys {
                n = keys;
            }
            stage(k, kv + j0 * d, n, &mut ks, d);
            stage(v, kv + j0 * d, n, &mut vs, d);
            let mut e = UNIT_POS_X as usize;
            while e < n {
                bs[e] = bias[bi * tk + j0 + e];
                e += CUBE_DIM_X as usize;
            }
            sync_cube();
            if live {
                let mut top = f32::new(MIN);
                for jj in 0..n {
                    let mut s = f32::new(0.0);
                    #[unroll]
                    for c in 0..d {
                        s += qr[c] * ks[jj * d + c];
                    }
                    let s = masked(s, bs[jj], qpos, j0 + jj, window as usize);
                    sc[jj] = s;
                    top = f32::max(top, s);
                }
                let next = f32::max(m, top);
                let scale = f32::exp(m - next);
                l *= scale;
                #[unroll]
                for c in 0..d {
                    acc[c] *= scale;
                }
                for jj in 0..n {
                    let p = f32::exp(sc[jj] - next);
                    l += p;
                    #[unroll]
                    for c in 0..d {
                        acc[c] += p * vs[jj * d + c];
                    }
                }
                m = next;
            }
            sync_cube();
            j0 += keys;
        }
        if live {
            #[unroll]
            for c in 0..d {
                out[row + c] = E::cast_from(acc[c] / l);
            }
            let at = (bi * nh + h) * t + i;
            stats[at] = m;
            stats[stats.stride(0) + at] = f32::ln(l);
        }
    }

    /// `dq [b, t, nh, d]` from `q`, `k`, `v`, `bias`, `stats`, `grad [b, t, nh, d]` and
    /// `delta [b, t, nh]` (`dO . O` per row). Cube `(block of rows, head, batch)`.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub fn backward_q<E: Float>(
        q: &Tensor<E>,
        k: &Tensor<E>,
        v: &Tensor<E>,
        bias: &Tensor<f32>,
        stats: &Tensor<f32>,
        grad: &Tensor<E>,
        delta: &Tensor<f32>,
        dq: &mut Tensor<E>,
        past: u32,
        window: u32,
        #[comptime] d: usize,
        #[comptime] keys: usize,
        #[define(E)] _dtype: StorageType,
    ) {
        let (bi, h) = (CUBE_POS_Z as usize, CUBE_POS_Y as usize);
        let i = CUBE_POS_X as usize * CUBE_DIM_X as usize + UNIT_POS_X as usize;
        let (t, nh, nkv, tk) = (q.shape(1), q.shape(2), k.shape(1), k.shape(2));
        let kh = h / (nh / nkv);
        let live = i < t;
        let qpos = past as usize + i;
        let row = ((bi * t + i) * nh + h) * d;
        let mut qr = Array::<f32>::new(d);
        let mut go = Array::<f32>::new(d);
        let mut acc = Array::<f32>::new(d);
        let mut m = f32::new(0.0);
        let mut ls = f32::new(0.0);
        let mut dd = f32::new(0.0);
        #[unroll]
        for c in 0..d {
            qr[c] = f32::new(0.0);
            go[c] = f32::new(0.0);
            acc[c] = f32::new(0.0);
        }
        if live {
            #[unroll]
            for c in 0..d {
                qr[c] = f32::cast_from(q[row + c]);
                go[c] = f32::cast_from(grad[row + c]);
            }
            let at = (bi * nh + h) * t + i;
            m = stats[at];
            ls = stats[stats.stride(0) + at];
            dd = delta[(bi * t + i) * nh + h];
        }
        let mut ks = SharedMemory::<f32>::new(keys * d);
        let mut vs = SharedMemory::<f32>::new(keys * d);
        let mut bs = SharedMemory::<f32>::new(keys);
        let kv = (bi * nkv + kh) * tk * d;
        let mut j0 = 0usize;
        while j0 < tk {
            let mut n = tk - j0;
            if n > keys {
                n = keys;
            }
            stage(k, kv + j0 * d, n, &mut ks, d);
            stage(v, kv + j0 * d, n, &mut vs, d);
            let mut e = UNIT_POS_X as usize;
            while e < n {
                bs[e] = bias[bi * tk + j0 + e];
                e += CUBE_DIM_X as usize;
            }
            sync_cube();
            if live {
                for jj in 0..n {
                    let mut s = f32::new(0.0);
                    let mut dp = f32::new(0.0);
                    #[unroll]
                    for c in 0..d {
                        s += qr[c] * ks[jj * d + c];
                        dp += go[c] * vs[jj * d + c];
                    }
                    let s = masked(s, bs[jj], qpos, j0 + jj, window as usize);
                    let ds = f32::exp((s - m) - ls) * (dp - dd);
                    #[unroll]
                    for c in 0..d {
                        acc[c] += ds * ks[jj * d + c];
                    }
                }
            }
            sync_cube();
            j0 += keys;
        }
        if live {
            #[unroll]
            for c in 0..d {
                dq[row + c] = E::cast_from(acc[c]);
            }
        }
    }

    /// `dk`, `dv [b, nkv, tk, d]`. Cube `(block of keys, key/value head, batch)`; `rows` query
    /// rows staged at a time.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub fn backward_kv<E: Float>(
        q: &Tensor<E>,
        k: &Tensor<E>,
        v: &Tensor<E>,
        bias: &Tensor<f32>,
        stats: &Tensor<f32>,
        grad: &Tensor<E>,
        delta: &Tensor<f32>,
        dk: &mut Tensor<E>,
        dv: &mut Tensor<E>,
        past: u32,
        window: u32,
        #[comptime] d: usize,
        #[comptime] rows: usize,
        #[define(E)] _dtype: StorageType,
    ) {
        let (bi, kh) = (CUBE_POS_Z as usize, CUBE_POS_Y as usize);
        let j = CUBE_POS_X as usize * CUBE_DIM_X as usize + UNIT_POS_X as usize;
        let (t, nh, nkv, tk) = (q.shape(1), q.shape(2), k.shape(1), k.shape(2));
        let rep = nh / nkv;
        let live = j < tk;
        let at = ((bi * nkv + kh) * tk + j) * d;
        let mut kr = Array::<f32>::new(d);
        let mut vr = Array::<f32>::new(d);
        let mut gk = Array::<f32>::new(d);
        let mut gv = Array::<f32>::new(d);
        let mut bj = f32::new(0.0);
        #[unroll]
        for c in 0..d {
            kr[c] = f32::new(0.0);
            vr[c] = f32::new(0.0);
            gk[c] = f32::new(0.0);
            gv[c] = f32::new(0.0);
        }
        if live {
            #[unroll]
            for c in 0..d {
                kr[c] = f32::cast_from(k[at + c]);
                vr[c] = f32::cast_from(v[at + c]);
            }
            bj = bias[bi * tk + j];
        }
        let mut qs = SharedMemory::<f32>::new(rows * d);
        let mut gs = SharedMemory::<f32>::new(rows * d);
        let mut ms = SharedMemory::<f32>::new(rows);
        let mut lss = SharedMemory::<f32>::new(rows);
        let mut dds = SharedMemory::<f32>::new(rows);
        for r in 0..rep {
            let h = kh * rep + r;
            let mut i0 = 0usize;
            while i0 < t {
                let mut n = t - i0;
                if n > rows {
                    n = rows;
                }
                // Rows of q and grad for head h are `nh * d` apart: staged one value at a time.
                let mut e = UNIT_POS_X as usize;
                while e < n * d {
                    let src = ((bi * t + i0 + e / d) * nh + h) * d + e % d;
                    qs[e] = f32::cast_from(q[src]);
                    gs[e] = f32::cast_from(grad[src]);
                    e += CUBE_DIM_X as usize;
                }
                let mut e = UNIT_POS_X as usize;
                while e < n {
                    let s = (bi * nh + h) * t + i0 + e;
                    ms[e] = stats[s];
                    lss[e] = stats[stats.stride(0) + s];
                    dds[e] = delta[(bi * t + i0 + e) * nh + h];
                    e += CUBE_DIM_X as usize;
                }
                sync_cube();
                if live {
                    for ii in 0..n {
                        let mut s = f32::new(0.0);
                        let mut dp = f32::new(0.0);
                        #[unroll]
                        for c in 0..d {
                            s += qs[ii * d + c] * kr[c];
                            dp += gs[ii * d + c] * vr[c];
                        }
                        let s = masked(s, bj, past as usize + i0 + ii, j, window as usize);
                        let p = f32::exp((s - ms[ii]) - lss[ii]);
                        let ds = p * (dp - dds[ii]);
                        #[unroll]
                        for c in 0..d {
                            gv[c] += p * gs[ii * d + c];
                            gk[c] += ds * qs[ii * d + c];
                        }
                    }
                }
                sync_cube();
                i0 += rows;
            }
        }
        if live {
            #[unroll]
            for c in 0..d {
                dk[at + c] = E::cast_from(gk[c]);
                dv[at + c] = E::cast_from(gv[c]);
            }
        }
    }
}

/// Units (query rows, or keys) per cube.
const UNITS: usize = 64;

/// f32 values of shared memory per cube: 16 KiB, WebGPU's guaranteed minimum, less room for
/// the per-row vectors.
const SHARED_F32: usize = 4096 - 4 * UNITS;

/// Rows of `d` values staged per tile: two such tiles (keys and values, or queries and output
/// gradients) fit [`SHARED_F32`] (at most [`UNITS`]).
fn tile_rows(d: usize) -> usize {
    (SHARED_F32 / (2 * d.max(1))).clamp(1, UNITS)
}

type Cube<R, F, I, BT> = CubeBackend<R, F, I, BT>;

/// A float tensor primitive of the cube backend.
type Prim<R, F, I, BT> = FloatTensor<Cube<R, F, I, BT>>;

/// The kernels' element type for inputs of `dtype`: the model's compute dtypes are read as they
/// are (a bf16 KV cache is not copied to f32 at every step), anything else as f32.
fn element(dtype: DType) -> DType {
    match dtype {
        DType::F32 | DType::F16 | DType::BF16 => dtype,
        _ => DType::F32,
    }
}

/// `x` as a contiguous cube tensor of `dtype` (no copy when it already is one).
fn raw_as<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(
    x: FloatTensor<Cube<R, F, I, BT>>,
    dtype: DType,
) -> CubeTensor<R> {
    let x = if x.dtype == dtype { x } else { prim(float::<Cube<R, F, I, BT>, D>(x).cast(dtype)) };
    into_contiguous(x)
}

fn empty_as<R: CubeRuntime>(like: &CubeTensor<R>, shape: Shape, dtype: DType) -> CubeTensor<R> {
    empty_device_dtype::<R>(like.client.clone(), like.device.clone(), shape, dtype)
}

/// `x` in `dtype` (no copy when it already is).
fn cast_to<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(
    x: CubeTensor<R>,
    dtype: DType,
) -> FloatTensor<Cube<R, F, I, BT>> {
    if x.dtype == dtype { x } else { prim(float::<Cube<R, F, I, BT>, D>(x).cast(dtype)) }
}

/// The launch grid: `(blocks of n over UNITS, heads, batch)`.
fn grid(n: usize, heads: usize, batch: usize) -> (CubeCount, CubeDim) {
    let blocks = n.div_ceil(UNITS).max(1);
    (CubeCount::Static(blocks as u32, heads as u32, batch as u32), CubeDim::new_1d(UNITS as u32))
}

/// The forward ([`crate::LogProbBackend::causal_attention_fwd`]).
#[allow(clippy::type_complexity)]
pub(crate) fn attention_fwd<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    q: Prim<R, F, I, BT>,
    k: Prim<R, F, I, BT>,
    v: Prim<R, F, I, BT>,
    key_bias: Prim<R, F, I, BT>,
    mask: &AttentionMask,
) -> (Prim<R, F, I, BT>, Prim<R, F, I, BT>) {
    let dtype = q.dtype;
    let [b, t, nh, d] = q.shape().dims::<4>();
    if t == 0 || d == 0 {
        let stats = empty_as(&q, Shape::new([2, b, nh, t]), DType::F32);
        return (q, stats);
    }
    let e = element(dtype);
    let (q, k, v) = (raw_as::<R, F, I, BT, 4>(q, e), raw_as::<R, F, I, BT, 4>(k, e), raw_as::<R, F, I, BT, 4>(v, e));
    let bias = raw_as::<R, F, I, BT, 2>(key_bias, DType::F32);
    let out = empty_as(&q, q.shape(), e);
    let stats = empty_as(&q, Shape::new([2, b, nh, t]), DType::F32);
    let (count, dim) = grid(t, nh, b);
    gpu::forward::launch::<R>(
        &q.client.clone(),
        count,
        dim,
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        bias.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        stats.clone().into_tensor_arg(),
        mask.past as u32,
        mask.window.unwrap_or(0) as u32,
        d,
        tile_rows(d),
        e.into(),
    );
    (cast_to::<R, F, I, BT, 4>(out, dtype), stats)
}

/// The backward ([`crate::LogProbBackend::causal_attention_bwd`]): `D = dO . O` by Burn, then
/// the two kernels.
#[allow(clippy::type_complexity)]
pub(crate) fn attention_bwd<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    (q, k, v): (Prim<R, F, I, BT>, Prim<R, F, I, BT>, Prim<R, F, I, BT>),
    key_bias: Prim<R, F, I, BT>,
    out: Prim<R, F, I, BT>,
    stats: Prim<R, F, I, BT>,
    grad: Prim<R, F, I, BT>,
    mask: &AttentionMask,
) -> (Prim<R, F, I, BT>, Prim<R, F, I, BT>, Prim<R, F, I, BT>) {
    let (q_dtype, k_dtype, v_dtype) = (q.dtype, k.dtype, v.dtype);
    let [b, t, nh, d] = q.shape().dims::<4>();
    let [_, nkv, tk, _] = k.shape().dims::<4>();
    if t == 0 || d == 0 || tk == 0 {
        let zeros =
            |x: &Prim<R, F, I, BT>| prim(Tensor::<Cube<R, F, I, BT>, 4>::zeros(x.shape(), (&x.device, x.dtype)));
        return (zeros(&q), zeros(&k), zeros(&v));
    }
    let e = element(q_dtype);
    let delta = (float::<Cube<R, F, I, BT>, 4>(grad.clone()).cast(DType::F32)
        * float::<Cube<R, F, I, BT>, 4>(out).cast(DType::F32))
    .sum_dim(3);
    let delta = into_contiguous(prim(delta));
    let grad = raw_as::<R, F, I, BT, 4>(grad, e);
    let (q, k, v) = (raw_as::<R, F, I, BT, 4>(q, e), raw_as::<R, F, I, BT, 4>(k, e), raw_as::<R, F, I, BT, 4>(v, e));
    let bias = raw_as::<R, F, I, BT, 2>(key_bias, DType::F32);
    let stats = raw_as::<R, F, I, BT, 4>(stats, DType::F32);
    let (past, window) = (mask.past as u32, mask.window.unwrap_or(0) as u32);
    let rows = tile_rows(d);
    let client = q.client.clone();

    let dq = empty_as(&q, q.shape(), e);
    let (count, dim) = grid(t, nh, b);
    gpu::backward_q::launch::<R>(
        &client,
        count,
        dim,
        q.clone().into_tensor_arg(),
        k.clone().into_tensor_arg(),
        v.clone().into_tensor_arg(),
        bias.clone().into_tensor_arg(),
        stats.clone().into_tensor_arg(),
        grad.clone().into_tensor_arg(),
        delta.clone().into_tensor_arg(),
        dq.clone().into_tensor_arg(),
        past,
        window,
        d,
        rows,
        e.into(),
    );

    let dk = empty_as(&k, k.shape(), e);
    let dv = empty_as(&k, k.shape(), e);
    let (count, dim) = grid(tk, nkv, b);
    gpu::backward_kv::launch::<R>(
        &client,
        count,
        dim,
        q.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        bias.into_tensor_arg(),
        stats.into_tensor_arg(),
        grad.into_tensor_arg(),
        delta.into_tensor_arg(),
        dk.clone().into_tensor_arg(),
        dv.clone().into_tensor_arg(),
        past,
        window,
        d,
        rows,
        e.into(),
    );
    (
        cast_to::<R, F, I, BT, 4>(dq, q_dtype),
        cast_to::<R, F, I, BT, 4>(dk, k_dtype),
        cast_to::<R, F, I, BT, 4>(dv, v_dtype),
    )
}
