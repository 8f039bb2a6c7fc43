//! Bounds the `parquet` crate lacks (issue #13's fuzzing found files for both): it sizes vectors
//! by the counts a file declares before reading them, so a few bytes of hostile footer or page
//! header make it ask for gigabytes. Two checks run first, with a Thrift compact-protocol reader
//! that only skips forward and allocates nothing (the crate keeps its own reader private):
//! [`check_footer`], before the footer is parsed: the footer fits in the file and in
//! [`MAX_FOOTER_BYTES`], and every list in it claims no more elements than bytes left to hold
//! them; [`check`], before any row is read: every page header of every column chunk is read, and
//! a page declaring more than [`MAX_PAGE_BYTES`] uncompressed, or lying outside its chunk or the
//! file, is refused.

use std::io::{Read, Seek, SeekFrom};

use parquet::file::metadata::ParquetMetaData;

/// The largest uncompressed page accepted: far above what writers make (pyarrow and `datasets`
/// write pages of about 1 MiB), far below what would strain memory.
pub const MAX_PAGE_BYTES: i64 = 256 << 20;

/// The most header bytes read for one page (statistics may make headers long, never this long).
const MAX_HEADER_BYTES: u64 = 16 << 20;

/// The largest footer (file metadata) accepted.
pub const MAX_FOOTER_BYTES: u64 = 16 << 20;

/// Check the footer of a Parquet file before the parquet crate parses it. A file that does not
/// end with `PAR1` is left to the parquet crate's own error.
pub fn check_footer(file: &mut (impl Read + Seek), file_len: u64) -> Result<(), String> {
    if file_len < 12 {
        return Ok(());
    }
    let mut tail = [0u8; 8];
    file.seek(SeekFrom::Start(file_len - 8)).map_err(|e| e.to_string())?;
    file.read_exact(&mut tail).map_err(|e| e.to_string())?;
    if &tail[4..] != b"PAR1" {
        return Ok(());
    }
    let footer_len = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
    if footer_len + 8 > file_len || footer_len > MAX_FOOTER_BYTES {
        return Err(format!(
            "the footer claims {footer_len} bytes, more than the file's {file_len} or the {MAX_FOOTER_BYTES} accepted"
        ));
    }
    let mut footer = vec![0u8; footer_len as usize];
    file.seek(SeekFrom::Start(file_len - 8 - footer_len)).map_err(|e| e.to_string())?;
    file.read_exact(&mut footer).map_err(|e| e.to_string())?;
    Compact { b: &footer, pos: 0 }.skip(12, 0).map_err(|e| format!("the footer: {e}"))
}

/// Check every page header of every column chunk in `metadata` against the file.
pub fn check(file: &mut (impl Read + Seek), file_len: u64, metadata: &ParquetMetaData) -> Result<(), String> {
    for (g, group) in metadata.row_groups().iter().enumerate() {
        for column in group.columns() {
            let start = column.dictionary_page_offset().unwrap_or_else(|| column.data_page_offset());
            let len = column.compressed_size();
            let at = || format!("row group {}, column `{}`", g + 1, column.column_path());
            let end = start.checked_add(len).filter(|e| start >= 0 && len >= 0 && (*e as u64) <= file_len);
            let Some(end) = end else {
                return Err(format!("{}: the column chunk ({len} bytes at {start}) lies outside the file", at()));
            };
            let mut pos = start;
            while pos < end {
                let window = ((end - pos) as u64).min(MAX_HEADER_BYTES);
                file.seek(SeekFrom::Start(pos as u64)).map_err(|e| e.to_string())?;
                let mut header = Vec::new();
                file.by_ref().take(window).read_to_end(&mut header).map_err(|e| e.to_string())?;
                let page = PageSizes::read(&header).map_err(|e| format!("{}: page header at {pos}: {e}", at()))?;
                if !(0..=MAX_PAGE_BYTES).contains(&page.uncompressed) || page.compressed < 0 {
                    return Err(format!(
                        "{}: a page declares {} bytes uncompressed and {} compressed (at most {MAX_PAGE_BYTES} \
                         uncompressed are read)",
                        at(),
                        page.uncompressed,
                        page.compressed
                    ));
                }
                pos = pos.saturating_add(page.header_len as i64).saturating_add(page.compressed);
            }
            if pos != end {
                return Err(format!("{}: the last page runs past the column chunk", at()));
            }
        }
    }
    Ok(())
}

/// What the check needs of a `PageHeader`: fields 2 (uncompressed_page_size) and 3
/// (compressed_page_size), and the header's length.
#[derive(Debug, PartialEq)]
struct PageSizes {
    uncompressed: i64,
    compressed: i64,
    header_len: usize,
}

