//! What the agent learns about local processes from `/proc`, and pidfds to watch and signal
//! them without ever confusing a reused pid with the process that held a lease.

use std::os::fd::{AsFd, OwnedFd};

use leasehold_api::host::parse_start_time;
use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};

/// Facts about a live process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    /// Its pid.
    pub pid: u32,
    /// Its start time in clock ticks after boot (field 22 of `/proc/PID/stat`).
    pub start_time: u64,
    /// Its user id: the owner of `/proc/PID`, which is the effective uid, or 0 for a process
    /// that made itself non-dumpable; or, read with [`Also::real_uid`] and so owned by root,
    /// its real uid.
    pub uid: u32,
    /// Its command name (`/proc/PID/comm`).
    pub command: String,
    /// Its state letter (field 3 of `/proc/PID/stat`): `Z` for a zombie, `X` for dead.
    pub state: char,
}

impl ProcessInfo {
    /// Whether it has exited (a zombie not yet reaped by its parent, or dead): `/proc` still
    /// describes it, but nothing runs.
    pub fn exited(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }
}

/// Why a process could not be looked at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProcError {
    /// No such process (it exited, or never was).
    #[error("no process with pid {0}")]
    NoProcess(u32),
    /// The pid now belongs to another process than the one meant.
    #[error("pid {pid} is a different process now (started at tick {now}, not {expected})")]
    Reused {
        /// The pid.
        pid: u32,
        /// The start time expected.
        expected: u64,
        /// The start time found.
        now: u64,
    },
    /// The agent is out of file descriptors (`EMFILE`/`ENFILE`): nothing is known about the
    /// process, and it must not be taken for gone.
    #[error("no file descriptor left to look at pid {pid} ({what}); retry later")]
    NoDescriptors {
        /// The pid.
        pid: u32,
        /// The error.
        what: String,
    },
    /// `/proc` said something unexpected.
    #[error("reading /proc/{pid}: {what}")]
    Unreadable {
        /// The pid.
        pid: u32,
        /// What went wrong.
        what: String,
    },
}

/// Whether `errno` says the process or the system is out of file descriptors.
pub fn out_of_fds(errno: Option<i32>) -> bool {
    use rustix::io::Errno;
    errno.is_some_and(|n| n == Errno::MFILE.raw_os_error() || n == Errno::NFILE.raw_os_error())
}

