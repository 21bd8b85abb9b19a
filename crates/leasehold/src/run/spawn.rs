//! Starting `run`'s command: a child that shares the wrapper's memory until it calls `exec`
//! (`clone(CLONE_VM | CLONE_VFORK)`, as `posix_spawn` does), so no page table is copied and
//! no page of the wrapper's is faulted copy-on-write afterwards, in either process
//! (docs/performance.md). `posix_spawn` itself cannot set the parent-death signal; this does,
//! between the clone and the `exec`:
//!
//! - `PR_SET_PDEATHSIG = SIGKILL`: the command dies if the wrapper does; and if the wrapper
//!   died before that took effect, the child exits (status 1) without running anything.
//! - SIGPIPE back to its default (the wrapper ignores it, as every Rust program does), and the
//!   wrapper's signal mask without the signals it takes for itself ([`super::SIGNALS`]).
//! - The command is looked up on `PATH` as `execvp` does (a file without `#!` runs under
//!   `/bin/sh`); when it cannot be run, the `exec`'s error comes back to the wrapper.
//!
//! Given a cgroup (the one the agent made for the wrapper's leases), the child starts in it:
//! `clone3` with `CLONE_INTO_CGROUP` as well (x86-64; [`CGROUP_CLONE`]), so it runs there from
//! its first instruction, and the wrapper need not be moved into it (a move waits for an RCU
//! grace period in the kernel: milliseconds on a busy host). When that clone fails (a seccomp
//! filter without `clone3`, the cgroup not reachable from the wrapper's namespaces,
//! permission), nothing has started: [`Error::Cgroup`] says so, and the wrapper has itself
//! moved instead.
//!
//! Everything the child needs is built before the clone: it allocates nothing, takes no
//! lock and calls only async-signal-safe functions, on its own stack, while the wrapper's
//! thread waits (the kernel resumes it once the child has called `exec` or exited).

use std::ffi::{CString, OsString, c_char, c_int, c_void};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::atomic::{AtomicI32, Ordering};

/// What the child reads, prepared by the wrapper; `error` is what it writes back.
struct ChildArgs {
    prog: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
    /// The mask the command starts with.
    mask: libc::sigset_t,
    /// The wrapper's pid: the child's parent unless the wrapper has died.
    wrapper: libc::pid_t,
    /// The `errno` of the failed `exec` (or `prctl`); 0 when the command runs.
    error: AtomicI32,
}

/// The child, between the clone and the `exec`. Never returns.
extern "C" fn child(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `ChildArgs` the wrapper passed to clone, alive and not touched by
    // the wrapper until this child has called exec or exited (CLONE_VFORK). Every call is
    // async-signal-safe and allocates nothing: this child shares the wrapper's memory.
    unsafe {
        let a = &*arg.cast::<ChildArgs>();
        let fail = |a: &ChildArgs| -> ! {
            a.error.store(*libc::__errno_location(), Ordering::Relaxed);
            libc::_exit(127)
        };
        // The handlers are the wrapper's code: none may run in this child. All signals are
        // blocked here (the wrapper blocked them around the clone) until the mask is set.
        for sig in [libc::SIGSEGV, libc::SIGBUS, libc::SIGPIPE] {
            libc::signal(sig, libc::SIG_DFL);
        }
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        ) != 0
        {
            fail(a);
        }
        // The wrapper may have died before the line above took effect.
        if libc::getppid() != a.wrapper {
            libc::_exit(1);
        }
        libc::sigprocmask(libc::SIG_SETMASK, &a.mask, std::ptr::null_mut());
        libc::execvpe(a.prog, a.argv, a.envp);
        fail(a)
    }
}

fn c_string(s: OsString) -> std::io::Result<CString> {
    CString::new(s.into_vec()).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "an argument has a NUL byte in it",
        )
    })
}

/// Whether this build can start the command in a cgroup ([`spawn`]'s `cgroup`): the
/// `clone3` call is made by a few instructions of assembly, written for x86-64 only.
pub(super) const CGROUP_CLONE: bool = cfg!(target_arch = "x86_64");

/// Why [`spawn`] started nothing.
#[derive(Debug)]
pub(super) enum Error {
    /// The command cannot be run (not found, not executable, ...).
    Run(std::io::Error),
    /// The clone into the cgroup failed: nothing started; without the cgroup it may.
    Cgroup(std::io::Error),
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error::Run(e)
    }
}

