//! A new process given a chosen pid: `clone3` with `set_tid` (Linux 5.5, root), for tests of
//! a pid that a process which exited is seen to hold again.
//!
//! Setting the namespace's last pid (`/proc/sys/kernel/ns_last_pid`) and spawning is not the
//! same: any process of the machine that starts in between takes the pid, and a long-lived one
//! keeps it from every later try. `set_tid` either gives the pid or fails with `EEXIST` while a
//! process (or a zombie) has it.

use std::ffi::{CString, OsStr, OsString};
use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// What to start with a chosen pid: an absolute program (found on `PATH` otherwise), its
/// arguments and, optionally, its own process group or another uid. The environment is the
/// test process's own.
#[derive(Debug, Clone)]
pub struct SpawnWithPid {
    program: OsString,
    args: Vec<OsString>,
    process_group: bool,
    uid: Option<u32>,
}

/// Why [`SpawnWithPid::spawn`] started nothing.
#[derive(Debug)]
pub enum PidSpawnError {
    /// The pid belongs to a process (or a zombie not reaped yet): `holder` says which, from
    /// its `/proc/PID/comm` and `State`.
    Taken {
        /// The pid asked for.
        pid: u32,
        /// The process that has it, as `/proc` told it just after the refusal.
        holder: String,
    },
    /// The program is not on `PATH`.
    NotFound(OsString),
    /// A step failed: `clone3` (`EPERM` without `CAP_SYS_ADMIN`, `ENOSYS` before Linux 5.5),
    /// or in the child `setpgid`, `setuid` or `execve`.
    Os {
        /// The call that failed.
        step: &'static str,
        /// Its error.
        error: io::Error,
    },
}

impl fmt::Display for PidSpawnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PidSpawnError::Taken { pid, holder } => {
                write!(f, "pid {pid} is in use, by {holder}")
            }
            PidSpawnError::NotFound(p) => write!(f, "{} is not on PATH", p.to_string_lossy()),
            PidSpawnError::Os { step, error } => write!(f, "{step}: {error}"),
        }
    }
}

impl std::error::Error for PidSpawnError {}

/// A child started by [`SpawnWithPid::spawn`]: SIGKILLed (its whole group, if it leads one)
/// and reaped when dropped, unless [`ProcessWithPid::wait`] reaped it before.
#[derive(Debug)]
pub struct ProcessWithPid {
    pid: u32,
    group: bool,
    reaped: bool,
}

impl SpawnWithPid {
    /// `program` (absolute, or looked up on `PATH` by [`SpawnWithPid::spawn`]).
    pub fn new(program: impl AsRef<OsStr>) -> SpawnWithPid {
        SpawnWithPid {
            program: program.as_ref().to_owned(),
            args: Vec::new(),
            process_group: false,
            uid: None,
        }
    }

    /// Adds arguments after the program's name.
    pub fn args<I, S>(mut self, args: I) -> SpawnWithPid
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// The child leads a new process group (its pgid is its pid), set before it runs the
    /// program.
    pub fn process_group(mut self) -> SpawnWithPid {
        self.process_group = true;
        self
    }

    /// The child drops its supplementary groups and runs as `uid` (its gid is left as it is,
    /// as `std::process::Command::uid` does).
    pub fn uid(mut self, uid: u32) -> SpawnWithPid {
        self.uid = Some(uid);
        self
    }

