//! The memory plan of a training stage: an estimate of its peak memory on its device, broken
//! down into what holds it, from the model's shapes, the stage's settings and the longest
//! micro-batch (docs/scaling.md). `fuserl plan` prints it, `fuserl recipe check` sums it up, and
//! each training stage logs it when it starts (and, on a GPU, refuses to start when it cannot
//! fit, naming the settings that would make it fit).
//!
//! The counts follow what the trainer keeps alive, tensor by tensor:
//!
//! - **training state**: the trained weights, their gradients and AdamW's two moments, each in
//!   the master type (f32: 16 bytes a parameter; the lean option, bf16: 8);
//! - **compute copies** under mixed precision: each use of an f32 weight casts it to the
//!   compute type, and autodiff keeps the copy for the backward pass (one layer's at a time with
//!   gradient checkpointing, every layer's without);
//! - **activations**: what Burn's autodiff keeps for backward in one decoder layer (the norms'
//!   f32 intermediates, q/k/v and their rotations, attention's output and each row's max and
//!   log-sum, the MLP's gate, up and their mix, and GeGLU's intermediates) per token, for every layer without
//!   checkpointing, and for one recomputed layer plus every layer's input with it; the padding
//!   bias and rotary tables of the micro-batch;
//! - **attention tiles**: attention computes its scores in tiles of query rows (at most
//!   `fuserl_kernels::DEFAULT_MAX_ATTENTION_ELEMS` scores, the whole `[heads, seq, seq]` when it
//!   fits) and again in the backward pass: three tiles alive in the forward, four in the backward
//!   (none on a GPU device running the attention kernel, `[backend] attention = "kernel"`, whose
//!   scores live in registers);
//! - **log-probs**: the final hidden states, the head's gradient (built in vocabulary chunks and
//!   joined: twice `[vocab, hidden]` f32 for a moment) and the chunks (at most 2^22 elements);
//!   the naive path holds `[tokens, vocab]` logits instead;
//! - **the optimiser step**: the largest parameter's update (the embeddings, updated last) in
//!   f32 temporaries;
//! - **reference log-probs** (FusePO with DPO-style objectives): the reference model, loaded as
//!   the policy is, and one layer's inference activations, before training starts;
//! - **loading** (on the CPU): the checkpoint file read whole and the model built from it, its
//!   tensors converted to f32 one at a time as the model takes them;
//! - **LoRA** (`[target.lora]`): the base frozen in the compute type (no gradient, no moments),
//!   the adapters trained as above, each keeping its `x A` for the backward pass; no gradient
//!   for the embeddings or the head;
//! - **runtime**: what the process holds already (its measured resident memory on the CPU; the
//!   CUDA context and kernel workspaces on a GPU, an allowance).
//!
//! The peak is the largest of the phases. Checked against measured peaks on the CPU
//! (`scripts/bench-memory-plan.sh`, docs/scaling.md).

use fuserl_core::backend::{AttentionPath, BackendConfig, Device, LogProbPath, MasterWeights};
use fuserl_model::checkpoint::BaseQuant;
use fuserl_model::config::LlamaConfig;
use fuserl_recipe::StageConfig;

/// What is planned for: the model, the stage's settings, and the largest micro-batch.
#[derive(Clone, Copy, Debug)]
pub struct PlanInput<'a> {
    /// The trained model's shapes.
    pub model: &'a LlamaConfig,
    /// The stage's settings (batch size, gradient checkpointing).
    pub config: &'a StageConfig,
    /// `[backend]`: the compute and master types, the log-prob path.
    pub backend: &'a BackendConfig,
    /// Sequences in the largest micro-batch (`batch_size` examples of up to this many).
    pub sequences: usize,
    /// Tokens of each sequence, padded (the longest in the micro-batch).
    pub length: usize,
    /// Sequences of a batch of reference log-probs, when the stage computes them first.
    pub reference_sequences: Option<usize>,
    /// Memory already held: the process's on the CPU, the device runtime's on a GPU.
    pub runtime: u64,
    /// `[target.lora]`: only the adapters are trained; the base is frozen in the compute type,
    /// or quantised (`quantize_base`).
    pub lora: Option<&'a fuserl_recipe::LoraConfig>,
    /// The size of the target folder's GGUF file (`model.gguf`), when its weights are one.
    pub gguf_bytes: Option<u64>,
}

/// Bytes of the decoder's linear weights quantised to `ty` (each row of a layer whose rows are
/// not whole super-blocks in llama.cpp's fallback type), and how many weights that is.
pub fn quantized_linear_bytes(m: &LlamaConfig, ty: fuserl_model::quant::GgmlType) -> (u64, u64) {
    let (h, i) = (m.hidden_size, m.intermediate_size);
    let (q, kv) = (m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim);
    let shapes = [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)];
    let (mut bytes, mut weights) = (0u64, 0u64);
    for (rows, cols) in shapes {
        let row = BaseQuant::row_type(ty, cols);
        let (block, block_bytes) = row.block();
        // Each row whole 32-bit words on the device (`fuserl_kernels::qweight`).
        bytes += (rows * (cols / block * block_bytes).div_ceil(4) * 4) as u64;
        weights += (rows * cols) as u64;
    }
    (bytes * m.num_layers as u64, weights * m.num_layers as u64)
}

/// How `[target.lora]` keeps the frozen base (`quantize_base`; floats when absent).
pub fn base_quant(l: &fuserl_recipe::LoraConfig) -> BaseQuant {
    use fuserl_model::quant::GgmlType;
    use fuserl_recipe::QuantizeBase as Q;
    match l.quantize_base {
        None => BaseQuant::None,
        Some(Q::Gguf) => BaseQuant::Gguf,
        Some(Q::Q4K) => BaseQuant::To(GgmlType::Q4K),
        Some(Q::Q5K) => BaseQuant::To(GgmlType::Q5K),
        Some(Q::Q6K) => BaseQuant::To(GgmlType::Q6K),
        Some(Q::Q8_0) => BaseQuant::To(GgmlType::Q8_0),
    }
}

