//! The agent's API on its local socket: validates every request, decides rights from the
//! peer's credentials (SPEC G8), and carries requests to the store.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use leasehold_api::{conflict_to_wire, mode_from_wire, pb};
use leasehold_core::{
    AcquireError, EndReason, Event, Grant, HostId, MAX_TEXT, Owner, ProcessKey, ReleaseError,
    ReleaseKind, ResourceName, ResourceView, Token, check_free_text,
};
use leasehold_store::{AcquireSpec, Store, StoreError};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::config::Config;
use crate::holds::{Holds, Note, Registration};
use crate::procfs::{self, ProcError, ProcessInfo};
use crate::watcher::{Prepared, Watcher};

/// How long `status` waits for the backend's counts before answering without them.
const STATUS_LIST_TIMEOUT: Duration = Duration::from_secs(1);

/// How often a waiting request is told who is in its way.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// The API service over a store.
pub struct Service<S> {
    store: Arc<S>,
    watcher: Arc<Watcher<S>>,
    holds: Arc<Holds>,
    /// When this host must have fenced its holders unless its session is renewed (shared
    /// backends); holding clients are told, so they can fence without the agent.
    deadline: watch::Receiver<Option<Instant>>,
    /// The agent's own events (fencing), for `watch`.
    agent_events: broadcast::Sender<pb::Event>,
    config: Arc<Config>,
    started: Instant,
    confirms: Arc<Confirms>,
}

/// Grants sent to clients and not yet confirmed by them (`Confirm`), by confirm id.
#[derive(Default)]
struct Confirms {
    next: std::sync::atomic::AtomicU64,
    waiting: std::sync::Mutex<std::collections::HashMap<u64, (u32, oneshot::Sender<()>)>>,
}

impl Confirms {
    /// A new confirm id for a grant to a client of `uid`, and what tells it is confirmed.
    fn register(&self, uid: u32) -> (u64, oneshot::Receiver<()>) {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.waiting.lock() {
            w.insert(id, (uid, tx));
        }
        (id, rx)
    }

    fn forget(&self, id: u64) {
        if let Ok(mut w) = self.waiting.lock() {
            w.remove(&id);
        }
    }

    /// Confirms grant `id` for a caller of `uid`: only the caller that asked for it may.
    fn confirm(&self, id: u64, uid: u32) -> bool {
        let Ok(mut w) = self.waiting.lock() else {
            return false;
        };
        match w.remove(&id) {
            Some((owner, tx)) if owner == uid || uid == 0 => tx.send(()).is_ok(),
            Some(entry) => {
                w.insert(id, entry);
                false
            }
            None => false,
        }
    }
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
            confirms: self.confirms.clone(),
        }
    }
}

/// Who is calling, from the socket's peer credentials (read once, at accept).
#[derive(Debug, Clone)]
struct Caller {
    uid: u32,
    gid: u32,
    groups: Arc<[u32]>,
    pid: Option<u32>,
}

impl<S: Store> Service<S> {
    /// A service over `store`, whose holders `watcher` watches and whose lease endings
    /// `holds` routes to holding clients.
    pub fn new(
        store: Arc<S>,
        watcher: Arc<Watcher<S>>,
        holds: Arc<Holds>,
        deadline: watch::Receiver<Option<Instant>>,
        agent_events: broadcast::Sender<pb::Event>,
        config: Arc<Config>,
    ) -> Self {
        Service {
            store,
            watcher,
            holds,
            deadline,
            agent_events,
            config,
            started: Instant::now(),
            confirms: Arc::default(),
        }
    }

    fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
        let peer = req
            .extensions()
            .get::<crate::peer::PeerInfo>()
            .ok_or_else(|| Status::permission_denied("the peer's credentials are unknown"))?;
        let cred = peer
            .uds
            .peer_cred
            .ok_or_else(|| Status::permission_denied("the peer's credentials are unknown"))?;
        Ok(Caller {
            uid: cred.uid(),
            gid: cred.gid(),
            groups: Arc::clone(&peer.groups),
            pid: cred.pid().and_then(|p| u32::try_from(p).ok()),
        })
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