/// The whole of a small `/proc` file open as `fd`, as text: one `read` into a buffer that
/// holds the usual file whole, and the `read` that says it ended (`read_to_string` first
/// asks the file's size, which `/proc` does not know, then reads from 32 bytes up, doubling:
/// six reads and two more system calls for a `stat`).
///
/// Not necessarily UTF-8: a command name is the first 15 bytes of whatever the process
/// was exec'd as (or set itself), which may cut a character in two. Bytes that are not
/// UTF-8 are replaced (U+FFFD), never refused: refusing made a holder so named unreadable,
/// so an agent that restarted could not watch it again (its exit found only by the retry's
/// poll, up to 2 s: SPEC G4) and its own connections could not act for it.
fn read_text(fd: &OwnedFd) -> std::io::Result<String> {
    let mut buf = vec![0u8; 1024];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        match rustix::io::read(fd, &mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    buf.truncate(len);
    Ok(String::from_utf8(buf)
        .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
}

fn read_proc(pid: u32, file: &str) -> Result<String, ProcError> {
    use rustix::fs::{Mode, OFlags, open};
    let path = format!("/proc/{pid}/{file}");
    let text = open(
        path.as_str(),
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(std::io::Error::from)
    .and_then(|fd| read_text(&fd));
    text.map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ProcError::NoProcess(pid),
        _ if out_of_fds(e.raw_os_error()) => ProcError::NoDescriptors {
            pid,
            what: format!("{file}: {e}"),
        },
        _ => ProcError::Unreadable {
            pid,
            what: format!("{file}: {e}"),
        },
    })
}

/// The start time of `pid`, from field 22 of `/proc/PID/stat`.
///
/// # Errors
/// [`ProcError::NoProcess`] when it does not exist.
pub fn start_time(pid: u32) -> Result<u64, ProcError> {
    let stat = read_proc(pid, "stat")?;
    parse_start_time(&stat).ok_or_else(|| ProcError::Unreadable {
        pid,
        what: "stat has no start time".into(),
    })
}

impl ProcessInfo {
    /// Reads the facts of `pid`.
    ///
    /// `/proc/PID` is opened once and everything is read through that descriptor: if the
    /// process exits meanwhile, reads fail instead of describing a process that reused the
    /// pid.
    ///
    /// # Errors
    /// [`ProcError::NoProcess`] when it does not exist.
    pub fn read(pid: u32) -> Result<ProcessInfo, ProcError> {
        Self::read_also(pid, Also::default()).map(|(info, _)| info)
    }

    /// [`ProcessInfo::read`], with a pidfd of the process it describes when it could be
    /// opened (else `pidfd_open`'s error: `EINVAL` or `ENOENT` for a thread that leads no
    /// thread group, `EMFILE` when out of descriptors). The pidfd is opened after
    /// `/proc/PID` and before its `stat` is read through that directory, which fails once
    /// the process it was opened for is gone: a `stat` read means that process held the pid
    /// all along, so the pidfd is of it, not of a process that reused the pid ([`Pidfd::open`]
    /// checks the same with a second read).
    ///
    /// # Errors
    /// As [`ProcessInfo::read`].
    pub fn read_with_pidfd(
        pid: u32,
    ) -> Result<(ProcessInfo, rustix::io::Result<Pidfd>), ProcError> {
        let also = Also {
            pidfd: true,
            real_uid: false,
        };
        Self::read_also(pid, also)
            .map(|(info, fd)| (info, fd.unwrap_or(Err(rustix::io::Errno::INVAL))))
    }

    /// [`ProcessInfo::read`], and what `also` asks besides: a pidfd (as
    /// [`ProcessInfo::read_with_pidfd`]; `None` when not asked), the real uid (see [`Also`]).
    ///
    /// # Errors
    /// As [`ProcessInfo::read`].
    pub fn read_also(
        pid: u32,
        also: Also,
    ) -> Result<(ProcessInfo, Option<rustix::io::Result<Pidfd>>), ProcError> {
        Self::read_in(pid, &open_dir(pid)?, also)
    }

    /// [`ProcessInfo::read_also`] through `dir`, `/proc/PID` opened by [`open_dir`].
    fn read_in(
        pid: u32,
        dir: &OwnedFd,
        also: Also,
    ) -> Result<(ProcessInfo, Option<rustix::io::Result<Pidfd>>), ProcError> {
        use rustix::fs::fstat;
        // Between the directory and the reads through it (see `read_with_pidfd`).
        let opened = also.pidfd.then(|| {
            let p =
                Pid::from_raw(i32::try_from(pid).unwrap_or(0)).ok_or(rustix::io::Errno::SRCH)?;
            pidfd_open(p, PidfdFlags::empty()).map(|fd| Pidfd { fd })
        });
        let text = read_at(pid, dir, "stat")?;
        // The owner of /proc/PID: the process's effective uid, cheap to learn. (Reading
        // `status` for the real uid costs the kernel far more; see `Also::real_uid`.)
        let mut uid = fstat(dir).map_err(|e| gone(pid, e))?.st_uid;
        if uid == 0 && also.real_uid {
            uid = status_uid(pid, dir)?;
        }
        let bad = |what: &str| ProcError::Unreadable {
            pid,
            what: format!("stat has no {what}"),
        };
        let start_time = parse_start_time(&text).ok_or_else(|| bad("start time"))?;
        let command = parse_command(&text).ok_or_else(|| bad("command name"))?;
        let state = parse_state(&text).ok_or_else(|| bad("state"))?;
        Ok((
            ProcessInfo {
                pid,
                start_time,
                uid,
                command,
                state,
            },
            opened,
        ))
    }
}

/// Field 2 of a `/proc/PID/stat` line: the command name, between the first `(` and the last
/// `)`.
fn parse_command(stat: &str) -> Option<String> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    (open < close).then(|| stat[open + 1..close].to_owned())
}