/// The model crate's adapter settings from `[target.lora]`.
pub fn lora_spec(l: &fuserl_recipe::LoraConfig) -> fuserl_model::lora::LoraSpec {
    fuserl_model::lora::LoraSpec {
        r: l.r as usize,
        alpha: l.alpha,
        dropout: l.dropout,
        // Checked when the recipe was read.
        targets: fuserl_model::lora::LoraSpec::targets_from(&l.target_modules).unwrap_or_default(),
        rslora: l.use_rslora,
    }
}

/// The frozen base's bytes with `[target.lora]` (`all` parameters, `c` bytes each in the
/// compute type): floats, the GGUF file's blocks, or the linear layers quantised at load.
fn frozen_base_bytes(input: &PlanInput<'_>, l: &fuserl_recipe::LoraConfig, all: u64, c: u64) -> u64 {
    let ty = match base_quant(l) {
        BaseQuant::None => return all * c,
        BaseQuant::Gguf => return input.gguf_bytes.unwrap_or(all * c),
        BaseQuant::To(ty) => ty,
    };
    let (bytes, weights) = quantized_linear_bytes(input.model, ty);
    bytes + (all - weights) * c
}

/// The adapters' parameters of `[target.lora]` on the model: `r (in + out)` for every targeted
/// linear layer of every decoder layer.
pub fn lora_parameters(m: &LlamaConfig, lora: &fuserl_recipe::LoraConfig) -> u64 {
    let (h, i) = (m.hidden_size as u64, m.intermediate_size as u64);
    let (q, kv) = ((m.num_heads * m.head_dim) as u64, (m.num_kv_heads * m.head_dim) as u64);
    let all = lora.target_modules.iter().any(|t| t == "all-linear");
    let sides = [
        ("q_proj", h + q),
        ("k_proj", h + kv),
        ("v_proj", h + kv),
        ("o_proj", q + h),
        ("gate_proj", h + i),
        ("up_proj", h + i),
        ("down_proj", i + h),
    ];
    let per_layer: u64 =
        sides.iter().filter(|(name, _)| all || lora.target_modules.iter().any(|t| t == name)).map(|(_, n)| n).sum();
    m.num_layers as u64 * lora.r as u64 * per_layer
}

/// How many linear layers of a decoder layer `[target.lora]` adapts.
fn lora_targets(lora: &fuserl_recipe::LoraConfig) -> u64 {
    if lora.target_modules.iter().any(|t| t == "all-linear") { 7 } else { lora.target_modules.len() as u64 }
}

/// One named part of a phase, in bytes.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Part {
    /// What holds it.
    pub name: &'static str,
    /// Bytes.
    pub bytes: u64,
}

/// One phase of a stage: its parts are alive at the same time.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Phase {
    /// The phase (`reference log-probs`, `forward and backward`, `optimiser step`).
    pub name: &'static str,
    /// What it holds.
    pub parts: Vec<Part>,
}

impl Phase {
    /// The phase's total.
    pub fn total(&self) -> u64 {
        self.parts.iter().map(|p| p.bytes).sum()
    }
}

/// A stage's memory plan.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct MemoryPlan {
    /// Memory held before the stage (part of every phase's total).
    pub runtime: u64,
    /// The phases, in the order they run.
    pub phases: Vec<Phase>,
    /// Trained parameters.
    pub parameters: u64,
}

impl MemoryPlan {
    /// The phase with the largest total.
    pub fn peak_phase(&self) -> &Phase {
        self.phases.iter().max_by_key(|p| p.total()).expect("a plan has phases")
    }

    /// The planned peak: the runtime plus the largest phase.
    pub fn peak(&self) -> u64 {
        self.runtime + self.peak_phase().total()
    }

    /// One line: the peak and its largest parts.
    pub fn summary(&self) -> String {
        let phase = self.peak_phase();
        let mut parts: Vec<&Part> = phase.parts.iter().filter(|p| p.bytes > 0).collect();
        parts.sort_by_key(|p| std::cmp::Reverse(p.bytes));
        let shown: Vec<String> = parts.iter().take(4).map(|p| format!("{} {}", p.name, gb(p.bytes))).collect();
        format!("{} at peak ({}: {})", gb(self.peak()), phase.name, shown.join(", "))
    }

    /// What to change when the plan does not fit in `capacity` bytes: the settings that shrink
    /// its largest parts, most effective first.
    pub fn levers(&self, input: &PlanInput<'_>) -> Vec<String> {
        let phase = self.peak_phase();
        let bytes = |name: &str| phase.parts.iter().filter(|p| p.name == name).map(|p| p.bytes).sum::<u64>();
        let mut levers: Vec<(u64, String)> = Vec::new();
        let activations = bytes("activations") + bytes("attention scores") + bytes("log-probs");
        if activations > 0 {
            levers.push((
                activations / 2,
                format!(
                    "a smaller `batch_size` ({} now; `grad_accum` keeps the examples per step) or `[target] max_length` ({} now)",
                    input.config.batch_size, input.length
                ),
            ));
            if !input.config.gradient_checkpointing {
                levers.push((activations * 3 / 4, "`gradient_checkpointing = true`".into()));
            }
        }
        let state = bytes("trained weights") + bytes("gradients") + bytes("AdamW moments");
        if input.lora.is_none() {
            levers.push((
                state * 9 / 10,
                "LoRA (`[target.lora]`: the base frozen in the compute type, only small adapters trained)".into(),
            ));
        }
        if input.backend.master_weights == MasterWeights::F32 {
            levers.push((
                state / 2,
                "the lean option (`[backend] dtype = \"bf16\"` with `master_weights = \"bf16\"`: 8 bytes a parameter instead of 16)"
                    .into(),
            ));
        }
        // QLoRA: the frozen base in 4-bit blocks (Q4_K: 4.5 bits a weight), with LoRA on.
        let frozen = bytes("frozen weights");
        if input.lora.is_some_and(|l| l.quantize_base.is_none()) && frozen > 0 {
            levers.push((
                frozen * 2 / 3,
                "QLoRA (`[target.lora] quantize_base = \"q4_k\"`, or \"gguf\" on a GGUF folder: the frozen base kept in 4-bit blocks)"
                    .into(),
            ));
        }
        levers.sort_by_key(|(saved, _)| std::cmp::Reverse(*saved));
        let mut levers: Vec<String> = levers.into_iter().map(|(_, l)| l).collect();
        levers.push("a smaller target".into());
        levers
    }
}

