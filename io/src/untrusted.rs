//! Third-party parsers that can panic on malformed input. The fuzz targets (issue #13,
//! docs/reliability.md) found such files for the `parquet` and `tokenizers` crates: a bug on their
//! side, which fuserl must not turn into a crash. Their calls go through [`catch_panic`], so that
//! such a file gets an error naming it; the binary's panic hook stays quiet for a panic caught
//! there ([`catching_panic`]), so the error is printed once.

use std::cell::Cell;
use std::panic::AssertUnwindSafe;

thread_local! {
    static CATCHING: Cell<bool> = const { Cell::new(false) };
}

/// Run `f` (a call into a third-party parser); a panic inside becomes `Err` with its message.
pub fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    let outer = CATCHING.replace(true);
    let out = std::panic::catch_unwind(AssertUnwindSafe(f));
    CATCHING.set(outer);
    out.map_err(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".to_owned());
        format!("the parser failed on this file ({message})")
    })
}

/// Whether this thread is inside [`catch_panic`], for a panic hook that should not print what
/// will come back as an error.
pub fn catching_panic() -> bool {
    CATCHING.get()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_error_and_the_flag_follows_the_call() {
        assert!(!catching_panic());
        assert_eq!(catch_panic(catching_panic), Ok(true));
        let err = catch_panic(|| -> u32 { panic!("column start and length should not be negative") });
        assert_eq!(err, Err("the parser failed on this file (column start and length should not be negative)".into()));
        assert!(!catching_panic());
    }
}
