//! The engine's answers, by seeded simulation: an acquire is refused exactly when the model
//! sees a reason (another owner's incompatible lease, an earlier waiter, a grace period, a
//! dirty resource not accepted, a mode conflict, an expired session), and no waiting request
//! is left waiting when it is first in line for everything it asked for and all of it is free.
//! This keeps the safety invariants honest: an engine that refused everything would pass them.

mod sim;

use leasehold_core::{AcquireError, AcquireRequest, Acquired, Mode};
use sim::{Check, Checker, Sim};

struct Outcomes;

#[derive(Debug, PartialEq, Eq)]
enum Expect {
    NoSession,
    ModeConflict,
    Busy,
    Queued,
    NeedsCheck,
    Granted,
}

fn predict(sim: &Sim, req: &AcquireRequest) -> Expect {
    if !sim.model.session_live(req.session) {
        return Expect::NoSession;
    }
    let p = &req.owner.process;
    let mut blocked = false;
    let mut dirty = false;
    for (r, mode) in &req.items {
        let st = sim.model.res(r);
        if let Some(l) = st.lease_of(p) {
            if l.mode != *mode {
                return Expect::ModeConflict;
            }
            continue;
        }
        blocked |=
            !st.admits(*mode) || sim.model.waiters_on(r).next().is_some() || st.in_grace(sim.now);
        dirty |= st.dirty;
    }
    match (blocked, req.wait) {
        (true, false) => Expect::Busy,
        (true, true) => Expect::Queued,
        (false, _) if dirty && !req.accept_dirty => Expect::NeedsCheck,
        (false, _) => Expect::Granted,
    }
}

impl Checker for Outcomes {
    fn on_acquire(
        &mut self,
        sim: &Sim,
        req: &AcquireRequest,
        res: &Result<Acquired, AcquireError>,
    ) -> Check {
        let want = predict(sim, req);
        let got = match res {
            Ok(Acquired::Granted(_)) => Expect::Granted,
            Ok(Acquired::Queued(_)) => Expect::Queued,
            Err(AcquireError::Busy(_)) => Expect::Busy,
            Err(AcquireError::NeedsCheck { .. }) => Expect::NeedsCheck,
            Err(AcquireError::ModeConflict { .. }) => Expect::ModeConflict,
            Err(AcquireError::NoSession(_)) => Expect::NoSession,
            Err(e) => return Err(format!("acquire failed unexpectedly: {e}")),
        };
        if got != want {
            let state: Vec<String> = req
                .items
                .iter()
                .map(|(r, _)| {
                    let st = sim.model.res(r);
                    format!(
                        "{r}: leases {:?}, waiters {:?}, grace until {:?}, dirty {}",
                        st.leases
                            .iter()
                            .map(|l| (l.process.pid, l.mode, l.token.0))
                            .collect::<Vec<_>>(),
                        sim.model.waiters_on(r).map(|w| w.id.0).collect::<Vec<_>>(),
                        st.blocked_until,
                        st.dirty
                    )
                })
                .collect();
            return Err(format!(
                "acquire answered {got:?} ({res:?}); the model expected {want:?}\n  {}",
                state.join("\n  ")
            ));
        }
        Ok(())
    }

    fn after_step(&mut self, sim: &Sim) -> Check {
        // A waiter first in line on all its resources, each free for it, must have been
        // decided (granted, or refused for a dirty resource or a mode conflict). A grace that
        // ended after the last tick does not count: the engine learns of it at the next tick.
        for w in sim.model.waiters.values() {
            let ready = w.items.iter().all(|(r, mode)| {
                let st = sim.model.res(r);
                let first = sim.model.waiters_on(r).all(|o| o.id >= w.id);
                let free = st.lease_of(&w.owner.process).is_some()
                    || (st.admits(*mode)
                        && st.blocked_until.is_none_or(|t| t <= sim.last_tick)
                        && st.reserved_for.is_none_or(|x| x == w.id));
                first && free
            });
            if ready {
                return Err(format!(
                    "waiter w{} of {}/{}@{} for {:?} still waits, though it is first in line and everything is free",
                    w.id.0,
                    w.owner.process.host,
                    w.owner.process.pid,
                    w.owner.process.start_time,
                    w.items
                        .iter()
                        .map(|(r, m)| format!("{r}:{}", if *m == Mode::Shared { "S" } else { "X" }))
                        .collect::<Vec<_>>()
                ));
            }
        }
        Ok(())
    }
}

#[test]
fn outcomes_refusals_have_reasons_and_no_waiter_is_stuck() {
    sim::run("invariant_outcomes", 0x6730_0000, || Outcomes);
}
