//! The watch-fed mirror of every key under the prefix: it publishes the events recorded in
//! resource records, notices this host's session ending, and repairs what was changed outside
//! leasehold.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use leasehold_core::{Ended, Event, ProcessKey, ResourceName};
use tracing::{debug, warn};

use super::{Inner, json, now_ms, unavailable};
use crate::StoreError;
use crate::etcd::client::{LeaseId, Txn, prefix_end};
use crate::etcd::keys::{HostValue, KeyKind, Record};
use crate::etcd::pb::mvccpb::KeyValue;
use crate::sync::{lock, read, write};

/// Every key under the prefix, as the watch last delivered it. Writes decide from it and
/// commit with compares, so a stale mirror costs a retry, never a wrong grant; outcomes that
/// write nothing are decided again on a fresh read.
#[derive(Debug, Default)]
pub(super) struct Mirror {
    pub(super) revision: i64,
    pub(super) kvs: BTreeMap<Vec<u8>, KeyValue>,
}

/// Whether a watch event deletes its key.
fn is_delete(ev: &crate::etcd::pb::mvccpb::Event) -> bool {
    ev.r#type == crate::etcd::pb::mvccpb::event::EventType::Delete as i32
}

/// A repair the watch found necessary.
#[derive(Debug)]
pub(super) enum Fix {
    /// Put this marker where a record held here was deleted, unless a new one is there.
    Marker(Vec<u8>, Vec<u8>),
    /// Write this host's key again on this session.
    HostValue(LeaseId),
    /// Revoke this ended session of this host.
    Revoke(LeaseId),
}

