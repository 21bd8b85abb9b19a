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
//!
//! A holder all of whose leases asked `on_lost = revoke` (a service holding short locks) is
//! not killed: its leases are revoked instead. It is told at once (its hold stream, and
//! `validate` refuses its tokens from this moment, etcd reachable or not), and its leases
//! are ended in the store as fenced once etcd answers. Such a holder is trusted to stop
//! writing when told, or to write only where storage checks its token (README: "Revocable
//! holders"). A process holding any lease without it is killed as above.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use leasehold_core::{EndReason, Ended, HostId, OnLost, ProcessKey, ResourceName, Token};
use leasehold_store::{LocalLeases, SessionState, Store};
use tokio::sync::{broadcast, watch};
use tracing::{error, info, warn};

use crate::config::Timing;
use crate::holds::Holds;
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

/// What a fence acts on: the agent's store, its watched holders, the clients holding leases,
/// its event stream and its watchdog.
pub struct Fencer<S: Store> {
    /// The store.
    pub store: Arc<S>,
    /// The watched holders.
    pub watcher: Arc<Watcher<S>>,
    /// The clients holding leases, told of revocations.
    pub holds: Arc<Holds>,
    /// The agent's own events (`fenced`), merged into `watch`.
    pub events: broadcast::Sender<leasehold_api::v1::Event>,
    /// This host.
    pub host: HostId,
    /// The watchdog, when configured.
    pub watchdog: Option<Arc<Watchdog>>,
}

/// Watches the session; fences when its deadline passes unrenewed; publishes the deadline.
pub async fn fence<S: Store>(
    mut session: watch::Receiver<SessionState>,
    fencer: Arc<Fencer<S>>,
    timing: Timing,
    deadline: watch::Sender<Option<Instant>>,
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
                fencer.fence_now(safe_until,
                    "no session renewal confirmed in time: fenced (SIGKILLed) every local holder but the revocable ones");
            }
        }
    }
}

/// The holders to kill and the leases to revoke, from the store's index of local leases: a
/// process is spared only when every lease it holds is known and asked `on_lost = revoke`.
/// `None` (no index): every holder is killed.
fn split(leases: Option<LocalLeases>) -> (Option<Vec<ProcessKey>>, Vec<(ResourceName, Ended)>) {
    let Some(leases) = leases else {
        return (None, Vec::new());
    };
    let mut kill = Vec::new();
    let mut revoke = Vec::new();
    for (process, held) in leases {
        match held {
            Some(held)
                if !held.is_empty()
                    && held.iter().all(|(_, l)| l.owner.on_lost == OnLost::Revoke) =>
            {
                revoke.extend(held.into_iter().map(|(r, l)| {
                    (
                        r,
                        Ended {
                            owner: l.owner,
                            mode: l.mode,
                            token: l.token,
                            granted_at: l.granted_at,
                            ended_at: leasehold_core::WallTime(now_ms()),
                            how: EndReason::Fenced,
                        },
                    )
                }));
            }
            _ => kill.push(process),
        }
    }
    (Some(kill), revoke)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl<S: Store> Fencer<S> {
    /// SIGKILLs every local holder now but those whose leases are all revocable, logs and
    /// publishes it (`fenced` events), and makes sure they are dead by `safe_until` (else
    /// starves the watchdog); revokes the leases of the others (see the module). Returns the
    /// processes signalled.
    pub fn fence_now(&self, safe_until: Instant, why: &'static str) -> Vec<ProcessKey> {
        let (kill, revoke) = split(self.store.local_leases());
        self.revoke(revoke);
        let signalled = match kill {
            Some(kill) => self.watcher.fence_these(kill),
            None => self.watcher.fence_holders(),
        };
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
        let at_ms = now_ms();
        for (p, _) in &signalled {
            let _ = self.events.send(leasehold_api::v1::Event {
                kind: "fenced".into(),
                at: Some(leasehold_api::v1::Time::from_unix_ms(at_ms)),
                host: Some(self.host.to_string()),
                pid: Some(p.pid),
                ..Default::default()
            });
        }
        // Every holder must be gone by the session's end, whether or not the signal could be sent.
        let victims: Vec<_> = signalled.into_iter().map(|(p, _)| p).collect();
        let watcher = Arc::clone(&self.watcher);
        let watchdog = self.watchdog.clone();
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

    /// Revokes the leases of revocable holders: tells them now, and ends the leases in the
    /// store as fenced, retrying until the store can (etcd answers, a new session is open).
    fn revoke(&self, revoked: Vec<(ResourceName, Ended)>) {
        if revoked.is_empty() {
            return;
        }
        for (r, e) in &revoked {
            self.holds.revoke(r, e);
            warn!(
                resource = %r,
                pid = e.owner.process.pid,
                owner_id = ?e.owner.id.as_ref().map(ToString::to_string),
                token = %e.token,
                mono_ns = monotonic_ns(),
                "host session lost: lease revoked; holder not killed (it asked on_lost = revoke): its token is refused by validate"
            );
        }
        let leases: Vec<(ResourceName, Token)> =
            revoked.into_iter().map(|(r, e)| (r, e.token)).collect();
        let store = Arc::clone(&self.store);
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(200);
            loop {
                match store.end_leases(leases.clone(), EndReason::Fenced).await {
                    Ok(ended) => {
                        info!(
                            ended = ended.len(),
                            "the revoked leases of revocable holders are ended as fenced"
                        );
                        return;
                    }
                    Err(e) if e.is_retryable() => {
                        warn!(error = %e, "cannot end the revoked leases yet; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(2));
                    }
                    Err(e) => {
                        error!(error = %e, "ending the revoked leases failed; their tokens stay refused here");
                        return;
                    }
                }
            }
        });
    }
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
