//! The lease state machine.
//!
//! [`Engine`] holds every resource, host session and waiting request. Each operation takes
//! the time as an argument, changes the state, and answers its caller; what else it decided
//! (grants to earlier waiters, events, which records changed and must be made durable) is
//! collected until the caller drains it with [`Engine::take_output`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::resource::{EndReason, Ended, Lease, ResourceState};
use crate::types::{
    HostId, MAX_TEXT, Mode, NameError, Now, Owner, ProcessKey, ResourceName, SessionId, Time,
    Token, WaiterId, WallTime, check_free_text,
};

/// The most resources one request may name.
pub const MAX_ITEMS: usize = 256;

/// The engine's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// After a host session expires, its resources stay unavailable this long (SPEC §4).
    pub grace: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            grace: Duration::from_secs(5),
        }
    }
}

/// A host's session: all of the host's leases live and die with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Its id.
    pub id: SessionId,
    /// The host it belongs to.
    pub host: HostId,
    /// Its lifetime without renewal; `None` for a session that never expires (the local
    /// store, where the agent is the only authority on its host).
    #[serde(default, with = "opt_millis")]
    pub ttl: Option<Duration>,
    /// When it expires unless renewed.
    #[serde(default)]
    pub expires_at: Option<Time>,
}

mod opt_millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_millis() as u64)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

/// A request for one or more resources, granted all together or not at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcquireRequest {
    /// Who asks.
    pub owner: Owner,
    /// The session of the owner's host.
    pub session: SessionId,
    /// What it asks for; the order does not matter.
    pub items: Vec<(ResourceName, Mode)>,
    /// Whether the caller will check a dirty resource before using it.
    pub accept_dirty: bool,
    /// Whether to queue when the resources are not free now.
    pub wait: bool,
}

/// One granted resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The resource.
    pub resource: ResourceName,
    /// The mode.
    pub mode: Mode,
    /// The fencing token of this grant.
    pub token: Token,
    /// When the resource is dirty, why: the caller accepted it and must check before use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty: Option<Ended>,
    /// Whether the caller already held this lease (the grant is the earlier one).
    #[serde(default)]
    pub existing: bool,
}

/// The answer to an acquire that did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// Everything was granted.
    Granted(Vec<Grant>),
    /// The request waits in line; its outcome comes through [`Output::waiters`].
    Queued(WaiterId),
}

/// Why a resource cannot be granted now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    /// The resource.
    pub resource: ResourceName,
    /// Its live leases.
    pub holders: Vec<Lease>,
    /// How many requests wait for it.
    pub waiting: usize,
    /// When it is in the grace after a host was lost, the end of the grace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked_until: Option<Time>,
    /// Whether it is kept for a handover in progress.
    #[serde(default)]
    pub reserved: bool,
}

impl Conflict {
    /// A conflict on `resource` about which nothing more is known (it was just decided).
    pub fn unknown(resource: ResourceName) -> Conflict {
        Conflict {
            resource,
            holders: Vec::new(),
            waiting: 0,
            blocked_until: None,
            reserved: false,
        }
    }
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is ", self.resource)?;
        if let Some(first) = self.holders.first() {
            write!(
                f,
                "held {} by {} (token {})",
                first.mode, first.owner, first.token
            )?;
            if self.holders.len() > 1 {
                write!(f, " and {} more", self.holders.len() - 1)?;
            }
        } else if self.reserved {
            write!(f, "being handed over")?;
        } else if let Some(until) = self.blocked_until {
            write!(
                f,
                "in its grace period after its holder's host was lost (until t={}ms)",
                until.0
            )?;
        } else {
            write!(f, "promised to earlier waiters")?;
        }
        if self.waiting > 0 {
            write!(f, "; {} waiting", self.waiting)?;
        }
        Ok(())
    }
}

/// Why an acquire failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "error", rename_all = "kebab-case")]
pub enum AcquireError {
    /// The request is malformed.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A resource is held by another owner (or promised to earlier waiters).
    #[error("{0}")]
    Busy(Conflict),
    /// A resource is dirty and the caller did not accept checking it.
    #[error("{resource} needs a check: last exclusive lease (token {}, {}) ended: {}", .dirty.token, .dirty.owner, .dirty.how.describe())]
    NeedsCheck {
        /// The resource.
        resource: ResourceName,
        /// How its last exclusive lease ended.
        dirty: Box<Ended>,
    },
    /// The caller already holds the resource in the other mode.
    #[error("{resource} is already held by this process in {held} mode")]
    ModeConflict {
        /// The resource.
        resource: ResourceName,
        /// The mode held.
        held: Mode,
    },
    /// The session is unknown or has expired.
    #[error("host session {0} is unknown or expired")]
    NoSession(SessionId),
    /// The waiting request was withdrawn: its process ended or its session expired.
    #[error("the waiting request was cancelled: {0}")]
    Cancelled(String),
}

