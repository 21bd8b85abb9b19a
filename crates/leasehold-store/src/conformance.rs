#![allow(clippy::expect_used, clippy::unwrap_used)]

//! The conformance suite: the guarantees every store must keep, written once.
//!
//! A store's test file implements [`Harness`] (how to open the store of a host on one
//! isolated lease state) and invokes [`conformance_suite!`](crate::conformance_suite), which
//! expands to one `#[tokio::test]` per case, so a failure names the broken case. Cases that
//! restart the store drop it and open it again on the same state. Cases that need two hosts on
//! one state are generated only for cluster stores, by `conformance_suite!(make, multi_host)`:
//! a store that cannot share its state has no such test at all, rather than one that passes
//! without checking.
//!
//! The cases check SPEC G1 (mutual exclusion), G2 (fencing tokens), G5 (dirty tracking) and
//! G6 (durability across restarts) at the store level, plus fair waiting, all-or-nothing
//! grants, handover, force-release and the refusal of bad requests.
//!
//! ```ignore
//! struct Local(tempfile::TempDir);
//! impl Harness for Local { ... }
//! leasehold_store::conformance_suite!(Local::new());
//! // A cluster store adds the cases that need several hosts:
//! leasehold_store::conformance_suite!(OnEtcd::new(), multi_host);
//! ```

use std::future::Future;
use std::time::Duration;

use leasehold_core::{
    AcquireError, EndReason, Event, HostId, Mode, Owner, OwnerId, ProcessKey, ReleaseError,
    ReleaseKind, ResourceName, Token,
};

use crate::{AcquireSpec, Store, StoreError};

mod owners;
pub use owners::*;

/// How the suite opens stores on one isolated lease state.
pub trait Harness: Send + Sync + 'static {
    /// The store under test.
    type S: Store;
    /// Opens the store of `host`. Called again after the suite drops a store, to restart it.
    fn open(&self, host: &HostId) -> impl Future<Output = Self::S> + Send;
}

/// Expands to one test per conformance case, each on a fresh harness made by `$make`; with
/// `multi_host`, also the cases that need two hosts on one state (cluster stores).
#[macro_export]
macro_rules! conformance_suite {
    ($make:expr, multi_host) => {
        $crate::conformance_suite!($make);
        $crate::conformance_suite!(@cases $make;
            hosts_exclude_each_other,
        );
    };
    ($make:expr) => {
        $crate::conformance_suite!(@cases $make;
            exclusive_excludes_every_other_owner,
            shared_leases_coexist_but_never_with_exclusive,
            several_resources_all_or_nothing,
            waiters_are_served_in_order,
            a_wait_times_out_naming_the_holder,
            tokens_increase_and_are_never_reused_across_restarts,
            validate_says_which_token_is_current,
            a_grant_survives_a_restart,
            a_dead_exclusive_holder_leaves_a_dirty_mark_that_survives_restart,
            dirty_needs_check_unless_accepted_then_mark_clean,
            a_shared_holder_dying_does_not_dirty,
            an_exit_with_status_zero_is_clean_only_where_the_owner_chose_it,
            a_resume_is_granted_only_while_the_token_is_the_last,
            release_dirty_marks_dirty,
            force_release_revokes_and_records_why,
            a_release_naming_a_stale_token_ends_nothing,
            handover_moves_the_lease_in_one_step,
            bad_requests_change_nothing,
            a_dropped_waiter_leaves_no_lease,
            list_and_inspect_show_holders_and_dirt,
            events_are_published_after_they_are_durable,
            owners_of_one_process_are_told_apart_by_owner_id,
        );
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let harness = $make;
                $crate::conformance::$case(&harness).await;
            }
        )*
    };
}

fn host(name: &str) -> HostId {
    HostId::new(name).expect("valid host id")
}

fn res(name: &str) -> ResourceName {
    ResourceName::new(name).expect("valid resource name")
}

/// The owner for a made-up process of `host`. Stores do not look at real processes.
pub fn owner(host: &HostId, pid: u32) -> Owner {
    Owner::new(host.clone(), pid, 1000 + u64::from(pid))
}

fn process(host: &HostId, pid: u32) -> ProcessKey {
    owner(host, pid).process
}

