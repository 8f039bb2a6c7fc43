//! A memory budget for third-party code that can grow memory without bound from a small input:
//! a chat template is a program (minijinja counts its instructions, not the bytes it makes), and
//! `{% for i in range(40) %}{% set s = s ~ s %}{% endfor %}` asks for a terabyte in 40 steps.
//!
//! [`BudgetAlloc`] is the binary's global allocator (the system allocator, counting): while a
//! thread runs inside [`with_budget`], the bytes it allocates and frees are counted, and when its
//! live bytes, or the bytes it allocated in all (the work of a loop that appends to a string,
//! copying all of it at every turn: quadratic time in little memory), grow past the budget's
//! bounds the process stops with exit status 2 and the budget's message
//! on standard error (`error: FILE: ...`, printed once). Stopping is the only safe answer at that
//! point (an allocator may not unwind, and the alternative is the operating system killing the
//! process); everything fuserl has collected, scored or trained is already on disk (append-only
//! stores, atomic artifacts), and the same command resumes. Other threads are not counted, and
//! outside [`with_budget`] the allocator is the system's plus one thread-local read. In a program
//! that does not install [`BudgetAlloc`], [`with_budget`] only runs its closure.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

/// The system allocator with [`with_budget`]'s counting. Install it with
/// `#[global_allocator] static ALLOC: fuserl_io::budget::BudgetAlloc = fuserl_io::budget::BudgetAlloc;`.
#[derive(Debug, Clone, Copy, Default)]
pub struct BudgetAlloc;

thread_local! {
    /// Live bytes allocated by this thread since its budget began (net of what it freed).
    static LIVE: Cell<isize> = const { Cell::new(0) };
    /// Bytes allocated by this thread since its budget began, frees not subtracted (the work
    /// of copying: a string grown by appending is allocated again at every step).
    static TOTAL: Cell<usize> = const { Cell::new(0) };
    /// This thread's budget; `isize::MAX` and `usize::MAX`: none.
    static LIMIT: Cell<(isize, usize)> = const { Cell::new((isize::MAX, usize::MAX)) };
    /// What is printed before the reason when the budget is exceeded (borrowed from
    /// [`with_budget`]'s caller for as long as the budget is in force).
    static MESSAGE: Cell<(*const u8, usize)> = const { Cell::new((std::ptr::null(), 0)) };
}

/// Whether a budget has stopped the process already (another thread may be exiting).
static STOPPING: AtomicBool = AtomicBool::new(false);

/// What a [`with_budget`] bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Live bytes: what the thread allocated and has not freed.
    pub live: usize,
    /// Bytes allocated in all, frees not subtracted: the work of building values by copying (a
    /// loop that appends to a string copies all of it at every turn, quadratic in its length,
    /// with little memory live at any time).
    pub total: usize,
}

/// Counts `live` bytes (negative: freed) and `allocated` bytes in all against this thread's
/// budget; nothing outside a budget.
fn charge(live: isize, allocated: usize) {
    // `try_with`: nothing to count while the thread's locals are being destroyed.
    let Ok((live_limit, total_limit)) = LIMIT.try_with(Cell::get) else { return };
    if live_limit == isize::MAX && total_limit == usize::MAX {
        return;
    }
    let live = LIVE.try_with(|l| {
        // Not below 0: freeing what was allocated before the budget began gives no headroom.
        let now = l.get().saturating_add(live).max(0);
        l.set(now);
        now
    });
    let total = TOTAL.try_with(|total| {
        let now = total.get().saturating_add(allocated);
        total.set(now);
        now
    });
    if live.is_ok_and(|l| l > live_limit) {
        stop("grew past", live_limit as usize, "of live memory (building values without bound)");
    }
    if total.is_ok_and(|t| t > total_limit) {
        stop("allocated more than", total_limit, "in all (building a value by copying it again and again)");
    }
}

/// Prints the budget's message and which bound it passed, and ends the process with status 2.
#[cold]
fn stop(what: &str, limit: usize, why: &str) -> ! {
    // No budget from here on: writing and exiting may allocate, which comes back here.
    let _ = LIMIT.try_with(|l| l.set((isize::MAX, usize::MAX)));
    // One message, when two threads exceed their budgets at once.
    if !STOPPING.swap(true, Ordering::SeqCst) {
        let (ptr, len) = MESSAGE.try_with(Cell::get).unwrap_or((std::ptr::null(), 0));
        let message: &[u8] = if ptr.is_null() {
            b"error: a memory budget was exceeded"
        } else {
            // SAFETY: `with_budget` keeps the message alive while it is in force, and it is in force.
            #[allow(unsafe_code)]
            unsafe {
                std::slice::from_raw_parts(ptr, len)
            }
        };
        let mut err = std::io::stderr().lock();
        let _ = err.write_all(message);
        // (Formatting integers into a locked stderr allocates nothing.)
        let _ = writeln!(err, " {what} {} MiB {why}; stopped", limit >> 20);
        let _ = err.flush();
        std::process::exit(2)
    }
    // Another thread is printing the message and ending the process: wait for it.
    loop {
        std::thread::park();
    }
}

