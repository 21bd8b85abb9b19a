//! The etcd store.
//!
//! Every operation follows one pattern:
//!
//! 1. read a **snapshot** of the resources concerned, their waiters and grace keys, and the
//!    live host sessions, at one revision;
//! 2. run `leasehold-core`'s engine over it: live sessions never expire inside it, dead ones
//!    (a holder whose host key is gone) expire at once, so their exclusive resources become
//!    dirty and blocked for the grace; waiters of other hosts hold their place in the queues
//!    but only this host's waiters are decided here;
//! 3. **commit** what the engine changed in one transaction that compares the mod revision of
//!    every record it read (and, when it grants or queues for this host, that this host's
//!    session key is still on its lease). If anything moved, nothing is written and the
//!    operation starts again from a fresh snapshot.
//!
//! A grace is a key on an etcd lease of TTL `grace`, created by whoever clears a dead session's
//! holders, so it is measured by etcd from a moment no earlier than the expiry. Tokens are at
//! least the snapshot's revision + 1, and above the record's last token.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use leasehold_core::{
    AcquireError, AcquireRequest, Acquired, Conflict, EndReason, Ended, Engine, EngineConfig,
    Event, Grant, HostId, Meta, Now, Output, ProcessKey, ReleaseKind, ReleaseRequest, Released,
    ResourceName, ResourceState, ResourceView, Session, SessionId, Time, Token, WaiterId,
    WaiterView,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, broadcast, oneshot, watch};
use tracing::{debug, info, warn};

use super::client::{Etcd, EtcdError, EtcdSecurity, Txn, is_nospace, prefix_end, range_of};
use super::history::{EtcdHealth, HistoryOptions};
use super::keys::{HostValue, KeyKind, Keys, Record, WaiterValue};
use super::pb::mvccpb::KeyValue;
use crate::{AcquireSpec, Clock, SessionEndHook, SessionState, Store, StoreError, WaitNote};

/// How long a blocked resource stays blocked, to the engine: the grace key decides when it
/// ends, not the engine's clock.
const BLOCKED: Time = Time(u64::MAX);

/// etcd refuses transactions with more than this many compares or operations by default.
const MAX_TXN_OPS: usize = 128;

/// How many recent renewal round trips the session state keeps, for `status`.
const RECENT_RENEWALS: usize = 10;

/// How often the agent repeats its warning while etcd does not answer renewals.
const UNREACHABLE_WARN_EVERY: Duration = Duration::from_secs(2);

/// How often the waiter service looks again even without a change seen.
const WAITER_POLL: Duration = Duration::from_secs(1);

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

impl EtcdOptions {
    /// Options for `endpoints` with SPEC §4's defaults.
    pub fn new(endpoints: Vec<String>) -> EtcdOptions {
        EtcdOptions {
            endpoints,
            prefix: "/leasehold/".into(),
            ttl: Duration::from_secs(10),
            renew: Duration::from_millis(3333),
            grace: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            session_file: None,
            history: HistoryOptions::default(),
            security: EtcdSecurity::default(),
        }
    }
}

/// What a resource looked like in a snapshot.
#[derive(Debug, Clone, Default)]
struct ResSnap {
    record: Option<Record>,
    /// Why the stored record cannot be trusted (then `record` is `None`): the resource is
    /// refused to everyone.
    bad: Option<String>,
    mod_rev: i64,
    waiters: Vec<WaiterSnap>,
    grace: bool,
    /// The sessions whose `held` keys say they hold it: etcd lease id to the host named.
    held: BTreeMap<i64, String>,
}

impl ResSnap {
    /// A record missing, or missing a holder, while a session's `held` key says it holds
    /// the resource was changed outside leasehold (every commit writes both together): the
    /// resource is refused, not taken for free.
    fn judge_held(&mut self) {
        if self.bad.is_some() || self.held.is_empty() {
            return;
        }
        let holding = holding_sessions(self.record.as_ref());
        let missing: Vec<String> = self
            .held
            .iter()
            .filter(|(lease, _)| !holding.contains(lease))
            .map(|(lease, host)| format!("session {lease:x} of host {host}"))
            .collect();
        if missing.is_empty() {
            return;
        }
        self.bad = Some(if self.record.is_none() {
            format!(
                "it is missing while {} holds it (changed outside leasehold)",
                missing.join(", ")
            )
        } else {
            format!(
                "it lost the lease of {} without an ending (changed outside leasehold)",
                missing.join(", ")
            )
        });
        self.record = None;
    }
}

/// The sessions (etcd lease ids) with a holder in `record`.
fn holding_sessions(record: Option<&Record>) -> BTreeSet<i64> {
    record
        .iter()
        .flat_map(|r| r.state.holders.iter().map(|l| l.session.0 as i64))
        .collect()
}

/// The sessions named by `held` keys among `kvs`.
fn held_of<'a>(keys: &Keys, kvs: impl IntoIterator<Item = &'a KeyValue>) -> BTreeMap<i64, String> {
    kvs.into_iter()
        .filter_map(|kv| match keys.parse(&kv.key) {
            Some(KeyKind::Held(_, lease)) => {
                Some((lease, String::from_utf8_lossy(&kv.value).into_owned()))
            }
            _ => None,
        })
        .collect()
}

#[derive(Debug, Clone)]
struct WaiterSnap {
    id: u64,
    value: WaiterValue,
}

/// A consistent read of some resources and of the live sessions.
#[derive(Debug, Clone, Default)]
struct Snapshot {
    revision: i64,
    /// Live sessions: lease id to host.
    sessions: HashMap<i64, HostId>,
    res: BTreeMap<ResourceName, ResSnap>,
}

/// Every key under the prefix, as the watch last delivered it. Writes decide from it and
/// commit with compares, so a stale mirror costs a retry, never a wrong grant; outcomes that
/// write nothing are decided again on a fresh read.
#[derive(Debug, Default)]
struct Mirror {
    revision: i64,
    kvs: BTreeMap<Vec<u8>, KeyValue>,
    /// Live sessions: lease id to host.
    sessions: HashMap<i64, HostId>,
}

/// A waiting request of this host, under an id local to this store that stays the same for
/// as long as the request waits.
struct LocalWaiter {
    value: WaiterValue,
    /// Its keys, one per resource. They exist in etcd when `place` is set; otherwise they may,
    /// from a queueing whose outcome is unknown, and are deleted before the next one.
    keys: Vec<Vec<u8>>,
    /// The keys' create revision, which is the request's place in every queue (and its waiter
    /// id to the engine); `None` while it is not queued: its session ended, and it is queued
    /// again, at the back, under the next one.
    place: Option<u64>,
    /// Its caller gave up (its deadline passed, or it went away): it is never queued again.
    withdrawn: bool,
    reply: Option<oneshot::Sender<Result<Vec<Grant>, AcquireError>>>,
}

impl LocalWaiter {
    /// Whether nobody waits for this request any more.
    fn abandoned(&self) -> bool {
        self.withdrawn || self.reply.as_ref().is_none_or(|r| r.is_closed())
    }
}

/// What a withdrawn request that lost its place answers its caller, who has stopped waiting.
fn withdrawn() -> AcquireError {
    AcquireError::Cancelled("the request was withdrawn".into())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedSession {
    host: HostId,
    prefix: String,
    lease: i64,
}

struct Inner {
    host: HostId,
    keys: Keys,
    opts: EtcdOptions,
    etcd: Etcd,
    clock: Clock,
    session: watch::Sender<SessionState>,
    events: broadcast::Sender<Event>,
    changed: Notify,
    waiters: Mutex<BTreeMap<u64, LocalWaiter>>,
    /// The next local waiter id.
    next_waiter: std::sync::atomic::AtomicU64,
    /// Held while a local waiter's keys are written or deleted other than by a grant, so that
    /// a withdrawal and a queueing again never cross.
    queueing: tokio::sync::Mutex<()>,
    /// Notes for waiting callers.
    notes: broadcast::Sender<WaitNote>,
    /// The resources each local process holds, kept by this store's own commits (every grant
    /// to a local process is one of them).
    held: Mutex<HashMap<ProcessKey, BTreeSet<ResourceName>>>,
    /// Grants whose caller had gone when they were decided; released by the waiter service.
    orphans: Mutex<Vec<(ResourceName, ProcessKey)>>,
    /// Local processes recorded as holders under an ended session of this host, at open.
    stale: Mutex<Vec<ProcessKey>>,
    mirror: std::sync::RwLock<Mirror>,
    /// Called when this host's session is found ended, before anything else happens.
    session_end: Mutex<Option<SessionEndHook>>,
    /// etcd's space and history, as the history keeper last saw them.
    health: watch::Sender<EtcdHealth>,
    next_waiter_key: std::sync::atomic::AtomicU64,
    /// Repairs the watch found necessary, written by the watch task.
    fixes: Mutex<Vec<Fix>>,
    /// A test hook: the next fresh snapshot stops after its first read until released.
    pause_snapshot: Mutex<Option<(oneshot::Sender<()>, oneshot::Receiver<()>)>>,
}

/// A repair the watch found necessary.
#[derive(Debug)]
enum Fix {
    /// Put this marker where a record held here was deleted, unless a new one is there.
    Marker(Vec<u8>, Vec<u8>),
    /// Write this host's key again on this session.
    HostValue(i64),
    /// Revoke this ended session of this host.
    Revoke(i64),
}

/// A fresh snapshot stopped after its first read, for tests that script an interleaving
/// (see [`EtcdStore::pause_next_snapshot`]).
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

fn unavailable(e: EtcdError) -> StoreError {
    if is_nospace(&e) {
        return StoreError::NoSpace(super::history::NOSPACE_REMEDY.into());
    }
    if e.misconfigured {
        return StoreError::Misconfigured(e.to_string());
    }
    StoreError::Unavailable(e.to_string())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Encodes a value to store; never empty bytes in place of a value that failed to encode.
fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Storage(format!("cannot encode a value: {e}")))
}