/// How a holder lets go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseKind {
    /// Cleanly: the resource is consistent.
    Clean,
    /// Dirty: the resource may be inconsistent and needs a check.
    Dirty {
        /// Why, such as the exit status of a command.
        note: Option<String>,
    },
    /// To the exclusive waiter of `host` (with `label`, when given), in one step (SPEC G7).
    Handover {
        /// The host of the waiting owner.
        host: HostId,
        /// The label of the waiting owner, when several wait on that host.
        label: Option<String>,
    },
}

/// A request to release one lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseRequest {
    /// The resource.
    pub resource: ResourceName,
    /// The holder.
    pub process: ProcessKey,
    /// How.
    pub kind: ReleaseKind,
}

/// A lease that ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Released {
    /// The resource.
    pub resource: ResourceName,
    /// The record of the ended lease.
    pub ended: Ended,
    /// Whether this left the resource dirty.
    pub dirtied: bool,
}

/// Why a release, force-release or mark-clean failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "error", rename_all = "kebab-case")]
pub enum ReleaseError {
    /// The request is malformed.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The process holds no lease on the resource.
    #[error("{resource} is not held by {process}")]
    NotHeld {
        /// The resource.
        resource: ResourceName,
        /// The process.
        process: ProcessKey,
    },
    /// Nobody holds the resource.
    #[error("{0} is not held by anyone")]
    Unheld(ResourceName),
    /// The resource has never been seen.
    #[error("{0} is not a known resource")]
    Unknown(ResourceName),
    /// A handover needs an exclusive lease.
    #[error("{0} is held shared; only an exclusive lease can be handed over")]
    HandoverShared(ResourceName),
    /// Nobody on the named host waits for the resource.
    #[error("nobody on host {host}{} waits for {resource} in exclusive mode; start the destination's `acquire --wait` first", .label.as_ref().map(|l| format!(" with label {l:?}")).unwrap_or_default())]
    NoWaiter {
        /// The resource.
        resource: ResourceName,
        /// The host named.
        host: HostId,
        /// The label named.
        label: Option<String>,
    },
    /// The only waiters named belong to another user than the holder's, and not to root.
    #[error(
        "the owner waiting for {resource} there ({waiter}) runs as {}, not as the holder's {} or root; a label is not an identity, so the lease is not handed to it. Start the destination as the holder's user (or root), or release normally",
        uid_words(*.waiter_uid), uid_words(*.holder_uid)
    )]
    WaiterOfOtherUser {
        /// The resource.
        resource: ResourceName,
        /// The first waiter that matched host and label.
        waiter: Box<ProcessKey>,
        /// Its uid, when known.
        waiter_uid: Option<u32>,
        /// The holder's uid, when known.
        holder_uid: Option<u32>,
    },
}

fn uid_words(uid: Option<u32>) -> String {
    uid.map_or_else(|| "an unknown user".to_owned(), |u| format!("uid {u}"))
}

/// Why a session operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The host already has a live session.
    #[error(
        "host id {host} is in use by a live session ({session}); is another agent running with this host id?"
    )]
    HostInUse {
        /// The host.
        host: HostId,
        /// Its live session.
        session: SessionId,
    },
    /// The session is unknown or has expired.
    #[error("host session {0} is unknown or expired")]
    NoSession(SessionId),
}

/// Something that happened, for logs and `watch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// A lease was granted.
    Granted {
        /// The resource.
        resource: ResourceName,
        /// The lease.
        lease: Lease,
    },
    /// A lease ended.
    Ended {
        /// The resource.
        resource: ResourceName,
        /// How.
        ended: Ended,
        /// Whether the resource is now dirty because of it.
        dirtied: bool,
    },
    /// A dirty mark was cleared.
    Cleaned {
        /// The resource.
        resource: ResourceName,
        /// Who cleared it.
        by: String,
        /// When.
        at: WallTime,
    },
    /// A host session expired.
    SessionExpired {
        /// The session.
        session: SessionId,
        /// Its host.
        host: HostId,
    },
}

/// What the engine decided besides its direct answers; drained by [`Engine::take_output`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Output {
    /// Resources whose durable record changed.
    pub changed: BTreeSet<ResourceName>,
    /// Whether the session table changed, or the token counter was raised from outside
    /// ([`Engine::raise_token_floor`]). Grants do not set it: each records its token as the
    /// `last_token` of its resources, and [`Engine::restore`] takes the counter past those.
    pub meta_changed: bool,
    /// Outcomes of waiting requests.
    pub waiters: Vec<(WaiterId, Result<Vec<Grant>, AcquireError>)>,
    /// Events, in order.
    pub events: Vec<Event>,
}

impl Output {
    /// Whether anything must be made durable.
    pub fn needs_persist(&self) -> bool {
        self.meta_changed || !self.changed.is_empty()
    }
}

/// The durable part of the engine besides resource records.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// The smallest token the next grant may take.
    pub next_token: u64,
    /// The next session id.
    pub next_session: u64,
    /// Sessions that have not expired.
    pub sessions: Vec<Session>,
}

