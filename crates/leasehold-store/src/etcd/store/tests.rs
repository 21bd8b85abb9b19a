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
    let mut o = EtcdOptions::new(vec![etcd.endpoint()]);
    o.prefix = format!("/unit-{}-one-trip/", std::process::id());
    // No compaction rounds: the count is of the operations' requests alone.
    o.history.compact_every = None;
    let s = EtcdStore::open(HostId::new("a").unwrap(), o).await.unwrap();
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
