//! AdamW as `torch.optim.AdamW` computes it (decoupled weight decay, bias-corrected moments,
//! `eps` added to `sqrt(v_hat)`), with its operations ordered so that a parameter's update needs
//! at most two temporaries of the parameter's size: every other buffer is updated in place
//! (the CPU backend writes into a tensor it holds the only reference to).
//!
//! Per parameter `p` with gradient `g` at step `t`:
//!
//! ```text
//! p <- p (1 - lr wd)
//! m <- b1 m + (1 - b1) g
//! v <- b2 v + (1 - b2) g^2
//! p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
//! ```
//!
//! Burn's own `AdamW` computes the same update (`m_hat / (sqrt(v_hat) + eps)`) but keeps up to
//! four parameter-sized temporaries and a second copy of the parameter alive at once; on the
//! 28M-element embeddings of SmolLM2 that difference is the step's peak memory.

use burn::module::AutodiffModule;
use burn::optim::SimpleOptimizer;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::record::Record;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Distribution, Tensor};

/// AdamW's settings.
#[derive(Debug, Clone, Copy)]
pub struct AdamW {
    /// First-moment decay.
    pub beta_1: f32,
    /// Second-moment decay.
    pub beta_2: f32,
    /// Added to the denominator.
    pub eps: f32,
    /// Decoupled weight decay (multiplied by the learning rate).
    pub weight_decay: f32,
}

/// One parameter's moments and step count.
#[derive(Record, Clone, Debug)]
pub struct AdamWState<B: Backend, const D: usize> {
    /// First moment.
    pub moment_1: Tensor<B, D>,
    /// Second moment.
    pub moment_2: Tensor<B, D>,
    /// Steps taken.
    pub time: usize,
}

impl AdamW {
    /// The optimiser for a whole module.
    pub fn init<B: AutodiffBackend, M: AutodiffModule<B>>(self) -> OptimizerAdaptor<Self, M, B> {
        OptimizerAdaptor::from(self)
    }
}

impl<B: Backend> SimpleOptimizer<B> for AdamW {
    type State<const D: usize> = AdamWState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: f64,
        param: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        let low = param.dtype();
        if low != DType::F32 {
            return self.step_rounded(lr, param, grad, state, low);
        }
        let (param, state) = self.update(lr, param, grad, state);
        (param, Some(state))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        AdamWState { moment_1: state.moment_1.to_device(device), moment_2: state.moment_2.to_device(device), ..state }
    }
}

impl AdamW {
    /// One update in the parameter's own dtype (f32 here).
    fn update<B: Backend, const D: usize>(
        &self,
        lr: f64,
        param: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<AdamWState<B, D>>,
    ) -> (Tensor<B, D>, AdamWState<B, D>) {
        let (b1, b2) = (f64::from(self.beta_1), f64::from(self.beta_2));
        // Temporary 1: (1 - b1) g, while g lives on; then g is the only reference to its
        // buffer, and (1 - b2) g^2 is written into it.
        let scaled = grad.clone().mul_scalar(1.0 - b1);
        let squared = grad.square().mul_scalar(1.0 - b2);
        let (moment_1, moment_2, time) = match state {
            Some(s) => (s.moment_1.mul_scalar(b1).add(scaled), s.moment_2.mul_scalar(b2).add(squared), s.time + 1),
            None => (scaled, squared, 1),
        };
        let bias_1 = 1.0 - b1.powi(time as i32);
        let bias_2 = 1.0 - b2.powi(time as i32);
        // Temporary 2: the denominator; the quotient m / denom is the second, and the
        // denominator is freed before the parameter is touched.
        let denom = moment_2.clone().sqrt().div_scalar(bias_2.sqrt()).add_scalar(f64::from(self.eps));
        let step = moment_1.clone().div(denom).mul_scalar(lr / bias_1);
        let decay = lr * f64::from(self.weight_decay);
        let param = if decay == 0.0 { param } else { param.mul_scalar(1.0 - decay) };
        (param.sub(step), AdamWState { moment_1, moment_2, time })
    }

