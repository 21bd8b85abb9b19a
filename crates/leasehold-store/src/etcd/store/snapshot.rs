//! Snapshots: the resources concerned, their waiters, grace and held keys, and the live host
//! sessions, as read at one revision (or from the mirror); and what they show to `inspect`.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use leasehold_core::{Engine, HostId, Now, ResourceName, ResourceView};

use super::{Inner, MAX_TXN_OPS, unavailable};
use crate::StoreError;
use crate::etcd::client::{LeaseId, Txn, prefix_end, range_of};
use crate::etcd::keys::{KeyKind, Keys, Record, WaiterValue};
use crate::etcd::pb::mvccpb::KeyValue;
use crate::sync::{lock, read};

/// What a resource looked like in a snapshot.
#[derive(Debug, Clone, Default)]
pub(super) struct ResSnap {
    pub(super) record: Option<Record>,
    /// Why the stored record cannot be trusted (then `record` is `None`): the resource is
    /// refused to everyone.
    pub(super) bad: Option<String>,
    pub(super) mod_rev: i64,
    pub(super) waiters: Vec<WaiterSnap>,
    pub(super) grace: bool,
    /// The sessions whose `held` keys say they hold it: etcd lease id to the host named.
    pub(super) held: BTreeMap<LeaseId, String>,
}

impl ResSnap {
    /// A record missing, or missing a holder, while a session's `held` key says it holds
    /// the resource was changed outside leasehold (every commit writes both together): the
    /// resource is refused, not taken for free.
    pub(super) fn judge_held(&mut self) {
        if self.bad.is_some() || self.held.is_empty() {
            return;
        }
        let holding = holding_sessions(self.record.as_ref());
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

/// A stored record, or why it cannot be trusted.
fn record_of(kv: &KeyValue) -> (Option<Record>, Option<String>) {
    match Record::decode(&kv.value) {
        Ok(r) => (Some(r), None),
        Err(d) => (None, Some(d)),
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
    pub(super) fn build<'a>(
        keys: &Keys,
        revision: i64,
        names: Option<&BTreeSet<ResourceName>>,
        kvs: impl IntoIterator<Item = &'a KeyValue>,
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
                        (rs.record, rs.bad) = record_of(kv);
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
        }
        snap
    }
}

impl Inner {
    /// A snapshot of `names` from the mirror: no round trip, possibly stale.
    pub(super) fn cached_snapshot(&self, names: &BTreeSet<ResourceName>) -> Snapshot {
        let m = read(&self.mirror, "mirror");
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
        Snapshot::build(k, m.revision, Some(names), kvs)
    }

    /// Reads the resources `names` (with their waiters and grace keys) and the live sessions
    /// at one revision: the hosts and the first resources in one transaction, the rest as
    /// of that transaction's revision. A holder is judged dead only when its session's key
    /// was gone at the very revision its record was read.
    pub(super) async fn snapshot(
        &self,
        names_set: &BTreeSet<ResourceName>,
    ) -> Result<Snapshot, StoreError> {
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
            let res = self.etcd.txn(t).await.map_err(unavailable)?;
            if n == 0 {
                revision = res.revision;
                self.pause_if_asked().await;
            }
            read.push(res);
        }
        let kvs = read
            .iter()
            .flat_map(|res| (0..res.responses.len()).flat_map(move |i| range_of(res, i)));
        Ok(Snapshot::build(&self.keys, revision, Some(names_set), kvs))
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
