//! What checkers are shown, and how the simulator learns from the engine's output: every
//! grant, ending, expiry and waiter outcome is checked against what the operation may do.

use std::collections::BTreeSet;

use leasehold_core::{
    AcquireError, AcquireRequest, Acquired, EndReason, Ended, Event, Grant, HostId, Lease, Mode,
    ProcessKey, ResourceName, SessionId, Token, WaiterId,
};

use super::*;

/// How a grant reached its owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// As the answer to an acquire.
    Direct,
    /// As the outcome of a waiting request.
    Waiter(WaiterId),
}

/// A new grant, shown to checkers before the model adds it.
#[derive(Debug, Clone)]
pub struct GrantSeen {
    /// The resource.
    pub resource: ResourceName,
    /// The new holder.
    pub process: ProcessKey,
    /// The mode.
    pub mode: Mode,
    /// Its token.
    pub token: Token,
    /// Its session.
    pub session: SessionId,
    /// Whether the request accepted a dirty resource.
    pub accept_dirty: bool,
    /// Whether the grant told the caller that the resource is dirty.
    pub dirty_reported: bool,
    /// How it was delivered.
    pub via: Via,
}

/// A lease ending, shown to checkers before the model removes it.
#[derive(Debug, Clone)]
pub struct EndSeen {
    /// The resource.
    pub resource: ResourceName,
    /// The lease as the model knows it.
    pub lease: ModelLease,
    /// How it ended.
    pub kind: EndKind,
    /// Whether the engine said this left the resource dirty.
    pub dirtied_reported: bool,
}

/// An invariant, checked as the simulation runs. Every hook sees the simulator with the model
/// as it was just before the change it is told of.
pub trait Checker {
    /// An acquire was answered (before the model applies the answer).
    fn on_acquire(
        &mut self,
        _sim: &Sim,
        _req: &AcquireRequest,
        _res: &Result<Acquired, AcquireError>,
    ) -> Check {
        Ok(())
    }

    /// A new lease was granted.
    fn on_grant(&mut self, _sim: &Sim, _g: &GrantSeen) -> Check {
        Ok(())
    }

    /// A lease ended.
    fn on_end(&mut self, _sim: &Sim, _e: &EndSeen) -> Check {
        Ok(())
    }

    /// A waiting request was decided.
    fn on_waiter_outcome(
        &mut self,
        _sim: &Sim,
        _w: &ModelWaiter,
        _outcome: &Result<Vec<Grant>, AcquireError>,
    ) -> Check {
        Ok(())
    }

    /// A step is over.
    fn after_step(&mut self, _sim: &Sim) -> Check {
        Ok(())
    }
}

impl Sim {
    /// A grant answers exactly the items asked for.
    pub(super) fn check_cover(&self, items: &[(ResourceName, Mode)], gs: &[Grant]) -> Check {
        let mut got: Vec<(ResourceName, Mode)> =
            gs.iter().map(|g| (g.resource.clone(), g.mode)).collect();
        got.sort();
        if got != items {
            return Err(format!(
                "granted [{}] for a request of [{}]",
                items_str(&got),
                items_str(items)
            ));
        }
        Ok(())
    }

    /// A grant marked `existing` repeats a lease the process holds (or held at some point of
    /// this operation).
    pub(super) fn check_existing(
        &self,
        r: &ResourceName,
        p: &ProcessKey,
        g: &Grant,
        live_during: &BTreeSet<(ResourceName, ProcessKey, Token)>,
    ) -> Check {
        let held = self
            .model
            .res(r)
            .lease_of(p)
            .is_some_and(|l| l.token == g.token && l.mode == g.mode);
        if held || live_during.contains(&(r.clone(), p.clone(), g.token)) {
            Ok(())
        } else {
            Err(format!(
                "grant of {r} to {} is marked as already held (token {}), but the model has no such lease",
                pk(p),
                g.token
            ))
        }
    }