    /// The update of a parameter kept in a 16-bit type (`[backend] master_weights = "bf16"`):
    /// [`AdamW::update`] in f32 from the parameter, gradient and moments cast up, then the
    /// parameter and both moments stochastically rounded back ([`stochastic_round`]). Rounding
    /// to nearest would drop every update smaller than half a rounding step (about 2e-3 of the
    /// weight in bf16): at preference-stage learning rates, almost all of them.
    ///
    /// A parameter of more than [`ROUNDED_CHUNK`] values is updated in chunks of rows, so that
    /// the f32 temporaries are those of a chunk, not of the whole parameter (for the embeddings
    /// of a 150k vocabulary they were 3.8 GB, more than the lean option saved on a 0.5B model).
    fn step_rounded<B: Backend, const D: usize>(
        &self,
        lr: f64,
        param: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<AdamWState<B, D>>,
        low: DType,
    ) -> (Tensor<B, D>, Option<AdamWState<B, D>>) {
        let dims = param.dims();
        let n: usize = dims.iter().product();
        if n <= ROUNDED_CHUNK || dims[0] < 2 {
            return self.step_rounded_whole(lr, param, grad, state, low);
        }
        let rows = (ROUNDED_CHUNK / (n / dims[0]).max(1)).max(1);
        let (mut params, mut firsts, mut seconds, mut time) = (Vec::new(), Vec::new(), Vec::new(), 0);
        for start in (0..dims[0]).step_by(rows) {
            let k = rows.min(dims[0] - start);
            let part = |t: &Tensor<B, D>| t.clone().narrow(0, start, k);
            let chunk_state = state.as_ref().map(|s| AdamWState {
                moment_1: part(&s.moment_1),
                moment_2: part(&s.moment_2),
                time: s.time,
            });
            let (p, s) = self.step_rounded_whole(lr, part(&param), part(&grad), chunk_state, low);
            let s = s.expect("the update keeps a state");
            params.push(p);
            firsts.push(s.moment_1);
            seconds.push(s.moment_2);
            time = s.time;
        }
        drop((param, grad, state));
        let state = AdamWState { moment_1: Tensor::cat(firsts, 0), moment_2: Tensor::cat(seconds, 0), time };
        (Tensor::cat(params, 0), Some(state))
    }

    /// [`AdamW::step_rounded`] of a whole parameter at once.
    fn step_rounded_whole<B: Backend, const D: usize>(
        &self,
        lr: f64,
        param: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<AdamWState<B, D>>,
        low: DType,
    ) -> (Tensor<B, D>, Option<AdamWState<B, D>>) {
        let up = |t: Tensor<B, D>| t.cast(DType::F32);
        let state = state.map(|s| AdamWState { moment_1: up(s.moment_1), moment_2: up(s.moment_2), time: s.time });
        let (param, s) = self.update(lr, up(param), up(grad), state);
        let state = AdamWState {
            moment_1: stochastic_round(s.moment_1, low),
            moment_2: stochastic_round(s.moment_2, low),
            time: s.time,
        };
        (stochastic_round(param, low), Some(state))
    }
}

/// Values of a parameter whose lean update ([`AdamW::step_rounded`]) is done in one piece; a
/// larger one is updated in chunks of rows of about this many values (16 MiB of f32).
pub const ROUNDED_CHUNK: usize = 1 << 22;

/// `x` (f32) rounded to `dtype` (bf16 or f16) up or down at random, with the probability of
/// rounding up equal to the fraction of the rounding step that `x` is past the value below, so
/// that the expected result is `x` (unbiased). With `ulp(x) = 2^(floor(log2 |x|) - mantissa
/// bits)`, the rounding step at `x`: `q = x / ulp` (exact: a power of two), the value below is
/// `floor(q) ulp`, and one more step is taken when a uniform draw in [0, 1) is below
/// `q - floor(q)`. The result is on the target type's grid before the final cast, so that cast
/// is exact: the CPU backend's f32 -> bf16 cast rounds some values just past a tie the wrong
/// way, which as the rounding of `x + noise` biased updates of a thousandth of a step by 2%.
pub fn stochastic_round<B: Backend, const D: usize>(x: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    let mantissa = match dtype {
        DType::BF16 => 7.0,
        DType::F16 => 10.0,
        _ => return x.cast(dtype),
    };
    let ln2 = std::f64::consts::LN_2;
    let ulp = x.clone().abs().log().div_scalar(ln2).floor().sub_scalar(mantissa).mul_scalar(ln2).exp();
    // Exactly a power of two (`exp` and `log` are approximations on some backends): the nearest
    // bf16 value of something that close to a power of two is that power of two. Zero (and what
    // is below f32's normal range) gets a step that keeps it where it is.
    let ulp = ulp.cast(DType::BF16).cast(DType::F32).clamp_min(f32::MIN_POSITIVE);
    let q = x.div(ulp.clone());
    let below = q.clone().floor();
    let fraction = q - below.clone();
    let draw = Tensor::<B, D>::random(fraction.shape(), Distribution::Uniform(0.0, 1.0), &fraction.device());
    let up = fraction.zeros_like().mask_fill(draw.lower(fraction), 1.0);
    ((below + up) * ulp).cast(dtype)
}

