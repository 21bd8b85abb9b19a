//! This host's session: opening or resuming it (`establish`), renewing it (`keep_session`),
//! and what happens when etcd says it has ended.

use std::sync::Arc;
use std::time::{Duration, Instant};

use leasehold_core::HostId;

use crate::etcd::client::LeaseId;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{EtcdOptions, Inner, json, now_ms, unavailable};
use crate::etcd::client::{Etcd, Txn};
use crate::etcd::keys::{HostValue, Keys};
use crate::sync::lock;
use crate::{SessionState, StoreError};

/// How many recent renewal round trips the session state keeps, for `status`.
pub(super) const RECENT_RENEWALS: usize = 10;

/// How often the agent repeats its warning while etcd does not answer renewals.
pub(super) const UNREACHABLE_WARN_EVERY: Duration = Duration::from_secs(2);

/// A keep-alive unanswered this long (or three times the quickest this store has seen, if
/// that is longer: a distant etcd) holds this host's commits back until one is answered
/// sooner (see [`Pace`]).
pub(super) const RENEWAL_LATE: Duration = Duration::from_millis(250);

/// While this host commits, a keep-alive is sent at least this often, so that a leader
/// falling behind is seen by every committing host within about [`RENEWAL_LATE`].
pub(super) const PROBE_EVERY: Duration = Duration::from_millis(250);

/// The least time between two keep-alives that commits ask for.
const PROBE_GAP: Duration = Duration::from_millis(50);

/// How promptly etcd answers this host's keep-alives, which decides whether its commits may
/// go (issue 15, "Many hosts" in docs/performance.md).
///
/// etcd (3.4.20 on) answers a lease renewal only once its leader has applied every entry
/// committed before it, and fails it after 1 s. Under a full-rate fill by many hosts the
/// leader's apply falls behind (a follower answers a transaction once *it* has applied it,
/// so nothing slows the writers down), and every host's renewals stop at once: they all
/// fence their holders. So a host's own keep-alive is its measure of the leader's backlog:
/// while one goes unanswered past [`RENEWAL_LATE`], or the last came back later than that,
/// the host sends no new commit (they wait, unchanged; their compares still decide) until a
/// keep-alive is answered promptly. Every committing host probes at least every
/// [`PROBE_EVERY`], so they all stop within about that of the backlog growing, and the
/// leader catches up. Fencing is untouched: the deadline still follows the last renewal
/// confirmed.
#[derive(Debug, Clone, Copy)]
pub(super) struct Pace {
    /// When the keep-alive in progress was sent, if one is.
    pending: Option<Instant>,
    /// When the last keep-alive was sent.
    last_sent: Option<Instant>,
    /// Whether the last keep-alive that ended was answered within [`Pace::late`].
    prompt: bool,
    /// The quickest keep-alive round trip seen (the network's own share).
    quickest: Option<Duration>,
}

impl Default for Pace {
    fn default() -> Pace {
        Pace {
            pending: None,
            last_sent: None,
            prompt: true,
            quickest: None,
        }
    }
}

impl Pace {
    /// How long a keep-alive may take before it counts as late.
    fn late(&self) -> Duration {
        RENEWAL_LATE.max(self.quickest.map_or(Duration::ZERO, |q| q * 3))
    }

    /// Whether a commit may go at `now`.
    pub(super) fn open(&self, now: Instant) -> bool {
        self.prompt
            && self
                .pending
                .is_none_or(|t| now.saturating_duration_since(t) < self.late())
    }

    /// A keep-alive is sent at `sent`.
    fn sent(&mut self, sent: Instant) {
        self.pending = Some(sent);
        self.last_sent = Some(sent);
    }

