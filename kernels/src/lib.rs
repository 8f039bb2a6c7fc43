//! Per-token log-probabilities for training, without the `[tokens, vocab]` tensors.
//!
//! Two operations, each with a custom backward:
//!
//! - [`token_logprobs`]: logits `[N, V]` and target ids `[N]` -> `log softmax(logits)[n, t_n]`.
//!   The backward is `g_n * (onehot(t_n) - softmax(logits_n))`, recomputed from the saved
//!   per-row max and log-sum `[2, N]` rather than a stored softmax.
//! - [`linear_logprobs`]: hidden states `[N, H]`, the LM-head weight `[V, H]` and target ids ->
//!   the same log-probs, without ever holding the `[N, V]` logits: the vocabulary is walked in
//!   chunks with an online log-sum-exp, and the backward recomputes each chunk's logits to give
//!   the gradients of the hidden states and of the weight, chunk by chunk.
//!
//! A negative target id marks a padding position: its log-prob is 0 and it gets no gradient.
//! Log-probs and the log-sum-exp are computed in f32 whatever the inputs' dtype.
//!
//! Backends plug in through [`LogProbBackend`]. Its provided methods are the reference
//! implementation in plain Burn tensor ops (module [`reference`]); Burn's cubecl backends (wgpu,
//! CUDA, ROCm) override them with cubecl kernels (feature `cubecl`), and `Autodiff<B>` wraps
//! either with the custom backward. No intermediate buffer exceeds [`LogProbBackend::max_chunk_elems`]
//! elements, which on cubecl runtimes is bounded by the device's largest storage binding.
//!
//! ```
//! use burn::backend::Flex;
//! use burn::tensor::{Int, Tensor};
//! let device = Default::default();
//! let logits = Tensor::<Flex, 2>::from_floats([[0.0, 0.0], [1.0, 1.0]], &device);
//! let targets = Tensor::<Flex, 1, Int>::from_ints([1, -1], &device);
//! let logp: Vec<f32> = fuserl_kernels::token_logprobs(logits, targets).into_data().to_vec().unwrap();
//! assert!((logp[0] - (0.5f32).ln()).abs() < 1e-6);
//! assert_eq!(logp[1], 0.0); // padding
//! ```

use core::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, IndexingUpdateOp, Int, Tensor, TensorPrimitive};

pub mod attention;
mod autodiff;
pub mod cpu_amx;
pub mod cpu_attention;
pub mod cpu_bf16;
pub mod cpu_matmul;
pub mod cpu_rows;
pub mod cpu_swiglu;
#[cfg(feature = "cubecl")]
mod cube;
#[cfg(feature = "cubecl")]
mod cube_attention;
#[cfg(feature = "cubecl")]
mod cube_quant;
#[cfg(feature = "fusion")]
mod fusion;
pub mod quant;
pub mod qweight;
pub mod reference;

pub use attention::AttentionMask;

/// The GPU backends by name, whatever Burn's `fusion` feature makes `burn::backend::Wgpu` and
/// `Cuda`: the plain cubecl backends and (feature `fusion`) Burn's fusion backend over them.
pub mod backends {
    /// wgpu's plain cubecl backend.
    #[cfg(feature = "wgpu")]
    pub type PlainWgpu = burn::backend::wgpu::CubeBackend<burn::backend::wgpu::WgpuRuntime, f32, i32, u32>;
    /// wgpu through Burn's fusion backend.
    #[cfg(all(feature = "wgpu", feature = "fusion"))]
    pub type FusedWgpu = burn_fusion::Fusion<PlainWgpu>;
    /// CUDA's plain cubecl backend.
    #[cfg(feature = "cuda")]
    pub type PlainCuda = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;
    /// CUDA through Burn's fusion backend.
    #[cfg(all(feature = "cuda", feature = "fusion"))]
    pub type FusedCuda = burn_fusion::Fusion<PlainCuda>;
}
pub use qweight::{QuantLayout, dequantize, quant_linear_logprobs, quant_matmul};

/// How the work is cut: `rows` tokens by `vocab` vocabulary entries at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunks {
    /// Tokens per chunk.
    pub rows: usize,
    /// Vocabulary entries per chunk.
    pub vocab: usize,
}

impl Chunks {
    /// Chunks of at most `max_elems` logits for `n` tokens and a vocabulary of `v`: whole rows
    /// of the vocabulary when they fit, else vocabulary chunks of 256 to 8192 entries, and
    /// fewer tokens at a time when even that is too much.
    pub fn plan(n: usize, v: usize, max_elems: usize) -> Self {
        let (n, v) = (n.max(1), v.max(1));
        let max_elems = max_elems.max(256);
        let vocab = if n * v <= max_elems { v } else { (max_elems / n).clamp(256, 8192).min(v) };
        let rows = (max_elems / vocab).clamp(1, n);
        Self { rows, vocab }
    }
}

/// The default bound on one chunk: 4 Mi elements (16 MiB of f32), large enough for efficient
/// matmuls (2048 vocabulary entries for 2048 tokens), small enough that the chunk and its few
/// temporaries stay far below the logits they replace.
pub const DEFAULT_MAX_CHUNK_ELEMS: usize = 1 << 22;

/// The default bound on one attention tile's scores (`batch * heads * rows * keys`): 32 Mi
/// elements (128 MiB of f32; the tile and a few temporaries of its size are live at once). At
/// batch 4, 32 heads and 4096 keys that is 64 query rows a tile: matmuls large enough to run
/// well, and a few hundred MiB instead of the 8 GiB of the whole scores.
pub const DEFAULT_MAX_ATTENTION_ELEMS: usize = 1 << 25;

/// Whether backends with an attention kernel (the cubecl ones) run it (the default) rather than
/// the tiles of Burn operations ([`attention`]). Process-wide, like PyTorch's
/// `torch.backends.cuda.enable_flash_sdp`; set from `[backend] attention`.
static ATTENTION_KERNEL: AtomicBool = AtomicBool::new(true);

/// Chooses the attention kernel (`true`, the default) or the tiles of Burn operations, for every
/// backend that has a kernel, from now on.
pub fn use_attention_kernel(on: bool) {
    ATTENTION_KERNEL.store(on, Ordering::Relaxed);
}

/// Whether the attention kernel runs where a backend has one ([`use_attention_kernel`]).
pub fn attention_kernel() -> bool {
    ATTENTION_KERNEL.load(Ordering::Relaxed)
}

/// The forward of attention in tiles of Burn operations ([`attention::attention_fwd`]) on
/// primitives: what [`LogProbBackend::causal_attention_fwd`] does by default.
pub fn tiled_attention_fwd<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    key_bias: FloatTensor<B>,
    mask: &AttentionMask,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (out, stats) = attention::attention_fwd::<B>(float(q), float(k), float(v), float(key_bias), mask);
    (prim(out), prim(stats))
}

/// The backward of [`tiled_attention_fwd`] ([`attention::attention_bwd`]).
#[allow(clippy::type_complexity)]
pub fn tiled_attention_bwd<B: Backend>(
    (q, k, v): (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>),
    key_bias: FloatTensor<B>,
    out: FloatTensor<B>,
    stats: FloatTensor<B>,
    grad: FloatTensor<B>,
    mask: &AttentionMask,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let qkv = (float(q), float(k), float(v));
    let (dq, dk, dv) = attention::attention_bwd::<B>(qkv, float(key_bias), float(out), float(stats), float(grad), mask);
    (prim(dq), prim(dk), prim(dv))
}

/// A backend that can compute per-token log-probs. Every method but the two entry points has
/// a provided reference implementation in plain Burn ops; cubecl backends override them with
/// kernels, and `Autodiff<B>` overrides the entry points to attach the custom backward.
pub trait LogProbBackend: Backend {
    /// The largest number of elements one chunk may hold on `device`.
    fn max_chunk_elems(_device: &Self::Device) -> usize {
        DEFAULT_MAX_CHUNK_ELEMS
    }

    /// The largest number of scores one attention tile may hold on `device`.
    fn max_attention_elems(_device: &Self::Device) -> usize {
        DEFAULT_MAX_ATTENTION_ELEMS
    }

    /// How many shards of a micro-batch the trainer's layer-wise backward runs at once, each on
    /// its own host thread. 1 (the default) for devices, whose kernels already fill the device;
    /// the CPU backend returns its thread count, because most of its element-wise kernels run
    /// on the calling thread only.
    fn host_shards(_device: &Self::Device) -> usize {
        1
    }

