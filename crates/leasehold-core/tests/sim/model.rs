//! The simulator's own account of the world, built from what callers are told and its own
//! rules, never from the engine's state.

use std::collections::BTreeMap;

use leasehold_core::{
    EndReason, Mode, Owner, ProcessKey, ResourceName, SessionId, Token, WaiterId,
};

/// How a lease ended, as the model classifies it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndKind {
    /// Released cleanly.
    Clean,
    /// Released dirty.
    Dirty,
    /// Its process died.
    Died,
    /// Its session expired.
    Expired,
    /// Force-released.
    Forced,
    /// Handed over to a waiter.
    Handover,
}

impl EndKind {
    /// The model's own rule (SPEC G5), independent of the engine's: an exclusive lease that
    /// ends other than by a clean release or a handover dirties its resource.
    pub fn dirties_exclusive(self) -> bool {
        !matches!(self, EndKind::Clean | EndKind::Handover)
    }

    /// How the engine says a lease ended.
    pub fn of(how: &EndReason) -> EndKind {
        match how {
            EndReason::Released | EndReason::ExitedClean => EndKind::Clean,
            EndReason::ReleasedDirty { .. } => EndKind::Dirty,
            // A fenced holder died by its agent's hand: a death, as far as the model goes.
            EndReason::ProcessDied | EndReason::Fenced => EndKind::Died,
            EndReason::SessionExpired => EndKind::Expired,
            EndReason::Forced { .. } => EndKind::Forced,
            EndReason::HandedOver { .. } => EndKind::Handover,
        }
    }
}

/// A live lease as the model knows it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ModelLease {
    /// The holder.
    pub process: ProcessKey,
    /// The mode.
    pub mode: Mode,
    /// The token it was granted with.
    pub token: Token,
    /// The session it lives with.
    pub session: SessionId,
}

/// What the model knows of one resource.
#[derive(Debug, Clone, Default)]
pub struct ModelResource {
    /// Live leases.
    pub leases: Vec<ModelLease>,
    /// Whether the resource must be dirty.
    pub dirty: bool,
    /// The lease whose ending made it dirty: holder, token, how it ended.
    pub dirty_by: Option<(ProcessKey, Token, EndKind)>,
    /// No grant before this time (ms), after a session expired holding the resource.
    pub blocked_until: Option<u64>,
    /// The session expiry that set `blocked_until`: (session, expired at).
    pub blocked_by: Option<(SessionId, u64)>,
    /// Every token ever granted for the resource, in grant order.
    pub tokens: Vec<Token>,
    /// A handover in progress: the waiter the resource is kept for.
    pub reserved_for: Option<WaiterId>,
}

impl ModelResource {
    /// The largest token ever granted.
    pub fn max_token(&self) -> Option<Token> {
        self.tokens.iter().copied().max()
    }

    /// The lease `process` holds, if any.
    pub fn lease_of(&self, process: &ProcessKey) -> Option<&ModelLease> {
        self.leases.iter().find(|l| &l.process == process)
    }

    /// The model's own compatibility rule (SPEC §2): a new lease in `mode` may join the live
    /// leases when there are none, or when it and all of them are shared.
    pub fn admits(&self, mode: Mode) -> bool {
        self.leases.is_empty()
            || (mode == Mode::Shared && self.leases.iter().all(|l| l.mode == Mode::Shared))
    }

    /// Whether the resource is inside a grace period at `now`.
    pub fn in_grace(&self, now: u64) -> bool {
        self.blocked_until.is_some_and(|t| now < t)
    }
}

/// What the model knows of one host session.
#[derive(Debug, Clone)]
pub struct ModelSession {
    /// The host (index into the simulator's hosts).
    pub host: usize,
    /// Its TTL in ms; `None` for a session that never expires (the local store's).
    pub ttl: Option<u64>,
    /// When it was opened or last renewed successfully.
    pub last_renew: u64,
    /// When the engine expired it.
    pub expired_at: Option<u64>,
}

impl ModelSession {
    /// When it expires unless renewed: last successful renewal plus TTL (never without a TTL).
    pub fn due(&self) -> u64 {
        self.ttl.map_or(u64::MAX, |ttl| self.last_renew + ttl)
    }
}

/// A waiting request as the model knows it.
#[derive(Debug, Clone)]
pub struct ModelWaiter {
    /// Its id.
    pub id: WaiterId,
    /// Who waits.
    pub owner: Owner,
    /// With which session.
    pub session: SessionId,
    /// For what, sorted by name.
    pub items: Vec<(ResourceName, Mode)>,
    /// Whether it accepts a dirty resource.
    pub accept_dirty: bool,
}

/// The simulator's independent account of the world.
#[derive(Debug, Default)]
pub struct Model {
    /// Every resource of the run.
    pub resources: BTreeMap<ResourceName, ModelResource>,
    /// Every session ever opened.
    pub sessions: BTreeMap<SessionId, ModelSession>,
    /// The requests waiting now.
    pub waiters: BTreeMap<WaiterId, ModelWaiter>,
}

impl Model {
    /// One resource of the run.
    pub fn res(&self, r: &ResourceName) -> &ModelResource {
        static EMPTY: ModelResource = ModelResource {
            leases: Vec::new(),
            dirty: false,
            dirty_by: None,
            blocked_until: None,
            blocked_by: None,
            tokens: Vec::new(),
            reserved_for: None,
        };
        self.resources.get(r).unwrap_or(&EMPTY)
    }

    pub(super) fn res_mut(&mut self, r: &ResourceName) -> &mut ModelResource {
        self.resources.entry(r.clone()).or_default()
    }

    /// The waiters that include `r`, in id (arrival) order.
    pub fn waiters_on<'a>(&'a self, r: &'a ResourceName) -> impl Iterator<Item = &'a ModelWaiter> {
        self.waiters
            .values()
            .filter(move |w| w.items.iter().any(|(x, _)| x == r))
    }

    /// Whether the engine still considers session `id` live (it has not told of its expiry).
    pub fn session_live(&self, id: SessionId) -> bool {
        self.sessions
            .get(&id)
            .is_some_and(|s| s.expired_at.is_none())
    }
}
