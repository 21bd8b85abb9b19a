//! Given state, time and input, the exact decisions of the engine when leases end: handover,
//! force-release, releases that fail, and waiters that leave.

use super::*;

#[test]
fn handover_moves_the_lease_past_earlier_waiters() {
    let mut e = Engine::new(EngineConfig { grace: 5 * S });
    let a = HostId::new("src").unwrap();
    let b = HostId::new("dst").unwrap();
    let c = HostId::new("other").unwrap();
    let sa = e.open_session(a.clone(), Some(10 * S), Now::at(0)).unwrap();
    let sb = e.open_session(b.clone(), Some(10 * S), Now::at(0)).unwrap();
    let sc = e.open_session(c.clone(), Some(10 * S), Now::at(0)).unwrap();
    let mk = |o: Owner, s, wait| AcquireRequest {
        owner: o,
        session: s,
        items: vec![(res("vm"), X)],
        accept_dirty: false,
        wait,
        expect_tokens: Vec::new(),
    };
    let Acquired::Granted(g) = e
        .acquire(mk(owner_on(&a, 1), sa, false), Now::at(1))
        .unwrap()
    else {
        panic!()
    };
    let old = g[0].token;
    let Acquired::Queued(third) = e
        .acquire(mk(owner_on(&c, 3), sc, true), Now::at(2))
        .unwrap()
    else {
        panic!()
    };
    let dst = owner_on(&b, 2).with_label("vm-42");
    let Acquired::Queued(w) = e.acquire(mk(dst.clone(), sb, true), Now::at(3)).unwrap() else {
        panic!()
    };
    e.take_output();

    // Naming a host or label nobody waits on changes nothing.
    let bad = e.release(
        ReleaseRequest {
            resource: res("vm"),
            process: owner_on(&a, 1).process,
            owner_id: None,
            token: None,
            kind: ReleaseKind::Handover {
                host: b.clone(),
                label: Some("vm-7".into()),
            },
        },
        Now::at(4),
    );
    assert!(matches!(bad, Err(ReleaseError::NoWaiter { .. })));
    assert!(e.validate(&res("vm"), old));
    assert!(!e.take_output().needs_persist());

    let r = e
        .release(
            ReleaseRequest {
                resource: res("vm"),
                process: owner_on(&a, 1).process,
                owner_id: None,
                token: None,
                kind: ReleaseKind::Handover {
                    host: b.clone(),
                    label: Some("vm-42".into()),
                },
            },
            Now::at(5),
        )
        .unwrap();
    assert!(!r.dirtied);
    let out = e.take_output();
    assert_eq!(out.waiters.len(), 1, "only the named waiter is granted");
    assert_eq!(out.waiters[0].0, w);
    let new = out.waiters[0].1.as_ref().unwrap()[0].token;
    assert!(new > old);
    assert!(!e.validate(&res("vm"), old));
    assert!(e.validate(&res("vm"), new));
    let st = e.resource(&res("vm")).unwrap();
    assert_eq!(st.holders.len(), 1);
    assert_eq!(st.holders[0].owner, dst);
    assert!(st.dirty.is_none());
    assert_eq!(
        e.waiters_of(&res("vm"))[0].0,
        third,
        "the earlier waiter still waits"
    );
}

