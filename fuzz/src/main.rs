//! The AFL++ harness binary (`scripts/fuzz.sh` builds it with `cargo afl build` and runs it):
//! `FUSERL_FUZZ_TARGET=NAME` picks the target of `fuserl_fuzz::TARGETS`; AFL++ feeds it inputs in
//! persistent mode. Any allocation that would take the process past 1 GiB aborts, which AFL++
//! reports as a crash. `fuserl-fuzz --list` prints the targets (name, tab, what it parses) and
//! `fuserl-fuzz --seeds TARGET` the seed files of one.
#![allow(clippy::print_stdout, clippy::print_stderr)] // the binary's own lists and messages

use std::alloc::System;

use cap::Cap;

#[global_allocator]
static ALLOCATOR: Cap<System> = Cap::new(System, usize::MAX);

/// Issue #13's bound: no input may take the process past 1 GiB.
const MEMORY_LIMIT: usize = 1 << 30;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["--list"] => {
            for t in fuserl_fuzz::TARGETS {
                println!("{}\t{}", t.name, t.parser);
            }
            return;
        }
        ["--seeds", name] => {
            let Some(target) = fuserl_fuzz::target(name) else { unknown(name) };
            for f in fuserl_fuzz::seed_files(target) {
                println!("{}", f.display());
            }
            return;
        }
        [] => {}
        _ => {
            eprintln!("usage: fuserl-fuzz [--list | --seeds TARGET]; FUSERL_FUZZ_TARGET=TARGET under afl-fuzz");
            std::process::exit(2);
        }
    }
    let name = std::env::var("FUSERL_FUZZ_TARGET").unwrap_or_default();
    let Some(target) = fuserl_fuzz::target(&name) else { unknown(&name) };
    if let Err(e) = ALLOCATOR.set_limit(MEMORY_LIMIT) {
        eprintln!("cannot set the memory limit: {e:?}");
        std::process::exit(2);
    }
    // No abort-on-panic hook: a panic that fuserl catches (fuserl_io::untrusted) is handled;
    // one that escapes a target still aborts the process (afl.rs does so), a crash for AFL++.
    afl::fuzz(false, |data| {
        (target.run)(data);
    });
}

fn unknown(name: &str) -> ! {
    let names: Vec<&str> = fuserl_fuzz::TARGETS.iter().map(|t| t.name).collect();
    eprintln!("{name:?} names no fuzz target; targets: {}", names.join(", "));
    std::process::exit(2);
}
