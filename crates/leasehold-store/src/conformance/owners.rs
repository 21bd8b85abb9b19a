//! Conformance cases about who owns a lease: owner ids inside one process, and the
//! libvirt-facing rules (an exit status that decides clean or dirty, a resume that needs the
//! last token).

use super::*;

/// G1 between owners of one process (SPEC §2's owner id, threads of a service): two owner ids
/// of one pid exclude each other as two processes would, shared ones coexist, a release names
/// its owner id, the ids survive a restart, and the process's exit ends all of them.
pub async fn owners_of_one_process_are_told_apart_by_owner_id<H: Harness>(h: &H) {
    let a = host("a");
    let as_id = |id: &str| owner(&a, 5).with_id(OwnerId::new(id).expect("valid owner id"));
    let take_as = |id: &str, r: &str, mode: Mode| AcquireSpec::new(as_id(id), [(res(r), mode)]);
    let s = h.open(&a).await;
    let t = s
        .acquire(take_as("t1", "disk", X))
        .await
        .expect("first owner")[0]
        .token;
    let again = s
        .acquire(take_as("t1", "disk", X))
        .await
        .expect("same owner again");
    assert_eq!(again[0].token, t, "the same owner gets its own lease back");
    match s.acquire(take_as("t2", "disk", X)).await {
        Err(StoreError::Acquire(AcquireError::Busy(c))) => {
            assert_eq!(c.holders.len(), 1);
            assert_eq!(c.holders[0].owner, as_id("t1"));
        }
        other => panic!("a second owner of the same pid must be refused: {other:?}"),
    }
    busy_holder(
        take(&s, 5, "disk", SH)
            .await
            .expect_err("the pid without an owner id"),
    );
    s.acquire(take_as("t1", "img", SH))
        .await
        .expect("shared t1");
    s.acquire(take_as("t2", "img", SH))
        .await
        .expect("shared t2 beside t1");

    drop(s);
    let s = h.open(&a).await;
    let v = s
        .inspect(res("img"))
        .await
        .expect("inspect")
        .expect("known");
    let mut ids: Vec<_> = v.holders.iter().map(|l| l.owner.id.clone()).collect();
    ids.sort();
    assert_eq!(
        ids,
        vec![
            Some(OwnerId::new("t1").unwrap()),
            Some(OwnerId::new("t2").unwrap())
        ]
    );

    // A release names its owner: none, or another id, releases nothing.
    let p = process(&a, 5);
    let e = s
        .release(res("disk"), p.clone(), None, None, ReleaseKind::Clean)
        .await
        .expect_err("no owner id");
    assert!(
        matches!(e, StoreError::Release(ReleaseError::NotHeld { .. })),
        "{e:?}"
    );
    s.release(
        res("disk"),
        p.clone(),
        OwnerId::new("t2").ok(),
        None,
        ReleaseKind::Clean,
    )
    .await
    .expect_err("the other owner id");
    assert!(s.validate(res("disk"), t).await.expect("validate"));
    s.release(
        res("img"),
        p.clone(),
        OwnerId::new("t1").ok(),
        None,
        ReleaseKind::Clean,
    )
    .await
    .expect("t1 releases its shared lease");
    let v = s
        .inspect(res("img"))
        .await
        .expect("inspect")
        .expect("known");
    assert_eq!(v.holders.len(), 1);
    assert_eq!(v.holders[0].owner, as_id("t2"));

    // The process's exit ends every owner's leases.
    let ended = s.end_process(p).await.expect("exit");
    assert_eq!(ended.len(), 2, "{ended:?}");
    assert!(holders(&s, "disk").await.is_empty());
    assert!(holders(&s, "img").await.is_empty());
    assert!(is_dirty(&s, "disk").await);
    assert!(!is_dirty(&s, "img").await);
}

/// G5: a process that exits with status 0 ends clean only the leases whose owner chose
/// `on_exit = status` (libvirt's QEMU); another holder's exit 0 still dirties, and the clean
/// ending survives a restart.
pub async fn an_exit_with_status_zero_is_clean_only_where_the_owner_chose_it<H: Harness>(h: &H) {
    let a = host("a");
    let s = h.open(&a).await;
    let mut qemu = owner(&a, 1);
    qemu.on_exit = leasehold_core::OnExit::Status;
    s.acquire(AcquireSpec::new(qemu, [(res("vm-disk"), X)]))
        .await
        .expect("grant");
    take(&s, 2, "script-disk", X).await.expect("grant");
    for pid in [1, 2] {
        let ended = s.end_exited_zero(process(&a, pid)).await.expect("exit");
        assert_eq!(ended.len(), 1, "pid {pid} held one lease");
    }
    drop(s);
    let s = h.open(&a).await;
    let vm = s
        .inspect(res("vm-disk"))
        .await
        .expect("inspect")
        .expect("known");
    assert!(
        vm.dirty.is_none(),
        "exit 0 with on_exit=status is clean: {vm:?}"
    );
    assert_eq!(vm.last_ended.map(|e| e.how), Some(EndReason::ExitedClean));
    let script = s
        .inspect(res("script-disk"))
        .await
        .expect("inspect")
        .expect("known");
    assert_eq!(
        script.dirty.map(|e| e.how),
        Some(EndReason::ProcessDied),
        "an owner that did not choose on_exit=status is dirty whatever its status"
    );
}

/// A paused VM resuming (or a migration arriving) takes its disk back only if nobody held it
/// since: its old token must still be the last, and it gets a new one.
pub async fn a_resume_is_granted_only_while_the_token_is_the_last<H: Harness>(h: &H) {
    let a = host("a");
    let s = h.open(&a).await;
    let resume = |pid: u32, token: Token| {
        let mut spec = AcquireSpec::new(owner(&a, pid), [(res("disk"), X)]);
        spec.expect_tokens = vec![(res("disk"), token)];
        spec
    };
    let paused = take(&s, 1, "disk", X).await.expect("grant");
    s.release(res("disk"), process(&a, 1), None, None, ReleaseKind::Clean)
        .await
        .expect("pause");
    let back = s.acquire(resume(1, paused)).await.expect("resume")[0].token;
    assert!(
        back > paused,
        "a new token on resume: {back:?} after {paused:?}"
    );
    s.release(res("disk"), process(&a, 1), None, None, ReleaseKind::Clean)
        .await
        .expect("pause again");
    // Someone else takes the disk while the VM is paused, and lets go.
    take(&s, 2, "disk", X).await.expect("a third owner");
    s.release(res("disk"), process(&a, 2), None, None, ReleaseKind::Clean)
        .await
        .expect("third owner done");
    let refused = s.acquire(resume(1, back)).await.expect_err("moved on");
    assert!(
        matches!(
            refused,
            StoreError::Acquire(leasehold_core::AcquireError::Moved { expected, .. }) if expected == back
        ),
        "refused as moved: {refused:?}"
    );
    let v = s
        .inspect(res("disk"))
        .await
        .expect("inspect")
        .expect("known");
    assert!(
        v.holders.is_empty(),
        "a refused resume takes nothing: {v:?}"
    );
}
