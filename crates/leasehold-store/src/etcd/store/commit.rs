//! Deciding and committing: the engine over a snapshot, the transaction that writes what it
//! changed only if nothing it read has moved, and the retry loop around both.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use leasehold_core::{
    AcquireError, AcquireRequest, Ended, Engine, EngineConfig, Event, Meta, Now, Output, Released,
    ResourceName, ResourceState, Session, SessionId, Time, Token, WaiterId,
};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use super::mirror::Written;
use super::snapshot::{Snapshot, holding_sessions};
use super::{Inner, MAX_TXN_OPS, now_ms, unavailable};
use crate::etcd::client::{
    Etcd, EtcdCode, EtcdError, EtcdErrorKind, LeaseId, Txn, TxnResult, batch_results, prefix_end,
    range_of,
};
use crate::etcd::keys::Record;
use crate::etcd::pb::mvccpb::KeyValue;
use crate::sync::lock;
use crate::sync::write;
use crate::{Cause, StoreError};

/// A record as it is written ([`Record::encode`]).
fn encode(rec: &Record) -> Result<Vec<u8>, StoreError> {
    rec.encode()
        .map_err(|e| StoreError::Storage(Cause::at("cannot encode a record", e)))
}

/// Whether a commit only ends leases (releases, a dead holder's leases, undone grants, the
/// expiries and graces and dirty marks that come with them, waiter keys withdrawn), granting
/// nothing: no lease granted, no waiter answered with a grant, no holder in a record it
/// writes that was not there before, no key put, and not a refusal (an acquire).
pub(super) fn only_ends(snap: &Snapshot, engine: &Engine, out: &Output, extra: &Extra) -> bool {
    let ends = |e: &Event| matches!(e, Event::Ended { .. } | Event::SessionExpired { .. });
    extra.put.is_empty()
        && !extra.refusal
        && out.waiters.iter().all(|(_, r)| r.is_err())
        && out.events.iter().all(ends)
        && out.changed.iter().all(|name| {
            let before = snap
                .res
                .get(name)
                .and_then(|rs| rs.record.as_ref())
                .map(|r| r.state.holders())
                .unwrap_or_default();
            engine.resource(name).is_none_or(|st| {
                st.holders().iter().all(|l| {
                    before
                        .iter()
                        .any(|b| b.token == l.token && b.owner == l.owner)
                })
            })
        })
}

/// Whether the engine changed a record. (Its metadata, which the token floor marks changed,
/// is not kept in etcd: tokens come from records and revisions.)
pub(super) fn writes(out: &Output) -> bool {
    !out.changed.is_empty()
}

/// What a commit writes besides records.
#[derive(Debug, Default)]
pub(super) struct Extra {
    /// Keys to delete, each only if its create revision is still the one given.
    pub(super) delete: Vec<(Vec<u8>, i64)>,
    /// Keys to put, with their lease.
    pub(super) put: Vec<(Vec<u8>, Vec<u8>, Option<LeaseId>)>,
    /// Require this host's key to be on this lease (the session is alive) at commit.
    pub(super) require_session: Option<LeaseId>,
    /// The decision is a refusal: the records it refused on are not compared (only those it
    /// changes are), so one decided from the view is decided again on a fresh read once what
    /// it changed is written.
    pub(super) refusal: bool,
    /// The decision rests on the records it read and did not change, and their graces (a
    /// request queued behind their holders writes only its waiter keys): each of those is
    /// compared too, so one decided from a stale view, or on a record that moved or a grace
    /// that ended before the commit, writes nothing and is decided again on what the commit
    /// found.
    pub(super) compare_read: bool,
}

impl Extra {
    pub(super) fn is_empty(&self) -> bool {
        self.delete.is_empty() && self.put.is_empty()
    }
}

/// How many batches of commits may be in flight at once. While they are, the commits that
/// arrive wait and go together in the next.
pub(super) const BATCHES_IN_FLIGHT: usize = 2;

/// A commit waiting to be sent, alone or in a batch.
#[derive(Debug)]
struct Pending {
    txn: Txn,
    /// The resources whose keys it compares and writes: no two members of a batch share one.
    names: BTreeSet<ResourceName>,
    /// It creates keys whose create revision is an identity (waiter keys: a request's place
    /// in every queue), which two members of one batch would share: it goes alone.
    alone: bool,
    reply: oneshot::Sender<Result<TxnResult, EtcdError>>,
}

/// Sends the commits of one store to etcd, several in one transaction when several are
/// waiting (issue 15: with 64 clients, each commit alone costs etcd a request, a raft entry
/// and an answer of its own). A batch is a transaction of transactions
/// ([`Txn::batch`]): each member keeps every compare it had and succeeds or fails on its own,
/// as if sent alone. Members touch disjoint resources, so none compares what another writes
/// (etcd evaluates every member's compares before any writes; the commits' prefix-wide
/// compares, nothing created under all waiters or graces since the snapshot, stand for
/// per-resource ones, and another resource's key is not what they guard). A commit that
/// finds nothing queued and a slot free is sent by its caller's task at once: a batch of
/// one, without the two task hops (the batcher's, the batch's own).
#[derive(Debug)]
pub(super) struct Batcher {
    queue: mpsc::UnboundedSender<Pending>,
    /// Taken by the task that sends the batches.
    waiting: std::sync::Mutex<Option<mpsc::UnboundedReceiver<Pending>>>,
    /// One permit per batch that may be in flight.
    pub(super) slots: std::sync::Arc<tokio::sync::Semaphore>,
    /// Commits queued and not yet taken into a batch.
    pub(super) queued: std::sync::atomic::AtomicUsize,
}