/// Field 3 of a `/proc/PID/stat` line: the state letter, after the command name.
fn parse_state(stat: &str) -> Option<char> {
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

pub use leasehold_api::host::group_members;

/// SIGKILLs every process of process group `pgid` but the calling process. Returns whether the
/// group had any member to signal.
///
/// One `kill(-pgid, SIGKILL)` reaches the whole group at once (a process forking meanwhile is
/// made to fail its fork), unless the caller is in the group itself: then the members `/proc`
/// lists are killed one by one, and a member forked after the listing is left for the next
/// call (callers call again until [`group_alive`] says no; SIGKILLed processes cannot fork,
/// so this ends).
pub fn kill_group(pgid: u32) -> bool {
    let Ok(g) = i32::try_from(pgid) else {
        return false;
    };
    if g <= 1 {
        return false;
    }
    // SAFETY: getpgrp has no preconditions.
    if unsafe { libc::getpgrp() } != g {
        // SAFETY: kill(2) on a process group; no memory is involved.
        return unsafe { libc::kill(-g, libc::SIGKILL) } == 0;
    }
    let members = group_members(pgid, None).unwrap_or_default();
    for pid in &members {
        // SAFETY: kill(2); no memory is involved. A member keeps its pid until it is reaped,
        // and a pid in use as a group id is not given to a new process.
        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
    }
    !members.is_empty()
}

/// Whether process group `pgid` has no member at all, not even a zombie (`kill(-pgid, 0)`
/// finds none): one system call.
pub fn group_gone(pgid: u32) -> bool {
    let Ok(g) = i32::try_from(pgid) else {
        return true;
    };
    // SAFETY: kill(2) with signal 0 only checks; no memory is involved.
    g <= 1 || unsafe { libc::kill(-g, 0) } != 0
}

/// Whether process group `pgid` has a member (other than the caller) that has not exited.
/// Zombies do not count: they write nothing, and one whose parent never reaps it would
/// otherwise keep the group alive for ever.
pub fn group_alive(pgid: u32) -> bool {
    if group_gone(pgid) {
        return false;
    }
    // A group with members: look closer (zombies, or only the caller). When /proc cannot
    // be read, the group counts as alive.
    !group_members(pgid, None).is_ok_and(|m| m.is_empty())
}

/// When `pid` is a thread other than its process's main thread, the process it belongs to
/// (its thread group id). `/proc/TID` answers for such a thread too, but it is no process:
/// a lease held for it could not be watched.
pub fn thread_of(pid: u32) -> Option<u32> {
    let p = Pid::from_raw(i32::try_from(pid).ok()?)?;
    thread_of_opened(pid, pidfd_open(p, PidfdFlags::empty()).map(drop).err())
}

/// [`thread_of`] with the error of a `pidfd_open` of `pid` already made (`None`: it opened).
pub fn thread_of_opened(pid: u32, opened: Option<rustix::io::Errno>) -> Option<u32> {
    // pidfd_open refuses a thread that leads no thread group (EINVAL, or ENOENT on newer
    // kernels): a cheap test that reads nothing for the usual case.
    match opened {
        Some(rustix::io::Errno::INVAL | rustix::io::Errno::NOENT) => read_proc(pid, "status")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("Tgid:"))
            .and_then(|t| t.trim().parse().ok())
            .filter(|t| *t != pid),
        _ => None,
    }
}

/// What [`ProcessInfo::read_also`] reads besides the facts every read has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Also {
    /// Open a pidfd of the process, as [`ProcessInfo::read_with_pidfd`] does.
    pub pidfd: bool,
    /// When `/proc/PID` belongs to root (root's process, or one that made itself
    /// non-dumpable), take [`ProcessInfo::uid`] from the real uid in `status` instead, read
    /// through the same `/proc/PID` directory as the rest (so a process that reused the pid
    /// meanwhile cannot answer for it): whose process it really is, for a caller other than
    /// root. Dearer to read than the rest, so only then.
    pub real_uid: bool,
}

/// `/proc/PID` opened, for reads through it that fail once the process it was opened for is
/// gone (`ENOENT`/`ESRCH`: [`ProcError::NoProcess`]), instead of describing a process that
/// reused the pid.
fn open_dir(pid: u32) -> Result<OwnedFd, ProcError> {
    use rustix::fs::{Mode, OFlags, open};
    if pid == 0 {
        return Err(ProcError::NoProcess(0));
    }
    open(
        format!("/proc/{pid}"),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| gone(pid, e))
}

/// What an error of a read under `/proc/PID` says about process `pid`.
fn gone(pid: u32, e: rustix::io::Errno) -> ProcError {
    match e {
        rustix::io::Errno::NOENT | rustix::io::Errno::SRCH => ProcError::NoProcess(pid),
        e if out_of_fds(Some(e.raw_os_error())) => ProcError::NoDescriptors {
            pid,
            what: e.to_string(),
        },
        e => ProcError::Unreadable {
            pid,
            what: e.to_string(),
        },
    }
}

