//! What holders asked to be done to them *before* a fence (libvirt's `<on_lockfailure>`):
//! once renewals of this host's session are late, the agent pauses (SIGSTOP) or terminates
//! (SIGTERM) the holders that asked, so that a VM stops its I/O, or quits gracefully, before
//! the fence's SIGKILL. That SIGKILL ([`crate::fence`]) comes at the fencing deadline whatever
//! happened here: nothing a holder asks can keep it running on a lease another host may be
//! granted once the session has expired (SPEC G3). If a renewal is confirmed before the
//! deadline, the paused holders are continued (SIGCONT) and nothing else happens.
//!
//! The moment: halfway between the next renewal's due time (`sent + renew`) and the fencing
//! deadline (`sent + ttl - fence_margin`). With the default timing (ttl 10 s, renew every
//! 3.3 s, margin 2 s): 2.3 s after a renewal was due, 2.3 s before the SIGKILL.

use std::sync::Arc;
use std::time::Instant;

use leasehold_core::SessionId;
use leasehold_store::{SessionState, Store};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Timing;
use crate::fence::fence_at;
use crate::watcher::Watcher;

/// When the holders that asked are paused or terminated, for a session whose fencing
/// deadline is `deadline`.
pub fn act_at(s: &SessionState, timing: &Timing, deadline: Instant) -> Option<Instant> {
    let due = s.renewed_sent_at? + timing.renew;
    Some(due + deadline.saturating_duration_since(due) / 2)
}

/// Watches the session: acts on the holders that asked once renewals are late, and continues
/// the paused ones if a renewal is confirmed before the deadline.
pub async fn run<S: Store>(
    mut session: watch::Receiver<SessionState>,
    watcher: Arc<Watcher<S>>,
    timing: Timing,
) {
    // The session and fencing deadline acted for.
    let mut acted: Option<(SessionId, Instant)> = None;
    loop {
        let state = session.borrow_and_update().clone();
        let deadline = if state.expired {
            None
        } else {
            fence_at(&state, &timing)
        };
        if let Some((id, was)) = acted {
            if id != state.id {
                // A new session: the old one's holders were fenced (a paused process that
                // survived it must not write again, so it stays stopped).
                acted = None;
            } else if deadline.is_some_and(|d| d > was) {
                // A renewal was confirmed before the fence: the session is safe again.
                acted = None;
                let continued = watcher.resume_paused();
                if !continued.is_empty() {
                    info!(
                        pids = ?continued.iter().map(|p| p.pid).collect::<Vec<_>>(),
                        "session renewed in time: continued (SIGCONT) the holders paused before the fence"
                    );
                }
            }
        }
        let when = deadline
            .filter(|_| acted.is_none())
            .and_then(|d| Some((d, act_at(&state, &timing, d)?)));
        let Some((deadline, at)) = when else {
            if session.changed().await.is_err() {
                return;
            }
            continue;
        };
        tokio::select! {
            changed = session.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            () = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => {
                acted = Some((state.id, deadline));
                let done = watcher.warn_holders();
                if !done.is_empty() {
                    warn!(
                        holders = ?done.iter().map(|(p, a, sent)| (p.pid, *a, *sent)).collect::<Vec<_>>(),
                        fence_in_ms = deadline.saturating_duration_since(Instant::now()).as_millis() as u64,
                        "session renewals are late: paused (SIGSTOP) or terminated (SIGTERM) the holders that asked for it (libvirt's on_lockfailure); they are SIGKILLed at the fencing deadline unless a renewal is confirmed first"
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn holders_are_warned_halfway_between_the_missed_renewal_and_the_fence() {
        let sent = Instant::now();
        let timing = Timing::default();
        let s = SessionState {
            id: SessionId(1),
            ttl: Duration::from_secs(10),
            renewed_sent_at: Some(sent),
            expired: false,
            latencies: Vec::new(),
            failed_renewals: 0,
        };
        let deadline = fence_at(&s, &timing).unwrap();
        assert_eq!(deadline, sent + Duration::from_secs(8));
        let at = act_at(&s, &timing, deadline).unwrap();
        assert!(at > sent + timing.renew && at < deadline);
        // Halfway (to the nanosecond: 10 s / 3 does not halve exactly), 2.33 s each side.
        let (before, after) = (
            at.duration_since(sent + timing.renew),
            deadline.duration_since(at),
        );
        assert!(after.abs_diff(before) <= Duration::from_nanos(1));
        assert_eq!(after.as_millis(), 2333);
    }
}