    /// Starts the program with pid `pid` in this pid namespace. On return the child has run
    /// `execve` (a failure in the child before it is this call's error), so its group and uid
    /// are set.
    ///
    /// # Errors
    ///
    /// [`PidSpawnError::Taken`] while a process or a zombie has the pid; otherwise the step
    /// that failed (`clone3` needs `CAP_SYS_ADMIN` in the pid namespace: root).
    pub fn spawn(&self, pid: u32) -> Result<ProcessWithPid, PidSpawnError> {
        let path =
            resolve(&self.program).ok_or_else(|| PidSpawnError::NotFound(self.program.clone()))?;
        // Everything the child uses is made here: between clone3 and execve the child of a
        // multi-threaded process may call only async-signal-safe functions (no allocation).
        let c_path = cstring(path.as_os_str());
        let argv_owned: Vec<CString> = std::iter::once(self.program.as_os_str())
            .chain(self.args.iter().map(OsString::as_os_str))
            .map(cstring)
            .collect();
        let env_owned: Vec<CString> = std::env::vars_os()
            .map(|(k, v)| {
                let mut kv = k;
                kv.push("=");
                kv.push(v);
                cstring(&kv)
            })
            .collect();
        let argv = null_terminated(&argv_owned);
        let envp = null_terminated(&env_owned);
        let target: libc::pid_t = pid as libc::pid_t;
        let args = CloneArgs {
            exit_signal: libc::SIGCHLD as u64,
            set_tid: &target as *const libc::pid_t as u64,
            set_tid_size: 1,
            ..CloneArgs::default()
        };
        // The child reports a failed step on this pipe (the step, then errno); exec closes
        // it, so end of file means the program runs.
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two descriptors into the array it is given.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(os("pipe2"));
        }
        let (read_end, write_end) = (fds[0], fds[1]);
        let group = self.process_group;
        let uid = self.uid;
        // SAFETY: clone3 without CLONE_VM is a fork: the child gets a copy of this address
        // space, so every pointer made above stays valid in it. The child runs only the
        // async-signal-safe calls below (raw syscalls, setpgid, sigprocmask, signal, write,
        // execve, _exit) and never returns from this block.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &args as *const CloneArgs,
                std::mem::size_of::<CloneArgs>(),
            )
        };
        if ret == 0 {
            // SAFETY: see above; in the child, nothing here allocates or takes a lock. The
            // uid is changed by raw syscalls, not glibc's setuid, which would signal the
            // parent's other threads (it changes every thread of a process it thinks has
            // many).
            unsafe {
                let fail = |step: u8| -> ! {
                    let err = *libc::__errno_location();
                    let mut msg = [0u8; 5];
                    msg[0] = step;
                    msg[1..].copy_from_slice(&err.to_ne_bytes());
                    libc::write(write_end, msg.as_ptr().cast(), msg.len());
                    libc::_exit(127)
                };
                if group && libc::setpgid(0, 0) != 0 {
                    fail(1);
                }
                if let Some(uid) = uid {
                    if libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0 {
                        fail(2);
                    }
                    if libc::syscall(libc::SYS_setuid, uid) != 0 {
                        fail(2);
                    }
                }
                // As std's spawn: no blocked signals, SIGPIPE (ignored by Rust programs) back
                // to its default.
                let mut none: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut none);
                libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                libc::execve(c_path.as_ptr(), argv.as_ptr(), envp.as_ptr());
                fail(3)
            }
        }
        // SAFETY: closing the write end this process owns (the child has its own copy).
        unsafe { libc::close(write_end) };
        if ret < 0 {
            let error = io::Error::last_os_error();
            // SAFETY: closing the read end this process owns.
            unsafe { libc::close(read_end) };
            if error.raw_os_error() == Some(libc::EEXIST) {
                return Err(PidSpawnError::Taken {
                    pid,
                    holder: holder(pid),
                });
            }
            return Err(PidSpawnError::Os {
                step: "clone3 with set_tid",
                error,
            });
        }
        let child = ProcessWithPid {
            pid: ret as u32,
            group,
            reaped: false,
        };
        assert_eq!(child.pid, pid, "clone3 gave another pid than set_tid");
        if group {
            // The child sets its group itself too; whichever call comes first makes the
            // group exist before this returns (EACCES once the child has run execve).
            // SAFETY: setpgid takes no pointers.
            unsafe { libc::setpgid(pid as libc::pid_t, pid as libc::pid_t) };
        }
        let mut msg = [0u8; 5];
        let mut got = 0;
        while got < msg.len() {
            // SAFETY: reads into the unfilled rest of `msg`.
            let n =
                unsafe { libc::read(read_end, msg[got..].as_mut_ptr().cast(), msg.len() - got) };
            if n == 0 {
                break;
            }
            if n < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                break;
            }
            got += n as usize;
        }
        // SAFETY: closing the read end this process owns.
        unsafe { libc::close(read_end) };
        if got == 0 {
            return Ok(child);
        }
        let errno = i32::from_ne_bytes([msg[1], msg[2], msg[3], msg[4]]);
        let step = match msg[0] {
            1 => "setpgid in the child",
            2 => "setgroups/setuid in the child",
            _ => "execve in the child",
        };
        // Dropping the child reaps it.
        drop(child);
        Err(PidSpawnError::Os {
            step,
            error: io::Error::from_raw_os_error(errno),
        })
    }
}

impl ProcessWithPid {
    /// The child's pid (the one asked for).
    pub fn id(&self) -> u32 {
        self.pid
    }

    /// SIGKILLs the child (its group if it leads one) and reaps it. Doing it again does
    /// nothing.
    pub fn kill(&mut self) {
        if self.reaped {
            return;
        }
        let target = if self.group {
            -(self.pid as libc::pid_t)
        } else {
            self.pid as libc::pid_t
        };
        // SAFETY: kill takes no pointers; until the child is reaped its pid (and its group's
        // id, which the unreaped leader keeps) is not anyone else's.
        unsafe { libc::kill(target, libc::SIGKILL) };
        self.wait();
    }