/// File `name` of the process whose `/proc/PID` is `dir`.
fn read_at(pid: u32, dir: &OwnedFd, name: &str) -> Result<String, ProcError> {
    use rustix::fs::{Mode, OFlags, openat};
    let fd = openat(dir, name, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| gone(pid, e))?;
    read_text(&fd).map_err(|e| {
        gone(
            pid,
            rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::IO),
        )
    })
}

/// The real user id of the process whose `/proc/PID` is `dir`, from its `status`.
fn status_uid(pid: u32, dir: &OwnedFd) -> Result<u32, ProcError> {
    read_at(pid, dir, "status")?
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .ok_or_else(|| ProcError::Unreadable {
            pid,
            what: "status has no Uid line".into(),
        })
}

/// A pidfd for one specific process: signals sent through it can never reach a later
/// process that reuses the pid, and it becomes readable when the process exits.
#[derive(Debug)]
pub struct Pidfd {
    fd: OwnedFd,
}

impl Pidfd {
    /// Opens a pidfd for `pid` and checks it is still the process started at `start_time`.
    ///
    /// # Errors
    /// [`ProcError::NoProcess`] when the process has exited, [`ProcError::Reused`] when the
    /// pid belongs to another process now.
    pub fn open(pid: u32, start_time: u64) -> Result<Pidfd, ProcError> {
        let raw = i32::try_from(pid).map_err(|_| ProcError::NoProcess(pid))?;
        let p = Pid::from_raw(raw).ok_or(ProcError::NoProcess(pid))?;
        let fd = pidfd_open(p, PidfdFlags::empty()).map_err(|e| match e {
            rustix::io::Errno::SRCH => ProcError::NoProcess(pid),
            e if out_of_fds(Some(e.raw_os_error())) => ProcError::NoDescriptors {
                pid,
                what: format!("pidfd_open: {e}"),
            },
            e => ProcError::Unreadable {
                pid,
                what: format!("pidfd_open: {e}"),
            },
        })?;
        // The pidfd now pins the process we found; make sure it is the one we meant. A
        // zombie still has its stat, so an exited process is caught by readiness instead.
        let now = self::start_time(pid)?;
        if now != start_time {
            return Err(ProcError::Reused {
                pid,
                expected: start_time,
                now,
            });
        }
        Ok(Pidfd { fd })
    }

    /// Sends `signal` to the process, if it still runs.
    ///
    /// # Errors
    /// The `errno` of `pidfd_send_signal` (`ESRCH` once the process has exited).
    pub fn signal(&self, signal: Signal) -> std::io::Result<()> {
        pidfd_send_signal(self.fd.as_fd(), signal).map_err(Into::into)
    }

    /// The descriptor, to wait for readability (process exit).
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_is_field_22_even_with_odd_command_names() {
        let stat = "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 50 18446744073709551615";
        assert_eq!(parse_start_time(stat), Some(987_654));
        assert_eq!(parse_start_time("garbage"), None);
        assert_eq!(parse_command(stat).as_deref(), Some("a) b (c)"));
        assert_eq!(parse_state(stat), Some('S'));
    }

    #[test]
    fn reads_this_process() {
        let me = ProcessInfo::read(std::process::id()).unwrap();
        assert_eq!(me.pid, std::process::id());
        assert!(me.start_time > 0);
        assert_eq!(me.uid, rustix::process::geteuid().as_raw());
        assert_eq!(
            status_uid(me.pid, &open_dir(me.pid).unwrap()).unwrap(),
            rustix::process::getuid().as_raw()
        );
        assert!(!me.command.is_empty());
        assert!(Pidfd::open(me.pid, me.start_time).is_ok());
        assert!(matches!(
            Pidfd::open(me.pid, me.start_time + 1),
            Err(ProcError::Reused { .. })
        ));
    }