impl PageSizes {
    fn read(bytes: &[u8]) -> Result<Self, String> {
        let mut r = Compact { b: bytes, pos: 0 };
        let (mut uncompressed, mut compressed) = (None, None);
        let mut last_id = 0i16;
        loop {
            let head = r.byte()?;
            if head == 0 {
                break;
            }
            let kind = head & 0x0f;
            let delta = i16::from(head >> 4);
            let id = if delta == 0 { r.zigzag()? as i16 } else { last_id.wrapping_add(delta) };
            last_id = id;
            match (id, kind) {
                (2, 5) => uncompressed = Some(r.zigzag()?),
                (3, 5) => compressed = Some(r.zigzag()?),
                _ => r.skip(kind, 0)?,
            }
        }
        match (uncompressed, compressed) {
            (Some(uncompressed), Some(compressed)) => Ok(Self { uncompressed, compressed, header_len: r.pos }),
            _ => Err("no page sizes".into()),
        }
    }
}

/// A reader of the Thrift compact protocol that only moves forward; nothing it reads allocates.
struct Compact<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Compact<'_> {
    fn byte(&mut self) -> Result<u8, String> {
        let v = *self.b.get(self.pos).ok_or("the header runs past the end")?;
        self.pos += 1;
        Ok(v)
    }

    fn advance(&mut self, n: u64) -> Result<(), String> {
        let end = (self.pos as u64).checked_add(n).filter(|e| *e <= self.b.len() as u64);
        self.pos = end.ok_or("the header runs past the end")? as usize;
        Ok(())
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..70).step_by(7) {
            let byte = self.byte()?;
            v |= u64::from(byte & 0x7f).checked_shl(shift).unwrap_or(0);
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("a varint longer than 10 bytes".into())
    }

    fn zigzag(&mut self) -> Result<i64, String> {
        let v = self.varint()?;
        Ok((v >> 1) as i64 ^ -((v & 1) as i64))
    }

    /// Skip one value of compact type `kind`.
    fn skip(&mut self, kind: u8, depth: u32) -> Result<(), String> {
        if depth > 64 {
            return Err("values nested deeper than 64".into());
        }
        match kind {
            1 | 2 => Ok(()),
            3 => self.advance(1),
            4..=6 => self.varint().map(drop),
            7 => self.advance(8),
            8 => {
                let n = self.varint()?;
                self.advance(n)
            }
            9 | 10 => {
                let head = self.byte()?;
                let n = if head >> 4 == 15 { self.varint()? } else { u64::from(head >> 4) };
                self.skip_many(n, head & 0x0f, depth)
            }
            11 => {
                let n = self.varint()?;
                if n == 0 {
                    return Ok(());
                }
                let kinds = self.byte()?;
                for _ in 0..n {
                    self.skip_element(kinds >> 4, depth)?;
                    self.skip_element(kinds & 0x0f, depth)?;
                }
                Ok(())
            }
            12 => loop {
                let head = self.byte()?;
                if head == 0 {
                    return Ok(());
                }
                if head >> 4 == 0 {
                    self.zigzag()?;
                }
                self.skip(head & 0x0f, depth + 1)?;
            },
            13 => self.advance(16),
            other => Err(format!("unknown Thrift type {other}")),
        }
    }

    /// Elements of a list, set or map: booleans take a byte each there.
    fn skip_element(&mut self, kind: u8, depth: u32) -> Result<(), String> {
        if kind == 1 || kind == 2 { self.advance(1) } else { self.skip(kind, depth + 1) }
    }

    fn skip_many(&mut self, n: u64, kind: u8, depth: u32) -> Result<(), String> {
        // Every element takes at least one byte but for booleans outside containers, which
        // cannot occur here: a count past the bytes left is refused before looping.
        if n > (self.b.len() - self.pos) as u64 {
            return Err(format!("a list of {n} elements in {} bytes", self.b.len() - self.pos));
        }
        for _ in 0..n {
            self.skip_element(kind, depth)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sizes_are_read_and_bad_headers_refused() {
        // type 0 (i32 field 1), uncompressed 100 (field 2), compressed 40 (field 3), a data page
        // header struct (field 5) holding num_values (i32 field 1) and a binary statistic, stop.
        let header =
            [0x15, 0x00, 0x15, 0xc8, 0x01, 0x15, 0x50, 0x2c, 0x15, 0x06, 0x18, 0x03, b'a', b'b', b'c', 0x00, 0x00];
        assert_eq!(PageSizes::read(&header), Ok(PageSizes { uncompressed: 100, compressed: 40, header_len: 17 }));
        // A binary claiming 2^40 bytes is refused, not allocated.
        let huge = [0x15, 0x00, 0x18, 0x80, 0x80, 0x80, 0x80, 0x80, 0x20];
        assert!(PageSizes::read(&huge).unwrap_err().contains("past the end"));
        // A list claiming more elements than bytes.
        let list = [0x19, 0xf5, 0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(PageSizes::read(&list).unwrap_err().contains("elements"));
        // Nesting without end.
        let deep: Vec<u8> = std::iter::repeat_n(0x1c, 200).collect();
        assert!(PageSizes::read(&deep).is_err());
    }
}