#[derive(Debug, Clone)]
struct Waiter {
    owner: Owner,
    session: SessionId,
    items: Vec<(ResourceName, Mode)>,
    accept_dirty: bool,
    /// Whether this engine decides the waiter's outcome; a waiter of another host (a
    /// cluster store) only keeps its place in the queues and can be a handover target.
    decided_here: bool,
}

enum Verdict {
    /// Grantable; for each item, the token of a lease the caller already holds.
    Grant(Vec<Option<Token>>),
    Fail(AcquireError),
    Blocked(Conflict),
}

/// The lease state machine. See the crate documentation for an example.
#[derive(Debug, Clone)]
pub struct Engine {
    config: EngineConfig,
    resources: BTreeMap<ResourceName, ResourceState>,
    sessions: BTreeMap<SessionId, Session>,
    waiters: BTreeMap<WaiterId, Waiter>,
    by_process: BTreeMap<ProcessKey, BTreeSet<ResourceName>>,
    graced: BTreeSet<(Time, ResourceName)>,
    next_token: u64,
    next_session: u64,
    next_waiter: u64,
    out: Output,
}

impl Engine {
    /// An engine with no state.
    pub fn new(config: EngineConfig) -> Engine {
        Engine::restore(config, Meta::default(), Vec::new())
    }

    /// An engine holding durable state saved earlier ([`Engine::meta`] and
    /// [`Engine::resource`]). Waiting requests are not durable and start empty.
    pub fn restore(
        config: EngineConfig,
        meta: Meta,
        resources: Vec<(ResourceName, ResourceState)>,
    ) -> Engine {
        let mut e = Engine {
            config,
            resources: BTreeMap::new(),
            sessions: meta.sessions.into_iter().map(|s| (s.id, s)).collect(),
            waiters: BTreeMap::new(),
            by_process: BTreeMap::new(),
            graced: BTreeSet::new(),
            next_token: meta.next_token.max(1),
            next_session: meta.next_session.max(1),
            next_waiter: 1,
            out: Output::default(),
        };
        for (name, mut st) in resources {
            st.queue.clear();
            st.reserved_for = None;
            for l in &st.holders {
                e.by_process
                    .entry(l.owner.process.clone())
                    .or_default()
                    .insert(name.clone());
            }
            if let Some(t) = st.blocked_until {
                e.graced.insert((t, name.clone()));
            }
            e.next_token = e.next_token.max(st.last_token.0.saturating_add(1));
            e.resources.insert(name, st);
        }
        e
    }

    /// The engine's settings.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The durable state besides resource records.
    pub fn meta(&self) -> Meta {
        Meta {
            next_token: self.next_token,
            next_session: self.next_session,
            sessions: self.sessions.values().cloned().collect(),
        }
    }

    /// One resource's state.
    pub fn resource(&self, name: &ResourceName) -> Option<&ResourceState> {
        self.resources.get(name)
    }

    /// Every known resource, by name.
    pub fn resources(&self) -> impl Iterator<Item = (&ResourceName, &ResourceState)> {
        self.resources.iter()
    }

    /// The live sessions.
    pub fn sessions(&self) -> impl Iterator<Item = &Session> {
        self.sessions.values()
    }

    /// The live session of `host`, if any.
    pub fn session_of(&self, host: &HostId) -> Option<&Session> {
        self.sessions.values().find(|s| &s.host == host)
    }

    /// The resources `process` holds.
    pub fn held_by(&self, process: &ProcessKey) -> impl Iterator<Item = &ResourceName> {
        self.by_process.get(process).into_iter().flatten()
    }

    /// Every process holding at least one lease.
    pub fn holders(&self) -> impl Iterator<Item = &ProcessKey> {
        self.by_process.keys()
    }

    /// Raises the token counter so the next grant takes at least `floor`; stores whose own
    /// counter lives elsewhere (etcd's revision) use this before each operation.
    pub fn raise_token_floor(&mut self, floor: u64) {
        if floor > self.next_token {
            self.next_token = floor;
            self.out.meta_changed = true;
        }
    }

    /// Takes what was decided since the last call.
    pub fn take_output(&mut self) -> Output {
        std::mem::take(&mut self.out)
    }

    /// The next time at which [`Engine::tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Time> {
        let sessions = self.sessions.values().filter_map(|s| s.expires_at).min();
        let grace = self.graced.first().map(|(t, _)| *t);
        match (sessions, grace) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether `token` is the token of a live lease on `resource` (SPEC G2 `validate`).
    pub fn validate(&self, resource: &ResourceName, token: Token) -> bool {
        self.resources
            .get(resource)
            .is_some_and(|st| st.holders.iter().any(|l| l.token == token))
    }

    /// How many requests wait for `resource`.
    pub fn waiting(&self, resource: &ResourceName) -> usize {
        self.resources.get(resource).map_or(0, |st| st.queue.len())
    }

