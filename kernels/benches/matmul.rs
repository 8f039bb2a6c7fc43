//! A linear layer's product on the CPU as generation runs it: `x [m, k] @ w` for every weight of
//! a model in turn, so that the weights come from memory, not from cache (issue #35). Flex's
//! matmul (the gemm crate) against fuserl's kernel (`fuserl_kernels::cpu_matmul`, through
//! `linear_matmul`) with the weight in f32 and in bf16, on SmolLM2-135M's shapes:
//!
//! ```text
//! cargo bench --profile dev -p fuserl-kernels --bench matmul [-- --rows 1,8,32]
//! ```
//!
//! Prints one line per shape and path: GFLOP/s, the median of 5 passes over 30 layers' weights
//! (about 330 MB in f32).
//!
//! With `-- --train`, a training step's products instead (bf16 compute, `[backend] dtype =
//! "bf16"`): a linear layer's forward `x @ w`, its input's gradient `g @ w^T` and its weight's
//! `x^T @ g`, with 1024 tokens (the DPO benchmark's 2 pairs of 256), for flex in f32, flex in
//! bf16 (the f32 weight cast to bf16 first, then both operands widened to f32 by flex) and
//! fuserl's AVX512-BF16 kernel (`fuserl_kernels::cpu_bf16`, where the CPU has it: the f32 weight
//! rounded as it is packed), and the same on AMX tiles (`fuserl_kernels::cpu_amx`, where the CPU
//! has them).

use std::time::Instant;

use burn::backend::Flex;
use burn::tensor::{DType, Tensor, TensorData};
use fuserl_kernels::linear_matmul;

#[allow(dead_code)] // The memory probes are for the other benchmarks.
mod common;
use common::uniform;

#[allow(clippy::print_stdout)] // A benchmark prints its results.
fn main() {
    let argv: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
    let rows: Vec<usize> = argv
        .iter()
        .position(|a| a == "--rows")
        .and_then(|i| argv.get(i + 1))
        .map_or("1,8,32".into(), String::clone)
        .split(',')
        .map(|r| r.parse().expect("--rows: numbers separated by commas"))
        .collect();
    let device = Default::default();
    print_machine();
    if argv.iter().any(|a| a == "--train") {
        train_products();
        return;
    }
    let layers = 30;
    // (k, n, layout): q/o projections, the MLP's up and down, the tied head (`[vocab, hidden]`
    // transposed).
    let shapes = [(576, 576, "in-out"), (576, 1536, "in-out"), (1536, 576, "in-out"), (576, 49_152, "head")];
    for &(k, n, kind) in &shapes {
        let count = if kind == "head" { 2 } else { layers };
        let weights: Vec<Tensor<Flex, 2>> = (0..count)
            .map(|l| {
                let w = uniform(k * n, 100 + l as u64, 0.05);
                if kind == "head" {
                    Tensor::<Flex, 2>::from_data(TensorData::new(w, [n, k]), &device).transpose()
                } else {
                    Tensor::<Flex, 2>::from_data(TensorData::new(w, [k, n]), &device)
                }
            })
            .collect();
        let halves: Vec<Tensor<Flex, 2>> = weights.iter().map(|w| w.clone().cast(DType::BF16)).collect();
        for &m in &rows {
            let x = Tensor::<Flex, 2>::from_data(TensorData::new(uniform(m * k, 7, 1.0), [m, k]), &device);
            let flop = 2.0 * (m * k * n) as f64 * count as f64;
            let time = |f: &dyn Fn(&Tensor<Flex, 2>) -> Tensor<Flex, 2>, ws: &[Tensor<Flex, 2>]| {
                let pass = || {
                    let start = Instant::now();
                    for w in ws {
                        std::hint::black_box(f(w).into_primitive());
                    }
                    start.elapsed().as_secs_f64()
                };
                pass();
                let mut t: Vec<f64> = (0..5).map(|_| pass()).collect();
                t.sort_by(f64::total_cmp);
                flop / t[2] / 1e9
            };
            let flex = time(&|w| x.clone().matmul(w.clone()), &weights);
            let ours = time(&|w| linear_matmul(x.clone(), w.clone()), &weights);
            let ours_bf16 = time(&|w| linear_matmul(x.clone(), w.clone()), &halves);
            println!(
                "m {m:>3} k {k:>5} n {n:>6} ({kind}): flex f32 {flex:6.1} GFLOP/s, fuserl f32 {ours:6.1} ({:.2}x), fuserl bf16 weights {ours_bf16:6.1} ({:.2}x)",
                ours / flex,
                ours_bf16 / flex
            );
        }
    }
}

#[allow(clippy::print_stdout)]
fn print_machine() {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).unwrap_or("");
    let flags = info.lines().find(|l| l.starts_with("flags")).unwrap_or("");
    let wanted = ["avx2", "avx512f", "avx512_bf16", "amx_bf16"];
    let has: Vec<&str> = flags.split_whitespace().filter(|f| wanted.contains(f)).collect();
    println!(
        "machine: {} cores, {}; {}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        model.trim(),
        has.join(" ")
    );
}