/// A label is not an identity: a handover skips a waiter of another user, even one that
/// queued first with the same label, and goes to the holder's own user or root.
#[test]
fn handover_goes_only_to_the_holders_user_or_root() {
    let mut t = T::new();
    let host = t.host.clone();
    let with_uid = |pid, uid| Owner {
        uid: Some(uid),
        ..owner_on(&host, pid).with_label("vm-42")
    };
    let req = |t: &mut T, o: Owner, wait| {
        let r = AcquireRequest {
            owner: o,
            session: t.session,
            items: vec![(res("vm"), X)],
            accept_dirty: false,
            wait,
            expect_tokens: Vec::new(),
        };
        t.e.acquire(r, Now::at(1)).unwrap()
    };
    let Acquired::Granted(g) = req(&mut t, with_uid(1, 0), false) else {
        panic!("granted at once")
    };
    let old = g[0].token;
    // A user's waiter queues first with the label of the destination.
    let Acquired::Queued(_) = req(&mut t, with_uid(2, 1000), true) else {
        panic!("queued")
    };
    let to = ReleaseKind::Handover {
        host: t.host.clone(),
        label: Some("vm-42".into()),
    };
    // With only that waiter, the handover is refused, naming why, and nothing changes.
    t.e.take_output();
    match t.release(1, "vm", to.clone(), 2) {
        Err(e @ ReleaseError::WaiterOfOtherUser { .. }) => {
            let m = e.to_string();
            assert!(m.contains("uid 1000") && m.contains("uid 0"), "{m}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(t.e.validate(&res("vm"), old));
    assert!(!t.e.take_output().needs_persist());
    // Root's destination queues second; the handover skips the user's waiter.
    let Acquired::Queued(dest) = req(&mut t, with_uid(3, 0), true) else {
        panic!("queued")
    };
    t.e.take_output();
    t.release(1, "vm", to, 3).unwrap();
    let out = t.e.take_output();
    assert_eq!(out.waiters.len(), 1);
    assert_eq!(out.waiters[0].0, dest);
    assert_eq!(t.holders("vm"), vec![(3, X)]);
}

#[test]
fn handover_to_a_waiter_of_several_resources_keeps_each_for_it() {
    let mut t = T::new();
    t.take(1, "d1", X, 1).unwrap();
    t.take(1, "d2", X, 1).unwrap();
    let w = t.wait(2, &[("d1", X), ("d2", X)], 2);
    t.e.take_output();
    let to = ReleaseKind::Handover {
        host: t.host.clone(),
        label: None,
    };
    t.release(1, "d1", to.clone(), 3).unwrap();
    assert!(t.outcomes().is_empty());
    // Nobody else can take d1 meanwhile.
    match t.take(3, "d1", X, 4) {
        Err(AcquireError::Busy(c)) => assert!(c.reserved),
        other => panic!("{other:?}"),
    }
    t.release(1, "d2", to, 5).unwrap();
    let out = t.outcomes();
    assert_eq!(out[0].0, w);
    assert_eq!(t.holders("d1"), vec![(2, X)]);
    assert_eq!(t.holders("d2"), vec![(2, X)]);
}

#[test]
fn a_shared_lease_cannot_be_handed_over() {
    let mut t = T::new();
    t.take(1, "d", Sh, 1).unwrap();
    t.wait(2, &[("d", X)], 2);
    let to = ReleaseKind::Handover {
        host: t.host.clone(),
        label: None,
    };
    assert!(matches!(
        t.release(1, "d", to, 3),
        Err(ReleaseError::HandoverShared(_))
    ));
    assert_eq!(t.holders("d"), vec![(1, Sh)]);
}

#[test]
fn force_release_revokes_dirties_and_records_why() {
    let mut t = T::new();
    t.take(1, "d", X, 1).unwrap();
    assert!(matches!(
        t.e.force_release(&res("d"), "  ", "root", Now::at(2)),
        Err(ReleaseError::Invalid(_))
    ));
    assert_eq!(t.holders("d"), vec![(1, X)]);
    t.e.take_output();
    let r =
        t.e.force_release(&res("d"), "host hung", "root", Now::at(3))
            .unwrap();
    assert_eq!(r.len(), 1);
    let out = t.e.take_output();
    assert!(out.events.iter().any(|e| matches!(e,
        Event::Ended { ended, dirtied: true, .. }
            if ended.how == EndReason::Forced { reason: "host hung".into(), by: "root".into() })));
    assert!(t.is_dirty("d"));
    assert!(matches!(
        t.e.force_release(&res("d"), "again", "root", Now::at(4)),
        Err(ReleaseError::Unheld(_))
    ));
}

/// The leases of a revocable holder whose host session was lost end by token: the one named
/// ends as fenced (dirty if exclusive), a token that is no longer a holder's ends nothing.
#[test]
fn end_leases_ends_exactly_the_named_tokens() {
    let mut t = T::new();
    let old = t.take(1, "d", X, 1).unwrap();
    let other = t.take(2, "e", Sh, 1).unwrap();
    t.e.take_output();
    let r = t.e.end_leases(
        &[(res("d"), old), (res("e"), Token(other.0 + 100))],
        EndReason::Fenced,
        Now::at(2),
    );
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].ended.token, old);
    assert_eq!(r[0].ended.how, EndReason::Fenced);
    assert!(t.holders("d").is_empty());
    assert!(t.is_dirty("d"));
    assert_eq!(t.holders("e"), vec![(2, Sh)]);
    // Ending an ended lease again ends nothing.
    assert!(
        t.e.end_leases(&[(res("d"), old)], EndReason::Fenced, Now::at(3))
            .is_empty()
    );
}

#[test]
fn reacquiring_what_one_holds_returns_the_same_grant() {
    let mut t = T::new();
    let tok = t.take(1, "d", X, 1).unwrap();
    t.e.take_output();
    assert_eq!(t.take(1, "d", X, 2).unwrap(), tok);
    assert!(!t.e.take_output().needs_persist());
    assert!(matches!(
        t.take(1, "d", Sh, 3),
        Err(AcquireError::ModeConflict { held: X, .. })
    ));
}

#[test]
fn bad_requests_change_nothing() {
    let mut t = T::new();
    t.e.take_output();
    let mut cases = vec![t.req(1, &[]), t.req(1, &[("a", X), ("a", Sh)])];
    let mut r = t.req(1, &[("a", X)]);
    r.session = SessionId(99);
    cases.push(r);
    let mut r = t.req(1, &[("a", X)]);
    r.owner.process.host = HostId::new("elsewhere").unwrap();
    cases.push(r);
    let mut r = t.req(1, &[("a", X)]);
    r.owner.label = Some("x".repeat(MAX_LABEL + 1));
    cases.push(r);
    let many: Vec<String> = (0..=MAX_ITEMS).map(|i| format!("r{i}")).collect();
    let mut r = t.req(1, &[]);
    r.items = many.iter().map(|n| (res(n), X)).collect();
    cases.push(r);
    for req in cases {
        assert!(
            matches!(
                t.e.acquire(req.clone(), Now::at(1)),
                Err(AcquireError::Invalid(_) | AcquireError::NoSession(_))
            ),
            "{req:?}"
        );
    }
    assert_eq!(t.e.take_output(), Output::default());
    assert_eq!(t.e.resources().count(), 0);
}

#[test]
fn releasing_what_one_does_not_hold_fails() {
    let mut t = T::new();
    t.take(1, "d", X, 1).unwrap();
    assert!(matches!(
        t.release(2, "d", ReleaseKind::Clean, 2),
        Err(ReleaseError::NotHeld { .. })
    ));
    // A reused pid with another start time is another process.
    let mut p = t.owner(1).process;
    p.start_time += 1;
    let r = t.e.release(
        ReleaseRequest {
            resource: res("d"),
            process: p,
            owner_id: None,
            token: None,
            kind: ReleaseKind::Clean,
        },
        Now::at(3),
    );
    assert!(matches!(r, Err(ReleaseError::NotHeld { .. })));
    assert_eq!(t.holders("d"), vec![(1, X)]);
}

#[test]
fn a_dead_waiter_leaves_the_queue_and_a_cancelled_one_too() {
    let mut t = T::new();
    t.take(1, "d", X, 1).unwrap();
    let w2 = t.wait(2, &[("d", X)], 2);
    let w3 = t.wait(3, &[("d", X)], 3);
    let w4 = t.wait(4, &[("d", X)], 4);
    t.e.take_output();
    t.e.end_process(&t.owner(2).process, Now::at(5));
    let out = t.outcomes();
    assert!(matches!(&out[..], [(id, Err(AcquireError::Cancelled(_)))] if *id == w2));
    assert!(t.e.cancel_wait(w3, Now::at(6)));
    assert!(!t.e.cancel_wait(w3, Now::at(6)));
    t.release(1, "d", ReleaseKind::Clean, 7).unwrap();
    let out = t.outcomes();
    assert_eq!(out[0].0, w4);
}

#[test]
fn a_waiter_on_a_dirty_resource_is_told_to_check_when_its_turn_comes() {
    let mut t = T::new();
    t.take(1, "d", X, 1).unwrap();
    t.e.end_process(&t.owner(1).process, Now::at(1));
    let mut req = t.req(2, &[("d", X)]);
    req.accept_dirty = true;
    t.e.acquire(req, Now::at(2)).unwrap();
    let w = t.wait(3, &[("d", X)], 3);
    t.e.take_output();
    t.release(2, "d", ReleaseKind::Clean, 4).unwrap();
    let out = t.outcomes();
    assert!(matches!(&out[..], [(id, Err(AcquireError::NeedsCheck { .. }))] if *id == w));
}

#[test]
fn a_waiter_that_comes_and_goes_leaves_no_record() {
    let mut t = T::new();
    t.take(1, "a", X, 1).unwrap();
    let w = t.wait(2, &[("a", X), ("b", X)], 2);
    assert!(t.e.resource(&res("b")).is_some());
    t.e.cancel_wait(w, Now::at(3));
    assert!(t.e.resource(&res("b")).is_none());
}

#[test]
fn an_exit_with_status_zero_is_clean_only_for_owners_that_chose_it() {
    let mut t = T::new();
    // pid 1 chose "status" (libvirt's QEMU); pid 2 did not.
    let mut req = t.req(1, &[("vm-disk", Mode::Exclusive)]);
    req.owner.on_exit = OnExit::Status;
    t.e.acquire(req, Now::at(0)).unwrap();
    t.take(2, "other-disk", Mode::Exclusive, 0).unwrap();
    for pid in [1, 2] {
        let ended =
            t.e.end_process_as(&t.owner(pid).process, EndReason::ExitedClean, Now::at(1));
        assert_eq!(ended.len(), 1, "pid {pid} held one lease");
    }
    let clean = t.e.view(&res("vm-disk"), Now::at(2)).unwrap();
    assert!(
        clean.dirty.is_none(),
        "status 0 with on_exit=status is clean: {clean:?}"
    );
    assert_eq!(
        clean.last_ended.map(|e| e.how),
        Some(EndReason::ExitedClean)
    );
    let dirty = t.e.view(&res("other-disk"), Now::at(2)).unwrap();
    assert_eq!(
        dirty.dirty.map(|e| e.how),
        Some(EndReason::ProcessDied),
        "an owner that did not choose on_exit=status is dirty whatever its exit status"
    );
}

/// A release that names the token of the lease it ends leaves alone a later lease of the
/// same owner: a release on its way (the agent's undo of a grant nobody read, retried or
/// re-run by the store) while an admin force-released the lease and the same process was
/// granted the resource again must not end the new lease (SPEC G1: its holder, told it holds
/// it, keeps writing while another owner could be granted the disk). Before, a release was
/// by owner only, and ended the new lease.
#[test]
fn a_release_with_a_stale_token_leaves_the_owners_new_lease() {
    let mut t = T::new();
    let old = t.take(1, "d", X, 1).unwrap();
    t.e.force_release(&res("d"), "stuck", "root", Now::at(2))
        .unwrap();
    t.e.mark_clean(&res("d"), "root", Now::at(3)).unwrap();
    let new = t.take(1, "d", X, 4).unwrap();
    assert!(new > old);
    t.e.take_output();
    let holder = t.owner(1).process;
    let with = |token: Token| ReleaseRequest {
        resource: res("d"),
        process: holder.clone(),
        owner_id: None,
        token: Some(token),
        kind: ReleaseKind::Clean,
    };
    let stale = with(old);
    let r = t.e.release(stale.clone(), Now::at(5));
    assert_eq!(
        r,
        Err(ReleaseError::StaleToken {
            resource: res("d"),
            process: t.owner(1).process,
            owner_id: None,
            token: old,
            holding: Some(new),
        })
    );
    let message = r.unwrap_err().to_string();
    assert!(
        message.contains(&format!("holds token {new} now"))
            && message.contains("nothing was released"),
        "{message}"
    );
    // Nothing changed: the new lease stands, nothing to persist, no event.
    assert_eq!(t.holders("d"), vec![(1, X)]);
    assert!(t.e.validate(&res("d"), new));
    assert!(!t.e.take_output().needs_persist());

    // The lease's own token ends it.
    let ended = t.e.release(with(new), Now::at(6)).unwrap();
    assert_eq!(ended.ended.token, new);
    assert!(t.holders("d").is_empty());
    // Held by nobody now: the stale token still ends nothing, and says so.
    t.e.take_output();
    assert!(matches!(
        t.e.release(stale, Now::at(7)),
        Err(ReleaseError::StaleToken { holding: None, .. })
    ));
    assert!(!t.e.take_output().needs_persist());
    // Without a token, a release is by owner, as before.
    let again = t.take(1, "d", X, 8).unwrap();
    assert_eq!(
        t.release(1, "d", ReleaseKind::Clean, 9)
            .unwrap()
            .ended
            .token,
        again
    );
}
