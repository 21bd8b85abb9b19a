//! Forgetting records nobody needs: a resource that is free, clean, unreserved, without
//! waiters or grace, and unchanged for [`LocalStoreOptions::forget_after`](super::LocalStoreOptions::forget_after)
//! loses its record, so the database, the agent's memory and `list` do not grow with every
//! name ever leased. The engine keeps its token counter above the record's last token and
//! the removal commits with the counter, so tokens still only grow (SPEC G2). Dirty records
//! are never forgotten.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use leasehold_core::{Engine, Now, ResourceName, Time};

/// The most records forgotten in one commit; more wait for the next sweep, which follows at
/// once.
const MAX_PER_SWEEP: usize = 4096;

/// When each record last changed (the store's clock), and when to look for old ones next.
pub(crate) struct Touched {
    at: HashMap<ResourceName, Time>,
    next_sweep: Time,
}

impl Touched {
    /// Every record of `engine` as changed `now`: after a start, each is kept at least
    /// `forget_after` more.
    pub(crate) fn new(engine: &Engine, now: Now) -> Touched {
        Touched {
            at: engine
                .resources()
                .map(|(r, _)| (r.clone(), now.mono))
                .collect(),
            next_sweep: now.mono,
        }
    }

    /// Notes the records a commit changed.
    pub(crate) fn note(&mut self, engine: &Engine, changed: &BTreeSet<ResourceName>, now: Now) {
        for r in changed {
            if engine.resource(r).is_some() {
                self.at.insert(r.clone(), now.mono);
            } else {
                self.at.remove(r);
            }
        }
    }

    /// When the next sweep is due, if records are ever forgotten.
    pub(crate) fn due(&self, after: Option<Duration>) -> Option<Time> {
        after.map(|_| self.next_sweep)
    }

    /// Forgets, in `engine`, the records unchanged for `after` that need no remembering;
    /// the caller commits the engine's output. Returns how many were forgotten.
    pub(crate) fn sweep(
        &mut self,
        engine: &mut Engine,
        after: Option<Duration>,
        now: Now,
    ) -> usize {
        let Some(after) = after else { return 0 };
        if now.mono < self.next_sweep {
            return 0;
        }
        let old: Vec<ResourceName> = self
            .at
            .iter()
            .filter(|(_, t)| t.after(after) <= now.mono)
            .map(|(r, _)| r.clone())
            .collect();
        let mut forgotten = 0;
        for r in old {
            if forgotten == MAX_PER_SWEEP {
                break;
            }
            if engine.forget(&r, now) {
                forgotten += 1;
                self.at.remove(&r);
            } else if engine.resource(&r).is_none() {
                self.at.remove(&r);
            }
        }
        let every = (after / 10).clamp(Duration::from_millis(100), Duration::from_secs(60));
        self.next_sweep = if forgotten == MAX_PER_SWEEP {
            now.mono
        } else {
            now.mono.after(every)
        };
        forgotten
    }
}