    /// Runs `f` (a model's forward: many operations, each split between host threads on the CPU)
    /// where this backend's host work runs best. Here: on this thread. The CPU backend runs it on
    /// a thread of its rayon pool (at once where this is one), so that each operation inside it
    /// splits with the pool's other threads by work-stealing, rather than a thread outside the
    /// pool handing every operation to the pool and sleeping until it is done (two wake-ups an
    /// operation, and one thread more than the cores runnable). Not for work that holds a lock
    /// another task of the pool may take (the autodiff graph's): the pool's thread may take up
    /// such a task while it waits inside `f`. And `f` does not see the caller's thread-locals
    /// (`fuserl_model::lora::with_dropout`'s key, a tracing span): set them inside `f`.
    fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
        f()
    }

    /// `logp [N]` of `targets` under `logits [N, V]` (entry point; differentiable on
    /// `Autodiff`).
    fn token_logprobs(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        Self::token_logprobs_fwd(logits, targets).0
    }

    /// `logp [N]` of `targets` under `hidden [N, H] @ weight [V, H]^T` (entry point;
    /// differentiable on `Autodiff`).
    fn linear_logprobs(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        chunks: Chunks,
    ) -> FloatTensor<Self> {
        Self::linear_logprobs_fwd(hidden, weight, targets, chunks).0
    }

    /// The two per-row steps of the log-prob operations below (the online log-sum-exp and the
    /// logits' gradient), which their provided forwards and backwards run chunk by chunk: the
    /// reference in plain Burn ops by default; the CPU backend's one vectorised pass per row
    /// ([`cpu_rows`]), cubecl kernels on cubecl backends.
    fn row_ops() -> impl reference::RowOps<Self> {
        reference::Plain
    }

    /// Forward of [`Self::token_logprobs`]: `(logp [N], stats [2, N])`, both f32; `stats` holds
    /// each row's max logit and `ln sum exp(x - max)`.
    fn token_logprobs_fwd(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        with_ops::token_fwd::<Self>(&Self::row_ops(), logits, targets)
    }

    /// Backward of [`Self::token_logprobs`]: the gradient of the logits for the output gradient
    /// `grad [N]` and the forward's `stats`.
    fn token_logprobs_bwd(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        stats: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        with_ops::token_bwd::<Self>(&Self::row_ops(), logits, targets, stats, grad)
    }

    /// Forward of [`Self::linear_logprobs`]: `(logp [N], stats [2, N])` as in
    /// [`Self::token_logprobs_fwd`].
    fn linear_logprobs_fwd(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        chunks: Chunks,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        with_ops::linear_fwd::<Self>(&Self::row_ops(), hidden, weight, targets, chunks)
    }

    /// Backward of [`Self::linear_logprobs`]: the gradients of the hidden states and of the
    /// weight (each only when asked for), in their dtypes.
    #[allow(clippy::too_many_arguments)]
    fn linear_logprobs_bwd(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        stats: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        chunks: Chunks,
        want: Want,
    ) -> (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>) {
        with_ops::linear_bwd::<Self>(&Self::row_ops(), (hidden, weight, targets), stats, grad, chunks, want)
    }

    /// Causal grouped-query attention (entry point; differentiable on `Autodiff`): `out [batch,
    /// seq, heads, dim]` for `q [batch, seq, heads, dim]` (already scaled), `k`, `v [batch,
    /// kv_heads, keys, dim]` and `key_bias [batch, keys]` (0, or `f32::MIN` for a padding key),
    /// never holding the whole `[seq, keys]` scores ([`attention`]).
    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        mask: AttentionMask,
    ) -> FloatTensor<Self> {
        Self::causal_attention_fwd(q, k, v, key_bias, mask).0
    }

    /// Forward of [`Self::causal_attention`]: `(out, stats [2, batch, heads, seq] f32)`: each
    /// query row's largest score and the log of its sum of exponentials.
    fn causal_attention_fwd(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        mask: AttentionMask,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        tiled_attention_fwd::<Self>(q, k, v, key_bias, &mask)
    }

    /// Backward of [`Self::causal_attention`]: the gradients of `q`, `k` and `v`, in their dtypes.
    #[allow(clippy::too_many_arguments)]
    fn causal_attention_bwd(
        (q, k, v): (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>),
        key_bias: FloatTensor<Self>,
        out: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        mask: AttentionMask,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        tiled_attention_bwd::<Self>((q, k, v), key_bias, out, stats, grad, &mask)
    }

    /// Whether [`Self::linear_matmul`] takes a bf16 weight under f32 activations without casting
    /// all of it first (the CPU backend widens it as it reads it): then a frozen model loaded in
    /// f32 keeps a checkpoint's bf16 weights in bf16 (`fuserl_model::checkpoint::load_frozen`).
    fn mixes_bf16_weights() -> bool {
        false
    }

    /// `x [m, k] @ w [k, n]` with `w` cast to `x`'s dtype first: a linear layer's product, or a
    /// tied head's logits (`w` the embeddings' transposed view). Differentiable on `Autodiff`
    /// (one tracked operation whose backward is [`Self::linear_matmul_bwd`]). The CPU backend
    /// overrides it: one row of f32, many f32 rows on a CPU with AVX-512
    /// ([`cpu_matmul::f32_panels`]), or a bf16 weight under f32 rows, take [`cpu_matmul`]; bf16
    /// rows take [`cpu_bf16`] where the CPU has AVX512-BF16.
    fn linear_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        plain_linear_matmul::<Self>(x, w)
    }

    /// `x` in `dtype` (a float dtype): Burn's cast; the CPU backend converts f32 and bf16 on
    /// every core (flex's cast goes through f64 on one). Differentiable on `Autodiff` (the
    /// gradient is cast back to `x`'s dtype).
    fn cast(x: FloatTensor<Self>, dtype: DType) -> FloatTensor<Self> {
        Self::float_cast(x, dtype.into())
    }

    /// Backward of [`Self::linear_matmul`] for `grad` (`[m, n]`, in `x`'s dtype): `x`'s gradient
    /// `grad @ w^T` (`w` cast to `x`'s dtype first, as the forward) in `x`'s dtype and `w`'s
    /// `x^T @ grad` computed in `x`'s dtype and given in `w`'s: the gradients Burn's autodiff
    /// gives for the cast and the product. The CPU backend overrides it: in f32 the input's
    /// gradient is [`Self::linear_matmul`] of `w`'s transpose, in bf16 both are [`cpu_bf16`]'s.
    fn linear_matmul_bwd(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        want: Want,
    ) -> (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>) {
        plain_linear_matmul_bwd::<Self>(x, w, grad, want)
    }

    /// SwiGLU's `silu(gate) * up` for `gate` and `up` of one shape (entry point; differentiable
    /// on `Autodiff`, which keeps `gate` and `up` only), in their dtype. The default is Burn's `silu` and product; the CPU backend
    /// overrides it ([`cpu_swiglu`]).
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        plain_swiglu::<Self>(gate, up)
    }

    /// Backward of [`Self::swiglu`]: the gradients of `gate` and `up` for the output gradient
    /// `grad`. The default is the gradients Burn's autodiff gives for its `silu` and product.
    fn swiglu_bwd(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        plain_swiglu_bwd::<Self>(gate, up, grad)
    }

    /// Whether [`Self::dequantize_blocks`] runs on the device for `layout`'s type (a kernel), not
    /// through the host.
    fn dequantizes_on_device(_layout: QuantLayout) -> bool {
        false
    }

    /// The f32 values `[rows, cols]` of a quantised weight's blocks `words [rows, row_words]`
    /// ([`qweight`]); not differentiable (the weight is frozen). The default dequantises on the
    /// host; cubecl backends run a kernel.
    fn dequantize_blocks(words: IntTensor<Self>, layout: QuantLayout) -> FloatTensor<Self> {
        qweight::dequantize_on_host::<Self>(words, layout)
    }

    /// `x [N, cols] W^T` for a quantised `W [rows, cols]` (entry point; differentiable in `x`
    /// on `Autodiff`): `[N, rows]` in `x`'s dtype.
    fn quant_matmul(x: FloatTensor<Self>, words: IntTensor<Self>, layout: QuantLayout) -> FloatTensor<Self> {
        qweight::matmul_fwd::<Self>(x, words, layout)
    }

    /// Backward of [`Self::quant_matmul`]: `grad [N, rows] W`, in `grad`'s dtype.
    fn quant_matmul_bwd(grad: FloatTensor<Self>, words: IntTensor<Self>, layout: QuantLayout) -> FloatTensor<Self> {
        qweight::matmul_bwd::<Self>(grad, words, layout)
    }

    /// [`Self::linear_logprobs`] with a quantised head (entry point; differentiable in `hidden`
    /// on `Autodiff`).
    fn quant_linear_logprobs(
        hidden: FloatTensor<Self>,
        words: IntTensor<Self>,
        layout: QuantLayout,
        targets: IntTensor<Self>,
        chunks: Chunks,
    ) -> FloatTensor<Self> {
        Self::quant_linear_logprobs_fwd(hidden, words, layout, targets, chunks).0
    }

    /// Forward of [`Self::quant_linear_logprobs`]: `(logp [N], stats [2, N])`.
    fn quant_linear_logprobs_fwd(
        hidden: FloatTensor<Self>,
        words: IntTensor<Self>,
        layout: QuantLayout,
        targets: IntTensor<Self>,
        chunks: Chunks,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        qweight::logprobs_fwd::<Self>(&Self::row_ops(), hidden, (words, layout), targets, chunks)
    }

    /// Backward of [`Self::quant_linear_logprobs`]: the hidden states' gradient.
    #[allow(clippy::too_many_arguments)]
    fn quant_linear_logprobs_bwd(
        hidden: FloatTensor<Self>,
        words: IntTensor<Self>,
        layout: QuantLayout,
        targets: IntTensor<Self>,
        stats: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        chunks: Chunks,
    ) -> FloatTensor<Self> {
        qweight::logprobs_bwd::<Self>(&Self::row_ops(), hidden, (words, layout), targets, stats, grad, chunks)
    }

    /// `tensor[ids[i]] += rows[i]` for `tensor [V, H]`, `ids [N]`, `rows [N, H]`, in the order
    /// of `ids`: Burn's `select_assign` with `Add`, which writes in place where the backend can.
    /// Not differentiable (it is for gradient buffers).
    fn add_rows(tensor: FloatTensor<Self>, ids: IntTensor<Self>, rows: FloatTensor<Self>) -> FloatTensor<Self> {
        select_add_rows::<Self>(tensor, ids, rows)
    }

    /// `tensor[r0..r0 + R] = rows` for `tensor [V, H]` and `rows [R, H]`: Burn's `slice_assign`,
    /// which writes in place where the backend can. Not differentiable (it is for gradient
    /// buffers: [`linear_logprobs`]' backward writes each vocabulary chunk of the weight's
    /// gradient with it).
    fn write_rows(tensor: FloatTensor<Self>, r0: usize, rows: FloatTensor<Self>) -> FloatTensor<Self> {
        slice_write_rows::<Self>(tensor, r0, rows)
    }

    /// `tensor[r0..r0 + R, .., c0..c0 + T, ..] = block` for `tensor [B, H, C, D]` and `block [R,
    /// H, T, D]`: Burn's `slice_assign`, in place where the backend can (a KV cache's new
    /// columns: a decoding step writes its own keys and values, not the whole cache; a new
    /// prompt's prefill, the row it takes). Not differentiable.
    fn write_block(tensor: FloatTensor<Self>, r0: usize, c0: usize, block: FloatTensor<Self>) -> FloatTensor<Self> {
        slice_write_block::<Self>(tensor, r0, c0, block)
    }
}

