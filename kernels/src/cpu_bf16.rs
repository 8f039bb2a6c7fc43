//! The CPU backend's bf16 products (issue #35): `c [m, n] = a [m, k] @ b [k, n]` with both
//! operands in bf16 (an f32 operand is rounded to the nearest bf16 as it is packed, which is what
//! casting it first would give), the products summed in f32, on CPUs with AVX512-BF16 (Intel
//! Cooper Lake and Sapphire Rapids on, AMD Zen 4 on). This is what bf16 compute over f32 master
//! weights (`[backend] dtype = "bf16"`) multiplies with: a linear layer's forward and both of its
//! gradients ([`crate::LogProbBackend::linear_matmul_bwd`]).
//!
//! Why: Burn flex 0.21 multiplies bf16 tensors by widening both to f32 in a serial pass, calling
//! gemm in f32 and rounding the result back in another, so bf16 compute on the CPU was slower
//! than f32 (docs/benchmarks.md). `vdpbf16ps` multiplies 32 pairs of bf16 and adds them into 16
//! f32 sums in one instruction, twice the multiply-adds of an f32 FMA.
//!
//! Layout (the usual packed product): `a` is packed in panels of [`MR`] rows and `b` in panels of
//! [`NR`] columns, each with the inner index in pairs (one 32-bit lane holds `x[2p]` in its low
//! half and `x[2p + 1]` in its high half, as `vdpbf16ps` reads them; an odd `k` is padded with a
//! zero). The register kernel keeps an `MR x NR` block of sums (24 of the 32 vector registers)
//! over the whole inner dimension. Tasks (rayon, on the current pool: flex's) own runs of output rows; each
//! goes over every panel of `b` and, for each, over its panels of `a`, so a `b` panel is read
//! from cache once per task.
//!
//! The sums are in f32, rounded once for each product added (the products of two bf16 are exact
//! in f32); `vdpbf16ps` flushes subnormal inputs and results to zero.

use half::bf16;
use rayon::prelude::*;

/// Rows of `a` (and of the output) per panel.
pub const MR: usize = 12;

/// Columns of `b` (and of the output) per panel: two vectors of 16 f32 sums.
pub const NR: usize = 32;

/// A 2-D operand: `rows x cols` values, value `(r, c)` at `data[r * row_stride + c * col_stride]`.
#[derive(Clone, Copy, Debug)]
pub struct View<'a, T> {
    /// The values from the first one on.
    pub data: &'a [T],
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// Elements from one row to the next.
    pub row_stride: usize,
    /// Elements from one column to the next.
    pub col_stride: usize,
}

impl<T: Copy> View<'_, T> {
    /// Whether every value the shape and strides name lies in `data`.
    pub fn fits(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last = (self.rows - 1).checked_mul(self.row_stride).zip((self.cols - 1).checked_mul(self.col_stride));
        last.and_then(|(r, c)| r.checked_add(c)).is_some_and(|i| i < self.data.len())
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        View { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }

    /// The transpose where `transpose` says so, else the view itself.
    pub fn t_if(self, transpose: bool) -> Self {
        if transpose { self.t() } else { self }
    }

    #[inline(always)]
    fn at(&self, r: usize, c: usize) -> T {
        self.data[r * self.row_stride + c * self.col_stride]
    }
}

/// An operand's element type: bf16, or f32 rounded to the nearest bf16 (ties to even).
pub trait Elem: Copy + Send + Sync + 'static {
    /// The bf16 value's bits.
    fn bf16_bits(self) -> u16;

    /// The bits of bf16 values as they lie (`None` for another type, which must be rounded).
    fn as_bf16_bits(_values: &[Self]) -> Option<&[u16]> {
        None
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn bf16_bits(self) -> u16 {
        self.to_bits()
    }

    fn as_bf16_bits(values: &[Self]) -> Option<&[u16]> {
        use half::slice::HalfFloatSliceExt;
        Some(values.reinterpret_cast())
    }
}

impl Elem for f32 {
    /// `bf16::from_f32`'s rounding without branches (so that packing vectorises): add half a
    /// unit of the last kept place, less one where the kept part is even, and drop the low half;
    /// a NaN stays a (quiet) NaN.
    #[inline(always)]
    fn bf16_bits(self) -> u16 {
        let x = self.to_bits();
        let rounded = (x.wrapping_add(0x7FFF + ((x >> 16) & 1)) >> 16) as u16;
        let nan = ((x >> 16) | 0x40) as u16;
        if x & 0x7FFF_FFFF > 0x7F80_0000 { nan } else { rounded }
    }
}