const X: Mode = Mode::Exclusive;
const SH: Mode = Mode::Shared;

async fn take<S: Store>(s: &S, pid: u32, r: &str, mode: Mode) -> Result<Token, StoreError> {
    let g = s
        .acquire(AcquireSpec::new(owner(s.host(), pid), [(res(r), mode)]))
        .await?;
    Ok(g[0].token)
}

async fn release<S: Store>(s: &S, pid: u32, r: &str, kind: ReleaseKind) {
    s.release(res(r), process(s.host(), pid), None, None, kind)
        .await
        .expect("release");
}

fn busy_holder(e: StoreError) -> (ResourceName, Vec<u32>) {
    match e {
        StoreError::Acquire(AcquireError::Busy(c)) | StoreError::TimedOut(c) => (
            c.resource,
            c.holders.iter().map(|l| l.owner.process.pid).collect(),
        ),
        other => panic!("expected busy, got {other:?}"),
    }
}

async fn holders<S: Store>(s: &S, r: &str) -> Vec<(u32, Mode)> {
    s.inspect(res(r))
        .await
        .expect("inspect")
        .map(|v| {
            v.holders
                .iter()
                .map(|l| (l.owner.process.pid, l.mode))
                .collect()
        })
        .unwrap_or_default()
}

async fn is_dirty<S: Store>(s: &S, r: &str) -> bool {
    s.inspect(res(r))
        .await
        .expect("inspect")
        .is_some_and(|v| v.dirty.is_some())
}

/// G1: an exclusive lease keeps out every other owner, exclusive or shared.
pub async fn exclusive_excludes_every_other_owner<H: Harness>(h: &H) {
    let s = h.open(&host("a")).await;
    take(&s, 1, "disk", X).await.expect("first grant");
    let (r, who) = busy_holder(take(&s, 2, "disk", X).await.expect_err("second exclusive"));
    assert_eq!((r, who), (res("disk"), vec![1]));
    busy_holder(
        take(&s, 3, "disk", SH)
            .await
            .expect_err("shared beside exclusive"),
    );
    assert_eq!(holders(&s, "disk").await, vec![(1, X)]);
}

/// G1: shared leases coexist; an exclusive one waits for all of them.
pub async fn shared_leases_coexist_but_never_with_exclusive<H: Harness>(h: &H) {
    let s = h.open(&host("a")).await;
    take(&s, 1, "cache", SH).await.expect("shared 1");
    take(&s, 2, "cache", SH).await.expect("shared 2");
    let (_, who) = busy_holder(take(&s, 3, "cache", X).await.expect_err("exclusive"));
    assert_eq!(who, vec![1, 2]);
    release(&s, 1, "cache", ReleaseKind::Clean).await;
    busy_holder(take(&s, 3, "cache", X).await.expect_err("exclusive"));
    release(&s, 2, "cache", ReleaseKind::Clean).await;
    take(&s, 3, "cache", X)
        .await
        .expect("exclusive once shared are gone");
}

/// G1: several resources are granted together or not at all.
pub async fn several_resources_all_or_nothing<H: Harness>(h: &H) {
    let s = h.open(&host("a")).await;
    take(&s, 1, "d2", X).await.expect("d2");
    let spec = AcquireSpec::new(owner(s.host(), 2), [(res("d1"), X), (res("d2"), X)]);
    let (r, _) = busy_holder(s.acquire(spec.clone()).await.expect_err("d2 is held"));
    assert_eq!(r, res("d2"));
    assert!(
        holders(&s, "d1").await.is_empty(),
        "d1 must not be taken alone"
    );
    release(&s, 1, "d2", ReleaseKind::Clean).await;
    let g = s.acquire(spec).await.expect("both free");
    assert_eq!(g.len(), 2);
    assert_eq!(holders(&s, "d1").await, vec![(2, X)]);
    assert_eq!(holders(&s, "d2").await, vec![(2, X)]);
}

