//! The watch-fed mirror of this agent's **view**: the live sessions (`P hosts/`) and the keys
//! of the resources this host holds, waits for, or used lately, each resource watched by three
//! watchers (record and held keys, waiter keys, grace key) on one watch stream. It publishes the
//! events recorded in those records, notices this host's session ending, and repairs what was
//! changed outside leasehold. Resources outside the view are guessed to have no keys (the
//! commit compares that) or read fresh, and join it (`snapshot.rs`, `commit.rs`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use leasehold_core::{Ended, Event, ProcessKey, ResourceName};
use tokio::sync::broadcast;
use tracing::{debug, warn};

use super::{Inner, json, now_ms, unavailable};
use crate::StoreError;
use crate::etcd::client::{EtcdCode, LeaseId, Txn, WatchSender, WatchSpec, prefix_end, range_of};
use crate::etcd::keys::{HostValue, KeyKind, Keys, Record};
use crate::etcd::pb::mvccpb::KeyValue;
use crate::sync::{lock, read, write};

/// How many resources used lately stay in the view once nothing here holds or waits for them.
pub(super) const RECENT: usize = 256;

/// A resource used this recently stays in the view whatever else: an operation on it may be
/// about to make it held here (a commit touches its resources just before it is sent, and
/// etcd answers or times out well within this).
const IN_USE: Duration = Duration::from_secs(10);

/// How often resources that left the recent list and are neither held nor waited for leave
/// the view.
const SWEEP_EVERY: Duration = Duration::from_secs(2);

/// One watcher on the stream.
#[derive(Debug, Clone)]
struct Watcher {
    /// Its resource; `None` for `P hosts/`.
    of: Option<ResourceName>,
    /// Which of the resource's ranges (see [`ranges_of`]).
    part: u8,
    /// Its keys in the mirror are complete up to this revision: the read it started from,
    /// or its last event's (etcd delivers one watcher's events in revision order).
    rev: i64,
    /// Until its keys are read again after etcd created it: whether etcd has, and the events
    /// it delivered meanwhile (applied after the read, those newer than it).
    pending: Option<(bool, Vec<crate::etcd::pb::mvccpb::Event>)>,
    /// The revision of that read: events up to it, still on their way, are in it already.
    floor: i64,
}

impl Watcher {
    /// Its range: `[key, end)`, or the one key where `end` is empty.
    fn range(&self, keys: &Keys) -> (Vec<u8>, Vec<u8>) {
        match &self.of {
            None => {
                let hosts = keys.hosts();
                let end = prefix_end(&hosts);
                (hosts, end)
            }
            Some(r) => {
                let [a, b, c] = ranges_of(keys, r);
                match self.part {
                    0 => a,
                    1 => b,
                    _ => c,
                }
            }
        }
    }

    /// Every watcher starts from etcd's current revision (a watcher starting in the past
    /// is caught up by etcd under the lock its writes take: thousands of them stalled a
    /// 3-member etcd past the agents' session renewals); what happened between the keys the
    /// mirror has and the watcher's start is read once etcd has created it.
    fn spec(&self, keys: &Keys, id: i64) -> WatchSpec {
        let (key, range_end) = self.range(keys);
        WatchSpec {
            id,
            key,
            range_end,
            start_revision: 0,
            prev_kv: self.of.is_none(),
        }
    }
}

/// Whether `key` is in `[from, end)` (or is `from`, where `end` is empty).
fn covers(from: &[u8], end: &[u8], key: &[u8]) -> bool {
    if end.is_empty() {
        key == from
    } else {
        key >= from && key < end
    }
}

/// The three ranges watched for one resource: its record and held keys, its waiter keys, its
/// grace key (an empty end: that one key).
pub(super) fn ranges_of(keys: &Keys, r: &ResourceName) -> [(Vec<u8>, Vec<u8>); 3] {
    let wp = keys.waiters(r);
    [
        (keys.resource(r), keys.resource_end(r)),
        (wp.clone(), prefix_end(&wp)),
        (keys.grace(r), Vec::new()),
    ]
}

/// The view's keys, as its watchers last delivered them. Writes decide from it and commit with
/// compares, so a stale mirror costs a retry, never a wrong grant; outcomes that write nothing
/// are decided again on a fresh read, and so are resources outside the view.
#[derive(Debug, Default)]
pub(super) struct Mirror {
    keys: Keys,
    /// The highest revision this agent has seen (tokens' floor: at least every revision a
    /// resource in the view is known to).
    pub(super) revision: i64,
    /// When etcd's revision was last learned.
    revision_at: Option<std::time::Instant>,
    /// The keys of `P hosts/` and of the resources in the view.
    pub(super) kvs: BTreeMap<Vec<u8>, KeyValue>,
    /// Keys this agent's own commits deleted, at which revision, until the watch brings the
    /// deletion (older events of those keys are not applied).
    tombstones: BTreeMap<Vec<u8>, i64>,
    /// Resources in the view: the ids of their watchers (record range, waiters, grace).
    view: HashMap<ResourceName, [i64; 3]>,
    watchers: HashMap<i64, Watcher>,
    /// The id of the watcher of `P hosts/` (0 until open has read them).
    hosts_id: i64,
    /// The last id given (ids are never given twice on a stream: etcd refuses a reused one).
    next_id: i64,
    /// Resources used lately, with when.
    recent: HashMap<ResourceName, std::time::Instant>,
    /// The stream's sender, while one is open.
    tx: Option<WatchSender>,
    /// Records this agent's commits wrote, at which revision: their events were published at
    /// the commit, and are not again when the watch brings them.
    own_published: BTreeSet<(Vec<u8>, i64)>,
}