fn slice_write_block<B: Backend>(
    tensor: FloatTensor<B>,
    r0: usize,
    c0: usize,
    block: FloatTensor<B>,
) -> FloatTensor<B> {
    let block = float::<B, 4>(block);
    let [r, h, t, d] = block.dims();
    prim(float::<B, 4>(tensor).slice_assign([r0..r0 + r, 0..h, c0..c0 + t, 0..d], block))
}

/// [`LogProbBackend::write_block`] on tensors: `tensor [B, H, C, D]` with `block [R, H, T, D]`
/// written at rows `r0..r0 + R` and columns `c0..c0 + T`.
pub fn write_block<B: LogProbBackend>(tensor: Tensor<B, 4>, r0: usize, c0: usize, block: Tensor<B, 4>) -> Tensor<B, 4> {
    float(B::write_block(prim(tensor), r0, c0, prim(block)))
}

fn slice_write_rows<B: Backend>(tensor: FloatTensor<B>, r0: usize, rows: FloatTensor<B>) -> FloatTensor<B> {
    let rows = float::<B, 2>(rows);
    let [r, h] = rows.dims();
    prim(float::<B, 2>(tensor).slice_assign([r0..r0 + r, 0..h], rows))
}

fn select_add_rows<B: Backend>(tensor: FloatTensor<B>, ids: IntTensor<B>, rows: FloatTensor<B>) -> FloatTensor<B> {
    prim(float::<B, 2>(tensor).select_assign(0, int::<B, 1>(ids), float(rows), IndexingUpdateOp::Add))
}

/// Which gradients a backward pass must produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Want {
    /// The hidden states' gradient.
    pub hidden: bool,
    /// The weight's gradient.
    pub weight: bool,
}

/// The four steps on backend primitives, with the per-row work done by `ops`.
mod with_ops {
    use super::{Chunks, FloatTensor, IntTensor, Want, float, int, prim};
    use crate::reference::{self, RowOps};
    use burn::tensor::backend::Backend;

    pub fn token_fwd<B: Backend>(
        ops: &impl RowOps<B>,
        logits: FloatTensor<B>,
        targets: IntTensor<B>,
    ) -> (FloatTensor<B>, FloatTensor<B>) {
        let (logp, stats) = reference::token_fwd::<B>(ops, float(logits), int(targets));
        (prim(logp), prim(stats))
    }

    pub fn token_bwd<B: Backend>(
        ops: &impl RowOps<B>,
        logits: FloatTensor<B>,
        targets: IntTensor<B>,
        stats: FloatTensor<B>,
        grad: FloatTensor<B>,
    ) -> FloatTensor<B> {
        prim(reference::token_bwd::<B>(ops, float(logits), int(targets), float(stats), float(grad)))
    }

    pub fn linear_fwd<B: crate::LogProbBackend>(
        ops: &impl RowOps<B>,
        hidden: FloatTensor<B>,
        weight: FloatTensor<B>,
        targets: IntTensor<B>,
        chunks: Chunks,
    ) -> (FloatTensor<B>, FloatTensor<B>) {
        let (logp, stats) = reference::linear_fwd::<B>(ops, float(hidden), float(weight), int(targets), chunks);
        (prim(logp), prim(stats))
    }

    pub fn linear_bwd<B: crate::LogProbBackend>(
        ops: &impl RowOps<B>,
        (hidden, weight, targets): (FloatTensor<B>, FloatTensor<B>, IntTensor<B>),
        stats: FloatTensor<B>,
        grad: FloatTensor<B>,
        chunks: Chunks,
        want: Want,
    ) -> (Option<FloatTensor<B>>, Option<FloatTensor<B>>) {
        let inputs = (float(hidden), float(weight), int(targets));
        let (dh, dw) = reference::linear_bwd::<B>(ops, inputs, float(stats), float(grad), chunks, want);
        (dh.map(prim), dw.map(prim))
    }
}

fn float<B: Backend, const D: usize>(p: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

fn int<B: Backend, const D: usize>(p: IntTensor<B>) -> Tensor<B, D, Int> {
    Tensor::from_primitive(p)
}

fn prim<B: Backend, const D: usize>(t: Tensor<B, D>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// A tensor gemm can read where it lies (strides of at least 0, the last 1), else a copy that can.
fn readable(x: burn_flex::FlexTensor) -> burn_flex::FlexTensor {
    let s = x.layout().strides();
    if s.iter().all(|&s| s >= 0) && s.last() == Some(&1) { x } else { x.to_contiguous() }
}

/// A 2-D f32 or bf16 tensor as the bf16 kernel's operand (`None`: another rank or dtype, or a
/// negative stride).
fn flex_matrix<T: burn::tensor::Element + bytemuck::Pod>(x: &burn_flex::FlexTensor) -> Option<cpu_bf16::View<'_, T>> {
    let (shape, strides) = (x.layout().shape(), x.layout().strides());
    if shape.num_dims() != 2 || strides.iter().any(|&s| s < 0) || x.dtype() != T::dtype() {
        return None;
    }
    let view = cpu_bf16::View {
        data: &x.storage::<T>()[x.layout().start_offset()..],
        rows: shape[0],
        cols: shape[1],
        row_stride: strides[0] as usize,
        col_stride: strides[1] as usize,
    };
    view.fits().then_some(view)
}

/// `a @ b` through [`cpu_bf16`] (each operand transposed first where its flag says so), as `out`
/// (bf16, or f32 holding each sum's bf16 rounding); `None` where the operands are not 2-D f32 or
/// bf16 matrices whose inner sizes agree.
fn bf16_product(
    a: (&burn_flex::FlexTensor, bool),
    b: (&burn_flex::FlexTensor, bool),
    out: DType,
) -> Option<burn_flex::FlexTensor> {
    use half::bf16;
    fn go<A: cpu_bf16::Elem, B: cpu_bf16::Elem>(
        a: cpu_bf16::View<'_, A>,
        b: cpu_bf16::View<'_, B>,
        out: DType,
    ) -> Option<burn_flex::FlexTensor> {
        if a.cols != b.rows {
            return None;
        }
        let shape = [a.rows, b.cols];
        let data = match out {
            DType::BF16 => burn::tensor::TensorData::new(cpu_bf16::matmul::<A, B, bf16>(a, b), shape),
            DType::F32 => {
                let rounded: Vec<bf16> = cpu_bf16::matmul(a, b);
                burn::tensor::TensorData::new(rounded.into_iter().map(f32::from).collect::<Vec<f32>>(), shape)
            }
            _ => return None,
        };
        Some(burn_flex::FlexTensor::from_data(data))
    }
    fn with_a<A: cpu_bf16::Elem>(
        a: cpu_bf16::View<'_, A>,
        (b, tb): (&burn_flex::FlexTensor, bool),
        out: DType,
    ) -> Option<burn_flex::FlexTensor> {
        match b.dtype() {
            DType::BF16 => go(a, flex_matrix::<bf16>(b)?.t_if(tb), out),
            DType::F32 => go(a, flex_matrix::<f32>(b)?.t_if(tb), out),
            _ => None,
        }
    }
    let (a, ta) = a;
    match a.dtype() {
        DType::BF16 => with_a(flex_matrix::<bf16>(a)?.t_if(ta), b, out),
        DType::F32 => with_a(flex_matrix::<f32>(a)?.t_if(ta), b, out),
        _ => None,
    }
}

/// Elements per task of the conversions below.
const CONVERT_CHUNK: usize = 1 << 15;

/// A bf16 tensor as an f32 one (exact), on every core ([`convert`]); other dtypes as they are.
fn widen_bf16(x: burn_flex::FlexTensor) -> burn_flex::FlexTensor {
    if x.dtype() != DType::BF16 { x } else { convert(x, widen_chunk) }
}

/// An f32 tensor rounded to bf16 (to nearest, ties to even), on every core ([`convert`]); other
/// dtypes as they are.
fn narrow_to_bf16(x: burn_flex::FlexTensor) -> burn_flex::FlexTensor {
    if x.dtype() != DType::F32 { x } else { convert(x, narrow_chunk) }
}

/// `x`'s values (of type `S`) converted by `chunk` into a tensor of `D`, a [`CONVERT_CHUNK`] of
/// them per task: contiguous, or where `x` is a view whose values fill the memory it spans (a
/// permutation of a contiguous tensor: attention's `q`, `k` and `v`), that memory converted in
/// order and viewed as `x` is (flex's copy of a permuted view goes element by element).
fn convert<S, D>(x: burn_flex::FlexTensor, chunk: fn(&[S], &mut [D])) -> burn_flex::FlexTensor
where
    S: burn::tensor::Element + bytemuck::Pod + Sync,
    D: burn::tensor::Element + bytemuck::Pod + Send,
{
    use rayon::prelude::*;
    let (shape, strides) = (x.layout().shape().clone(), x.layout().strides().to_vec());
    let n = shape.num_elements();
    let span = strides
        .iter()
        .zip(shape.iter())
        .try_fold(1usize, |span, (&s, &d)| span.checked_add(usize::try_from(s).ok()?.checked_mul(d.checked_sub(1)?)?));
    if n > 0 && span == Some(n) && !x.is_contiguous() {
        let src = &x.storage::<S>()[x.layout().start_offset()..][..n];
        let mut values = vec![D::zeroed(); n];
        values.par_chunks_mut(CONVERT_CHUNK).zip(src.par_chunks(CONVERT_CHUNK)).for_each(|(out, src)| chunk(src, out));
        let block = burn_flex::FlexTensor::from_data(burn::tensor::TensorData::new(values, [n]));
        return block.with_layout(burn_flex::Layout::new(shape, strides, 0));
    }
    let x = x.to_contiguous();
    let shape = x.layout().shape().clone();
    let src = &x.storage::<S>()[x.layout().start_offset()..][..shape.num_elements()];
    let mut values = vec![D::zeroed(); src.len()];
    values.par_chunks_mut(CONVERT_CHUNK).zip(src.par_chunks(CONVERT_CHUNK)).for_each(|(out, src)| chunk(src, out));
    burn_flex::FlexTensor::from_data(burn::tensor::TensorData::new(values, shape))
}

/// bf16 values as f32 (exact; a function of its own: profiles name it).
#[inline(never)]
fn widen_chunk(src: &[half::bf16], out: &mut [f32]) {
    for (o, s) in out.iter_mut().zip(src) {
        *o = f32::from_bits(u32::from(s.to_bits()) << 16);
    }
}

/// f32 values rounded to bf16 (`cpu_bf16`'s branch-free rounding, `half`'s results).
#[inline(never)]
fn narrow_chunk(src: &[f32], out: &mut [half::bf16]) {
    use cpu_bf16::Elem;
    for (o, s) in out.iter_mut().zip(src) {
        *o = half::bf16::from_bits(s.bf16_bits());
    }
}

/// An f32 tensor's values from its first element on, with its strides (4-D).
fn flex_view(x: &burn_flex::FlexTensor) -> cpu_attention::View<'_> {
    cpu_attention::View { data: flex_values(x), strides: std::array::from_fn(|i| x.layout().strides()[i] as usize) }
}