/// The largest micro-batch a stage's examples can make: the `batch_size` examples with the
/// most sequences, every sequence as long as the longest of the stage (the trainer pads a
/// micro-batch to its longest). Returns (sequences, tokens each).
pub fn largest_micro_batch(examples: &[crate::data::TrainExample], batch_size: usize) -> (usize, usize) {
    let length = examples.iter().flat_map(|e| &e.seqs).map(|s| s.prompt.len() + s.response.len()).max().unwrap_or(0);
    let mut counts: Vec<usize> = examples.iter().map(|e| e.seqs.len()).collect();
    counts.sort_unstable_by(|a, b| b.cmp(a));
    (counts.iter().take(batch_size.max(1)).sum(), length)
}

/// Bytes as GB (10^9), one decimal; MB or kB below 1 GB.
pub fn gb(bytes: u64) -> String {
    match bytes {
        1_000_000_000.. => format!("{:.1} GB", bytes as f64 / 1e9),
        1_000_000.. => format!("{} MB", bytes / 1_000_000),
        _ => format!("{} kB", bytes.div_ceil(1000)),
    }
}

/// A parameter count as people write it: 1.71B, 135M, 0.8M.
pub fn count(n: u64) -> String {
    match n {
        1_000_000_000.. => format!("{:.2}B", n as f64 / 1e9),
        10_000_000.. => format!("{}M", n / 1_000_000),
        _ => format!("{:.1}M", n as f64 / 1e6),
    }
}

/// The parameters of the model: embeddings, the head when untied, every layer's projections,
/// biases and norms, the final norm.
pub fn parameters(m: &LlamaConfig) -> u64 {
    let (h, v) = (m.hidden_size as u64, m.vocab_size as u64);
    let head = if m.tie_word_embeddings { 0 } else { h * v };
    v * h + head + h + m.num_layers as u64 * layer_parameters(m)
}

fn layer_parameters(m: &LlamaConfig) -> u64 {
    let (h, i) = (m.hidden_size as u64, m.intermediate_size as u64);
    let (q, kv) = ((m.num_heads * m.head_dim) as u64, (m.num_kv_heads * m.head_dim) as u64);
    let mut n = h * q + 2 * h * kv + q * h + 3 * h * i;
    if m.qkv_bias {
        n += q + 2 * kv;
    }
    if m.o_bias {
        n += h;
    }
    n += if m.gemma_norms { 4 * h } else { 2 * h };
    if m.qk_norm {
        n += 2 * m.head_dim as u64;
    }
    n
}

/// Bytes of one element of the backend's compute type.
fn compute_bytes(b: &BackendConfig) -> u64 {
    match b.dtype {
        fuserl_core::backend::DType::F32 => 4,
        _ => 2,
    }
}

/// Bytes of one element of the master type (trained weights, gradients, moments).
fn master_bytes(b: &BackendConfig) -> u64 {
    match b.master_weights {
        MasterWeights::F32 => 4,
        MasterWeights::Bf16 => 2,
    }
}

/// Tensors of the MLP's width a layer holds: `swiglu` for SwiGLU (one operation,
/// `fuserl_kernels::swiglu`, that keeps only gate and up), `geglu` for GeGLU (Burn's element-wise
/// operations).
fn mlp_tensors(m: &LlamaConfig, swiglu: u64, geglu: u64) -> u64 {
    match m.hidden_act {
        fuserl_model::config::Activation::Silu => swiglu,
        fuserl_model::config::Activation::GeluTanh => geglu,
    }
}

/// Bytes one decoder layer keeps for its backward pass, per token of a micro-batch whose
/// sequences are `length` long (the attention part grows with it).
fn layer_activations_per_token(m: &LlamaConfig, c: u64, r: u64, length: u64) -> (u64, u64) {
    let (h, i) = (m.hidden_size as u64, m.intermediate_size as u64);
    let (q, kv) = ((m.num_heads * m.head_dim) as u64, (m.num_kv_heads * m.head_dim) as u64);
    // A norm: the f32 input when the residual is not f32, the normalised value (f32), its copy
    // in the compute type when that is not f32, and the output.
    let upcast = if r == 4 { 0 } else { 4 };
    let narrowed = if c == 4 { 0 } else { c };
    let norm = h * (upcast + 4 + narrowed + c);
    let norms = if m.gemma_norms { 4 * norm } else { 2 * norm };
    let qk_norms = if m.qk_norm { (q + kv) * (upcast + 4 + narrowed + c) } else { 0 };
    // q and k: the projection, its half-swapped copy and the rotation, and the f32 copy the
    // scores' matmul takes when the compute type is 16-bit; v as projected.
    let f32_copy = if c == 4 { 0 } else { 4 };
    let qkv = (q + kv) * (3 * c + f32_copy) + kv * c;
    // The attention's output (heads joined: a copy), o_proj's output in the residual's type
    // and the sum with the residual.
    let attn_out = q * c + 2 * h * r;
    // The MLP: gate, up and their mix (down's input), and for GeGLU (Burn's ops) the activation
    // and the intermediates its backward keeps; down's output and the residual sum.
    let mlp = mlp_tensors(m, 3, 5) * i * c + 2 * h * r;
    let dense = norms + qk_norms + qkv + attn_out + mlp;
    // Attention keeps no scores for the backward pass (it computes them again, tile by tile,
    // `fuserl_kernels::causal_attention`): each query row's largest score and log-sum (f32) per
    // head.
    let _ = length;
    let scores = m.num_heads as u64 * 2 * 4;
    (dense, scores)
}

