//! The etcd store.
//!
//! Every operation follows one pattern:
//!
//! 1. read a **snapshot** of the resources concerned, their waiters and grace keys, and the
//!    live host sessions, at one revision; or take it from this agent's **view** ([`mirror`]:
//!    the keys of the resources it holds, waits for or used lately, each watched), each
//!    resource's keys known up to its own watchers' revision; a resource outside the view is
//!    guessed to have no keys, and the commit compares that;
//! 2. run `leasehold-core`'s engine over it: live sessions never expire inside it, dead ones
//!    (a holder whose host key is gone) expire at once, so their exclusive resources become
//!    dirty and blocked for the grace; waiters of other hosts hold their place in the queues
//!    but only this host's waiters are decided here;
//! 3. **commit** what the engine changed in one transaction that compares the mod revision of
//!    every record it read, that no grace key or (beside holders) waiter of those resources
//!    appeared since the revision that resource is known to, and, when it grants or queues
//!    for this host, that this host's session key is still on its lease. If anything moved,
//!    nothing is written and the operation starts again from a fresh snapshot (the one the
//!    failed transaction returned). Commits that wait at once go to etcd as one transaction of
//!    transactions, each member with all its own compares, succeeding or failing alone
//!    (`commit.rs`).
//!
//! A grace is a key on an etcd lease of TTL `grace`, created by whoever clears a dead session's
//! holders, so it is measured by etcd from a moment no earlier than the expiry. Tokens are at
//! least the snapshot's revision + 1, and above the record's last token.

mod commit;
mod mirror;
mod operations;
mod session;
mod snapshot;
#[cfg(test)]
mod tests;
mod waiters;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use leasehold_core::{Event, HostId, Now, Owner, ProcessKey, ResourceName, Timing, Token};
use serde::Serialize;
use tokio::sync::{Notify, broadcast, oneshot, watch};
use tracing::error;

use crate::etcd::client::{Etcd, EtcdError, EtcdSecurity, LeaseId};
use crate::etcd::history::{EtcdHealth, HistoryOptions};
use crate::etcd::keys::Keys;
use crate::sync::lock;
use crate::{Cause, Clock, SessionEndHook, SessionState, StoreError, WaitNote};
use mirror::{Fix, Mirror, follow};
use session::{establish, keep_session};
use waiters::{LocalWaiter, serve_waiters};

/// etcd refuses transactions with more than this many compares or operations by default.
const MAX_TXN_OPS: usize = 128;

/// Settings of an [`EtcdStore`].
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// etcd client URLs.
    pub endpoints: Vec<String>,
    /// The key prefix; clusters that share an etcd use different ones.
    pub prefix: String,
    /// Session lifetime without renewal.
    pub ttl: Duration,
    /// Heartbeat interval.
    pub renew: Duration,
    /// After a session expires, its resources stay unavailable this long.
    pub grace: Duration,
    /// Timeout of one etcd request.
    pub timeout: Duration,
    /// Where to remember the session, so a restarted agent resumes it while it lives.
    pub session_file: Option<PathBuf>,
    /// How etcd's history is kept bounded (see [`super::history`]).
    pub history: HistoryOptions,
    /// TLS and the etcd user, when etcd asks for them.
    pub security: EtcdSecurity,
}

/// etcd's shortest lease (it raises anything shorter to this).
pub const ETCD_MIN_LEASE: Duration = Duration::from_secs(2);

/// The default grace on etcd for `ttl`: SPEC §4's (ttl/2, [`Timing::for_ttl`]) rounded up to
/// whole seconds, at least [`ETCD_MIN_LEASE`] (etcd grants a grace key whole seconds, and no
/// fewer than that).
pub fn etcd_default_grace(ttl: Duration) -> Duration {
    let grace = Timing::for_ttl(ttl).grace;
    let secs = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
    Duration::from_secs(secs).max(ETCD_MIN_LEASE)
}

impl EtcdOptions {
    /// Options for `endpoints` with SPEC §4's defaults ([`Timing::default`], the grace as
    /// [`etcd_default_grace`] makes it).
    pub fn new(endpoints: Vec<String>) -> EtcdOptions {
        let timing = Timing::default();
        EtcdOptions {
            endpoints,
            prefix: "/leasehold/".into(),
            ttl: timing.ttl,
            renew: timing.renew,
            grace: etcd_default_grace(timing.ttl),
            timeout: Duration::from_secs(2),
            session_file: None,
            history: HistoryOptions::default(),
            security: EtcdSecurity::default(),
        }
    }
}

