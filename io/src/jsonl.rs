//! Reading JSONL data files line by line with a bound: a line longer than [`MAX_LINE`] bytes is an
//! error naming the file and the line, found after reading at most that much of it (a file of
//! one endless line, or a `.jsonl` that is not text, is never read whole into memory).

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use fuserl_core::error::{Error, Result};

/// The longest line a data file may have: 64 MiB.
pub const MAX_LINE: usize = 64 << 20;

/// The lines of `file` with their 1-based numbers (without the line ends; blank lines kept).
pub fn lines(file: &Path) -> Result<Vec<(u64, String)>> {
    lines_bounded(file, MAX_LINE)
}

/// [`lines`] with another bound (for tests).
pub fn lines_bounded(file: &Path, max_line: usize) -> Result<Vec<(u64, String)>> {
    let f = fuserl_core::paths::open_regular(file).map_err(|e| Error::io(file, e))?;
    let mut reader = BufReader::with_capacity(1 << 16, f);
    let mut out = Vec::new();
    let mut buf = Vec::new();
    for n in 1u64.. {
        buf.clear();
        // One byte more than the bound tells a line at the bound from a longer one.
        let read =
            (&mut reader).take(max_line as u64 + 1).read_until(b'\n', &mut buf).map_err(|e| Error::io(file, e))?;
        if read == 0 {
            break;
        }
        if buf.last() == Some(&b'\n') {
            buf.pop();
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
        } else if read > max_line {
            return Err(Error::Data {
                file: file.to_path_buf(),
                line: n,
                message: format!(
                    "a line longer than {} MiB; expected one JSON record per line",
                    max_line as f64 / f64::from(1 << 20)
                ),
            });
        }
        let text = String::from_utf8(std::mem::take(&mut buf)).map_err(|_| Error::Data {
            file: file.to_path_buf(),
            line: n,
            message: "not UTF-8 text".into(),
        })?;
        out.push((n, text));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_numbered_and_a_line_past_the_bound_is_named() {
        let dir = tempfile::tempdir().expect("tmp");
        let f = dir.path().join("a.jsonl");
        std::fs::write(&f, "{\"a\": 1}\r\n\n{\"b\": 2}").expect("write");
        let got = lines(&f).expect("lines");
        assert_eq!(got, vec![(1, "{\"a\": 1}".to_owned()), (2, String::new()), (3, "{\"b\": 2}".to_owned())]);
        std::fs::write(&f, "{}\n0123456789\n").expect("write");
        assert_eq!(lines_bounded(&f, 10).expect("at the bound").len(), 2);
        std::fs::write(&f, "{}\n0123456789a\n").expect("write");
        let err = lines_bounded(&f, 10).expect_err("past the bound").to_string();
        assert!(err.contains("a.jsonl:2: a line longer than"), "{err}");
    }
}
