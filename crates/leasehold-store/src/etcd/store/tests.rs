//! What the store does with a poisoned lock (see [`crate::sync`]), on a real etcd.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Mutex;
use std::time::Duration;

use leasehold_core::{HostId, Mode, Owner, ReleaseKind, ResourceName};
use leasehold_testkit::Etcd;

use super::{EtcdOptions, EtcdStore};
use crate::{AcquireSpec, Store, StoreError};

async fn open(etcd: &Etcd, test: &str) -> EtcdStore {
    let mut o = EtcdOptions::new(vec![etcd.endpoint()]);
    o.prefix = format!("/unit-{}-{test}/", std::process::id());
    EtcdStore::open(HostId::new("a").unwrap(), o).await.unwrap()
}

/// [`open`] without compaction rounds, for the tests that count the etcd requests an operation
/// makes: a round (its claim, its reads) would be counted with them whenever it ran meanwhile.
async fn open_counting(etcd: &Etcd, test: &str) -> EtcdStore {
    let mut o = EtcdOptions::new(vec![etcd.endpoint()]);
    o.prefix = format!("/unit-{}-{test}/", std::process::id());
    o.history.compact_every = None;
    EtcdStore::open(HostId::new("a").unwrap(), o).await.unwrap()
}

/// Waits until `r`'s watchers deliver its record to `s`'s view.
async fn watchers_delivered(s: &EtcdStore, r: &ResourceName) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !crate::sync::read(&s.inner.mirror, "mirror").delivered(r, 0) {
        assert!(
            std::time::Instant::now() < deadline,
            "{r}'s watchers were never read in"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The waiter keys of `r` in etcd: (how many there are, etcd's revision), at revision `rev`
/// (0: now).
async fn waiter_keys(s: &EtcdStore, r: &ResourceName, rev: i64) -> (usize, i64) {
    let w = s.inner.keys.waiters(r);
    let w_end = crate::etcd::client::prefix_end(&w);
    let (kvs, at) = s.inner.etcd.range(w, w_end, rev).await.unwrap();
    (kvs.len(), at)
}

/// Asserts that `r` had no waiter key at any revision from `since` to now; `what` says which
/// change `since` is, for the message.
async fn no_waiter_key_since(s: &EtcdStore, r: &ResourceName, since: i64, what: &str) {
    let (_, now) = waiter_keys(s, r, 0).await;
    for rev in since..=now {
        let (queued, _) = waiter_keys(s, r, rev).await;
        assert_eq!(
            queued, 0,
            "a waiter key was written for {r} at revision {rev} ({what} at {since})"
        );
    }
}

fn res(name: &str) -> ResourceName {
    ResourceName::new(name).unwrap()
}

/// Poisons `m`: a thread panics while holding it.
fn poison<T: Send>(m: &Mutex<T>) {
    std::thread::scope(|s| {
        let _ = s
            .spawn(|| {
                let _held = m.lock().unwrap();
                panic!("a panic while holding a store lock (expected by this test)");
            })
            .join();
    });
    assert!(m.is_poisoned());
}

/// The index of local holders is a fatal lock: poisoned, the store halts (nothing more is
/// granted or ended, every call says to restart the agent) and answers no index, so the
/// agent's fence kills every process it watches rather than trust a half-made index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_holder_index_halts_the_store() {
    let etcd = Etcd::start();
    let s = open(&etcd, "halt").await;
    let holder = Owner::new(s.host().clone(), 10, 1);
    s.acquire(AcquireSpec::new(
        holder.clone(),
        [(res("disk"), Mode::Exclusive)],
    ))
    .await
    .unwrap();
    assert_eq!(s.local_holders(), Some(vec![holder.process.clone()]));
    poison(&s.inner.held);
    assert_eq!(s.local_holders(), None);
    let other = Owner::new(s.host().clone(), 11, 1);
    let e = s
        .acquire(AcquireSpec::new(other, [(res("other"), Mode::Exclusive)]))
        .await
        .unwrap_err();
    assert!(
        matches!(e, StoreError::Halted(crate::Halt::Poisoned { .. })),
        "{e:?}"
    );
    assert!(e.to_string().contains("restart the agent"), "{e}");
    let under = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<crate::Halt>());
    assert!(under.is_some(), "the halt is kept typed under the error");
    let e = s
        .release(
            res("disk"),
            holder.process.clone(),
            None,
            None,
            ReleaseKind::Clean,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Halted(_)), "{e:?}");
    let e = s.end_process(holder.process).await.unwrap_err();
    assert!(matches!(e, StoreError::Halted(_)), "{e:?}");
}

/// The session-end hook's lock is recovered: a poisoned one still runs the hook when the
/// session ends (skipping it, as before, left the holders unfenced).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poisoned_session_end_hook_still_runs() {
    let etcd = Etcd::start();
    let s = open(&etcd, "hook").await;
    let (tx, mut ended) = tokio::sync::mpsc::unbounded_channel();
    s.on_session_end(Box::new(move |id| {
        let _ = tx.send(id);
    }));
    poison(&s.inner.session_end);
    let id = s.session().unwrap().borrow().id;
    s.revoke_session().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(30), ended.recv())
        .await
        .expect("the session-end hook never ran")
        .unwrap();
    assert_eq!(got, id);
}

/// The etcd store's defaults are SPEC §4's, from the one definition (`leasehold_core::Timing`),
/// the grace in etcd's whole seconds.
#[test]
fn the_etcd_defaults_are_spec_section_4s() {
    let o = EtcdOptions::new(Vec::new());
    let spec = leasehold_core::Timing::default();
    assert_eq!(
        (o.ttl, o.renew, o.grace),
        (spec.ttl, spec.renew, spec.grace)
    );
    assert_eq!(
        super::etcd_default_grace(Duration::from_secs(10)),
        spec.grace
    );
    // ttl/2 rounded up to whole seconds, never under etcd's shortest lease.
    assert_eq!(
        super::etcd_default_grace(Duration::from_secs(5)),
        Duration::from_secs(3)
    );
    assert_eq!(
        super::etcd_default_grace(Duration::from_secs(3)),
        Duration::from_secs(2)
    );
}

/// A decision made from a snapshot that missed a grace key (the mirror applies a commit's
/// keys one by one, so it can show another host's record ended dirty before the grace key
/// written with it) must commit nothing: the grace decides, not how fresh the mirror was.
/// Before the commit compared the grace keys, this granted inside another host's grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_decided_without_a_grace_key_written_since_commits_nothing() {
    use std::collections::BTreeSet;

    use leasehold_core::{AcquireRequest, Acquired};

    use super::commit::Extra;
    use crate::etcd::client::Txn;

    let etcd = Etcd::start();
    let s = open(&etcd, "grace-compare").await;
    let disk = res("disk");
    let names = BTreeSet::from([disk.clone()]);
    // What this host saw: the disk free, no grace.
    let snap = s.inner.snapshot(&names).await.unwrap();
    assert!(!snap.res[&disk].grace);
    // Meanwhile another host ends a dead session's lease on it and starts its grace.
    let (grace_lease, _) = s
        .inner
        .etcd
        .lease_grant(Duration::from_secs(60))
        .await
        .unwrap();
    let grace_key = s.inner.keys.grace(&disk);
    s.inner
        .etcd
        .txn(Txn::new().put(grace_key, Vec::new(), Some(grace_lease)))
        .await
        .unwrap();
    // The decision from the older snapshot grants...
    let lease = s.inner.lease().unwrap();
    let now = s.inner.now();
    let mut engine = s.inner.engine(&snap, &BTreeSet::new(), now);
    let owner = Owner::new(s.host().clone(), 10, 1);
    let got = engine
        .acquire(
            AcquireRequest {
                owner: owner.clone(),
                session: lease.session(),
                items: vec![(disk.clone(), Mode::Exclusive)],
                accept_dirty: true,
                wait: false,
                expect_tokens: Vec::new(),
            },
            now,
        )
        .unwrap();
    assert!(matches!(got, Acquired::Granted(_)), "{got:?}");
    let out = engine.take_output();
    let extra = Extra {
        require_session: Some(lease),
        ..Extra::default()
    };
    // ...but its commit finds the grace key and writes nothing.
    let committed = s.inner.commit(&snap, &engine, &out, extra).await.unwrap();
    assert_eq!(committed, None, "granted inside another host's grace");
    // And the store's own acquire, deciding afresh, is refused for the grace.
    let e = s
        .acquire(AcquireSpec::new(owner, [(disk, Mode::Exclusive)]).accept_dirty())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("grace period"), "{e}");
}

