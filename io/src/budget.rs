//! A memory budget for third-party code that can grow memory without bound from a small input:
//! a chat template is a program (minijinja counts its instructions, not the bytes it makes), and
//! `{% for i in range(40) %}{% set s = s ~ s %}{% endfor %}` asks for a terabyte in 40 steps.
//!
//! [`BudgetAlloc`] is the binary's global allocator (the system allocator, counting): while a
//! thread runs inside [`with_budget`], the bytes it allocates and frees are counted, and when its
//! live bytes grow past the budget the process stops with exit status 2 and the budget's message
//! on standard error (`error: FILE: ...`, printed once). Stopping is the only safe answer at that
//! point (an allocator may not unwind, and the alternative is the operating system killing the
//! process); everything fuserl has collected, scored or trained is already on disk (append-only
//! stores, atomic artifacts), and the same command resumes. Other threads are not counted, and
//! outside [`with_budget`] the allocator is the system's plus one thread-local read. In a program
//! that does not install [`BudgetAlloc`], [`with_budget`] only runs its closure.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;

/// The system allocator with [`with_budget`]'s counting. Install it with
/// `#[global_allocator] static ALLOC: fuserl_io::budget::BudgetAlloc = fuserl_io::budget::BudgetAlloc;`.
#[derive(Debug, Clone, Copy, Default)]
pub struct BudgetAlloc;

thread_local! {
    /// Live bytes allocated by this thread since its budget began (net of what it freed).
    static LIVE: Cell<isize> = const { Cell::new(0) };
    /// This thread's budget; `isize::MAX`: none.
    static LIMIT: Cell<isize> = const { Cell::new(isize::MAX) };
    /// The message printed when the budget is exceeded (borrowed from [`with_budget`]'s caller
    /// for as long as the budget is in force).
    static MESSAGE: Cell<(*const u8, usize)> = const { Cell::new((std::ptr::null(), 0)) };
}

/// Counts `bytes` (negative: freed) against this thread's budget.
fn charge(bytes: isize) {
    // `try_with`: nothing to count while the thread's locals are being destroyed.
    let over = LIVE
        .try_with(|live| {
            let now = live.get().saturating_add(bytes);
            live.set(now);
            now > LIMIT.try_with(Cell::get).unwrap_or(isize::MAX)
        })
        .unwrap_or(false);
    if over {
        stop();
    }
}

/// Prints the budget's message and ends the process with status 2.
#[cold]
fn stop() -> ! {
    // No budget from here on: writing and exiting may allocate, which comes back here.
    let _ = LIMIT.try_with(|l| l.set(isize::MAX));
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
    let _ = err.write_all(b"\n");
    let _ = err.flush();
    std::process::exit(2)
}

// SAFETY: every call is passed to the system allocator unchanged; the counting reads and writes
// this thread's cells only (const-initialised: no allocation, no lazy initialisation).
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for BudgetAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        charge(layout.size() as isize);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        charge(layout.size() as isize);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        charge(-(layout.size() as isize));
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        charge(new_size as isize - layout.size() as isize);
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Runs `f` with this thread's live heap growth bounded by `bytes`; past it the process stops
/// with exit status 2 and `message` (which should name the file at fault: `error: FILE: what`).
/// Budgets nest (the inner one is in force inside it).
pub fn with_budget<T>(bytes: usize, message: &str, f: impl FnOnce() -> T) -> T {
    /// Puts the enclosing budget back, also when `f` unwinds.
    struct Restore((isize, isize, (*const u8, usize)));
    impl Drop for Restore {
        fn drop(&mut self) {
            let (live, limit, message) = self.0;
            let used = LIVE.get();
            LIMIT.set(limit);
            MESSAGE.set(message);
            // What the budgeted code kept (its result) counts against an enclosing budget.
            LIVE.set(live.saturating_add(used));
        }
    }
    let _restore = Restore((LIVE.get(), LIMIT.get(), MESSAGE.get()));
    LIVE.set(0);
    MESSAGE.set((message.as_ptr(), message.len()));
    LIMIT.set(isize::try_from(bytes).unwrap_or(isize::MAX));
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_the_allocator_installed_a_budget_only_runs_its_closure() {
        // The library's tests run on the system allocator: nothing is counted or stopped.
        let v = with_budget(16, "error: test", || vec![0u8; 1 << 20]);
        assert_eq!(v.len(), 1 << 20);
    }
}
