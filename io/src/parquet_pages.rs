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
    Compact { b: &footer, pos: 0 }.file_metadata().map_err(|e| format!("the footer: {e}"))
}

/// The deepest schema accepted: the parquet crate builds the schema's tree recursively, one call
/// per level, so a chain of millions of nested groups would overflow its stack.
pub const MAX_SCHEMA_DEPTH: usize = 128;

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
    /// Read a page header as the parquet crate reads it (`PageHeader::read_thrift_without_stats`,
    /// what it does unless page statistics are asked for): a field it knows by its id is read with
    /// the type the Parquet schema gives it, whatever type its header declares, and any other
    /// field is skipped by its declared type; a struct ends at a field header whose type is 0.
    /// Read otherwise, a field declared with another type than the schema's made this check
    /// read other bytes as the header than the crate does: the crate then skipped a list of
    /// 8-byte values at the end of the file, which its file reader does without error, one
    /// empty read each (a fuzzing finding: seconds for a 1.5 KB file). Read so, the crate
    /// reads the same bytes as this check, all of them inside the column chunk.
    fn read(bytes: &[u8]) -> Result<Self, String> {
        let mut r = Compact { b: bytes, pos: 0 };
        let (mut uncompressed, mut compressed) = (None, None);
        let mut last_id = 0i16;
        while let Some((id, kind)) = r.field_begin(&mut last_id)? {
            match id {
                // type (an enum), crc
                1 | 4 => r.i32().map(drop)?,
                2 => uncompressed = Some(i64::from(r.i32()?)),
                3 => compressed = Some(i64::from(r.i32()?)),
                // DataPageHeader (its statistics, field 5, skipped by their declared type)
                5 => r.page_struct(4, None)?,
                // IndexPageHeader: no fields
                6 => r.page_struct(0, None)?,
                // DictionaryPageHeader: num_values, encoding; is_sorted
                7 => r.page_struct(2, Some(3))?,
                // DataPageHeaderV2: num_values, num_nulls, num_rows, encoding, the two level
                // lengths; is_compressed (its statistics, field 8, skipped)
                8 => r.page_struct(6, Some(7))?,
                _ => r.skip(kind, 1)?,
            }
        }
        match (uncompressed, compressed) {
            (Some(uncompressed), Some(compressed)) => Ok(Self { uncompressed, compressed, header_len: r.pos }),
            _ => Err("no page sizes".into()),
        }
    }
}

/// Refuses containers of booleans. No Parquet footer or page header holds one, and the parquet
/// crate (60.1) skips their elements as taking no bytes (the protocol gives each a byte): it
/// would read what follows differently from this check, and loop over a list of 2^31 of them
/// without reading anything (a hang the fuzzing found).
fn no_booleans(kind: u8) -> Result<(), String> {
    if kind == 1 || kind == 2 {
        return Err("a list, set or map of booleans, which no Parquet footer or page header holds".into());
    }
    Ok(())
}

