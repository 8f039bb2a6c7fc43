//! Batched generation with a KV cache: greedy, temperature, top-k, top-p, seeded sampling;
//! stops on EOS, on stop strings, or after `max_new_tokens`.

use burn::tensor::DType;
use burn::tensor::backend::Backend;

use crate::chat::ChatTokenizer;
use crate::error::{ModelError, Result};
use crate::llama::{Inputs, LlamaModel};

/// Sampling settings.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateConfig {
    /// Most tokens to add.
    pub max_new_tokens: usize,
    /// 0 is greedy.
    pub temperature: f64,
    /// Nucleus mass (1 keeps everything).
    pub top_p: f64,
    /// Keep the k most likely tokens (0 keeps everything).
    pub top_k: usize,
    /// Seed of the sampler.
    pub seed: u64,
    /// Stop when the decoded reply contains one of these (it is cut there).
    pub stop: Vec<String>,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self { max_new_tokens: 256, temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0, stop: Vec::new() }
    }
}

/// One generated reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// New token ids (EOS excluded).
    pub ids: Vec<u32>,
    /// Decoded text (cut at a stop string).
    pub text: String,
    /// Why it stopped: `eos`, `stop`, or `length`.
    pub finish_reason: &'static str,
}

/// The sampler's generator (splitmix64: the same stream on every platform).
type Rng = fuserl_core::maths::SplitMix64;

/// Choose the next token from one row of logits.
fn pick(logits: &[f32], cfg: &GenerateConfig, rng: &mut Rng) -> u32 {
    let argmax = || {
        logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0 as u32
    };
    if cfg.temperature <= 0.0 {
        return argmax();
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if cfg.top_k > 0 {
        order.truncate(cfg.top_k);
    }
    let max = f64::from(logits[order[0]]);
    let mut probs: Vec<f64> = order.iter().map(|&i| ((f64::from(logits[i]) - max) / cfg.temperature).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if cfg.top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs.iter().position(|p| {
            acc += p;
            acc >= cfg.top_p
        });
        let keep = keep.map_or(probs.len(), |k| k + 1);
        order.truncate(keep);
        probs.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let u = rng.next_f64();
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return order[i] as u32;
        }
    }
    order[order.len() - 1] as u32
}

/// Refuse `what` of `len` tokens when it is longer than the model's positions
/// (`max_position_embeddings`), before any tensor is made.
pub(crate) fn check_positions<B: Backend>(model: &LlamaModel<B>, len: usize, what: &str) -> Result<()> {
    let positions = model.config.max_position_embeddings;
    if len > positions {
        return Err(ModelError::Input(format!(
            "{what} of {len} tokens is longer than the model's {positions} positions (max_position_embeddings); shorten it"
        )));
    }
    Ok(())
}

/// Generate a reply for each prompt (token ids), in one left-padded batch; one sampler seeded
/// with `cfg.seed` draws for every row in turn.
pub fn generate<B: Backend>(
    model: &LlamaModel<B>,
    tokenizer: &ChatTokenizer,
    prompts: &[Vec<u32>],
    cfg: &GenerateConfig,
) -> Result<Vec<Generation>> {
    generate_with(model, tokenizer, prompts, cfg, None, None)
}

/// Like [`generate`] for one prompt, passing each new piece of the reply's text to `on_text` as
/// it is made (what a terminal prints as it goes). The pieces join to the reply's text: a piece
/// is passed once its last character's bytes are complete (a character split over tokens waits
/// for its last token), never past a stop string.
pub fn generate_streaming<B: Backend>(
    model: &LlamaModel<B>,
    tokenizer: &ChatTokenizer,
    prompt: Vec<u32>,
    cfg: &GenerateConfig,
    on_text: &mut dyn FnMut(&str),
) -> Result<Generation> {
    let mut out = generate_with(model, tokenizer, &[prompt], cfg, None, Some(on_text))?;
    Ok(out.remove(0))
}

/// What has been passed to a streaming caller: `shown` is a prefix of the reply's text.
struct Stream<'a> {
    on_text: &'a mut dyn FnMut(&str),
    shown: String,
}

impl Stream<'_> {
    /// Pass what `text` (the reply so far) adds to what was shown; `last`: the reply is done
    /// (an incomplete last character is passed as it decodes).
    fn show(&mut self, text: &str, last: bool) {
        let complete = last || !text.ends_with('\u{FFFD}');
        if complete && text.len() > self.shown.len() && text.starts_with(self.shown.as_str()) {
            (self.on_text)(&text[self.shown.len()..]);
            self.shown = text.to_owned();
        }
    }
}

/// Like [`generate`], with a sampler of its own per row seeded by `seeds[row]`, so that a
/// row's draws do not depend on the other rows (`cfg.seed` is unused).
pub fn generate_seeded<B: Backend>(
    model: &LlamaModel<B>,
    tokenizer: &ChatTokenizer,
    prompts: &[Vec<u32>],
    cfg: &GenerateConfig,
    seeds: &[u64],
) -> Result<Vec<Generation>> {
    if seeds.len() != prompts.len() {
        return Err(ModelError::Input(format!("{} seeds for {} prompts", seeds.len(), prompts.len())));
    }
    generate_with(model, tokenizer, prompts, cfg, Some(seeds), None)
}

