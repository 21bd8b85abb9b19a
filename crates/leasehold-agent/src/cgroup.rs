//! Containment of a `run` wrapper in a cgroup of its own (cgroup v2).
//!
//! A process group is left by anything that calls `setsid` or `setpgid` (a daemonizing
//! launcher): if the wrapper is SIGKILLed, such a writer would write on while the lease is
//! granted elsewhere. A cgroup cannot be left that way. When a holder asks for it (`run`
//! does, for itself only), the agent makes `<root>/leasehold/<pid>-<start time>` and moves
//! the holder into it before it answers the grant: `run` starts its command only after, so
//! everything the command starts is in the cgroup too. When the holder dies holding a lease,
//! or a fence or force-release kills it, the agent writes `cgroup.kill` and waits until
//! `cgroup.events` says `populated 0` before the leases end; then the cgroup is removed.
//!
//! A root holder that starts its processes itself into a cgroup (`clone3` with
//! `CLONE_INTO_CGROUP`, as `run` does) is not moved: the agent makes the cgroup
//! ([`Cgroups::make`]) and names it in the grant, and everything the holder starts for the
//! leases runs in it from its first instruction. Moving a running process takes the kernel's
//! write lock on thread groups, which waits for an RCU grace period (milliseconds on a busy
//! host); starting one in a cgroup does not. The kernel lets a process start a child in a
//! cgroup when it may write the `cgroup.procs` of the common ancestor of its own cgroup and
//! that one: root may; another user may not (the ancestor is root's), so such a holder is
//! moved as before.
//!
//! The name is the holder's pid and start time, so an agent restarting finds the cgroups of
//! the holders it re-adopts, and of those that died meanwhile, without a record of its own.
//!
//! The root is auto-detected: the agent's own cgroup on the cgroup2 hierarchy (under systemd,
//! the service's, which needs `Delegate=yes`), when the agent is root and can make
//! `leasehold/` there; `--cgroup-root PATH|off` overrides. Where containment is off or
//! cannot be had, a holder is contained by its process group only (today's behaviour).

use std::io::Write;
use std::path::{Path, PathBuf};

use leasehold_core::ProcessKey;

/// `CGROUP2_SUPER_MAGIC` from `linux/magic.h`: what `statfs` says of a cgroup2 file system.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The directory made under the root, holding one cgroup per contained holder.
const DIR: &str = "leasehold";

/// What the configuration asks for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Setting {
    /// The agent's own cgroup, if the agent is root and it is writable; else off.
    #[default]
    Auto,
    /// Never: holders are contained by their process group only.
    Off,
    /// This cgroup2 directory: refused at start if unusable.
    At(PathBuf),
}

impl Setting {
    /// Parses `off`, `auto` or a path (the flag's and the file's value).
    ///
    /// # Errors
    /// A relative path.
    pub fn parse(s: &str) -> Result<Setting, String> {
        match s {
            "off" => Ok(Setting::Off),
            "auto" => Ok(Setting::Auto),
            p if p.starts_with('/') => Ok(Setting::At(PathBuf::from(p))),
            p => Err(format!(
                "{p:?} is not an absolute path, \"auto\" or \"off\" (a cgroup2 directory, e.g. /sys/fs/cgroup/leasehold.slice)"
            )),
        }
    }
}

/// The agent's cgroups: one directory, `<root>/leasehold`, holding one cgroup per holder.
#[derive(Debug)]
pub struct Cgroups {
    base: PathBuf,
    /// Where cgroup2 is mounted: what `/proc/PID/cgroup` paths are relative to.
    mount: Option<PathBuf>,
}

/// Whether `path` is on a cgroup2 file system.
// `f_type`'s type differs between architectures.
#[allow(clippy::unnecessary_cast)]
fn is_cgroup2(path: &Path) -> bool {
    rustix::fs::statfs(path).is_ok_and(|s| s.f_type as i64 == CGROUP2_SUPER_MAGIC)
}