    /// A process whose command name is not UTF-8 (exec'd under a name whose 15th byte cuts
    /// a character in two) is read, watched and told from a thread like any other. Before,
    /// its `stat` and `status` were refused as not UTF-8: an agent that restarted could not
    /// watch it again (its exit found only by the retry's poll: G4).
    #[test]
    fn a_process_whose_command_name_is_not_utf8_is_read() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let name = std::ffi::OsStr::from_bytes(b"a\xce");
        let exe = dir.path().join(name);
        std::os::unix::fs::symlink("/bin/sleep", &exe).unwrap();
        let mut child = std::process::Command::new(&exe).arg("60").spawn().unwrap();
        let pid = child.id();
        // Until the exec is done, the child's name is the test's.
        let stat_name = |pid: u32| {
            let stat = std::fs::read(format!("/proc/{pid}/stat")).unwrap();
            let open = stat.iter().position(|&b| b == b'(').unwrap();
            let close = stat.iter().rposition(|&b| b == b')').unwrap();
            stat[open + 1..close].to_vec()
        };
        while stat_name(pid) != b"a\xce" {
            std::thread::yield_now();
        }
        let read = ProcessInfo::read(pid);
        let started = start_time(pid);
        let watched = started
            .as_ref()
            .map_err(|_| ())
            .and_then(|&st| Pidfd::open(pid, st).map_err(|_| ()));
        let uid = open_dir(pid).and_then(|dir| status_uid(pid, &dir));
        let thread = thread_of(pid);
        let _ = child.kill();
        let _ = child.wait();
        let info = read.unwrap();
        assert_eq!(info.command, "a\u{fffd}");
        assert_eq!(started.unwrap(), info.start_time);
        assert!(watched.is_ok());
        assert_eq!(uid.unwrap(), rustix::process::getuid().as_raw());
        assert_eq!(thread, None);
    }

    #[test]
    fn a_thread_names_its_process_and_a_zombie_has_exited() {
        let me = std::process::id();
        assert_eq!(thread_of(me), None);
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            tx.send(rustix::thread::gettid().as_raw_nonzero().get() as u32)
                .unwrap();
            let _ = done_rx.recv();
        });
        let tid = rx.recv().unwrap();
        assert_eq!(thread_of(tid), Some(me));
        done_tx.send(()).unwrap();
        t.join().unwrap();

        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Not reaped yet: a zombie once it has exited.
        let zombie = (0..2000).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(5));
            ProcessInfo::read(pid).is_ok_and(|i| i.exited())
        });
        assert!(zombie, "the unreaped child shows as exited");
        child.wait().unwrap();
    }

    #[test]
    fn a_process_group_is_listed_killed_and_gone_and_zombies_do_not_count() {
        use std::os::unix::process::CommandExt;
        let stat = "7 (a b) Z 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 3 0 5 0 0";
        assert_eq!(
            leasehold_api::host::parse_family(stat),
            Some(leasehold_api::host::Family {
                ppid: 1,
                pgrp: 7,
                // A zombie main thread with two threads left: something still runs.
                exited: false
            })
        );
        // A shell leading its own group, with a child in the background.
        let mut leader = std::process::Command::new("sh")
            .args(["-c", "sleep 100 & exec sleep 100"])
            .process_group(0)
            .spawn()
            .unwrap();
        let pgid = leader.id();
        let mut members = Vec::new();
        for _ in 0..2000 {
            members = group_members(pgid, None).unwrap();
            if members.len() == 2 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(members.len(), 2, "{members:?}");
        assert!(members.contains(&pgid));
        assert!(group_alive(pgid) && !group_gone(pgid));
        assert!(kill_group(pgid));
        // The leader, not reaped yet, is a zombie; the background child is reaped by init
        // (or whoever reaps orphans here): the group counts as dead.
        let mut dead = false;
        for _ in 0..2000 {
            if !group_alive(pgid) {
                dead = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(dead, "{:?}", group_members(pgid, None));
        leader.wait().unwrap();
        // No member of a group that is not there; none for this test's own group but itself.
        assert!(!kill_group(u32::MAX));
        // SAFETY: getpgrp has no preconditions.
        let own = unsafe { libc::getpgrp() } as u32;
        assert!(
            !group_members(own, None)
                .unwrap()
                .contains(&std::process::id())
        );
    }

    /// `sleep 60` as `uid`.
    fn sleep_as(uid: u32) -> std::process::Child {
        use std::os::unix::process::CommandExt;
        std::process::Command::new("sleep")
            .arg("60")
            .uid(uid)
            .spawn()
            .unwrap()
    }

    /// `sleep 60` as `uid` with pid `pid` (given by `clone3`, as root), or `None` while
    /// another process has the pid (it would have had to wrap round the pids to take it).
    fn sleep_as_pid(uid: u32, pid: u32) -> Option<leasehold_testkit::ProcessWithPid> {
        match leasehold_testkit::SpawnWithPid::new("sleep")
            .args(["60"])
            .uid(uid)
            .spawn(pid)
        {
            Ok(child) => Some(child),
            Err(leasehold_testkit::PidSpawnError::Taken { .. }) => None,
            Err(e) => panic!("sleep as uid {uid} with pid {pid}: {e}"),
        }
    }

    /// The rights check (G8) learns whose process a pid is from `/proc/PID`, and for a
    /// process whose `/proc/PID` belongs to root (root's, or non-dumpable), from the real uid
    /// in its `status`. That was read by path, after the rest was read through the opened
    /// directory: a process that reused the pid in between would have answered for the one
    /// the request names. Now everything is read through the one directory: once the
    /// process it was opened for is gone, nothing is read.
    #[test]
    fn a_pid_reused_after_its_directory_was_opened_is_not_read_as_the_new_process() {
        assert!(
            rustix::process::geteuid().is_root(),
            "this test needs root (it gives a pid to a new process and spawns as another uid)"
        );
        let also = Also {
            pidfd: false,
            real_uid: true,
        };
        // The pid is free once the first process is reaped: another process could take it
        // only by going round all the pids first; then again with another.
        for _ in 0..100 {
            // Root's process: its /proc/PID belongs to root, so the real uid is read.
            let mut first = sleep_as(0);
            let pid = first.id();
            let dir = open_dir(pid).unwrap();
            let (info, _) = ProcessInfo::read_in(pid, &dir, also).unwrap();
            assert_eq!(info.uid, 0);
            first.kill().unwrap();
            first.wait().unwrap();
            // Another user's process takes the pid.
            let Some(mut second) = sleep_as_pid(65534, pid) else {
                continue;
            };
            // By path, the pid is the new process (so it was reused; its start time may be
            // the same clock tick as the first's)...
            let now = ProcessInfo::read(pid);
            // ... through the directory opened before, it is no process at all.
            let status = status_uid(pid, &dir);
            let read = ProcessInfo::read_in(pid, &dir, also);
            second.kill();
            assert_eq!(now.map(|info| info.uid), Ok(65534));
            assert_eq!(status, Err(ProcError::NoProcess(pid)));
            assert_eq!(read.map(|(info, _)| info), Err(ProcError::NoProcess(pid)));
            return;
        }
        panic!("no pid was given again to a child of this test in 100 tries");
    }

    #[test]
    fn a_dead_process_is_gone() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(matches!(
            ProcessInfo::read(pid),
            Err(ProcError::NoProcess(_))
        ));
    }
}

/// How a process ended, in `waitpid`'s form (`WIFEXITED`, `WEXITSTATUS`, `WTERMSIG`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus(pub i32);

impl ExitStatus {
    /// Whether it called `exit(0)` (or returned 0 from `main`): not killed by a signal.
    pub fn is_zero(self) -> bool {
        self.0 == 0
    }
}

/// `PIDFD_GET_INFO`: `_IOWR(0xFF, 11, struct pidfd_info)` with the 64-byte first version of
/// the struct (Linux 6.13; its exit status since 6.15).
const PIDFD_GET_INFO: libc::c_ulong = 0xC040_FF0B;
/// `PIDFD_INFO_EXIT`: ask for, and learn that the kernel filled in, the exit status.
const PIDFD_INFO_EXIT: u64 = 8;

/// `struct pidfd_info`'s first version, as far as the exit status: the mask, the cgroup id,
/// eleven ids, then `exit_code` at byte 60.
#[repr(C)]
#[derive(Default)]
struct PidfdInfo {
    mask: u64,
    cgroupid: u64,
    ids: [u32; 11],
    exit_code: i32,
}

/// The exit status of the process behind `pidfd`, once its parent has reaped it: `Ok(None)`
/// while it has not been reaped yet. The kernel keeps the status for the pidfd after the
/// process is gone, so a reused pid cannot be confused with it.
///
/// # Errors
/// The `ioctl`'s error: `ENOTTY` or `EINVAL` on a kernel without `PIDFD_GET_INFO` (before
/// Linux 6.13).
pub fn exit_status(pidfd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<Option<ExitStatus>> {
    use std::os::fd::AsRawFd;
    const _: () = assert!(std::mem::size_of::<PidfdInfo>() == 64);
    let mut info = PidfdInfo {
        mask: PIDFD_INFO_EXIT,
        ..PidfdInfo::default()
    };
    // SAFETY: the descriptor is a valid pidfd for the borrow's life; the argument points to
    // a writable `struct pidfd_info` of the 64 bytes the request number encodes.
    let r = unsafe {
        libc::ioctl(
            pidfd.as_raw_fd(),
            PIDFD_GET_INFO,
            std::ptr::from_mut(&mut info),
        )
    };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        // A process that is fully gone can answer ESRCH before 6.15 kept exit states.
        return match e.raw_os_error() {
            Some(libc::ESRCH) => Ok(None),
            _ => Err(e),
        };
    }
    Ok((info.mask & PIDFD_INFO_EXIT != 0).then_some(ExitStatus(info.exit_code)))
}

/// Whether this kernel keeps an exited process's status for its pidfds (`PIDFD_GET_INFO`
/// with `PIDFD_INFO_EXIT`, Linux 6.15), found once by trying it on a child of our own.
/// `LEASEHOLD_EXIT_STATUS_FROM=proc` in the agent's environment says no (the tests use it to
/// run the older kernels' path on this one).
pub fn pidfd_exit_supported() -> bool {
    static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        if std::env::var_os("LEASEHOLD_EXIT_STATUS_FROM").is_some_and(|v| v == "proc") {
            return false;
        }
        let probe = || -> Option<bool> {
            let mut child = std::process::Command::new("true")
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .ok()?;
            // Not reaped yet, so the pid is still this child's.
            let pid = Pid::from_raw(i32::try_from(child.id()).ok()?)?;
            let fd = pidfd_open(pid, PidfdFlags::empty());
            child.wait().ok()?;
            Some(exit_status(fd.ok()?.as_fd()).is_ok_and(|s| s.is_some()))
        };
        probe().unwrap_or(false)
    })
}