/// Follows every change under the prefix: publishes the events recorded in resource
/// records, notes expired sessions, and wakes the waiter service.
pub(super) async fn follow(inner: Arc<Inner>, mut from: i64) {
    loop {
        let mut stream = match inner
            .etcd
            .watch(
                inner.keys.prefix().as_bytes().to_vec(),
                prefix_end(inner.keys.prefix().as_bytes()),
                from,
            )
            .await
        {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "watch failed; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        loop {
            let msg = match stream.message().await {
                Ok(Some(m)) => m,
                Ok(None) | Err(_) => break,
            };
            if msg.compact_revision > 0 {
                // Missed history: read everything again and follow from there.
                match inner.load_mirror().await {
                    Ok(rev) => from = rev + 1,
                    Err(_) => from = msg.compact_revision,
                }
                inner.changed.notify_waiters();
                break;
            }
            inner.apply_watch_events(&msg.events, msg.header.as_ref().map(|h| h.revision));
            inner.apply_fixes().await;
            if let Some(h) = &msg.header {
                from = from.max(h.revision + 1);
            }
            if !msg.events.is_empty() {
                inner.changed.notify_waiters();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Inner {
    /// Reads every key under the prefix into the mirror; returns its revision.
    pub(super) async fn load_mirror(&self) -> Result<i64, StoreError> {
        let prefix = self.keys.prefix().as_bytes().to_vec();
        let (kvs, revision) = self
            .etcd
            .range(prefix.clone(), prefix_end(&prefix), 0)
            .await
            .map_err(unavailable)?;
        let mut m = Mirror {
            revision,
            ..Mirror::default()
        };
        for kv in kvs {
            m.kvs.insert(kv.key.clone(), kv);
        }
        *write(&self.mirror, "mirror") = m;
        Ok(revision)
    }

    /// Builds the index of this host's holders, and the list of stale ones, from the mirror.
    pub(super) fn load_held(&self) {
        let current = self.session.borrow().id;
        let mut held = HashMap::<ProcessKey, BTreeSet<ResourceName>>::new();
        let mut stale = BTreeSet::new();
        {
            let m = read(&self.mirror, "mirror");
            let from = self.keys.resources();
            for (key, kv) in m.kvs.range(from.clone()..prefix_end(&from)) {
                let (Some(KeyKind::Resource(r)), Ok(rec)) =
                    (self.keys.parse(key), Record::decode(&kv.value))
                else {
                    continue;
                };
                for l in rec.state.holders().iter().cloned() {
                    if l.owner.process.host != self.host {
                        continue;
                    }
                    if l.session == current {
                        held.entry(l.owner.process).or_default().insert(r.clone());
                    } else {
                        stale.insert(l.owner.process);
                    }
                }
            }
        }
        if let Some(mut h) = self.held_index() {
            *h = held;
        }
        *lock(&self.stale, "stale") = stale.into_iter().collect();
    }

    /// The leases of this host's holders (the index of [`Inner::held_index`]) from the
    /// mirror, by process; `None` for a process with a resource whose lease of it the mirror
    /// does not show (not seen yet), and for all when the index is poisoned.
    pub(super) fn local_leases(&self) -> Option<crate::LocalLeases> {
        // The index is copied first: one lock is never held while taking the other.
        let held = self.held_index()?.clone();
        let m = read(&self.mirror, "mirror");
        let leases_of = |process: &ProcessKey, names: &BTreeSet<ResourceName>| {
            let mut out = Vec::new();
            for r in names {
                let rec = m
                    .kvs
                    .get(&self.keys.resource(r))
                    .and_then(|kv| Record::decode(&kv.value).ok())?;
                let mine: Vec<_> = rec
                    .state
                    .holders()
                    .iter()
                    .filter(|l| &l.owner.process == process)
                    .map(|l| (r.clone(), l.clone()))
                    .collect();
                if mine.is_empty() {
                    return None;
                }
                out.extend(mine);
            }
            Some(out)
        };
        Some(
            held.iter()
                .map(|(p, names)| (p.clone(), leases_of(p, names)))
                .collect(),
        )
    }

    /// Applies one watch message: its keys to the mirror all at once, with the revision it
    /// reached (so a snapshot from the mirror never shows half of one commit, e.g. another
    /// host's record ended dirty without the grace key written with it), then each event as
    /// lease events for subscribers.
    pub(super) fn apply_watch_events(
        &self,
        events: &[crate::etcd::pb::mvccpb::Event],
        revision: Option<i64>,
    ) {
        let olds: Vec<Option<KeyValue>> = {
            let mut m = write(&self.mirror, "mirror");
            let olds = events
                .iter()
                .map(|ev| {
                    let kv = ev.kv.as_ref()?;
                    if is_delete(ev) {
                        m.kvs.remove(&kv.key)
                    } else {
                        // Liveness is a host key's lease: a key moved off a lease ends that
                        // session (snapshots take the sessions from the host keys).
                        m.kvs.insert(kv.key.clone(), kv.clone())
                    }
                })
                .collect();
            if let Some(rev) = revision {
                m.revision = m.revision.max(rev);
            }
            olds
        };
        for (ev, old) in events.iter().zip(olds) {
            self.after_watch_event(ev, old);
        }
    }

    /// What one watch event, already in the mirror (`old` is the key's value before it),
    /// means: this host's session ended, lease events recorded in a resource record, a
    /// lease held here lost outside leasehold, another host's session ended.
    fn after_watch_event(&self, ev: &crate::etcd::pb::mvccpb::Event, old: Option<KeyValue>) {
        let Some(kv) = &ev.kv else { return };
        let deleted = is_delete(ev);
        let kind = self.keys.parse(&kv.key);
        let mut own_ended = None;
        if deleted
            && let (Some(o), Some(KeyKind::Host(h))) = (&old, &kind)
            && h == &self.host
        {
            own_ended = Some(LeaseId(o.lease));
        }
        if let Some(lease) = own_ended {
            // Revoked or expired: the holders go now, not at the next renewal.
            self.session_ended(lease, "this host's key was deleted in etcd");
        }
        match kind {
            Some(KeyKind::Resource(name)) => {
                let new = (!deleted).then(|| Record::decode(&kv.value));
                if let Some(Ok(rec)) = &new {
                    for e in &rec.events {
                        let _ = self.events.send(e.clone());
                    }
                }
                self.check_own_holders(&name, &kv.key, old.as_ref(), new.as_ref());
            }
            Some(KeyKind::Host(host)) if !deleted => {
                lock(&self.ended_hosts, "ended_hosts").remove(&host);
                if host == self.host {
                    self.check_own_host_key(kv);
                }
            }
            Some(KeyKind::Host(host)) if deleted => {
                let lease = LeaseId(ev.prev_kv.as_ref().map_or(0, |p| p.lease));
                lock(&self.ended_hosts, "ended_hosts")
                    .insert(host.clone(), (lease, self.clock.now().wall));
                let _ = self.events.send(Event::SessionExpired {
                    session: lease.session(),
                    host,
                });
            }
            _ => {}
        }
    }

    /// A record that held leases of this host changed: a holder that vanished from it, or
    /// whose record no longer decodes, without an ending written by leasehold, must not go on
    /// writing. Its lease ends as force-released (the agent kills it), and a record deleted
    /// while held is replaced by a marker, so the resource stays refused until repaired.
    pub(super) fn check_own_holders(
        &self,
        name: &ResourceName,
        key: &[u8],
        old: Option<&KeyValue>,
        new: Option<&Result<Record, String>>,
    ) {
        let Some(old) = old.and_then(|kv| Record::decode(&kv.value).ok()) else {
            return;
        };
        let ends = |l: &leasehold_core::Lease, rec: &Record| {
            rec.state
                .holders()
                .iter()
                .any(|h| h.owner.process == l.owner.process && h.token == l.token)
                || rec.events.iter().any(|e| {
                    matches!(e, Event::Ended { ended, .. }
                        if ended.owner.process == l.owner.process && ended.token == l.token)
                })
        };
        let gone: Vec<&leasehold_core::Lease> = old
            .state
            .holders()
            .iter()
            .filter(|l| l.owner.process.host == self.host)
            .filter(|l| match new {
                Some(Ok(rec)) => !ends(l, rec),
                _ => true,
            })
            .collect();
        if gone.is_empty() {
            return;
        }
        let key = String::from_utf8_lossy(key).into_owned();
        let why = match new {
            None => "was deleted".to_owned(),
            Some(Err(d)) => format!("was overwritten ({d})"),
            Some(Ok(_)) => "lost this lease without an ending".to_owned(),
        };
        let now = leasehold_core::WallTime(now_ms());
        for l in &gone {
            warn!(resource = %name, key = %key, pid = l.owner.process.pid, token = %l.token, why = %why,
                "the record of a lease held here changed outside leasehold; fencing its holder");
            let _ = self.events.send(Event::Ended {
                resource: name.clone(),
                ended: Ended {
                    owner: l.owner.clone(),
                    mode: l.mode,
                    token: l.token,
                    granted_at: l.granted_at,
                    ended_at: now,
                    how: leasehold_core::EndReason::Forced {
                        reason: format!("its record at {key} {why} outside leasehold"),
                        by: "leasehold".into(),
                    },
                },
                dirtied: l.mode == leasehold_core::Mode::Exclusive,
            });
            if let Some(mut held) = self.held_index()
                && let Some(set) = held.get_mut(&l.owner.process)
            {
                set.remove(name);
            }
        }
        if new.is_none() {
            let holders: Vec<String> = gone
                .iter()
                .map(|l| format!("{} (token {})", l.owner.process, l.token))
                .collect();
            let marker = Record {
                state: old.state.clone(),
                reserved_for: None,
                events: Vec::new(),
                damaged: Some(format!(
                    "it was deleted while {} held it; the holder was fenced",
                    holders.join(", ")
                )),
            };
            if let Ok(bytes) = json(&marker) {
                self.fixes().push(Fix::Marker(key.into_bytes(), bytes));
            }
        }
    }

    /// This host's key changed: a value that does not decode while the key is still on this
    /// session is written again; a key moved off this session (other hosts now take the
    /// session for dead) ends it: the holders are fenced and a new session is opened.
    pub(super) fn check_own_host_key(&self, kv: &KeyValue) {
        let state = self.session.borrow().clone();
        let lease = LeaseId::of_session(state.id);
        if state.expired {
            return;
        }
        if LeaseId::of_key(kv.lease) != Some(lease) {
            warn!(
                lease = %lease,
                now_on = %LeaseId(kv.lease),
                "this host's key was overwritten and is no longer on its session"
            );
            self.session_ended(
                lease,
                "this host's key was overwritten in etcd; other hosts take the session for dead",
            );
            self.fixes().push(Fix::Revoke(lease));
            return;
        }
        if serde_json::from_slice::<HostValue>(&kv.value).is_ok_and(|v| v.lease == lease) {
            return;
        }
        warn!(
            lease = %lease,
            "this host's key holds a damaged value; writing it again"
        );
        self.fixes().push(Fix::HostValue(lease));
    }

    /// Writes what the watch found had to be repaired.
    pub(super) async fn apply_fixes(&self) {
        let fixes = std::mem::take(&mut *self.fixes());
        for fix in fixes {
            let r = match &fix {
                Fix::Marker(key, bytes) => {
                    // Only where nothing was written since: a new record is not overwritten.
                    let t = Txn::new().if_create_revision(key.clone(), 0).put(
                        key.clone(),
                        bytes.clone(),
                        None,
                    );
                    self.etcd.txn(t).await.map(|_| ())
                }
                Fix::HostValue(lease) => {
                    let value = HostValue {
                        host: self.host.clone(),
                        lease: *lease,
                        pid: std::process::id(),
                        since_ms: now_ms(),
                    };
                    let Ok(bytes) = json(&value) else { continue };
                    let key = self.keys.host(&self.host);
                    let t = Txn::new()
                        .if_lease(key.clone(), *lease)
                        .put(key, bytes, Some(*lease));
                    self.etcd.txn(t).await.map(|_| ())
                }
                Fix::Revoke(lease) => {
                    // Best effort: unrenewed, it expires by itself within the TTL.
                    let _ = self.etcd.lease_revoke(*lease).await;
                    Ok(())
                }
            };
            if let Err(e) = r {
                warn!(error = %e, "could not write a repair yet; retrying");
                self.fixes().push(fix);
            }
        }
    }
}
