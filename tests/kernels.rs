//! Both operations, values and gradients, against an f64 oracle computed here on the host
//! (`log_softmax` and its gradient written out in f64), on the CPU (reference path) and, with
//! the `wgpu` feature, on a real wgpu device (the cubecl kernels, also compared with the
//! reference path on the same device). CI runs the wgpu half on Mesa's lavapipe.
//!
//! Tolerances: values within `2e-5 + 2e-9 V + 1e-6 |x|` (f32 sums of V exponentials: 2.8e-4 at
//! V = 128256, seen 1.5e-4 with Burn's sequential CPU sum), gradients within `2e-5 + 1e-5 |x|`
//! of the f64 oracle; the kernels within `1e-5 + 1e-6 |x|` of the reference path on the same
//! device (values: `2e-9 V` more); central finite differences (step 1e-2 in f32) within 2e-3.

use burn::backend::Autodiff;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Int, Tensor, TensorData};
use fuserl_kernels::reference::{self, Plain};
use fuserl_kernels::{Chunks, LogProbBackend, Want, linear_logprobs_chunked, token_logprobs};

/// Deterministic values in [-scale, scale).
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Targets in `0..v`, with every `pad_every`-th one a padding position (negative).
fn targets(n: usize, v: usize, pad_every: usize, seed: u64) -> Vec<i64> {
    values(n, seed, 1.0)
        .into_iter()
        .enumerate()
        .map(|(i, x)| {
            if pad_every > 0 && i % pad_every == pad_every - 1 {
                -100
            } else {
                ((x.abs() * v as f32) as i64).min(v as i64 - 1)
            }
        })
        .collect()
}

/// The oracle: log-probs and the gradient of `sum c_n logp_n` with respect to the logits.
fn oracle(logits: &[f64], v: usize, t: &[i64], c: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let mut logp = Vec::new();
    let mut grad = Vec::new();
    for (n, row) in logits.chunks(v).enumerate() {
        let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
        let live = t[n] >= 0;
        logp.push(if live { row[t[n] as usize] - lse } else { 0.0 });
        for (j, x) in row.iter().enumerate() {
            let onehot = if live && j as i64 == t[n] { 1.0 } else { 0.0 };
            grad.push(if live { f64::from(c[n]) * (onehot - (x - lse).exp()) } else { 0.0 });
        }
    }
    (logp, grad)
}

fn matmul_t(a: &[f32], b: &[f32], n: usize, v: usize, h: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * v];
    for i in 0..n {
        for j in 0..v {
            out[i * v + j] = (0..h).map(|k| f64::from(a[i * h + k]) * f64::from(b[j * h + k])).sum();
        }
    }
    out
}

#[track_caller]
fn close(what: &str, got: &[f32], want: &[f64], abs: f64, rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (f64::from(*g) - w).abs();
        assert!(err <= abs + rel * w.abs(), "{what}[{i}]: {g} vs {w} (error {err:e})");
    }
}

fn data<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().expect("f32 data")
}

fn int_tensor<B: Backend>(t: &[i64], device: &B::Device) -> Tensor<B, 1, Int> {
    Tensor::from_data(TensorData::new(t.to_vec(), [t.len()]), device)
}

fn tensor<B: Backend, const D: usize>(x: &[f32], shape: [usize; D], device: &B::Device) -> Tensor<B, D> {
    Tensor::from_data(TensorData::new(x.to_vec(), shape), device)
}

/// `token_logprobs`: values and the logits' gradient.
fn check_token<B: AutodiffBackend + LogProbBackend>(device: &B::Device, n: usize, v: usize, scale: f32, pad: usize) {
    let x = values(n * v, 1, scale);
    let t = targets(n, v, pad, 2);
    let c = values(n, 3, 1.0);
    let logits = tensor::<B, 2>(&x, [n, v], device).require_grad();
    let logp = token_logprobs(logits.clone(), int_tensor::<B>(&t, device));
    let grads = (logp.clone() * tensor::<B, 1>(&c, [n], device)).sum().backward();
    let (want_lp, want_grad) = oracle(&x.iter().map(|&a| f64::from(a)).collect::<Vec<_>>(), v, &t, &c);
    let what = format!("token n={n} v={v} scale={scale}");
    let got = data(logp);
    close(&format!("{what} logp"), &got, &want_lp, 2e-5 + 2e-9 * v as f64, 1e-6);
    close(&format!("{what} grad"), &data(logits.grad(&grads).expect("gradient")), &want_grad, 2e-5, 1e-5);
    assert!(t.iter().zip(&got).all(|(t, lp)| *t >= 0 || *lp == 0.0), "{what}: padding must give exactly 0");
}