/// The kernel's `PROC_USER_INIT_INO`: the initial user namespace.
const INIT_USER_NS: &str = "user:[4026531837]";

/// The exit status of an exited process from field 52 of `/proc/PID/stat`, for kernels
/// without [`exit_status`] (before Linux 6.15). It is there only while the process is a
/// zombie: once its parent reaps it (for QEMU, init: under systemd at once), it is gone, and
/// a non-parent cannot delay the reaping. So this is a race the agent may lose; it reads as
/// soon as the pidfd says the process exited.
///
/// The kernel shows the field as 0 to a reader without ptrace read access to the process:
/// that would look clean. So the status counts only when the agent has that access: the same
/// user and group ids as the process, or `CAP_SYS_PTRACE` in the initial user namespace.
///
/// # Errors
/// Why the status cannot be told: the process was reaped (or the pid reused), is not a
/// zombie, or the agent may not read the field.
pub fn zombie_exit_status(pid: u32, start_time: u64) -> Result<ExitStatus, String> {
    use rustix::fs::{Mode, OFlags, open, openat};
    let dir = open(
        format!("/proc/{pid}"),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("it was reaped before the agent could read its status ({e})"))?;
    // Both files through the one directory: a pid reused meanwhile cannot answer for it.
    let read = |name: &str| -> Result<String, String> {
        let fd = openat(&dir, name, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
            .map_err(|e| format!("it was reaped before the agent could read its status ({e})"))?;
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(fd), &mut text)
            .map_err(|e| format!("it was reaped before the agent could read its status ({e})"))?;
        Ok(text)
    };
    let stat = read("stat")?;
    let status = read("status")?;
    if parse_start_time(&stat) != Some(start_time) {
        return Err("it was reaped before the agent could read its status (pid reused)".into());
    }
    if parse_state(&stat) != Some('Z') {
        return Err(format!(
            "/proc/{pid}/stat says state {:?}, not a zombie",
            parse_state(&stat)
        ));
    }
    if !may_read_exit_code(&status) {
        return Err(
            "the agent may not read its exit code (another user, and no CAP_SYS_PTRACE)".into(),
        );
    }
    parse_exit_code(&stat)
        .map(ExitStatus)
        .ok_or_else(|| format!("/proc/{pid}/stat has no exit code field (Linux before 3.5)"))
}