    /// Drains the engine's output, persists what changed, and applies to the model the grants
    /// the simulator was told of and the endings the operation allows, in the order the engine
    /// reports them; then the outcomes of waiting requests.
    pub(super) fn absorb(&mut self, ctx: Ctx, told: Vec<Told>, c: &mut dyn Checker) -> Check {
        let mut out = self.engine.take_output();
        match std::mem::replace(&mut self.implicit, Implicit::None) {
            Implicit::None => {}
            // A copy's output: what a store would persist is the engine's own, later.
            Implicit::Capturing => self.implicit = Implicit::Pending(out.clone()),
            Implicit::Pending(tick) => {
                let n = tick.events.len();
                let m = tick.waiters.len();
                if out.events.get(..n) != Some(&tick.events[..])
                    || out.waiters.get(..m) != Some(&tick.waiters[..])
                    || !tick.changed.is_subset(&out.changed)
                {
                    return Err(format!(
                        "the operation at t={} did not first do what a tick at its time does (expire the due sessions, end the graces that are over, serve the waiters)\n  a tick: {:?} {:?}\n  the operation: {:?} {:?}",
                        self.now, tick.events, tick.waiters, out.events, out.waiters
                    ));
                }
                // The model has learnt those from the copy.
                out.events.drain(..n);
                out.waiters.drain(..m);
            }
        }
        if !matches!(self.implicit, Implicit::Pending(_)) {
            self.persist(&out.changed, out.meta_changed);
        }
        let mut a = Absorbing {
            told,
            live_during: self
                .all_leases()
                .into_iter()
                .map(|(r, l)| (r, l.process, l.token))
                .collect(),
            ..Absorbing::default()
        };
        self.told_by_waiters(&out.waiters, &mut a)?;
        for ev in &out.events {
            match ev {
                Event::Granted { resource, lease } => {
                    self.on_granted(resource, lease, &mut a, c)?
                }
                Event::Ended {
                    resource,
                    ended,
                    dirtied,
                } => self.on_ended(&ctx, resource, ended, *dirtied, &mut a, c)?,
                Event::SessionExpired { session, host } => {
                    self.on_expired(*session, host, &mut a)?;
                }
                Event::Cleaned { resource, .. } => {
                    if !matches!(&ctx, Ctx::MarkClean(r) if r == resource) {
                        return Err(format!("{resource} was cleaned during {ctx:?}"));
                    }
                }
            }
        }
        if let Some((r, l)) = a.expiring.first() {
            return Err(format!(
                "the lease of {r} by {} ended as session-expired, but no session expired",
                pk(&l.process)
            ));
        }
        if let Some(t) = a.told.iter().find(|t| !t.used) {
            return Err(format!(
                "{} was told it got {} (token {}), but the engine recorded no such grant",
                pk(&t.seen.process),
                t.seen.resource,
                t.seen.token
            ));
        }
        a.live_during.extend(a.granted_now.iter().cloned());
        for (p, g) in &a.existing {
            self.check_existing(&g.resource, p, g, &a.live_during)?;
        }
        self.check_all_ended(&ctx, &a)?;
        self.on_waiter_outcomes(&ctx, &out.waiters, &a, c)
    }

    /// Collects the grants that waiters' owners are told of.
    fn told_by_waiters(&self, outcomes: &[WaiterOutcome], a: &mut Absorbing) -> Check {
        for (id, outcome) in outcomes {
            let Some(w) = self.model.waiters.get(id) else {
                return Err(format!(
                    "the engine decided waiter w{} ({outcome:?}), which the model does not know to be waiting",
                    id.0
                ));
            };
            let Ok(gs) = outcome else { continue };
            self.check_cover(&w.items, gs)?;
            for g in gs {
                if g.existing {
                    a.existing.push((w.owner.process.clone(), g.clone()));
                    continue;
                }
                a.told.push(Told {
                    seen: GrantSeen {
                        resource: g.resource.clone(),
                        process: w.owner.process.clone(),
                        mode: g.mode,
                        token: g.token,
                        session: w.session,
                        accept_dirty: w.accept_dirty,
                        dirty_reported: g.dirty.is_some(),
                        via: Via::Waiter(*id),
                    },
                    used: false,
                });
            }
        }
        Ok(())
    }

    /// A `Granted` event: it must be a grant some owner was told of; the model adds the lease.
    fn on_granted(
        &mut self,
        resource: &ResourceName,
        lease: &Lease,
        a: &mut Absorbing,
        c: &mut dyn Checker,
    ) -> Check {
        let Some(t) = a.told.iter_mut().find(|t| {
            !t.used
                && &t.seen.resource == resource
                && t.seen.token == lease.token
                && t.seen.process == lease.owner.process
        }) else {
            return Err(format!(
                "the engine granted {resource} to {} (token {}) but told nobody",
                pk(&lease.owner.process),
                lease.token
            ));
        };
        t.used = true;
        let g = t.seen.clone();
        if lease.mode != g.mode || lease.session != g.session {
            return Err(format!(
                "lease of {resource} to {} recorded as {:?}/{} but granted as {:?}/{}",
                pk(&g.process),
                lease.mode,
                lease.session,
                g.mode,
                g.session
            ));
        }
        c.on_grant(self, &g)?;
        match g.via {
            Via::Direct => self.stats.direct_grants += 1,
            Via::Waiter(_) => self.stats.waiter_grants += 1,
        }
        if g.dirty_reported {
            self.stats.dirty_grants += 1;
        }
        let st = self.model.res_mut(resource);
        if st.lease_of(&g.process).is_some() {
            return Err(format!(
                "{} was granted {resource} afresh while it already holds it",
                pk(&g.process)
            ));
        }
        st.leases.push(ModelLease {
            process: g.process.clone(),
            mode: g.mode,
            token: g.token,
            session: g.session,
        });
        st.tokens.push(g.token);
        st.reserved_for = None;
        a.granted_now
            .insert((resource.clone(), g.process.clone(), g.token));
        Ok(())
    }