    /// The owners waiting for `resource`, in order.
    pub fn waiters_of(&self, resource: &ResourceName) -> Vec<(WaiterId, &Owner, Mode)> {
        let Some(st) = self.resources.get(resource) else {
            return Vec::new();
        };
        st.queue
            .iter()
            .filter_map(|id| {
                let w = self.waiters.get(id)?;
                let mode = w.items.iter().find(|(r, _)| r == resource)?.1;
                Some((*id, &w.owner, mode))
            })
            .collect()
    }

    // ---- sessions ----

    /// Opens a session for `host`; with `ttl`, it expires unless renewed within it.
    ///
    /// # Errors
    /// [`SessionError::HostInUse`] when the host already has a live session.
    pub fn open_session(
        &mut self,
        host: HostId,
        ttl: Option<Duration>,
        now: Now,
    ) -> Result<SessionId, SessionError> {
        self.tick(now);
        if let Some(s) = self.session_of(&host) {
            return Err(SessionError::HostInUse {
                host,
                session: s.id,
            });
        }
        let id = SessionId(self.next_session);
        self.next_session += 1;
        let expires_at = ttl.map(|t| now.mono.after(t));
        self.sessions.insert(
            id,
            Session {
                id,
                host,
                ttl,
                expires_at,
            },
        );
        self.out.meta_changed = true;
        Ok(id)
    }

    /// Renews a session: it now expires `ttl` after `now`. Returns the new expiry.
    ///
    /// # Errors
    /// [`SessionError::NoSession`] when the session is unknown or has expired, including
    /// when it is due at `now`: a session past its expiry is expired, never renewed.
    pub fn renew_session(&mut self, id: SessionId, now: Now) -> Result<Option<Time>, SessionError> {
        self.tick(now);
        let s = self
            .sessions
            .get_mut(&id)
            .ok_or(SessionError::NoSession(id))?;
        if let Some(ttl) = s.ttl {
            if s.expires_at.is_some_and(|t| t <= now.mono) {
                return Err(SessionError::NoSession(id));
            }
            s.expires_at = Some(now.mono.after(ttl));
            self.out.meta_changed = true;
        }
        Ok(s.expires_at)
    }

    /// Ends a session now, as if it had expired: its leases end (`session-expired`), its
    /// exclusive resources become dirty, and all its resources stay unavailable for `grace`.
    ///
    /// # Errors
    /// [`SessionError::NoSession`] when the session is unknown or has already expired
    /// (including by being due at `now`).
    pub fn expire_session(&mut self, id: SessionId, now: Now) -> Result<(), SessionError> {
        self.tick(now);
        let affected = self.expire_one(id, now)?;
        self.serve(affected, now);
        Ok(())
    }

    /// Expires one session without serving waiters; returns the resources it touched.
    fn expire_one(
        &mut self,
        id: SessionId,
        now: Now,
    ) -> Result<BTreeSet<ResourceName>, SessionError> {
        let s = self
            .sessions
            .remove(&id)
            .ok_or(SessionError::NoSession(id))?;
        self.out.meta_changed = true;
        let until = now.mono.after(self.config.grace);
        let mut affected = BTreeSet::new();
        let doomed: Vec<(ResourceName, ProcessKey)> = self
            .resources
            .iter()
            .flat_map(|(r, st)| {
                st.holders
                    .iter()
                    .filter(|l| l.session == id)
                    .map(move |l| (r.clone(), l.owner.process.clone()))
            })
            .collect();
        for (r, p) in doomed {
            self.end_lease(&r, &p, EndReason::SessionExpired, now);
            let st = self.resources.entry(r.clone()).or_default();
            if st.blocked_until.is_none_or(|t| t < until) {
                if let Some(old) = st.blocked_until {
                    self.graced.remove(&(old, r.clone()));
                }
                st.blocked_until = Some(until);
                self.graced.insert((until, r.clone()));
            }
            affected.insert(r);
        }
        let gone: Vec<WaiterId> = self
            .waiters
            .iter()
            .filter(|(_, w)| w.session == id)
            .map(|(id, _)| *id)
            .collect();
        for w in gone {
            affected.extend(self.drop_waiter(
                w,
                Err(AcquireError::Cancelled("its host session expired".into())),
            ));
        }
        self.out.events.push(Event::SessionExpired {
            session: id,
            host: s.host,
        });
        Ok(affected)
    }

    /// Advances time: expires every session due at `now`, ends the grace periods that are
    /// over, and only then serves the waiters that can be granted, so that no waiter is granted
    /// on a session that expires in the same instant.
    ///
    /// Every operation that is told the time calls this first: nothing is granted, released
    /// or renewed on a session that is already due, whether or not the driver ticked.
    pub fn tick(&mut self, now: Now) {
        let due: Vec<SessionId> = self
            .sessions
            .values()
            .filter(|s| s.expires_at.is_some_and(|t| t <= now.mono))
            .map(|s| s.id)
            .collect();
        let mut affected = BTreeSet::new();
        for id in due {
            if let Ok(touched) = self.expire_one(id, now) {
                affected.extend(touched);
            }
        }
        while let Some((t, r)) = self.graced.first().cloned() {
            if t > now.mono {
                break;
            }
            self.graced.remove(&(t, r.clone()));
            if let Some(st) = self.resources.get_mut(&r) {
                st.blocked_until = None;
                self.out.changed.insert(r.clone());
            }
            affected.insert(r);
        }
        self.serve(affected, now);
    }

