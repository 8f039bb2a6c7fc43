//! Time and peak memory of per-token log-probs with their backward (the training use): the fused
//! projection + log-prob against the naive Burn path (`matmul`, `log_softmax`, `gather`, Burn's
//! autodiff). One configuration per process, so that peaks do not mix:
//!
//! ```text
//! cargo bench --profile dev -p fuserl-kernels --features wgpu,cuda --bench logprobs -- --method fused --t 2048 --v 49152 [--h 576] [--device cpu|wgpu|cuda] [--reps 3]
//! ```
//!
//! prints one JSON line. `scripts/bench-logprobs.sh` runs the grid of docs/benchmarks.md,
//! with PyTorch (`scripts/bench_logprobs_torch.py`) measured the same way beside it.
//!
//! Peak memory: on the CPU, the growth of the process's peak resident set over the untimed and
//! the timed steps (the peak is reset through `/proc/self/clear_refs` once the inputs exist; the
//! PyTorch script does the same); on a GPU, the bytes the cubecl memory pool holds after the run (its high-water
//! mark, like `torch.cuda.max_memory_reserved`), after freeing its unused pages before it.

use std::time::Instant;

use burn::backend::Autodiff;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};
use fuserl_kernels::{LogProbBackend, linear_logprobs};

mod common;
use common::{reset_peak, rss, uniform};

struct Args {
    method: String,
    device: String,
    t: usize,
    v: usize,
    h: usize,
    reps: usize,
}

fn parse() -> Args {
    let mut a = Args { method: "fused".into(), device: "cpu".into(), t: 2048, v: 49_152, h: 576, reps: 3 };
    let argv: Vec<String> = std::env::args().skip(1).filter(|x| x != "--bench").collect();
    let mut it = argv.iter();
    while let Some(k) = it.next() {
        let val = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        let num = || val.parse::<usize>().unwrap_or_else(|_| panic!("{k}: expected a number, got {val}"));
        match k.as_str() {
            "--method" => a.method = val.clone(),
            "--device" => a.device = val.clone(),
            "--t" => a.t = num(),
            "--v" => a.v = num(),
            "--h" => a.h = num(),
            "--reps" => a.reps = num(),
            _ => panic!("unknown argument {k}"),
        }
    }
    assert!(a.method == "fused" || a.method == "naive", "--method: fused or naive");
    a
}

/// One forward and backward; returns the sum of the log-probs (the same for both methods).
fn step<B: AutodiffBackend + LogProbBackend>(
    method: &str,
    hidden: &Tensor<B::InnerBackend, 2>,
    weight: &Tensor<B::InnerBackend, 2>,
    targets: &Tensor<B, 1, Int>,
) -> f32 {
    let h = Tensor::<B, 2>::from_inner(hidden.clone()).require_grad();
    let w = Tensor::<B, 2>::from_inner(weight.clone()).require_grad();
    let logp = if method == "fused" {
        linear_logprobs(h.clone(), w.clone(), targets.clone())
    } else {
        let logits = h.clone().matmul(w.clone().transpose());
        log_softmax(logits, 1).gather(1, targets.clone().unsqueeze_dim(1)).squeeze_dim(1)
    };
    let total = logp.sum();
    let value = total.clone().into_scalar();
    let grads = total.backward();
    // Reading a sum of each gradient back waits for the device. Not the gradients themselves: a copy
    // of the LM head's `[V, H]` gradient on the host is no part of training (the optimiser uses it
    // where it is), and PyTorch's column leaves its gradients in place too.
    let _ = (h.grad(&grads).map(|g| g.sum().into_scalar()), w.grad(&grads).map(|g| g.sum().into_scalar()));
    use burn::tensor::ElementConversion;
    value.elem::<f32>()
}

fn run<B: AutodiffBackend + LogProbBackend>(
    a: &Args,
    device: &B::Device,
    pool: impl Fn() -> Option<u64>,
    cleanup: impl Fn(),
) {
    let hidden =
        Tensor::<B::InnerBackend, 2>::from_data(TensorData::new(uniform(a.t * a.h, 1, 1.7), [a.t, a.h]), device);
    let weight =
        Tensor::<B::InnerBackend, 2>::from_data(TensorData::new(uniform(a.v * a.h, 2, 0.09), [a.v, a.h]), device);
    let targets = Tensor::<B, 1, Int>::from_data(
        TensorData::new((0..a.t).map(|i| ((i * 7919) % a.v) as i64).collect::<Vec<_>>(), [a.t]),
        device,
    );
    // The peak resident set grows over the first step too: measured from here, it shows the
    // step's peak whatever the allocator keeps of freed memory afterwards (the fuserl binary's
    // glibc settings keep all of it, so the growth over the timed steps alone would be ~0).
    let (rss0, _) = rss();
    reset_peak();
    // A first step compiles (and on GPUs tunes) the kernels; it is not timed.
    let _ = step::<B>(&a.method, &hidden, &weight, &targets);
    cleanup();
    let mut times = Vec::new();
    let mut check = 0.0;
    for _ in 0..a.reps.max(1) {
        let start = Instant::now();
        check = step::<B>(&a.method, &hidden, &weight, &targets);
        times.push(start.elapsed().as_secs_f64());
    }
    let (_, hwm) = rss();
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let pool = pool().map_or("null".to_string(), |b| b.to_string());
    #[allow(clippy::print_stdout)]
    {
        println!(
            "{{\"impl\": \"fuserl-{}\", \"device\": \"{}\", \"t\": {}, \"v\": {}, \"h\": {}, \"seconds\": {:.4}, \
             \"peak_rss_growth_bytes\": {}, \"pool_bytes\": {}, \"threads\": {}, \"check\": {}}}",
            a.method,
            a.device,
            a.t,
            a.v,
            a.h,
            median,
            hwm.saturating_sub(rss0),
            pool,
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            check
        );
    }
}

fn main() {
    let a = parse();
    match a.device.as_str() {
        "cpu" => run::<Autodiff<burn::backend::Flex>>(&a, &Default::default(), || None, || ()),
        #[cfg(feature = "wgpu")]
        "wgpu" => {
            use cubecl::Runtime;
            let device = burn::backend::wgpu::WgpuDevice::default();
            let client = || cubecl::wgpu::WgpuRuntime::client(&device);
            run::<Autodiff<burn::backend::Wgpu>>(
                &a,
                &device,
                || client().memory_usage().ok().map(|u| u.bytes_reserved),
                || client().memory_cleanup(),
            );
        }
        #[cfg(feature = "cuda")]
        "cuda" => {
            use cubecl::Runtime;
            let device = burn::backend::cuda::CudaDevice::default();
            let client = || cubecl::cuda::CudaRuntime::client(&device);
            run::<Autodiff<burn::backend::Cuda>>(
                &a,
                &device,
                || client().memory_usage().ok().map(|u| u.bytes_reserved),
                || client().memory_cleanup(),
            );
        }
        other => panic!("device {other} is not compiled into this benchmark (features: wgpu, cuda)"),
    }
}
