//! Snapshots: the resources concerned, their waiters, grace and held keys, and the live host
//! sessions, as read at one revision (or from the mirror); and what they show to `inspect`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use leasehold_core::{Engine, HostId, Now, ResourceName, ResourceView};

use super::{Inner, MAX_TXN_OPS, unavailable};
use crate::StoreError;
use crate::etcd::client::{LeaseId, Txn, prefix_end, range_of};
use crate::etcd::keys::{KeyKind, Keys, Record, WaiterValue};
use crate::etcd::pb::mvccpb::KeyValue;
use crate::sync::{lock, read};

/// How recently the agent must have learned etcd's revision to guess that a resource outside
/// its view has no keys (see [`Inner::guessed_snapshot`]).
const GUESS_FRESH: std::time::Duration = std::time::Duration::from_secs(1);

/// What a resource looked like in a snapshot.
#[derive(Debug, Clone, Default)]
pub(super) struct ResSnap {
    pub(super) record: Option<Arc<Record>>,
    /// Why the stored record cannot be trusted (then `record` is `None`): the resource is
    /// refused to everyone.
    pub(super) bad: Option<String>,
    pub(super) mod_rev: i64,
    pub(super) waiters: Vec<WaiterSnap>,
    pub(super) grace: bool,
    /// The sessions whose `held` keys say they hold it: etcd lease id to the host named.
    pub(super) held: BTreeMap<LeaseId, String>,
    /// The revisions up to which its waiter keys, and its grace key, are known: the
    /// snapshot's for a read at one revision; each watcher's own for a snapshot from the view.
    /// The commit compares that none was created after them.
    pub(super) waiters_rev: i64,
    pub(super) grace_rev: i64,
    /// Nothing of it was read: outside the view, it is guessed to have no keys at all, and the
    /// commit compares exactly that (its record range, waiter keys and grace key all absent).
    pub(super) guessed: bool,
}

impl ResSnap {
    /// A record missing, or missing a holder, while a session's `held` key says it holds
    /// the resource was changed outside leasehold (every commit writes both together): the
    /// resource is refused, not taken for free.
    pub(super) fn judge_held(&mut self) {
        if self.bad.is_some() || self.held.is_empty() {
            return;
        }
        let holding = holding_sessions(self.record.as_deref());
        let missing: Vec<String> = self
            .held
            .iter()
            .filter(|(lease, _)| !holding.contains(lease))
            .map(|(lease, host)| format!("session {lease} of host {host}"))
            .collect();
        if missing.is_empty() {
            return;
        }
        self.bad = Some(if self.record.is_none() {
            format!(
                "it is missing while {} holds it (changed outside leasehold)",
                missing.join(", ")
            )
        } else {
            format!(
                "it lost the lease of {} without an ending (changed outside leasehold)",
                missing.join(", ")
            )
        });
        self.record = None;
    }
}

/// The sessions (etcd lease ids) with a holder in `record`.
pub(super) fn holding_sessions(record: Option<&Record>) -> BTreeSet<LeaseId> {
    record
        .iter()
        .flat_map(|r| {
            r.state
                .holders()
                .iter()
                .map(|l| LeaseId::of_session(l.session))
        })
        .collect()
}

#[derive(Debug, Clone)]
pub(super) struct WaiterSnap {
    pub(super) id: u64,
    pub(super) value: WaiterValue,
}

/// A consistent read of some resources and of the live sessions.
#[derive(Debug, Clone, Default)]
pub(super) struct Snapshot {
    pub(super) revision: i64,
    /// Live sessions: lease id to host.
    pub(super) sessions: HashMap<LeaseId, HostId>,
    pub(super) res: BTreeMap<ResourceName, ResSnap>,
}

/// A stored record, or why it cannot be trusted: from `decoded` when given.
fn record_of(kv: &KeyValue, decoded: Option<&Decoded>) -> (Option<Arc<Record>>, Option<String>) {
    let r = match decoded {
        Some(d) => d.record(&kv.key, &kv.value),
        None => Record::decode(&kv.value).map(Arc::new),
    };
    match r {
        Ok(r) => (Some(r), None),
        Err(d) => (None, Some(d)),
    }
}

/// How many record keys [`Decoded`] keeps before it starts again.
const DECODED_KEYS: usize = 256;

/// Records as last decoded, for the next decode of the same bytes: each version of a record
/// reaches the agent by its watch (its events published, this host's holders checked against
/// the version before) and is read again by every snapshot from the view until it changes,
/// and each of those decoded it anew (docs/performance.md, "Acquire on etcd"). Kept per key:
/// its last two versions (a watch event compares the new with the one before), each with
/// its bytes, and answered only for the very same bytes, so a hit is exactly what decoding
/// them gives. At most [`DECODED_KEYS`] keys; past that it is emptied and fills again.
/// Recovered lock (see [`crate::sync`]): each change is one entry's replacement, or the
/// whole emptied.
#[derive(Debug, Default)]
pub(super) struct Decoded(Mutex<HashMap<Vec<u8>, [Option<Version>; 2]>>);