/// Issue 15: a release right after its acquire (and the next acquire right after it) used to
/// decide from the mirror's version before the other's commit, which the watch had not
/// delivered yet: a refusal checked again on a fresh read, or a grant whose compare failed,
/// two or three round trips where one does. Each now decides from the record its own commit
/// wrote: one transaction per acquire and per release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_and_release_in_a_row_take_one_transaction_each() {
    let etcd = Etcd::start();
    let s = open_counting(&etcd, "one-trip").await;
    let owner = Owner::new(s.host().clone(), 10, 1);
    let disk = res("disk");
    let cycle = || async {
        s.acquire(AcquireSpec::new(
            owner.clone(),
            [(disk.clone(), Mode::Exclusive)],
        ))
        .await
        .unwrap();
        s.release(
            disk.clone(),
            owner.process.clone(),
            None,
            None,
            ReleaseKind::Clean,
        )
        .await
        .unwrap();
    };
    // The record exists from here on: every later cycle is the same work.
    cycle().await;
    let rounds = 30;
    let before = s.inner.etcd.kv_requests();
    for _ in 0..rounds {
        cycle().await;
    }
    let sent = s.inner.etcd.kv_requests() - before;
    assert_eq!(
        sent,
        2 * rounds,
        "{sent} etcd requests for {rounds} acquire+release cycles"
    );
}

/// A grant of `r` to `owner` decided on `snap` (as `acquire` decides it), not yet committed.
fn decided_grant(
    s: &EtcdStore,
    snap: &super::snapshot::Snapshot,
    owner: &Owner,
    r: &ResourceName,
) -> (
    leasehold_core::Engine,
    leasehold_core::Output,
    super::commit::Extra,
) {
    use leasehold_core::{AcquireRequest, Acquired};
    let lease = s.inner.lease().unwrap();
    let now = s.inner.now();
    let mut engine = s
        .inner
        .engine(snap, &std::collections::BTreeSet::new(), now);
    let got = engine
        .acquire(
            AcquireRequest {
                owner: owner.clone(),
                session: lease.session(),
                items: vec![(r.clone(), Mode::Exclusive)],
                accept_dirty: false,
                wait: false,
                expect_tokens: Vec::new(),
            },
            now,
        )
        .unwrap();
    assert!(matches!(got, Acquired::Granted(_)), "{got:?}");
    let out = engine.take_output();
    let extra = super::commit::Extra {
        require_session: Some(lease),
        ..super::commit::Extra::default()
    };
    (engine, out, extra)
}

/// Commits the grants decided, all queued before the batcher may send any (its slots are
/// held until every one waits), so they go in as few batches as etcd's limits allow; returns
/// each one's outcome and how many etcd requests they took.
async fn commit_together(
    s: &EtcdStore,
    grants: Vec<(
        super::snapshot::Snapshot,
        leasehold_core::Engine,
        leasehold_core::Output,
        super::commit::Extra,
    )>,
) -> (Vec<Option<i64>>, u64) {
    use std::sync::atomic::Ordering;
    let b = &s.inner.batcher;
    let held = b
        .slots
        .acquire_many(super::commit::BATCHES_IN_FLIGHT as u32)
        .await
        .unwrap();
    let before = s.inner.etcd.kv_requests();
    let n = grants.len();
    let tasks: Vec<_> = grants
        .into_iter()
        .map(|(snap, engine, out, extra)| {
            let inner = std::sync::Arc::clone(&s.inner);
            tokio::spawn(async move { inner.commit(&snap, &engine, &out, extra).await })
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while b.queued.load(Ordering::Relaxed) < n {
        assert!(
            std::time::Instant::now() < deadline,
            "the commits never queued"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(held);
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap().unwrap());
    }
    (outcomes, s.inner.etcd.kv_requests() - before)
}

/// Issue 15's batched commits: two grants of one resource decided on the same snapshot,
/// committed at once while other grants wait with them, never both hold: they never share a
/// batch (etcd evaluates a batch's compares before any of its writes), so the second fails
/// its compare as if sent alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_grants_of_one_resource_committed_at_once_never_both_hold() {
    let etcd = Etcd::start();
    let s = open_counting(&etcd, "batch-race").await;
    let disk = res("disk");
    let names = |r: &ResourceName| std::collections::BTreeSet::from([r.clone()]);
    let (a, b) = (
        Owner::new(s.host().clone(), 10, 1),
        Owner::new(s.host().clone(), 11, 1),
    );
    let mut grants = Vec::new();
    for owner in [&a, &b] {
        let snap = s.inner.snapshot(&names(&disk)).await.unwrap();
        let (engine, out, extra) = decided_grant(&s, &snap, owner, &disk);
        grants.push((snap, engine, out, extra));
    }
    let others: Vec<(Owner, ResourceName)> = (0..4)
        .map(|i| {
            (
                Owner::new(s.host().clone(), 20 + i, 1),
                res(&format!("other-{i}")),
            )
        })
        .collect();
    for (owner, r) in &others {
        let snap = s.inner.snapshot(&names(r)).await.unwrap();
        let (engine, out, extra) = decided_grant(&s, &snap, owner, r);
        grants.push((snap, engine, out, extra));
    }
    let (outcomes, requests) = commit_together(&s, grants).await;
    assert_eq!(
        outcomes[..2].iter().filter(|o| o.is_some()).count(),
        1,
        "both or neither of two grants of one disk committed: {outcomes:?}"
    );
    assert!(outcomes[2..].iter().all(Option::is_some), "{outcomes:?}");
    // Batched: fewer requests than commits.
    assert!(requests < 6, "{requests} etcd requests for 6 commits");
    let view = s.inspect(disk).await.unwrap().unwrap();
    assert_eq!(view.holders.len(), 1, "{view:?}");
    for (owner, r) in &others {
        let view = s.inspect(r.clone()).await.unwrap().unwrap();
        assert_eq!(view.holders.len(), 1, "{view:?}");
        assert_eq!(&view.holders[0].owner, owner);
    }
}

/// Issue 15's batched commits: in one batch, a member whose compare fails (its resource
/// changed after its snapshot) writes nothing, and every other member is written once, as
/// if each had been sent alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_member_whose_compare_fails_costs_the_others_nothing() {
    let etcd = Etcd::start();
    let s = open_counting(&etcd, "batch-member").await;
    let names = |r: &ResourceName| std::collections::BTreeSet::from([r.clone()]);
    let members: Vec<(Owner, ResourceName)> = (0..5)
        .map(|i| {
            (
                Owner::new(s.host().clone(), 10 + i, 1),
                res(&format!("disk-{i}")),
            )
        })
        .collect();
    let mut snaps = Vec::new();
    for (_, r) in &members {
        snaps.push(s.inner.snapshot(&names(r)).await.unwrap());
    }
    // After the snapshots, another process takes disk-2.
    let first = Owner::new(s.host().clone(), 99, 1);
    s.acquire(AcquireSpec::new(
        first.clone(),
        [(res("disk-2"), Mode::Exclusive)],
    ))
    .await
    .unwrap();
    let grants = members
        .iter()
        .zip(snaps)
        .map(|((owner, r), snap)| {
            let (engine, out, extra) = decided_grant(&s, &snap, owner, r);
            (snap, engine, out, extra)
        })
        .collect();
    let (outcomes, requests) = commit_together(&s, grants).await;
    assert_eq!(requests, 1, "the five commits were not one batch");
    for (i, o) in outcomes.iter().enumerate() {
        assert_eq!(o.is_some(), i != 2, "member {i}: {outcomes:?}");
    }
    for (i, (owner, r)) in members.iter().enumerate() {
        let view = s.inspect(r.clone()).await.unwrap().unwrap();
        assert_eq!(view.holders.len(), 1, "{view:?}");
        let expect = if i == 2 { &first } else { owner };
        assert_eq!(&view.holders[0].owner, expect, "{view:?}");
    }
    let mut holders = s.local_holders().unwrap();
    holders.sort();
    let mut expect: Vec<_> = members
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 2)
        .map(|(_, (o, _))| o.process.clone())
        .chain([first.process.clone()])
        .collect();
    expect.sort();
    assert_eq!(holders, expect);
}

