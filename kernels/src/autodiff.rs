//! `Autodiff<B>`: the log-prob, attention and quantised entry points become tracked operations
//! whose backward calls the inner backend's `*_bwd` (the log-prob forward keeps only the
//! log-sum-exp `[N]` and the inputs, which the graph holds anyway, never a softmax or logits);
//! so do `linear_matmul` (backward: `linear_matmul_bwd`), `swiglu` (`swiglu_bwd`) and `cast` (the
//! gradient cast back).

use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ops::{FloatTensor, IntTensor};

use crate::{AttentionMask, Chunks, LogProbBackend, QuantLayout, Want};

#[derive(Debug)]
struct TokenLogProbsBackward;

impl<B: LogProbBackend> Backward<B, 1> for TokenLogProbsBackward {
    type State = (NodeId, IntTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [parent] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (logits_id, targets, stats) = ops.state;
        if let Some(node) = parent {
            let logits: FloatTensor<B> = checkpointer.retrieve_node_output(logits_id);
            grads.register::<B>(node.id, B::token_logprobs_bwd(logits, targets, stats, grad));
        }
    }
}

#[derive(Debug)]
struct LinearLogProbsBackward;

impl<B: LogProbBackend> Backward<B, 2> for LinearLogProbsBackward {
    type State = (NodeId, NodeId, IntTensor<B>, FloatTensor<B>, Chunks);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [node_h, node_w] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (h_id, w_id, targets, stats, chunks) = ops.state;
        let hidden: FloatTensor<B> = checkpointer.retrieve_node_output(h_id);
        let weight: FloatTensor<B> = checkpointer.retrieve_node_output(w_id);
        let want = Want { hidden: node_h.is_some(), weight: node_w.is_some() };
        let (dh, dw) = B::linear_logprobs_bwd(hidden, weight, targets, stats, grad, chunks, want);
        if let (Some(node), Some(dh)) = (node_h, dh) {
            grads.register::<B>(node.id, dh);
        }
        if let (Some(node), Some(dw)) = (node_w, dw) {
            grads.register::<B>(node.id, dw);
        }
    }
}

#[derive(Debug)]
struct CastBackward;

impl<B: LogProbBackend> Backward<B, 1> for CastBackward {
    /// The input's dtype.
    type State = burn::tensor::DType;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [parent] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = parent {
            grads.register::<B>(node.id, B::cast(grad, ops.state));
        }
    }
}

#[derive(Debug)]
struct LinearMatmulBackward;

