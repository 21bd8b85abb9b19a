//! Given state, time and input, the exact decisions of the engine.

use super::*;
use crate::types::MAX_LABEL;
use crate::*;

mod endings;
mod owners;
mod resume;

const S: Duration = Duration::from_secs(1);

struct T {
    e: Engine,
    host: HostId,
    session: SessionId,
}

fn res(n: &str) -> ResourceName {
    ResourceName::new(n).unwrap()
}

fn owner_on(host: &HostId, pid: u32) -> Owner {
    Owner::new(host.clone(), pid, u64::from(pid) * 10)
}

impl T {
    fn new() -> T {
        let mut e = Engine::new(EngineConfig { grace: 5 * S });
        let host = HostId::new("a").unwrap();
        let session = e
            .open_session(host.clone(), Some(10 * S), Now::at(0))
            .unwrap();
        T { e, host, session }
    }

    fn owner(&self, pid: u32) -> Owner {
        owner_on(&self.host, pid)
    }

    fn req(&self, pid: u32, items: &[(&str, Mode)]) -> AcquireRequest {
        AcquireRequest {
            owner: self.owner(pid),
            session: self.session,
            items: items.iter().map(|(r, m)| (res(r), *m)).collect(),
            accept_dirty: false,
            wait: false,
            expect_tokens: Vec::new(),
        }
    }

    fn take(&mut self, pid: u32, r: &str, m: Mode, at: u64) -> Result<Token, AcquireError> {
        match self.e.acquire(self.req(pid, &[(r, m)]), Now::at(at))? {
            Acquired::Granted(g) => Ok(g[0].token),
            Acquired::Queued(_) => panic!("did not ask to wait"),
        }
    }

    fn wait(&mut self, pid: u32, items: &[(&str, Mode)], at: u64) -> WaiterId {
        let mut req = self.req(pid, items);
        req.wait = true;
        match self.e.acquire(req, Now::at(at)).unwrap() {
            Acquired::Queued(id) => id,
            Acquired::Granted(_) => panic!("granted at once"),
        }
    }

    fn release(
        &mut self,
        pid: u32,
        r: &str,
        kind: ReleaseKind,
        at: u64,
    ) -> Result<Released, ReleaseError> {
        self.e.release(
            ReleaseRequest {
                resource: res(r),
                process: self.owner(pid).process,
                owner_id: None,
                token: None,
                kind,
            },
            Now::at(at),
        )
    }