    /// The keep-alive in progress ended after `took`, answered or not.
    fn ended(&mut self, took: Duration, answered: bool) {
        self.pending = None;
        if answered {
            self.quickest = Some(self.quickest.map_or(took, |q| q.min(took)));
        }
        self.prompt = answered && took < self.late();
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct SavedSession {
    pub(super) host: HostId,
    pub(super) prefix: String,
    pub(super) lease: LeaseId,
}

/// The TTL etcd answered, in seconds, as a duration (deadlines follow what etcd enforces,
/// not what was asked).
pub(super) fn granted(ttl: i64) -> Duration {
    Duration::from_secs(u64::try_from(ttl).unwrap_or(0))
}

/// Resumes the saved session if etcd still has it on this host's key, else creates one.
/// Returns the lease, when its last renewal was sent, and the TTL etcd granted it.
pub(super) async fn establish(
    etcd: &Etcd,
    keys: &Keys,
    host: &HostId,
    opts: &EtcdOptions,
) -> Result<(LeaseId, Instant, Duration), StoreError> {
    let saved: Option<SavedSession> = opts
        .session_file
        .as_ref()
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .filter(|s: &SavedSession| &s.host == host && s.prefix == keys.prefix());
    let (kvs, _) = etcd
        .range(keys.host(host), Vec::new(), 0)
        .await
        .map_err(unavailable)?;
    // A key on no lease belongs to no live agent (it was overwritten outside leasehold): it
    // is taken over, if nothing changes it meanwhile.
    let mut expect_mod = 0;
    if let Some(kv) = kvs.first().filter(|kv| kv.lease == 0) {
        warn!(host = %host, "this host's key is on no session (overwritten outside leasehold); taking it over");
        expect_mod = kv.mod_revision;
    } else if let Some(kv) = kvs.first() {
        let current: Option<HostValue> = serde_json::from_slice(&kv.value).ok();
        if let Some(saved) = &saved
            && LeaseId::of_key(kv.lease) == Some(saved.lease)
        {
            let sent = Instant::now();
            let ttl = etcd
                .keep_alive_once(saved.lease)
                .await
                .map_err(unavailable)?;
            if ttl > 0 {
                info!(host = %host, lease = %saved.lease, ttl, "resumed the host session");
                return Ok((saved.lease, sent, granted(ttl)));
            }
        }
        let detail = match current {
            Some(v) => format!(
                "agent pid {} holds its session (etcd lease {}) since {}",
                v.pid,
                v.lease,
                fmt_ms(v.since_ms)
            ),
            None => format!("etcd lease {:x} holds its key", kv.lease),
        };
        return Err(StoreError::HostInUse {
            host: host.clone(),
            detail,
        });
    }
    let sent = Instant::now();
    let (lease, ttl) = etcd.lease_grant(opts.ttl).await.map_err(unavailable)?;
    let value = HostValue {
        host: host.clone(),
        lease,
        pid: std::process::id(),
        since_ms: now_ms(),
    };
    let t = Txn::new().if_mod_revision(keys.host(host), expect_mod).put(
        keys.host(host),
        json(&value)?,
        Some(lease),
    );
    let r = etcd.txn(t).await.map_err(unavailable)?;
    if !r.succeeded {
        let _ = etcd.lease_revoke(lease).await;
        return Err(StoreError::HostInUse {
            host: host.clone(),
            detail: "another agent registered it a moment ago".into(),
        });
    }
    if let Some(p) = &opts.session_file {
        let saved = SavedSession {
            host: host.clone(),
            prefix: keys.prefix().to_owned(),
            lease,
        };
        // For the agent's user only, never through a symbolic link.
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
        if let Some(dir) = p.parent() {
            let _ = std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir);
        }
        if let Ok(b) = json(&saved) {
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(p)
                .and_then(|mut f| {
                    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
                    std::io::Write::write_all(&mut f, &b)
                });
        }
    }
    if granted(ttl) != opts.ttl {
        warn!(host = %host, lease = %lease, asked = ?opts.ttl, granted_secs = ttl, "etcd granted the session another ttl than asked; deadlines follow etcd's");
    }
    info!(host = %host, lease = %lease, ttl, "host session opened");
    Ok((lease, sent, granted(ttl)))
}

/// A wall-clock time for messages.
pub(super) fn fmt_ms(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// Renews the session every `renew`; on failure retries quickly; when etcd says the session
/// is gone, opens a new one.
pub(super) async fn keep_session(inner: Arc<Inner>) {
    let mut next = tokio::time::Instant::now() + inner.opts.renew;
    // When the last "renewals failing" warning was logged, while they fail.
    let mut warned: Option<Instant> = None;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            // A commit asks for a keep-alive now (see `Pace`), and not sooner than
            // `PROBE_GAP` after the last.
            () = inner.probe.notified() => {
                let soonest = inner.pace.borrow().last_sent.map(|t| t + PROBE_GAP);
                if let Some(soonest) = soonest.filter(|s| *s > Instant::now()) {
                    next = next.min(tokio::time::Instant::from_std(soonest));
                    continue;
                }
            }
        }
        let state = inner.session.borrow().clone();
        let lease = LeaseId::of_session(state.id);
        if state.expired {
            match establish(&inner.etcd, &inner.keys, &inner.host, &inner.opts).await {
                Ok((lease, sent, ttl)) => {
                    inner.pace.send_replace(Pace::default());
                    inner.session.send_replace(SessionState {
                        id: lease.session(),
                        ttl,
                        renewed_sent_at: Some(sent),
                        expired: false,
                        latencies: Vec::new(),
                        failed_renewals: 0,
                    });
                    inner.changed.notify_waiters();
                    next = tokio::time::Instant::now() + inner.opts.renew;
                }
                Err(e) => {
                    warn!(error = %e, "cannot open a new host session yet");
                    next = tokio::time::Instant::now() + Duration::from_millis(500);
                }
            }
            continue;
        }
        let sent = Instant::now();
        inner.pace.send_modify(|p| p.sent(sent));
        inner.pause_renewal_if_asked().await;
        let answer = inner.etcd.keep_alive_once(lease).await;
        inner
            .pace
            .send_modify(|p| p.ended(sent.elapsed(), answer.is_ok()));
        match answer {
            Ok(ttl) if ttl > 0 => {
                inner.session.send_modify(|s| {
                    s.renewed_sent_at = Some(sent);
                    s.ttl = granted(ttl);
                    s.failed_renewals = 0;
                    if s.latencies.len() >= RECENT_RENEWALS {
                        s.latencies.remove(0);
                    }
                    s.latencies.push(sent.elapsed());
                });
                if warned.take().is_some() {
                    info!(lease = %lease, "session renewals confirmed again");
                }
                next = tokio::time::Instant::from_std(sent) + inner.opts.renew;
            }
            Ok(_) => {
                inner.session_ended(lease, "etcd answered the renewal: the lease is gone");
                next = tokio::time::Instant::now();
            }
            Err(e) => {
                inner.session.send_modify(|s| s.failed_renewals += 1);
                // Say so every few seconds while it lasts, not only at the fence.
                if warned.is_none_or(|w: Instant| w.elapsed() >= UNREACHABLE_WARN_EVERY) {
                    warned = Some(Instant::now());
                    let st = inner.session.borrow().clone();
                    let since = st.renewed_sent_at.map(|t| t.elapsed());
                    let safe_for = st
                        .safe_until()
                        .map(|t| t.saturating_duration_since(Instant::now()));
                    warn!(error = %e, lease = %lease, failed = st.failed_renewals, since_last_confirmed = ?since, safe_for = ?safe_for, "etcd is not answering session renewals; local holders are killed at the deadline if this lasts");
                }
                next = tokio::time::Instant::now() + Duration::from_millis(250);
            }
        }
    }
}