/// An f32 tensor's values from its first element on (all of them, in order, for a contiguous one).
fn flex_values(x: &burn_flex::FlexTensor) -> &[f32] {
    &x.storage::<f32>()[x.layout().start_offset()..]
}

/// The shapes of an attention the CPU kernel takes: f32 `q [batch, seq, heads, dim]`, `k`, `v
/// [batch, kv_heads, keys, dim]`, `key_bias [batch, keys]`, heads a multiple of kv_heads and at
/// least `past + seq` keys.
fn cpu_attention_dims(
    q: &burn_flex::FlexTensor,
    k: &burn_flex::FlexTensor,
    v: &burn_flex::FlexTensor,
    key_bias: &burn_flex::FlexTensor,
    mask: &AttentionMask,
) -> Option<cpu_attention::Dims> {
    if [q, k, v, key_bias].iter().any(|x| x.dtype() != DType::F32) {
        return None;
    }
    let (qs, ks, vs, bs) = (q.layout().shape(), k.layout().shape(), v.layout().shape(), key_bias.layout().shape());
    if qs.num_dims() != 4 || ks.num_dims() != 4 || vs.num_dims() != 4 || bs.num_dims() != 2 {
        return None;
    }
    let dims = cpu_attention::Dims { batch: qs[0], seq: qs[1], heads: qs[2], kv_heads: ks[1], keys: ks[2], dim: qs[3] };
    let agree = ks[0] == dims.batch && ks[3] == dims.dim && (0..4).all(|i| vs[i] == ks[i]);
    let agree = agree && bs[0] == dims.batch && bs[1] == dims.keys && dims.kv_heads > 0;
    let agree = agree && dims.heads.is_multiple_of(dims.kv_heads) && dims.keys >= mask.past + dims.seq;
    // A window of 0 hides every key (the tiles make such rows uniform; the kernel's tiles would
    // be empty), and no heads is no work: both to the tiles.
    let agree = agree && dims.heads > 0 && mask.window != Some(0);
    agree.then_some(dims)
}

impl LogProbBackend for burn::backend::Flex {
    fn host_shards(_device: &Self::Device) -> usize {
        rayon::current_num_threads()
    }

