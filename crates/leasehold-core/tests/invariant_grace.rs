//! SPEC G3's grace rule, by seeded simulation: after a host session expires holding a
//! resource, nobody is granted that resource before the expiry plus `grace`. The expiry is
//! the moment the engine expires the session (never before the last successful renewal plus
//! the TTL, and at the first tick at or after it: the simulator checks both).

mod sim;

use leasehold_core::{AcquireError, AcquireRequest, Acquired};
use sim::{Check, Checker, GrantSeen, Sim};

struct Grace;

impl Checker for Grace {
    fn on_grant(&mut self, sim: &Sim, g: &GrantSeen) -> Check {
        let st = sim.model.res(&g.resource);
        match (st.blocked_until, st.blocked_by) {
            (Some(until), Some((session, at))) if sim.now < until => Err(format!(
                "grace violated: {} granted to {}/{}@{} (token {}, {:?}) at t={}, but session {session} expired holding it at t={at}; grace {} ms lasts until t={until}",
                g.resource,
                g.process.host,
                g.process.pid,
                g.process.start_time,
                g.token,
                g.via,
                sim.now,
                sim.params.grace
            )),
            _ => Ok(()),
        }
    }

    /// A refusal that blames the grace says how long it still lasts: exactly what is left of
    /// the grace the model expects.
    fn on_acquire(
        &mut self,
        sim: &Sim,
        _req: &AcquireRequest,
        res: &Result<Acquired, AcquireError>,
    ) -> Check {
        if let Err(AcquireError::Busy(c)) = res
            && let Some(left) = c.blocked_for
        {
            let st = sim.model.res(&c.resource);
            let ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX);
            if ms == 0 || st.blocked_until != Some(sim.now.saturating_add(ms)) {
                return Err(format!(
                    "{} refused at t={} as in grace for {ms} ms more; the model's grace for it ends at {:?}",
                    c.resource, sim.now, st.blocked_until
                ));
            }
        }
        Ok(())
    }
}

#[test]
fn grace_nobody_gets_a_lost_hosts_resource_before_expiry_plus_grace() {
    sim::run("invariant_grace", 0x6733_0000, || Grace);
}

// ---------------------------------------------------------------------------------------------
// The grace measured from the moment a session was due, not from the tick that expired it
// (SPEC G3 reads so), and no grant at all on a session that is due. These once failed: the
// engine expired a session only in `tick` and served waiters between two expiries of one tick.
// Every operation now expires what is due at its time first, and `tick` expires every due
// session before serving anyone; `engine_tests.rs` holds the minimal sequences.

use std::collections::BTreeMap;

use leasehold_core::{HostId, ResourceName};
use sim::{EndKind, EndSeen};

#[derive(Default)]
struct GraceFromDue {
    /// resource -> (no grant to another host before, the lost host, why)
    block: BTreeMap<ResourceName, (u64, HostId, String)>,
    /// Also refuse any grant on a session that is already due.
    no_grant_when_due: bool,
}

impl Checker for GraceFromDue {
    fn on_end(&mut self, sim: &Sim, e: &EndSeen) -> Check {
        let Some(s) = sim.model.sessions.get(&e.lease.session) else {
            return Ok(());
        };
        // A holder's own ending (not an administrator's) after its session was due.
        let by_holder = !matches!(e.kind, EndKind::Expired | EndKind::Forced);
        if by_holder && s.expired_at.is_none() && s.due() <= sim.now {
            let until = s.due() + sim.params.grace;
            let why = format!(
                "the lease of {} by {}/{} ended {:?} at t={}, after its session {} was due at t={}",
                e.resource,
                e.lease.process.host,
                e.lease.process.pid,
                e.kind,
                sim.now,
                e.lease.session,
                s.due()
            );
            let host = e.lease.process.host.clone();
            match self.block.get(&e.resource) {
                Some((t, _, _)) if *t >= until => {}
                _ => {
                    self.block.insert(e.resource.clone(), (until, host, why));
                }
            }
        }
        Ok(())
    }

    fn on_grant(&mut self, sim: &Sim, g: &GrantSeen) -> Check {
        if let Some((until, lost, why)) = self.block.get(&g.resource)
            && sim.now < *until
            && &g.process.host != lost
        {
            return Err(format!(
                "{} granted to {}/{} at t={}, before t={until}: {why}",
                g.resource, g.process.host, g.process.pid, sim.now
            ));
        }
        if self.no_grant_when_due
            && let Some(s) = sim.model.sessions.get(&g.session)
            && s.due() <= sim.now
        {
            return Err(format!(
                "{} granted to {}/{} ({:?}) at t={} on session {}, which was due at t={}",
                g.resource,
                g.process.host,
                g.process.pid,
                g.via,
                sim.now,
                g.session,
                s.due()
            ));
        }
        Ok(())
    }
}

#[test]
fn grace_counts_from_the_due_time() {
    sim::run("invariant_grace", 0x6733_1000, GraceFromDue::default);
}

#[test]
fn nothing_is_granted_on_a_due_session() {
    sim::run("invariant_grace", 0x6733_2000, || GraceFromDue {
        no_grant_when_due: true,
        ..GraceFromDue::default()
    });
}