/// Elements of one attention tile of a micro-batch of `sequences` x `length` tokens: query rows
/// are cut so that a tile's scores are at most `fuserl_kernels::DEFAULT_MAX_ATTENTION_ELEMS` (one
/// row at least), the whole `[heads, seq, seq]` when they fit. None on a GPU device running the
/// attention kernel, whose scores live in registers (its `dO . O` per row is counted with the
/// statistics).
fn attention_tile(m: &LlamaConfig, b: &BackendConfig, sequences: u64, length: u64) -> u64 {
    if b.device != Device::Cpu && b.attention == AttentionPath::Kernel {
        return 0;
    }
    let row = sequences * m.num_heads as u64 * length;
    let bound = (fuserl_kernels::DEFAULT_MAX_ATTENTION_ELEMS as u64).max(row);
    (row * length).min(bound)
}

/// The plan of a training stage.
pub fn plan(input: &PlanInput<'_>) -> MemoryPlan {
    let m = input.model;
    let b = input.backend;
    let (c, mb) = (compute_bytes(b), master_bytes(b));
    // The residual stream runs in the embeddings' type: the master type.
    let r = mb;
    let (h, v) = (m.hidden_size as u64, m.vocab_size as u64);
    let layers = m.num_layers as u64;
    let all = parameters(m);
    // With LoRA the trained parameters are the adapters'; the base is frozen in the compute type,
    // its residual stream in the compute type too (the embeddings are the base's).
    let (p, frozen, r) = match input.lora {
        Some(l) => (lora_parameters(m, l), frozen_base_bytes(input, l, all, c), c),
        None => (all, 0, r),
    };
    // QLoRA: a chunk of the base dequantised where it is used (f32, and its copy in the compute
    // type), in the forward, the backward and the head's chunks.
    let quantized = input.lora.and_then(|l| l.quantize_base);
    let dequantised = if quantized.is_some() { (fuserl_kernels::DEFAULT_MAX_CHUNK_ELEMS as u64) * (4 + c) } else { 0 };
    let tokens = (input.sequences * input.length) as u64;
    let length = input.length as u64;
    let state = |grads: bool| {
        vec![
            Part { name: "frozen weights", bytes: frozen },
            Part { name: "trained weights", bytes: p * mb },
            Part { name: "gradients", bytes: if grads { p * mb } else { 0 } },
            Part { name: "AdamW moments", bytes: 2 * p * mb },
        ]
    };
    let lora = input.lora.is_some();
    let mixed = c != mb && !lora;
    // The largest trained parameter (updated last, with its temporaries): the embeddings, or with
    // LoRA an adapter's (`r x intermediate` at most).
    let embeddings =
        if lora { input.lora.map_or(0, |l| l.r as u64) * (m.intermediate_size as u64).max(h) } else { v * h };
    let layer = layer_parameters(m);

    let (dense, scores) = layer_activations_per_token(m, c, r, length);
    // Each adapter keeps its `x A` (`[tokens, r]`) for the backward pass; with dropout also its
    // mask and masked input (each `[tokens, in]`; counted at the widest input).
    let dense = dense
        + input.lora.map_or(0, |l| {
            let dropout = if l.dropout > 0.0 { 2 * (m.intermediate_size as u64).max(h) * c } else { 0 };
            lora_targets(l) * (l.r as u64 * c + dropout)
        });
    // Built once per micro-batch: the keys' padding bias (f32) and the rotary tables (cos and
    // sin for queries and keys, in the compute type).
    let tables = tokens
        * (4 + 2 * ((m.num_heads + m.num_kv_heads) * m.head_dim) as u64 * c)
        * if m.mixes_layer_types() { 2 } else { 1 };
    // Attention's working set, one tile at a time (f32): in the forward the scores with the
    // tile's bias written out and the probabilities; in the backward the probabilities again,
    // their gradient and the scores' (counted as four tiles).
    let tile = attention_tile(m, b, input.sequences as u64, length);
    let attention_forward = 3 * tile * 4;
    let attention_backward = 4 * tile * 4;
    // One layer's backward: the MLP's gradients (two the size of its intermediate) and the
    // attention tile's.
    let backward = tokens * 2 * m.intermediate_size as u64 * 4 + attention_backward;
    // The head: the final hidden states (last layer's output, and normalised in the compute
    // type), the head's gradient twice while its chunks are joined, the chunks themselves.
    let head_grad = if lora { 0 } else { embeddings * 4 * 2 };
    let logprobs = match b.logprobs {
        LogProbPath::Fused => tokens * h * (r + c) + 3 * (1u64 << 22).min(tokens * v) * 4,
        LogProbPath::Naive => tokens * h * (r + c) + 3 * tokens * v * 4,
    };

    let mut phases = Vec::new();
    if input.backend.device == Device::Cpu {
        // Loading, in the process's memory: a safetensors file is read whole (counted as f32, its
        // largest) and its tensors converted to f32 one at a time as the model takes them (the
        // model in its types and the tensor being converted: about one f32 copy).
        phases.push(Phase {
            name: "loading the model",
            parts: vec![
                // A GGUF file is read whole too; its blocks are copied out (QLoRA keeping them)
                // or dequantised to f32.
                Part { name: "checkpoint file", bytes: input.gguf_bytes.unwrap_or(all * 4) },
                Part {
                    name: "host copy",
                    bytes: match (quantized, input.gguf_bytes) {
                        (Some(fuserl_recipe::QuantizeBase::Gguf), Some(g)) => g,
                        _ => all * 4,
                    },
                },
            ],
        });
    }
    if let Some(seqs) = input.reference_sequences {
        // Inference, no graph: the reference's weights (loaded as the policy is), one layer's
        // working set at a time and the log-prob chunks.
        let t = (seqs * input.length) as u64;
        let working = attention_forward.max(3 * attention_tile(m, b, seqs as u64, length) * 4)
            + t * (mlp_tensors(m, 3, 4) * m.intermediate_size as u64 + 4 * h) * c;
        phases.push(Phase {
            name: "reference log-probs",
            parts: vec![
                Part { name: "reference weights", bytes: if lora { frozen + p * 4 } else { p * mb } },
                Part { name: "dequantised base chunk", bytes: dequantised },
                Part { name: "activations", bytes: working + t * h * (r + c) },
                Part { name: "log-probs", bytes: 3 * (1u64 << 22).min(t * v) * 4 },
            ],
        });
    }

    // Two moments of the backward pass hold the most. First, the head's backward: every
    // activation the layers keep is alive, and the head's gradient is being built (the
    // gradients of earlier micro-batches are held when `grad_accum` > 1). Then the end of the
    // layers' backward: every gradient is held, and only the last layer's recompute (with
    // checkpointing) or nothing of the activations (without) is left. Between the two,
    // activations are freed as gradients are made.
    let ckpt = input.config.gradient_checkpointing;
    let accumulated = input.config.grad_accum > 1;
    let mut forward = state(accumulated);
    let (kept, kept_scores, copies) = if ckpt {
        // Every layer's input, kept from a forward pass without a graph (one layer's attention
        // tile at a time while it runs).
        (layers * tokens * h * r, attention_forward, if mixed { embeddings * c } else { 0 })
    } else {
        (layers * tokens * dense, layers * tokens * scores + attention_forward, if mixed { p * c } else { 0 })
    };
    forward.push(Part { name: "compute copies", bytes: copies });
    forward.push(Part { name: "activations", bytes: kept + tables });
    forward.push(Part { name: "attention scores", bytes: kept_scores });
    forward.push(Part { name: "log-probs", bytes: logprobs + head_grad });
    forward.push(Part { name: "dequantised base chunk", bytes: dequantised });
    phases.push(Phase { name: "forward and the head's backward", parts: forward });

    let mut backward_end = state(true);
    // With checkpointing, one layer recomputed under autodiff (its weights cast once per
    // shard of the micro-batch when mixed: the CPU splits it over its cores).
    let (recomputed, recomputed_scores) = if ckpt { (tokens * dense, tokens * scores) } else { (0, 0) };
    backward_end.push(Part { name: "compute copies", bytes: if mixed && ckpt { 2 * layer * c } else { 0 } });
    backward_end.push(Part { name: "activations", bytes: recomputed + tables + backward });
    backward_end.push(Part { name: "attention scores", bytes: recomputed_scores });
    // With checkpointing the embeddings' gradient is finished last, in f32 (`add_rows` of every
    // token's row): a second copy of it when the master type is not f32.
    let embedding_grad = if ckpt && mb != 4 && !lora { embeddings * 4 } else { 0 };
    backward_end.push(Part { name: "embedding gradient (f32)", bytes: embedding_grad });
    backward_end.push(Part { name: "dequantised base chunk", bytes: dequantised });
    phases.push(Phase { name: "the layers' backward", parts: backward_end });

    // The optimiser: parameters are updated one at a time, each gradient freed after; the
    // embeddings come last, with f32 temporaries: the update's own two. With the lean option the
    // update runs in chunks of rows (`adamw::ROUNDED_CHUNK` values): a chunk's seven f32
    // temporaries (counted in `adamw::stochastic_round` while the first moment is rounded: the
    // new weight and second moment, and the rounding's five), and the new weight and moments,
    // chunk by chunk and then joined (twice their bf16 size).
    let temporaries = if mb == 4 {
        embeddings * 4 * 2
    } else {
        7 * 4 * embeddings.min(crate::adamw::ROUNDED_CHUNK as u64) + 2 * 3 * embeddings * mb
    };
    let mut update = state(false);
    update.push(Part { name: "gradients", bytes: embeddings * mb });
    update.push(Part { name: "optimiser temporaries", bytes: temporaries });
    phases.push(Phase { name: "optimiser step", parts: update });

    MemoryPlan { runtime: input.runtime, phases, parameters: p }
    // (`parameters`: the trained ones, the adapters' with LoRA.)
}

