//! Property tests of what the agent decodes from its socket: any bytes as an HTTP/JSON request
//! body, then the names, modes and owners in it. Nothing panics; a name is accepted only when
//! it is valid, a body with an unknown field is refused, and what is accepted reads back the
//! same.
//!
//! `LEASEHOLD_FUZZ_CASES=N` runs N cases per property (default 256; millions in a long run).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use leasehold_api::v1;
use leasehold_core::{HostId, Owner, ResourceName};
use proptest::prelude::*;

use leasehold_testkit::fuzz_cases as cases;

/// A valid acquire body, as the clients send it.
fn valid_acquire() -> impl Strategy<Value = v1::AcquireRequest> {
    (
        proptest::collection::vec((".{0,40}", any::<bool>()), 0..4),
        proptest::option::of(any::<u32>()),
        proptest::option::of(any::<u64>()),
        proptest::option::of(".{0,20}"),
        any::<bool>(),
    )
        .prop_map(|(items, pid, start_time, label, hold)| v1::AcquireRequest {
            items: items
                .into_iter()
                .map(|(resource, shared)| v1::Item {
                    resource,
                    mode: if shared {
                        v1::Mode::Shared
                    } else {
                        v1::Mode::Exclusive
                    },
                })
                .collect(),
            pid,
            start_time,
            label,
            hold,
            ..Default::default()
        })
}

/// Bytes that are often close to a valid body: a valid request with some bytes flipped, cut
/// or appended, or noise.
fn near_bodies() -> impl Strategy<Value = Vec<u8>> {
    let valid = valid_acquire().prop_map(|r| serde_json::to_vec(&r).unwrap());
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..200),
        "\\PC{0,120}".prop_map(String::into_bytes),
        (
            valid,
            proptest::collection::vec((any::<usize>(), any::<u8>()), 0..4),
            any::<usize>()
        )
            .prop_map(|(mut b, flips, cut)| {
                for (i, x) in flips {
                    if !b.is_empty() {
                        let n = b.len();
                        b[i % n] ^= x;
                    }
                }
                let keep = if b.is_empty() { 0 } else { cut % (b.len() + 1) };
                b.truncate(keep.max(b.len() / 2));
                b
            }),
    ]
}

/// SPEC's rule for a resource name: 1 to 1024 bytes, no NUL (other control characters are
/// allowed, and escaped wherever a name is shown).
fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= leasehold_core::MAX_RESOURCE_NAME && !s.contains('\0')
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn request_bodies_decode_or_are_refused_without_panicking(bytes in near_bodies()) {
        if let Ok(req) = serde_json::from_slice::<v1::AcquireRequest>(&bytes) {
            for item in req.items {
                let name = ResourceName::new(item.resource.clone());
                prop_assert_eq!(name.is_ok(), valid_name(&item.resource));
            }
        }
        let _ = serde_json::from_slice::<v1::ReleaseRequest>(&bytes);
        let _ = serde_json::from_slice::<v1::ForceReleaseRequest>(&bytes);
        let _ = serde_json::from_slice::<v1::ValidateRequest>(&bytes);
        let _ = serde_json::from_slice::<v1::WatchRequest>(&bytes);
        let _ = serde_json::from_slice::<v1::ResourceRequest>(&bytes);
        if let Ok(o) = serde_json::from_slice::<v1::Owner>(&bytes) {
            let _ = Owner::try_from(o);
        }
        if let Ok(l) = serde_json::from_slice::<v1::Lease>(&bytes) {
            let _ = leasehold_core::Lease::try_from(l);
        }
        if let Ok(r) = serde_json::from_slice::<v1::Resource>(&bytes) {
            let _ = leasehold_core::ResourceView::try_from(r);
        }
    }

    #[test]
    fn a_valid_body_reads_back_the_same_and_an_unknown_field_is_refused(
        req in valid_acquire(),
        field in "[a-z_]{1,12}",
    ) {
        let text = serde_json::to_string(&req).unwrap();
        let back: v1::AcquireRequest = serde_json::from_str(&text).unwrap();
        prop_assert_eq!(&back, &req);
        let mut value: serde_json::Value = serde_json::from_str(&text).unwrap();
        let known = value.as_object().unwrap().contains_key(&field)
            || ["items", "pid", "start_time", "label", "hold", "wait", "shared", "accept_dirty",
                "owner_id", "on_lost", "on_exit", "restricted", "expect_tokens", "before_fence"]
                .contains(&field.as_str());
        prop_assume!(!known);
        value.as_object_mut().unwrap().insert(field.clone(), serde_json::Value::Bool(true));
        let e = serde_json::from_value::<v1::AcquireRequest>(value).unwrap_err();
        prop_assert!(e.to_string().contains("unknown field"), "{}", e);
    }

    #[test]
    fn names_are_accepted_only_when_valid_and_read_back_the_same(s in "\\PC{0,80}|.{0,300}|[\\x00-\\x1f/%,=a-z]{0,20}") {
        match ResourceName::new(s.clone()) {
            Ok(r) => prop_assert_eq!(r.as_str(), s.as_str()),
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
        prop_assert_eq!(ResourceName::new(s.clone()).is_ok(), valid_name(&s), "{:?}", s);
        if let Ok(h) = HostId::new(s.clone()) {
            prop_assert_eq!(h.as_str(), s.as_str());
            prop_assert!(!s.is_empty());
        }
    }

    #[test]
    fn modes_outside_the_enum_are_refused(m in "[a-z]{0,12}") {
        let r = serde_json::from_value::<v1::Mode>(serde_json::Value::String(m.clone()));
        prop_assert_eq!(r.is_ok(), m == "shared" || m == "exclusive", "mode {} -> {:?}", m, r);
    }
}