/// The output's element type: bf16 (rounded to nearest), or f32.
pub trait OutElem: Copy + Send + Sync + 'static {
    /// Zero.
    const ZERO: Self;
    /// The f32 sum as this type.
    fn from_sum(v: f32) -> Self;
}

impl OutElem for f32 {
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn from_sum(v: f32) -> Self {
        v
    }
}

impl OutElem for bf16 {
    const ZERO: Self = bf16::ZERO;
    /// `bf16::from_f32`'s result, without its branches (so that the conversion vectorises).
    #[inline(always)]
    fn from_sum(v: f32) -> Self {
        bf16::from_bits(v.bf16_bits())
    }
}

/// Whether this CPU has the instructions the kernel and the packing are compiled for (AVX-512F,
/// BW and VL, and AVX512-BF16: every CPU with the last has the others). Where it does not, the
/// CPU backend keeps flex's bf16 product.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Which register kernel multiplies the panels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// `vdpbf16ps` (AVX512-BF16).
    #[cfg(target_arch = "x86_64")]
    Avx512Bf16,
    /// Scalar f32 arithmetic (the tests' check of the packing on any CPU: the same sums, each
    /// pair's even product added first, subnormals kept; within rounding of `vdpbf16ps`).
    #[cfg_attr(not(test), allow(dead_code))]
    Portable,
    /// AMX tiles ([`crate::cpu_amx`]; experimental, where `FUSERL_AMX=1` and the CPU has them).
    #[cfg(target_arch = "x86_64")]
    Amx,
    /// [`crate::cpu_amx`]'s blocking and layouts on its emulation of the tiles (the tests' check
    /// of them on any CPU).
    #[cfg_attr(not(test), allow(dead_code))]
    AmxEmulated,
}

/// `a [m, k] @ b [k, n]` as `[m, n]`, row-major, in `O`.
///
/// # Panics
/// When the CPU lacks AVX512-BF16 ([`available`]), when the inner sizes differ, or when a view
/// names values past its data.
pub fn matmul<A: Elem, B: Elem, O: OutElem>(a: View<'_, A>, b: View<'_, B>) -> Vec<O> {
    assert!(available(), "cpu_bf16::matmul: this CPU has no AVX512-BF16 (check cpu_bf16::available first)");
    #[cfg(target_arch = "x86_64")]
    {
        product(a, b, if crate::cpu_amx::enabled() { Kernel::Amx } else { Kernel::Avx512Bf16 })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        product(a, b, Kernel::Portable)
    }
}

pub(crate) fn product<A: Elem, B: Elem, O: OutElem>(a: View<'_, A>, b: View<'_, B>, kernel: Kernel) -> Vec<O> {
    assert_eq!(a.cols, b.rows, "cpu_bf16::matmul: a has {} columns, b {} rows", a.cols, b.rows);
    assert!(a.fits() && b.fits(), "cpu_bf16::matmul: a view names values past its data");
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let mut out = vec![O::ZERO; m * n];
    if m == 0 || n == 0 || k == 0 {
        return out;
    }
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Amx => return crate::cpu_amx::product(a, b, crate::cpu_amx::hardware_tiles),
        Kernel::AmxEmulated => return crate::cpu_amx::product(a, b, || crate::cpu_amx::Emulated),
        _ => {}
    }
    let pairs = k.div_ceil(2);
    // bf16 rows in memory with an even length are already pairs, as the kernel reads them (the
    // first of a pair in the low half: on little-endian CPUs).
    let in_place = cfg!(target_endian = "little") && a.col_stride == 1 && k % 2 == 0;
    let a_rows = A::as_bf16_bits(a.data).filter(|_| in_place);
    let packed_a = if a_rows.is_some() { Vec::new() } else { pack(a, pairs, MR) };
    let a_source = match a_rows {
        Some(bits) => ASource::Rows { bits, row_stride: a.row_stride },
        None => ASource::Packed(&packed_a),
    };
    let packed_b = pack(b.t(), pairs, NR);
    let a_panels = m.div_ceil(MR);
    // Runs of `a` panels per task: four tasks a thread where there are enough rows, at most 16
    // panels (192 rows) each so that a task's `a` stays in a core's L2 cache.
    let per_task = a_panels.div_ceil(4 * rayon::current_num_threads()).clamp(1, 16);
    let packed = Packed { a: a_source, b: &packed_b, pairs, m, n, kernel };
    #[cfg(target_arch = "x86_64")]
    let wide = available();
    out.par_chunks_mut(per_task * MR * n).enumerate().for_each(|(task, rows)| {
        let panels = task * per_task..((task + 1) * per_task).min(a_panels);
        #[cfg(target_arch = "x86_64")]
        if wide {
            // SAFETY: `available` checked that the CPU has AVX-512F, BW and VL.
            #[allow(unsafe_code)]
            unsafe {
                output_rows_avx512(&packed, panels, rows)
            };
            return;
        }
        output_rows(&packed, panels, rows);
    });
    out
}

