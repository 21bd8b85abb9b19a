//! A lost state database is detected, never taken for a fresh store (issue 8, item 9), and
//! the state files are private to the agent's user (SPEC G8).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use leasehold_core::{HostId, Mode, Owner, ResourceName};
use leasehold_store::{AcquireSpec, LocalStore, Store, StoreError};

fn host() -> HostId {
    HostId::new("node1").unwrap()
}

/// Grants `disk` to a made-up process `pid` and returns the token.
async fn grant(store: &LocalStore, pid: u32) -> u64 {
    let spec = AcquireSpec {
        owner: Owner::new(host(), pid, 1),
        items: vec![(ResourceName::new("disk").unwrap(), Mode::Exclusive)],
        accept_dirty: true,
        wait: None,
        expect_tokens: Vec::new(),
    };
    store.acquire(spec).await.unwrap()[0].token.0
}

/// A state directory whose store granted `disk` once (token 1) and is closed.
async fn used_store(dir: &Path) {
    let s = LocalStore::open(dir, host()).unwrap();
    assert_eq!(grant(&s, 100).await, 1);
    s.close();
}

fn refusal(dir: &Path) -> String {
    match LocalStore::open(dir, host()) {
        Err(e @ StoreError::BadState(_)) => e.to_string(),
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("a store with lost state was opened as a fresh one"),
    }
}

#[tokio::test]
async fn a_deleted_or_emptied_database_is_refused_naming_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    used_store(&dir).await;
    let db = dir.join("leasehold.redb");
    let saved = std::fs::read(&db).unwrap();

    std::fs::remove_file(&db).unwrap();
    let msg = refusal(&dir);
    assert!(msg.contains("is lost"), "{msg}");
    assert!(msg.contains("leasehold.id"), "{msg}");
    assert!(msg.contains("restore the database"), "{msg}");

    std::fs::write(&db, b"").unwrap();
    let msg = refusal(&dir);
    assert!(msg.contains("is lost"), "{msg}");

    // Put back, the state is whole again: the lease stands and tokens go on from 1.
    std::fs::write(&db, &saved).unwrap();
    let s = LocalStore::open(&dir, host()).unwrap();
    let v = s
        .inspect(ResourceName::new("disk").unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v.holders.len(), 1);
    s.close();
}

#[tokio::test]
async fn another_stores_database_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    used_store(&a).await;
    used_store(&b).await;
    std::fs::copy(b.join("leasehold.redb"), a.join("leasehold.redb")).unwrap();
    let msg = refusal(&a);
    assert!(msg.contains("another store's database"), "{msg}");
}

#[tokio::test]
async fn deleting_the_id_file_keeps_the_state_and_deleting_both_starts_afresh() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    used_store(&dir).await;
    // The database is the authority: a lost id file is written again.
    std::fs::remove_file(dir.join("leasehold.id")).unwrap();
    let s = LocalStore::open(&dir, host()).unwrap();
    assert_eq!(grant(&s, 100).await, 1, "the same holder keeps its token");
    s.close();
    assert!(dir.join("leasehold.id").exists());
    // Both gone: the deliberate fresh start the refusal describes.
    std::fs::remove_file(dir.join("leasehold.id")).unwrap();
    std::fs::remove_file(dir.join("leasehold.redb")).unwrap();
    let s = LocalStore::open(&dir, host()).unwrap();
    assert_eq!(grant(&s, 200).await, 1);
    s.close();
}

#[tokio::test]
async fn state_files_are_private_to_the_agents_user() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    used_store(&dir).await;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("leasehold.redb")), 0o600);
    assert_eq!(mode(&dir.join("leasehold.id")), 0o600);
}

#[tokio::test]
async fn a_symbolic_link_in_place_of_the_database_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("state");
    std::fs::create_dir(&dir).unwrap();
    let target = tmp.path().join("elsewhere");
    std::fs::write(&target, b"not ours").unwrap();
    std::os::unix::fs::symlink(&target, dir.join("leasehold.redb")).unwrap();
    let e = LocalStore::open(&dir, host()).unwrap_err().to_string();
    assert!(e.contains("symbolic link"), "{e}");
    assert_eq!(std::fs::read(&target).unwrap(), b"not ours");
}