fn generate_with<B: Backend>(
    model: &LlamaModel<B>,
    tokenizer: &ChatTokenizer,
    prompts: &[Vec<u32>],
    cfg: &GenerateConfig,
    seeds: Option<&[u64]>,
    on_text: Option<&mut dyn FnMut(&str)>,
) -> Result<Vec<Generation>> {
    let mut stream = on_text.map(|on_text| Stream { on_text, shown: String::new() });
    if prompts.iter().any(Vec::is_empty) {
        return Err(ModelError::Input("cannot generate from an empty prompt".into()));
    }
    check_positions(model, prompts.iter().map(Vec::len).max().unwrap_or(0), "a prompt")?;
    let b = prompts.len();
    let mut eos: Vec<u32> = model.config.eos_token_ids.clone();
    eos.push(tokenizer.eos_id());
    let mut shared = Rng::new(cfg.seed);
    let mut per_row: Vec<Rng> = seeds.map(|s| s.iter().map(|&x| Rng::new(x)).collect()).unwrap_or_default();
    let mut inputs = Inputs::left_padded(prompts, 0);
    let mut key_valid = inputs.valid.clone();
    let mut next_pos: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let mut cache = model.empty_cache(b);
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut done: Vec<Option<&'static str>> = vec![None; b];
    for _ in 0..cfg.max_new_tokens {
        let hidden = model.hidden(&inputs, &key_valid, Some(&mut cache));
        let t = hidden.dims()[1];
        let last = model.logits(hidden.narrow(1, t - 1, 1)).cast(DType::F32);
        let v = last.dims()[2];
        let rows: Vec<f32> = last.into_data().iter::<f32>().collect();
        let mut step_ids = Vec::with_capacity(b);
        for (r, row) in rows.chunks(v).enumerate() {
            let id = if done[r].is_some() {
                eos[0]
            } else {
                let rng = if per_row.is_empty() { &mut shared } else { &mut per_row[r] };
                pick(row, cfg, rng)
            };
            if done[r].is_none() {
                if eos.contains(&id) {
                    done[r] = Some("eos");
                } else {
                    out[r].push(id);
                    if !cfg.stop.is_empty() || (r == 0 && stream.is_some()) {
                        let mut text = tokenizer.decode(&out[r], true)?;
                        if let Some(cut) = cfg.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                            done[r] = Some("stop");
                            text.truncate(cut);
                        }
                        if r == 0
                            && let Some(stream) = stream.as_mut()
                        {
                            stream.show(&text, false);
                        }
                    }
                }
            }
            step_ids.push(id);
        }
        if done.iter().all(Option::is_some) {
            break;
        }
        inputs = Inputs {
            ids: step_ids.iter().map(|&i| vec![i]).collect(),
            positions: next_pos.iter().map(|&p| vec![p]).collect(),
            valid: vec![vec![true]; b],
        };
        for row in &mut key_valid {
            row.push(true);
        }
        next_pos.iter_mut().for_each(|p| *p += 1);
    }
    out.into_iter()
        .zip(done)
        .map(|(ids, reason)| {
            let mut text = tokenizer.decode(&ids, true)?;
            if let Some(cut) = cfg.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                text.truncate(cut);
            }
            Ok(Generation { ids, text, finish_reason: reason.unwrap_or("length") })
        })
        .collect::<Result<Vec<_>>>()
        .inspect(|g| {
            if let (Some(stream), Some(first)) = (stream.as_mut(), g.first()) {
                stream.show(&first.text, true);
            }
        })
}

/// The prompts generation speed is measured on (`fuserl bench generate`, the `generate`
/// benchmark); scripts/bench_generate_torch.py and scripts/gpu_check_torch.py hold the same list
/// for their PyTorch side.
pub const BENCH_PROMPTS: [&str; 8] = [
    "Write a short story about a dragon who learns to read.",
    "Explain how a bicycle works, step by step.",
    "Describe a walk through a forest in autumn.",
    "Write a letter to a friend about your summer holiday.",
    "Explain why the sky is blue to a ten-year-old.",
    "Describe the life cycle of a butterfly in detail.",
    "Write a recipe for a vegetable soup and explain each step.",
    "Tell the history of the printing press.",
];

#[cfg(test)]
mod tests {
    use super::*;

    /// The streamed pieces join to the text; an incomplete last character waits for its next
    /// token; a text that no longer extends what was shown passes nothing.
    #[test]
    fn streamed_pieces_join_to_the_reply() {
        let mut pieces: Vec<String> = Vec::new();
        {
            let mut on_text = |t: &str| pieces.push(t.to_owned());
            let mut s = Stream { on_text: &mut on_text, shown: String::new() };
            s.show("Hel", false);
            s.show("Hello", false);
            s.show("Hello \u{FFFD}", false);
            s.show("Hello \u{e9}", false);
            s.show("Hallo", false);
            s.show("Hello \u{e9}t\u{e9}", true);
        }
        assert_eq!(pieces, ["Hel", "lo", " \u{e9}", "t\u{e9}"]);
    }

    #[test]
    fn sampling_respects_top_k_top_p_and_seed() {
        let logits = [0.0f32, 5.0, 4.9, -3.0];
        let greedy = GenerateConfig::default();
        assert_eq!(pick(&logits, &greedy, &mut Rng::new(1)), 1);
        let top1 = GenerateConfig { temperature: 1.0, top_k: 1, ..Default::default() };
        assert!((0..50).all(|s| pick(&logits, &top1, &mut Rng::new(s)) == 1));
        let nucleus = GenerateConfig { temperature: 1.0, top_p: 0.9, ..Default::default() };
        assert!((0..200).all(|s| matches!(pick(&logits, &nucleus, &mut Rng::new(s)), 1 | 2)));
        let hot = GenerateConfig { temperature: 100.0, ..Default::default() };
        let a: Vec<u32> = (0..20).map(|s| pick(&logits, &hot, &mut Rng::new(s))).collect();
        let b: Vec<u32> = (0..20).map(|s| pick(&logits, &hot, &mut Rng::new(s))).collect();
        assert_eq!(a, b);
        assert!(a.iter().collect::<std::collections::BTreeSet<_>>().len() > 2);
    }
}
