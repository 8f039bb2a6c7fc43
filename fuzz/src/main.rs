//! The AFL++ harness binary (`scripts/fuzz.sh` builds it with `cargo afl build` and runs it):
//! `FUSERL_FUZZ_TARGET=NAME` picks the target of `fuserl_fuzz::TARGETS`; AFL++ feeds it inputs in
//! persistent mode. Any allocation that would take the process past 1 GiB aborts, which AFL++
//! reports as a crash. `fuserl-fuzz --list` prints the targets (name, tab, what it parses) and
//! `fuserl-fuzz --seeds TARGET` the seed files of one, `fuserl-fuzz --harness` the harness's
//! generation (`fuserl_fuzz::HARNESS`), and `fuserl-fuzz --expand TARGET INPUT DIR` writes into DIR
//! the files a structure-aware target builds from INPUT (to look at a finding).
#![allow(clippy::print_stdout, clippy::print_stderr)] // the binary's own lists and messages

use cap::Cap;
use fuserl_io::budget::BudgetAlloc;

/// The binary's allocator (its budgets stop a chat template that grows past 512 MiB with exit
/// status 2, as `fuserl` does), under the harness's cap.
#[global_allocator]
static ALLOCATOR: Cap<BudgetAlloc> = Cap::new(BudgetAlloc, usize::MAX);

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
        ["--expand", name, input, dir] => {
            let data = std::fs::read(input).unwrap_or_else(|e| fail(&format!("{input}: {e}")));
            let Some(files) = fuserl_fuzz::expand(name, &data) else {
                fail(&format!("{name} is not a structure-aware target"))
            };
            for (file, content) in files {
                let path = std::path::Path::new(dir).join(file);
                std::fs::write(&path, content).unwrap_or_else(|e| fail(&format!("{}: {e}", path.display())));
                println!("{}", path.display());
            }
            return;
        }
        // The checkout the harness was built from (where it finds the fixtures): scripts/fuzz.sh
        // rebuilds a harness built in another checkout of the same target folder.
        ["--root"] => {
            println!("{}", fuserl_fuzz::repo_root().display());
            return;
        }
        ["--harness"] => {
            println!("{}", fuserl_fuzz::HARNESS);
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
            eprintln!(
                "usage: fuserl-fuzz [--list | --seeds TARGET | --harness | --expand TARGET INPUT DIR]; \
                 FUSERL_FUZZ_TARGET=TARGET under afl-fuzz"
            );
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

fn fail(message: &str) -> ! {
    eprintln!("{message}");
    std::process::exit(2);
}

fn unknown(name: &str) -> ! {
    let names: Vec<&str> = fuserl_fuzz::TARGETS.iter().map(|t| t.name).collect();
    eprintln!("{name:?} names no fuzz target; targets: {}", names.join(", "));
    std::process::exit(2);
}
