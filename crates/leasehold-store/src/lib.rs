//! Where leasehold's leases live.
//!
//! A [`Store`] is one host's connection to the lease state: it grants, releases and reports
//! leases with the rules of `leasehold-core`, and makes every grant, token and dirty mark
//! durable before it answers. Two stores exist or are planned:
//!
//! - [`LocalStore`], the embedded default: one host, state in one directory (a redb file),
//!   concurrent callers share one fsync (group commit);
//! - the etcd store, for clusters (a later addition).
//!
//! Every store must pass [`conformance`], the same suite of tests for the guarantees that
//! do not depend on how a store is built.
//!
//! ```no_run
//! # async fn demo() -> Result<(), leasehold_store::StoreError> {
//! use leasehold_core::{HostId, Mode, Owner, ResourceName};
//! use leasehold_store::{AcquireSpec, LocalStore, Store};
//!
//! let host = HostId::new("node1").unwrap();
//! let store = LocalStore::open("/var/lib/leasehold", host.clone())?;
//! let me = Owner::new(host, std::process::id(), 0);
//! let disk = ResourceName::new("vm1.qcow2").unwrap();
//! let grants = store
//!     .acquire(AcquireSpec::new(me, [(disk.clone(), Mode::Exclusive)]))
//!     .await?;
//! println!("token {}", grants[0].token);
//! # Ok(()) }
//! ```

use std::future::Future;
use std::time::Duration;

use leasehold_core::{
    AcquireError, Conflict, EndReason, Ended, Event, Grant, HostId, Mode, Owner, OwnerId,
    ProcessKey, ReleaseError, ReleaseKind, Released, ResourceName, Token,
};
pub use leasehold_core::{ResourceView, WaiterView};

mod clock;
pub mod conformance;
mod error;
/// The etcd store, for clusters.
pub mod etcd;
mod finish;
mod local;
mod sync;

pub use clock::Clock;
pub use error::{Cause, Halt};
pub use etcd::{EtcdHealth, EtcdOptions, EtcdSecurity, EtcdStore, EtcdUser, HistoryOptions};
pub use finish::Finish;
pub use local::{LocalStore, LocalStoreOptions};

/// A request for leases, all or none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcquireSpec {
    /// Who asks; its host must be the store's host.
    pub owner: Owner,
    /// The resources and modes asked for.
    pub items: Vec<(ResourceName, Mode)>,
    /// Whether the caller will check a dirty resource before using it.
    pub accept_dirty: bool,
    /// How long to wait for the resources to become free; `None` fails at once.
    pub wait: Option<Duration>,
    /// Resources to take only if their last token is still this one: nobody held them since
    /// the caller's own lease with it ended (a paused VM resuming, a migration arriving).
    pub expect_tokens: Vec<(ResourceName, leasehold_core::Token)>,
}

impl AcquireSpec {
    /// A request that does not wait and does not accept dirty resources.
    pub fn new(owner: Owner, items: impl IntoIterator<Item = (ResourceName, Mode)>) -> Self {
        AcquireSpec {
            owner,
            items: items.into_iter().collect(),
            accept_dirty: false,
            wait: None,
            expect_tokens: Vec::new(),
        }
    }

    /// The same request, waiting up to `d`.
    pub fn wait(mut self, d: Duration) -> Self {
        self.wait = Some(d);
        self
    }

    /// The same request, accepting dirty resources.
    pub fn accept_dirty(mut self) -> Self {
        self.accept_dirty = true;
        self
    }
}

/// This host's session with a shared backend, as the store last knew it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionState {
    /// The session (for etcd, the lease id).
    pub id: leasehold_core::SessionId,
    /// Its lifetime without renewal.
    pub ttl: Duration,
    /// When the last renewal that succeeded was *sent*: the backend cannot expire the session
    /// before this plus `ttl`. `None` before the first renewal.
    pub renewed_sent_at: Option<std::time::Instant>,
    /// Whether the backend said the session is gone; a new one follows when it can.
    pub expired: bool,
    /// Round trips of the most recent confirmed renewals, oldest first.
    pub latencies: Vec<std::time::Duration>,
    /// Renewals that failed since the last one confirmed.
    pub failed_renewals: u64,
}