/// Fair waiting: waiters are served in arrival order, and a waiting exclusive request is
/// not passed by later shared ones.
pub async fn waiters_are_served_in_order<H: Harness>(h: &H) {
    let s = std::sync::Arc::new(h.open(&host("a")).await);
    take(&*s, 1, "img", SH).await.expect("reader");
    let writer = {
        let s = s.clone();
        tokio::spawn(async move {
            let spec = AcquireSpec::new(owner(s.host(), 2), [(res("img"), X)])
                .wait(Duration::from_secs(30));
            s.acquire(spec).await
        })
    };
    wait_for_view(&*s, "img", |v| v.waiters.len() == 1).await;
    // A later reader is compatible with the holder but must queue behind the writer.
    busy_holder(
        take(&*s, 3, "img", SH)
            .await
            .expect_err("reader behind writer"),
    );
    let reader = {
        let s = s.clone();
        tokio::spawn(async move {
            let spec = AcquireSpec::new(owner(s.host(), 3), [(res("img"), SH)])
                .wait(Duration::from_secs(30));
            s.acquire(spec).await
        })
    };
    wait_for_view(&*s, "img", |v| v.waiters.len() == 2).await;
    release(&*s, 1, "img", ReleaseKind::Clean).await;
    let g = writer.await.expect("join").expect("writer granted");
    assert_eq!(holders(&*s, "img").await, vec![(2, X)]);
    assert!(
        !reader.is_finished(),
        "reader must still wait for the writer"
    );
    release(&*s, 2, "img", ReleaseKind::Clean).await;
    let g3 = reader.await.expect("join").expect("reader granted");
    assert!(g3[0].token > g[0].token);
    assert_eq!(holders(&*s, "img").await, vec![(3, SH)]);
}

/// A wait that runs out fails with the holder named, and leaves no request behind.
pub async fn a_wait_times_out_naming_the_holder<H: Harness>(h: &H) {
    let s = h.open(&host("a")).await;
    take(&s, 1, "disk", X).await.expect("holder");
    let spec =
        AcquireSpec::new(owner(s.host(), 2), [(res("disk"), X)]).wait(Duration::from_millis(300));
    let started = std::time::Instant::now();
    let err = s.acquire(spec).await.expect_err("must time out");
    assert!(matches!(err, StoreError::TimedOut(_)), "{err:?}");
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(busy_holder(err).1, vec![1]);
    let v = s
        .inspect(res("disk"))
        .await
        .expect("inspect")
        .expect("known");
    assert!(v.waiters.is_empty(), "the timed-out request is withdrawn");
}

/// G2: tokens grow with every grant of a resource, across restarts of the store.
pub async fn tokens_increase_and_are_never_reused_across_restarts<H: Harness>(h: &H) {
    let a = host("a");
    let mut last = Token(0);
    let mut seen = std::collections::BTreeSet::new();
    for round in 0..3 {
        let s = h.open(&a).await;
        for i in 0..5u32 {
            let pid = 10 + round * 10 + i;
            let mode = if i % 2 == 0 { X } else { SH };
            let t = take(&s, pid, "disk", mode).await.expect("grant");
            assert!(t > last, "token {t} after {last} (round {round})");
            assert!(seen.insert(t), "token {t} reused");
            last = t;
            if i % 3 == 2 {
                s.end_process(process(&a, pid)).await.expect("death");
                if mode == X {
                    s.mark_clean(res("disk"), "test".into())
                        .await
                        .expect("clean");
                }
            } else {
                release(&s, pid, "disk", ReleaseKind::Clean).await;
            }
        }
        // The last grant of the round is left held over the restart on odd rounds.
        if round % 2 == 1 {
            let t = take(&s, 99 + round, "disk", X)
                .await
                .expect("held over restart");
            assert!(t > last);
            last = t;
            drop(s);
            let s = h.open(&a).await;
            assert!(s.validate(res("disk"), t).await.expect("validate"));
            release(&s, 99 + round, "disk", ReleaseKind::Clean).await;
        }
    }
}

/// G2: validate is true for the current grant only.
pub async fn validate_says_which_token_is_current<H: Harness>(h: &H) {
    let s = h.open(&host("a")).await;
    let t1 = take(&s, 1, "disk", X).await.expect("t1");
    assert!(s.validate(res("disk"), t1).await.expect("v"));
    assert!(!s.validate(res("disk"), Token(t1.0 + 1)).await.expect("v"));
    assert!(!s.validate(res("other"), t1).await.expect("v"));
    release(&s, 1, "disk", ReleaseKind::Clean).await;
    assert!(!s.validate(res("disk"), t1).await.expect("v"), "released");
    let t2 = take(&s, 2, "disk", X).await.expect("t2");
    assert!(t2 > t1);
    assert!(!s.validate(res("disk"), t1).await.expect("v"), "stale");
    assert!(s.validate(res("disk"), t2).await.expect("v"));
}