/// One version of a record: its bytes and what they decode to.
type Version = (Vec<u8>, Result<Arc<Record>, String>);

impl Decoded {
    /// [`Record::decode`] of `value`, the value of record key `key`.
    pub(super) fn record(&self, key: &[u8], value: &[u8]) -> Result<Arc<Record>, String> {
        if let Some(versions) = lock(&self.0, "decoded").get(key) {
            for (bytes, r) in versions.iter().flatten() {
                if bytes.as_slice() == value {
                    return r.clone();
                }
            }
        }
        // Decoded outside the lock.
        let r = Record::decode(value).map(Arc::new);
        let mut m = lock(&self.0, "decoded");
        if m.len() >= DECODED_KEYS && !m.contains_key(key) {
            m.clear();
        }
        let versions = m.entry(key.to_vec()).or_default();
        versions[1] = versions[0].take();
        versions[0] = Some((value.to_vec(), r.clone()));
        r
    }
}

/// The entry of resource `r` in `res`: with `only_named`, only one made beforehand (a
/// resource asked about); else one made if need be.
fn slot(
    res: &mut BTreeMap<ResourceName, ResSnap>,
    r: ResourceName,
    only_named: bool,
) -> Option<&mut ResSnap> {
    if only_named {
        res.get_mut(&r)
    } else {
        Some(res.entry(r).or_default())
    }
}

impl Snapshot {
    /// The one way a snapshot is made, from keys read at `revision` (by a fresh read, from the
    /// mirror, or by a read of everything): host keys give the live sessions; records, held,
    /// waiter and grace keys give the resources. With `names`, only those resources are kept,
    /// each with an entry even when nothing of it was read; without, every resource read.
    /// Records are taken from `decoded` where given (see [`Decoded`]).
    pub(super) fn build<'a>(
        keys: &Keys,
        revision: i64,
        names: Option<&BTreeSet<ResourceName>>,
        kvs: impl IntoIterator<Item = &'a KeyValue>,
        decoded: Option<&Decoded>,
    ) -> Snapshot {
        let mut snap = Snapshot {
            revision,
            ..Snapshot::default()
        };
        for name in names.into_iter().flatten() {
            snap.res.insert(name.clone(), ResSnap::default());
        }
        let named = names.is_some();
        for kv in kvs {
            match keys.parse(&kv.key) {
                Some(KeyKind::Host(h)) => {
                    snap.sessions.insert(LeaseId(kv.lease), h);
                }
                Some(KeyKind::Resource(r)) => {
                    if let Some(rs) = slot(&mut snap.res, r, named) {
                        (rs.record, rs.bad) = record_of(kv, decoded);
                        rs.mod_rev = kv.mod_revision;
                    }
                }
                Some(KeyKind::Held(r, lease)) => {
                    if let Some(rs) = slot(&mut snap.res, r, named) {
                        let host = String::from_utf8_lossy(&kv.value).into_owned();
                        rs.held.insert(lease, host);
                    }
                }
                Some(KeyKind::Waiter(r)) => {
                    // A waiter key that does not decode stands in no queue.
                    if let Ok(value) = serde_json::from_slice::<WaiterValue>(&kv.value)
                        && let Some(rs) = slot(&mut snap.res, r, named)
                    {
                        rs.waiters.push(WaiterSnap {
                            id: kv.create_revision as u64,
                            value,
                        });
                    }
                }
                Some(KeyKind::Grace(r)) => {
                    if let Some(rs) = slot(&mut snap.res, r, named) {
                        rs.grace = true;
                    }
                }
                None => {}
            }
        }
        for rs in snap.res.values_mut() {
            rs.judge_held();
            rs.waiters_rev = revision;
            rs.grace_rev = revision;
        }
        snap
    }
}

impl Inner {
    /// A snapshot of `names` from the view: no round trip, possibly stale; `None` when one of
    /// them is not in the view. Its revision is the highest this agent has seen (tokens'
    /// floor); each resource's waiter and grace keys are known up to their watchers' revisions.
    pub(super) fn cached_snapshot(&self, names: &BTreeSet<ResourceName>) -> Option<Snapshot> {
        self.view_snapshot(names, false)
    }

    /// As [`Inner::cached_snapshot`], with each resource outside the view guessed to have no
    /// keys at all (never used, or forgotten), where the agent knows etcd's revision from
    /// moments ago (tokens' floor: above every token of a record forgotten since, for one is
    /// forgotten only long after its last write). `None` when no guess can be made.
    pub(super) fn guessed_snapshot(&self, names: &BTreeSet<ResourceName>) -> Option<Snapshot> {
        self.view_snapshot(names, true)
    }

