//! Gradient checkpointing by decoder layer (`gradient_checkpointing = true`), what Hugging Face's
//! `gradient_checkpointing_enable()` does for a Llama: the forward pass runs without an autodiff
//! graph and keeps only each decoder layer's input; the backward pass walks the layers from the
//! last, re-runs one layer at a time under autodiff from its saved input, and back-propagates the
//! gradient that reached the layer's output. Activation memory is one layer's graph plus the
//! `layers + 1` hidden states, instead of every layer's graph; the price is a second forward pass
//! of the decoder.
//!
//! The gradients are those of the whole graph: each layer sees the same inputs and the same
//! incoming gradient (floating-point sums may associate differently, e.g. the two contributions
//! to tied embeddings).

use burn::module::AutodiffModule;
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, IndexingUpdateOp, Int, Tensor, TensorData};
use fuserl_core::recipe::LogProbPath;
use fuserl_kernels::LogProbBackend;
use fuserl_model::llama::{Inputs, LayerContext, Llama, LlamaModel, Rope};
use fuserl_model::logprobs::hidden_logprobs;

use crate::data::SeqTokens;
use crate::error::{Result, TrainError};
use crate::trainer::{padded_batch, score_targets};

/// Back-propagate `sum_i coef_i * logp_i` for one micro-batch, recomputing each decoder layer in
/// the backward pass, and add the parameters' gradients to `accumulator`. `coefficients` gets the
/// sequences' log-probs (sum over response tokens) and returns `coef` (`dL/dlogp`).
pub(crate) fn layerwise_backward<B: AutodiffBackend + LogProbBackend>(
    model: &LlamaModel<B>,
    seqs: &[SeqTokens],
    path: LogProbPath,
    accumulator: &mut GradientsAccumulator<Llama<B>>,
    coefficients: impl FnOnce(&[f64]) -> Result<Vec<f32>>,
) -> Result<()> {
    let inputs: Inputs = padded_batch(seqs);
    let (s, t) = (seqs.len(), inputs.ids[0].len());
    let device = model.device();

    // Forward without a graph, keeping each layer's input. The rotary tables and the mask are
    // built once and shared by both passes.
    let context = model.layer_context(&inputs, &inputs.valid);
    let plain = LlamaModel { config: model.config.clone(), weights: model.weights.valid(), dtype: model.dtype };
    let plain_context = without_graph(&context);
    let mut saved = Vec::with_capacity(plain.weights.layers.len());
    let mut x = plain.embed(&inputs);
    for layer in &plain.weights.layers {
        saved.push(x.clone());
        x = layer.forward(x, &plain_context, None);
    }
    drop(plain_context);

    // The head (final norm, log-probs) under autodiff from the last hidden state.
    let last = Tensor::<B, 3>::from_inner(x).require_grad();
    let hidden = model.weights.norm.forward(last.clone());
    let targets = score_targets(seqs, &inputs, &device);
    let logps = hidden_logprobs(model, hidden.narrow(1, 0, t - 1), targets, path).sum_dim(1).reshape([s]);
    let host: Vec<f64> = logps.clone().into_data().iter::<f32>().map(f64::from).collect();
    let coef = coefficients(&host)?;
    let coef = Tensor::<B, 1>::from_data(TensorData::new(coef, [s]), (&device, DType::F32));
    let mut grads = (logps * coef).sum().backward();
    let mut upstream = last.grad_remove(&mut grads).ok_or_else(|| missing("the last hidden state"))?;
    accumulator.accumulate(&model.weights, GradientsParams::from_grads(grads, &model.weights));

    // The layers, last to first, each re-run from its input.
    for (layer, input) in model.weights.layers.iter().zip(saved.drain(..)).rev() {
        let x = Tensor::<B, 3>::from_inner(input).require_grad();
        let y = layer.forward(x.clone(), &context, None);
        let mut grads = (y * Tensor::from_inner(upstream)).sum().backward();
        upstream = x.grad_remove(&mut grads).ok_or_else(|| missing("a decoder layer's input"))?;
        accumulator.accumulate(&model.weights, GradientsParams::from_module(&mut grads, layer));
    }

    // The embeddings: each token's upstream row is added at its id into the embeddings'
    // gradient (which already holds the head's contribution when the head is tied to them),
    // without autodiff's `[vocab, hidden]` zeros for the lookup's own gradient.
    let [b, _, h] = upstream.dims();
    let rows = upstream.reshape([b * t, h]).cast(DType::F32);
    let flat: Vec<i32> = inputs.ids.iter().flatten().map(|&i| i as i32).collect();
    let ids = Tensor::<B::InnerBackend, 1, Int>::from_data(TensorData::new(flat, [b * t]), &rows.device());
    let id = model.weights.embed_tokens.id;
    let mut all = accumulator.grads();
    let embed = all.remove::<B::InnerBackend, 2>(id).map_or_else(
        || Tensor::zeros(model.weights.embed_tokens.val().dims(), (&rows.device(), DType::F32)),
        |g| g.cast(DType::F32),
    );
    let dtype = model.weights.embed_tokens.val().dtype();
    all.register(id, embed.select_assign(0, ids, rows, IndexingUpdateOp::Add).cast(dtype));
    accumulator.accumulate(&model.weights, all);
    Ok(())
}

/// The same tables on the inner backend (shared buffers, no copy).
fn without_graph<B: AutodiffBackend>(c: &LayerContext<B>) -> LayerContext<B::InnerBackend> {
    let pair = |(cos, sin): &(Tensor<B, 4>, Tensor<B, 4>)| (cos.clone().inner(), sin.clone().inner());
    LayerContext {
        rope: Rope { queries: pair(&c.rope.queries), keys: pair(&c.rope.keys), rotate: c.rope.rotate.clone().inner() },
        bias: c.bias.clone().inner(),
    }
}

fn missing(what: &str) -> TrainError {
    TrainError::Data(format!("internal error: no gradient reached {what} in the layer-wise backward pass"))
}
