//! The CPU backend's product of a linear layer (issue #35): `y [m, n] = x [m, k] @ w` with `x`
//! in f32 and the weight in f32 or bf16 (widened to f32 exactly, on the fly), laid out as a
//! linear layer keeps it (`[k, n]`, fuserl's `[in, out]`) or as a tied head's embeddings (the rows
//! of `[n, k]`).
//!
//! Why not Burn flex's matmul (the gemm crate) alone: while generating, a decoding step multiplies
//! a few rows by every weight of the model once, so the weights stream from memory and the gemm
//! crate, which packs neither operand at these shapes and reads a `[k, n]` weight with a row's
//! stride, runs far below its speed on the same weights in cache (on a 2-core Intel Xeon: 5 to 40
//! GFLOP/s against 60 to 120). Here the output's columns are cut into chunks whose weights fit in
//! the core's L2 cache, one chunk per task on flex's thread pool:
//!
//! - up to [`STREAM_ROWS`] rows of `x`, the chunk's weights are read once, in order, and every row
//!   of `x` is multiplied by each weight as it arrives (register accumulators: no packing);
//! - more rows, the chunk is copied (widened) into a buffer in cache and multiplied there, on one
//!   thread: on CPUs with AVX-512 in panels of [`NR`] columns by fuserl's register kernel (8 rows
//!   by 48 columns of sums in registers; many rows are cut into blocks too, one task each),
//!   otherwise by the gemm crate.
//!
//! A bf16 weight (a checkpoint stored in bf16, kept so for inference: `fuserl_model`'s frozen
//! models) is read at half the bytes and gives the same products as its f32 widening: bf16 to f32
//! is exact. The sums' order differs from gemm's (the products agree to f32 rounding).

use half::bf16;
use rayon::prelude::*;
use std::cell::RefCell;

/// At most this many rows of `x` take the streaming kernel; more go through a chunk held in
/// cache.
pub const STREAM_ROWS: usize = 8;

/// The CPU backend's `linear_matmul` gives an f32 weight to this kernel for at most this many
/// rows: one (a batch-1 decoding step) measured faster on a 2-core Intel Xeon (generation 1.29x
/// the tokens/s of flex's matmul), eight (batch 8) slower (0.92x: streamed weights stall on
/// memory where gemm's packing prefetches them). A bf16 weight always takes it (flex would
/// cast the whole weight first).
pub const F32_ROWS: usize = 1;

/// The CPU backend's `linear_matmul` (and the input's gradient of its backward) gives an f32
/// weight to the register kernel for at least this many rows ([`f32_panels`]: a prompt's
/// forward, classifier scoring, a training step): there the product is bound by arithmetic, not
/// by reading the weights, and the kernel's tasks (over rows and columns) keep the cores busy
/// where gemm's split waits for its slowest part. Fewer rows keep flex's matmul (8 to 32 rows:
/// as fast or faster on a 2-core AMD EPYC).
pub const F32_PANEL_ROWS: usize = 64;

/// The smallest inner size and output width an f32 product takes the register kernel with
/// ([`f32_panels`]): narrower weights (a LoRA adapter's rank, a classifier's few labels) would
/// waste most of a panel's 48 columns or reload the sums every few steps.
const F32_PANEL_MIN: usize = 64;

/// Whether an f32 product of `x [m, k]` and a weight `[k, n]` takes the register kernel: at least
/// [`F32_PANEL_ROWS`] rows, `k` and `n` at least 64, on a CPU that has the kernel
/// ([`panels_apply`]). Measured on an AMD EPYC (Zen 5) only; the Intel Xeon's numbers are to come.
pub fn f32_panels(m: usize, k: usize, n: usize) -> bool {
    m >= F32_PANEL_ROWS && k >= F32_PANEL_MIN && n >= F32_PANEL_MIN && panels_apply()
}

/// Rows of `x` one task of the register kernel's path takes at least (its chunk's weights are
/// widened once per task: a 64th of the task's arithmetic or less).
const PANEL_TASK_ROWS: usize = 64;

/// Bytes of f32 weights one chunk holds (a part of a core's L2 cache).
const CHUNK_BYTES: usize = 192 * 1024;

/// Columns of a panel of the register kernel (more than [`STREAM_ROWS`] rows, AVX-512): three vectors of 16 sums.
const NR: usize = 48;