/// G6: a grant is durable: after a restart it is still held, by the same owner and token.
pub async fn a_grant_survives_a_restart<H: Harness>(h: &H) {
    let a = host("a");
    let s = h.open(&a).await;
    let t = take(&s, 1, "disk", X).await.expect("grant");
    let spec = AcquireSpec::new(owner(&a, 7).with_label("vm-7"), [(res("ro"), SH)]);
    s.acquire(spec).await.expect("shared");
    drop(s);
    let s = h.open(&a).await;
    let v = s
        .inspect(res("disk"))
        .await
        .expect("inspect")
        .expect("known");
    assert_eq!(v.holders.len(), 1);
    assert_eq!(v.holders[0].owner, owner(&a, 1));
    assert_eq!(v.holders[0].token, t);
    let v = s.inspect(res("ro")).await.expect("inspect").expect("known");
    assert_eq!(v.holders[0].owner.label.as_deref(), Some("vm-7"));
    busy_holder(take(&s, 2, "disk", X).await.expect_err("still held"));
}

/// G5 + G6: an exclusive holder that dies leaves the resource dirty, and the mark survives a
/// restart.
pub async fn a_dead_exclusive_holder_leaves_a_dirty_mark_that_survives_restart<H: Harness>(h: &H) {
    let a = host("a");
    let s = h.open(&a).await;
    let t = take(&s, 1, "disk", X).await.expect("grant");
    let ended = s.end_process(process(&a, 1)).await.expect("death");
    assert_eq!(ended.len(), 1);
    assert!(ended[0].dirtied);
    drop(s);
    let s = h.open(&a).await;
    let v = s
        .inspect(res("disk"))
        .await
        .expect("inspect")
        .expect("known");
    let d = v.dirty.expect("dirty after restart");
    assert_eq!(d.token, t);
    assert_eq!(d.owner.process.pid, 1);
    assert_eq!(d.how, EndReason::ProcessDied);
    assert!(v.holders.is_empty());
}

/// G5: acquiring a dirty resource needs the caller to accept the check; mark-clean clears.
pub async fn dirty_needs_check_unless_accepted_then_mark_clean<H: Harness>(h: &H) {
    let a = host("a");
    let s = h.open(&a).await;
    let t = take(&s, 1, "disk", X).await.expect("grant");
    s.end_process(process(&a, 1)).await.expect("death");
    for mode in [X, SH] {
        match take(&s, 2, "disk", mode).await {
            Err(StoreError::Acquire(AcquireError::NeedsCheck { resource, dirty })) => {
                assert_eq!(resource, res("disk"));
                assert_eq!(dirty.token, t);
            }
            other => panic!("expected needs-check, got {other:?}"),
        }
    }
    assert!(holders(&s, "disk").await.is_empty(), "refusal took nothing");
    let spec = AcquireSpec::new(owner(&a, 2), [(res("disk"), X)]).accept_dirty();
    let g = s.acquire(spec).await.expect("accepting the check");
    assert_eq!(g[0].dirty.as_ref().map(|d| d.token), Some(t));
    assert!(is_dirty(&s, "disk").await, "accepting does not clean");
    let was = s
        .mark_clean(res("disk"), "checker".into())
        .await
        .expect("clean");
    assert_eq!(was.map(|d| d.token), Some(t));
    assert!(!is_dirty(&s, "disk").await);
    release(&s, 2, "disk", ReleaseKind::Clean).await;
    take(&s, 3, "disk", X).await.expect("clean resource");
    assert!(matches!(
        s.mark_clean(res("never-seen"), "x".into()).await,
        Err(StoreError::Release(ReleaseError::Unknown(_)))
    ));
}

