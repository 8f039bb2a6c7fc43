//! `Autodiff<B>`: the two entry points become tracked operations whose backward calls the inner
//! backend's `*_bwd`. The forward keeps only the log-sum-exp `[N]` (and the inputs, which the
//! graph holds anyway), never a softmax or logits.

use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ops::{FloatTensor, IntTensor};

use crate::{Chunks, LogProbBackend, Want};

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

impl<B: LogProbBackend, C: CheckpointStrategy> LogProbBackend for Autodiff<B, C> {
    fn max_chunk_elems(device: &Self::Device) -> usize {
        B::max_chunk_elems(device)
    }

    fn host_shards(device: &Self::Device) -> usize {
        B::host_shards(device)
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
