//! The decoder of every supported family (Llama, Mistral, Qwen2, Qwen3, Gemma 3) on Burn, top to
//! bottom: linear layers, RMSNorm, rotary embeddings, grouped-query attention, gated MLP, decoder
//! layer, model. Field names follow the Hugging Face checkpoint names, so loading is a table (see
//! `checkpoint.rs`). Linear weights are stored `[in, out]` (the transpose of the checkpoint's
//! `[out, in]`). The families' differences are options of [`LlamaConfig`]; Gemma 3's are
//! described in [`crate::gemma3`].

use burn::module::{Module, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};

use crate::config::LlamaConfig;
use fuserl_kernels::{LogProbBackend, QuantLayout};

/// `t` in `dtype`: a cast (differentiable: its gradient comes back in `t`'s dtype) when the
/// dtypes differ, `t` itself otherwise. How weights kept in f32 (the trainer's master weights,
/// with `[backend] dtype = "bf16"` or `"f16"`) are used in the compute dtype: the matmuls run in
/// bf16/f16 and the weights' gradients arrive in f32.
pub fn in_dtype<B: LogProbBackend, const D: usize>(t: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    fuserl_kernels::cast(t, dtype)
}

/// A frozen weight kept in ggml's blocks (QLoRA's base: `[target.lora] quantize_base`),
/// `[rows, cols]` as in the checkpoint (`[out, in]` for a linear layer, `[vocab, hidden]` for
/// the embeddings), dequantised a chunk of rows at a time where it is used
/// ([`fuserl_kernels::qweight`]).
#[derive(Module, Debug)]
pub struct QuantWeight<B: Backend> {
    /// The blocks, `[rows, row_words]`.
    pub words: Param<Tensor<B, 2, Int>>,
    /// Their type and row length.
    #[module(skip)]
    pub layout: QuantLayout,
}

impl<B: Backend> QuantWeight<B> {
    /// The blocks `bytes` (whole rows of `layout`) put on `device`.
    pub fn new(layout: QuantLayout, bytes: &[u8], device: &B::Device) -> Self {
        let words = fuserl_kernels::qweight::upload(layout, bytes, device);
        Self { words: Param::initialized(burn::module::ParamId::new(), words), layout }
    }

    /// `[rows, cols]`.
    pub fn dims(&self) -> [usize; 2] {
        [self.words.val().dims()[0], self.layout.cols]
    }

    /// Bytes the blocks take on the device.
    pub fn bytes(&self) -> usize {
        self.words.val().dims()[0] * self.layout.row_words() * 4
    }
}

impl<B: LogProbBackend> QuantWeight<B> {
    /// The f32 values `[rows, cols]`.
    pub fn dequantized(&self) -> Tensor<B, 2> {
        fuserl_kernels::dequantize(self.words.val(), self.layout)
    }
}

/// `y = x W + b`.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// `[in, out]`; empty (`[0, 0]`) when the weight is kept quantised in `quant`.
    pub weight: Param<Tensor<B, 2>>,
    /// `[out]`.
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// A LoRA adapter (`[target.lora]`, or an adapter folder): `+ s (x A) B`.
    pub lora: Option<crate::lora::Lora<B>>,
    /// The frozen weight in ggml blocks (`[out, in]`) instead of `weight` (QLoRA).
    pub quant: Option<QuantWeight<B>>,
}

impl<B: Backend> Linear<B> {
    /// `[in, out]`.
    pub fn dims(&self) -> [usize; 2] {
        match &self.quant {
            Some(q) => {
                let [rows, cols] = q.dims();
                [cols, rows]
            }
            None => self.weight.val().dims(),
        }
    }
}

impl<B: LogProbBackend> Linear<B> {
    /// The weight `[in, out]`: a quantised one dequantised (f32), else as it is kept.
    pub fn dense_weight(&self) -> Tensor<B, 2> {
        match &self.quant {
            Some(q) => q.dequantized().transpose(),
            None => self.weight.val(),
        }
    }

