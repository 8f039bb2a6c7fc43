//! Batched generation with a KV cache: greedy, temperature, top-k, top-p, seeded sampling;
//! stops on EOS, on stop strings, or after `max_new_tokens`.

use burn::tensor::{DType, Int, Tensor, TensorData};
use fuserl_kernels::LogProbBackend;

use crate::chat::ChatTokenizer;
use crate::error::{ModelError, Result};
use crate::llama::{Inputs, KvCache, LayerCache, LlamaModel};

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
    /// Seconds from its prompt's admission into the batch to its last token.
    pub seconds: f64,
}

/// The sampler's generator (splitmix64: the same stream on every platform).
type Rng = fuserl_core::maths::SplitMix64;

/// The index of the largest logit (the first of equals).
fn argmax(logits: &[f32]) -> u32 {
    logits.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0 as u32
}

/// A row's token ids in descending order of logit (ties: the lower id first, as a stable sort
/// gives), sorted lazily, only as far as the sampler walks: a sampled token is almost always
/// among the first few dozen of the 49k-262k, and sorting the whole vocabulary for every token
/// cost about a quarter of a sampled step at batch 32 (docs/benchmarks.md).
struct Ranked<'a> {
    logits: &'a [f32],
    ids: Vec<u32>,
    /// `ids[..sorted]` is in order; the rest is every other id, in no order.
    sorted: usize,
}

impl<'a> Ranked<'a> {
    fn new(logits: &'a [f32]) -> Self {
        Self { logits, ids: (0..logits.len() as u32).collect(), sorted: 0 }
    }

    /// The `i`-th id in order (`i < logits.len()`). Past the sorted head, the next stretch is
    /// selected (`select_nth_unstable`, linear) and sorted, at least as long as the head so far,
    /// so a walk to position `n` costs O(V log n) in all.
    fn get(&mut self, i: usize) -> u32 {
        if i >= self.sorted {
            let logits = self.logits;
            let order = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
            let rest = &mut self.ids[self.sorted..];
            let want = (i + 1 - self.sorted).max(self.sorted).max(64).min(rest.len());
            if want < rest.len() {
                rest.select_nth_unstable_by(want - 1, order);
            }
            rest[..want].sort_unstable_by(order);
            self.sorted += want;
        }
        self.ids[i]
    }
}

/// Choose the next token from one row of logits: greedy at temperature 0; else the draw of a
/// full descending sort of the row (keep the top k, then the shortest prefix whose probability
/// reaches top-p, renormalised, then one uniform number walked down the list), with the sort
/// done only as far as the walk goes ([`Ranked`]). The same token as the full sort, except that
/// without top-k the normaliser is summed in id order instead of sorted order (equal to about
/// 1e-16 relative).
fn pick(logits: &[f32], cfg: &GenerateConfig, rng: &mut Rng) -> u32 {
    if cfg.temperature <= 0.0 {
        return argmax(logits);
    }
    let mut ranked = Ranked::new(logits);
    let max = f64::from(logits[ranked.get(0) as usize]);
    let weight = |logit: f32| ((f64::from(logit) - max) / cfg.temperature).exp();
    let mut n = if cfg.top_k > 0 { cfg.top_k.min(logits.len()) } else { logits.len() };
    let total: f64 = if cfg.top_k > 0 {
        (0..n).map(|i| weight(logits[ranked.get(i) as usize])).sum()
    } else {
        logits.iter().map(|&l| weight(l)).sum()
    };
    let prob = |ranked: &mut Ranked, i: usize| weight(logits[ranked.get(i) as usize]) / total;
    // Top-p: the kept prefix's probability, summed in order, renormalises it.
    let mut kept_mass = 1.0;
    if cfg.top_p < 1.0 {
        let mut acc = 0.0;
        for i in 0..n {
            acc += prob(&mut ranked, i);
            if acc >= cfg.top_p {
                n = i + 1;
                break;
            }
        }
        kept_mass = acc;
    }
    let u = rng.next_f64();
    let mut acc = 0.0;
    for i in 0..n {
        let p = prob(&mut ranked, i);
        acc += if cfg.top_p < 1.0 { p / kept_mass } else { p };
        if u < acc {
            return ranked.get(i);
        }
    }
    ranked.get(n - 1)
}

