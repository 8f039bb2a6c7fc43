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
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};

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
        (param.sub(step), Some(AdamWState { moment_1, moment_2, time }))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        AdamWState { moment_1: state.moment_1.to_device(device), moment_2: state.moment_2.to_device(device), ..state }
    }
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
}