/// G5: readers cannot corrupt: a shared holder's death leaves the resource clean.
pub async fn a_shared_holder_dying_does_not_dirty<H: Harness>(h: &H) {
    let a = host("a");
    let s = h.open(&a).await;
    take(&s, 1, "img", SH).await.expect("reader");
    let ended = s.end_process(process(&a, 1)).await.expect("death");
    assert!(!ended[0].dirtied);
    assert!(!is_dirty(&s, "img").await);
    take(&s, 2, "img", X)
        .await
        .expect("writer after a dead reader");
}

/// G5: a holder may release saying the resource is inconsistent.
pub async fn release_dirty_marks_dirty<H: Harness>(h: &H) {
    let s = h.open(&host("a")).await;
    take(&s, 1, "disk", X).await.expect("grant");
    let note = Some("command exited with status 3".to_string());
    release(&s, 1, "disk", ReleaseKind::Dirty { note: note.clone() }).await;
    let v = s
        .inspect(res("disk"))
        .await
        .expect("inspect")
        .expect("known");
    assert_eq!(
        v.dirty.map(|d| d.how),
        Some(EndReason::ReleasedDirty { note })
    );
    take(&s, 1, "clean", X).await.expect("grant");
    release(&s, 1, "clean", ReleaseKind::Clean).await;
    assert!(!is_dirty(&s, "clean").await);
}

/// Force-release revokes every lease, leaves an exclusive resource dirty, and records the
/// reason and who forced it.
pub async fn force_release_revokes_and_records_why<H: Harness>(h: &H) {
    let s = h.open(&host("a")).await;
    let t = take(&s, 1, "disk", X).await.expect("grant");
    assert!(matches!(
        s.force_release(res("disk"), String::new(), "root".into())
            .await,
        Err(StoreError::Release(ReleaseError::Invalid(_)))
    ));
    assert!(
        s.validate(res("disk"), t).await.expect("v"),
        "refused force changed nothing"
    );
    let r = s
        .force_release(res("disk"), "host hung".into(), "root".into())
        .await
        .expect("force");
    assert_eq!(r.len(), 1);
    assert!(!s.validate(res("disk"), t).await.expect("v"));
    let v = s
        .inspect(res("disk"))
        .await
        .expect("inspect")
        .expect("known");
    let d = v.dirty.expect("dirty");
    assert_eq!(
        d.how,
        EndReason::Forced {
            reason: "host hung".into(),
            by: "root".into()
        }
    );
    assert!(matches!(
        s.force_release(res("disk"), "again".into(), "root".into())
            .await,
        Err(StoreError::Release(ReleaseError::Unheld(_)))
    ));
}

/// G1: a release that names the token of the lease it ends leaves alone a later lease of the
/// same owner (after a force-release, the same process was granted the resource again), and
/// says which token the owner holds now; without a token, a release is by owner, as before.
pub async fn a_release_naming_a_stale_token_ends_nothing<H: Harness>(h: &H) {
    let s = h.open(&host("a")).await;
    let old = take(&s, 1, "disk", X).await.expect("grant");
    s.force_release(res("disk"), "hung".into(), "root".into())
        .await
        .expect("force");
    s.mark_clean(res("disk"), "root".into())
        .await
        .expect("mark clean");
    let new = take(&s, 1, "disk", X).await.expect("grant again");
    assert!(new > old);
    let stale = s
        .release(
            res("disk"),
            process(s.host(), 1),
            None,
            Some(old),
            ReleaseKind::Clean,
        )
        .await;
    match stale {
        Err(StoreError::Release(ReleaseError::StaleToken { token, holding, .. })) => {
            assert_eq!((token, holding), (old, Some(new)));
        }
        other => panic!("a release naming token {old} answered {other:?}"),
    }
    assert!(
        s.validate(res("disk"), new).await.expect("v"),
        "the stale release ended the new lease"
    );
    assert_eq!(holders(&s, "disk").await, vec![(1, X)]);
    let ended = s
        .release(
            res("disk"),
            process(s.host(), 1),
            None,
            Some(new),
            ReleaseKind::Clean,
        )
        .await
        .expect("release by its own token");
    assert_eq!(ended.ended.token, new);
    assert!(matches!(
        s.release(
            res("disk"),
            process(s.host(), 1),
            None,
            Some(new),
            ReleaseKind::Clean
        )
        .await,
        Err(StoreError::Release(ReleaseError::StaleToken {
            holding: None,
            ..
        }))
    ));
    let again = take(&s, 1, "disk", X).await.expect("grant a third time");
    release(&s, 1, "disk", ReleaseKind::Clean).await;
    assert!(!s.validate(res("disk"), again).await.expect("v"));
}