/// `linear_logprobs`: values and the gradients of the hidden states and the weight.
fn check_linear<B: AutodiffBackend + LogProbBackend>(
    device: &B::Device,
    (n, v, h): (usize, usize, usize),
    chunks: Chunks,
    scale: f32,
    pad: usize,
) {
    let hid = values(n * h, 4, 1.0);
    let w = values(v * h, 5, scale);
    let t = targets(n, v, pad, 6);
    let c = values(n, 7, 1.0);
    let hidden = tensor::<B, 2>(&hid, [n, h], device).require_grad();
    let weight = tensor::<B, 2>(&w, [v, h], device).require_grad();
    let logp = linear_logprobs_chunked(hidden.clone(), weight.clone(), int_tensor::<B>(&t, device), chunks);
    let grads = (logp.clone() * tensor::<B, 1>(&c, [n], device)).sum().backward();
    let (want_lp, dlogits) = oracle(&matmul_t(&hid, &w, n, v, h), v, &t, &c);
    let mut want_dh = vec![0.0; n * h];
    let mut want_dw = vec![0.0; v * h];
    for i in 0..n {
        for j in 0..v {
            let d = dlogits[i * v + j];
            if d != 0.0 {
                for k in 0..h {
                    want_dh[i * h + k] += d * f64::from(w[j * h + k]);
                    want_dw[j * h + k] += d * f64::from(hid[i * h + k]);
                }
            }
        }
    }
    let what = format!("linear n={n} v={v} h={h} {chunks:?} scale={scale}");
    close(&format!("{what} logp"), &data(logp), &want_lp, 2e-5 + 2e-9 * v as f64, 1e-6);
    close(&format!("{what} d hidden"), &data(hidden.grad(&grads).expect("gradient")), &want_dh, 2e-5, 1e-5);
    close(&format!("{what} d weight"), &data(weight.grad(&grads).expect("gradient")), &want_dw, 2e-5, 1e-5);
}

/// Central finite differences of `sum c_n logp_n` against the analytic gradient.
fn check_finite_differences<B: AutodiffBackend + LogProbBackend>(device: &B::Device)
where
    B::InnerBackend: LogProbBackend,
{
    let (n, v, h) = (3, 7, 4);
    let hid = values(n * h, 8, 1.0);
    let w = values(v * h, 9, 1.0);
    let t = vec![2, -1, 6];
    let c = values(n, 10, 1.0);
    let chunks = Chunks { rows: 2, vocab: 3 };
    let f = |hid: &[f32], w: &[f32]| -> f64 {
        let lp = linear_logprobs_chunked(
            tensor::<B::InnerBackend, 2>(hid, [n, h], device),
            tensor::<B::InnerBackend, 2>(w, [v, h], device),
            int_tensor::<B::InnerBackend>(&t, device),
            chunks,
        );
        data(lp).iter().zip(&c).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum()
    };
    let hidden = tensor::<B, 2>(&hid, [n, h], device).require_grad();
    let weight = tensor::<B, 2>(&w, [v, h], device).require_grad();
    let logp = linear_logprobs_chunked(hidden.clone(), weight.clone(), int_tensor::<B>(&t, device), chunks);
    let grads = (logp * tensor::<B, 1>(&c, [n], device)).sum().backward();
    let (dh, dw) = (data(hidden.grad(&grads).expect("gradient")), data(weight.grad(&grads).expect("gradient")));
    let eps = 1e-2f32;
    for i in 0..n * h {
        let (mut up, mut down) = (hid.clone(), hid.clone());
        up[i] += eps;
        down[i] -= eps;
        let fd = (f(&up, &w) - f(&down, &w)) / f64::from(2.0 * eps);
        assert!((fd - f64::from(dh[i])).abs() < 2e-3, "d hidden[{i}]: finite differences {fd} vs {}", dh[i]);
    }
    for i in 0..v * h {
        let (mut up, mut down) = (w.clone(), w.clone());
        up[i] += eps;
        down[i] -= eps;
        let fd = (f(&hid, &up) - f(&hid, &down)) / f64::from(2.0 * eps);
        assert!((fd - f64::from(dw[i])).abs() < 2e-3, "d weight[{i}]: finite differences {fd} vs {}", dw[i]);
    }
}