    /// Waits for the child to end and reaps it, returning `waitpid`'s status (`None` if it
    /// was reaped before).
    pub fn wait(&mut self) -> Option<i32> {
        if self.reaped {
            return None;
        }
        let mut status = 0;
        loop {
            // SAFETY: waitpid writes the status into the integer it is given.
            let r = unsafe { libc::waitpid(self.pid as libc::pid_t, &mut status, 0) };
            if r == self.pid as libc::pid_t {
                break;
            }
            if r < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            // ECHILD: reaped by someone else (nothing of this crate does).
            break;
        }
        self.reaped = true;
        Some(status)
    }
}

impl Drop for ProcessWithPid {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `struct clone_args` of `<linux/sched.h>` up to `cgroup` (`CLONE_ARGS_SIZE_VER2`, 88 bytes).
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

/// Who has `pid` now, from `/proc/PID/comm` and the `State` line of its `status`.
fn holder(pid: u32) -> String {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let state = status
        .lines()
        .find_map(|l| l.strip_prefix("State:"))
        .map(str::trim)
        .unwrap_or("?");
    match comm {
        Ok(comm) => format!("`{}` (state {state})", comm.trim_end()),
        Err(e) => format!("a process that had exited when /proc/{pid} was read ({e})"),
    }
}

/// `program` itself if it names a path, else the first executable file of that name on
/// `PATH`.
fn resolve(program: &OsStr) -> Option<PathBuf> {
    if program.as_bytes().contains(&b'/') {
        return Some(PathBuf::from(program));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[allow(clippy::expect_used)]
fn cstring(s: &OsStr) -> CString {
    CString::new(s.as_bytes()).expect("no NUL byte in a program, argument or environment")
}

fn null_terminated(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

fn os(step: &'static str) -> PidSpawnError {
    PidSpawnError::Os {
        step,
        error: io::Error::last_os_error(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn clone_args_is_the_kernels_second_version() {
        assert_eq!(std::mem::size_of::<CloneArgs>(), 88);
    }

    fn require_root() {
        assert!(
            rustix::process::geteuid().is_root(),
            "this test needs root (clone3 with set_tid)"
        );
    }

    /// A pid that was a child's and is free again (reaped).
    fn freed_pid() -> u32 {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        pid
    }

    /// The line `key:` of `/proc/PID/status`, trimmed.
    fn status_line(pid: u32, key: &str) -> String {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap()
            .trim()
            .to_owned()
    }

    #[test]
    fn the_child_gets_the_pid_its_own_group_and_the_uid() {
        require_root();
        let pid = freed_pid();
        let mut c = SpawnWithPid::new("sleep")
            .args(["3600"])
            .process_group()
            .uid(65534)
            .spawn(pid)
            .unwrap();
        assert_eq!(c.id(), pid);
        // Set before spawn returned: the child has run execve.
        assert_eq!(
            std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap(),
            "sleep\n"
        );
        // SAFETY: getpgid takes no pointers.
        let pgid = unsafe { libc::getpgid(pid as libc::pid_t) };
        assert_eq!(pgid, pid as libc::pid_t);
        assert!(status_line(pid, "Uid:").starts_with("65534\t65534"));
        assert_eq!(status_line(pid, "Groups:"), "");
        c.kill();
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
    }

    #[test]
    fn a_pid_in_use_is_refused_naming_its_holder() {
        require_root();
        let mut holder = std::process::Command::new("sleep")
            .arg("3600")
            .spawn()
            .unwrap();
        let pid = holder.id();
        let got = SpawnWithPid::new("true").spawn(pid);
        holder.kill().unwrap();
        holder.wait().unwrap();
        let err = got.unwrap_err();
        assert!(
            matches!(&err, PidSpawnError::Taken { pid: p, holder } if *p == pid && holder.contains("`sleep`")),
            "{err}"
        );
    }

    #[test]
    fn a_program_that_cannot_run_is_an_error_and_its_child_is_reaped() {
        require_root();
        let pid = freed_pid();
        let err = SpawnWithPid::new("/nonexistent/program")
            .spawn(pid)
            .unwrap_err();
        assert!(
            matches!(&err, PidSpawnError::Os { step: "execve in the child", error } if error.raw_os_error() == Some(libc::ENOENT)),
            "{err}"
        );
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        assert!(matches!(
            SpawnWithPid::new("no-such-program-here").spawn(pid),
            Err(PidSpawnError::NotFound(_))
        ));
    }
}
