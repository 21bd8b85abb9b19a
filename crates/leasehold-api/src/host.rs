//! The host facts the API's fields are defined by, read the one way both ends read them: the
//! clock of `safe` instants (CLOCK_MONOTONIC, shared by every process on the host) and a
//! process's start time (`start_time`, field 22 of `/proc/PID/stat`), which tells a pid from
//! a later process that reused it; and the members of a process group, which the agent kills
//! with a dead holder and `run` with its command.

use std::time::Instant;

/// Nanoseconds on CLOCK_MONOTONIC, which every process on the host shares: the clock of an
/// acquire stream's `safe` instants.
pub fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec).unwrap_or(0)
}

/// `at` on CLOCK_MONOTONIC, in nanoseconds.
pub fn monotonic_ns_of(at: Instant) -> u64 {
    let now = Instant::now();
    let base = monotonic_ns();
    if at >= now {
        base.saturating_add(u64::try_from((at - now).as_nanos()).unwrap_or(u64::MAX))
    } else {
        base.saturating_sub(u64::try_from((now - at).as_nanos()).unwrap_or(u64::MAX))
    }
}

/// The instant of this process's clock that is `ns` on CLOCK_MONOTONIC (now, if that has
/// passed).
pub fn instant_of_monotonic(ns: u64) -> Instant {
    let now = monotonic_ns();
    Instant::now() + std::time::Duration::from_nanos(ns.saturating_sub(now))
}

/// The start time of `pid`, from field 22 of `/proc/PID/stat`.
///
/// # Errors
/// The error of reading the file (`NotFound` when there is no such process), or
/// `InvalidData` when it has no start time.
pub fn start_time(pid: u32) -> std::io::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_start_time(&stat).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("/proc/{pid}/stat has no start time"),
        )
    })
}

/// Field 22 of a `/proc/PID/stat` line. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted after its last `)`.
pub fn parse_start_time(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ")" come fields 3, 4, ...; field 22 is the 20th of them.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The fields of a `/proc/PID/stat` line that place a process in its family: its parent, its
/// process group, and whether anything of it still runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Family {
    /// The parent's pid.
    pub ppid: u32,
    /// The process group.
    pub pgrp: u32,
    /// Exited: a zombie (or dead) with no thread left running. A process whose main thread
    /// exited while others run shows as a zombie too, with those threads counted.
    pub exited: bool,
}

/// Fields 3 (state), 4 (ppid), 5 (pgrp) and 20 (threads) of a `/proc/PID/stat` line.
pub fn parse_family(stat: &str) -> Option<Family> {
    let mut f = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    let pgrp = f.next()?.parse().ok()?;
    let threads: u32 = f.nth(14)?.parse().ok()?;
    Some(Family {
        ppid,
        pgrp,
        exited: matches!(state, 'Z' | 'X') && threads <= 1,
    })
}

/// The processes of process group `pgid`, and the children of `parent` when given, that have
/// not exited (zombies do not count), other than the calling process: one pass over `/proc`.
///
/// # Errors
/// When `/proc` cannot be listed (out of descriptors): nothing is known then, and the caller
/// must not take the group for empty.
pub fn group_members(pgid: u32, parent: Option<u32>) -> std::io::Result<Vec<u32>> {
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Some(pid) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        // A process gone meanwhile has no stat: it is not a member any more.
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some(f) = parse_family(&stat)
            && !f.exited
            && (f.pgrp == pgid || parent == Some(f.ppid))
        {
            found.push(pid);
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_start_time_and_the_clock_moves_on() {
        let t = start_time(std::process::id()).unwrap();
        assert!(t > 0);
        assert_eq!(start_time(std::process::id()).unwrap(), t);
        let a = monotonic_ns();
        let later = Instant::now() + std::time::Duration::from_secs(1);
        let b = monotonic_ns_of(later);
        assert!(b >= a + 900_000_000, "{a} {b}");
        let back = instant_of_monotonic(b);
        assert!(back.duration_since(Instant::now()) <= std::time::Duration::from_secs(1));
    }
}