/// Every case of the issue on one backend.
fn suite<B: AutodiffBackend + LogProbBackend>(device: &B::Device)
where
    B::InnerBackend: LogProbBackend,
{
    // Whole logits: ordinary, extreme (±1e4), N not a multiple of anything, padding.
    check_token::<B>(device, 5, 37, 3.0, 2);
    check_token::<B>(device, 9, 300, 1e4, 4);
    check_token::<B>(device, 3, 128_256, 5.0, 3);
    // Fused: V not a multiple of the chunk, several row chunks, padding, one chunk for all.
    check_linear::<B>(device, (13, 1000, 8), Chunks { rows: 5, vocab: 384 }, 1.0, 3);
    check_linear::<B>(device, (7, 50, 4), Chunks { rows: 7, vocab: 50 }, 2.0, 0);
    // Extreme logits: hidden in [-1, 1) times weights up to 5e3 over 4 dims.
    check_linear::<B>(device, (6, 257, 4), Chunks { rows: 4, vocab: 100 }, 5e3, 5);
    // The Llama-3 vocabulary, in chunks of the default plan.
    let plan = Chunks::plan(5, 128_256, 1 << 16);
    assert!(plan.vocab < 128_256 && 128_256 % plan.vocab != 0, "{plan:?}");
    check_linear::<B>(device, (5, 128_256, 4), plan, 1.0, 4);
    check_finite_differences::<B>(device);
}

/// Quantised weights (QLoRA's base, `fuserl_kernels::qweight`) on one backend: every ggml type
/// of `fixtures/gguf/quants.gguf` (real tensors of the Q4_K_M models and random blocks)
/// dequantises bit for bit as the host (ggml's reference code, itself bit for bit gguf-py's:
/// tests/model/quants.rs); `x W^T`, its gradient in `x` and the log-probs through a quantised
/// head equal the same operations on the dequantised weight (`1e-5 + 1e-5 |x|`: the same f32
/// matmuls, cut into other chunks), and the weight gets no gradient.
fn quant_suite<B: AutodiffBackend + LogProbBackend>(device: &B::Device, exact: bool)
where
    B::InnerBackend: LogProbBackend,
{
    use fuserl_kernels::{QuantLayout, dequantize, quant_linear_logprobs, quant_matmul};
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/gguf/quants.gguf");
    let g = fuserl_model::gguf::Gguf::read(&file).expect("fixture");
    let mut seen = 0;
    for t in g.tensors.iter().filter(|t| !t.name.ends_with(".expected")) {
        let (ty, raw) = g.raw(t).expect("blocks");
        let cols = t.dims[0] as usize;
        let Ok(layout) = QuantLayout::new(ty, cols) else { panic!("{}: {ty:?} x {cols}", t.name) };
        let rows = raw.len() / layout.row_bytes();
        let words = fuserl_kernels::qweight::upload::<B::InnerBackend>(layout, raw, device);
        let tracked = fuserl_kernels::qweight::upload::<B>(layout, raw, device);
        let host = g.dequantize(t).expect("host");
        let got = data(dequantize(words.clone(), layout));
        for (i, (a, b)) in got.iter().zip(&host).enumerate() {
            // NVRTC may fuse `x d + m` into one multiply-add (a rounding less): within 2^-22
            // there, bit for bit elsewhere.
            let same = a.to_bits() == b.to_bits() || (!exact && (a - b).abs() <= b.abs() * 2.4e-7 + 1e-30);
            assert!(same, "{} ({ty:?}) value {i}: backend {a}, host {b}", t.name);
        }
        // Some rows only (a narrow of the blocks).
        if rows > 2 {
            let part = data(dequantize(words.clone().narrow(0, 1, 2), layout));
            let want: Vec<f64> = host[cols..3 * cols].iter().map(|&v| f64::from(v)).collect();
            close(&format!("{}: rows 1..3", t.name), &part, &want, 1e-30, if exact { 0.0 } else { 2.4e-7 });
        }
        seen += 1;
        if rows < 4 {
            continue;
        }
        // The matmul and its gradient, against the dense weight (f32) on the same backend.
        let n = 5;
        let x_values = values(n * cols, seen, 1.0);
        let dense = tensor::<B, 2>(&host, [rows, cols], device);
        let x = tensor::<B, 2>(&x_values, [n, cols], device).require_grad();
        let c = tensor::<B, 2>(&values(n * rows, 100 + seen, 1.0), [n, rows], device);
        let y = quant_matmul(x.clone(), tracked.clone(), layout);
        let grads = (y.clone() * c.clone()).sum().backward();
        let dx = data(x.grad(&grads).expect("x's gradient"));
        let x2 = tensor::<B, 2>(&x_values, [n, cols], device).require_grad();
        let y2 = x2.clone().matmul(dense.clone().transpose());
        let grads2 = (y2.clone() * c).sum().backward();
        let want = |t: Tensor<B::InnerBackend, 2>| data(t).iter().map(|&v| f64::from(v)).collect::<Vec<f64>>();
        close(&format!("{} x W^T", t.name), &data(y.inner()), &want(y2.inner()), 1e-5, 1e-5);
        close(&format!("{} d x", t.name), &dx, &want(x2.grad(&grads2).expect("dense grad")), 1e-5, 1e-5);
        // A quantised head: log-probs and the hidden states' gradient.
        let ids = targets(n, rows, 3, 200 + seen);
        let h = tensor::<B, 2>(&x_values, [n, cols], device).require_grad();
        let lp = quant_linear_logprobs(h.clone(), tracked.clone(), layout, int_tensor::<B>(&ids, device));
        let grads = lp.clone().sum().backward();
        let h2 = tensor::<B, 2>(&x_values, [n, cols], device).require_grad();
        let lp2 = fuserl_kernels::linear_logprobs(h2.clone(), dense, int_tensor::<B>(&ids, device));
        let grads2 = lp2.clone().sum().backward();
        let want1 = |t: Tensor<B::InnerBackend, 1>| data(t).iter().map(|&v| f64::from(v)).collect::<Vec<f64>>();
        close(&format!("{} head logp", t.name), &data(lp.inner()), &want1(lp2.inner()), 1e-5, 1e-5);
        let dh = data(h.grad(&grads).expect("h's gradient"));
        close(&format!("{} head d h", t.name), &dh, &want(h2.grad(&grads2).expect("dense head grad")), 1e-5, 1e-5);
    }
    assert!(seen >= 11, "every type of the fixture: {seen}");
}

