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
//! Everything the child needs is built before the clone: it allocates nothing, takes no
//! lock and calls only async-signal-safe functions, on its own stack, while the wrapper's
//! thread waits (the kernel resumes it once the child has called `exec` or exited).

use std::ffi::{CString, OsString, c_char, c_int, c_void};
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

/// Starts `argv` with the wrapper's environment and `extra` (variables added or replaced),
/// its signal mask `mask`; its pid, or why it could not be run.
pub(super) fn spawn(
    argv: &[OsString],
    extra: &[(&str, &str)],
    mask: libc::sigset_t,
) -> std::io::Result<libc::pid_t> {
    let args: Vec<CString> = argv
        .iter()
        .map(|a| c_string(a.clone()))
        .collect::<Result<_, _>>()?;
    let Some(prog) = args.first() else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "no command",
        ));
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
    // SAFETY: sigfillset initialises `all`; pthread_sigmask is given valid sets. clone gets a
    // function that never returns, the top of a stack it alone uses, and a pointer to `a`,
    // which outlives the child's use of it: with CLONE_VFORK this thread resumes only once
    // the child has called exec or exited.
    let (pid, error) = unsafe {
        let mut all = std::mem::zeroed::<libc::sigset_t>();
        let mut old = std::mem::zeroed::<libc::sigset_t>();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let pid = libc::clone(
            child,
            top.cast::<c_void>(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            std::ptr::addr_of_mut!(a).cast::<c_void>(),
        );
        let error = std::io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        (pid, error)
    };
    drop(stack);
    if pid < 0 {
        return Err(error);
    }
    match a.error.load(Ordering::Relaxed) {
        0 => Ok(pid),
        e => {
            let mut status = 0;
            // SAFETY: `pid` is this process's child, exited (it called _exit before clone
            // returned); waiting reaps it.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            Err(std::io::Error::from_raw_os_error(e))
        }
    }
}