/// Field 52 of a `/proc/PID/stat` line: the exit code, in `waitpid`'s form.
fn parse_exit_code(stat: &str) -> Option<i32> {
    // After ")" come fields 3, 4, ...; field 52 is the 50th of them.
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(49)?
        .parse()
        .ok()
}

/// Whether the kernel shows this agent a process's exit code (`ptrace_may_access` in read
/// mode), from the process's `/proc/PID/status`: its real, effective and saved ids all equal
/// the agent's, or the agent has `CAP_SYS_PTRACE` in the initial user namespace.
fn may_read_exit_code(status: &str) -> bool {
    let ids = |key: &str| -> Vec<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|l| {
                l.split_whitespace()
                    .take(3)
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let (uids, gids) = (ids("Uid:"), ids("Gid:"));
    let me = (
        rustix::process::geteuid().as_raw(),
        rustix::process::getegid().as_raw(),
    );
    let same = uids.len() == 3
        && gids.len() == 3
        && uids.iter().all(|u| *u == me.0)
        && gids.iter().all(|g| *g == me.1);
    same || has_sys_ptrace()
}

/// Whether the agent has `CAP_SYS_PTRACE` (bit 19 of `CapEff`) in the initial user namespace.
fn has_sys_ptrace() -> bool {
    let in_init_ns =
        std::fs::read_link("/proc/self/ns/user").is_ok_and(|l| l.as_os_str() == INIT_USER_NS);
    let caps = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|h| u64::from_str_radix(h.trim(), 16).ok())
        })
        .unwrap_or(0);
    in_init_ns && caps & (1 << 19) != 0
}

