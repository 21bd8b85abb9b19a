//! SPEC G1, mutual exclusion, by seeded simulation: at every instant, for every resource, the
//! live leases are none, or one or more shared, or exactly one exclusive; and the engine's
//! holders are exactly the leases the simulator was told of and has not seen end.

mod sim;

use leasehold_core::{Lease, Mode, ProcessKey, SessionId, Token};
use sim::{Check, Checker, GrantSeen, Sim};

struct Exclusion;

fn mode_str(m: Mode) -> &'static str {
    match m {
        Mode::Exclusive => "exclusive",
        Mode::Shared => "shared",
    }
}

impl Checker for Exclusion {
    /// At the instant of each grant, the new lease must be compatible with every live lease.
    fn on_grant(&mut self, sim: &Sim, g: &GrantSeen) -> Check {
        let live = &sim.model.res(&g.resource).leases;
        let ok = live.is_empty()
            || (g.mode == Mode::Shared && live.iter().all(|l| l.mode == Mode::Shared));
        if ok {
            return Ok(());
        }
        let holders: Vec<String> = live
            .iter()
            .map(|l| {
                format!(
                    "{}/{}@{} {} #{}",
                    l.process.host,
                    l.process.pid,
                    l.process.start_time,
                    mode_str(l.mode),
                    l.token
                )
            })
            .collect();
        Err(format!(
            "G1 violated: {} granted {} to {}/{}@{} (token {}) while live: [{}]",
            g.resource,
            mode_str(g.mode),
            g.process.host,
            g.process.pid,
            g.process.start_time,
            g.token,
            holders.join(", ")
        ))
    }

    fn after_step(&mut self, sim: &Sim) -> Check {
        for r in &sim.names {
            let live = &sim.model.res(r).leases;
            let exclusive = live.iter().filter(|l| l.mode == Mode::Exclusive).count();
            if exclusive > 0 && live.len() > 1 {
                return Err(format!(
                    "G1 violated: {r} has {} live leases, {exclusive} of them exclusive",
                    live.len()
                ));
            }
            let key = |p: &ProcessKey, m: Mode, t: Token, s: SessionId| (p.clone(), m, t, s);
            let mut model: Vec<_> = live
                .iter()
                .map(|l| key(&l.process, l.mode, l.token, l.session))
                .collect();
            model.sort();
            let mut engine: Vec<_> = sim
                .engine
                .resource(r)
                .map(|st| {
                    st.holders()
                        .iter()
                        .map(|l: &Lease| key(&l.owner.process, l.mode, l.token, l.session))
                        .collect()
                })
                .unwrap_or_default();
            engine.sort();
            if engine != model {
                return Err(format!(
                    "the engine's holders of {r} differ from the model's live leases\n  engine: {engine:?}\n  model:  {model:?}"
                ));
            }
        }
        Ok(())
    }
}

#[test]
fn g1_live_leases_are_none_or_shared_or_one_exclusive() {
    sim::run("invariant_g1_exclusion", 0x6731_0000, || Exclusion);
}
