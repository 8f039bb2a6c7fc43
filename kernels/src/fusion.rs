//! `Fusion<B>`: Burn's fusion backend (what `burn::backend::Wgpu` and `Cuda` are with Burn's
//! `fusion` feature) over a backend with the kernels. The element-wise work of the reference
//! paths (the quantised matmul's casts, the model around them) is fused by Burn; the operations
//! that have kernels on the inner backend (the per-token log-probs, the fused head, attention,
//! the dequantisation of quantised blocks) are registered in the fusion stream as custom
//! operations (`CustomOpIr`) whose execution calls the inner backend's method on its own
//! tensors. The autodiff wrapper (`Autodiff<Fusion<B>>`) is the generic one.

use core::fmt::Debug;

use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, Shape};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

use crate::{AttentionMask, Chunks, LogProbBackend, QuantLayout, Want};

type Handles<B> = HandleContainer<<<B as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle>;
type Tensor<B> = FusionTensor<<B as FusionBackend>::FusionRuntime>;

/// A custom operation: its inputs and outputs, its parameters, and what runs it on the inner
/// backend.
#[derive(Debug)]
struct Call<B: FusionBackend, P> {
    desc: CustomOpIr,
    params: P,
    run: fn(&CustomOpIr, &P, &mut Handles<B>),
}

impl<B: FusionBackend, P: Debug + Send + Sync> Operation<B::FusionRuntime> for Call<B, P> {
    fn execute(&self, handles: &mut Handles<B>) {
        (self.run)(&self.desc, &self.params, handles);
    }
}

/// Register `name` on `inputs` (the first one's client), with outputs of these shapes and dtypes.
fn custom<B: FusionBackend, P: Debug + Send + Sync + 'static>(
    name: &'static str,
    inputs: Vec<Tensor<B>>,
    outputs: &[(Shape, DType)],
    params: P,
    run: fn(&CustomOpIr, &P, &mut Handles<B>),
) -> Vec<Tensor<B>> {
    let client = inputs[0].client.clone();
    // The streams before the inputs become IR.
    let streams = OperationStreams::with_inputs(inputs.iter());
    let outs: Vec<TensorIr> = outputs
        .iter()
        .map(|(shape, dtype)| TensorIr::uninit(client.create_empty_handle(), shape.clone(), *dtype))
        .collect();
    let ins: Vec<TensorIr> = inputs.into_iter().map(FusionTensor::into_ir).collect();
    let desc = CustomOpIr::new(name, &ins, &outs);
    client.register(streams, OperationIr::Custom(desc.clone()), Call::<B, P> { desc, params, run })
}

fn pair<T: Debug>(v: Vec<T>) -> (T, T) {
    let [a, b]: [T; 2] = v.try_into().expect("two outputs");
    (a, b)
}

fn one<T: Debug>(v: Vec<T>) -> T {
    let [a]: [T; 1] = v.try_into().expect("one output");
    a
}

fn dims(t: &FusionTensor<impl FusionRuntime>) -> &[usize] {
    t.shape.as_slice()
}

/// The inner backend's per-row results `(logp [N], stats [2, N])` registered as the outputs.
fn put_lse<B: FusionBackend>(h: &mut Handles<B>, outs: &[TensorIr], (lp, st): (FloatTensor<B>, FloatTensor<B>)) {
    h.register_float_tensor::<B>(&outs[0].id, lp);
    h.register_float_tensor::<B>(&outs[1].id, st);
}

fn lse_outputs(n: usize) -> [(Shape, DType); 2] {
    [(Shape::new([n]), DType::F32), (Shape::new([2, n]), DType::F32)]
}

impl<B: FusionBackend + LogProbBackend> LogProbBackend for Fusion<B> {
    fn max_chunk_elems(device: &Self::Device) -> usize {
        B::max_chunk_elems(device)
    }

    fn max_attention_elems(device: &Self::Device) -> usize {
        B::max_attention_elems(device)
    }

    fn host_shards(device: &Self::Device) -> usize {
        B::host_shards(device)
    }

    fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
        B::in_pool(f)
    }

    fn dequantizes_on_device(layout: QuantLayout) -> bool {
        B::dequantizes_on_device(layout)
    }

    fn token_logprobs_fwd(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let n = dims(&logits)[0];
        let out =
            custom::<B, ()>("fuserl.token_logprobs_fwd", vec![logits, targets], &lse_outputs(n), (), |d, _, h| {
                let r =
                    B::token_logprobs_fwd(h.get_float_tensor::<B>(&d.inputs[0]), h.get_int_tensor::<B>(&d.inputs[1]));
                put_lse::<B>(h, &d.outputs, r);
            });
        pair(out)
    }

    fn token_logprobs_bwd(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        stats: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let out = [(logits.shape.clone(), logits.dtype)];
        one(custom::<B, ()>("fuserl.token_logprobs_bwd", vec![logits, targets, stats, grad], &out, (), |d, _, h| {
            let i = &d.inputs;
            let g = B::token_logprobs_bwd(
                h.get_float_tensor::<B>(&i[0]),
                h.get_int_tensor::<B>(&i[1]),
                h.get_float_tensor::<B>(&i[2]),
                h.get_float_tensor::<B>(&i[3]),
            );
            h.register_float_tensor::<B>(&d.outputs[0].id, g);
        }))
    }

    fn linear_logprobs_fwd(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        chunks: Chunks,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let n = dims(&hidden)[0];
        let inputs = vec![hidden, weight, targets];
        pair(custom::<B, Chunks>("fuserl.linear_logprobs_fwd", inputs, &lse_outputs(n), chunks, |d, chunks, h| {
            let i = &d.inputs;
            let r = B::linear_logprobs_fwd(
                h.get_float_tensor::<B>(&i[0]),
                h.get_float_tensor::<B>(&i[1]),
                h.get_int_tensor::<B>(&i[2]),
                *chunks,
            );
            put_lse::<B>(h, &d.outputs, r);
        }))
    }

    fn linear_logprobs_bwd(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        stats: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        chunks: Chunks,
        want: Want,
    ) -> (Option<FloatTensor<Self>>, Option<FloatTensor<Self>>) {
        if !want.hidden && !want.weight {
            return (None, None);
        }
        let mut outputs = Vec::new();
        if want.hidden {
            outputs.push((hidden.shape.clone(), hidden.dtype));
        }
        if want.weight {
            outputs.push((weight.shape.clone(), weight.dtype));
        }
        let inputs = vec![hidden, weight, targets, stats, grad];
        let mut out = custom::<B, (Chunks, Want)>(
            "fuserl.linear_logprobs_bwd",
            inputs,
            &outputs,
            (chunks, want),
            |d, (chunks, want), h| {
                let i = &d.inputs;
                let (dh, dw) = B::linear_logprobs_bwd(
                    h.get_float_tensor::<B>(&i[0]),
                    h.get_float_tensor::<B>(&i[1]),
                    h.get_int_tensor::<B>(&i[2]),
                    h.get_float_tensor::<B>(&i[3]),
                    h.get_float_tensor::<B>(&i[4]),
                    *chunks,
                    *want,
                );
                let mut o = d.outputs.iter();
                for g in [dh, dw].into_iter().flatten() {
                    h.register_float_tensor::<B>(&o.next().expect("an output a gradient").id, g);
                }
            },
        )
        .into_iter();
        let dh = want.hidden.then(|| out.next().expect("d hidden"));
        let dw = want.weight.then(|| out.next().expect("d weight"));
        (dh, dw)
    }

    fn causal_attention_fwd(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        key_bias: FloatTensor<Self>,
        mask: AttentionMask,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if !crate::attention_kernel() {
            // The tiles of Burn operations, fused by Burn.
            return crate::tiled_attention_fwd::<Self>(q, k, v, key_bias, &mask);
        }
        let [b, t, nh, _]: [usize; 4] = dims(&q).try_into().expect("q [batch, seq, heads, dim]");
        let outputs = [(q.shape.clone(), q.dtype), (Shape::new([2, b, nh, t]), DType::F32)];
        let inputs = vec![q, k, v, key_bias];
        pair(custom::<B, AttentionMask>("fuserl.causal_attention_fwd", inputs, &outputs, mask, |d, mask, h| {
            let i = &d.inputs;
            let (out, stats) = B::causal_attention_fwd(
                h.get_float_tensor::<B>(&i[0]),
                h.get_float_tensor::<B>(&i[1]),
                h.get_float_tensor::<B>(&i[2]),
                h.get_float_tensor::<B>(&i[3]),
                *mask,
            );
            h.register_float_tensor::<B>(&d.outputs[0].id, out);
            h.register_float_tensor::<B>(&d.outputs[1].id, stats);
        }))
    }

    fn causal_attention_bwd(
        (q, k, v): (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>),
        key_bias: FloatTensor<Self>,
        out: FloatTensor<Self>,
        stats: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        mask: AttentionMask,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        if !crate::attention_kernel() {
            return crate::tiled_attention_bwd::<Self>((q, k, v), key_bias, out, stats, grad, &mask);
        }
        let outputs = [(q.shape.clone(), q.dtype), (k.shape.clone(), k.dtype), (v.shape.clone(), v.dtype)];
        let inputs = vec![q, k, v, key_bias, out, stats, grad];
        let grads = custom::<B, AttentionMask>("fuserl.causal_attention_bwd", inputs, &outputs, mask, |d, mask, h| {
            let i = &d.inputs;
            let f = |n: usize, h: &mut Handles<B>| h.get_float_tensor::<B>(&i[n]);
            let qkv = (f(0, h), f(1, h), f(2, h));
            let (dq, dk, dv) = B::causal_attention_bwd(qkv, f(3, h), f(4, h), f(5, h), f(6, h), *mask);
            for (o, g) in d.outputs.iter().zip([dq, dk, dv]) {
                h.register_float_tensor::<B>(&o.id, g);
            }
        });
        let [dq, dk, dv]: [Tensor<B>; 3] = grads.try_into().expect("three gradients");
        (dq, dk, dv)
    }

    fn dequantize_blocks(words: IntTensor<Self>, layout: QuantLayout) -> FloatTensor<Self> {
        if !B::dequantizes_on_device(layout) {
            // The host path on the fusion backend itself (a read of the blocks, an upload).
            return crate::qweight::dequantize_on_host::<Self>(words, layout);
        }
        let out = [(Shape::new([dims(&words)[0], layout.cols]), DType::F32)];
        one(custom::<B, QuantLayout>("fuserl.dequantize_blocks", vec![words], &out, layout, |d, layout, h| {
            let v = B::dequantize_blocks(h.get_int_tensor::<B>(&d.inputs[0]), *layout);
            h.register_float_tensor::<B>(&d.outputs[0].id, v);
        }))
    }

    fn quant_linear_logprobs_fwd(
        hidden: FloatTensor<Self>,
        words: IntTensor<Self>,
        layout: QuantLayout,
        targets: IntTensor<Self>,
        chunks: Chunks,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if !B::dequantizes_on_device(layout) {
            return crate::qweight::logprobs_fwd::<Self>(&Self::row_ops(), hidden, (words, layout), targets, chunks);
        }
        let n = dims(&hidden)[0];
        let inputs = vec![hidden, words, targets];
        pair(custom::<B, (QuantLayout, Chunks)>(
            "fuserl.quant_linear_logprobs_fwd",
            inputs,
            &lse_outputs(n),
            (layout, chunks),
            |d, (layout, chunks), h| {
                let i = &d.inputs;
                let r = B::quant_linear_logprobs_fwd(
                    h.get_float_tensor::<B>(&i[0]),
                    h.get_int_tensor::<B>(&i[1]),
                    *layout,
                    h.get_int_tensor::<B>(&i[2]),
                    *chunks,
                );
                put_lse::<B>(h, &d.outputs, r);
            },
        ))
    }

    fn quant_linear_logprobs_bwd(
        hidden: FloatTensor<Self>,
        words: IntTensor<Self>,
        layout: QuantLayout,
        targets: IntTensor<Self>,
        stats: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        chunks: Chunks,
    ) -> FloatTensor<Self> {
        if !B::dequantizes_on_device(layout) {
            return crate::qweight::logprobs_bwd::<Self>(
                &Self::row_ops(),
                hidden,
                (words, layout),
                targets,
                stats,
                grad,
                chunks,
            );
        }
        let out = [(hidden.shape.clone(), hidden.dtype)];
        let inputs = vec![hidden, words, targets, stats, grad];
        one(custom::<B, (QuantLayout, Chunks)>(
            "fuserl.quant_linear_logprobs_bwd",
            inputs,
            &out,
            (layout, chunks),
            |d, (layout, chunks), h| {
                let i = &d.inputs;
                let dh = B::quant_linear_logprobs_bwd(
                    h.get_float_tensor::<B>(&i[0]),
                    h.get_int_tensor::<B>(&i[1]),
                    *layout,
                    h.get_int_tensor::<B>(&i[2]),
                    h.get_float_tensor::<B>(&i[3]),
                    h.get_float_tensor::<B>(&i[4]),
                    *chunks,
                );
                h.register_float_tensor::<B>(&d.outputs[0].id, dh);
            },
        ))
    }
}
