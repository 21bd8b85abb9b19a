//! Property tests of what the etcd store reads from etcd, which anyone with access to etcd can
//! write: keys under the prefix and resource records. Nothing panics; a record is trusted only
//! when it decodes and keeps the lease rules, and then reads back the same; each key names at
//! most one resource, and every key leasehold writes reads back as what it wrote.
//!
//! `LEASEHOLD_FUZZ_CASES=N` runs N cases per property (default 256; millions in a long run).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use leasehold_core::{
    EndReason, Ended, Event, HostId, Lease, Mode, Owner, ResourceName, ResourceState, SessionId,
    Token, WallTime,
};
use leasehold_store::etcd::keys::{KeyKind, Keys, Record};
use proptest::prelude::*;

use leasehold_testkit::fuzz_cases as cases;

const PREFIX: &str = "/lh/";

fn names() -> impl Strategy<Value = ResourceName> {
    "[a-z/%._ -]{1,12}|\\PC{1,20}".prop_filter_map("a valid name", |s| ResourceName::new(s).ok())
}

fn hosts() -> impl Strategy<Value = HostId> {
    "[a-z0-9.-]{1,20}".prop_filter_map("a valid host", |s| HostId::new(s).ok())
}

/// A record as leasehold writes it, as JSON text.
fn record_json() -> String {
    let r = Record {
        state: Default::default(),
        reserved_for: Some(7),
        events: Vec::new(),
        damaged: None,
    };
    serde_json::to_string(&r).unwrap()
}

/// A record as the compact encoding writes it: a holder, an ending and a grant by reference.
fn compact_record() -> Vec<u8> {
    let r = ResourceName::new("disk").unwrap();
    let l = lease(&HostId::new("h").unwrap(), 3, 5, Mode::Exclusive);
    let e = ended(&l, 1, true);
    Record {
        state: ResourceState::from_parts(vec![l.clone()], Token(5), None, Some(Box::new(e)), None),
        reserved_for: None,
        events: vec![Event::Granted {
            resource: r,
            lease: l,
        }],
        damaged: None,
    }
    .encode()
    .unwrap()
}

fn lease(host: &HostId, pid: u32, token: u64, mode: Mode) -> Lease {
    Lease {
        owner: Owner::new(host.clone(), pid, u64::from(pid) * 7),
        mode,
        token: Token(token),
        session: SessionId(token * 3),
        granted_at: WallTime(token * 11),
    }
}

fn ended(l: &Lease, at: u64, dirty: bool) -> Ended {
    Ended {
        owner: l.owner.clone(),
        mode: l.mode,
        token: l.token,
        granted_at: l.granted_at,
        ended_at: WallTime(at),
        how: if dirty {
            EndReason::ProcessDied
        } else {
            EndReason::Released
        },
    }
}

/// Any record a commit could write: holders, an ending, a dirty mark, a reservation, and
/// events that the record holds (a grant of a holder, its last ending) or not (a grant of
/// another lease, an ending of another, a cleaning, an event of another resource).
fn records() -> impl Strategy<Value = Record> {
    (
        names(),
        names(),
        hosts(),
        proptest::collection::vec((1u32..1000, any::<bool>()), 0..4),
        (
            any::<bool>(),
            any::<bool>(),
            any::<bool>(),
            proptest::option::of(any::<u64>()),
        ),
        proptest::collection::vec(0u8..7, 0..6),
    )
        .prop_map(
            |(r, other, h, holders, (ended_some, dirty, shared, reserved), picks)| {
                let mode = if shared {
                    Mode::Shared
                } else {
                    Mode::Exclusive
                };
                let holders: Vec<Lease> = holders
                    .iter()
                    .enumerate()
                    .map(|(i, (pid, _))| lease(&h, *pid, 10 + i as u64, mode))
                    .collect();
                let gone = lease(&h, 4242, 9, mode);
                let last = ended_some.then(|| ended(&gone, 99, dirty));
                let state = ResourceState::from_parts(
                    holders.clone(),
                    Token(20),
                    last.clone().filter(|_| dirty).map(Box::new),
                    last.clone().map(Box::new),
                    None,
                );
                let mut events = Vec::new();
                for p in picks {
                    events.push(match (p, holders.first(), &last) {
                        (0, Some(l), _) => Event::Granted {
                            resource: r.clone(),
                            lease: l.clone(),
                        },
                        (1, _, Some(e)) => Event::Ended {
                            resource: r.clone(),
                            ended: e.clone(),
                            dirtied: dirty,
                        },
                        (2, _, _) => Event::Granted {
                            resource: r.clone(),
                            lease: gone.clone(),
                        },
                        (3, _, _) => Event::Ended {
                            resource: r.clone(),
                            ended: ended(&gone, 7, false),
                            dirtied: false,
                        },
                        (4, _, _) => Event::Cleaned {
                            resource: r.clone(),
                            by: "root".into(),
                            at: WallTime(5),
                        },
                        (5, Some(l), _) => Event::Granted {
                            resource: other.clone(),
                            lease: l.clone(),
                        },
                        _ => Event::SessionExpired {
                            session: SessionId(3),
                            host: h.clone(),
                        },
                    });
                }
                Record {
                    state,
                    reserved_for: reserved,
                    events,
                    damaged: None,
                }
            },
        )
}

