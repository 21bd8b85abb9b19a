//! The lease state machine.
//!
//! [`Engine`] holds every resource, host session and waiting request. Each operation takes
//! the time as an argument, changes the state, and answers its caller; what else it decided
//! (grants to earlier waiters, events, which records changed and must be made durable) is
//! collected until the caller drains it with [`Engine::take_output`].
//!
//! Where each guarantee of SPEC §3 is decided:
//! - **G1 mutual exclusion**: a request is granted only when every resource it names admits
//!   its mode beside the live leases, and no earlier waiter or handover comes first
//!   (`evaluate`, in `engine/grants.rs`).
//! - **G2 fencing tokens**: each grant takes a token above the counter and above every
//!   resource's `last_token` (`grant`); [`Engine::validate`] answers whether a token is live.
//! - **G3/G4 a lost host**: a session due at `now` expires before anything else happens
//!   ([`Engine::tick`], called first by every operation); its leases end, and its resources
//!   stay unavailable for [`EngineConfig::grace`].
//! - **G5 dirty tracking**: an exclusive lease that ends other than cleanly marks its
//!   resource dirty (`end_lease`, in `engine/endings.rs`); a dirty resource is
//!   refused unless the caller accepts the check.
//! - **G6 durability**: nothing here is durable; [`Output::changed`] names the records a
//!   store must persist before anyone is told.
//! - **G7 handover**: the lease ends and its resource is reserved for the named waiter in one
//!   operation ([`Engine::release`] with [`ReleaseKind::Handover`]).
//!
//! The public types live beside it, one module per concern: `session.rs`, `acquire.rs`,
//! `release.rs` and `output.rs`.

mod endings;
mod grants;
mod per_operation;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::acquire::{AcquireError, Conflict};
use crate::output::{Event, Meta, Output};
use crate::resource::{EndReason, ResourceState};
use crate::session::{Session, SessionError};
use crate::types::{
    HostId, Mode, Now, Owner, ProcessKey, ResourceName, SessionId, Time, Token, WaiterId,
};
use crate::view::{ResourceView, WaiterView};

/// The engine's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    /// After a host session expires, its resources stay unavailable this long (SPEC §4).
    pub grace: Duration,
}

impl Default for EngineConfig {
    /// The grace of [`crate::Timing::default`].
    fn default() -> Self {
        EngineConfig {
            grace: crate::Timing::default().grace,
        }
    }
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

    /// What callers see of `resource` at `now`: its holders, dirty mark, last ending, waiters,
    /// the grace left and whether a handover is pending; `None` when the engine holds no
    /// record of it. Every store shows resources through this one view.
    pub fn view(&self, resource: &ResourceName, now: Now) -> Option<ResourceView> {
        let st = self.resources.get(resource)?;
        Some(ResourceView {
            resource: resource.clone(),
            holders: st.holders.clone(),
            dirty: st.dirty.as_deref().cloned(),
            last_ended: st.last_ended.as_deref().cloned(),
            last_token: st.last_token,
            waiters: self
                .waiters_of(resource)
                .into_iter()
                .map(|(_, owner, mode)| WaiterView {
                    owner: owner.clone(),
                    mode,
                })
                .collect(),
            blocked_for: st.grace_left(now),
            handover_pending: st.reserved_for.is_some(),
            damaged: None,
            stuck: Vec::new(),
        })
    }

    /// Drops the record of `resource` when nothing in it needs remembering: nobody holds it,
    /// it is clean, no grace blocks it, nobody waits for it and no handover keeps it. Returns
    /// whether it was dropped. The token counter stays above the record's last token and is
    /// marked to be made durable with the removal ([`Output::meta_changed`]), so the next
    /// grant of the resource still takes a larger token than any before (SPEC G2).
    pub fn forget(&mut self, resource: &ResourceName, now: Now) -> bool {
        self.tick(now);
        let Some(st) = self.resources.get(resource) else {
            return false;
        };
        if !st.holders.is_empty()
            || st.dirty.is_some()
            || st.blocked_until.is_some()
            || !st.queue.is_empty()
            || st.reserved_for.is_some()
            || st.kept_for_resume()
        {
            return false;
        }
        self.next_token = self.next_token.max(st.last_token.0.saturating_add(1));
        self.resources.remove(resource);
        self.out.changed.insert(resource.clone());
        self.out.meta_changed = true;
        true
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
        let doomed: Vec<(ResourceName, Owner)> = self
            .resources
            .iter()
            .flat_map(|(r, st)| {
                st.holders
                    .iter()
                    .filter(|l| l.session == id)
                    .map(move |l| (r.clone(), l.owner.clone()))
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
}

#[cfg(test)]
mod tests;
