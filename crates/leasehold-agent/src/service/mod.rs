//! The agent's API: one core of operations that validates every request, decides rights
//! from the peer's credentials (SPEC G8), and carries requests to the store. The front end,
//! HTTP/JSON (`crate::http`), only translates.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use leasehold_api::v1::{self, ApiError, ErrorCode};
use leasehold_core::{
    AcquireError, EndReason, Ended, Event, HostId, MAX_TEXT, OwnerId, ProcessKey, ReleaseError,
    ReleaseKind, Released, ResourceName, ResourceView, Token, check_free_text,
};
use leasehold_store::{Finish, Store, StoreError};
use tokio::sync::{broadcast, mpsc, watch};
use tracing::{info, warn};

use crate::config::Config;
use crate::delivery::Delivery;
use crate::holds::Holds;
use crate::peer::PeerInfo;
use crate::procfs::{self, Also, Pidfd, ProcError, ProcessInfo};
use crate::watcher::Watcher;

mod acquire;
mod renewals;
mod undecided;

pub(crate) use acquire::{After, Delivered, Out};

/// How long `status` waits for the backend's counts before answering without them.
const STATUS_LIST_TIMEOUT: Duration = Duration::from_secs(1);

/// The API service over a store.
pub struct Service<S> {
    store: Arc<S>,
    watcher: Arc<Watcher<S>>,
    holds: Arc<Holds>,
    /// When this host must have fenced its holders unless its session is renewed (shared
    /// backends); holding clients are told, so they can fence without the agent.
    deadline: watch::Receiver<Option<Instant>>,
    /// The agent's own events (fencing), for `watch`.
    agent_events: broadcast::Sender<v1::Event>,
    config: Arc<Config>,
    started: Instant,
    /// The host session's recent renewals, for `status`.
    renewals: Arc<renewals::Renewals>,
    /// The new leases of grants whose delivery is not decided yet ([`undecided`]).
    undecided: Arc<undecided::Undecided>,
}

impl<S> Clone for Service<S> {
    fn clone(&self) -> Self {
        Service {
            store: self.store.clone(),
            watcher: self.watcher.clone(),
            holds: self.holds.clone(),
            deadline: self.deadline.clone(),
            agent_events: self.agent_events.clone(),
            config: self.config.clone(),
            started: self.started,
            renewals: self.renewals.clone(),
            undecided: self.undecided.clone(),
        }
    }
}

/// Who is calling, from the socket's peer credentials (read once, at accept).
#[derive(Debug, Clone)]
pub(crate) struct Caller {
    uid: u32,
    gid: u32,
    groups: Arc<[u32]>,
    pid: Option<u32>,
    /// The facts of the caller's own process, read from `/proc` at its connection's first
    /// request that acts for it and kept for the connection's later ones while the process
    /// is watched (see [`Service::target`]).
    own: ConnectionFacts,
    /// The connection's socket, to ask whether the process that opened it still exists.
    socket: Arc<Delivery>,
}

/// What one connection keeps between its requests: the facts of the peer's process.
pub(crate) type ConnectionFacts = Arc<Mutex<Option<ProcessInfo>>>;

impl Caller {
    /// The caller of a connection; refused when its credentials are unknown, or when the
    /// connection is over a limit (the refusal says which). `facts` and `socket` are the
    /// connection's.
    pub(crate) fn of(
        peer: &PeerInfo,
        facts: &ConnectionFacts,
        socket: &Arc<Delivery>,
    ) -> Result<Caller, ApiError> {
        let unknown = || ApiError::new(ErrorCode::Forbidden, "the peer's credentials are unknown");
        if let Some(why) = &peer.refused {
            return Err(ApiError::new(ErrorCode::Exhausted, why.to_string()));
        }
        let cred = peer.cred.ok_or_else(unknown)?;
        Ok(Caller {
            uid: cred.uid(),
            gid: cred.gid(),
            groups: Arc::clone(&peer.groups),
            pid: cred.pid().and_then(|p| u32::try_from(p).ok()),
            own: Arc::clone(facts),
            socket: Arc::clone(socket),
        })
    }
}

