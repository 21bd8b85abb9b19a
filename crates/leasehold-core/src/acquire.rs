//! Asking for leases: the request, what is granted, and why a request is refused.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::resource::{Ended, Lease};
use crate::types::{Mode, Owner, ResourceName, SessionId, Token, WaiterId};

/// The most resources one request may name.
pub const MAX_ITEMS: usize = 256;

/// A request for one or more resources, granted all together or not at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcquireRequest {
    /// Who asks.
    pub owner: Owner,
    /// The session of the owner's host.
    pub session: SessionId,
    /// What it asks for; the order does not matter.
    pub items: Vec<(ResourceName, Mode)>,
    /// Whether the caller will check a dirty resource before using it.
    pub accept_dirty: bool,
    /// Whether to queue when the resources are not free now.
    pub wait: bool,
    /// Resources to take only if nobody held them since the caller's own lease with this
    /// token ended: the resource's last token must still be it (a paused VM resuming, a
    /// migrating VM arriving). Such a request never waits.
    pub expect_tokens: Vec<(ResourceName, Token)>,
}

/// One granted resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// The resource.
    pub resource: ResourceName,
    /// The mode.
    pub mode: Mode,
    /// The fencing token of this grant.
    pub token: Token,
    /// When the resource is dirty, why: the caller accepted it and must check before use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty: Option<Ended>,
    /// Whether the caller already held this lease (the grant is the earlier one).
    #[serde(default)]
    pub existing: bool,
}

/// The answer to an acquire that did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// Everything was granted.
    Granted(Vec<Grant>),
    /// The request waits in line; its outcome comes through [`Output::waiters`](crate::Output::waiters).
    Queued(WaiterId),
}

/// Why a resource cannot be granted now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    /// The resource.
    pub resource: ResourceName,
    /// Its live leases.
    pub holders: Vec<Lease>,
    /// How many requests wait for it.
    pub waiting: usize,
    /// When it is in the grace after a host was lost, how long the grace still lasts, as
    /// seen when the request was refused. A cluster store whose backend ends the grace (etcd)
    /// knows only an upper bound: the whole grace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked_for: Option<Duration>,
    /// Whether it is kept for a handover in progress.
    #[serde(default)]
    pub reserved: bool,
}

impl Conflict {
    /// A conflict on `resource` about which nothing more is known (it was just decided).
    pub fn unknown(resource: ResourceName) -> Conflict {
        Conflict {
            resource,
            holders: Vec::new(),
            waiting: 0,
            blocked_for: None,
            reserved: false,
        }
    }
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is ", self.resource)?;
        if let Some(first) = self.holders.first() {
            write!(
                f,
                "held {} by {} (token {})",
                first.mode, first.owner, first.token
            )?;
            if self.holders.len() > 1 {
                write!(f, " and {} more", self.holders.len() - 1)?;
            }
        } else if self.reserved {
            write!(f, "being handed over")?;
        } else if let Some(left) = self.blocked_for {
            write!(
                f,
                "in its grace period after its holder's host was lost ({} left)",
                duration_words(left)
            )?;
        } else {
            write!(f, "promised to earlier waiters")?;
        }
        if self.waiting > 0 {
            write!(f, "; {} waiting", self.waiting)?;
        }
        Ok(())
    }
}

/// A duration for people: "300 ms", "5 s", "4.3 s".
fn duration_words(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms % 1000 == 0 {
        format!("{} s", ms / 1000)
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// Why an acquire failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "error", rename_all = "kebab-case")]
pub enum AcquireError {
    /// The request is malformed.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A resource is held by another owner (or promised to earlier waiters).
    #[error("{0}")]
    Busy(Conflict),
    /// A resource is dirty and the caller did not accept checking it.
    #[error("{resource} needs a check: last exclusive lease (token {}, {}) ended: {}", .dirty.token, .dirty.owner, .dirty.how.describe())]
    NeedsCheck {
        /// The resource.
        resource: ResourceName,
        /// How its last exclusive lease ended.
        dirty: Box<Ended>,
    },
    /// The caller already holds the resource in the other mode.
    #[error("{resource} is already held by this process in {held} mode")]
    ModeConflict {
        /// The resource.
        resource: ResourceName,
        /// The mode held.
        held: Mode,
    },
    /// The session is unknown or has expired.
    #[error("host session {0} is unknown or expired")]
    NoSession(SessionId),
    /// The waiting request was withdrawn: its process ended or its session expired.
    #[error("the waiting request was cancelled: {0}")]
    Cancelled(String),
    /// A resource asked for with an expected token was taken by someone else since (its last
    /// token moved on), or is held now.
    #[error(
        "{resource} was taken by another owner since token {expected} (last token {last}): it may have been written"
    )]
    Moved {
        /// The resource.
        resource: ResourceName,
        /// The token the caller expected to be the last.
        expected: Token,
        /// The resource's last token now.
        last: Token,
    },
}