    /// # Shapes
    /// `x: [batch, seq, in]` -> `[batch, seq, out]`
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, t, i] = x.dims();
        let dtype = x.dtype();
        let out = self.dims()[1];
        let x = x.reshape([b * t, i]);
        let base = match &self.quant {
            Some(q) => fuserl_kernels::quant_matmul(x.clone(), q.words.val(), q.layout),
            None => fuserl_kernels::linear_matmul(x.clone(), self.weight.val()),
        };
        let y = match &self.lora {
            Some(lora) => base + lora.forward(x, b),
            None => base,
        };
        let y = match &self.bias {
            Some(bias) => y + in_dtype(bias.val(), dtype).unsqueeze_dim(0),
            None => y,
        };
        y.reshape([b, t, out])
    }
}

/// Root-mean-square layer norm over the last dimension.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// `[hidden]`.
    pub weight: Param<Tensor<B, 1>>,
    /// Epsilon added to the mean square.
    pub eps: f64,
    /// Gemma's form: scale by `1 + weight`, in f32 before casting back (Llama's scales the
    /// normalised value, cast back first, by `weight`).
    pub unit_offset: bool,
}

impl<B: LogProbBackend> RmsNorm<B> {
    /// # Shapes
    /// `x: [..., hidden]` -> same
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dtype = x.dtype();
        let x32 = in_dtype(x, DType::F32);
        let rms = x32.clone().powi_scalar(2).mean_dim(D - 1).add_scalar(self.eps).sqrt();
        let w = self.weight.val().unsqueeze::<D>();
        if self.unit_offset {
            in_dtype((x32 / rms) * in_dtype(w, DType::F32).add_scalar(1.0), dtype)
        } else {
            in_dtype(x32 / rms, dtype) * in_dtype(w, dtype)
        }
    }
}

/// Rotary tables for one batch: `cos` and `sin` of `position * inv_freq`, duplicated over both
/// halves of the head (HF's rotate-half layout), written out for every query head and every key
/// head; the `sin` tables carry rotate-half's sign (negative on the first half). The query tables
/// also carry the attention's `1 / sqrt(head_dim)`, so that scaling costs no pass over the
/// `[seq, seq]` scores.
#[derive(Debug, Clone)]
pub struct Rope<B: Backend> {
    /// `cos * s`, `±sin * s` with the queries' scale `s` (`1 / sqrt(head_dim)`, or Gemma's
    /// `query_pre_attn_scalar^-1/2`): `[batch, seq, heads, head_dim]`.
    pub queries: (Tensor<B, 4>, Tensor<B, 4>),
    /// `cos`, `±sin`: `[batch, seq, kv_heads, head_dim]`.
    pub keys: (Tensor<B, 4>, Tensor<B, 4>),
}

impl<B: Backend> Rope<B> {
    /// Tables for the given positions (`positions[b][t]`), computed in f64 on the host. They are
    /// full size (not broadcast over the heads) because element-wise products of same-shape
    /// contiguous tensors are the CPU backend's fast path.
    /// `sliding`: the tables of the sliding-window layers (their own RoPE base, Gemma 3).
    pub fn new(
        config: &LlamaConfig,
        positions: &[Vec<usize>],
        sliding: bool,
        device: &B::Device,
        dtype: DType,
    ) -> Self {
        let inv = config.inv_freq_of(sliding);
        let d = config.head_dim;
        let b = positions.len();
        let t = positions.first().map_or(0, Vec::len);
        // One head's row per position (both halves), then written out for every head.
        let mut angles = Vec::with_capacity(b * t * d);
        for row in positions {
            for &p in row {
                for _half in 0..2 {
                    // HF computes the angle in f32; doing it in f64 and rounding once is at
                    // least as accurate.
                    angles.extend(inv.iter().map(|f| (p as f64) * (*f as f32 as f64)));
                }
            }
        }
        let table = |heads: usize, scale: f64| {
            let mut cos = Vec::with_capacity(b * t * heads * d);
            let mut sin = Vec::with_capacity(b * t * heads * d);
            for row in angles.chunks(d) {
                // rotate_half(x) = [-x2, x1]: the first half's sine is negated here, so that the
                // rotation is `x * cos + swap_halves(x) * sin`.
                let (c, s): (Vec<f32>, Vec<f32>) = row
                    .iter()
                    .enumerate()
                    .map(|(i, a)| {
                        let sign = if i < d / 2 { -1.0 } else { 1.0 };
                        ((a.cos() * scale) as f32, (sign * a.sin() * scale) as f32)
                    })
                    .unzip();
                for _head in 0..heads {
                    cos.extend_from_slice(&c);
                    sin.extend_from_slice(&s);
                }
            }
            let make = |v: Vec<f32>| Tensor::<B, 4>::from_data(TensorData::new(v, [b, t, heads, d]), (device, dtype));
            (make(cos), make(sin))
        };
        Self { queries: table(config.num_heads, config.query_scale()), keys: table(config.num_kv_heads, 1.0) }
    }

