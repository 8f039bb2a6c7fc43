//! [`crate::cpu_bf16`]'s products on AMX tiles (issue #35): Intel's Advanced Matrix Extensions
//! (Sapphire Rapids on) multiply a 16 x 32 bf16 tile by a 32 x 16 one into 16 x 16 f32 sums in one
//! instruction (`tdpbf16ps`), eight times the multiply-adds of AVX512-BF16's `vdpbf16ps` per
//! cycle. This is what PyTorch's bf16 autocast runs on such CPUs.
//!
//! **Experimental, off unless `FUSERL_AMX=1`.** The tiles are taken only where the CPU has
//! AMX-TILE and AMX-BF16, the OS saves their state, and Linux gives this process the tile data
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`); then a product on the tiles is checked against the same
//! product on an emulation of them (below) before any other, and the tiles are left alone if the
//! two differ by more than rounding. The development machines of the last sessions had no AMX:
//! the blocking, the layouts and the edges are tested on the emulation on every CPU, the
//! instructions themselves only where the CPU has them
//! (`amx_tiles_match_the_f64_reference_and_their_emulation`), and the speed is not measured yet
//! (docs/benchmarks.md).
//!
//! Layout: the sums of an output block of 32 rows and [`NR`] (32) columns live in four tiles
//! (`tmm0`-`tmm3`, 2 x 2 tiles of 16 x 16), over the whole inner dimension in chunks of 16
//! pairs (32 bf16 values): two tiles of `a`'s rows (`tmm4`, `tmm5`: 16 rows of 16 pairs each)
//! and two of `b` (`tmm6`, `tmm7`: 16 pairs of 16 columns each), four `tdpbf16ps` a chunk.
//! `b` is packed as for the AVX512-BF16 kernel ([`cpu_bf16::pack`]: a panel's pair `p` is 32
//! columns of 32-bit pairs, which is the tile layout of `b`, 128 bytes a row), its pairs padded
//! with zeros to whole chunks. `a` is read in place where it is bf16 rows in memory with a whole
//! number of chunks (a layer's input, the output gradient); its rows past the last whole 16 are
//! copied into zero-padded rows. Otherwise it is packed into tiles of 16 rows by 16 pairs
//! (1 KiB each, rows 64 bytes apart).

use crate::cpu_bf16::{self, Elem, NR, OutElem, View};
use rayon::prelude::*;

/// Pairs of bf16 in a tile's row (64 bytes).
const KP: usize = 16;

/// Rows of a tile.
const TR: usize = 16;

/// Output rows a block: two tiles of `a`.
const MB: usize = 2 * TR;

/// u32s in a tile.
const TILE: usize = TR * KP;

/// 16 rows of 64 bytes, `stride` bytes apart, from byte `offset` of `bytes` on: a tile's worth of
/// memory, every byte of it inside `bytes` (checked when made).
#[derive(Clone, Copy)]
pub(crate) struct Operand<'a> {
    bytes: &'a [u8],
    offset: usize,
    stride: usize,
}

impl<'a> Operand<'a> {
    /// # Panics
    /// When the tile's last row would end past `bytes`.
    #[inline(always)]
    fn new(bytes: &'a [u8], offset: usize, stride: usize) -> Self {
        let end = (TR - 1).checked_mul(stride).and_then(|s| s.checked_add(offset)).and_then(|s| s.checked_add(64));
        assert!(end.is_some_and(|end| end <= bytes.len()), "cpu_amx: a tile past its operand's memory");
        Self { bytes, offset, stride }
    }

    /// Row `r` as 16 pairs (the first of a pair in the low half: x86 is little-endian).
    fn row(&self, r: usize) -> [u32; KP] {
        let row = &self.bytes[self.offset + r * self.stride..][..64];
        std::array::from_fn(|p| u32::from_le_bytes([row[4 * p], row[4 * p + 1], row[4 * p + 2], row[4 * p + 3]]))
    }
}

/// A tile operand over the chunks: chunk `c`'s tile is `first`'s, `c * step` bytes on, for `c`
/// below `chunks` (the first and the last checked inside the memory when made: the ones between
/// lie between them).
#[derive(Clone, Copy)]
pub(crate) struct Walk<'a> {
    first: Operand<'a>,
    step: usize,
}

impl<'a> Walk<'a> {
    /// # Panics
    /// When the first or the last chunk's tile would end past `bytes` (or `chunks` is 0).
    #[inline(always)]
    fn new(bytes: &'a [u8], offset: usize, stride: usize, step: usize, chunks: usize) -> Self {
        let last =
            step.checked_mul(chunks.checked_sub(1).expect("cpu_amx: no chunks")).and_then(|s| s.checked_add(offset));
        Operand::new(bytes, last.expect("cpu_amx: a tile past its operand's memory"), stride);
        Self { first: Operand::new(bytes, offset, stride), step }
    }

    /// Chunk `c`'s tile.
    fn at(&self, c: usize) -> Operand<'a> {
        Operand::new(self.first.bytes, self.first.offset + c * self.step, self.first.stride)
    }
}

/// What the block loop asks of the tiles: the two implementations are the hardware's (`tmm0`-
/// `tmm7`) and [`Emulated`].
pub(crate) trait Tiles {
    /// `block` (32 x 32, row-major) := the sums over `chunks` chunks of `a[0]` and `a[1]` (16 rows
    /// of 16 pairs each: the block's rows 0-15 and 16-31) times `b[0]` and `b[1]` (16 pairs of 16
    /// columns: its columns 0-15 and 16-31).
    fn block(&mut self, a: [Walk<'_>; 2], b: [Walk<'_>; 2], chunks: usize, block: &mut [[f32; NR]; MB]);
}

/// `tdpbf16ps` as Intel's Software Developer's Manual describes it, on arrays: for each row of
/// the sums, the products of the chunk's pairs summed in two f32 temporaries (the pairs' first
/// values' products in one, the second values' in the other, one fused multiply-add at a time),
/// then the two added, then their sum added to the row's; rounded to nearest, subnormal inputs
/// read as zero and subnormal results flushed to zero.
pub(crate) struct Emulated;

impl Emulated {
    fn dot(sums: &mut [[f32; KP]; TR], a: &[[u32; KP]; TR], b: &[[u32; KP]; TR]) {
        fn daz(x: f32) -> f32 {
            if x.is_subnormal() { 0.0f32.copysign(x) } else { x }
        }
        let unpair = |x: u32| (daz(f32::from_bits(x << 16)), daz(f32::from_bits(x & 0xFFFF_0000)));
        for (row, a_row) in sums.iter_mut().zip(a) {
            let (mut first, mut second) = ([0.0f32; KP], [0.0f32; KP]);
            for (&a_pair, b_row) in a_row.iter().zip(b) {
                let (a_lo, a_hi) = unpair(a_pair);
                for ((f, s), &b_pair) in first.iter_mut().zip(&mut second).zip(b_row) {
                    let (b_lo, b_hi) = unpair(b_pair);
                    *f = daz(a_lo.mul_add(b_lo, *f));
                    *s = daz(a_hi.mul_add(b_hi, *s));
                }
            }
            for ((sum, f), s) in row.iter_mut().zip(first).zip(second) {
                *sum = daz(*sum + daz(f + s));
            }
        }
    }
}

impl Tiles for Emulated {
    fn block(&mut self, a: [Walk<'_>; 2], b: [Walk<'_>; 2], chunks: usize, block: &mut [[f32; NR]; MB]) {
        let load = |t: Operand<'_>| -> [[u32; KP]; TR] { std::array::from_fn(|r| t.row(r)) };
        let mut sums = [[[0.0f32; KP]; TR]; 4];
        for c in 0..chunks {
            let (a0, a1, b0, b1) = (load(a[0].at(c)), load(a[1].at(c)), load(b[0].at(c)), load(b[1].at(c)));
            let [s0, s1, s2, s3] = &mut sums;
            Self::dot(s0, &a0, &b0);
            Self::dot(s1, &a0, &b1);
            Self::dot(s2, &a1, &b0);
            Self::dot(s3, &a1, &b1);
        }
        for (t, tile) in sums.iter().enumerate() {
            let (r0, c0) = ((t / 2) * TR, (t % 2) * KP);
            for (r, row) in tile.iter().enumerate() {
                block[r0 + r][c0..c0 + KP].copy_from_slice(row);
            }
        }
    }
}

/// The hardware's tiles.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod hardware {
    use super::{MB, NR, Tiles, Walk};
    use std::arch::asm;

    /// The tile configuration `ldtilecfg` reads: palette 1, tiles 0-7 of 16 rows of 64 bytes
    /// each (bytes 16-31: each tile's bytes a row, as u16; bytes 48-55: its rows), the rest zero.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    static CONFIG: Config = {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64;
            c[48 + t] = 16;
            t += 1;
        }
        Config(c)
    };

    thread_local! {
        /// Whether a [`Tmm`] of this thread is alive (a second `ldtilecfg` would zero the
        /// first's tiles, its drop release them under the first).
        static LIVE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// The tiles of this thread, configured until dropped (`tilerelease`); one at a time on a
    /// thread, and not sent to another (the raw pointer makes it neither `Send` nor `Sync`).
    pub(crate) struct Tmm(std::marker::PhantomData<*const ()>);

    impl Tmm {
        /// # Safety
        /// The CPU has AMX-TILE and AMX-BF16 and this process may use the tile data
        /// ([`super::available`]).
        ///
        /// # Panics
        /// When this thread has a live `Tmm` already.
        pub(crate) unsafe fn new() -> Self {
            assert!(!LIVE.replace(true), "cpu_amx: the tiles configured twice on one thread");
            // SAFETY: the caller's promise; CONFIG is a valid palette-1 configuration.
            unsafe { asm!("ldtilecfg [{}]", in(reg) &CONFIG, options(nostack, readonly, preserves_flags)) };
            Tmm(std::marker::PhantomData)
        }
    }

    impl Drop for Tmm {
        fn drop(&mut self) {
            // SAFETY: `new` configured the tiles (the instructions exist on this CPU).
            unsafe { asm!("tilerelease", options(nostack, nomem, preserves_flags)) };
            LIVE.set(false);
        }
    }

    impl Tiles for Tmm {
        /// One `asm!` block for the whole block: the sums never leave the tiles between two of
        /// them (the compiler owes nothing to registers it is not told of). The configuration
        /// (`new`) does: the compiler never configures or uses the tiles itself.
        #[inline(always)]
        fn block(&mut self, a: [Walk<'_>; 2], b: [Walk<'_>; 2], chunks: usize, block: &mut [[f32; NR]; MB]) {
            let at = |w: Walk<'_>| w.first.bytes[w.first.offset..].as_ptr();
            assert!(chunks > 0 && b[0].step == b[1].step && b[0].first.stride == NR * 4 && b[1].first.stride == NR * 4);
            // SAFETY: tiles configured (`new`, this thread). Each load reads chunk `c`'s tile of an
            // operand, 16 rows of 64 bytes `stride` apart from its first tile plus `c * step`, for
            // `c < chunks`: inside the operand's bytes (`Walk::new` checked the first and the last
            // chunk's; the others lie between). The stores write the four quarters of `block`
            // (32 rows of NR * 4 = 128 bytes: rows 0-15 or 16-31, bytes 0-63 or 64-127).
            unsafe {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    "2:",
                    "tileloadd tmm4, [{a0} + {sa0}*1]",
                    "tileloadd tmm5, [{a1} + {sa1}*1]",
                    "tileloadd tmm6, [{b0} + {sb}*1]",
                    "tileloadd tmm7, [{b1} + {sb}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    "add {a0}, {da0}",
                    "add {a1}, {da1}",
                    "add {b0}, {db}",
                    "add {b1}, {db}",
                    "dec {n}",
                    "jnz 2b",
                    "tilestored [{c} + {sb}*1], tmm0",
                    "add {c}, 64",
                    "tilestored [{c} + {sb}*1], tmm1",
                    "add {c}, {down}",
                    "tilestored [{c} + {sb}*1], tmm2",
                    "add {c}, 64",
                    "tilestored [{c} + {sb}*1], tmm3",
                    a0 = inout(reg) at(a[0]) => _,
                    a1 = inout(reg) at(a[1]) => _,
                    b0 = inout(reg) at(b[0]) => _,
                    b1 = inout(reg) at(b[1]) => _,
                    sa0 = in(reg) a[0].first.stride,
                    sa1 = in(reg) a[1].first.stride,
                    sb = in(reg) NR * 4,
                    da0 = in(reg) a[0].step,
                    da1 = in(reg) a[1].step,
                    db = in(reg) b[0].step,
                    n = inout(reg) chunks => _,
                    c = inout(reg) block.as_mut_ptr().cast::<u8>() => _,
                    down = in(reg) 16 * NR * 4 - 64,
                    out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
                    out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
                    options(nostack),
                )
            };
        }
    }

    /// `EDX:EAX` of `xgetbv` with `ECX = 0`: the state components the OS saves (XCR0).
    ///
    /// # Safety
    /// The CPU has XSAVE and the OS enabled it (CPUID.1:ECX.OSXSAVE).
    pub(super) unsafe fn xcr0() -> u64 {
        let (lo, hi): (u32, u32);
        // SAFETY: the caller's promise.
        unsafe { asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi, options(nostack, nomem, preserves_flags)) };
        (u64::from(hi) << 32) | u64::from(lo)
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use hardware::Tmm;

/// Whether this CPU has AMX-TILE and AMX-BF16 (and the AVX-512 the rest of [`cpu_bf16`] needs),
/// the OS saves the tiles' state, and Linux let this process use the tile data (asked once, on
/// the first call).
pub fn available() -> bool {
    static READY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *READY.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[allow(unsafe_code)]
fn detect() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    if __cpuid(0).eax < 7 {
        return false;
    }
    let edx = __cpuid_count(7, 0).edx;
    let (tile, bf16) = ((edx >> 24) & 1 == 1, (edx >> 22) & 1 == 1);
    let osxsave = (__cpuid(1).ecx >> 27) & 1 == 1;
    if !(tile && bf16 && osxsave && cpu_bf16::available()) {
        return false;
    }
    // SAFETY: OSXSAVE says `xgetbv` is there and enabled.
    let xcr0 = unsafe { hardware::xcr0() };
    // XTILECFG (bit 17) and XTILEDATA (bit 18).
    if xcr0 & (3 << 17) != 3 << 17 {
        return false;
    }
    // Linux 5.16 on hands the tile data (8 KiB of state a thread) only to a process that asks.
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with this request only changes the process's permitted state components.
    let granted = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) } == 0;
    if !granted && std::env::var("FUSERL_AMX").is_ok_and(|v| v == "1") {
        // ENOSPC: a thread's signal stack is too small for the tile state.
        tracing::warn!(error = %std::io::Error::last_os_error(), "Linux did not give this process the AMX tile data");
    }
    granted
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

/// Whether [`cpu_bf16`]'s products run on the tiles: `FUSERL_AMX=1`, [`available`], and a product
/// on the tiles within rounding of the same product on [`Emulated`] (decided once; says why not in
/// the log when `FUSERL_AMX=1` but the tiles are not used).
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| if std::env::var("FUSERL_AMX").is_ok_and(|v| v == "1") { decide() } else { false })
}

#[cfg(target_arch = "x86_64")]
fn decide() -> bool {
    if !available() {
        tracing::warn!(
            "FUSERL_AMX=1, but this CPU has no AMX-BF16 tiles for this process: bf16 products use AVX512-BF16"
        );
        return false;
    }
    // On a thread of its own, on a pool of its own: the products' rayon work must not run inside
    // this `OnceLock`'s initialisation on a worker of the caller's pool, which could take up
    // another task that asks `enabled` again while it waits (a re-entrant initialisation).
    let checked = std::thread::scope(|scope| {
        scope
            .spawn(|| match rayon::ThreadPoolBuilder::new().num_threads(1).build() {
                Ok(pool) => pool.install(self_check),
                Err(e) => Err(format!("no thread pool for the check: {e}")),
            })
            .join()
            .unwrap_or_else(|_| Err("the check panicked".into()))
    });
    match checked {
        Ok(()) => {
            tracing::info!("bf16 products on AMX tiles (FUSERL_AMX=1; experimental)");
            true
        }
        Err(why) => {
            tracing::warn!(%why, "AMX tiles disagree with their emulation: bf16 products use AVX512-BF16");
            false
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn decide() -> bool {
    tracing::warn!("FUSERL_AMX=1, but AMX is an x86-64 extension: bf16 products use the other kernels");
    false
}

/// A reproducible value in [-1, 1): the self-check's operands, and the tests'.
#[cfg_attr(not(any(test, target_arch = "x86_64")), allow(dead_code))]
pub(crate) fn value(seed: usize) -> f32 {
    let h = (seed as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17) ^ 0x5851_F42D_4C95_7F2D;
    (h.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

/// Two products on the tiles against the emulation: bf16 rows read in place (with a last partial
/// tile of rows) times an f32 `b`, and an f32 `a` with an odd inner size (packed, padded) times
/// a transposed `b`.
#[cfg(target_arch = "x86_64")]
fn self_check() -> Result<(), String> {
    let (m, n) = (40, 40);
    for k in [96, 37] {
        let a: Vec<f32> = (0..m * k).map(value).collect();
        let a16: Vec<half::bf16> = a.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let b: Vec<f32> = (0..k * n).map(|i| value(i + 7919)).collect();
        let b_t = View { data: &b[..], rows: k, cols: n, row_stride: 1, col_stride: k };
        let b_rows = View { data: &b[..], rows: k, cols: n, row_stride: n, col_stride: 1 };
        let (got, want): (Vec<f32>, Vec<f32>) = if k % 2 == 0 {
            let av = View { data: &a16[..], rows: m, cols: k, row_stride: k, col_stride: 1 };
            (product(av, b_rows, hardware_tiles), product(av, b_rows, || Emulated))
        } else {
            let av = View { data: &a[..], rows: m, cols: k, row_stride: k, col_stride: 1 };
            (product(av, b_t, hardware_tiles), product(av, b_t, || Emulated))
        };
        // Sums of at most 96 products of magnitude below 1, in f32: in any order within 96
        // roundings of at most 96, far below 1e-3.
        if let Some((i, (g, w))) = got.iter().zip(&want).enumerate().find(|(_, (g, w))| (*g - *w).abs() > 1e-3) {
            return Err(format!("m {m} k {k} n {n}: output {i} is {g} on the tiles, {w} emulated"));
        }
    }
    Ok(())
}

/// `a [m, k] @ b [k, n]` on the tiles whatever `FUSERL_AMX` says (the `matmul` benchmark's
/// column beside AVX512-BF16's), row-major, in `O`.
///
/// # Panics
/// Where the tiles are not [`available`], when the inner sizes differ, or when a view names
/// values past its data.
#[cfg(target_arch = "x86_64")]
pub fn matmul<A: Elem, B: Elem, O: OutElem>(a: View<'_, A>, b: View<'_, B>) -> Vec<O> {
    assert!(available(), "cpu_amx::matmul: no AMX-BF16 tiles here (check cpu_amx::available first)");
    cpu_bf16::product(a, b, cpu_bf16::Kernel::Amx)
}

/// The hardware's tiles of this thread.
///
/// Only called where [`available`] said yes: [`enabled`]'s self-check and products it enabled.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
pub(crate) fn hardware_tiles() -> Tmm {
    assert!(available(), "cpu_amx: the tiles asked for where the CPU or the OS has none");
    // SAFETY: `available` checked the CPU, the OS and the permission.
    unsafe { Tmm::new() }
}

/// Where `a`'s tiles are.
enum ARows<'a> {
    /// bf16 rows in memory (an even inner size, whole chunks): row `r`'s pairs from byte `r *
    /// stride` of `bytes` on, for the rows in whole tiles (`whole` tiles of them); the rows after
    /// them, to a whole block, in `tail` (zero-padded rows of `pairs` u32s).
    InPlace { bytes: &'a [u8], stride: usize, whole: usize, tail: Vec<u32> },
    /// Packed ([`pack_tiles`]): tile `(t, chunk)` at u32 `(t * chunks + chunk) * TILE`.
    Packed(Vec<u32>),
}