impl Default for Batcher {
    fn default() -> Batcher {
        let (queue, rx) = mpsc::unbounded_channel();
        Batcher {
            queue,
            waiting: std::sync::Mutex::new(Some(rx)),
            slots: std::sync::Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT)),
            queued: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

impl Batcher {
    /// Sends `txn`, which compares and writes the keys of `names` only, alone or in a batch;
    /// its own result either way.
    async fn send(
        &self,
        etcd: &Etcd,
        txn: Txn,
        names: BTreeSet<ResourceName>,
        alone: bool,
    ) -> Result<TxnResult, EtcdError> {
        // Nothing waits and a slot is free: sent from the caller's task, without the hops
        // through the batcher's task and a task of its own (an acquire at concurrency 1).
        if self.queued.load(std::sync::atomic::Ordering::Relaxed) == 0
            && let Ok(slot) = std::sync::Arc::clone(&self.slots).try_acquire_owned()
        {
            etcd.note_batch(1);
            let r = etcd.txn(txn).await;
            drop(slot);
            return r;
        }
        let (reply, answer) = oneshot::channel();
        let gone = || EtcdError::new("txn", EtcdErrorKind::NoAnswer, "the store is closing");
        self.queued
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.queue
            .send(Pending {
                txn,
                names,
                alone,
                reply,
            })
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// The task that sends the batches (run once per store).
    pub(super) async fn run(&self, etcd: Etcd) {
        let Some(mut rx) = lock(&self.waiting, "batcher").take() else {
            return;
        };
        let mut next: Option<Pending> = None;
        let taken = |n: usize| {
            self.queued
                .fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
        };
        loop {
            let first = match next.take() {
                Some(p) => p,
                None => match rx.recv().await {
                    Some(p) => p,
                    None => return,
                },
            };
            // What arrives while every slot is taken waits to go with it.
            let Ok(slot) = std::sync::Arc::clone(&self.slots).acquire_owned().await else {
                return;
            };
            let mut size = first.txn.size() + 1;
            let mut names = first.names.clone();
            let mut batch = vec![first];
            if !batch[0].alone {
                while let Ok(p) = rx.try_recv() {
                    if p.alone
                        || size + p.txn.size() + 1 > MAX_TXN_OPS
                        || !p.names.is_disjoint(&names)
                    {
                        next = Some(p);
                        break;
                    }
                    size += p.txn.size() + 1;
                    names.extend(p.names.iter().cloned());
                    batch.push(p);
                }
            }
            taken(batch.len());
            let etcd = etcd.clone();
            tokio::spawn(async move {
                send_batch(&etcd, batch).await;
                drop(slot);
            });
        }
    }
}

/// Whether etcd refused a whole batch for what one member asked (a lease gone, or limits),
/// having written nothing: its members are then sent one by one.
fn refused_whole(e: &EtcdError) -> bool {
    matches!(
        e.kind(),
        EtcdErrorKind::Etcd(
            EtcdCode::TooManyOps | EtcdCode::RequestTooLarge | EtcdCode::LeaseNotFound
        ) | EtcdErrorKind::Status(tonic::Code::InvalidArgument)
    )
}

/// Sends one batch and answers each member.
async fn send_batch(etcd: &Etcd, mut batch: Vec<Pending>) {
    etcd.note_batch(batch.len());
    if batch.len() == 1 {
        let p = batch.remove(0);
        let _ = p.reply.send(etcd.txn(p.txn).await);
        return;
    }
    let members = batch.len();
    let txns = batch.iter().map(|p| p.txn.clone()).collect();
    match etcd.txn(Txn::batch(txns)).await {
        Ok(r) => match batch_results(r, members) {
            Some(results) => {
                for (p, r) in batch.into_iter().zip(results) {
                    let _ = p.reply.send(Ok(r));
                }
            }
            None => {
                let e = EtcdError::new(
                    "txn",
                    EtcdErrorKind::BadAnswer,
                    "etcd answered a batch of transactions without a result for each",
                );
                for p in batch {
                    let _ = p.reply.send(Err(e.clone()));
                }
            }
        },
        Err(e) if refused_whole(&e) => {
            for p in batch {
                let _ = p.reply.send(etcd.txn(p.txn).await);
            }
        }
        // No answer, or one that may have followed a write: each member learns it as if its
        // own transaction had failed so.
        Err(e) => {
            for p in batch {
                let _ = p.reply.send(Err(e.clone()));
            }
        }
    }
}

impl Inner {
    /// The engine over a snapshot: live sessions, dead sessions due at once, records, queues,
    /// reservations. `decide` names this host's waiters it may grant.
    pub(super) fn engine(&self, snap: &Snapshot, decide: &BTreeSet<u64>, now: Now) -> Engine {
        let mut sessions: BTreeMap<SessionId, Session> = BTreeMap::new();
        for (lease, host) in &snap.sessions {
            let id = lease.session();
            sessions.insert(
                id,
                Session {
                    id,
                    host: host.clone(),
                    ttl: None,
                    expires_at: None,
                },
            );
        }
        let mut records = Vec::new();
        for (name, rs) in &snap.res {
            let mut st = rs
                .record
                .as_ref()
                .map(|r| r.state.clone())
                .unwrap_or_default();
            // A grace etcd keeps ends when its key's lease does; the engine is told the most
            // it can last from now, so refusals and views say at most the grace is left.
            st = st.with_blocked_until(rs.grace.then(|| now.mono.after(self.opts.grace)));
            for l in st.holders() {
                // A holder whose session is gone: a session that expires now, so the engine
                // ends its leases (dirty) and starts the grace.
                sessions.entry(l.session).or_insert_with(|| Session {
                    id: l.session,
                    host: l.owner.process.host.clone(),
                    ttl: Some(Duration::ZERO),
                    expires_at: Some(Time(0)),
                });
            }
            if rs.record.is_some() || rs.grace || !rs.waiters.is_empty() {
                records.push((name.clone(), st));
            }
        }
        let mut engine = Engine::restore(
            EngineConfig {
                grace: self.opts.grace,
            },
            Meta {
                next_token: 0,
                next_session: 1,
                sessions: sessions.into_values().collect(),
            },
            records,
        );
        engine.raise_token_floor(u64::try_from(snap.revision).unwrap_or(0) + 1);
        let mut seen = BTreeSet::new();
        for rs in snap.res.values() {
            for w in &rs.waiters {
                if !seen.insert(w.id) {
                    continue;
                }
                let req = AcquireRequest {
                    owner: w.value.owner.clone(),
                    session: w.value.session.session(),
                    items: w.value.items.clone(),
                    accept_dirty: w.value.accept_dirty,
                    wait: true,
                    expect_tokens: Vec::new(),
                };
                let _ = engine.insert_waiter(WaiterId(w.id), req, decide.contains(&w.id));
            }
        }
        for (name, rs) in &snap.res {
            let reserved = rs
                .record
                .as_ref()
                .and_then(|r| r.reserved_for)
                .filter(|id| seen.contains(id));
            engine.set_reservation(name, reserved.map(WaiterId));
        }
        // Dead sessions expire now; what that changes is written with the operation.
        engine.tick(now);
        engine
    }