/// Bytes of f32 weights one chunk of the register kernel's path holds (half of a core's L2 cache
/// on Zen 5's 1 MiB, a quarter of Sapphire Rapids' 2 MiB).
const PANEL_BYTES: usize = 512 * 1024;

/// Values of the inner index the register kernel's panels hold at once (`[KC, NR]` f32, 384 KiB:
/// in a core's L2 cache while every block of rows is multiplied by it).
const KC: usize = 2048;

/// Rows of `x` the register kernel multiplies at once (24 of the 32 vector registers hold the
/// sums).
const MR: usize = 8;

/// How a weight's values are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightLayout {
    /// `[k, n]`, row-major: row `r` holds input `r`'s weights for every output (a linear layer's
    /// `[in, out]`).
    InOut,
    /// `[n, k]`, row-major: row `j` holds output `j`'s weights (a checkpoint's `[out, in]`, the
    /// embeddings as a tied head).
    OutIn,
}

/// A weight's element type: f32, or bf16 widened exactly.
pub trait WeightElem: Copy + Send + Sync + 'static {
    /// The value as f32.
    fn widen(self) -> f32;
}

impl WeightElem for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl WeightElem for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
}

/// `a * b + c`, fused where the CPU has FMA.
trait MulAdd {
    fn mul_add(a: f32, b: f32, c: f32) -> f32;
}

/// One rounding (an FMA instruction where it is enabled).
struct Fused;

impl MulAdd for Fused {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

/// Two roundings (CPUs without FMA, where `f32::mul_add` is a library call).
#[cfg(target_arch = "x86_64")]
struct Separate;

#[cfg(target_arch = "x86_64")]
impl MulAdd for Separate {
    #[inline(always)]
    fn mul_add(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// One product's operands.
#[derive(Clone, Copy)]
struct Operands<'a, W> {
    x: &'a [f32],
    w: &'a [W],
    m: usize,
    k: usize,
    n: usize,
    layout: WeightLayout,
    /// The inner indices (rows of an `InOut` weight) this task sums over: all of `0..k` but for
    /// the streamed `InOut` product, which splits them between tasks.
    inner: (usize, usize),
}

thread_local! {
    /// A chunk's widened weights (more than [`STREAM_ROWS`] rows: gemm's operand, or the
    /// register kernel's panels).
    static CHUNK: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `x [m, k] @ w` as `[m, n]`, row-major; `w` has `k * n` values laid out as `layout` says.
///
/// # Panics
/// When the lengths of `x` or `w` do not match the shapes.
pub fn matmul<W: WeightElem>(x: &[f32], w: &[W], (m, k, n): (usize, usize, usize), layout: WeightLayout) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "cpu_matmul: x holds {} values, not {m} x {k}", x.len());
    assert_eq!(w.len(), k * n, "cpu_matmul: the weight holds {} values, not {k} x {n}", w.len());
    let mut y = vec![0.0f32; m * n];
    if m == 0 || n == 0 {
        return y;
    }
    let ops = Operands { x, w, m, k, n, layout, inner: (0, k) };
    if m <= STREAM_ROWS && layout == WeightLayout::InOut && k > 0 {
        // Streamed, each task takes a run of whole rows of `w` (one block of memory, read in
        // order) and gives its partial sums for every output; they are added up after.
        let tasks = (2 * rayon::current_num_threads()).min(k);
        let per = k.div_ceil(tasks);
        let ranges: Vec<(usize, usize)> = (0..k).step_by(per).map(|r0| (r0, (r0 + per).min(k))).collect();
        let partials: Vec<Vec<f32>> =
            ranges.into_par_iter().map(|inner| chunk(Operands { inner, ..ops }, (0, n))).collect();
        for part in partials {
            for (s, p) in y.iter_mut().zip(&part) {
                *s += *p;
            }
        }
        return y;
    }
    if panels(m) {
        return panel_product(ops, y);
    }
    let width = chunk_width(m, k, n);
    let starts: Vec<usize> = (0..n).step_by(width).collect();
    // Each task gives its columns `[m, width]`; they are put in place after (a copy of the
    // output, small next to the product).
    let parts: Vec<(usize, Vec<f32>)> =
        starts.into_par_iter().map(|j0| (j0, chunk(ops, (j0, (j0 + width).min(n))))).collect();
    for (j0, part) in parts {
        let width = part.len() / m;
        for (i, row) in part.chunks_exact(width).enumerate() {
            y[i * n + j0..i * n + j0 + width].copy_from_slice(row);
        }
    }
    y
}

/// The product on the register kernel's path, into `y` (`[m, n]`, zeros): tasks of a chunk of
/// columns and a block of rows each (rows in blocks of at least [`PANEL_TASK_ROWS`] where the
/// columns alone give fewer than two tasks a thread: many rows under a narrow weight, a prompt,
/// a training step), each writing its part of `y` in place.
fn panel_product<W: WeightElem>(ops: Operands<'_, W>, mut y: Vec<f32>) -> Vec<f32> {
    let Operands { x, m, k, n, .. } = ops;
    if k == 0 {
        return y;
    }
    let width = panel_chunk_width(k.min(KC), n);
    let chunks = n.div_ceil(width);
    let blocks = (2 * rayon::current_num_threads()).div_ceil(chunks);
    let rows = m.div_ceil(blocks).next_multiple_of(MR).max(PANEL_TASK_ROWS);
    OutBlock::grid(&mut y, (m, n), (rows, width)).into_par_iter().for_each(|mut out| {
        let task = Operands { x: &x[out.i0 * k..(out.i0 + out.rows) * k], m: out.rows, ..ops };
        panel_chunk(task, &mut out);
    });
    y
}

/// A task's rectangle of the output (`rows` rows from `i0`, `cols` columns from `j0`, of a
/// row-major matrix `n` values wide), written in place; [`OutBlock::grid`] cuts the output into
/// such rectangles, no two of which share a value.
struct OutBlock<'a> {
    ptr: *mut f32,
    n: usize,
    i0: usize,
    j0: usize,
    rows: usize,
    cols: usize,
    _output: std::marker::PhantomData<&'a mut [f32]>,
}

