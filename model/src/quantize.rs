//! ggml's block quantisations, written (the inverse of [`crate::quant`], which reads them): the
//! types the GGUF export ([`crate::gguf_export`]) writes. The block layouts are ggml's (the
//! readers in [`crate::quant`] are the specification they are tested against); how the scales
//! are chosen is this crate's own:
//!
//! - `Q8_0`, `Q5_0`, `Q5_1`: ggml's rule (the scale from the block's extreme values, values
//!   rounded to the nearest level);
//! - the K-quants (`Q4_K`, `Q5_K`, `Q6_K`): each sub-block's scale (and minimum) is searched on a
//!   small grid of candidates around the extreme values, each refitted by least squares to its
//!   rounded levels, keeping the one of least squared error; the sub-block scales are then
//!   quantised against the super-block's f16 scales, each sub-block trying its quantised scale
//!   (and minimum) and their neighbours with the values rounded again against each, keeping the
//!   pair of least error. llama.cpp searches the first part similarly (`make_qkx2_quants`) but
//!   keeps the nearest quantised scales; `tests/gguf_export.rs` compares the two on a real model
//!   (fuserl's error is at most llama.cpp's there: Q4_K 0.0138 against 0.0186, Q5_K 0.0190
//!   against 0.0200, Q6_K 0.0177 against 0.0179).

use half::f16;

use crate::quant::GgmlType;

const QK_K: usize = 256;

/// Whether [`quantize`] writes `ty`.
pub fn writes(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::F32
            | GgmlType::F16
            | GgmlType::Bf16
            | GgmlType::Q8_0
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q4K
            | GgmlType::Q5K
            | GgmlType::Q6K
    )
}

/// Quantise `values` (whole blocks of `ty`: rows are quantised one by one, so `values.len()` is
/// a multiple of the block length) into `out`. Panics on a type [`writes`] refuses.
pub fn quantize(ty: GgmlType, values: &[f32], out: &mut Vec<u8>) {
    let (block, bytes) = ty.block();
    assert!(values.len().is_multiple_of(block), "{} values are not whole {block}-value blocks", values.len());
    out.reserve(values.len() / block * bytes);
    match ty {
        GgmlType::F32 => values.iter().for_each(|v| out.extend(v.to_le_bytes())),
        GgmlType::F16 => values.iter().for_each(|v| out.extend(f16::from_f32(*v).to_le_bytes())),
        GgmlType::Bf16 => values.iter().for_each(|v| out.extend(half::bf16::from_f32(*v).to_le_bytes())),
        GgmlType::Q8_0 => values.chunks_exact(32).for_each(|b| q8_0(b, out)),
        GgmlType::Q5_0 => values.chunks_exact(32).for_each(|b| q5_0(b, out)),
        GgmlType::Q5_1 => values.chunks_exact(32).for_each(|b| q5_1(b, out)),
        GgmlType::Q4K => values.chunks_exact(QK_K).for_each(|b| q4_k(b, out)),
        GgmlType::Q5K => values.chunks_exact(QK_K).for_each(|b| q5_k(b, out)),
        GgmlType::Q6K => values.chunks_exact(QK_K).for_each(|b| q6_k(b, out)),
        other => panic!("quantising to {other:?} is not implemented"),
    }
}

