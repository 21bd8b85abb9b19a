//! Property tests of what the agent decodes from its socket: any bytes as a request message,
//! then the names, modes and owners in it. Nothing panics; a name or mode is accepted only
//! when it is valid, and what is accepted reads back the same.
//!
//! `LEASEHOLD_FUZZ_CASES=N` runs N cases per property (default 256; millions in a long run).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use leasehold_api::pb;
use leasehold_core::{HostId, Owner, ResourceName};
use proptest::prelude::*;
use prost::Message;

use leasehold_testkit::fuzz_cases as cases;

/// Bytes that are often close to a valid message: a valid request with some bytes flipped,
/// cut or appended, or noise.
fn near_messages() -> impl Strategy<Value = Vec<u8>> {
    let valid = (
        proptest::collection::vec((".{0,40}", 0i32..4), 0..4),
        any::<u32>(),
        proptest::option::of(any::<u64>()),
        proptest::option::of(".{0,20}"),
    )
        .prop_map(|(items, pid, start_time, label)| {
            pb::AcquireRequest {
                items: items
                    .into_iter()
                    .map(|(resource, mode)| pb::Item { resource, mode })
                    .collect(),
                pid,
                start_time,
                label,
                ..Default::default()
            }
            .encode_to_vec()
        });
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..200),
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
    fn request_bytes_decode_or_are_refused_without_panicking(bytes in near_messages()) {
        if let Ok(req) = pb::AcquireRequest::decode(bytes.as_slice()) {
            for item in req.items {
                let name = ResourceName::new(item.resource.clone());
                prop_assert_eq!(name.is_ok(), valid_name(&item.resource));
                let _ = leasehold_api::mode_from_wire(item.mode);
            }
        }
        let _ = pb::ReleaseRequest::decode(bytes.as_slice());
        let _ = pb::ForceReleaseRequest::decode(bytes.as_slice());
        let _ = pb::ValidateRequest::decode(bytes.as_slice());
        let _ = pb::WatchRequest::decode(bytes.as_slice());
        if let Ok(o) = pb::Owner::decode(bytes.as_slice()) {
            let _ = Owner::try_from(o);
        }
        if let Ok(l) = pb::Lease::decode(bytes.as_slice()) {
            let _ = leasehold_core::Lease::try_from(l);
        }
        if let Ok(r) = pb::Resource::decode(bytes.as_slice()) {
            let _ = leasehold_core::ResourceView::try_from(r);
        }
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
    fn modes_outside_the_enum_are_refused(m in any::<i32>()) {
        let r = leasehold_api::mode_from_wire(m);
        prop_assert_eq!(r.is_ok(), m == 1 || m == 2, "mode {} -> {:?}", m, r);
    }
}