/// Where the cgroup2 hierarchy is mounted (whole, from its root), from `/proc/self/mountinfo`.
fn cgroup2_mount() -> Result<PathBuf, String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
    // "36 35 0:30 / /sys/fs/cgroup rw,... shared:9 - cgroup2 cgroup2 rw"
    info.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mut f = left.split_whitespace();
            let root = f.nth(3)?;
            let point = f.next()?;
            (fstype == "cgroup2" && root == "/").then(|| PathBuf::from(point))
        })
        .ok_or_else(|| "no cgroup2 hierarchy is mounted (a cgroup v1 host)".into())
}

/// The agent's own cgroup on the cgroup2 hierarchy: the mount point of cgroup2 (from
/// `/proc/self/mountinfo`) joined with the `0::` line of `/proc/self/cgroup`.
fn own_cgroup() -> Result<PathBuf, String> {
    let mount = cgroup2_mount()?;
    let me = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("reading /proc/self/cgroup: {e}"))?;
    let own = me
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("/proc/self/cgroup has no cgroup2 line")?;
    Ok(mount.join(own.trim_start_matches('/')))
}

impl Cgroups {
    /// The containment the setting gives: `Ok(None)` when off (or, auto-detected, not to be
    /// had here, with the reason logged).
    ///
    /// # Errors
    /// An explicit root that cannot be used, saying why and what to do.
    pub fn open(setting: &Setting) -> Result<Option<Cgroups>, String> {
        match setting {
            Setting::Off => Ok(None),
            Setting::At(root) => Cgroups::at(root).map(Some).map_err(|e| {
                format!(
                    "cgroup-root {}: {e}; give a writable cgroup2 directory, or `off` to contain `run` commands by their process group only",
                    root.display()
                )
            }),
            Setting::Auto => {
                if !rustix::process::geteuid().is_root() {
                    tracing::info!(
                        "containment of run commands: process group (cgroups need the agent to run as root)"
                    );
                    return Ok(None);
                }
                match own_cgroup().and_then(|root| Cgroups::at(&root)) {
                    Ok(c) => Ok(Some(c)),
                    Err(e) => {
                        tracing::info!(
                            why = %e,
                            "containment of run commands: process group (no usable cgroup2 directory; under systemd the unit needs Delegate=yes; --cgroup-root sets one)"
                        );
                        Ok(None)
                    }
                }
            }
        }
    }