impl SessionState {
    /// The last instant at which the session is sure to be alive.
    pub fn safe_until(&self) -> Option<std::time::Instant> {
        self.renewed_sent_at.map(|t| t + self.ttl)
    }
}

/// What `leasehold status` counts: known resources, leases held, processes holding them and
/// dirty resources.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Known resources.
    pub resources: u64,
    /// Leases held.
    pub leases: u64,
    /// Processes holding them.
    pub processes: u64,
    /// Resources marked dirty.
    pub dirty: u64,
}

impl Counts {
    /// The counts of `views` (what [`Store::list`] returned).
    #[must_use]
    pub fn of(views: &[ResourceView]) -> Counts {
        let processes: std::collections::BTreeSet<&leasehold_core::ProcessKey> = views
            .iter()
            .flat_map(|v| v.holders.iter().map(|l| &l.owner.process))
            .collect();
        Counts {
            resources: views.len() as u64,
            leases: views.iter().map(|v| v.holders.len() as u64).sum(),
            processes: processes.len() as u64,
            dirty: views.iter().filter(|v| v.dirty.is_some()).count() as u64,
        }
    }
}

/// One host's session on the backend, as `leasehold hosts` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostView {
    /// The host.
    pub host: HostId,
    /// Its session (for etcd, the lease id); `None` on the local store, which has no expiry.
    pub session: Option<leasehold_core::SessionId>,
    /// Whether the session is alive.
    pub alive: bool,
    /// Alive: when the session began; expired: when this agent saw it end (`None`: before
    /// this agent started).
    pub since: Option<leasehold_core::WallTime>,
    /// The leases its processes hold now (none once expired).
    pub leases: usize,
    /// The pid of its agent, as it recorded it.
    pub agent_pid: Option<u32>,
    /// About how long ago its session was last renewed (etcd counts whole seconds, and a
    /// leader change renews every session); `None` where unknown or not applicable.
    pub renewed_ago: Option<Duration>,
    /// How long its session lives without another renewal; `None` where it never expires.
    pub expires_in: Option<Duration>,
}

/// The leases of this host's holders by process; see [`Store::local_leases`].
pub type LocalLeases =
    std::collections::HashMap<ProcessKey, Option<Vec<(ResourceName, leasehold_core::Lease)>>>;

