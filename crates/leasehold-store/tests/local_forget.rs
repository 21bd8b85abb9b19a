//! The local store forgets the records of released, clean resources after `forget_after`
//! (issue 10 item 3, issue 11 item 6), and tokens still only grow (SPEC G2): a store-wide
//! counter, durable with each forgetting, stays above every forgotten record's last token.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use leasehold_core::{HostId, Mode, Owner, ReleaseKind, ResourceName, Token};
use leasehold_store::{AcquireSpec, LocalStore, LocalStoreOptions, Store};

const NAMES: usize = 1000;
const FORGET_AFTER: Duration = Duration::from_secs(2);

fn host() -> HostId {
    HostId::new("forget-host").unwrap()
}

fn name(i: usize) -> ResourceName {
    ResourceName::new(format!("released-{i:04}")).unwrap()
}

fn open(dir: &std::path::Path) -> LocalStore {
    let options = LocalStoreOptions {
        forget_after: Some(FORGET_AFTER),
        ..LocalStoreOptions::default()
    };
    LocalStore::open_with(dir, host(), options).unwrap()
}

async fn take(s: &LocalStore, pid: u32, r: &ResourceName) -> Token {
    let g = s
        .acquire(AcquireSpec::new(
            Owner::new(host(), pid, 1),
            [(r.clone(), Mode::Exclusive)],
        ))
        .await
        .unwrap();
    g[0].token
}

/// Waits until `list` shows exactly `want`, for at most a minute (the machine is busy).
async fn wait_for_list(s: &LocalStore, want: &[&ResourceName]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let names: Vec<ResourceName> = s
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.resource)
            .collect();
        if names.iter().eq(want.iter().copied()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "list still shows {} records (first {:?}); expected {want:?}",
            names.len(),
            names.first()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_clean_records_are_forgotten_and_tokens_still_grow() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(open(dir.path()));
    // First a resource left dirty and one still held: their tokens are the smallest, so
    // once the others are forgotten no record remembers the largest token.
    let dirty = ResourceName::new("dirty-one").unwrap();
    let held = ResourceName::new("held-one").unwrap();
    take(&s, 7, &dirty).await;
    s.release(
        dirty.clone(),
        Owner::new(host(), 7, 1).process,
        None,
        None,
        ReleaseKind::Dirty {
            note: Some("exit status 1".into()),
        },
    )
    .await
    .unwrap();
    take(&s, 8, &held).await;

    // 1,000 names granted to one process, then released cleanly, concurrently (group commit).
    let owner = Owner::new(host(), 9, 1);
    let mut highest = Token(0);
    let all: Vec<(ResourceName, Mode)> = (0..NAMES).map(|i| (name(i), Mode::Exclusive)).collect();
    for chunk in all.chunks(250) {
        let grants = s
            .acquire(AcquireSpec::new(owner.clone(), chunk.to_vec()))
            .await
            .unwrap();
        highest = highest.max(grants.iter().map(|g| g.token).max().unwrap());
    }
    let mut releases = Vec::new();
    for i in 0..NAMES {
        let s = Arc::clone(&s);
        let p = owner.process.clone();
        releases.push(tokio::spawn(async move {
            s.release(name(i), p, None, None, ReleaseKind::Clean)
                .await
                .unwrap();
        }));
    }
    for r in releases {
        r.await.unwrap();
    }

    // After the forget period only the dirty and the held records remain.
    wait_for_list(&s, &[&dirty, &held]).await;
    assert!(s.inspect(name(0)).await.unwrap().is_none());
    let view = s.inspect(dirty.clone()).await.unwrap().unwrap();
    assert!(view.dirty.is_some(), "{view:?}");

    // A forgotten resource's next grant takes a larger token than any earlier grant, also
    // after a restart, when no record on disk remembers the largest token.
    drop(Arc::into_inner(s).unwrap());
    let s = open(dir.path());
    let again = take(&s, 10, &name(0)).await;
    assert!(again > highest, "{again:?} after {highest:?}");
    let names: Vec<String> = s
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.resource.to_string())
        .collect();
    assert_eq!(names, ["dirty-one", "held-one", "released-0000"]);
    // The dirty one is kept past another forget period, still dirty.
    let deadline = Instant::now() + FORGET_AFTER * 2;
    while Instant::now() < deadline {
        let view = s.inspect(dirty.clone()).await.unwrap();
        assert!(view.is_some_and(|v| v.dirty.is_some()));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