impl ARows<'_> {
    /// Tile `t` of rows (rows `16t..16t + 16`) over the chunks.
    #[inline(always)]
    fn walk(&self, t: usize, chunks: usize) -> Walk<'_> {
        match self {
            Self::InPlace { bytes, stride, whole, tail } => {
                if t < *whole {
                    Walk::new(bytes, t * TR * stride, *stride, 64, chunks)
                } else {
                    let pairs = chunks * KP;
                    Walk::new(bytemuck::cast_slice(tail), (t - whole) * TR * pairs * 4, pairs * 4, 64, chunks)
                }
            }
            Self::Packed(tiles) => Walk::new(bytemuck::cast_slice(tiles), t * chunks * TILE * 4, 64, TILE * 4, chunks),
        }
    }
}

/// `a`'s rows in tiles of 16 rows by [`KP`] pairs, `rows` rows (zeros past `a`'s), `chunks`
/// chunks (zero pairs past `a`'s).
fn pack_tiles<T: Elem>(a: View<'_, T>, rows: usize, chunks: usize) -> Vec<u32> {
    let mut tiles = vec![0u32; rows.div_ceil(TR) * chunks * TILE];
    let pairs = a.cols.div_ceil(2);
    let bits = |v: T| u32::from(v.bf16_bits());
    tiles.par_chunks_mut(chunks * TILE).enumerate().for_each(|(t, out)| {
        let first = t * TR;
        let count = TR.min(a.rows.saturating_sub(first));
        let at = |i: usize, p: usize| (p / KP) * TILE + i * KP + p % KP;
        if a.col_stride == 1 {
            // Rows in memory: along each row.
            for i in 0..count {
                let row = &a.data[(first + i) * a.row_stride..][..a.cols];
                let (whole, last) = row.as_chunks::<2>();
                for (p, [lo, hi]) in whole.iter().enumerate() {
                    out[at(i, p)] = bits(*lo) | (bits(*hi) << 16);
                }
                if let [lo] = last {
                    out[at(i, whole.len())] = bits(*lo);
                }
            }
        } else {
            // Columns in memory (a transposed view), or any strides: the rows of each column in
            // turn (contiguous where the rows are).
            for p in 0..pairs {
                for i in 0..count {
                    let hi = if 2 * p + 1 < a.cols {
                        bits(a.data[(first + i) * a.row_stride + (2 * p + 1) * a.col_stride])
                    } else {
                        0
                    };
                    out[at(i, p)] = bits(a.data[(first + i) * a.row_stride + 2 * p * a.col_stride]) | (hi << 16);
                }
            }
        }
    });
    tiles
}