    fn view_snapshot(&self, names: &BTreeSet<ResourceName>, guess: bool) -> Option<Snapshot> {
        let m = read(&self.mirror, "mirror");
        let fresh_enough = {
            let limit = self
                .opts
                .history
                .forget_after
                .map_or(GUESS_FRESH, |f| (f / 2).min(GUESS_FRESH));
            m.revision_age().is_some_and(|age| age < limit)
        };
        let guessed: BTreeSet<&ResourceName> = names.iter().filter(|n| !m.has_one(n)).collect();
        // Every name in the view, or those outside it guessed.
        let answerable = guessed.is_empty() || (guess && fresh_enough);
        if !m.has(&BTreeSet::new()) || !answerable {
            return None;
        }
        let k = &self.keys;
        let hosts = k.hosts();
        let mut kvs: Vec<&KeyValue> = m
            .kvs
            .range(hosts.clone()..prefix_end(&hosts))
            .map(|(_, kv)| kv)
            .collect();
        for r in names {
            let wp = k.waiters(r);
            kvs.extend(
                m.kvs
                    .range(k.resource(r)..k.resource_end(r))
                    .map(|(_, kv)| kv),
            );
            kvs.extend(m.kvs.range(wp.clone()..prefix_end(&wp)).map(|(_, kv)| kv));
            kvs.extend(m.kvs.get(&k.grace(r)));
        }
        let mut snap = Snapshot::build(k, m.revision, Some(names), kvs, Some(&self.decoded));
        for (name, rs) in &mut snap.res {
            if guessed.contains(name) {
                (rs.waiters_rev, rs.grace_rev, rs.guessed) = (0, 0, true);
            } else {
                (rs.waiters_rev, rs.grace_rev) = m.known(name)?;
            }
        }
        Some(snap)
    }

    /// A snapshot of `names` read at one revision, the names put in the view from it (so
    /// the next decision on them needs no read).
    pub(super) async fn snapshot_joining(
        &self,
        names: &BTreeSet<ResourceName>,
    ) -> Result<Snapshot, StoreError> {
        self.read_snapshot(names, true).await
    }

    /// Reads the resources `names` (with their waiters and grace keys) and the live sessions
    /// at one revision: the hosts and the first resources in one transaction, the rest as
    /// of that transaction's revision. A holder is judged dead only when its session's key
    /// was gone at the very revision its record was read.
    pub(super) async fn snapshot(
        &self,
        names: &BTreeSet<ResourceName>,
    ) -> Result<Snapshot, StoreError> {
        self.read_snapshot(names, false).await
    }

    /// [`snapshot`](Self::snapshot), the names put in the view from it when `join`.
    async fn read_snapshot(
        &self,
        names: &BTreeSet<ResourceName>,
        join: bool,
    ) -> Result<Snapshot, StoreError> {
        let (revision, kvs) = self.read_fresh(names, &self.etcd).await?;
        if join {
            self.join_view(names, revision, &kvs);
        }
        Ok(Snapshot::build(
            &self.keys,
            revision,
            Some(names),
            &kvs,
            Some(&self.decoded),
        ))
    }

    /// The keys [`Inner::snapshot`] reads, and the revision they were read at, read through
    /// `etcd` (the store's client, or its [upkeep](crate::etcd::client::Etcd::upkeep) clone).
    pub(super) async fn read_fresh(
        &self,
        names_set: &BTreeSet<ResourceName>,
        etcd: &crate::etcd::client::Etcd,
    ) -> Result<(i64, Vec<KeyValue>), StoreError> {
        self.running()?;
        let hosts = self.keys.hosts();
        let names: Vec<&ResourceName> = names_set.iter().collect();
        let mut chunks: Vec<&[&ResourceName]> = names.chunks((MAX_TXN_OPS - 1) / 3).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        let mut revision = 0;
        let mut read = Vec::with_capacity(chunks.len());
        for (n, chunk) in chunks.into_iter().enumerate() {
            let mut t = Txn::new();
            if n == 0 {
                t = t.get(hosts.clone(), prefix_end(&hosts));
            }
            for r in chunk {
                let wp = self.keys.waiters(r);
                t = t
                    .get_at(self.keys.resource(r), self.keys.resource_end(r), revision)
                    .get_at(wp.clone(), prefix_end(&wp), revision)
                    .get_at(self.keys.grace(r), Vec::new(), revision);
            }
            let res = etcd.txn(t).await.map_err(unavailable)?;
            if n == 0 {
                revision = res.revision;
                self.pause_if_asked().await;
            }
            read.push(res);
        }
        let kvs = read
            .iter()
            .flat_map(|res| (0..res.responses.len()).flat_map(move |i| range_of(res, i)))
            .cloned()
            .collect();
        Ok((revision, kvs))
    }

