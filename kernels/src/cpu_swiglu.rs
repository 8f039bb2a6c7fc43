//! SwiGLU's `silu(gate) * up` and its backward on the CPU backend (issue #35), element by element
//! in one pass, on every core.
//!
//! Why: in Burn's ops the MLP's activation is a sigmoid (glibc's scalar `expf` per element), a
//! product for the SiLU and a product with `up`, each a pass with a buffer of its own, on one core
//! below flex's threshold; the backward adds five more. Profiled on an AMD EPYC, `expf` held 5%
//! of a bf16 DPO step after the log-prob head's exponentials were gone (`cpu_rows`), nearly all of
//! it here. The autodiff graph keeps `gate` and `up` (which the projections' products keep anyway)
//! rather than the sigmoid and the SiLU as well.
//!
//! bf16 values are computed in f32 and rounded where PyTorch's autocast rounds: the SiLU, the
//! product; in the backward `grad * up`, and each gradient. The exponential is
//! [`crate::cpu_attention::exp`] (within 2 units in the last place); results are Burn's up to that
//! and to the order of the products (tested against Burn's ops).

use rayon::prelude::*;

use crate::cpu_attention::{exp, vectorised};
use crate::cpu_bf16::Elem;

/// Elements per task.
const CHUNK: usize = 1 << 14;

/// A value the kernels take: f32, or bf16 computed in f32.
pub trait Value: Copy + Send + Sync + 'static {
    /// As f32 (exact).
    fn get(self) -> f32;
    /// `x` rounded to this type (to nearest, ties to even).
    fn put(x: f32) -> Self;
    /// `x` as this type would hold it, in f32.
    #[inline(always)]
    fn round(x: f32) -> f32 {
        Self::put(x).get()
    }
}

impl Value for f32 {
    #[inline(always)]
    fn get(self) -> f32 {
        self
    }
    #[inline(always)]
    fn put(x: f32) -> Self {
        x
    }
}

impl Value for half::bf16 {
    #[inline(always)]
    fn get(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
    #[inline(always)]
    fn put(x: f32) -> Self {
        half::bf16::from_bits(x.bf16_bits())
    }
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[inline(always)]
fn forward_with<T: Value>(out: &mut [T], gate: &[T], up: &[T]) {
    for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
        let g = g.get();
        *o = T::put(T::round(g * sigmoid(g)) * u.get());
    }
}

#[inline(always)]
fn backward_with<T: Value>(dgate: &mut [T], dup: &mut [T], (gate, up, grad): (&[T], &[T], &[T])) {
    for ((((dg, du), g), u), d) in dgate.iter_mut().zip(dup.iter_mut()).zip(gate).zip(up).zip(grad) {
        let (g, d) = (g.get(), d.get());
        let s = sigmoid(g);
        *du = T::put(d * T::round(g * s));
        let da = T::round(d * u.get());
        *dg = T::put(da * (s * (1.0 + g * (1.0 - s))));
    }
}

#[inline(always)]
fn forward_f32_with(out: &mut [f32], gate: &[f32], up: &[f32]) {
    forward_with(out, gate, up);
}

#[inline(always)]
fn forward_bf16_with(out: &mut [half::bf16], gate: &[half::bf16], up: &[half::bf16]) {
    forward_with(out, gate, up);
}

#[inline(always)]
fn backward_f32_with(dgate: &mut [f32], dup: &mut [f32], inputs: (&[f32], &[f32], &[f32])) {
    backward_with(dgate, dup, inputs);
}

#[inline(always)]
fn backward_bf16_with(
    dgate: &mut [half::bf16],
    dup: &mut [half::bf16],
    inputs: (&[half::bf16], &[half::bf16], &[half::bf16]),
) {
    backward_with(dgate, dup, inputs);
}

vectorised! {
    fn forward_f32(out: &mut [f32], gate: &[f32], up: &[f32]) = forward_f32_with;
}

vectorised! {
    fn forward_bf16(out: &mut [half::bf16], gate: &[half::bf16], up: &[half::bf16]) = forward_bf16_with;
}

vectorised! {
    fn backward_f32(dgate: &mut [f32], dup: &mut [f32], inputs: (&[f32], &[f32], &[f32])) = backward_f32_with;
}

vectorised! {
    fn backward_bf16(
        dgate: &mut [half::bf16],
        dup: &mut [half::bf16],
        inputs: (&[half::bf16], &[half::bf16], &[half::bf16])
    ) = backward_bf16_with;
}

/// The two element types, each with its vectorised chunk functions.
pub trait Kernels: Value {
    /// One chunk of [`forward`].
    fn forward_chunk(out: &mut [Self], gate: &[Self], up: &[Self]);
    /// One chunk of [`backward`].
    fn backward_chunk(dgate: &mut [Self], dup: &mut [Self], inputs: (&[Self], &[Self], &[Self]));
}

impl Kernels for f32 {
    fn forward_chunk(out: &mut [Self], gate: &[Self], up: &[Self]) {
        forward_f32(out, gate, up);
    }
    fn backward_chunk(dgate: &mut [Self], dup: &mut [Self], inputs: (&[Self], &[Self], &[Self])) {
        backward_f32(dgate, dup, inputs);
    }
}

impl Kernels for half::bf16 {
    fn forward_chunk(out: &mut [Self], gate: &[Self], up: &[Self]) {
        forward_bf16(out, gate, up);
    }
    fn backward_chunk(dgate: &mut [Self], dup: &mut [Self], inputs: (&[Self], &[Self], &[Self])) {
        backward_bf16(dgate, dup, inputs);
    }
}

/// `silu(gate) * up`, element by element (slices of one length).
pub fn forward<T: Kernels>(gate: &[T], up: &[T]) -> Vec<T> {
    assert_eq!(gate.len(), up.len(), "cpu_swiglu: gate and up differ in length");
    let mut out = vec![T::put(0.0); gate.len()];
    out.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(o, (g, u))| T::forward_chunk(o, g, u));
    out
}

