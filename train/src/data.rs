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
                let cap =
                    max_prompt_length.unwrap_or(max_length.saturating_sub(1)).min(max_length.saturating_sub(1)).max(1);
                let (p, cut) = tok.prompt_ids(messages, cap)?;
                prompts_cut += usize::from(cut);
                prompt_cache.insert(example.prompt_id.clone(), p.clone());
                p
            }
        };
        let mut seqs = Vec::with_capacity(example.sequences.len());
        for s in &example.sequences {
            let text =
                texts.get(&s.completion).ok_or_else(|| TrainError::Data(format!("no text for {}", s.completion)))?;
            let room = max_length - prompt.len();
            // Only the first tokens that fit are encoded (a 60 MB answer took 11 GB in the
            // tokenizer); an answer that goes on past them has no end of turn here.
            let (mut response, _) = tok.response_ids_within(text, room)?;
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
    use fuserl_core::data::ChatMessage;
    use fuserl_model::chat::ChatTokenizer;

    fn tiny() -> ChatTokenizer {
        let tiny = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../checkpoints/tiny-chat");
        ChatTokenizer::load(&tiny, None).expect("tokenizer")
    }

    const UNIT: &str = "Paris is the capital of France, and élan vital — 東京 too. ";

    /// Issue #33: of a response far longer than the room for it only the first tokens are
    /// encoded, and they are those of the whole text.
    #[test]
    fn long_answers_keep_their_first_tokens_when_cut_before_tokenizing() {
        let tok = tiny();
        let text = UNIT.repeat(200_000); // 12 MB
        for room in [1, 7, 100, 255, 5000] {
            let (kept, more) = tok.response_ids_within(&text, room).expect("ids");
            assert!(more && kept.len() == room, "room {room}");
            // A sixteenth of the text, tokenized whole: what cutting must not change.
            let mut whole = tok.encode(&text[..text.len() / 16]).expect("ids");
            whole.truncate(room);
            assert_eq!(kept, whole, "room {room}");
        }
        let (ids, more) = tok.response_ids_within("short", 10).expect("ids");
        assert!(!more && ids == tok.response_ids("short").expect("ids"));
    }

    /// Issue #33: a rendered prompt far longer than the room for it is cut from the start before
    /// it is tokenized (a template rendered megabytes, which the tokenizers crate encoded into
    /// more than 1 GiB), and the kept last tokens are those of the whole text.
    #[test]
    fn long_prompts_keep_their_last_tokens_when_cut_before_tokenizing() {
        let tok = tiny();
        let messages = [ChatMessage::user(UNIT.repeat(100_000))]; // 6 MB
        let whole = tok.render(&messages, true).expect("render");
        let start = (whole.len() - whole.len() / 16..).find(|&i| whole.is_char_boundary(i)).expect("a boundary");
        let tail = &whole[start..];
        let tail_ids = tok.encode(tail).expect("ids");
        for keep in [1, 7, 100, 255, 5000] {
            let (ids, cut) = tok.prompt_ids(&messages, keep).expect("ids");
            assert!(cut && ids.len() == keep, "keep {keep}");
            assert_eq!(ids, tail_ids[tail_ids.len() - keep..], "keep {keep}");
        }
        let short = [ChatMessage::user("short")];
        let (ids, cut) = tok.prompt_ids(&short, 1000).expect("ids");
        assert!(!cut && ids == tok.encode(&tok.render(&short, true).expect("render")).expect("ids"));
    }
}
