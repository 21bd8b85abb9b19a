//! Ends the leases of a process as soon as it exits (SPEC G4), and signals holders through
//! pidfds so that a reused pid is never hit.
//!
//! Every process holding a lease on this host is watched by one pidfd. When the pidfd becomes
//! readable the process has exited, and the watcher asks the store to end all its leases
//! (`process-died`: exclusive resources become dirty unless released first).
//!
//! The pidfds are in one epoll set of the watcher's own ([`Exits`]), which the runtime polls:
//! watching a holder is one `epoll_ctl` into that set, done before its grant is answered, and
//! one task, started with the first watch, hands each exit to a task of its own. (A task per
//! holder, spawned as its grant was answered, woke the runtime's other worker before each
//! answer.)

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

use leasehold_api::v1::{BeforeFence, Containment};
use leasehold_core::ProcessKey;
use leasehold_store::{Store, StoreError};
use rustix::process::Signal;
use tokio::io::unix::AsyncFd;
use tracing::{error, info, warn};

use std::os::fd::{AsFd, OwnedFd};

use crate::procfs::{ExitStatus, Pidfd, ProcError};

/// How long a store operation that failed retryably waits before it is tried again the
/// first time ([`retrying`]); the wait doubles up to [`RETRY_MAX`].
pub(crate) const RETRY_FIRST: std::time::Duration = std::time::Duration::from_millis(200);

/// The longest wait between two tries of [`retrying`].
pub(crate) const RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs `op` until it succeeds or fails with an error that is not
/// [`StoreError::is_retryable`] (the store unavailable, its storage failing, no space, the
/// session lost), and returns that outcome: [`RETRY_FIRST`] after the first retryable
/// failure, twice that after the next, up to [`RETRY_MAX`], telling `on_retry` each one.
/// Ending an exited holder's leases, and undoing a grant never read, must happen once the
/// store answers again, however long that takes.
pub(crate) async fn retrying<T, F, Fut>(
    mut op: F,
    mut on_retry: impl FnMut(&StoreError),
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut delay = RETRY_FIRST;
    loop {
        match op().await {
            Err(e) if e.is_retryable() => {
                on_retry(&e);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RETRY_MAX);
            }
            r => return r,
        }
    }
}

struct Watched {
    pidfd: Arc<OwnedFd>,
    /// Its exit's task, once it exited.
    task: Option<tokio::task::AbortHandle>,
}

/// The epoll set holding every watched holder's pidfd (`EPOLLIN | EPOLLONESHOT`, keyed by a
/// number of [`Exits::keys`]), itself registered with the runtime's reactor, and the task
/// that waits on it ([`Watcher::follow_exits`]). Made with the first watch.
#[derive(Default)]
struct Exits {
    set: Option<Arc<AsyncFd<OwnedFd>>>,
    task: Option<tokio::task::AbortHandle>,
    /// The holder of each key in the set, with its pidfd, until it exits.
    keys: HashMap<u64, (ProcessKey, Arc<OwnedFd>)>,
    next: u64,
}

/// A process made ready to watch before its lease is committed ([`Watcher::prepare`]).
pub struct Prepared {
    process: ProcessKey,
    /// None when it was watched already.
    pidfd: Option<Pidfd>,
}

/// A cgroup being made for a holder that starts its processes in it
/// ([`Watcher::start_making`]): told as soon as the `mkdir` returns (the removals the same
/// blocking thread goes on with are not waited for).
pub struct Making(tokio::sync::oneshot::Receiver<Option<Result<std::path::PathBuf, String>>>);

/// A move into a cgroup under way ([`Watcher::start_containing`]): how the process is
/// contained, and the cgroup it was in.
pub struct Containing(tokio::task::JoinHandle<(Containment, Option<std::path::PathBuf>)>);

/// Watches lease-holding processes of this host.
pub struct Watcher<S> {
    store: Arc<S>,
    watched: Mutex<HashMap<ProcessKey, Watched>>,
    /// Processes killed by a fence: their leases end as fenced, not as "process died".
    fenced: Mutex<HashSet<ProcessKey>>,
    /// Holders not watched yet because the agent ran out of file descriptors.
    pending: Mutex<HashSet<ProcessKey>>,
    /// Holders whose exit status decides how their leases end (`on_exit = status`).
    by_status: Mutex<HashSet<ProcessKey>>,
    /// What holders asked to be done to them before a fence (libvirt's `<on_lockfailure>`).
    before_fence: Mutex<HashMap<ProcessKey, BeforeFence>>,
    /// Holders SIGSTOPped by [`Watcher::warn_holders`], to SIGCONT if the session recovers.
    paused: Mutex<HashSet<ProcessKey>>,
    /// Exited holders whose leases wait for the rest of their process group to die
    /// ([`Watcher::kill_group_of`]): something of them may still run.
    draining: Mutex<HashSet<ProcessKey>>,
    /// Descriptors kept in reserve, given up to reach a holder that is not watched when it
    /// must be fenced while the agent is out of descriptors.
    reserve: Mutex<Vec<std::fs::File>>,
    /// Holders' cgroups, when containment by cgroup is on ([`crate::cgroup`]).
    cgroups: std::sync::OnceLock<crate::cgroup::Cgroups>,
    /// Draining holders whose cgroup or group SIGKILL has not emptied in [`STUCK_AFTER`].
    stuck: Mutex<HashMap<ProcessKey, Stuck>>,
    /// The cgroups of holders whose leases ended, to remove ([`Watcher::remove_cgroup`]).
    removals: Arc<Mutex<Removals>>,
    /// The watched pidfds' epoll set.
    exits: Mutex<Exits>,
}

/// Cgroups to remove, and whether a removal is due on a timer.
#[derive(Default)]
struct Removals {
    dirs: Vec<std::path::PathBuf>,
    timed: bool,
}