#[test]
fn quantised_weights_on_the_cpu() {
    quant_suite::<Autodiff<burn::backend::Flex>>(&Default::default(), true);
}

#[test]
fn cpu_reference_path_matches_the_oracle() {
    suite::<Autodiff<burn::backend::Flex>>(&Default::default());
}

#[test]
fn gradients_only_for_what_is_asked() {
    type B = burn::backend::Flex;
    let device = Default::default();
    let (n, v, h) = (4, 9, 3);
    let hidden = tensor::<B, 2>(&values(n * h, 1, 1.0), [n, h], &device);
    let weight = tensor::<B, 2>(&values(v * h, 2, 1.0), [v, h], &device);
    let t = int_tensor::<B>(&[1, 2, -1, 8], &device);
    let chunks = Chunks { rows: 3, vocab: 4 };
    let (_, stats) = reference::linear_fwd(&Plain, hidden.clone(), weight.clone(), t.clone(), chunks);
    let g = Tensor::<B, 1>::ones([n], &device);
    let only_h = reference::linear_bwd(
        &Plain,
        (hidden.clone(), weight.clone(), t.clone()),
        stats.clone(),
        g.clone(),
        chunks,
        Want { hidden: true, weight: false },
    );
    assert!(only_h.0.is_some() && only_h.1.is_none());
    let only_w =
        reference::linear_bwd(&Plain, (hidden, weight, t), stats, g, chunks, Want { hidden: false, weight: true });
    assert!(only_w.0.is_none() && only_w.1.is_some());
}

#[cfg(feature = "wgpu")]
mod wgpu {
    use super::*;
    use burn::backend::wgpu::WgpuDevice;

    /// The wgpu device, or a failure that says how to get one (CI installs lavapipe).
    fn device() -> WgpuDevice {
        let device = WgpuDevice::default();
        let probe = std::panic::catch_unwind(|| {
            Tensor::<fuserl_kernels::backends::PlainWgpu, 1>::ones([1], &device).into_data()
        });
        assert!(
            probe.is_ok(),
            "no wgpu adapter: install a Vulkan driver (on Debian: apt-get install mesa-vulkan-drivers libvulkan1, \
             Mesa's software lavapipe) or build without the `wgpu` feature"
        );
        device
    }

    /// The plain cubecl backend and (feature `fusion`) Burn's fusion backend over it, whose
    /// custom operations run the same kernels.
    #[test]
    fn kernels_match_the_oracle_and_the_reference_on_wgpu() {
        let device = device();
        on::<fuserl_kernels::backends::PlainWgpu>(&device);
        #[cfg(feature = "fusion")]
        on::<fuserl_kernels::backends::FusedWgpu>(&device);
    }