/// What generating answers is planned for: the `local` source, evaluation's own models, FusePO's
/// `target_samples`. `batch` answers at once (continuous batching keeps the batch full), prompts
/// of up to `prompt` tokens, up to `new_tokens` each.
#[derive(Clone, Copy, Debug)]
pub struct GenerationInput<'a> {
    /// The generating model's shapes.
    pub model: &'a LlamaConfig,
    /// `[backend]`: the compute type (the activations' and the KV cache's), the device.
    pub backend: &'a BackendConfig,
    /// Answers generated together (`batch_size`).
    pub batch: usize,
    /// The longest prompt, in tokens (`max_prompt_length`).
    pub prompt: usize,
    /// New tokens at most per answer.
    pub new_tokens: usize,
    /// Whether prompts may be admitted into finished rows while others still answer (more
    /// prompts than the batch holds).
    pub admissions: bool,
    /// Bytes of each weight as the model keeps them: the compute type's, or 2 for a checkpoint
    /// stored in bf16 that the CPU keeps in bf16 (`checkpoint::load_frozen`).
    pub weight_bytes: u64,
    /// Bytes of the checkpoint's weight files, read whole while the model is built (on the CPU
    /// they count; a GPU's memory holds only the model).
    pub file_bytes: u64,
    /// Memory already held: the process's on the CPU, the device runtime's on a GPU.
    pub runtime: u64,
}