    /// On a thread of rayon's global pool (flex's), at once where this is one.
    fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
        rayon::scope(|_| f())
    }

    fn row_ops() -> impl reference::RowOps<Self> {
        cpu_rows::CpuRows
    }

    fn mixes_bf16_weights() -> bool {
        true
    }

    /// fuserl's kernel ([`cpu_matmul`]) for an f32 `x` and a 2-D f32 or bf16 weight laid out as
    /// `[k, n]` or as the transpose of `[n, k]`, when `x` has at most [`cpu_matmul::F32_ROWS`]
    /// rows (a batch-1 decoding step: the weights stream from memory), at least
    /// [`cpu_matmul::F32_PANEL_ROWS`] under a weight of at least 64 by 64 on a CPU with its
    /// register kernel (a prompt, a training step: [`cpu_matmul::f32_panels`]), or the weight is
    /// bf16 (widened in chunks rather than cast whole); flex's matmul otherwise. A bf16 `x` of at
    /// most [`cpu_matmul::STREAM_ROWS`] rows under a bf16 weight is widened for that kernel; other
    /// bf16 `x` take [`cpu_bf16`] where the CPU has AVX512-BF16 (an f32 weight rounded as it is
    /// packed: a decoding step of bf16 rows under f32 weights packs every weight, which the
    /// generation plan does not count: frozen models in bf16 keep bf16 weights), flex's bf16
    /// matmul elsewhere.
    fn linear_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        use cpu_matmul::WeightLayout;
        let few_rows = x.layout().shape().num_dims() == 2 && x.layout().shape()[0] <= cpu_matmul::STREAM_ROWS;
        if x.dtype() == DType::BF16 && w.dtype() == DType::BF16 && few_rows {
            // A bf16 decoding step: the few rows widened (exact), the weight streamed as it is
            // (below), the result rounded to bf16: flex's product of bf16 tensors, without
            // widening the weight or packing it.
            return narrow_to_bf16(Self::linear_matmul(widen_bf16(x), w));
        }
        if x.dtype() == DType::BF16 && matches!(w.dtype(), DType::F32 | DType::BF16) && cpu_bf16::available() {
            // bf16 compute: fuserl's AVX512-BF16 product (an f32 weight rounded as it is packed).
            if let Some(y) = bf16_product((&x, false), (&w, false), DType::BF16) {
                return y;
            }
        }
        let (xs, ws) = (x.layout().shape().clone(), w.layout().shape().clone());
        let two_d = xs.num_dims() == 2 && ws.num_dims() == 2 && xs[1] == ws[0];
        let layout = match w.layout().strides() {
            [s, 1] if two_d && *s as usize == ws[1] => Some(WeightLayout::InOut),
            [1, s] if two_d && *s as usize == ws[0] => Some(WeightLayout::OutIn),
            _ => None,
        };
        let dtypes = x.dtype() == DType::F32 && matches!(w.dtype(), DType::F32 | DType::BF16);
        let (m, k) = if two_d { (xs[0], xs[1]) } else { (0, 0) };
        let worth = w.dtype() == DType::BF16 || m <= cpu_matmul::F32_ROWS || cpu_matmul::f32_panels(m, k, ws[1]);
        let Some(layout) = layout.filter(|_| dtypes && worth) else {
            return plain_linear_matmul::<Self>(x, w);
        };
        let n = ws[1];
        let x = x.to_contiguous();
        let xv = &x.storage::<f32>()[x.layout().start_offset()..][..m * k];
        let start = w.layout().start_offset();
        let y = match w.dtype() {
            DType::BF16 => cpu_matmul::matmul(xv, &w.storage::<half::bf16>()[start..start + k * n], (m, k, n), layout),
            _ => cpu_matmul::matmul(xv, &w.storage::<f32>()[start..start + k * n], (m, k, n), layout),
        };
        burn_flex::FlexTensor::from_data(burn::tensor::TensorData::new(y, [m, n]))
    }

    /// f32 to bf16 and back on every core ([`widen_bf16`], [`narrow_to_bf16`]), flex's cast
    /// for other dtypes.
    fn cast(x: FloatTensor<Self>, dtype: DType) -> FloatTensor<Self> {
        match (x.dtype(), dtype) {
            (DType::F32, DType::BF16) => narrow_to_bf16(x),
            (DType::BF16, DType::F32) => widen_bf16(x),
            (from, to) if from == to => x,
            _ => <Self as burn::tensor::ops::FloatTensorOps<Self>>::float_cast(x, dtype.into()),
        }
    }

    /// For f32, the input's gradient through [`Self::linear_matmul`]; for a bf16 `grad`, fuserl's
    /// kernel ([`cpu_bf16`]) where the CPU has AVX512-BF16; Burn's ops otherwise.
    fn linear_matmul_bwd(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        want: Want,
    ) -> (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>) {
        let bf16 =
            [&x, &grad].iter().all(|t| t.dtype() == DType::BF16) && matches!(w.dtype(), DType::F32 | DType::BF16);
        if [&x, &w, &grad].iter().all(|t| t.dtype() == DType::F32) {
            // The input's gradient `grad @ w^T` is a linear layer's product too, of `w`'s
            // transpose (fuserl's kernel where `linear_matmul` takes it); the weight's,
            // `x^T @ grad`, flex's matmul.
            let dx = want.hidden.then(|| {
                Self::linear_matmul(grad.clone(), float::<Self, 2>(w.clone()).transpose().into_primitive().tensor())
            });
            let (_, dw) = plain_linear_matmul_bwd::<Self>(x, w, grad, Want { hidden: false, ..want });
            return (dx, dw);
        }
        if bf16 && cpu_bf16::available() {
            // `grad @ w^T` and `x^T @ grad`, rounded to bf16 as Burn's product of bf16 tensors is
            // (then widened to `w`'s dtype, as the cast's gradient is).
            let dx = want.hidden.then(|| bf16_product((&grad, false), (&w, true), DType::BF16));
            let dw = want.weight.then(|| bf16_product((&x, true), (&grad, false), w.dtype()));
            if dx.iter().chain(&dw).all(Option::is_some) {
                return (dx.flatten(), dw.flatten());
            }
        }
        plain_linear_matmul_bwd::<Self>(x, w, grad, want)
    }

    /// [`cpu_swiglu`] for f32 or bf16 `gate` and `up` of one shape, Burn's ops otherwise.
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        match swiglu_dtype(&[&gate, &up]) {
            Some(DType::F32) => flex_swiglu::<f32>(gate, up),
            Some(DType::BF16) => flex_swiglu::<half::bf16>(gate, up),
            _ => plain_swiglu::<Self>(gate, up),
        }
    }

    /// As [`Self::swiglu`].
    fn swiglu_bwd(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        match swiglu_dtype(&[&gate, &up, &grad]) {
            Some(DType::F32) => flex_swiglu_bwd::<f32>(gate, up, grad),
            Some(DType::BF16) => flex_swiglu_bwd::<half::bf16>(gate, up, grad),
            _ => plain_swiglu_bwd::<Self>(gate, up, grad),
        }
    }

    /// fuserl's kernel ([`cpu_attention`]) for f32 inputs: one pass per head and tile of query
    /// rows, with a vectorised softmax and no products for keys the mask hides from a whole
    /// tile; the tiles of Burn operations otherwise (other dtypes, and shapes that do not agree,
    /// which those report).
    fn causal_attention_fwd(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        mask: AttentionMask,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if [&q, &k, &v].iter().all(|x| x.dtype() == DType::BF16) && key_bias.dtype() == DType::F32 {
            // bf16 compute: the kernel in f32 on the widened inputs (exact), the output rounded
            // to bf16, as PyTorch's CPU attention does under bf16 autocast (f32 inside).
            let (out, stats) = Self::causal_attention_fwd(widen_bf16(q), widen_bf16(k), widen_bf16(v), key_bias, mask);
            return (narrow_to_bf16(out), stats);
        }
        let Some(dims) = cpu_attention_dims(&q, &k, &v, &key_bias, &mask) else {
            return tiled_attention_fwd::<Self>(q, k, v, key_bias, &mask);
        };
        let (q, k, v, key_bias) = (readable(q), readable(k), readable(v), key_bias.to_contiguous());
        let mask = cpu_attention::Mask { past: mask.past, window: mask.window, key_bias: flex_values(&key_bias) };
        let (out, stats) = cpu_attention::forward((flex_view(&q), flex_view(&k), flex_view(&v)), mask, dims);
        let cpu_attention::Dims { batch: b, seq: t, heads: nh, dim: d, .. } = dims;
        (
            burn_flex::FlexTensor::from_data(burn::tensor::TensorData::new(out, [b, t, nh, d])),
            burn_flex::FlexTensor::from_data(burn::tensor::TensorData::new(stats, [2, b, nh, t])),
        )
    }

    /// fuserl's kernel ([`cpu_attention::backward`]) for f32 inputs, as the forward.
    fn causal_attention_bwd(
        (q, k, v): (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>),
        key_bias: FloatTensor<Self>,
        out: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        mask: AttentionMask,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        if [&q, &k, &v, &out, &grad].iter().all(|x| x.dtype() == DType::BF16) && key_bias.dtype() == DType::F32 {
            // As the forward: in f32 on the widened values, the gradients rounded to bf16.
            let qkv = (widen_bf16(q), widen_bf16(k), widen_bf16(v));
            let (dq, dk, dv) =
                Self::causal_attention_bwd(qkv, key_bias, widen_bf16(out), stats, widen_bf16(grad), mask);
            return (narrow_to_bf16(dq), narrow_to_bf16(dk), narrow_to_bf16(dv));
        }
        let dims = cpu_attention_dims(&q, &k, &v, &key_bias, &mask);
        let [t_dims, o_dims, g_dims] = [&q, &out, &grad].map(|x| x.layout().shape().clone());
        let same =
            o_dims == t_dims && g_dims == t_dims && [&out, &grad, &stats].iter().all(|x| x.dtype() == DType::F32);
        let ss = stats.layout().shape();
        let stats_fit = |d: &cpu_attention::Dims| {
            ss.num_dims() == 4 && [2, d.batch, d.heads, d.seq] == [ss[0], ss[1], ss[2], ss[3]]
        };
        let Some(dims) = dims.filter(|d| same && stats_fit(d)) else {
            return tiled_attention_bwd::<Self>((q, k, v), key_bias, out, stats, grad, &mask);
        };
        let (q, k, v, out, grad) = (readable(q), readable(k), readable(v), readable(out), readable(grad));
        let (key_bias, stats) = (key_bias.to_contiguous(), stats.to_contiguous());
        let mask = cpu_attention::Mask { past: mask.past, window: mask.window, key_bias: flex_values(&key_bias) };
        let (dq, dk, dv) = cpu_attention::backward(
            (flex_view(&q), flex_view(&k), flex_view(&v)),
            (flex_view(&out), flex_view(&grad)),
            flex_values(&stats),
            mask,
            dims,
        );
        let cpu_attention::Dims { batch: b, seq: t, heads: nh, kv_heads: nkv, keys, dim: d } = dims;
        let tensor = |x, shape: [usize; 4]| burn_flex::FlexTensor::from_data(burn::tensor::TensorData::new(x, shape));
        (tensor(dq, [b, t, nh, d]), tensor(dk, [b, nkv, keys, d]), tensor(dv, [b, nkv, keys, d]))
    }

    /// In place when nothing else holds `tensor` (flex's `select_assign` copies it first: the
    /// whole embeddings' gradient, for a few hundred rows).
    fn add_rows(tensor: FloatTensor<Self>, ids: IntTensor<Self>, rows: FloatTensor<Self>) -> FloatTensor<Self> {
        let (dims, rows_dims) = (tensor.layout().shape().clone(), rows.layout().shape().clone());
        let f32s = tensor.dtype() == DType::F32 && rows.dtype() == DType::F32;
        let shapes = dims.num_dims() == 2 && rows_dims.num_dims() == 2 && rows_dims[1] == dims[1];
        let shapes = shapes && ids.layout().shape().num_elements() == rows_dims[0];
        // Anything else goes to Burn's op, which checks and reports the shapes.
        if !f32s || !shapes || !matches!(ids.dtype(), DType::I32 | DType::I64) {
            return select_add_rows::<Self>(tensor, ids, rows);
        }
        let h = dims[1];
        // `to_contiguous` gives a buffer that is exactly the tensor (a copy for a view).
        let ids = ids.to_contiguous();
        let ids: Vec<i64> = match ids.dtype() {
            DType::I32 => ids.storage::<i32>().iter().map(|&i| i64::from(i)).collect(),
            _ => ids.storage::<i64>().to_vec(),
        };
        let rows = rows.to_contiguous();
        let src = rows.storage::<f32>();
        let mut out = tensor.to_contiguous();
        drop(tensor); // so that `storage_mut` copies only when the caller still holds the buffer
        let dst = out.storage_mut::<f32>();
        for (i, &id) in ids.iter().enumerate() {
            let row = usize::try_from(id).ok().filter(|&r| r < dims[0]);
            let row = row.unwrap_or_else(|| panic!("add_rows: row {id} is outside 0..{}", dims[0]));
            for (d, s) in dst[row * h..(row + 1) * h].iter_mut().zip(&src[i * h..(i + 1) * h]) {
                *d += *s;
            }
        }
        out
    }

    /// In place when nothing else holds `tensor` (flex's `slice_assign` copies the whole buffer
    /// for every call, even when it holds the only reference: 75 copies of the LM head's
    /// gradient, 334 MiB each, for Qwen2.5's vocabulary).
    fn write_rows(tensor: FloatTensor<Self>, r0: usize, rows: FloatTensor<Self>) -> FloatTensor<Self> {
        let (dims, rows_dims) = (tensor.layout().shape().clone(), rows.layout().shape().clone());
        let f32s = tensor.dtype() == DType::F32 && rows.dtype() == DType::F32;
        let shapes = dims.num_dims() == 2 && rows_dims.num_dims() == 2 && rows_dims[1] == dims[1];
        // Anything else goes to Burn's op, which checks and reports the shapes.
        if !f32s || !shapes || r0 + rows_dims[0] > dims[0] {
            return slice_write_rows::<Self>(tensor, r0, rows);
        }
        let h = dims[1];
        let rows = rows.to_contiguous();
        let src = rows.storage::<f32>();
        let mut out = tensor.to_contiguous();
        drop(tensor); // so that `storage_mut` copies only when the caller still holds the buffer
        out.storage_mut::<f32>()[r0 * h..r0 * h + src.len()].copy_from_slice(src);
        out
    }

    /// In place when nothing else holds `tensor` (flex's `slice_assign` copies the whole buffer
    /// first: the whole KV cache, for one column).
    fn write_block(tensor: FloatTensor<Self>, r0: usize, c0: usize, block: FloatTensor<Self>) -> FloatTensor<Self> {
        let (dims, block_dims) = (tensor.layout().shape().clone(), block.layout().shape().clone());
        let same = tensor.dtype() == block.dtype() && matches!(tensor.dtype(), DType::F32 | DType::BF16 | DType::F16);
        let shapes = dims.num_dims() == 4 && block_dims.num_dims() == 4;
        let shapes = shapes
            && dims[1] == block_dims[1]
            && dims[3] == block_dims[3]
            && r0 + block_dims[0] <= dims[0]
            && c0 + block_dims[2] <= dims[2];
        // Anything else goes to Burn's op, which checks and reports the shapes.
        if !same || !shapes {
            return slice_write_block::<Self>(tensor, r0, c0, block);
        }
        match tensor.dtype() {
            DType::F32 => write_block_of::<f32>(tensor, r0, c0, block),
            DType::BF16 => write_block_of::<half::bf16>(tensor, r0, c0, block),
            _ => write_block_of::<half::f16>(tensor, r0, c0, block),
        }
    }
}

