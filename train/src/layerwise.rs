//! Gradient checkpointing by decoder layer (`gradient_checkpointing = true`), what Hugging Face's
//! `gradient_checkpointing_enable()` does for a Llama: the forward pass runs without an autodiff
//! graph and keeps only each decoder layer's input; the backward pass walks the layers from the
//! last, re-runs one layer at a time under autodiff from its saved input, and back-propagates the
//! gradient that reached the layer's output. Activation memory is one layer's graph plus the
//! `layers + 1` hidden states, instead of every layer's graph; the price is a second forward pass
//! of the decoder.
//!
//! On the CPU a micro-batch is cut into shards (as many as the backend has threads, see
//! `LogProbBackend::host_shards`), each padded on its own and run on its own thread for the
//! graph-free forward and for each layer's backward; Burn's CPU backend runs most element-wise
//! kernels on the calling thread, so one shard alone keeps one core busy. Each shard re-runs
//! its layers on a copy of them whose parameters are fresh autodiff leaves (same ids, same
//! buffers), so the shards' graphs stay apart; their gradients are added in shard order, so a
//! run is reproducible on a given machine. The head (final norm and log-probs) runs once over
//! every shard's tokens, which keeps a single `[vocab, hidden]` gradient for its weight.
//!
//! The gradients are those of the whole graph: each layer sees the same inputs and the same
//! incoming gradient (floating-point sums may associate differently, e.g. the two contributions
//! to tied embeddings).

use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Int, Tensor, TensorData, TensorPrimitive};
use fuserl_core::backend::LogProbPath;
use fuserl_kernels::LogProbBackend;
use fuserl_model::llama::{DecoderLayer, Inputs, KeyMask, LayerContext, Llama, LlamaModel, Rope};
use fuserl_model::logprobs::hidden_logprobs;

use crate::data::{SeqTokens, padded_batch, score_targets};
use crate::error::{Result, TrainError};

/// One shard of a micro-batch between the phases of [`layerwise_backward`].
struct Shard<'a, B: AutodiffBackend> {
    seqs: &'a [SeqTokens],
    /// The shard's own copy of the decoder layers (fresh leaves); `None`: the model's own (one
    /// shard).
    layers: Option<Vec<DecoderLayer<B>>>,
    inputs: Inputs,
    context: Option<LayerContext<B>>,
    /// Each decoder layer's input, from the graph-free forward; popped by the backward.
    saved: Vec<Tensor<B::InnerBackend, 3>>,
    /// The gradient that reached the output of the layer to be back-propagated next.
    upstream: Option<Tensor<B::InnerBackend, 3>>,
    /// The key of the shard's LoRA dropout masks (the micro-batch's, and the index of the
    /// shard's first sequence in it): the same in the graph-free forward and in each layer's
    /// recomputation, and the same masks whatever the number of shards.
    dropout: fuserl_model::lora::DropoutKey,
}