    /// An `Ended` event: it must end a lease the model knows, in a way the operation allows;
    /// the model removes the lease and applies its own dirty rule.
    fn on_ended(
        &mut self,
        ctx: &Ctx,
        resource: &ResourceName,
        ended: &Ended,
        dirtied: bool,
        a: &mut Absorbing,
        c: &mut dyn Checker,
    ) -> Check {
        let process = &ended.owner.process;
        let Some(lease) = self.model.res(resource).lease_of(process).cloned() else {
            return Err(format!(
                "the engine ended a lease of {resource} by {} that the model does not know",
                pk(process)
            ));
        };
        if lease.token != ended.token || lease.mode != ended.mode {
            return Err(format!(
                "the engine ended {resource} by {} with token {} ({:?}); the model's lease has token {} ({:?})",
                pk(process),
                ended.token,
                ended.mode,
                lease.token,
                lease.mode
            ));
        }
        let kind = EndKind::of(&ended.how);
        let allowed = match ctx {
            Ctx::Release { r, p, kind: k, to } => {
                r == resource
                    && p == process
                    && *k == kind
                    && match &ended.how {
                        EndReason::HandedOver { to: got } => to.as_ref() == Some(got),
                        _ => true,
                    }
            }
            Ctx::Kill(p) => p == process && kind == EndKind::Died,
            Ctx::Force(r) => r == resource && kind == EndKind::Forced,
            Ctx::Tick => kind == EndKind::Expired,
            Ctx::Nothing | Ctx::MarkClean(_) => false,
        };
        if !allowed {
            return Err(format!(
                "the lease of {resource} by {} (token {}) ended as `{}` during an operation that may not end it that way ({ctx:?})",
                pk(process),
                lease.token,
                ended.how.describe()
            ));
        }
        let e = EndSeen {
            resource: resource.clone(),
            lease: lease.clone(),
            kind,
            dirtied_reported: dirtied,
        };
        c.on_end(self, &e)?;
        self.stats.ended[kind as usize] += 1;
        let st = self.model.res_mut(resource);
        st.leases.retain(|l| &l.process != process);
        if lease.mode == Mode::Exclusive && kind.dirties_exclusive() {
            st.dirty = true;
            st.dirty_by = Some((process.clone(), lease.token, kind));
        }
        if kind == EndKind::Expired {
            a.expiring.push((resource.clone(), lease));
        }
        Ok(())
    }

    /// A `SessionExpired` event: never before the session was due; every lease of the session
    /// must have ended just before it; its resources enter their grace period now.
    fn on_expired(&mut self, session: SessionId, host: &HostId, a: &mut Absorbing) -> Check {
        let Some(s) = self.model.sessions.get(&session).cloned() else {
            return Err(format!("the engine expired unknown session {session}"));
        };
        if s.expired_at.is_some() {
            return Err(format!("session {session} expired twice"));
        }
        if &self.hosts[s.host].id != host {
            return Err(format!("session {session} expired as a session of {host}"));
        }
        if self.now < s.due() {
            return Err(format!(
                "session {session} of {host} expired at t={}, before it was due at t={} (last renewal t={} + ttl {:?})",
                self.now,
                s.due(),
                s.last_renew,
                s.ttl
            ));
        }
        if let Some((r, l)) = a.expiring.iter().find(|(_, l)| l.session != session) {
            return Err(format!(
                "the lease of {r} by {} (session {}) ended as session-expired with session {session}",
                pk(&l.process),
                l.session
            ));
        }
        if let Some((r, l)) = self
            .all_leases()
            .into_iter()
            .find(|(_, l)| l.session == session)
        {
            return Err(format!(
                "session {session} expired, but the lease of {r} by {} (token {}) lives on",
                pk(&l.process),
                l.token
            ));
        }
        let until = self.now + self.params.grace;
        for (r, _) in a.expiring.drain(..) {
            let st = self.model.res_mut(&r);
            if st.blocked_until.is_none_or(|t| t < until) {
                st.blocked_until = Some(until);
                st.blocked_by = Some((session, self.now));
            }
        }
        if let Some(m) = self.model.sessions.get_mut(&session) {
            m.expired_at = Some(self.now);
        }
        let hs = &mut self.hosts[s.host];
        if hs.session == Some(session) {
            hs.session = None;
        }
        hs.old_sessions.push(session);
        self.stats.expiries += 1;
        self.note(format!("; session {session} of {host} expired"));
        a.expired.push(session);
        Ok(())
    }

