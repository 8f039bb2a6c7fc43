//! Per-token log-probabilities of (prompt, response) pairs: `log p(response_t | prompt,
//! response_<t)` for every response token, from one padded forward pass.

use burn::tensor::activation::log_softmax;
use burn::tensor::{DType, Int, Tensor, TensorData};
use fuserl_core::backend::LogProbPath;
use fuserl_kernels::{LogProbBackend, linear_logprobs, quant_linear_logprobs};

use crate::error::{ModelError, Result};
use crate::llama::{Inputs, LlamaModel};

/// Log-probs of `targets` from the final hidden states; a negative target marks a position
/// that is not scored (log-prob 0, no gradient). Differentiable on an autodiff backend.
///
/// [`LogProbPath::Fused`] projects and normalises in vocabulary chunks without the
/// `[batch, seq, vocab]` logits (`fuserl_kernels::linear_logprobs`; a head with a bias takes
/// the naive path); [`LogProbPath::Naive`] materialises them for `log_softmax` and `gather`.
///
/// # Shapes
/// `hidden: [batch, seq, hidden]`, `targets: [batch, seq]` -> `[batch, seq]` (f32)
pub fn hidden_logprobs<B: LogProbBackend>(
    model: &LlamaModel<B>,
    hidden: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    path: LogProbPath,
) -> Tensor<B, 2> {
    let [b, t, h] = hidden.dims();
    let head = model.weights.lm_head.as_ref();
    if path == LogProbPath::Fused && head.is_none_or(|l| l.bias.is_none()) {
        // A quantised head (QLoRA's base) is dequantised a vocabulary chunk at a time.
        let quant = match head {
            Some(linear) => linear.quant.as_ref(),
            None => model.weights.embed_quant.as_ref(),
        };
        if let Some(q) = quant {
            let (flat, ids) = (hidden.reshape([b * t, h]), targets.reshape([b * t]));
            return quant_linear_logprobs(flat, q.words.val(), q.layout, ids).reshape([b, t]);
        }
        let weight = match head {
            Some(linear) => linear.weight.val().transpose(),
            None => model.weights.embed_tokens.val(),
        };
        let weight = crate::llama::in_dtype(weight, hidden.dtype());
        return linear_logprobs(hidden.reshape([b * t, h]), weight, targets.reshape([b * t])).reshape([b, t]);
    }
    let logp = log_softmax(model.logits(hidden).cast(DType::F32), 2);
    let ignored = targets.clone().lower_elem(0);
    logp.gather(2, targets.clamp_min(0).unsqueeze_dim(2)).squeeze_dim(2).mask_fill(ignored, 0.0)
}

/// The log-probs of one response.
#[derive(Debug, Clone, PartialEq)]
pub struct SequenceLogProbs {
    /// One per response token.
    pub token_logps: Vec<f32>,
    /// Their sum (in f64).
    pub sum: f64,
    /// Number of response tokens.
    pub n_tokens: usize,
}

/// Log-probs of `ids[t]` given `ids[..t]` for `t >= 1` of each full sequence (what a language
/// model scores), in one right-padded batch.
pub fn sequence_token_logprobs<B: LogProbBackend>(model: &LlamaModel<B>, seqs: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
    if seqs.is_empty() {
        return Ok(Vec::new());
    }
    if let Some(bad) = seqs.iter().flatten().find(|&&id| id as usize >= model.config.vocab_size) {
        return Err(ModelError::Input(format!(
            "token id {bad} is outside the vocabulary ({})",
            model.config.vocab_size
        )));
    }
    if let Some(s) = seqs.iter().find(|s| s.len() < 2) {
        return Err(ModelError::Input(format!("a sequence of {} tokens has nothing to score", s.len())));
    }
    // Before anything is allocated: a sequence past the model's positions would cost memory
    // quadratic in its length (a 100 GB allocation for a long enough text), and score nonsense.
    crate::generate::check_positions(model, seqs.iter().map(Vec::len).max().unwrap_or(0), "a sequence")?;
    let inputs = Inputs::right_padded(seqs, 0);
    let b = seqs.len();
    let t = inputs.ids[0].len();
    let hidden = model.hidden(&inputs, &inputs.valid, None).narrow(1, 0, t - 1);
    let targets: Vec<i32> = inputs.ids.iter().flat_map(|row| row[1..].iter().map(|&i| i as i32)).collect();
    let targets = Tensor::<B, 2, Int>::from_data(TensorData::new(targets, [b, t - 1]), &model.device());
    let picked: Vec<f32> =
        hidden_logprobs(model, hidden, targets, LogProbPath::Fused).into_data().iter::<f32>().collect();
    Ok(seqs.iter().enumerate().map(|(i, s)| picked[i * (t - 1)..i * (t - 1) + s.len() - 1].to_vec()).collect())
}

/// Per-token log-probs of each response given its prompt. Prompts must not be empty.
pub fn response_logprobs<B: LogProbBackend>(
    model: &LlamaModel<B>,
    pairs: &[(Vec<u32>, Vec<u32>)],
) -> Result<Vec<SequenceLogProbs>> {
    if let Some((p, r)) = pairs.iter().find(|(p, r)| p.is_empty() || r.is_empty()) {
        return Err(ModelError::Input(format!(
            "a pair with {} prompt and {} response tokens; both need at least one",
            p.len(),
            r.len()
        )));
    }
    let seqs: Vec<Vec<u32>> = pairs.iter().map(|(p, r)| p.iter().chain(r).copied().collect()).collect();
    let all = sequence_token_logprobs(model, &seqs)?;
    Ok(pairs
        .iter()
        .zip(all)
        .map(|((p, _), lp)| {
            let token_logps = lp[p.len() - 1..].to_vec();
            SequenceLogProbs {
                sum: token_logps.iter().map(|x| f64::from(*x)).sum(),
                n_tokens: token_logps.len(),
                token_logps,
            }
        })
        .collect())
}