struct Inner {
    host: HostId,
    keys: Keys,
    opts: EtcdOptions,
    etcd: Etcd,
    clock: Clock,
    session: watch::Sender<SessionState>,
    events: broadcast::Sender<Event>,
    /// Every resource's events, while someone asks (`leasehold watch`): see
    /// [`mirror::watch_all`]. Recovered: its fields are set together.
    all_events: Mutex<AllEvents>,
    /// The revision from which the watch of every resource has delivered every event to
    /// `all_events`' receivers (0: it does not run yet, or it missed events and starts again).
    all_from: watch::Sender<i64>,
    changed: Notify,
    /// This host's waiting requests. A recovered lock (see [`crate::sync`]): each change is one
    /// entry's insertion, removal or fields set together.
    waiters: Mutex<BTreeMap<u64, LocalWaiter>>,
    /// The next local waiter id.
    next_waiter: std::sync::atomic::AtomicU64,
    /// Held while a local waiter's keys are written or deleted other than by a grant, so that
    /// a withdrawal and a queueing again never cross.
    queueing: tokio::sync::Mutex<()>,
    /// Notes for waiting callers.
    notes: broadcast::Sender<WaitNote>,
    /// The resources each local process holds, kept by this store's own commits (every grant
    /// to a local process is one of them). A fatal lock (see [`crate::sync`]): a commit changes
    /// it in several steps, and a half-made change could leave a holder out of what a fence
    /// kills; poisoned, it halts the store and [`Store::local_holders`] answers `None`, so the
    /// agent's fence kills every process it watches.
    held: Mutex<HashMap<ProcessKey, BTreeSet<ResourceName>>>,
    /// Grants whose caller had gone when they were decided; released by the waiter service.
    /// Recovered: pushed and taken whole.
    orphans: Mutex<Vec<(ResourceName, Owner, Token)>>,
    /// Local processes recorded as holders under an ended session of this host, at open.
    /// Recovered: replaced whole.
    stale: Mutex<Vec<ProcessKey>>,
    /// The view (see [`mirror`]). Recovered: each change is one watcher's or key's insertion
    /// or removal, or a replacement of the whole; and a mirror behind etcd costs a retry,
    /// never a wrong grant (commits compare).
    mirror: std::sync::RwLock<Mirror>,
    /// Records as last decoded, each decoded once (see [`snapshot::Decoded`]).
    decoded: snapshot::Decoded,
    /// Called when this host's session is found ended, before anything else happens.
    /// Recovered: replaced whole; skipping a poisoned hook would leave holders unfenced.
    session_end: Mutex<Option<SessionEndHook>>,
    /// etcd's space and history, as the history keeper last saw them.
    health: watch::Sender<EtcdHealth>,
    /// Hosts whose session key this agent saw deleted (their session ended), with the
    /// session and when; a host's new session key removes it. Recovered: one entry a change.
    ended_hosts: Mutex<BTreeMap<HostId, (LeaseId, leasehold_core::WallTime)>>,
    next_waiter_key: std::sync::atomic::AtomicU64,
    /// Repairs the watch found necessary, written by the watch task. Recovered: pushed and
    /// taken whole.
    fixes: Mutex<Vec<Fix>>,
    /// A test hook: the next fresh snapshot stops after its first read until released.
    /// Recovered: replaced and taken whole.
    pause_snapshot: Mutex<Option<(oneshot::Sender<()>, oneshot::Receiver<()>)>>,
    /// A test hook: the watch stream is dropped and stays closed until released. Recovered:
    /// replaced and taken whole.
    pause_watch: Mutex<Option<(oneshot::Sender<()>, oneshot::Receiver<()>)>>,
    pause_watch_asked: Notify,
    /// A test hook: the watch of every resource is dropped and stays closed until released.
    /// Recovered: replaced and taken whole.
    pause_watch_all: Mutex<Option<(oneshot::Sender<()>, oneshot::Receiver<()>)>>,
    pause_watch_all_asked: Notify,
    /// A test hook: the next commit stops once etcd answered it, before anything learns of
    /// it, until released. Recovered: replaced and taken whole.
    pause_commit: Mutex<Option<(oneshot::Sender<()>, oneshot::Receiver<()>)>>,
    /// A test hook: the next transaction stops once it has decided a write, before it
    /// commits, until released. Recovered: replaced and taken whole.
    pause_decided: Mutex<Option<(oneshot::Sender<()>, oneshot::Receiver<()>)>>,
    /// A test hook: the next commit stops once it has published its events, until released.
    /// Recovered: replaced and taken whole.
    pause_published: Mutex<Option<(oneshot::Sender<()>, oneshot::Receiver<()>)>>,
    /// Wakes the task that writes the repairs in `fixes`.
    fixes_due: Notify,
    /// Why the store halted (a fatal lock was poisoned), once it has.
    halted: std::sync::OnceLock<crate::Halt>,
    /// Sends commits, several in one transaction when several wait (see [`commit::Batcher`]).
    batcher: commit::Batcher,
    /// How promptly etcd answers this host's keep-alives: commits wait while it is late (see
    /// [`session::Pace`]).
    pace: watch::Sender<session::Pace>,
    /// Asks the session keeper for a keep-alive now.
    probe: Notify,
    /// Commits waiting for a prompt keep-alive.
    commits_held: std::sync::atomic::AtomicUsize,
    /// A test hook: the next keep-alive stops once it counts as sent, until released.
    /// Recovered: replaced and taken whole.
    pause_renewal: Mutex<Option<(oneshot::Sender<()>, oneshot::Receiver<()>)>>,
}

