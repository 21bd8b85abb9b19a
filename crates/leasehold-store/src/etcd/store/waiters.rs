//! This host's waiting requests: their keys in etcd are their place in the queues; the waiter
//! service decides them, queues them again when their session ended, and withdraws them.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use leasehold_core::{AcquireError, Grant, ReleaseKind, ReleaseRequest, ResourceName};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use super::commit::{Extra, writes};
use super::snapshot::Snapshot;
use super::{Inner, MAX_TXN_OPS, json, unavailable};
use crate::etcd::client::{LeaseId, Txn};
use crate::etcd::keys::WaiterValue;
use crate::etcd::pb::mvccpb::KeyValue;
use crate::{StoreError, WaitNote};

/// How often the waiter service looks again even without a change seen.
pub(super) const WAITER_POLL: Duration = Duration::from_secs(1);

/// A waiting request of this host, under an id local to this store that stays the same for
/// as long as the request waits.
pub(super) struct LocalWaiter {
    pub(super) value: WaiterValue,
    /// Its keys, one per resource. They exist in etcd when `place` is set; otherwise they may,
    /// from a queueing whose outcome is unknown, and are deleted before the next one.
    pub(super) keys: Vec<Vec<u8>>,
    /// The keys' create revision, which is the request's place in every queue (and its waiter
    /// id to the engine); `None` while it is not queued: its session ended, and it is queued
    /// again, at the back, under the next one.
    pub(super) place: Option<u64>,
    /// Its caller gave up (its deadline passed, or it went away): it is never queued again.
    pub(super) withdrawn: bool,
    pub(super) reply: Option<oneshot::Sender<Result<Vec<Grant>, AcquireError>>>,
}

impl LocalWaiter {
    /// Whether nobody waits for this request any more.
    pub(super) fn abandoned(&self) -> bool {
        self.withdrawn || self.reply.as_ref().is_none_or(|r| r.is_closed())
    }
}

/// What a withdrawn request that lost its place answers its caller, who has stopped waiting.
pub(super) fn withdrawn() -> AcquireError {
    AcquireError::Cancelled("the request was withdrawn".into())
}

/// Decides this host's waiting requests whenever something changes (and every second).
pub(super) async fn serve_waiters(inner: Arc<Inner>) {
    loop {
        let notified = inner.changed.notified();
        inner.release_orphans().await;
        let ids: Vec<u64> = inner.waiters().keys().copied().collect();
        for id in ids {
            if let Err(e) = inner.try_waiter(id).await {
                debug!(waiter = id, error = %e, "waiter not decided yet");
            }
        }
        let _ = tokio::time::timeout(WAITER_POLL, notified).await;
    }
}

/// How an acquire left its queueing step: granted at once, or queued as local waiter `id`.
pub(super) enum Queueing {
    Granted(Vec<Grant>),
    Queued(u64, oneshot::Receiver<Result<Vec<Grant>, AcquireError>>),
}

/// Withdraws a waiting request whose caller went away.
pub(super) struct WaitGuard {
    pub(super) inner: Arc<Inner>,
    pub(super) id: u64,
    pub(super) armed: bool,
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let inner = Arc::clone(&self.inner);
        let id = self.id;
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                // If it was granted meanwhile, finish_waiter found no caller and logged it.
                let _ = inner.withdraw(id).await;
            });
        }
    }
}

impl Inner {
    /// Deletes the waiting requests of this host left by an earlier agent (whose session this
    /// one resumed): nobody waits for them here, and they would stand in every queue ahead of
    /// the requests their callers make again.
    pub(super) async fn drop_old_waiters(&self, everything: &[KeyValue]) -> Result<(), StoreError> {
        let from = self.keys.all_waiters();
        let old: Vec<Vec<u8>> = everything
            .iter()
            .filter(|kv| kv.key.starts_with(&from))
            .filter(|kv| {
                serde_json::from_slice::<WaiterValue>(&kv.value)
                    .is_ok_and(|v| v.owner.process.host == self.host)
            })
            .map(|kv| kv.key.clone())
            .collect();
        for chunk in old.chunks(MAX_TXN_OPS) {
            let mut t = Txn::new();
            for k in chunk {
                t = t.delete(k.clone());
            }
            self.etcd.txn(t).await.map_err(unavailable)?;
        }
        if !old.is_empty() {
            info!(
                keys = old.len(),
                "dropped waiting requests of this host's previous agent; their callers ask again"
            );
        }
        Ok(())
    }

