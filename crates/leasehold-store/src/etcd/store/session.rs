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
        tokio::time::sleep_until(next).await;
        let state = inner.session.borrow().clone();
        let lease = LeaseId::of_session(state.id);
        if state.expired {
            match establish(&inner.etcd, &inner.keys, &inner.host, &inner.opts).await {
                Ok((lease, sent, ttl)) => {
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
        match inner.etcd.keep_alive_once(lease).await {
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

impl Inner {
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
