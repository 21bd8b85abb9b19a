//! Several owners inside one process (SPEC §2: an owner id tells them apart): they exclude
//! each other as two processes would, each releases only its own lease, and the process's
//! exit ends the leases of all of them.

use super::*;

fn id(s: &str) -> OwnerId {
    OwnerId::new(s).unwrap()
}

impl T {
    fn req_as(&self, pid: u32, owner: &str, r: &str, m: Mode) -> AcquireRequest {
        let mut req = self.req(pid, &[(r, m)]);
        req.owner = req.owner.with_id(id(owner));
        req
    }

    fn take_as(
        &mut self,
        pid: u32,
        owner: &str,
        r: &str,
        m: Mode,
        at: u64,
    ) -> Result<Token, AcquireError> {
        match self.e.acquire(self.req_as(pid, owner, r, m), Now::at(at))? {
            Acquired::Granted(g) => Ok(g[0].token),
            Acquired::Queued(_) => panic!("did not ask to wait"),
        }
    }

    fn release_as(
        &mut self,
        pid: u32,
        owner: Option<&str>,
        r: &str,
        at: u64,
    ) -> Result<Released, ReleaseError> {
        self.e.release(
            ReleaseRequest {
                resource: res(r),
                process: self.owner(pid).process,
                owner_id: owner.map(id),
                token: None,
                kind: ReleaseKind::Clean,
            },
            Now::at(at),
        )
    }
}

#[test]
fn two_owner_ids_of_one_process_exclude_each_other() {
    let mut t = T::new();
    let tok = t.take_as(1, "thread-a", "d", X, 1).unwrap();
    // The same owner asking again gets its lease back, as a process does.
    assert_eq!(t.take_as(1, "thread-a", "d", X, 2).unwrap(), tok);
    match t.take_as(1, "thread-b", "d", X, 3) {
        Err(AcquireError::Busy(c)) => {
            assert_eq!(c.holders.len(), 1);
            assert_eq!(c.holders[0].owner.id, Some(id("thread-a")));
            assert_eq!(c.holders[0].token, tok);
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        t.take_as(1, "thread-b", "d", Sh, 4),
        Err(AcquireError::Busy(_))
    ));
    // The process without an owner id is a third owner, refused as well.
    assert!(matches!(t.take(1, "d", X, 5), Err(AcquireError::Busy(_))));
    assert_eq!(t.holders("d"), vec![(1, X)]);
}

#[test]
fn shared_leases_of_two_owner_ids_coexist_and_end_one_by_one() {
    let mut t = T::new();
    let a = t.take_as(1, "a", "img", Sh, 1).unwrap();
    let b = t.take_as(1, "b", "img", Sh, 2).unwrap();
    assert_ne!(a, b);
    assert_eq!(t.holders("img"), vec![(1, Sh), (1, Sh)]);
    assert_eq!(t.e.resource(&res("img")).unwrap().violation(), None);

    // A release names its owner: another id, or none, releases nothing.
    assert!(matches!(
        t.release_as(1, Some("c"), "img", 3),
        Err(ReleaseError::NotHeld {
            owner_id: Some(_),
            ..
        })
    ));
    assert!(matches!(
        t.release_as(1, None, "img", 3),
        Err(ReleaseError::NotHeld { .. })
    ));
    let r = t.release_as(1, Some("a"), "img", 4).unwrap();
    assert_eq!(r.ended.owner.id, Some(id("a")));
    assert!(!t.e.validate(&res("img"), a));
    assert!(t.e.validate(&res("img"), b));
    // The process still holds through "b".
    assert_eq!(t.e.held_by(&t.owner(1).process).count(), 1);
    t.release_as(1, Some("b"), "img", 5).unwrap();
    assert_eq!(t.e.held_by(&t.owner(1).process).count(), 0);
    assert!(t.e.holders().next().is_none());
}

#[test]
fn a_waiting_owner_id_is_granted_when_its_sibling_releases() {
    let mut t = T::new();
    t.take_as(7, "a", "d", X, 1).unwrap();
    let mut req = t.req_as(7, "b", "d", X);
    req.wait = true;
    let Acquired::Queued(w) = t.e.acquire(req, Now::at(2)).unwrap() else {
        panic!("granted beside its sibling")
    };
    t.e.take_output();
    t.release_as(7, Some("a"), "d", 3).unwrap();
    let out = t.outcomes();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, w);
    assert!(out[0].1.is_ok());
    let st = t.e.resource(&res("d")).unwrap();
    assert_eq!(st.holders()[0].owner.id, Some(id("b")));
    assert!(!t.is_dirty("d"));
}

#[test]
fn the_process_exit_ends_every_owner_id_and_their_waiters() {
    let mut t = T::new();
    t.take_as(3, "a", "x", X, 1).unwrap();
    t.take_as(3, "b", "y", Sh, 1).unwrap();
    t.take_as(3, "c", "y", Sh, 1).unwrap();
    t.take(3, "z", X, 1).unwrap();
    let mut req = t.req_as(3, "d", "x", X);
    req.wait = true;
    let Acquired::Queued(w) = t.e.acquire(req, Now::at(2)).unwrap() else {
        panic!()
    };
    t.e.take_output();
    let ended = t.e.end_process(&t.owner(3).process, Now::at(3));
    assert_eq!(ended.len(), 4, "{ended:?}");
    assert!(ended.iter().all(|r| r.ended.how == EndReason::ProcessDied));
    assert!(t.holders("x").is_empty() && t.holders("y").is_empty() && t.holders("z").is_empty());
    assert!(t.is_dirty("x") && t.is_dirty("z") && !t.is_dirty("y"));
    assert!(t.e.holders().next().is_none());
    let out = t.outcomes();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, w);
    assert!(matches!(out[0].1, Err(AcquireError::Cancelled(_))));
}

#[test]
fn a_bad_owner_id_is_refused_and_changes_nothing() {
    assert!(OwnerId::new("").is_err());
    assert!(OwnerId::new("a b").is_err());
    assert!(OwnerId::new("x".repeat(65)).is_err());
    assert!(OwnerId::new("0b6f2c1e-8a4d-4c1a-9f3e-2d5b7a9c1e00").is_ok());
    let bad: Result<Owner, _> = serde_json::from_value(serde_json::json!({
        "process": {"host": "a", "pid": 1, "start_time": 1},
        "id": "a/b",
    }));
    assert!(bad.is_err());
}

#[test]
fn records_written_before_owner_ids_read_as_none() {
    let old =
        serde_json::json!({"process": {"host": "a", "pid": 1, "start_time": 1}, "label": "vm"});
    let o: Owner = serde_json::from_value(old).unwrap();
    assert_eq!(o.id, None);
    assert!(o.is(&o.process, None));
    // And one without an id writes no id field, so older agents read it too.
    assert!(serde_json::to_value(&o).unwrap().get("id").is_none());
    let with = o.clone().with_id(id("t1"));
    let back: Owner = serde_json::from_value(serde_json::to_value(&with).unwrap()).unwrap();
    assert_eq!(back, with);
    assert!(!back.same_as(&o));
}
