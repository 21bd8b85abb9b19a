//! SPEC G2, fencing tokens, by seeded simulation: every new grant of a resource carries a token
//! strictly larger than every earlier grant of that resource, across restarts; and
//! `validate(resource, token)` is true exactly for the tokens of the resource's live leases.

mod sim;

use std::collections::BTreeSet;

use leasehold_core::Token;
use sim::{Check, Checker, GrantSeen, Sim};

struct Tokens;

impl Checker for Tokens {
    fn on_grant(&mut self, sim: &Sim, g: &GrantSeen) -> Check {
        let st = sim.model.res(&g.resource);
        match st.max_token() {
            Some(max) if g.token <= max => Err(format!(
                "G2 violated: {} granted with token {} to {}/{}@{}, not above the earlier grant {} (earlier tokens {:?})",
                g.resource,
                g.token,
                g.process.host,
                g.process.pid,
                g.process.start_time,
                max,
                st.tokens
            )),
            _ if g.token == Token(0) => Err(format!("{} granted with token 0", g.resource)),
            _ => Ok(()),
        }
    }

    fn after_step(&mut self, sim: &Sim) -> Check {
        // Tokens to probe on every resource: 0, the largest possible, one past the largest
        // granted, and the latest token of each resource (tokens of other resources come from
        // the same counter), each of these every fourth step to keep the test fast; on its own
        // resource, also its last three tokens at every step, and of course the live ones.
        let mut common: BTreeSet<Token> = BTreeSet::from([Token(0), Token(u64::MAX)]);
        let latest = sim
            .model
            .resources
            .values()
            .filter_map(|st| st.tokens.last());
        common.extend(latest.filter(|t| (t.0 + sim.step as u64) % 4 == 0));
        if let Some(max) = sim
            .model
            .resources
            .values()
            .filter_map(|st| st.max_token())
            .max()
        {
            common.insert(Token(max.0 + 1));
        }
        for r in &sim.names {
            let st = sim.model.res(r);
            let live: BTreeSet<Token> = st.leases.iter().map(|l| l.token).collect();
            let own = st.tokens.iter().rev().take(3);
            for &t in live.iter().chain(&common).chain(own) {
                let want = live.contains(&t);
                if sim.engine.validate(r, t) != want {
                    return Err(format!(
                        "G2 violated: validate({r}, {t}) is {}, but the live leases of {r} have tokens {live:?}",
                        !want
                    ));
                }
            }
        }
        Ok(())
    }
}

#[test]
fn g2_tokens_grow_per_resource_and_validate_knows_live_ones() {
    sim::run("invariant_g2_tokens", 0x6732_0000, || Tokens);
}
