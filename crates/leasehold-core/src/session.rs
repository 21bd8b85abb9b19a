//! A host's session and the durable state around it.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::types::{HostId, SessionId, Time};

/// A host's session: all of the host's leases live and die with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Its id.
    pub id: SessionId,
    /// The host it belongs to.
    pub host: HostId,
    /// Its lifetime without renewal; `None` for a session that never expires (the local
    /// store, where the agent is the only authority on its host).
    #[serde(default, with = "opt_millis")]
    pub ttl: Option<Duration>,
    /// When it expires unless renewed.
    #[serde(default)]
    pub expires_at: Option<Time>,
}

mod opt_millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_millis() as u64)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

/// Why a session operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The host already has a live session.
    #[error(
        "host id {host} is in use by a live session ({session}); is another agent running with this host id?"
    )]
    HostInUse {
        /// The host.
        host: HostId,
        /// Its live session.
        session: SessionId,
    },
    /// The session is unknown or has expired.
    #[error("host session {0} is unknown or expired")]
    NoSession(SessionId),
}