    /// Rotated queries, scaled by `1 / sqrt(head_dim)` (or Gemma's `query_pre_attn_scalar`).
    ///
    /// # Shapes
    /// `x: [batch, seq, heads, head_dim]` -> same
    pub fn queries(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.rotate_with(x, &self.queries)
    }

    /// Rotated keys.
    ///
    /// # Shapes
    /// `x: [batch, seq, kv_heads, head_dim]` -> same
    pub fn keys(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.rotate_with(x, &self.keys)
    }

    /// `x * cos + rotate_half(x) * sin`, element-wise: rotate-half is the halves swapped (a
    /// concatenation of the two halves) with its sign in the `sin` table: transformers'
    /// `rotate_half` without the negation pass.
    fn rotate_with(&self, x: Tensor<B, 4>, (cos, sin): &(Tensor<B, 4>, Tensor<B, 4>)) -> Tensor<B, 4> {
        let half = x.dims()[3] / 2;
        let swapped = Tensor::cat(vec![x.clone().narrow(3, half, half), x.clone().narrow(3, 0, half)], 3);
        x * cos.clone() + swapped * sin.clone()
    }
}

/// Keys and values of earlier positions, for generation: buffers `[batch, kv_heads, capacity,
/// head_dim]` whose first `len` columns hold the cache and whose later columns are room
/// for the next positions, written in place ([`fuserl_kernels::write_block`]): a decoding step
/// copies its own keys and values, not the whole cache (as growing it by concatenation did). A
/// full buffer is replaced by one a quarter longer than the cache (at least 32 columns more;
/// amortised: each position is copied a bounded number of times, and the room costs a quarter
/// of the cache, not as much again). Continuous batching writes a new prompt's prefill into the row
/// it takes ([`Self::write_row`]) and drops leading columns no row reads ([`Self::compact`]).
#[derive(Debug, Clone)]
pub struct LayerCache<B: Backend> {
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    len: usize,
}

/// The least room a cache grows by (columns).
pub const CACHE_GROWTH: usize = 32;

/// `x` moved out (an empty tensor left behind), so that its buffer has no other holder and the
/// CPU backend writes it in place.
fn take<B: Backend>(x: &mut Tensor<B, 4>) -> Tensor<B, 4> {
    std::mem::replace(x, Tensor::empty([0, 0, 0, 0], &x.device()))
}

impl<B: LogProbBackend> LayerCache<B> {
    /// A cache holding `k` and `v` (`[batch, kv_heads, len, head_dim]`), with no room yet.
    pub fn new(k: Tensor<B, 4>, v: Tensor<B, 4>) -> Self {
        let len = k.dims()[2];
        Self { k, v, len }
    }

    /// The cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the buffers have no room for another position.
    pub fn is_full(&self) -> bool {
        self.len == self.k.dims()[2]
    }

    /// The cached keys, `[batch, kv_heads, len, head_dim]` (a view of the buffer).
    pub fn keys(&self) -> Tensor<B, 4> {
        Self::cached(&self.k, 0, self.len)
    }