    /// Tries to decide local waiter `id`; queues it again if its place was lost.
    pub(super) async fn try_waiter(&self, id: u64) -> Result<(), StoreError> {
        let found = self
            .waiters()
            .get(&id)
            .map(|w| (w.value.clone(), w.place, w.abandoned()));
        let (value, place, abandoned) = match found {
            Some(v) => v,
            None => return Ok(()),
        };
        if abandoned && place.is_some() {
            // Its caller went away without withdrawing it (cut off as it was queued).
            self.withdraw(id).await?;
            return Ok(());
        }
        let Some(place) = place else {
            return self.requeue(id).await;
        };
        let names: BTreeSet<ResourceName> = value.items.iter().map(|(r, _)| r.clone()).collect();
        // Decided from the mirror (every change wakes this service after the mirror has it);
        // a grant still commits with compares.
        let there = |snap: &Snapshot| {
            snap.res
                .values()
                .any(|rs| rs.waiters.iter().any(|w| w.id == place))
        };
        let snap = match self.cached_snapshot(&names) {
            Some(snap) if there(&snap) => snap,
            // Out of the view, or the mirror may not have the keys yet: only a fresh read can
            // say they are gone.
            _ => self.snapshot_joining(&names).await?,
        };
        if !there(&snap) {
            // Read after the keys were seen gone: the snapshot's sessions may be older.
            let (host, _) = self
                .etcd
                .range(self.keys.host(&self.host), Vec::new(), 0)
                .await
                .map_err(unavailable)?;
            let session_ended = host
                .first()
                .is_none_or(|kv| LeaseId::of_key(kv.lease) != Some(value.session));
            return self.lost_place(id, place, session_ended).await;
        }
        if snap.res.values().any(|rs| rs.bad.is_some()) {
            // A resource whose record cannot be trusted is granted to nobody; the request
            // waits until an administrator repairs it, or its time runs out.
            return Ok(());
        }
        let now = self.now();
        let mut engine = self.engine(&snap, &BTreeSet::from([place]), now);
        engine.serve_waiters(names.iter().cloned(), now);
        let out = engine.take_output();
        let outcome = out
            .waiters
            .iter()
            .find(|(w, _)| w.0 == place)
            .map(|(_, r)| r.clone());
        let mut extra = Extra::default();
        if let Some(outcome) = &outcome {
            let keys = self
                .waiters()
                .get(&id)
                .map(|w| w.keys.clone())
                .unwrap_or_default();
            extra.delete = keys.into_iter().map(|k| (k, place as i64)).collect();
            if outcome.is_ok() {
                extra.require_session = Some(self.lease()?);
            }
        }
        if !writes(&out) && extra.is_empty() {
            return Ok(());
        }
        if self.commit(&snap, &engine, &out, extra).await?.is_some()
            && let Some(outcome) = outcome
        {
            self.finish_waiter(id, outcome);
        }
        Ok(())
    }

    /// Local waiter `id`'s keys, queued at `place`, are gone though nobody decided or withdrew
    /// it: they lived on this host's session, which ended while it waited (etcd stalled or
    /// was unreachable past the ttl). Only the caller's own deadline ends a wait, so it is
    /// queued again, at the back of every queue, under the host's next session; its caller
    /// is told why.
    pub(super) async fn lost_place(
        &self,
        id: u64,
        place: u64,
        session_ended: bool,
    ) -> Result<(), StoreError> {
        let note = {
            let _q = self.queueing.lock().await;
            let mut w = self.waiters();
            let Some(lw) = w.get_mut(&id) else {
                return Ok(());
            };
            if lw.place != Some(place) {
                // Withdrawn or queued again meanwhile.
                return Ok(());
            }
            if lw.abandoned() {
                drop(w);
                self.finish_waiter(id, Err(withdrawn()));
                return Ok(());
            }
            lw.place = None;
            lw.keys.clear();
            let why = if session_ended {
                "this host's session with etcd ended while the request waited (etcd stalled or unreachable past the ttl)"
            } else {
                "its place in the queue was removed from etcd"
            };
            WaitNote {
                process: lw.value.owner.process.clone(),
                items: lw.value.items.clone(),
                note: format!("{why}; it will be queued again under the host's new session"),
            }
        };
        warn!(waiter = id, place, "{}", note.note);
        let _ = self.notes.send(note);
        self.requeue(id).await
    }