    /// Writes what the engine changed, if nothing it read has moved. Returns the commit's
    /// revision, or `None` when something moved (the caller starts again).
    pub(super) async fn commit(
        &self,
        snap: &Snapshot,
        engine: &Engine,
        out: &Output,
        extra: Extra,
    ) -> Result<Option<i64>, StoreError> {
        Ok(self.commit_or_read(snap, engine, out, extra).await?.ok())
    }

    /// [`Inner::commit`], and when something moved, what the transaction found instead where
    /// etcd's limit leaves room for the reads: the snapshot's resources and the live sessions,
    /// read by its failure branch at its revision (as [`Inner::snapshot`] reads them), so the
    /// decision is made again without another round trip.
    pub(super) async fn commit_or_read(
        &self,
        snap: &Snapshot,
        engine: &Engine,
        out: &Output,
        extra: Extra,
    ) -> Result<Result<i64, Option<Snapshot>>, StoreError> {
        self.running()?;
        // Not while etcd's leader is behind applying (this host's keep-alives say so): every
        // host's renewals wait for it. A commit that only ends leases goes all the same: it
        // grants nothing, and holding it would hold a dead holder's release past G4's bound
        // (or fail it) for a few small writes.
        if !only_ends(snap, engine, out, &extra) {
            self.hold_while_renewals_late().await?;
        }
        let mut t = Txn::new();
        if let Some(lease) = extra.require_session {
            t = t.if_lease(self.keys.host(&self.host), lease);
        }
        let mut events: BTreeMap<&ResourceName, Vec<Event>> = BTreeMap::new();
        for e in &out.events {
            let r = match e {
                Event::Granted { resource, .. }
                | Event::Ended { resource, .. }
                | Event::Cleaned { resource, .. } => resource,
                Event::SessionExpired { .. } => continue,
            };
            events.entry(r).or_default().push(e.clone());
        }
        // A lease ended because its session looked dead: that session's host key must still
        // not be on it at commit, or nothing is written.
        let mut dead = BTreeSet::new();
        for name in &out.changed {
            let holders = snap
                .res
                .get(name)
                .and_then(|rs| rs.record.as_ref())
                .map(|r| r.state.holders())
                .unwrap_or_default();
            for l in holders {
                let lease = LeaseId::of_session(l.session);
                if !snap.sessions.contains_key(&lease) {
                    dead.insert((l.owner.process.host.clone(), lease));
                }
            }
        }
        for (host, lease) in dead {
            t = t.if_lease_not(self.keys.host(&host), lease);
        }
        let mut graces = Vec::new();
        // The records and held keys written, for the view (see `Mirror::own_commit`).
        let mut written: Vec<Written> = Vec::new();
        // The events the records written record: published once the commit is durable.
        let mut published: Vec<(ResourceName, Vec<u8>, Vec<Event>)> = Vec::new();
        for name in &out.changed {
            let Some(rs) = snap.res.get(name) else {
                continue;
            };
            let st = engine.resource(name).cloned().unwrap_or_default();
            // A grace this operation started (one etcd keeps was given to the engine as
            // `rs.grace`, and is not written again).
            let starts_grace = st.blocked_until().is_some() && !rs.grace;
            if starts_grace {
                graces.push(name.clone());
            }
            let rec = Record {
                reserved_for: st.reserved_for().map(|w| w.0),
                state: st.with_blocked_until(None),
                events: events.remove(name).unwrap_or_default(),
                damaged: None,
            };
            // The sessions that start or stop holding it get or lose their `held` key here,
            // with the record. A record written where there was none requires that no session
            // claims it (a record deleted outside leasehold is not free).
            let before = holding_sessions(rs.record.as_deref());
            let mut after = BTreeMap::new();
            for l in rec.state.holders() {
                after.insert(
                    LeaseId::of_session(l.session),
                    l.owner.process.host.to_string(),
                );
            }
            for lease in before.iter().filter(|l| !after.contains_key(l)) {
                t = t.delete(self.keys.held(name, *lease));
                written.push((name.clone(), self.keys.held(name, *lease), None));
            }
            // A held key is on no etcd lease: it goes with its holder, in the transaction
            // that clears it. On the session's lease, the revoke of a host that died holding
            // 10,000 resources deleted 10,000 keys in one raft entry, which took the leader
            // ~1.7 s to apply; etcd (3.4.20 on) answers no renewal while its apply is behind,
            // so every other host's renewals stalled and they fenced their holders
            // (docs/performance.md, "Many hosts").
            for (lease, host) in after.iter().filter(|(l, _)| !before.contains(l)) {
                t = t.put(
                    self.keys.held(name, *lease),
                    host.clone().into_bytes(),
                    None,
                );
                written.push((
                    name.clone(),
                    self.keys.held(name, *lease),
                    Some((host.clone().into_bytes(), 0)),
                ));
            }
            t = if rs.record.is_none() && rs.mod_rev == 0 {
                // Neither the record nor a held key: a record deleted outside leasehold is not
                // taken for free.
                t.if_none_created_after(self.keys.resource(name), self.keys.resource_end(name), 0)
            } else {
                t.if_mod_revision(self.keys.resource(name), rs.mod_rev)
            };
            let value = encode(&rec)?;
            if !rec.events.is_empty() {
                published.push((name.clone(), self.keys.resource(name), rec.events.clone()));
            }
            written.push((
                name.clone(),
                self.keys.resource(name),
                Some((value.clone(), 0)),
            ));
            t = t.put(self.keys.resource(name), value, None);
        }
        if extra.compare_read {
            // Not written, but decided on: each must still be what the decision saw. (A
            // resource guessed to have no keys is compared below, a changed one above.)
            for (name, rs) in &snap.res {
                if !rs.guessed && !out.changed.contains(name) {
                    t = if rs.record.is_none() && rs.mod_rev == 0 {
                        t.if_none_created_after(
                            self.keys.resource(name),
                            self.keys.resource_end(name),
                            0,
                        )
                    } else {
                        t.if_mod_revision(self.keys.resource(name), rs.mod_rev)
                    };
                }
                // A grace it waits behind must not have ended since (one started since is
                // compared below, with every resource read).
                if rs.grace {
                    t = t.if_exists(self.keys.grace(name));
                }
            }
        }
        for key in &extra.delete {
            t = t
                .if_create_revision(key.0.clone(), key.1)
                .delete(key.0.clone());
        }
        let creates_keys = !extra.put.is_empty();
        for (key, value, lease) in &extra.put {
            t = t.put(key.clone(), value.clone(), *lease);
        }
        if !graces.is_empty() {
            let (grace_lease, _) = self
                .etcd
                .lease_grant(self.opts.grace)
                .await
                .map_err(unavailable)?;
            for r in &graces {
                t = t.if_create_revision(self.keys.grace(r), 0).put(
                    self.keys.grace(r),
                    Vec::new(),
                    Some(grace_lease),
                );
            }
        }
        // A request granted beside holders must not jump a request queued behind them that
        // the decision did not see (the mirror may lag): no waiter of such a resource may be
        // newer than the snapshot. (Where the snapshot saw it free or changed since, the
        // record's compare already covers it.) Per resource, or for all at once where etcd's
        // limit leaves no room.
        // (A resource guessed to have no keys must have no waiter key at all.)
        // Nor may a handover's reservation be dropped for a waiter the view has not seen yet:
        // a view's waiter watcher can lag its record (or this agent's own commit, written into
        // the view at once), and the engine drops a reservation for a waiter it does not see.
        let joined: Vec<&ResourceName> = out
            .changed
            .iter()
            .filter(|n| {
                snap.res.get(*n).is_some_and(|rs| {
                    rs.guessed
                        || rs.record.as_ref().is_some_and(|r| {
                            !r.state.holders().is_empty() || r.reserved_for.is_some()
                        })
                })
            })
            .collect();
        let guessed: Vec<&ResourceName> = snap
            .res
            .iter()
            .filter(|(_, rs)| rs.guessed)
            .map(|(n, _)| n)
            .collect();
        for name in guessed.iter().filter(|n| !out.changed.contains(**n)) {
            // Not written, but decided on as having no keys: none may have appeared.
            let w = self.keys.waiters(name);
            t = t
                .if_none_created_after(self.keys.resource(name), self.keys.resource_end(name), 0)
                .if_none_created_after(w.clone(), prefix_end(&w), 0)
                .if_none_created_after(self.keys.grace(name), Vec::new(), 0);
        }
        // Likewise no grace may have started on a resource it changes since the snapshot: the
        // mirror applies a commit's keys one at a time, so it can show another host's record
        // ended dirty before the grace key written with it, and a decision from it would grant
        // inside that grace. (A grace this commit starts already requires the key absent.)
        // Every resource the decision read, not only those it changes: a view's three watchers
        // of one resource deliver a commit's record and grace key apart, and a waiter told
        // "needs check" from a record ended dirty must not have been inside a grace.
        let ungraced: Vec<&ResourceName> =
            snap.res.keys().filter(|n| !graces.contains(*n)).collect();
        // Each resource's keys are known up to their own revision (a snapshot from the view
        // has one per watcher), never beyond it.
        let known = |name: &ResourceName| {
            snap.res
                .get(name)
                .map_or((0, 0), |rs| (rs.waiters_rev, rs.grace_rev))
        };
        if t.size() + joined.len() + ungraced.len() <= MAX_TXN_OPS {
            for name in joined {
                let w = self.keys.waiters(name);
                t = t.if_none_created_after(w.clone(), prefix_end(&w), known(name).0);
            }
            for name in ungraced {
                t = t.if_none_created_after(self.keys.grace(name), Vec::new(), known(name).1);
            }
        } else {
            let oldest = snap
                .res
                .keys()
                .map(|n| known(n).0.min(known(n).1))
                .min()
                .unwrap_or(0);
            for prefix in [self.keys.all_waiters(), self.keys.graces()] {
                t = t.if_none_created_after(prefix.clone(), prefix_end(&prefix), oldest);
            }
        }
        if t.size() > MAX_TXN_OPS {
            return Err(StoreError::Acquire(AcquireError::Invalid(format!(
                "this request needs a transaction of {} operations; etcd allows {MAX_TXN_OPS}: name fewer resources",
                t.size()
            ))));
        }
        // Where etcd's limit leaves room, a commit that fails reads what a fresh snapshot
        // reads (the live sessions, and each resource's record range, waiter keys and grace
        // key), at its revision.
        let reads = 1 + 3 * snap.res.len();
        let with_reads = t.size_with_failure(reads) <= MAX_TXN_OPS;
        if with_reads {
            let hosts = self.keys.hosts();
            t = t.or_get(hosts.clone(), prefix_end(&hosts));
            for name in snap.res.keys() {
                for (key, end) in super::mirror::ranges_of(&self.keys, name) {
                    t = t.or_get(key, end);
                }
            }
        }
        // In use: they stay in the view until the index of holders has them.
        self.touch_view(&out.changed);
        let names: BTreeSet<ResourceName> = snap.res.keys().cloned().collect();
        let r = self
            .batcher
            .send(&self.etcd, t, names.clone(), creates_keys)
            .await
            .map_err(unavailable)?;
        self.pause_commit_if_asked().await;
        if !r.succeeded {
            // What it found joins the view: the next decision on these resources needs no read.
            return Ok(Err(with_reads.then(|| {
                let kvs: Vec<KeyValue> = (0..r.responses.len())
                    .flat_map(|i| range_of(&r, i).iter().cloned())
                    .collect();
                self.join_view(&names, r.revision, &kvs);
                Snapshot::build(
                    &self.keys,
                    r.revision,
                    Some(&names),
                    &kvs,
                    Some(&self.decoded),
                )
            })));
        }
        let mut rejoin = Vec::new();
        {
            let mut m = write(&self.mirror, "mirror");
            // Durable now: a record's events are published here, unless the watch already
            // delivered (and published) this very revision of it, which it may have before
            // this answer was read; the watch does not publish them again. Under the view's
            // lock, which the watch publishes under too: a later version the watch delivers
            // cannot be published before this one.
            for (name, key, events) in published {
                if !m.delivered(&name, r.revision) {
                    m.published(key, r.revision);
                    for e in events {
                        let _ = self.events.send(e);
                    }
                }
            }
            for name in &guessed {
                m.join_own(&self.keys, name, r.revision);
            }
            m.own_commit(r.revision, &written);
            // A resource now held here stays in the view (see `Mirror::touch`); should one
            // have left it meanwhile, it is read back in, and what changed since is handled.
            for name in &out.changed {
                let held_here = engine.resource(name).is_some_and(|st| {
                    st.holders()
                        .iter()
                        .any(|l| l.owner.process.host == self.host)
                });
                if held_here
                    && !m.has_one(name)
                    && let Some((_, key, Some((value, _)))) = written
                        .iter()
                        .find(|(n, k, _)| n == name && *k == self.keys.resource(name))
                {
                    let kv = KeyValue {
                        key: key.clone(),
                        mod_revision: r.revision,
                        value: value.clone(),
                        ..Default::default()
                    };
                    rejoin.push(super::mirror::Fix::Rejoin(name.clone(), kv));
                }
            }
        }
        if !rejoin.is_empty() {
            self.fixes().extend(rejoin);
            self.fixes_due.notify_one();
        }
        self.pause_published_if_asked().await;
        self.note_holders(engine, &out.changed);
        Ok(Ok(r.revision))
    }