    // ---- acquire ----

    /// Asks for leases, all or nothing.
    ///
    /// # Errors
    /// [`AcquireError::Busy`] when a resource is held (and the request does not wait),
    /// [`AcquireError::NeedsCheck`] when a free resource is dirty and not accepted, and the
    /// other variants for bad requests.
    pub fn acquire(&mut self, mut req: AcquireRequest, now: Now) -> Result<Acquired, AcquireError> {
        self.tick(now);
        self.check_request(&mut req)?;
        match self.evaluate(&req.owner.process, &req.items, req.accept_dirty, None, now) {
            Verdict::Grant(existing) => Ok(Acquired::Granted(self.grant(
                &req.owner,
                req.session,
                &req.items,
                &existing,
                now,
            ))),
            Verdict::Fail(e) => Err(e),
            Verdict::Blocked(c) if !req.wait => Err(AcquireError::Busy(c)),
            Verdict::Blocked(_) => {
                let id = WaiterId(self.next_waiter);
                self.enqueue(id, req, true);
                Ok(Acquired::Queued(id))
            }
        }
    }

    /// Withdraws a waiting request. Returns false when it is no longer waiting (it was
    /// granted or failed, and its outcome is in the output).
    pub fn cancel_wait(&mut self, id: WaiterId, now: Now) -> bool {
        self.tick(now);
        if !self.waiters.contains_key(&id) {
            return false;
        }
        let affected = self.drop_waiter_silently(id);
        self.serve(affected, now);
        true
    }

    /// Puts a waiting request whose id was chosen elsewhere (a cluster store's queue order)
    /// into the queues of its resources, without deciding anything. With `decided_here` the
    /// engine grants or fails it like its own waiters; without, it only keeps its place, and
    /// can be named by a handover. The request's `wait` flag is ignored.
    ///
    /// # Errors
    /// [`AcquireError::Invalid`] for a malformed request or an id already in use.
    pub fn insert_waiter(
        &mut self,
        id: WaiterId,
        mut req: AcquireRequest,
        decided_here: bool,
    ) -> Result<(), AcquireError> {
        if self.waiters.contains_key(&id) {
            return Err(AcquireError::Invalid(format!("waiter {} exists", id.0)));
        }
        req.items.sort();
        if req.items.is_empty() || req.items.windows(2).any(|w| w[0].0 == w[1].0) {
            return Err(AcquireError::Invalid(
                "a waiter needs distinct resources".into(),
            ));
        }
        self.enqueue(id, req, decided_here);
        Ok(())
    }

    /// Puts a checked request in the queues of its resources under `id`.
    fn enqueue(&mut self, id: WaiterId, req: AcquireRequest, decided_here: bool) {
        for (r, _) in &req.items {
            self.resources
                .entry(r.clone())
                .or_default()
                .queue
                .insert(id);
        }
        self.next_waiter = self.next_waiter.max(id.0.saturating_add(1));
        self.waiters.insert(
            id,
            Waiter {
                owner: req.owner,
                session: req.session,
                items: req.items,
                accept_dirty: req.accept_dirty,
                decided_here,
            },
        );
    }

    /// Keeps `resource` for waiter `id` (a handover in progress, restored from a cluster
    /// store's record). Nothing changes if the resource is unknown.
    pub fn set_reservation(&mut self, resource: &ResourceName, id: Option<WaiterId>) {
        if let Some(st) = self.resources.get_mut(resource) {
            st.reserved_for = id;
        }
    }

    /// Serves the waiters of `resources` that this engine decides, as after any change to
    /// them; a cluster store calls it after loading a snapshot.
    pub fn serve_waiters(&mut self, resources: impl IntoIterator<Item = ResourceName>, now: Now) {
        self.tick(now);
        self.serve(resources.into_iter().collect(), now);
    }

    /// The waiter `id`'s owner process, if it is waiting.
    pub fn waiter_process(&self, id: WaiterId) -> Option<&ProcessKey> {
        self.waiters.get(&id).map(|w| &w.owner.process)
    }

    /// Why `items` could not be granted to a new request from `process` at `now`, if they
    /// could not; for telling a waiting caller who is in its way.
    pub fn conflict(
        &self,
        process: &ProcessKey,
        items: &[(ResourceName, Mode)],
        now: Now,
    ) -> Option<Conflict> {
        let mut items = items.to_vec();
        items.sort();
        match self.evaluate(process, &items, true, None, now) {
            Verdict::Blocked(c) => Some(c),
            _ => None,
        }
    }