/// [`LogProbBackend::write_block`] on the CPU for values of type `E` (shapes checked).
fn write_block_of<E: burn::tensor::Element + bytemuck::Pod>(
    tensor: burn_flex::FlexTensor,
    r0: usize,
    c0: usize,
    block: burn_flex::FlexTensor,
) -> burn_flex::FlexTensor {
    let [_, h, c, d] = std::array::from_fn(|i| tensor.layout().shape()[i]);
    let (r, t) = (block.layout().shape()[0], block.layout().shape()[2]);
    let block = block.to_contiguous();
    // The block's own values (a contiguous view may lie inside a longer buffer).
    let src = &block.storage::<E>()[block.layout().start_offset()..][..r * h * t * d];
    let mut out = tensor.to_contiguous();
    drop(tensor); // so that `storage_mut` copies only when the caller still holds the buffer
    let start = out.layout().start_offset();
    let dst = &mut out.storage_mut::<E>()[start..];
    if t * d > 0 {
        // Block row i (of `[R * H]`) lands in the buffer's row `r0 * H + i`.
        for (i, part) in src.chunks_exact(t * d).enumerate() {
            let at = ((r0 * h + i) * c + c0) * d;
            dst[at..at + t * d].copy_from_slice(part);
        }
    }
    out
}

/// The dtype [`cpu_swiglu`] takes the tensors in: all f32 or all bf16, of one shape.
fn swiglu_dtype(xs: &[&burn_flex::FlexTensor]) -> Option<DType> {
    let (dtype, shape) = (xs[0].dtype(), xs[0].layout().shape());
    let same = xs.iter().all(|x| x.dtype() == dtype && x.layout().shape() == shape);
    (same && matches!(dtype, DType::F32 | DType::BF16)).then_some(dtype)
}

/// A contiguous tensor's values in order.
fn flex_slice<E: burn::tensor::Element + bytemuck::Pod>(x: &burn_flex::FlexTensor) -> &[E] {
    &x.storage::<E>()[x.layout().start_offset()..][..x.layout().shape().num_elements()]
}

/// [`LogProbBackend::swiglu`] on the CPU for values of type `E` (dtypes and shapes checked).
fn flex_swiglu<E>(gate: burn_flex::FlexTensor, up: burn_flex::FlexTensor) -> burn_flex::FlexTensor
where
    E: burn::tensor::Element + bytemuck::Pod + cpu_swiglu::Kernels,
{
    let shape = gate.layout().shape().clone();
    let (gate, up) = (gate.to_contiguous(), up.to_contiguous());
    let out = cpu_swiglu::forward::<E>(flex_slice(&gate), flex_slice(&up));
    burn_flex::FlexTensor::from_data(burn::tensor::TensorData::new(out, shape))
}

/// [`LogProbBackend::swiglu_bwd`] on the CPU for values of type `E` (dtypes and shapes checked).
fn flex_swiglu_bwd<E>(
    gate: burn_flex::FlexTensor,
    up: burn_flex::FlexTensor,
    grad: burn_flex::FlexTensor,
) -> (burn_flex::FlexTensor, burn_flex::FlexTensor)
where
    E: burn::tensor::Element + bytemuck::Pod + cpu_swiglu::Kernels,
{
    let shape = gate.layout().shape().clone();
    let (gate, up, grad) = (gate.to_contiguous(), up.to_contiguous(), grad.to_contiguous());
    let (dg, du) = cpu_swiglu::backward::<E>(flex_slice(&gate), flex_slice(&up), flex_slice(&grad));
    let tensor = |v: Vec<E>| burn_flex::FlexTensor::from_data(burn::tensor::TensorData::new(v, shape.clone()));
    (tensor(dg), tensor(du))
}

/// [`LogProbBackend::swiglu`] in Burn's ops: `silu(gate) * up` as `burn::tensor::activation::silu`
/// makes it.
fn plain_swiglu<B: Backend>(gate: FloatTensor<B>, up: FloatTensor<B>) -> FloatTensor<B> {
    let silu = B::float_mul(gate.clone(), B::sigmoid(gate));
    B::float_mul(silu, up)
}

/// [`LogProbBackend::swiglu_bwd`] in Burn's ops: the gradients Burn's autodiff gives for
/// [`plain_swiglu`]'s three operations.
fn plain_swiglu_bwd<B: Backend>(
    gate: FloatTensor<B>,
    up: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let s = B::sigmoid(gate.clone());
    let silu = B::float_mul(gate.clone(), s.clone());
    let dup = B::float_mul(grad.clone(), silu);
    let dsilu = B::float_mul(grad, up);
    // silu = gate * s: gate's own factor, and through the sigmoid.
    let direct = B::float_mul(dsilu.clone(), s.clone());
    let through = B::sigmoid_backward(s, B::float_mul(dsilu, gate));
    (B::float_add(direct, through), dup)
}

/// [`LogProbBackend::linear_matmul`] in Burn's ops.
fn plain_linear_matmul<B: Backend>(x: FloatTensor<B>, w: FloatTensor<B>) -> FloatTensor<B> {
    let (x, w) = (float::<B, 2>(x), float::<B, 2>(w));
    let w = if w.dtype() == x.dtype() { w } else { w.cast(x.dtype()) };
    prim(x.matmul(w))
}

/// [`LogProbBackend::linear_matmul_bwd`] in Burn's ops.
fn plain_linear_matmul_bwd<B: Backend>(
    x: FloatTensor<B>,
    w: FloatTensor<B>,
    grad: FloatTensor<B>,
    want: Want,
) -> (Option<FloatTensor<B>>, Option<FloatTensor<B>>) {
    let (x, w, grad) = (float::<B, 2>(x), float::<B, 2>(w), float::<B, 2>(grad));
    let dx = want.hidden.then(|| {
        let w = if w.dtype() == x.dtype() { w.clone() } else { w.clone().cast(x.dtype()) };
        prim(grad.clone().matmul(w.transpose()))
    });
    let dw = want.weight.then(|| {
        let dw = x.transpose().matmul(grad);
        prim(if dw.dtype() == w.dtype() { dw } else { dw.cast(w.dtype()) })
    });
    (dx, dw)
}

/// `x` in `dtype` (`x` itself when it is in it already): [`LogProbBackend::cast`], a cast on
/// every core on the CPU, differentiable.
pub fn cast<B: LogProbBackend, const D: usize>(x: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if x.dtype() == dtype { x } else { float(B::cast(prim(x), dtype)) }
}

/// `x [m, k] @ w [k, n]` in `x`'s dtype (`w` cast to it): a linear layer's product
/// ([`LogProbBackend::linear_matmul`]; on the CPU, fuserl's kernel where it pays).
pub fn linear_matmul<B: LogProbBackend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    float(B::linear_matmul(prim(x), prim(w)))
}

/// SwiGLU's `silu(gate) * up` ([`LogProbBackend::swiglu`]): differentiable, keeping `gate` and
/// `up` for the backward rather than the sigmoid and the SiLU too.
///
/// # Panics
/// When `gate` and `up` differ in shape (no broadcasting: the backward gives each gradient in the
/// output's shape).
pub fn swiglu<B: LogProbBackend, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>) -> Tensor<B, D> {
    assert_eq!(gate.dims(), up.dims(), "swiglu: gate and up differ in shape");
    let (gate, up) = (gate.into_primitive().tensor(), up.into_primitive().tensor());
    Tensor::from_primitive(TensorPrimitive::Float(B::swiglu(gate, up)))
}

/// Per-token log-probs of `targets` under `logits` (negative targets: padding, log-prob 0).
///
/// # Shapes
/// `logits: [N, V]`, `targets: [N]` -> `[N]` (f32)
pub fn token_logprobs<B: LogProbBackend>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    float(B::token_logprobs(prim(logits), targets.into_primitive()))
}

/// Causal grouped-query attention without the whole `[seq, keys]` scores (module
/// [`attention`]): tiles of query rows sized to the backend's bound
/// ([`LogProbBackend::max_attention_elems`]).
///
/// # Shapes
/// `q: [batch, seq, heads, dim]` (already scaled), `k`, `v: [batch, kv_heads, past + seq, dim]`,
/// `key_bias: [batch, past + seq]` (0, or `f32::MIN` for padding) -> `[batch, seq, heads, dim]`
pub fn causal_attention<B: LogProbBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    key_bias: Tensor<B, 2>,
    window: Option<usize>,
) -> Tensor<B, 4> {
    let [b, t, nh, _] = q.dims();
    let tk = k.dims()[2];
    let mask = AttentionMask::new(tk - t, window, (b, nh, tk), B::max_attention_elems(&q.device()));
    float(<B as LogProbBackend>::causal_attention(prim(q), prim(k), prim(v), prim(key_bias), mask))
}

/// Per-token log-probs of `targets` under the logits `hidden @ weight^T`, never held whole
/// (negative targets: padding, log-prob 0). Chunked to the backend's bound.
///
/// # Shapes
/// `hidden: [N, H]`, `weight: [V, H]`, `targets: [N]` -> `[N]` (f32)
pub fn linear_logprobs<B: LogProbBackend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> Tensor<B, 1> {
    let chunks = Chunks::plan(hidden.dims()[0], weight.dims()[0], B::max_chunk_elems(&hidden.device()));
    linear_logprobs_chunked(hidden, weight, targets, chunks)
}