    /// Updates the index of local holders after a commit.
    pub(super) fn note_holders(&self, engine: &Engine, changed: &BTreeSet<ResourceName>) {
        let Some(mut held) = self.held_index() else {
            return;
        };
        for name in changed {
            for set in held.values_mut() {
                set.remove(name);
            }
            if let Some(st) = engine.resource(name) {
                for l in st.holders() {
                    if l.owner.process.host == self.host {
                        held.entry(l.owner.process.clone())
                            .or_default()
                            .insert(name.clone());
                    }
                }
            }
        }
        held.retain(|_, s| !s.is_empty());
    }

    /// Runs `op` on the engine over a fresh snapshot of `names`, commits, and retries from a
    /// new snapshot while something moved in between.
    pub(super) async fn transact<T>(
        &self,
        names: BTreeSet<ResourceName>,
        mut op: impl FnMut(&mut Engine, Now, &Snapshot) -> Result<(T, Extra), StoreError>,
    ) -> Result<(T, Output, i64), StoreError> {
        self.running()?;
        let deadline = Instant::now() + self.opts.timeout * 5;
        // The first attempt decides from the view when it has every resource; a decision
        // that writes nothing, or whose compares fail, is made again on a fresh read (which
        // puts the resources in the view).
        // Resources outside the view are guessed to have no keys, when the agent knows etcd's
        // revision from moments ago. A commit that fails answers the fresh keys with the
        // failure (what it found), decided from next.
        let mut fresh = false;
        let mut read: Option<Snapshot> = None;
        self.touch_view(&names);
        loop {
            let cached = match read.take() {
                Some(snap) => Some(snap),
                None if fresh => None,
                None => self.guessed_snapshot(&names),
            };
            let snap = match cached {
                Some(snap) => snap,
                None => {
                    fresh = true;
                    self.snapshot_joining(&names).await?
                }
            };
            if let Some((name, detail)) = snap
                .res
                .iter()
                .find_map(|(n, rs)| rs.bad.as_ref().map(|d| (n, d)))
            {
                // Never act on a record that cannot be trusted; the mirror may be behind a
                // repair, so only a fresh read decides.
                if fresh {
                    return Err(self.bad_record(name, detail));
                }
                fresh = true;
                continue;
            }
            let now = self.now();
            let mut engine = self.engine(&snap, &BTreeSet::new(), now);
            let (value, extra) = op(&mut engine, now, &snap)?;
            let out = engine.take_output();
            if !writes(&out) && extra.is_empty() {
                if fresh {
                    return Ok((value, out, snap.revision));
                }
                fresh = true;
                continue;
            }
            let refusal = extra.refusal;
            self.pause_decided_if_asked().await;
            match self.commit_or_read(&snap, &engine, &out, extra).await? {
                // A stale view may have refused for a holder gone since: ask etcd.
                Ok(_) if refusal && !fresh => {}
                Ok(rev) => return Ok((value, out, rev)),
                Err(found) => read = found,
            }
            fresh = true;
            if Instant::now() > deadline {
                return Err(StoreError::Unavailable(Cause::new(
                    "too much contention on these resources; try again",
                )));
            }
        }
    }