/// `a [m, k] @ b [k, n]` on the tiles `tiles` makes (one set a task: a thread's), row-major, in
/// `O`. The caller checked the shapes and that the views fit ([`cpu_bf16::matmul`]).
pub(crate) fn product<A: Elem, B: Elem, O: OutElem, T: Tiles>(
    a: View<'_, A>,
    b: View<'_, B>,
    tiles: impl Fn() -> T + Sync,
) -> Vec<O> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let mut out = vec![O::ZERO; m * n];
    if m == 0 || n == 0 || k == 0 {
        return out;
    }
    let chunks = k.div_ceil(2 * KP);
    let pairs = chunks * KP;
    let blocks = m.div_ceil(MB);
    let packed_b = cpu_bf16::pack(b.t(), pairs, NR);
    let in_place = cfg!(target_endian = "little") && a.col_stride == 1 && k == 2 * pairs;
    let a_rows = match A::as_bf16_bits(a.data).filter(|_| in_place) {
        Some(bits) => {
            let whole = m / TR;
            let mut tail = vec![0u32; (blocks * MB - whole * TR) * pairs];
            for (i, row) in tail.chunks_exact_mut(pairs).enumerate().take(m - whole * TR) {
                let r = (whole * TR + i) * a.row_stride;
                for (p, o) in row.iter_mut().enumerate() {
                    *o = u32::from(bits[r + 2 * p]) | (u32::from(bits[r + 2 * p + 1]) << 16);
                }
            }
            // The bytes from the first row to the end of the last whole tile's last row.
            let end = if whole > 0 { (whole * TR - 1) * a.row_stride + k } else { 0 };
            ARows::InPlace { bytes: bytemuck::cast_slice(&bits[..end]), stride: a.row_stride * 2, whole, tail }
        }
        None => ARows::Packed(pack_tiles(a, blocks * MB, chunks)),
    };
    let per_task = blocks.div_ceil(4 * rayon::current_num_threads()).clamp(1, 8);
    let b_bytes: &[u8] = bytemuck::cast_slice(&packed_b);
    out.par_chunks_mut(per_task * MB * n).enumerate().for_each(|(task, rows)| {
        let mut t = tiles();
        let mut block = [[0.0f32; NR]; MB];
        let task_blocks = task * per_task..((task + 1) * per_task).min(blocks);
        for jp in 0..n.div_ceil(NR) {
            let panel = jp * pairs * NR * 4;
            let (j0, width) = (jp * NR, NR.min(n - jp * NR));
            let b_walk = |offset: usize| Walk::new(b_bytes, offset, NR * 4, KP * NR * 4, chunks);
            let b = [b_walk(panel), b_walk(panel + 64)];
            for ib in task_blocks.clone() {
                let a = [a_rows.walk(2 * ib, chunks), a_rows.walk(2 * ib + 1, chunks)];
                t.block(a, b, chunks, &mut block);
                let (r0, height) = ((ib - task_blocks.start) * MB, MB.min(m - ib * MB));
                for (i, sums) in block.iter().take(height).enumerate() {
                    let row = &mut rows[(r0 + i) * n + j0..][..width];
                    for (o, s) in row.iter_mut().zip(sums) {
                        *o = O::from_sum(*s);
                    }
                }
            }
        }
    });
    out
}