/// What a store calls when this host's session has ended; see [`Store::on_session_end`].
pub type SessionEndHook = Box<dyn Fn(leasehold_core::SessionId) + Send + Sync>;

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The lease rules refused the acquire.
    #[error(transparent)]
    Acquire(#[from] AcquireError),
    /// The lease rules refused the release, force-release or mark-clean.
    #[error(transparent)]
    Release(#[from] ReleaseError),
    /// The wait ended before the resources were free; this is who was in the way.
    #[error("timed out waiting: {0}")]
    TimedOut(Conflict),
    /// The request named a host other than the store's.
    #[error("this store serves host {ours}; the request is for host {theirs}")]
    WrongHost {
        /// The store's host.
        ours: HostId,
        /// The host named.
        theirs: HostId,
    },
    /// The durable storage failed; nothing of the failed operation took effect.
    #[error("storage failed: {0}")]
    Storage(#[source] Cause),
    /// The store was opened on state it cannot use (damaged, another store's, another host's,
    /// a format it cannot read); the cause says what to do, with the error under it.
    #[error("cannot use the state: {0}")]
    BadState(#[source] Cause),
    /// The store is shut down.
    #[error("the store is shut down")]
    Closed,
    /// The store stopped itself: state it must trust was left half-changed (a thread panicked
    /// while changing it). Nothing more is granted or written; restarting the agent rebuilds
    /// the state from the backend.
    #[error("the store stopped: {0}; restart the agent")]
    Halted(#[source] Halt),
    /// The shared backend could not be reached, or did not answer in time; nothing of the
    /// operation took effect, or it may be retried.
    #[error("backend unavailable: {0}")]
    Unavailable(#[source] Cause),
    /// The backend refuses this agent's settings (TLS, etcd user or password, rights):
    /// retrying cannot help; the message says what to change.
    #[error("{0}")]
    Misconfigured(#[source] Cause),
    /// etcd is out of space (its NOSPACE alarm): nothing was written; says what to run.
    #[error("{0}")]
    NoSpace(#[source] Cause),
    /// This host's session with the shared backend is gone; no lease can be taken until a
    /// new one is established.
    #[error("this host's session has expired; leases cannot be taken until a new one begins")]
    SessionLost,
    /// A stored record cannot be trusted: it does not decode, breaks the lease rules, or
    /// vanished while held. Nobody is granted the resource until an administrator repairs it.
    #[error(
        "the record of {resource} (key {key}) is damaged: {detail}; nobody is granted {resource} until it is repaired: find out who uses it, then run `leasehold force-release {resource} --reason TEXT`, which resets it to an empty record marked dirty"
    )]
    BadRecord {
        /// The store key of the record.
        key: String,
        /// The resource.
        resource: ResourceName,
        /// What is wrong with it.
        detail: String,
    },
    /// The host id is in use by another live agent.
    #[error(
        "host id {host} is in use by a live agent ({detail}); is another agent running with this host id?"
    )]
    HostInUse {
        /// The host id.
        host: HostId,
        /// Who uses it.
        detail: String,
    },
}

impl StoreError {
    /// Whether the same request may succeed later without anyone changing it: the backend
    /// did not answer, this host's session is being replaced, or storage was short of
    /// something. Work that must happen in the end (ending an exited holder's leases, the
    /// revoked leases of a lost session) retries on these and gives up on the rest.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable(_)
                | StoreError::SessionLost
                | StoreError::Misconfigured(_)
                | StoreError::NoSpace(_)
                | StoreError::Storage(_)
        )
    }
}

/// Refuses a request made for another host than the store's.
fn check_host(ours: &HostId, spec: &AcquireSpec) -> Result<(), StoreError> {
    if &spec.owner.process.host != ours {
        return Err(StoreError::WrongHost {
            ours: ours.clone(),
            theirs: spec.owner.process.host.clone(),
        });
    }
    Ok(())
}

/// One host's connection to the lease state.
///
/// Every method that changes state returns only after the change is durable. Operations on
/// one store are linearizable: a read issued after a write returns sees it.
pub trait Store: Send + Sync + 'static {
    /// The host this store serves.
    fn host(&self) -> &HostId;

    /// Takes leases on all of `spec.items` or none, waiting up to `spec.wait`.
    ///
    /// # Errors
    /// [`StoreError::Acquire`] with [`AcquireError::Busy`] when a resource is held and the
    /// request does not wait, or [`AcquireError::NeedsCheck`] when a free resource is dirty;
    /// [`StoreError::TimedOut`] when the wait ran out.
    ///
    /// # Cancel safety
    /// Dropping the future while it waits withdraws the request; a grant that raced with the
    /// drop is released cleanly, so no lease is left that nobody was told of.
    fn acquire(
        &self,
        spec: AcquireSpec,
    ) -> impl Future<Output = Result<Vec<Grant>, StoreError>> + Send;

    /// Ends the lease of the owner `owner_id` of `process` as it asks; with `token`, only
    /// the lease with exactly that token: a release that was on its way while the lease was
    /// force-released and the owner granted the resource again leaves the later lease alone
    /// (whichever transaction of the release is the one that commits).
    ///
    /// # Errors
    /// [`StoreError::Release`] when that owner does not hold the resource
    /// ([`ReleaseError::StaleToken`](leasehold_core::ReleaseError::StaleToken) when it holds
    /// it with another token than `token`: nothing is released), or the handover has nobody
    /// to go to (the lease is then kept).
    fn release(
        &self,
        resource: ResourceName,
        process: ProcessKey,
        owner_id: Option<OwnerId>,
        token: Option<Token>,
        kind: ReleaseKind,
    ) -> impl Future<Output = Result<Released, StoreError>> + Send;

    /// Ends every lease and waiting request of a process that has exited, of all its owner
    /// ids.
    ///
    /// # Errors
    /// [`StoreError::Storage`] or [`StoreError::Closed`].
    fn end_process(
        &self,
        process: ProcessKey,
    ) -> impl Future<Output = Result<Vec<Released>, StoreError>> + Send;

    /// [`Store::end_process`] for a process that exited with status 0: the leases whose
    /// owner chose [`OnExit::Status`](leasehold_core::OnExit::Status) end clean, the others as
    /// died.
    ///
    /// # Errors
    /// As [`Store::end_process`].
    fn end_exited_zero(
        &self,
        process: ProcessKey,
    ) -> impl Future<Output = Result<Vec<Released>, StoreError>> + Send;

    /// [`Store::end_process`] for a process the agent killed because it could not confirm
    /// the host's session in time: its leases are recorded as fenced.
    ///
    /// # Errors
    /// As [`Store::end_process`].
    fn end_fenced(
        &self,
        process: ProcessKey,
    ) -> impl Future<Output = Result<Vec<Released>, StoreError>> + Send {
        self.end_process(process)
    }

    /// Ends the leases named by resource and token as `how`, leaving out any that has
    /// already ended; their processes live on. The agent's end of a revocable holder's leases
    /// (`on_lost = revoke`) after its host session was lost: by token, so a lease its owner
    /// was granted since is not touched.
    ///
    /// # Errors
    /// As [`Store::end_process`].
    fn end_leases(
        &self,
        leases: Vec<(ResourceName, Token)>,
        how: EndReason,
    ) -> impl Future<Output = Result<Vec<Released>, StoreError>> + Send;

    /// Revokes every lease on `resource` (admin).
    ///
    /// # Errors
    /// [`StoreError::Release`] when nobody holds it or the reason is missing.
    fn force_release(
        &self,
        resource: ResourceName,
        reason: String,
        by: String,
    ) -> impl Future<Output = Result<Vec<Released>, StoreError>> + Send;

    /// Clears the dirty mark of `resource`; returns the mark it had.
    ///
    /// # Errors
    /// [`StoreError::Release`] with [`ReleaseError::Unknown`] for a resource never seen.
    fn mark_clean(
        &self,
        resource: ResourceName,
        by: String,
    ) -> impl Future<Output = Result<Option<Ended>, StoreError>> + Send;

    /// Whether `token` is the token of a live lease on `resource`.
    ///
    /// # Errors
    /// [`StoreError::Storage`] or [`StoreError::Closed`].
    fn validate(
        &self,
        resource: ResourceName,
        token: Token,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Who or what is in the way of `items` for `owner` now (`None`: nothing), with how
    /// long a grace period still blocks the resource; for telling a waiting caller.
    ///
    /// # Errors
    /// [`StoreError::Storage`], [`StoreError::Unavailable`] or [`StoreError::Closed`].
    fn conflict(
        &self,
        owner: Owner,
        items: Vec<(ResourceName, Mode)>,
    ) -> impl Future<Output = Result<Option<Conflict>, StoreError>> + Send;

    /// What is known about one resource.
    ///
    /// # Errors
    /// [`StoreError::Storage`] or [`StoreError::Closed`].
    fn inspect(
        &self,
        resource: ResourceName,
    ) -> impl Future<Output = Result<Option<ResourceView>, StoreError>> + Send;

    /// Every known resource, by name.
    ///
    /// # Errors
    /// [`StoreError::Storage`] or [`StoreError::Closed`].
    fn list(&self) -> impl Future<Output = Result<Vec<ResourceView>, StoreError>> + Send;

    /// The counts `status` shows. By default from [`Store::list`]; a store that can count
    /// without building every view says so (the local store, where 100,000 views cost their
    /// memory again just to be counted).
    ///
    /// # Errors
    /// As [`Store::list`].
    fn counts(&self) -> impl Future<Output = Result<Counts, StoreError>> + Send {
        async move { Ok(Counts::of(&self.list().await?)) }
    }

    /// Every host's session on the backend, by host id: the live ones, and those this agent
    /// saw end. The local store reports its own host.
    ///
    /// # Errors
    /// As [`Store::list`].
    fn hosts(&self) -> impl Future<Output = Result<Vec<HostView>, StoreError>> + Send;

    /// Lease events from now on, after they are durable: those of the resources this host
    /// holds, waits for or used lately, and sessions ending (on etcd, an agent watches only
    /// those; see [`Store::subscribe_all`] for every resource's).
    fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Event>;

    /// Every resource's lease events (`leasehold watch`), after they are durable: returns once
    /// every event made durable from then on reaches the receiver, in order, with none left
    /// out. A receiver that cannot be given them all ends instead: it lags (it read too
    /// slowly), or it is closed while the store runs (the etcd store's watch missed events:
    /// etcd compacted them); its caller must then read the state again. The etcd store
    /// watches the whole prefix for them only while a receiver lives.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when the backend cannot be followed yet.
    fn subscribe_all(
        &self,
    ) -> impl Future<Output = Result<tokio::sync::broadcast::Receiver<Event>, StoreError>> + Send
    {
        std::future::ready(Ok(self.subscribe()))
    }

    /// This host's session with a shared backend, for self-fencing; `None` for a store whose
    /// sessions never expire (the local store).
    fn session(&self) -> Option<tokio::sync::watch::Receiver<SessionState>> {
        None
    }

    /// Registers what must happen the moment the store learns that this host's session has
    /// ended (revoked, expired, lost): the agent kills every local holder of it. The store
    /// calls `hook` before it marks the session expired and before it opens a new one, so no
    /// holder of the old session carries on under the new. One hook; a later call replaces it.
    fn on_session_end(&self, hook: SessionEndHook) {
        let _ = hook;
    }

    /// The processes of this host that hold leases now, as far as this store's own commits
    /// tell (released and handed-over processes are not among them); `None` when the store
    /// keeps no such index. What a fence kills.
    fn local_holders(&self) -> Option<Vec<ProcessKey>> {
        None
    }

    /// Whether `process` holds a lease here now: `Some(false)` once it released (or handed
    /// over) every lease, `None` when the store cannot tell without asking its backend, or
    /// cannot answer. The agent leaves alone what an exited holder started when it held
    /// nothing any more at its death.
    fn holds_any(&self, process: &ProcessKey) -> impl Future<Output = Option<bool>> + Send {
        let known = self.local_holders().map(|h| h.contains(process));
        async move { known }
    }

    /// The leases of [`Store::local_holders`], by process, as far as this store knows them
    /// without asking its backend; `None` when it keeps no such index. A process is given
    /// `None` when the lease of one of its resources is not known here yet (its record not
    /// seen): the fence then treats it as a holder to kill.
    fn local_leases(&self) -> Option<LocalLeases> {
        None
    }

    /// etcd's space and history as last seen; `None` for a store without them.
    fn etcd_health(&self) -> Option<EtcdHealth> {
        None
    }

    /// Processes of this host recorded as holders under a session of this host that has
    /// ended: they hold nothing any more and must not write. The agent kills them at start.
    fn stale_holders(&self) -> Vec<ProcessKey> {
        Vec::new()
    }

    /// Notes for the callers of this host's waiting requests, such as why a request was
    /// queued again; a store that has none returns a channel that is closed.
    fn wait_notes(&self) -> tokio::sync::broadcast::Receiver<WaitNote> {
        tokio::sync::broadcast::channel(1).1
    }
}

/// Something the caller of a waiting request should be told while it waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitNote {
    /// The waiting process.
    pub process: ProcessKey,
    /// What its request waits for.
    pub items: Vec<(ResourceName, Mode)>,
    /// What happened, for people.
    pub note: String,
}