// SAFETY: an `OutBlock` is the only handle to its rectangle of the output (see `grid`), which
// outlives it; moving it to another thread moves that exclusive access.
#[allow(unsafe_code)]
unsafe impl Send for OutBlock<'_> {}

impl<'a> OutBlock<'a> {
    /// `y` (`[m, n]`, row-major) in blocks of `rows` rows by `cols` columns (smaller at the
    /// edges), row block by row block.
    fn grid(y: &'a mut [f32], (m, n): (usize, usize), (rows, cols): (usize, usize)) -> Vec<Self> {
        assert!(y.len() == m * n && rows > 0 && cols > 0, "cpu_matmul: an output grid");
        let ptr = y.as_mut_ptr();
        let mut blocks = Vec::new();
        for i0 in (0..m).step_by(rows) {
            for j0 in (0..n).step_by(cols) {
                let (rows, cols) = (rows.min(m - i0), cols.min(n - j0));
                blocks.push(OutBlock { ptr, n, i0, j0, rows, cols, _output: std::marker::PhantomData });
            }
        }
        blocks
    }

    /// Row `i` of the rectangle (`cols` values).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))] // The kernel is x86-64's.
    fn row(&mut self, i: usize) -> &mut [f32] {
        assert!(i < self.rows, "cpu_matmul: row {i} of a block of {}", self.rows);
        // SAFETY: the rectangle lies inside `y` (`grid` cut it from `[m, n]`, and `i` is one of
        // its rows), no other block shares its values, and `&mut self` lends them once.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts_mut(self.ptr.add((self.i0 + i) * self.n + self.j0), self.cols)
        }
    }
}

/// Whether this CPU runs the register kernel ([`panels_avx512`]: AVX-512 F, BW and VL and FMA),
/// which more than [`STREAM_ROWS`] rows take rather than gemm.
pub fn panels_apply() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether `m` rows take the register kernel (more than [`STREAM_ROWS`], on a CPU that has it)
/// rather than gemm; both layouts.
fn panels(m: usize) -> bool {
    m > STREAM_ROWS && panels_apply()
}

/// Output columns per chunk of the register kernel's path, a multiple of [`NR`]: at least two
/// chunks a thread, and the chunk's f32 weights within [`PANEL_BYTES`].
fn panel_chunk_width(k: usize, n: usize) -> usize {
    let by_threads = n.div_ceil(2 * rayon::current_num_threads()).div_ceil(NR) * NR;
    let by_cache = (PANEL_BYTES / 4 / k.max(1)) / NR * NR;
    by_threads.min(by_cache).max(NR)
}

