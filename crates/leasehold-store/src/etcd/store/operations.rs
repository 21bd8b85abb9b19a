//! The [`Store`] operations of the etcd store.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use leasehold_core::{
    AcquireRequest, Acquired, Conflict, EndReason, Ended, Event, Grant, HostId, Owner, OwnerId,
    ProcessKey, ReleaseKind, ReleaseRequest, Released, ResourceName, ResourceView, Token, WallTime,
};
use tokio::sync::{broadcast, oneshot, watch};

use super::commit::Extra;
use super::snapshot::Snapshot;
use super::waiters::{LocalWaiter, Queueing, WaitGuard, withdrawn};
use super::{EtcdStore, Inner, MAX_TXN_OPS, json, unavailable};

/// How many resources one transaction that ends leases names: each costs the compare and put
/// of its record and the delete of its held key, and a grace compare, or, where the holder's
/// session is dead, the compare and put of the grace it starts, within etcd's limit. A process
/// holding more has them ended in several transactions, one after the other (a process's
/// leases end each on its own; only a grant is all or nothing).
const END_PER_TXN: usize = (MAX_TXN_OPS - 8) / 5;
use crate::etcd::client::{LeaseId, prefix_end};
use crate::etcd::history::EtcdHealth;
use crate::etcd::keys::{HostValue, KeyKind, Record, WaiterValue};
use crate::sync::{lock, read};
use crate::{AcquireSpec, Cause, SessionEndHook, SessionState, Store, StoreError, WaitNote};

impl Store for EtcdStore {
    fn host(&self) -> &HostId {
        &self.inner.host
    }

    async fn acquire(&self, spec: AcquireSpec) -> Result<Vec<Grant>, StoreError> {
        let inner = &self.inner;
        crate::check_host(&inner.host, &spec)?;
        let lease = inner.lease()?;
        let names: BTreeSet<ResourceName> = spec.items.iter().map(|(r, _)| r.clone()).collect();
        let n = inner
            .next_waiter_key
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let waiter_keys: Vec<Vec<u8>> = names
            .iter()
            .map(|r| inner.keys.waiter(r, &inner.host, n))
            .collect();
        let value = WaiterValue {
            owner: spec.owner.clone(),
            session: lease,
            items: spec.items.clone(),
            accept_dirty: spec.accept_dirty,
        };
        let waits = spec.wait.is_some();
        let queueing = {
            let inner = Arc::clone(inner);
            let spec = spec.clone();
            async move {
                let (acquired, _out, rev) = inner
                    .transact(names, |engine, now, _snap| {
                        let req = AcquireRequest {
                            owner: spec.owner.clone(),
                            session: lease.session(),
                            items: spec.items.clone(),
                            accept_dirty: spec.accept_dirty,
                            wait: spec.wait.is_some(),
                            expect_tokens: spec.expect_tokens.clone(),
                        };
                        let mut extra = Extra {
                            require_session: Some(lease),
                            ..Extra::default()
                        };
                        let r = match engine.acquire(req, now) {
                            Ok(Acquired::Queued(id)) => {
                                // The engine's waiter is only a placeholder: the waiter keys are the
                                // request's place in the queues.
                                engine.cancel_wait(id, now);
                                let v = json(&value)?;
                                extra.put = waiter_keys
                                    .iter()
                                    .map(|k| (k.clone(), v.clone(), Some(lease)))
                                    .collect();
                                // Queued behind what the snapshot showed, which may be a stale
                                // view: the commit compares those records too.
                                extra.compare_read = true;
                                Ok(None)
                            }
                            Ok(Acquired::Granted(g)) => Ok(Some(g)),
                            Err(e) => Err(e),
                        };
                        if r.is_err() {
                            // A refusal still writes what the snapshot showed had to change (a dead
                            // session's holders ended), but takes nothing.
                            extra.require_session = None;
                            extra.refusal = true;
                        }
                        Ok((r, extra))
                    })
                    .await?;
                match acquired {
                    Ok(Some(grants)) => Ok(Queueing::Granted(grants)),
                    Err(e) => Err(e.into()),
                    Ok(None) => {
                        let id = inner
                            .next_waiter
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let (tx, rx) = oneshot::channel();
                        {
                            inner.waiters().insert(
                                id,
                                LocalWaiter {
                                    value: value.clone(),
                                    keys: waiter_keys.clone(),
                                    place: Some(rev as u64),
                                    withdrawn: false,
                                    reply: Some(tx),
                                },
                            );
                        }
                        inner.changed.notify_waiters();
                        Ok(Queueing::Queued(id, rx))
                    }
                }
            }
        };
        // A request that waits queues as a task of its own, so that a caller who goes away
        // cannot cut it between writing the waiter keys and registering the waiter: keys
        // written for nobody would stand in every queue until this host's session ends. A
        // registered waiter whose caller has gone is withdrawn by the guard below, or by
        // `serve_waiters`. One that does not wait never queues (the engine refuses it
        // instead) and writes no waiter key: it runs on its caller's task, and to its end
        // even if dropped (`Finish`: the rest then goes on as a task, as the spawned one
        // would), without the spawn, the hand-over to the other worker and the join
        // (docs/performance.md, "Acquire on etcd").
        let queued = if waits {
            match tokio::spawn(queueing).await {
                Ok(r) => r,
                Err(e) => return Err(StoreError::Unavailable(Cause::at("queueing failed", e))),
            }
        } else {
            crate::Finish::new(queueing).await
        };
        let (id, mut rx) = match queued {
            Ok(Queueing::Queued(id, rx)) => (id, rx),
            Ok(Queueing::Granted(grants)) => return Ok(grants),
            Err(e) => return Err(e),
        };
        let mut guard = WaitGuard {
            inner: Arc::clone(inner),
            id,
            armed: true,
        };
        let wait = spec.wait.unwrap_or_default();
        let outcome = match tokio::time::timeout(wait, &mut rx).await {
            Ok(o) => o,
            Err(_) => {
                let gone = inner.withdraw(id).await?;
                guard.armed = false;
                // Not withdrawn: a grant came first (or the keys had gone with the session,
                // and the request answers that it was withdrawn).
                let granted = match gone {
                    true => None,
                    false => match rx.await {
                        Ok(Ok(grants)) => Some(grants),
                        Ok(Err(e)) if e == withdrawn() => None,
                        Ok(Err(e)) => return Err(e.into()),
                        Err(_) => return Err(StoreError::Closed),
                    },
                };
                if let Some(grants) = granted {
                    return Ok(grants);
                }
                let c = match self.conflict(spec.owner.clone(), spec.items.clone()).await {
                    // What kept it waiting: a record that cannot be trusted.
                    Err(e @ StoreError::BadRecord { .. }) => return Err(e),
                    r => r.ok().flatten(),
                };
                let c = c.unwrap_or_else(|| Conflict::unknown(spec.items[0].0.clone()));
                return Err(StoreError::TimedOut(c));
            }
        };
        guard.armed = false;
        match outcome {
            Ok(r) => r.map_err(StoreError::from),
            Err(_) => Err(StoreError::Closed),
        }
    }