    /// The cached values, as [`Self::keys`].
    pub fn values(&self) -> Tensor<B, 4> {
        Self::cached(&self.v, 0, self.len)
    }

    /// Columns `from..to` of `buffer` (Burn narrows to at least one column).
    fn cached(buffer: &Tensor<B, 4>, from: usize, to: usize) -> Tensor<B, 4> {
        if to == from {
            let [b, h, _, d] = buffer.dims();
            return Tensor::zeros([b, h, 0, d], (&buffer.device(), buffer.dtype()));
        }
        buffer.clone().narrow(2, from, to - from)
    }

    /// New buffers holding `zeros` zero columns, then columns `from..` of the cache, with room
    /// for `extra` more positions and a quarter of the total again (one copy).
    fn rebuild(&mut self, zeros: usize, from: usize, extra: usize) {
        let len = zeros + self.len - from;
        let room = (len + extra) + ((len + extra) / 4).max(CACHE_GROWTH);
        let moved = |buffer: &Tensor<B, 4>| {
            let [b, h, _, d] = buffer.dims();
            let fresh = Tensor::zeros([b, h, room, d], (&buffer.device(), buffer.dtype()));
            if from == self.len {
                fresh
            } else {
                fuserl_kernels::write_block(fresh, 0, zeros, Self::cached(buffer, from, self.len))
            }
        };
        (self.k, self.v) = (moved(&self.k), moved(&self.v));
        self.len = len;
    }

    /// Append the keys and values of `t` new positions (`[batch, kv_heads, t, head_dim]`);
    /// returns every cached key and value, the new ones last (views of the buffers).
    pub fn append(&mut self, k: Tensor<B, 4>, v: Tensor<B, 4>) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let t = k.dims()[2];
        if self.len + t > self.k.dims()[2] {
            self.rebuild(0, 0, t);
        }
        let at = self.len;
        self.k = fuserl_kernels::write_block(take(&mut self.k), 0, at, k);
        self.v = fuserl_kernels::write_block(take(&mut self.v), 0, at, v);
        self.len += t;
        (self.keys(), self.values())
    }

    /// Row `row`'s last `t` cached columns set to `k` and `v` (`[1, kv_heads, t, head_dim]`, `t`
    /// at most the cache's length), in place: a new prompt's prefill in the row it takes.
    pub fn write_row(&mut self, row: usize, k: Tensor<B, 4>, v: Tensor<B, 4>) {
        let t = k.dims()[2];
        assert!(t <= self.len, "LayerCache::write_row: {t} columns into a cache of {}", self.len);
        let at = self.len - t;
        self.k = fuserl_kernels::write_block(take(&mut self.k), row, at, k);
        self.v = fuserl_kernels::write_block(take(&mut self.v), row, at, v);
    }

    /// `by` masked (zero) columns before the cached ones (one copy), with room after them.
    pub fn widen(&mut self, by: usize) {
        if by > 0 {
            self.rebuild(by, 0, 0);
        }
    }

    /// The cache without its first `from` columns (one copy), with room after them.
    pub fn compact(&mut self, from: usize) {
        assert!(from <= self.len, "LayerCache::compact: from {from} of {}", self.len);
        self.rebuild(0, from, 0);
    }

    /// The cache of rows `keep` (in that order) and positions `from..` only (at least one).
    pub fn select(&self, keep: Tensor<B, 1, Int>, from: usize) -> Self {
        assert!(from < self.len, "LayerCache::select: positions {from}.. of {}", self.len);
        // Narrowed first: the selection copies only the columns kept.
        let n = self.len - from;
        let part = |buffer: &Tensor<B, 4>, keep| buffer.clone().narrow(2, from, n).select(0, keep);
        Self::new(part(&self.k, keep.clone()), part(&self.v, keep))
    }
}