    /// `root/leasehold`, made if missing and checked: on cgroup2, with `cgroup.kill`.
    fn at(root: &Path) -> Result<Cgroups, String> {
        if !is_cgroup2(root) {
            return Err("not a directory on a cgroup2 file system".into());
        }
        let base = root.join(DIR);
        match std::fs::create_dir(&base) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot make {}: {e}", base.display())),
        }
        // A symlink or a plain directory would not be a cgroup.
        if !is_cgroup2(&base) || std::fs::symlink_metadata(&base).is_ok_and(|m| !m.is_dir()) {
            return Err(format!("{} is not a cgroup", base.display()));
        }
        if !base.join("cgroup.kill").exists() {
            return Err("this kernel has no cgroup.kill (Linux 5.14 or later needed)".into());
        }
        let mount = cgroup2_mount().ok().filter(|m| root.starts_with(m));
        Ok(Cgroups { base, mount })
    }

    /// The directory the holders' cgroups are made in.
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// The cgroup of `process` (which may not exist).
    pub fn path_of(&self, process: &ProcessKey) -> PathBuf {
        self.base
            .join(format!("{}-{}", process.pid, process.start_time))
    }

    /// Makes the cgroup of `process` and moves it in. The process must be the one that asks
    /// (the caller checks): it waits for the answer, so it is alive and is this very process
    /// unless it was killed meanwhile; its start time is checked again after the move.
    ///
    /// Returns the cgroup it was in, to put it back ([`Cgroups::put_back`]) when it is
    /// granted nothing after all.
    ///
    /// # Errors
    /// Why it could not be contained (the caller then answers "group").
    pub fn contain(&self, process: &ProcessKey) -> Result<Option<PathBuf>, String> {
        let from = self.mount.as_ref().and_then(|m| {
            let own = std::fs::read_to_string(format!("/proc/{}/cgroup", process.pid)).ok()?;
            let rel = own.lines().find_map(|l| l.strip_prefix("0::"))?;
            Some(m.join(rel.trim_start_matches('/')))
        });
        let dir = self.path_of(process);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("making {}: {e}", dir.display())),
        }
        let moved = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("cgroup.procs"))
            .and_then(|mut f| f.write_all(process.pid.to_string().as_bytes()));
        if let Err(e) = moved {
            let _ = std::fs::remove_dir(&dir);
            return Err(format!(
                "moving pid {} into {}: {e}",
                process.pid,
                dir.display()
            ));
        }
        if crate::procfs::start_time(process.pid).ok() != Some(process.start_time) {
            return Err(format!(
                "pid {} exited while it was being contained",
                process.pid
            ));
        }
        Ok(from.filter(|f| *f != dir))
    }

    /// Makes the cgroup of `process` (if it is not there yet) without moving anything in:
    /// for a holder that starts its processes in it itself (`clone3` with
    /// `CLONE_INTO_CGROUP`). No process is migrated, so nothing waits for the kernel's
    /// write lock on thread groups (and the RCU grace period it takes).
    ///
    /// # Errors
    /// Why it could not be made (the caller then moves the holder, or answers "group").
    pub fn make(&self, process: &ProcessKey) -> Result<PathBuf, String> {
        let dir = self.path_of(process);
        match std::fs::create_dir(&dir) {
            Ok(()) => Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(dir),
            Err(e) => Err(format!("making {}: {e}", dir.display())),
        }
    }

    /// Moves `process` back to the cgroup `from` it was in before [`Cgroups::contain`] (it
    /// was granted nothing), and removes its own.
    pub fn put_back(&self, process: &ProcessKey, from: &Path) {
        if crate::procfs::start_time(process.pid).ok() == Some(process.start_time) {
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .open(from.join("cgroup.procs"))
                .and_then(|mut f| f.write_all(process.pid.to_string().as_bytes()));
        }
        self.remove(process);
    }

    /// Whether `process` is in its cgroup now (its `cgroup.procs` lists it).
    pub fn is_in(&self, process: &ProcessKey) -> bool {
        let pid = process.pid.to_string();
        std::fs::read_to_string(self.path_of(process).join("cgroup.procs"))
            .is_ok_and(|s| s.lines().any(|l| l.trim() == pid))
    }

    /// Whether the cgroup of `process` exists.
    pub fn exists(&self, process: &ProcessKey) -> bool {
        self.path_of(process).is_dir()
    }

    /// Whether a process (not a zombie) is in the cgroup of `process`; `None` when it does
    /// not exist or cannot be read.
    pub fn populated(&self, process: &ProcessKey) -> Option<bool> {
        populated(&self.path_of(process))
    }

    /// SIGKILLs every process in the cgroup of `process` (`cgroup.kill`). Returns whether
    /// the cgroup was there to kill.
    pub fn kill(&self, process: &ProcessKey) -> bool {
        kill(&self.path_of(process))
    }

    /// Removes the cgroup of `process` if it is empty. Returns whether it is gone.
    pub fn remove(&self, process: &ProcessKey) -> bool {
        match std::fs::remove_dir(self.path_of(process)) {
            Ok(()) => true,
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        }
    }

    /// At the agent's start: removes the empty cgroups named for processes that no longer
    /// run. Returns those that are not empty: something their holder started still runs in
    /// them. The agent kills those of the dead holders it had leases for (as it ends their
    /// leases); the others held nothing here at their death and are left alone.
    pub fn sweep(&self) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(&self.base) else {
            return Vec::new();
        };
        let mut left = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name();
            let Some((pid, start)) = name.to_str().and_then(|n| n.split_once('-')) else {
                continue;
            };
            let (Ok(pid), Ok(start_time)) = (pid.parse::<u32>(), start.parse::<u64>()) else {
                continue;
            };
            if crate::procfs::start_time(pid).ok() == Some(start_time) {
                continue; // its holder runs: re-adopted, or another agent's
            }
            let path = e.path();
            if populated(&path) == Some(false) {
                let _ = std::fs::remove_dir(&path);
            } else {
                left.push(path);
            }
        }
        left
    }
}

