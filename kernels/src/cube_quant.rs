//! The dequantising kernel of quantised weights ([`crate::qweight`]) on cubecl runtimes: one
//! unit per value, reading its block's scales and its bits from the rows' 32-bit words and
//! computing the value with the operations of ggml's reference code (`dequantize_row_*`) in
//! the same order, so that the values equal the host's ([`crate::quant`]; checked bit for bit
//! on lavapipe by `tests/kernels.rs`). The matmul that follows is Burn's (cubecl's tuned one),
//! on a chunk of dequantised rows at a time.
//!
//! Types: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K (what llama.cpp's Q4_K_M to Q8_0 files
//! hold); the others (Q2_K, Q3_K, Q8_K) are dequantised on the host and uploaded.

use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, Shape, TensorMetadata};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::{CubeCount, CubeDim};

use crate::QuantLayout;
use crate::quant::GgmlType;

mod gpu {
    use cubecl::prelude::*;

    /// Byte `at` of the words.
    #[cube]
    fn byte(words: &Tensor<i32>, at: usize) -> u32 {
        let w = u32::cast_from(words[at / 4]);
        (w >> (((at % 4) * 8) as u32)) & 0xFF
    }

    /// The little-endian f16 at byte `at`, as f32 (exact: every f16 is an f32).
    #[cube]
    fn half(words: &Tensor<i32>, at: usize) -> f32 {
        let h = byte(words, at) | (byte(words, at + 1) << 8);
        let exp = (h >> 10) & 0x1F;
        let mant = h & 0x3FF;
        let mut out = f32::reinterpret(((exp + 112) << 23) | (mant << 13));
        if exp == 0 {
            // Subnormal (or zero): mant * 2^-24, exact in f32.
            out = f32::cast_from(mant) * f32::reinterpret(0x3380_0000u32);
        }
        if exp == 31 {
            out = f32::reinterpret(0x7F80_0000u32 | (mant << 13));
        }
        if (h >> 15) == 1 {
            out = -out;
        }
        out
    }

    /// The little-endian u32 at byte `at`.
    #[cube]
    fn word_at(words: &Tensor<i32>, at: usize) -> u32 {
        byte(words, at) | (byte(words, at + 1) << 8) | (byte(words, at + 2) << 16) | (byte(words, at + 3) << 24)
    }

    /// The 6-bit scale (`m = false`) or minimum of sub-block `j` of a Q4_K/Q5_K super-block
    /// whose 12 scale bytes start at `s`.
    #[cube]
    fn scale_min(words: &Tensor<i32>, s: usize, j: usize, m: bool) -> u32 {
        // j < 4: the low six bits of byte j (scale) or j + 4 (minimum).
        let mut out = byte(words, s + j) & 63;
        if m {
            out = byte(words, s + j + 4) & 63;
        }
        if j >= 4 {
            if m {
                out = (byte(words, s + j + 4) >> 4) | ((byte(words, s + j) >> 6) << 4);
            } else {
                out = (byte(words, s + j + 4) & 0xF) | ((byte(words, s + j - 4) >> 6) << 4);
            }
        }
        out
    }

    /// The nibble of byte `q` for value `j` of a 32-value block (low for the first 16).
    #[cube]
    fn nibble(q: u32, low: bool) -> u32 {
        let mut out = q >> 4;
        if low {
            out = q & 0xF;
        }
        out
    }