impl Mirror {
    /// The keys in `[key, end)` (or the one key when `end` is empty).
    fn range<'a>(&'a self, key: &[u8], end: &[u8]) -> impl Iterator<Item = &'a KeyValue> {
        let end = if end.is_empty() {
            let mut e = key.to_vec();
            e.push(0);
            e
        } else {
            end.to_vec()
        };
        self.kvs.range(key.to_vec()..end).map(|(_, kv)| kv)
    }

    fn remove_range(&mut self, key: &[u8], end: &[u8]) {
        let gone: Vec<Vec<u8>> = self.range(key, end).map(|kv| kv.key.clone()).collect();
        for k in gone {
            self.kvs.remove(&k);
        }
        self.forget_own(key, end, i64::MAX);
    }

    /// Forgets this agent's own deletions and published records in `[key, end)` (the one key
    /// where `end` is empty) up to `revision`: in a range, not by scanning them all (this runs
    /// for every resource that joins the view).
    fn forget_own(&mut self, key: &[u8], end: &[u8], revision: i64) {
        let end = if end.is_empty() {
            let mut e = key.to_vec();
            e.push(0);
            e
        } else {
            end.to_vec()
        };
        let gone: Vec<Vec<u8>> = self
            .tombstones
            .range(key.to_vec()..end.clone())
            .filter(|(_, rev)| **rev <= revision)
            .map(|(k, _)| k.clone())
            .collect();
        for k in gone {
            self.tombstones.remove(&k);
        }
        let gone: Vec<(Vec<u8>, i64)> = self
            .own_published
            .range((key.to_vec(), i64::MIN)..(end, i64::MIN))
            .filter(|(_, rev)| *rev <= revision)
            .cloned()
            .collect();
        for k in gone {
            self.own_published.remove(&k);
        }
    }

    fn add_watcher(&mut self, mut w: Watcher) -> i64 {
        w.pending = Some((false, Vec::new()));
        self.next_id += 1;
        let id = self.next_id;
        if let Some(tx) = &self.tx {
            tx.create(&w.spec(&self.keys, id));
        }
        self.watchers.insert(id, w);
        id
    }

    fn drop_watcher(&mut self, id: i64) {
        self.watchers.remove(&id);
        if let Some(tx) = &self.tx {
            tx.cancel(id);
        }
    }

    /// The ids of `unit`'s watchers (none when it is not watched).
    fn ids_of(&self, unit: &Unit) -> Vec<i64> {
        match unit {
            None => vec![self.hosts_id],
            Some(r) => self.view.get(r).map(|ids| ids.to_vec()).unwrap_or_default(),
        }
    }

    /// etcd created watcher `id`: its unit, when all of that unit's watchers are now created
    /// and wait for their read.
    fn created(&mut self, id: i64) -> Option<Unit> {
        let w = self.watchers.get_mut(&id)?;
        match &mut w.pending {
            Some((created, _)) if !*created => *created = true,
            _ => return None,
        }
        let unit = w.of.clone();
        let all = self.ids_of(&unit).iter().all(|i| {
            self.watchers
                .get(i)
                .is_some_and(|w| matches!(w.pending, Some((true, _))))
        });
        all.then_some(unit)
    }

    /// Watches `unit` again, under new ids (read again once created).
    fn recreate(&mut self, unit: &Unit) {
        let old = self.ids_of(unit);
        let kept: Vec<Watcher> = old
            .iter()
            .filter_map(|i| self.watchers.get(i).cloned())
            .collect();
        for id in old {
            self.drop_watcher(id);
        }
        match unit {
            None => {
                if let Some(w) = kept.into_iter().next() {
                    self.hosts_id = self.add_watcher(w);
                }
            }
            Some(r) => {
                let mut ids = [0; 3];
                for (id, w) in ids.iter_mut().zip(kept) {
                    *id = self.add_watcher(w);
                }
                self.view.insert(r.clone(), ids);
            }
        }
    }

    /// A commit of this agent at `revision` wrote record `key`, whose events it published.
    pub(super) fn published(&mut self, key: Vec<u8>, revision: i64) {
        self.own_published.insert((key, revision));
    }

    /// Whether the watch has already delivered `name`'s record range up to `revision` (and
    /// published the events of its record there): its watcher's keys are known up to it.
    pub(super) fn delivered(&self, name: &ResourceName, revision: i64) -> bool {
        self.view
            .get(name)
            .and_then(|ids| self.watchers.get(&ids[0]))
            .is_some_and(|w| w.pending.is_none() && w.rev >= revision)
    }

    /// Whether `name` is in the view.
    pub(super) fn has_one(&self, name: &ResourceName) -> bool {
        self.view.contains_key(name)
    }

    /// How long ago the agent learned etcd's current revision (at least [`Mirror::revision`]).
    pub(super) fn revision_age(&self) -> Option<Duration> {
        self.revision_at.map(|t| t.elapsed())
    }

    /// etcd's revision was `revision` a moment ago (an answer or a watch message said so).
    pub(super) fn learned(&mut self, revision: i64) {
        self.revision = self.revision.max(revision);
        self.revision_at = Some(std::time::Instant::now());
    }

    /// Whether every name is in the view.
    pub(super) fn has(&self, names: &BTreeSet<ResourceName>) -> bool {
        self.watchers.contains_key(&self.hosts_id)
            && names.iter().all(|n| self.view.contains_key(n))
    }

    /// The revisions up to which `name`'s waiter and grace keys are known.
    pub(super) fn known(&self, name: &ResourceName) -> Option<(i64, i64)> {
        let ids = self.view.get(name)?;
        let rev = |i: usize| self.watchers.get(&ids[i]).map_or(0, |w| w.rev);
        Some((rev(1), rev(2)))
    }

    /// Puts `name` in the view (unless it is there) with its keys as read at `revision`, its
    /// watchers starting after it.
    fn join(&mut self, keys: &Keys, name: &ResourceName, revision: i64, read: &[KeyValue]) {
        if self.view.contains_key(name) {
            return;
        }
        let mut ids = [0; 3];
        for (i, (key, end)) in ranges_of(keys, name).into_iter().enumerate() {
            self.remove_range(&key, &end);
            for kv in read.iter().filter(|kv| covers(&key, &end, &kv.key)) {
                self.kvs.insert(kv.key.clone(), kv.clone());
            }
            ids[i] = self.add_watcher(Watcher {
                of: Some(name.clone()),
                part: i as u8,
                rev: revision,
                pending: None,
                floor: 0,
            });
        }
        self.view.insert(name.clone(), ids);
        self.revision = self.revision.max(revision);
    }

    /// Puts `name`, guessed to have had no keys, in the view after this agent's commit at
    /// `revision` (whose compares proved the guess): it had no keys just before, and its
    /// watchers start at `revision`, so the commit's own events are published too. (The
    /// keys written reach the view from [`Mirror::own_commit`] at once.)
    pub(super) fn join_own(&mut self, keys: &Keys, name: &ResourceName, revision: i64) {
        self.join(keys, name, revision - 1, &[]);
        self.touch([name]);
    }

    /// Takes `name` out of the view: its watchers are cancelled, its keys dropped.
    fn leave(&mut self, name: &ResourceName) {
        let Some(ids) = self.view.remove(name) else {
            return;
        };
        let ranges = ranges_of(&self.keys, name);
        for (key, end) in ranges {
            self.remove_range(&key, &end);
        }
        for id in ids {
            self.drop_watcher(id);
        }
    }

    /// Takes `name` out of the view as the sweep does once it has not been used for
    /// [`IN_USE`] (for tests: that long again for each).
    #[cfg(test)]
    pub(super) fn leave_as_unused(&mut self, name: &ResourceName) {
        self.recent.remove(name);
        self.leave(name);
    }

    /// Notes that `names` were just used.
    fn touch<'a>(&mut self, names: impl IntoIterator<Item = &'a ResourceName>) {
        let now = std::time::Instant::now();
        for n in names {
            self.recent.insert(n.clone(), now);
        }
    }

    /// Forgets uses beyond the [`RECENT`] newest that are older than [`IN_USE`].
    fn trim_recent(&mut self) {
        if self.recent.len() <= RECENT {
            return;
        }
        let mut times: Vec<std::time::Instant> = self.recent.values().copied().collect();
        times.sort_unstable_by(|a, b| b.cmp(a));
        let newest_kept = times[RECENT - 1];
        let now = std::time::Instant::now();
        self.recent
            .retain(|_, t| *t >= newest_kept || now.duration_since(*t) < IN_USE);
    }

    /// Writes this agent's own commit at `revision` into the view (the watch brings it back a
    /// moment later), so the next decision on those resources needs no retry: each key only
    /// where the mirror has nothing newer, and only for resources in the view. The watchers'
    /// revisions stay: only the records (compared exactly) and their held keys are written.
    pub(super) fn own_commit(&mut self, revision: i64, written: &[Written]) {
        for (name, key, value) in written {
            if !self.view.contains_key(name) {
                continue;
            }
            let current = self.kvs.get(key);
            if current.is_some_and(|kv| kv.mod_revision >= revision) {
                continue;
            }
            match value {
                Some((value, lease)) => {
                    let kv = KeyValue {
                        key: key.clone(),
                        create_revision: current.map_or(revision, |kv| kv.create_revision),
                        mod_revision: revision,
                        version: current.map_or(1, |kv| kv.version + 1),
                        value: value.clone(),
                        lease: *lease,
                    };
                    self.kvs.insert(key.clone(), kv);
                }
                None => {
                    self.kvs.remove(key);
                    self.tombstones.insert(key.clone(), revision);
                }
            }
        }
        self.learned(revision);
    }
}