/// The plan of generating answers (`fuserl_model::generate`), from what it keeps alive:
///
/// - **loading** (on the CPU): the weight files read whole and the model built from them;
/// - **the weights** as the model keeps them;
/// - **the KV cache**: keys and values of every layer, `[batch, kv_heads, columns, head_dim]` in
///   the compute type, whose buffers grow by a quarter (at least `CACHE_GROWTH` columns) each
///   time they are full until they hold the longest answer's span (prompt + new tokens), and one
///   layer's old buffers while a full one is replaced;
/// - **the prefill** of a whole batch of prompts, a layer at a time: the residual stream, q, k,
///   v, the MLP's intermediates, attention's tiles, and the new prompts' keys and values;
/// - **the logits** of each row's last position (f32, and their copy on the host).
pub fn generation_plan(input: &GenerationInput<'_>) -> MemoryPlan {
    let m = input.model;
    let c = compute_bytes(input.backend);
    let all = parameters(m);
    let weights = all * input.weight_bytes;
    let (batch, prompt) = (input.batch.max(1) as u64, input.prompt.max(1) as u64);
    let (prefilled, columns) = cache_columns(prompt, input.new_tokens as u64);
    let (h, i, v) = (m.hidden_size as u64, m.intermediate_size as u64, m.vocab_size as u64);
    let (q, kv) = ((m.num_heads * m.head_dim) as u64, (m.num_kv_heads * m.head_dim) as u64);
    let layers = m.num_layers as u64;
    let cache = |rows: u64, cols: u64| layers * 2 * rows * kv * cols * c;
    let logits = 2 * batch * v * 4;
    let cpu = input.backend.device == Device::Cpu;
    let bf16 = input.backend.dtype == fuserl_core::backend::DType::Bf16;
    // Attention's scores: none kept on the CPU in f32 or bf16, whose kernel scores a core's tile
    // of rows at a time (`fuserl_kernels::cpu_attention`), nor on a GPU running the attention
    // kernel; three tiles of Burn operations otherwise.
    let kernel = cpu && (c == 4 || bf16);
    let scores = |rows: u64, keys: u64| if kernel { 0 } else { 3 * attention_tile(m, input.backend, rows, keys) * 4 };
    // In bf16 on the CPU, the kernel works on one layer's q, k, v and output widened to f32 (and
    // the cache's view copied first, in bf16): `tokens` query rows over `keys` columns of `rows`.
    let widened_attention = |rows: u64, tokens: u64, keys: u64| {
        if cpu && bf16 { tokens * 2 * q * 4 + rows * 2 * kv * keys * (4 + 2) } else { 0 }
    };
    // One layer of a prefill of `rows` prompts: the residual and the normalised input, q, k, v and
    // their rotated copies, attention's output, and the MLP's gate, up and their mix (GeGLU's
    // activation too).
    let per_token = (3 * h + 2 * (q + kv) + kv + q + mlp_tensors(m, 3, 4) * i) * c;
    // On the CPU in 16 bits, a product of more than a few rows (`cpu_matmul::STREAM_ROWS`; fewer
    // stream the weight as it is) holds copies of its operands for its time: bf16 on a CPU with
    // AVX512-BF16 packs both in bf16 (`fuserl_kernels::cpu_bf16`); otherwise flex widens both and
    // the result to f32. The largest: the MLP's over `tokens`, or the head's weight over `rows`.
    let packs = fuserl_kernels::cpu_bf16::available() && bf16;
    let widened = |rows: u64, tokens: u64| {
        let stream = fuserl_kernels::cpu_matmul::STREAM_ROWS as u64;
        let product = |m: u64, k: u64, n: u64| {
            if m <= stream {
                0
            } else if packs {
                (m * k + k * n) * 2
            } else {
                (m * k + k * n + m * n) * 4
            }
        };
        if cpu && c == 2 { product(tokens, i, h).max(product(tokens, h, i)).max(product(rows, h, v)) } else { 0 }
    };
    let prefill = |rows: u64| {
        let tokens = rows * prompt;
        tokens * per_token + scores(rows, prompt) + widened(rows, tokens) + widened_attention(rows, tokens, prompt)
    };
    let mut phases = Vec::new();
    if input.backend.device == Device::Cpu {
        phases.push(Phase {
            name: "loading the model",
            parts: vec![
                Part { name: "checkpoint file", bytes: input.file_bytes },
                Part { name: "weights", bytes: weights },
            ],
        });
    }
    phases.push(Phase {
        name: "prefill",
        parts: vec![
            Part { name: "weights", bytes: weights },
            Part { name: "KV cache", bytes: cache(batch, prefilled) },
            Part { name: "activations", bytes: prefill(batch) },
            Part { name: "logits", bytes: logits },
        ],
    });
    let decoding = Part { name: "KV cache", bytes: cache(batch, columns) };
    phases.push(Phase {
        name: "decoding",
        parts: vec![
            Part { name: "weights", bytes: weights },
            decoding.clone(),
            Part { name: "KV cache growing", bytes: cache(batch, columns) / layers },
            Part {
                name: "activations",
                bytes: batch * per_token
                    + widened(batch, batch)
                    + widened_attention(batch, batch, columns)
                    + if kernel { 0 } else { 3 * batch * m.num_heads as u64 * columns * 4 },
            },
            Part { name: "logits", bytes: logits },
        ],
    });
    if input.admissions && batch > 1 {
        // Continuous batching: while one row still answers, the others' places take new prompts,
        // prefilled together (at most a quarter of the batch at a time) into a cache of their own
        // (every layer) and then written into the rows: the whole cache, the new prompts' cache
        // and their prefill at once.
        let rows = (batch - 1).min(fuserl_model::generate::admit_at_once(input.batch) as u64);
        phases.push(Phase {
            name: "admitting prompts into finished rows",
            parts: vec![
                Part { name: "weights", bytes: weights },
                decoding,
                Part { name: "new prompts' KV cache", bytes: cache(rows, prefilled) },
                Part { name: "activations", bytes: prefill(rows) },
                Part { name: "logits", bytes: logits },
            ],
        });
    }
    MemoryPlan { runtime: input.runtime, phases, parameters: 0 }
}