    /// The error for acting on `name`, whose record cannot be trusted.
    pub(super) fn bad_record(&self, name: &ResourceName, detail: &str) -> StoreError {
        let key = String::from_utf8_lossy(&self.keys.resource(name)).into_owned();
        warn!(resource = %name, key = %key, detail, "refused to act on a damaged record; repair it with force-release");
        StoreError::BadRecord {
            key,
            resource: name.clone(),
            detail: detail.to_owned(),
        }
    }

    /// Replaces a record that cannot be trusted with an empty one marked dirty (an admin's
    /// force-release). Returns `None` when the record is sound (force-release proceeds as
    /// usual), else the leases it recorded, now ended.
    pub(super) async fn repair(
        &self,
        resource: &ResourceName,
        reason: &str,
        by: &str,
    ) -> Result<Option<Vec<Released>>, StoreError> {
        loop {
            let snap = self.snapshot(&BTreeSet::from([resource.clone()])).await?;
            let Some(rs) = snap.res.get(resource) else {
                return Ok(None);
            };
            let Some(detail) = &rs.bad else {
                return Ok(None);
            };
            if reason.trim().is_empty() {
                return Err(StoreError::Release(leasehold_core::ReleaseError::Invalid(
                    "a force-release needs a reason".into(),
                )));
            }
            let key = self.keys.resource(resource);
            let (kvs, _) = self
                .etcd
                .range(key.clone(), Vec::new(), snap.revision)
                .await
                .map_err(unavailable)?;
            // What can still be read of it (a marker keeps the holders last seen).
            let old: Option<Record> = kvs.first().and_then(|kv| Record::read(&kv.value).ok());
            let holders = old.map(|r| r.state.holders().to_vec()).unwrap_or_default();
            let now = leasehold_core::WallTime(now_ms());
            let how = leasehold_core::EndReason::Forced {
                reason: format!("{reason} (repairing a damaged record: {detail})"),
                by: by.to_owned(),
            };
            let ended: Vec<Ended> = if holders.is_empty() {
                let mut owner = leasehold_core::Owner::new(self.host.clone(), 0, 0);
                owner.label = Some("unknown (the record was damaged)".into());
                vec![Ended {
                    owner,
                    mode: leasehold_core::Mode::Exclusive,
                    token: Token(0),
                    granted_at: leasehold_core::WallTime(0),
                    ended_at: now,
                    how: how.clone(),
                }]
            } else {
                holders
                    .iter()
                    .map(|l| Ended {
                        owner: l.owner.clone(),
                        mode: l.mode,
                        token: l.token,
                        granted_at: l.granted_at,
                        ended_at: now,
                        how: how.clone(),
                    })
                    .collect()
            };
            let released: Vec<Released> = holders
                .iter()
                .zip(&ended)
                .map(|(_, e)| Released {
                    resource: resource.clone(),
                    ended: e.clone(),
                    dirtied: true,
                })
                .collect();
            let rec = Record {
                state: ResourceState::reset(
                    // Tokens stay above every earlier grant: they follow etcd's revision.
                    Token(u64::try_from(snap.revision).unwrap_or(0)),
                    ended.first().cloned(),
                ),
                reserved_for: None,
                events: released
                    .iter()
                    .map(|r| Event::Ended {
                        resource: resource.clone(),
                        ended: r.ended.clone(),
                        dirtied: true,
                    })
                    .collect(),
                damaged: None,
            };
            let hp = self.keys.held_of(resource);
            let t = Txn::new()
                .if_mod_revision(key.clone(), rs.mod_rev)
                .put(key, encode(&rec)?, None)
                .delete_range(hp.clone(), prefix_end(&hp));
            if self.etcd.txn(t).await.map_err(unavailable)?.succeeded {
                warn!(resource = %resource, by, reason, "damaged record reset to an empty record marked dirty");
                return Ok(Some(released));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;

    use leasehold_core::{
        Acquired, HostId, Lease, Mode, Owner, ReleaseKind, ReleaseRequest, WallTime,
    };

    use super::super::snapshot::ResSnap;
    use super::*;

    fn name(n: &str) -> ResourceName {
        ResourceName::new(n).unwrap()
    }

    fn owner(pid: u32) -> Owner {
        Owner::new(HostId::new("host-a").unwrap(), pid, 1)
    }

    /// An engine with one live session.
    fn engine() -> (Engine, SessionId) {
        let mut e = Engine::new(EngineConfig {
            grace: Duration::from_secs(5),
        });
        let s = e
            .open_session(
                HostId::new("host-a").unwrap(),
                Some(Duration::from_secs(10)),
                Now::at(0),
            )
            .unwrap();
        (e, s)
    }

    fn acquire(e: &mut Engine, s: SessionId, who: &Owner, r: &str, wait: bool) -> Acquired {
        let req = AcquireRequest {
            owner: who.clone(),
            session: s,
            items: vec![(name(r), Mode::Exclusive)],
            accept_dirty: false,
            wait,
            expect_tokens: Vec::new(),
        };
        e.acquire(req, Now::at(1)).unwrap()
    }

    fn release(e: &mut Engine, who: &Owner, r: &str) {
        let req = ReleaseRequest {
            resource: name(r),
            process: who.process.clone(),
            owner_id: None,
            token: None,
            kind: ReleaseKind::Clean,
        };
        e.release(req, Now::at(2)).unwrap();
    }

    /// The records as they are in `e` now: what the commit's snapshot read.
    fn snapshot(e: &Engine) -> Snapshot {
        let res = e
            .resources()
            .map(|(n, st)| {
                let record = Record {
                    state: st.clone(),
                    reserved_for: None,
                    events: Vec::new(),
                    damaged: None,
                };
                let rs = ResSnap {
                    record: Some(Arc::new(record)),
                    ..ResSnap::default()
                };
                (n.clone(), rs)
            })
            .collect();
        Snapshot {
            revision: 10,
            res,
            ..Snapshot::default()
        }
    }

    /// Through the engine: a release that grants the waiter behind it is held back while a
    /// keep-alive is late (it grants); a release, or a dead holder's end, with nobody
    /// waiting only ends.
    #[test]
    fn a_release_that_grants_a_waiter_does_not_only_end_one_that_grants_nothing_does() {
        let (mut e, s) = engine();
        let (a, b) = (owner(10), owner(20));
        assert!(matches!(
            acquire(&mut e, s, &a, "r", false),
            Acquired::Granted(_)
        ));
        assert!(matches!(
            acquire(&mut e, s, &a, "q", false),
            Acquired::Granted(_)
        ));
        assert!(matches!(
            acquire(&mut e, s, &b, "r", true),
            Acquired::Queued(_)
        ));
        e.take_output();
        let none = Extra::default();

        let snap = snapshot(&e);
        release(&mut e, &a, "r");
        let out = e.take_output();
        assert!(out.waiters.iter().any(|(_, r)| r.is_ok()), "{out:?}");
        assert!(!only_ends(&snap, &e, &out, &none), "{out:?}");

        // "q": nobody waits.
        let snap = snapshot(&e);
        release(&mut e, &a, "q");
        let out = e.take_output();
        assert!(only_ends(&snap, &e, &out, &none), "{out:?}");

        // The waiter, now holding "r", dies: its lease ends (dirty), granting nothing.
        let snap = snapshot(&e);
        assert_eq!(e.end_process(&b.process, Now::at(3)).len(), 1);
        let out = e.take_output();
        assert!(only_ends(&snap, &e, &out, &none), "{out:?}");

        // An acquire of a free resource grants.
        let snap = snapshot(&e);
        acquire(&mut e, s, &a, "p", false);
        let out = e.take_output();
        assert!(!only_ends(&snap, &e, &out, &none), "{out:?}");
    }

    /// Each condition alone: starting from a commit that only ends a lease, each thing that
    /// grants (or refuses, or puts a key) makes it one that does not.
    #[test]
    fn every_grant_or_refusal_or_put_makes_a_commit_more_than_ends() {
        let (mut e, s) = engine();
        let a = owner(10);
        acquire(&mut e, s, &a, "r", false);
        acquire(&mut e, s, &a, "held", false);
        e.take_output();
        let snap = snapshot(&e);
        release(&mut e, &a, "r");
        let ends = e.take_output();
        let none = Extra::default();
        assert!(only_ends(&snap, &e, &ends, &none), "{ends:?}");

        // Extras: a key put, or a refusal, does more; deletes (waiter keys withdrawn) do not.
        let put = Extra {
            put: vec![(b"k".to_vec(), b"v".to_vec(), None)],
            ..Extra::default()
        };
        assert!(!only_ends(&snap, &e, &ends, &put));
        let refusal = Extra {
            refusal: true,
            ..Extra::default()
        };
        assert!(!only_ends(&snap, &e, &ends, &refusal));
        let delete = Extra {
            delete: vec![(b"w".to_vec(), 3)],
            compare_read: true,
            ..Extra::default()
        };
        assert!(only_ends(&snap, &e, &ends, &delete));

        // Waiters: one answered with a grant does more; one answered with an error does not.
        let with_waiter = |r: Result<Vec<leasehold_core::Grant>, AcquireError>| Output {
            waiters: vec![(WaiterId(7), r)],
            ..ends.clone()
        };
        assert!(!only_ends(&snap, &e, &with_waiter(Ok(Vec::new())), &none));
        let withdrawn = AcquireError::Invalid("withdrawn".into());
        assert!(only_ends(&snap, &e, &with_waiter(Err(withdrawn)), &none));

        // Events: a grant or a cleaning does more; an ending or an expiry does not.
        let lease = e.resource(&name("held")).unwrap().holders()[0].clone();
        let with_event = |ev: Event| {
            let mut out = ends.clone();
            out.events.push(ev);
            out
        };
        let granted = Event::Granted {
            resource: name("held"),
            lease: lease.clone(),
        };
        assert!(!only_ends(&snap, &e, &with_event(granted), &none));
        let cleaned = Event::Cleaned {
            resource: name("r"),
            by: "someone".into(),
            at: WallTime(2),
        };
        assert!(!only_ends(&snap, &e, &with_event(cleaned), &none));
        let expired = Event::SessionExpired {
            session: SessionId(99),
            host: HostId::new("host-b").unwrap(),
        };
        assert!(only_ends(&snap, &e, &with_event(expired), &none));

        // Records written: one whose holders were all there before (same owner, same
        // token) does not grant; a holder that was not there, or came back with a new
        // token, does; a record the engine no longer has ends everything it had.
        let with_changed = |r: &str| {
            let mut out = ends.clone();
            out.changed.insert(name(r));
            out
        };
        assert!(only_ends(&snap, &e, &with_changed("held"), &none));
        assert!(only_ends(&snap, &e, &with_changed("unknown"), &none));
        let mut before = snap.clone();
        before.res.remove(&name("held"));
        assert!(!only_ends(&before, &e, &with_changed("held"), &none));
        let retokened = Lease {
            token: Token(lease.token.0 + 1),
            ..lease.clone()
        };
        let mut before = snap.clone();
        let rec = Record {
            state: ResourceState::from_parts(vec![retokened], lease.token, None, None, None),
            reserved_for: None,
            events: Vec::new(),
            damaged: None,
        };
        before.res.get_mut(&name("held")).unwrap().record = Some(Arc::new(rec));
        assert!(!only_ends(&before, &e, &with_changed("held"), &none));
        let other_owner = Lease {
            owner: owner(11),
            ..lease.clone()
        };
        let rec = Record {
            state: ResourceState::from_parts(vec![other_owner], lease.token, None, None, None),
            reserved_for: None,
            events: Vec::new(),
            damaged: None,
        };
        before.res.get_mut(&name("held")).unwrap().record = Some(Arc::new(rec));
        assert!(!only_ends(&before, &e, &with_changed("held"), &none));
    }
}