/// A key a commit wrote, of a resource: its value and lease, or `None` where it deleted it.
pub(super) type Written = (ResourceName, Vec<u8>, Option<(Vec<u8>, i64)>);

/// A watch event putting `kv` (for a key read again after a gap).
fn put_event(kv: KeyValue, prev: Option<KeyValue>) -> crate::etcd::pb::mvccpb::Event {
    crate::etcd::pb::mvccpb::Event {
        r#type: crate::etcd::pb::mvccpb::event::EventType::Put as i32,
        kv: Some(kv),
        prev_kv: prev,
    }
}

/// A watch event deleting `kv`'s key (found gone when read again after a gap).
fn delete_event(kv: KeyValue, prev: KeyValue) -> crate::etcd::pb::mvccpb::Event {
    crate::etcd::pb::mvccpb::Event {
        r#type: crate::etcd::pb::mvccpb::event::EventType::Delete as i32,
        kv: Some(kv),
        prev_kv: Some(prev),
    }
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
    /// A resource this agent's commit made held here is not in the view (it left while the
    /// commit was in flight): read it into the view again, and treat what changed since the
    /// record this commit wrote as the watch would have.
    Rejoin(ResourceName, KeyValue),
    /// A holder of this host is in record `old` and missing from `new`, a later version of
    /// it read after a gap (a rejoin, or a watcher's keys read again), with possibly other
    /// versions between: the versions between are read, and the holder is fenced only where
    /// one of them lost it without an ending. Endings forced between (an admin's
    /// force-release) are published (the agent kills those holders), and `new`'s own when
    /// `publish_new` (nothing published them).
    Confirm {
        name: ResourceName,
        old: KeyValue,
        new: KeyValue,
        publish_new: bool,
    },
}

/// What a group of watchers watches: a resource's three ranges, or `P hosts/` (`None`).
type Unit = Option<ResourceName>;

/// How many units one read after their creation covers (4 ranges at most each: within etcd's
/// 128 operations), and how long the first waits for others to join it.
const SETTLE_BATCH: usize = 40;
const SETTLE_WAIT: Duration = Duration::from_millis(2);