fn usage(e: impl std::fmt::Display) -> ApiError {
    ApiError::usage(e.to_string())
}

fn resource(name: String) -> Result<ResourceName, ApiError> {
    ResourceName::new(name).map_err(usage)
}

/// The API error for a store error (acquire refusals are built in `acquire`).
pub(crate) fn fault_of(e: StoreError) -> ApiError {
    use ErrorCode as C;
    let (code, message) = match e {
        StoreError::Release(ReleaseError::Invalid(m)) => (C::Usage, m),
        StoreError::Release(ReleaseError::Unknown(r)) => {
            (C::NotFound, format!("{r} is not a known resource"))
        }
        StoreError::Release(e) => (C::Refused, e.to_string()),
        StoreError::Acquire(AcquireError::Invalid(m)) => (C::Usage, m),
        StoreError::Acquire(e) => (C::Refused, e.to_string()),
        e @ StoreError::WrongHost { .. } => (C::Usage, e.to_string()),
        StoreError::TimedOut(c) => (C::TimedOut, c.to_string()),
        StoreError::Closed => (C::Unavailable, "the agent is shutting down".into()),
        // The agent answers; the backend does not: not "agent unreachable" (exit 5).
        StoreError::Unavailable(m) => (C::BackendUnavailable, format!("etcd unavailable: {m}")),
        StoreError::NoSpace(m) => (C::Exhausted, m.to_string()),
        StoreError::Misconfigured(m) => (
            C::BackendUnavailable,
            format!("etcd refused the agent: {m}"),
        ),
        e @ (StoreError::SessionLost
        | StoreError::HostInUse { .. }
        | StoreError::BadRecord { .. }) => (C::Refused, e.to_string()),
        StoreError::Storage(m) => (C::Internal, format!("storage: {m}")),
        StoreError::BadState(m) => (C::Internal, format!("storage: {m}")),
        e @ StoreError::Halted(_) => (C::Internal, e.to_string()),
    };
    ApiError::new(code, message)
}

/// What a release did to each resource it named.
#[derive(Debug, Default)]
pub(crate) struct ReleaseOutcome {
    /// The leases ended.
    pub released: Vec<Released>,
    /// The resources not released, with why.
    pub failed: Vec<(ResourceName, ApiError)>,
}

impl<S: Store> Service<S> {
    /// A service over `store`, whose holders `watcher` watches and whose lease endings
    /// `holds` routes to holding clients.
    pub fn new(
        store: Arc<S>,
        watcher: Arc<Watcher<S>>,
        holds: Arc<Holds>,
        deadline: watch::Receiver<Option<Instant>>,
        agent_events: broadcast::Sender<v1::Event>,
        config: Arc<Config>,
    ) -> Self {
        let store_for_renewals = store.clone();
        Service {
            store,
            watcher,
            holds,
            deadline,
            agent_events,
            config,
            started: Instant::now(),
            renewals: renewals::Renewals::follow(&*store_for_renewals),
            undecided: Arc::default(),
        }
    }

    fn is_admin(&self, c: &Caller) -> bool {
        if c.uid == 0 {
            return true;
        }
        let Some(g) = &self.config.admin_group else {
            return false;
        };
        c.gid == g.gid || c.groups.contains(&g.gid)
    }

    /// Who may do admin operations, in words: "root" or "root or a member of group G".
    fn admin_words(&self) -> String {
        let group = self
            .config
            .admin_group
            .as_ref()
            .map(|g| format!(" or a member of group {}", g.name))
            .unwrap_or_default();
        format!("root{group}")
    }

    fn admin_only(&self, c: &Caller, what: &str) -> Result<(), ApiError> {
        if self.is_admin(c) {
            return Ok(());
        }
        warn!(uid = c.uid, what, "refused: not an admin");
        Err(ApiError::new(
            ErrorCode::Forbidden,
            format!("{what} needs {}; you are uid {}", self.admin_words(), c.uid),
        ))
    }