/// A dead holder whose cgroup or process group SIGKILL has not emptied yet: its leases stay
/// held ([`Watcher::stuck`]).
#[derive(Debug, Clone)]
pub struct Stuck {
    /// The dead holder's pid.
    pub pid: u32,
    /// Its cgroup, when that is what cannot be emptied.
    pub cgroup: Option<std::path::PathBuf>,
    /// The process group it led, when that is what is left.
    pub process_group: Option<u32>,
    /// When the agent began to kill what is left.
    pub since: std::time::Instant,
}

/// What a dead holder left running, SIGKILLed until it is gone ([`Watcher::drain`]).
enum Left<'a> {
    /// Its cgroup.
    Cgroup(&'a crate::cgroup::Cgroups),
    /// The process group it led (its pid is the group's id).
    Group,
}

impl Left<'_> {
    /// The first wait: the cgroup is polled every 1 ms, the group every 2 ms, at first.
    fn first_delay(&self) -> std::time::Duration {
        match self {
            Left::Cgroup(_) => std::time::Duration::from_millis(1),
            Left::Group => std::time::Duration::from_millis(2),
        }
    }

    /// Whether nothing of it runs: the cgroup says `populated 0` (or is gone); no process of
    /// the group is left. Killed processes are soon reaped (by init or a subreaper) and a
    /// group is gone: `kill(-pid, 0)` tells, cheaply. `/proc` is read only if it lasts 20 ms
    /// after `started` (zombies whose parent does not reap them, or a process that does not
    /// die).
    fn gone(&self, process: &ProcessKey, started: std::time::Instant) -> bool {
        match self {
            Left::Cgroup(c) => c.populated(process) == Some(false) || !c.exists(process),
            Left::Group => {
                crate::procfs::group_gone(process.pid)
                    || (started.elapsed() >= std::time::Duration::from_millis(20)
                        && !crate::procfs::group_alive(process.pid))
            }
        }
    }

    /// SIGKILLs it (again).
    fn kill(&self, process: &ProcessKey) {
        match self {
            Left::Cgroup(c) => {
                c.kill(process);
            }
            Left::Group => {
                crate::procfs::kill_group(process.pid);
            }
        }
    }

    /// Logs that it survives SIGKILL, and what to do; what `status` lists.
    fn say_stuck(&self, process: &ProcessKey, since: std::time::Instant) -> Stuck {
        let pid = process.pid;
        match self {
            Left::Cgroup(c) => {
                let cgroup = c.path_of(process);
                error!(
                    pid,
                    cgroup = %cgroup.display(),
                    "a dead holder's cgroup survives SIGKILL (a process in uninterruptible sleep, or frozen): its leases stay held until it is empty. What is left: cgroup.procs in that cgroup; what each waits on: /proc/PID/stack. Thaw a frozen one, or end what it waits on (a hung NFS or FUSE mount, a failing disk); only if it can never write again, `leasehold force-release` ends the leases before it is gone"
                );
                Stuck {
                    pid,
                    cgroup: Some(cgroup),
                    process_group: None,
                    since,
                }
            }
            Left::Group => {
                error!(
                    pid,
                    left = ?crate::procfs::group_members(pid, None).unwrap_or_default(),
                    "a dead holder's process group survives SIGKILL (a process in uninterruptible sleep, or frozen): its leases stay held until every process of the group is gone. What each waits on: /proc/PID/stack. Thaw a frozen one, or end what it waits on (a hung NFS or FUSE mount, a failing disk); only if it can never write again, `leasehold force-release` ends the leases before it is gone"
                );
                Stuck {
                    pid,
                    cgroup: None,
                    process_group: Some(pid),
                    since,
                }
            }
        }
    }

    /// Logs that it is gone at last, after `waited`.
    fn say_gone(&self, process: &ProcessKey, waited: std::time::Duration) {
        let (pid, waited_ms) = (process.pid, waited.as_millis() as u64);
        match self {
            Left::Cgroup(_) => warn!(
                pid,
                waited_ms, "the dead holder's cgroup is empty at last; its leases end"
            ),
            Left::Group => warn!(
                pid,
                waited_ms, "the dead holder's process group is gone at last; its leases end"
            ),
        }
    }
}

/// How long a dead holder's cgroup or group may take to empty after SIGKILL before the agent
/// says it is stuck (logs an error, and `status` lists it).
const STUCK_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// How long the cgroup of a holder whose leases ended may wait to be removed when no other
/// `run` starts meanwhile ([`Watcher::remove_cgroup`]).
const REMOVE_WITHIN: std::time::Duration = std::time::Duration::from_secs(1);

/// How many ended holders' cgroups the making of a `run`'s cgroup removes at most, after it
/// (40-120 us each, on the blocking thread, beside the store's commit; the grant does not
/// wait for them).
const REMOVE_AT_A_GRANT: usize = 4;

/// How many descriptors the watcher keeps in reserve (a pidfd and a `/proc` read).
const RESERVE: usize = 4;