    fn on<Wgpu: LogProbBackend<Device = WgpuDevice>>(device: &WgpuDevice) {
        let device = device.clone();
        suite::<Autodiff<Wgpu>>(&device);
        attention_suite::<Autodiff<Wgpu>>(&device);
        kernel_vs_tiles::<Wgpu>(&device);
        quant_suite::<Autodiff<Wgpu>>(&device, true);

        // The kernels against the reference path, on the same device.
        let (n, v, h) = (300, 2_000, 16);
        let chunks = Chunks { rows: 128, vocab: 768 };
        let hidden = tensor::<Wgpu, 2>(&values(n * h, 11, 1.0), [n, h], &device);
        let weight = tensor::<Wgpu, 2>(&values(v * h, 12, 3.0), [v, h], &device);
        let t = int_tensor::<Wgpu>(&targets(n, v, 7, 13), &device);
        let g = tensor::<Wgpu, 1>(&values(n, 14, 1.0), [n], &device);
        let (k_lp, k_stats) = {
            let (lp, st) = <Wgpu as LogProbBackend>::linear_logprobs_fwd(
                hidden.clone().into_primitive().tensor(),
                weight.clone().into_primitive().tensor(),
                t.clone().into_primitive(),
                chunks,
            );
            (
                Tensor::<Wgpu, 1>::from_primitive(burn::tensor::TensorPrimitive::Float(lp)),
                Tensor::<Wgpu, 2>::from_primitive(burn::tensor::TensorPrimitive::Float(st)),
            )
        };
        let (r_lp, r_stats) = reference::linear_fwd(&Plain, hidden.clone(), weight.clone(), t.clone(), chunks);
        let r_lp64: Vec<f64> = data(r_lp).iter().map(|&x| f64::from(x)).collect();
        close("kernel vs reference logp", &data(k_lp), &r_lp64, 1e-5 + 2e-9 * v as f64, 1e-6);
        let r_st64: Vec<f64> = data(r_stats.clone()).iter().map(|&x| f64::from(x)).collect();
        close("kernel vs reference stats", &data(k_stats), &r_st64, 1e-5 + 2e-9 * v as f64, 1e-6);
        let want = Want { hidden: true, weight: true };
        let (kdh, kdw) = <Wgpu as LogProbBackend>::linear_logprobs_bwd(
            hidden.clone().into_primitive().tensor(),
            weight.clone().into_primitive().tensor(),
            t.clone().into_primitive(),
            r_stats.clone().into_primitive().tensor(),
            g.clone().into_primitive().tensor(),
            chunks,
            want,
        );
        let (rdh, rdw) = reference::linear_bwd(&Plain, (hidden, weight, t), r_stats, g, chunks, want);
        for (what, k, r) in
            [("d hidden", kdh.expect("dh"), rdh.expect("dh")), ("d weight", kdw.expect("dw"), rdw.expect("dw"))]
        {
            let r64: Vec<f64> = data(r).iter().map(|&x| f64::from(x)).collect();
            let k = Tensor::<Wgpu, 2>::from_primitive(burn::tensor::TensorPrimitive::Float(k));
            close(&format!("kernel vs reference {what}"), &data(k), &r64, 1e-5, 1e-6);
        }
    }
}

/// The attention kernel against the tiles of Burn operations (`[backend] attention = "tiles"`)
/// on the same device: forward, statistics and the three gradients, at shapes of several
/// blocks and tiles, with grouped heads, a window and padding.
fn kernel_vs_tiles<B: LogProbBackend>(device: &B::Device) {
    kernel_vs_tiles_at::<B>(device, (2, 6, 2, 90, 100, 32), Some(41), DType::F32);
    // Past the size where lavapipe lost the writes of the kernel's rolled loops (module
    // `cube_attention`): 520 rows at head_dim 64.
    kernel_vs_tiles_at::<B>(device, (1, 2, 1, 520, 520, 64), None, DType::F32);
    // Inputs in f16, which the kernel reads as they are and the tiles cast to f32: the same f32
    // arithmetic, outputs and gradients rounded to f16 (a unit in the last place apart at most).
    kernel_vs_tiles_at::<B>(device, (2, 6, 2, 90, 100, 32), Some(41), DType::F16);
}

fn kernel_vs_tiles_at<B: LogProbBackend>(
    device: &B::Device,
    shape: (usize, usize, usize, usize, usize, usize),
    window: Option<usize>,
    dtype: DType,
) {
    kernel_vs_tiles_padded::<B>(device, shape, window, dtype, 3);
}

