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
//!   `dq = sum_j p_ij (dO_i . v_j - D_i) k_j`, and writes each row's `D_i = dO_i . O_i`.
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
//! Every tensor is read and written through its strides (CUDA's allocator pads rows; the model's
//! queries are a view). Shapes the kernels do not take (an empty sequence, a head dimension past
//! 512, more than 65,535 cubes in a launch dimension) run the tiles of Burn operations.
//!
//! Scores, softmax and accumulation are f32 whatever the inputs' dtype: the kernels read f32,
//! f16 or bf16 inputs as they are (no f32 copy of a bf16 KV cache at each decoding step) and
//! stage them in shared memory as f32, which stays within 16 KiB per cube, WebGPU's guaranteed
//! minimum.

use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Shape, TensorMetadata};
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::{CubeCount, CubeDim};

use crate::{AttentionMask, float, prim};

mod gpu {
    use cubecl::prelude::*;

    /// `f32::MIN`, the masked score.
    const MIN: f32 = f32::MIN;

    /// Score `s` of key `j` for the query at key index `qpos`, masked as the reference masks it
    /// (`s + max(limit + bias, f32::MIN)`, without the overflow of `f32::MIN + f32::MIN`):
    /// `window` is 0 for none, else the window plus one.
    #[cube]
    fn masked(s: f32, bias: f32, qpos: usize, j: usize, window: usize) -> f32 {
        let mut visible = j <= qpos;
        if visible && window > 0 && qpos - j >= window - 1 {
            visible = false;
        }
        let mut add = f32::new(MIN);
        if visible {
            add = f32::max(bias, f32::new(MIN));
        }
        s + add
    }

    /// Copies rows `j0..j0 + n` of `d` values (row `j` at `base + j * row`, value `c` at `+ c *
    /// col`) into `to` as f32, by all of the cube's units.
    #[cube]
    #[allow(clippy::too_many_arguments)]
    fn stage<E: Float>(
        from: &Tensor<E>,
        base: usize,
        row: usize,
        col: usize,
        j0: usize,
        n: usize,
        to: &mut SharedMemory<f32>,
        #[comptime] d: usize,
    ) {
        let mut e = UNIT_POS_X as usize;
        while e < n * d {
            to[e] = f32::cast_from(from[base + (j0 + e / d) * row + (e % d) * col]);
            e += CUBE_DIM_X as usize;
        }
    }

    /// Keys, values and the keys' bias of rows `j0..j0 + n` into shared memory.
    #[cube]
    #[allow(clippy::too_many_arguments)]
    fn stage_keys<E: Float>(
        k: &Tensor<E>,
        v: &Tensor<E>,
        bias: &Tensor<f32>,
        bi: usize,
        kh: usize,
        j0: usize,
        n: usize,
        ks: &mut SharedMemory<f32>,
        vs: &mut SharedMemory<f32>,
        bs: &mut SharedMemory<f32>,
        #[comptime] d: usize,
    ) {
        let kb = bi * k.stride(0) + kh * k.stride(1);
        stage(k, kb, k.stride(2), k.stride(3), j0, n, ks, d);
        let vb = bi * v.stride(0) + kh * v.stride(1);
        stage(v, vb, v.stride(2), v.stride(3), j0, n, vs, d);
        let mut e = UNIT_POS_X as usize;
        while e < n {
            bs[e] = bias[bi * bias.stride(0) + (j0 + e) * bias.stride(1)];
            e += CUBE_DIM_X as usize;
        }
    }

    /// Where row `(bi, i, h)` of a `[b, t, heads, d]` tensor starts.
    #[cube]
    fn row_of<E: Float>(x: &Tensor<E>, bi: usize, i: usize, h: usize) -> usize {
        bi * x.stride(0) + i * x.stride(1) + h * x.stride(2)
    }

    /// Where `(bi, h, i)` of the statistics `[2, b, nh, t]` (the first of the two) sits.
    #[cube]
    fn stat_of(stats: &Tensor<f32>, bi: usize, h: usize, i: usize) -> usize {
        bi * stats.stride(1) + h * stats.stride(2) + i * stats.stride(3)
    }