/// Where `a`'s pairs are.
#[derive(Clone, Copy)]
enum ASource<'a> {
    /// In panels ([`pack`]).
    Packed(&'a [u32]),
    /// In bf16 rows in memory of an even length: row `r`'s pair `p` is the 32 bits at element
    /// `r * row_stride + 2p` of `bits`.
    Rows { bits: &'a [u16], row_stride: usize },
}

/// One panel of `a` as the kernels read it: row `i`'s pair `p` is the 32 bits at `rows[i] + p *
/// step` (in u32s; read unaligned), in memory that lives for `'a`.
#[derive(Clone, Copy)]
struct APanel<'a> {
    rows: [*const u32; MR],
    step: usize,
    pairs: usize,
    memory: std::marker::PhantomData<&'a [u32]>,
}

impl<'a> APanel<'a> {
    /// Panel `ip` of `a` for the product's `m` rows (a last panel's rows past `m` read the last
    /// row again: their sums are not written out).
    fn new(a: ASource<'a>, ip: usize, pairs: usize, m: usize) -> Self {
        let memory = std::marker::PhantomData;
        match a {
            ASource::Packed(packed) => {
                let panel = &packed[ip * pairs * MR..][..pairs * MR];
                Self { rows: std::array::from_fn(|i| panel[i..].as_ptr()), step: MR, pairs, memory }
            }
            ASource::Rows { bits, row_stride } => {
                let row = |i: usize| {
                    let r = (ip * MR + i).min(m - 1);
                    bits[r * row_stride..][..2 * pairs].as_ptr().cast::<u32>()
                };
                Self { rows: std::array::from_fn(row), step: 1, pairs, memory }
            }
        }
    }

    /// Row `i`'s pair at `offset` (u32s; pair `p` is at `p * step`). Wrapping arithmetic and a
    /// read of bytes, which the crate's debug checks leave alone: this is the kernel's inner loop.
    ///
    /// # Safety
    /// `i < MR` and `offset = p * self.step` for a `p < self.pairs` (what [`APanel::new`]
    /// checked the memory of).
    #[inline(always)]
    #[allow(unsafe_code)]
    unsafe fn get(&self, i: usize, offset: usize) -> u32 {
        // SAFETY: `new` took row `i`'s pointer from a slice that lives for `'a` and holds the
        // `(pairs - 1) * step + 1` u32s read from it: the packed panel from its `i`th value on
        // (`pairs * MR - i` of them, `i < MR`), or the `2 * pairs` bf16 of a row. Read as bytes:
        // alignment 1, no check of it (nor `read_unaligned`'s) in the loop.
        unsafe { u32::from_ne_bytes(*self.rows[i].wrapping_add(offset).cast::<[u8; 4]>()) }
    }
}

/// `a` and `b`'s panels, and the product's shape.
struct Packed<'a> {
    a: ASource<'a>,
    b: &'a [u32],
    pairs: usize,
    m: usize,
    n: usize,
    kernel: Kernel,
}

/// [`output_rows`] compiled for AVX-512 (the sums' conversions and copies in 512-bit vectors).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline(never)]
fn output_rows_avx512<O: OutElem>(p: &Packed<'_>, panels: std::ops::Range<usize>, rows: &mut [O]) {
    output_rows(p, panels, rows);
}

