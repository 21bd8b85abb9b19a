//! Letting go of leases: how, what ended, and why a release is refused.

use serde::{Deserialize, Serialize};

use crate::resource::Ended;
use crate::types::{HostId, OwnerId, ProcessKey, ResourceName, Token};

/// How a holder lets go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleaseKind {
    /// Cleanly: the resource is consistent.
    Clean,
    /// Dirty: the resource may be inconsistent and needs a check.
    Dirty {
        /// Why, such as the exit status of a command.
        note: Option<String>,
    },
    /// To the exclusive waiter of `host` (with `label`, when given), in one step (SPEC G7).
    Handover {
        /// The host of the waiting owner.
        host: HostId,
        /// The label of the waiting owner, when several wait on that host.
        label: Option<String>,
    },
}

/// A request to release one lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseRequest {
    /// The resource.
    pub resource: ResourceName,
    /// The holder's process.
    pub process: ProcessKey,
    /// The holder's owner id inside its process, if it has one.
    pub owner_id: Option<OwnerId>,
    /// The token of the lease to end, when the caller knows it: then only the lease with
    /// exactly that token is ended, never a later grant of the same resource to the same
    /// owner (a release still on its way when an admin force-released the lease and the
    /// owner was granted it again must not end the new lease). `None`: the owner's lease,
    /// whatever its token.
    pub token: Option<Token>,
    /// How.
    pub kind: ReleaseKind,
}

/// A lease that ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Released {
    /// The resource.
    pub resource: ResourceName,
    /// The record of the ended lease.
    pub ended: Ended,
    /// Whether this left the resource dirty.
    pub dirtied: bool,
}

/// Why a release, force-release or mark-clean failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "error", rename_all = "kebab-case")]
pub enum ReleaseError {
    /// The request is malformed.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The owner holds no lease on the resource.
    #[error("{resource} is not held by {process}{}", .owner_id.as_ref().map(|i| format!(" owner {i}")).unwrap_or_default())]
    NotHeld {
        /// The resource.
        resource: ResourceName,
        /// The process.
        process: ProcessKey,
        /// The owner id inside the process, if one was named.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner_id: Option<OwnerId>,
    },
    /// The release named the token of the lease it ends, and the owner's lease on the
    /// resource now has another token, or the owner holds none: that lease has ended already
    /// and nothing was released.
    #[error(
        "{resource} is not held by {process}{} with token {token}: {}; nothing was released",
        .owner_id.as_ref().map(|i| format!(" owner {i}")).unwrap_or_default(),
        holding_words(*.token, *.holding)
    )]
    StaleToken {
        /// The resource.
        resource: ResourceName,
        /// The process.
        process: ProcessKey,
        /// The owner id inside the process, if one was named.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        owner_id: Option<OwnerId>,
        /// The token the release named.
        token: Token,
        /// The token of the owner's lease now, if it holds one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        holding: Option<Token>,
    },
    /// Nobody holds the resource.
    #[error("{0} is not held by anyone")]
    Unheld(ResourceName),
    /// The resource has never been seen.
    #[error("{0} is not a known resource")]
    Unknown(ResourceName),
    /// A handover needs an exclusive lease.
    #[error("{0} is held shared; only an exclusive lease can be handed over")]
    HandoverShared(ResourceName),
    /// Nobody on the named host waits for the resource.
    #[error("nobody on host {host}{} waits for {resource} in exclusive mode; start the destination's `acquire --wait` first", .label.as_ref().map(|l| format!(" with label {l:?}")).unwrap_or_default())]
    NoWaiter {
        /// The resource.
        resource: ResourceName,
        /// The host named.
        host: HostId,
        /// The label named.
        label: Option<String>,
    },
    /// The only waiters named belong to another user than the holder's, and not to root.
    #[error(
        "the owner waiting for {resource} there ({waiter}) runs as {}, not as the holder's {} or root; a label is not an identity, so the lease is not handed to it. Start the destination as the holder's user (or root), or release normally",
        uid_words(*.waiter_uid), uid_words(*.holder_uid)
    )]
    WaiterOfOtherUser {
        /// The resource.
        resource: ResourceName,
        /// The first waiter that matched host and label.
        waiter: Box<ProcessKey>,
        /// Its uid, when known.
        waiter_uid: Option<u32>,
        /// The holder's uid, when known.
        holder_uid: Option<u32>,
    },
}

fn holding_words(token: Token, holding: Option<Token>) -> String {
    match holding {
        None => "it holds no lease on it now".to_owned(),
        Some(h) if h > token => {
            format!("that lease has ended and it holds token {h} now, a later grant")
        }
        Some(h) => format!("it holds token {h} now, not that one"),
    }
}

fn uid_words(uid: Option<u32>) -> String {
    uid.map_or_else(|| "an unknown user".to_owned(), |u| format!("uid {u}"))
}
