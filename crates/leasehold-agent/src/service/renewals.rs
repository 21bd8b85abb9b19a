//! The host session's recent renewals, for `status`: each confirmed one with its round trip,
//! each failed one, and when the agent learned of it. Fed from the store's session watch; a
//! watch keeps only the latest state, so two renewals that end between two looks count as
//! one (the round trips of every confirmed one are in `renewal_latency_us`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use leasehold_api::v1::{Renewal, RenewalOutcome, Time};
use leasehold_store::Store;

/// How many renewals are kept.
pub(crate) const KEPT: usize = 20;

/// The recent renewals, oldest first.
#[derive(Debug, Default)]
pub(crate) struct Renewals(Mutex<VecDeque<Renewal>>);

impl Renewals {
    /// A log fed from `store`'s session (none on a store without one) by a task.
    pub(crate) fn follow<S: Store>(store: &S) -> Arc<Renewals> {
        let log = Arc::new(Renewals::default());
        let Some(mut rx) = store.session() else {
            return log;
        };
        let feed = Arc::clone(&log);
        tokio::spawn(async move {
            let (mut sent, mut failed) = {
                let s = rx.borrow_and_update();
                (s.renewed_sent_at, s.failed_renewals)
            };
            while rx.changed().await.is_ok() {
                let s = rx.borrow_and_update().clone();
                if s.renewed_sent_at.is_some() && s.renewed_sent_at != sent {
                    feed.push(RenewalOutcome::Confirmed, s.latencies.last().copied());
                }
                for _ in 0..s.failed_renewals.saturating_sub(failed).min(KEPT as u64) {
                    feed.push(RenewalOutcome::Failed, None);
                }
                (sent, failed) = (s.renewed_sent_at, s.failed_renewals);
            }
        });
        log
    }

    fn push(&self, outcome: RenewalOutcome, latency: Option<std::time::Duration>) {
        let at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        // Each change is one push or pop: the log is whole after a panic elsewhere.
        let mut log = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        log.push_back(Renewal {
            at: Time::from_unix_ms(at),
            outcome,
            latency: latency.map(Into::into),
        });
        while log.len() > KEPT {
            log.pop_front();
        }
    }

    /// The recent renewals, oldest first.
    pub(crate) fn recent(&self) -> Vec<Renewal> {
        let log = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        log.iter().cloned().collect()
    }
}