    /// `q [b, t, nh, d]`, `k`, `v [b, nkv, tk, d]`, `bias [b, tk]` (any strides) -> `out [b, t,
    /// nh, d]`, `stats [2, b, nh, t]`. Cube `(block of rows, head, batch)`.
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
        let qrow = row_of(q, bi, i, h);
        let mut qr = Array::<f32>::new(d);
        let mut acc = Array::<f32>::new(d);
        #[unroll]
        for c in 0..d {
            qr[c] = f32::new(0.0);
            if live {
                qr[c] = f32::cast_from(q[qrow + c * q.stride(3)]);
            }
            acc[c] = f32::new(0.0);
        }
        let mut ks = SharedMemory::<f32>::new(keys * d);
        let mut vs = SharedMemory::<f32>::new(keys * d);
        let mut bs = SharedMemory::<f32>::new(keys);
        let mut sc = Array::<f32>::new(keys);
        let mut m = f32::new(MIN);
        let mut l = f32::new(0.0);
        let mut j0 = 0usize;
        while j0 < tk {
            let mut n = tk - j0;
            if n > keys {
                n = keys;
            }
            stage_keys(k, v, bias, bi, kh, j0, n, &mut ks, &mut vs, &mut bs, d);
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
            let orow = row_of(out, bi, i, h);
            #[unroll]
            for c in 0..d {
                out[orow + c * out.stride(3)] = E::cast_from(acc[c] / l);
            }
            let at = stat_of(stats, bi, h, i);
            stats[at] = m;
            stats[stats.stride(0) + at] = f32::ln(l);
        }
    }

    /// `dq [b, t, nh, d]` and `delta [b, nh, t]` (`dO . O` per row, for [`backward_kv`]) from
    /// `q`, `k`, `v`, `bias`, `out`, `stats` and `grad [b, t, nh, d]`. Cube `(block of rows, head,
    /// batch)`.
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub fn backward_q<E: Float>(
        q: &Tensor<E>,
        k: &Tensor<E>,
        v: &Tensor<E>,
        bias: &Tensor<f32>,
        out: &Tensor<E>,
        stats: &Tensor<f32>,
        grad: &Tensor<E>,
        dq: &mut Tensor<E>,
        delta: &mut Tensor<f32>,
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
            let (qrow, grow, orow) = (row_of(q, bi, i, h), row_of(grad, bi, i, h), row_of(out, bi, i, h));
            #[unroll]
            for c in 0..d {
                qr[c] = f32::cast_from(q[qrow + c * q.stride(3)]);
                go[c] = f32::cast_from(grad[grow + c * grad.stride(3)]);
                dd += go[c] * f32::cast_from(out[orow + c * out.stride(3)]);
            }
            let at = stat_of(stats, bi, h, i);
            m = stats[at];
            ls = stats[stats.stride(0) + at];
            delta[bi * delta.stride(0) + h * delta.stride(1) + i * delta.stride(2)] = dd;
        }
        let mut ks = SharedMemory::<f32>::new(keys * d);
        let mut vs = SharedMemory::<f32>::new(keys * d);
        let mut bs = SharedMemory::<f32>::new(keys);
        let mut j0 = 0usize;
        while j0 < tk {
            let mut n = tk - j0;
            if n > keys {
                n = keys;
            }
            stage_keys(k, v, bias, bi, kh, j0, n, &mut ks, &mut vs, &mut bs, d);
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
            let row = row_of(dq, bi, i, h);
            #[unroll]
            for c in 0..d {
                dq[row + c * dq.stride(3)] = E::cast_from(acc[c]);
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
            let krow = bi * k.stride(0) + kh * k.stride(1) + j * k.stride(2);
            let vrow = bi * v.stride(0) + kh * v.stride(1) + j * v.stride(2);
            #[unroll]
            for c in 0..d {
                kr[c] = f32::cast_from(k[krow + c * k.stride(3)]);
                vr[c] = f32::cast_from(v[vrow + c * v.stride(3)]);
            }
            bj = bias[bi * bias.stride(0) + j * bias.stride(1)];
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
                let qb = bi * q.stride(0) + h * q.stride(2);
                stage(q, qb, q.stride(1), q.stride(3), i0, n, &mut qs, d);
                let gb = bi * grad.stride(0) + h * grad.stride(2);
                stage(grad, gb, grad.stride(1), grad.stride(3), i0, n, &mut gs, d);
                let mut e = UNIT_POS_X as usize;
                while e < n {
                    let s = stat_of(stats, bi, h, i0 + e);
                    ms[e] = stats[s];
                    lss[e] = stats[stats.stride(0) + s];
                    dds[e] = delta[bi * delta.stride(0) + h * delta.stride(1) + (i0 + e) * delta.stride(2)];
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
            let krow = bi * dk.stride(0) + kh * dk.stride(1) + j * dk.stride(2);
            let vrow = bi * dv.stride(0) + kh * dv.stride(1) + j * dv.stride(2);
            #[unroll]
            for c in 0..d {
                dk[krow + c * dk.stride(3)] = E::cast_from(gk[c]);
                dv[vrow + c * dv.stride(3)] = E::cast_from(gv[c]);
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

/// The largest head dimension the kernels take (a unit holds four `head_dim` vectors in
/// registers in the backward); larger ones run the tiles.
const MAX_HEAD_DIM: usize = 512;

/// The most cubes a launch dimension may have (CUDA's limit for y and z, and wgpu's default).
const MAX_CUBES: usize = 65_535;

/// Whether the kernels take these shapes; the others (empty sequences, huge heads or grids) run
/// the tiles of Burn operations.
fn kernel_takes([b, t, nh, d]: [usize; 4], tk: usize) -> bool {
    let fits = |n: usize| (1..=MAX_CUBES).contains(&n);
    t > 0
        && tk > 0
        && (1..=MAX_HEAD_DIM).contains(&d)
        && fits(b)
        && fits(nh)
        && fits(t.div_ceil(UNITS))
        && fits(tk.div_ceil(UNITS))
}

/// `x` in `dtype` (no copy when it already is; any strides: the kernels read through them).
fn as_dtype<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(
    x: Prim<R, F, I, BT>,
    dtype: DType,
) -> CubeTensor<R> {
    if x.dtype == dtype { x } else { prim(float::<Cube<R, F, I, BT>, D>(x).cast(dtype)) }
}

/// An output: dense (`empty_device_dtype` may pad rows on CUDA; the kernels would read through
/// the strides, but the results are handed on as they are).
fn empty_as<R: CubeRuntime>(like: &CubeTensor<R>, shape: Shape, dtype: DType) -> CubeTensor<R> {
    empty_device_contiguous_dtype::<R>(like.client.clone(), like.device.clone(), shape, dtype)
}

/// The mask's window for the kernels: 0 for none, else the window plus one.
fn window_arg(mask: &AttentionMask) -> u32 {
    mask.window.map_or(0, |w| u32::try_from(w).unwrap_or(u32::MAX - 1).saturating_add(1))
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
    if !kernel_takes([b, t, nh, d], k.shape().dims::<4>()[2]) {
        return crate::tiled_attention_fwd::<Cube<R, F, I, BT>>(q, k, v, key_bias, mask);
    }
    let e = element(dtype);
    let (q, k, v) =
        (as_dtype::<R, F, I, BT, 4>(q, e), as_dtype::<R, F, I, BT, 4>(k, e), as_dtype::<R, F, I, BT, 4>(v, e));
    let bias = as_dtype::<R, F, I, BT, 2>(key_bias, DType::F32);
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
        window_arg(mask),
        d,
        tile_rows(d),
        e.into(),
    );
    (as_dtype::<R, F, I, BT, 4>(out, dtype), stats)
}

/// The backward ([`crate::LogProbBackend::causal_attention_bwd`]): `dq` (and each row's
/// `D = dO . O`), then `dk` and `dv`.
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
    if !kernel_takes([b, t, nh, d], tk) {
        return crate::tiled_attention_bwd::<Cube<R, F, I, BT>>((q, k, v), key_bias, out, stats, grad, mask);
    }
    let e = element(q_dtype);
    let (grad, out) = (as_dtype::<R, F, I, BT, 4>(grad, e), as_dtype::<R, F, I, BT, 4>(out, e));
    let (q, k, v) =
        (as_dtype::<R, F, I, BT, 4>(q, e), as_dtype::<R, F, I, BT, 4>(k, e), as_dtype::<R, F, I, BT, 4>(v, e));
    let bias = as_dtype::<R, F, I, BT, 2>(key_bias, DType::F32);
    let stats = as_dtype::<R, F, I, BT, 4>(stats, DType::F32);
    let (past, window) = (mask.past as u32, window_arg(mask));
    let rows = tile_rows(d);
    let client = q.client.clone();

    let dq = empty_as(&q, q.shape(), e);
    let delta = empty_as(&q, Shape::new([b, nh, t]), DType::F32);
    let (count, dim) = grid(t, nh, b);
    gpu::backward_q::launch::<R>(
        &client,
        count,
        dim,
        q.clone().into_tensor_arg(),
        k.clone().into_tensor_arg(),
        v.clone().into_tensor_arg(),
        bias.clone().into_tensor_arg(),
        out.into_tensor_arg(),
        stats.clone().into_tensor_arg(),
        grad.clone().into_tensor_arg(),
        dq.clone().into_tensor_arg(),
        delta.clone().into_tensor_arg(),
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
        as_dtype::<R, F, I, BT, 4>(dq, q_dtype),
        as_dtype::<R, F, I, BT, 4>(dk, k_dtype),
        as_dtype::<R, F, I, BT, 4>(dv, v_dtype),
    )
}