    fn check_request(&self, req: &mut AcquireRequest) -> Result<(), AcquireError> {
        let invalid = |m: String| Err(AcquireError::Invalid(m));
        if req.items.is_empty() {
            return invalid("no resources named".into());
        }
        if req.items.len() > MAX_ITEMS {
            return invalid(format!(
                "{} resources named; the limit is {MAX_ITEMS}",
                req.items.len()
            ));
        }
        req.items.sort();
        if let Some(w) = req.items.windows(2).find(|w| w[0].0 == w[1].0) {
            return invalid(format!("{} is named twice", w[0].0));
        }
        req.owner
            .validate()
            .or_else(|e: NameError| invalid(e.to_string()))?;
        let Some(s) = self.sessions.get(&req.session) else {
            return Err(AcquireError::NoSession(req.session));
        };
        if s.host != req.owner.process.host {
            return invalid(format!(
                "owner is on host {} but the session belongs to host {}",
                req.owner.process.host, s.host
            ));
        }
        Ok(())
    }

    /// Decides whether `items` can be granted to `process` now. `me` is the waiter asking,
    /// or `None` for a new request, which comes after every waiter.
    fn evaluate(
        &self,
        process: &ProcessKey,
        items: &[(ResourceName, Mode)],
        accept_dirty: bool,
        me: Option<WaiterId>,
        now: Now,
    ) -> Verdict {
        let empty = ResourceState::default();
        let mut existing = Vec::with_capacity(items.len());
        let mut needs_check = None;
        let mut blocked = None;
        for (r, mode) in items {
            let st = self.resources.get(r).unwrap_or(&empty);
            if let Some(l) = st.lease_of(process) {
                if l.mode != *mode {
                    return Verdict::Fail(AcquireError::ModeConflict {
                        resource: r.clone(),
                        held: l.mode,
                    });
                }
                existing.push(Some(l.token));
                continue;
            }
            existing.push(None);
            let mine = me.is_some() && st.reserved_for == me;
            let ahead = match me {
                Some(me) => st.queue.range(..me).next().is_some(),
                None => !st.queue.is_empty(),
            };
            let free = (mine || (st.reserved_for.is_none() && !ahead))
                && st.admits(*mode)
                && st.blocked_until.is_none_or(|t| t <= now.mono);
            if !free {
                blocked.get_or_insert_with(|| Conflict {
                    resource: r.clone(),
                    holders: st.holders.clone(),
                    waiting: st.queue.len(),
                    blocked_until: st.blocked_until.filter(|t| *t > now.mono),
                    reserved: st.reserved_for.is_some() && !mine,
                });
            } else if let Some(d) = &st.dirty
                && !accept_dirty
            {
                needs_check.get_or_insert_with(|| AcquireError::NeedsCheck {
                    resource: r.clone(),
                    dirty: Box::new(d.clone()),
                });
            }
        }
        match (blocked, needs_check) {
            (Some(c), _) => Verdict::Blocked(c),
            (None, Some(e)) => Verdict::Fail(e),
            (None, None) => Verdict::Grant(existing),
        }
    }

    fn grant(
        &mut self,
        owner: &Owner,
        session: SessionId,
        items: &[(ResourceName, Mode)],
        existing: &[Option<Token>],
        now: Now,
    ) -> Vec<Grant> {
        let fresh = existing.iter().any(Option::is_none);
        let token = if fresh {
            let floor = items
                .iter()
                .zip(existing)
                .filter(|(_, e)| e.is_none())
                .filter_map(|((r, _), _)| self.resources.get(r))
                .map(|st| st.last_token.0.saturating_add(1))
                .max()
                .unwrap_or(1);
            let t = self.next_token.max(floor);
            // Not a metadata change: the token is recorded as `last_token` of every resource
            // granted below, in the same output, and `restore` rebuilds the counter from those.
            self.next_token = t + 1;
            Token(t)
        } else {
            Token(0)
        };
        let mut grants = Vec::with_capacity(items.len());
        for ((r, mode), prior) in items.iter().zip(existing) {
            let st = self.resources.entry(r.clone()).or_default();
            let dirty = st.dirty.clone();
            if let Some(t) = prior {
                grants.push(Grant {
                    resource: r.clone(),
                    mode: *mode,
                    token: *t,
                    dirty,
                    existing: true,
                });
                continue;
            }
            let lease = Lease {
                owner: owner.clone(),
                mode: *mode,
                token,
                session,
                granted_at: now.wall,
            };
            st.holders.push(lease.clone());
            st.last_token = token;
            st.reserved_for = None;
            self.by_process
                .entry(owner.process.clone())
                .or_default()
                .insert(r.clone());
            self.out.changed.insert(r.clone());
            self.out.events.push(Event::Granted {
                resource: r.clone(),
                lease,
            });
            grants.push(Grant {
                resource: r.clone(),
                mode: *mode,
                token,
                dirty,
                existing: false,
            });
        }
        grants
    }

