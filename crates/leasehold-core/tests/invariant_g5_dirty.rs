//! SPEC G5, dirty tracking, by seeded simulation. The model predicts dirtiness on its own: an
//! exclusive lease that ends other than by a clean release or a handover dirties its
//! resource, shared endings never do, and mark-clean clears. After every step the engine's
//! dirty marks (and who left them) equal the model's, also right after a restart; nobody is
//! granted a dirty resource without accepting the check, and whoever is granted one is told.

mod sim;

use leasehold_core::{AcquireError, AcquireRequest, Acquired, Grant, Mode};
use sim::{Check, Checker, EndKind, EndSeen, GrantSeen, ModelWaiter, Sim};

struct Dirty;

impl Checker for Dirty {
    fn on_acquire(
        &mut self,
        sim: &Sim,
        req: &AcquireRequest,
        res: &Result<Acquired, AcquireError>,
    ) -> Check {
        let p = &req.owner.process;
        // The items the caller does not hold yet and that the model says are dirty.
        let dirty: Vec<_> = req
            .items
            .iter()
            .filter(|(r, _)| {
                let st = sim.model.res(r);
                st.dirty && st.lease_of(p).is_none()
            })
            .map(|(r, _)| r.clone())
            .collect();
        match res {
            Ok(Acquired::Granted(gs)) if !req.accept_dirty && !dirty.is_empty() => Err(format!(
                "G5 violated: {}/{}@{} acquired {dirty:?} without accepting the check, though the model says dirty; grants: {gs:?}",
                p.host, p.pid, p.start_time
            )),
            Err(AcquireError::NeedsCheck { resource, dirty: d }) => {
                let st = sim.model.res(resource);
                if !st.dirty || req.accept_dirty {
                    return Err(format!(
                        "needs-check for {resource} (accept_dirty={}), but the model says it is {}",
                        req.accept_dirty,
                        if st.dirty { "dirty" } else { "clean" }
                    ));
                }
                if let Some((_, token, _)) = &st.dirty_by
                    && d.token != *token
                {
                    return Err(format!(
                        "needs-check for {resource} names token {}, the model's dirtying lease had token {token}",
                        d.token
                    ));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn on_grant(&mut self, sim: &Sim, g: &GrantSeen) -> Check {
        let dirty = sim.model.res(&g.resource).dirty;
        if dirty && !g.accept_dirty {
            return Err(format!(
                "G5 violated: {} is dirty but was granted ({:?}) to {}/{}@{} without accepting the check",
                g.resource, g.via, g.process.host, g.process.pid, g.process.start_time
            ));
        }
        if dirty != g.dirty_reported {
            return Err(format!(
                "the grant of {} (token {}) tells the caller it is {}, the model says {}",
                g.resource,
                g.token,
                if g.dirty_reported { "dirty" } else { "clean" },
                if dirty { "dirty" } else { "clean" }
            ));
        }
        Ok(())
    }

    fn on_end(&mut self, _sim: &Sim, e: &EndSeen) -> Check {
        let want = e.lease.mode == Mode::Exclusive && e.kind.dirties_exclusive();
        if e.dirtied_reported != want {
            return Err(format!(
                "G5 violated: a {:?} lease of {} ended {:?}; the engine says it {} the resource",
                e.lease.mode,
                e.resource,
                e.kind,
                if e.dirtied_reported {
                    "dirtied"
                } else {
                    "did not dirty"
                }
            ));
        }
        Ok(())
    }

    fn on_waiter_outcome(
        &mut self,
        sim: &Sim,
        w: &ModelWaiter,
        outcome: &Result<Vec<Grant>, AcquireError>,
    ) -> Check {
        if let Err(AcquireError::NeedsCheck { resource, .. }) = outcome
            && (!sim.model.res(resource).dirty || w.accept_dirty)
        {
            return Err(format!(
                "waiter w{} (accept_dirty={}) was told {resource} needs a check, but the model says it is clean",
                w.id.0, w.accept_dirty
            ));
        }
        Ok(())
    }

    fn after_step(&mut self, sim: &Sim) -> Check {
        for r in &sim.names {
            let st = sim.model.res(r);
            let mark = sim.engine.resource(r).and_then(|s| s.dirty());
            if mark.is_some() != st.dirty {
                return Err(format!(
                    "G5 violated: {r} is {} in the engine but {} in the model (dirtied by {:?})",
                    if mark.is_some() { "dirty" } else { "clean" },
                    if st.dirty { "dirty" } else { "clean" },
                    st.dirty_by
                ));
            }
            if let (Some(m), Some((p, token, kind))) = (mark, &st.dirty_by)
                && (&m.owner.process != p
                    || m.token != *token
                    || EndKind::of(&m.how) != *kind
                    || m.mode != Mode::Exclusive)
            {
                return Err(format!(
                    "the dirty mark of {r} names {:?} token {} ({}), the model expects {}/{}@{} token {token} ({kind:?})",
                    m.owner.process,
                    m.token,
                    m.how.describe(),
                    p.host,
                    p.pid,
                    p.start_time
                ));
            }
        }
        Ok(())
    }
}

#[test]
fn g5_unclean_exclusive_endings_dirty_and_dirty_needs_a_check() {
    sim::run("invariant_g5_dirty", 0x6735_0000, || Dirty);
}