/// How long an exited holder whose status matters may stay unreaped before its leases end
/// without it (as died). libvirt's QEMU is reaped by init, at once under systemd.
const REAP_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The exit status of an exited holder read from `/proc` while it is a zombie (kernels
/// before 6.15); `None`, logged with the reason, when it cannot be told: its leases then end
/// as died.
fn zombie_status(process: &ProcessKey) -> Option<ExitStatus> {
    match crate::procfs::zombie_exit_status(process.pid, process.start_time) {
        Ok(s) => Some(s),
        Err(why) => {
            warn!(
                pid = process.pid,
                why,
                "a holder's exit status is unknown (this kernel keeps none for pidfds; /proc has it only until the process is reaped): its leases end as died"
            );
            None
        }
    }
}

/// Removes up to `at_most` of the cgroups [`Watcher::remove_cgroup`] queued (the rest wait for
/// its timer). One still in use (what its holder left running after releasing everything) is
/// tried again, less and less often, until gone.
fn remove_now(removals: &Mutex<Removals>, at_most: usize) {
    let dirs: Vec<std::path::PathBuf> = {
        let mut r = removals.lock().unwrap_or_else(PoisonError::into_inner);
        let n = r.dirs.len().min(at_most);
        r.dirs.drain(..n).collect()
    };
    for dir in dirs {
        match std::fs::remove_dir(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::ResourceBusy => {}
            _ => continue,
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            continue;
        };
        rt.spawn(async move {
            let mut delay = std::time::Duration::from_secs(1);
            loop {
                tokio::time::sleep(delay).await;
                match std::fs::remove_dir(&dir) {
                    Err(e) if e.kind() == std::io::ErrorKind::ResourceBusy => {}
                    _ => return,
                }
                delay = (delay * 2).min(std::time::Duration::from_secs(60));
            }
        });
    }
}

fn fill_reserve(reserve: &mut Vec<std::fs::File>) {
    while reserve.len() < RESERVE {
        match std::fs::File::open("/dev/null") {
            Ok(f) => reserve.push(f),
            Err(_) => return,
        }
    }
}

impl<S: Store> Watcher<S> {
    /// A watcher that reports exits to `store`.
    pub fn new(store: Arc<S>) -> Arc<Self> {
        Arc::new(Watcher {
            store,
            watched: Mutex::new(HashMap::new()),
            fenced: Mutex::new(HashSet::new()),
            pending: Mutex::new(HashSet::new()),
            by_status: Mutex::new(HashSet::new()),
            before_fence: Mutex::new(HashMap::new()),
            paused: Mutex::new(HashSet::new()),
            draining: Mutex::new(HashSet::new()),
            reserve: Mutex::new({
                let mut r = Vec::new();
                fill_reserve(&mut r);
                r
            }),
            cgroups: std::sync::OnceLock::new(),
            stuck: Mutex::new(HashMap::new()),
            removals: Arc::default(),
            exits: Mutex::default(),
        })
    }

    /// Contains holders that ask for it in cgroups under `c` (set once, at start).
    pub fn set_cgroups(&self, c: crate::cgroup::Cgroups) {
        let _ = self.cgroups.set(c);
    }

    /// How holders that ask for it are contained here.
    pub fn containment(&self) -> Containment {
        if self.cgroups.get().is_some() {
            Containment::Cgroup
        } else {
            Containment::Group
        }
    }

    /// Starts moving `process`, a holder that asked for it (the requesting process itself,
    /// checked by the caller), into a cgroup of its own, on a blocking thread: the move
    /// waits for an RCU grace period in the kernel (about 1 ms), which this overlaps with
    /// the store's commit. [`Watcher::contained`] waits for it before the grant is answered;
    /// [`Watcher::not_contained`] undoes it when nothing was granted.
    pub fn start_containing(self: &Arc<Self>, process: &ProcessKey) -> Containing {
        let me = Arc::clone(self);
        let p = process.clone();
        Containing(tokio::task::spawn_blocking(move || me.contain(&p)))
    }

    /// Waits for [`Watcher::start_containing`]: how the holder is contained now. Where the
    /// move failed it stays where it was, contained by its process group, as without cgroups.
    pub async fn contained(&self, process: &ProcessKey, c: Containing) -> Containment {
        match c.0.await {
            // Another request of the same process, granted nothing, may have moved it back
            // meanwhile ([`Watcher::not_contained`]): the answer must be true.
            Ok((Containment::Cgroup, _))
                if self.cgroups.get().is_some_and(|g| g.is_in(process)) =>
            {
                Containment::Cgroup
            }
            Ok((Containment::Cgroup, _)) => self.contain(process).0,
            Ok((how, _)) => how,
            Err(_) => Containment::Group,
        }
    }

    /// Nothing was granted after [`Watcher::start_containing`]: puts the process back in the
    /// cgroup it was in, and removes its own.
    pub async fn not_contained(&self, process: &ProcessKey, c: Containing) {
        let Ok((Containment::Cgroup, from)) = c.0.await else {
            return;
        };
        // A holder here (another request of it was granted) stays in its cgroup.
        if self.is_watched(process) {
            return;
        }
        let Some(cgroups) = self.cgroups.get() else {
            return;
        };
        match from {
            Some(from) => cgroups.put_back(process, &from),
            None => {
                cgroups.remove(process);
            }
        }
    }

    /// For a holder that starts its processes into its cgroup itself (`clone3` with
    /// `CLONE_INTO_CGROUP`; the caller checked that it may): makes the cgroup, moving
    /// nothing, and returns it. Called once the grant is decided, before it is answered: a
    /// holder granted nothing leaves no cgroup behind. Where it cannot be made, the holder is
    /// contained by its process group, as where a move fails.
    pub fn cgroup_for_children(
        &self,
        process: &ProcessKey,
    ) -> (Containment, Option<std::path::PathBuf>) {
        let Some(c) = self.cgroups.get() else {
            return (Containment::Group, None);
        };
        Self::made(process, c.make(process))
    }

    fn made(
        process: &ProcessKey,
        made: Result<std::path::PathBuf, String>,
    ) -> (Containment, Option<std::path::PathBuf>) {
        match made {
            Ok(dir) => (Containment::Cgroup, Some(dir)),
            Err(why) => {
                warn!(
                    pid = process.pid,
                    why, "cannot give a holder a cgroup: it is contained by its process group only"
                );
                (Containment::Group, None)
            }
        }
    }

    /// Starts [`Watcher::cgroup_for_children`] on a blocking thread, to be made while the
    /// grant is decided (`mkdir` of a cgroup takes the kernel 40-80 us); `None` without
    /// cgroups. [`Watcher::making_done`] waits for it once granted, [`Watcher::not_made`]
    /// removes it if nothing was.
    pub fn start_making(self: &Arc<Self>, process: &ProcessKey) -> Option<Making> {
        self.cgroups.get()?;
        let me = Arc::clone(self);
        let p = process.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        // Dropped unrun (the runtime is stopping), the receiver reads as closed.
        drop(tokio::task::spawn_blocking(move || {
            let _ = tx.send(me.cgroups.get().map(|c| c.make(&p)));
            // The cgroups of runs that ended since, removed while the store commits (a few),
            // after the grant's own is made: the grant waits for its `mkdir` only, not for
            // these `rmdir`s (40-120 us each), which change nothing it answers (their leases
            // ended, durably, and nothing runs in them).
            remove_now(&me.removals, REMOVE_AT_A_GRANT);
        }));
        Some(Making(rx))
    }

    /// Waits for [`Watcher::start_making`]: how the holder is contained, and the cgroup it
    /// starts its processes in.
    pub async fn making_done(
        self: &Arc<Self>,
        process: &ProcessKey,
        m: Option<Making>,
    ) -> (Containment, Option<std::path::PathBuf>) {
        match m {
            None => self.cgroup_for_children(process),
            Some(m) => match m.0.await {
                Ok(Some(made)) => Self::made(process, made),
                Ok(None) => (Containment::Group, None),
                // The blocking thread never ran (the runtime is stopping): make it here.
                Err(_) => self.cgroup_for_children(process),
            },
        }
    }

    /// Nothing was granted after [`Watcher::start_making`]: removes the cgroup made, unless
    /// the process holds a lease here already (another request of it was granted) and so
    /// needs it.
    pub async fn not_made(&self, process: &ProcessKey, m: Option<Making>) {
        let Some(m) = m else {
            return;
        };
        if !matches!(m.0.await, Ok(Some(Ok(_)))) || self.is_watched(process) {
            return;
        }
        if let Some(cgroups) = self.cgroups.get() {
            cgroups.remove(process);
        }
    }

    fn contain(&self, process: &ProcessKey) -> (Containment, Option<std::path::PathBuf>) {
        let Some(c) = self.cgroups.get() else {
            return (Containment::Group, None);
        };
        match c.contain(process) {
            Ok(from) => (Containment::Cgroup, from),
            Err(why) => {
                warn!(
                    pid = process.pid,
                    why, "cannot give a holder a cgroup: it is contained by its process group only"
                );
                (Containment::Group, None)
            }
        }
    }

    /// SIGKILLs everything in the cgroup of `process`, if it has one (`cgroup.kill`): a
    /// fenced or revoked holder, and what it started, wherever it went.
    pub fn kill_cgroup(&self, process: &ProcessKey) {
        if let Some(c) = self.cgroups.get() {
            c.kill(process);
        }
    }

    /// At start, after re-adopting: removes the empty cgroups of processes that are gone,
    /// and says which are not empty (those of holders that died holding leases are being
    /// killed as their leases end).
    pub fn sweep_cgroups(&self) {
        if let Some(c) = self.cgroups.get() {
            for left in c.sweep() {
                info!(
                    cgroup = %left.display(),
                    "the cgroup of a process that is gone still has processes: killed if that process held leases here, else left alone"
                );
            }
        }
    }

    /// The dead holders whose cgroup or process group SIGKILL has not emptied yet (their
    /// leases stay held), oldest first.
    pub fn stuck(&self) -> Vec<Stuck> {
        let mut v: Vec<Stuck> = self
            .stuck
            .lock()
            .map(|s| s.values().cloned().collect())
            .unwrap_or_default();
        v.sort_by_key(|s| s.since);
        v
    }

    /// Marks in `views` the holders that are stuck ([`Watcher::stuck`]):
    /// [`ResourceView::stuck`](leasehold_core::ResourceView::stuck).
    pub fn mark_stuck(&self, views: &mut [leasehold_core::ResourceView]) {
        let Ok(stuck) = self.stuck.lock() else {
            return;
        };
        if stuck.is_empty() {
            return;
        }
        for v in views {
            v.stuck = v
                .holders
                .iter()
                .map(|l| &l.owner.process)
                .filter(|p| stuck.contains_key(*p))
                .cloned()
                .collect();
        }
    }

    fn set_stuck(&self, process: &ProcessKey, stuck: Option<Stuck>) {
        if let Ok(mut s) = self.stuck.lock() {
            match stuck {
                Some(st) => {
                    s.insert(process.clone(), st);
                }
                None => {
                    s.remove(process);
                }
            }
        }
    }

    /// How many processes are watched.
    pub fn len(&self) -> usize {
        self.watched.lock().map_or(0, |w| w.len())
    }

    /// Whether no process is watched.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Opens what watching `process` takes, before a lease is committed for it: a grant
    /// that could not be watched would have to end at once, so a request the agent cannot
    /// watch (out of file descriptors) is refused instead, ending nothing.
    ///
    /// # Errors
    /// [`ProcError`] when the process is gone or the agent has no descriptor left.
    pub fn prepare(&self, process: &ProcessKey) -> Result<Prepared, ProcError> {
        if self.is_watched(process) {
            return Ok(Prepared {
                process: process.clone(),
                pidfd: None,
            });
        }
        let pidfd = Pidfd::open(process.pid, process.start_time)?;
        Ok(Prepared {
            process: process.clone(),
            pidfd: Some(pidfd),
        })
    }

    /// What watching `process` takes, from a pidfd known to be of it
    /// ([`ProcessInfo::read_with_pidfd`](crate::procfs::ProcessInfo::read_with_pidfd)): as
    /// [`Watcher::prepare`], without opening another.
    pub fn prepared_with(&self, process: &ProcessKey, pidfd: Pidfd) -> Prepared {
        Prepared {
            process: process.clone(),
            pidfd: (!self.is_watched(process)).then_some(pidfd),
        }
    }

    /// Watches a prepared process (once); if it has already exited, ends its leases now.
    pub fn watch_with(self: &Arc<Self>, prepared: Prepared) {
        match prepared.pidfd {
            Some(fd) => self.register(prepared.process, fd),
            // It was watched when prepared; if that watch has ended since, it exited.
            None => self.watch(prepared.process),
        }
    }

    /// Starts watching `process` (once); if it has already exited, ends its leases now.
    /// When the agent is out of file descriptors it keeps trying, and never ends the leases
    /// of a process it could not look at.
    pub fn watch(self: &Arc<Self>, process: ProcessKey) {
        if self.is_watched(&process) {
            return;
        }
        match Pidfd::open(process.pid, process.start_time) {
            Ok(fd) => self.register(process, fd),
            Err(ProcError::NoProcess(_) | ProcError::Reused { .. }) => self.spawn_end(process),
            Err(e) => {
                warn!(pid = process.pid, error = %e, "cannot watch a holder yet; its leases stay, retrying");
                self.set_pending(&process, true);
                let me = Arc::clone(self);
                tokio::spawn(async move { me.retry_watch(process).await });
            }
        }
    }

    /// Keeps trying to watch `process` until it can, or learns the process is gone.
    async fn retry_watch(self: Arc<Self>, process: ProcessKey) {
        let mut delay = std::time::Duration::from_millis(100);
        loop {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(std::time::Duration::from_secs(2));
            if self.is_watched(&process) {
                return;
            }
            match Pidfd::open(process.pid, process.start_time) {
                Ok(fd) => {
                    info!(pid = process.pid, "holder watched again");
                    self.set_pending(&process, false);
                    return self.register(process, fd);
                }
                Err(ProcError::NoProcess(_) | ProcError::Reused { .. }) => {
                    self.set_pending(&process, false);
                    return self.end_with(process, None).await;
                }
                Err(_) => {}
            }
        }
    }

    fn set_pending(&self, process: &ProcessKey, pending: bool) {
        if let Ok(mut p) = self.pending.lock() {
            if pending {
                p.insert(process.clone());
            } else {
                p.remove(process);
            }
        }
    }

    /// Makes `process`'s exit status decide how its leases end (an owner with
    /// `on_exit = status`): call before it is watched.
    pub fn by_exit_status(&self, process: &ProcessKey) {
        if let Ok(mut s) = self.by_status.lock() {
            s.insert(process.clone());
        }
    }

    /// Makes `action` what [`Watcher::warn_holders`] does to `process` (libvirt's
    /// `<on_lockfailure>`: pause or poweroff), until it exits.
    pub fn before_fence(&self, process: &ProcessKey, action: BeforeFence) {
        if let Ok(mut b) = self.before_fence.lock() {
            b.insert(process.clone(), action);
        }
    }

    /// This host's session is in danger (renewals are late): does to each holder what it
    /// asked for before a fence, through its pidfd: SIGSTOP (pause) or SIGTERM (terminate).
    /// The fence's SIGKILL at the deadline follows whatever happens here. A process that
    /// released its leases is left alone. Returns each with its action and whether the
    /// signal could be sent.
    pub fn warn_holders(&self) -> Vec<(ProcessKey, BeforeFence, bool)> {
        let asked: Vec<(ProcessKey, BeforeFence)> = self
            .before_fence
            .lock()
            .map(|b| b.iter().map(|(p, a)| (p.clone(), *a)).collect())
            .unwrap_or_default();
        if asked.is_empty() {
            return Vec::new();
        }
        let holders = self.store.local_holders();
        asked
            .into_iter()
            .filter(|(p, _)| holders.as_ref().is_none_or(|h| h.contains(p)))
            .map(|(p, action)| {
                let sent = match action {
                    BeforeFence::Pause => {
                        let sent = self.signal(&p, Signal::STOP);
                        if sent && let Ok(mut paused) = self.paused.lock() {
                            paused.insert(p.clone());
                        }
                        sent
                    }
                    BeforeFence::Terminate => self.signal(&p, Signal::TERM),
                };
                (p, action, sent)
            })
            .collect()
    }

    /// The session recovered before its deadline: SIGCONTs the holders that
    /// [`Watcher::warn_holders`] paused. Returns them.
    pub fn resume_paused(&self) -> Vec<ProcessKey> {
        let paused: Vec<ProcessKey> = self
            .paused
            .lock()
            .map(|mut p| p.drain().collect())
            .unwrap_or_default();
        for p in &paused {
            self.signal(p, Signal::CONT);
        }
        paused
    }

    /// The exit status of an exited holder that asked for it, once its parent reaped it;
    /// `None` for the others, on a kernel that cannot tell, or when nobody reaps it in time:
    /// its leases then end as died.
    async fn exit_status(&self, process: &ProcessKey, fd: &OwnedFd) -> Option<ExitStatus> {
        let wanted = self.by_status.lock().is_ok_and(|mut s| s.remove(process));
        if !wanted {
            return None;
        }
        if !crate::procfs::pidfd_exit_supported() {
            // Before Linux 6.15: read it from the zombie, now, before init reaps it.
            return zombie_status(process);
        }
        let give_up = std::time::Instant::now() + REAP_WAIT;
        loop {
            match crate::procfs::exit_status(fd.as_fd()) {
                Ok(Some(s)) => return Some(s),
                Ok(None) if std::time::Instant::now() < give_up => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Ok(None) => {
                    warn!(
                        pid = process.pid,
                        "holder exited but was not reaped in time: its exit status is unknown, so its leases end as died"
                    );
                    return None;
                }
                Err(e) => {
                    warn!(pid = process.pid, error = %e, "cannot read a holder's exit status from its pidfd (PIDFD_GET_INFO needs Linux 6.15): trying /proc");
                    return zombie_status(process);
                }
            }
        }
    }

    /// Whether `process`, or something of its process group, may still run: it is watched,
    /// or its group is being killed ([`Watcher::kill_group_of`]), or it could not be watched
    /// yet and `/proc` still has its pid (looked at without a descriptor; a reused pid errs on
    /// the side of "alive").
    pub fn may_be_alive(&self, process: &ProcessKey) -> bool {
        self.is_watched(process)
            || self.draining.lock().is_ok_and(|d| d.contains(process))
            || (self.pending.lock().is_ok_and(|p| p.contains(process))
                && std::path::Path::new(&format!("/proc/{}", process.pid)).exists())
    }

    /// SIGKILLs a process that is not watched, through a pidfd opened for the purpose; when
    /// the agent is out of descriptors, the reserve is given up for it.
    fn kill_unwatched(&self, process: &ProcessKey) -> bool {
        let kill = || {
            Pidfd::open(process.pid, process.start_time).map(|fd| fd.signal(Signal::KILL).is_ok())
        };
        match kill() {
            Ok(sent) => sent,
            Err(ProcError::NoDescriptors { .. }) => {
                let Ok(mut reserve) = self.reserve.lock() else {
                    return false;
                };
                reserve.clear();
                let sent = kill().unwrap_or(false);
                fill_reserve(&mut reserve);
                sent
            }
            Err(_) => false,
        }
    }

    fn register(self: &Arc<Self>, process: ProcessKey, pidfd: Pidfd) {
        let Ok(mut watched) = self.watched.lock() else {
            return;
        };
        if watched.contains_key(&process) {
            return;
        }
        let pidfd = Arc::new(pidfd.into_fd());
        if let Err(e) = self.add_to_exits(&process, &pidfd) {
            drop(watched);
            // The process may well live: keep its leases and try again.
            warn!(pid = process.pid, error = %e, "cannot poll a holder's pidfd yet; its leases stay, retrying");
            self.set_pending(&process, true);
            let me = Arc::clone(self);
            tokio::spawn(async move { me.retry_watch(process).await });
            return;
        }
        watched.insert(process, Watched { pidfd, task: None });
    }

    /// Puts `pidfd`, of `process`, into the exit set (made, with its task, on first use). Its
    /// key is recorded before it goes in: one of a process that exited already is ready at
    /// once, and reported once (`EPOLLONESHOT`).
    fn add_to_exits(
        self: &Arc<Self>,
        process: &ProcessKey,
        pidfd: &Arc<OwnedFd>,
    ) -> std::io::Result<()> {
        use rustix::event::epoll;
        let mut exits = self.exits.lock().unwrap_or_else(PoisonError::into_inner);
        let set = match &exits.set {
            Some(set) => Arc::clone(set),
            None => {
                let fd = epoll::create(epoll::CreateFlags::CLOEXEC)?;
                // SAFETY: the OwnedFd is moved into the AsyncFd, which owns it until dropped;
                // nothing else closes or replaces it, so it stays the same epoll set.
                let set = Arc::new(unsafe {
                    AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
                }?);
                let task = tokio::spawn(Self::follow_exits(Arc::downgrade(self), Arc::clone(&set)));
                exits.set = Some(Arc::clone(&set));
                exits.task = Some(task.abort_handle());
                set
            }
        };
        exits.next += 1;
        let key = exits.next;
        exits.keys.insert(key, (process.clone(), Arc::clone(pidfd)));
        let added = epoll::add(
            set.get_ref(),
            &**pidfd,
            epoll::EventData::new_u64(key),
            epoll::EventFlags::IN | epoll::EventFlags::ONESHOT,
        );
        if let Err(e) = added {
            exits.keys.remove(&key);
            return Err(e.into());
        }
        Ok(())
    }

    /// The exit set's task: each pidfd that turns readable (its process exited) is handed to
    /// [`Watcher::exited`]. Ends with the watcher.
    async fn follow_exits(me: std::sync::Weak<Self>, set: Arc<AsyncFd<OwnedFd>>) {
        use rustix::event::epoll;
        let now = rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        loop {
            let Ok(mut guard) = set.readable().await else {
                return;
            };
            // Read until the set has nothing ready; only then is its readiness cleared.
            let ready = guard.try_io(|s| {
                let mut events: [std::mem::MaybeUninit<epoll::Event>; 32] =
                    [const { std::mem::MaybeUninit::uninit() }; 32];
                match epoll::wait(s.get_ref(), &mut events, Some(&now)) {
                    Ok(([], _)) => Err(std::io::ErrorKind::WouldBlock.into()),
                    Ok((ready, _)) => Ok(ready.iter().map(|e| e.data.u64()).collect::<Vec<u64>>()),
                    Err(e) => Err(e.into()),
                }
            });
            let keys = match ready {
                Ok(Ok(keys)) => keys,
                Err(_would_block) => continue,
                Ok(Err(e)) => {
                    // EINTR; nothing else is expected of a wait that does not block.
                    warn!(error = %e, "reading the holders' exits failed; reading again");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            let Some(me) = me.upgrade() else {
                return;
            };
            let seen = std::time::Instant::now();
            for key in keys {
                me.exited(key, seen);
            }
        }
    }

    /// The process of exit-set key `key` exited (`seen` then): its leases are ended by a task
    /// of its own (its exit status may first be waited for).
    fn exited(self: &Arc<Self>, key: u64, seen: std::time::Instant) {
        let found = self
            .exits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys
            .remove(&key);
        let Some((process, pidfd)) = found else {
            return;
        };
        let me = Arc::clone(self);
        let key = process.clone();
        let task = tokio::spawn(async move {
            let status = me.exit_status(&key, &pidfd).await;
            // Draining before it stops being watched: a fence judging meanwhile sees it.
            me.set_draining(&key, true);
            if let Ok(mut w) = me.watched.lock() {
                w.remove(&key);
            }
            drop(pidfd);
            me.end_with(key, status).await;
            crate::metrics::exit_to_release(seen.elapsed());
        });
        if let Ok(mut w) = self.watched.lock()
            && let Some(v) = w.get_mut(&process)
        {
            v.task = Some(task.abort_handle());
        }
    }

    fn spawn_end(self: &Arc<Self>, process: ProcessKey) {
        let me = Arc::clone(self);
        tokio::spawn(async move { me.end_with(process, None).await });
    }

    /// Ends the leases of an exited process, retrying while the backend is unavailable or its
    /// storage fails (a fenced holder's leases must end once etcd answers again; a dead
    /// holder's once the full disk has room again). `status` is its exit status when it
    /// matters and is known: 0 ends clean the leases whose owner chose `on_exit = status`.
    async fn end_with(&self, process: ProcessKey, status: Option<ExitStatus>) {
        self.kill_what_it_started(&process).await;
        // Read after the group is gone: a fence may have come meanwhile.
        let fenced = self.fenced.lock().is_ok_and(|f| f.contains(&process));
        if let Ok(mut s) = self.by_status.lock() {
            s.remove(&process);
        }
        if let Ok(mut b) = self.before_fence.lock() {
            b.remove(&process);
        }
        if let Ok(mut p) = self.paused.lock() {
            p.remove(&process);
        }
        let zero = status.is_some_and(ExitStatus::is_zero);
        let end = || async {
            if fenced {
                self.store.end_fenced(process.clone()).await
            } else if zero {
                self.store.end_exited_zero(process.clone()).await
            } else {
                self.store.end_process(process.clone()).await
            }
        };
        let retry = |e: &StoreError| {
            warn!(pid = process.pid, error = %e, "cannot end the leases of an exited process yet; retrying");
        };
        match retrying(end, retry).await {
            Ok(ended) => {
                if let Ok(mut f) = self.fenced.lock() {
                    f.remove(&process);
                }
                for r in ended {
                    // A writer that died mid-write leaves work for people: a warning.
                    if r.dirtied {
                        warn!(
                            resource = %r.resource,
                            pid = process.pid,
                            token = %r.ended.token,
                            dirtied = r.dirtied,
                            "holder exited; lease ended; the resource needs a check"
                        );
                    } else {
                        info!(
                            resource = %r.resource,
                            pid = process.pid,
                            token = %r.ended.token,
                            dirtied = r.dirtied,
                            "holder exited; lease ended"
                        );
                    }
                }
            }
            Err(e) => {
                warn!(pid = process.pid, error = %e, "ending the leases of an exited process failed");
            }
        }
        self.remove_cgroup(&process);
    }

    fn set_draining(&self, process: &ProcessKey, on: bool) {
        if let Ok(mut d) = self.draining.lock() {
            if on {
                d.insert(process.clone());
            } else {
                d.remove(process);
            }
        }
    }

    /// What an exited holder started may still run, and may be the real writer: in its
    /// cgroup (a `run` wrapper's, [`crate::cgroup`]: wherever it went) or in the process
    /// group it led (a `run` wrapper, a shell script run as a job, a service's main
    /// process). Both are SIGKILLed, and the leases end only once nothing of them runs.
    ///
    /// A holder that released every lease before it died held nothing at its death: what it
    /// started afterwards (a script's long jobs after `leasehold release`) is left alone.
    async fn kill_what_it_started(&self, process: &ProcessKey) {
        let pid = process.pid;
        let cgroup = self
            .cgroups
            .get()
            .filter(|c| c.exists(process) && c.populated(process) != Some(false));
        // A group with the holder's pid as its id was made by the holder: the kernel gives
        // no new process a pid still in use as a group id. When another process has that
        // pid now (it was reused while the agent was not running), the holder's group was
        // gone before that, and the group with that id is the new process's: left alone.
        // (One case is not told apart: the pid reused while the agent was down by a process
        // that led a group and exited before the agent came back, its group living on. A
        // cgroup names its holder exactly.)
        let group = !crate::procfs::start_time(pid).is_ok_and(|t| t != process.start_time)
            && !crate::procfs::group_gone(pid);
        if cgroup.is_none() && !group {
            self.set_draining(process, false);
            return;
        }
        if self.store.holds_any(process).await == Some(false) {
            info!(
                pid,
                "holder exited after releasing every lease: what it started is left running"
            );
            self.set_draining(process, false);
            return;
        }
        if let Some(c) = cgroup {
            self.empty_cgroup(c, process).await;
        }
        if group {
            self.kill_group_of(process).await;
        }
        self.set_draining(process, false);
    }

    /// SIGKILLs the cgroup of an exited holder and waits until nothing in it runs
    /// (`cgroup.events` says `populated 0`). One that never empties keeps the leases held,
    /// loudly, and the holder counted alive (the watchdog).
    async fn empty_cgroup(&self, c: &crate::cgroup::Cgroups, process: &ProcessKey) {
        self.set_draining(process, true);
        c.kill(process);
        info!(
            pid = process.pid,
            "holder exited leaving processes in its cgroup: SIGKILLed its cgroup (what it started) before ending its leases"
        );
        self.drain(process, Left::Cgroup(c)).await;
    }

    /// Removes the cgroup of a holder whose leases ended, soon: with those of other ended
    /// holders, on the blocking thread that makes the next `run`'s cgroup while its grant is
    /// committed, or within [`REMOVE_WITHIN`] if no `run` starts meanwhile. Not at once: the
    /// wrapper's exit is when the next `run` of a script or loop starts, and the `rmdir` (and
    /// the kernel's work it queues) would run beside it on a small host. Nothing waits for
    /// it: the leases have ended, and an empty cgroup holds nothing. One still in use (its
    /// holder released everything and left processes running) is removed once they are
    /// gone; one left when the agent stops, at its next start ([`Watcher::sweep_cgroups`]).
    fn remove_cgroup(&self, process: &ProcessKey) {
        let Some(c) = self.cgroups.get() else {
            return;
        };
        let timer = {
            let mut r = self.removals.lock().unwrap_or_else(PoisonError::into_inner);
            r.dirs.push(c.path_of(process));
            !std::mem::replace(&mut r.timed, true)
        };
        // Every cgroup queued is followed by a timer's removal of all: its own, or one already
        // due, which comes later.
        if timer {
            let removals = Arc::clone(&self.removals);
            tokio::spawn(async move {
                tokio::time::sleep(REMOVE_WITHIN).await;
                removals
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .timed = false;
                // A burst of ended runs is many `rmdir`s (40-60 us each): off the workers.
                tokio::task::spawn_blocking(move || remove_now(&removals, usize::MAX));
            });
        }
    }

    /// SIGKILLs the process group an exited holder led ([`Watcher::kill_what_it_started`]
    /// found it has members) and waits until nothing of it runs. A group that never empties
    /// (a process stuck in uninterruptible sleep) keeps the leases held, loudly.
    async fn kill_group_of(&self, process: &ProcessKey) {
        let pid = process.pid;
        if !crate::procfs::kill_group(pid) {
            return;
        }
        self.set_draining(process, true);
        info!(
            pid,
            "holder exited leading a process group: SIGKILLed its process group (what it started) before ending its leases"
        );
        self.drain(process, Left::Group).await;
        self.set_draining(process, false);
    }

    /// Waits until what the dead holder `process` left (SIGKILLed already) is gone, killing
    /// it again each round (a kill that did not take is tried again), with a backoff that
    /// doubles to 200 ms. After [`STUCK_AFTER`] it says what is stuck and what to do, and
    /// lists it in [`Watcher::stuck`]; the leases stay held until it is gone.
    async fn drain(&self, process: &ProcessKey, left: Left<'_>) {
        let started = std::time::Instant::now();
        let mut delay = left.first_delay();
        let mut warned = false;
        while !left.gone(process, started) {
            left.kill(process);
            if !warned && started.elapsed() > STUCK_AFTER {
                warned = true;
                self.set_stuck(process, Some(left.say_stuck(process, started)));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(std::time::Duration::from_millis(200));
        }
        if warned {
            self.set_stuck(process, None);
            left.say_gone(process, started.elapsed());
        }
    }

    /// Sends `signal` to a watched process through its pidfd. Returns false when the
    /// process is not watched (not a holder here) or has exited.
    pub fn signal(&self, process: &ProcessKey, signal: Signal) -> bool {
        let Ok(watched) = self.watched.lock() else {
            return false;
        };
        let Some(w) = watched.get(process) else {
            return false;
        };
        rustix::process::pidfd_send_signal(&*w.pidfd, signal).is_ok()
    }

    /// SIGKILLs the processes that hold leases here now (the store's index of them; every
    /// watched process when the store keeps none), recording them as fenced first so their
    /// leases end as such. A process that released its leases or handed them over is left
    /// alone. Returns each with whether the signal could be sent (it cannot when the agent
    /// lacks the right, or the process just exited).
    pub fn fence_holders(&self) -> Vec<(ProcessKey, bool)> {
        let holders = match self.store.local_holders() {
            Some(h) => h,
            None => self
                .watched
                .lock()
                .map(|w| w.keys().cloned().collect())
                .unwrap_or_default(),
        };
        self.fence_these(holders)
    }

    /// [`Watcher::fence_holders`] for the processes `holders` (the fence has spared the
    /// revocable ones).
    pub fn fence_these(&self, holders: Vec<ProcessKey>) -> Vec<(ProcessKey, bool)> {
        if let Ok(mut f) = self.fenced.lock() {
            f.extend(holders.iter().cloned());
        }
        holders
            .into_iter()
            .map(|p| {
                let sent = self.signal(&p, Signal::KILL) || self.kill_unwatched(&p);
                self.kill_live_group(&p);
                self.kill_cgroup(&p);
                (p, sent)
            })
            .collect()
    }

    /// SIGKILLs a holder whose lease was revoked, and the process group it leads (what it
    /// started). Returns whether the holder could be signalled.
    pub fn kill_holder(&self, process: &ProcessKey) -> bool {
        let sent = self.signal(process, Signal::KILL);
        self.kill_live_group(process);
        self.kill_cgroup(process);
        sent
    }

    /// SIGKILLs the process group `process` leads, while it is the process that held the
    /// lease (running, or exited and not reaped): then its pid names its group. Once it is
    /// gone, its group is [`Watcher::kill_group_of`]'s to kill.
    fn kill_live_group(&self, process: &ProcessKey) {
        if crate::procfs::start_time(process.pid).is_ok_and(|t| t == process.start_time) {
            crate::procfs::kill_group(process.pid);
        }
    }

    /// Whether `process` is watched (it holds leases here and has not exited).
    pub fn is_watched(&self, process: &ProcessKey) -> bool {
        self.watched.lock().is_ok_and(|w| w.contains_key(process))
    }

    /// Stops every watch (the agent is stopping; the leases stay with their processes).
    pub fn stop(&self) {
        if let Ok(mut w) = self.watched.lock() {
            for (_, v) in w.drain() {
                if let Some(t) = v.task {
                    t.abort();
                }
            }
        }
        let mut exits = self.exits.lock().unwrap_or_else(PoisonError::into_inner);
        exits.keys.clear();
        if let Some(t) = exits.task.take() {
            t.abort();
        }
        exits.set = None;
    }
}
