//! Peak memory and time of causal attention with its backward (the training use): fuserl's tiled
//! attention (`causal_attention`, its custom backward) against the path the model had before
//! (the `[batch, heads, seq, seq]` mask written out, f32 scores, `softmax`, Burn's autodiff).
//! One configuration per process, so that peaks do not mix:
//!
//! ```text
//! cargo bench --profile dev --workspace --bench attention -- --method tiled --t 4096 [--b 4] [--heads 32] [--kv-heads 32] [--d 64]
//! ```
//!
//! prints one JSON line; `scripts/bench-attention.sh` runs the grid of docs/benchmarks.md.
//! Peak memory: the growth of the process's peak resident set over one forward and backward
//! (the peak reset through `/proc/self/clear_refs` once the inputs exist). CPU only.

use std::time::Instant;

use burn::backend::Autodiff;
use burn::tensor::activation::softmax;
use burn::tensor::{DType, Tensor, TensorData};
use fuserl_kernels::causal_attention;

mod common;
use common::{reset_peak, rss, uniform};

type B = Autodiff<burn::backend::Flex>;

struct Args {
    method: String,
    b: usize,
    heads: usize,
    kv_heads: usize,
    t: usize,
    d: usize,
}

fn parse() -> Args {
    let mut a = Args { method: "tiled".into(), b: 4, heads: 32, kv_heads: 32, t: 4096, d: 64 };
    let argv: Vec<String> = std::env::args().skip(1).filter(|x| x != "--bench").collect();
    let mut it = argv.iter();
    while let Some(k) = it.next() {
        let val = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        let num = || val.parse::<usize>().unwrap_or_else(|_| panic!("{k}: expected a number, got {val}"));
        match k.as_str() {
            "--method" => a.method = val.clone(),
            "--b" => a.b = num(),
            "--heads" => a.heads = num(),
            "--kv-heads" => a.kv_heads = num(),
            "--t" => a.t = num(),
            "--d" => a.d = num(),
            _ => panic!("unknown argument {k}"),
        }
    }
    assert!(a.method == "tiled" || a.method == "materialised", "--method: tiled or materialised");
    assert!(a.heads.is_multiple_of(a.kv_heads), "--heads must be a multiple of --kv-heads");
    a
}

/// The model's attention before the tiled path: the mask written out for every head
/// (`[batch, heads, seq, seq]`, 0 or `f32::MIN`), f32 scores, softmax, Burn's autodiff.
fn materialised(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, rep: usize) -> Tensor<B, 4> {
    let [b, t, nh, d] = q.dims();
    let nkv = nh / rep;
    let mut bias = Vec::with_capacity(b * nh * t * t);
    for _ in 0..b * nh {
        for i in 0..t {
            bias.extend((0..t).map(|j| if j <= i { 0.0f32 } else { f32::MIN }));
        }
    }
    let bias = Tensor::<B, 4>::from_data(TensorData::new(bias, [b, nh, t, t]), &q.device());
    let q = q.reshape([b, t, nkv, rep, d]).permute([0, 2, 3, 1, 4]);
    let scores = q.matmul(k.unsqueeze_dim::<5>(2).swap_dims(3, 4)).reshape([b, nh, t, t]) + bias;
    let probs = softmax(scores, 3).reshape([b, nkv, rep, t, t]);
    probs.matmul(v.unsqueeze_dim::<5>(2)).permute([0, 3, 1, 2, 4]).reshape([b, t, nh, d])
}

fn main() {
    let a = parse();
    let device = Default::default();
    let (b, nh, nkv, t, d) = (a.b, a.heads, a.kv_heads, a.t, a.d);
    // q already scaled (1 / sqrt(d)), as the model hands it over.
    // The model's layouts: queries `[batch, seq, heads, dim]`, keys and values `[batch, kv_heads,
    // keys, dim]`.
    let q0 = Tensor::<burn::backend::Flex, 4>::from_data(
        TensorData::new(uniform(b * nh * t * d, 1, 1.7 / (d as f32).sqrt()), [b, t, nh, d]),
        &device,
    );
    let k0 = Tensor::<burn::backend::Flex, 4>::from_data(
        TensorData::new(uniform(b * nkv * t * d, 2, 1.7), [b, nkv, t, d]),
        &device,
    );
    let v0 = Tensor::<burn::backend::Flex, 4>::from_data(
        TensorData::new(uniform(b * nkv * t * d, 3, 1.0), [b, nkv, t, d]),
        &device,
    );
    let (rss0, _) = rss();
    reset_peak();
    let start = Instant::now();
    let q = Tensor::<B, 4>::from_inner(q0).require_grad();
    let k = Tensor::<B, 4>::from_inner(k0).require_grad();
    let v = Tensor::<B, 4>::from_inner(v0).require_grad();
    let out = if a.method == "tiled" {
        // The model's layout: queries and output `[batch, seq, heads, dim]`.
        let key_bias = Tensor::<B, 2>::zeros([b, t], (&device, DType::F32));
        causal_attention(q.clone(), k.clone(), v.clone(), key_bias, None)
    } else {
        materialised(q.clone(), k.clone(), v.clone(), nh / nkv)
    };
    let total = out.sum();
    let check: f32 = total.clone().into_scalar();
    let grads = total.backward();
    let sums: Vec<f32> = [&q, &k, &v].iter().map(|x| x.grad(&grads).map_or(0.0, |g| g.sum().into_scalar())).collect();
    let seconds = start.elapsed().as_secs_f64();
    let (_, hwm) = rss();
    #[allow(clippy::print_stdout)]
    {
        println!(
            "{{\"impl\": \"{}\", \"b\": {b}, \"heads\": {nh}, \"kv_heads\": {nkv}, \"t\": {t}, \"d\": {d}, \"seconds\": {seconds:.3}, \
             \"peak_rss_growth_bytes\": {}, \"check\": {check}, \"grad_sums\": {sums:?}}}",
            a.method,
            hwm.saturating_sub(rss0)
        );
    }
}
