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
    let layers = 30;
    // (k, n, layout): q/o projections, the MLP's up and down, the tied head (`[vocab, hidden]`
    // transposed).
    let shapes = [(576, 576, "in-out"), (576, 1536, "in-out"), (1536, 576, "in-out"), (576, 49_152, "head")];
    println!(
        "machine: {} cores, {}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|c| c.lines().find(|l| l.starts_with("model name")).map(|l| l
                .split(':')
                .nth(1)
                .unwrap_or("")
                .trim()
                .to_string()))
            .unwrap_or_default()
    );
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