/// The gradients of `gate` and `up` for the output gradient `grad`.
pub fn backward<T: Kernels>(gate: &[T], up: &[T], grad: &[T]) -> (Vec<T>, Vec<T>) {
    assert!(gate.len() == up.len() && up.len() == grad.len(), "cpu_swiglu: gate, up and grad differ in length");
    let (mut dgate, mut dup) = (vec![T::put(0.0); gate.len()], vec![T::put(0.0); gate.len()]);
    let inputs = gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)).zip(grad.par_chunks(CHUNK));
    dgate.par_chunks_mut(CHUNK).zip(dup.par_chunks_mut(CHUNK)).zip(inputs).for_each(|((dg, du), ((g, u), d))| {
        T::backward_chunk(dg, du, (g, u, d));
    });
    (dgate, dup)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(i: usize, seed: usize) -> f32 {
        ((i * 7919 + seed * 104_729) % 4001) as f32 / 4001.0 * 24.0 - 12.0
    }

    /// f64 SiLU and its derivative.
    fn silu(g: f64) -> (f64, f64) {
        let s = 1.0 / (1.0 + (-g).exp());
        (g * s, s * (1.0 + g * (1.0 - s)))
    }

    /// Within a few f32 roundings of the f64 values, past a chunk's end and at large |gate|.
    #[test]
    fn f32_matches_f64() {
        let n = CHUNK + 37;
        let mut gate: Vec<f32> = (0..n).map(|i| value(i, 1)).collect();
        gate[3] = 95.0;
        gate[4] = -95.0;
        let up: Vec<f32> = (0..n).map(|i| value(i, 2) / 4.0).collect();
        let grad: Vec<f32> = (0..n).map(|i| value(i, 3) / 8.0).collect();
        let out = forward(&gate, &up);
        let (dg, du) = backward(&gate, &up, &grad);
        for i in 0..n {
            let (g, u, d) = (f64::from(gate[i]), f64::from(up[i]), f64::from(grad[i]));
            let (a, da) = silu(g);
            // Relative to the terms' size: SiLU's derivative `s (1 + g (1 - s))` cancels near -1.28.
            let close = |got: f32, want: f64, scale: f64, what: &str| {
                let tol = 1e-6 * (want.abs() + scale) + 1e-30;
                assert!((f64::from(got) - want).abs() <= tol, "{what}[{i}]: {got} against {want} (gate {g})");
            };
            close(out[i], a * u, 0.0, "out");
            close(du[i], d * a, 0.0, "dup");
            close(dg[i], d * u * da, (d * u).abs(), "dgate");
        }
    }

    /// bf16 within its roundings of the f64 values rounded where autocast rounds.
    #[test]
    fn bf16_matches_f64_with_its_roundings() {
        use half::bf16;
        let n = 1000;
        let r = |x: f32| bf16::from_f32(x);
        let gate: Vec<bf16> = (0..n).map(|i| r(value(i, 4))).collect();
        let up: Vec<bf16> = (0..n).map(|i| r(value(i, 5) / 4.0)).collect();
        let grad: Vec<bf16> = (0..n).map(|i| r(value(i, 6) / 8.0)).collect();
        let out = forward(&gate, &up);
        let (dg, du) = backward(&gate, &up, &grad);
        // Two roundings' worth of bf16 (2^-7 relative) beside each f64 value with the same
        // roundings (a value at a tie may round the other way in f32).
        let round = |x: f64| f64::from(bf16::from_f64(x).to_f32());
        for i in 0..n {
            let (g, u, d) = (f64::from(gate[i].to_f32()), f64::from(up[i].to_f32()), f64::from(grad[i].to_f32()));
            let (a, da) = silu(g);
            let close = |got: bf16, want: f64, scale: f64, what: &str| {
                let tol = 2f64.powi(-7) * (want.abs() + scale) + 1e-30;
                assert!((f64::from(got.to_f32()) - want).abs() <= tol, "{what}[{i}]: {got} against {want}");
            };
            close(out[i], round(a) * u, 0.0, "out");
            close(du[i], d * round(a), 0.0, "dup");
            close(dg[i], round(d * u) * da, 1e-3 * (d * u).abs(), "dgate");
        }
    }
}
