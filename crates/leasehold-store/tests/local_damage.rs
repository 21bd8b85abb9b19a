//! Issue 10 item 1: a state database damaged while the agent runs (a failing disk) is a clear
//! error naming the file and how to recover, never a panic that takes the store down.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use leasehold_core::{HostId, Mode, Owner, ReleaseKind, ResourceName};
use leasehold_store::{AcquireSpec, LocalStore, LocalStoreOptions, Store, StoreError};

fn host() -> HostId {
    HostId::new("damage-host").unwrap()
}

fn name(i: usize) -> ResourceName {
    ResourceName::new(format!("disk-{i}-{}", "x".repeat(200))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_damaged_after_open_are_a_clear_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    // A page cache too small to hold the tree: commits read its pages from the file.
    let options = LocalStoreOptions {
        cache_bytes: 0,
        ..LocalStoreOptions::default()
    };
    let s = LocalStore::open_with(dir.path(), host(), options).unwrap();
    let owner = Owner::new(host(), 5, 1);
    for i in 0..300 {
        s.acquire(AcquireSpec::new(
            owner.clone(),
            [(name(i), Mode::Exclusive)],
        ))
        .await
        .unwrap();
    }
    // Every page after the header becomes garbage, under the open store.
    let db = dir.path().join("leasehold.redb");
    let mut bytes = std::fs::read(&db).unwrap();
    let mut x: u32 = 0x9e37_79b9;
    for b in bytes.iter_mut().skip(4096) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    std::fs::write(&db, &bytes).unwrap();

    let mut errors = Vec::new();
    for i in 0..300 {
        let r = if i % 2 == 0 {
            s.release(
                name(i),
                owner.process.clone(),
                None,
                None,
                ReleaseKind::Clean,
            )
            .await
            .map(|_| ())
        } else {
            s.acquire(AcquireSpec::new(
                Owner::new(host(), 6, 1),
                [(name(1000 + i), Mode::Exclusive)],
            ))
            .await
            .map(|_| ())
        };
        if let Err(e) = r {
            assert!(
                !matches!(e, StoreError::Closed),
                "the store went down (a panic in its thread?) after {} errors: {errors:?}",
                errors.len()
            );
            errors.push(e.to_string());
        }
    }
    eprintln!("{} errors; first: {:?}", errors.len(), errors.first());
    // The store still answers, and says what is wrong.
    let listed = s.list().await;
    if let Err(e) = &listed {
        assert!(!matches!(e, StoreError::Closed), "{e:?}");
    }
    for e in &errors {
        assert!(e.contains(&db.display().to_string()), "{e}");
    }
}