/// Output columns per chunk, a multiple of 16 (one AVX-512 vector). Through gemm, the chunk's
/// f32 weights fit in [`CHUNK_BYTES`]; streamed (an `OutIn` weight: whole rows, one block of
/// memory per chunk), two chunks per thread.
fn chunk_width(m: usize, k: usize, n: usize) -> usize {
    let by_threads = n.div_ceil(2 * rayon::current_num_threads()).div_ceil(16) * 16;
    if m <= STREAM_ROWS {
        return by_threads.max(16);
    }
    let by_cache = (CHUNK_BYTES / 4 / k.max(1)) / 16 * 16;
    by_cache.min(by_threads).max(16)
}

/// Columns `j0..j1` of the output (`[m, j1 - j0]`), with the widest vector unit the CPU has.
fn chunk<W: WeightElem>(ops: Operands<'_, W>, cols: (usize, usize)) -> Vec<f32> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features the function is compiled for.
            #[allow(unsafe_code)]
            return unsafe { chunk_avx512(ops, cols) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: as above.
            #[allow(unsafe_code)]
            return unsafe { chunk_avx2(ops, cols) };
        }
        chunk_with::<W, Separate>(ops, cols)
    }
    // Other CPUs fuserl builds for (aarch64) have FMA in their base instruction set.
    #[cfg(not(target_arch = "x86_64"))]
    chunk_with::<W, Fused>(ops, cols)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
fn chunk_avx512<W: WeightElem>(ops: Operands<'_, W>, cols: (usize, usize)) -> Vec<f32> {
    chunk_with::<W, Fused>(ops, cols)
}

/// `out`'s rectangle of the product by the register kernel ([`panels_avx512`]), `ops` holding
/// its rows of `x`, whatever their number (a product that takes the kernel takes it for every
/// block of rows).
///
/// # Panics
/// On a CPU without the kernel's instructions ([`panels_apply`]).
fn panel_chunk<W: WeightElem>(ops: Operands<'_, W>, out: &mut OutBlock<'_>) {
    assert!(panels_apply(), "cpu_matmul: the register kernel on a CPU without AVX-512 F, BW and VL and FMA");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU has AVX-512F, BW and VL and FMA (checked above).
    #[allow(unsafe_code)]
    unsafe {
        panels_avx512(ops, out)
    };
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (ops, out);
        unreachable!("cpu_matmul: no register kernel on this architecture")
    }
}

/// `out`'s rectangle of the product (`ops` holding its rows of `x`), [`KC`] values of the inner
/// index at a time: the chunk's weights for those widened into panels of [`NR`] columns (`[kc,
/// NR]` each, one after the other, in the L2 cache: an `InOut` weight read along its rows, where
/// a panel read in place would cross a page at every row; an `OutIn` one along each output's
/// row), then every block of [`MR`] rows of `x` times each panel in registers
/// ([`block_avx512`]), from the sums so far. Each output is summed in order of the inner index,
/// one fused multiply-add at a time (the partial sums between blocks of the inner index are f32
/// values kept exactly).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
fn panels_avx512<W: WeightElem>(ops: Operands<'_, W>, out: &mut OutBlock<'_>) {
    let Operands { x, w, m, k, n, .. } = ops;
    let (j0, width) = (out.j0, out.cols);
    assert_eq!(m, out.rows, "cpu_matmul: a block's rows");
    CHUNK.with_borrow_mut(|buf| {
        let mut block = [[0.0f32; NR]; MR];
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            // Grown, never cleared: every value a panel's masks read is written below (a last
            // partial panel's columns past `cols` keep an earlier call's values, never read).
            let len = width.div_ceil(NR) * kc * NR;
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            let buf = &mut buf[..len];
            match ops.layout {
                WeightLayout::InOut => {
                    for r in 0..kc {
                        for (p, part) in w[(k0 + r) * n + j0..][..width].chunks(NR).enumerate() {
                            for (d, v) in buf[(p * kc + r) * NR..].iter_mut().zip(part) {
                                *d = v.widen();
                            }
                        }
                    }
                }
                // Output `j`'s weights are row `j` of `w`: read along it, written down the
                // panel's column (stores `NR` values apart, inside a panel held in L2).
                WeightLayout::OutIn => {
                    for c in 0..width {
                        let panel = &mut buf[c / NR * kc * NR..][..kc * NR];
                        let row = &w[(j0 + c) * k + k0..][..kc];
                        for (d, v) in panel[c % NR..].iter_mut().step_by(NR).zip(row) {
                            *d = v.widen();
                        }
                    }
                }
            }
            for (p, panel) in buf.chunks_exact(kc * NR).enumerate() {
                let (c0, cols) = (p * NR, NR.min(width - p * NR));
                for i0 in (0..m).step_by(MR) {
                    let live = MR.min(m - i0);
                    if k0 > 0 {
                        for (i, sums) in block.iter_mut().take(live).enumerate() {
                            sums[..cols].copy_from_slice(&out.row(i0 + i)[c0..][..cols]);
                        }
                    }
                    // A last block's rows past `m` repeat the last row; their sums are dropped.
                    let rows = std::array::from_fn(|i| &x[(i0 + i).min(m - 1) * k + k0..][..kc]);
                    block_avx512(rows, Panel { w: panel, stride: NR, cols }, &mut block, k0 > 0);
                    for (i, sums) in block.iter().take(live).enumerate() {
                        out.row(i0 + i)[c0..][..cols].copy_from_slice(&sums[..cols]);
                    }
                }
            }
        }
    });
}