    fn holders(&self, r: &str) -> Vec<(u32, Mode)> {
        self.e
            .resource(&res(r))
            .map(|st| {
                st.holders
                    .iter()
                    .map(|l| (l.owner.process.pid, l.mode))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn is_dirty(&self, r: &str) -> bool {
        self.e
            .resource(&res(r))
            .is_some_and(|st| st.dirty.is_some())
    }

    /// The waiter outcomes decided since the last call: (waiter, granted?).
    fn outcomes(&mut self) -> Vec<(WaiterId, Result<Vec<Token>, AcquireError>)> {
        self.e
            .take_output()
            .waiters
            .into_iter()
            .map(|(id, r)| (id, r.map(|g| g.iter().map(|g| g.token).collect())))
            .collect()
    }
}

use Mode::{Exclusive as X, Shared as Sh};

#[test]
fn exclusive_excludes_everyone_and_names_the_holder() {
    let mut t = T::new();
    let tok = t.take(1, "d", X, 1).unwrap();
    match t.take(2, "d", X, 2) {
        Err(AcquireError::Busy(c)) => {
            assert_eq!(c.resource, res("d"));
            assert_eq!(c.holders.len(), 1);
            assert_eq!(c.holders[0].owner.process.pid, 1);
            assert_eq!(c.holders[0].token, tok);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(t.take(3, "d", Sh, 3), Err(AcquireError::Busy(_))));
    assert_eq!(t.holders("d"), vec![(1, X)]);
}

#[test]
fn shared_leases_coexist_but_not_with_exclusive() {
    let mut t = T::new();
    let a = t.take(1, "cache", Sh, 1).unwrap();
    let b = t.take(2, "cache", Sh, 2).unwrap();
    assert!(b > a);
    assert!(t.e.validate(&res("cache"), a) && t.e.validate(&res("cache"), b));
    assert!(matches!(
        t.take(3, "cache", X, 3),
        Err(AcquireError::Busy(_))
    ));
    assert_eq!(t.holders("cache"), vec![(1, Sh), (2, Sh)]);
}

#[test]
fn tokens_grow_per_resource_and_survive_restore() {
    let mut t = T::new();
    let mut last = Token(0);
    for i in 0..5 {
        let tok = t.take(1, "d", X, i).unwrap();
        assert!(tok > last, "{tok} after {last}");
        last = tok;
        t.release(1, "d", ReleaseKind::Clean, i).unwrap();
        assert!(!t.e.validate(&res("d"), tok));
    }
    // Restore from the durable parts only, as a store does after a restart.
    let meta = t.e.meta();
    let records: Vec<_> =
        t.e.resources()
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
    t.e = Engine::restore(*t.e.config(), meta, records);
    let tok = t.take(1, "d", X, 10).unwrap();
    assert!(tok > last);
}

#[test]
fn restore_never_reissues_even_if_the_counter_was_lost() {
    let mut t = T::new();
    let tok = t.take(1, "d", X, 1).unwrap();
    let records: Vec<_> =
        t.e.resources()
            .map(|(n, s)| (n.clone(), s.clone()))
            .collect();
    let mut meta = t.e.meta();
    meta.next_token = 0;
    t.e = Engine::restore(*t.e.config(), meta, records);
    t.release(1, "d", ReleaseKind::Clean, 2).unwrap();
    assert!(t.take(2, "d", X, 3).unwrap() > tok);
}

#[test]
fn only_unclean_exclusive_endings_dirty() {
    let mut t = T::new();
    t.take(1, "clean", X, 1).unwrap();
    t.release(1, "clean", ReleaseKind::Clean, 2).unwrap();
    assert!(!t.is_dirty("clean"));

    t.take(1, "flagged", X, 1).unwrap();
    let r = t
        .release(
            1,
            "flagged",
            ReleaseKind::Dirty {
                note: Some("exit status 3".into()),
            },
            2,
        )
        .unwrap();
    assert!(r.dirtied);
    assert!(t.is_dirty("flagged"));

    t.take(2, "crashed", X, 1).unwrap();
    t.take(2, "read", Sh, 1).unwrap();
    let ended = t.e.end_process(&t.owner(2).process, Now::at(3));
    assert_eq!(ended.len(), 2);
    assert!(t.is_dirty("crashed"));
    assert!(
        !t.is_dirty("read"),
        "a shared holder's death does not dirty"
    );
    let d =
        t.e.resource(&res("crashed"))
            .unwrap()
            .dirty
            .clone()
            .unwrap();
    assert_eq!(d.how, EndReason::ProcessDied);
    assert_eq!(d.owner.process.pid, 2);
}

#[test]
fn dirty_needs_check_unless_accepted_and_mark_clean_clears() {
    let mut t = T::new();
    let first = t.take(1, "d", X, 1).unwrap();
    t.e.end_process(&t.owner(1).process, Now::at(2));
    t.e.take_output();
    match t.take(2, "d", X, 3) {
        Err(AcquireError::NeedsCheck { resource, dirty }) => {
            assert_eq!(resource, res("d"));
            assert_eq!(dirty.token, first);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        t.take(2, "d", Sh, 3),
        Err(AcquireError::NeedsCheck { .. })
    ));
    // A refused request changes nothing.
    assert!(!t.e.take_output().needs_persist());

    let mut req = t.req(2, &[("d", X)]);
    req.accept_dirty = true;
    let Acquired::Granted(g) = t.e.acquire(req, Now::at(4)).unwrap() else {
        panic!()
    };
    assert_eq!(
        g[0].dirty.as_ref().unwrap().token,
        first,
        "the caller is told what to check"
    );
    assert!(t.is_dirty("d"), "accepting does not clean");
    let was = t.e.mark_clean(&res("d"), "root", Now::at(5)).unwrap();
    assert!(was.is_some());
    assert!(!t.is_dirty("d"));
    assert_eq!(t.e.mark_clean(&res("d"), "root", Now::at(6)).unwrap(), None);
    assert!(matches!(
        t.e.mark_clean(&res("never"), "root", Now::at(6)),
        Err(ReleaseError::Unknown(_))
    ));
}

#[test]
fn a_waiting_exclusive_is_not_starved_by_shared_requests() {
    let mut t = T::new();
    t.take(1, "img", Sh, 1).unwrap();
    let w = t.wait(2, &[("img", X)], 2);
    // A new shared request would be compatible with the holder, but it comes after the writer.
    match t.take(3, "img", Sh, 3) {
        Err(AcquireError::Busy(c)) => assert_eq!(c.waiting, 1),
        other => panic!("{other:?}"),
    }
    let w3 = t.wait(3, &[("img", Sh)], 3);
    t.e.take_output();
    t.release(1, "img", ReleaseKind::Clean, 4).unwrap();
    let out = t.outcomes();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, w);
    assert!(out[0].1.is_ok());
    assert_eq!(t.holders("img"), vec![(2, X)]);
    t.release(2, "img", ReleaseKind::Clean, 5).unwrap();
    let out = t.outcomes();
    assert_eq!(out[0].0, w3);
    assert_eq!(t.holders("img"), vec![(3, Sh)]);
}

#[test]
fn consecutive_shared_waiters_are_granted_together() {
    let mut t = T::new();
    t.take(1, "img", X, 1).unwrap();
    let a = t.wait(2, &[("img", Sh)], 2);
    let b = t.wait(3, &[("img", Sh)], 3);
    let c = t.wait(4, &[("img", X)], 4);
    t.e.take_output();
    t.release(1, "img", ReleaseKind::Clean, 5).unwrap();
    let ids: Vec<_> = t.outcomes().into_iter().map(|(id, _)| id).collect();
    assert_eq!(ids, vec![a, b]);
    assert_eq!(t.e.waiters_of(&res("img"))[0].0, c);
}

#[test]
fn several_resources_are_granted_all_or_nothing() {
    let mut t = T::new();
    t.take(1, "b", X, 1).unwrap();
    t.e.take_output();
    assert!(matches!(
        t.e.acquire(t.req(2, &[("a", X), ("b", X)]), Now::at(2)),
        Err(AcquireError::Busy(c)) if c.resource == res("b")
    ));
    assert!(t.holders("a").is_empty(), "nothing taken when one is busy");
    assert!(!t.e.take_output().needs_persist());
    t.release(1, "b", ReleaseKind::Clean, 3).unwrap();
    let Acquired::Granted(g) =
        t.e.acquire(t.req(2, &[("b", X), ("a", X)]), Now::at(4))
            .unwrap()
    else {
        panic!()
    };
    assert_eq!(g.len(), 2);
    assert_eq!(g[0].resource, res("a"), "grants come in name order");
}

#[test]
fn crossing_multi_resource_waiters_do_not_deadlock() {
    let mut t = T::new();
    t.take(1, "a", X, 1).unwrap();
    t.take(1, "b", X, 1).unwrap();
    let w2 = t.wait(2, &[("a", X), ("b", X)], 2);
    let w3 = t.wait(3, &[("b", X), ("a", X)], 3);
    t.e.take_output();
    t.release(1, "b", ReleaseKind::Clean, 4).unwrap();
    assert!(
        t.outcomes().is_empty(),
        "b is kept for w2, which still needs a"
    );
    t.release(1, "a", ReleaseKind::Clean, 5).unwrap();
    let out = t.outcomes();
    assert_eq!(out.iter().map(|o| o.0).collect::<Vec<_>>(), vec![w2]);
    t.e.end_process(&t.owner(2).process, Now::at(6));
    let out = t.outcomes();
    assert_eq!(out.iter().map(|o| o.0).collect::<Vec<_>>(), vec![w3]);
}

#[test]
fn an_expired_session_dirties_and_holds_its_resources_for_grace() {
    let mut e = Engine::new(EngineConfig { grace: 5 * S });
    let a = HostId::new("a").unwrap();
    let b = HostId::new("b").unwrap();
    let sa = e.open_session(a.clone(), Some(10 * S), Now::at(0)).unwrap();
    let sb = e.open_session(b.clone(), Some(10 * S), Now::at(0)).unwrap();
    let mk = |o: Owner, s, r: &str, m, wait, accept| AcquireRequest {
        owner: o,
        session: s,
        items: vec![(res(r), m)],
        accept_dirty: accept,
        wait,
        expect_tokens: Vec::new(),
    };
    e.acquire(mk(owner_on(&a, 1), sa, "disk", X, false, false), Now::at(1))
        .unwrap();
    e.acquire(mk(owner_on(&a, 1), sa, "ro", Sh, false, false), Now::at(1))
        .unwrap();
    // b keeps renewing; a stops.
    e.renew_session(sb, Now::at(9_000)).unwrap();
    e.tick(Now::at(9_999));
    assert_eq!(e.resource(&res("disk")).unwrap().holders.len(), 1);
    e.tick(Now::at(10_000));
    assert!(e.resource(&res("disk")).unwrap().holders.is_empty());
    assert_eq!(
        e.resource(&res("disk"))
            .unwrap()
            .dirty
            .as_ref()
            .unwrap()
            .how,
        EndReason::SessionExpired
    );
    assert!(e.resource(&res("ro")).unwrap().dirty.is_none());
    assert!(matches!(
        e.renew_session(sa, Now::at(10_001)),
        Err(SessionError::NoSession(_))
    ));
    // Grace: nobody gets either resource before 15 s, even accepting the check.
    let w = match e
        .acquire(
            mk(owner_on(&b, 2), sb, "disk", X, true, true),
            Now::at(10_001),
        )
        .unwrap()
    {
        Acquired::Queued(w) => w,
        Acquired::Granted(_) => panic!("granted inside grace"),
    };
    assert!(matches!(
        e.acquire(mk(owner_on(&b, 3), sb, "ro", Sh, false, false), Now::at(14_999)),
        Err(AcquireError::Busy(c)) if c.blocked_for == Some(Duration::from_millis(1))
    ));
    assert_eq!(e.next_deadline(), Some(Time(15_000)));
    e.take_output();
    e.tick(Now::at(14_999));
    assert!(e.take_output().waiters.is_empty());
    e.tick(Now::at(15_000));
    let out = e.take_output();
    assert_eq!(out.waiters.len(), 1);
    assert_eq!(out.waiters[0].0, w);
    assert!(out.waiters[0].1.as_ref().unwrap()[0].dirty.is_some());
}

// Issue 9 item 2: a refusal says how long the grace still lasts, as a duration; an engine
// instant ("until t=...ms") meant nothing to anyone, and on etcd it read t=18446744073709551615.
#[test]
fn a_refusal_and_the_view_in_a_grace_say_how_long_it_lasts() {
    let mut e = Engine::new(EngineConfig { grace: 5 * S });
    let a = HostId::new("a").unwrap();
    let b = HostId::new("b").unwrap();
    let sa = e.open_session(a.clone(), Some(10 * S), Now::at(0)).unwrap();
    let sb = e.open_session(b.clone(), None, Now::at(0)).unwrap();
    let take = |o: Owner, s| AcquireRequest {
        owner: o,
        session: s,
        items: vec![(res("disk"), X)],
        accept_dirty: true,
        wait: false,
        expect_tokens: Vec::new(),
    };
    e.acquire(take(owner_on(&a, 1), sa), Now::at(1)).unwrap();
    e.tick(Now::at(10_000));
    let refused = e.acquire(take(owner_on(&b, 2), sb), Now::at(11_700));
    let Err(AcquireError::Busy(c)) = refused else {
        panic!("granted or refused otherwise inside the grace: {refused:?}")
    };
    assert_eq!(c.blocked_for, Some(Duration::from_millis(3_300)));
    let said = AcquireError::Busy(c).to_string();
    assert!(
        said.contains("grace period") && said.contains("(3.3 s left)"),
        "{said}"
    );
    assert!(!said.contains("t="), "{said}");
    let v = e.view(&res("disk"), Now::at(14_000)).unwrap();
    assert_eq!(v.blocked_for, Some(Duration::from_secs(1)));
    assert!(v.holders.is_empty());
    assert_eq!(
        v.dirty.as_ref().map(|d| &d.how),
        Some(&EndReason::SessionExpired)
    );
    assert_eq!(
        e.view(&res("disk"), Now::at(15_000)).unwrap().blocked_for,
        None
    );
    assert!(e.view(&res("other"), Now::at(15_000)).is_none());
}

#[test]
fn a_renewed_session_lives_on() {
    let mut t = T::new();
    t.take(1, "d", X, 1).unwrap();
    for at in [5_000, 12_000, 19_000] {
        t.e.tick(Now::at(at));
        assert_eq!(
            t.e.renew_session(t.session, Now::at(at)).unwrap(),
            Some(Time(at + 10_000))
        );
    }
    t.e.tick(Now::at(28_999));
    assert_eq!(t.holders("d"), vec![(1, X)]);
}

#[test]
fn one_live_session_per_host() {
    let mut t = T::new();
    match t.e.open_session(t.host.clone(), None, Now::at(1)) {
        Err(SessionError::HostInUse { host, session }) => {
            assert_eq!(host, t.host);
            assert_eq!(session, t.session);
        }
        other => panic!("{other:?}"),
    }
    t.e.expire_session(t.session, Now::at(2)).unwrap();
    assert!(t.e.open_session(t.host.clone(), None, Now::at(3)).is_ok());
}

// Regression (found by the simulation, seed 11099266368055885456): a holder on a lost host
// could release cleanly, and another host be granted, after its session was due but before
// anyone ticked; the grace was skipped. Every operation now expires what is due first.
#[test]
fn a_due_session_is_expired_by_any_operation_not_only_tick() {
    let mut e = Engine::new(EngineConfig { grace: 5 * S });
    let a = HostId::new("a").unwrap();
    let b = HostId::new("b").unwrap();
    let sa = e.open_session(a.clone(), Some(10 * S), Now::at(0)).unwrap();
    let sb = e.open_session(b.clone(), Some(10 * S), Now::at(0)).unwrap();
    let req = |o: Owner, s, r: &str| AcquireRequest {
        owner: o,
        session: s,
        items: vec![(res(r), X)],
        accept_dirty: true,
        wait: false,
        expect_tokens: Vec::new(),
    };
    e.acquire(req(owner_on(&a, 1), sa, "x"), Now::at(1))
        .unwrap();
    e.renew_session(sb, Now::at(9_000)).unwrap();
    // No tick. At 12 s a's session is past due: it can neither take nor release anything.
    assert!(matches!(
        e.acquire(req(owner_on(&a, 1), sa, "y"), Now::at(12_000)),
        Err(AcquireError::NoSession(_))
    ));
    let rel = e.release(
        ReleaseRequest {
            resource: res("x"),
            process: owner_on(&a, 1).process,
            owner_id: None,
            token: None,
            kind: ReleaseKind::Clean,
        },
        Now::at(12_000),
    );
    assert!(matches!(rel, Err(ReleaseError::NotHeld { .. })));
    let st = e.resource(&res("x")).unwrap();
    assert_eq!(st.dirty.as_ref().unwrap().how, EndReason::SessionExpired);
    // The grace runs from the expiry, which is no earlier than the due time.
    assert!(matches!(
        e.acquire(req(owner_on(&b, 2), sb, "x"), Now::at(12_001)),
        Err(AcquireError::Busy(c)) if c.blocked_for.is_some_and(|d| d >= Duration::from_millis(2_999))
    ));
    assert!(
        e.open_session(a.clone(), None, Now::at(12_002)).is_ok(),
        "the host may start a new session once the old one is gone"
    );
}

// Regression (seed 10164609438164132693): a tick with two sessions due expired them one at a
// time and served waiters in between, granting a waiter whose own session expired a moment
// later in the same tick.
#[test]
fn a_tick_expires_every_due_session_before_serving_anyone() {
    let mut e = Engine::new(EngineConfig { grace: 5 * S });
    let (a, b, c) = (
        HostId::new("a").unwrap(),
        HostId::new("b").unwrap(),
        HostId::new("c").unwrap(),
    );
    let sa = e.open_session(a.clone(), Some(10 * S), Now::at(0)).unwrap();
    let sb = e.open_session(b.clone(), Some(10 * S), Now::at(0)).unwrap();
    let sc = e.open_session(c.clone(), None, Now::at(0)).unwrap();
    let req = |o: Owner, s, items: &[&str], wait| AcquireRequest {
        owner: o,
        session: s,
        items: items.iter().map(|r| (res(r), X)).collect(),
        accept_dirty: false,
        wait,
        expect_tokens: Vec::new(),
    };
    // c holds z for good. a waits for y and z together (first in y's queue, stuck on z);
    // b waits for y behind it. Both a and b fall due at 10 s.
    e.acquire(req(owner_on(&c, 3), sc, &["z"], false), Now::at(1))
        .unwrap();
    let Acquired::Queued(_) = e
        .acquire(req(owner_on(&a, 1), sa, &["y", "z"], true), Now::at(2))
        .unwrap()
    else {
        panic!("a should wait")
    };
    let Acquired::Queued(w) = e
        .acquire(req(owner_on(&b, 2), sb, &["y"], true), Now::at(3))
        .unwrap()
    else {
        panic!("b should wait")
    };
    e.take_output();
    e.tick(Now::at(10_000));
    let out = e.take_output();
    let b_outcome = out.waiters.iter().find(|(id, _)| *id == w).map(|(_, r)| r);
    assert!(
        matches!(b_outcome, Some(Err(AcquireError::Cancelled(_)))),
        "b's waiter must be told it is cancelled, never granted: {:?}",
        out.waiters
    );
    assert!(
        !out.events
            .iter()
            .any(|e| matches!(e, Event::Granted { .. })),
        "nothing is granted in a tick that expires the grantee's session"
    );
}

#[test]
fn a_waiter_decided_elsewhere_keeps_its_place_and_is_never_granted_here() {
    let mut t = T::new();
    t.take(1, "d", X, 1).unwrap();
    // A remote waiter (id 50) queued before our local one (id 60).
    let remote = AcquireRequest {
        owner: owner_on(&HostId::new("other").unwrap(), 9),
        session: SessionId(77),
        items: vec![(res("d"), X)],
        accept_dirty: false,
        wait: true,
        expect_tokens: Vec::new(),
    };
    t.e.insert_waiter(WaiterId(50), remote.clone(), false)
        .unwrap();
    assert!(
        t.e.insert_waiter(WaiterId(50), remote, false).is_err(),
        "ids are unique"
    );
    let mut local = t.req(2, &[("d", X)]);
    local.wait = true;
    t.e.insert_waiter(WaiterId(60), local, true).unwrap();
    t.e.take_output();
    t.release(1, "d", ReleaseKind::Clean, 2).unwrap();
    // The remote waiter is first: nobody is granted here, the local one still waits.
    assert!(t.outcomes().is_empty());
    assert_eq!(t.e.waiters_of(&res("d")).len(), 2);
    // A handover may name the remote waiter's host: the resource is kept for it.
    t.take(3, "e", X, 3).unwrap();
    let remote_e = AcquireRequest {
        owner: owner_on(&HostId::new("other").unwrap(), 9),
        session: SessionId(77),
        items: vec![(res("e"), X)],
        accept_dirty: false,
        wait: true,
        expect_tokens: Vec::new(),
    };
    t.e.insert_waiter(WaiterId(70), remote_e, false).unwrap();
    t.e.take_output();
    let to = ReleaseKind::Handover {
        host: HostId::new("other").unwrap(),
        label: None,
    };
    t.release(3, "e", to, 4).unwrap();
    assert_eq!(
        t.e.resource(&res("e")).unwrap().reserved_for,
        Some(WaiterId(70))
    );
    assert!(
        t.outcomes().is_empty(),
        "granting it is the other host's business"
    );
    // New local waits take ids past the inserted ones.
    let id = t.wait(4, &[("f", X), ("d", X)], 5);
    assert!(id > WaiterId(70));
}

/// SPEC §7: one agent holds 100,000 leases in 100 MiB. The engine keeps a record per
/// resource, so the bytes of each count 100,000 times: a lease's end is boxed (most records
/// have none) and a resource's first holder takes room for one lease, not four.
#[test]
fn a_held_resource_costs_its_lease_and_a_small_record() {
    assert!(
        std::mem::size_of::<ResourceState>() <= 128,
        "ResourceState is {} bytes inline",
        std::mem::size_of::<ResourceState>()
    );
    let mut t = T::new();
    t.take(1, "d", X, 1).unwrap();
    assert_eq!(t.e.resource(&res("d")).unwrap().holders.capacity(), 1);
    // Shared holders still grow as they come, and an ending is kept boxed as before.
    t.take(1, "s", Sh, 2).unwrap();
    t.take(2, "s", Sh, 3).unwrap();
    assert_eq!(t.holders("s"), vec![(1, Sh), (2, Sh)]);
    t.release(1, "d", ReleaseKind::Dirty { note: None }, 4)
        .unwrap();
    let st = t.e.resource(&res("d")).unwrap();
    assert_eq!(
        st.dirty().map(|d| d.token),
        st.last_ended().map(|e| e.token)
    );
    assert!(st.dirty().is_some());
}
