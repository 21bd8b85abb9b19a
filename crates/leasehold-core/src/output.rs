//! What the engine decides besides its direct answers, and its durable state besides
//! resource records.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::acquire::{AcquireError, Grant};
use crate::resource::{Ended, Lease};
use crate::session::Session;
use crate::types::{HostId, ResourceName, SessionId, WaiterId, WallTime};

/// Something that happened, for logs and `watch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// A lease was granted.
    Granted {
        /// The resource.
        resource: ResourceName,
        /// The lease.
        lease: Lease,
    },
    /// A lease ended.
    Ended {
        /// The resource.
        resource: ResourceName,
        /// How.
        ended: Ended,
        /// Whether the resource is now dirty because of it.
        dirtied: bool,
    },
    /// A dirty mark was cleared.
    Cleaned {
        /// The resource.
        resource: ResourceName,
        /// Who cleared it.
        by: String,
        /// When.
        at: WallTime,
    },
    /// A host session expired.
    SessionExpired {
        /// The session.
        session: SessionId,
        /// Its host.
        host: HostId,
    },
}

/// What the engine decided besides its direct answers; drained by [`Engine::take_output`](crate::Engine::take_output).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Output {
    /// Resources whose durable record changed.
    pub changed: BTreeSet<ResourceName>,
    /// Whether the session table changed, or the token counter was raised from outside
    /// ([`Engine::raise_token_floor`](crate::Engine::raise_token_floor)). Grants do not set it: each records its token as the
    /// `last_token` of its resources, and [`Engine::restore`](crate::Engine::restore) takes the counter past those.
    pub meta_changed: bool,
    /// Outcomes of waiting requests.
    pub waiters: Vec<(WaiterId, Result<Vec<Grant>, AcquireError>)>,
    /// Events, in order.
    pub events: Vec<Event>,
}

impl Output {
    /// Whether anything must be made durable.
    pub fn needs_persist(&self) -> bool {
        self.meta_changed || !self.changed.is_empty()
    }
}

/// The durable part of the engine besides resource records.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Meta {
    /// The smallest token the next grant may take.
    pub next_token: u64,
    /// The next session id.
    pub next_session: u64,
    /// Sessions that have not expired.
    pub sessions: Vec<Session>,
}