/// Issue 15: a commit whose compare fails answers, from its failure branch, what it compared,
/// read at its revision as a fresh snapshot reads it: the decision is made again without a
/// separate read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_compare_fails_answers_what_it_found() {
    let etcd = Etcd::start();
    let s = open_counting(&etcd, "failed-read").await;
    let disk = res("disk");
    let names = std::collections::BTreeSet::from([disk.clone()]);
    let snap = s.inner.snapshot(&names).await.unwrap();
    // After the snapshot, another process takes the disk.
    let first = Owner::new(s.host().clone(), 99, 1);
    s.acquire(AcquireSpec::new(
        first.clone(),
        [(disk.clone(), Mode::Exclusive)],
    ))
    .await
    .unwrap();
    let (engine, out, extra) =
        decided_grant(&s, &snap, &Owner::new(s.host().clone(), 10, 1), &disk);
    let before = s.inner.etcd.kv_requests();
    let r = s
        .inner
        .commit_or_read(&snap, &engine, &out, extra)
        .await
        .unwrap();
    assert_eq!(s.inner.etcd.kv_requests() - before, 1);
    let found = r
        .expect_err("the grant decided on the older snapshot committed")
        .expect("the failed commit did not answer what it found");
    let fresh = s.inner.snapshot(&names).await.unwrap();
    assert_eq!(found.revision, fresh.revision);
    assert_eq!(found.res[&disk].mod_rev, fresh.res[&disk].mod_rev);
    let holders = found.res[&disk].record.as_ref().unwrap().state.holders();
    assert_eq!(holders.len(), 1);
    assert_eq!(holders[0].owner, first);
    assert_eq!(found.sessions, fresh.sessions);
    assert_eq!(found.res[&disk].held, fresh.res[&disk].held);
}

/// Another host's store on the same prefix as `open(etcd, test)`.
async fn open_as(etcd: &Etcd, test: &str, host: &str) -> EtcdStore {
    let mut o = EtcdOptions::new(vec![etcd.endpoint()]);
    o.prefix = format!("/unit-{}-{test}/", std::process::id());
    EtcdStore::open(HostId::new(host).unwrap(), o)
        .await
        .unwrap()
}

/// Whether `s`'s mirror has any key of resource `name`.
fn mirrors(s: &EtcdStore, name: &str) -> bool {
    let m = crate::sync::read(&s.inner.mirror, "mirror");
    let r = res(name);
    super::mirror::ranges_of(&s.inner.keys, &r)
        .iter()
        .any(|(k, _)| m.kvs.keys().any(|key| key.starts_with(k)))
}

/// The next forced ending of `holder`'s lease among `events`: its reason.
async fn forced_end(
    events: &mut tokio::sync::broadcast::Receiver<leasehold_core::Event>,
    holder: &Owner,
) -> String {
    loop {
        let e = tokio::time::timeout(Duration::from_secs(30), events.recv())
            .await
            .expect("the holder was never told its lease ended")
            .unwrap();
        if let leasehold_core::Event::Ended { ended, .. } = e
            && ended.owner.process == holder.process
            && let leasehold_core::EndReason::Forced { reason, .. } = ended.how
        {
            return reason;
        }
    }
}

/// Issue 15 item 4: an agent watches only the resources it holds, waits for or used lately
/// (not every key of the cluster), and still learns at once that another host force-released
/// its holder's lease. Before, every agent mirrored every key under the prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_watches_its_own_resources_and_hears_a_force_release() {
    let etcd = Etcd::start();
    let a = open_as(&etcd, "view", "a").await;
    let b = open_as(&etcd, "view", "b").await;
    let mine = Owner::new(a.host().clone(), 10, 1);
    a.acquire(AcquireSpec::new(
        mine.clone(),
        [(res("mine"), Mode::Exclusive)],
    ))
    .await
    .unwrap();
    let theirs = Owner::new(b.host().clone(), 20, 1);
    b.acquire(AcquireSpec::new(theirs, [(res("theirs"), Mode::Exclusive)]))
        .await
        .unwrap();
    assert!(mirrors(&a, "mine"));
    assert!(!mirrors(&a, "theirs"), "a mirrors a resource only b uses");
    assert!(!mirrors(&b, "mine"), "b mirrors a resource only a uses");
    let mut events = a.subscribe();
    b.force_release(res("mine"), "the disk is needed".into(), "root".into())
        .await
        .unwrap();
    let reason = forced_end(&mut events, &mine).await;
    assert!(reason.contains("the disk is needed"), "{reason}");
}

