//! What callers see of a resource.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::resource::{Ended, Lease};
use crate::types::{Mode, Owner, ProcessKey, ResourceName, Token};

/// Someone waiting for a resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaiterView {
    /// Who waits.
    pub owner: Owner,
    /// For which mode.
    pub mode: Mode,
}

/// What is known about one resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceView {
    /// Its name.
    pub resource: ResourceName,
    /// Its live leases.
    pub holders: Vec<Lease>,
    /// Why it is dirty, if it is.
    pub dirty: Option<Ended>,
    /// How its most recent lease ended.
    pub last_ended: Option<Ended>,
    /// The largest token granted for it.
    pub last_token: Token,
    /// Who waits for it, in order.
    pub waiters: Vec<WaiterView>,
    /// How long it stays unavailable after its holder's host was lost (on etcd, which ends
    /// the grace itself, an upper bound: the whole grace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked_for: Option<Duration>,
    /// Whether a handover to a waiter is in progress.
    pub handover_pending: bool,
    /// Why its stored record cannot be trusted (it does not decode, breaks the lease rules,
    /// or vanished while held), with what to do; nobody is granted it while this is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub damaged: Option<String>,
    /// The processes among `holders` that died and left what they started (their cgroup or
    /// process group) running, which SIGKILL has not ended yet: their leases stay held until
    /// it is gone. Known only to the holder's own agent, which fills it in; stores leave it
    /// empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stuck: Vec<ProcessKey>,
}

impl ResourceView {
    /// A view of `resource` with nothing known about it: no holders, no mark, no waiters.
    /// A store starts from it when the record itself cannot be read (and sets `damaged`).
    pub fn empty(resource: ResourceName) -> ResourceView {
        ResourceView {
            resource,
            holders: Vec::new(),
            dirty: None,
            last_ended: None,
            last_token: Token(0),
            waiters: Vec::new(),
            blocked_for: None,
            handover_pending: false,
            damaged: None,
            stuck: Vec::new(),
        }
    }
}