/// Refuse `what` of `len` tokens when it is longer than the model's positions
/// (`max_position_embeddings`), before any tensor is made.
pub(crate) fn check_positions<B: LogProbBackend>(model: &LlamaModel<B>, len: usize, what: &str) -> Result<()> {
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
pub fn generate<B: LogProbBackend>(
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
pub fn generate_streaming<B: LogProbBackend>(
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
pub fn generate_seeded<B: LogProbBackend>(
    model: &LlamaModel<B>,
    tokenizer: &ChatTokenizer,
    prompts: &[Vec<u32>],
    cfg: &GenerateConfig,
    seeds: &[u64],
) -> Result<Vec<Generation>> {
    generate_with(model, tokenizer, prompts, cfg, Some(seeds), None)
}

fn generate_with<B: LogProbBackend>(
    model: &LlamaModel<B>,
    tokenizer: &ChatTokenizer,
    prompts: &[Vec<u32>],
    cfg: &GenerateConfig,
    seeds: Option<&[u64]>,
    on_text: Option<&mut dyn FnMut(&str)>,
) -> Result<Vec<Generation>> {
    let mut out: Vec<Option<Generation>> = vec![None; prompts.len()];
    let mut engine = Engine::new(model, tokenizer, cfg, seeds, prompts.len().max(1));
    engine.stream = on_text.map(|on_text| Stream { on_text, shown: String::new() });
    engine.run(prompts, &mut |i, g| {
        out[i] = Some(g);
        true
    })?;
    Ok(out.into_iter().map(|g| g.expect("every prompt is answered")).collect())
}

/// Prompts prefilled together into finished rows' places while other rows still answer, at
/// most (a quarter of the batch, at least one).
pub fn admit_at_once(max_batch: usize) -> usize {
    (max_batch / 4).max(1)
}

/// Generate with **continuous batching**: at most `max_batch` prompts are decoded together, and
/// an answer that finishes (EOS, a stop string, `max_new_tokens`) leaves the batch at once, its
/// place taken by the next prompt (prefilled, then decoded with the others), as vLLM and TGI do:
/// a batch never waits for its longest answer. `on_done(i, reply)` gets each reply as it
/// finishes (`i`: its prompt's index); returning `false` stops the generation (what is running
/// is dropped). Each prompt samples with its own seed, `seeds[i]`, so a reply does not depend
/// on which prompts it shared a batch with; greedy replies are those of [`generate`]. Returns
/// how many prefills it ran (each admits the prompts that fit into the places free then).
pub fn generate_each<B: LogProbBackend>(
    model: &LlamaModel<B>,
    tokenizer: &ChatTokenizer,
    prompts: &[Vec<u32>],
    cfg: &GenerateConfig,
    seeds: &[u64],
    max_batch: usize,
    on_done: &mut dyn FnMut(usize, Generation) -> bool,
) -> Result<usize> {
    Engine::new(model, tokenizer, cfg, Some(seeds), max_batch.max(1)).run(prompts, on_done)
}

/// One place in the running batch: a prompt being answered, or (`live` false) a finished one's
/// place, waiting for the next prompt.
struct Row {
    /// Its index in the caller's prompts.
    index: usize,
    /// The tokens made so far (EOS excluded).
    ids: Vec<u32>,
    /// Its own sampler (per-prompt seeds), else the engine's shared one.
    rng: Option<Rng>,
    /// Which cache columns it may attend to: its own are the last ones (left padding).
    valid: Vec<bool>,
    /// The position of its next token.
    next_pos: usize,
    /// Tokens picked (EOS included), against `max_new_tokens`.
    picked: usize,
    /// The last token picked, the next step's input.
    last: u32,
    started: std::time::Instant,
    /// Still answering. A finished row stays in the batch (its output unread, attending only
    /// to the columns made since) until a prompt takes its place, which then costs no copy of
    /// the cache: the new prompt's prefill is written into the row.
    live: bool,
}

/// The batch: rows, and one KV cache whose columns the rows share (each row's own are the last
/// `prompt + generated` columns; the others are masked).
struct Engine<'a, B: LogProbBackend> {
    model: &'a LlamaModel<B>,
    tokenizer: &'a ChatTokenizer,
    cfg: &'a GenerateConfig,
    seeds: Option<&'a [u64]>,
    max_batch: usize,
    eos: Vec<u32>,
    shared: Rng,
    stream: Option<Stream<'a>>,
    rows: Vec<Row>,
    cache: KvCache<B>,
}

/// `[rows, vocab]` logits of `hidden`'s last position, on the host, row after row.
fn last_logits<B: LogProbBackend>(model: &LlamaModel<B>, hidden: Tensor<B, 3>) -> Vec<f32> {
    let t = hidden.dims()[1];
    model.logits(hidden.narrow(1, t - 1, 1)).cast(DType::F32).into_data().iter::<f32>().collect()
}

impl<'a, B: LogProbBackend> Engine<'a, B> {
    fn new(
        model: &'a LlamaModel<B>,
        tokenizer: &'a ChatTokenizer,
        cfg: &'a GenerateConfig,
        seeds: Option<&'a [u64]>,
        max_batch: usize,
    ) -> Self {
        let mut eos: Vec<u32> = model.config.eos_token_ids.clone();
        eos.push(tokenizer.eos_id());
        Self {
            model,
            tokenizer,
            cfg,
            seeds,
            max_batch,
            eos,
            shared: Rng::new(cfg.seed),
            stream: None,
            rows: Vec::new(),
            cache: model.empty_cache(0),
        }
    }

    /// Every prompt, in order of admission, until all are answered (or `on_done` says stop); the
    /// prefills it ran.
    fn run(&mut self, prompts: &[Vec<u32>], on_done: &mut dyn FnMut(usize, Generation) -> bool) -> Result<usize> {
        if prompts.iter().any(Vec::is_empty) {
            return Err(ModelError::Input("cannot generate from an empty prompt".into()));
        }
        if let Some(seeds) = self.seeds
            && seeds.len() != prompts.len()
        {
            return Err(ModelError::Input(format!("{} seeds for {} prompts", seeds.len(), prompts.len())));
        }
        check_positions(self.model, prompts.iter().map(Vec::len).max().unwrap_or(0), "a prompt")?;
        if self.cfg.max_new_tokens == 0 {
            for i in 0..prompts.len() {
                let empty = Generation { ids: Vec::new(), text: String::new(), finish_reason: "length", seconds: 0.0 };
                if !on_done(i, empty) {
                    break;
                }
            }
            return Ok(0);
        }
        let mut next = 0;
        let mut prefills = 0;
        loop {
            // Admit prompts into the free places: one prefill for all of them, or, while other
            // rows still answer, for at most a quarter of the batch at a time (the new prompts'
            // own cache and prefill sit beside the whole cache until they are written into their
            // rows; the next prefill follows at once, before any decoding step).
            let live = self.rows.iter().filter(|r| r.live).count();
            let places =
                if live == 0 { self.max_batch } else { (self.rows.len() - live).min(admit_at_once(self.max_batch)) };
            let free = places.min(prompts.len() - next);
            if free > 0 {
                let (slots, logits) = self.admit(prompts, next..next + free);
                next += free;
                prefills += 1;
                if !self.pick_all(&slots, &logits, on_done)? {
                    return Ok(prefills);
                }
                continue;
            }
            if live == 0 {
                return Ok(prefills);
            }
            // No prompt waits for a finished row's place: drop such rows once they are a
            // quarter of the batch (each drop copies the cache; each row kept costs its compute).
            if next == prompts.len() && (self.rows.len() - live) * 4 >= self.rows.len() {
                self.shrink();
            }
            let logits = self.decode();
            let slots: Vec<usize> = (0..self.rows.len()).collect();
            if !self.pick_all(&slots, &logits, on_done)? {
                return Ok(prefills);
            }
        }
    }

    /// Prefill `range` of the prompts (left-padded among themselves) into the finished rows'
    /// places, or as the whole batch when no row is live; the rows they took and their last
    /// positions' logits (in that order).
    fn admit(&mut self, prompts: &[Vec<u32>], range: std::ops::Range<usize>) -> (Vec<usize>, Vec<f32>) {
        let batch = &prompts[range.clone()];
        let inputs = Inputs::left_padded(batch, 0);
        if !self.rows.iter().any(|r| r.live) {
            // No row reads the cache any more: free it before the prefill (which makes the next
            // one), not after.
            self.cache = self.model.empty_cache(0);
        }
        let mut fresh = self.model.empty_cache(batch.len());
        let model = self.model;
        let logits = B::in_pool(|| last_logits(model, model.hidden(&inputs, &inputs.valid, Some(&mut fresh))));
        let new = inputs.valid.first().map_or(0, Vec::len);
        let slots: Vec<usize> = if self.rows.iter().any(|r| r.live) {
            // Into the finished rows, their columns ending where the cache ends (widened first
            // when the new prompts are longer than the cache).
            let old = self.columns();
            if new > old {
                for layer in &mut self.cache {
                    layer.widen(new - old);
                }
                for row in &mut self.rows {
                    row.valid.splice(0..0, std::iter::repeat_n(false, new - old));
                }
            }
            let slots: Vec<usize> = (0..self.rows.len()).filter(|&r| !self.rows[r].live).take(batch.len()).collect();
            assert_eq!(slots.len(), batch.len(), "admitted only into finished rows' places");
            for (layer, part) in self.cache.iter_mut().zip(&fresh) {
                for (k, &slot) in slots.iter().enumerate() {
                    layer.write_row(slot, part.keys().narrow(0, k, 1), part.values().narrow(0, k, 1));
                }
            }
            slots
        } else {
            self.cache = fresh;
            self.rows.clear();
            (0..batch.len()).collect()
        };
        let width = self.columns().max(new);
        for ((k, i), valid) in range.enumerate().zip(inputs.valid) {
            let mut row_valid = vec![false; width - new];
            row_valid.extend(valid);
            let row = Row {
                index: i,
                ids: Vec::new(),
                rng: self.seeds.map(|s| Rng::new(s[i])),
                valid: row_valid,
                next_pos: batch[k].len(),
                picked: 0,
                last: 0,
                started: std::time::Instant::now(),
                live: true,
            };
            match self.rows.get_mut(slots[k]) {
                Some(place) => *place = row,
                None => self.rows.push(row),
            }
        }
        (slots, logits)
    }

    /// The cache's columns (the longest row's keys).
    fn columns(&self) -> usize {
        self.rows.first().map_or(0, |r| r.valid.len())
    }

    /// The leading columns no live row attends to.
    fn unread(&self) -> usize {
        let width = self.columns();
        self.rows.iter().filter(|r| r.live).map(|r| r.valid.iter().position(|&v| v).unwrap_or(width)).min().unwrap_or(0)
    }

    /// One decoding step of every row: its last token in, its next token's logits out. A
    /// finished row attends only to the columns made since it finished, at its last position.
    fn decode(&mut self) -> Vec<f32> {
        // A full cache first drops the leading columns no live row reads (in the copy that
        // growing it would make anyway): continuous batching keeps appending columns while
        // the oldest rows leave.
        if self.cache.first().is_some_and(LayerCache::is_full) {
            let from = self.unread();
            if from > 0 {
                for layer in &mut self.cache {
                    layer.compact(from);
                }
                for row in &mut self.rows {
                    row.valid.drain(..from);
                }
            }
        }
        let inputs = Inputs {
            ids: self.rows.iter().map(|r| vec![r.last]).collect(),
            positions: self.rows.iter().map(|r| vec![r.next_pos]).collect(),
            valid: vec![vec![true]; self.rows.len()],
        };
        for row in &mut self.rows {
            row.valid.push(true);
            if row.live {
                row.next_pos += 1;
            }
        }
        let key_valid: Vec<Vec<bool>> = self.rows.iter().map(|r| r.valid.clone()).collect();
        let (model, cache) = (self.model, &mut self.cache);
        B::in_pool(|| last_logits(model, model.hidden(&inputs, &key_valid, Some(cache))))
    }

    /// Pick the next token of the live rows among `slots` (`logits`: one row each, in that
    /// order), pass on the replies that finished and free their places; `false`: `on_done`
    /// said stop.
    fn pick_all(
        &mut self,
        slots: &[usize],
        logits: &[f32],
        on_done: &mut dyn FnMut(usize, Generation) -> bool,
    ) -> Result<bool> {
        let v = logits.len() / slots.len().max(1);
        let mut finished: Vec<(usize, &'static str)> = Vec::new();
        for (&r, row_logits) in slots.iter().zip(logits.chunks(v)) {
            let row = &mut self.rows[r];
            if !row.live {
                continue;
            }
            let rng = row.rng.as_mut().unwrap_or(&mut self.shared);
            let id = pick(row_logits, self.cfg, rng);
            row.picked += 1;
            row.last = id;
            if self.eos.contains(&id) {
                finished.push((r, "eos"));
                continue;
            }
            row.ids.push(id);
            let streaming = row.index == 0 && self.stream.is_some();
            if !self.cfg.stop.is_empty() || streaming {
                let mut text = self.tokenizer.decode(&row.ids, true)?;
                let cut = self.cfg.stop.iter().filter_map(|s| text.find(s.as_str())).min();
                if let Some(cut) = cut {
                    text.truncate(cut);
                }
                if streaming && let Some(stream) = self.stream.as_mut() {
                    stream.show(&text, false);
                }
                if cut.is_some() {
                    finished.push((r, "stop"));
                    continue;
                }
            }
            if row.picked >= self.cfg.max_new_tokens {
                finished.push((r, "length"));
            }
        }
        for (r, reason) in finished {
            let row = &mut self.rows[r];
            row.live = false;
            row.valid.fill(false);
            let ids = std::mem::take(&mut row.ids);
            let (index, seconds) = (row.index, row.started.elapsed().as_secs_f64());
            let mut text = self.tokenizer.decode(&ids, true)?;
            if let Some(cut) = self.cfg.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                text.truncate(cut);
            }
            if index == 0
                && let Some(stream) = self.stream.as_mut()
            {
                stream.show(&text, true);
            }
            if !on_done(index, Generation { ids, text, finish_reason: reason, seconds }) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The cache of the live rows only, without the leading columns none of them attends to.
    fn shrink(&mut self) {
        let keep: Vec<usize> = (0..self.rows.len()).filter(|&r| self.rows[r].live).collect();
        if keep.is_empty() {
            self.rows.clear();
            self.cache = self.model.empty_cache(0);
            return;
        }
        let from = self.unread();
        let device = self.model.device();
        let ids: Vec<i32> = keep.iter().map(|&r| r as i32).collect();
        let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [keep.len()]), &device);
        for layer in &mut self.cache {
            *layer = layer.select(ids.clone(), from);
        }
        self.rows.retain(|r| r.live);
        for row in &mut self.rows {
            row.valid.drain(..from);
        }
    }
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

    /// What `pick` did before the lazy sort: the whole row sorted (stable, descending).
    fn pick_full_sort(logits: &[f32], cfg: &GenerateConfig, rng: &mut Rng) -> u32 {
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if cfg.top_k > 0 {
            order.truncate(cfg.top_k);
        }
        let max = f64::from(logits[order[0]]);
        let mut probs: Vec<f64> =
            order.iter().map(|&i| ((f64::from(logits[i]) - max) / cfg.temperature).exp()).collect();
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

    /// The lazy sort draws the token the full sort draws, for every setting, on rows with ties,
    /// flat rows (the walk goes deep) and peaked ones, over many seeds.
    #[test]
    fn lazy_sort_draws_what_the_full_sort_draws() {
        let mut draws = Rng::new(7);
        let settings = [(0.7, 1.0, 0), (1.0, 0.9, 0), (1.3, 0.95, 50), (0.8, 1.0, 40), (5.0, 1.0, 0), (0.5, 0.5, 3)];
        let mut deep = 0;
        for row in 0..60 {
            let v = [5usize, 100, 3000, 49_152][row % 4];
            let spread = [0.1f64, 2.0, 8.0][row % 3];
            // Coarse values, so that some logits tie.
            let logits: Vec<f32> = (0..v).map(|_| ((draws.next_f64() * spread * 8.0).round() / 8.0) as f32).collect();
            for &(temperature, top_p, top_k) in &settings {
                let cfg = GenerateConfig { temperature, top_p, top_k, ..Default::default() };
                for seed in 0..20 {
                    let lazy = pick(&logits, &cfg, &mut Rng::new(seed));
                    assert_eq!(
                        lazy,
                        pick_full_sort(&logits, &cfg, &mut Rng::new(seed)),
                        "{v} logits, {cfg:?}, seed {seed}"
                    );
                    deep += usize::from(logits.iter().filter(|&&l| l > logits[lazy as usize]).count() > 64);
                }
            }
        }
        assert!(deep > 0, "no draw went past the first sorted stretch");
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