    /// Grants or fails every waiter that can now be decided, in arrival order, until nothing
    /// more changes. `affected` names the resources whose state changed.
    fn serve(&mut self, mut affected: BTreeSet<ResourceName>, now: Now) {
        loop {
            let candidates: BTreeSet<WaiterId> = affected
                .iter()
                .filter_map(|r| self.resources.get(r))
                .flat_map(|st| st.queue.iter().copied())
                .collect();
            let mut progress = false;
            for id in candidates {
                let Some(w) = self.waiters.get(&id).filter(|w| w.decided_here) else {
                    continue;
                };
                let outcome = match self.evaluate(
                    &w.owner.process,
                    &w.items,
                    w.accept_dirty,
                    Some(id),
                    now,
                ) {
                    Verdict::Blocked(_) => continue,
                    Verdict::Fail(e) => Err(e),
                    Verdict::Grant(existing) => {
                        let w = w.clone();
                        Ok(self.grant(&w.owner, w.session, &w.items, &existing, now))
                    }
                };
                affected.extend(self.drop_waiter(id, outcome));
                progress = true;
            }
            if !progress {
                break;
            }
        }
        self.prune(affected);
    }

    /// Removes a waiter and reports its outcome. Returns the resources it waited for.
    fn drop_waiter(
        &mut self,
        id: WaiterId,
        outcome: Result<Vec<Grant>, AcquireError>,
    ) -> BTreeSet<ResourceName> {
        let affected = self.drop_waiter_silently(id);
        self.out.waiters.push((id, outcome));
        affected
    }

    fn drop_waiter_silently(&mut self, id: WaiterId) -> BTreeSet<ResourceName> {
        let mut affected = BTreeSet::new();
        if let Some(w) = self.waiters.remove(&id) {
            for (r, _) in w.items {
                if let Some(st) = self.resources.get_mut(&r) {
                    st.queue.remove(&id);
                    if st.reserved_for == Some(id) {
                        st.reserved_for = None;
                    }
                }
                affected.insert(r);
            }
        }
        affected
    }

    /// Forgets records that hold nothing worth keeping (a waiter that came and went).
    fn prune(&mut self, names: BTreeSet<ResourceName>) {
        for r in names {
            if self.resources.get(&r).is_some_and(ResourceState::is_empty) {
                self.resources.remove(&r);
            }
        }
    }

    // ---- release ----

    /// Ends one lease as its holder asks.
    ///
    /// # Errors
    /// [`ReleaseError::NotHeld`] when the process holds no lease on the resource;
    /// [`ReleaseError::NoWaiter`] or [`ReleaseError::HandoverShared`] when a handover cannot
    /// happen, in which case the lease stays as it was.
    pub fn release(&mut self, req: ReleaseRequest, now: Now) -> Result<Released, ReleaseError> {
        self.tick(now);
        let lease = self
            .resources
            .get(&req.resource)
            .and_then(|st| st.lease_of(&req.process))
            .cloned()
            .ok_or_else(|| ReleaseError::NotHeld {
                resource: req.resource.clone(),
                process: req.process.clone(),
            })?;
        let how = match req.kind {
            ReleaseKind::Clean => EndReason::Released,
            ReleaseKind::Dirty { note } => {
                if let Some(n) = &note {
                    check_free_text("release note", n, MAX_TEXT)
                        .map_err(|e| ReleaseError::Invalid(e.to_string()))?;
                }
                EndReason::ReleasedDirty { note }
            }
            ReleaseKind::Handover { host, label } => {
                if lease.mode != Mode::Exclusive {
                    return Err(ReleaseError::HandoverShared(req.resource));
                }
                let named: Vec<_> = self
                    .waiters_of(&req.resource)
                    .into_iter()
                    .filter(|(_, o, m)| {
                        *m == Mode::Exclusive
                            && o.process.host == host
                            && (label.is_none() || o.label == label)
                    })
                    .collect();
                // A label is a name for people, not an identity: the lease goes only to a
                // waiter of the holder's own user, or of root (SPEC G8).
                let target = named
                    .iter()
                    .find(|(_, o, _)| o.uid == Some(0) || o.uid == lease.owner.uid)
                    .map(|(id, o, _)| (*id, o.process.clone()));
                let Some((target, to)) = target else {
                    if let Some((_, o, _)) = named.first() {
                        return Err(ReleaseError::WaiterOfOtherUser {
                            resource: req.resource,
                            waiter: Box::new(o.process.clone()),
                            waiter_uid: o.uid,
                            holder_uid: lease.owner.uid,
                        });
                    }
                    return Err(ReleaseError::NoWaiter {
                        resource: req.resource,
                        host,
                        label,
                    });
                };
                let released = self.end_lease(
                    &req.resource,
                    &req.process,
                    EndReason::HandedOver { to },
                    now,
                );
                if let Some(st) = self.resources.get_mut(&req.resource) {
                    st.reserved_for = Some(target);
                }
                self.serve(BTreeSet::from([req.resource]), now);
                return Ok(released);
            }
        };
        let released = self.end_lease(&req.resource, &req.process, how, now);
        self.serve(BTreeSet::from([req.resource]), now);
        Ok(released)
    }

    /// Ends every lease and waiting request of a process that has exited.
    pub fn end_process(&mut self, process: &ProcessKey, now: Now) -> Vec<Released> {
        self.end_process_as(process, EndReason::ProcessDied, now)
    }

