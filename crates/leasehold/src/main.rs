//! `leasehold`: the commands that talk to the agent, linked lean for a fast start; `agent`
//! and `bench` continue in `leasehold-agent` (see the library's documentation).
//!
//! On linux-gnu this binary has no Rust `fn main`: it is a C `main` (`#![no_main]`), so that
//! std's runtime start (`lang_start`) does not run. That start costs ~0.11 ms of a process
//! start on the project's VM (`scripts/alt.py 1000`, 16:38 UTC 2026-12-04: a Rust hello
//! 0.76 ms p50, the same `#![no_main]` 0.65 ms, `/bin/true` 0.63 ms), and `leasehold run --
//! true` is mostly process starts (docs/performance.md, "run"). Of what it does, most is for
//! its stack-overflow report: it reads `/proc/self/maps` (through `pthread_getattr_np`) to
//! find the main thread's stack guard, maps an alternate signal stack and installs SIGSEGV
//! and SIGBUS handlers; and `sched_getaffinity`. Without them a stack overflow here is a
//! plain SIGSEGV, with no "has overflowed its stack" line (`leasehold-agent`, which runs the
//! agent, keeps std's start and that report).
//!
//! What users and scripts see of std's start is kept, by [`start`] and [`main`]:
//! - standard input, output and error closed at start are opened on `/dev/null` (std's
//!   `poll` then `open`), so that no file this process opens (the agent's socket) takes
//!   their numbers: a closed standard output must never become the socket, nor a closed
//!   standard input be missing in `run`'s command (which inherits them);
//! - SIGPIPE ignored, as std sets it: a write to a reader that went away is an error the
//!   commands handle (`leasehold list | head -1` exits 141, quietly), not a kill. `run`'s
//!   child sets it back to the default itself (src/run/spawn.rs), and std's `Command` resets
//!   it in its children too (std does unless a `-Zon-broken-pipe` flag was given, and
//!   without std's start that is never recorded);
//! - the exit status of [`leasehold::main_lean`], through `std::process::exit`, which flushes
//!   std's buffered standard output as std does after `fn main`;
//! - a panic prints its message (std's default hook) and exits 101; it is caught here, never
//!   unwound into the C caller. The message names the thread `<unnamed>` instead of `main`
//!   (std names its main thread at start, and stable Rust has no call to do it afterwards);
//! - `std::env::args_os()`: glibc passes argc, argv and envp to std's `.init_array` hook,
//!   which runs before any `main`.
//!
//! On other targets args may come from std's start alone: there it is a plain `fn main`; and
//! so it is in `cargo test`'s build of this file, whose harness brings its own `main` (a C
//! `main` there ran the command line instead of the harness: `cargo test -p leasehold` failed
//! with leasehold's usage, exit 2).

#![cfg_attr(all(target_os = "linux", target_env = "gnu", not(test)), no_main)]

#[cfg(all(target_os = "linux", target_env = "gnu", not(test)))]
use std::ffi::{c_char, c_int};

/// The C entry point: [`start`], then [`leasehold::main_lean`] with a panic caught (exit 101,
/// as std's `lang_start` does), then `std::process::exit`, which flushes standard output.
#[cfg(all(target_os = "linux", target_env = "gnu", not(test)))]
#[unsafe(no_mangle)]
extern "C" fn main(_argc: c_int, _argv: *const *const c_char) -> c_int {
    // SAFETY: called once, first thing, by the only thread there is.
    unsafe { start() };
    let code = std::panic::catch_unwind(leasehold::main_lean).unwrap_or(101);
    std::process::exit(i32::from(code))
}

/// What std's runtime start does that this program's users can see (the module's list):
/// standard input, output and error opened on `/dev/null` if closed, SIGPIPE ignored.
///
/// # Safety
/// Call once, before any other thread starts and before anything opens a file.
#[cfg(all(target_os = "linux", target_env = "gnu", not(test)))]
unsafe fn start() {
    // SAFETY: plain system calls on the standard descriptors and a signal disposition; no
    // other thread exists (the caller's promise).
    unsafe {
        let mut fds = [0, 1, 2].map(|fd| libc::pollfd {
            fd,
            events: 0,
            revents: 0,
        });
        // One call tells which are closed (POLLNVAL); as std, retry on EINTR, check each with
        // fcntl when poll itself cannot run (RLIMIT_NOFILE below 3, no memory), abort on
        // anything else.
        let closed: [bool; 3] = loop {
            if libc::poll(fds.as_mut_ptr(), 3, 0) != -1 {
                break fds.map(|p| p.revents & libc::POLLNVAL != 0);
            }
            match *libc::__errno_location() {
                libc::EINTR => {}
                libc::EINVAL | libc::EAGAIN | libc::ENOMEM => {
                    break [0, 1, 2].map(|fd| {
                        libc::fcntl(fd, libc::F_GETFD) == -1
                            && *libc::__errno_location() == libc::EBADF
                    });
                }
                _ => libc::abort(),
            }
        };
        for closed in closed {
            // `open` returns the lowest free number: the closed one, in order. Without
            // /dev/null the standard streams cannot be made safe: abort, as std does.
            if closed && libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) == -1 {
                libc::abort();
            }
        }
        if libc::signal(libc::SIGPIPE, libc::SIG_IGN) == libc::SIG_ERR {
            libc::abort();
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu", not(test))))]
fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(leasehold::main_lean())
}
