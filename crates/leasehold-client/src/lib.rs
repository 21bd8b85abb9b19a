//! A client for the leasehold agent, over the HTTP/1.1 + JSON API on its local Unix socket
//! (docs/contract.md, docs/api/v1.schema.json).
//!
//! Two faces on one protocol: [`blocking`], with nothing but `std` (one call is one
//! connection, one request and one answer: usable in a forked child before `exec`, in C-ABI
//! plugins), and, with the default feature `async`, [`Client`] and [`LeaseGuard`] for tokio
//! programs, which run the blocking client's calls off the runtime's threads: the requests are
//! built and the answers read in one place.
//!
//! Every call returns `leasehold-core` types. An acquire that is refused (held by someone
//! else, needs a check, timed out) is [`ClientError::Refused`] with the details as data, so a
//! program can name the holder or run the check without parsing text; a release reports each
//! resource's outcome ([`ReleaseReport`]).
//!
//! ```no_run
//! # #[cfg(feature = "async")]
//! # async fn demo() -> Result<(), leasehold_client::ClientError> {
//! use leasehold_client::{AcquireOptions, Client};
//! use leasehold_core::{Mode, ResourceName};
//!
//! let client = Client::connect_default().await?;
//! let disk = ResourceName::new("/srv/images/vm1.qcow2").unwrap();
//! // Held for this process until it releases or exits.
//! let grants = client
//!     .acquire(AcquireOptions::new([(disk.clone(), Mode::Exclusive)]))
//!     .await?;
//! println!("token {}", grants.grants[0].token);
//! let report = client.release(&[disk], Default::default()).await?;
//! assert!(report.failed.is_empty());
//! # Ok(()) }
//! ```

use std::time::Duration;

use leasehold_core::{Conflict, Ended, Grant, Mode, Owner, ResourceName, Token};

pub mod blocking;
#[cfg(feature = "async")]
mod guard;
#[cfg(feature = "async")]
mod tokio_client;

pub use blocking::{Error as ClientError, ReleaseFailure, ReleaseReport, Validation};
#[cfg(feature = "async")]
pub use guard::LeaseGuard;
pub use leasehold_api::default_socket;
#[cfg(feature = "async")]
pub use tokio_client::{Acquisition, Client, Watch};

/// Why an acquire was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalKind {
    /// Held by another owner.
    Busy,
    /// The wait ran out.
    TimedOut,
    /// Dirty; the caller did not accept the check.
    NeedsCheck,
    /// Held by the caller in the other mode.
    ModeConflict,
    /// The waiting request was withdrawn.
    Cancelled,
}

/// An acquire refusal, as data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Why.
    pub kind: RefusalKind,
    /// The agent's one-line explanation.
    pub message: String,
    /// The resource concerned.
    pub resource: Option<ResourceName>,
    /// Who holds it (busy, timed out).
    pub conflict: Option<Conflict>,
    /// How long the resource stays in its grace period, if it is in one.
    pub blocked_for: Option<Duration>,
    /// How its last exclusive lease ended (needs check).
    pub dirty: Option<Ended>,
    /// Needs check, when the caller asked to take it dirty but may not: who may.
    pub accept_dirty_needs: Option<String>,
}

/// What to acquire and how.
#[derive(Debug, Clone, Default)]
pub struct AcquireOptions {
    /// The resources and modes, all or none.
    pub items: Vec<(ResourceName, Mode)>,
    /// The process to hold the leases; `None` is the calling process.
    pub pid: Option<u32>,
    /// The start time of `pid`, when the caller read it (guards against pid reuse).
    pub start_time: Option<u64>,
    /// A label for people (a VM name).
    pub label: Option<String>,
    /// Accept a dirty resource: the caller checks it before use.
    pub accept_dirty: bool,
    /// Wait this long; `Some(Duration::MAX)` waits forever; `None` fails at once.
    pub wait: Option<Duration>,
    /// Keep the stream open to learn of a lost lease (see [`Acquisition::next_event`]).
    pub hold: bool,
    /// Contain the calling process in a cgroup of its own (the API's `contain`).
    pub contain: bool,
    /// With `contain`: the caller starts its processes into the cgroup itself, if the agent
    /// lets it ([`Granted::cgroup`]; the API's `clone_into_cgroup`).
    pub clone_into_cgroup: bool,
}