/// `struct clone_args` of `linux/sched.h`, as far as `cgroup` (`CLONE_ARGS_SIZE_VER2`).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// `CLONE_INTO_CGROUP` (Linux 5.7), a 64-bit flag of `clone3` only.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `clone3(args)` running `f(arg)` in the child, on the stack `args` gives it; the child's
/// pid in the wrapper, or `-errno`. With `CLONE_VFORK`, returns once the child has called
/// `exec` or exited.
///
/// # Safety
/// `args` must give a stack (its lowest address and size, the top 16-byte aligned) that
/// nothing else uses while the child runs on it, and `f` must never return (it ends in
/// `exec` or `_exit`), with `arg` valid for it.
#[cfg(target_arch = "x86_64")]
unsafe fn clone3(
    args: &mut CloneArgs,
    f: extern "C" fn(*mut c_void) -> c_int,
    arg: *mut c_void,
) -> libc::c_long {
    let ret: libc::c_long;
    // SAFETY: the caller's promises. The parent returns from the syscall with its registers
    // as they were (rcx and r11 clobbered, rax the result). The child returns from it with
    // rax 0 and rsp at the top of its own stack; it calls f(arg) from r13 and r12 (kept
    // across the syscall) with the stack aligned as a call wants, and f never returns (ud2
    // otherwise). As glibc's own clone3 wrapper does.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 => ret,
            in("rdi") std::ptr::from_mut(args),
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") arg,
            in("r13") f,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn clone3(
    _args: &mut CloneArgs,
    _f: extern "C" fn(*mut c_void) -> c_int,
    _arg: *mut c_void,
) -> libc::c_long {
    -libc::c_long::from(libc::ENOSYS)
}

/// Starts `argv` with the wrapper's environment and `extra` (variables added or replaced),
/// its signal mask `mask`, in the cgroup `cgroup` (a descriptor of its directory) if given;
/// its pid, or why it could not be run.
pub(super) fn spawn(
    argv: &[OsString],
    extra: &[(&str, &str)],
    mask: libc::sigset_t,
    cgroup: Option<std::os::fd::BorrowedFd<'_>>,
) -> Result<libc::pid_t, Error> {
    let args: Vec<CString> = argv
        .iter()
        .map(|a| c_string(a.clone()))
        .collect::<Result<_, _>>()?;
    let Some(prog) = args.first() else {
        return Err(Error::Run(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "no command",
        )));
    };
    let mut env: Vec<CString> = Vec::new();
    for (k, v) in std::env::vars_os() {
        if extra
            .iter()
            .all(|(name, _)| k.as_bytes() != name.as_bytes())
        {
            let mut kv = k.into_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            env.push(c_string(OsString::from_vec(kv))?);
        }
    }
    for (name, value) in extra {
        env.push(c_string(format!("{name}={value}").into())?);
    }
    let argv_p: Vec<*const c_char> = args
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let envp: Vec<*const c_char> = env
        .iter()
        .map(|e| e.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect();
    let mut a = ChildArgs {
        prog: prog.as_ptr(),
        argv: argv_p.as_ptr(),
        envp: envp.as_ptr(),
        mask,
        // SAFETY: getpid has no preconditions.
        wrapper: unsafe { libc::getpid() },
        error: AtomicI32::new(0),
    };
    // The child's stack: execvp's own needs (a path buffer, and for a script a copy of the
    // arguments) and room to spare, like glibc's posix_spawn. Never touched by the wrapper.
    let size = 64 * 1024 + (argv.len() + 4) * 8 + 2 * libc::PATH_MAX as usize;
    let mut stack: Vec<u128> = Vec::with_capacity(size / 16 + 1);
    let top = stack.as_mut_ptr().wrapping_add(stack.capacity());
    let mut args3 = CloneArgs {
        flags: (libc::CLONE_VM | libc::CLONE_VFORK) as u64 | CLONE_INTO_CGROUP,
        exit_signal: libc::SIGCHLD as u64,
        stack: stack.as_mut_ptr() as u64,
        stack_size: (stack.capacity() * std::mem::size_of::<u128>()) as u64,
        cgroup: cgroup.map_or(0, |fd| fd.as_raw_fd() as u64),
        ..CloneArgs::default()
    };
    // SAFETY: sigfillset initialises `all`; pthread_sigmask is given valid sets. clone and
    // clone3 get a function that never returns, a stack it alone uses (its top, or its base
    // and size, 16-byte aligned: a Vec of u128), and a pointer to `a`, which outlives the
    // child's use of it: with CLONE_VFORK this thread resumes only once the child has called
    // exec or exited.
    let (pid, error) = unsafe {
        let mut all = std::mem::zeroed::<libc::sigset_t>();
        let mut old = std::mem::zeroed::<libc::sigset_t>();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let arg = std::ptr::addr_of_mut!(a).cast::<c_void>();
        let (pid, error) = if cgroup.is_some() {
            match clone3(&mut args3, child, arg) {
                r if r < 0 => (
                    -1,
                    Some(std::io::Error::from_raw_os_error(
                        i32::try_from(-r).unwrap_or(libc::EINVAL),
                    )),
                ),
                r => (libc::pid_t::try_from(r).unwrap_or(-1), None),
            }
        } else {
            let pid = libc::clone(
                child,
                top.cast::<c_void>(),
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                arg,
            );
            (pid, (pid < 0).then(std::io::Error::last_os_error))
        };
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        (pid, error)
    };
    drop(stack);
    if let Some(error) = error {
        return Err(if cgroup.is_some() {
            Error::Cgroup(error)
        } else {
            Error::Run(error)
        });
    }
    match a.error.load(Ordering::Relaxed) {
        0 => Ok(pid),
        e => {
            let mut status = 0;
            // SAFETY: `pid` is this process's child, exited (it called _exit before clone
            // returned); waiting reaps it.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            Err(Error::Run(std::io::Error::from_raw_os_error(e)))
        }
    }
}