    fn admin_only(&self, c: &Caller, what: &str) -> Result<(), Status> {
        if self.is_admin(c) {
            return Ok(());
        }
        warn!(uid = c.uid, what, "refused: not an admin");
        Err(Status::permission_denied(format!(
            "{what} needs {}; you are uid {}",
            self.admin_words(),
            c.uid
        )))
    }

    /// The process a request acts for, checked to exist and to belong to the caller.
    fn target(&self, c: &Caller, pid: u32, start_time: Option<u64>) -> Result<ProcessInfo, Status> {
        let pid = match pid {
            0 => c.pid.ok_or_else(|| {
                Status::invalid_argument("pid 0, and the caller's pid is unknown")
            })?,
            p => p,
        };
        let no_process = |e: ProcError| match e {
            ProcError::NoProcess(_) => Status::failed_precondition(format!(
                "no process with pid {pid}; leases are held for a running process"
            )),
            e @ ProcError::NoDescriptors { .. } => Status::resource_exhausted(format!(
                "{e}: the agent is out of file descriptors; nothing was changed"
            )),
            e => Status::internal(e.to_string()),
        };
        let mut info = ProcessInfo::read(pid).map_err(no_process)?;
        // /proc/PID belongs to root for a non-dumpable process: for a non-root caller, learn
        // whose process it really is before refusing.
        if info.uid == 0 && c.uid != 0 {
            info.uid = procfs::real_uid(pid).map_err(no_process)?;
        }
        if let Some(st) = start_time
            && st != info.start_time
        {
            return Err(Status::failed_precondition(format!(
                "pid {pid} is a different process now (it started at tick {}, the request says {st})",
                info.start_time
            )));
        }
        if c.uid != 0 && c.uid != info.uid {
            return Err(Status::permission_denied(format!(
                "pid {pid} belongs to uid {}; uid {} may act only for its own processes",
                info.uid, c.uid
            )));
        }
        Ok(info)
    }

    fn who(&self, c: &Caller) -> String {
        format!("{} on {}", user_name(c.uid), self.config.host_id)
    }
}

/// A lease is held for a running process: not for a zombie (it has exited; the lease would
/// end at once, dirty), nor for a thread other than the main one (it cannot be watched).
fn refuse_non_process(info: &ProcessInfo) -> Result<(), Status> {
    let pid = info.pid;
    if info.exited() {
        return Err(Status::failed_precondition(format!(
            "pid {pid} ({}) has exited; its parent has not reaped it yet. Leases are held for a running process",
            info.command
        )));
    }
    if let Some(process) = procfs::thread_of(pid) {
        return Err(Status::invalid_argument(format!(
            "pid {pid} is a thread of process {process}, not a process; leases are held by processes: pass --pid {process}"
        )));
    }
    Ok(())
}

fn log_released(r: &leasehold_core::Released, pid: u32) {
    let how = r.ended.how.describe();
    if matches!(r.ended.how, EndReason::ReleasedDirty { .. }) {
        warn!(resource = %r.resource, pid, token = %r.ended.token, how = %how, "released dirty; the resource needs a check");
    } else {
        info!(resource = %r.resource, pid, token = %r.ended.token, how = %how, "released");
    }
}

fn user_name(uid: u32) -> String {
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|p| {
            p.lines().find_map(|l| {
                let mut f = l.split(':');
                let name = f.next()?;
                let id: u32 = f.nth(1)?.parse().ok()?;
                (id == uid).then(|| name.to_owned())
            })
        })
        .unwrap_or_else(|| format!("uid {uid}"))
}

fn bad(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}

fn resource(name: String) -> Result<ResourceName, Status> {
    ResourceName::new(name).map_err(bad)
}