    /// Value `j` of the block at byte `b`.
    #[cube]
    fn value(words: &Tensor<i32>, b: usize, j: usize, #[comptime] ty: u32) -> f32 {
        let mut v = f32::new(0.0);
        if comptime![ty == 2] {
            // Q4_0: d, qs[16]
            let x = nibble(byte(words, b + 2 + j % 16), j < 16);
            v = f32::cast_from(i32::cast_from(x) - 8) * half(words, b);
        } else if comptime![ty == 3] {
            // Q4_1: d, m, qs[16]
            let x = nibble(byte(words, b + 4 + j % 16), j < 16);
            v = f32::cast_from(x) * half(words, b) + half(words, b + 2);
        } else if comptime![ty == 6 || ty == 7] {
            // Q5_0: d, qh, qs[16]; Q5_1: d, m, qh, qs[16]
            let q0 = comptime![if ty == 6 { 2usize } else { 4usize }];
            let qh = word_at(words, b + q0);
            let q = byte(words, b + q0 + 4 + j % 16);
            let mut x = (q & 0xF) | (((qh >> (j as u32)) << 4) & 0x10);
            if j >= 16 {
                x = (q >> 4) | ((qh >> ((j - 16) as u32 + 12)) & 0x10);
            }
            if comptime![ty == 6] {
                v = f32::cast_from(i32::cast_from(x) - 16) * half(words, b);
            } else {
                v = f32::cast_from(x) * half(words, b) + half(words, b + 2);
            }
        } else if comptime![ty == 8] {
            // Q8_0: d, qs[32] (signed)
            let q = i32::cast_from(byte(words, b + 2 + j));
            let mut s = q;
            if q >= 128 {
                s = q - 256;
            }
            v = f32::cast_from(s) * half(words, b);
        } else if comptime![ty == 12 || ty == 13] {
            // Q4_K: d, dmin, scales[12], qs[128]; Q5_K: d, dmin, scales[12], qh[32], qs[128]
            let chunk = j / 64;
            let l = j % 64;
            let is = 2 * chunk + l / 32;
            let d1 = half(words, b) * f32::cast_from(scale_min(words, b + 4, is, false));
            let m1 = half(words, b + 2) * f32::cast_from(scale_min(words, b + 4, is, true));
            let qs = comptime![if ty == 12 { 16usize } else { 48usize }];
            let mut x = nibble(byte(words, b + qs + 32 * chunk + l % 32), l < 32);
            if comptime![ty == 13] {
                let h = byte(words, b + 16 + l % 32);
                let mut bit = 1u32 << (2 * chunk as u32);
                if l >= 32 {
                    bit = 2u32 << (2 * chunk as u32);
                }
                if (h & bit) != 0 {
                    x += 16;
                }
            }
            v = d1 * f32::cast_from(x) - m1;
        } else if comptime![ty == 14] {
            // Q6_K: ql[128], qh[64], scales[16] (signed), d
            let part = j / 128;
            let r = j % 128;
            let quarter = r / 32;
            let l = r % 32;
            let ql = b + 64 * part;
            let qh = byte(words, b + 128 + 32 * part + l);
            let mut low = byte(words, ql + l + 32 * (quarter % 2));
            if quarter >= 2 {
                low >>= 4;
            } else {
                low &= 0xF;
            }
            let q = i32::cast_from(low | (((qh >> (2 * quarter as u32)) & 3) << 4)) - 32;
            let sc = i32::cast_from(byte(words, b + 192 + 8 * part + l / 16 + 2 * quarter));
            let mut s = sc;
            if sc >= 128 {
                s = sc - 256;
            }
            v = half(words, b + 208) * f32::cast_from(s) * f32::cast_from(q);
        }
        v
    }

    /// `out [rows, cols]` from the blocks `words [rows, row_words]`: one unit per value.
    #[cube(launch)]
    pub fn dequantize(
        words: &Tensor<i32>,
        out: &mut Tensor<f32>,
        #[comptime] ty: u32,
        #[comptime] block: u32,
        #[comptime] block_bytes: u32,
    ) {
        let cube = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
        let at = cube * CUBE_DIM_X as usize + UNIT_POS_X as usize;
        let cols = out.shape(1);
        if at >= out.shape(0) * cols {
            terminate!();
        }
        let row = at / cols;
        let col = at % cols;
        let start = row * words.stride(0) * 4 + (col / block as usize) * block_bytes as usize;
        out[row * out.stride(0) + col] = value(words, start, col % block as usize, ty);
    }
}

/// Units per cube.
const UNITS: u32 = 256;

/// Whether the kernel reads `ty`.
pub(crate) fn reads(ty: GgmlType) -> bool {
    matches!(
        ty,
        GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Q4K
            | GgmlType::Q5K
            | GgmlType::Q6K
    )
}

/// The f32 values of `words` (a type [`reads`] accepts).
pub(crate) fn dequantize<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(
    words: IntTensor<CubeBackend<R, F, I, BT>>,
    layout: QuantLayout,
) -> FloatTensor<CubeBackend<R, F, I, BT>> {
    let words = into_contiguous(words);
    let rows = words.shape()[0];
    let out = empty_device_dtype::<R>(
        words.client.clone(),
        words.device.clone(),
        Shape::new([rows, layout.cols]),
        DType::F32,
    );
    let total = rows * layout.cols;
    if total == 0 {
        return out;
    }
    let cubes = total.div_ceil(UNITS as usize);
    let hw = words.client.properties().hardware.max_cube_count.0.max(1) as usize;
    let x = cubes.clamp(1, hw);
    let y = cubes.div_ceil(x);
    let (block, block_bytes) = layout.ty.block();
    gpu::dequantize::launch::<R>(
        &words.client.clone(),
        CubeCount::Static(x as u32, y as u32, 1),
        CubeDim::new_1d(UNITS),
        words.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        layout.ty.code(),
        block as u32,
        block_bytes as u32,
    );
    out
}
