//! Ending leases: release (clean, dirty, handover), a process's end, force-release and
//! mark-clean.

use std::collections::BTreeSet;

use super::Engine;
use crate::acquire::AcquireError;
use crate::output::Event;
use crate::release::{ReleaseError, ReleaseKind, ReleaseRequest, Released};
use crate::resource::{EndReason, Ended};
use crate::types::{
    MAX_TEXT, Mode, Now, OnExit, Owner, ProcessKey, ResourceName, Token, WaiterId, check_free_text,
};

impl Engine {
    /// Ends one lease as its holder asks.
    ///
    /// # Errors
    /// [`ReleaseError::NotHeld`] when the process holds no lease on the resource;
    /// [`ReleaseError::StaleToken`] when the request names a token and the owner's lease
    /// (if any) has another, in which case nothing is ended;
    /// [`ReleaseError::NoWaiter`] or [`ReleaseError::HandoverShared`] when a handover cannot
    /// happen, in which case the lease stays as it was.
    pub fn release(&mut self, req: ReleaseRequest, now: Now) -> Result<Released, ReleaseError> {
        self.tick(now);
        let lease = self
            .resources
            .get(&req.resource)
            .and_then(|st| st.lease_of(&req.process, req.owner_id.as_ref()))
            .cloned()
            .ok_or_else(|| ReleaseError::NotHeld {
                resource: req.resource.clone(),
                process: req.process.clone(),
                owner_id: req.owner_id.clone(),
            });
        // A release that names its lease's token ends that lease or nothing: the owner may
        // have been granted the resource again since (after a force-release), and a release
        // meant for the old lease must not end the new one.
        let lease = match (req.token, lease) {
            (Some(token), Ok(l)) if l.token != token => {
                return Err(ReleaseError::StaleToken {
                    resource: req.resource,
                    process: req.process,
                    owner_id: req.owner_id,
                    token,
                    holding: Some(l.token),
                });
            }
            (Some(token), Err(ReleaseError::NotHeld { .. })) => {
                return Err(ReleaseError::StaleToken {
                    resource: req.resource,
                    process: req.process,
                    owner_id: req.owner_id,
                    token,
                    holding: None,
                });
            }
            (_, l) => l?,
        };
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
                    &lease.owner,
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
        let released = self.end_lease(&req.resource, &lease.owner, how, now);
        self.serve(BTreeSet::from([req.resource]), now);
        Ok(released)
    }

    /// Ends every lease and waiting request of a process that has exited, whatever their
    /// owner ids.
    pub fn end_process(&mut self, process: &ProcessKey, now: Now) -> Vec<Released> {
        self.end_process_as(process, EndReason::ProcessDied, now)
    }

    /// [`Engine::end_process`], recording the leases as ended `how`: a fenced holder, or
    /// [`EndReason::ExitedClean`] for a process that exited with status 0, which ends clean
    /// only the leases whose owner chose [`OnExit::Status`] (the others as died).
    pub fn end_process_as(
        &mut self,
        process: &ProcessKey,
        how: EndReason,
        now: Now,
    ) -> Vec<Released> {
        self.tick(now);
        let held: Vec<ResourceName> = self.held_by(process).cloned().collect();
        let mut affected: BTreeSet<ResourceName> = held.iter().cloned().collect();
        let doomed: Vec<(ResourceName, Owner)> = held
            .iter()
            .filter_map(|r| self.resources.get(r).map(|st| (r, st)))
            .flat_map(|(r, st)| {
                st.holders
                    .iter()
                    .filter(|l| &l.owner.process == process)
                    .map(move |l| (r.clone(), l.owner.clone()))
            })
            .collect();
        let released = doomed
            .iter()
            .map(|(r, o)| self.end_lease(r, o, how.clone(), now))
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

    /// Ends the leases named by resource and token, recording them as ended `how`; a lease
    /// that has already ended (no holder has that token any more) is left out. The agent ends
    /// so the leases of a revocable holder (`on_lost = revoke`) after its host session was
    /// lost: by token, so a lease the same owner was granted since is not touched.
    pub fn end_leases(
        &mut self,
        leases: &[(ResourceName, Token)],
        how: EndReason,
        now: Now,
    ) -> Vec<Released> {
        self.tick(now);
        let doomed: Vec<(ResourceName, Owner)> = leases
            .iter()
            .filter_map(|(r, t)| {
                let st = self.resources.get(r)?;
                let l = st.holders.iter().find(|l| l.token == *t)?;
                Some((r.clone(), l.owner.clone()))
            })
            .collect();
        let released = doomed
            .iter()
            .map(|(r, o)| self.end_lease(r, o, how.clone(), now))
            .collect();
        self.serve(doomed.into_iter().map(|(r, _)| r).collect(), now);
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
        let holders: Vec<Owner> = st.holders.iter().map(|l| l.owner.clone()).collect();
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
        let was = st.dirty.take().map(|d| *d);
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

    /// Removes the live lease of `owner` (its process and owner id) and records how it
    /// ended. The lease must exist.
    pub(super) fn end_lease(
        &mut self,
        resource: &ResourceName,
        owner: &Owner,
        how: EndReason,
        now: Now,
    ) -> Released {
        let st = self.resources.entry(resource.clone()).or_default();
        let pos = st.holders.iter().position(|l| l.owner.same_as(owner));
        let lease = match pos {
            Some(i) => st.holders.remove(i),
            None => unreachable_lease(resource, owner),
        };
        let process = &owner.process;
        let process_still_holds = st.held_by_process(process);
        // An exit with status 0 is clean only for an owner that asked for it (libvirt's QEMU,
        // whose exit 0 follows a flushed, orderly stop); any other holder may have died
        // mid-write whatever its status.
        let how = match how {
            EndReason::ExitedClean if lease.owner.on_exit != OnExit::Status => {
                EndReason::ProcessDied
            }
            how => how,
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
            st.dirty = Some(Box::new(ended.clone()));
        }
        st.last_ended = Some(Box::new(ended.clone()));
        if let Some(set) = self.by_process.get_mut(process)
            && !process_still_holds
        {
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
fn unreachable_lease(resource: &ResourceName, owner: &Owner) -> ! {
    // Every caller looked the lease up first; reaching this is a bug in the engine.
    panic!("engine bug: no lease of {owner} on {resource} to end")
}