    async fn release(
        &self,
        resource: ResourceName,
        process: ProcessKey,
        owner_id: Option<OwnerId>,
        token: Option<Token>,
        kind: ReleaseKind,
    ) -> Result<Released, StoreError> {
        let (r, _, _) = self
            .inner
            .transact(BTreeSet::from([resource.clone()]), |engine, now, _| {
                let r = engine.release(
                    ReleaseRequest {
                        resource: resource.clone(),
                        process: process.clone(),
                        owner_id: owner_id.clone(),
                        token,
                        kind: kind.clone(),
                    },
                    now,
                );
                Ok((r, Extra::default()))
            })
            .await?;
        r.map_err(StoreError::from)
    }

    async fn end_process(&self, process: ProcessKey) -> Result<Vec<Released>, StoreError> {
        self.inner
            .end_process_as(process, EndReason::ProcessDied)
            .await
    }

    async fn end_exited_zero(&self, process: ProcessKey) -> Result<Vec<Released>, StoreError> {
        self.inner
            .end_process_as(process, EndReason::ExitedClean)
            .await
    }

    async fn end_fenced(&self, process: ProcessKey) -> Result<Vec<Released>, StoreError> {
        self.inner.end_process_as(process, EndReason::Fenced).await
    }

    async fn end_leases(
        &self,
        leases: Vec<(ResourceName, Token)>,
        how: EndReason,
    ) -> Result<Vec<Released>, StoreError> {
        let mut released = Vec::new();
        // In several transactions when they are many (see [`END_PER_TXN`]).
        for part in leases.chunks(END_PER_TXN) {
            let names: BTreeSet<ResourceName> = part.iter().map(|(r, _)| r.clone()).collect();
            let (r, _, _) = self
                .inner
                .transact(names, |engine, now, _| {
                    Ok((engine.end_leases(part, how.clone(), now), Extra::default()))
                })
                .await?;
            released.extend(r);
        }
        Ok(released)
    }

    async fn force_release(
        &self,
        resource: ResourceName,
        reason: String,
        by: String,
    ) -> Result<Vec<Released>, StoreError> {
        if let Some(released) = self.inner.repair(&resource, &reason, &by).await? {
            return Ok(released);
        }
        let (r, _, _) = self
            .inner
            .transact(BTreeSet::from([resource.clone()]), |engine, now, _| {
                Ok((
                    engine.force_release(&resource, &reason, &by, now),
                    Extra::default(),
                ))
            })
            .await?;
        r.map_err(StoreError::from)
    }

