//! ggml's block quantisations, dequantised to f32 exactly as ggml's reference C code
//! (`dequantize_row_*` in `ggml-quants.c`) does, operation by operation, so that the values equal
//! llama.cpp's and the `gguf` Python package's (checked against the latter on real tensors by
//! `tests/model/quants.rs`).
//!
//! A block holds `block_len` values in `block_bytes` bytes. The K-quants group 256 values into
//! a super-block with 6- or 8-bit sub-block scales.

use half::f16;

/// A ggml tensor type this crate reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    Bf16,
    /// 4-bit, scale.
    Q4_0,
    /// 4-bit, scale and minimum.
    Q4_1,
    /// 5-bit, scale.
    Q5_0,
    /// 5-bit, scale and minimum.
    Q5_1,
    /// 8-bit, scale.
    Q8_0,
    /// 2-bit K-quant.
    Q2K,
    /// 3-bit K-quant.
    Q3K,
    /// 4-bit K-quant.
    Q4K,
    /// 5-bit K-quant.
    Q5K,
    /// 6-bit K-quant.
    Q6K,
    /// 8-bit K-quant (f32 scale).
    Q8K,
}

/// Values per K-quant super-block.
const QK_K: usize = 256;

impl GgmlType {
    /// Every type this crate reads, for error messages.
    pub const SUPPORTED: &'static str =
        "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K";

    /// The type of a ggml type code, if this crate reads it.
    pub fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            10 => Self::Q2K,
            11 => Self::Q3K,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            15 => Self::Q8K,
            30 => Self::Bf16,
            _ => return None,
        })
    }

    /// The type's ggml code (the inverse of [`GgmlType::from_code`]).
    pub fn code(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q2K => 10,
            Self::Q3K => 11,
            Self::Q4K => 12,
            Self::Q5K => 13,
            Self::Q6K => 14,
            Self::Q8K => 15,
            Self::Bf16 => 30,
        }
    }

    /// ggml's name of a type code (also of the types this crate does not read).
    pub fn name_of(code: u32) -> &'static str {
        match code {
            0 => "F32",
            1 => "F16",
            2 => "Q4_0",
            3 => "Q4_1",
            6 => "Q5_0",
            7 => "Q5_1",
            8 => "Q8_0",
            9 => "Q8_1",
            10 => "Q2_K",
            11 => "Q3_K",
            12 => "Q4_K",
            13 => "Q5_K",
            14 => "Q6_K",
            15 => "Q8_K",
            16 => "IQ2_XXS",
            17 => "IQ2_XS",
            18 => "IQ3_XXS",
            19 => "IQ1_S",
            20 => "IQ4_NL",
            21 => "IQ3_S",
            22 => "IQ2_S",
            23 => "IQ4_XS",
            24 => "I8",
            25 => "I16",
            26 => "I32",
            27 => "I64",
            28 => "F64",
            29 => "IQ1_M",
            30 => "BF16",
            34 => "TQ1_0",
            35 => "TQ2_0",
            39 => "MXFP4",
            _ => "unknown",
        }
    }

    /// `(values per block, bytes per block)`.
    pub fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::Bf16 => (1, 2),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q8_0 => (32, 34),
            Self::Q2K => (QK_K, 84),
            Self::Q3K => (QK_K, 110),
            Self::Q4K => (QK_K, 144),
            Self::Q5K => (QK_K, 176),
            Self::Q6K => (QK_K, 210),
            Self::Q8K => (QK_K, 292),
        }
    }

    /// Dequantise whole blocks `raw` (a multiple of the block size) into `out`.
    pub fn dequantize(self, raw: &[u8], out: &mut Vec<f32>) {
        let (_, bytes) = self.block();
        assert!(raw.len().is_multiple_of(bytes), "{self:?}: {} bytes are not whole blocks of {bytes}", raw.len());
        let blocks = raw.chunks_exact(bytes);
        match self {
            Self::F32 => out.extend(raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
            Self::F16 => out.extend(raw.chunks_exact(2).map(h)),
            Self::Bf16 => out.extend(raw.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())),
            Self::Q4_0 => blocks.for_each(|b| q4_0(b, out)),
            Self::Q4_1 => blocks.for_each(|b| q4_1(b, out)),
            Self::Q5_0 => blocks.for_each(|b| q5_0(b, out)),
            Self::Q5_1 => blocks.for_each(|b| q5_1(b, out)),
            Self::Q8_0 => blocks.for_each(|b| q8_0(b, out)),
            Self::Q2K => blocks.for_each(|b| q2_k(b, out)),
            Self::Q3K => blocks.for_each(|b| q3_k(b, out)),
            Self::Q4K => blocks.for_each(|b| q4_k(b, out)),
            Self::Q5K => blocks.for_each(|b| q5_k(b, out)),
            Self::Q6K => blocks.for_each(|b| q6_k(b, out)),
            Self::Q8K => blocks.for_each(|b| q8_k(b, out)),
        }
    }
}