/// JSON close to a record: a record with a fragment spliced in, or with bytes cut or changed.
fn near_records() -> impl Strategy<Value = Vec<u8>> {
    let fragments = prop_oneof![
        Just(r#""holders":[{"x":1}],"#.to_owned()),
        Just(r#""last_token":-1,"#.to_owned()),
        Just(r#""last_token":18446744073709551616,"#.to_owned()),
        Just(r#""damaged":"edited","#.to_owned()),
        Just(r#""events":[null],"#.to_owned()),
        Just("\u{0}".to_owned()),
        "[\\[\\]{}\":,0-9a-z_ -]{0,16}",
    ];
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..120),
        (
            fragments,
            any::<usize>(),
            any::<usize>(),
            any::<u8>(),
            any::<bool>()
        )
            .prop_map(|(f, at, cut, x, compact)| {
                let mut b = if compact {
                    compact_record()
                } else {
                    record_json().into_bytes()
                };
                let at = at % (b.len() + 1);
                b.splice(at..at, f.into_bytes());
                if x % 3 == 0 {
                    let n = b.len();
                    b[cut % n] ^= x;
                } else if x % 3 == 1 {
                    b.truncate(cut % (b.len() + 1));
                }
                b
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn records_decode_only_when_trustworthy_and_read_back_the_same(bytes in near_records()) {
        if let Ok(rec) = Record::decode(&bytes) {
            prop_assert!(rec.damaged.is_none());
            prop_assert!(rec.state.violation().is_none());
            let again = Record::decode(&serde_json::to_vec(&rec).unwrap());
            prop_assert_eq!(again.as_ref(), Ok(&rec));
            let again = Record::decode(&rec.encode().unwrap());
            prop_assert_eq!(again.as_ref(), Ok(&rec));
        }
    }

    /// Every record reads back the same from the compact encoding and from the first
    /// format's JSON, and the compact one is never the longer.
    #[test]
    fn records_read_back_the_same_from_either_encoding(rec in records()) {
        let compact = rec.encode().unwrap();
        let first = serde_json::to_vec(&rec).unwrap();
        prop_assert_eq!(Record::read(&compact), Ok(rec.clone()));
        prop_assert_eq!(Record::read(&first), Ok(rec.clone()));
        prop_assert!(compact.len() <= first.len() + 12 + rec.events.first().map_or(0, |_| 80));
    }

    #[test]
    fn the_keys_leasehold_writes_read_back_as_written(r in names(), h in hosts(), n in any::<u64>()) {
        let k = Keys::new(PREFIX);
        prop_assert_eq!(k.parse(&k.resource(&r)), Some(KeyKind::Resource(r.clone())));
        prop_assert_eq!(k.parse(&k.grace(&r)), Some(KeyKind::Grace(r.clone())));
        prop_assert_eq!(k.parse(&k.waiter(&r, &h, n)), Some(KeyKind::Waiter(r.clone())));
        prop_assert_eq!(k.parse(&k.host(&h)), Some(KeyKind::Host(h.clone())));
    }

    /// A key written outside leasehold never passes for another resource's record: each
    /// resource has exactly one key, the one leasehold writes.
    #[test]
    fn each_resource_has_one_key(tail in "[a-z/%25F]{0,8}(\\x00[+0-9-]{0,4})?|\\PC{0,12}", bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
        let k = Keys::new(PREFIX);
        for kind in ["res/", "grace/", "wait/", "hosts/", ""] {
            let key = format!("{PREFIX}{kind}{tail}").into_bytes();
            match k.parse(&key) {
                Some(KeyKind::Resource(r)) => prop_assert_eq!(k.resource(&r), key),
                Some(KeyKind::Grace(r)) => prop_assert_eq!(k.grace(&r), key),
                Some(KeyKind::Host(h)) => prop_assert_eq!(k.host(&h), key),
                Some(KeyKind::Held(r, lease)) => prop_assert_eq!(k.held(&r, lease), key),
                Some(KeyKind::Waiter(_)) | None => {}
            }
        }
        let _ = k.parse(&bytes);
    }
}
