//! The wrapper's process group: what the command starts must not outlive the leases.
//!
//! The wrapper leads a process group of its own, made before it acquires, so the pid that
//! holds the leases is also the id of the group the command and everything it starts are in.
//! When the wrapper dies, the agent SIGKILLs that group before it ends the leases; when the
//! wrapper kills its command (a lease lost, the safe-until passed), it kills the group too.
//! The wrapper is also a child subreaper: what the command leaves behind when it exits
//! (`sh -c 'writer & exit 0'`) becomes the wrapper's child, and is killed before the release.
//!
//! If the terminal had the wrapper's old group in the foreground (a script, or a pipeline,
//! run from a shell), the terminal is handed to the new group, so the command still reads it
//! and gets its Ctrl-C, and is given back at the end.

use std::time::{Duration, Instant};

use leasehold_api::host::group_members;

use crate::Failure;

/// The controlling terminal taken from the wrapper's old process group.
struct Terminal {
    fd: i32,
    old: libc::pid_t,
}

/// The process group the wrapper leads; gives the terminal back when dropped.
pub(super) struct Group {
    me: libc::pid_t,
    terminal: Option<Terminal>,
    /// Since when the command is stopped by the terminal's Ctrl-Z, and whether the
    /// caller's job has been seen stopped since.
    stopped: std::cell::Cell<Option<(Instant, bool)>>,
}

/// Runs `f` with SIGTTOU blocked: `tcsetpgrp` from a background group stops the caller
/// otherwise.
fn without_sigttou<T>(f: impl FnOnce() -> T) -> T {
    let set = super::sigset(&[libc::SIGTTOU]);
    // SAFETY: a zeroed sigset_t is a valid place for the mask pthread_sigmask writes.
    let mut old = unsafe { std::mem::zeroed::<libc::sigset_t>() };
    // SAFETY: `set` is an initialised signal set and `old` a place for the previous mask.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old) };
    let r = f();
    // SAFETY: `old` is the mask read above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    r
}

impl Group {
    /// Makes the wrapper the leader of a new process group (unless it leads one already: a
    /// shell's job, a service), hands it the terminal if its old group had it, and makes the
    /// wrapper a child subreaper.
    pub(super) fn lead() -> Result<Group, Failure> {
        // SAFETY: getpid, getpgrp, tcgetpgrp, setpgid, tcsetpgrp and prctl take plain
        // values; no memory is involved.
        unsafe {
            let me = libc::getpid();
            let old = libc::getpgrp();
            let mut terminal = None;
            if old != me {
                let tty = [0, 1, 2].into_iter().find(|fd| libc::tcgetpgrp(*fd) == old);
                if libc::setpgid(0, 0) != 0 {
                    return Err(Failure::error(format!(
                        "cannot make a process group for the command: {}",
                        std::io::Error::last_os_error()
                    )));
                }
                if let Some(fd) = tty
                    && without_sigttou(|| libc::tcsetpgrp(fd, me)) == 0
                {
                    terminal = Some(Terminal { fd, old });
                }
            }
            if libc::prctl(
                libc::PR_SET_CHILD_SUBREAPER,
                1 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            ) != 0
            {
                return Err(Failure::error(format!(
                    "cannot become a child subreaper: {}",
                    std::io::Error::last_os_error()
                )));
            }
            Ok(Group {
                me,
                terminal,
                stopped: std::cell::Cell::new(None),
            })
        }
    }

    /// The terminal sent SIGINT (Ctrl-C) to the wrapper's group, which it had taken from the
    /// group that started the wrapper: that group gets it too, as it would have before (a
    /// script running `leasehold run` stops on Ctrl-C as it did).
    pub(super) fn terminal_interrupt(&self) {
        let Some(t) = &self.terminal else {
            return;
        };
        // SAFETY: getppid, getpgid and kill take plain values. The old group is signalled
        // only while the wrapper's parent is still in it, so the id is still that group's.
        unsafe {
            if libc::getpgid(libc::getppid()) == t.old {
                libc::kill(-t.old, libc::SIGINT);
            }
        }
    }