/// The gRPC status for a store error (acquire refusals travel as data instead).
pub fn status_of(e: StoreError) -> Status {
    match e {
        StoreError::Release(ReleaseError::Invalid(m)) => Status::invalid_argument(m),
        StoreError::Release(ReleaseError::Unknown(r)) => {
            Status::not_found(format!("{r} is not a known resource"))
        }
        StoreError::Release(e) => Status::failed_precondition(e.to_string()),
        StoreError::Acquire(AcquireError::Invalid(m)) => Status::invalid_argument(m),
        StoreError::Acquire(e) => Status::failed_precondition(e.to_string()),
        StoreError::WrongHost { .. } => Status::invalid_argument(e.to_string()),
        StoreError::TimedOut(c) => Status::deadline_exceeded(c.to_string()),
        StoreError::Closed => Status::unavailable("the agent is shutting down"),
        // The agent answers; the backend does not: not "agent unreachable" (exit 5).
        StoreError::Unavailable(m) => Status::aborted(format!("etcd unavailable: {m}")),
        StoreError::NoSpace(m) => Status::resource_exhausted(m),
        StoreError::Misconfigured(m) => Status::aborted(format!("etcd refused the agent: {m}")),
        e @ (StoreError::SessionLost
        | StoreError::HostInUse { .. }
        | StoreError::BadRecord { .. }) => Status::failed_precondition(e.to_string()),
        StoreError::Storage(m) | StoreError::BadState(m) => {
            Status::internal(format!("storage: {m}"))
        }
    }
}

fn refusal(e: StoreError, blocked_for: Option<Duration>) -> Result<pb::Refusal, Status> {
    use pb::refusal::Kind;
    let message = e.to_string();
    let (kind, conflict, resource, dirty) = match e {
        StoreError::Acquire(AcquireError::Busy(c)) => (Kind::Busy, Some(c), None, None),
        StoreError::TimedOut(c) => (Kind::TimedOut, Some(c), None, None),
        StoreError::Acquire(AcquireError::NeedsCheck { resource, dirty }) => {
            (Kind::NeedsCheck, None, Some(resource), Some(*dirty))
        }
        StoreError::Acquire(AcquireError::ModeConflict { resource, .. }) => {
            (Kind::ModeConflict, None, Some(resource), None)
        }
        StoreError::Acquire(AcquireError::Cancelled(_)) => (Kind::Cancelled, None, None, None),
        other => return Err(status_of(other)),
    };
    Ok(pb::Refusal {
        kind: kind.into(),
        message,
        resource: resource
            .or_else(|| conflict.as_ref().map(|c| c.resource.clone()))
            .map(|r| r.to_string()),
        conflict: conflict.as_ref().map(|c| conflict_to_wire(c, blocked_for)),
        dirty: dirty.as_ref().map(Into::into),
        accept_dirty_needs: None,
    })
}