/// `cols` columns (at most [`NR`]) of `k` rows `stride` values apart, from `w`'s first on.
#[derive(Clone, Copy)]
struct Panel<'a> {
    w: &'a [f32],
    stride: usize,
    cols: usize,
}

/// `block [MR, cols] = rows [MR, k] @ panel [k, cols]` (plus `block`'s sums where `from_block`
/// says so), in registers (the panel's columns past `cols` are not read: they count as zeros,
/// and `block`'s columns past `cols` hold nothing of use).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
#[allow(unsafe_code)]
fn block_avx512(rows: [&[f32]; MR], panel: Panel<'_>, block: &mut [[f32; NR]; MR], from_block: bool) {
    use std::arch::x86_64::{__m512, _mm512_fmadd_ps, _mm512_maskz_loadu_ps, _mm512_set1_ps};
    use std::arch::x86_64::{_mm512_loadu_ps, _mm512_setzero_ps, _mm512_storeu_ps};
    let Panel { w, stride, cols } = panel;
    let k = rows[0].len();
    assert!(rows.iter().all(|r| r.len() == k) && k > 0, "cpu_matmul: a block's rows");
    assert!(cols <= NR && cols <= stride && (k - 1) * stride + cols <= w.len(), "cpu_matmul: a panel past its values");
    // Lanes of each of the three vectors inside the panel.
    let masks: [u16; 3] = std::array::from_fn(|v| {
        let lanes = cols.saturating_sub(16 * v).min(16);
        ((1u32 << lanes) - 1) as u16
    });
    // Sixteen values from `p` on, those whose mask bit is set (others zero, not read).
    let load = |p: *const f32, mask: u16| -> __m512 {
        // SAFETY: the caller passes a pointer into a panel's row and the mask of its columns
        // there: every lane read is inside `w` (checked above).
        unsafe { _mm512_maskz_loadu_ps(mask, p) }
    };
    let xp = rows.map(<[f32]>::as_ptr);
    // The sums of row i in `s[3i..3i + 3]`, indexed with constants only (the macro below), so
    // that they live in registers.
    let mut s = [_mm512_setzero_ps(); 3 * MR];
    if from_block {
        for (i, sums) in block.iter().enumerate() {
            // SAFETY: each row of `block` holds NR = 48 f32.
            unsafe {
                s[3 * i] = _mm512_loadu_ps(sums.as_ptr());
                s[3 * i + 1] = _mm512_loadu_ps(sums.as_ptr().add(16));
                s[3 * i + 2] = _mm512_loadu_ps(sums.as_ptr().add(32));
            }
        }
    }
    let mut wp = w.as_ptr();
    for r in 0..k {
        // SAFETY: pass `r` reads value `r` of each row of `x` (`k` of them, checked above) and
        // the panel's row `r` (`wp` = `w`'s value `r * stride`, the masks covering `cols`
        // values from there: inside `w`, checked above).
        unsafe {
            // (`wrapping_add`: a last partial panel's later vectors may start past `w`'s end, with
            // masks that read nothing there.)
            let (b1, b2) = (wp.wrapping_add(16), wp.wrapping_add(32));
            let (b0, b1, b2) = (load(wp, masks[0]), load(b1, masks[1]), load(b2, masks[2]));
            macro_rules! row {
                ($($i:literal)*) => {$(
                    let a = _mm512_set1_ps(*xp[$i].add(r));
                    s[3 * $i] = _mm512_fmadd_ps(a, b0, s[3 * $i]);
                    s[3 * $i + 1] = _mm512_fmadd_ps(a, b1, s[3 * $i + 1]);
                    s[3 * $i + 2] = _mm512_fmadd_ps(a, b2, s[3 * $i + 2]);
                )*};
            }
            row!(0 1 2 3 4 5 6 7);
            wp = wp.wrapping_add(stride);
        }
    }
    for (i, out) in block.iter_mut().enumerate() {
        // SAFETY: each row of `block` holds NR = 48 f32.
        unsafe {
            _mm512_storeu_ps(out.as_mut_ptr(), s[3 * i]);
            _mm512_storeu_ps(out.as_mut_ptr().add(16), s[3 * i + 1]);
            _mm512_storeu_ps(out.as_mut_ptr().add(32), s[3 * i + 2]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn chunk_avx2<W: WeightElem>(ops: Operands<'_, W>, cols: (usize, usize)) -> Vec<f32> {
    chunk_with::<W, Fused>(ops, cols)
}

/// Columns `j0..j1` (`[m, j1 - j0]`): streamed for few rows, through a widened copy and gemm for
/// more.
#[inline(always)]
fn chunk_with<W: WeightElem, F: MulAdd>(ops: Operands<'_, W>, (j0, j1): (usize, usize)) -> Vec<f32> {
    let Operands { m, k, n, .. } = ops;
    let width = j1 - j0;
    let mut y = vec![0.0f32; m * width];
    if m > STREAM_ROWS {
        CHUNK.with_borrow_mut(|buf| {
            buf.clear();
            buf.reserve(k * width);
            match ops.layout {
                // `[k, width]`: the chunk's part of each row.
                WeightLayout::InOut => {
                    for r in 0..k {
                        buf.extend(ops.w[r * n + j0..r * n + j1].iter().map(|v| v.widen()));
                    }
                }
                // `[width, k]`: whole rows, one after the other.
                WeightLayout::OutIn => buf.extend(ops.w[j0 * k..j1 * k].iter().map(|v| v.widen())),
            }
            gemm_f32(ops.x, buf, &mut y, (m, k, width), ops.layout);
        });
        return y;
    }
    match m {
        1 => stream::<W, F, 1>(ops, (j0, j1), &mut y),
        2 => stream::<W, F, 2>(ops, (j0, j1), &mut y),
        3 => stream::<W, F, 3>(ops, (j0, j1), &mut y),
        4 => stream::<W, F, 4>(ops, (j0, j1), &mut y),
        5 => stream::<W, F, 5>(ops, (j0, j1), &mut y),
        6 => stream::<W, F, 6>(ops, (j0, j1), &mut y),
        7 => stream::<W, F, 7>(ops, (j0, j1), &mut y),
        _ => stream::<W, F, STREAM_ROWS>(ops, (j0, j1), &mut y),
    }
    y
}

/// `y [m, width] = x [m, k] @ w` on this thread, `w` being `[k, width]` (`InOut`) or `[width, k]`
/// (`OutIn`), row-major.
fn gemm_f32(x: &[f32], w: &[f32], y: &mut [f32], (m, k, width): (usize, usize, usize), layout: WeightLayout) {
    assert!(x.len() == m * k && w.len() == k * width && y.len() == m * width, "gemm_f32: shapes");
    let (w_cs, w_rs) = match layout {
        WeightLayout::InOut => (1, width as isize),
        WeightLayout::OutIn => (k as isize, 1),
    };
    // SAFETY: the lengths are checked above, and every index gemm forms from these sizes and
    // strides (row-major `x`, `y` and `w` as laid out) stays inside its slice.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            width,
            k,
            y.as_mut_ptr(),
            1,
            width as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            w_cs,
            w_rs,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// Every row of `x` (`R` of them) times columns `j0..j1`, into `y` (`[R, j1 - j0]`), reading the
/// chunk's weights once, in order.
#[inline(always)]
fn stream<W: WeightElem, F: MulAdd, const R: usize>(ops: Operands<'_, W>, (j0, j1): (usize, usize), y: &mut [f32]) {
    let Operands { x, w, k, n, .. } = ops;
    let width = j1 - j0;
    let xs: [&[f32]; R] = std::array::from_fn(|i| &x[i * k..(i + 1) * k]);
    match ops.layout {
        WeightLayout::InOut => {
            // Row by row of `w` (this task's rows, `inner`): its run of columns is widened a
            // vector at a time and added, times each row's `x[i][r]`, into the `R` output rows
            // (`R x n` sums: in the L1 cache for one row of a 1536-wide layer, past it for 8,
            // which then go through L2: one cause, not measured apart, of 8 rows being slower
            // than flex).
            let whole = width / 16 * 16;
            let acc: [&mut [f32]; R] = {
                let mut rows = y.chunks_exact_mut(width);
                std::array::from_fn(|_| rows.next().unwrap_or_default())
            };
            for r in ops.inner.0..ops.inner.1 {
                let run = &w[r * n + j0..r * n + j1];
                let mut xr = [0.0f32; R];
                for i in 0..R {
                    xr[i] = xs[i][r];
                }
                for c in (0..whole).step_by(16) {
                    let wv = widen16(&run[c..c + 16]);
                    for i in 0..R {
                        let a = &mut acc[i][c..c + 16];
                        for l in 0..16 {
                            a[l] = F::mul_add(xr[i], wv[l], a[l]);
                        }
                    }
                }
                for c in whole..width {
                    let wc = run[c].widen();
                    for i in 0..R {
                        acc[i][c] = F::mul_add(xr[i], wc, acc[i][c]);
                    }
                }
            }
        }
        WeightLayout::OutIn => {
            // Each output is a dot product of a row of `x` and a row of `w`: 16 partial sums
            // per row of `x` (one vector), added up at the end.
            let whole = k / 16 * 16;
            for j in j0..j1 {
                let row = &w[j * k..(j + 1) * k];
                let mut acc = [[0.0f32; 16]; R];
                for (kk, part) in row[..whole].chunks_exact(16).enumerate() {
                    let wv = widen16(part);
                    for i in 0..R {
                        let xv = &xs[i][kk * 16..kk * 16 + 16];
                        for l in 0..16 {
                            acc[i][l] = F::mul_add(xv[l], wv[l], acc[i][l]);
                        }
                    }
                }
                for (i, a) in acc.iter().enumerate() {
                    let mut sum = a.iter().sum::<f32>();
                    for r in whole..k {
                        sum = F::mul_add(xs[i][r], row[r].widen(), sum);
                    }
                    y[i * width + j - j0] = sum;
                }
            }
        }
    }
}

/// 16 weights as f32 (one AVX-512 vector; a plain loop, which the compiler vectorises where
/// `std::array::from_fn` stays a call).
#[inline(always)]
fn widen16<W: WeightElem>(part: &[W]) -> [f32; 16] {
    let part = &part[..16];
    let mut v = [0.0f32; 16];
    for l in 0..16 {
        v[l] = part[l].widen();
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reproducible value in [-1, 1).
    fn value(seed: usize) -> f32 {
        let h = (seed as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17) ^ 0x5851_F42D_4C95_7F2D;
        (h.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// The product in f64, and for each output the sum of |x w| (the scale of its rounding).
    fn reference(x: &[f32], w: &[f32], (m, k, n): (usize, usize, usize), layout: WeightLayout) -> (Vec<f64>, Vec<f64>) {
        let mut y = vec![0.0; m * n];
        let mut scale = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                for r in 0..k {
                    let wv = match layout {
                        WeightLayout::InOut => w[r * n + j],
                        WeightLayout::OutIn => w[j * k + r],
                    };
                    let p = f64::from(x[i * k + r]) * f64::from(wv);
                    y[i * n + j] += p;
                    scale[i * n + j] += p.abs();
                }
            }
        }
        (y, scale)
    }

    fn check(m: usize, k: usize, n: usize) {
        let x: Vec<f32> = (0..m * k).map(value).collect();
        let w: Vec<f32> = (0..k * n).map(|i| value(i + 1_000_003)).collect();
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let w_widened: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
        for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
            for (name, got, exact) in [
                ("f32", matmul(&x, &w, (m, k, n), layout), &w),
                ("bf16", matmul(&x, &wb, (m, k, n), layout), &w_widened),
            ] {
                let (want, scale) = reference(&x, exact, (m, k, n), layout);
                for (idx, ((g, w), s)) in got.iter().zip(&want).zip(&scale).enumerate() {
                    // f32 sums of k products: within k ulps of the sum of magnitudes.
                    let tol = 1e-6 * (k as f64).max(1.0) * s.max(1e-30);
                    assert!(
                        (f64::from(*g) - w).abs() <= tol,
                        "{name} {layout:?} m {m} k {k} n {n}: y[{idx}] = {g}, want {w} (within {tol:e})"
                    );
                }
            }
        }
    }

    #[test]
    fn matches_f64_reference_on_every_path() {
        // Rows 1 to 8 (the streaming kernel), 9, 33 and 200 (the register kernel where the CPU
        // has AVX-512, gemm otherwise; 200 rows in blocks where the columns give too few tasks); columns in whole and partial blocks of 64 and 16 and single columns; inner
        // sizes below, at and past a vector, and not a multiple of 16.
        for &m in &[1, 2, 3, 4, 5, 6, 7, 8, 9, 33, 200] {
            for &(k, n) in &[(1, 1), (17, 15), (16, 64), (64, 100), (576, 97), (100, 1536)] {
                check(m, k, n);
            }
        }
    }

    /// The register kernel sums each output in order of the inner index, one fused
    /// multiply-add at a time from zero: the same bits as that scalar chain (where the CPU runs
    /// it: AVX-512 F, BW, VL and FMA; says so and checks nothing elsewhere).
    #[test]
    fn register_kernel_sums_each_output_in_order() {
        if !panels(9) {
            eprintln!("this CPU has no AVX-512 (F, BW, VL) with FMA: the register kernel is not checked here");
            return;
        }
        // (200, 40, 100): rows in blocks where the pool has two threads or more; k = 4101:
        // three blocks of the inner index (2048, 2048, 5), the sums carried from one to the next.
        for &(m, k, n) in &[(9, 577, 97), (17, 40, 48), (24, 3, 200), (200, 40, 100), (11, 4101, 50)] {
            let x: Vec<f32> = (0..m * k).map(value).collect();
            let w: Vec<f32> = (0..k * n).map(|i| value(i + 99)).collect();
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
                let at = |r: usize, j: usize| match layout {
                    WeightLayout::InOut => r * n + j,
                    WeightLayout::OutIn => j * k + r,
                };
                for (name, got, exact) in [
                    ("f32", matmul(&x, &w, (m, k, n), layout), w.clone()),
                    ("bf16", matmul(&x, &wb, (m, k, n), layout), wb.iter().map(|v| v.to_f32()).collect()),
                ] {
                    for i in 0..m {
                        for j in 0..n {
                            let want = (0..k).fold(0.0f32, |s, r| x[i * k + r].mul_add(exact[at(r, j)], s));
                            assert_eq!(
                                got[i * n + j].to_bits(),
                                want.to_bits(),
                                "{name} {layout:?} m {m} k {k} n {n}: ({i}, {j})"
                            );
                        }
                    }
                }
            }
        }
    }

    /// The kernel without FMA (x86 CPUs without it), on the streamed and the gemm path.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn separate_multiply_add_matches_the_reference() {
        for &(m, k, n) in &[(1, 37, 29), (3, 64, 100), (9, 17, 40)] {
            let x: Vec<f32> = (0..m * k).map(value).collect();
            let w: Vec<f32> = (0..k * n).map(|i| value(i + 77)).collect();
            for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
                let ops = Operands { x: &x, w: &w, m, k, n, layout, inner: (0, k) };
                let got = chunk_with::<f32, Separate>(ops, (0, n));
                let (want, scale) = reference(&x, &w, (m, k, n), layout);
                for ((g, w), s) in got.iter().zip(&want).zip(&scale) {
                    assert!((f64::from(*g) - w).abs() <= 1e-6 * k as f64 * s, "{layout:?} {m} {k} {n}: {g} != {w}");
                }
            }
        }
    }

    #[test]
    fn empty_shapes_give_zeros() {
        assert_eq!(matmul::<f32>(&[], &[], (0, 3, 0), WeightLayout::InOut), Vec::<f32>::new());
        assert_eq!(matmul::<f32>(&[], &[0.0; 6], (0, 3, 2), WeightLayout::InOut), Vec::<f32>::new());
        assert_eq!(matmul::<f32>(&[], &[], (2, 0, 0), WeightLayout::OutIn), Vec::<f32>::new());
        // k = 0: every output is an empty sum, streamed or through gemm, in both layouts.
        for layout in [WeightLayout::InOut, WeightLayout::OutIn] {
            assert_eq!(matmul::<f32>(&[], &[], (2, 0, 3), layout), vec![0.0; 6]);
            assert_eq!(matmul::<f32>(&[], &[], (12, 0, 3), layout), vec![0.0; 36]);
        }
    }
}