impl<B: LogProbBackend> Backward<B, 2> for LinearMatmulBackward {
    /// The input's and the weight's nodes.
    type State = (NodeId, NodeId);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (x_id, w_id) = ops.state;
        let x: FloatTensor<B> = checkpointer.retrieve_node_output(x_id);
        let w: FloatTensor<B> = checkpointer.retrieve_node_output(w_id);
        let want = Want { hidden: node_x.is_some(), weight: node_w.is_some() };
        let (dx, dw) = B::linear_matmul_bwd(x, w, grad, want);
        for (node, g) in [(node_x, dx), (node_w, dw)] {
            if let (Some(node), Some(g)) = (node, g) {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

#[derive(Debug)]
struct SwigluBackward;

impl<B: LogProbBackend> Backward<B, 2> for SwigluBackward {
    /// The gate's and up's nodes.
    type State = (NodeId, NodeId);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [node_gate, node_up] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (gate_id, up_id) = ops.state;
        let gate: FloatTensor<B> = checkpointer.retrieve_node_output(gate_id);
        let up: FloatTensor<B> = checkpointer.retrieve_node_output(up_id);
        let (dgate, dup) = B::swiglu_bwd(gate, up, grad);
        for (node, g) in [(node_gate, dgate), (node_up, dup)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

#[derive(Debug)]
struct AttentionBackward;

impl<B: LogProbBackend> Backward<B, 3> for AttentionBackward {
    /// The inputs' nodes, the key bias, the output and its log-sum-exp, the mask.
    type State = ([NodeId; 3], FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, AttentionMask);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        let ([q_id, k_id, v_id], key_bias, out, lse, mask) = ops.state;
        let q: FloatTensor<B> = checkpointer.retrieve_node_output(q_id);
        let k: FloatTensor<B> = checkpointer.retrieve_node_output(k_id);
        let v: FloatTensor<B> = checkpointer.retrieve_node_output(v_id);
        let (dq, dk, dv) = B::causal_attention_bwd((q, k, v), key_bias, out, lse, grad, mask);
        for (node, g) in ops.parents.into_iter().zip([dq, dk, dv]) {
            if let Some(node) = node {
                grads.register::<B>(node.id, g);
            }
        }
    }
}

#[derive(Debug)]
struct QuantMatmulBackward;

impl<B: LogProbBackend> Backward<B, 1> for QuantMatmulBackward {
    /// The weight's blocks (the input itself is not needed: the weight is frozen).
    type State = (IntTensor<B>, QuantLayout);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [parent] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (words, layout) = ops.state;
        if let Some(node) = parent {
            grads.register::<B>(node.id, B::quant_matmul_bwd(grad, words, layout));
        }
    }
}

#[derive(Debug)]
struct QuantLinearLogProbsBackward;

impl<B: LogProbBackend> Backward<B, 1> for QuantLinearLogProbsBackward {
    type State = (NodeId, IntTensor<B>, QuantLayout, IntTensor<B>, FloatTensor<B>, Chunks);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, checkpointer: &mut Checkpointer) {
        let [parent] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (h_id, words, layout, targets, stats, chunks) = ops.state;
        if let Some(node) = parent {
            let hidden: FloatTensor<B> = checkpointer.retrieve_node_output(h_id);
            let dh = B::quant_linear_logprobs_bwd(hidden, words, layout, targets, stats, grad, chunks);
            grads.register::<B>(node.id, dh);
        }
    }
}

impl<B: LogProbBackend, C: CheckpointStrategy> LogProbBackend for Autodiff<B, C> {
    fn causal_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        mask: AttentionMask,
    ) -> FloatTensor<Self> {
        let nodes = [q.node.clone(), k.node.clone(), v.node.clone()];
        let key_bias = Self::inner(key_bias);
        match AttentionBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let ids = [prep.checkpoint(&q), prep.checkpoint(&k), prep.checkpoint(&v)];
                let (out, lse) = B::causal_attention_fwd(q.primitive, k.primitive, v.primitive, key_bias.clone(), mask);
                prep.finish((ids, key_bias, out.clone(), lse, mask), out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::causal_attention_fwd(q.primitive, k.primitive, v.primitive, key_bias, mask).0)
            }
        }
    }

    fn max_chunk_elems(device: &Self::Device) -> usize {
        B::max_chunk_elems(device)
    }

    fn dequantizes_on_device(layout: QuantLayout) -> bool {
        B::dequantizes_on_device(layout)
    }

    fn dequantize_blocks(words: IntTensor<Self>, layout: QuantLayout) -> FloatTensor<Self> {
        Self::from_inner(B::dequantize_blocks(words, layout))
    }

    fn quant_matmul(x: FloatTensor<Self>, words: IntTensor<Self>, layout: QuantLayout) -> FloatTensor<Self> {
        match QuantMatmulBackward.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::quant_matmul(x.primitive, words.clone(), layout);
                prep.finish((words, layout), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::quant_matmul(x.primitive, words, layout)),
        }
    }

    fn quant_linear_logprobs(
        hidden: FloatTensor<Self>,
        words: IntTensor<Self>,
        layout: QuantLayout,
        targets: IntTensor<Self>,
        chunks: Chunks,
    ) -> FloatTensor<Self> {
        match QuantLinearLogProbsBackward.prepare::<C>([hidden.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let h_id = prep.checkpoint(&hidden);
                let (logp, stats) =
                    B::quant_linear_logprobs_fwd(hidden.primitive, words.clone(), layout, targets.clone(), chunks);
                prep.finish((h_id, words, layout, targets, stats, chunks), logp)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::quant_linear_logprobs_fwd(hidden.primitive, words, layout, targets, chunks).0)
            }
        }
    }

    fn host_shards(device: &Self::Device) -> usize {
        B::host_shards(device)
    }

    /// Here, as the default: under autodiff the graph's lock may be held inside `f`.
    fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
        f()
    }

    fn max_attention_elems(device: &Self::Device) -> usize {
        B::max_attention_elems(device)
    }

    fn add_rows(tensor: FloatTensor<Self>, ids: IntTensor<Self>, rows: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::from_inner(B::add_rows(Self::inner(tensor), ids, Self::inner(rows)))
    }

    fn write_rows(tensor: FloatTensor<Self>, r0: usize, rows: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::from_inner(B::write_rows(Self::inner(tensor), r0, Self::inner(rows)))
    }

    fn token_logprobs(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        match TokenLogProbsBackward.prepare::<C>([logits.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let logits_id = prep.checkpoint(&logits);
                let (logp, stats) = B::token_logprobs_fwd(logits.primitive, targets.clone());
                prep.finish((logits_id, targets, stats), logp)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::token_logprobs_fwd(logits.primitive, targets).0),
        }
    }

    /// A tracked operation whose backward casts the gradient back with the inner backend's cast.
    fn cast(x: FloatTensor<Self>, dtype: burn::tensor::DType) -> FloatTensor<Self> {
        use burn::tensor::TensorMetadata;
        let from = x.primitive.dtype();
        match CastBackward.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(from, B::cast(x.primitive, dtype)),
            OpsKind::UnTracked(prep) => prep.finish(B::cast(x.primitive, dtype)),
        }
    }

    /// A tracked operation whose backward is the inner backend's
    /// [`LogProbBackend::linear_matmul_bwd`] (the same products as Burn's cast and matmul, on
    /// the CPU fuserl's kernels where they apply); the weight is kept as it is (f32 master
    /// weights), not as a cast copy.
    fn linear_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        let nodes = [x.node.clone(), w.node.clone()];
        match LinearMatmulBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let x_id = prep.checkpoint(&x);
                let w_id = prep.checkpoint(&w);
                prep.finish((x_id, w_id), B::linear_matmul(x.primitive, w.primitive))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::linear_matmul(x.primitive, w.primitive)),
        }
    }

    /// A tracked operation whose backward is the inner backend's [`LogProbBackend::swiglu_bwd`],
    /// keeping `gate` and `up` (checkpointed as the graph keeps them).
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let nodes = [gate.node.clone(), up.node.clone()];
        match SwigluBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let gate_id = prep.checkpoint(&gate);
                let up_id = prep.checkpoint(&up);
                prep.finish((gate_id, up_id), B::swiglu(gate.primitive, up.primitive))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::swiglu(gate.primitive, up.primitive)),
        }
    }

    fn linear_logprobs(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        chunks: Chunks,
    ) -> FloatTensor<Self> {
        let nodes = [hidden.node.clone(), weight.node.clone()];
        match LinearLogProbsBackward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(mut prep) => {
                let h_id = prep.checkpoint(&hidden);
                let w_id = prep.checkpoint(&weight);
                let (logp, stats) = B::linear_logprobs_fwd(hidden.primitive, weight.primitive, targets.clone(), chunks);
                prep.finish((h_id, w_id, targets, stats, chunks), logp)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::linear_logprobs_fwd(hidden.primitive, weight.primitive, targets, chunks).0)
            }
        }
    }
}