impl AcquireOptions {
    /// Options for `items`, for the calling process, not waiting.
    pub fn new(items: impl IntoIterator<Item = (ResourceName, Mode)>) -> Self {
        AcquireOptions {
            items: items.into_iter().collect(),
            ..Default::default()
        }
    }
}

/// How to release.
#[derive(Debug, Clone, Default)]
pub struct ReleaseOptions {
    /// The holder; `None` is the calling process.
    pub pid: Option<u32>,
    /// Its start time, when known.
    pub start_time: Option<u64>,
    /// Mark the resources dirty.
    pub dirty: bool,
    /// Why (with `dirty`).
    pub note: Option<String>,
    /// Hand the lease to the waiter on `HOST` or `HOST/LABEL`.
    pub handover_to: Option<String>,
    /// The token of each lease to end, one per resource in the order they are named; empty:
    /// the holder's lease whatever its token. With tokens, a lease of the holder granted
    /// after the one meant (once that one ended) is never released by mistake.
    pub tokens: Vec<Token>,
}

/// What happens to a request while it is processed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcquireEvent {
    /// Still waiting; who is in the way, and for how long the request has waited.
    Waiting {
        /// Who is in the way.
        conflict: Conflict,
        /// How long the resource stays in grace, if it is.
        blocked_for: Option<Duration>,
        /// How long the request has waited.
        waited: Duration,
    },
    /// Something to tell people about the wait, which goes on: e.g. that the request was
    /// queued again after the host's session with the backend ended, or that the agent
    /// restarted.
    Note(String),
    /// Granted.
    Granted(Granted),
    /// The leases are safe until this instant on CLOCK_MONOTONIC (nanoseconds), unless a
    /// later message extends it; a holder hearing nothing newer must stop writing by then.
    Safe {
        /// The instant, in nanoseconds on CLOCK_MONOTONIC.
        until_monotonic_ns: u64,
    },
    /// A held lease ended by other means than the holder's release.
    Lost {
        /// The resource.
        resource: ResourceName,
        /// How it ended.
        ended: Ended,
    },
    /// The answer to a release sent on the hold's own connection ([`blocking::HoldEvents::release`]);
    /// the last event.
    Released(ReleaseReport),
}

/// A successful acquire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Granted {
    /// One grant per resource, in name order.
    pub grants: Vec<Grant>,
    /// The owner as the agent recorded it.
    pub owner: Owner,
    /// On a backend with a host session (etcd): the leases are safe until this instant of
    /// CLOCK_MONOTONIC (nanoseconds) unless a later [`AcquireEvent::Safe`] extends it; an
    /// instant already past: the agent could not confirm its session, do not start writing.
    /// `None` on the local store (no session to lose), and from an agent older than the field.
    pub safe_until_monotonic_ns: Option<u64>,
    /// For a request with `contain`: how the holder is contained.
    pub containment: Option<leasehold_api::v1::Containment>,
    /// For a request with `clone_into_cgroup` that the agent let: the cgroup to start the
    /// holder's processes in (the holder itself was not moved).
    pub cgroup: Option<std::path::PathBuf>,
}

impl Granted {
    /// The resources granted afresh by this acquire (not held already by the owner): the
    /// leases to give back when the caller cannot use the grant.
    pub fn fresh(&self) -> Vec<ResourceName> {
        self.grants
            .iter()
            .filter(|g| !g.existing)
            .map(|g| g.resource.clone())
            .collect()
    }

    /// The tokens of [`Granted::fresh`]'s leases, in its order: a release that gives them
    /// back names them ([`ReleaseOptions::tokens`]), so it never ends a later grant.
    pub fn fresh_tokens(&self) -> Vec<Token> {
        self.grants
            .iter()
            .filter(|g| !g.existing)
            .map(|g| g.token)
            .collect()
    }
}