/// A reader of the Thrift compact protocol that only moves forward; nothing it reads allocates
/// (but for the schema check's stack of open groups, at most [`MAX_SCHEMA_DEPTH`] long).
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

    /// An i32 as the crate reads one: a zigzag varint, truncated to 32 bits.
    fn i32(&mut self) -> Result<i32, String> {
        Ok(self.zigzag()? as i32)
    }

    /// A struct field's header as the crate reads one: `None` at the end of the struct (a type
    /// of 0, whatever the id bits: a check that stopped at a 0 byte only read on where the
    /// crate had ended a schema element, and the two saw different trees), else the field's id
    /// (the crate refuses an id past `i16::MAX`) and compact type.
    fn field_begin(&mut self, last_id: &mut i16) -> Result<Option<(i16, u8)>, String> {
        let head = self.byte()?;
        if head & 0x0f == 0 {
            return Ok(None);
        }
        let delta = i16::from(head >> 4);
        let id = if delta == 0 {
            self.zigzag()? as i16
        } else {
            last_id.checked_add(delta).ok_or("a field id past 32767")?
        };
        *last_id = id;
        Ok(Some((id, head & 0x0f)))
    }

    /// One of the structs in a page header, read by id as the crate reads them: fields 1 to
    /// `ints` are i32s, `flag` (when given) a boolean, which the crate takes from the field
    /// header's type and refuses if that type is not a boolean's; the rest are skipped by their
    /// declared type.
    fn page_struct(&mut self, ints: i16, flag: Option<i16>) -> Result<(), String> {
        let mut last_id = 0i16;
        while let Some((id, kind)) = self.field_begin(&mut last_id)? {
            if (1..=ints).contains(&id) {
                self.i32()?;
            } else if Some(id) == flag {
                if kind != 1 && kind != 2 {
                    return Err(format!("field {id} of a page header's struct is not a boolean"));
                }
            } else {
                self.skip(kind, 2)?;
            }
        }
        Ok(())
    }

    /// `FileMetaData`: the schema (field 2) checked as a tree, every other field skipped.
    ///
    /// The crate reads a struct's known fields by their id with the type its schema gives them,
    /// whatever type the field header declares (a field 5 declared `false`, which has no value
    /// bytes, is read as the varint of the bytes after it): so are they read here, for the
    /// fields that come before the schema and for the schema's elements, or this check would
    /// read another tree than the crate builds (a fuzzing finding, where the crate then reserved
    /// 3.2 GB). Inside the lists and unions read so (row groups, key-value pairs, column orders,
    /// a logical type) the fields are skipped by their declared type: there the two readings
    /// could still part, so the crate's parse of the footer also runs under a memory budget
    /// (`crate::prompts::parquet_rows`).
    fn file_metadata(&mut self) -> Result<(), String> {
        let mut last_id = 0i16;
        let mut schema_seen = false;
        while let Some(field) = self.field_begin(&mut last_id)? {
            match field {
                // The crate builds the first schema and skips any later one by its type.
                (2, _) if !schema_seen => {
                    schema_seen = true;
                    self.schema()?;
                }
                // version (i32), num_rows (i64); created_by (string); row_groups,
                // key_value_metadata, column_orders (lists). Fields 8 and 9 (encryption) the
                // crate knows only with its `encryption` feature, which fuserl does not enable:
                // it skips them by their declared type, as below.
                (1 | 3, _) => self.zigzag().map(drop)?,
                (6, _) => self.binary()?,
                (4 | 5 | 7, _) => self.skip(9, 1)?,
                (_, kind) => self.skip(kind, 1)?,
            }
        }
        Ok(())
    }

    /// A Thrift binary (string): its varint length and bytes.
    fn binary(&mut self) -> Result<(), String> {
        let n = self.varint()?;
        self.advance(n)
    }

    /// The schema: a list of `SchemaElement`s, a tree written depth first in which each group
    /// says how many children it has (field 5, `num_children`). The parquet crate reserves room
    /// for a group's children before it reads them, so every count is checked here against the
    /// elements that follow, less those already promised to the groups still open: what the
    /// crate reserves at once then never exceeds the list's length.
    fn schema(&mut self) -> Result<(), String> {
        let head = self.byte()?;
        let n = if head >> 4 == 15 { self.varint()? } else { u64::from(head >> 4) };
        if head & 0x0f != 12 {
            // Not a list of structs: the crate says what is wrong with it.
            no_booleans(head & 0x0f)?;
            return self.skip_many(n, head & 0x0f, 1);
        }
        if n > (self.b.len() - self.pos) as u64 {
            return Err(format!("a schema of {n} elements in {} bytes", self.b.len() - self.pos));
        }
        // The children still to come of each open group, innermost last, and their sum.
        let mut open: Vec<u64> = Vec::new();
        let mut promised = 0u64;
        for i in 0..n {
            while open.last() == Some(&0) {
                open.pop();
            }
            if i > 0 {
                let Some(top) = open.last_mut() else {
                    // Past the root's tree: the crate never builds these.
                    return self.skip_many(n - i, 12, 1);
                };
                *top -= 1;
                promised -= 1;
            }
            let children = self.schema_element()?;
            if children > 0 {
                let children = children as u64;
                let free = n - i - 1 - promised;
                if children > free {
                    return Err(format!(
                        "schema element {i} claims {children} children, but only {free} elements are left for them"
                    ));
                }
                open.push(children);
                promised += children;
                if open.len() > MAX_SCHEMA_DEPTH {
                    return Err(format!("the schema nests groups deeper than {MAX_SCHEMA_DEPTH}"));
                }
            }
        }
        Ok(())
    }

    /// One `SchemaElement`: its `num_children` (0 when absent; negative counts are left to the
    /// crate, which refuses them), the other fields skipped.
    fn schema_element(&mut self) -> Result<i64, String> {
        let mut last_id = 0i16;
        let mut children = 0;
        while let Some(field) = self.field_begin(&mut last_id)? {
            // By id, as the crate reads them ([`Self::file_metadata`]): the i32 fields (type,
            // type_length, repetition_type, num_children, converted_type, scale, precision,
            // field_id) and the name.
            match field {
                (5, _) => children = i64::from(self.zigzag()? as i32),
                (1..=3 | 6..=9, _) => self.zigzag().map(drop)?,
                (4, _) => self.binary()?,
                // logicalType: a union, read as a struct.
                (10, _) => self.skip(12, 2)?,
                (_, kind) => self.skip(kind, 2)?,
            }
        }
        Ok(children)
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
                no_booleans(head & 0x0f)?;
                self.skip_many(n, head & 0x0f, depth)
            }
            11 => {
                let n = self.varint()?;
                if n == 0 {
                    return Ok(());
                }
                let kinds = self.byte()?;
                no_booleans(kinds >> 4)?;
                no_booleans(kinds & 0x0f)?;
                for _ in 0..n {
                    self.skip_element(kinds >> 4, depth)?;
                    self.skip_element(kinds & 0x0f, depth)?;
                }
                Ok(())
            }
            12 => loop {
                let head = self.byte()?;
                // The crate ends a struct at a field type of 0, whatever the id bits.
                if head & 0x0f == 0 {
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

    /// Elements of a list, set or map (never booleans: [`no_booleans`]).
    fn skip_element(&mut self, kind: u8, depth: u32) -> Result<(), String> {
        self.skip(kind, depth + 1)
    }

    fn skip_many(&mut self, n: u64, kind: u8, depth: u32) -> Result<(), String> {
        // Every element takes at least one byte (containers of booleans are refused before):
        // a count past the bytes left is refused before looping.
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
        // header struct (field 5) holding num_values and the three encodings (i32 fields 1 to
        // 4) and statistics (struct field 5) with a binary max (field 1), stop.
        let header = [
            0x15, 0x00, 0x15, 0xc8, 0x01, 0x15, 0x50, 0x2c, 0x15, 0x06, 0x15, 0x00, 0x15, 0x00, 0x15, 0x00, 0x1c, 0x18,
            0x03, b'a', b'b', b'c', 0x00, 0x00, 0x00,
        ];
        assert_eq!(PageSizes::read(&header), Ok(PageSizes { uncompressed: 100, compressed: 40, header_len: 25 }));
        // A binary claiming 2^40 bytes is refused, not allocated.
        let huge = [0x15, 0x00, 0x18, 0x80, 0x80, 0x80, 0x80, 0x80, 0x20];
        assert!(PageSizes::read(&huge).unwrap_err().contains("past the end"));
        // A list claiming more elements than bytes (field 9, which the crate skips by its
        // declared type).
        let list = [0x99, 0xf5, 0xff, 0xff, 0xff, 0xff, 0x0f];
        assert!(PageSizes::read(&list).unwrap_err().contains("elements"));
        // A known field declared with another type is read by its schema type, as the crate
        // does: uncompressed_page_size declared a double is the varint after it.
        let typed = [0x15, 0x00, 0x17, 0xc8, 0x01, 0x15, 0x50, 0x00];
        assert_eq!(PageSizes::read(&typed), Ok(PageSizes { uncompressed: 100, compressed: 40, header_len: 8 }));
        // A dictionary page header (field 7): num_values, encoding and is_sorted (a boolean
        // in the field header, no value bytes); declared otherwise, the crate refuses it.
        let dict = [0x15, 0x00, 0x15, 0xc8, 0x01, 0x15, 0x50, 0x4c, 0x15, 0x02, 0x15, 0x00, 0x11, 0x00, 0x00];
        assert_eq!(PageSizes::read(&dict), Ok(PageSizes { uncompressed: 100, compressed: 40, header_len: 15 }));
        let mut bad = dict;
        bad[12] = 0x15;
        assert!(PageSizes::read(&bad).unwrap_err().contains("not a boolean"));
        // A struct ends at a field header of type 0 whatever its id bits.
        let end = [0x15, 0x00, 0x15, 0xc8, 0x01, 0x15, 0x50, 0x50];
        assert_eq!(PageSizes::read(&end), Ok(PageSizes { uncompressed: 100, compressed: 40, header_len: 8 }));
        // Nesting without end.
        let deep: Vec<u8> = std::iter::repeat_n(0x1c, 200).collect();
        assert!(PageSizes::read(&deep).is_err());
    }

    /// A footer holding only a schema (field 2, a list of structs) of the given elements, each
    /// a name (field 4) and, when given, `num_children` (field 5).
    fn footer(children: &[Option<i64>]) -> Vec<u8> {
        fn varint(b: &mut Vec<u8>, mut v: u64) {
            while v >= 0x80 {
                b.push((v & 0x7f) as u8 | 0x80);
                v >>= 7;
            }
            b.push(v as u8);
        }
        let mut b = vec![0x29];
        if children.len() < 15 {
            b.push(((children.len() as u8) << 4) | 12);
        } else {
            b.push(0xfc);
            varint(&mut b, children.len() as u64);
        }
        for c in children {
            b.extend([0x48, 0x01, b'x']);
            if let Some(c) = c {
                b.push(0x15);
                varint(&mut b, ((c << 1) ^ (c >> 63)) as u64);
            }
            b.push(0x00);
        }
        b.push(0x00);
        b
    }

    fn check_schema(children: &[Option<i64>]) -> Result<(), String> {
        Compact { b: &footer(children), pos: 0 }.file_metadata()
    }

    #[test]
    fn schema_counts_must_fit_the_elements_that_follow() {
        // root { a, group { b, c }, d }
        assert_eq!(check_schema(&[Some(3), None, Some(2), None, Some(0), None]), Ok(()));
        // An empty schema, and elements past the root's tree (the crate ignores them).
        assert_eq!(check_schema(&[Some(0), Some(5)]), Ok(()));
        assert_eq!(check_schema(&[Some(1), None, Some(1), None]), Ok(()));
        // The fuzzing finding: a group claiming 2^28 children (the crate reserved 2 GB for them).
        let err = check_schema(&[Some(1), Some(1 << 28), None]).unwrap_err();
        assert!(err.contains("schema element 1 claims 268435456 children, but only 1 elements"), "{err}");
        // Each count fits what follows, but not together with what the open groups were promised.
        assert_eq!(check_schema(&[Some(2), Some(2), None, None, None]), Ok(()));
        let err = check_schema(&[Some(2), Some(3), None, None, None]).unwrap_err();
        assert!(err.contains("schema element 1 claims 3 children, but only 2 elements"), "{err}");
        // num_children declared `false` (no value bytes by its type): the crate reads it as an
        // i32 whatever it is declared (by its id), and so must the check (a fuzzing finding: the
        // crate reserved 3.2 GB).
        let mut b = footer(&[Some(1), None]);
        let at = b.len() - 2;
        b.splice(at..at, [0x12, 0x80, 0x80, 0x80, 0x80, 0x02]); // field 5, then the varint of 2^29
        let err = Compact { b: &b, pos: 0 }.file_metadata().unwrap_err();
        assert!(err.contains("schema element 1 claims 268435456 children"), "{err}");
        // key_value_metadata declared `true`: the crate reads a list after it all the same.
        let b = [0x51, 0xfc, 0xff, 0xff, 0xff, 0xff, 0x07, 0x00];
        let err = Compact { b: &b, pos: 0 }.file_metadata().unwrap_err();
        assert!(err.contains("a list of 2147483647 elements"), "{err}");
        // A list of booleans in an element (the crate skips each as 0 bytes; found as a hang).
        let mut b = footer(&[Some(1), None]);
        let at = b.len() - 2; // before the last element's stop and the footer's stop
        // (field 11, which the crate does not know and skips by its declared type)
        b.splice(at..at, [0x79, 0xf1, 0xff, 0xff, 0xff, 0xff, 0x07]);
        let err = Compact { b: &b, pos: 0 }.file_metadata().unwrap_err();
        assert!(err.contains("of booleans"), "{err}");
        // A schema element ended by a field header of type 0 with id bits (0x50): the crate
        // ends the element there, and so must the check, or it reads the next element's fields
        // as this one's and never counts the 2^28 children the crate then reserves room for.
        let mut b = footer(&[Some(1), Some(1 << 28), None]);
        assert_eq!(b[7], 0x00, "the root element's stop");
        b[7] = 0x50;
        let err = Compact { b: &b, pos: 0 }.file_metadata().unwrap_err();
        assert!(err.contains("schema element 1 claims 268435456 children"), "{err}");
        let mut b = footer(&[Some(1), None]);
        b[7] = 0x50;
        assert_eq!(Compact { b: &b, pos: 0 }.file_metadata(), Ok(()));
        // A chain of nested groups deeper than the crate's recursion should go.
        let mut chain = vec![Some(1); 140];
        chain.push(None);
        let err = check_schema(&chain).unwrap_err();
        assert!(err.contains("deeper than 128"), "{err}");
    }
}