    /// Stops here if a test asked for it (see [`EtcdStore::pause_next_commit`]).
    pub(super) async fn pause_commit_if_asked(&self) {
        let pause = lock(&self.pause_commit, "pause_commit").take();
        if let Some((reached, resume)) = pause {
            let _ = reached.send(());
            let _ = resume.await;
        }
    }

    /// Stops here if a test asked for it (see [`EtcdStore::pause_next_decided`]).
    pub(super) async fn pause_decided_if_asked(&self) {
        let pause = lock(&self.pause_decided, "pause_decided").take();
        if let Some((reached, resume)) = pause {
            let _ = reached.send(());
            let _ = resume.await;
        }
    }

    /// Stops here if a test asked for it (see [`EtcdStore::pause_next_published`]).
    pub(super) async fn pause_published_if_asked(&self) {
        let pause = lock(&self.pause_published, "pause_published").take();
        if let Some((reached, resume)) = pause {
            let _ = reached.send(());
            let _ = resume.await;
        }
    }

    /// Stops here if a test asked for it (see [`EtcdStore::pause_next_snapshot`]).
    pub(super) async fn pause_if_asked(&self) {
        let pause = lock(&self.pause_snapshot, "pause_snapshot").take();
        if let Some((reached, resume)) = pause {
            let _ = reached.send(());
            let _ = resume.await;
        }
    }

    /// What `inspect` and `list` show of `name`: the engine's view over the snapshot (the
    /// leases of a dead session already ended, as the next operation ends them), with why the
    /// record cannot be trusted when it cannot.
    pub(super) fn view(
        &self,
        engine: &Engine,
        name: &ResourceName,
        rs: &ResSnap,
        now: Now,
    ) -> Option<ResourceView> {
        let damaged = rs.bad.as_ref().map(|d| {
            format!(
                "record at key {}: {d}; find out who uses it, then `leasehold force-release {name} --reason TEXT` resets it to an empty record marked dirty",
                String::from_utf8_lossy(&self.keys.resource(name))
            )
        });
        let mut view = match engine.view(name, now) {
            Some(v) => v,
            None if damaged.is_some() => ResourceView::empty(name.clone()),
            None => return None,
        };
        view.damaged = damaged;
        Some(view)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use leasehold_core::{ResourceState, Token};

    fn record(token: u64) -> Vec<u8> {
        Record {
            state: ResourceState::from_parts(Vec::new(), Token(token), None, None, None),
            reserved_for: None,
            events: Vec::new(),
            damaged: None,
        }
        .encode()
        .unwrap()
    }

    /// What it answers is what decoding the same bytes gives; the last two versions of a key
    /// are answered without decoding again, and bytes it has not seen are decoded.
    #[test]
    fn decoded_records_are_what_their_bytes_decode_to() {
        let d = Decoded::default();
        let (v1, v2, v3) = (record(1), record(2), record(3));
        let first = d.record(b"k", &v1).unwrap();
        assert_eq!(Ok(&*first), Record::decode(&v1).as_ref());
        let second = d.record(b"k", &v2).unwrap();
        assert_eq!(second.state.last_token(), Token(2));
        // Both versions kept: the same decoded record again.
        assert!(Arc::ptr_eq(&first, &d.record(b"k", &v1).unwrap()));
        assert!(Arc::ptr_eq(&second, &d.record(b"k", &v2).unwrap()));
        // A third pushes the oldest out, which is then decoded again, still the same record.
        assert_eq!(d.record(b"k", &v3).unwrap().state.last_token(), Token(3));
        let again = d.record(b"k", &v1).unwrap();
        assert!(!Arc::ptr_eq(&first, &again));
        assert_eq!(*first, *again);
        // Another key's bytes are its own, and bytes that do not decode say why, each time.
        assert_eq!(d.record(b"j", &v1).unwrap().state.last_token(), Token(1));
        assert_eq!(
            d.record(b"k", b"junk"),
            Record::decode(b"junk").map(Arc::new)
        );
        assert_eq!(
            d.record(b"k", b"junk"),
            Record::decode(b"junk").map(Arc::new)
        );
        // Past its bound it empties and fills again, answering the same.
        for i in 0..DECODED_KEYS + 5 {
            let v = record(i as u64);
            let key = format!("k{i}");
            assert_eq!(
                d.record(key.as_bytes(), &v).unwrap().state.last_token(),
                Token(i as u64)
            );
        }
        assert!(lock(&d.0, "decoded").len() <= DECODED_KEYS);
        assert_eq!(d.record(b"k", &v2).unwrap().state.last_token(), Token(2));
    }
}