/// Follows the view's watchers: publishes the events recorded in its resource records,
/// notes expired sessions, wakes the waiter service, and lets resources nobody here uses
/// any more leave the view.
pub(super) async fn follow(inner: Arc<Inner>) {
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    // Streams refused in a row (etcd refused a watcher on each before creating one): from the
    // second, the next opens only after a sweep's time, so a refusal that a fresh token does
    // not cure costs etcd one authentication per 2 s.
    let mut refused_in_a_row = 0u32;
    loop {
        let hosts = {
            let mut m = write(&inner.mirror, "mirror");
            let id = m.hosts_id;
            let keys = m.keys.clone();
            match m.watchers.get_mut(&id) {
                Some(w) => {
                    w.pending = Some((false, Vec::new()));
                    Some(w.spec(&keys, id))
                }
                None => None,
            }
        };
        let Some(hosts) = hosts else {
            // Not loaded yet (open reads it before this task starts).
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (tx, mut stream) = match inner.etcd.watch_many(&hosts).await {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "watch failed; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        {
            // Every other watcher again; each is read again once etcd has created it.
            let mut m = write(&inner.mirror, "mirror");
            let keys = m.keys.clone();
            for (id, w) in m.watchers.iter_mut() {
                if *id != hosts.id {
                    w.pending = Some((false, Vec::new()));
                    tx.create(&w.spec(&keys, *id));
                }
            }
            m.tx = Some(tx);
        }
        let mut ready: Vec<Unit> = Vec::new();
        let mut refused: Vec<Unit> = Vec::new();
        let mut settle_at: Option<tokio::time::Instant> = None;
        loop {
            let msg = tokio::select! {
                m = stream.message() => match m {
                    Ok(Some(m)) => m,
                    Ok(None) | Err(_) => break,
                },
                _ = sweep.tick() => {
                    inner.sweep_view();
                    let mut m = write(&inner.mirror, "mirror");
                    for unit in std::mem::take(&mut refused) {
                        m.recreate(&unit);
                    }
                    drop(m);
                    inner.fixes_due.notify_one();
                    continue;
                }
                () = async {
                    match settle_at {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                } => {
                    // Not awaited here: this loop must go on reading the stream (etcd's
                    // answers to the read share its connection, whose window unread watch
                    // messages would hold).
                    settle_at = None;
                    tokio::spawn(settle_task(Arc::clone(&inner), std::mem::take(&mut ready)));
                    continue;
                }
                () = inner.pause_watch_asked.notified() => break,
            };
            if let Some(h) = &msg.header {
                write(&inner.mirror, "mirror").learned(h.revision);
            }
            if msg.canceled {
                // etcd cancelled a watcher this agent did not (it refused it, or it fell
                // behind): its unit is watched again, and read again once created.
                let unit = read(&inner.mirror, "mirror")
                    .watchers
                    .get(&msg.watch_id)
                    .map(|w| w.of.clone());
                if let Some(unit) = unit {
                    warn!(watcher = msg.watch_id, reason = %msg.cancel_reason, compacted = msg.compact_revision, "etcd cancelled a watcher; watching its keys again");
                    // At the next sweep, not at once, should etcd refuse it again.
                    refused.push(unit);
                }
                let refused_token = matches!(
                    EtcdCode::of_cancel_reason(&msg.cancel_reason),
                    Some(
                        EtcdCode::InvalidAuthToken
                            | EtcdCode::AuthOldRevision
                            | EtcdCode::PermissionDenied
                    )
                );
                if refused_token || msg.watch_id == -1 {
                    // etcd refused to create a watcher for the stream's token (it checks it for
                    // every watcher created on the stream; one it has dropped refuses them all,
                    // however often they are created again), and may not say which (id -1):
                    // the stream opens again, with a fresh token, every watcher on it.
                    warn!(reason = %msg.cancel_reason, "etcd refused a watcher on this watch stream; opening it again");
                    let tx = read(&inner.mirror, "mirror").tx.clone();
                    if let (Some(tx), true) = (tx, refused_token) {
                        inner.etcd.forget_watch_token(&tx).await;
                    }
                    refused_in_a_row += 1;
                    break;
                }
                continue;
            }
            if msg.created {
                refused_in_a_row = 0;
                let unit = write(&inner.mirror, "mirror").created(msg.watch_id);
                if let Some(unit) = unit {
                    ready.push(unit);
                    settle_at.get_or_insert_with(|| tokio::time::Instant::now() + SETTLE_WAIT);
                    if ready.len() >= SETTLE_BATCH {
                        settle_at = Some(tokio::time::Instant::now());
                    }
                }
            }
            if msg.events.is_empty() {
                continue;
            }
            inner.apply_watch_events(msg.watch_id, &msg.events);
            inner.fixes_due.notify_one();
            inner.changed.notify_waiters();
        }
        write(&inner.mirror, "mirror").tx = None;
        drop(stream);
        let pause = lock(&inner.pause_watch, "pause_watch").take();
        if let Some((reached, resume)) = pause {
            let _ = reached.send(());
            let _ = resume.await;
        }
        let wait = if refused_in_a_row > 1 {
            SWEEP_EVERY
        } else {
            Duration::from_millis(100)
        };
        tokio::time::sleep(wait).await;
    }
}

/// Reads `units` once etcd created their watchers (see [`Inner::settle`]), until it can.
async fn settle_task(inner: Arc<Inner>, units: Vec<Unit>) {
    while let Err(e) = inner.settle(&units).await {
        debug!(error = %e, "could not read the keys of new watchers yet; retrying");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    inner.fixes_due.notify_one();
    inner.changed.notify_waiters();
}

/// Writes the repairs the watch found necessary, as they come (apart from the watch, which
/// must not wait for etcd's answers while its own messages go unread).
pub(super) async fn write_fixes(inner: Arc<Inner>) {
    loop {
        let _ = tokio::time::timeout(SWEEP_EVERY, inner.fixes_due.notified()).await;
        inner.apply_fixes().await;
    }
}

/// Watches the whole prefix while anyone wants every resource's events (`leasehold watch`):
/// publishes the events recorded in every record and every session's end, from the revision
/// its receivers asked for (see [`EtcdStore::subscribe_all`](crate::Store::subscribe_all)),
/// without a gap: a broken stream is watched again from the revision after the last it
/// delivered; one that cannot be (etcd compacted that history) closes every receiver, which
/// tells their callers to read again. Stops when the last receiver has gone.
pub(super) async fn watch_all(inner: Arc<Inner>) {
    let prefix = inner.keys.prefix().as_bytes().to_vec();
    // The next revision to deliver (0: from now; its receivers always ask for one).
    let mut from = 0;
    loop {
        let tx = {
            let mut all = lock(&inner.all_events, "all_events");
            if all.tx.receiver_count() == 0 {
                all.running = false;
                all.start = 0;
                inner.all_from.send_replace(0);
                return;
            }
            if from == 0 {
                from = std::mem::take(&mut all.start);
            }
            all.tx.clone()
        };
        let mut stream = match inner
            .etcd
            .watch(prefix.clone(), prefix_end(&prefix), from)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "watch of every resource failed; retrying");
                tokio::time::sleep(Duration::from_millis(250)).await;
                continue;
            }
        };
        // Every event from `from` on comes on this stream (or the gap is said).
        let covered = |from: i64| {
            inner.all_from.send_if_modified(|f| {
                let starts = *f == 0 && from > 0;
                if starts {
                    *f = from;
                }
                starts
            });
        };
        covered(from);
        loop {
            let msg = tokio::select! {
                m = stream.message() => match m {
                    Ok(Some(m)) => m,
                    Ok(None) | Err(_) => break,
                },
                () = tokio::time::sleep(Duration::from_secs(1)) => {
                    if tx.receiver_count() == 0 {
                        break;
                    }
                    continue;
                }
                () = inner.pause_watch_all_asked.notified() => break,
            };
            if msg.compact_revision > 0 {
                // The events from `from` are gone from etcd's history: the receivers are
                // closed (after the events they have), and told to read again; later ones
                // are served from a new start.
                warn!(
                    from,
                    compacted = msg.compact_revision,
                    "the watch of every resource missed events (etcd compacted them); its watchers are told to watch again"
                );
                {
                    let mut all = lock(&inner.all_events, "all_events");
                    all.tx = broadcast::channel(4096).0;
                    all.start = 0;
                }
                inner.all_from.send_replace(0);
                from = 0;
                break;
            }
            for ev in &msg.events {
                let Some(kv) = &ev.kv else { continue };
                match inner.keys.parse(&kv.key) {
                    Some(KeyKind::Resource(_)) if !is_delete(ev) => {
                        if let Ok(rec) = Record::decode(&kv.value) {
                            for e in rec.events {
                                let _ = tx.send(e);
                            }
                        }
                    }
                    Some(KeyKind::Host(host)) if is_delete(ev) => {
                        let lease = LeaseId(ev.prev_kv.as_ref().map_or(0, |p| p.lease));
                        let _ = tx.send(Event::SessionExpired {
                            session: lease.session(),
                            host,
                        });
                    }
                    _ => {}
                }
            }
            if let Some(h) = &msg.header {
                from = from.max(h.revision + 1);
                covered(from);
            }
            if tx.receiver_count() == 0 {
                break;
            }
        }
        drop(stream);
        let pause = lock(&inner.pause_watch_all, "pause_watch_all").take();
        if let Some((reached, resume)) = pause {
            let _ = reached.send(());
            let _ = resume.await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Inner {
    /// Reads every key under the prefix once (at open): keeps the hosts and the resources this
    /// host's processes hold in the mirror, and returns everything read, for the index of
    /// holders and the previous agent's waiters.
    pub(super) async fn load_mirror(&self) -> Result<Vec<KeyValue>, StoreError> {
        let prefix = self.keys.prefix().as_bytes().to_vec();
        let (kvs, revision) = self
            .etcd
            .range(prefix.clone(), prefix_end(&prefix), 0)
            .await
            .map_err(unavailable)?;
        let hosts = self.keys.hosts();
        let mut m = Mirror {
            revision,
            keys: self.keys.clone(),
            ..Mirror::default()
        };
        let hosts_end = prefix_end(&hosts);
        for kv in kvs.iter().filter(|kv| covers(&hosts, &hosts_end, &kv.key)) {
            m.kvs.insert(kv.key.clone(), kv.clone());
        }
        m.hosts_id = m.add_watcher(Watcher {
            of: None,
            part: 0,
            rev: revision,
            pending: None,
            floor: 0,
        });
        m.learned(revision);
        let current = self.session.borrow().id;
        for kv in &kvs {
            let (Some(KeyKind::Resource(r)), Ok(rec)) =
                (self.keys.parse(&kv.key), Record::decode(&kv.value))
            else {
                continue;
            };
            if rec
                .state
                .holders()
                .iter()
                .any(|l| l.owner.process.host == self.host && l.session == current)
            {
                m.join(&self.keys, &r, revision, &kvs);
            }
        }
        *write(&self.mirror, "mirror") = m;
        Ok(kvs)
    }

    /// Puts `names` in the view with their keys as read at `revision` (those not there yet),
    /// and notes them used.
    pub(super) fn join_view(
        &self,
        names: &BTreeSet<ResourceName>,
        revision: i64,
        kvs: &[KeyValue],
    ) {
        let mut m = write(&self.mirror, "mirror");
        for n in names {
            m.join(&self.keys, n, revision, kvs);
        }
        m.learned(revision);
        m.touch(names);
    }

    /// Notes that `names` were just used (they stay in the view a while).
    pub(super) fn touch_view(&self, names: &BTreeSet<ResourceName>) {
        write(&self.mirror, "mirror").touch(names);
    }

    /// Resources neither held nor waited for here, nor used lately, leave the view.
    pub(super) fn sweep_view(&self) {
        // The waiters first: a granted waiter is in the index of holders before it leaves
        // them, so a resource moving from one to the other is seen in either.
        let mut keep: BTreeSet<ResourceName> = self
            .waiters()
            .values()
            .flat_map(|w| w.value.items.iter().map(|(r, _)| r.clone()))
            .collect();
        match self.held_index() {
            Some(h) => keep.extend(h.values().flatten().cloned()),
            // Poisoned: the store has halted; keep everything.
            None => return,
        }
        let mut m = write(&self.mirror, "mirror");
        m.trim_recent();
        let recent: Vec<ResourceName> = m.recent.keys().cloned().collect();
        keep.extend(recent);
        let gone: Vec<ResourceName> = m
            .view
            .keys()
            .filter(|r| !keep.contains(*r))
            .cloned()
            .collect();
        for r in &gone {
            m.leave(r);
        }
    }

    /// Reads the keys of `units` whose watchers etcd has just created, at one revision, and
    /// brings the mirror to it: each difference is handled as the watch would have delivered
    /// it (this agent's own newer keys are kept), then the events the watchers delivered
    /// meanwhile, those newer than the read, are applied.
    async fn settle(&self, units: &[Unit]) -> Result<(), StoreError> {
        for chunk in units.chunks(SETTLE_BATCH) {
            let ranges: Vec<Vec<(Vec<u8>, Vec<u8>)>> = chunk
                .iter()
                .map(|u| match u {
                    None => {
                        let h = self.keys.hosts();
                        let e = prefix_end(&h);
                        vec![(h, e)]
                    }
                    Some(r) => ranges_of(&self.keys, r).to_vec(),
                })
                .collect();
            let mut t = Txn::new();
            for (k, e) in ranges.iter().flatten() {
                t = t.get(k.clone(), e.clone());
            }
            let res = self.etcd.upkeep().txn(t).await.map_err(unavailable)?;
            let revision = res.revision;
            let mut at = 0;
            let mut changes = Vec::new();
            let mut later = Vec::new();
            {
                let mut m = write(&self.mirror, "mirror");
                m.learned(revision);
                for (unit, unit_ranges) in chunk.iter().zip(&ranges) {
                    let read: Vec<KeyValue> = (at..at + unit_ranges.len())
                        .flat_map(|i| range_of(&res, i).iter().cloned())
                        .collect();
                    at += unit_ranges.len();
                    let ids = m.ids_of(unit);
                    // It left the view, or was created again, meanwhile.
                    if ids.is_empty()
                        || ids.iter().any(|id| {
                            m.watchers
                                .get(id)
                                .is_none_or(|w| !matches!(w.pending, Some((true, _))))
                        })
                    {
                        continue;
                    }
                    let mut old: BTreeMap<Vec<u8>, KeyValue> = BTreeMap::new();
                    for (k, e) in unit_ranges {
                        old.extend(m.range(k, e).map(|kv| (kv.key.clone(), kv.clone())));
                    }
                    for kv in &read {
                        let prev = old.remove(&kv.key);
                        let newer = prev
                            .as_ref()
                            .map_or(0, |c| c.mod_revision)
                            .max(m.tombstones.get(&kv.key).copied().unwrap_or(0));
                        if newer >= kv.mod_revision {
                            // The same, or this agent's own newer write.
                            continue;
                        }
                        m.kvs.insert(kv.key.clone(), kv.clone());
                        let publish = !m.own_published.contains(&(kv.key.clone(), kv.mod_revision));
                        changes.push((put_event(kv.clone(), prev.clone()), prev, publish));
                    }
                    for (key, prev) in old {
                        if prev.mod_revision > revision {
                            continue;
                        }
                        m.kvs.remove(&key);
                        let mut gone = prev.clone();
                        gone.mod_revision = revision;
                        changes.push((delete_event(gone, prev.clone()), Some(prev), true));
                    }
                    for (k, e) in unit_ranges {
                        m.forget_own(k, e, revision);
                    }
                    for id in ids {
                        if let Some(w) = m.watchers.get_mut(&id) {
                            w.rev = w.rev.max(revision);
                            w.floor = revision;
                            let buffered = w.pending.take().map(|(_, b)| b).unwrap_or_default();
                            let newer: Vec<_> = buffered
                                .into_iter()
                                .filter(|ev| {
                                    ev.kv.as_ref().is_some_and(|kv| kv.mod_revision > revision)
                                })
                                .collect();
                            later.extend(apply_locked(&mut m, id, &newer));
                        }
                    }
                }
                for (ev, _, publish) in changes.iter_mut() {
                    if std::mem::take(publish) {
                        self.publish_only(ev);
                    }
                }
                self.publish_locked(&mut later);
            }
            for (ev, old, publish) in changes {
                self.after_watch_event(&ev, old, publish, true);
            }
            self.after_applied(later);
        }
        Ok(())
    }

    /// Builds the index of this host's holders, and the list of stale ones, from the keys
    /// read at open.
    pub(super) fn load_held(&self, kvs: &[KeyValue]) {
        let current = self.session.borrow().id;
        let mut held = HashMap::<ProcessKey, BTreeSet<ResourceName>>::new();
        let mut stale = BTreeSet::new();
        {
            for kv in kvs {
                let (Some(KeyKind::Resource(r)), Ok(rec)) =
                    (self.keys.parse(&kv.key), Record::decode(&kv.value))
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

    /// Applies one watch message of watcher `id`: its keys to the mirror all at once, and the
    /// revision its keys are now known to (its last event's), then each event as lease events
    /// for subscribers. (A commit's keys of one resource reach its three watchers apart, so a
    /// snapshot may show a record ended dirty before the grace key written with it: the commit
    /// then compares that no grace key was created after the grace watcher's revision.)
    pub(super) fn apply_watch_events(&self, id: i64, events: &[crate::etcd::pb::mvccpb::Event]) {
        // Each record decoded once, here, before the view's lock is taken (which a commit
        // answered meanwhile waits for): publishing its events under the lock and checking
        // this host's holders after it take it decoded.
        for ev in events {
            if let Some(kv) = &ev.kv
                && !is_delete(ev)
                && let Some(KeyKind::Resource(_)) = self.keys.parse(&kv.key)
            {
                let _ = self.decoded.record(&kv.key, &kv.value);
            }
        }
        let applied = {
            let mut m = write(&self.mirror, "mirror");
            let mut applied = apply_locked(&mut m, id, events);
            self.publish_locked(&mut applied);
            applied
        };
        self.after_applied(applied);
    }

    /// Publishes the lease events of the record versions in `applied` still to publish, while
    /// the caller holds the view's lock (a commit publishes under it too, so each resource's
    /// events go out in the order of its versions), and marks them published.
    fn publish_locked(&self, applied: &mut [Applied]) {
        for (ev, _, publish) in applied.iter_mut() {
            if std::mem::take(publish) {
                self.publish_only(ev);
            }
        }
    }

    /// What the events [`apply_locked`] applied mean, in order.
    fn after_applied(&self, applied: Vec<Applied>) {
        for (ev, old, publish) in applied {
            match old {
                Some(old) => self.after_watch_event(&ev, old, publish, false),
                None if publish => self.publish_only(&ev),
                None => {}
            }
        }
    }
}

/// One event applied to the mirror: `None` for one the mirror had gone past, else the key's
/// value before it; and whether its record's events are still to publish.
type Applied = (
    crate::etcd::pb::mvccpb::Event,
    Option<Option<KeyValue>>,
    bool,
);

/// Applies watcher `id`'s events to the mirror (or keeps them, while its keys are to be read
/// again); see [`Inner::apply_watch_events`].
fn apply_locked(
    m: &mut Mirror,
    id: i64,
    events: &[crate::etcd::pb::mvccpb::Event],
) -> Vec<Applied> {
    {
        let Some(w) = m.watchers.get_mut(&id) else {
            // A watcher cancelled here: its resource left the view.
            return Vec::new();
        };
        if let Some((_, buffer)) = &mut w.pending {
            // Applied once its keys are read again.
            buffer.extend(events.iter().cloned());
            return Vec::new();
        }
        let floor = w.floor;
        let events: Vec<&crate::etcd::pb::mvccpb::Event> = events
            .iter()
            .filter(|ev| ev.kv.as_ref().is_some_and(|kv| kv.mod_revision > floor))
            .collect();
        let last = events
            .iter()
            .filter_map(|ev| ev.kv.as_ref().map(|kv| kv.mod_revision))
            .max()
            .unwrap_or(0);
        w.rev = w.rev.max(last);
        m.revision = m.revision.max(last);
        events
            .iter()
            .map(|ev| {
                let ev = (*ev).clone();
                let Some(kv) = ev.kv.as_ref() else {
                    return (ev, None, false);
                };
                let publish = !m.own_published.remove(&(kv.key.clone(), kv.mod_revision));
                // Older than what this agent's own commit already put there: its events
                // are published, but the mirror keeps the newer keys.
                let newer = m
                    .kvs
                    .get(&kv.key)
                    .map_or(0, |c| c.mod_revision)
                    .max(m.tombstones.get(&kv.key).copied().unwrap_or(0));
                if newer > kv.mod_revision {
                    return (ev, None, publish);
                }
                m.tombstones.remove(&kv.key);
                let old = if is_delete(&ev) {
                    m.kvs.remove(&kv.key)
                } else {
                    // Liveness is a host key's lease: a key moved off a lease ends that
                    // session (snapshots take the sessions from the host keys).
                    m.kvs.insert(kv.key.clone(), kv.clone())
                };
                (ev, Some(old), publish)
            })
            .collect()
    }
}

impl Inner {
    /// Publishes the lease events a record's version recorded.
    fn publish_only(&self, ev: &crate::etcd::pb::mvccpb::Event) {
        if let Some(kv) = &ev.kv
            && !is_delete(ev)
            && let Some(KeyKind::Resource(_)) = self.keys.parse(&kv.key)
            && let Ok(rec) = self.decoded.record(&kv.key, &kv.value)
        {
            for e in &rec.events {
                let _ = self.events.send(e.clone());
            }
        }
    }

    /// What one watch event, already in the mirror (`old` is the key's value before it),
    /// means: this host's session ended, lease events recorded in a resource record, a
    /// lease held here lost outside leasehold, another host's session ended.
    /// `gap`: `old` may be more than one version before the event (the keys were read again
    /// after a gap), so a holder it misses is confirmed on the versions between first.
    fn after_watch_event(
        &self,
        ev: &crate::etcd::pb::mvccpb::Event,
        old: Option<KeyValue>,
        publish: bool,
        gap: bool,
    ) {
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
                let new = (!deleted).then(|| self.decoded.record(&kv.key, &kv.value));
                if let Some(Ok(rec)) = &new
                    && publish
                {
                    for e in &rec.events {
                        let _ = self.events.send(e.clone());
                    }
                }
                let gap = gap.then_some((kv, false));
                self.check_own_holders(&name, &kv.key, old.as_ref(), new.as_ref(), gap);
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
    /// `gap`: `new` is this key (and whether nothing published its events) when it may be
    /// more than one version after `old`: a holder it misses is then confirmed on the
    /// versions between ([`Fix::Confirm`]) before anything is fenced.
    pub(super) fn check_own_holders(
        &self,
        name: &ResourceName,
        key: &[u8],
        old_kv: Option<&KeyValue>,
        new: Option<&Result<Arc<Record>, String>>,
        gap: Option<(&KeyValue, bool)>,
    ) {
        let Some(old) = old_kv.and_then(|kv| self.decoded.record(&kv.key, &kv.value).ok()) else {
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
        if let (Some((new_kv, publish_new)), Some(old_kv), Some(Ok(_))) = (gap, old_kv, new)
            && new_kv.mod_revision > old_kv.mod_revision
        {
            // Its ending may be in a version between (released here, then taken elsewhere):
            // fencing on this comparison alone killed healthy holders.
            self.fixes().push(Fix::Confirm {
                name: name.clone(),
                old: old_kv.clone(),
                new: new_kv.clone(),
                publish_new,
            });
            self.fixes_due.notify_one();
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
            if let Fix::Confirm {
                name,
                old,
                new,
                publish_new,
            } = &fix
            {
                if let Err(e) = self.confirm(name, old, new, *publish_new).await {
                    warn!(resource = %name, error = %e, "could not read the versions of a record held here yet; retrying");
                    self.fixes().push(fix);
                }
                continue;
            }
            if let Fix::Rejoin(name, written) = &fix {
                let names = BTreeSet::from([name.clone()]);
                match self.read_fresh(&names, &self.etcd.upkeep()).await {
                    Ok((revision, kvs)) => {
                        // Joined by this read: nothing published the events of the version
                        // it found.
                        let joins = !read(&self.mirror, "mirror").has_one(name);
                        self.join_view(&names, revision, &kvs);
                        let now = read(&self.mirror, "mirror").kvs.get(&written.key).cloned();
                        if now.as_ref().map(|kv| kv.mod_revision) != Some(written.mod_revision) {
                            let new = now
                                .as_ref()
                                .map(|kv| self.decoded.record(&kv.key, &kv.value));
                            let gap = now.as_ref().map(|kv| (kv, joins));
                            self.check_own_holders(
                                name,
                                &written.key,
                                Some(written),
                                new.as_ref(),
                                gap,
                            );
                        }
                    }
                    Err(e) => {
                        warn!(resource = %name, error = %e, "could not read a resource held here into the view yet; retrying");
                        self.fixes().push(fix);
                    }
                }
                continue;
            }
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
                Fix::Rejoin(..) | Fix::Confirm { .. } => Ok(()),
            };
            if let Err(e) = r {
                warn!(error = %e, "could not write a repair yet; retrying");
                self.fixes().push(fix);
            }
        }
    }

    /// See [`Fix::Confirm`]: checks this host's holders in `old` against each version of the
    /// record after it up to `new`, in order, as the watch would have.
    async fn confirm(
        &self,
        name: &ResourceName,
        old: &KeyValue,
        new: &KeyValue,
        publish_new: bool,
    ) -> Result<(), StoreError> {
        let Some(versions) = self.versions_between(old, new).await? else {
            // The history between is gone (compacted, or the key deleted meanwhile): as the
            // two versions compare, the safe way.
            let new_rec = Record::decode(&new.value).map(Arc::new);
            if publish_new && let Ok(rec) = &new_rec {
                self.publish_forced(rec, old);
            }
            self.check_own_holders(name, &new.key, Some(old), Some(&new_rec), None);
            return Ok(());
        };
        let mut prev = old.clone();
        let last = versions.len().saturating_sub(1);
        for (i, v) in versions.iter().enumerate() {
            let rec = Record::decode(&v.value).map(Arc::new);
            if let Ok(r) = &rec
                && (i < last || publish_new)
            {
                self.publish_forced(r, &prev);
            }
            self.check_own_holders(name, &v.key, Some(&prev), Some(&rec), None);
            prev = v.clone();
        }
        Ok(())
    }

    /// The versions of `new`'s key after `old` up to `new`, oldest first (one read each,
    /// going back from `new`); `None` when that history cannot be followed.
    async fn versions_between(
        &self,
        old: &KeyValue,
        new: &KeyValue,
    ) -> Result<Option<Vec<KeyValue>>, StoreError> {
        /// More versions than this between are not followed (the safe comparison decides).
        const MAX_VERSIONS: usize = 1000;
        let etcd = self.etcd.upkeep();
        let mut out = vec![new.clone()];
        let mut at = new.mod_revision;
        while at > old.mod_revision + 1 && out.len() <= MAX_VERSIONS {
            let kvs = match etcd.range(new.key.clone(), Vec::new(), at - 1).await {
                Ok((kvs, _)) => kvs,
                Err(e) if e.code() == Some(EtcdCode::Compacted) => return Ok(None),
                Err(e) => return Err(unavailable(e)),
            };
            match kvs.into_iter().next() {
                Some(kv) if kv.mod_revision == old.mod_revision => break,
                Some(kv) if kv.mod_revision > old.mod_revision => {
                    at = kv.mod_revision;
                    out.push(kv);
                }
                _ => return Ok(None),
            }
        }
        if out.len() > MAX_VERSIONS {
            return Ok(None);
        }
        out.reverse();
        Ok(Some(out))
    }

    /// Publishes the forced endings `rec` records of this host's holders in `prev` (an
    /// admin's force-release another host wrote: the agent kills those holders).
    fn publish_forced(&self, rec: &Record, prev: &KeyValue) {
        let Ok(prev) = Record::decode(&prev.value) else {
            return;
        };
        for e in &rec.events {
            if let Event::Ended { ended, .. } = e
                && matches!(ended.how, leasehold_core::EndReason::Forced { .. })
                && prev.state.holders().iter().any(|l| {
                    l.owner.process.host == self.host
                        && l.owner.process == ended.owner.process
                        && l.token == ended.token
                })
            {
                let _ = self.events.send(e.clone());
            }
        }
    }
}