/// G7 at the store level: the lease moves to the named waiter with a new token, past an
/// earlier waiter; naming nobody keeps the lease where it was.
pub async fn handover_moves_the_lease_in_one_step<H: Harness>(h: &H) {
    let s = std::sync::Arc::new(h.open(&host("a")).await);
    let a = s.host().clone();
    let old = take(&*s, 1, "vm", X).await.expect("source");
    let spawn_waiter = |pid: u32, label: &'static str| {
        let s = s.clone();
        tokio::spawn(async move {
            let o = owner(s.host(), pid).with_label(label);
            s.acquire(AcquireSpec::new(o, [(res("vm"), X)]).wait(Duration::from_secs(30)))
                .await
        })
    };
    let early = spawn_waiter(2, "someone-else");
    wait_for_view(&*s, "vm", |v| v.waiters.len() == 1).await;
    let dest = spawn_waiter(3, "destination");
    wait_for_view(&*s, "vm", |v| v.waiters.len() == 2).await;
    let nobody = ReleaseKind::Handover {
        host: a.clone(),
        label: Some("no-such-label".into()),
    };
    let e = s
        .release(res("vm"), process(&a, 1), None, None, nobody)
        .await
        .expect_err("nobody to hand over to");
    assert!(matches!(
        e,
        StoreError::Release(ReleaseError::NoWaiter { .. })
    ));
    assert!(
        s.validate(res("vm"), old).await.expect("v"),
        "kept on failed handover"
    );
    let to = ReleaseKind::Handover {
        host: a.clone(),
        label: Some("destination".into()),
    };
    let r = s
        .release(res("vm"), process(&a, 1), None, None, to)
        .await
        .expect("handover");
    assert!(!r.dirtied);
    let g = dest.await.expect("join").expect("destination granted");
    assert!(g[0].token > old);
    assert!(!s.validate(res("vm"), old).await.expect("v"));
    assert!(s.validate(res("vm"), g[0].token).await.expect("v"));
    assert_eq!(holders(&*s, "vm").await, vec![(3, X)]);
    assert!(!is_dirty(&*s, "vm").await);
    assert!(!early.is_finished(), "the earlier waiter still waits");
    early.abort();
}

/// G8 at the store level: malformed requests are refused and change nothing.
pub async fn bad_requests_change_nothing<H: Harness>(h: &H) {
    let s = h.open(&host("a")).await;
    let a = s.host().clone();
    take(&s, 1, "disk", X).await.expect("grant");
    let before = s.list().await.expect("list");
    let bad = [
        AcquireSpec::new(owner(&a, 2), []),
        AcquireSpec::new(owner(&a, 2), [(res("x"), X), (res("x"), SH)]),
        AcquireSpec::new(owner(&a, 2).with_label("bad\nlabel"), [(res("x"), X)]),
        AcquireSpec::new(owner(&host("someone-else"), 2), [(res("x"), X)]),
    ];
    for spec in bad {
        let e = s.acquire(spec.clone()).await.expect_err("refused");
        assert!(
            matches!(
                e,
                StoreError::Acquire(AcquireError::Invalid(_)) | StoreError::WrongHost { .. }
            ),
            "{spec:?}: {e:?}"
        );
    }
    let e = s
        .release(res("disk"), process(&a, 2), None, None, ReleaseKind::Clean)
        .await
        .expect_err("not the holder");
    assert!(matches!(
        e,
        StoreError::Release(ReleaseError::NotHeld { .. })
    ));
    assert_eq!(s.list().await.expect("list"), before);
}