/// The receivers of every resource's events (`leasehold watch`), and what their watch is to do.
struct AllEvents {
    /// Replaced when the watch missed events (etcd compacted what it was to deliver): its
    /// receivers are closed, after the events they have.
    tx: broadcast::Sender<Event>,
    /// The revision a watch that starts (again, after a gap) starts from: the lowest any
    /// receiver of `tx` asked for (0: none asked).
    start: i64,
    /// Whether the task watching for them runs.
    running: bool,
}

/// A fresh snapshot stopped after its first read, or the watch stream closed, for tests that
/// script an interleaving (see [`EtcdStore::pause_next_snapshot`], [`EtcdStore::pause_watch`]).
#[doc(hidden)]
#[derive(Debug)]
pub struct SnapshotPause {
    reached: oneshot::Receiver<()>,
    resume: oneshot::Sender<()>,
}

impl SnapshotPause {
    /// Waits until a snapshot has made its first read and stopped.
    pub async fn reached(&mut self) {
        let _ = (&mut self.reached).await;
    }

    /// Lets the snapshot go on.
    pub fn resume(self) {
        let _ = self.resume.send(());
    }
}

/// The etcd store. See the module documentation.
pub struct EtcdStore {
    inner: Arc<Inner>,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("host", &self.inner.host)
            .field("prefix", &self.inner.keys.prefix())
            .finish()
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A failed etcd call as the store reports it, decided by the error's kind; the error stays
/// under it.
fn unavailable(e: EtcdError) -> StoreError {
    if e.is_nospace() {
        return StoreError::NoSpace(
            Cause::new(crate::etcd::history::NOSPACE_REMEDY).with_source(e),
        );
    }
    if e.misconfigured() {
        return StoreError::Misconfigured(Cause::of(e));
    }
    StoreError::Unavailable(Cause::of(e))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Encodes a value to store; never empty bytes in place of a value that failed to encode.
fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Storage(Cause::at("cannot encode a value", e)))
}