/// As [`kernel_vs_tiles_at`], sequence `i` with `pad * i` leading padding keys (and some keys
/// masked further on).
fn kernel_vs_tiles_padded<B: LogProbBackend>(
    device: &B::Device,
    (b, nh, nkv, t, tk, d): (usize, usize, usize, usize, usize, usize),
    window: Option<usize>,
    dtype: DType,
    pad: usize,
) {
    use fuserl_kernels::{AttentionMask, tiled_attention_bwd, tiled_attention_fwd};
    let f = |x: Tensor<B, 4>| x.cast(dtype).into_primitive().tensor();
    let q = || f(tensor::<B, 4>(&values(b * t * nh * d, 41, 0.5), [b, t, nh, d], device));
    let k = || f(tensor::<B, 4>(&values(b * nkv * tk * d, 42, 1.5), [b, nkv, tk, d], device));
    let v = || f(tensor::<B, 4>(&values(b * nkv * tk * d, 43, 1.0), [b, nkv, tk, d], device));
    let g = || f(tensor::<B, 4>(&values(b * t * nh * d, 44, 1.0), [b, t, nh, d], device));
    let bias: Vec<f32> =
        (0..b * tk).map(|j| if j % tk < pad * (j / tk) || j % 37 == 5 { f32::MIN } else { 0.0 }).collect();
    let bias = || tensor::<B, 2>(&bias, [b, tk], device).into_primitive().tensor();
    let mask = AttentionMask { past: tk - t, window, rows: 16 };
    let back = |x| data(Tensor::<B, 4>::from_primitive(burn::tensor::TensorPrimitive::Float(x)));
    let (k_out, k_stats) = B::causal_attention_fwd(q(), k(), v(), bias(), mask);
    let (t_out, t_stats) = tiled_attention_fwd::<B>(q(), k(), v(), bias(), &mask);
    let kg = B::causal_attention_bwd((q(), k(), v()), bias(), t_out.clone(), t_stats.clone(), g(), mask);
    let tg = tiled_attention_bwd::<B>((q(), k(), v()), bias(), t_out.clone(), t_stats.clone(), g(), &mask);
    for (what, got, want) in
        [("out", k_out, t_out), ("stats", k_stats, t_stats), ("dq", kg.0, tg.0), ("dk", kg.1, tg.1), ("dv", kg.2, tg.2)]
    {
        let want: Vec<f64> = back(want).iter().map(|&x| f64::from(x)).collect();
        // f16: 2^-10 relative is one unit in the last place (the statistics stay f32).
        let tol = if dtype == DType::F32 || what == "stats" { 1e-5 } else { 2e-3 };
        close(&format!("attention kernel vs tiles {what} ({dtype:?})"), &back(got), &want, tol, tol);
    }
}

/// The CPU's attention kernel (`fuserl_kernels::cpu_attention`) against the tiles, and on keys and
/// values that are views of a longer cache (their rows strided, as generation's cache hands them).
#[test]
fn cpu_attention_kernel_matches_the_tiles() {
    let device = Default::default();
    kernel_vs_tiles::<burn::backend::Flex>(&device);
    kernel_vs_tiles_at::<burn::backend::Flex>(&device, (3, 9, 3, 1, 47, 64), None, DType::F32);
    kernel_vs_tiles_at::<burn::backend::Flex>(&device, (2, 4, 4, 33, 33, 16), Some(5), DType::F32);
    // A left-padded prefill whose second sequence's padding (140 keys) covers whole tiles of
    // query rows (64 rows a tile at 150 keys): those rows see no key and are uniform.
    kernel_vs_tiles_padded::<burn::backend::Flex>(&device, (2, 4, 2, 150, 150, 16), None, DType::F32, 140);
    type B = burn::backend::Flex;
    use fuserl_kernels::{AttentionMask, tiled_attention_fwd};
    let (b, nh, nkv, t, tk, cap, d) = (2, 6, 2, 3, 20, 32, 8);
    let q = || tensor::<B, 4>(&values(b * t * nh * d, 51, 0.5), [b, t, nh, d], &device).into_primitive().tensor();
    let cache = |seed| tensor::<B, 4>(&values(b * nkv * cap * d, seed, 1.0), [b, nkv, cap, d], &device);
    let (k, v) = (cache(52).slice([0..b, 0..nkv, 0..tk, 0..d]), cache(53).slice([0..b, 0..nkv, 0..tk, 0..d]));
    let bias: Vec<f32> = (0..b * tk).map(|j| if j == tk + 2 { f32::MIN } else { 0.0 }).collect();
    let bias = || tensor::<B, 2>(&bias, [b, tk], &device).into_primitive().tensor();
    let mask = AttentionMask { past: tk - t, window: None, rows: 2 };
    let back = |x| data(Tensor::<B, 4>::from_primitive(burn::tensor::TensorPrimitive::Float(x)));
    let (prim, kp, vp) = (|x: Tensor<B, 4>| x.into_primitive().tensor(), k.clone(), v.clone());
    let got = B::causal_attention_fwd(q(), prim(k), prim(v), bias(), mask);
    let want = tiled_attention_fwd::<B>(q(), prim(kp), prim(vp), bias(), &mask);
    for (what, got, want) in [("out", got.0, want.0), ("stats", got.1, want.1)] {
        let want: Vec<f64> = back(want).iter().map(|&x| f64::from(x)).collect();
        close(&format!("cpu attention on a cache's view: {what}"), &back(got), &want, 1e-5, 1e-5);
    }
}

