//! Entry points for the fuzz targets (`fuzz/`, `scripts/fuzz.sh`): the parsers of server replies
//! and record lines, reached without a server. Each takes untrusted text and must return (an
//! error is fine), never panic, hang or allocate without bound; each says whether the text was
//! accepted, so that the fuzz tests can check their seeds reach past the first error.

use crate::rewards::{http, judge, python_tests};
use crate::sources::jsonl::{self, Layout};
use crate::sources::openai::{self, Endpoint};

/// A reply of an OpenAI-compatible server, read by the `openai` source and by the `judge`
/// reward (the verdict, its rating weighted by the top log-probs, its pairwise label), for
/// both endpoints.
pub fn openai_reply(text: &str) -> bool {
    let mut accepted = false;
    for endpoint in [Endpoint::Chat, Endpoint::Completions] {
        accepted |= openai::parse_reply(text, endpoint).is_ok();
        let Ok(verdict) = judge::parse_verdict(text, endpoint, "") else { continue };
        if let Some((_, offset)) = judge::parse_rating(&verdict.text, 1.0, 10.0) {
            let _ = judge::weighted_rating(&verdict, offset, 1.0, 10.0);
        }
        let _ = judge::parse_preference(&verdict.text);
    }
    accepted
}

/// A reply of a reward server to the `http` reward, for one to three answers.
pub fn reward_reply(text: &str) -> bool {
    let Ok(value) = http::parse_lenient(text) else { return false };
    let mut accepted = false;
    for n in 1..=3 {
        accepted |= http::rewards_of(&value, "rewards", n).is_ok();
    }
    accepted
}

/// Lines of a `jsonl` source file, in every layout, and of a `python-tests` tests file.
pub fn record_lines(text: &str) -> bool {
    let mut accepted = python_tests::parse_tests(text).is_ok_and(|tests| !tests.is_empty());
    for line in text.lines() {
        for layout in [Layout::Auto, Layout::PerPrompt, Layout::Flat, Layout::Preference, Layout::Completions] {
            accepted |= jsonl::parse_line(line, layout, "dataset").is_ok();
        }
    }
    accepted
}