impl EtcdStore {
    /// Connects to etcd and opens this host's session: resumes the one saved in
    /// `session_file` if etcd still holds it, else creates one.
    ///
    /// # Errors
    /// [`StoreError::HostInUse`] when another live agent has this host id;
    /// [`StoreError::Unavailable`] when etcd cannot be reached.
    pub async fn open(host: HostId, opts: EtcdOptions) -> Result<EtcdStore, StoreError> {
        let etcd = Etcd::connect_with(&opts.endpoints, opts.timeout, &opts.security)
            .map_err(unavailable)?;
        let keys = Keys::new(&opts.prefix);
        let (lease, renewed, ttl) = match establish(&etcd, &keys, &host, &opts).await {
            Ok(v) => v,
            // A connection that closes may be etcd refusing this client's settings: say so,
            // rather than wait for an etcd that will never accept them.
            Err(StoreError::Unavailable(first)) => {
                return Err(match etcd.diagnose().await {
                    Some(e) => StoreError::Misconfigured(
                        Cause::new(format!("{e} (first error: {first})")).with_source(e),
                    ),
                    None => StoreError::Unavailable(first),
                });
            }
            Err(e) => return Err(e),
        };
        let (session, _) = watch::channel(SessionState {
            id: lease.session(),
            ttl,
            renewed_sent_at: Some(renewed),
            expired: false,
            latencies: Vec::new(),
            failed_renewals: 0,
        });
        let (events, _) = broadcast::channel(4096);
        let inner = Arc::new(Inner {
            host,
            keys,
            opts,
            etcd,
            clock: Clock::new(),
            session,
            events,
            all_events: Mutex::new(AllEvents {
                tx: broadcast::channel(4096).0,
                start: 0,
                running: false,
            }),
            all_from: watch::channel(0).0,
            changed: Notify::new(),
            waiters: Mutex::new(BTreeMap::new()),
            next_waiter: std::sync::atomic::AtomicU64::new(1),
            queueing: tokio::sync::Mutex::new(()),
            notes: broadcast::channel(256).0,
            held: Mutex::new(HashMap::new()),
            orphans: Mutex::new(Vec::new()),
            stale: Mutex::new(Vec::new()),
            mirror: std::sync::RwLock::new(Mirror::default()),
            decoded: snapshot::Decoded::default(),
            session_end: Mutex::new(None),
            health: watch::channel(EtcdHealth::default()).0,
            ended_hosts: Mutex::new(BTreeMap::new()),
            next_waiter_key: std::sync::atomic::AtomicU64::new(now_ms()),
            fixes: Mutex::new(Vec::new()),
            pause_snapshot: Mutex::new(None),
            pause_watch: Mutex::new(None),
            pause_watch_asked: Notify::new(),
            pause_watch_all: Mutex::new(None),
            pause_watch_all_asked: Notify::new(),
            pause_commit: Mutex::new(None),
            pause_decided: Mutex::new(None),
            pause_published: Mutex::new(None),
            fixes_due: Notify::new(),
            halted: std::sync::OnceLock::new(),
            batcher: commit::Batcher::default(),
            pace: watch::channel(session::Pace::default()).0,
            probe: Notify::new(),
            commits_held: std::sync::atomic::AtomicUsize::new(0),
            pause_renewal: Mutex::new(None),
        });
        let everything = inner.load_mirror().await?;
        inner.load_held(&everything);
        inner.drop_old_waiters(&everything).await?;
        drop(everything);
        let tasks = vec![
            tokio::spawn({
                let inner = Arc::clone(&inner);
                async move { inner.batcher.run(inner.etcd.clone()).await }
            })
            .abort_handle(),
            tokio::spawn(keep_session(Arc::clone(&inner))).abort_handle(),
            tokio::spawn(follow(Arc::clone(&inner))).abort_handle(),
            tokio::spawn(mirror::write_fixes(Arc::clone(&inner))).abort_handle(),
            tokio::spawn(serve_waiters(Arc::clone(&inner))).abort_handle(),
            tokio::spawn(crate::etcd::history::maintain(
                inner.etcd.clone(),
                crate::etcd::history::members(
                    &inner.opts.endpoints,
                    inner.opts.timeout,
                    &inner.opts.security,
                ),
                inner.keys.clone(),
                inner.host.clone(),
                inner.opts.history.clone(),
                inner.health.clone(),
            ))
            .abort_handle(),
        ];
        Ok(EtcdStore { inner, tasks })
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        self.inner.keys.prefix()
    }

    /// A test hook: the next fresh read of a snapshot stops after its first read of etcd
    /// until the returned handle lets it go on, so a test can change things in between.
    #[doc(hidden)]
    pub fn pause_next_snapshot(&self) -> SnapshotPause {
        let (reached_tx, reached) = oneshot::channel();
        let (resume, resume_rx) = oneshot::channel();
        *lock(&self.inner.pause_snapshot, "pause_snapshot") = Some((reached_tx, resume_rx));
        SnapshotPause { reached, resume }
    }

    /// A test hook: drops the watch stream now and keeps it closed until the returned handle
    /// lets it open again (every watcher then starts again from where its keys are known).
    #[doc(hidden)]
    pub fn pause_watch(&self) -> SnapshotPause {
        let (reached_tx, reached) = oneshot::channel();
        let (resume, resume_rx) = oneshot::channel();
        *lock(&self.inner.pause_watch, "pause_watch") = Some((reached_tx, resume_rx));
        self.inner.pause_watch_asked.notify_one();
        SnapshotPause { reached, resume }
    }

    /// A test hook: drops the watch of every resource (`leasehold watch`'s) now and keeps it
    /// closed until the returned handle lets it open again (from the revision after the last
    /// it delivered).
    #[doc(hidden)]
    pub fn pause_watch_all(&self) -> SnapshotPause {
        let (reached_tx, reached) = oneshot::channel();
        let (resume, resume_rx) = oneshot::channel();
        *lock(&self.inner.pause_watch_all, "pause_watch_all") = Some((reached_tx, resume_rx));
        self.inner.pause_watch_all_asked.notify_one();
        SnapshotPause { reached, resume }
    }