/// On a CUDA GPU (kernels compiled at run time by NVRTC). Ignored by default because CI has no
/// GPU; `scripts/gpu-check.sh` runs it with `--include-ignored`.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn kernels_match_the_oracle_on_cuda() {
    let device = burn::backend::cuda::CudaDevice::new(0);
    on::<fuserl_kernels::backends::PlainCuda>(&device);
    #[cfg(feature = "fusion")]
    on::<fuserl_kernels::backends::FusedCuda>(&device);

    fn on<Cuda: LogProbBackend<Device = burn::backend::cuda::CudaDevice>>(device: &burn::backend::cuda::CudaDevice) {
        suite::<Autodiff<Cuda>>(device);
        attention_suite::<Autodiff<Cuda>>(device);
        kernel_vs_tiles::<Cuda>(device);
        quant_suite::<Autodiff<Cuda>>(device, false);
    }
}

/// Causal grouped-query attention in f64: `out[b][h][i]` and the gradients of
/// `sum(out * g)` with respect to q, k and v, with the mask written out (causal after `past`,
/// padding keys, sliding window). A row with no visible key is uniform, as the model's mask
/// (`f32::MIN` scores) makes it.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn attention_oracle(
    (q, k, v, g): (&[f32], &[f32], &[f32], &[f32]),
    (b, nh, nkv, t, tk, d): (usize, usize, usize, usize, usize, usize),
    key_valid: &[bool],
    window: Option<usize>,
) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
    let past = tk - t;
    let rep = nh / nkv;
    let at = |x: &[f32], heads: usize, len: usize, bi: usize, h: usize, i: usize, c: usize| {
        f64::from(x[((bi * heads + h) * len + i) * d + c])
    };
    let mut out = vec![0.0; b * nh * t * d];
    let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    for bi in 0..b {
        for h in 0..nh {
            let kh = h / rep;
            for i in 0..t {
                let qpos = past + i;
                let visible: Vec<bool> = (0..tk)
                    .map(|j| key_valid[bi * tk + j] && j <= qpos && window.is_none_or(|w| qpos - j < w))
                    .collect();
                let any = visible.iter().any(|x| *x);
                let s: Vec<f64> = (0..tk)
                    .map(|j| (0..d).map(|c| at(q, nh, t, bi, h, i, c) * at(k, nkv, tk, bi, kh, j, c)).sum())
                    .collect();
                // Visible keys share the softmax; with none visible, every key equally.
                let m = (0..tk).filter(|&j| visible[j] || !any).map(|j| s[j]).fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = (0..tk)
                    .map(|j| {
                        if visible[j] {
                            (s[j] - m).exp()
                        } else if any {
                            0.0
                        } else {
                            1.0
                        }
                    })
                    .collect();
                let z: f64 = e.iter().sum();
                let p: Vec<f64> = e.iter().map(|x| x / z).collect();
                let o = |c: usize| (0..tk).map(|j| p[j] * at(v, nkv, tk, bi, kh, j, c)).sum::<f64>();
                let row = (bi * nh + h) * t + i;
                for c in 0..d {
                    out[row * d + c] = o(c);
                }
                // Backward of sum(out * g) for this row.
                let go: Vec<f64> = (0..d).map(|c| f64::from(g[row * d + c])).collect();
                let dp: Vec<f64> =
                    (0..tk).map(|j| (0..d).map(|c| go[c] * at(v, nkv, tk, bi, kh, j, c)).sum()).collect();
                let delta: f64 = (0..tk).map(|j| p[j] * dp[j]).sum();
                for j in 0..tk {
                    let ds = if any && !visible[j] { 0.0 } else { p[j] * (dp[j] - delta) };
                    for c in 0..d {
                        dv[((bi * nkv + kh) * tk + j) * d + c] += p[j] * go[c];
                        dq[row * d + c] += ds * at(k, nkv, tk, bi, kh, j, c);
                        dk[((bi * nkv + kh) * tk + j) * d + c] += ds * at(q, nh, t, bi, h, i, c);
                    }
                }
            }
        }
    }
    (out, dq, dk, dv)
}