/// Grouped-query self-attention.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// Query projection.
    pub q_proj: Linear<B>,
    /// Key projection.
    pub k_proj: Linear<B>,
    /// Value projection.
    pub v_proj: Linear<B>,
    /// Output projection.
    pub o_proj: Linear<B>,
    /// RMSNorm of each query head before RoPE (Qwen3, Gemma 3).
    pub q_norm: Option<RmsNorm<B>>,
    /// RMSNorm of each key head before RoPE (Qwen3, Gemma 3).
    pub k_norm: Option<RmsNorm<B>>,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Head size.
    pub head_dim: usize,
}

impl<B: LogProbBackend> Attention<B> {
    /// # Shapes
    /// `x: [batch, seq, hidden]`, `context`: for `[batch, seq]` queries and `past + seq` keys
    /// -> `[batch, seq, hidden]`
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        (rope, mask): (&Rope<B>, &KeyMask<B>),
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let [b, t, _] = x.dims();
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        // RoPE on the projections' own (contiguous) layout; keys and values then heads first
        // (the cache's layout).
        let norm = |norm: &Option<RmsNorm<B>>, x: Tensor<B, 4>| match norm {
            Some(n) => n.forward(x),
            None => x,
        };
        let q = rope.queries(norm(&self.q_norm, self.q_proj.forward(x.clone()).reshape([b, t, nh, hd])));
        let mut k =
            rope.keys(norm(&self.k_norm, self.k_proj.forward(x.clone()).reshape([b, t, nkv, hd]))).swap_dims(1, 2);
        let mut v = self.v_proj.forward(x).reshape([b, t, nkv, hd]).swap_dims(1, 2);
        if let Some(cache) = cache {
            (k, v) = cache.append(k, v);
        }
        // Grouped-query causal attention (q is already scaled by 1 / sqrt(head_dim)), scores and
        // softmax in f32, in tiles of query rows: never the whole `[seq, past + seq]` scores
        // (fuserl_kernels::causal_attention, with its own backward).
        let out = fuserl_kernels::causal_attention(q, k, v, mask.key_bias.clone(), mask.window);
        self.o_proj.forward(out.reshape([b, t, nh * hd]))
    }
}

/// Gated feed-forward: SwiGLU, or GeGLU with the tanh GELU (Gemma).
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// Gate projection.
    pub gate_proj: Linear<B>,
    /// Up projection.
    pub up_proj: Linear<B>,
    /// Down projection.
    pub down_proj: Linear<B>,
    /// GELU (tanh approximation) on the gate instead of SiLU.
    pub gelu_tanh: bool,
}

impl<B: LogProbBackend> Mlp<B> {
    /// # Shapes
    /// `x: [batch, seq, hidden]` -> same
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let gate = self.gate_proj.forward(x.clone());
        let up = self.up_proj.forward(x);
        let mixed = if self.gelu_tanh { gelu_tanh(gate) * up } else { fuserl_kernels::swiglu(gate, up) };
        self.down_proj.forward(mixed)
    }
}

/// One pre-norm decoder layer.
#[derive(Module, Debug)]
pub struct DecoderLayer<B: Backend> {
    /// Attention.
    pub self_attn: Attention<B>,
    /// MLP.
    pub mlp: Mlp<B>,
    /// Norm before attention.
    pub input_layernorm: RmsNorm<B>,
    /// Norm before the MLP (Llama), or of the attention's output (Gemma, whose norm before the
    /// MLP is `pre_feedforward_layernorm`).
    pub post_attention_layernorm: RmsNorm<B>,
    /// Gemma: norm before the MLP.
    pub pre_feedforward_layernorm: Option<RmsNorm<B>>,
    /// Gemma: norm of the MLP's output.
    pub post_feedforward_layernorm: Option<RmsNorm<B>>,
    /// Whether this layer attends within the sliding window (with the sliding tables).
    pub sliding: bool,
}