/// The output rows of `a` panels `panels` (`rows`, from the first panel's first row on): every
/// `b` panel in turn over each of them.
#[inline(always)]
fn output_rows<O: OutElem>(p: &Packed<'_>, panels: std::ops::Range<usize>, rows: &mut [O]) {
    let Packed { pairs, m, n, .. } = *p;
    let mut block = [[0.0f32; NR]; MR];
    for jp in 0..n.div_ceil(NR) {
        let bp = &p.b[jp * pairs * NR..][..pairs * NR];
        let (j0, width) = (jp * NR, NR.min(n - jp * NR));
        for ip in panels.clone() {
            run(p.kernel, APanel::new(p.a, ip, pairs, m), bp, &mut block);
            let (r0, height) = ((ip - panels.start) * MR, MR.min(m - ip * MR));
            for (i, sums) in block.iter().take(height).enumerate() {
                let row = &mut rows[(r0 + i) * n + j0..][..width];
                for (o, s) in row.iter_mut().zip(sums) {
                    *o = O::from_sum(*s);
                }
            }
        }
    }
}

/// The rows of `x` in panels of `width` rows: panel `q`, pair `p`, row `i` at
/// `(q * pairs + p) * width + i`, holding `x[row, 2p]` in the low half and `x[row, 2p + 1]` in
/// the high half; rows and columns past the end, and pairs past `x`'s, are zeros. (`b` is packed
/// as its transpose.)
pub(crate) fn pack<T: Elem>(x: View<'_, T>, pairs: usize, width: usize) -> Vec<u32> {
    let mut packed = vec![0u32; x.rows.div_ceil(width) * pairs * width];
    #[cfg(target_arch = "x86_64")]
    let wide = available();
    packed.par_chunks_mut(pairs * width).enumerate().for_each(|(q, panel)| {
        #[cfg(target_arch = "x86_64")]
        if wide {
            // SAFETY: `available` checked that the CPU has AVX-512F, BW and VL.
            #[allow(unsafe_code)]
            unsafe {
                pack_panel_avx512(x, q, panel, width)
            };
            return;
        }
        pack_panel(x, q, panel, width);
    });
    packed
}

/// [`pack_panel`] compiled for AVX-512 (its conversions and copies in 512-bit vectors).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline(never)]
fn pack_panel_avx512<T: Elem>(x: View<'_, T>, q: usize, panel: &mut [u32], width: usize) {
    pack_panel(x, q, panel, width);
}

/// Panel `q` of [`pack`].
#[inline(always)]
fn pack_panel<T: Elem>(x: View<'_, T>, q: usize, panel: &mut [u32], width: usize) {
    let pairs = x.cols.div_ceil(2);
    assert!(pairs * width <= panel.len(), "cpu_bf16: a panel shorter than its rows' pairs");
    let bits = |v: T| u32::from(v.bf16_bits());
    let (first, rows) = (q * width, width.min(x.rows - q * width));
    if x.col_stride == 1 {
        // Rows in memory: read each along its length.
        for i in 0..rows {
            let row = &x.data[(first + i) * x.row_stride..][..x.cols];
            let (whole, last) = row.as_chunks::<2>();
            for (p, [lo, hi]) in whole.iter().enumerate() {
                panel[p * width + i] = bits(*lo) | (bits(*hi) << 16);
            }
            if let [lo] = last {
                panel[whole.len() * width + i] = bits(*lo);
            }
        }
    } else if x.row_stride == 1 {
        // Columns in memory (a transposed view): read the panel's part of each column.
        for p in 0..pairs {
            let column = |c: usize| &x.data[c * x.col_stride + first..][..rows];
            let out = &mut panel[p * width..][..rows];
            let lo = column(2 * p);
            if 2 * p + 1 < x.cols {
                for ((o, &a), &b) in out.iter_mut().zip(lo).zip(column(2 * p + 1)) {
                    *o = bits(a) | (bits(b) << 16);
                }
            } else {
                for (o, &a) in out.iter_mut().zip(lo) {
                    *o = bits(a);
                }
            }
        }
    } else {
        for i in 0..rows {
            for p in 0..pairs {
                let hi = if 2 * p + 1 < x.cols { bits(x.at(first + i, 2 * p + 1)) } else { 0 };
                panel[p * width + i] = bits(x.at(first + i, 2 * p)) | (hi << 16);
            }
        }
    }
}

