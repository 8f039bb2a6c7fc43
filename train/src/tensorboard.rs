//! TensorBoard event files (`[run] report_to = ["tensorboard"]`): the per-step metrics as scalar
//! summaries, readable by TensorBoard itself (`tensorboard --logdir runs/NAME/tensorboard`).
//!
//! The format: a file `events.out.tfevents.SECONDS.HOST` of TFRecord records (a little-endian
//! u64 length, its masked CRC-32C, the bytes, their masked CRC-32C), each an `Event` protocol
//! buffer: the first carries `file_version = "brain.Event:2"`, the others a wall time, a step and a
//! `Summary` with one `simple_value` per metric. The few protobuf fields are written here by hand
//! (field numbers from TensorFlow's `event.proto` and `summary.proto`); the CRC is the `crc`
//! crate's Castagnoli polynomial.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Result, TrainError};

const CASTAGNOLI: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

fn masked_crc(bytes: &[u8]) -> u32 {
    let c = CASTAGNOLI.checksum(bytes);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(out: &mut Vec<u8>, field: u64, wire: u64) {
    varint(out, (field << 3) | wire);
}

fn bytes_field(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    key(out, field, 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// An `Event` with a wall time, a step and either a file version or scalar values.
fn event(wall_time: f64, step: i64, file_version: Option<&str>, scalars: &[(&str, f64)]) -> Vec<u8> {
    let mut e = Vec::new();
    key(&mut e, 1, 1); // wall_time: double
    e.extend_from_slice(&wall_time.to_le_bytes());
    key(&mut e, 2, 0); // step: int64
    varint(&mut e, step as u64);
    if let Some(v) = file_version {
        bytes_field(&mut e, 3, v.as_bytes());
    }
    if !scalars.is_empty() {
        let mut summary = Vec::new();
        for (tag, value) in scalars {
            let mut v = Vec::new();
            bytes_field(&mut v, 1, tag.as_bytes()); // tag
            key(&mut v, 2, 5); // simple_value: float
            v.extend_from_slice(&(*value as f32).to_le_bytes());
            bytes_field(&mut summary, 1, &v); // Summary.value
        }
        bytes_field(&mut e, 5, &summary); // Event.summary
    }
    e
}

/// One TFRecord.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// Appends scalar events to one event file.
#[derive(Debug)]
pub struct EventWriter {
    file: PathBuf,
    out: std::fs::File,
}

fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

impl EventWriter {
    /// A new event file in `dir` (created). Each run of a stage writes its own file; TensorBoard
    /// reads every file of the folder, and a step written again (a resumed stage) replaces the
    /// earlier value in its plots.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
        let host = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "fuserl".into());
        let t = now();
        let mut file = dir.join(format!("events.out.tfevents.{}.{host}.{}", t as u64, std::process::id()));
        let mut n = 1;
        while file.exists() {
            file = dir.join(format!("events.out.tfevents.{}.{host}.{}.{n}", t as u64, std::process::id()));
            n += 1;
        }
        let mut out = std::fs::File::create(&file).map_err(|e| TrainError::io(&file, e))?;
        out.write_all(&record(&event(t, 0, Some("brain.Event:2"), &[]))).map_err(|e| TrainError::io(&file, e))?;
        Ok(Self { file, out })
    }

    /// The file.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Write `scalars` (tag, value) at `step`, flushed. Non-finite values are written as they are
    /// (TensorBoard shows them as such).
    pub fn scalars(&mut self, step: u64, scalars: &[(&str, f64)]) -> Result<()> {
        let bytes = record(&event(now(), step as i64, None, scalars));
        self.out.write_all(&bytes).and_then(|()| self.out.flush()).map_err(|e| TrainError::io(&self.file, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_and_its_mask_match_the_published_values() {
        // CRC-32C of "123456789" is 0xE3069283 (RFC 3720's check value).
        assert_eq!(CASTAGNOLI.checksum(b"123456789"), 0xe306_9283);
        // TFRecord's mask, ((crc >> 15) | (crc << 17)) + 0xa282ead8 mod 2^32, worked out by hand.
        assert_eq!(masked_crc(b"123456789"), 0xc78a_b0e5);
    }

    #[test]
    fn records_frame_their_events() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut w = EventWriter::create(dir.path()).expect("create");
        w.scalars(3, &[("sft/loss", 0.5), ("sft/lr", 1e-3)]).expect("write");
        let bytes = std::fs::read(w.file()).expect("read");
        let mut at = 0;
        let mut records = 0;
        while at < bytes.len() {
            let len = u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8")) as usize;
            assert_eq!(
                u32::from_le_bytes(bytes[at + 8..at + 12].try_into().expect("4")),
                masked_crc(&bytes[at..at + 8])
            );
            let data = &bytes[at + 12..at + 12 + len];
            assert_eq!(
                u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().expect("4")),
                masked_crc(data)
            );
            at += 16 + len;
            records += 1;
        }
        assert_eq!(records, 2);
        let last = event(0.0, 3, None, &[("sft/loss", 0.5)]);
        // wall_time (key 0x09, 8 bytes), step (key 0x10, 3), summary (key 0x2a).
        assert_eq!((last[0], last[9], last[10], last[11]), (0x09, 0x10, 3, 0x2a));
    }
}