impl<B: LogProbBackend> DecoderLayer<B> {
    /// # Shapes
    /// `x: [batch, seq, hidden]` -> same
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        context: &LayerContext<B>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let tables = context.tables(self.sliding);
        // The residual stream stays in its own dtype (the embeddings': f32 under mixed
        // precision, as autocast keeps it); attention and the MLP run in the compute dtype.
        let (residual, compute) = (x.dtype(), context.compute);
        let attn = self.self_attn.forward(in_dtype(self.input_layernorm.forward(x.clone()), compute), tables, cache);
        let attn = in_dtype(attn, residual);
        match (&self.pre_feedforward_layernorm, &self.post_feedforward_layernorm) {
            (Some(pre), Some(post)) => {
                let h = x + self.post_attention_layernorm.forward(attn);
                let mlp = self.mlp.forward(in_dtype(pre.forward(h.clone()), compute));
                h + post.forward(in_dtype(mlp, residual))
            }
            _ => {
                let h = x + attn;
                let mlp = self.mlp.forward(in_dtype(self.post_attention_layernorm.forward(h.clone()), compute));
                h + in_dtype(mlp, residual)
            }
        }
    }
}

/// The model's weights.
///
/// The embeddings are the last field on purpose: modules are visited in field order, and the
/// optimiser frees each gradient as it updates its parameter, so the largest parameter's update
/// (and its temporaries) comes when every other gradient is already gone.
#[derive(Module, Debug)]
pub struct Llama<B: Backend> {
    /// Decoder layers.
    pub layers: Vec<DecoderLayer<B>>,
    /// Final norm.
    pub norm: RmsNorm<B>,
    /// `[hidden, vocab]`, absent when tied to the embeddings.
    pub lm_head: Option<Linear<B>>,
    /// The embeddings in ggml blocks (`[vocab, hidden]`) instead of `embed_tokens`, which is then
    /// empty (`[0, hidden]`; QLoRA on a GGUF base).
    pub embed_quant: Option<QuantWeight<B>>,
    /// `[vocab, hidden]`.
    pub embed_tokens: Param<Tensor<B, 2>>,
}

/// One forward pass's inputs: padded token ids with each token's position and which keys
/// exist. Build with [`Inputs::right_padded`] (scoring) or [`Inputs::left_padded`] (generation).
#[derive(Debug, Clone)]
pub struct Inputs {
    /// `ids[b][t]`.
    pub ids: Vec<Vec<u32>>,
    /// Position of each token for RoPE.
    pub positions: Vec<Vec<usize>>,
    /// Whether each token is real (false for padding).
    pub valid: Vec<Vec<bool>>,
}

impl Inputs {
    /// Sequences padded on the right with `pad` to the longest.
    pub fn right_padded(seqs: &[Vec<u32>], pad: u32) -> Self {
        let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let ids = seqs.iter().map(|s| s.iter().copied().chain(std::iter::repeat(pad)).take(t).collect()).collect();
        let positions = seqs.iter().map(|_| (0..t).collect()).collect();
        let valid = seqs.iter().map(|s| (0..t).map(|i| i < s.len()).collect()).collect();
        Self { ids, positions, valid }
    }

    /// Sequences padded on the left with `pad` to the longest (so that generation appends to
    /// every row at the same index).
    pub fn left_padded(seqs: &[Vec<u32>], pad: u32) -> Self {
        let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let mut out = Self { ids: Vec::new(), positions: Vec::new(), valid: Vec::new() };
        for s in seqs {
            let p = t - s.len();
            out.ids.push(std::iter::repeat_n(pad, p).chain(s.iter().copied()).collect());
            out.positions.push((0..t).map(|i| i.saturating_sub(p)).collect());
            out.valid.push((0..t).map(|i| i >= p).collect());
        }
        out
    }
}

/// Per-layer caches.
pub type KvCache<B> = Vec<LayerCache<B>>;

/// Where a layer's queries may look, besides causality: which keys are padding, and the
/// sliding window.
#[derive(Debug, Clone)]
pub struct KeyMask<B: Backend> {
    /// `[batch, past + seq]`, f32: 0 for a real key, `f32::MIN` for padding.
    pub key_bias: Tensor<B, 2>,
    /// A sliding-window layer's window (the query's own key included); `None`: every earlier key.
    pub window: Option<usize>,
}

