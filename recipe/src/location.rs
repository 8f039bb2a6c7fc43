//! Map a key path to a line and column of a TOML file, so that every recipe error can point
//! at its place.

use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use fuserl_core::config::{KeyPath, PathSegment};

/// A parsed TOML document that keeps the position of every key and value.
#[derive(Debug)]
pub struct Locator<'a> {
    text: &'a str,
    doc: Option<Spanned<DeTable<'a>>>,
}

impl<'a> Locator<'a> {
    /// Parse `text` for positions (a document with syntax errors locates nothing but itself).
    pub fn new(text: &'a str) -> Self {
        Self { text, doc: DeTable::parse(text).ok() }
    }

    /// The 1-based line and column of `path`: the key itself when it exists, else the deepest
    /// table on the path that does (where a missing key belongs).
    pub fn locate(&self, path: &KeyPath) -> (usize, usize) {
        let span = self.span(path);
        self.line_col(span.start)
    }

    fn span(&self, path: &KeyPath) -> Range<usize> {
        let Some(doc) = &self.doc else { return 0..0 };
        let mut best = first_entry_span(doc.get_ref()).unwrap_or(0..0);
        let mut table: Option<&DeTable<'_>> = Some(doc.get_ref());
        let mut array: Option<&[Spanned<DeValue<'_>>]> = None;
        for segment in &path.0 {
            let value: &Spanned<DeValue<'_>> = match (segment, table, array) {
                (PathSegment::Key(k), Some(t), _) => {
                    let Some((key, value)) = t.iter().find(|(key, _)| key.get_ref().as_ref() == k.as_str()) else {
                        break;
                    };
                    best = key.span();
                    value
                }
                (PathSegment::Index(i), _, Some(items)) => {
                    let Some(value) = items.get(*i) else { break };
                    best = match value.get_ref() {
                        // An array-of-tables element: point at its first key, not at `[[…]]`.
                        DeValue::Table(t) => first_entry_span(t).unwrap_or_else(|| value.span()),
                        _ => value.span(),
                    };
                    value
                }
                _ => break,
            };
            table = None;
            array = None;
            match value.get_ref() {
                DeValue::Table(t) => table = Some(t),
                DeValue::Array(a) => array = Some(a.as_ref()),
                _ => {}
            }
        }
        best
    }

    /// 1-based line and column (in characters) of byte `offset`.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let column = self.text[line_start..offset].chars().count() + 1;
        (line, column)
    }
}

fn first_entry_span(table: &DeTable<'_>) -> Option<Range<usize>> {
    table.iter().map(|(k, _)| k.span()).min_by_key(|s| s.start)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "a = 1\n[b]\nc = 'x'\n\n[[d]]\ne = 2\n[[d]]\nf = 3\n";

    #[test]
    fn finds_keys_tables_and_array_elements() {
        let loc = Locator::new(DOC);
        assert_eq!(loc.locate(&KeyPath::keys(&["a"])), (1, 1));
        assert_eq!(loc.locate(&KeyPath::keys(&["b", "c"])), (3, 1));
        assert_eq!(loc.locate(&KeyPath::keys(&["d"]).index(1).key("f")), (8, 1));
        // A missing key points at the deepest table that exists.
        assert_eq!(loc.locate(&KeyPath::keys(&["d"]).index(1).key("zzz")), (8, 1));
        assert_eq!(loc.locate(&KeyPath::keys(&["b", "nope"])).0, 2);
    }
}
