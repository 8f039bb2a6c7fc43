//! From a stage's examples to token ids: every sequence of every example becomes
//! (prompt ids, response ids) by the chat-template convention of `fuserl_model::chat`, truncated
//! to the recipe's lengths (the prompt keeps its end, the response its beginning, as TRL does).

use std::collections::HashMap;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use fuserl_core::data::{ChatMessage, CompletionId, Example};
use fuserl_model::chat::ChatTokenizer;
use fuserl_model::llama::Inputs;

use crate::error::{Result, TrainError};

/// One sequence's tokens.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SeqTokens {
    /// Prompt ids.
    pub prompt: Vec<u32>,
    /// Response ids (EOS included).
    pub response: Vec<u32>,
}

/// A training example with its token ids.
#[derive(Debug, Clone)]
pub struct TrainExample {
    /// The example (weights, provenance).
    pub example: Example,
    /// Tokens of each sequence, in the example's order.
    pub seqs: Vec<SeqTokens>,
}

impl TrainExample {
    /// Total tokens of the example (for batching by length).
    pub fn len(&self) -> usize {
        self.seqs.iter().map(|s| s.prompt.len() + s.response.len()).max().unwrap_or(0)
    }

    /// Whether it has no tokens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Key of a completion in caches.
pub fn completion_key(id: &CompletionId) -> String {
    format!("{}\u{1f}{}\u{1f}{}", id.prompt_id, id.source, id.sample_index)
}

/// Tokenize examples. `prompts` maps prompt ids to messages, `texts` completions to their text.
pub fn tokenize(
    examples: Vec<Example>,
    prompts: &HashMap<String, Vec<ChatMessage>>,
    texts: &HashMap<CompletionId, String>,
    tok: &ChatTokenizer,
    max_length: usize,
    max_prompt_length: Option<usize>,
) -> Result<Vec<TrainExample>> {
    let mut prompt_cache: HashMap<String, Vec<u32>> = HashMap::new();
    let mut prompts_cut = 0;
    let mut out = Vec::with_capacity(examples.len());
    for example in examples {
        let messages = prompts
            .get(&example.prompt_id)
            .ok_or_else(|| TrainError::Data(format!("example for unknown prompt `{}`", example.prompt_id)))?;
        let prompt = match prompt_cache.get(&example.prompt_id) {
            Some(p) => p.clone(),
            None => {
                let mut p = tok.prompt_ids(messages)?;
                let cap =
                    max_prompt_length.unwrap_or(max_length.saturating_sub(1)).min(max_length.saturating_sub(1)).max(1);
                if p.len() > cap {
                    p.drain(..p.len() - cap);
                    prompts_cut += 1;
                }
                prompt_cache.insert(example.prompt_id.clone(), p.clone());
                p
            }
        };
        let mut seqs = Vec::with_capacity(example.sequences.len());
        for s in &example.sequences {
            let text =
                texts.get(&s.completion).ok_or_else(|| TrainError::Data(format!("no text for {}", s.completion)))?;
            let room = max_length - prompt.len();
            let cut = cut_for_tokens(text, room);
            let mut response = tok.response_ids(cut)?;
            if cut.len() < text.len() {
                // The answer goes on past the cut: whatever `response_ids` ends every response
                // with (end of turn, EOS) does not belong here.
                let ending = tok.response_ids("")?;
                if !ending.is_empty() && response.ends_with(&ending) {
                    response.truncate(response.len() - ending.len());
                }
            }
            response.truncate(room);
            seqs.push(SeqTokens { prompt: prompt.clone(), response });
        }
        out.push(TrainExample { example, seqs });
    }
    if prompts_cut > 0 {
        // Training on prompts without their beginning (issue #34: max_length = 8 trained on cut
        // prompts in silence).
        tracing::warn!(
            "{prompts_cut} of {} prompts are longer than the room max_length = {max_length} leaves them: their first \
             tokens were cut (raise [target] max_length, or max_prompt_length)",
            prompt_cache.len()
        );
    }
    Ok(out)
}

/// The bytes a kept token can span, at most: no vocabulary of a released model has a token
/// longer (the longest are runs of spaces or symbols of a few dozen bytes).
const MAX_TOKEN_BYTES: usize = 256;

/// `text` cut (at a character boundary) to what `tokens` tokens can span at most, before it is
/// tokenized: the tokens past them are dropped anyway, and a 60 MB answer in a data file took
/// 11 GB inside the tokenizer.
pub fn cut_for_tokens(text: &str, tokens: usize) -> &str {
    let budget = tokens.saturating_mul(MAX_TOKEN_BYTES);
    if text.len() <= budget {
        return text;
    }
    let mut end = budget;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// One right-padded batch of whole sequences (prompt then response).
pub(crate) fn padded_batch(seqs: &[SeqTokens]) -> Inputs {
    let full: Vec<Vec<u32>> = seqs.iter().map(|s| s.prompt.iter().chain(&s.response).copied().collect()).collect();
    Inputs::right_padded(&full, 0)
}

/// What each position of a padded batch predicts: position `j` predicts token `j + 1`, and
/// counts when that token is part of the response (other positions get target -1: not scored).
///
/// # Shapes
/// `inputs: [S, T]` -> `[S, T - 1]`
pub(crate) fn score_targets<B: Backend>(seqs: &[SeqTokens], inputs: &Inputs, device: &B::Device) -> Tensor<B, 2, Int> {
    let (s, t) = (seqs.len(), inputs.ids[0].len());
    let mut targets = Vec::with_capacity(s * (t - 1));
    for (seq, ids) in seqs.iter().zip(&inputs.ids) {
        let (p, n) = (seq.prompt.len(), seq.prompt.len() + seq.response.len());
        targets.extend((0..t - 1).map(|j| if j + 1 >= p && j + 1 < n { ids[j + 1] as i32 } else { -1 }));
    }
    Tensor::from_data(TensorData::new(targets, [s, t - 1]), device)
}

#[cfg(test)]
mod tests {
    use super::cut_for_tokens;

    /// Issue #33: a response far longer than the room for it is cut before it is tokenized, and
    /// the kept tokens are those of the whole text.
    #[test]
    fn long_answers_are_cut_before_tokenizing_to_the_same_tokens() {
        let tiny = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../checkpoints/tiny-chat");
        let tok = fuserl_model::chat::ChatTokenizer::load(&tiny, None).expect("tokenizer");
        let unit = "Paris is the capital of France, and élan vital — 東京 too. ";
        let text = unit.repeat(200_000); // 12 MB
        for room in [1, 7, 100, 255] {
            let cut = cut_for_tokens(&text, room);
            assert!(cut.len() <= room * 256 && cut.len() < text.len());
            let mut kept = tok.response_ids(cut).expect("ids");
            kept.truncate(room);
            // Sixteen times the bytes: what cutting at the budget must not change.
            let mut whole = tok.response_ids(cut_for_tokens(&text, room * 16)).expect("ids");
            whole.truncate(room);
            assert_eq!(kept, whole, "room {room}");
        }
        assert_eq!(cut_for_tokens("short", 10), "short");
    }
}