    /// The signals the wrapper takes besides its own: SIGTSTP while it has the caller's
    /// terminal ([`Group::terminal_stop`]); otherwise Ctrl-Z stops it with its command, as
    /// any process in the job.
    pub(super) fn job_signals(&self) -> &'static [i32] {
        if self.terminal.is_some() {
            &[libc::SIGTSTP]
        } else {
            &[]
        }
    }

    /// The terminal sent SIGTSTP (Ctrl-Z) to the wrapper's group, which has the caller's
    /// terminal: the command stopped. The caller's job would have stopped with it, and the
    /// shell taken the terminal back: the terminal goes back to the caller's group, which is
    /// sent SIGTSTP. The wrapper itself does not stop (it would never be continued: the shell
    /// continues the caller's group); it waits for the caller to be continued
    /// ([`Group::resume_if_continued`]).
    pub(super) fn terminal_stop(&self) {
        let Some(t) = &self.terminal else {
            return;
        };
        // SAFETY: tcgetpgrp, tcsetpgrp, getppid, getpgid and kill take plain values.
        unsafe {
            if libc::tcgetpgrp(t.fd) == self.me {
                without_sigttou(|| libc::tcsetpgrp(t.fd, t.old));
            }
            if libc::getpgid(libc::getppid()) == t.old {
                libc::kill(-t.old, libc::SIGTSTP);
            }
        }
        self.stopped.set(Some((Instant::now(), false)));
    }

    /// When to look again whether the caller was continued, while the command is stopped.
    pub(super) fn suspended_wake(&self) -> Option<Instant> {
        self.stopped
            .get()
            .map(|_| Instant::now() + Duration::from_millis(100))
    }

    /// After a Ctrl-Z: once the caller's job runs again (the shell's `fg` or `bg`, seen as the
    /// wrapper's parent no longer stopped), the command is continued too, and given the
    /// terminal again if the caller has it (`fg`).
    pub(super) fn resume_if_continued(&self) {
        let (Some((since, seen)), Some(t)) = (self.stopped.get(), &self.terminal) else {
            return;
        };
        // SAFETY: getppid takes nothing.
        let parent = unsafe { libc::getppid() };
        let state = std::fs::read_to_string(format!("/proc/{parent}/stat"))
            .ok()
            .and_then(|s| {
                s[s.rfind(')')? + 1..]
                    .split_whitespace()
                    .next()
                    .and_then(|w| w.chars().next())
            });
        let parent_stopped = matches!(state, Some('T'));
        if parent_stopped {
            self.stopped.set(Some((since, true)));
            return;
        }
        // A caller that does not stop (it ignores SIGTSTP) is taken as continued at once.
        if !seen && since.elapsed() < Duration::from_millis(500) {
            return;
        }
        self.stopped.set(None);
        // SAFETY: tcgetpgrp, tcsetpgrp and kill take plain values; SIGCONT to the wrapper's
        // own group reaches the wrapper too, which is running: no effect on it.
        unsafe {
            if libc::tcgetpgrp(t.fd) == t.old {
                without_sigttou(|| libc::tcsetpgrp(t.fd, self.me));
            }
            libc::kill(-self.me, libc::SIGCONT);
        }
    }

    /// After the command exited (reaped): whether something it started may still run, that
    /// is, the wrapper has a child. Cheap: one `waitpid` when nothing is left (reaping the
    /// orphans that already exited). A process that is not the wrapper's descendant can be
    /// in its group only by joining it explicitly (`setpgid`); such a process is not looked
    /// for here.
    pub(super) fn has_children() -> bool {
        loop {
            let mut status = 0;
            // SAFETY: waitpid with a valid place for the status.
            match unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) } {
                p if p > 0 => {}
                0 => return true,
                _ => return std::io::Error::last_os_error().raw_os_error() != Some(libc::ECHILD),
            }
        }
    }

    /// SIGKILLs every process of the group but the wrapper, and every child of the wrapper
    /// (what the command left behind, reparented here, even if it left the group), and
    /// reaps them; returns once none runs. The pids killed, in order.
    ///
    /// Call after the command is reaped: this reaps every child.
    pub(super) fn kill_rest(&self) -> Vec<u32> {
        let mut killed: Vec<u32> = Vec::new();
        let started = Instant::now();
        let mut told = false;
        loop {
            let Ok(left) = group_members(self.me as u32, Some(self.me as u32)) else {
                // /proc cannot be listed (out of descriptors): try again shortly.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            };
            if left.is_empty() {
                break;
            }
            for pid in left {
                // SAFETY: kill(2). Each is in the wrapper's group or its child: its pid
                // cannot be reused before it is reaped (by the wrapper, for its children)
                // or while it is in use as a group id.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                if !killed.contains(&pid) {
                    killed.push(pid);
                }
            }
            reap();
            if !told && started.elapsed() > Duration::from_secs(2) {
                told = true;
                note!(
                    "leasehold: processes the command started survive SIGKILL (stuck in the kernel?); the leases stay held until they are gone"
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        reap();
        killed
    }
}

/// Reaps every child of the wrapper that has exited.
fn reap() {
    let mut status = 0;
    // SAFETY: waitpid with a valid place for the status.
    while unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) } > 0 {}
}

impl Drop for Group {
    fn drop(&mut self) {
        let Some(t) = &self.terminal else {
            return;
        };
        // SAFETY: tcgetpgrp and tcsetpgrp take plain values. Given back only if the
        // wrapper's group still has it (nobody took it meanwhile).
        unsafe {
            if libc::tcgetpgrp(t.fd) == self.me {
                without_sigttou(|| libc::tcsetpgrp(t.fd, t.old));
            }
        }
    }
}