    async fn mark_clean(
        &self,
        resource: ResourceName,
        by: String,
    ) -> Result<Option<Ended>, StoreError> {
        let (r, _, _) = self
            .inner
            .transact(BTreeSet::from([resource.clone()]), |engine, now, _| {
                Ok((engine.mark_clean(&resource, &by, now), Extra::default()))
            })
            .await?;
        r.map_err(StoreError::from)
    }

    async fn validate(&self, resource: ResourceName, token: Token) -> Result<bool, StoreError> {
        let snap = self
            .inner
            .snapshot(&BTreeSet::from([resource.clone()]))
            .await?;
        Ok(snap
            .res
            .get(&resource)
            .and_then(|rs| rs.record.as_ref())
            .is_some_and(|rec| {
                rec.state.holders().iter().any(|l| {
                    l.token == token && snap.sessions.contains_key(&LeaseId::of_session(l.session))
                })
            }))
    }

    async fn conflict(
        &self,
        owner: Owner,
        items: Vec<(ResourceName, leasehold_core::Mode)>,
    ) -> Result<Option<Conflict>, StoreError> {
        let names: BTreeSet<ResourceName> = items.iter().map(|(r, _)| r.clone()).collect();
        let snap = self.inner.snapshot(&names).await?;
        if let Some((name, detail)) = snap
            .res
            .iter()
            .find_map(|(n, rs)| rs.bad.as_ref().map(|d| (n, d)))
        {
            return Err(self.inner.bad_record(name, detail));
        }
        let now = self.inner.now();
        let engine = self.inner.engine(&snap, &BTreeSet::new(), now);
        // A grace etcd keeps is given to the engine as the whole grace from now: what is left
        // of it is not known here, at most that.
        Ok(engine.conflict(&owner, &items, now))
    }

    async fn inspect(&self, resource: ResourceName) -> Result<Option<ResourceView>, StoreError> {
        let snap = self
            .inner
            .snapshot(&BTreeSet::from([resource.clone()]))
            .await?;
        let now = self.inner.now();
        let engine = self.inner.engine(&snap, &BTreeSet::new(), now);
        Ok(snap
            .res
            .get(&resource)
            .and_then(|rs| self.inner.view(&engine, &resource, rs, now)))
    }

    async fn list(&self) -> Result<Vec<ResourceView>, StoreError> {
        let inner = &self.inner;
        inner.running()?;
        let k = &inner.keys;
        let prefix = k.prefix().as_bytes().to_vec();
        let (kvs, revision) = inner
            .etcd
            .range(prefix.clone(), prefix_end(&prefix), 0)
            .await
            .map_err(unavailable)?;
        let snap = Snapshot::build(k, revision, None, &kvs, None);
        let now = inner.now();
        let engine = inner.engine(&snap, &BTreeSet::new(), now);
        Ok(snap
            .res
            .iter()
            .filter_map(|(name, rs)| inner.view(&engine, name, rs, now))
            .collect())
    }

    async fn hosts(&self) -> Result<Vec<crate::HostView>, StoreError> {
        let mut hosts: BTreeMap<HostId, crate::HostView> = BTreeMap::new();
        // Every host's leases: the records are read now (the view has only this host's).
        let res = self.inner.keys.resources();
        let (records, _) = self
            .inner
            .etcd
            .range(res.clone(), prefix_end(&res), 0)
            .await
            .map_err(unavailable)?;
        {
            let m = read(&self.inner.mirror, "mirror");
            let mut leases: HashMap<LeaseId, usize> = HashMap::new();
            for kv in &records {
                if let Some(KeyKind::Resource(_)) = self.inner.keys.parse(&kv.key)
                    && let Ok(rec) = Record::decode(&kv.value)
                {
                    for l in rec.state.holders() {
                        *leases.entry(LeaseId::of_session(l.session)).or_default() += 1;
                    }
                }
            }
            for kv in m.kvs.values() {
                if let Some(KeyKind::Host(h)) = self.inner.keys.parse(&kv.key) {
                    let v = serde_json::from_slice::<HostValue>(&kv.value).ok();
                    hosts.insert(
                        h.clone(),
                        crate::HostView {
                            host: h,
                            session: Some(LeaseId(kv.lease).session()),
                            alive: true,
                            since: v.as_ref().map(|v| WallTime(v.since_ms)),
                            leases: leases.get(&LeaseId(kv.lease)).copied().unwrap_or(0),
                            agent_pid: v.map(|v| v.pid),
                            renewed_ago: None,
                            expires_in: None,
                        },
                    );
                }
            }
        }
        for (h, (lease, at)) in lock(&self.inner.ended_hosts, "ended_hosts").iter() {
            hosts.entry(h.clone()).or_insert_with(|| crate::HostView {
                host: h.clone(),
                session: Some(lease.session()),
                alive: false,
                since: Some(*at),
                leases: 0,
                agent_pid: None,
                renewed_ago: None,
                expires_in: None,
            });
        }
        // A live session's time left and last renewal, from etcd (one call per live host).
        for h in hosts.values_mut().filter(|h| h.alive) {
            let Some(session) = h.session else { continue };
            if let Some((left, granted)) = self
                .inner
                .etcd
                .lease_ttl(LeaseId::of_session(session))
                .await
                .map_err(unavailable)?
            {
                let secs = |s: i64| std::time::Duration::from_secs(u64::try_from(s).unwrap_or(0));
                h.expires_in = Some(secs(left));
                h.renewed_ago = Some(secs(granted.saturating_sub(left)));
            }
        }
        Ok(hosts.into_values().collect())
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.inner.events.subscribe()
    }