/// Back-propagate `sum_i coef_i * logp_i` for one micro-batch, recomputing each decoder layer in
/// the backward pass, and add the parameters' gradients to `accumulator`. `coefficients` gets the
/// sequences' log-probs (sum over response tokens) and returns `coef` (`dL/dlogp`).
pub(crate) fn layerwise_backward<B: AutodiffBackend<InnerBackend: LogProbBackend> + LogProbBackend>(
    model: &LlamaModel<B>,
    seqs: &[SeqTokens],
    path: LogProbPath,
    dropout_key: u64,
    accumulator: &mut GradientsAccumulator<Llama<B>>,
    coefficients: impl FnOnce(&[f64]) -> Result<Vec<f32>>,
) -> Result<()> {
    let device = model.device();
    let shards = B::host_shards(&device).clamp(1, seqs.len().max(1));
    let plain = LlamaModel { config: model.config.clone(), weights: model.weights.valid(), dtype: model.dtype };
    let per_shard = seqs.len().div_ceil(shards).max(1);
    let states = seqs.chunks(per_shard).enumerate().map(|(i, part)| Shard {
        seqs: part,
        layers: (shards > 1).then(|| model.weights.layers.clone().map(&mut FreshLeaves)),
        inputs: padded_batch(part),
        context: None,
        saved: Vec::new(),
        upstream: None,
        dropout: fuserl_model::lora::DropoutKey { key: dropout_key, first_sequence: (i * per_shard) as u64 },
    });

    // Forward without a graph, keeping each layer's input. The rotary tables and the mask are
    // built once and shared by both passes.
    let states = parallel(states.collect(), |mut shard| {
        let context = model.layer_context(&shard.inputs, &shard.inputs.valid);
        let plain_context = without_graph(&context);
        let mut x = plain.embed(&shard.inputs);
        for layer in &plain.weights.layers {
            shard.saved.push(x.clone());
            x = fuserl_model::lora::with_dropout(shard.dropout, || layer.forward(x, &plain_context, None));
        }
        shard.context = Some(context);
        (shard, x)
    });

    // The head (final norm, log-probs) under autodiff from the last hidden states, once over
    // every shard's tokens (one gradient for the head's weight, not one per shard).
    let mut lasts = Vec::with_capacity(states.len());
    let mut hidden = Vec::with_capacity(states.len());
    let mut targets = Vec::with_capacity(states.len());
    for (shard, x) in &states {
        let last = Tensor::<B, 3>::from_inner(x.clone()).require_grad();
        let [b, t, h] = last.dims();
        let normed =
            fuserl_model::llama::in_dtype(model.weights.norm.forward(last.clone()), model.dtype).narrow(1, 0, t - 1);
        hidden.push(normed.reshape([b * (t - 1), h]));
        targets.push(score_targets(shard.seqs, &shard.inputs, &device).reshape([b * (t - 1)]));
        lasts.push(last);
    }
    let hidden = Tensor::cat(hidden, 0).unsqueeze_dim::<3>(0);
    let token_logps = hidden_logprobs(model, hidden, Tensor::cat(targets, 0).unsqueeze_dim(0), path);
    let mut sums = Vec::with_capacity(states.len());
    let mut offset = 0;
    for (shard, _) in &states {
        let [b, t] = [shard.seqs.len(), shard.inputs.ids[0].len() - 1];
        sums.push(token_logps.clone().narrow(1, offset, b * t).reshape([b, t]).sum_dim(1).reshape([b]));
        offset += b * t;
    }
    let logps = Tensor::cat(sums, 0);
    let host: Vec<f64> = logps.clone().into_data().iter::<f32>().map(f64::from).collect();
    let coef = coefficients(&host)?;
    let coef = Tensor::<B, 1>::from_data(TensorData::new(coef, [seqs.len()]), (&device, DType::F32));
    let mut grads = (logps * coef).sum().backward();
    let mut states: Vec<Shard<'_, B>> = states
        .into_iter()
        .zip(lasts)
        .map(|((mut shard, _), last)| {
            shard.upstream =
                Some(last.grad_remove(&mut grads).ok_or_else(|| missing("the gradient at the last hidden state"))?);
            Ok(shard)
        })
        .collect::<Result<_>>()?;
    accumulator.accumulate(&model.weights, GradientsParams::from_grads(grads, &model.weights));

    // The layers, last to first, each re-run from its input.
    for _ in 0..model.weights.layers.len() {
        let done = parallel(states, |mut shard| -> Result<(Shard<'_, B>, GradientsParams)> {
            let layers = shard.layers.as_deref().unwrap_or(&model.weights.layers);
            let context = shard.context.as_ref().ok_or_else(|| missing("a shard's layer context"))?;
            let input = shard.saved.pop().ok_or_else(|| missing("a decoder layer's saved input"))?;
            let upstream = shard.upstream.take().ok_or_else(|| missing("the gradient at a decoder layer's output"))?;
            let x = Tensor::<B, 3>::from_inner(input).require_grad();
            let layer = &layers[shard.saved.len()];
            let out = fuserl_model::lora::with_dropout(shard.dropout, || layer.forward(x.clone(), context, None));
            let mut grads = (out * Tensor::from_inner(upstream)).sum().backward();
            let params = GradientsParams::from_module(&mut grads, layer);
            shard.upstream = Some(x.grad_remove(&mut grads).ok_or_else(|| missing("the gradient at a layer's input"))?);
            Ok((shard, params))
        });
        states = Vec::with_capacity(done.len());
        for result in done {
            let (shard, params) = result?;
            accumulator.accumulate(&model.weights, params);
            states.push(shard);
        }
    }

    // Frozen embeddings (a LoRA stage's base): nothing more to add.
    if !model.weights.embed_tokens.val().is_require_grad() {
        return Ok(());
    }
    // The embeddings: each token's upstream row is added at its id into the embeddings'
    // gradient (which already holds the head's contribution when the head is tied to them), in
    // one pass for all shards and in place where the backend can (`LogProbBackend::add_rows`),
    // without autodiff's `[vocab, hidden]` zeros for the lookup's own gradient.
    let mut rows = Vec::with_capacity(states.len());
    let mut flat: Vec<i32> = Vec::new();
    for shard in states {
        let upstream = shard.upstream.ok_or_else(|| missing("the gradient at the embeddings' output"))?;
        let [b, t, h] = upstream.dims();
        let rows_f32 = upstream.reshape([b * t, h]).cast(DType::F32);
        // Gemma's embeddings are scaled by sqrt(hidden) on the way in (`LlamaModel::embed`): the
        // rows' gradient is scaled the same.
        rows.push(if model.config.gemma_norms {
            rows_f32.mul_scalar((model.config.hidden_size as f64).sqrt())
        } else {
            rows_f32
        });
        flat.extend(shard.inputs.ids.iter().flatten().map(|&i| i as i32));
    }
    let rows = Tensor::<B, 2>::from_inner(Tensor::cat(rows, 0));
    let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(flat, [rows.dims()[0]]), &device);
    let id = model.weights.embed_tokens.id;
    let mut all = accumulator.grads();
    let embed = all.remove::<B::InnerBackend, 2>(id).map_or_else(
        || Tensor::zeros(model.weights.embed_tokens.val().dims(), (&device, DType::F32)),
        |g| Tensor::<B, 2>::from_inner(g.cast(DType::F32)),
    );
    let sum = B::add_rows(embed.into_primitive().tensor(), ids.into_primitive(), rows.into_primitive().tensor());
    let dtype = model.weights.embed_tokens.val().dtype();
    all.register(id, Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(sum)).inner().cast(dtype));
    accumulator.accumulate(&model.weights, all);
    Ok(())
}