/// One `MR x NR` block of sums over every pair.
#[inline(always)]
fn run(kernel: Kernel, a: APanel<'_>, b: &[u32], block: &mut [[f32; NR]; MR]) {
    assert_eq!(a.pairs * NR, b.len(), "cpu_bf16: panels of different lengths");
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `matmul` chose this kernel after checking that the CPU has the features it is
        // compiled for; the panels hold the same number of pairs (checked above).
        #[allow(unsafe_code)]
        Kernel::Avx512Bf16 => unsafe { kernel_avx512_bf16(a, b, block) },
        Kernel::Portable => kernel_portable(a, b, block),
        #[cfg(target_arch = "x86_64")]
        Kernel::Amx => unreachable!("cpu_bf16: the AMX kernel has its own blocks"),
        Kernel::AmxEmulated => unreachable!("cpu_bf16: the AMX kernel has its own blocks"),
    }
}

/// The two bf16 values of a pair as f32 (exact).
#[inline(always)]
fn unpair(x: u32) -> (f32, f32) {
    (f32::from_bits(x << 16), f32::from_bits(x & 0xFFFF_0000))
}

fn kernel_portable(a: APanel<'_>, b: &[u32], block: &mut [[f32; NR]; MR]) {
    *block = [[0.0; NR]; MR];
    for (p, bp) in b.chunks_exact(NR).enumerate().take(a.pairs) {
        for (i, sums) in block.iter_mut().enumerate() {
            // SAFETY: i < MR, p < pairs.
            #[allow(unsafe_code)]
            let (x0, x1) = unpair(unsafe { a.get(i, p * a.step) });
            for (s, &y) in sums.iter_mut().zip(bp) {
                let (y0, y1) = unpair(y);
                *s = x1.mul_add(y1, x0.mul_add(y0, *s));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(unsafe_code)]
fn kernel_avx512_bf16(a: APanel<'_>, b: &[u32], block: &mut [[f32; NR]; MR]) {
    use std::arch::x86_64::{__m512bh, __m512i, _mm512_dpbf16_ps, _mm512_loadu_si512, _mm512_set1_epi32};
    use std::arch::x86_64::{_mm512_setzero_ps, _mm512_storeu_ps};
    let pairs = a.pairs;
    assert!(b.len() == pairs * NR, "cpu_bf16: panels of different lengths");
    let bh = |x: __m512i| -> __m512bh {
        // SAFETY: both are 512 bits of plain data; `vdpbf16ps` reads the integer vector's lanes
        // as pairs of bf16.
        unsafe { std::mem::transmute::<__m512i, __m512bh>(x) }
    };
    // The block's sums, row i in `s[2i]` (columns 0..16) and `s[2i + 1]` (16..32): indexed with
    // constants only (the macro below), so that they live in registers.
    let mut s = [_mm512_setzero_ps(); 2 * MR];
    let (mut bp, mut offset) = (b.as_ptr(), 0usize);
    for _ in 0..pairs {
        // SAFETY: each pass reads the next pair of every row of `a` ([`APanel::get`], at `p *
        // step`) and `NR` values of `b` and moves past them, `pairs` passes in all: within `b`
        // (checked above).
        unsafe {
            let b0 = bh(_mm512_loadu_si512(bp.cast()));
            let b1 = bh(_mm512_loadu_si512(bp.add(16).cast()));
            macro_rules! row {
                ($($i:literal)*) => {$(
                    let x = bh(_mm512_set1_epi32(a.get($i, offset) as i32));
                    s[2 * $i] = _mm512_dpbf16_ps(s[2 * $i], x, b0);
                    s[2 * $i + 1] = _mm512_dpbf16_ps(s[2 * $i + 1], x, b1);
                )*};
            }
            row!(0 1 2 3 4 5 6 7 8 9 10 11);
            bp = bp.wrapping_add(NR);
            offset = offset.wrapping_add(a.step);
        }
    }
    for (i, out) in block.iter_mut().enumerate() {
        // SAFETY: each row of `block` holds 32 f32.
        unsafe {
            _mm512_storeu_ps(out.as_mut_ptr(), s[2 * i]);
            _mm512_storeu_ps(out.as_mut_ptr().add(16), s[2 * i + 1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::cpu_amx::value;

    fn round(x: f32) -> f64 {
        f64::from(bf16::from_f32(x).to_f32())
    }

    /// The f64 product of the bf16 roundings of `a [m, k]` and of `b` (row-major `[k, n]`, or
    /// `[n, k]` read transposed), and for each output the sum of the products' magnitudes.
    fn reference(a: &[f32], b: &[f32], (m, k, n): (usize, usize, usize), b_transposed: bool) -> (Vec<f64>, Vec<f64>) {
        let mut c = vec![0.0; m * n];
        let mut scale = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                for r in 0..k {
                    let bv = if b_transposed { b[j * k + r] } else { b[r * n + j] };
                    let p = round(a[i * k + r]) * round(bv);
                    c[i * n + j] += p;
                    scale[i * n + j] += p.abs();
                }
            }
        }
        (c, scale)
    }

    fn check(kernel: Kernel, (m, k, n): (usize, usize, usize)) {
        let a: Vec<f32> = (0..m * k).map(value).collect();
        let b: Vec<f32> = (0..k * n).map(|i| value(i + 1_000_003)).collect();
        let b16: Vec<bf16> = b.iter().map(|&v| bf16::from_f32(v)).collect();
        let av = View { data: &a[..], rows: m, cols: k, row_stride: k, col_stride: 1 };
        // `a` in bf16 rows (read in place when `k` is even), also from an odd offset in longer
        // rows (pairs at odd addresses).
        let a16: Vec<bf16> = a.iter().map(|&v| bf16::from_f32(v)).collect();
        let mut padded = vec![bf16::ZERO; 1 + m * (k + 3)];
        for (i, row) in a16.chunks_exact(k).enumerate() {
            padded[1 + i * (k + 3)..][..k].copy_from_slice(row);
        }
        let av16 = View { data: &a16[..], rows: m, cols: k, row_stride: k, col_stride: 1 };
        let av_padded = View { data: &padded[1..], row_stride: k + 3, ..av16 };
        // `a` as the transpose of its `[k, m]` transpose (a weight gradient's `x^T`).
        let a_t: Vec<f32> = (0..k * m).map(|i| a[(i % m) * k + i / m]).collect();
        let av_t = View { data: &a_t[..], rows: m, cols: k, row_stride: 1, col_stride: m };
        for transposed in [false, true] {
            // `b` as `[k, n]`, or its values read as the transpose of `[n, k]`.
            let (rs, cs) = if transposed { (1, k) } else { (n, 1) };
            let bv = View { data: &b[..], rows: k, cols: n, row_stride: rs, col_stride: cs };
            let bv16 = View { data: &b16[..], rows: k, cols: n, row_stride: rs, col_stride: cs };
            let (want, scale) = reference(&a, &b, (m, k, n), transposed);
            let f32_out: Vec<f32> = product(av, bv, kernel);
            let from_bf16: Vec<f32> = product(av, bv16, kernel);
            let bf16_out: Vec<bf16> = product(av, bv, kernel);
            let from_a16: Vec<f32> = product(av16, bv, kernel);
            let from_padded: Vec<f32> = product(av_padded, bv, kernel);
            let from_a_t: Vec<f32> = product(av_t, bv, kernel);
            for idx in 0..m * n {
                // f32 sums of k exact products: within k roundings of the sum of magnitudes.
                let tol = 6e-8 * (k as f64) * scale[idx].max(1e-30);
                let got = f64::from(f32_out[idx]);
                assert!(
                    (got - want[idx]).abs() <= tol,
                    "{kernel:?} m {m} k {k} n {n} transposed {transposed}: c[{idx}] = {got}, want {} (within {tol:e})",
                    want[idx]
                );
                assert_eq!(f32_out[idx], from_bf16[idx], "a bf16 operand gives the f32 one's product");
                assert_eq!(f32_out[idx], from_a16[idx], "bf16 rows of a give the f32 one's product");
                assert_eq!(f32_out[idx], from_padded[idx], "bf16 rows of a, offset, give the same");
                assert_eq!(f32_out[idx], from_a_t[idx], "a transposed view of a gives the same");
                assert_eq!(bf16_out[idx], bf16::from_f32(f32_out[idx]), "bf16 output is the sum rounded");
            }
        }
    }

    fn shapes() -> Vec<(usize, usize, usize)> {
        // Rows and columns in whole and partial panels (12 and 32 rows, 32 columns), single ones,
        // and more panels than tasks; inner sizes odd, even, one, and whole chunks of AMX tiles
        // (32, 64, 96: `a` read in place there), and a long one (777: many AMX chunks).
        let mut shapes = Vec::new();
        for &m in &[1, 11, 12, 13, 50, 400] {
            for &(k, n) in &[(1, 1), (2, 31), (17, 32), (32, 16), (64, 33), (96, 45), (129, 70), (777, 40)] {
                shapes.push((m, k, n));
            }
        }
        shapes
    }

    #[test]
    fn portable_kernel_matches_the_f64_reference() {
        for shape in shapes() {
            check(Kernel::Portable, shape);
        }
    }

    /// The AVX512-BF16 kernel, where the CPU has it (says so and checks nothing elsewhere: the
    /// backend does not use it there).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_bf16_kernel_matches_the_f64_reference() {
        if !available() {
            eprintln!("this CPU has no AVX512-BF16: its kernel is not checked here");
            return;
        }
        for shape in shapes() {
            check(Kernel::Avx512Bf16, shape);
        }
        // A transposed, offset view of a larger buffer: the product of its values.
        let data: Vec<f32> = (0..7 * 40).map(value).collect();
        let a = View { data: &data[3..], rows: 5, cols: 9, row_stride: 1, col_stride: 30 };
        let b = View { data: &data[..], rows: 9, cols: 4, row_stride: 7, col_stride: 2 };
        let got: Vec<f32> = matmul(a, b);
        for i in 0..5 {
            for j in 0..4 {
                let want: f64 = (0..9).map(|r| round(a.at(i, r)) * round(b.at(r, j))).sum();
                assert!((f64::from(got[i * 4 + j]) - want).abs() < 1e-5, "({i}, {j}): {} != {want}", got[i * 4 + j]);
            }
        }
    }

    /// The AMX kernel's blocking, layouts and edges, on its emulation of the tiles.
    #[test]
    fn amx_emulation_matches_the_f64_reference() {
        for shape in shapes() {
            check(Kernel::AmxEmulated, shape);
        }
    }

    /// The AMX tiles themselves, where the CPU has them and Linux lets this process use them
    /// (says so and checks nothing elsewhere: the backend does not use them there), against the
    /// reference and against their emulation.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn amx_tiles_match_the_f64_reference_and_their_emulation() {
        if !crate::cpu_amx::available() {
            eprintln!("this CPU (or this process) has no AMX-BF16 tiles: they are not checked here");
            return;
        }
        for shape in shapes() {
            check(Kernel::Amx, shape);
        }
        for (m, k, n) in [(50, 96, 45), (13, 129, 70)] {
            let a: Vec<f32> = (0..m * k).map(value).collect();
            let b: Vec<f32> = (0..k * n).map(|i| value(i + 31)).collect();
            let av = View { data: &a[..], rows: m, cols: k, row_stride: k, col_stride: 1 };
            let bv = View { data: &b[..], rows: k, cols: n, row_stride: n, col_stride: 1 };
            let tiles: Vec<f32> = product(av, bv, Kernel::Amx);
            let emulated: Vec<f32> = product(av, bv, Kernel::AmxEmulated);
            let differ = tiles.iter().zip(&emulated).filter(|(t, e)| t != e).count();
            eprintln!(
                "m {m} k {k} n {n}: {differ} of {} sums differ in bits between the tiles and their emulation",
                m * n
            );
            for (i, (t, e)) in tiles.iter().zip(&emulated).enumerate() {
                assert!(
                    (t - e).abs() <= 1e-5 * (k as f32),
                    "m {m} k {k} n {n}: sum {i}: {t} on the tiles, {e} emulated"
                );
            }
        }
    }

    /// The packing's rounding is `half`'s (ties to even, infinities, NaN, subnormals), on every
    /// 2^16th bit pattern and around each tie.
    #[test]
    fn f32_rounding_matches_half() {
        for hi in 0..=u32::from(u16::MAX) {
            for lo in [0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF] {
                let v = f32::from_bits((hi << 16) | lo);
                let want = bf16::from_f32(v).to_bits();
                let got = v.bf16_bits();
                assert!(
                    got == want || (v.is_nan() && bf16::from_bits(got).is_nan()),
                    "{v:e} ({:#x}): {got:#x} != {want:#x}",
                    v.to_bits()
                );
            }
        }
    }

    #[test]
    fn empty_products_are_zeros() {
        let none: [f32; 0] = [];
        let a = View { data: &none[..], rows: 3, cols: 0, row_stride: 0, col_stride: 1 };
        let b = View { data: &none[..], rows: 0, cols: 2, row_stride: 2, col_stride: 1 };
        assert_eq!(product::<f32, f32, f32>(a, b, Kernel::Portable), vec![0.0; 6]);
        let a = View { data: &none[..], rows: 0, cols: 0, row_stride: 0, col_stride: 1 };
        assert_eq!(product::<f32, f32, f32>(a, b, Kernel::Portable), Vec::<f32>::new());
    }
}