/// The rotary tables and attention mask that every layer of one forward pass uses
/// ([`LlamaModel::layer_context`]).
#[derive(Debug, Clone)]
pub struct LayerContext<B: Backend> {
    /// Rotary tables of the batch's positions.
    pub rope: Rope<B>,
    /// The keys' mask (causality is the attention's own).
    pub mask: KeyMask<B>,
    /// The sliding-window layers' tables and mask, where a model mixes layer types (Gemma 3);
    /// `None`: every layer uses `rope` and `mask`.
    pub sliding: Option<(Rope<B>, KeyMask<B>)>,
    /// The compute dtype of attention and the MLP ([`LlamaModel::dtype`]).
    pub compute: DType,
}

impl<B: Backend> LayerContext<B> {
    /// The tables and mask of a sliding (`true`) or full layer.
    pub fn tables(&self, sliding: bool) -> (&Rope<B>, &KeyMask<B>) {
        match &self.sliding {
            Some((rope, mask)) if sliding => (rope, mask),
            _ => (&self.rope, &self.mask),
        }
    }
}

/// A loaded model: configuration and weights.
#[derive(Debug)]
pub struct LlamaModel<B: Backend> {
    /// The resolved configuration.
    pub config: LlamaConfig,
    /// The weights.
    pub weights: Llama<B>,
    /// The compute dtype: of the activations, the rotary tables and the KV cache. The weights
    /// are loaded into it, except while training with `[backend] dtype = "bf16"` or `"f16"`:
    /// the trainer keeps f32 master weights and sets this to the compute dtype, and every use
    /// casts a weight to it ([`in_dtype`]).
    pub dtype: DType,
}

impl<B: LogProbBackend> LlamaModel<B> {
    /// The device the weights live on.
    pub fn device(&self) -> B::Device {
        self.weights.embed_tokens.val().device()
    }

    /// An empty KV cache for a batch of `batch` rows.
    pub fn empty_cache(&self, batch: usize) -> KvCache<B> {
        let device = self.device();
        let c = &self.config;
        (0..c.num_layers)
            .map(|_| {
                let empty = || Tensor::zeros([batch, c.num_kv_heads, 0, c.head_dim], (&device, self.dtype));
                LayerCache::new(empty(), empty())
            })
            .collect()
    }