/// The optimiser type.
pub type Optim<B = crate::TrainBackend> = OptimizerAdaptor<AdamW, fuserl_model::llama::Llama<B>, B>;

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use burn::tensor::{Tensor, TensorData};

    use super::*;

    /// Two steps with weight decay against torch.optim.AdamW's update written out in f64
    /// (torch/optim/adamw.py, single-tensor path), to f32 rounding.
    #[test]
    fn two_steps_match_torchs_update() {
        let (lr, b1, b2, eps, wd) = (0.1f64, 0.9f64, 0.999f64, 1e-8f64, 0.01f64);
        let opt = AdamW { beta_1: b1 as f32, beta_2: b2 as f32, eps: eps as f32, weight_decay: wd as f32 };
        let grads = [[0.5f64, -0.25, 3.0], [0.1, 0.75, -1.5]];
        let mut want = [1.0f64, -2.0, 0.5];
        let (mut m, mut v) = ([0.0f64; 3], [0.0f64; 3]);
        let device = Default::default();
        let mut param = Tensor::<Flex, 1>::from_data(TensorData::from(want.map(|x| x as f32)), &device);
        let mut state = None;
        for (step, g) in grads.iter().enumerate() {
            let t = step as i32 + 1;
            for i in 0..3 {
                want[i] *= 1.0 - lr * wd;
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                let denom = v[i].sqrt() / (1.0 - b2.powi(t)).sqrt() + eps;
                want[i] -= lr / (1.0 - b1.powi(t)) * m[i] / denom;
            }
            let grad = Tensor::<Flex, 1>::from_data(TensorData::from(g.map(|x| x as f32)), &device);
            let (next, s) = SimpleOptimizer::<Flex>::step(&opt, lr, param, grad, state);
            (param, state) = (next, s);
            let got: Vec<f32> = param.clone().into_data().iter::<f32>().collect();
            for (a, b) in got.iter().zip(&want) {
                assert!((f64::from(*a) - b).abs() <= 1e-6 * b.abs().max(1.0), "step {t}: {got:?} vs {want:?}");
            }
        }
        assert_eq!(state.map(|s| s.time), Some(2));
    }

    /// The lean option (`master_weights = "bf16"`): 1000 steps on a fixed gradient at a learning
    /// rate whose updates are a few thousandths of a bf16 rounding step. With stochastic
    /// rounding the mean update over 2^17 weights is within 1% of the f32 optimiser's (its
    /// standard error here is about 0.2%); rounding to nearest (the control) loses them all.
    #[test]
    fn stochastic_rounding_keeps_the_mean_update_of_f32() {
        use burn::tensor::{DType, Distribution};
        let device = Default::default();
        <Flex as Backend>::seed(&device, 7);
        let n = 1 << 17;
        let opt = AdamW { beta_1: 0.9, beta_2: 0.999, eps: 1e-8, weight_decay: 0.0 };
        let lr = 1e-5;
        // Weights spread over a binade (rounding steps of 2^-8 and 2^-9), one gradient for all.
        let start = Tensor::<Flex, 1>::random([n], Distribution::Uniform(0.5, 1.0), &device).cast(DType::BF16);
        let grad = Tensor::<Flex, 1>::full([n], 0.01, &device);
        let run = |dtype: DType, rounded: bool| -> f64 {
            let mut param = start.clone().cast(dtype);
            let mut state = None;
            for _ in 0..1000 {
                let g = grad.clone().cast(dtype);
                let (next, s) = if rounded || dtype == DType::F32 {
                    SimpleOptimizer::<Flex>::step(&opt, lr, param, g, state)
                } else {
                    // The control: the same f32 arithmetic, rounded to nearest.
                    let (p32, s32) = SimpleOptimizer::<Flex>::step(
                        &opt,
                        lr,
                        param.cast(DType::F32),
                        g.cast(DType::F32),
                        state.map(|s: AdamWState<Flex, 1>| AdamWState {
                            moment_1: s.moment_1.cast(DType::F32),
                            moment_2: s.moment_2.cast(DType::F32),
                            time: s.time,
                        }),
                    );
                    (p32.cast(dtype), s32)
                };
                (param, state) = (next, s);
            }
            // The mean on the host in f64 (an f32 sum of 2^17 terms would itself be off).
            let moved: Vec<f32> =
                (start.clone().cast(DType::F32) - param.cast(DType::F32)).into_data().iter::<f32>().collect();
            moved.iter().map(|x| f64::from(*x)).sum::<f64>() / moved.len() as f64
        };
        let f32_update = run(DType::F32, true);
        let lean = run(DType::BF16, true);
        let nearest = run(DType::BF16, false);
        // f32 itself rounds each step of 1e-5 to a whole number of its own rounding steps (about
        // 168 of 2^-24 here): 0.14% more than 1000 lr.
        assert!((f32_update - 1000.0 * lr).abs() < 0.01 * 1000.0 * lr, "f32: {f32_update}");
        assert!((lean - f32_update).abs() <= 0.01 * f32_update, "lean {lean} vs f32 {f32_update}");
        assert!(nearest.abs() < 0.1 * f32_update, "rounding to nearest moved {nearest} (f32 {f32_update})");
    }

    /// A lean parameter larger than `ROUNDED_CHUNK` is updated in chunks of rows (the last one
    /// short): every row moves as the f32 update does on average, the moments stay bf16, the
    /// shapes are kept.
    #[test]
    fn large_lean_parameters_are_updated_in_chunks_alike() {
        use burn::tensor::{DType, Distribution};
        let device = Default::default();
        <Flex as Backend>::seed(&device, 11);
        // 1027 x 4099 values: chunks of 1023 rows, then 4.
        let (rows, cols) = (1027, 4099);
        assert!(rows * cols > ROUNDED_CHUNK);
        let opt = AdamW { beta_1: 0.9, beta_2: 0.999, eps: 1e-8, weight_decay: 0.0 };
        let lr = 1e-3;
        let start = Tensor::<Flex, 2>::random([rows, cols], Distribution::Uniform(0.5, 1.0), &device).cast(DType::BF16);
        let grad = Tensor::<Flex, 2>::full([rows, cols], 0.01, &device).cast(DType::BF16);
        let (param, state) = SimpleOptimizer::<Flex>::step(&opt, lr, start.clone(), grad, None);
        let state = state.expect("state");
        assert_eq!(param.dims(), [rows, cols]);
        assert_eq!(
            (param.dtype(), state.moment_1.dtype(), state.moment_2.dtype()),
            (DType::BF16, DType::BF16, DType::BF16)
        );
        assert_eq!(state.moment_1.dims(), [rows, cols]);
        // Adam's first step moves every weight by lr (the gradient's sign): a quarter of a bf16
        // step here, so only stochastic rounding moves them, by lr on average.
        let moved: Vec<f32> = (start.cast(DType::F32) - param.cast(DType::F32)).into_data().iter::<f32>().collect();
        let mean = |r: std::ops::Range<usize>| {
            let part = &moved[r.start * cols..r.end * cols];
            part.iter().map(|x| f64::from(*x)).sum::<f64>() / part.len() as f64
        };
        assert!((mean(0..rows) - lr).abs() < 0.01 * lr, "all rows: {}", mean(0..rows));
        // The short last chunk (4 rows, 16k weights: a standard error of about 1.5%).
        assert!((mean(1023..rows) - lr).abs() < 0.08 * lr, "last chunk: {}", mean(1023..rows));
        assert!((mean(0..1023) - lr).abs() < 0.01 * lr, "first chunk: {}", mean(0..1023));
    }
}