/// Runs `f` on each item, the first on this thread and the others each on its own thread, and
/// returns the results in the items' order.
fn parallel<S: Send, T: Send>(items: Vec<S>, f: impl Fn(S) -> T + Sync) -> Vec<T> {
    if items.len() <= 1 {
        return items.into_iter().map(f).collect();
    }
    std::thread::scope(|scope| {
        let mut items = items.into_iter();
        let first = items.next();
        let f = &f;
        let others: Vec<_> = items.map(|item| scope.spawn(move || f(item))).collect();
        let mut out: Vec<T> = first.into_iter().map(f).collect();
        for handle in others {
            out.push(handle.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)));
        }
        out
    })
}

/// Gives every trainable parameter a new autodiff leaf over the same buffer, keeping its id.
struct FreshLeaves;

impl<B: AutodiffBackend> ModuleMapper<B> for FreshLeaves {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let tensor = if tensor.is_require_grad() { Tensor::from_inner(tensor.inner()).require_grad() } else { tensor };
        Param::from_mapped_value(id, tensor, mapper)
    }
}

/// The same tables on the inner backend (shared buffers, no copy).
fn without_graph<B: AutodiffBackend>(c: &LayerContext<B>) -> LayerContext<B::InnerBackend> {
    let pair = |(cos, sin): &(Tensor<B, 4>, Tensor<B, 4>)| (cos.clone().inner(), sin.clone().inner());
    let rope = |r: &Rope<B>| Rope { queries: pair(&r.queries), keys: pair(&r.keys) };
    let mask = |m: &KeyMask<B>| KeyMask { key_bias: m.key_bias.clone().inner(), window: m.window };
    LayerContext {
        rope: rope(&c.rope),
        mask: mask(&c.mask),
        sliding: c.sliding.as_ref().map(|(r, m)| (rope(r), mask(m))),
        compute: c.compute,
    }
}

fn missing(what: &str) -> TrainError {
    TrainError::Data(format!("internal error: {what} is missing in the layer-wise backward pass"))
}