/// `populated` of the cgroup at `dir`, from its `cgroup.events`.
fn populated(dir: &Path) -> Option<bool> {
    let events = std::fs::read_to_string(dir.join("cgroup.events")).ok()?;
    events
        .lines()
        .find_map(|l| l.strip_prefix("populated "))
        .map(|v| v.trim() != "0")
}

/// Writes `1` to `cgroup.kill` of the cgroup at `dir`.
fn kill(dir: &Path) -> bool {
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("cgroup.kill"))
        .and_then(|mut f| f.write_all(b"1"))
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(pid: u32) -> ProcessKey {
        ProcessKey {
            host: leasehold_core::HostId::new("node1").unwrap(),
            pid,
            start_time: crate::procfs::start_time(pid).unwrap(),
        }
    }

    /// The cgroups of the agents here (root, cgroup2 with cgroup.kill, as in CI): a test
    /// that cannot run fails, saying why.
    fn cgroups() -> Cgroups {
        assert!(
            rustix::process::geteuid().is_root(),
            "this test needs root (it makes cgroups)"
        );
        Cgroups::open(&Setting::Auto)
            .unwrap()
            .expect("no usable cgroup2 hierarchy here (cgroup2 with cgroup.kill, Linux 5.14)")
    }

    #[test]
    fn a_contained_process_is_put_back_where_it_was_when_granted_nothing() {
        let c = cgroups();
        let mut child = std::process::Command::new("sleep")
            .arg("100")
            .spawn()
            .unwrap();
        let p = key(child.id());
        let before = std::fs::read_to_string(format!("/proc/{}/cgroup", p.pid)).unwrap();
        let from = c.contain(&p).unwrap();
        let inside = std::fs::read_to_string(format!("/proc/{}/cgroup", p.pid)).unwrap();
        assert!(
            inside.contains(&format!("/leasehold/{}-", p.pid)),
            "{inside}"
        );
        assert_eq!(c.populated(&p), Some(true));
        assert!(c.is_in(&p));
        c.put_back(&p, &from.unwrap());
        assert!(!c.is_in(&p));
        let after = std::fs::read_to_string(format!("/proc/{}/cgroup", p.pid)).unwrap();
        assert_eq!(after, before);
        assert!(!c.exists(&p));
        // Contained again, then killed whole: the cgroup empties.
        c.contain(&p).unwrap();
        assert!(c.kill(&p));
        child.wait().unwrap();
        assert_eq!(c.populated(&p), Some(false));
        assert!(c.remove(&p) && !c.exists(&p));
    }

    #[test]
    fn the_sweep_removes_the_empty_cgroups_of_gone_processes_only() {
        let c = cgroups();
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let gone_key = key(gone.id());
        gone.wait().unwrap();
        let me = key(std::process::id());
        std::fs::create_dir(c.path_of(&gone_key)).unwrap();
        std::fs::create_dir(c.path_of(&me)).unwrap();
        let left = c.sweep();
        assert!(
            !c.exists(&gone_key),
            "the empty cgroup of a gone process stays"
        );
        assert!(c.exists(&me), "the cgroup of a live process was removed");
        assert!(!left.contains(&c.path_of(&me)));
        assert!(c.remove(&me));
    }
}