    /// Queues local waiter `id` again, at the back, under the current session (when there is
    /// one; else it waits for the next).
    pub(super) async fn requeue(&self, id: u64) -> Result<(), StoreError> {
        let Ok(lease) = self.lease() else {
            return Ok(());
        };
        let _q = self.queueing.lock().await;
        let found = self
            .waiters()
            .get(&id)
            .filter(|lw| lw.place.is_none())
            .map(|lw| (lw.value.clone(), lw.keys.clone(), lw.abandoned()));
        let Some((mut value, old_keys, abandoned)) = found else {
            return Ok(());
        };
        if !old_keys.is_empty() {
            // An earlier attempt whose outcome is unknown may have written these.
            let mut t = Txn::new();
            for k in &old_keys {
                t = t.delete(k.clone());
            }
            self.etcd.txn(t).await.map_err(unavailable)?;
            if let Some(lw) = self.waiters().get_mut(&id) {
                lw.keys.clear();
            }
        }
        if abandoned {
            self.finish_waiter(id, Err(withdrawn()));
            return Ok(());
        }
        value.session = lease;
        let n = self
            .next_waiter_key
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let keys: Vec<Vec<u8>> = value
            .items
            .iter()
            .map(|(r, _)| self.keys.waiter(r, &self.host, n))
            .collect();
        if let Some(lw) = self.waiters().get_mut(&id) {
            lw.keys = keys.clone();
        }
        let v = json(&value)?;
        let mut t = Txn::new().if_lease(self.keys.host(&self.host), lease);
        for k in &keys {
            t = t.if_create_revision(k.clone(), 0);
        }
        for k in &keys {
            t = t.put(k.clone(), v.clone(), Some(lease));
        }
        let r = self.etcd.txn(t).await.map_err(unavailable)?;
        if !r.succeeded {
            // The session moved on again: nothing was written; try under the next one.
            if let Some(lw) = self.waiters().get_mut(&id) {
                lw.keys.clear();
            }
            return Ok(());
        }
        let note = {
            let mut w = self.waiters();
            let Some(lw) = w.get_mut(&id) else {
                return Ok(());
            };
            lw.place = Some(r.revision as u64);
            lw.value = value;
            WaitNote {
                process: lw.value.owner.process.clone(),
                items: lw.value.items.clone(),
                note: "queued again, at the back of the queue, under the host's new session".into(),
            }
        };
        info!(waiter = id, place = r.revision, "{}", note.note);
        let _ = self.notes.send(note);
        self.changed.notify_waiters();
        Ok(())
    }

    pub(super) fn finish_waiter(&self, id: u64, outcome: Result<Vec<Grant>, AcquireError>) {
        let Some(mut w) = self.waiters().remove(&id) else {
            return;
        };
        let owner = w.value.owner.clone();
        if let Some(reply) = w.reply.take()
            && let Err(Ok(grants)) = reply.send(outcome)
        {
            // Nobody is waiting for it any more: give it back.
            warn!(waiter = id, "a grant found its caller gone; releasing it");
            self.orphans().extend(
                grants
                    .into_iter()
                    .filter(|g| !g.existing)
                    .map(|g| (g.resource, owner.clone(), g.token)),
            );
            self.changed.notify_one();
        }
    }

    /// Releases grants whose caller went away before learning of them.
    pub(super) async fn release_orphans(&self) {
        let orphans = std::mem::take(&mut *self.orphans());
        // By token: the owner may be granted the resource again before this is carried out
        // (after a force-release), and that later lease must stay.
        for (resource, owner, token) in orphans {
            let r = self
                .transact(BTreeSet::from([resource.clone()]), |engine, now, _| {
                    let r = engine.release(
                        ReleaseRequest {
                            resource: resource.clone(),
                            process: owner.process.clone(),
                            owner_id: owner.id.clone(),
                            token: Some(token),
                            kind: ReleaseKind::Clean,
                        },
                        now,
                    );
                    Ok((r, Extra::default()))
                })
                .await;
            if let Err(e) = r {
                warn!(resource = %resource, error = %e, "could not release an orphaned grant; retrying");
                self.orphans().push((resource, owner, token));
            }
        }
    }

    /// Withdraws local waiter `id`. Returns false when it was decided first, or its keys were
    /// gone with its session: its caller then hears the grant, or that it was withdrawn, on
    /// its channel.
    pub(super) async fn withdraw(&self, id: u64) -> Result<bool, StoreError> {
        let _q = self.queueing.lock().await;
        let found = self.waiters().get_mut(&id).map(|lw| {
            lw.withdrawn = true;
            (lw.keys.clone(), lw.place)
        });
        let Some((keys, place)) = found else {
            return Ok(false);
        };
        let mut t = Txn::new();
        if let Some(place) = place {
            // Not if a grant took its keys first.
            for k in &keys {
                t = t.if_create_revision(k.clone(), place as i64);
            }
        }
        for k in &keys {
            t = t.delete(k.clone());
        }
        let succeeded = keys.is_empty() || self.etcd.txn(t).await.map_err(unavailable)?.succeeded;
        if succeeded {
            self.waiters().remove(&id);
            self.changed.notify_waiters();
        }
        Ok(succeeded)
    }
}