    /// The operation ended everything it had to: the released lease, every lease of a dead
    /// process, every lease of a force-released resource.
    fn check_all_ended(&self, ctx: &Ctx, a: &Absorbing) -> Check {
        let left = self.all_leases().into_iter().find(|(r, l)| {
            // A lease granted later in the same operation (a waiter of the same process served
            // by the release) is a new lease.
            let fresh = a
                .granted_now
                .contains(&(r.clone(), l.process.clone(), l.token));
            !fresh
                && match ctx {
                    Ctx::Release { r: rr, p, .. } => r == rr && &l.process == p,
                    Ctx::Kill(p) => &l.process == p,
                    Ctx::Force(rr) => r == rr,
                    _ => false,
                }
        });
        match left {
            Some((r, l)) => Err(format!(
                "after {ctx:?}, the lease of {r} by {} (token {}) is still live in the model: the engine did not end it",
                pk(&l.process),
                l.token
            )),
            None => Ok(()),
        }
    }

    /// The outcomes of waiting requests: each was waiting; a cancellation has a cause; the
    /// requests of a dead process or an expired session are all gone.
    fn on_waiter_outcomes(
        &mut self,
        ctx: &Ctx,
        outcomes: &[WaiterOutcome],
        a: &Absorbing,
        c: &mut dyn Checker,
    ) -> Check {
        for (id, outcome) in outcomes {
            let what = match outcome {
                Ok(gs) => format!("granted {}", grants_str(gs)),
                Err(e) => err_str(e),
            };
            self.note(format!("; w{}: {what}", id.0));
            let Some(w) = self.model.waiters.get(id).cloned() else {
                return Err(format!("waiter w{} decided twice", id.0));
            };
            c.on_waiter_outcome(self, &w, outcome)?;
            match outcome {
                Err(AcquireError::Cancelled(_)) => {
                    let justified = matches!(ctx, Ctx::Kill(p) if p == &w.owner.process)
                        || a.expired.contains(&w.session);
                    if !justified {
                        return Err(format!(
                            "waiter w{} of {} was cancelled, though neither its process ended nor its session expired",
                            id.0,
                            pk(&w.owner.process)
                        ));
                    }
                }
                Err(AcquireError::NeedsCheck { .. }) => self.stats.needs_check += 1,
                Err(AcquireError::ModeConflict { .. }) | Ok(_) => {}
                Err(e) => {
                    return Err(format!(
                        "waiter w{} of {} failed with {e}",
                        id.0,
                        pk(&w.owner.process)
                    ));
                }
            }
            self.forget_waiter(*id);
        }
        if let Some(w) = self.model.waiters.values().find(|w| {
            a.expired.contains(&w.session) || matches!(ctx, Ctx::Kill(p) if p == &w.owner.process)
        }) {
            return Err(format!(
                "waiter w{} of {} still waits after its process ended or its session expired",
                w.id.0,
                pk(&w.owner.process)
            ));
        }
        Ok(())
    }

    /// Removes a waiter from the model, with the handover kept for it.
    pub(super) fn forget_waiter(&mut self, id: WaiterId) {
        self.model.waiters.remove(&id);
        for st in self.model.resources.values_mut() {
            if st.reserved_for == Some(id) {
                st.reserved_for = None;
            }
        }
    }
}

/// One waiting request's outcome, as [`leasehold_core::Output::waiters`] lists it.
type WaiterOutcome = (WaiterId, Result<Vec<Grant>, AcquireError>);

/// What [`Sim::absorb`] gathers while it walks one operation's output.
#[derive(Default)]
struct Absorbing {
    /// Grants owners were told of; each must match one `Granted` event.
    told: Vec<Told>,
    /// Grants to waiters that repeat a lease they already held: (holder, grant).
    existing: Vec<(ProcessKey, Grant)>,
    /// Leases live at some point of the operation.
    live_during: BTreeSet<(ResourceName, ProcessKey, Token)>,
    /// Leases granted during the operation.
    granted_now: BTreeSet<(ResourceName, ProcessKey, Token)>,
    /// Leases ended as session-expired, before their `SessionExpired` event.
    expiring: Vec<(ResourceName, ModelLease)>,
    /// Sessions expired during the operation.
    expired: Vec<SessionId>,
}