/// The columns of a KV cache's buffers after a prefill of `prompt` positions and after
/// `new_tokens` more (`fuserl_model::llama::LayerCache`): the prefill's buffers hold a quarter
/// more (at least `CACHE_GROWTH` columns); each decoding step but the last answer's token's
/// appends one position, and a full buffer is replaced by one a quarter longer than the cache
/// (at least `CACHE_GROWTH` columns more).
fn cache_columns(prompt: u64, new_tokens: u64) -> (u64, u64) {
    let growth = fuserl_model::llama::CACHE_GROWTH as u64;
    let prefilled = prompt + (prompt / 4).max(growth);
    let mut columns = prefilled;
    while columns < prompt + new_tokens.saturating_sub(1) {
        let len = columns + 1;
        columns = len + (len / 4).max(growth);
    }
    (prefilled, columns)
}

/// What to change when a generation plan does not fit: the settings that shrink its largest
/// parts, most effective first, named as the recipe names the batch, the new tokens and the
/// prompts' length (an empty batch name: a batch no setting sets).
pub fn generation_levers(
    plan: &MemoryPlan,
    input: &GenerationInput<'_>,
    [batch, new_tokens, prompt]: [&str; 3],
) -> Vec<String> {
    let phase = plan.peak_phase();
    let bytes = |name: &str| phase.parts.iter().filter(|p| p.name.starts_with(name)).map(|p| p.bytes).sum::<u64>();
    let mut levers = vec![
        (
            bytes("KV cache") + bytes("activations"),
            if batch.is_empty() {
                format!("a smaller `{new_tokens}` ({} now; the KV cache grows with it)", input.new_tokens)
            } else {
                format!(
                    "a smaller `{batch}` ({} now) or `{new_tokens}` ({} now; the KV cache grows with both)",
                    input.batch, input.new_tokens
                )
            },
        ),
        (bytes("activations"), format!("a smaller `{prompt}` ({} now)", input.prompt)),
    ];
    if compute_bytes(input.backend) == 4 {
        levers.push((
            (bytes("weights") + bytes("KV cache")) / 2,
            "`[backend] dtype = \"bf16\"` (weights and KV cache in half the bytes)".into(),
        ));
    }
    levers.sort_by_key(|(saved, _)| std::cmp::Reverse(*saved));
    let mut levers: Vec<String> = levers.into_iter().map(|(_, l)| l).collect();
    levers.push("a smaller model".into());
    levers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smollm2() -> LlamaConfig {
        let json = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":49152,"hidden_size":576,
            "intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,
            "rms_norm_eps":1e-5,"rope_theta":100000,"tie_word_embeddings":true,"max_position_embeddings":8192}"#;
        let v: serde_json::Value = serde_json::from_str(json).expect("json");
        LlamaConfig::from_json(&v, std::path::Path::new("config.json")).expect("config")
    }

    #[test]
    fn models_have_their_published_parameter_counts() {
        // transformers' num_parameters() of each model.
        assert_eq!(parameters(&smollm2()), 134_515_008);
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/configs");
        for (name, n) in
            [("qwen2.5-0.5b", 494_032_768), ("smollm2-1.7b", 1_711_376_384), ("llama-3.1-8b", 8_030_261_248)]
        {
            let config = LlamaConfig::from_file(&fixtures.join(name).join("config.json")).expect(name);
            assert_eq!(parameters(&config), n, "{name}");
        }
    }

    /// Generation's plan: an 8B Llama answering 32 prompts at once on a GPU in bf16, and on the
    /// CPU in f32.
    #[test]
    fn generating_with_an_8b_model_counts_its_kv_cache_and_names_the_batch_first() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/configs");
        let m = LlamaConfig::from_file(&fixtures.join("llama-3.1-8b/config.json")).expect("config");
        let backend = BackendConfig {
            device: Device::Cuda,
            dtype: fuserl_core::backend::DType::Bf16,
            ..BackendConfig::default()
        };
        let input = GenerationInput {
            model: &m,
            backend: &backend,
            batch: 32,
            prompt: 500,
            new_tokens: 500,
            admissions: false,
            weight_bytes: 2,
            file_bytes: 16_060_522_496,
            runtime: 1 << 30,
        };
        let p = generation_plan(&input);
        // No loading phase on a GPU (the files are read into host memory).
        assert_eq!(p.phases.iter().map(|x| x.name).collect::<Vec<_>>(), ["prefill", "decoding"]);
        let part = |p: &MemoryPlan, phase: &str, name: &str| {
            let phase = p.phases.iter().find(|x| x.name == phase).expect("phase");
            phase.parts.iter().find(|x| x.name == name).expect("part").bytes
        };
        // The prefill's buffers hold 500 + 125 columns; 499 decoding steps grow them 625 -> 782 ->
        // 978 -> 1223 (each full buffer replaced by a quarter more than it held, plus one).
        assert_eq!(cache_columns(500, 500), (625, 1223));
        assert_eq!(cache_columns(500, 1), (625, 625));
        assert_eq!(cache_columns(10, 100), (42, 141));
        // 32 layers x keys and values x 32 answers x 8 key-value heads x 128 x bf16.
        assert_eq!(part(&p, "decoding", "KV cache"), 32 * 2 * 32 * 8 * 128 * 1223 * 2);
        assert_eq!(part(&p, "prefill", "KV cache"), 32 * 2 * 32 * 8 * 128 * 625 * 2);
        assert_eq!(part(&p, "decoding", "weights"), 8_030_261_248 * 2);
        assert!(p.peak() > 21_000_000_000 && p.peak() < 24_000_000_000, "{}", p.summary());
        let levers =
            generation_levers(&p, &input, ["[eval] batch_size", "[eval] max_new_tokens", "[target] max_length"]);
        assert!(levers[0].starts_with("a smaller `[eval] batch_size` (32 now)"), "{levers:?}");
        // With more prompts than the batch, finished rows' places take new prompts while others
        // still answer: the whole cache and up to 8 new prompts' prefill at once (a quarter of the
        // batch at a time).
        let admitting = generation_plan(&GenerationInput { admissions: true, ..input });
        assert_eq!(admitting.peak_phase().name, "admitting prompts into finished rows");
        assert_eq!(
            part(&admitting, "admitting prompts into finished rows", "new prompts' KV cache"),
            32 * 2 * 8 * 8 * 128 * 625 * 2
        );
        assert!(admitting.peak() > 23_000_000_000 && admitting.peak() < 24_000_000_000, "{}", admitting.summary());
        // In f32 on the CPU, the loading phase holds the file and the model; the attention kernel
        // keeps no scores.
        let cpu = BackendConfig::default();
        let p = generation_plan(&GenerationInput { backend: &cpu, weight_bytes: 4, ..input });
        assert_eq!(p.phases[0].name, "loading the model");
        assert_eq!(p.phases[0].total(), 16_060_522_496 + 8_030_261_248 * 4);
        let levers =
            generation_levers(&p, &GenerationInput { backend: &cpu, ..input }, ["", "max_tokens", "max_prompt_length"]);
        assert!(levers.iter().any(|l| l.contains("bf16")) && levers.iter().all(|l| !l.contains("``")), "{levers:?}");
    }

    /// Issue #31: LoRA's trained parameters are PEFT's count (Llama-3.1-8B, r 16, all-linear:
    /// `print_trainable_parameters()` says 41,943,040), and an 8B target fits one 80 GB GPU with
    /// LoRA in bf16 (the base frozen, 16 GB) where full fine-tuning does not (128 GB of state).
    #[test]
    fn lora_counts_peft_parameters_and_fits_an_8b_target_on_80_gb() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/configs");
        let m = LlamaConfig::from_file(&fixtures.join("llama-3.1-8b/config.json")).expect("config");
        let lora: fuserl_recipe::LoraConfig = fuserl_core::config::parse_table(
            &toml::from_str("r = 16\nalpha = 32\ntarget_modules = \"all-linear\"").expect("toml"),
        )
        .expect("lora");
        assert_eq!(lora_parameters(&m, &lora), 41_943_040);
        let config: StageConfig = fuserl_core::config::parse_table(&toml::Table::new()).expect("defaults");
        let backend = BackendConfig {
            device: Device::Cuda,
            dtype: fuserl_core::backend::DType::Bf16,
            ..BackendConfig::default()
        };
        let input = |lora| PlanInput {
            model: &m,
            config: &config,
            backend: &backend,
            sequences: 8,
            length: 2048,
            reference_sequences: Some(16),
            runtime: 1 << 30,
            lora,
            gguf_bytes: None,
        };
        let with = plan(&input(Some(&lora)));
        let full = plan(&input(None));
        assert!(with.peak() < 80_000_000_000, "{}", with.summary());
        assert!(full.peak() > 128_000_000_000, "{}", full.summary());
        assert_eq!(with.parameters, 41_943_040);
        assert!(full.levers(&input(None)).iter().any(|l| l.starts_with("LoRA")));
        // QLoRA: the decoder's linear layers in Q4_K (144 bytes a 256-value block: 4.5 bits a
        // weight), the embeddings and the head in bf16.
        let mut qlora = lora.clone();
        qlora.quantize_base = Some(fuserl_recipe::QuantizeBase::Q4K);
        let (bytes, weights) = quantized_linear_bytes(&m, fuserl_model::quant::GgmlType::Q4K);
        assert_eq!(weights, 8_030_261_248 - 2 * 128_256 * 4096 - 4096 - 32 * 2 * 4096);
        assert_eq!(bytes, weights / 256 * 144);
        let frozen = |p: &MemoryPlan| {
            let phase = p.phases.iter().find(|x| x.name == "the layers' backward").expect("phase");
            phase.parts.iter().find(|x| x.name == "frozen weights").expect("frozen").bytes
        };
        let q = plan(&input(Some(&qlora)));
        assert_eq!(frozen(&q), bytes + (8_030_261_248 - weights) * 2);
        assert!(frozen(&q) * 2 < frozen(&with), "{} vs {}", q.summary(), with.summary());
        // A GGUF base counts the file's bytes.
        let mut gguf = lora.clone();
        gguf.quantize_base = Some(fuserl_recipe::QuantizeBase::Gguf);
        let g = plan(&PlanInput { gguf_bytes: Some(4_920_000_000), ..input(Some(&gguf)) });
        assert_eq!(frozen(&g), 4_920_000_000);
    }

    #[test]
    fn the_lean_option_halves_the_state_and_checkpointing_the_activations() {
        let m = smollm2();
        let config: StageConfig = fuserl_core::config::parse_table(&toml::Table::new()).expect("defaults");
        let input = |backend: &BackendConfig, config: &StageConfig| {
            plan(&PlanInput {
                model: &m,
                config,
                backend,
                sequences: 4,
                length: 512,
                reference_sequences: None,
                runtime: 0,
                lora: None,
                gguf_bytes: None,
            })
        };
        let full = BackendConfig::default();
        let f32_plan = input(&full, &config);
        let lean_backend = BackendConfig {
            dtype: fuserl_core::backend::DType::Bf16,
            master_weights: MasterWeights::Bf16,
            ..BackendConfig::default()
        };
        let lean = input(&lean_backend, &config);
        let state = |p: &MemoryPlan| {
            let end = p.phases.iter().find(|x| x.name == "the layers' backward").expect("phase");
            end.parts.iter().take(4).map(|x| x.bytes).sum::<u64>()
        };
        assert_eq!(state(&f32_plan), 16 * 134_515_008);
        assert_eq!(state(&lean), 8 * 134_515_008);
        let mut plain = config.clone();
        plain.gradient_checkpointing = false;
        let without = input(&full, &plain);
        assert!(without.peak() > f32_plan.peak() + 1_000_000_000, "{} vs {}", without.summary(), f32_plan.summary());
        let levers = without.levers(&PlanInput {
            model: &m,
            config: &plain,
            backend: &full,
            sequences: 4,
            length: 512,
            reference_sequences: None,
            runtime: 0,
            lora: None,
            gguf_bytes: None,
        });
        assert!(levers.iter().any(|l| l.contains("gradient_checkpointing")), "{levers:?}");
    }
}