/// Cancel safety: a waiting request whose caller goes away is withdrawn, and leaves no lease.
pub async fn a_dropped_waiter_leaves_no_lease<H: Harness>(h: &H) {
    let s = std::sync::Arc::new(h.open(&host("a")).await);
    take(&*s, 1, "disk", X).await.expect("holder");
    let w = {
        let s = s.clone();
        tokio::spawn(async move {
            let spec = AcquireSpec::new(owner(s.host(), 2), [(res("disk"), X)])
                .wait(Duration::from_secs(60));
            s.acquire(spec).await
        })
    };
    wait_for_view(&*s, "disk", |v| v.waiters.len() == 1).await;
    w.abort();
    let _ = w.await;
    release(&*s, 1, "disk", ReleaseKind::Clean).await;
    wait_for_view(&*s, "disk", |v| {
        v.waiters.is_empty() && v.holders.is_empty()
    })
    .await;
    take(&*s, 3, "disk", X)
        .await
        .expect("free for the next owner");
}

/// `list` and `inspect` show every holder and dirty mark.
pub async fn list_and_inspect_show_holders_and_dirt<H: Harness>(h: &H) {
    let a = host("a");
    let s = h.open(&a).await;
    take(&s, 1, "a", X).await.expect("a");
    take(&s, 2, "b", SH).await.expect("b");
    take(&s, 3, "b", SH).await.expect("b");
    take(&s, 4, "c", X).await.expect("c");
    s.end_process(process(&a, 4)).await.expect("death");
    let list = s.list().await.expect("list");
    let names: Vec<&str> = list.iter().map(|v| v.resource.as_str()).collect();
    assert_eq!(names, vec!["a", "b", "c"]);
    assert_eq!(list[1].holders.len(), 2);
    assert!(list[2].dirty.is_some() && list[2].holders.is_empty());
    assert!(s.inspect(res("nope")).await.expect("inspect").is_none());
    // `status` counts what `list` shows, however the store counts.
    assert_eq!(
        s.counts().await.expect("counts"),
        crate::Counts {
            resources: 3,
            leases: 3,
            processes: 3,
            dirty: 1
        }
    );
    assert_eq!(s.counts().await.expect("counts"), crate::Counts::of(&list));
}

/// Events come out in order, for grants, endings and cleaning. That each is durable when
/// published needs a crash at that instant: `local_crash.rs` kills the local store's process
/// while it publishes grants, and checks that no published token is given out again; the
/// etcd store publishes only what its watch reads back from etcd.
pub async fn events_are_published_after_they_are_durable<H: Harness>(h: &H) {
    let a = host("a");
    let s = h.open(&a).await;
    let mut rx = s.subscribe();
    let t = take(&s, 1, "disk", X).await.expect("grant");
    s.end_process(process(&a, 1)).await.expect("death");
    s.mark_clean(res("disk"), "op".into()).await.expect("clean");
    let mut kinds = Vec::new();
    while kinds.len() < 3 {
        let e = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("event in time")
            .expect("event");
        match e {
            Event::Granted { lease, .. } => {
                assert_eq!(lease.token, t);
                kinds.push("granted");
            }
            Event::Ended { dirtied, .. } => {
                assert!(dirtied);
                kinds.push("ended");
            }
            Event::Cleaned { by, .. } => {
                assert_eq!(by, "op");
                kinds.push("cleaned");
            }
            Event::SessionExpired { .. } => {}
        }
    }
    assert_eq!(kinds, vec!["granted", "ended", "cleaned"]);
}

/// G1 across hosts (cluster stores only: `conformance_suite!(make, multi_host)`).
pub async fn hosts_exclude_each_other<H: Harness>(h: &H) {
    let a = h.open(&host("a")).await;
    let b = h.open(&host("b")).await;
    take(&a, 1, "disk", X).await.expect("a takes");
    let e = take(&b, 1, "disk", X).await.expect_err("b refused");
    assert_eq!(busy_holder(e).0, res("disk"));
    take(&a, 2, "ro", SH).await.expect("a shares");
    take(&b, 2, "ro", SH).await.expect("b shares");
    let v = b.inspect(res("ro")).await.expect("inspect").expect("known");
    let hosts: Vec<&str> = v.holders.iter().map(|l| l.owner.host().as_str()).collect();
    assert_eq!(hosts, vec!["a", "b"]);
}

/// Polls resource `r` of `s` until its view satisfies `f`, for up to 10 s.
async fn wait_for_view<S: Store>(s: &S, r: &str, f: impl Fn(&crate::ResourceView) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !s
        .inspect(res(r))
        .await
        .ok()
        .flatten()
        .is_some_and(|v| f(&v))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{r} did not reach the expected state in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