/// Quantise on every core: `values` split at block boundaries into one piece per thread.
pub fn quantize_parallel(ty: GgmlType, values: &[f32]) -> Vec<u8> {
    let (block, _) = ty.block();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(16);
    let blocks = values.len() / block;
    if threads == 1 || blocks < 64 {
        let mut out = Vec::new();
        quantize(ty, values, &mut out);
        return out;
    }
    let per = blocks.div_ceil(threads) * block;
    let parts: Vec<Vec<u8>> = std::thread::scope(|s| {
        let handles: Vec<_> = values
            .chunks(per)
            .map(|chunk| {
                s.spawn(move || {
                    let mut out = Vec::new();
                    quantize(ty, chunk, &mut out);
                    out
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a quantising thread panicked")).collect()
    });
    parts.concat()
}

fn f16_bytes(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

fn rounded(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

fn q8_0(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend(f16_bytes(d));
    out.extend(x.iter().map(|v| (v * id).round().clamp(-127.0, 127.0) as i8 as u8));
}

/// The 5-bit levels `q` (0..32) of a block: low nibbles (elements `j` and `j + 16` share byte
/// `j`) and the fifth bits (bit `j` for element `j`).
fn pack5(q: &[u8; 32], out: &mut Vec<u8>) {
    let mut qh = 0u32;
    for (j, &v) in q.iter().enumerate() {
        qh |= u32::from(v >> 4) << j;
    }
    out.extend(qh.to_le_bytes());
    out.extend((0..16).map(|j| (q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4)));
}

fn q5_0(x: &[f32], out: &mut Vec<u8>) {
    // The value of largest magnitude, with its sign, maps to level 0 (-16).
    let max = x.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    let d = max / -16.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0u8; 32];
    for (qi, v) in q.iter_mut().zip(x) {
        *qi = ((v * id).round() + 16.0).clamp(0.0, 31.0) as u8;
    }
    out.extend(f16_bytes(d));
    pack5(&q, out);
}

fn q5_1(x: &[f32], out: &mut Vec<u8>) {
    let (min, max) = x.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    let d = (max - min) / 31.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0u8; 32];
    for (qi, v) in q.iter_mut().zip(x) {
        *qi = ((v - min) * id).round().clamp(0.0, 31.0) as u8;
    }
    out.extend(f16_bytes(d));
    out.extend(f16_bytes(min));
    pack5(&q, out);
}

/// The best `(scale, min)` with `x ≈ scale * q - min`, `q` in `0..=levels`, `min >= 0`: a grid
/// of candidate scales around `(max - min) / levels`, each refitted by least squares to its
/// rounded levels.
fn fit_affine(x: &[f32], levels: f32) -> (f32, f32) {
    let lo = x.iter().fold(f32::INFINITY, |a, &v| a.min(v)).min(0.0);
    let hi = x.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    if hi <= lo {
        return (0.0, -lo);
    }
    let error = |scale: f32, min: f32| -> f32 {
        x.iter()
            .map(|&v| {
                let q = ((v + min) / scale).round().clamp(0.0, levels);
                let e = scale * q - min - v;
                e * e
            })
            .sum()
    };
    let n = x.len() as f32;
    let mut best = ((hi - lo) / levels, -lo);
    let mut best_error = error(best.0, best.1);
    for step in -4..=6 {
        let scale = (hi - lo) / (levels + 0.1 * step as f32);
        let min = -lo;
        // Least squares on the levels this candidate rounds to.
        let (mut sq, mut sqq, mut sx, mut sqx) = (0f32, 0f32, 0f32, 0f32);
        for &v in x {
            let q = ((v + min) / scale).round().clamp(0.0, levels);
            sq += q;
            sqq += q * q;
            sx += v;
            sqx += q * v;
        }
        let det = n * sqq - sq * sq;
        let mut candidates = vec![(scale, min)];
        if det > 0.0 {
            let s = (n * sqx - sq * sx) / det;
            let m = (s * sq - sx) / n;
            if s > 0.0 {
                if m >= 0.0 {
                    candidates.push((s, m));
                } else if sqq > 0.0 {
                    candidates.push((sqx / sqq, 0.0));
                }
            }
        }
        for (s, m) in candidates {
            let e = error(s, m);
            if e < best_error {
                best = (s, m);
                best_error = e;
            }
        }
    }
    best
}

/// The best scale with `x ≈ scale * q`, `q` in `-32..=31`, the same way.
fn fit_symmetric(x: &[f32]) -> f32 {
    let max = x.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    if max == 0.0 {
        return 0.0;
    }
    let error = |scale: f32| -> f32 {
        x.iter()
            .map(|&v| {
                let e = scale * (v / scale).round().clamp(-32.0, 31.0) - v;
                e * e
            })
            .sum()
    };
    let mut best = max / -32.0;
    let mut best_error = error(best);
    for step in -4..=6 {
        let scale = max / -(32.0 + 0.1 * step as f32);
        let (mut sqq, mut sqx) = (0f32, 0f32);
        for &v in x {
            let q = (v / scale).round().clamp(-32.0, 31.0);
            sqq += q * q;
            sqx += q * v;
        }
        for s in [scale, if sqq > 0.0 { sqx / sqq } else { scale }] {
            let e = error(s);
            if s != 0.0 && e < best_error {
                best = s;
                best_error = e;
            }
        }
    }
    best
}

/// Q4_K / Q5_K: eight sub-blocks of 32 with 6-bit scales and minimums. Returns the f16 scales
/// (d, dmin), the packed 12 bytes of sub-block scales and the levels of the 256 values.
fn k_affine(x: &[f32], levels: f32) -> ([u8; 2], [u8; 2], [u8; 12], [u8; QK_K]) {
    let fits: Vec<(f32, f32)> = x.chunks_exact(32).map(|sub| fit_affine(sub, levels)).collect();
    let max_scale = fits.iter().fold(0f32, |a, f| a.max(f.0));
    let max_min = fits.iter().fold(0f32, |a, f| a.max(f.1));
    let d = rounded(max_scale / 63.0);
    let dmin = rounded(max_min / 63.0);
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for (j, &(s, m)) in fits.iter().enumerate() {
        sc[j] = if d > 0.0 { (s / d).round().clamp(0.0, 63.0) as u8 } else { 0 };
        mn[j] = if dmin > 0.0 { (m / dmin).round().clamp(0.0, 63.0) as u8 } else { 0 };
    }
    // The 6-bit scale and minimum rounded to the nearest step need not be the best pair: each
    // sub-block tries its neighbours, with the levels rounded again against each pair.
    let levels_of = |sub: &[f32], s: f32, m: f32, q: &mut [u8]| -> f32 {
        let mut err = 0.0;
        for (qi, &v) in q.iter_mut().zip(sub) {
            *qi = if s > 0.0 { ((v + m) / s).round().clamp(0.0, levels) as u8 } else { 0 };
            let e = s * f32::from(*qi) - m - v;
            err += e * e;
        }
        err
    };
    let mut q = [0u8; QK_K];
    let mut trial = [0u8; 32];
    for (j, sub) in x.chunks_exact(32).enumerate() {
        let mut best = (f32::INFINITY, sc[j], mn[j]);
        for dsc in -1i16..=1 {
            for dmn in -1i16..=1 {
                let (a, b) = (i16::from(sc[j]) + dsc, i16::from(mn[j]) + dmn);
                if !(0..=63).contains(&a) || !(0..=63).contains(&b) {
                    continue;
                }
                let err = levels_of(sub, d * f32::from(a as u8), dmin * f32::from(b as u8), &mut trial);
                if err < best.0 {
                    best = (err, a as u8, b as u8);
                }
            }
        }
        (sc[j], mn[j]) = (best.1, best.2);
        levels_of(sub, d * f32::from(sc[j]), dmin * f32::from(mn[j]), &mut q[32 * j..32 * j + 32]);
    }
    // The inverse of `quant::scale_min_k4`.
    let mut packed = [0u8; 12];
    for j in 0..8 {
        if j < 4 {
            packed[j] = sc[j];
            packed[j + 4] = mn[j];
        } else {
            packed[j + 4] = (sc[j] & 0x0F) | ((mn[j] & 0x0F) << 4);
            packed[j - 4] |= (sc[j] >> 4) << 6;
            packed[j] |= (mn[j] >> 4) << 6;
        }
    }
    (f16_bytes(d), f16_bytes(dmin), packed, q)
}

fn q4_k(x: &[f32], out: &mut Vec<u8>) {
    let (d, dmin, scales, q) = k_affine(x, 15.0);
    out.extend(d);
    out.extend(dmin);
    out.extend(scales);
    // Chunk c of 32 bytes: sub-block 2c in the low nibbles, 2c + 1 in the high.
    for c in 0..4 {
        out.extend((0..32).map(|l| q[64 * c + l] | (q[64 * c + 32 + l] << 4)));
    }
}

fn q5_k(x: &[f32], out: &mut Vec<u8>) {
    let (d, dmin, scales, q) = k_affine(x, 31.0);
    out.extend(d);
    out.extend(dmin);
    out.extend(scales);
    let mut qh = [0u8; 32];
    for c in 0..4 {
        for l in 0..32 {
            qh[l] |= ((q[64 * c + l] >> 4) << (2 * c)) | ((q[64 * c + 32 + l] >> 4) << (2 * c + 1));
        }
    }
    out.extend(qh);
    for c in 0..4 {
        out.extend((0..32).map(|l| (q[64 * c + l] & 0x0F) | ((q[64 * c + 32 + l] & 0x0F) << 4)));
    }
}

fn q6_k(x: &[f32], out: &mut Vec<u8>) {
    // Sixteen sub-blocks of 16 with signed 8-bit scales against one f16 scale.
    let fits: Vec<f32> = x.chunks_exact(16).map(fit_symmetric).collect();
    let max = fits.iter().fold(0f32, |a, s| a.max(s.abs()));
    let d = rounded(max / 127.0);
    let sc: Vec<i8> =
        fits.iter().map(|&s| if d > 0.0 { (s / d).round().clamp(-127.0, 127.0) as i8 } else { 0 }).collect();
    // Each sub-block's scale and its two neighbours, the levels rounded again against each.
    let levels_of = |sub: &[f32], s: f32, q: &mut [u8]| -> f32 {
        let mut err = 0.0;
        for (qi, &v) in q.iter_mut().zip(sub) {
            *qi = if s != 0.0 { ((v / s).round().clamp(-32.0, 31.0) + 32.0) as u8 } else { 32 };
            let e = s * (f32::from(*qi) - 32.0) - v;
            err += e * e;
        }
        err
    };
    let mut sc = sc;
    let mut q = [0u8; QK_K];
    let mut trial = [0u8; 16];
    for (j, sub) in x.chunks_exact(16).enumerate() {
        let mut best = (f32::INFINITY, sc[j]);
        for delta in -1i16..=1 {
            let a = i16::from(sc[j]) + delta;
            if !(-127..=127).contains(&a) {
                continue;
            }
            let err = levels_of(sub, d * f32::from(a as i8), &mut trial);
            if err < best.0 {
                best = (err, a as i8);
            }
        }
        sc[j] = best.1;
        levels_of(sub, d * f32::from(sc[j]), &mut q[16 * j..16 * j + 16]);
    }
    // Two halves of 128: `ql` holds the low nibbles (values l and l + 64 share byte l, l + 32
    // and l + 96 byte l + 32), `qh` the two high bits of l, l + 32, l + 64, l + 96 in byte l.
    let mut ql = [0u8; 128];
    let mut qh = [0u8; 64];
    for half in 0..2 {
        let v = &q[128 * half..128 * half + 128];
        for l in 0..32 {
            ql[64 * half + l] = (v[l] & 0x0F) | ((v[l + 64] & 0x0F) << 4);
            ql[64 * half + l + 32] = (v[l + 32] & 0x0F) | ((v[l + 96] & 0x0F) << 4);
            qh[32 * half + l] =
                (v[l] >> 4) | ((v[l + 32] >> 4) << 2) | ((v[l + 64] >> 4) << 4) | ((v[l + 96] >> 4) << 6);
        }
    }
    out.extend(ql);
    out.extend(qh);
    out.extend(sc.iter().map(|&s| s as u8));
    out.extend(f16_bytes(d));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-Gaussian sample (sums of uniforms), with a few outliers as real
    /// weights have.
    fn weights(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32
        };
        (0..n)
            .map(|i| {
                let g = (0..4).map(|_| next()).sum::<f32>() - 2.0;
                if i % 97 == 0 { g * 0.2 } else { g * 0.02 }
            })
            .collect()
    }

    fn relative_rms(ty: GgmlType, x: &[f32]) -> f32 {
        let mut raw = Vec::new();
        quantize(ty, x, &mut raw);
        assert_eq!(raw.len(), x.len() / ty.block().0 * ty.block().1, "{ty:?}: block bytes");
        let mut back = Vec::new();
        ty.dequantize(&raw, &mut back);
        let err: f32 = x.iter().zip(&back).map(|(a, b)| (a - b) * (a - b)).sum();
        let norm: f32 = x.iter().map(|a| a * a).sum();
        (err / norm).sqrt()
    }

    #[test]
    fn every_written_type_reads_back_within_its_precision() {
        let x = weights(QK_K * 64, 7);
        // Bounds: about 1.3 times what this code measured (F16 2.2e-4, BF16 1.6e-3, Q8_0 0.0093,
        // Q6_K 0.027, Q5_0 0.073, Q5_1 0.046, Q5_K 0.046, Q4_K 0.091 on this sample, whose one
        // outlier in 97 widens the blocks' ranges as real weights' outliers do).
        for (ty, bound) in [
            (GgmlType::F32, 0.0),
            (GgmlType::F16, 1e-3),
            (GgmlType::Bf16, 5e-3),
            (GgmlType::Q8_0, 0.012),
            (GgmlType::Q6K, 0.035),
            (GgmlType::Q5_0, 0.095),
            (GgmlType::Q5_1, 0.06),
            (GgmlType::Q5K, 0.06),
            (GgmlType::Q4K, 0.12),
        ] {
            let e = relative_rms(ty, &x);
            assert!(e <= bound, "{ty:?}: relative RMS error {e} above {bound}");
        }
        // More bits, less error.
        assert!(relative_rms(GgmlType::Q6K, &x) < relative_rms(GgmlType::Q5K, &x));
        assert!(relative_rms(GgmlType::Q5K, &x) < relative_rms(GgmlType::Q4K, &x));
    }

    #[test]
    fn exact_levels_and_zero_blocks_survive() {
        // A block whose values are exactly levels of a grid comes back exactly (Q8_0), and a
        // block of zeros is zeros in every type.
        let x: Vec<f32> = (0..32).map(|i| if i == 0 { -127.0 * 0.125 } else { (i * 7 - 100) as f32 * 0.125 }).collect();
        let mut raw = Vec::new();
        quantize(GgmlType::Q8_0, &x, &mut raw);
        let mut back = Vec::new();
        GgmlType::Q8_0.dequantize(&raw, &mut back);
        let err = x.iter().zip(&back).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert_eq!(err, 0.0);
        for ty in [GgmlType::Q8_0, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K] {
            let zeros = vec![0f32; QK_K];
            let mut raw = Vec::new();
            quantize(ty, &zeros, &mut raw);
            let mut back = Vec::new();
            ty.dequantize(&raw, &mut back);
            assert!(back.iter().all(|v| *v == 0.0), "{ty:?}");
        }
    }

    #[test]
    fn the_parallel_split_writes_the_same_bytes() {
        let x = weights(QK_K * 200, 3);
        let mut one = Vec::new();
        quantize(GgmlType::Q4K, &x, &mut one);
        assert_eq!(quantize_parallel(GgmlType::Q4K, &x), one);
    }
}
