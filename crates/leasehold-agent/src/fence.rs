//! Self-fencing (SPEC G3): with a shared backend, this host's leases live only as long as its
//! session. The agent measures from the moment it *sent* the last renewal that succeeded: the
//! backend cannot expire the session before `sent + ttl`. If no renewal is confirmed by
//! `sent + ttl - fence_margin`, the agent SIGKILLs every local holder. If one is still alive
//! at `sent + ttl`, it stops feeding the watchdog, so the host resets before another host can
//! be granted the resources (`expiry + grace`).
//!
//! The fencing deadline is also published to holding clients (`run` wrappers), which kill
//! their commands by it on their own if they hear nothing newer: a hung or killed agent
//! cannot leave a writer running past its lease.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use leasehold_store::{SessionState, Store};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::Timing;
use crate::watcher::Watcher;

pub use leasehold_api::host::{monotonic_ns, monotonic_ns_of};

/// A watchdog device, fed while all is well.
pub struct Watchdog {
    path: PathBuf,
    healthy: AtomicBool,
}

impl Watchdog {
    /// The watchdog at `path`.
    pub fn new(path: PathBuf) -> Arc<Watchdog> {
        Arc::new(Watchdog {
            path,
            healthy: AtomicBool::new(true),
        })
    }

    /// Stops feeding, for good: the host will reset.
    pub fn starve(&self, why: &str) {
        if self.healthy.swap(false, Ordering::SeqCst) {
            error!(device = %self.path.display(), why, "stopped feeding the watchdog; the host will reset");
        }
    }

    /// Feeds the device every `every` while healthy.
    pub async fn feed(self: Arc<Self>, every: Duration) {
        let mut dev = match std::fs::OpenOptions::new().write(true).open(&self.path) {
            Ok(f) => f,
            Err(e) => {
                error!(device = %self.path.display(), error = %e, "cannot open the watchdog");
                return;
            }
        };
        info!(device = %self.path.display(), every = ?every, "feeding the watchdog");
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            if !self.healthy.load(Ordering::SeqCst) {
                return;
            }
            let fed = dev.write_all(b"\0").and_then(|()| dev.flush());
            crate::metrics::watchdog_fed(fed.is_ok());
            if let Err(e) = fed {
                warn!(error = %e, "feeding the watchdog failed");
            }
        }
    }
}

/// The fencing deadline of a session state: `sent + ttl - fence_margin`, with the ttl the
/// backend granted (etcd grants whole seconds, and raises short ones), not the one asked.
pub fn fence_at(s: &SessionState, timing: &Timing) -> Option<Instant> {
    s.renewed_sent_at
        .map(|t| t + s.ttl.saturating_sub(timing.fence_margin))
}

/// Watches the session; fences when its deadline passes unrenewed; publishes the deadline.
pub async fn fence<S: Store>(
    mut session: watch::Receiver<SessionState>,
    watcher: Arc<Watcher<S>>,
    timing: Timing,
    watchdog: Option<Arc<Watchdog>>,
    deadline: watch::Sender<Option<Instant>>,
    events: tokio::sync::broadcast::Sender<leasehold_api::v1::Event>,
    host: leasehold_core::HostId,
) {
    let mut fenced_for: Option<Instant> = None;
    loop {
        let state = session.borrow_and_update().clone();
        let at = if state.expired {
            None
        } else {
            fence_at(&state, &timing)
        };
        deadline.send_replace(at);
        let Some(at) = at.filter(|t| Some(*t) != fenced_for) else {
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
                fenced_for = Some(at);
                let safe_until = state.safe_until().unwrap_or(at);
                fence_now(&watcher, &events, &host, watchdog.clone(), safe_until,
                    "no session renewal confirmed in time: fenced (SIGKILLed) every local holder");
            }
        }
    }
}

/// SIGKILLs every local holder now, logs and publishes it (`fenced` events), and makes sure
/// they are dead by `safe_until` (else starves the watchdog). Returns the processes signalled.
pub fn fence_now<S: Store>(
    watcher: &Arc<Watcher<S>>,
    events: &tokio::sync::broadcast::Sender<leasehold_api::v1::Event>,
    host: &leasehold_core::HostId,
    watchdog: Option<Arc<Watchdog>>,
    safe_until: Instant,
    why: &'static str,
) -> Vec<leasehold_core::ProcessKey> {
    let signalled = watcher.fence_holders();
    crate::metrics::fenced(signalled.len());
    let failed: Vec<u32> = signalled
        .iter()
        .filter(|(_, sent)| !sent)
        .map(|(p, _)| p.pid)
        .collect();
    warn!(
        holders = signalled.len(),
        pids = ?signalled.iter().map(|(p, _)| p.pid).collect::<Vec<_>>(),
        kill_failed = ?failed,
        mono_ns = monotonic_ns(),
        safe_until_mono_ns = monotonic_ns_of(safe_until),
        "{why}"
    );
    let at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    for (p, _) in &signalled {
        let _ = events.send(leasehold_api::v1::Event {
            kind: "fenced".into(),
            at: Some(leasehold_api::v1::Time::from_unix_ms(at_ms)),
            host: Some(host.to_string()),
            pid: Some(p.pid),
            ..Default::default()
        });
    }
    // Every holder must be gone by the session's end, whether or not the signal could be sent.
    let victims: Vec<_> = signalled.into_iter().map(|(p, _)| p).collect();
    let watcher = Arc::clone(watcher);
    // Judge survivors at the session's end, but give a late fence (the agent was itself
    // stopped) a moment for the kills to land.
    let judge_at = safe_until.max(Instant::now() + Duration::from_millis(100));
    let judged = victims.clone();
    tokio::spawn(async move {
        tokio::time::sleep_until(tokio::time::Instant::from_std(judge_at)).await;
        let alive: Vec<u32> = judged
            .iter()
            .filter(|p| watcher.may_be_alive(p))
            .map(|p| p.pid)
            .collect();
        if alive.is_empty() {
            info!("every fenced holder is dead");
        } else if let Some(w) = watchdog {
            error!(pids = ?alive, "fenced holders survived SIGKILL past the session's end");
            w.starve("a holder survived SIGKILL past the session's end");
        } else {
            error!(pids = ?alive, "fenced holders survived SIGKILL past the session's end, and no watchdog is configured");
        }
    });
    victims
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fencing_deadline_follows_the_granted_ttl() {
        let sent = Instant::now();
        let timing = Timing {
            ttl: Duration::from_millis(2900),
            fence_margin: Duration::from_millis(580),
            ..Timing::default()
        };
        // Asked 2.9 s; etcd granted 2 s: the agent must fence by 2 s - margin, not 2.32 s.
        let s = SessionState {
            id: leasehold_core::SessionId(1),
            ttl: Duration::from_secs(2),
            renewed_sent_at: Some(sent),
            expired: false,
            latencies: Vec::new(),
            failed_renewals: 0,
        };
        assert_eq!(
            fence_at(&s, &timing),
            Some(sent + Duration::from_millis(1420))
        );
    }
}
