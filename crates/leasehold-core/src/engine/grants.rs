//! Asking for leases: checking a request, deciding it, granting it or queueing it, and serving
//! the waiters in line whenever a resource changes.

use std::collections::BTreeSet;

use super::{Engine, Verdict, Waiter};
use crate::acquire::{AcquireError, AcquireRequest, Acquired, Conflict, Grant, MAX_ITEMS};
use crate::output::Event;
use crate::resource::{Lease, ResourceState};
use crate::types::{Mode, NameError, Now, Owner, ResourceName, SessionId, Token, WaiterId};

impl Engine {
    /// Asks for leases, all or nothing.
    ///
    /// # Errors
    /// [`AcquireError::Busy`] when a resource is held (and the request does not wait),
    /// [`AcquireError::NeedsCheck`] when a free resource is dirty and not accepted, and the
    /// other variants for bad requests.
    pub fn acquire(&mut self, mut req: AcquireRequest, now: Now) -> Result<Acquired, AcquireError> {
        self.tick(now);
        self.check_request(&mut req)?;
        if !req.expect_tokens.is_empty() {
            self.check_expected_tokens(&req)?;
            req.wait = false;
        }
        match self.evaluate(&req.owner, &req.items, req.accept_dirty, None, now) {
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

    /// Puts a checked request in the queues of its resources under `id`.
    pub(super) fn enqueue(&mut self, id: WaiterId, req: AcquireRequest, decided_here: bool) {
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

    /// Why `items` could not be granted to a new request from `owner` at `now`, if they
    /// could not; for telling a waiting caller who is in its way.
    pub fn conflict(
        &self,
        owner: &Owner,
        items: &[(ResourceName, Mode)],
        now: Now,
    ) -> Option<Conflict> {
        let mut items = items.to_vec();
        items.sort();
        match self.evaluate(owner, &items, true, None, now) {
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

    /// Refuses a request whose expected tokens are no longer the last of their resources:
    /// someone else held them since (a resume after a pause, a migration's arrival). A lease
    /// the process holds already with that token passes.
    fn check_expected_tokens(&self, req: &AcquireRequest) -> Result<(), AcquireError> {
        for (r, expected) in &req.expect_tokens {
            let Some((_, mode)) = req.items.iter().find(|(n, _)| n == r) else {
                return Err(AcquireError::Invalid(format!(
                    "an expected token names {r}, which the request does not ask for"
                )));
            };
            if *mode != Mode::Exclusive {
                return Err(AcquireError::Invalid(format!(
                    "an expected token is for an exclusive lease; {r} is asked shared"
                )));
            }
            let st = self.resources.get(r);
            if st
                .and_then(|s| s.lease_of(&req.owner.process, req.owner.id.as_ref()))
                .is_some()
            {
                continue;
            }
            let last = st.map_or(Token(0), |s| s.last_token);
            if last != *expected {
                return Err(AcquireError::Moved {
                    resource: r.clone(),
                    expected: *expected,
                    last,
                });
            }
        }
        Ok(())
    }

    /// Decides whether `items` can be granted to `owner` now. `me` is the waiter asking,
    /// or `None` for a new request, which comes after every waiter. Another owner id of the
    /// same process is another owner.
    fn evaluate(
        &self,
        owner: &Owner,
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
            if let Some(l) = st.lease_of(&owner.process, owner.id.as_ref()) {
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
                    blocked_for: st.grace_left(now),
                    reserved: st.reserved_for.is_some() && !mine,
                });
            } else if let Some(d) = &st.dirty
                && !accept_dirty
            {
                needs_check.get_or_insert_with(|| AcquireError::NeedsCheck {
                    resource: r.clone(),
                    dirty: d.clone(),
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
            let dirty = st.dirty.as_deref().cloned();
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
            // Most resources have one holder: a first push would reserve room for four.
            if st.holders.is_empty() {
                st.holders.reserve_exact(1);
            }
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
    pub(super) fn serve(&mut self, mut affected: BTreeSet<ResourceName>, now: Now) {
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
                let outcome = match self.evaluate(&w.owner, &w.items, w.accept_dirty, Some(id), now)
                {
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
    pub(super) fn drop_waiter(
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
}
