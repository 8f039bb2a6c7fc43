//! Peak memory and time of causal attention with its backward (the training use): fuserl's tiled
//! attention (`causal_attention`, its custom backward) against the path the model had before
//! (the `[batch, heads, seq, seq]` mask written out, f32 scores, `softmax`, Burn's autodiff).
//! One configuration per process, so that peaks do not mix:
//!
//! ```text
//! cargo bench --profile dev --workspace --bench attention -- --method tiles --t 4096 [--b 4] [--heads 32] [--kv-heads 32] [--d 64] [--device cpu|wgpu] [--runs 1]
//! ```
//!
//! prints one JSON line; `scripts/bench-attention.sh` runs the grid of docs/benchmarks.md.
//! Peak memory: the growth of the process's peak resident set over one forward and backward
//! (the peak reset through `/proc/self/clear_refs` once the inputs exist); with `--runs N` the
//! step runs N times: the time is the last run's (the first one on a GPU backend also compiles
//! the kernels and tunes the matmuls), the peak over all of them. On the CPU `tiled` is
//! the plain-Burn path in tiles of query rows; with `--device wgpu` (feature `wgpu`) it is the
//! cubecl kernels on the plain cubecl backend, whose buffers are host memory on Mesa's lavapipe,
//! so that the resident set measures them too (on a real GPU it would not: the GPU check
//! reports device memory).

use std::time::Instant;

use burn::backend::Autodiff;
use burn::tensor::activation::softmax;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, ElementConversion, Tensor, TensorData};
use fuserl_kernels::{LogProbBackend, causal_attention};

mod common;
use common::{reset_peak, rss, uniform};

struct Args {
    method: String,
    b: usize,
    heads: usize,
    kv_heads: usize,
    t: usize,
    d: usize,
    device: String,
    runs: usize,
}

fn parse() -> Args {
    let mut a =
        Args { method: "tiled".into(), b: 4, heads: 32, kv_heads: 32, t: 4096, d: 64, device: "cpu".into(), runs: 1 };
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
            "--device" => a.device = val.clone(),
            "--runs" => a.runs = num().max(1),
            _ => panic!("unknown argument {k}"),
        }
    }
    assert!(
        ["kernel", "tiles", "tiled", "materialised"].contains(&a.method.as_str()),
        "--method: kernel, tiles (or tiled) or materialised"
    );
    assert!(a.heads.is_multiple_of(a.kv_heads), "--heads must be a multiple of --kv-heads");
    a
}

/// The model's attention before the tiled path: the mask written out for every head
/// (`[batch, heads, seq, seq]`, 0 or `f32::MIN`), f32 scores, softmax, Burn's autodiff.
fn materialised<B: AutodiffBackend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, rep: usize) -> Tensor<B, 4> {
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
    match a.device.as_str() {
        "cpu" => run::<Autodiff<burn::backend::Flex>>(&a, &Default::default()),
        #[cfg(feature = "wgpu")]
        "wgpu" => run::<Autodiff<fuserl_kernels::backends::PlainWgpu>>(&a, &Default::default()),
        other => panic!("--device {other}: cpu, or wgpu in a build with the `wgpu` feature"),
    }
}

fn run<B: AutodiffBackend + LogProbBackend>(a: &Args, device: &B::Device) {
    // `kernel`: the backend's attention kernel where it has one (the CPU has none: tiles).
    fuserl_kernels::use_attention_kernel(a.method == "kernel");
    let (b, nh, nkv, t, d) = (a.b, a.heads, a.kv_heads, a.t, a.d);
    // q already scaled (1 / sqrt(d)), as the model hands it over.
    // The model's layouts: queries `[batch, seq, heads, dim]`, keys and values `[batch, kv_heads,
    // keys, dim]`.
    let input = |n: usize, stream: u64, scale: f32, shape: [usize; 4]| {
        Tensor::<B, 4>::from_data(TensorData::new(uniform(n, stream, scale), shape), device)
    };
    let q0 = input(b * nh * t * d, 1, 1.7 / (d as f32).sqrt(), [b, t, nh, d]);
    let k0 = input(b * nkv * t * d, 2, 1.7, [b, nkv, t, d]);
    let v0 = input(b * nkv * t * d, 3, 1.0, [b, nkv, t, d]);
    // The inputs on the device before the peak is reset.
    let _ = (q0.clone().sum() + k0.clone().sum() + v0.clone().sum()).into_scalar();
    let mut all_seconds = Vec::new();
    let (mut check, mut sums, mut seconds) = (0.0f32, Vec::new(), 0.0);
    let (rss0, _) = rss();
    reset_peak();
    for _ in 0..a.runs {
        let start = Instant::now();
        let (q, k, v) = (q0.clone().require_grad(), k0.clone().require_grad(), v0.clone().require_grad());
        let out = if a.method != "materialised" {
            // The model's layout: queries and output `[batch, seq, heads, dim]`.
            let key_bias = Tensor::<B, 2>::zeros([b, t], (device, DType::F32));
            causal_attention(q.clone(), k.clone(), v.clone(), key_bias, None)
        } else {
            materialised(q.clone(), k.clone(), v.clone(), nh / nkv)
        };
        let total = out.sum();
        check = total.clone().into_scalar().elem();
        let grads = total.backward();
        sums = [&q, &k, &v].iter().map(|x| x.grad(&grads).map_or(0.0, |g| g.sum().into_scalar().elem())).collect();
        seconds = start.elapsed().as_secs_f64();
        all_seconds.push(format!("{seconds:.3}"));
    }
    let growth = rss().1.saturating_sub(rss0);
    #[allow(clippy::print_stdout)]
    {
        println!(
            "{{\"impl\": \"{}\", \"device\": \"{}\", \"b\": {b}, \"heads\": {nh}, \"kv_heads\": {nkv}, \"t\": {t}, \"d\": {d}, \"seconds\": {seconds:.3}, \
             \"every_run_seconds\": [{}], \"peak_rss_growth_bytes\": {growth}, \"check\": {check}, \"grad_sums\": {sums:?}}}",
            a.method,
            a.device,
            all_seconds.join(", "),
        );
    }
}