// SAFETY: every call is passed to the system allocator unchanged; the counting reads and writes
// this thread's cells only (const-initialised: no allocation, no lazy initialisation).
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for BudgetAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        charge(layout.size() as isize, layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        charge(layout.size() as isize, layout.size());
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        charge(-(layout.size() as isize), 0);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // A growth counts what it adds to the live bytes and, in all, the whole new block (a
        // realloc may copy it); a shrink gives its bytes back.
        let grown = if new_size > layout.size() { new_size } else { 0 };
        charge(new_size as isize - layout.size() as isize, grown);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Runs `f` with this thread's heap bounded by `budget`; past either bound the process stops
/// with exit status 2, printing `message` (which should name the file at fault and the work:
/// `error: FILE: chat template: rendering`) followed by the bound it passed (` grew past 512 MiB
/// of live memory ...; stopped`). Budgets nest: inside an enclosing budget, the
/// inner one is at most what the outer one has left.
pub fn with_budget<T>(budget: Budget, message: &str, f: impl FnOnce() -> T) -> T {
    /// Puts the enclosing budget back, also when `f` unwinds.
    struct Restore {
        live: isize,
        total: usize,
        limit: (isize, usize),
        message: (*const u8, usize),
    }
    impl Drop for Restore {
        fn drop(&mut self) {
            let (used, allocated) = (LIVE.get(), TOTAL.get());
            LIMIT.set(self.limit);
            MESSAGE.set(self.message);
            // What the budgeted code kept (its result) and what it allocated count against an
            // enclosing budget.
            LIVE.set(self.live.saturating_add(used));
            TOTAL.set(self.total.saturating_add(allocated));
        }
    }
    let restore = Restore { live: LIVE.get(), total: TOTAL.get(), limit: LIMIT.get(), message: MESSAGE.get() };
    let live = isize::try_from(budget.live).unwrap_or(isize::MAX);
    let (outer_live, outer_total) = restore.limit;
    let left_live = if outer_live == isize::MAX { isize::MAX } else { outer_live.saturating_sub(restore.live).max(0) };
    let left_total = if outer_total == usize::MAX { usize::MAX } else { outer_total.saturating_sub(restore.total) };
    LIVE.set(0);
    TOTAL.set(0);
    MESSAGE.set((message.as_ptr(), message.len()));
    LIMIT.set((live.min(left_live), budget.total.min(left_total)));
    let out = f();
    drop(restore);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // The counting allocator under this crate's tests, as in the binary (no test here passes a
    // budget: that would stop the test process).
    #[global_allocator]
    static ALLOC: BudgetAlloc = BudgetAlloc;

    #[test]
    fn an_inner_budget_is_at_most_what_the_outer_one_has_left() {
        let outer = Budget { live: 64 << 20, total: 128 << 20 };
        with_budget(outer, "error: outer", || {
            let kept = vec![1u8; 8 << 20];
            let inner = Budget { live: 512 << 20, total: 1 << 30 };
            let (live, total) = with_budget(inner, "error: inner", || LIMIT.get());
            // 8 MiB of the outer budget in use, live and in all: the rest is the inner's.
            assert!(live <= (56 << 20) && live > (55 << 20), "{live}");
            assert!(total <= (120 << 20) && total > (119 << 20), "{total}");
            // What the inner one allocated counts against the outer one afterwards.
            let before = TOTAL.get();
            let inner_kept = with_budget(inner, "error: inner", || vec![2u8; 4 << 20]);
            assert!(TOTAL.get() >= before + (4 << 20));
            assert_eq!(LIMIT.get(), (64 << 20, 128 << 20));
            drop((kept, inner_kept));
        });
        assert_eq!(LIMIT.get(), (isize::MAX, usize::MAX));
    }

    #[test]
    fn a_budget_counts_nothing_outside_it() {
        let mut v = vec![0u8; 1 << 20];
        v.extend_from_slice(&[1u8; 1 << 20]); // a growth: realloc
        v.truncate(1);
        v.shrink_to_fit(); // a shrink
        assert_eq!((LIVE.get(), TOTAL.get()), (0, 0));
        drop(v);
    }
}
