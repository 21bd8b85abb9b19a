//! etcd lease ids, as their own type: a host's session and a grace key are each on one.

use std::fmt;

use leasehold_core::SessionId;
use serde::{Deserialize, Serialize};

/// An etcd lease id. etcd's 0 ("no lease") is not one: a key on no lease has `None`
/// ([`LeaseId::of_key`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct LeaseId(pub i64);

impl LeaseId {
    /// The lease a key is attached to, from its `lease` field: `None` for etcd's 0.
    pub fn of_key(lease: i64) -> Option<LeaseId> {
        (lease != 0).then_some(LeaseId(lease))
    }

    /// The lease a session is: an etcd store's sessions are its hosts' leases.
    pub fn of_session(s: SessionId) -> LeaseId {
        LeaseId(s.0 as i64)
    }

    /// The engine's session for this lease.
    pub fn session(self) -> SessionId {
        SessionId(self.0 as u64)
    }
}

/// As etcdctl shows lease ids: hexadecimal.
impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_id_and_its_session_are_the_same_number() {
        let l = LeaseId(0x694d_8a1b_2c3d_4e5f);
        assert_eq!(LeaseId::of_session(l.session()), l);
        assert_eq!(l.session(), SessionId(0x694d_8a1b_2c3d_4e5f));
        assert_eq!(l.to_string(), "694d8a1b2c3d4e5f");
        assert_eq!(LeaseId::of_key(0), None);
        assert_eq!(LeaseId::of_key(7), Some(LeaseId(7)));
        assert_eq!(serde_json::to_string(&l).unwrap(), "7587872796500119135");
    }
}