fn h(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

fn q4_0(b: &[u8], out: &mut Vec<f32>) {
    let d = h(&b[0..2]);
    let qs = &b[2..18];
    out.extend(qs.iter().map(|q| (i32::from(q & 0x0F) - 8) as f32 * d));
    out.extend(qs.iter().map(|q| (i32::from(q >> 4) - 8) as f32 * d));
}

fn q4_1(b: &[u8], out: &mut Vec<f32>) {
    let (d, m) = (h(&b[0..2]), h(&b[2..4]));
    let qs = &b[4..20];
    out.extend(qs.iter().map(|q| f32::from(q & 0x0F) * d + m));
    out.extend(qs.iter().map(|q| f32::from(q >> 4) * d + m));
}

/// The fifth bits of Q5_0/Q5_1: bit `j` of `qh` for element `j`, bit `j + 16` for element
/// `j + 16`.
fn fifth_bits(qh: u32, j: usize) -> (u8, u8) {
    ((((qh >> j) << 4) & 0x10) as u8, ((qh >> (j + 12)) & 0x10) as u8)
}

fn q5_0(b: &[u8], out: &mut Vec<f32>) {
    let d = h(&b[0..2]);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    let start = out.len();
    out.resize(start + 32, 0.0);
    for j in 0..16 {
        let (h0, h1) = fifth_bits(qh, j);
        out[start + j] = (i32::from((qs[j] & 0x0F) | h0) - 16) as f32 * d;
        out[start + j + 16] = (i32::from((qs[j] >> 4) | h1) - 16) as f32 * d;
    }
}

fn q5_1(b: &[u8], out: &mut Vec<f32>) {
    let (d, m) = (h(&b[0..2]), h(&b[2..4]));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    let start = out.len();
    out.resize(start + 32, 0.0);
    for j in 0..16 {
        let (h0, h1) = fifth_bits(qh, j);
        out[start + j] = f32::from((qs[j] & 0x0F) | h0) * d + m;
        out[start + j + 16] = f32::from((qs[j] >> 4) | h1) * d + m;
    }
}

fn q8_0(b: &[u8], out: &mut Vec<f32>) {
    let d = h(&b[0..2]);
    out.extend(b[2..34].iter().map(|q| f32::from(*q as i8) * d));
}

fn q2_k(b: &[u8], out: &mut Vec<f32>) {
    // scales[16], qs[64], d, dmin
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (h(&b[80..82]), h(&b[82..84]));
    let mut is = 0;
    for half in 0..2 {
        let q = &qs[half * 32..half * 32 + 32];
        for shift in [0, 2, 4, 6] {
            for part in 0..2 {
                let sc = scales[is];
                is += 1;
                let (dl, ml) = (d * f32::from(sc & 0xF), dmin * f32::from(sc >> 4));
                out.extend(q[part * 16..part * 16 + 16].iter().map(|x| dl * f32::from((x >> shift) & 3) - ml));
            }
        }
    }
}

fn q3_k(b: &[u8], out: &mut Vec<f32>) {
    // hmask[32], qs[64], scales[12], d
    let (hmask, qs, packed) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = h(&b[108..110]);
    let word = |i: usize| u32::from_le_bytes([packed[4 * i], packed[4 * i + 1], packed[4 * i + 2], packed[4 * i + 3]]);
    let (kmask1, kmask2) = (0x0303_0303u32, 0x0f0f_0f0fu32);
    let (a0, a1, tmp) = (word(0), word(1), word(2));
    let aux = [
        (a0 & kmask2) | ((tmp & kmask1) << 4),
        (a1 & kmask2) | (((tmp >> 2) & kmask1) << 4),
        ((a0 >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4),
        ((a1 >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4),
    ];
    let scales: Vec<i8> = aux.iter().flat_map(|w| w.to_le_bytes()).map(|x| x as i8).collect();
    let mut is = 0;
    let mut m = 1u8;
    for half in 0..2 {
        let q = &qs[half * 32..half * 32 + 32];
        for shift in [0, 2, 4, 6] {
            for part in 0..2 {
                let dl = d * f32::from(i16::from(scales[is]) - 32);
                is += 1;
                for l in part * 16..part * 16 + 16 {
                    let low = i16::from((q[l] >> shift) & 3);
                    let high = if hmask[l] & m != 0 { 0 } else { 4 };
                    out.push(dl * f32::from(low - high));
                }
            }
            m <<= 1;
        }
    }
}

/// The 6-bit scale and minimum of sub-block `j` of a Q4_K/Q5_K super-block.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

fn q4_k(b: &[u8], out: &mut Vec<f32>) {
    // d, dmin, scales[12], qs[128]
    let (d, dmin) = (h(&b[0..2]), h(&b[2..4]));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for (chunk, q) in qs.chunks_exact(32).enumerate() {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let (d2, m2) = (d * f32::from(sc2), dmin * f32::from(m2));
        out.extend(q.iter().map(|x| d1 * f32::from(x & 0xF) - m1));
        out.extend(q.iter().map(|x| d2 * f32::from(x >> 4) - m2));
    }
}

fn q5_k(b: &[u8], out: &mut Vec<f32>) {
    // d, dmin, scales[12], qh[32], qs[128]
    let (d, dmin) = (h(&b[0..2]), h(&b[2..4]));
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for (chunk, ql) in qs.chunks_exact(32).enumerate() {
        let (u1, u2) = (1u8 << (2 * chunk), 2u8 << (2 * chunk));
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let (d2, m2) = (d * f32::from(sc2), dmin * f32::from(m2));
        out.extend((0..32).map(|l| d1 * f32::from((ql[l] & 0xF) + if qh[l] & u1 != 0 { 16 } else { 0 }) - m1));
        out.extend((0..32).map(|l| d2 * f32::from((ql[l] >> 4) + if qh[l] & u2 != 0 { 16 } else { 0 }) - m2));
    }
}

fn q6_k(b: &[u8], out: &mut Vec<f32>) {
    // ql[128], qh[64], scales[16] (signed), d
    let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = h(&b[208..210]);
    for half in 0..2 {
        let (ql, qh, sc) = (&ql[half * 64..], &qh[half * 32..], &sc[half * 8..]);
        let start = out.len();
        out.resize(start + 128, 0.0);
        let y = &mut out[start..];
        for l in 0..32 {
            let is = l / 16;
            let q = |low: u8, shift: u32| i32::from(low | (((qh[l] >> shift) & 3) << 4)) - 32;
            let q1 = q(ql[l] & 0xF, 0);
            let q2 = q(ql[l + 32] & 0xF, 2);
            let q3 = q(ql[l] >> 4, 4);
            let q4 = q(ql[l + 32] >> 4, 6);
            let s = |i: usize| f32::from(sc[is + i] as i8);
            y[l] = d * s(0) * q1 as f32;
            y[l + 32] = d * s(2) * q2 as f32;
            y[l + 64] = d * s(4) * q3 as f32;
            y[l + 96] = d * s(6) * q4 as f32;
        }
    }
}

fn q8_k(b: &[u8], out: &mut Vec<f32>) {
    // d (f32), qs[256], bsums[16] (unused for dequantisation)
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    out.extend(b[4..260].iter().map(|q| d * f32::from(*q as i8)));
}