#[cfg(test)]
mod exit_tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::process::Command;

    /// The status of a child that ran `sh -c SCRIPT`, read from its pidfd after reaping.
    fn status_of(script: &str) -> Option<ExitStatus> {
        let mut child = Command::new("sh").args(["-c", script]).spawn().unwrap();
        let pid = child.id();
        let fd = Pidfd::open(pid, start_time(pid).unwrap()).unwrap();
        assert_eq!(exit_status(fd.fd.as_fd()).unwrap(), None, "not reaped yet");
        child.wait().unwrap();
        exit_status(fd.fd.as_fd()).unwrap()
    }

    #[test]
    fn the_exit_status_is_read_from_the_pidfd_after_reaping() {
        // Linux 6.15 keeps the exit status for pidfds; this machine runs a later kernel.
        assert_eq!(status_of("exit 0"), Some(ExitStatus(0)));
        assert_eq!(status_of("exit 3"), Some(ExitStatus(3 << 8)));
        assert_eq!(status_of("kill -9 $$"), Some(ExitStatus(9)));
        assert!(status_of("exit 0").unwrap().is_zero());
        assert!(!status_of("kill -TERM $$").unwrap().is_zero());
    }

    /// The status of a child that ran `sh -c SCRIPT`, read from `/proc` while a zombie.
    fn zombie_status_of(script: &str) -> Result<ExitStatus, String> {
        let mut child = Command::new("sh").args(["-c", script]).spawn().unwrap();
        let pid = child.id();
        let start = start_time(pid).unwrap();
        let fd = Pidfd::open(pid, start).unwrap();
        // Exited (the pidfd is readable), not reaped: a zombie.
        let mut fds = [rustix::event::PollFd::new(
            &fd.fd,
            rustix::event::PollFlags::IN,
        )];
        rustix::event::poll(&mut fds, None).unwrap();
        let got = zombie_exit_status(pid, start);
        child.wait().unwrap();
        assert!(zombie_exit_status(pid, start).is_err(), "reaped: unknown");
        got
    }

    #[test]
    fn the_exit_status_is_read_from_a_zombies_stat_on_older_kernels() {
        assert_eq!(zombie_status_of("exit 0"), Ok(ExitStatus(0)));
        assert_eq!(zombie_status_of("exit 3"), Ok(ExitStatus(3 << 8)));
        assert_eq!(zombie_status_of("kill -9 $$"), Ok(ExitStatus(9)));
        // A live process is no zombie.
        let me = std::process::id();
        assert!(zombie_exit_status(me, start_time(me).unwrap()).is_err());
        // This kernel (6.15 or later here) keeps exit states for pidfds.
        assert!(pidfd_exit_supported());
    }

    #[test]
    fn another_users_exit_code_counts_only_with_cap_sys_ptrace() {
        let mine = format!(
            "Uid:\t{0}\t{0}\t{0}\t{0}\nGid:\t{1}\t{1}\t{1}\t{1}\n",
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw()
        );
        assert!(may_read_exit_code(&mine));
        let other = "Uid:\t64055\t64055\t64055\t64055\nGid:\t108\t108\t108\t108\n";
        assert_eq!(may_read_exit_code(other), has_sys_ptrace());
        assert_eq!(may_read_exit_code(""), has_sys_ptrace());
    }
}