/// Counts a commit held back by [`Inner::hold_while_renewals_late`] while it lives.
struct Held<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Inner {
    /// Waits, before a commit is sent, while this host's keep-alives are answered late (see
    /// [`Pace`]), at most the request timeout; asks for a keep-alive when the last is older
    /// than [`PROBE_EVERY`]. A commit held back is sent unchanged afterwards (its compares
    /// decide on what etcd holds then). Nothing is held once the session has ended: what a
    /// commit then asks fails or goes on its own.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when no keep-alive was answered promptly within the
    /// request timeout: nothing was written.
    pub(super) async fn hold_while_renewals_late(&self) -> Result<(), StoreError> {
        let mut pace = self.pace.subscribe();
        let deadline = tokio::time::Instant::now() + self.opts.timeout;
        let mut held: Option<Held<'_>> = None;
        loop {
            if self.session.borrow().expired {
                return Ok(());
            }
            let p = *pace.borrow_and_update();
            let now = Instant::now();
            if p.open(now) {
                if p.pending.is_none() && p.last_sent.is_none_or(|t| now - t >= PROBE_EVERY) {
                    self.probe.notify_one();
                }
                return Ok(());
            }
            // The last keep-alive came back late or failed: ask again at once.
            if p.pending.is_none() {
                self.probe.notify_one();
            }
            if held.is_none() {
                self.commits_held
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                held = Some(Held(&self.commits_held));
            }
            if tokio::time::timeout_at(deadline, pace.changed())
                .await
                .is_err()
            {
                warn!(late = ?p.late(), held_for = ?self.opts.timeout, "a commit was held back while this host's renewals were answered late, and not sent");
                return Err(StoreError::Unavailable(crate::Cause::new(format!(
                    "etcd's leader is behind applying writes: this host's session renewals have not been answered within {:?} for {:?}, so its commits are held back and this one was not sent; try again",
                    p.late(),
                    self.opts.timeout
                ))));
            }
        }
    }