/// A stored record, or why it cannot be trusted.
fn record_of(kv: Option<&KeyValue>) -> (Option<Record>, Option<String>) {
    match kv.map(|kv| Record::decode(&kv.value)) {
        None => (None, None),
        Some(Ok(r)) => (Some(r), None),
        Some(Err(d)) => (None, Some(d)),
    }
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
            Err(StoreError::Unavailable(m)) => {
                return Err(match etcd.diagnose().await {
                    Some(e) => StoreError::Misconfigured(format!("{e} (first error: {m})")),
                    None => StoreError::Unavailable(m),
                });
            }
            Err(e) => return Err(e),
        };
        let (session, _) = watch::channel(SessionState {
            id: SessionId(lease as u64),
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
            changed: Notify::new(),
            waiters: Mutex::new(BTreeMap::new()),
            next_waiter: std::sync::atomic::AtomicU64::new(1),
            queueing: tokio::sync::Mutex::new(()),
            notes: broadcast::channel(256).0,
            held: Mutex::new(HashMap::new()),
            orphans: Mutex::new(Vec::new()),
            stale: Mutex::new(Vec::new()),
            mirror: std::sync::RwLock::new(Mirror::default()),
            session_end: Mutex::new(None),
            health: watch::channel(EtcdHealth::default()).0,
            next_waiter_key: std::sync::atomic::AtomicU64::new(now_ms()),
            fixes: Mutex::new(Vec::new()),
            pause_snapshot: Mutex::new(None),
        });
        let start_rev = inner.load_mirror().await?;
        inner.load_held();
        inner.drop_old_waiters().await?;
        let tasks = vec![
            tokio::spawn(keep_session(Arc::clone(&inner))).abort_handle(),
            tokio::spawn(follow(Arc::clone(&inner), start_rev + 1)).abort_handle(),
            tokio::spawn(serve_waiters(Arc::clone(&inner))).abort_handle(),
            tokio::spawn(super::history::maintain(
                inner.etcd.clone(),
                super::history::members(
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
        if let Ok(mut p) = self.inner.pause_snapshot.lock() {
            *p = Some((reached_tx, resume_rx));
        }
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
        let id = self.inner.session.borrow().id.0 as i64;
        self.inner.etcd.lease_revoke(id).await.map_err(unavailable)
    }
}

/// The TTL etcd answered, in seconds, as a duration (deadlines follow what etcd enforces,
/// not what was asked).
fn granted(ttl: i64) -> Duration {
    Duration::from_secs(u64::try_from(ttl).unwrap_or(0))
}

/// Resumes the saved session if etcd still has it on this host's key, else creates one.
/// Returns the lease, when its last renewal was sent, and the TTL etcd granted it.
async fn establish(
    etcd: &Etcd,
    keys: &Keys,
    host: &HostId,
    opts: &EtcdOptions,
) -> Result<(i64, Instant, Duration), StoreError> {
    let saved: Option<SavedSession> = opts
        .session_file
        .as_ref()
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .filter(|s: &SavedSession| &s.host == host && s.prefix == keys.prefix());
    let (kvs, _) = etcd
        .range(keys.host(host), Vec::new(), 0)
        .await
        .map_err(unavailable)?;
    // A key on no lease belongs to no live agent (it was overwritten outside leasehold): it
    // is taken over, if nothing changes it meanwhile.
    let mut expect_mod = 0;
    if let Some(kv) = kvs.first().filter(|kv| kv.lease == 0) {
        warn!(host = %host, "this host's key is on no session (overwritten outside leasehold); taking it over");
        expect_mod = kv.mod_revision;
    } else if let Some(kv) = kvs.first() {
        let current: Option<HostValue> = serde_json::from_slice(&kv.value).ok();
        if let Some(saved) = &saved
            && kv.lease == saved.lease
        {
            let sent = Instant::now();
            let ttl = etcd
                .keep_alive_once(saved.lease)
                .await
                .map_err(unavailable)?;
            if ttl > 0 {
                info!(host = %host, lease = saved.lease, ttl, "resumed the host session");
                return Ok((saved.lease, sent, granted(ttl)));
            }
        }
        let detail = match current {
            Some(v) => format!(
                "agent pid {} holds its session (etcd lease {:x}) since {}",
                v.pid,
                v.lease,
                fmt_ms(v.since_ms)
            ),
            None => format!("etcd lease {:x} holds its key", kv.lease),
        };
        return Err(StoreError::HostInUse {
            host: host.clone(),
            detail,
        });
    }
    let sent = Instant::now();
    let (lease, ttl) = etcd.lease_grant(opts.ttl).await.map_err(unavailable)?;
    let value = HostValue {
        host: host.clone(),
        lease,
        pid: std::process::id(),
        since_ms: now_ms(),
    };
    let t = Txn::new().if_mod_revision(keys.host(host), expect_mod).put(
        keys.host(host),
        json(&value)?,
        lease,
    );
    let r = etcd.txn(t).await.map_err(unavailable)?;
    if !r.succeeded {
        let _ = etcd.lease_revoke(lease).await;
        return Err(StoreError::HostInUse {
            host: host.clone(),
            detail: "another agent registered it a moment ago".into(),
        });
    }
    if let Some(p) = &opts.session_file {
        let saved = SavedSession {
            host: host.clone(),
            prefix: keys.prefix().to_owned(),
            lease,
        };
        // For the agent's user only, never through a symbolic link.
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
        if let Some(dir) = p.parent() {
            let _ = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir);
        }
        if let Ok(b) = json(&saved) {
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(p)
                .and_then(|mut f| {
                    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
                    std::io::Write::write_all(&mut f, &b)
                });
        }
    }
    if granted(ttl) != opts.ttl {
        warn!(host = %host, lease, asked = ?opts.ttl, granted_secs = ttl, "etcd granted the session another ttl than asked; deadlines follow etcd's");
    }
    info!(host = %host, lease, ttl, "host session opened");
    Ok((lease, sent, granted(ttl)))
}

/// A wall-clock time for messages.
fn fmt_ms(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Renews the session every `renew`; on failure retries quickly; when etcd says the session
/// is gone, opens a new one.
async fn keep_session(inner: Arc<Inner>) {
    let mut next = tokio::time::Instant::now() + inner.opts.renew;
    // When the last "renewals failing" warning was logged, while they fail.
    let mut warned: Option<Instant> = None;
    loop {
        tokio::time::sleep_until(next).await;
        let state = inner.session.borrow().clone();
        let lease = state.id.0 as i64;
        if state.expired {
            match establish(&inner.etcd, &inner.keys, &inner.host, &inner.opts).await {
                Ok((lease, sent, ttl)) => {
                    inner.session.send_replace(SessionState {
                        id: SessionId(lease as u64),
                        ttl,
                        renewed_sent_at: Some(sent),
                        expired: false,
                        latencies: Vec::new(),
                        failed_renewals: 0,
                    });
                    inner.changed.notify_waiters();
                    next = tokio::time::Instant::now() + inner.opts.renew;
                }
                Err(e) => {
                    warn!(error = %e, "cannot open a new host session yet");
                    next = tokio::time::Instant::now() + Duration::from_millis(500);
                }
            }
            continue;
        }
        let sent = Instant::now();
        match inner.etcd.keep_alive_once(lease).await {
            Ok(ttl) if ttl > 0 => {
                inner.session.send_modify(|s| {
                    s.renewed_sent_at = Some(sent);
                    s.ttl = granted(ttl);
                    s.failed_renewals = 0;
                    if s.latencies.len() >= RECENT_RENEWALS {
                        s.latencies.remove(0);
                    }
                    s.latencies.push(sent.elapsed());
                });
                if warned.take().is_some() {
                    info!(lease, "session renewals confirmed again");
                }
                next = tokio::time::Instant::from_std(sent) + inner.opts.renew;
            }
            Ok(_) => {
                inner.session_ended(lease, "etcd answered the renewal: the lease is gone");
                next = tokio::time::Instant::now();
            }
            Err(e) => {
                inner.session.send_modify(|s| s.failed_renewals += 1);
                // Say so every few seconds while it lasts, not only at the fence.
                if warned.is_none_or(|w: Instant| w.elapsed() >= UNREACHABLE_WARN_EVERY) {
                    warned = Some(Instant::now());
                    let st = inner.session.borrow().clone();
                    let since = st.renewed_sent_at.map(|t| t.elapsed());
                    let safe_for = st
                        .safe_until()
                        .map(|t| t.saturating_duration_since(Instant::now()));
                    warn!(error = %e, lease, failed = st.failed_renewals, since_last_confirmed = ?since, safe_for = ?safe_for, "etcd is not answering session renewals; local holders are killed at the deadline if this lasts");
                }
                next = tokio::time::Instant::now() + Duration::from_millis(250);
            }
        }
    }
}

/// Follows every change under the prefix: publishes the events recorded in resource
/// records, notes expired sessions, and wakes the waiter service.
async fn follow(inner: Arc<Inner>, mut from: i64) {
    loop {
        let mut stream = match inner
            .etcd
            .watch(
                inner.keys.prefix().as_bytes().to_vec(),
                prefix_end(inner.keys.prefix().as_bytes()),
                from,
            )
            .await
        {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "watch failed; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        loop {
            let msg = match stream.message().await {
                Ok(Some(m)) => m,
                Ok(None) | Err(_) => break,
            };
            if msg.compact_revision > 0 {
                // Missed history: read everything again and follow from there.
                match inner.load_mirror().await {
                    Ok(rev) => from = rev + 1,
                    Err(_) => from = msg.compact_revision,
                }
                inner.changed.notify_waiters();
                break;
            }
            for ev in &msg.events {
                inner.apply_watch_event(ev);
            }
            inner.apply_fixes().await;
            if let Some(h) = &msg.header {
                from = from.max(h.revision + 1);
                if let Ok(mut m) = inner.mirror.write() {
                    m.revision = m.revision.max(h.revision);
                }
            }
            if !msg.events.is_empty() {
                inner.changed.notify_waiters();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Decides this host's waiting requests whenever something changes (and every second).
async fn serve_waiters(inner: Arc<Inner>) {
    loop {
        let notified = inner.changed.notified();
        inner.release_orphans().await;
        let ids: Vec<u64> = inner
            .waiters
            .lock()
            .map(|w| w.keys().copied().collect())
            .unwrap_or_default();
        for id in ids {
            if let Err(e) = inner.try_waiter(id).await {
                debug!(waiter = id, error = %e, "waiter not decided yet");
            }
        }
        let _ = tokio::time::timeout(WAITER_POLL, notified).await;
    }
}

impl Inner {
    fn now(&self) -> Now {
        self.clock.now()
    }

    /// This host's session `lease` has ended (etcd said so): runs the hook (the agent kills
    /// every local holder), then marks the session expired, which lets a new one be opened.
    /// Nothing happens for a lease that is not the current session, or twice for one.
    fn session_ended(&self, lease: i64, why: &str) {
        let current = self.session.borrow().clone();
        if current.expired || current.id.0 as i64 != lease {
            return;
        }
        warn!(lease, why, "this host's session has ended");
        if let Ok(hook) = self.session_end.lock()
            && let Some(hook) = hook.as_ref()
        {
            hook(current.id);
        }
        self.session.send_if_modified(|s| {
            let ended = s.id == current.id && !s.expired;
            if ended {
                s.expired = true;
            }
            ended
        });
    }

    fn lease(&self) -> Result<i64, StoreError> {
        let s = self.session.borrow();
        if s.expired {
            return Err(StoreError::SessionLost);
        }
        Ok(s.id.0 as i64)
    }

    /// Reads every key under the prefix into the mirror; returns its revision.
    async fn load_mirror(&self) -> Result<i64, StoreError> {
        let prefix = self.keys.prefix().as_bytes().to_vec();
        let (kvs, revision) = self
            .etcd
            .range(prefix.clone(), prefix_end(&prefix), 0)
            .await
            .map_err(unavailable)?;
        let mut m = Mirror {
            revision,
            ..Mirror::default()
        };
        for kv in kvs {
            if let Some(KeyKind::Host(h)) = self.keys.parse(&kv.key) {
                m.sessions.insert(kv.lease, h);
            }
            m.kvs.insert(kv.key.clone(), kv);
        }
        if let Ok(mut mirror) = self.mirror.write() {
            *mirror = m;
        }
        Ok(revision)
    }

    /// Deletes the waiting requests of this host left by an earlier agent (whose session this
    /// one resumed): nobody waits for them here, and they would stand in every queue ahead of
    /// the requests their callers make again.
    async fn drop_old_waiters(&self) -> Result<(), StoreError> {
        let old: Vec<Vec<u8>> = match self.mirror.read() {
            Ok(m) => {
                let from = self.keys.all_waiters();
                m.kvs
                    .range(from.clone()..prefix_end(&from))
                    .filter(|(_, kv)| {
                        serde_json::from_slice::<WaiterValue>(&kv.value)
                            .is_ok_and(|v| v.owner.process.host == self.host)
                    })
                    .map(|(k, _)| k.clone())
                    .collect()
            }
            Err(_) => return Ok(()),
        };
        for chunk in old.chunks(MAX_TXN_OPS) {
            let mut t = Txn::new();
            for k in chunk {
                t = t.delete(k.clone());
            }
            self.etcd.txn(t).await.map_err(unavailable)?;
        }
        if !old.is_empty() {
            info!(
                keys = old.len(),
                "dropped waiting requests of this host's previous agent; their callers ask again"
            );
        }
        Ok(())
    }

    /// Builds the index of this host's holders, and the list of stale ones, from the mirror.
    fn load_held(&self) {
        let current = self.session.borrow().id;
        let mut held = HashMap::<ProcessKey, BTreeSet<ResourceName>>::new();
        let mut stale = BTreeSet::new();
        if let Ok(m) = self.mirror.read() {
            let from = self.keys.resources();
            for (key, kv) in m.kvs.range(from.clone()..prefix_end(&from)) {
                let (Some(KeyKind::Resource(r)), Ok(rec)) =
                    (self.keys.parse(key), Record::decode(&kv.value))
                else {
                    continue;
                };
                for l in rec.state.holders {
                    if l.owner.process.host != self.host {
                        continue;
                    }
                    if l.session == current {
                        held.entry(l.owner.process).or_default().insert(r.clone());
                    } else {
                        stale.insert(l.owner.process);
                    }
                }
            }
        }
        if let Ok(mut h) = self.held.lock() {
            *h = held;
        }
        if let Ok(mut s) = self.stale.lock() {
            *s = stale.into_iter().collect();
        }
    }

    /// A snapshot of `names` from the mirror: no round trip, possibly stale.
    fn cached_snapshot(&self, names: &BTreeSet<ResourceName>) -> Snapshot {
        let Ok(m) = self.mirror.read() else {
            return Snapshot::default();
        };
        let mut snap = Snapshot {
            revision: m.revision,
            sessions: m.sessions.clone(),
            res: BTreeMap::new(),
        };
        for r in names {
            let rec = m.kvs.get(&self.keys.resource(r));
            let wp = self.keys.waiters(r);
            let hp = self.keys.held_of(r);
            let (record, bad) = record_of(rec);
            let mut rs = ResSnap {
                record,
                bad,
                mod_rev: rec.map_or(0, |kv| kv.mod_revision),
                waiters: m
                    .kvs
                    .range(wp.clone()..prefix_end(&wp))
                    .filter_map(|(_, kv)| {
                        Some(WaiterSnap {
                            id: kv.create_revision as u64,
                            value: serde_json::from_slice(&kv.value).ok()?,
                        })
                    })
                    .collect(),
                grace: m.kvs.contains_key(&self.keys.grace(r)),
                held: held_of(
                    &self.keys,
                    m.kvs.range(hp.clone()..prefix_end(&hp)).map(|(_, kv)| kv),
                ),
            };
            rs.judge_held();
            snap.res.insert(r.clone(), rs);
        }
        snap
    }

    /// Applies one watch event: to the mirror, and as lease events for subscribers (those
    /// recorded in a resource record, and the expiry of a host's session).
    fn apply_watch_event(&self, ev: &super::pb::mvccpb::Event) {
        let Some(kv) = &ev.kv else { return };
        let deleted = ev.r#type == super::pb::mvccpb::event::EventType::Delete as i32;
        let kind = self.keys.parse(&kv.key);
        let mut own_ended = None;
        let mut old = None;
        if let Ok(mut m) = self.mirror.write() {
            if deleted {
                old = m.kvs.remove(&kv.key);
                if let (Some(o), Some(KeyKind::Host(h))) = (&old, &kind) {
                    m.sessions.remove(&o.lease);
                    if h == &self.host {
                        own_ended = Some(o.lease);
                    }
                }
            } else {
                old = m.kvs.insert(kv.key.clone(), kv.clone());
                if let Some(KeyKind::Host(h)) = &kind {
                    // Liveness is the key's lease: a key moved off a lease ends that session.
                    if let Some(o) = &old
                        && o.lease != kv.lease
                    {
                        m.sessions.remove(&o.lease);
                    }
                    m.sessions.insert(kv.lease, h.clone());
                }
            }
        }
        if let Some(lease) = own_ended {
            // Revoked or expired: the holders go now, not at the next renewal.
            self.session_ended(lease, "this host's key was deleted in etcd");
        }
        match kind {
            Some(KeyKind::Resource(name)) => {
                let new = (!deleted).then(|| Record::decode(&kv.value));
                if let Some(Ok(rec)) = &new {
                    for e in &rec.events {
                        let _ = self.events.send(e.clone());
                    }
                }
                self.check_own_holders(&name, &kv.key, old.as_ref(), new.as_ref());
            }
            Some(KeyKind::Host(host)) if !deleted && host == self.host => {
                self.check_own_host_key(kv);
            }
            Some(KeyKind::Host(host)) if deleted => {
                let lease = ev.prev_kv.as_ref().map_or(0, |p| p.lease);
                let _ = self.events.send(Event::SessionExpired {
                    session: SessionId(lease as u64),
                    host,
                });
            }
            _ => {}
        }
    }

    /// A record that held leases of this host changed: a holder that vanished from it, or
    /// whose record no longer decodes, without an ending written by leasehold, must not go on
    /// writing. Its lease ends as force-released (the agent kills it), and a record deleted
    /// while held is replaced by a marker, so the resource stays refused until repaired.
    fn check_own_holders(
        &self,
        name: &ResourceName,
        key: &[u8],
        old: Option<&KeyValue>,
        new: Option<&Result<Record, String>>,
    ) {
        let Some(old) = old.and_then(|kv| Record::decode(&kv.value).ok()) else {
            return;
        };
        let ends = |l: &leasehold_core::Lease, rec: &Record| {
            rec.state
                .holders
                .iter()
                .any(|h| h.owner.process == l.owner.process && h.token == l.token)
                || rec.events.iter().any(|e| {
                    matches!(e, Event::Ended { ended, .. }
                        if ended.owner.process == l.owner.process && ended.token == l.token)
                })
        };
        let gone: Vec<&leasehold_core::Lease> = old
            .state
            .holders
            .iter()
            .filter(|l| l.owner.process.host == self.host)
            .filter(|l| match new {
                Some(Ok(rec)) => !ends(l, rec),
                _ => true,
            })
            .collect();
        if gone.is_empty() {
            return;
        }
        let key = String::from_utf8_lossy(key).into_owned();
        let why = match new {
            None => "was deleted".to_owned(),
            Some(Err(d)) => format!("was overwritten ({d})"),
            Some(Ok(_)) => "lost this lease without an ending".to_owned(),
        };
        let now = leasehold_core::WallTime(now_ms());
        for l in &gone {
            warn!(resource = %name, key = %key, pid = l.owner.process.pid, token = %l.token, why = %why,
                "the record of a lease held here changed outside leasehold; fencing its holder");
            let _ = self.events.send(Event::Ended {
                resource: name.clone(),
                ended: Ended {
                    owner: l.owner.clone(),
                    mode: l.mode,
                    token: l.token,
                    granted_at: l.granted_at,
                    ended_at: now,
                    how: leasehold_core::EndReason::Forced {
                        reason: format!("its record at {key} {why} outside leasehold"),
                        by: "leasehold".into(),
                    },
                },
                dirtied: l.mode == leasehold_core::Mode::Exclusive,
            });
            if let Ok(mut held) = self.held.lock()
                && let Some(set) = held.get_mut(&l.owner.process)
            {
                set.remove(name);
            }
        }
        if new.is_none() {
            let holders: Vec<String> = gone
                .iter()
                .map(|l| format!("{} (token {})", l.owner.process, l.token))
                .collect();
            let marker = Record {
                state: ResourceState {
                    holders: old.state.holders.clone(),
                    ..old.state.clone()
                },
                reserved_for: None,
                events: Vec::new(),
                damaged: Some(format!(
                    "it was deleted while {} held it; the holder was fenced",
                    holders.join(", ")
                )),
            };
            if let Ok(bytes) = json(&marker)
                && let Ok(mut f) = self.fixes.lock()
            {
                f.push(Fix::Marker(key.into_bytes(), bytes));
            }
        }
    }

    /// This host's key changed: a value that does not decode while the key is still on this
    /// session is written again; a key moved off this session (other hosts now take the
    /// session for dead) ends it: the holders are fenced and a new session is opened.
    fn check_own_host_key(&self, kv: &KeyValue) {
        let state = self.session.borrow().clone();
        let lease = state.id.0 as i64;
        if state.expired {
            return;
        }
        if kv.lease != lease {
            warn!(
                lease,
                now_on = kv.lease,
                "this host's key was overwritten and is no longer on its session"
            );
            self.session_ended(
                lease,
                "this host's key was overwritten in etcd; other hosts take the session for dead",
            );
            if let Ok(mut f) = self.fixes.lock() {
                f.push(Fix::Revoke(lease));
            }
            return;
        }
        if serde_json::from_slice::<HostValue>(&kv.value).is_ok_and(|v| v.lease == lease) {
            return;
        }
        warn!(
            lease,
            "this host's key holds a damaged value; writing it again"
        );
        if let Ok(mut f) = self.fixes.lock() {
            f.push(Fix::HostValue(lease));
        }
    }

    /// Writes what the watch found had to be repaired.
    async fn apply_fixes(&self) {
        let fixes = self
            .fixes
            .lock()
            .map(|mut f| std::mem::take(&mut *f))
            .unwrap_or_default();
        for fix in fixes {
            let r = match &fix {
                Fix::Marker(key, bytes) => {
                    // Only where nothing was written since: a new record is not overwritten.
                    let t = Txn::new().if_create_revision(key.clone(), 0).put(
                        key.clone(),
                        bytes.clone(),
                        0,
                    );
                    self.etcd.txn(t).await.map(|_| ())
                }
                Fix::HostValue(lease) => {
                    let value = HostValue {
                        host: self.host.clone(),
                        lease: *lease,
                        pid: std::process::id(),
                        since_ms: now_ms(),
                    };
                    let Ok(bytes) = json(&value) else { continue };
                    let key = self.keys.host(&self.host);
                    let t = Txn::new()
                        .if_lease(key.clone(), *lease)
                        .put(key, bytes, *lease);
                    self.etcd.txn(t).await.map(|_| ())
                }
                Fix::Revoke(lease) => {
                    // Best effort: unrenewed, it expires by itself within the TTL.
                    let _ = self.etcd.lease_revoke(*lease).await;
                    Ok(())
                }
            };
            if let Err(e) = r {
                warn!(error = %e, "could not write a repair yet; retrying");
                if let Ok(mut f) = self.fixes.lock() {
                    f.push(fix);
                }
            }
        }
    }

    /// Reads the resources `names` (with their waiters and grace keys) and the live sessions
    /// at one revision: the hosts and the first resources in one transaction, the rest as
    /// of that transaction's revision. A holder is judged dead only when its session's key
    /// was gone at the very revision its record was read.
    async fn snapshot(&self, names: &BTreeSet<ResourceName>) -> Result<Snapshot, StoreError> {
        let hosts = self.keys.hosts();
        let names: Vec<&ResourceName> = names.iter().collect();
        let mut chunks: Vec<&[&ResourceName]> = names.chunks((MAX_TXN_OPS - 1) / 3).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        let mut snap = Snapshot::default();
        for (n, chunk) in chunks.into_iter().enumerate() {
            let mut t = Txn::new();
            if n == 0 {
                t = t.get(hosts.clone(), prefix_end(&hosts));
            }
            for r in chunk {
                let wp = self.keys.waiters(r);
                t = t
                    .get_at(
                        self.keys.resource(r),
                        self.keys.resource_end(r),
                        snap.revision,
                    )
                    .get_at(wp.clone(), prefix_end(&wp), snap.revision)
                    .get_at(self.keys.grace(r), Vec::new(), snap.revision);
            }
            let res = self.etcd.txn(t).await.map_err(unavailable)?;
            let base = usize::from(n == 0);
            if n == 0 {
                snap.revision = res.revision;
                for kv in range_of(&res, 0) {
                    if let Some(KeyKind::Host(h)) = self.keys.parse(&kv.key) {
                        snap.sessions.insert(kv.lease, h);
                    }
                }
                self.pause_if_asked().await;
            }
            for (i, r) in chunk.iter().enumerate() {
                let at = base + 3 * i;
                let key = self.keys.resource(r);
                let rec = range_of(&res, at).iter().find(|kv| kv.key == key);
                let (record, bad) = record_of(rec);
                let mut rs = ResSnap {
                    record,
                    bad,
                    mod_rev: rec.map_or(0, |kv| kv.mod_revision),
                    waiters: Vec::new(),
                    grace: !range_of(&res, at + 2).is_empty(),
                    held: held_of(&self.keys, range_of(&res, at)),
                };
                for kv in range_of(&res, at + 1) {
                    if let Ok(value) = serde_json::from_slice::<WaiterValue>(&kv.value) {
                        rs.waiters.push(WaiterSnap {
                            id: kv.create_revision as u64,
                            value,
                        });
                    }
                }
                rs.judge_held();
                snap.res.insert((*r).clone(), rs);
            }
        }
        Ok(snap)
    }

    /// Stops here if a test asked for it (see [`EtcdStore::pause_next_snapshot`]).
    async fn pause_if_asked(&self) {
        let pause = self.pause_snapshot.lock().ok().and_then(|mut p| p.take());
        if let Some((reached, resume)) = pause {
            let _ = reached.send(());
            let _ = resume.await;
        }
    }

    /// The engine over a snapshot: live sessions, dead sessions due at once, records, queues,
    /// reservations. `decide` names this host's waiters it may grant.
    fn engine(&self, snap: &Snapshot, decide: &BTreeSet<u64>, now: Now) -> Engine {
        let mut sessions: BTreeMap<SessionId, Session> = BTreeMap::new();
        for (lease, host) in &snap.sessions {
            let id = SessionId(*lease as u64);
            sessions.insert(
                id,
                Session {
                    id,
                    host: host.clone(),
                    ttl: None,
                    expires_at: None,
                },
            );
        }
        let mut records = Vec::new();
        for (name, rs) in &snap.res {
            let mut st = rs
                .record
                .as_ref()
                .map(|r| r.state.clone())
                .unwrap_or_default();
            st.blocked_until = rs.grace.then_some(BLOCKED);
            for l in &st.holders {
                // A holder whose session is gone: a session that expires now, so the engine
                // ends its leases (dirty) and starts the grace.
                sessions.entry(l.session).or_insert_with(|| Session {
                    id: l.session,
                    host: l.owner.process.host.clone(),
                    ttl: Some(Duration::ZERO),
                    expires_at: Some(Time(0)),
                });
            }
            if rs.record.is_some() || rs.grace || !rs.waiters.is_empty() {
                records.push((name.clone(), st));
            }
        }
        let mut engine = Engine::restore(
            EngineConfig {
                grace: self.opts.grace,
            },
            Meta {
                next_token: 0,
                next_session: 1,
                sessions: sessions.into_values().collect(),
            },
            records,
        );
        engine.raise_token_floor(u64::try_from(snap.revision).unwrap_or(0) + 1);
        let mut seen = BTreeSet::new();
        for rs in snap.res.values() {
            for w in &rs.waiters {
                if !seen.insert(w.id) {
                    continue;
                }
                let req = AcquireRequest {
                    owner: w.value.owner.clone(),
                    session: SessionId(w.value.session),
                    items: w.value.items.clone(),
                    accept_dirty: w.value.accept_dirty,
                    wait: true,
                };
                let _ = engine.insert_waiter(WaiterId(w.id), req, decide.contains(&w.id));
            }
        }
        for (name, rs) in &snap.res {
            let reserved = rs
                .record
                .as_ref()
                .and_then(|r| r.reserved_for)
                .filter(|id| seen.contains(id));
            engine.set_reservation(name, reserved.map(WaiterId));
        }
        // Dead sessions expire now; what that changes is written with the operation.
        engine.tick(now);
        engine
    }

    /// Writes what the engine changed, if nothing it read has moved. Returns the commit's
    /// revision, or `None` when something moved (the caller starts again).
    async fn commit(
        &self,
        snap: &Snapshot,
        engine: &Engine,
        out: &Output,
        extra: Extra,
    ) -> Result<Option<i64>, StoreError> {
        let mut t = Txn::new();
        if let Some(lease) = extra.require_session {
            t = t.if_lease(self.keys.host(&self.host), lease);
        }
        let mut events: BTreeMap<&ResourceName, Vec<Event>> = BTreeMap::new();
        for e in &out.events {
            let r = match e {
                Event::Granted { resource, .. }
                | Event::Ended { resource, .. }
                | Event::Cleaned { resource, .. } => resource,
                Event::SessionExpired { .. } => continue,
            };
            events.entry(r).or_default().push(e.clone());
        }
        // A lease ended because its session looked dead: that session's host key must still
        // not be on it at commit, or nothing is written.
        let mut dead = BTreeSet::new();
        for name in &out.changed {
            let holders = snap
                .res
                .get(name)
                .and_then(|rs| rs.record.as_ref())
                .map(|r| r.state.holders.as_slice())
                .unwrap_or_default();
            for l in holders {
                let lease = l.session.0 as i64;
                if !snap.sessions.contains_key(&lease) {
                    dead.insert((l.owner.process.host.clone(), lease));
                }
            }
        }
        for (host, lease) in dead {
            t = t.if_lease_not(self.keys.host(&host), lease);
        }
        let mut graces = Vec::new();
        for name in &out.changed {
            let Some(rs) = snap.res.get(name) else {
                continue;
            };
            let st = engine.resource(name).cloned().unwrap_or_default();
            if st.blocked_until.is_some_and(|t| t != BLOCKED) && !rs.grace {
                graces.push(name.clone());
            }
            let rec = Record {
                reserved_for: st.reserved_for.map(|w| w.0),
                state: ResourceState {
                    blocked_until: None,
                    ..st
                },
                events: events.remove(name).unwrap_or_default(),
                damaged: None,
            };
            // The sessions that start or stop holding it get or lose their `held` key here,
            // with the record. A record written where there was none requires that no session
            // claims it (a record deleted outside leasehold is not free).
            let before = holding_sessions(rs.record.as_ref());
            let mut after = BTreeMap::new();
            for l in &rec.state.holders {
                after.insert(l.session.0 as i64, l.owner.process.host.to_string());
            }
            for lease in before.iter().filter(|l| !after.contains_key(l)) {
                t = t.delete(self.keys.held(name, *lease));
            }
            for (lease, host) in after.iter().filter(|(l, _)| !before.contains(l)) {
                t = t.put(
                    self.keys.held(name, *lease),
                    host.clone().into_bytes(),
                    *lease,
                );
            }
            t = if rs.record.is_none() && rs.mod_rev == 0 {
                // Neither the record nor a held key: a record deleted outside leasehold is not
                // taken for free.
                t.if_none_created_after(self.keys.resource(name), self.keys.resource_end(name), 0)
            } else {
                t.if_mod_revision(self.keys.resource(name), rs.mod_rev)
            };
            t = t.put(self.keys.resource(name), json(&rec)?, 0);
        }
        for key in &extra.delete {
            t = t
                .if_create_revision(key.0.clone(), key.1)
                .delete(key.0.clone());
        }
        for (key, value, lease) in &extra.put {
            t = t.put(key.clone(), value.clone(), *lease);
        }
        if !graces.is_empty() {
            let (grace_lease, _) = self
                .etcd
                .lease_grant(self.opts.grace)
                .await
                .map_err(unavailable)?;
            for r in &graces {
                t = t.if_create_revision(self.keys.grace(r), 0).put(
                    self.keys.grace(r),
                    Vec::new(),
                    grace_lease,
                );
            }
        }
        // A request granted beside holders must not jump a request queued behind them that
        // the decision did not see (the mirror may lag): no waiter of such a resource may be
        // newer than the snapshot. (Where the snapshot saw it free or changed since, the
        // record's compare already covers it.) Per resource, or for all at once where etcd's
        // limit leaves no room.
        let joined: Vec<&ResourceName> = out
            .changed
            .iter()
            .filter(|n| {
                snap.res
                    .get(*n)
                    .and_then(|rs| rs.record.as_ref())
                    .is_some_and(|r| !r.state.holders.is_empty())
            })
            .collect();
        if t.size() + joined.len() <= MAX_TXN_OPS {
            for name in joined {
                let w = self.keys.waiters(name);
                t = t.if_none_created_after(w.clone(), prefix_end(&w), snap.revision);
            }
        } else {
            let w = self.keys.all_waiters();
            t = t.if_none_created_after(w.clone(), prefix_end(&w), snap.revision);
        }
        if t.size() > MAX_TXN_OPS {
            return Err(StoreError::Acquire(AcquireError::Invalid(format!(
                "this request needs a transaction of {} operations; etcd allows {MAX_TXN_OPS}: name fewer resources",
                t.size()
            ))));
        }
        let r = self.etcd.txn(t).await.map_err(unavailable)?;
        if !r.succeeded {
            return Ok(None);
        }
        self.note_holders(engine, &out.changed);
        Ok(Some(r.revision))
    }

    /// Updates the index of local holders after a commit.
    fn note_holders(&self, engine: &Engine, changed: &BTreeSet<ResourceName>) {
        let Ok(mut held) = self.held.lock() else {
            return;
        };
        for name in changed {
            for set in held.values_mut() {
                set.remove(name);
            }
            if let Some(st) = engine.resource(name) {
                for l in &st.holders {
                    if l.owner.process.host == self.host {
                        held.entry(l.owner.process.clone())
                            .or_default()
                            .insert(name.clone());
                    }
                }
            }
        }
        held.retain(|_, s| !s.is_empty());
    }

    /// Runs `op` on the engine over a fresh snapshot of `names`, commits, and retries from a
    /// new snapshot while something moved in between.
    async fn transact<T>(
        &self,
        names: BTreeSet<ResourceName>,
        mut op: impl FnMut(&mut Engine, Now, &Snapshot) -> Result<(T, Extra), StoreError>,
    ) -> Result<(T, Output, i64), StoreError> {
        let deadline = Instant::now() + self.opts.timeout * 5;
        // The first attempt decides from the mirror; a decision that writes nothing, or whose
        // compares fail, is made again on a fresh read.
        let mut fresh = false;
        loop {
            let snap = if fresh {
                self.snapshot(&names).await?
            } else {
                self.cached_snapshot(&names)
            };
            if let Some((name, detail)) = snap
                .res
                .iter()
                .find_map(|(n, rs)| rs.bad.as_ref().map(|d| (n, d)))
            {
                // Never act on a record that cannot be trusted; the mirror may be behind a
                // repair, so only a fresh read decides.
                if fresh {
                    return Err(self.bad_record(name, detail));
                }
                fresh = true;
                continue;
            }
            let now = self.now();
            let mut engine = self.engine(&snap, &BTreeSet::new(), now);
            let (value, extra) = op(&mut engine, now, &snap)?;
            let out = engine.take_output();
            if !writes(&out) && extra.is_empty() {
                if fresh {
                    return Ok((value, out, snap.revision));
                }
                fresh = true;
                continue;
            }
            if let Some(rev) = self.commit(&snap, &engine, &out, extra).await? {
                return Ok((value, out, rev));
            }
            fresh = true;
            if Instant::now() > deadline {
                return Err(StoreError::Unavailable(
                    "too much contention on these resources; try again".into(),
                ));
            }
        }
    }

    /// Tries to decide local waiter `id`; queues it again if its place was lost.
    async fn try_waiter(&self, id: u64) -> Result<(), StoreError> {
        let (value, place, abandoned) = match self.waiters.lock().ok().and_then(|w| {
            w.get(&id)
                .map(|w| (w.value.clone(), w.place, w.abandoned()))
        }) {
            Some(v) => v,
            None => return Ok(()),
        };
        if abandoned && place.is_some() {
            // Its caller went away without withdrawing it (cut off as it was queued).
            self.withdraw(id).await?;
            return Ok(());
        }
        let Some(place) = place else {
            return self.requeue(id).await;
        };
        let names: BTreeSet<ResourceName> = value.items.iter().map(|(r, _)| r.clone()).collect();
        // Decided from the mirror (every change wakes this service after the mirror has it);
        // a grant still commits with compares.
        let mut snap = self.cached_snapshot(&names);
        let there = |snap: &Snapshot| {
            snap.res
                .values()
                .any(|rs| rs.waiters.iter().any(|w| w.id == place))
        };
        if !there(&snap) {
            // The mirror may not have the keys yet: only a fresh read can say they are gone.
            snap = self.snapshot(&names).await?;
        }
        if !there(&snap) {
            // Read after the keys were seen gone: the snapshot's sessions may be older.
            let (host, _) = self
                .etcd
                .range(self.keys.host(&self.host), Vec::new(), 0)
                .await
                .map_err(unavailable)?;
            let session_ended = host
                .first()
                .is_none_or(|kv| kv.lease != value.session as i64);
            return self.lost_place(id, place, session_ended).await;
        }
        if snap.res.values().any(|rs| rs.bad.is_some()) {
            // A resource whose record cannot be trusted is granted to nobody; the request
            // waits until an administrator repairs it, or its time runs out.
            return Ok(());
        }
        let now = self.now();
        let mut engine = self.engine(&snap, &BTreeSet::from([place]), now);
        engine.serve_waiters(names.iter().cloned(), now);
        let out = engine.take_output();
        let outcome = out
            .waiters
            .iter()
            .find(|(w, _)| w.0 == place)
            .map(|(_, r)| r.clone());
        let mut extra = Extra::default();
        if let Some(outcome) = &outcome {
            let keys = self
                .waiters
                .lock()
                .ok()
                .and_then(|w| w.get(&id).map(|w| w.keys.clone()))
                .unwrap_or_default();
            extra.delete = keys.into_iter().map(|k| (k, place as i64)).collect();
            if outcome.is_ok() {
                extra.require_session = Some(self.lease()?);
            }
        }
        if !writes(&out) && extra.is_empty() {
            return Ok(());
        }
        if self.commit(&snap, &engine, &out, extra).await?.is_some()
            && let Some(outcome) = outcome
        {
            self.finish_waiter(id, outcome);
        }
        Ok(())
    }

    /// Local waiter `id`'s keys, queued at `place`, are gone though nobody decided or withdrew
    /// it: they lived on this host's session, which ended while it waited (etcd stalled or
    /// was unreachable past the ttl). Only the caller's own deadline ends a wait, so it is
    /// queued again, at the back of every queue, under the host's next session; its caller
    /// is told why.
    async fn lost_place(&self, id: u64, place: u64, session_ended: bool) -> Result<(), StoreError> {
        let note = {
            let _q = self.queueing.lock().await;
            let Ok(mut w) = self.waiters.lock() else {
                return Ok(());
            };
            let Some(lw) = w.get_mut(&id) else {
                return Ok(());
            };
            if lw.place != Some(place) {
                // Withdrawn or queued again meanwhile.
                return Ok(());
            }
            if lw.abandoned() {
                drop(w);
                self.finish_waiter(id, Err(withdrawn()));
                return Ok(());
            }
            lw.place = None;
            lw.keys.clear();
            let why = if session_ended {
                "this host's session with etcd ended while the request waited (etcd stalled or unreachable past the ttl)"
            } else {
                "its place in the queue was removed from etcd"
            };
            WaitNote {
                process: lw.value.owner.process.clone(),
                items: lw.value.items.clone(),
                note: format!("{why}; it will be queued again under the host's new session"),
            }
        };
        warn!(waiter = id, place, "{}", note.note);
        let _ = self.notes.send(note);
        self.requeue(id).await
    }

    /// Queues local waiter `id` again, at the back, under the current session (when there is
    /// one; else it waits for the next).
    async fn requeue(&self, id: u64) -> Result<(), StoreError> {
        let Ok(lease) = self.lease() else {
            return Ok(());
        };
        let _q = self.queueing.lock().await;
        let Some((mut value, old_keys, abandoned)) = self.waiters.lock().ok().and_then(|w| {
            let lw = w.get(&id)?;
            if lw.place.is_some() {
                return None;
            }
            Some((lw.value.clone(), lw.keys.clone(), lw.abandoned()))
        }) else {
            return Ok(());
        };
        if !old_keys.is_empty() {
            // An earlier attempt whose outcome is unknown may have written these.
            let mut t = Txn::new();
            for k in &old_keys {
                t = t.delete(k.clone());
            }
            self.etcd.txn(t).await.map_err(unavailable)?;
            if let Ok(mut w) = self.waiters.lock()
                && let Some(lw) = w.get_mut(&id)
            {
                lw.keys.clear();
            }
        }
        if abandoned {
            self.finish_waiter(id, Err(withdrawn()));
            return Ok(());
        }
        value.session = lease as u64;
        let n = self
            .next_waiter_key
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let keys: Vec<Vec<u8>> = value
            .items
            .iter()
            .map(|(r, _)| self.keys.waiter(r, &self.host, n))
            .collect();
        if let Ok(mut w) = self.waiters.lock()
            && let Some(lw) = w.get_mut(&id)
        {
            lw.keys = keys.clone();
        }
        let v = json(&value)?;
        let mut t = Txn::new().if_lease(self.keys.host(&self.host), lease);
        for k in &keys {
            t = t.if_create_revision(k.clone(), 0);
        }
        for k in &keys {
            t = t.put(k.clone(), v.clone(), lease);
        }
        let r = self.etcd.txn(t).await.map_err(unavailable)?;
        if !r.succeeded {
            // The session moved on again: nothing was written; try under the next one.
            if let Ok(mut w) = self.waiters.lock()
                && let Some(lw) = w.get_mut(&id)
            {
                lw.keys.clear();
            }
            return Ok(());
        }
        let note = {
            let Ok(mut w) = self.waiters.lock() else {
                return Ok(());
            };
            let Some(lw) = w.get_mut(&id) else {
                return Ok(());
            };
            lw.place = Some(r.revision as u64);
            lw.value = value;
            WaitNote {
                process: lw.value.owner.process.clone(),
                items: lw.value.items.clone(),
                note: "queued again, at the back of the queue, under the host's new session".into(),
            }
        };
        info!(waiter = id, place = r.revision, "{}", note.note);
        let _ = self.notes.send(note);
        self.changed.notify_waiters();
        Ok(())
    }

    fn finish_waiter(&self, id: u64, outcome: Result<Vec<Grant>, AcquireError>) {
        let Some(mut w) = self.waiters.lock().ok().and_then(|mut w| w.remove(&id)) else {
            return;
        };
        let process = w.value.owner.process.clone();
        if let Some(reply) = w.reply.take()
            && let Err(Ok(grants)) = reply.send(outcome)
        {
            // Nobody is waiting for it any more: give it back.
            warn!(waiter = id, "a grant found its caller gone; releasing it");
            if let Ok(mut o) = self.orphans.lock() {
                o.extend(
                    grants
                        .into_iter()
                        .filter(|g| !g.existing)
                        .map(|g| (g.resource, process.clone())),
                );
            }
            self.changed.notify_one();
        }
    }

    /// Releases grants whose caller went away before learning of them.
    async fn release_orphans(&self) {
        let orphans = self
            .orphans
            .lock()
            .map(|mut o| std::mem::take(&mut *o))
            .unwrap_or_default();
        for (resource, process) in orphans {
            let r = self
                .transact(BTreeSet::from([resource.clone()]), |engine, now, _| {
                    let r = engine.release(
                        ReleaseRequest {
                            resource: resource.clone(),
                            process: process.clone(),
                            kind: ReleaseKind::Clean,
                        },
                        now,
                    );
                    Ok((r, Extra::default()))
                })
                .await;
            if let Err(e) = r {
                warn!(resource = %resource, error = %e, "could not release an orphaned grant; retrying");
                if let Ok(mut o) = self.orphans.lock() {
                    o.push((resource, process));
                }
            }
        }
    }

    /// The error for acting on `name`, whose record cannot be trusted.
    fn bad_record(&self, name: &ResourceName, detail: &str) -> StoreError {
        let key = String::from_utf8_lossy(&self.keys.resource(name)).into_owned();
        warn!(resource = %name, key = %key, detail, "refused to act on a damaged record; repair it with force-release");
        StoreError::BadRecord {
            key,
            resource: name.clone(),
            detail: detail.to_owned(),
        }
    }

    /// Replaces a record that cannot be trusted with an empty one marked dirty (an admin's
    /// force-release). Returns `None` when the record is sound (force-release proceeds as
    /// usual), else the leases it recorded, now ended.
    async fn repair(
        &self,
        resource: &ResourceName,
        reason: &str,
        by: &str,
    ) -> Result<Option<Vec<Released>>, StoreError> {
        loop {
            let snap = self.snapshot(&BTreeSet::from([resource.clone()])).await?;
            let Some(rs) = snap.res.get(resource) else {
                return Ok(None);
            };
            let Some(detail) = &rs.bad else {
                return Ok(None);
            };
            if reason.trim().is_empty() {
                return Err(StoreError::Release(leasehold_core::ReleaseError::Invalid(
                    "a force-release needs a reason".into(),
                )));
            }
            let key = self.keys.resource(resource);
            let (kvs, _) = self
                .etcd
                .range(key.clone(), Vec::new(), snap.revision)
                .await
                .map_err(unavailable)?;
            // What can still be read of it (a marker keeps the holders last seen).
            let old: Option<Record> = kvs
                .first()
                .and_then(|kv| serde_json::from_slice(&kv.value).ok());
            let holders = old.map(|r| r.state.holders).unwrap_or_default();
            let now = leasehold_core::WallTime(now_ms());
            let how = leasehold_core::EndReason::Forced {
                reason: format!("{reason} (repairing a damaged record: {detail})"),
                by: by.to_owned(),
            };
            let ended: Vec<Ended> = if holders.is_empty() {
                let mut owner = leasehold_core::Owner::new(self.host.clone(), 0, 0);
                owner.label = Some("unknown (the record was damaged)".into());
                vec![Ended {
                    owner,
                    mode: leasehold_core::Mode::Exclusive,
                    token: Token(0),
                    granted_at: leasehold_core::WallTime(0),
                    ended_at: now,
                    how: how.clone(),
                }]
            } else {
                holders
                    .iter()
                    .map(|l| Ended {
                        owner: l.owner.clone(),
                        mode: l.mode,
                        token: l.token,
                        granted_at: l.granted_at,
                        ended_at: now,
                        how: how.clone(),
                    })
                    .collect()
            };
            let released: Vec<Released> = holders
                .iter()
                .zip(&ended)
                .map(|(_, e)| Released {
                    resource: resource.clone(),
                    ended: e.clone(),
                    dirtied: true,
                })
                .collect();
            let rec = Record {
                state: ResourceState {
                    // Tokens stay above every earlier grant: they follow etcd's revision.
                    last_token: Token(u64::try_from(snap.revision).unwrap_or(0)),
                    dirty: ended.first().cloned(),
                    last_ended: ended.first().cloned(),
                    ..ResourceState::default()
                },
                reserved_for: None,
                events: released
                    .iter()
                    .map(|r| Event::Ended {
                        resource: resource.clone(),
                        ended: r.ended.clone(),
                        dirtied: true,
                    })
                    .collect(),
                damaged: None,
            };
            let hp = self.keys.held_of(resource);
            let t = Txn::new()
                .if_mod_revision(key.clone(), rs.mod_rev)
                .put(key, json(&rec)?, 0)
                .delete_range(hp.clone(), prefix_end(&hp));
            if self.etcd.txn(t).await.map_err(unavailable)?.succeeded {
                warn!(resource = %resource, by, reason, "damaged record reset to an empty record marked dirty");
                return Ok(Some(released));
            }
        }
    }

    /// Ends every lease and waiting request of an exited local process, recording `how`.
    async fn end_process_as(
        &self,
        process: ProcessKey,
        how: EndReason,
    ) -> Result<Vec<Released>, StoreError> {
        let inner = self;
        // Its waiting requests go first.
        let mine: Vec<u64> = inner
            .waiters
            .lock()
            .map(|w| {
                w.iter()
                    .filter(|(_, v)| v.value.owner.process == process)
                    .map(|(id, _)| *id)
                    .collect()
            })
            .unwrap_or_default();
        for id in mine {
            if inner.withdraw(id).await? {
                // The request's caller learns of it through its closed channel.
            }
        }
        let mut names = inner
            .held
            .lock()
            .ok()
            .and_then(|h| h.get(&process).cloned())
            .unwrap_or_default();
        loop {
            if names.is_empty() {
                return Ok(Vec::new());
            }
            match inner
                .transact(names.clone(), |engine, now, _| {
                    Ok((
                        engine.end_process_as(&process, how.clone(), now),
                        Extra::default(),
                    ))
                })
                .await
            {
                // A damaged record is left for the administrator; the others are ended.
                Err(StoreError::BadRecord { resource, .. }) => {
                    names.remove(&resource);
                    if let Ok(mut h) = inner.held.lock()
                        && let Some(set) = h.get_mut(&process)
                    {
                        set.remove(&resource);
                    }
                }
                r => return r.map(|(r, _, _)| r),
            }
        }
    }

    /// Withdraws local waiter `id`. Returns false when it was decided first, or its keys were
    /// gone with its session: its caller then hears the grant, or that it was withdrawn, on
    /// its channel.
    async fn withdraw(&self, id: u64) -> Result<bool, StoreError> {
        let _q = self.queueing.lock().await;
        let Some((keys, place)) = self.waiters.lock().ok().and_then(|mut w| {
            let lw = w.get_mut(&id)?;
            lw.withdrawn = true;
            Some((lw.keys.clone(), lw.place))
        }) else {
            return Ok(false);
        };
        let mut t = Txn::new();
        if let Some(place) = place {
            // Not if a grant took its keys first.
            for k in &keys {
                t = t.if_create_revision(k.clone(), place as i64);
            }
        }
        for k in &keys {
            t = t.delete(k.clone());
        }
        let succeeded = keys.is_empty() || self.etcd.txn(t).await.map_err(unavailable)?.succeeded;
        if succeeded {
            if let Ok(mut w) = self.waiters.lock() {
                w.remove(&id);
            }
            self.changed.notify_waiters();
        }
        Ok(succeeded)
    }

    fn view(&self, name: &ResourceName, rs: &ResSnap, snap: &Snapshot) -> Option<ResourceView> {
        let rec = rs.record.as_ref();
        if rec.is_none() && rs.bad.is_none() && rs.waiters.is_empty() && !rs.grace {
            return None;
        }
        let state = rec.map(|r| r.state.clone()).unwrap_or_default();
        let mut waiters: Vec<&WaiterSnap> = rs.waiters.iter().collect();
        waiters.sort_by_key(|w| w.id);
        Some(ResourceView {
            resource: name.clone(),
            holders: state
                .holders
                .iter()
                .filter(|l| snap.sessions.contains_key(&(l.session.0 as i64)))
                .cloned()
                .collect(),
            dirty: state.dirty.clone().or_else(|| {
                // A dead session's exclusive holder leaves the resource dirty once anyone
                // touches it; show it so now.
                state
                    .holders
                    .iter()
                    .find(|l| {
                        l.mode == leasehold_core::Mode::Exclusive
                            && !snap.sessions.contains_key(&(l.session.0 as i64))
                    })
                    .map(|l| Ended {
                        owner: l.owner.clone(),
                        mode: l.mode,
                        token: l.token,
                        granted_at: l.granted_at,
                        ended_at: leasehold_core::WallTime(now_ms()),
                        how: leasehold_core::EndReason::SessionExpired,
                    })
            }),
            last_ended: state.last_ended.clone(),
            last_token: state.last_token,
            waiters: waiters
                .iter()
                .map(|w| WaiterView {
                    owner: w.value.owner.clone(),
                    mode: w
                        .value
                        .items
                        .iter()
                        .find(|(r, _)| r == name)
                        .map_or(leasehold_core::Mode::Exclusive, |(_, m)| *m),
                })
                .collect(),
            blocked_for: rs.grace.then_some(self.opts.grace),
            handover_pending: rec.and_then(|r| r.reserved_for).is_some(),
            damaged: rs.bad.as_ref().map(|d| {
                format!(
                    "record at key {}: {d}; find out who uses it, then `leasehold force-release {name} --reason TEXT` resets it to an empty record marked dirty",
                    String::from_utf8_lossy(&self.keys.resource(name))
                )
            }),
        })
    }
}

/// Whether the engine changed a record. (Its metadata, which the token floor marks changed,
/// is not kept in etcd: tokens come from records and revisions.)
fn writes(out: &Output) -> bool {
    !out.changed.is_empty()
}

/// What a commit writes besides records.
#[derive(Debug, Default)]
struct Extra {
    /// Keys to delete, each only if its create revision is still the one given.
    delete: Vec<(Vec<u8>, i64)>,
    /// Keys to put, with their lease.
    put: Vec<(Vec<u8>, Vec<u8>, i64)>,
    /// Require this host's key to be on this lease (the session is alive) at commit.
    require_session: Option<i64>,
}

impl Extra {
    fn is_empty(&self) -> bool {
        self.delete.is_empty() && self.put.is_empty()
    }
}

/// How an acquire left its queueing step: granted at once, or queued as local waiter `id`.
enum Queueing {
    Granted(Vec<Grant>),
    Queued(u64, oneshot::Receiver<Result<Vec<Grant>, AcquireError>>),
}

/// Withdraws a waiting request whose caller went away.
struct WaitGuard {
    inner: Arc<Inner>,
    id: u64,
    armed: bool,
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let inner = Arc::clone(&self.inner);
        let id = self.id;
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                // If it was granted meanwhile, finish_waiter found no caller and logged it.
                let _ = inner.withdraw(id).await;
            });
        }
    }
}

impl Store for EtcdStore {
    fn host(&self) -> &HostId {
        &self.inner.host
    }

    async fn acquire(&self, spec: AcquireSpec) -> Result<Vec<Grant>, StoreError> {
        let inner = &self.inner;
        crate::check_host(&inner.host, &spec)?;
        let lease = inner.lease()?;
        let names: BTreeSet<ResourceName> = spec.items.iter().map(|(r, _)| r.clone()).collect();
        let n = inner
            .next_waiter_key
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let waiter_keys: Vec<Vec<u8>> = names
            .iter()
            .map(|r| inner.keys.waiter(r, &inner.host, n))
            .collect();
        let value = WaiterValue {
            owner: spec.owner.clone(),
            session: lease as u64,
            items: spec.items.clone(),
            accept_dirty: spec.accept_dirty,
        };
        // Queueing runs as a task of its own, so that a caller who goes away cannot cut it
        // between writing the waiter keys and registering the waiter: keys written for nobody
        // would stand in every queue until this host's session ends. A registered waiter
        // whose caller has gone is withdrawn by the guard below, or by `serve_waiters`.
        let queueing = {
            let inner = Arc::clone(inner);
            let spec = spec.clone();
            tokio::spawn(async move {
                let (acquired, _out, rev) = inner
                    .transact(names, |engine, now, _snap| {
                        let req = AcquireRequest {
                            owner: spec.owner.clone(),
                            session: SessionId(lease as u64),
                            items: spec.items.clone(),
                            accept_dirty: spec.accept_dirty,
                            wait: spec.wait.is_some(),
                        };
                        let mut extra = Extra {
                            require_session: Some(lease),
                            ..Extra::default()
                        };
                        let r = match engine.acquire(req, now) {
                            Ok(Acquired::Queued(id)) => {
                                // The engine's waiter is only a placeholder: the waiter keys are the
                                // request's place in the queues.
                                engine.cancel_wait(id, now);
                                let v = json(&value)?;
                                extra.put = waiter_keys
                                    .iter()
                                    .map(|k| (k.clone(), v.clone(), lease))
                                    .collect();
                                Ok(None)
                            }
                            Ok(Acquired::Granted(g)) => Ok(Some(g)),
                            Err(e) => Err(e),
                        };
                        if r.is_err() {
                            // A refusal still writes what the snapshot showed had to change (a dead
                            // session's holders ended), but takes nothing.
                            extra.require_session = None;
                        }
                        Ok((r, extra))
                    })
                    .await?;
                match acquired {
                    Ok(Some(grants)) => Ok(Queueing::Granted(grants)),
                    Err(e) => Err(e.into()),
                    Ok(None) => {
                        let id = inner
                            .next_waiter
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let (tx, rx) = oneshot::channel();
                        if let Ok(mut w) = inner.waiters.lock() {
                            w.insert(
                                id,
                                LocalWaiter {
                                    value: value.clone(),
                                    keys: waiter_keys.clone(),
                                    place: Some(rev as u64),
                                    withdrawn: false,
                                    reply: Some(tx),
                                },
                            );
                        }
                        inner.changed.notify_waiters();
                        Ok(Queueing::Queued(id, rx))
                    }
                }
            })
        };
        let (id, mut rx) = match queueing.await {
            Ok(Ok(Queueing::Queued(id, rx))) => (id, rx),
            Ok(Ok(Queueing::Granted(grants))) => return Ok(grants),
            Ok(Err(e)) => return Err(e),
            Err(e) => return Err(StoreError::Unavailable(format!("queueing failed: {e}"))),
        };
        let mut guard = WaitGuard {
            inner: Arc::clone(inner),
            id,
            armed: true,
        };
        let wait = spec.wait.unwrap_or_default();
        let outcome = match tokio::time::timeout(wait, &mut rx).await {
            Ok(o) => o,
            Err(_) => {
                let gone = inner.withdraw(id).await?;
                guard.armed = false;
                // Not withdrawn: a grant came first (or the keys had gone with the session,
                // and the request answers that it was withdrawn).
                let granted = match gone {
                    true => None,
                    false => match rx.await {
                        Ok(Ok(grants)) => Some(grants),
                        Ok(Err(e)) if e == withdrawn() => None,
                        Ok(Err(e)) => return Err(e.into()),
                        Err(_) => return Err(StoreError::Closed),
                    },
                };
                if let Some(grants) = granted {
                    return Ok(grants);
                }
                let c = match self
                    .conflict(spec.owner.process.clone(), spec.items.clone())
                    .await
                {
                    // What kept it waiting: a record that cannot be trusted.
                    Err(e @ StoreError::BadRecord { .. }) => return Err(e),
                    r => r.ok().flatten(),
                };
                let c = c.map_or_else(|| Conflict::unknown(spec.items[0].0.clone()), |(c, _)| c);
                return Err(StoreError::TimedOut(c));
            }
        };
        guard.armed = false;
        match outcome {
            Ok(r) => r.map_err(StoreError::from),
            Err(_) => Err(StoreError::Closed),
        }
    }

    async fn release(
        &self,
        resource: ResourceName,
        process: ProcessKey,
        kind: ReleaseKind,
    ) -> Result<Released, StoreError> {
        let (r, _, _) = self
            .inner
            .transact(BTreeSet::from([resource.clone()]), |engine, now, _| {
                let r = engine.release(
                    ReleaseRequest {
                        resource: resource.clone(),
                        process: process.clone(),
                        kind: kind.clone(),
                    },
                    now,
                );
                Ok((r, Extra::default()))
            })
            .await?;
        r.map_err(StoreError::from)
    }

    async fn end_process(&self, process: ProcessKey) -> Result<Vec<Released>, StoreError> {
        self.inner
            .end_process_as(process, EndReason::ProcessDied)
            .await
    }

    async fn end_fenced(&self, process: ProcessKey) -> Result<Vec<Released>, StoreError> {
        self.inner.end_process_as(process, EndReason::Fenced).await
    }

    async fn force_release(
        &self,
        resource: ResourceName,
        reason: String,
        by: String,
    ) -> Result<Vec<Released>, StoreError> {
        if let Some(released) = self.inner.repair(&resource, &reason, &by).await? {
            return Ok(released);
        }
        let (r, _, _) = self
            .inner
            .transact(BTreeSet::from([resource.clone()]), |engine, now, _| {
                Ok((
                    engine.force_release(&resource, &reason, &by, now),
                    Extra::default(),
                ))
            })
            .await?;
        r.map_err(StoreError::from)
    }

    async fn mark_clean(
        &self,
        resource: ResourceName,
        by: String,
    ) -> Result<Option<Ended>, StoreError> {
        let (r, _, _) = self
            .inner
            .transact(BTreeSet::from([resource.clone()]), |engine, now, _| {
                Ok((engine.mark_clean(&resource, &by, now), Extra::default()))
            })
            .await?;
        r.map_err(StoreError::from)
    }

    async fn validate(&self, resource: ResourceName, token: Token) -> Result<bool, StoreError> {
        let snap = self
            .inner
            .snapshot(&BTreeSet::from([resource.clone()]))
            .await?;
        Ok(snap
            .res
            .get(&resource)
            .and_then(|rs| rs.record.as_ref())
            .is_some_and(|rec| {
                rec.state
                    .holders
                    .iter()
                    .any(|l| l.token == token && snap.sessions.contains_key(&(l.session.0 as i64)))
            }))
    }

    async fn conflict(
        &self,
        process: ProcessKey,
        items: Vec<(ResourceName, leasehold_core::Mode)>,
    ) -> Result<Option<(Conflict, Option<Duration>)>, StoreError> {
        let names: BTreeSet<ResourceName> = items.iter().map(|(r, _)| r.clone()).collect();
        let snap = self.inner.snapshot(&names).await?;
        if let Some((name, detail)) = snap
            .res
            .iter()
            .find_map(|(n, rs)| rs.bad.as_ref().map(|d| (n, d)))
        {
            return Err(self.inner.bad_record(name, detail));
        }
        let now = self.inner.now();
        let engine = self.inner.engine(&snap, &BTreeSet::new(), now);
        // The grace is etcd's to end; what is left of it is not known here, at most `grace`.
        Ok(engine.conflict(&process, &items, now).map(|c| {
            let left = c.blocked_until.map(|_| self.inner.opts.grace);
            (c, left)
        }))
    }

    async fn inspect(&self, resource: ResourceName) -> Result<Option<ResourceView>, StoreError> {
        let snap = self
            .inner
            .snapshot(&BTreeSet::from([resource.clone()]))
            .await?;
        Ok(snap
            .res
            .get(&resource)
            .and_then(|rs| self.inner.view(&resource, rs, &snap)))
    }

    async fn list(&self) -> Result<Vec<ResourceView>, StoreError> {
        let inner = &self.inner;
        let k = &inner.keys;
        let prefix = k.prefix().as_bytes().to_vec();
        let (kvs, revision) = inner
            .etcd
            .range(prefix.clone(), prefix_end(&prefix), 0)
            .await
            .map_err(unavailable)?;
        let mut snap = Snapshot {
            revision,
            ..Snapshot::default()
        };
        let mut waiters: Vec<(ResourceName, &KeyValue)> = Vec::new();
        for kv in &kvs {
            match k.parse(&kv.key) {
                Some(KeyKind::Host(h)) => {
                    snap.sessions.insert(kv.lease, h);
                }
                Some(KeyKind::Resource(r)) => {
                    let e = snap.res.entry(r).or_default();
                    (e.record, e.bad) = record_of(Some(kv));
                    e.mod_rev = kv.mod_revision;
                }
                Some(KeyKind::Grace(r)) => snap.res.entry(r).or_default().grace = true,
                Some(KeyKind::Waiter(r)) => waiters.push((r, kv)),
                Some(KeyKind::Held(r, lease)) => {
                    let host = String::from_utf8_lossy(&kv.value).into_owned();
                    snap.res.entry(r).or_default().held.insert(lease, host);
                }
                None => {}
            }
        }
        for rs in snap.res.values_mut() {
            rs.judge_held();
        }
        for (r, kv) in waiters {
            if let Ok(value) = serde_json::from_slice::<WaiterValue>(&kv.value) {
                snap.res.entry(r).or_default().waiters.push(WaiterSnap {
                    id: kv.create_revision as u64,
                    value,
                });
            }
        }
        Ok(snap
            .res
            .iter()
            .filter_map(|(name, rs)| inner.view(name, rs, &snap))
            .collect())
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    fn session(&self) -> Option<watch::Receiver<SessionState>> {
        Some(self.inner.session.subscribe())
    }

    fn on_session_end(&self, hook: SessionEndHook) {
        if let Ok(mut h) = self.inner.session_end.lock() {
            *h = Some(hook);
        }
    }

    fn local_holders(&self) -> Option<Vec<ProcessKey>> {
        self.inner
            .held
            .lock()
            .ok()
            .map(|h| h.keys().cloned().collect())
    }

    fn wait_notes(&self) -> broadcast::Receiver<WaitNote> {
        self.inner.notes.subscribe()
    }

    fn etcd_health(&self) -> Option<EtcdHealth> {
        Some(self.health())
    }

    fn stale_holders(&self) -> Vec<ProcessKey> {
        self.inner
            .stale
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }
}