/// [`linear_logprobs`] with explicit chunk sizes.
pub fn linear_logprobs_chunked<B: LogProbBackend>(
    hidden: Tensor<B, 2>,
    weight: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    chunks: Chunks,
) -> Tensor<B, 1> {
    assert_eq!(hidden.dims()[1], weight.dims()[1], "hidden size of the hidden states and of the weight");
    assert_eq!(hidden.dims()[0], targets.dims()[0], "one target per hidden state");
    assert!(chunks.rows > 0 && chunks.vocab > 0, "empty chunks");
    float(B::linear_logprobs(prim(hidden), prim(weight), targets.into_primitive(), chunks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_fit_the_bound() {
        for (n, v, max) in [(7, 100, 1 << 20), (8192, 128_256, 1 << 24), (1 << 20, 49_152, 1 << 22), (3, 5, 1)] {
            let c = Chunks::plan(n, v, max);
            assert!(c.rows >= 1 && c.rows <= n && c.vocab >= 1 && c.vocab <= v, "{c:?}");
            assert!(c.rows * c.vocab <= max.max(256), "{n} {v} {max}: {c:?}");
        }
        assert_eq!(Chunks::plan(7, 100, 1 << 20), Chunks { rows: 7, vocab: 100 });
        assert_eq!(Chunks::plan(8192, 128_256, 1 << 24).vocab, 2048);
        assert_eq!(Chunks::plan(2048, 49_152, DEFAULT_MAX_CHUNK_ELEMS), Chunks { rows: 2048, vocab: 2048 });
    }

    /// Flex's in-place `add_rows` against the sums written out on the host, with repeated rows,
    /// ids and rows that are views into larger buffers, and the tensor also held elsewhere
    /// (which must not change).
    #[test]
    fn flex_add_rows_adds_each_row_in_order() {
        use burn::backend::Flex;
        use burn::tensor::TensorData;
        let (v, h) = (5, 3);
        let base: Vec<f32> = (0..v * h).map(|i| i as f32 * 0.5).collect();
        let ids = [4i32, 1, 4, 0];
        // One row in front of each, cut off by `narrow` below (views that do not start at 0).
        let rows: Vec<f32> = (0..(ids.len() + 1) * h).map(|i| 1.0 + i as f32 * 0.25).collect();
        let mut expected = base.clone();
        for (i, &id) in ids.iter().enumerate() {
            for j in 0..h {
                expected[id as usize * h + j] += rows[(i + 1) * h + j];
            }
        }
        let device = Default::default();
        let tensor = Tensor::<Flex, 2>::from_data(TensorData::new(base.clone(), [v, h]), &device);
        let held = tensor.clone();
        let ids: Vec<i32> = [3].iter().chain(&ids).copied().collect();
        let ids = Tensor::<Flex, 1, Int>::from_data(TensorData::new(ids, [5]), &device).narrow(0, 1, 4);
        let rows = Tensor::<Flex, 2>::from_data(TensorData::new(rows, [5, h]), &device).narrow(0, 1, 4);
        let out = Flex::add_rows(prim(tensor), ids.into_primitive(), prim(rows));
        let out: Vec<f32> = float::<Flex, 2>(out).into_data().to_vec().unwrap();
        assert_eq!(out, expected);
        assert_eq!(held.into_data().to_vec::<f32>().unwrap(), base);
    }

    /// Flex's in-place `write_rows` against Burn's `slice_assign`, with rows that are a view into
    /// a larger buffer and the tensor also held elsewhere (which must not change).
    #[test]
    fn flex_write_rows_matches_slice_assign() {
        use burn::backend::Flex;
        use burn::tensor::TensorData;
        let (v, h) = (6, 3);
        let base: Vec<f32> = (0..v * h).map(|i| i as f32 * 0.5).collect();
        let rows: Vec<f32> = (0..4 * h).map(|i| 1.0 + i as f32 * 0.25).collect();
        let device = Default::default();
        let tensor = Tensor::<Flex, 2>::from_data(TensorData::new(base.clone(), [v, h]), &device);
        let held = tensor.clone();
        let rows = Tensor::<Flex, 2>::from_data(TensorData::new(rows, [4, h]), &device).narrow(0, 1, 3);
        let expected: Vec<f32> = tensor.clone().slice_assign([2..5, 0..h], rows.clone()).into_data().to_vec().unwrap();
        let out = Flex::write_rows(prim(tensor), 2, prim(rows));
        assert_eq!(float::<Flex, 2>(out).into_data().to_vec::<f32>().unwrap(), expected);
        assert_eq!(held.into_data().to_vec::<f32>().unwrap(), base);
    }

    /// Flex's `linear_matmul` (fuserl's kernel on one row or a bf16 weight, flex's matmul on the
    /// rest) against Burn's matmul of the weight cast to f32: a `[k, n]` weight, the transposed
    /// view of an `[n, k]` one (a tied head), a weight that is a view inside a larger buffer,
    /// and a strided one (which falls back).
    #[test]
    fn flex_linear_matmul_matches_burn_matmul() {
        use burn::backend::Flex;
        use burn::tensor::TensorData;
        let device = Default::default();
        let (k, n) = (37, 29);
        let values = |len: usize, seed: usize| -> Vec<f32> {
            (0..len).map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0) - 1.0).collect()
        };
        // Each weight made in its dtype first and then viewed (a cast of a view copies it).
        let make = |len: usize, seed: usize, shape: [usize; 2], dtype: DType| {
            Tensor::<Flex, 2>::from_data(TensorData::new(values(len, seed), shape), &device).cast(dtype)
        };
        for dtype in [DType::F32, DType::BF16] {
            let weights = [
                ("in-out", make(k * n, 1, [k, n], dtype)),
                ("out-in", make(n * k, 2, [n, k], dtype).transpose()),
                ("inside", make((k + 3) * n, 3, [k + 3, n], dtype).narrow(0, 2, k)),
                ("out-in inside", make((n + 2) * k, 4, [n + 2, k], dtype).narrow(0, 1, n).transpose()),
                ("strided", make(k * 2 * n, 5, [k, 2 * n], dtype).slice([0..k, 0..n])),
            ];
            for (name, w) in weights {
                for m in [0, 1, 2, 9, 40] {
                    let x = Tensor::<Flex, 2>::from_data(TensorData::new(values(m * k, 5 + m), [m, k]), &device);
                    let want: Vec<f32> = x.clone().matmul(w.clone().cast(DType::F32)).into_data().to_vec().unwrap();
                    let got = linear_matmul(x.clone(), w.clone());
                    assert_eq!(got.dims(), [m, n]);
                    let got: Vec<f32> = got.into_data().to_vec().unwrap();
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{name} {dtype:?} m {m}: [{i}] {g} != {w}");
                    }
                    // bf16 activations (bf16 compute): the product of the bf16 values (the
                    // weight rounded to bf16), rounded to bf16: within one bf16 rounding of the
                    // f32 product of the same values.
                    let xh = x.cast(DType::BF16);
                    let exact = xh.clone().cast(DType::F32).matmul(w.clone().cast(DType::BF16).cast(DType::F32));
                    let want: Vec<f32> = exact.into_data().to_vec().unwrap();
                    let got = linear_matmul(xh, w.clone());
                    assert_eq!((got.dims(), got.dtype()), ([m, n], DType::BF16));
                    let got: Vec<f32> = got.cast(DType::F32).into_data().to_vec().unwrap();
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        let tol = w.abs() / 256.0 + 1e-5;
                        assert!((g - w).abs() <= tol, "{name} {dtype:?} weight, bf16 x, m {m}: [{i}] {g} != {w}");
                    }
                }
            }
        }
    }

    /// The CPU backend's cast: f32 to bf16 rounds as `half` does (ties to even), bf16 to f32 is
    /// exact, a transposed view is read through its strides, and on `Autodiff` the gradient
    /// comes back in the input's dtype.
    #[test]
    fn flex_cast_rounds_as_half_and_its_gradient_comes_back() {
        use burn::backend::{Autodiff, Flex};
        use burn::tensor::TensorData;
        let device = Default::default();
        let values: Vec<f32> = (0..1200).map(|i| ((i as f32) * 0.37).sin() * 10f32.powi(i % 9 - 4)).collect();
        let x =
            Tensor::<Autodiff<Flex>, 2>::from_data(TensorData::new(values.clone(), [30, 40]), &device).require_grad();
        let half: Tensor<Autodiff<Flex>, 2> = cast(x.clone(), DType::BF16);
        assert_eq!(half.dtype(), DType::BF16);
        let got: Vec<half::bf16> = half.clone().into_data().to_vec().unwrap();
        for (g, v) in got.iter().zip(&values) {
            assert_eq!(*g, half::bf16::from_f32(*v), "{v:e}");
        }
        let transposed: Vec<f32> = cast(half.clone().transpose(), DType::F32).into_data().to_vec().unwrap();
        for (i, t) in transposed.iter().enumerate() {
            let (r, c) = (i % 30, i / 30);
            assert_eq!(*t, got[r * 40 + c].to_f32(), "({r}, {c})");
        }
        let grads = cast(half, DType::F32).mul_scalar(3.0).sum().backward();
        let dx = x.grad(&grads).expect("gradient");
        assert_eq!(dx.dtype(), DType::F32);
        assert!(dx.into_data().iter::<f32>().all(|g| g == 3.0));
    }

    /// `linear_matmul`'s gradients on `Autodiff<Flex>` (one tracked operation, its backward the
    /// backend's `linear_matmul_bwd`: fuserl's bf16 kernel for bf16 activations where the CPU
    /// has AVX512-BF16) against Burn's own cast and matmul on the same values: equal in f32 (within
    /// f32 rounding where fuserl's f32 kernel takes the product), within one bf16 rounding in
    /// bf16; the weight's gradient in the weight's dtype.
    #[test]
    fn linear_matmul_gradients_match_burns() {
        use burn::backend::{Autodiff, Flex};
        use burn::tensor::TensorData;
        type A = Autodiff<Flex>;
        let device = Default::default();
        let values = |len: usize, seed: usize| -> Vec<f32> {
            (0..len).map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0) - 1.0).collect()
        };
        // (70, 80, 100): f32 through fuserl's register kernel where the CPU has it (both of
        // the product's operands checked in place; gemm, below its inner block, sums the same
        // in-order chain, so its bits may well be equal).
        for (m, k, n) in [(30, 37, 45), (70, 80, 100)] {
            for (x_dtype, w_dtype) in [(DType::F32, DType::F32), (DType::BF16, DType::F32), (DType::BF16, DType::BF16)]
            {
                for transposed in [false, true] {
                    let leaf = |len, seed, shape: [usize; 2], dtype| {
                        Tensor::<A, 2>::from_data(TensorData::new(values(len, seed), shape), &device)
                            .cast(dtype)
                            .require_grad()
                    };
                    let x = leaf(m * k, 1, [m, k], x_dtype);
                    let w = if transposed { leaf(n * k, 2, [n, k], w_dtype) } else { leaf(k * n, 2, [k, n], w_dtype) };
                    let w_used = |w: Tensor<A, 2>| if transposed { w.transpose() } else { w };
                    // A loss whose gradient at the output is a fixed bf16-exact pattern.
                    let weights = Tensor::<A, 2>::from_data(TensorData::new(values(m * n, 3), [m, n]), &device)
                        .cast(DType::BF16)
                        .cast(x_dtype);
                    let grads_of = |y: Tensor<A, 2>| (y * weights.clone()).sum().backward();
                    let ours = grads_of(linear_matmul(x.clone(), w_used(w.clone())));
                    let burns = grads_of(x.clone().matmul(w_used(w.clone()).cast(x_dtype)));
                    for (what, got, want, dtype) in
                        [("x", x.grad(&ours), x.grad(&burns), x_dtype), ("w", w.grad(&ours), w.grad(&burns), w_dtype)]
                    {
                        let (got, want) = (got.expect("gradient"), want.expect("gradient"));
                        assert_eq!(got.dtype(), dtype, "{what}'s gradient dtype ({x_dtype:?} x, {w_dtype:?} w)");
                        let got: Vec<f32> = got.cast(DType::F32).into_data().to_vec().unwrap();
                        let want: Vec<f32> = want.cast(DType::F32).into_data().to_vec().unwrap();
                        for (i, (g, v)) in got.iter().zip(&want).enumerate() {
                            let tol = match x_dtype {
                                // The kernel sums in another order than gemm: within f32 rounding of
                                // k products of values below 1.
                                DType::F32 if cpu_matmul::f32_panels(m, k, n) => {
                                    k as f32 * f32::EPSILON * (1.0 + v.abs())
                                }
                                DType::F32 => 0.0,
                                _ => v.abs() / 128.0 + 1e-5,
                            };
                            assert!(
                                (g - v).abs() <= tol,
                                "{what} ({x_dtype:?} x, {w_dtype:?} w, transposed {transposed}, m {m}): [{i}] {g} != {v}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// `swiglu` with its backward on `Autodiff<Flex>` ([`cpu_swiglu`]), with Burn's default and
    /// its balanced checkpointing, against Burn's `silu(gate) * up` on the same values: within f32
    /// rounding in f32, within two bf16 roundings in bf16; gradients in the inputs' dtype.
    #[test]
    fn swiglu_and_its_gradients_match_burns_silu() {
        use burn::backend::{Autodiff, Flex};
        use burn::tensor::TensorData;
        use burn::tensor::activation::silu;
        fn check<A: burn::tensor::backend::AutodiffBackend + LogProbBackend>(dtype: DType, transposed: bool) {
            let device = Default::default();
            let values = |len: usize, seed: usize, scale: f32| -> Vec<f32> {
                (0..len).map(|i| ((((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0) - 1.0) * scale).collect()
            };
            let shape = [3, 5, 41];
            let len = 3 * 5 * 41;
            let leaf = |seed, scale| {
                Tensor::<A, 3>::from_data(TensorData::new(values(len, seed, scale), shape), &device)
                    .cast(dtype)
                    .require_grad()
            };
            let (gate, up) = (leaf(1, 9.0), leaf(2, 2.0));
            let weights = Tensor::<A, 3>::from_data(TensorData::new(values(len, 3, 1.0), shape), &device)
                .cast(DType::BF16)
                .cast(dtype);
            // Transposed: views whose values do not lie in order (copied first).
            let view = |x: Tensor<A, 3>| if transposed { x.swap_dims(1, 2) } else { x };
            let weights = view(weights);
            let ours = swiglu(view(gate.clone()), view(up.clone()));
            let burns = silu(view(gate.clone())) * view(up.clone());
            let f32s = |t: Tensor<A, 3>| -> Vec<f32> { t.cast(DType::F32).into_data().to_vec().unwrap() };
            // bf16: Burn rounds the sigmoid too, so two or three roundings against our two.
            let tol = |v: f32, scale: f32| {
                if dtype == DType::F32 { 1e-6 * (v.abs() + scale) } else { (v.abs() + scale) / 64.0 }
            };
            for (i, (g, v)) in f32s(ours.clone()).iter().zip(f32s(burns.clone())).enumerate() {
                assert!((g - v).abs() <= tol(v, 0.0), "{dtype:?} forward [{i}]: {g} != {v}");
            }
            let (g_ours, g_burns) = ((ours * weights.clone()).sum().backward(), (burns * weights).sum().backward());
            for (what, x) in [("gate", &gate), ("up", &up)] {
                let (got, want) = (x.grad(&g_ours).expect("gradient"), x.grad(&g_burns).expect("gradient"));
                assert_eq!(got.dtype(), dtype, "{what}'s gradient dtype");
                let (got, want) = (got.cast(DType::F32).into_data(), want.cast(DType::F32).into_data());
                let (got, want): (Vec<f32>, Vec<f32>) = (got.to_vec().unwrap(), want.to_vec().unwrap());
                for (i, (g, v)) in got.iter().zip(&want).enumerate() {
                    // Against the terms' scale (about 1: SiLU's derivative cancels near -1.28).
                    assert!((g - v).abs() <= tol(*v, 1.0), "{dtype:?} {what}'s gradient [{i}]: {g} != {v}");
                }
            }
        }
        for dtype in [DType::F32, DType::BF16] {
            for transposed in [false, true] {
                check::<Autodiff<Flex>>(dtype, transposed);
            }
            check::<Autodiff<Flex, burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing>>(dtype, false);
            // The comparisons above would pass through Burn's ops as well: these tensors take
            // the CPU kernel.
            let t = || Tensor::<Flex, 3>::ones([2, 3, 4], &Default::default()).cast(dtype).into_primitive().tensor();
            assert_eq!(swiglu_dtype(&[&t(), &t(), &t()]), Some(dtype));
        }
    }

    /// Casts of permuted views (converted where they lie, the layout kept) and of narrowed ones
    /// (copied first) give the values of the view, in its order.
    #[test]
    fn flex_cast_of_views_keeps_their_values() {
        use burn::backend::Flex;
        let device = Default::default();
        let values: Vec<f32> = (0..2 * 3 * 4 * 5).map(|i| i as f32 / 7.0).collect();
        let x = Tensor::<Flex, 4>::from_data(burn::tensor::TensorData::new(values, [2, 3, 4, 5]), &device);
        for view in [x.clone().swap_dims(1, 2), x.clone().permute([3, 1, 0, 2]), x.clone().narrow(2, 1, 2), x.clone()] {
            let want: Vec<f32> = view.clone().cast(DType::BF16).cast(DType::F32).into_data().to_vec().unwrap();
            let bf16 = cast(view.clone(), DType::BF16);
            assert_eq!(bf16.dims(), view.dims());
            let got: Vec<f32> = cast(bf16, DType::F32).into_data().to_vec().unwrap();
            assert_eq!(got, want);
        }
    }

    #[test]
    #[should_panic(expected = "swiglu: gate and up differ in shape")]
    fn swiglu_does_not_broadcast() {
        let device = Default::default();
        let gate = Tensor::<burn::backend::Flex, 2>::ones([3, 4], &device);
        let _ = swiglu(gate, Tensor::ones([1, 4], &device));
    }

    /// The default `swiglu_bwd` (Burn's ops, what GPU backends run) gives Burn's autodiff's
    /// gradients of `silu(gate) * up`.
    #[test]
    fn plain_swiglu_gradients_are_burns() {
        use burn::backend::{Autodiff, Flex};
        use burn::tensor::TensorData;
        use burn::tensor::activation::silu;
        let device = Default::default();
        let values = |seed: usize, scale: f32| -> Vec<f32> {
            (0..300).map(|i| ((((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.0) - 1.0) * scale).collect()
        };
        let leaf = |seed, scale| {
            Tensor::<Autodiff<Flex>, 2>::from_data(TensorData::new(values(seed, scale), [10, 30]), &device)
        };
        let (gate, up, weights) = (leaf(1, 9.0).require_grad(), leaf(2, 2.0).require_grad(), leaf(3, 1.0));
        let grads = (silu(gate.clone()) * up.clone() * weights.clone()).sum().backward();
        let inner = |t: &Tensor<Autodiff<Flex>, 2>| t.clone().inner().into_primitive().tensor();
        let out = plain_swiglu::<Flex>(inner(&gate), inner(&up));
        let want_out = (silu(gate.clone()) * up.clone()).inner();
        let (dgate, dup) = plain_swiglu_bwd::<Flex>(inner(&gate), inner(&up), inner(&weights));
        for (what, got, want) in [
            ("out", out, want_out),
            ("gate", dgate, gate.grad(&grads).expect("gradient")),
            ("up", dup, up.grad(&grads).expect("gradient")),
        ] {
            let got: Vec<f32> = float::<Flex, 2>(got).into_data().to_vec().unwrap();
            let want: Vec<f32> = want.into_data().to_vec().unwrap();
            for (i, (g, v)) in got.iter().zip(&want).enumerate() {
                assert!((g - v).abs() <= 1e-6 * (v.abs() + 1e-2), "{what} [{i}]: {g} != {v}");
            }
        }
    }
}