    /// How many commits wait in [`Inner::hold_while_renewals_late`] now.
    #[cfg(test)]
    pub(super) fn commits_held(&self) -> usize {
        self.commits_held.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A test hook: stops the keep-alive once it counts as sent, if asked.
    async fn pause_renewal_if_asked(&self) {
        let pause = lock(&self.pause_renewal, "pause_renewal").take();
        if let Some((reached, resume)) = pause {
            let _ = reached.send(());
            let _ = resume.await;
        }
    }

    /// This host's session `lease` has ended (etcd said so): runs the hook (the agent kills
    /// every local holder), then marks the session expired, which lets a new one be opened.
    /// Nothing happens for a lease that is not the current session, or twice for one.
    pub(super) fn session_ended(&self, lease: LeaseId, why: &str) {
        let current = self.session.borrow().clone();
        if current.expired || LeaseId::of_session(current.id) != lease {
            return;
        }
        warn!(lease = %lease, why, "this host's session has ended");
        if let Some(hook) = lock(&self.session_end, "session_end").as_ref() {
            hook(current.id);
        }
        self.session.send_if_modified(|s| {
            let ended = s.id == current.id && !s.expired;
            if ended {
                s.expired = true;
            }
            ended
        });
    }

    pub(super) fn lease(&self) -> Result<LeaseId, StoreError> {
        self.running()?;
        let s = self.session.borrow();
        if s.expired {
            return Err(StoreError::SessionLost);
        }
        Ok(LeaseId::of_session(s.id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn commits_wait_while_a_keep_alive_is_late_until_one_is_answered_promptly() {
        let t0 = Instant::now();
        let mut p = Pace::default();
        assert!(p.open(t0), "nothing sent yet");
        p.sent(t0);
        p.ended(MS * 10, true);
        assert!(p.open(t0 + MS * 10));
        assert_eq!(p.late(), RENEWAL_LATE);
        p.sent(t0);
        assert!(p.open(t0 + RENEWAL_LATE - MS), "pending, not late yet");
        assert!(!p.open(t0 + RENEWAL_LATE), "pending and late");
        // Answered, but late: still held until one comes back sooner.
        p.ended(RENEWAL_LATE + MS, true);
        assert!(!p.open(t0 + RENEWAL_LATE + MS));
        p.sent(t0 + 2 * RENEWAL_LATE);
        p.ended(MS * 10, true);
        assert!(p.open(t0 + 2 * RENEWAL_LATE + MS * 10));
        // A failed keep-alive holds them too, however quick.
        p.sent(t0 + 3 * RENEWAL_LATE);
        p.ended(MS, false);
        assert!(!p.open(t0 + 3 * RENEWAL_LATE + MS));
        assert_eq!(p.last_sent, Some(t0 + 3 * RENEWAL_LATE));
    }

    #[test]
    fn a_distant_etcd_is_late_only_past_three_times_its_quickest_answer() {
        let mut p = Pace::default();
        assert_eq!(p.late(), RENEWAL_LATE);
        p.sent(Instant::now());
        p.ended(MS * 150, true);
        assert_eq!(p.late(), MS * 450);
        assert!(p.prompt, "150 ms is that etcd's own round trip");
        // Failed keep-alives say nothing of the round trip.
        p.ended(MS, false);
        assert_eq!(p.late(), MS * 450);
    }
}