    /// A test hook: the next commit stops once it has written the view and published its
    /// events, before it returns, until the returned handle lets it go on.
    #[doc(hidden)]
    pub fn pause_next_published(&self) -> SnapshotPause {
        let (reached_tx, reached) = oneshot::channel();
        let (resume, resume_rx) = oneshot::channel();
        *lock(&self.inner.pause_published, "pause_published") = Some((reached_tx, resume_rx));
        SnapshotPause { reached, resume }
    }

    /// A test hook: the next commit stops once etcd has answered it, before the view, the
    /// subscribers or the index of holders learn of it, until the returned handle lets it go
    /// on.
    #[doc(hidden)]
    pub fn pause_next_commit(&self) -> SnapshotPause {
        let (reached_tx, reached) = oneshot::channel();
        let (resume, resume_rx) = oneshot::channel();
        *lock(&self.inner.pause_commit, "pause_commit") = Some((reached_tx, resume_rx));
        SnapshotPause { reached, resume }
    }

    /// A test hook: the next transaction that decides a write (from its snapshot) stops
    /// before it commits, until the returned handle lets it go on: a test can change the
    /// resource in between, so the commit loses its compare and the transaction decides
    /// again.
    #[doc(hidden)]
    pub fn pause_next_decided(&self) -> SnapshotPause {
        let (reached_tx, reached) = oneshot::channel();
        let (resume, resume_rx) = oneshot::channel();
        *lock(&self.inner.pause_decided, "pause_decided") = Some((reached_tx, resume_rx));
        SnapshotPause { reached, resume }
    }

    /// A test hook: the next keep-alive of this host's session stops once it counts as sent
    /// (commits see it pending) until the returned handle lets it go on.
    #[doc(hidden)]
    pub fn pause_next_renewal(&self) -> SnapshotPause {
        let (reached_tx, reached) = oneshot::channel();
        let (resume, resume_rx) = oneshot::channel();
        *lock(&self.inner.pause_renewal, "pause_renewal") = Some((reached_tx, resume_rx));
        SnapshotPause { reached, resume }
    }

    /// etcd's space and history, as this agent last saw them.
    pub fn health(&self) -> EtcdHealth {
        self.inner.health.borrow().clone()
    }

    /// Ends this host's session now (revokes its lease): its leases end as if the host were
    /// lost. For tests and for decommissioning a host.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`].
    pub async fn revoke_session(&self) -> Result<(), StoreError> {
        let id = LeaseId::of_session(self.inner.session.borrow().id);
        self.inner.etcd.lease_revoke(id).await.map_err(unavailable)
    }
}

impl Inner {
    fn now(&self) -> Now {
        self.clock.now()
    }

    /// This host's waiting requests (a recovered lock).
    fn waiters(&self) -> MutexGuard<'_, BTreeMap<u64, LocalWaiter>> {
        lock(&self.waiters, "waiters")
    }

    /// Grants to release (a recovered lock).
    fn orphans(&self) -> MutexGuard<'_, Vec<(ResourceName, Owner, Token)>> {
        lock(&self.orphans, "orphans")
    }

    /// Repairs to write (a recovered lock).
    fn fixes(&self) -> MutexGuard<'_, Vec<Fix>> {
        lock(&self.fixes, "fixes")
    }

    /// The index of local holders, a fatal lock: `None`, and the store halted, when a panic
    /// left it half-changed.
    fn held_index(&self) -> Option<MutexGuard<'_, HashMap<ProcessKey, BTreeSet<ResourceName>>>> {
        match self.held.lock() {
            Ok(held) => Some(held),
            Err(_) => {
                self.halt(crate::Halt::Poisoned {
                    state: "the index of this host's lease holders",
                });
                None
            }
        }
    }

    /// Stops the store for good (see [`crate::sync`]): says why, once; every later operation
    /// fails with [`StoreError::Halted`].
    fn halt(&self, why: crate::Halt) {
        if self.halted.set(why).is_ok() {
            error!(
                why = %why,
                "the etcd store halted: nothing more is granted or written; restart the agent"
            );
        }
    }

    /// Fails once the store has halted.
    fn running(&self) -> Result<(), StoreError> {
        match self.halted.get() {
            Some(why) => Err(StoreError::Halted(*why)),
            None => Ok(()),
        }
    }
}