/// `causal_attention` on one case: values and the three gradients against the oracle, with the
/// tiles `rows` query rows high.
fn check_attention<B: AutodiffBackend + LogProbBackend>(
    device: &B::Device,
    (b, nh, nkv, t, tk, d): (usize, usize, usize, usize, usize, usize),
    key_valid: &[bool],
    window: Option<usize>,
    rows: usize,
) {
    let (qv, kv, vv, gv) = (
        values(b * nh * t * d, 31, 1.5),
        values(b * nkv * tk * d, 32, 1.5),
        values(b * nkv * tk * d, 33, 1.0),
        values(b * nh * t * d, 34, 1.0),
    );
    // q in the model's layout `[batch, seq, heads, dim]`, as a strided view of the oracle's.
    let q = tensor::<B, 4>(&qv, [b, nh, t, d], device).require_grad();
    let k = tensor::<B, 4>(&kv, [b, nkv, tk, d], device).require_grad();
    let v = tensor::<B, 4>(&vv, [b, nkv, tk, d], device).require_grad();
    let bias: Vec<f32> = key_valid.iter().map(|ok| if *ok { 0.0 } else { f32::MIN }).collect();
    let key_bias = tensor::<B, 2>(&bias, [b, tk], device);
    let mask = fuserl_kernels::AttentionMask { past: tk - t, window, rows };
    let out = Tensor::<B, 4>::from_primitive(burn::tensor::TensorPrimitive::Float(B::causal_attention(
        q.clone().swap_dims(1, 2).into_primitive().tensor(),
        k.clone().into_primitive().tensor(),
        v.clone().into_primitive().tensor(),
        key_bias.into_primitive().tensor(),
        mask,
    )))
    .swap_dims(1, 2);
    let grads = (out.clone() * tensor::<B, 4>(&gv, [b, nh, t, d], device)).sum().backward();
    let (want, dq, dk, dv) = attention_oracle((&qv, &kv, &vv, &gv), (b, nh, nkv, t, tk, d), key_valid, window);
    let what = format!("attention {:?} window {window:?} rows {rows}", (b, nh, nkv, t, tk, d));
    close(&format!("{what} out"), &data(out), &want, 1e-5, 1e-5);
    close(&format!("{what} dq"), &data(q.grad(&grads).expect("dq")), &dq, 1e-5, 1e-5);
    close(&format!("{what} dk"), &data(k.grad(&grads).expect("dk")), &dk, 1e-5, 1e-5);
    close(&format!("{what} dv"), &data(v.grad(&grads).expect("dv")), &dv, 1e-5, 1e-5);
}

/// Every case of issue #37's list on one backend: grouped-query heads, sliding windows,
/// padding (left-padded rows, whose first queries see no key), keys from a cache, lengths that
/// are multiples of nothing, tiles of one row, of several and of the whole sequence.
fn attention_suite<B: AutodiffBackend + LogProbBackend>(device: &B::Device) {
    // Two rows of 7 queries; the second left-padded by 3.
    let valid: Vec<bool> = (0..14).map(|i| !(7..10).contains(&i)).collect();
    for rows in [1, 3, 7] {
        check_attention::<B>(device, (2, 4, 2, 7, 7, 8), &valid, None, rows);
    }
    // Sliding window of 3 (Gemma 3's layers), multi-query (one key/value head for 3).
    check_attention::<B>(device, (2, 3, 1, 7, 7, 5), &valid, Some(3), 2);
    // Keys from a cache: 4 past keys, 5 queries, one padding key in the past.
    let cached: Vec<bool> = (0..9).map(|j| j != 1).collect();
    check_attention::<B>(device, (1, 2, 2, 5, 9, 4), &cached, Some(6), 2);
    // Longer than one block of the cubecl kernels' units (64 query rows, 64 keys) and than one
    // tile of staged keys (30 at head_dim 64), lengths that are multiples of nothing: several
    // blocks and tiles, some of them partial, a window across tile edges, padding keys inside.
    let long: Vec<bool> = (0..2 * 75).map(|j| !(75..80).contains(&j) && j != 40).collect();
    check_attention::<B>(device, (2, 4, 2, 70, 75, 16), &long, None, 16);
    let window: Vec<bool> = (0..67).map(|j| j != 3).collect();
    check_attention::<B>(device, (1, 2, 1, 67, 67, 64), &window, Some(20), 67);
}

#[test]
fn attention_matches_the_oracle_on_the_cpu() {
    attention_suite::<Autodiff<burn::backend::Flex>>(&Default::default());
}