    async fn subscribe_all(&self) -> Result<broadcast::Receiver<Event>, StoreError> {
        let inner = &self.inner;
        // etcd's revision now: every event after it reaches the receiver.
        let (_, now) = inner
            .etcd
            .range(inner.keys.hosts(), Vec::new(), 0)
            .await
            .map_err(unavailable)?;
        let rx = {
            let mut all = lock(&inner.all_events, "all_events");
            let rx = all.tx.subscribe();
            all.start = match all.start {
                0 => now + 1,
                s => s.min(now + 1),
            };
            if !all.running {
                all.running = true;
                tokio::spawn(super::mirror::watch_all(Arc::clone(inner)));
            }
            rx
        };
        // Returned once the watch delivers every event from then on.
        let mut from = inner.all_from.subscribe();
        let timeout = inner.opts.timeout;
        match tokio::time::timeout(timeout, from.wait_for(|f| *f > 0 && *f <= now + 1)).await {
            Ok(Ok(_)) => Ok(rx),
            _ => Err(StoreError::Unavailable(Cause::new(format!(
                "the watch of every resource did not start within {timeout:?}; watch again"
            )))),
        }
    }

    fn session(&self) -> Option<watch::Receiver<SessionState>> {
        Some(self.inner.session.subscribe())
    }

    fn on_session_end(&self, hook: SessionEndHook) {
        *lock(&self.inner.session_end, "session_end") = Some(hook);
    }

    fn local_holders(&self) -> Option<Vec<ProcessKey>> {
        // `None` when the index is poisoned: the agent's fence then kills every process it
        // watches.
        self.inner.held_index().map(|h| h.keys().cloned().collect())
    }

    fn local_leases(&self) -> Option<crate::LocalLeases> {
        self.inner.local_leases()
    }

    fn wait_notes(&self) -> broadcast::Receiver<WaitNote> {
        self.inner.notes.subscribe()
    }

    fn etcd_health(&self) -> Option<EtcdHealth> {
        Some(self.health())
    }

    fn stale_holders(&self) -> Vec<ProcessKey> {
        lock(&self.inner.stale, "stale").clone()
    }
}

impl Inner {
    /// Ends every lease and waiting request of an exited local process, recording `how`.
    pub(super) async fn end_process_as(
        &self,
        process: ProcessKey,
        how: EndReason,
    ) -> Result<Vec<Released>, StoreError> {
        let inner = self;
        // Its waiting requests go first.
        let mine: Vec<u64> = inner
            .waiters()
            .iter()
            .filter(|(_, v)| v.value.owner.process == process)
            .map(|(id, _)| *id)
            .collect();
        for id in mine {
            if inner.withdraw(id).await? {
                // The request's caller learns of it through its closed channel.
            }
        }
        let held: Vec<ResourceName> = inner
            .held_index()
            .and_then(|h| h.get(&process).cloned())
            .unwrap_or_default()
            .into_iter()
            .collect();
        // With the index poisoned, nothing is known to end: say so rather than end nothing.
        inner.running()?;
        let mut released = Vec::new();
        // In several transactions when they are many (see [`END_PER_TXN`]).
        for part in held.chunks(END_PER_TXN) {
            let mut names: BTreeSet<ResourceName> = part.iter().cloned().collect();
            while !names.is_empty() {
                match inner
                    .transact(names.clone(), |engine, now, _| {
                        Ok((
                            engine.end_process_as(&process, how.clone(), now),
                            Extra::default(),
                        ))
                    })
                    .await
                {
                    // A damaged record is left for the administrator; the others are ended.
                    Err(StoreError::BadRecord { resource, .. }) => {
                        names.remove(&resource);
                        if let Some(mut h) = inner.held_index()
                            && let Some(set) = h.get_mut(&process)
                        {
                            set.remove(&resource);
                        }
                    }
                    r => {
                        released.extend(r.map(|(r, _, _)| r)?);
                        break;
                    }
                }
            }
        }
        Ok(released)
    }
}