/// One of a layer's products, of `(x, w, g)`.
type Product = Box<dyn Fn(&Tensor<Flex, 2>, &Tensor<Flex, 2>, &Tensor<Flex, 2>) -> Tensor<Flex, 2>>;

/// A row-major `[rows, cols]` matrix's view.
fn view(data: &[half::bf16], rows: usize, cols: usize) -> fuserl_kernels::cpu_bf16::View<'_, half::bf16> {
    fuserl_kernels::cpu_bf16::View { data, rows, cols, row_stride: cols, col_stride: 1 }
}

/// The median of 5 timings of `f` (after one untimed), in seconds.
fn median_time(f: &dyn Fn()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..5)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[2]
}

/// A training step's three products per linear layer shape, f32 and bf16 (see the module's
/// documentation).
#[allow(clippy::print_stdout)]
fn train_products() {
    let device = &Default::default();
    use fuserl_kernels::cpu_bf16;
    let tokens = 1024;
    for &(k, n) in &[(576, 576), (576, 1536), (1536, 576)] {
        let x = Tensor::<Flex, 2>::from_data(TensorData::new(uniform(tokens * k, 7, 1.0), [tokens, k]), device);
        let w = Tensor::<Flex, 2>::from_data(TensorData::new(uniform(k * n, 8, 0.05), [k, n]), device);
        let g = Tensor::<Flex, 2>::from_data(TensorData::new(uniform(tokens * n, 9, 1.0), [tokens, n]), device);
        let (xh, gh) = (x.clone().cast(DType::BF16), g.clone().cast(DType::BF16));
        let flop = 2.0 * (tokens * k * n) as f64;
        let rate = |t: f64| flop / t / 1e9;
        let products: [(&str, Product); 3] = [
            ("x @ w", Box::new(|x, w, _| x.clone().matmul(w.clone()))),
            ("g @ w^T", Box::new(|_, w, g| g.clone().matmul(w.clone().transpose()))),
            ("x^T @ g", Box::new(|x, _, g| x.clone().transpose().matmul(g.clone()))),
        ];
        let xv: Vec<half::bf16> = xh.to_data().to_vec().expect("bf16 values");
        let wv: Vec<f32> = w.to_data().to_vec().expect("f32 values");
        let gv: Vec<half::bf16> = gh.to_data().to_vec().expect("bf16 values");
        let ws = cpu_bf16::View { data: &wv[..], rows: k, cols: n, row_stride: n, col_stride: 1 };
        let (xs, gs) = (view(&xv, tokens, k), view(&gv, tokens, n));
        for (i, (name, f)) in products.iter().enumerate() {
            let f32_time = median_time(&|| drop(std::hint::black_box(f(&x, &w, &g).into_primitive())));
            // The weight is kept in f32 (master weights) and cast for each product, as Burn's
            // `linear_matmul` did before fuserl's kernel; fuserl's kernel rounds it as it packs.
            let bf16_time =
                median_time(&|| drop(std::hint::black_box(f(&xh, &w.clone().cast(DType::BF16), &gh).into_primitive())));
            type Matmul = for<'a> fn(cpu_bf16::View<'a, half::bf16>, cpu_bf16::View<'a, f32>) -> Vec<half::bf16>;
            type Gradient =
                for<'a> fn(cpu_bf16::View<'a, half::bf16>, cpu_bf16::View<'a, half::bf16>) -> Vec<half::bf16>;
            let timed = |with_w: Matmul, with_g: Gradient| {
                median_time(&|| {
                    let c = match i {
                        0 => with_w(xs, ws),
                        1 => with_w(gs, ws.t()),
                        _ => with_g(xs.t(), gs),
                    };
                    drop(std::hint::black_box(c));
                })
            };
            // `cpu_bf16::matmul` takes the AMX tiles where FUSERL_AMX=1 asks for them; `avx512`
            // says which it measured.
            let avx512 = !fuserl_kernels::cpu_amx::enabled();
            let ours = cpu_bf16::available().then(|| timed(cpu_bf16::matmul, cpu_bf16::matmul));
            #[cfg(target_arch = "x86_64")]
            let amx = fuserl_kernels::cpu_amx::available()
                .then(|| timed(fuserl_kernels::cpu_amx::matmul, fuserl_kernels::cpu_amx::matmul));
            #[cfg(not(target_arch = "x86_64"))]
            let amx: Option<f64> = None;
            println!(
                "{tokens} tokens, k {k:>4} n {n:>4}, {name:<8}: flex f32 {:6.1} GFLOP/s, flex bf16 {:6.1}, fuserl bf16{} {}, on AMX tiles {}",
                rate(f32_time),
                rate(bf16_time),
                if avx512 { "" } else { " (AMX: FUSERL_AMX=1)" },
                ours.map_or("(no AVX512-BF16 on this CPU)".into(), |t| format!(
                    "{:6.1} ({:.2}x flex f32, {:.2}x flex bf16)",
                    rate(t),
                    f32_time / t,
                    bf16_time / t
                )),
                amx.map_or("(none here)".into(), |t| format!(
                    "{:6.1} ({:.2}x flex f32, {:.2}x fuserl bf16)",
                    rate(t),
                    f32_time / t,
                    ours.map_or(f64::NAN, |o| o / t)
                ))
            );
        }
    }
}