    /// The token embeddings of a batch, the decoder's input.
    ///
    /// # Shapes
    /// `inputs: [batch, seq]` -> `[batch, seq, hidden]`
    pub fn embed(&self, inputs: &Inputs) -> Tensor<B, 3> {
        let b = inputs.ids.len();
        let t = inputs.ids.first().map_or(0, Vec::len);
        let flat: Vec<i32> = inputs.ids.iter().flatten().map(|&i| i as i32).collect();
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(flat, [b * t]), &self.device());
        // In the embeddings' dtype: the residual stream's (f32 master weights under mixed
        // precision; each layer casts what it computes with to the compute dtype).
        let x = match &self.weights.embed_quant {
            Some(q) => {
                let rows = fuserl_kernels::dequantize(q.words.val().select(0, ids), q.layout);
                rows.cast(self.weights.embed_tokens.val().dtype())
            }
            None => self.weights.embed_tokens.val().select(0, ids),
        };
        // Embeddings kept in bf16 under f32 compute (a frozen model: `checkpoint::load_frozen`)
        // give an f32 residual stream, as the same weights loaded in f32 do.
        let x = if x.dtype() == DType::BF16 && self.dtype == DType::F32 { x.cast(DType::F32) } else { x };
        let x = x.reshape([b, t, self.config.hidden_size]);
        if self.config.gemma_norms {
            // Gemma: times sqrt(hidden) rounded to the weights' dtype, as transformers does.
            x.mul_scalar((self.config.hidden_size as f64).sqrt())
        } else {
            x
        }
    }

    /// What every decoder layer of one forward pass shares: the rotary tables and the
    /// attention mask (causal, padding, sliding window).
    ///
    /// # Shapes
    /// `inputs: [batch, seq]`; `key_valid: [batch, past + seq]`
    pub fn layer_context(&self, inputs: &Inputs, key_valid: &[Vec<bool>]) -> LayerContext<B> {
        let c = &self.config;
        if c.mixes_layer_types() {
            let (rope, mask) = self.tables(inputs, key_valid, false);
            LayerContext { rope, mask, sliding: Some(self.tables(inputs, key_valid, true)), compute: self.dtype }
        } else {
            let (rope, mask) = self.tables(inputs, key_valid, c.layer_is_sliding(0));
            LayerContext { rope, mask, sliding: None, compute: self.dtype }
        }
    }

    /// Rotary tables and mask of the sliding-window layers (`sliding`) or of the others.
    fn tables(&self, inputs: &Inputs, key_valid: &[Vec<bool>], sliding: bool) -> (Rope<B>, KeyMask<B>) {
        let device = self.device();
        let b = inputs.ids.len();
        let tk = key_valid.first().map_or(0, Vec::len);
        let rope = Rope::new(&self.config, &inputs.positions, sliding, &device, self.dtype);
        let window = if sliding { self.config.sliding_window } else { None };
        let bias: Vec<f32> = key_valid.iter().flatten().map(|ok| if *ok { 0.0 } else { f32::MIN }).collect();
        let key_bias = Tensor::<B, 2>::from_data(TensorData::new(bias, [b, tk]), (&device, DType::F32));
        (rope, KeyMask { key_bias, window })
    }

    /// The final hidden states (after the last norm).
    ///
    /// # Shapes
    /// `inputs: [batch, seq]` -> `[batch, seq, hidden]`; with a cache holding `past` positions,
    /// the keys are `past + seq` long and `valid` must cover them all.
    pub fn hidden(&self, inputs: &Inputs, key_valid: &[Vec<bool>], mut cache: Option<&mut KvCache<B>>) -> Tensor<B, 3> {
        let context = self.layer_context(inputs, key_valid);
        let mut x = self.embed(inputs);
        for (l, layer) in self.weights.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| &mut c[l]);
            x = layer.forward(x, &context, layer_cache);
        }
        in_dtype(self.weights.norm.forward(x), self.dtype)
    }

    /// Logits from hidden states.
    ///
    /// # Shapes
    /// `hidden: [batch, seq, hidden]` -> `[batch, seq, vocab]`
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.weights.lm_head {
            Some(head) => head.forward(hidden),
            None => {
                let [b, t, h] = hidden.dims();
                if let Some(q) = &self.weights.embed_quant {
                    let v = q.dims()[0];
                    let x = hidden.reshape([b * t, h]);
                    return fuserl_kernels::quant_matmul(x, q.words.val(), q.layout).reshape([b, t, v]);
                }
                let w = self.weights.embed_tokens.val();
                let v = w.dims()[0];
                fuserl_kernels::linear_matmul(hidden.reshape([b * t, h]), w.transpose()).reshape([b, t, v])
            }
        }
    }

    /// Logits of a batch.
    ///
    /// # Shapes
    /// `inputs: [batch, seq]` -> `[batch, seq, vocab]`
    pub fn forward(&self, inputs: &Inputs) -> Tensor<B, 3> {
        self.logits(self.hidden(inputs, &inputs.valid, None))
    }
}

/// The tanh approximation of GELU (`gelu_pytorch_tanh`):
/// `x / 2 * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3)))`.
pub fn gelu_tanh<B: Backend, const D: usize>(x: Tensor<B, D>) -> Tensor<B, D> {
    let inner =
        (x.clone() + x.clone().powi_scalar(3).mul_scalar(0.044715)).mul_scalar((2.0 / std::f64::consts::PI).sqrt());
    x.clone().mul_scalar(0.5) * (inner.tanh().add_scalar(1.0))
}
