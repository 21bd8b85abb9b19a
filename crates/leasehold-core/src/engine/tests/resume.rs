//! Taking a lease back only if nobody held it since (expected tokens: a paused VM resuming, a
//! migrating VM arriving).

use super::*;

fn with_tokens(
    t: &T,
    pid: u32,
    items: &[(&str, Mode)],
    expect: &[(&str, Token)],
) -> AcquireRequest {
    let mut req = t.req(pid, items);
    req.expect_tokens = expect.iter().map(|(r, tok)| (res(r), *tok)).collect();
    req
}

#[test]
fn a_lease_comes_back_when_its_token_is_still_the_last() {
    let mut t = T::new();
    let first = t.take(1, "disk", Mode::Exclusive, 0).unwrap();
    t.release(1, "disk", ReleaseKind::Clean, 1).unwrap();
    let req = with_tokens(&t, 2, &[("disk", Mode::Exclusive)], &[("disk", first)]);
    let Acquired::Granted(g) = t.e.acquire(req, Now::at(2)).unwrap() else {
        panic!("queued");
    };
    assert!(
        g[0].token > first,
        "a new token: {:?} after {first:?}",
        g[0].token
    );
    // The same request again from the holder itself is its existing lease.
    let req = with_tokens(&t, 2, &[("disk", Mode::Exclusive)], &[("disk", first)]);
    let Acquired::Granted(again) = t.e.acquire(req, Now::at(3)).unwrap() else {
        panic!("queued");
    };
    assert!(again[0].existing);
}

#[test]
fn a_lease_someone_held_in_between_is_refused_even_after_they_let_go() {
    let mut t = T::new();
    let first = t.take(1, "disk", Mode::Exclusive, 0).unwrap();
    t.release(1, "disk", ReleaseKind::Clean, 1).unwrap();
    let thief = t.take(3, "disk", Mode::Exclusive, 2).unwrap();
    t.release(3, "disk", ReleaseKind::Clean, 3).unwrap();
    let req = with_tokens(&t, 1, &[("disk", Mode::Exclusive)], &[("disk", first)]);
    match t.e.acquire(req, Now::at(4)) {
        Err(AcquireError::Moved {
            resource,
            expected,
            last,
        }) => {
            assert_eq!(resource, res("disk"));
            assert_eq!(expected, first);
            assert_eq!(last, thief);
        }
        other => panic!("expected Moved, got {other:?}"),
    }
    // Nothing was granted: the resource is free.
    assert!(t.holders("disk").is_empty());
}

#[test]
fn a_lease_held_now_is_busy_and_the_request_does_not_wait() {
    let mut t = T::new();
    let first = t.take(1, "disk", Mode::Exclusive, 0).unwrap();
    let mut req = with_tokens(&t, 2, &[("disk", Mode::Exclusive)], &[("disk", first)]);
    req.wait = true;
    match t.e.acquire(req, Now::at(1)) {
        Err(AcquireError::Busy(c)) => assert_eq!(c.resource, res("disk")),
        other => panic!("expected Busy, got {other:?}"),
    }
}

#[test]
fn all_or_nothing_and_bad_expectations_are_refused() {
    let mut t = T::new();
    let a = t.take(1, "a", Mode::Exclusive, 0).unwrap();
    t.release(1, "a", ReleaseKind::Clean, 1).unwrap();
    let b = t.take(1, "b", Mode::Exclusive, 2).unwrap();
    t.release(1, "b", ReleaseKind::Clean, 3).unwrap();
    t.take(4, "b", Mode::Exclusive, 4).unwrap();
    t.release(4, "b", ReleaseKind::Clean, 5).unwrap();
    let req = with_tokens(
        &t,
        1,
        &[("a", Mode::Exclusive), ("b", Mode::Exclusive)],
        &[("a", a), ("b", b)],
    );
    assert!(matches!(
        t.e.acquire(req, Now::at(6)),
        Err(AcquireError::Moved { .. })
    ));
    assert!(t.holders("a").is_empty(), "a was granted alone");
    for (items, expect) in [
        (vec![("a", Mode::Exclusive)], vec![("b", a)]),
        (vec![("a", Mode::Shared)], vec![("a", a)]),
    ] {
        let req = with_tokens(&t, 1, &items, &expect);
        assert!(
            matches!(t.e.acquire(req, Now::at(7)), Err(AcquireError::Invalid(_))),
            "{items:?} {expect:?}"
        );
    }
}

#[test]
fn a_paused_domains_disk_record_is_not_forgotten() {
    let mut t = T::new();
    let mut req = t.req(1, &[("vm-disk", Mode::Exclusive)]);
    req.owner.on_exit = OnExit::Status;
    let Acquired::Granted(g) = t.e.acquire(req, Now::at(0)).unwrap() else {
        panic!("queued");
    };
    t.release(1, "vm-disk", ReleaseKind::Clean, 1).unwrap();
    t.take(2, "cache-dir", Mode::Exclusive, 1).unwrap();
    t.release(2, "cache-dir", ReleaseKind::Clean, 1).unwrap();
    assert!(
        t.e.forget(&res("cache-dir"), Now::at(2)),
        "a plain record goes"
    );
    assert!(
        !t.e.forget(&res("vm-disk"), Now::at(2)),
        "a domain's disk stays, so its resume can still find its token"
    );
    let req = with_tokens(
        &t,
        1,
        &[("vm-disk", Mode::Exclusive)],
        &[("vm-disk", g[0].token)],
    );
    assert!(t.e.acquire(req, Now::at(3)).is_ok());
}