/// A request waiting on one host is granted when another host releases: the waiting host
/// watches the resource it waits for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_is_granted_when_another_host_releases() {
    let etcd = Etcd::start();
    let a = std::sync::Arc::new(open_as(&etcd, "wake", "a").await);
    let b = open_as(&etcd, "wake", "b").await;
    let holder = Owner::new(b.host().clone(), 20, 1);
    b.acquire(AcquireSpec::new(
        holder.clone(),
        [(res("disk"), Mode::Exclusive)],
    ))
    .await
    .unwrap();
    let waiting = {
        let a = std::sync::Arc::clone(&a);
        tokio::spawn(async move {
            let w = Owner::new(a.host().clone(), 10, 1);
            a.acquire(
                AcquireSpec::new(w, [(res("disk"), Mode::Exclusive)]).wait(Duration::from_secs(60)),
            )
            .await
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while b
        .inspect(res("disk"))
        .await
        .unwrap()
        .unwrap()
        .waiters
        .is_empty()
    {
        assert!(std::time::Instant::now() < deadline, "a never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(mirrors(&a, "disk"), "a watches what it waits for");
    b.release(res("disk"), holder.process, None, None, ReleaseKind::Clean)
        .await
        .unwrap();
    let grants = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("the waiter was never granted")
        .unwrap()
        .unwrap();
    assert_eq!(grants[0].resource, res("disk"));
}

/// No event is missed across a watch restart: while this host's watch stream is down, another
/// host force-releases its holder's lease and takes the resource again, and etcd compacts that
/// history away. The watchers, re-created from where their keys were known, are refused as
/// compacted; the agent reads the resource again and fences its holder, whose ending is no
/// longer in the record (it lost the lease without an ending it could see).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_gap_past_compaction_is_read_again() {
    let etcd = Etcd::start();
    let a = open_as(&etcd, "gap", "a").await;
    let b = open_as(&etcd, "gap", "b").await;
    let mine = Owner::new(a.host().clone(), 10, 1);
    a.acquire(AcquireSpec::new(
        mine.clone(),
        [(res("disk"), Mode::Exclusive)],
    ))
    .await
    .unwrap();
    let mut events = a.subscribe();
    let mut pause = a.pause_watch();
    pause.reached().await;
    b.force_release(res("disk"), "taken while a was away".into(), "root".into())
        .await
        .unwrap();
    let other = Owner::new(b.host().clone(), 20, 1);
    b.acquire(AcquireSpec::new(other.clone(), [(res("disk"), Mode::Exclusive)]).accept_dirty())
        .await
        .unwrap();
    b.release(res("disk"), other.process, None, None, ReleaseKind::Clean)
        .await
        .unwrap();
    let (_, now) = b
        .inner
        .etcd
        .range(b"x".to_vec(), Vec::new(), 0)
        .await
        .unwrap();
    b.inner.etcd.compact(now).await.unwrap();
    pause.resume();
    let reason = forced_end(&mut events, &mine).await;
    assert!(
        reason.contains("lost this lease without an ending"),
        "{reason}"
    );
    // And the view follows etcd again from the read: a's next decision on it succeeds.
    let again = Owner::new(a.host().clone(), 11, 1);
    a.acquire(AcquireSpec::new(again, [(res("disk"), Mode::Exclusive)]).accept_dirty())
        .await
        .unwrap();
}

/// An agent's own commits are written into its view at once, and the watch brings them back
/// later: an older event arriving after a newer commit of this agent must not be taken for a
/// change made outside leasehold. Here the watch is held back while the agent grants, releases
/// and grants again; before the mirror kept its own newer keys over older events, the first
/// grant's event, applied over the second grant, fenced the second holder as one that "lost
/// this lease without an ending" (seen in `etcd_history.rs`'s churn).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_watch_events_do_not_undo_this_hosts_own_commits() {
    let etcd = Etcd::start();
    let s = open(&etcd, "own").await;
    let mut events = s.subscribe();
    let first = Owner::new(s.host().clone(), 10, 1);
    s.acquire(AcquireSpec::new(
        first.clone(),
        [(res("disk"), Mode::Exclusive)],
    ))
    .await
    .unwrap();
    let mut pause = s.pause_watch();
    pause.reached().await;
    s.release(
        res("disk"),
        first.process.clone(),
        None,
        None,
        ReleaseKind::Clean,
    )
    .await
    .unwrap();
    let second = Owner::new(s.host().clone(), 11, 1);
    s.acquire(AcquireSpec::new(
        second.clone(),
        [(res("disk"), Mode::Exclusive)],
    ))
    .await
    .unwrap();
    let third = Owner::new(s.host().clone(), 12, 1);
    s.release(
        res("disk"),
        second.process.clone(),
        None,
        None,
        ReleaseKind::Clean,
    )
    .await
    .unwrap();
    s.acquire(AcquireSpec::new(
        third.clone(),
        [(res("disk"), Mode::Exclusive)],
    ))
    .await
    .unwrap();
    pause.resume();
    // Every event comes back, in order, and no holder is fenced on the way (a fencing of
    // the last holder would come with an earlier event than its grant's).
    loop {
        let e = tokio::time::timeout(Duration::from_secs(30), events.recv())
            .await
            .expect("the watch never caught up")
            .unwrap();
        if let leasehold_core::Event::Ended { ended, .. } = &e {
            assert!(
                !matches!(ended.how, leasehold_core::EndReason::Forced { .. }),
                "a holder was fenced: {e:?}"
            );
        }
        if matches!(&e, leasehold_core::Event::Granted { lease, .. } if lease.owner.process == third.process)
        {
            break;
        }
    }
    s.release(res("disk"), third.process, None, None, ReleaseKind::Clean)
        .await
        .unwrap();
}

/// This agent's own commit is published once: at the commit, unless the watch delivered that
/// revision of the record first (it may, before the commit's answer is read), and then by the
/// watch only. Before, both published it in that case: a second "ended" for one release
/// (conformance `events_are_published_after_they_are_durable` failed about one run in twelve).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_own_commit_the_watch_delivers_first_is_published_once() {
    use leasehold_core::Event;
    let etcd = Etcd::start();
    let s = open(&etcd, "published-once").await;
    let owner = Owner::new(s.host().clone(), 10, 1);
    let disk = res("disk");
    s.acquire(AcquireSpec::new(
        owner.clone(),
        [(disk.clone(), Mode::Exclusive)],
    ))
    .await
    .unwrap();
    // The disk's watchers deliver its record from here on.
    watchers_delivered(&s, &disk).await;
    let mut events = s.subscribe();
    let mut pause = s.pause_next_commit();
    let ended = |e: &Event| matches!(e, Event::Ended { ended, .. } if ended.owner == owner);
    let release = s.release(
        disk.clone(),
        owner.process.clone(),
        None,
        None,
        ReleaseKind::Clean,
    );
    let meanwhile = async {
        // etcd answered the release; the commit waits before anything here learns of it.
        pause.reached().await;
        // The watch delivers it first, and publishes its ending.
        loop {
            let e = tokio::time::timeout(Duration::from_secs(20), events.recv())
                .await
                .expect("the watch never delivered the release")
                .unwrap();
            if ended(&e) {
                break;
            }
        }
        pause.resume();
    };
    let (released, ()) = tokio::join!(release, meanwhile);
    released.unwrap();
    // The commit publishes before the release returns: a second ending would be here now.
    while let Ok(e) = events.try_recv() {
        assert!(!ended(&e), "the release's ending was published twice");
    }
}

/// An acquire that does not wait runs on its caller's task (no task of its own, since it
/// writes no waiter key), and to its end even if its caller drops it midway, as the task it
/// ran as before did: dropped once etcd has answered its commit, the rest of the commit (the
/// view written, the grant's events published, the index of holders) still happens. A plain
/// `.await` on the caller's task would stop there, with the grant written and this store's
/// own bookkeeping of it left to the watch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_that_does_not_wait_finishes_its_commit_when_dropped() {
    let etcd = Etcd::start();
    let s = open(&etcd, "dropped-plain").await;
    let owner = Owner::new(s.host().clone(), 10, 1);
    let disk = res("disk");
    let mut answered = s.pause_next_commit();
    let mut published = s.pause_next_published();
    let acquire = s.acquire(AcquireSpec::new(
        owner.clone(),
        [(disk.clone(), Mode::Exclusive)],
    ));
    tokio::select! {
        r = acquire => panic!("the commit cannot end while it is paused: {r:?}"),
        () = answered.reached() => {}
    }
    // The acquire is dropped here, with etcd's answer in hand.
    answered.resume();
    tokio::time::timeout(Duration::from_secs(20), published.reached())
        .await
        .expect("the dropped acquire's commit never went on to publish its grant");
    published.resume();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !s.local_holders().unwrap().contains(&owner.process) {
        assert!(
            std::time::Instant::now() < deadline,
            "the dropped acquire's grant never reached the index of holders"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A process whose leases are on a session that ended (its agent fenced it, then ends its
/// leases) has them all ended, however many: each such resource also starts a grace (its
/// key's compare and put), which the transactions' size allows for. Before, 30 to a
/// transaction needed 153 operations and every one was refused ("name fewer resources"):
/// the leases stayed held (seen in the many-hosts bench after a stall).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_on_an_ended_session_has_its_sixty_leases_ended() {
    let etcd = Etcd::start();
    let s = open(&etcd, "ended-sixty").await;
    let owner = Owner::new(s.host().clone(), 10, 1);
    let names: Vec<ResourceName> = (0..60).map(|i| res(&format!("disk-{i}"))).collect();
    for part in names.chunks(20) {
        s.acquire(AcquireSpec::new(
            owner.clone(),
            part.iter().map(|r| (r.clone(), Mode::Exclusive)),
        ))
        .await
        .unwrap();
    }
    let mut session = s.session().unwrap();
    let old = session.borrow().id;
    s.inner
        .etcd
        .lease_revoke(s.inner.lease().unwrap())
        .await
        .unwrap();
    // The store has seen its session end.
    tokio::time::timeout(
        Duration::from_secs(30),
        session.wait_for(|st| st.expired || st.id != old),
    )
    .await
    .expect("the store never saw its session end")
    .unwrap();
    // Its leases end as their session's (session-expired, each resource starting a grace),
    // in transactions etcd takes.
    s.end_process(owner.process.clone()).await.unwrap();
    for r in &names {
        let view = s.inspect(r.clone()).await.unwrap().unwrap();
        assert!(view.holders.is_empty(), "{r}: {view:?}");
    }
}

/// G7 on a view behind the queue: a resource handed over to another host's waiter stays
/// reserved for it, even for a third owner on the source's host whose view has the handover
/// (its own commit, written into the view at once) but not yet the waiter's key (the view's
/// waiter watcher lags its record). Before, the decision from the view dropped a reservation
/// for a waiter it did not see, and the commit compared no waiter key of a resource it saw
/// free: the third owner was granted the disk inside the handover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_stays_reserved_against_a_view_that_has_not_seen_the_waiter() {
    let etcd = Etcd::start();
    let a = open_as(&etcd, "handover-view", "a").await;
    let b = std::sync::Arc::new(open_as(&etcd, "handover-view", "b").await);
    let disk = res("disk");
    let source = Owner::new(a.host().clone(), 10, 1);
    a.acquire(AcquireSpec::new(
        source.clone(),
        [(disk.clone(), Mode::Exclusive)],
    ))
    .await
    .unwrap();
    // a's watch is held back: the waiter b queues next is not in a's view.
    let mut a_pause = a.pause_watch();
    a_pause.reached().await;
    let target = Owner::new(b.host().clone(), 20, 1);
    let waiting = {
        let b = std::sync::Arc::clone(&b);
        let target = target.clone();
        let disk = disk.clone();
        tokio::spawn(async move {
            b.acquire(
                AcquireSpec::new(target, [(disk, Mode::Exclusive)]).wait(Duration::from_secs(60)),
            )
            .await
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while b
        .inspect(disk.clone())
        .await
        .unwrap()
        .unwrap()
        .waiters
        .is_empty()
    {
        assert!(std::time::Instant::now() < deadline, "b never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // b does not hear the handover yet either, so it cannot take the disk first.
    let mut b_pause = b.pause_watch();
    b_pause.reached().await;
    a.release(
        disk.clone(),
        source.process.clone(),
        None,
        None,
        ReleaseKind::Handover {
            host: b.host().clone(),
            label: None,
        },
    )
    .await
    .unwrap();
    let third = Owner::new(a.host().clone(), 11, 1);
    let taken = a
        .acquire(AcquireSpec::new(
            third.clone(),
            [(disk.clone(), Mode::Exclusive)],
        ))
        .await;
    assert!(
        taken.is_err(),
        "a third owner was granted a disk handed over to b's waiter: {taken:?}"
    );
    a_pause.resume();
    b_pause.resume();
    let grants = tokio::time::timeout(Duration::from_secs(30), waiting)
        .await
        .expect("the handover's target was never granted")
        .unwrap()
        .unwrap();
    assert_eq!(grants[0].resource, disk);
}

/// The forget pass reads the records a page at a time ([`crate::etcd::history::FORGET_PAGE`]
/// keys): free, clean records on every page are forgotten, and a held one among them stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgetting_walks_the_records_page_by_page() {
    use crate::etcd::client::{Etcd as Client, Txn, prefix_end};
    use crate::etcd::history::FORGET_PAGE;
    use crate::etcd::keys::Keys;

    let etcd = Etcd::start();
    let mut o = EtcdOptions::new(vec![etcd.endpoint()]);
    o.prefix = format!("/unit-{}-forget-pages/", std::process::id());
    o.history.compact_every = Some(Duration::from_secs(1));
    o.history.forget_after = Some(Duration::from_secs(1));
    let keys = Keys::new(&o.prefix);
    let client = Client::connect(&[etcd.endpoint()], Duration::from_secs(5)).unwrap();
    let free = usize::try_from(FORGET_PAGE).unwrap() * 2 + 100;
    let names: Vec<String> = (0..free).map(|i| format!("r{i:05}")).collect();
    for chunk in names.chunks(100) {
        let mut t = Txn::new();
        for n in chunk {
            t = t.put(
                keys.resource(&res(n)),
                br#"{"holders":[],"last_token":1}"#.to_vec(),
                None,
            );
        }
        assert!(client.txn(t).await.unwrap().succeeded);
    }
    let s = EtcdStore::open(HostId::new("a").unwrap(), o).await.unwrap();
    let holder = Owner::new(s.host().clone(), 10, 1);
    let kept = res(&names[free / 2]);
    s.acquire(AcquireSpec::new(
        holder.clone(),
        [(kept.clone(), Mode::Exclusive)],
    ))
    .await
    .unwrap();
    let from = keys.resources();
    let count = || async {
        client
            .range(from.clone(), prefix_end(&from), 0)
            .await
            .unwrap()
            .0
            .len()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    // One pass forgets them all: the pass, not later rounds, walks every page.
    let first = loop {
        let forgotten = s.etcd_health().unwrap().forgotten;
        if forgotten > 0 {
            break forgotten;
        }
        assert!(std::time::Instant::now() < deadline, "nothing forgotten");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(first, free as u64 - 1);
    // The held record and its held key are all that is left.
    while count().await > 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} keys left of {free} free records",
            count().await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (left, _) = client
        .range(from.clone(), prefix_end(&from), 0)
        .await
        .unwrap();
    assert_eq!(left[0].key, keys.resource(&kept));
    let view = s.inspect(kept.clone()).await.unwrap().unwrap();
    assert_eq!(view.holders.len(), 1, "{view:?}");
    assert_eq!(view.holders[0].owner, holder);
}

/// A commit that etcd answers after its resources left the view (the answer took longer than
/// the view keeps a resource used: 10 s) reads them back in and checks this host's holders
/// against what changed meanwhile, version by version: a holder released here, its resource
/// then taken by another host, is not fenced (it lost nothing: its ending is in the version
/// between); a holder another host force-released is (that ending is published, and the agent
/// kills it). Before, the commit's record was compared with the latest alone, and the holder
/// of `disk-a` was fenced as one that "lost this lease without an ending": a healthy process
/// killed (G3's false fence).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_answered_after_its_resources_left_the_view_fences_only_lost_holders() {
    use leasehold_core::{EndReason, Event};
    let etcd = Etcd::start();
    let a = std::sync::Arc::new(open_as(&etcd, "rejoin", "a").await);
    let b = open_as(&etcd, "rejoin", "b").await;
    let (disk_a, disk_b) = (res("disk-a"), res("disk-b"));
    let both = [
        (disk_a.clone(), Mode::Exclusive),
        (disk_b.clone(), Mode::Exclusive),
    ];
    // Both have records, in a's view: the next acquire is decided from it.
    let first = Owner::new(a.host().clone(), 9, 1);
    a.acquire(AcquireSpec::new(first.clone(), both.clone()))
        .await
        .unwrap();
    for r in [&disk_a, &disk_b] {
        a.release(
            r.clone(),
            first.process.clone(),
            None,
            None,
            ReleaseKind::Clean,
        )
        .await
        .unwrap();
    }
    let leave = |r: &ResourceName| crate::sync::write(&a.inner.mirror, "mirror").leave_as_unused(r);
    let holder = Owner::new(a.host().clone(), 10, 1);
    let mut events = a.subscribe();
    let mut pause = a.pause_next_commit();
    let acquiring = {
        let a = std::sync::Arc::clone(&a);
        let spec = AcquireSpec::new(holder.clone(), both.clone());
        tokio::spawn(async move { a.acquire(spec).await })
    };
    // etcd granted both; a has not read the answer yet.
    pause.reached().await;
    leave(&disk_b);
    // disk-a: released here (its ending is in that version), then taken by b.
    a.release(
        disk_a.clone(),
        holder.process.clone(),
        None,
        None,
        ReleaseKind::Clean,
    )
    .await
    .unwrap();
    b.acquire(AcquireSpec::new(
        Owner::new(b.host().clone(), 20, 1),
        [(disk_a.clone(), Mode::Exclusive)],
    ))
    .await
    .unwrap();
    // disk-b: force-released by b's admin, then taken by b.
    b.force_release(disk_b.clone(), "taken for b".into(), "root".into())
        .await
        .unwrap();
    b.acquire(
        AcquireSpec::new(
            Owner::new(b.host().clone(), 21, 1),
            [(disk_b.clone(), Mode::Exclusive)],
        )
        .accept_dirty(),
    )
    .await
    .unwrap();
    // Past the view's 10 s: neither is in a's view when the answer is read.
    leave(&disk_a);
    pause.resume();
    acquiring.await.unwrap().unwrap();
    // The first forced ending of the holder is disk-b's (the two are checked in name order).
    let resource = loop {
        let e = tokio::time::timeout(Duration::from_secs(30), events.recv())
            .await
            .expect("the force-released holder was never fenced")
            .unwrap();
        if let Event::Ended {
            resource, ended, ..
        } = e
            && ended.owner.process == holder.process
            && let EndReason::Forced { reason, .. } = &ended.how
        {
            eprintln!("{resource}: forced: {reason}");
            break resource;
        }
    };
    assert_eq!(
        resource, disk_b,
        "the holder released here, whose resource another host took since, was fenced"
    );
}

/// `leasehold watch` sees every event after its start: `subscribe_all` returns once the watch
/// of every resource delivers everything from then on. Before, it returned at once and that
/// watch started later, from whatever revision etcd had by then: an event made meanwhile was
/// missed. One thread, and the event made by etcdctl, which blocks it: nothing of the store
/// runs between the return and the event.
#[tokio::test(flavor = "current_thread")]
async fn subscribe_all_receives_every_event_made_after_it_returns() {
    let etcd = Etcd::start();
    let a = open_as(&etcd, "watch-start", "a").await;
    let b = open_as(&etcd, "watch-start", "b").await;
    let mut all = a.subscribe_all().await.unwrap();
    // b's session ends: its host key is deleted.
    let key = String::from_utf8(a.inner.keys.host(b.host())).unwrap();
    let out = etcd.etcdctl(&["del", &key]);
    assert!(out.status.success(), "{out:?}");
    loop {
        let e = tokio::time::timeout(Duration::from_secs(30), all.recv())
            .await
            .expect("the end of b's session, made after subscribe_all returned, was missed")
            .unwrap();
        if matches!(&e, leasehold_core::Event::SessionExpired { host, .. } if host == b.host()) {
            break;
        }
    }
}

/// A watch of every resource that cannot deliver every event (its stream broke, and etcd
/// compacted the history it was to go on from) ends its receivers, after the events they
/// have, rather than go on from the present as if nothing had been missed: `leasehold watch`
/// then tells its client to watch again and inspect. Before, it went on from the present and
/// the receiver never learned of b's grant and release.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_of_every_resource_past_compaction_ends_its_receivers() {
    use tokio::sync::broadcast::error::RecvError;
    let etcd = Etcd::start();
    let a = open_as(&etcd, "watch-gap", "a").await;
    let b = open_as(&etcd, "watch-gap", "b").await;
    let mut all = a.subscribe_all().await.unwrap();
    let mut pause = a.pause_watch_all();
    pause.reached().await;
    let other = Owner::new(b.host().clone(), 20, 1);
    b.acquire(AcquireSpec::new(
        other.clone(),
        [(res("disk"), Mode::Exclusive)],
    ))
    .await
    .unwrap();
    b.release(res("disk"), other.process, None, None, ReleaseKind::Clean)
        .await
        .unwrap();
    let (_, now) = b
        .inner
        .etcd
        .range(b"x".to_vec(), Vec::new(), 0)
        .await
        .unwrap();
    b.inner.etcd.compact(now).await.unwrap();
    pause.resume();
    let got = tokio::time::timeout(Duration::from_secs(30), all.recv())
        .await
        .expect("the receiver was never told that its watch missed events");
    assert!(matches!(got, Err(RecvError::Closed)), "{got:?}");
    // A new watch starts from its own start.
    let mut again = a.subscribe_all().await.unwrap();
    let third = Owner::new(b.host().clone(), 21, 1);
    b.acquire(AcquireSpec::new(
        third.clone(),
        [(res("disk"), Mode::Exclusive)],
    ))
    .await
    .unwrap();
    loop {
        let e = tokio::time::timeout(Duration::from_secs(30), again.recv())
            .await
            .expect("the new watch missed b's grant")
            .unwrap();
        if matches!(&e, leasehold_core::Event::Granted { lease, .. } if lease.owner == third) {
            break;
        }
    }
}

/// Subscribers see each resource's events in the order of its versions: this agent's commit
/// publishes its events under the view's lock, as the watch does. Before, the commit published
/// after letting that lock go, and the watch could publish the resource's next version (here:
/// another host's grant) in between: the grant came before the release it followed. The
/// commit is held right after that point, and a's watch is held back until then (so the
/// commit, not the watch, publishes the release).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resources_events_are_published_in_the_order_of_its_versions() {
    use leasehold_core::Event;
    let etcd = Etcd::start();
    let a = open_as(&etcd, "in-order", "a").await;
    let b = open_as(&etcd, "in-order", "b").await;
    let disk = res("disk");
    let mine = Owner::new(a.host().clone(), 10, 1);
    a.acquire(AcquireSpec::new(
        mine.clone(),
        [(disk.clone(), Mode::Exclusive)],
    ))
    .await
    .unwrap();
    // The disk's watchers deliver its record from here on.
    watchers_delivered(&a, &disk).await;
    let mut events = a.subscribe();
    let mut watch = a.pause_watch();
    watch.reached().await;
    let mut pause = a.pause_next_published();
    let released = a.release(
        disk.clone(),
        mine.process.clone(),
        None,
        None,
        ReleaseKind::Clean,
    );
    let theirs = Owner::new(b.host().clone(), 20, 1);
    let meanwhile = async {
        pause.reached().await;
        // b takes the disk; a's watch, back, delivers that version and publishes its grant.
        b.acquire(AcquireSpec::new(
            theirs.clone(),
            [(disk.clone(), Mode::Exclusive)],
        ))
        .await
        .unwrap();
        watch.resume();
        let mut seen = Vec::new();
        loop {
            let e = tokio::time::timeout(Duration::from_secs(20), events.recv())
                .await
                .expect("b's grant was never published")
                .unwrap();
            let granted = matches!(&e, Event::Granted { lease, .. } if lease.owner == theirs);
            seen.push(e);
            if granted {
                break;
            }
        }
        pause.resume();
        seen
    };
    let (released, seen) = tokio::join!(released, meanwhile);
    released.unwrap();
    let ended = seen
        .iter()
        .position(|e| matches!(e, Event::Ended { ended, .. } if ended.owner == mine));
    assert!(
        ended.is_some_and(|i| i + 1 < seen.len()),
        "b's grant was published before the release it followed: {seen:?}"
    );
}

/// Issue 15 item 4, the many-hosts fill stall: a host's session lease carries its host key,
/// not a key per resource it holds. With the held keys on it, the revoke of a host that died
/// holding 10,000 resources deleted 10,000 keys in one raft entry (1.7 s to apply on a busy
/// 3-member leader), and etcd 3.4.20 on answers no renewal while its apply is behind: every
/// other host's renewals stalled and they fenced their holders. The held keys stay until
/// each holder is cleared, by the transaction that clears it (here another host's grant
/// after the grace).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_lease_carries_no_key_per_resource_held() {
    let etcd = Etcd::start();
    let a = open_as(&etcd, "held-off-lease", "a").await;
    let owner = Owner::new(a.host().clone(), 10, 1);
    let names: Vec<ResourceName> = (0..40).map(|i| res(&format!("disk-{i}"))).collect();
    for part in names.chunks(20) {
        a.acquire(AcquireSpec::new(
            owner.clone(),
            part.iter().map(|r| (r.clone(), Mode::Exclusive)),
        ))
        .await
        .unwrap();
    }
    let lease = a.inner.lease().unwrap();
    let out = etcd.etcdctl(&["lease", "timetolive", &lease.to_string(), "--keys"]);
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let prefix = a.inner.keys.prefix().to_owned();
    assert!(said.contains(&format!("{prefix}hosts/a")), "{said}");
    assert_eq!(
        said.matches(&format!("{prefix}res/")).count(),
        0,
        "keys of the resources held are on the session's lease: {said}"
    );
    let held = |kvs: &[crate::etcd::pb::mvccpb::KeyValue], r: &ResourceName| {
        kvs.iter()
            .filter(|kv| {
                matches!(a.inner.keys.parse(&kv.key),
                    Some(crate::etcd::keys::KeyKind::Held(n, l)) if &n == r && l == lease)
            })
            .count()
    };
    let everything = || async {
        let p = prefix.as_bytes().to_vec();
        a.inner
            .etcd
            .range(p.clone(), crate::etcd::client::prefix_end(&p), 0)
            .await
            .unwrap()
            .0
    };
    let kvs = everything().await;
    assert!(names.iter().all(|r| held(&kvs, r) == 1), "a held key each");
    // a's host dies: its session ends, its holders stay listed (and their held keys) until
    // cleared; b is granted disk-0 after the grace, which clears a's holder and held key.
    a.inner.etcd.lease_revoke(lease).await.unwrap();
    let b = open_as(&etcd, "held-off-lease", "b").await;
    let taker = Owner::new(b.host().clone(), 20, 1);
    let got = b
        .acquire(
            AcquireSpec::new(taker, [(names[0].clone(), Mode::Exclusive)])
                .accept_dirty()
                .wait(Duration::from_secs(60)),
        )
        .await
        .unwrap();
    assert_eq!(got[0].resource, names[0]);
    let kvs = everything().await;
    assert_eq!(
        held(&kvs, &names[0]),
        0,
        "the cleared holder's held key stayed"
    );
    assert!(names[1..].iter().all(|r| held(&kvs, r) == 1));
}

/// A refusal decided from the view that also writes (it ends a dead session's holder of
/// another resource asked for) is decided again on a fresh read once that is written: its
/// commit compares only the records it changes, not the one it refused on, which the view may
/// show held by a holder gone since. Here a's view (its watch held back) still shows disk-a
/// held by b, released meanwhile; disk-b's holder is on a dead session. Before, the caller was
/// told disk-a was held; it is free, and the refusal is disk-b's grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_from_the_view_that_writes_is_decided_again_on_a_fresh_read() {
    let etcd = Etcd::start();
    let a = open_as(&etcd, "stale-refusal", "a").await;
    let b = open_as(&etcd, "stale-refusal", "b").await;
    let c = open_as(&etcd, "stale-refusal", "c").await;
    let (disk_a, disk_b) = (res("disk-a"), res("disk-b"));
    let theirs = Owner::new(b.host().clone(), 20, 1);
    b.acquire(AcquireSpec::new(
        theirs.clone(),
        [(disk_a.clone(), Mode::Exclusive)],
    ))
    .await
    .unwrap();
    c.acquire(AcquireSpec::new(
        Owner::new(c.host().clone(), 30, 1),
        [(disk_b.clone(), Mode::Exclusive)],
    ))
    .await
    .unwrap();
    // Both join a's view (refused, read fresh).
    let mine = Owner::new(a.host().clone(), 10, 1);
    for r in [&disk_a, &disk_b] {
        a.acquire(AcquireSpec::new(
            mine.clone(),
            [(r.clone(), Mode::Exclusive)],
        ))
        .await
        .unwrap_err();
    }
    // c's session ends, and a sees it.
    let c_lease = c.inner.lease().unwrap();
    let c_key = a.inner.keys.host(c.host());
    drop(c);
    a.inner.etcd.lease_revoke(c_lease).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while crate::sync::read(&a.inner.mirror, "mirror")
        .kvs
        .contains_key(&c_key)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "a never saw c's session end"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // a's watch is held back while b releases disk-a.
    let mut pause = a.pause_watch();
    pause.reached().await;
    b.release(
        disk_a.clone(),
        theirs.process,
        None,
        None,
        ReleaseKind::Clean,
    )
    .await
    .unwrap();
    let e = a
        .acquire(AcquireSpec::new(
            mine.clone(),
            [
                (disk_a.clone(), Mode::Exclusive),
                (disk_b.clone(), Mode::Exclusive),
            ],
        ))
        .await
        .unwrap_err();
    pause.resume();
    let msg = e.to_string();
    assert!(
        msg.contains("disk-b") && !msg.contains("disk-a"),
        "refused for a holder gone since: {msg}"
    );
}

/// A waiting acquire decided from the view compares the records it queues behind: a view that
/// is behind etcd may show a holder released since, and the request must not queue behind it.
/// Here a's watch is held back while b releases disk; a's waiting acquire, decided from the
/// view that still shows b, writes no waiter key and is granted on what its commit found.
/// Before, it wrote its waiter key with no compare on disk's record (a place in the queue of a
/// free disk, ahead of any other host's request), and was granted only once its waiter was
/// decided again on a fresh read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_acquire_from_a_stale_view_does_not_queue_behind_a_released_holder() {
    let etcd = Etcd::start();
    let a = open_as(&etcd, "stale-queue", "a").await;
    let b = open_as(&etcd, "stale-queue", "b").await;
    let disk = res("disk");
    let theirs = Owner::new(b.host().clone(), 20, 1);
    let first = b
        .acquire(AcquireSpec::new(
            theirs.clone(),
            [(disk.clone(), Mode::Exclusive)],
        ))
        .await
        .unwrap();
    // disk joins a's view (refused, read fresh), showing b's holder.
    let mine = Owner::new(a.host().clone(), 10, 1);
    a.acquire(AcquireSpec::new(
        mine.clone(),
        [(disk.clone(), Mode::Exclusive)],
    ))
    .await
    .unwrap_err();
    watchers_delivered(&a, &disk).await;
    // a's watch is held back while b releases disk.
    let mut pause = a.pause_watch();
    pause.reached().await;
    b.release(disk.clone(), theirs.process, None, None, ReleaseKind::Clean)
        .await
        .unwrap();
    let view = a.inner.guessed_snapshot(&[disk.clone()].into()).unwrap();
    let held = view.res[&disk].record.as_ref().unwrap().state.holders();
    assert_eq!(
        held.len(),
        1,
        "a's view is not behind: the test shows nothing"
    );
    let (_, released) = waiter_keys(&a, &disk, 0).await;
    let grants = a
        .acquire(
            AcquireSpec::new(mine.clone(), [(disk.clone(), Mode::Exclusive)])
                .wait(Duration::from_secs(30)),
        )
        .await;
    pause.resume();
    let grants = grants.expect("the free disk was not granted");
    assert!(grants[0].token > first[0].token);
    // Every revision from b's release to the grant: no waiter key of disk at any.
    no_waiter_key_since(&a, &disk, released, "a free disk: released").await;
}

/// The same for a grace: a waiting acquire decided from a view that still shows a grace etcd
/// has ended queues nothing and is granted on what its commit found. Here c died holding disk;
/// its grace started; a's watch is held back while etcd ends the grace. Before, a wrote its
/// waiter key behind the ended grace (its commit compared the record only, which had not
/// moved).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_acquire_from_a_stale_view_does_not_queue_behind_an_ended_grace() {
    let etcd = Etcd::start();
    let open_short = |host: &'static str| {
        let mut o = EtcdOptions::new(vec![etcd.endpoint()]);
        o.prefix = format!("/unit-{}-stale-grace/", std::process::id());
        o.grace = Duration::from_secs(2);
        EtcdStore::open(HostId::new(host).unwrap(), o)
    };
    let a = open_short("a").await.unwrap();
    let c = open_short("c").await.unwrap();
    let disk = res("disk");
    let names = std::collections::BTreeSet::from([disk.clone()]);
    c.acquire(AcquireSpec::new(
        Owner::new(c.host().clone(), 30, 1),
        [(disk.clone(), Mode::Exclusive)],
    ))
    .await
    .unwrap();
    // disk joins a's view (refused, read fresh).
    let mine = Owner::new(a.host().clone(), 10, 1);
    let ask = || AcquireSpec::new(mine.clone(), [(disk.clone(), Mode::Exclusive)]);
    a.acquire(ask()).await.unwrap_err();
    watchers_delivered(&a, &disk).await;
    // c's session ends, and a sees it.
    let c_lease = c.inner.lease().unwrap();
    let c_key = a.inner.keys.host(c.host());
    drop(c);
    a.inner.etcd.lease_revoke(c_lease).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while crate::sync::read(&a.inner.mirror, "mirror")
        .kvs
        .contains_key(&c_key)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "a never saw c's session end"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // a ends c's lease (dirty) and starts its grace, and its view shows the grace.
    let e = a.acquire(ask()).await.unwrap_err();
    assert!(e.to_string().contains("grace period"), "{e}");
    let graced = || {
        a.inner
            .guessed_snapshot(&names)
            .is_some_and(|s| s.res[&disk].grace)
    };
    while !graced() {
        assert!(
            std::time::Instant::now() < deadline,
            "a's view never showed the grace"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // a's watch is held back while etcd ends the grace.
    let mut pause = a.pause_watch();
    pause.reached().await;
    let grace_key = a.inner.keys.grace(&disk);
    let ended = loop {
        let (kvs, rev) = a
            .inner
            .etcd
            .range(grace_key.clone(), Vec::new(), 0)
            .await
            .unwrap();
        if kvs.is_empty() {
            break rev;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "etcd never ended the grace"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(graced(), "a's view is not behind: the test shows nothing");
    let mut spec = ask().wait(Duration::from_secs(10));
    spec.accept_dirty = true;
    let grants = a.acquire(spec).await;
    pause.resume();
    grants.expect("the disk, its grace over, was not granted");
    no_waiter_key_since(&a, &disk, ended, "behind a grace: ended").await;
}

/// [`open`] with `timeout` as the request timeout (how long a commit is held back at most).
async fn open_with_timeout(etcd: &Etcd, test: &str, timeout: Duration) -> EtcdStore {
    let mut o = EtcdOptions::new(vec![etcd.endpoint()]);
    o.prefix = format!("/unit-{}-{test}/", std::process::id());
    o.timeout = timeout;
    EtcdStore::open(HostId::new("a").unwrap(), o).await.unwrap()
}

/// Makes `s` send a keep-alive that stops once sent (its first commit asks for one: none was
/// sent since the session opened), and waits until that keep-alive counts as late.
async fn renewal_late(s: &EtcdStore, owner: &Owner) -> super::SnapshotPause {
    renewal_late_holding(s, owner, &["first"]).await
}

/// [`renewal_late`], its first commit a grant of `names` to `owner`.
async fn renewal_late_holding(
    s: &EtcdStore,
    owner: &Owner,
    names: &[&str],
) -> super::SnapshotPause {
    let mut renewal = s.pause_next_renewal();
    s.acquire(AcquireSpec::new(
        owner.clone(),
        names.iter().map(|n| (res(n), Mode::Exclusive)),
    ))
    .await
    .unwrap();
    tokio::time::timeout(Duration::from_secs(30), renewal.reached())
        .await
        .expect("a commit asked for no keep-alive");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while s.inner.pace.borrow().open(std::time::Instant::now()) {
        assert!(
            std::time::Instant::now() < deadline,
            "a keep-alive unanswered never made the pace late"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    renewal
}

/// Whether etcd has `name`'s record.
async fn recorded(s: &EtcdStore, name: &str) -> bool {
    let (kvs, _) = s
        .inner
        .etcd
        .range(s.inner.keys.resource(&res(name)), Vec::new(), 0)
        .await
        .unwrap();
    !kvs.is_empty()
}

/// An exclusive acquire of `second` by `owner`, spawned, once it is held back (the renewal is
/// late): fails if it is sent, or is not held back within 30 s.
async fn acquire_held_back(
    s: &std::sync::Arc<EtcdStore>,
    owner: &Owner,
) -> tokio::task::JoinHandle<Result<Vec<crate::Grant>, StoreError>> {
    let acquire = tokio::spawn({
        let s = std::sync::Arc::clone(s);
        let owner = owner.clone();
        async move {
            s.acquire(AcquireSpec::new(owner, [(res("second"), Mode::Exclusive)]))
                .await
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while s.inner.commits_held() == 0 {
        assert!(
            !acquire.is_finished(),
            "the acquire went while the renewal was late: {:?}",
            acquire.await
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the acquire was never held back"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    acquire
}

/// Issue 15, "Many hosts": etcd's leader answers a renewal only once it has applied every entry
/// committed before it, and a full-rate fill by 50 hosts kept it so far behind that every
/// host's renewals went unanswered and all 50 fenced their holders. A host now sends no commit
/// while one of its keep-alives goes unanswered past `RENEWAL_LATE`, and sends it, unchanged,
/// once one is answered promptly. Fails without the hold: the acquire is written while the
/// keep-alive hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_is_held_back_while_a_renewal_is_late_and_sent_once_one_is_prompt() {
    let etcd = Etcd::start();
    let s =
        std::sync::Arc::new(open_with_timeout(&etcd, "pace-hold", Duration::from_secs(60)).await);
    let owner = Owner::new(s.host().clone(), 10, 1);
    let renewal = renewal_late(&s, &owner).await;
    let acquire = acquire_held_back(&s, &owner).await;
    assert!(!recorded(&s, "second").await, "written while held back");
    assert!(!acquire.is_finished());
    // The keep-alive is answered (late: the hold stays), another is asked for at once and
    // answered promptly: the commit goes.
    renewal.resume();
    let got = tokio::time::timeout(Duration::from_secs(30), acquire)
        .await
        .expect("the held commit was never sent")
        .unwrap()
        .unwrap();
    assert_eq!(got[0].resource, res("second"));
    assert!(recorded(&s, "second").await);
    assert_eq!(s.inner.commits_held(), 0);
}

/// A commit held back past the request timeout is not sent at all: the caller is told etcd is
/// unavailable, and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_held_back_past_the_timeout_fails_unwritten() {
    let etcd = Etcd::start();
    let s = open_with_timeout(&etcd, "pace-timeout", Duration::from_secs(2)).await;
    let owner = Owner::new(s.host().clone(), 10, 1);
    let renewal = renewal_late(&s, &owner).await;
    let e = s
        .acquire(AcquireSpec::new(
            owner.clone(),
            [(res("second"), Mode::Exclusive)],
        ))
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
    assert!(e.to_string().contains("held back"), "{e}");
    assert!(!recorded(&s, "second").await, "written after all");
    assert_eq!(s.inner.commits_held(), 0);
    renewal.resume();
}

/// A commit that only ends leases is not held back while a keep-alive is late: a release, and
/// the end of a dead holder's leases (G4 wants those within 100 ms), go at once; an acquire
/// still waits. Fails with every commit held (as 8209d8b had it): the release waits for a
/// prompt keep-alive, here never (the request timeout is a minute).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_that_only_ends_leases_is_not_held_back_while_a_renewal_is_late() {
    let etcd = Etcd::start();
    let s = std::sync::Arc::new(
        open_with_timeout(&etcd, "pace-release", Duration::from_secs(60)).await,
    );
    let owner = Owner::new(s.host().clone(), 10, 1);
    let renewal = renewal_late_holding(&s, &owner, &["first", "third"]).await;
    let held = async |s: &EtcdStore, name: &str| {
        let name = res(name);
        s.list()
            .await
            .unwrap()
            .iter()
            .any(|v| v.resource == name && !v.holders.is_empty())
    };
    assert!(held(&s, "third").await && held(&s, "first").await);
    let released = tokio::time::timeout(
        Duration::from_secs(30),
        s.release(
            res("third"),
            owner.process.clone(),
            None,
            None,
            ReleaseKind::Clean,
        ),
    )
    .await
    .expect("the release was held back while the renewal was late");
    released.unwrap();
    assert!(!held(&s, "third").await);
    // The holder died: its leases end.
    let ended = tokio::time::timeout(
        Duration::from_secs(30),
        s.end_process(owner.process.clone()),
    )
    .await
    .expect("the end of a dead holder's leases was held back while the renewal was late")
    .unwrap();
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].resource, res("first"));
    assert!(!held(&s, "first").await);
    assert_eq!(s.inner.commits_held(), 0);
    assert!(
        !s.inner.pace.borrow().open(std::time::Instant::now()),
        "the keep-alive is still late"
    );
    // An acquire is still held back.
    let acquire = acquire_held_back(&s, &owner).await;
    renewal.resume();
    tokio::time::timeout(Duration::from_secs(30), acquire)
        .await
        .expect("the held acquire was never sent")
        .unwrap()
        .unwrap();
}

/// G1: a release whose first transaction loses its compare re-runs the engine on what etcd
/// holds then; if meanwhile the lease was force-released and the same process was granted
/// the resource again, the re-run must not end that new lease. The agent's undo of a grant
/// nobody read is such a release, retried while etcd is away: before a release named the
/// token it ends, it was by owner, and this re-run ended the new lease, whose holder, told it
/// holds it, kept writing while another owner could be granted the disk. Scripted: the
/// release stops once it has decided (on the old lease, from the view), the lease is
/// force-released and granted again to the same process, then the release commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_rerun_after_a_lost_compare_leaves_a_regrant_to_the_same_owner() {
    let etcd = Etcd::start();
    let s = std::sync::Arc::new(open(&etcd, "regrant").await);
    let holder = Owner::new(s.host().clone(), 10, 1);
    let old = s
        .acquire(AcquireSpec::new(
            holder.clone(),
            [(res("disk"), Mode::Exclusive)],
        ))
        .await
        .unwrap()[0]
        .token;

    let mut pause = s.pause_next_decided();
    let releasing = {
        let s = std::sync::Arc::clone(&s);
        let process = holder.process.clone();
        tokio::spawn(async move {
            s.release(res("disk"), process, None, Some(old), ReleaseKind::Clean)
                .await
        })
    };
    pause.reached().await;
    s.force_release(res("disk"), "stuck".into(), "root".into())
        .await
        .unwrap();
    let new = s
        .acquire(AcquireSpec::new(holder.clone(), [(res("disk"), Mode::Exclusive)]).accept_dirty())
        .await
        .unwrap()[0]
        .token;
    assert!(new > old);
    pause.resume();
    let r = releasing.await.unwrap();
    assert!(
        s.validate(res("disk"), new).await.unwrap(),
        "the release meant for token {old} ended the new lease {new}: {r:?}"
    );
    match r {
        Err(StoreError::Release(leasehold_core::ReleaseError::StaleToken {
            token,
            holding,
            ..
        })) => assert_eq!((token, holding), (old, Some(new))),
        other => panic!("expected a refusal naming token {new}, got {other:?}"),
    }
    let view = s.inspect(res("disk")).await.unwrap().unwrap();
    assert_eq!(view.holders.len(), 1, "{view:?}");
    assert_eq!(view.holders[0].token, new);
}
