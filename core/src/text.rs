//! Text from files, made safe to show: names read from data files, checkpoints and plugins
//! (a GGUF architecture, a source's name, a tensor's) reach messages, logs and reports, and a
//! control character in one (an escape sequence, a carriage return, a newline) would recolour the
//! terminal, forge a line of output or break a report's table. [`printable`] escapes them.
//!
//! ```
//! use fuserl_core::text::printable;
//! assert_eq!(printable("llama"), "llama");
//! assert_eq!(printable("evil\u{1b}[2J\nOK: forged"), "evil\\u{1b}[2J\\nOK: forged");
//! ```

use std::borrow::Cow;

/// `s` with every control character (C0, DEL, C1; also tab and newline) written as a Rust escape
/// (`\n`, `\u{1b}`); unchanged, and not copied, when it has none.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// A line of output (a message, a log line) with its control characters escaped, line breaks
/// kept: what the binary writes to a terminal.
pub fn printable_lines(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c.is_control() && c != '\n') {
        return Cow::Borrowed(s);
    }
    Cow::Owned(s.split('\n').map(printable).collect::<Vec<_>>().join("\n"))
}

/// `n` and the noun, plural unless `n` is 1: `counted(1, "attempt")` is "1 attempt",
/// `counted(3, "attempt")` "3 attempts".
pub fn counted(n: impl Into<u64>, noun: &str) -> String {
    let n = n.into();
    if n == 1 { format!("1 {noun}") } else { format!("{n} {noun}s") }
}

#[cfg(test)]
mod counted_tests {
    #[test]
    fn one_is_singular_and_the_rest_plural() {
        assert_eq!(super::counted(1u32, "pair"), "1 pair");
        assert_eq!(super::counted(0u32, "pair"), "0 pairs");
        assert_eq!(super::counted(12u64, "token"), "12 tokens");
    }
}