fn event(e: pb::acquire_event::Event) -> Result<pb::AcquireEvent, Status> {
    Ok(pb::AcquireEvent { event: Some(e) })
}

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl<S: Store> pb::leasehold_server::Leasehold for Service<S> {
    type AcquireStream = Stream_<pb::AcquireEvent>;
    type WatchStream = Stream_<pb::Event>;

    async fn acquire(
        &self,
        req: Request<pb::AcquireRequest>,
    ) -> Result<Response<Self::AcquireStream>, Status> {
        let c = Self::caller(&req)?;
        let r = req.into_inner();
        let items = r
            .items
            .into_iter()
            .map(|i| Ok((resource(i.resource)?, mode_from_wire(i.mode).map_err(bad)?)))
            .collect::<Result<Vec<_>, Status>>()?;
        let info = self.target(&c, r.pid, r.start_time)?;
        refuse_non_process(&info)?;
        let owner = Owner {
            process: ProcessKey {
                host: self.config.host_id.clone(),
                pid: info.pid,
                start_time: info.start_time,
            },
            label: r.label,
            uid: Some(info.uid),
            command: Some(info.command),
        };
        owner.validate().map_err(bad)?;
        let wait = r.wait_ms.map(|ms| match ms {
            0 => Duration::MAX,
            ms => Duration::from_millis(ms),
        });
        // Taking a dirty resource unchecked clears its purpose as surely as mark-clean: only
        // root or the admin group may (SPEC G8). Others are told it needs a check, and by whom.
        let admin = self.is_admin(&c);
        let spec = AcquireSpec {
            owner: owner.clone(),
            items: items.clone(),
            accept_dirty: r.accept_dirty && admin,
            wait,
        };
        let dirty_needs = (r.accept_dirty && !admin).then(|| self.admin_words());
        let (tx, rx) = mpsc::channel(8);
        let me = self.clone();
        let hold = r.hold;
        tokio::spawn(async move {
            // Register before the grant so no loss after it can be missed.
            let registration = hold.then(|| me.holds.register(owner.process.clone()));
            // The pidfd is opened before the grant: a grant the agent could not watch would
            // have to end at once, although its process lives.
            let prepared = match me.prepare_watch(&owner.process).await {
                Ok(p) => p,
                Err(status) => {
                    let _ = tx.send(Err(status)).await;
                    return;
                }
            };
            let outcome = me.acquire_reporting(spec, &tx).await;
            let grants = match outcome {
                None => return, // the caller went away; the wait was withdrawn
                Some(Ok(grants)) => grants,
                Some(Err(e)) => {
                    let blocked = match &e {
                        StoreError::Acquire(AcquireError::Busy(c)) | StoreError::TimedOut(c) => me
                            .store
                            .inspect(c.resource.clone())
                            .await
                            .ok()
                            .flatten()
                            .and_then(|v| v.blocked_for),
                        _ => None,
                    };
                    info!(pid = owner.process.pid, reason = %e, "acquire refused");
                    let msg = refusal(e, blocked).and_then(|mut r| {
                        if let Some(needs) = &dirty_needs
                            && r.kind == i32::from(pb::refusal::Kind::NeedsCheck)
                        {
                            r.message = format!(
                                "{}; taking a dirty resource (--accept-dirty, run --check) needs {needs}: ask an admin to check it and run `leasehold mark-clean {}`",
                                r.message,
                                r.resource.as_deref().unwrap_or("R")
                            );
                            r.accept_dirty_needs = Some(needs.clone());
                        }
                        event(pb::acquire_event::Event::Refused(r))
                    });
                    let _ = tx.send(msg).await;
                    return;
                }
            };
            me.watcher.watch_with(prepared);
            for g in grants.iter().filter(|g| !g.existing) {
                info!(
                    resource = %g.resource,
                    pid = owner.process.pid,
                    token = %g.token,
                    mode = %g.mode,
                    mono_ns = crate::fence::monotonic_ns(),
                    "granted"
                );
            }
            // New leases count only once the client confirms it received them: one that
            // went away as it was granted (a withdrawn wait) must not leave them behind.
            let fresh: Vec<ResourceName> = grants
                .iter()
                .filter(|g| !g.existing)
                .map(|g| g.resource.clone())
                .collect();
            let (confirm_id, confirmed) = match fresh.is_empty() {
                true => (0, None),
                false => {
                    let (id, rx) = me.confirms.register(c.uid);
                    (id, Some(rx))
                }
            };
            let granted = pb::Granted {
                grants: grants.iter().map(pb::Grant::from).collect(),
                owner: Some((&owner).into()),
                confirm_id,
            };
            let sent = tx
                .send(event(pb::acquire_event::Event::Granted(granted)))
                .await
                .is_ok();
            let kept = match confirmed {
                None => sent,
                Some(rx) if sent => tokio::select! {
                    biased;
                    r = rx => r.is_ok(),
                    () = tx.closed() => false,
                },
                Some(_) => false,
            };
            if !kept {
                me.confirms.forget(confirm_id);
                me.undo_unconfirmed(&owner.process, fresh).await;
                return;
            }
            if let Some(registration) = registration {
                me.hold(&grants, registration, &tx).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn release(
        &self,
        req: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let c = Self::caller(&req)?;
        let r = req.into_inner();
        if r.resources.is_empty() {
            return Err(bad("no resources named"));
        }
        // Checked before any is released: a request is refused whole, never half done.
        if r.resources.len() > leasehold_core::MAX_ITEMS {
            return Err(bad(format!(
                "{} resources named; at most {} per request: release them in several",
                r.resources.len(),
                leasehold_core::MAX_ITEMS
            )));
        }
        let names = r
            .resources
            .into_iter()
            .map(resource)
            .collect::<Result<Vec<_>, _>>()?;
        let kind = match (r.handover_to, r.dirty) {
            (Some(_), true) => {
                return Err(bad(
                    "a handover is clean; --dirty and --handover-to exclude each other",
                ));
            }
            (Some(to), false) => {
                let (host, label) = match to.split_once('/') {
                    Some((h, l)) => (h, Some(l.to_owned())),
                    None => (to.as_str(), None),
                };
                let host = HostId::new(host).map_err(bad)?;
                if let Some(l) = &label {
                    check_free_text("label", l, leasehold_core::MAX_LABEL).map_err(bad)?;
                }
                ReleaseKind::Handover { host, label }
            }
            (None, true) => {
                if let Some(n) = &r.note {
                    check_free_text("note", n, MAX_TEXT).map_err(bad)?;
                }
                ReleaseKind::Dirty { note: r.note }
            }
            (None, false) => ReleaseKind::Clean,
        };
        let info = self.target(&c, r.pid, r.start_time)?;
        let process = ProcessKey {
            host: self.config.host_id.clone(),
            pid: info.pid,
            start_time: info.start_time,
        };
        if let [name] = names.as_slice() {
            let r = self
                .store
                .release(name.clone(), process.clone(), kind)
                .await
                .map_err(status_of)?;
            log_released(&r, process.pid);
            return Ok(Response::new(pb::ReleaseResponse {
                released: vec![pb::Released::from(&r)],
            }));
        }
        // Several releases go to the store together, so they share one commit.
        let tasks: Vec<_> = names
            .into_iter()
            .map(|name| {
                let store = self.store.clone();
                let (process, kind) = (process.clone(), kind.clone());
                tokio::spawn(async move { store.release(name, process, kind).await })
            })
            .collect();
        let mut released = Vec::new();
        let mut failed = Vec::new();
        for t in tasks {
            match t.await {
                Ok(Ok(r)) => {
                    log_released(&r, process.pid);
                    released.push(pb::Released::from(&r));
                }
                Ok(Err(e)) => failed.push(status_of(e)),
                Err(e) => failed.push(Status::internal(e.to_string())),
            }
        }
        match failed.len() {
            0 => Ok(Response::new(pb::ReleaseResponse { released })),
            1 if released.is_empty() => Err(failed.remove(0)),
            _ => Err(Status::new(
                failed[0].code(),
                format!(
                    "{} of {} releases failed: {}",
                    failed.len(),
                    failed.len() + released.len(),
                    failed
                        .iter()
                        .map(|s| s.message())
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            )),
        }
    }

    async fn force_release(
        &self,
        req: Request<pb::ForceReleaseRequest>,
    ) -> Result<Response<pb::ForceReleaseResponse>, Status> {
        let c = Self::caller(&req)?;
        self.admin_only(&c, "force-release")?;
        let r = req.into_inner();
        let name = resource(r.resource)?;
        let by = self.who(&c);
        let released = self
            .store
            .force_release(name.clone(), r.reason.clone(), by.clone())
            .await
            .map_err(status_of)?;
        warn!(resource = %name, by = %by, reason = %r.reason, "force-released");
        Ok(Response::new(pb::ForceReleaseResponse {
            released: released.iter().map(Into::into).collect(),
        }))
    }

    async fn mark_clean(
        &self,
        req: Request<pb::MarkCleanRequest>,
    ) -> Result<Response<pb::MarkCleanResponse>, Status> {
        let c = Self::caller(&req)?;
        let name = resource(req.into_inner().resource)?;
        // SPEC G8: root or the admin group only, even for the holder's own user (its check
        // could be no check at all).
        self.admin_only(&c, "mark-clean")?;
        let by = self.who(&c);
        let was = self
            .store
            .mark_clean(name.clone(), by.clone())
            .await
            .map_err(status_of)?;
        if was.is_some() {
            info!(resource = %name, by = %by, "marked clean");
        }
        Ok(Response::new(pb::MarkCleanResponse {
            was: was.as_ref().map(Into::into),
        }))
    }

    async fn validate(
        &self,
        req: Request<pb::ValidateRequest>,
    ) -> Result<Response<pb::ValidateResponse>, Status> {
        let r = req.into_inner();
        let name = resource(r.resource)?;
        let current = self
            .store
            .validate(name.clone(), Token(r.token))
            .await
            .map_err(status_of)?;
        let current_tokens = self
            .store
            .inspect(name)
            .await
            .map_err(status_of)?
            .map(|v| v.holders.iter().map(|l| l.token.0).collect())
            .unwrap_or_default();
        Ok(Response::new(pb::ValidateResponse {
            current,
            current_tokens,
        }))
    }

    async fn inspect(
        &self,
        req: Request<pb::InspectRequest>,
    ) -> Result<Response<pb::InspectResponse>, Status> {
        let name = resource(req.into_inner().resource)?;
        let v = self.store.inspect(name).await.map_err(status_of)?;
        Ok(Response::new(pb::InspectResponse {
            resource: v.as_ref().map(Into::into),
        }))
    }

    async fn list(
        &self,
        _req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let v = self.store.list().await.map_err(status_of)?;
        Ok(Response::new(pb::ListResponse {
            resources: v.iter().map(Into::into).collect(),
        }))
    }

    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        // The backend may not answer (etcd unreachable): the session is still reported, and
        // the counts are said to be missing, not zero.
        let listed = match tokio::time::timeout(STATUS_LIST_TIMEOUT, self.store.list()).await {
            Ok(Ok(views)) => Ok(views),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "the backend did not answer in {STATUS_LIST_TIMEOUT:?}"
            )),
        };
        let views: &[ResourceView] = listed.as_deref().unwrap_or_default();
        let leases = views.iter().map(|v| v.holders.len() as u64).sum();
        let processes: std::collections::BTreeSet<&ProcessKey> = views
            .iter()
            .flat_map(|v| v.holders.iter().map(|l| &l.owner.process))
            .collect();
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
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
                humantime::format_duration(Duration::from_millis(ms(safe_for.unwrap_or_default())))
            ),
        };
        let host_session = state.map(|s| pb::HostSession {
            lease_id: s.id.0,
            ttl_ms: ms(s.ttl),
            last_renewal_ms_ago: s
                .renewed_sent_at
                .map(|t| ms(now.saturating_duration_since(t))),
            safe_for_ms: safe_for.map(ms),
            renewal_latency_us: s
                .latencies
                .iter()
                .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
                .collect(),
            expired: s.expired,
            failed_renewals: s.failed_renewals,
        });
        Ok(Response::new(pb::StatusResponse {
            host: self.config.host_id.to_string(),
            backend: self.config.backend.to_string(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: u64::from(std::process::id()),
            uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            state_dir: self.config.state_dir.display().to_string(),
            socket: self.config.socket.display().to_string(),
            resources: views.len() as u64,
            leases,
            processes: processes.len() as u64,
            dirty: views.iter().filter(|v| v.dirty.is_some()).count() as u64,
            session,
            safe_for_ms: safe_for.map(ms),
            host_session,
            backend_error: listed.err(),
            etcd: self.store.etcd_health().map(|h| pb::EtcdStatus {
                db_size: h.db_size,
                quota: h.quota,
                revision: h.revision,
                compacted_revision: h.compacted,
                nospace: h.nospace,
                compactor: h.compactor.clone(),
                forgotten: h.forgotten,
                warning: h.warning().unwrap_or_default(),
            }),
        }))
    }

    async fn confirm(
        &self,
        req: Request<pb::ConfirmRequest>,
    ) -> Result<Response<pb::ConfirmResponse>, Status> {
        let c = Self::caller(&req)?;
        let id = req.into_inner().confirm_id;
        if self.confirms.confirm(id, c.uid) {
            return Ok(Response::new(pb::ConfirmResponse {}));
        }
        Err(Status::failed_precondition(format!(
            "no grant {id} of yours awaits confirmation: its acquire stream closed first, so it was released; acquire again"
        )))
    }

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let filter = req.into_inner().resource.map(resource).transpose()?;
        let mut events = self.store.subscribe();
        let mut agent_events = self.agent_events.subscribe();
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let batch = tokio::select! {
                    e = events.recv() => match e {
                        Ok(e) => wire_events(&e),
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            let msg = format!("watch fell behind; {n} events were missed");
                            let _ = tx.send(Err(Status::data_loss(msg))).await;
                            return;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
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
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

type Tx = mpsc::Sender<Result<pb::AcquireEvent, Status>>;

impl<S: Store> Service<S> {
    /// Prepares to watch `process`, waiting a little while the agent is out of file
    /// descriptors, then refusing: no lease is granted that could not be watched.
    async fn prepare_watch(&self, process: &ProcessKey) -> Result<Prepared, Status> {
        let mut delay = Duration::from_millis(20);
        let give_up = Instant::now() + Duration::from_secs(3);
        loop {
            match self.watcher.prepare(process) {
                Ok(p) => return Ok(p),
                Err(ProcError::NoDescriptors { .. }) if Instant::now() < give_up => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(500));
                }
                Err(e @ ProcError::NoDescriptors { .. }) => {
                    warn!(pid = process.pid, error = %e, "out of file descriptors; request refused");
                    return Err(Status::resource_exhausted(format!(
                        "the agent is out of file descriptors and cannot watch pid {}: no lease \
                         was granted; retry later (and raise the agent's LimitNOFILE)",
                        process.pid
                    )));
                }
                Err(e @ (ProcError::NoProcess(_) | ProcError::Reused { .. })) => {
                    return Err(Status::failed_precondition(format!(
                        "{e}; leases are held for a running process"
                    )));
                }
                Err(e) => return Err(Status::internal(e.to_string())),
            }
        }
    }

    /// Releases, clean, the new leases of a grant whose client went away before confirming
    /// it: nobody learnt their tokens, so nothing was written under them.
    async fn undo_unconfirmed(&self, process: &ProcessKey, fresh: Vec<ResourceName>) {
        for r in fresh {
            match self
                .store
                .release(r.clone(), process.clone(), ReleaseKind::Clean)
                .await
            {
                Ok(_) => warn!(
                    resource = %r,
                    pid = process.pid,
                    "released a grant its client went away without confirming"
                ),
                Err(e) => warn!(
                    resource = %r,
                    pid = process.pid,
                    error = %e,
                    "a grant its client never confirmed could not be released"
                ),
            }
        }
    }

    /// Runs an acquire, telling a waiting caller every second who is in its way. Returns
    /// `None` if the caller went away (dropping the store's future withdraws the request).
    async fn acquire_reporting(
        &self,
        spec: AcquireSpec,
        tx: &Tx,
    ) -> Option<Result<Vec<Grant>, StoreError>> {
        let process = spec.owner.process.clone();
        let items = spec.items.clone();
        let waits = spec.wait.is_some();
        // Subscribed before the request starts, so no note about it is missed.
        let mut notes = self.store.wait_notes();
        let mut notes_open = waits;
        let fut = self.store.acquire(spec);
        tokio::pin!(fut);
        let started = Instant::now();
        let waited_ms = || u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        // The first report comes quickly, so a caller sees who is in the way at once.
        let mut next = tokio::time::Instant::now() + Duration::from_millis(100);
        loop {
            tokio::select! {
                r = &mut fut => return Some(r),
                () = tx.closed() => return None,
                n = notes.recv(), if notes_open => match n {
                    Ok(n) if n.process == process && n.items == items => {
                        info!(pid = process.pid, note = %n.note, "told a waiting caller");
                        let waiting = pb::Waiting {
                            conflict: None,
                            waited_ms: waited_ms(),
                            note: Some(n.note),
                        };
                        if tx.send(event(pb::acquire_event::Event::Waiting(waiting))).await.is_err() {
                            return None;
                        }
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => notes_open = false,
                },
                () = tokio::time::sleep_until(next), if waits => {
                    next += PROGRESS_EVERY;
                    let in_way = self.store.conflict(process.clone(), items.clone()).await;
                    if let Ok(Some((c, blocked_for))) = in_way {
                        let waiting = pb::Waiting {
                            conflict: Some(conflict_to_wire(&c, blocked_for)),
                            waited_ms: waited_ms(),
                            note: None,
                        };
                        if tx.send(event(pb::acquire_event::Event::Waiting(waiting))).await.is_err() {
                            return None;
                        }
                    }
                }
            }
        }
    }

    /// After a grant with `hold`: reports leases lost by other means than the holder's own
    /// release, until every lease of the grant has ended or the caller goes away.
    async fn hold(&self, grants: &[Grant], mut reg: Registration, tx: &Tx) {
        let mut live: BTreeMap<ResourceName, Token> = grants
            .iter()
            .map(|g| (g.resource.clone(), g.token))
            .collect();
        let mut deadline = self.deadline.clone();
        let mut deadline_live = true;
        let safe = |at: Option<Instant>| {
            at.map(|at| {
                event(pb::acquire_event::Event::Safe(pb::Safe {
                    until_monotonic_ns: crate::fence::monotonic_ns_of(at),
                }))
            })
        };
        let first = *deadline.borrow_and_update();
        if let Some(msg) = safe(first)
            && tx.send(msg).await.is_err()
        {
            return;
        }
        while !live.is_empty() {
            let note = tokio::select! {
                n = reg.notes.recv() => n,
                () = tx.closed() => return,
                changed = deadline.changed(), if deadline_live => {
                    if changed.is_err() {
                        deadline_live = false;
                        continue;
                    }
                    // None: the session is gone; the last deadline stands.
                    let at = *deadline.borrow_and_update();
                    if let Some(msg) = safe(at)
                        && tx.send(msg).await.is_err()
                    {
                        return;
                    }
                    continue;
                }
            };
            let ended = match note {
                Some(Note::Ended { resource, ended })
                    if live.get(&resource) == Some(&ended.token) =>
                {
                    live.remove(&resource);
                    vec![(resource, ended)]
                }
                Some(Note::Ended { .. }) => continue,
                // Missed events: look at each lease directly.
                Some(Note::Resync) => {
                    let mut lost = Vec::new();
                    for (r, t) in &live {
                        if !self.store.validate(r.clone(), *t).await.unwrap_or(false) {
                            lost.push(r.clone());
                        }
                    }
                    let mut ended = Vec::new();
                    for r in lost {
                        live.remove(&r);
                        let v = self.store.inspect(r.clone()).await.ok().flatten();
                        if let Some(e) = v.and_then(|v| v.last_ended) {
                            ended.push((r, e));
                        }
                    }
                    ended
                }
                None => return,
            };
            for (resource, ended) in ended {
                let own = matches!(
                    ended.how,
                    EndReason::Released
                        | EndReason::ReleasedDirty { .. }
                        | EndReason::HandedOver { .. }
                );
                if own {
                    continue;
                }
                let lost = pb::Lost {
                    resource: resource.to_string(),
                    ended: Some((&ended).into()),
                };
                if tx
                    .send(event(pb::acquire_event::Event::Lost(lost)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}

/// The wire events for one engine event (an ending that dirties also yields `dirtied`).
pub fn wire_events(e: &Event) -> Vec<pb::Event> {
    match e {
        Event::Granted { resource, lease } => vec![pb::Event {
            kind: "granted".into(),
            resource: Some(resource.to_string()),
            at_ms: lease.granted_at.0,
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
            let base = pb::Event {
                kind: kind.into(),
                resource: Some(resource.to_string()),
                at_ms: ended.ended_at.0,
                ended: Some(ended.into()),
                host: Some(ended.owner.host().to_string()),
                ..Default::default()
            };
            let mut v = vec![base.clone()];
            if *dirtied {
                v.push(pb::Event {
                    kind: "dirtied".into(),
                    ..base
                });
            }
            v
        }
        Event::Cleaned { resource, by, at } => vec![pb::Event {
            kind: "cleaned".into(),
            resource: Some(resource.to_string()),
            at_ms: at.0,
            by: Some(by.clone()),
            ..Default::default()
        }],
        Event::SessionExpired { host, .. } => vec![pb::Event {
            kind: "host-session-expired".into(),
            host: Some(host.to_string()),
            ..Default::default()
        }],
    }
}