    /// The process a request acts for (`None`: the caller), checked to exist and to belong
    /// to the caller.
    fn target(
        &self,
        c: &Caller,
        pid: Option<u32>,
        start_time: Option<u64>,
    ) -> Result<ProcessInfo, ApiError> {
        self.target_opening(c, pid, start_time, false)
            .map(|(info, _)| info)
    }

    /// [`Service::target`], and where `/proc` was read for it (it was not read when its
    /// process is watched: see there), a pidfd of it opened meanwhile or `pidfd_open`'s error
    /// ([`ProcessInfo::read_with_pidfd`]): an acquire's thread test and watch need no other.
    fn target_with_pidfd(
        &self,
        c: &Caller,
        pid: Option<u32>,
        start_time: Option<u64>,
    ) -> Result<(ProcessInfo, Option<rustix::io::Result<Pidfd>>), ApiError> {
        self.target_opening(c, pid, start_time, true)
    }

    fn target_opening(
        &self,
        c: &Caller,
        pid: Option<u32>,
        start_time: Option<u64>,
        pidfd: bool,
    ) -> Result<(ProcessInfo, Option<rustix::io::Result<Pidfd>>), ApiError> {
        let pid = match pid {
            None | Some(0) => c
                .pid
                .ok_or_else(|| ApiError::usage("no pid given, and the caller's pid is unknown"))?,
            Some(p) => p,
        };
        let no_process = |e: ProcError| match e {
            ProcError::NoProcess(_) => ApiError::new(
                ErrorCode::Refused,
                format!("no process with pid {pid}; leases are held for a running process"),
            ),
            e @ ProcError::NoDescriptors { .. } => ApiError::new(
                ErrorCode::Exhausted,
                format!("{e}: the agent is out of file descriptors; nothing was changed"),
            ),
            e => ApiError::new(ErrorCode::Internal, e.to_string()),
        };
        // /proc/PID belongs to root for a non-dumpable process: for a non-root caller, learn
        // whose process it really is before refusing (its real uid, read through the same
        // /proc/PID as the rest, so not of a process that reused the pid meanwhile).
        let also = Also {
            pidfd,
            real_uid: c.uid != 0,
        };
        let read = || ProcessInfo::read_also(pid, also).map_err(no_process);
        // The caller's own process is read once per connection, like its credentials (a
        // connection acts for the process that opened it, as it was then), and again only once
        // it is not watched: a watched process has not exited (its watch would have ended) and
        // is the one its key names, pid and start time.
        let (info, opened) = if c.pid == Some(pid) {
            let mut own = c.own.lock().unwrap_or_else(PoisonError::into_inner);
            match &*own {
                Some(info) if self.watched(info) => (info.clone(), None),
                _ => {
                    let (info, opened) = read()?;
                    // Read through the pid, which is the connection's process only while that
                    // process exists: once it is reaped, the pid can be another's.
                    if c.socket.opener_alive() == Some(false) {
                        return Err(ApiError::new(
                            ErrorCode::Refused,
                            format!(
                                "pid {pid}, the process that opened this connection, has exited \
                                 (the pid may be another process's now); a connection acts only \
                                 for the process that opened it: connect from the process the \
                                 lease is for"
                            ),
                        ));
                    }
                    *own = Some(info.clone());
                    (info, opened)
                }
            }
        } else {
            read()?
        };
        if let Some(st) = start_time
            && st != info.start_time
        {
            return Err(ApiError::new(
                ErrorCode::Refused,
                format!(
                    "pid {pid} is a different process now (it started at tick {}, the request says {st})",
                    info.start_time
                ),
            ));
        }
        if c.uid != 0 && c.uid != info.uid {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "pid {pid} belongs to uid {}; uid {} may act only for its own processes",
                    info.uid, c.uid
                ),
            ));
        }
        Ok((info, opened))
    }

    /// Whether the process `info` describes is watched: then it runs, and it is a process,
    /// not a thread (its watch holds a pidfd, which only a process has).
    fn watched(&self, info: &ProcessInfo) -> bool {
        self.watcher.is_watched(&ProcessKey {
            host: self.config.host_id.clone(),
            pid: info.pid,
            start_time: info.start_time,
        })
    }

    fn who(&self, c: &Caller) -> String {
        format!("{} on {}", user_name(c.uid), self.config.host_id)
    }

    /// Ends leases of a process: clean, dirty, or handed over. Checked whole before any is
    /// released; then each resource's outcome is reported.
    pub(crate) async fn release(
        &self,
        c: &Caller,
        r: v1::ReleaseRequest,
    ) -> Result<ReleaseOutcome, ApiError> {
        if r.resources.is_empty() {
            return Err(usage("no resources named"));
        }
        // Checked before any is released: a request is refused whole, never half done.
        if r.resources.len() > leasehold_core::MAX_ITEMS {
            return Err(usage(format!(
                "{} resources named; at most {} per request: release them in several",
                r.resources.len(),
                leasehold_core::MAX_ITEMS
            )));
        }
        if !r.tokens.is_empty() && r.tokens.len() != r.resources.len() {
            return Err(usage(format!(
                "{} tokens for {} resources: name one token per resource, in their order, or \
                 none; nothing was released",
                r.tokens.len(),
                r.resources.len()
            )));
        }
        // Each resource with the token of the lease to end, when the caller named them.
        let names = r
            .resources
            .into_iter()
            .map(resource)
            .enumerate()
            .map(|(i, n)| n.map(|n| (n, r.tokens.get(i).copied().map(Token))))
            .collect::<Result<Vec<_>, _>>()?;
        let kind = match (r.handover_to, r.dirty) {
            (Some(_), true) => {
                return Err(usage(
                    "a handover is clean; --dirty and --handover-to exclude each other",
                ));
            }
            (Some(to), false) => {
                let (host, label) = match to.split_once('/') {
                    Some((h, l)) => (h, Some(l.to_owned())),
                    None => (to.as_str(), None),
                };
                let host = HostId::new(host).map_err(usage)?;
                if let Some(l) = &label {
                    check_free_text("label", l, leasehold_core::MAX_LABEL).map_err(usage)?;
                }
                ReleaseKind::Handover { host, label }
            }
            (None, true) => {
                if let Some(n) = &r.note {
                    check_free_text("note", n, MAX_TEXT).map_err(usage)?;
                }
                ReleaseKind::Dirty { note: r.note }
            }
            (None, false) => ReleaseKind::Clean,
        };
        let owner_id = r.owner_id.map(OwnerId::new).transpose().map_err(usage)?;
        let info = self.target(c, r.pid, r.start_time)?;
        let process = ProcessKey {
            host: self.config.host_id.clone(),
            pid: info.pid,
            start_time: info.start_time,
        };
        let only: Vec<ResourceName> = names.iter().map(|(n, _)| n.clone()).collect();
        self.refuse_restricted(c, &only, &process).await?;
        let mut out = ReleaseOutcome::default();
        // A lease the fence revoked is not the owner's to release any more, even while etcd
        // still records it.
        let names: Vec<(ResourceName, Option<Token>)> = names
            .into_iter()
            .filter(|(name, _)| {
                let Some(e) = self.holds.revoked_of(name, &process, owner_id.as_ref()) else {
                    return true;
                };
                out.failed.push((
                    name.clone(),
                    ApiError::new(
                        ErrorCode::Refused,
                        format!(
                            "{name} is not held by pid {} any more: its lease (token {}) was \
                             revoked when this host's etcd session was lost (it asked \
                             on_lost = revoke); stop using that token and acquire it again",
                            process.pid, e.token
                        ),
                    ),
                ));
                false
            })
            .collect();
        let release = |(name, token): (ResourceName, Option<Token>)| {
            let store = self.store.clone();
            let (process, owner_id, kind) = (process.clone(), owner_id.clone(), kind.clone());
            async move {
                let started = Instant::now();
                let r = store.release(name, process, owner_id, token, kind).await;
                if r.is_ok() {
                    crate::metrics::store_op(crate::metrics::StoreOp::release, started.elapsed());
                }
                r
            }
        };
        let mut outcomes = Vec::with_capacity(names.len());
        if let [one] = names.as_slice() {
            // One (a `run`'s): on the caller's task, no task spawned and joined (whose wake-up
            // hands the answer to the other worker). Dropped midway (the client went away),
            // it is finished as a task all the same: once asked, the store may be writing it.
            let r = Finish::new(release(one.clone())).await;
            outcomes.push((one.0.clone(), Ok(r)));
        } else {
            // Several go to the store together, so they share one commit.
            let tasks: Vec<_> = names
                .into_iter()
                .map(|one| (one.0.clone(), tokio::spawn(release(one))))
                .collect();
            for (name, t) in tasks {
                outcomes.push((name, t.await));
            }
        }
        for (name, r) in outcomes {
            match r {
                Ok(Ok(r)) => {
                    log_released(&r, process.pid);
                    out.released.push(r);
                }
                Ok(Err(e)) => out.failed.push((name, fault_of(e))),
                Err(e) => out
                    .failed
                    .push((name, ApiError::new(ErrorCode::Internal, e.to_string()))),
            }
        }
        Ok(out)
    }

    /// Refuses, before anything is released, a release or handover of a restricted lease by
    /// anyone but root or the admin group: libvirt's QEMU may not give up its own disks.
    async fn refuse_restricted(
        &self,
        c: &Caller,
        names: &[ResourceName],
        process: &ProcessKey,
    ) -> Result<(), ApiError> {
        if self.is_admin(c) {
            return Ok(());
        }
        for name in names {
            let view = self.store.inspect(name.clone()).await.map_err(fault_of)?;
            let restricted = view.is_some_and(|v| {
                v.holders
                    .iter()
                    .any(|l| &l.owner.process == process && l.owner.restricted)
            });
            if restricted {
                warn!(uid = c.uid, resource = %name, pid = process.pid, "refused: release of a restricted lease");
                return Err(ApiError::new(
                    ErrorCode::Forbidden,
                    format!(
                        "{name} is held restricted by pid {} (a libvirt domain's QEMU): only {} may release or hand it over; stop the domain instead (virsh shutdown or destroy); nothing was released",
                        process.pid,
                        self.admin_words()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Revokes every lease on a resource (root or the admin group).
    pub(crate) async fn force_release(
        &self,
        c: &Caller,
        r: v1::ForceReleaseRequest,
    ) -> Result<Vec<Released>, ApiError> {
        self.admin_only(c, "force-release")?;
        let name = resource(r.resource)?;
        let by = self.who(c);
        let released = self
            .store
            .force_release(name.clone(), r.reason.clone(), by.clone())
            .await
            .map_err(fault_of)?;
        warn!(resource = %name, by = %by, reason = %r.reason, "force-released");
        Ok(released)
    }

    /// Clears a dirty mark (root or the admin group): the mark that was cleared.
    pub(crate) async fn mark_clean(
        &self,
        c: &Caller,
        name: String,
    ) -> Result<Option<Ended>, ApiError> {
        let name = resource(name)?;
        // SPEC G8: root or the admin group only, even for the holder's own user (its check
        // could be no check at all).
        self.admin_only(c, "mark-clean")?;
        let by = self.who(c);
        let was = self
            .store
            .mark_clean(name.clone(), by.clone())
            .await
            .map_err(fault_of)?;
        if was.is_some() {
            info!(resource = %name, by = %by, "marked clean");
        }
        Ok(was)
    }

    /// Whether `token` is a live grant of the resource, and the live tokens.
    pub(crate) async fn validate(
        &self,
        r: v1::ValidateRequest,
    ) -> Result<v1::ValidateResponse, ApiError> {
        let name = resource(r.resource)?;
        // A token the fence revoked is refused here at once, etcd reachable or not; the live
        // tokens are then given as far as etcd answers (none when it does not).
        if self.holds.is_revoked(&name, Token(r.token)) {
            let current_tokens = match self.store.inspect(name.clone()).await {
                Ok(v) => v
                    .map(|v| v.holders.iter().map(|l| l.token).collect::<Vec<_>>())
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|t| !self.holds.is_revoked(&name, *t))
                    .map(|t| t.0)
                    .collect(),
                Err(_) => Vec::new(),
            };
            return Ok(v1::ValidateResponse {
                current: false,
                current_tokens,
            });
        }
        let current = self
            .store
            .validate(name.clone(), Token(r.token))
            .await
            .map_err(fault_of)?;
        let current_tokens = self
            .store
            .inspect(name)
            .await
            .map_err(fault_of)?
            .map(|v| v.holders.iter().map(|l| l.token.0).collect())
            .unwrap_or_default();
        Ok(v1::ValidateResponse {
            current,
            current_tokens,
        })
    }

    /// One resource, if known.
    pub(crate) async fn inspect(&self, name: String) -> Result<Option<ResourceView>, ApiError> {
        let name = resource(name)?;
        let mut view = self.store.inspect(name).await.map_err(fault_of)?;
        if let Some(v) = view.as_mut() {
            self.watcher.mark_stuck(std::slice::from_mut(v));
        }
        Ok(view)
    }

    /// Every known resource, its stuck holders marked.
    pub(crate) async fn list(&self) -> Result<Vec<ResourceView>, ApiError> {
        let mut views = self.store.list().await.map_err(fault_of)?;
        self.watcher.mark_stuck(&mut views);
        Ok(views)
    }

    /// One page of the resources `q` asks for, in name order, and the name to continue after
    /// when more follow.
    pub(crate) async fn list_page(
        &self,
        q: &v1::ListQuery,
    ) -> Result<(Vec<ResourceView>, Option<String>), ApiError> {
        let mut views = self.list().await?;
        views.sort_by(|a, b| a.resource.cmp(&b.resource));
        let mut page = Vec::new();
        let mut more = false;
        for v in views {
            let name = v.resource.as_str();
            if q.after.as_deref().is_some_and(|a| name <= a)
                || q.prefix.as_deref().is_some_and(|p| !name.starts_with(p))
                || (q.held && v.holders.is_empty())
                || (q.dirty && v.dirty.is_none())
                || q.host
                    .as_deref()
                    .is_some_and(|h| !v.holders.iter().any(|l| l.owner.process.host.as_str() == h))
            {
                continue;
            }
            if page.len() == q.page() {
                more = true;
                break;
            }
            page.push(v);
        }
        let next = if more {
            page.last().map(|v: &ResourceView| v.resource.to_string())
        } else {
            None
        };
        Ok((page, next))
    }

    /// The agent itself; answered also when the backend does not answer.
    /// Every host's session on the backend (`GET /v1/hosts`).
    pub(crate) async fn hosts(&self) -> Result<v1::HostsResponse, ApiError> {
        let hosts = self.store.hosts().await.map_err(fault_of)?;
        let me = &self.config.host_id;
        Ok(v1::HostsResponse {
            hosts: hosts
                .into_iter()
                .map(|h| v1::Host {
                    this_host: &h.host == me,
                    host: h.host.to_string(),
                    alive: h.alive,
                    session: h.session.map(|s| s.0),
                    since: h.since.map(|t| v1::Time::from_unix_ms(t.0)),
                    leases: h.leases as u64,
                    agent_pid: h.agent_pid,
                    renewed_ago: h.renewed_ago.map(v1::Dur),
                    expires_in: h.expires_in.map(v1::Dur),
                })
                .collect(),
        })
    }

    pub(crate) async fn status(&self) -> v1::StatusResponse {
        // The backend may not answer (etcd unreachable): the session is still reported, and
        // the counts are said to be missing, not zero.
        let counted = match tokio::time::timeout(STATUS_LIST_TIMEOUT, self.store.counts()).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "the backend did not answer in {STATUS_LIST_TIMEOUT:?}"
            )),
        };
        let counts = counted.as_ref().copied().unwrap_or_default();
        let state = self.store.session().map(|rx| rx.borrow().clone());
        let now = Instant::now();
        let safe_for = state
            .as_ref()
            .filter(|s| !s.expired)
            .and_then(|s| s.safe_until())
            .map(|t| t.saturating_duration_since(now));
        let session = match &state {
            None => "local (the agent is the only authority on this host; no expiry)".into(),
            Some(s) if s.expired => {
                format!("etcd lease {:x} has ended; opening a new session", s.id.0)
            }
            Some(s) => format!(
                "etcd lease {:x}, ttl {}, safe for {}",
                s.id.0,
                humantime::format_duration(s.ttl),
                humantime::format_duration(Duration::from_millis(
                    u64::try_from(safe_for.unwrap_or_default().as_millis()).unwrap_or(u64::MAX)
                ))
            ),
        };
        let host_session = state.map(|s| v1::HostSession {
            lease_id: s.id.0,
            ttl: s.ttl.into(),
            last_renewal_ago: s
                .renewed_sent_at
                .map(|t| now.saturating_duration_since(t).into()),
            safe_for: safe_for.map(Into::into),
            renewal_latency_us: s
                .latencies
                .iter()
                .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
                .collect(),
            expired: s.expired,
            failed_renewals: s.failed_renewals,
            renewals: self.renewals.recent(),
        });
        v1::StatusResponse {
            containment: Some(self.watcher.containment()),
            stuck: self
                .watcher
                .stuck()
                .into_iter()
                .map(|s| v1::StuckHolder {
                    pid: u64::from(s.pid),
                    cgroup: s.cgroup.map(|c| c.display().to_string()),
                    process_group: s.process_group.map(u64::from),
                    stuck_for: now.saturating_duration_since(s.since).into(),
                })
                .collect(),
            host: self.config.host_id.to_string(),
            backend: self.config.backend.to_string(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: u64::from(std::process::id()),
            uptime: self.started.elapsed().into(),
            state_dir: self.config.state_dir.display().to_string(),
            socket: self.config.socket.display().to_string(),
            resources: counts.resources,
            leases: counts.leases,
            processes: counts.processes,
            dirty: counts.dirty,
            session,
            safe_for: safe_for.map(Into::into),
            host_session,
            backend_error: counted.err(),
            etcd: self.store.etcd_health().map(|h| v1::EtcdStatus {
                db_size: h.db_size,
                quota: h.quota,
                revision: h.revision,
                compacted_revision: h.compacted,
                nospace: h.nospace,
                compactor: h.compactor.clone(),
                forgotten: h.forgotten,
                warning: h.warning().unwrap_or_default(),
            }),
        }
    }

    /// Lease events as they happen, every one from the moment this returns (the backend is
    /// followed by then); the stream ends with an error when it falls behind or misses
    /// events.
    pub(crate) async fn watch(
        &self,
        filter: Option<String>,
    ) -> Result<mpsc::Receiver<Result<v1::Event, ApiError>>, ApiError> {
        let filter = filter.map(resource).transpose()?;
        let mut events = self.store.subscribe_all().await.map_err(fault_of)?;
        let mut agent_events = self.agent_events.subscribe();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let batch = tokio::select! {
                    e = events.recv() => match e {
                        Ok(e) => wire_events(&e),
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            let msg = format!("watch fell behind; {n} events were missed: watch again, and inspect what you need");
                            let _ = tx.send(Err(ApiError::new(ErrorCode::Exhausted, msg))).await;
                            return;
                        }
                        Err(broadcast::error::RecvError::Closed) => {
                            // The store's watch missed events (or the store stopped).
                            let msg = "watch lost events: the backend no longer has them (etcd compacted its history): watch again, and inspect what you need";
                            let _ = tx.send(Err(ApiError::new(ErrorCode::Exhausted, msg))).await;
                            return;
                        }
                    },
                    e = agent_events.recv() => match e {
                        Ok(e) => vec![e],
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    () = tx.closed() => return,
                };
                for w in batch {
                    // A filter on a resource drops host-wide events (fencing, expiry) that
                    // name none.
                    if filter
                        .as_ref()
                        .is_some_and(|f| w.resource.as_deref() != Some(f.as_str()))
                    {
                        continue;
                    }
                    if tx.send(Ok(w)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }
}

/// A lease is held for a running process: not for a zombie (it has exited; the lease would
/// end at once, dirty), nor for a thread other than the main one (it cannot be watched).
/// A watched process (`watched`) is no thread: that look is saved.
/// `opened`: the error of a `pidfd_open` of it made already (`None`: it opened), if one was.
fn refuse_non_process(
    info: &ProcessInfo,
    watched: bool,
    opened: Option<Option<rustix::io::Errno>>,
) -> Result<(), ApiError> {
    let pid = info.pid;
    if info.exited() {
        return Err(ApiError::new(
            ErrorCode::Refused,
            format!(
                "pid {pid} ({}) has exited; its parent has not reaped it yet. Leases are held for a running process",
                info.command
            ),
        ));
    }
    let thread_of = || match opened {
        Some(e) => procfs::thread_of_opened(pid, e),
        None => procfs::thread_of(pid),
    };
    if !watched && let Some(process) = thread_of() {
        return Err(usage(format!(
            "pid {pid} is a thread of process {process}, not a process; leases are held by processes: pass --pid {process}"
        )));
    }
    Ok(())
}

fn log_released(r: &Released, pid: u32) {
    let how = r.ended.how.describe();
    if matches!(r.ended.how, EndReason::ReleasedDirty { .. }) {
        warn!(resource = %r.resource, pid, token = %r.ended.token, how = %how, "released dirty; the resource needs a check");
    } else {
        info!(resource = %r.resource, pid, token = %r.ended.token, how = %how, "released");
    }
}

fn user_name(uid: u32) -> String {
    crate::accounts::user_name(uid).unwrap_or_else(|| format!("uid {uid}"))
}

/// The events `watch` streams for one engine event (an ending that dirties also yields
/// `dirtied`).
pub fn wire_events(e: &Event) -> Vec<v1::Event> {
    let at = |ms: u64| Some(v1::Time::from_unix_ms(ms));
    match e {
        Event::Granted { resource, lease } => vec![v1::Event {
            kind: "granted".into(),
            resource: Some(resource.to_string()),
            at: at(lease.granted_at.0),
            lease: Some(lease.into()),
            ..Default::default()
        }],
        Event::Ended {
            resource,
            ended,
            dirtied,
        } => {
            // The ending's own word, but a lost host's lease is "expired" in the stream.
            let kind = match &ended.how {
                EndReason::SessionExpired => "expired",
                how => leasehold_api::how_word(how),
            };
            let base = v1::Event {
                kind: kind.into(),
                resource: Some(resource.to_string()),
                at: at(ended.ended_at.0),
                ended: Some(ended.into()),
                host: Some(ended.owner.host().to_string()),
                ..Default::default()
            };
            let mut v = vec![base.clone()];
            if *dirtied {
                v.push(v1::Event {
                    kind: "dirtied".into(),
                    ..base
                });
            }
            v
        }
        Event::Cleaned {
            resource,
            by,
            at: t,
        } => vec![v1::Event {
            kind: "cleaned".into(),
            resource: Some(resource.to_string()),
            at: at(t.0),
            by: Some(by.clone()),
            ..Default::default()
        }],
        Event::SessionExpired { host, .. } => vec![v1::Event {
            kind: "host-session-expired".into(),
            host: Some(host.to_string()),
            ..Default::default()
        }],
    }
}