    /// [`Engine::end_process`], recording the leases as ended `how` (a fenced holder).
    pub fn end_process_as(
        &mut self,
        process: &ProcessKey,
        how: EndReason,
        now: Now,
    ) -> Vec<Released> {
        self.tick(now);
        let held: Vec<ResourceName> = self.held_by(process).cloned().collect();
        let mut affected: BTreeSet<ResourceName> = held.iter().cloned().collect();
        let released = held
            .iter()
            .map(|r| self.end_lease(r, process, how.clone(), now))
            .collect();
        let waiting: Vec<WaiterId> = self
            .waiters
            .iter()
            .filter(|(_, w)| &w.owner.process == process)
            .map(|(id, _)| *id)
            .collect();
        for id in waiting {
            affected.extend(
                self.drop_waiter(id, Err(AcquireError::Cancelled("its process ended".into()))),
            );
        }
        self.serve(affected, now);
        released
    }

    /// Revokes every lease on a resource (an administrator's act). Exclusive leases leave it
    /// dirty. A handover in progress is called off.
    ///
    /// # Errors
    /// [`ReleaseError::Unheld`] when nobody holds the resource; [`ReleaseError::Invalid`]
    /// when the reason is empty or malformed.
    pub fn force_release(
        &mut self,
        resource: &ResourceName,
        reason: &str,
        by: &str,
        now: Now,
    ) -> Result<Vec<Released>, ReleaseError> {
        self.tick(now);
        if reason.trim().is_empty() {
            return Err(ReleaseError::Invalid(
                "a force-release needs a reason".into(),
            ));
        }
        check_free_text("reason", reason, MAX_TEXT)
            .and_then(|()| check_free_text("forcing user", by, MAX_TEXT))
            .map_err(|e| ReleaseError::Invalid(e.to_string()))?;
        let Some(st) = self.resources.get_mut(resource) else {
            return Err(ReleaseError::Unknown(resource.clone()));
        };
        if st.holders.is_empty() && st.reserved_for.is_none() {
            return Err(ReleaseError::Unheld(resource.clone()));
        }
        st.reserved_for = None;
        let holders: Vec<ProcessKey> = st.holders.iter().map(|l| l.owner.process.clone()).collect();
        let released = holders
            .iter()
            .map(|p| {
                let how = EndReason::Forced {
                    reason: reason.to_owned(),
                    by: by.to_owned(),
                };
                self.end_lease(resource, p, how, now)
            })
            .collect();
        self.serve(BTreeSet::from([resource.clone()]), now);
        Ok(released)
    }

    /// Clears a resource's dirty mark. Returns the mark it had, if any.
    ///
    /// # Errors
    /// [`ReleaseError::Unknown`] when the resource has never been seen.
    pub fn mark_clean(
        &mut self,
        resource: &ResourceName,
        by: &str,
        now: Now,
    ) -> Result<Option<Ended>, ReleaseError> {
        self.tick(now);
        check_free_text("cleaning user", by, MAX_TEXT)
            .map_err(|e| ReleaseError::Invalid(e.to_string()))?;
        let Some(st) = self.resources.get_mut(resource) else {
            return Err(ReleaseError::Unknown(resource.clone()));
        };
        let was = st.dirty.take();
        if was.is_some() {
            self.out.changed.insert(resource.clone());
            self.out.events.push(Event::Cleaned {
                resource: resource.clone(),
                by: by.to_owned(),
                at: now.wall,
            });
            self.serve(BTreeSet::from([resource.clone()]), now);
        }
        Ok(was)
    }

    /// Removes one live lease and records how it ended. The lease must exist.
    fn end_lease(
        &mut self,
        resource: &ResourceName,
        process: &ProcessKey,
        how: EndReason,
        now: Now,
    ) -> Released {
        let st = self.resources.entry(resource.clone()).or_default();
        let pos = st.holders.iter().position(|l| &l.owner.process == process);
        let lease = match pos {
            Some(i) => st.holders.remove(i),
            None => unreachable_lease(resource, process),
        };
        let dirtied = lease.mode == Mode::Exclusive && how.dirties();
        let ended = Ended {
            owner: lease.owner,
            mode: lease.mode,
            token: lease.token,
            granted_at: lease.granted_at,
            ended_at: now.wall,
            how,
        };
        if dirtied {
            st.dirty = Some(ended.clone());
        }
        st.last_ended = Some(ended.clone());
        if let Some(set) = self.by_process.get_mut(process) {
            set.remove(resource);
            if set.is_empty() {
                self.by_process.remove(process);
            }
        }
        self.out.changed.insert(resource.clone());
        self.out.events.push(Event::Ended {
            resource: resource.clone(),
            ended: ended.clone(),
            dirtied,
        });
        Released {
            resource: resource.clone(),
            ended,
            dirtied,
        }
    }
}

#[cold]
fn unreachable_lease(resource: &ResourceName, process: &ProcessKey) -> ! {
    // Every caller looked the lease up first; reaching this is a bug in the engine.
    panic!("engine bug: no lease of {process} on {resource} to end")
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
