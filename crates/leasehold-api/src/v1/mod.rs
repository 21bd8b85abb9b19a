//! The agent's HTTP/JSON API, version 1: every request, answer and streamed event as a serde
//! type. These types are the one definition of the JSON on the wire: the agent serves them,
//! the clients read them, and `docs/api/v1.schema.json` is generated from them
//! ([`schema`]).
//!
//! Names, modes, durations and times are readable strings (`"exclusive"`, `"1m 30s"`,
//! `"2026-01-02T03:04:05.678Z"`); every object refuses fields it does not know, so a request
//! from a newer client is never obeyed only in part. Errors carry a stable [`ErrorCode`] that
//! maps one-to-one to the CLI's exit codes.
//!
//! ```
//! use leasehold_api::v1::{AcquireRequest, Item, Mode};
//!
//! let req: AcquireRequest =
//!     serde_json::from_str(r#"{"items":[{"resource":"disk","mode":"exclusive"}],"wait":"30s"}"#)
//!         .unwrap();
//! assert_eq!(req.items[0].mode, Mode::Exclusive);
//! assert!(serde_json::from_str::<AcquireRequest>(r#"{"items":[],"colour":"red"}"#).is_err());
//! ```

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

mod convert;
mod error;
mod query;
mod time;

pub use convert::{conflict_from_v1, conflict_to_v1};
pub use error::{ApiError, ErrorCode, ExitCode};
pub use query::{DEFAULT_PAGE, ListQuery, MAX_PAGE};
pub use time::{Dur, Time};

/// The most bytes a request body may have; larger ones are refused (`too-large`) unread.
pub const MAX_BODY: usize = 1 << 20;

/// The protocol a holding acquire may ask to switch its connection to (`upgrade:` with
/// `connection: upgrade`). An agent that knows it answers `101 Switching Protocols` instead of
/// a chunked stream: from then on the connection carries the acquire's lines as they are
/// (newline-delimited JSON, no chunk framing; the agent closing it ends the stream), and the
/// holder may send one line of its own, a [`ReleaseRequest`], which the agent carries out for
/// the connection's process and answers with one `released` line (or an `error` line) before
/// it closes: a release without a connection of its own. An agent that does not know it
/// answers as to any holding acquire (`200`, chunked), and the holder releases on a new
/// connection.
pub const HOLD_UPGRADE: &str = "leasehold-hold";

/// The protocol a kept-alive connection may ask to switch to with its first request (`upgrade:`
/// with `connection: upgrade`), when that request is `GET /v1/status`, `POST /v1/release` or an
/// acquire that neither waits nor holds nor asks `contain`: the same calls, one line each. An
/// agent that knows it carries the request out as ever and, when it succeeds, answers `101
/// Switching Protocols` followed by the answer's line: its HTTP status, a space and the body
/// the call answers over HTTP (one line of JSON), then `\n`. From then on each request is one
/// line, `METHOD PATH` and, for a `POST`, a space and its JSON body, then `\n` (only the three
/// calls above), and each answer one such line; a grant's answer counts once the client has
/// read its line, as an ended HTTP answer's does. An answer that is an error (not 2xx) is the
/// connection's last: the agent closes it. The agent also closes one idle past its request
/// timeout. An agent that does not know the protocol answers the first request over HTTP as
/// ever, and the connection stays HTTP; so does one whose first answer is an error.
pub const CALLS_UPGRADE: &str = "leasehold-calls";

/// A lease mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One holder, which may write.
    Exclusive,
    /// Many holders, which only read.
    Shared,
}

/// A process on a host, without its details.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Process {
    /// The host.
    pub host: String,
    /// The process id.
    pub pid: u32,
    /// Its start time (field 22 of `/proc/PID/stat`), which tells a reused pid apart.
    pub start_time: u64,
}

/// Who holds (or held, or waits for) a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Owner {
    /// The host.
    pub host: String,
    /// The process id.
    pub pid: u32,
    /// Its start time (field 22 of `/proc/PID/stat`).
    pub start_time: u64,
    /// Which owner inside the process, when it has several (threads of a service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_id: Option<String>,
    /// A label for people: a VM name or uuid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The process's user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// The process's command name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Only root or the admin group may release or hand over its leases (libvirt's
    /// restricted QEMU).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restricted: bool,
    /// What its exit does to its exclusive leases.
    #[serde(default, skip_serializing_if = "OnExit::is_dirty")]
    pub on_exit: OnExit,
    /// What losing its lease (force-release, or this host's etcd session lost) does to it.
    #[serde(default, skip_serializing_if = "OnLost::is_kill")]
    pub on_lost: OnLost,
}

/// What the agent does to a holder whose lease is taken from it: by force-release, or by
/// the fence when this host's etcd session is lost (a process is spared only when every
/// lease it holds asked `revoke`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum OnLost {
    /// SIGKILL the holder (the default; right for a VM).
    #[default]
    Kill,
    /// End the lease only: the holder lives on, `validate` refuses its token, and its next
    /// call learns it (a service holding short locks; its writes are safe only where storage
    /// checks the token).
    Revoke,
}

impl OnLost {
    fn is_kill(&self) -> bool {
        *self == OnLost::Kill
    }
}

impl From<OnLost> for leasehold_core::OnLost {
    fn from(o: OnLost) -> leasehold_core::OnLost {
        match o {
            OnLost::Kill => leasehold_core::OnLost::Kill,
            OnLost::Revoke => leasehold_core::OnLost::Revoke,
        }
    }
}

/// What the agent does to a holder when this host's session is being lost, before the SIGKILL
/// at the fencing deadline (libvirt's `<on_lockfailure>`). The SIGKILL comes whatever was
/// asked: the holder must be gone before another host can be granted its resources (G3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum BeforeFence {
    /// SIGSTOP it (a paused QEMU: its vCPUs and I/O stop); SIGCONT if a renewal is confirmed
    /// before the deadline.
    Pause,
    /// SIGTERM it (QEMU's graceful quit, as `virsh destroy` begins).
    Terminate,
}

/// What a holder's exit without a release does to its exclusive leases.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum OnExit {
    /// They are left dirty (the default: it may have stopped mid-write).
    #[default]
    Dirty,
    /// Exit status 0 ends them clean; a signal or another status leaves them dirty.
    Status,
}

impl OnExit {
    fn is_dirty(&self) -> bool {
        *self == OnExit::Dirty
    }
}

/// A live lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Lease {
    /// Who holds it.
    pub owner: Owner,
    /// In which mode.
    pub mode: Mode,
    /// Its fencing token.
    pub token: u64,
    /// When it was granted.
    pub granted_at: Time,
    /// Its holder died and left what it started (its cgroup or process group) running, which
    /// SIGKILL has not ended yet (a process in uninterruptible sleep, or frozen): the lease
    /// stays held until that is gone (`status` says what is left). Only the holder's own agent
    /// knows; absent when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stuck: bool,
}

/// How a lease ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum How {
    /// Its holder released it.
    Released,
    /// Its holder released it and said the resource needs a check.
    ReleasedDirty,
    /// Its process ended holding it.
    ProcessDied,
    /// Its process exited with status 0, and had asked that its exit status decide.
    ExitedClean,
    /// Its host's session expired (the host was lost).
    SessionExpired,
    /// Its host's agent killed the holder: the session could not be confirmed in time.
    Fenced,
    /// An administrator revoked it.
    Forced,
    /// It moved to a waiting owner.
    HandedOver,
}

/// The record of a lease that ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Ended {
    /// Who held it.
    pub owner: Owner,
    /// In which mode.
    pub mode: Mode,
    /// With which token.
    pub token: u64,
    /// When it was granted.
    pub granted_at: Time,
    /// When it ended.
    pub ended_at: Time,
    /// How.
    pub how: How,
    /// `released-dirty`: the holder's note; `forced`: the reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// `forced`: who forced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// `handed-over`: the process it went to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Process>,
}

/// One lease of a grant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// The resource.
    pub resource: String,
    /// The mode.
    pub mode: Mode,
    /// The fencing token: pass it along with every write.
    pub token: u64,
    /// Set when the resource was dirty and the caller accepted to check it: the last writer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty: Option<Ended>,
    /// Whether the caller already held it (the same lease, not a new one).
    #[serde(default)]
    pub existing: bool,
}

/// Who is in the way of a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Conflict {
    /// The resource.
    pub resource: String,
    /// Its live leases.
    pub holders: Vec<Lease>,
    /// How many requests wait for it.
    pub waiting: u32,
    /// How long it stays in its grace after its holder's host was lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked_for: Option<Dur>,
    /// Whether it is kept for a handover in progress.
    #[serde(default)]
    pub handover_pending: bool,
}

/// Someone waiting for a resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Waiter {
    /// Who.
    pub owner: Owner,
    /// For which mode.
    pub mode: Mode,
}

/// What is known of one resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Resource {
    /// Its name.
    pub resource: String,
    /// Its live leases.
    pub holders: Vec<Lease>,
    /// Why it needs a check: the lease that left it dirty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty: Option<Ended>,
    /// How its most recent lease ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ended: Option<Ended>,
    /// The largest token granted for it.
    pub last_token: u64,
    /// Who waits for it, in order.
    #[serde(default)]
    pub waiters: Vec<Waiter>,
    /// How long it stays unavailable after its holder's host was lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocked_for: Option<Dur>,
    /// Whether a handover to a waiter is in progress.
    #[serde(default)]
    pub handover_pending: bool,
    /// Why its stored record cannot be trusted, and what to do; nobody is granted it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub damaged: Option<String>,
}

/// A resource and a mode, in an acquire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Item {
    /// The resource's name.
    pub resource: String,
    /// The mode.
    pub mode: Mode,
}

/// `POST /v1/acquire`: leases on every item or none. Answered with a stream of
/// [`AcquireEvent`] lines.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AcquireRequest {
    /// The resources and modes.
    pub items: Vec<Item>,
    /// The process to hold the leases; absent: the calling process. A lease ends when its
    /// process exits: a shell script passes its own pid (`$$`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The start time the caller read for `pid`; refused if the pid now names another process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<u64>,
    /// Which owner inside the process (1 to 64 of `[A-Za-z0-9._:-]`, e.g. a UUID): owners
    /// of one process with different ids exclude each other as two processes would; the
    /// process's exit still ends the leases of all of them. Absent: the process itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_id: Option<String>,
    /// What losing the lease (force-release, or this host's etcd session lost: the fence)
    /// does to the process: `kill` (the default) or `revoke` (the lease ends, the process
    /// lives on and learns it from its hold stream, its next call and `validate`).
    #[serde(default, skip_serializing_if = "OnLost::is_kill")]
    pub on_lost: OnLost,
    /// A label for people: a VM name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Take a dirty resource, promising to check it first (root or the admin group only).
    #[serde(default)]
    pub accept_dirty: bool,
    /// Wait up to this long (`"30s"`, or `"forever"`); absent: do not wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<Dur>,
    /// Keep the stream open after the grant: `safe` and `lost` lines follow, and the stream
    /// ends when every lease of the grant has ended.
    #[serde(default)]
    pub hold: bool,
    /// Only root or the admin group may release or hand over these leases, not the holder's
    /// own user (libvirt's `ACQUIRE_RESTRICT`: QEMU may not give up its disks).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restricted: bool,
    /// What the holder's exit does to its exclusive leases; `status`: exit 0 is clean.
    #[serde(default, skip_serializing_if = "OnExit::is_dirty")]
    pub on_exit: OnExit,
    /// What the agent does to the holder once renewals of this host's session are late,
    /// before it SIGKILLs it at the fencing deadline (libvirt's `<on_lockfailure>`); absent:
    /// nothing before the SIGKILL. Kept by this agent only (an agent restart forgets it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before_fence: Option<BeforeFence>,
    /// Take these exclusive items only if nobody held them since the caller's own lease with
    /// this token ended (a paused VM resuming, a migration arriving); such a request never
    /// waits, and is refused with `moved` otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expect_tokens: Vec<ExpectToken>,
    /// Put the calling process in a cgroup of its own before the grant is answered, so that
    /// everything it starts afterwards, even a process that leaves its process group
    /// (`setsid`), is killed with it when it dies holding a lease, is fenced or loses a
    /// lease (`leasehold run` asks it). Only for the calling process itself: refused for
    /// another `pid`. Where the agent has no cgroups, the grant says `containment: group`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub contain: bool,
    /// With `contain`: the caller starts its processes into the cgroup itself (`clone3`
    /// with `CLONE_INTO_CGROUP`), so the agent need not move it (a move waits for an RCU
    /// grace period in the kernel, milliseconds on a busy host). Where the caller may do
    /// that (root: the kernel wants write access to the `cgroup.procs` of the common
    /// ancestor of its cgroup and the new one), the agent makes the cgroup, leaves the
    /// caller where it is, and names the cgroup in the grant (`cgroup`); the caller must then
    /// start everything it starts for the leases in there, and, if it cannot, ask again with
    /// `contain` alone (the same items: its leases come back as they are, and it is moved).
    /// Otherwise the caller is moved, as for `contain` alone, and the grant names no cgroup.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub clone_into_cgroup: bool,
}

/// What is killed with a holder that dies holding a lease, or is fenced: what it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Containment {
    /// Its cgroup: everything it started after the grant, wherever it went.
    Cgroup,
    /// The process group it leads, if it leads one (a process that calls `setsid` or
    /// `setpgid` leaves it).
    Group,
}

/// A token an acquire expects to still be a resource's last.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExpectToken {
    /// The resource, one of the request's items.
    pub resource: String,
    /// The token of the caller's own earlier lease.
    pub token: u64,
}

/// A line of the acquire stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum AcquireEvent {
    /// Still waiting: who is in the way.
    Waiting {
        /// Who is in the way; absent in a line that carries only a note.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conflict: Option<Conflict>,
        /// How long the request has waited.
        waited: Dur,
        /// For people: who is in the way, or what happened to the wait.
        message: String,
        /// Set when the line is a note about the wait (it was queued again, ...).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        note: Option<String>,
    },
    /// Granted: the tokens.
    Granted {
        /// One grant per resource, in name order.
        grants: Vec<Grant>,
        /// The owner as the agent recorded it.
        owner: Owner,
        /// On a backend with a host session (etcd): the leases are safe until this instant of
        /// the host's `CLOCK_MONOTONIC` (nanoseconds), the agent's fencing deadline at the
        /// grant, unless a later `safe` line extends it. A holder must not write past it
        /// without a newer one; an instant already past means the agent could not confirm its
        /// session: do not start writing. Absent on a backend whose sessions cannot expire
        /// (the local store), and from agents older than this field.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        safe_until_monotonic_ns: Option<u64>,
        /// For a request with `contain`: how the holder is contained.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        containment: Option<Containment>,
        /// For a request with `clone_into_cgroup` that the agent let: the cgroup directory
        /// (a path on the agent's host) the holder starts its processes in; the holder itself
        /// was not moved. Absent: with `containment: cgroup`, the holder was moved into it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cgroup: Option<String>,
    },
    /// The leases are safe until this instant on the host's `CLOCK_MONOTONIC` unless a later
    /// line extends it; a holder that hears nothing newer must stop writing by then.
    Safe {
        /// The instant, in nanoseconds of `CLOCK_MONOTONIC`.
        until_monotonic_ns: u64,
    },
    /// A held lease ended by other means than the holder's release.
    Lost {
        /// The resource.
        resource: String,
        /// How it ended.
        ended: Ended,
    },
    /// Refused or failed; the last line.
    Error(ApiError),
    /// On a connection switched to [`HOLD_UPGRADE`]: the answer to the holder's release, the
    /// last line.
    Released(ReleaseResponse),
}

/// `POST /v1/release`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    /// The resources.
    pub resources: Vec<String>,
    /// The holder; absent: the calling process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The holder's start time, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<u64>,
    /// The holder's owner id inside its process, as given to acquire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner_id: Option<String>,
    /// Leave the resources dirty: they need a check.
    #[serde(default)]
    pub dirty: bool,
    /// Why (with `dirty`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// `HOST` or `HOST/LABEL` of the waiting owner to hand the lease to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover_to: Option<String>,
    /// The fencing token of each lease to end, one per resource in the order of `resources`;
    /// absent or empty: the holder's lease whatever its token. With tokens, a resource whose
    /// holder's lease has another token now (it ended, say force-released, and the holder was
    /// granted the resource again) is not released, and fails with the token it holds now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<u64>,
}

/// A lease that a release ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Released {
    /// The resource.
    pub resource: String,
    /// How it ended.
    pub ended: Ended,
    /// Whether this release left the resource dirty.
    pub dirtied: bool,
}

/// A resource a release could not release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NotReleased {
    /// The resource.
    pub resource: String,
    /// Why.
    pub error: ApiError,
}

/// The answer to a release (and a force-release): each resource's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReleaseResponse {
    /// The leases ended.
    pub released: Vec<Released>,
    /// The resources that were not released, each with why.
    #[serde(default)]
    pub failed: Vec<NotReleased>,
}

/// `POST /v1/force-release` (root or the admin group).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ForceReleaseRequest {
    /// The resource.
    pub resource: String,
    /// Why, for the record.
    pub reason: String,
}

/// `POST /v1/inspect` and `POST /v1/mark-clean` (root or the admin group).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResourceRequest {
    /// The resource.
    pub resource: String,
}

/// The answer to mark-clean.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MarkCleanResponse {
    /// The mark that was cleared; absent when the resource was clean.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub was: Option<Ended>,
}

/// `POST /v1/validate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ValidateRequest {
    /// The resource.
    pub resource: String,
    /// The token to check.
    pub token: u64,
}

/// The answer to validate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ValidateResponse {
    /// Whether the token is a live grant of the resource.
    pub current: bool,
    /// The tokens of its live leases.
    pub current_tokens: Vec<u64>,
}

/// The answer to inspect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InspectResponse {
    /// The resource; absent when the agent knows nothing of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<Resource>,
}

/// The answer to `GET /v1/leases` ([`ListQuery`]): one page of the resources asked for, in
/// name order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListResponse {
    /// The resources of this page.
    pub resources: Vec<Resource>,
    /// Present when more follow: ask again with `after` set to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// `POST /v1/watch` (`GET /v1/watch` watches everything). Answered with a stream of
/// [`Event`] lines: every event made durable after the answer starts, in order, until an
/// `error` line says events were missed (the watch fell behind, or etcd compacted what it
/// was to deliver); then watch again and inspect what you need.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WatchRequest {
    /// Only events of this resource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
}

/// A lease event, as `watch` streams it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// granted, released, released-dirty, dirtied, cleaned, handed-over, forced,
    /// process-died, expired (a lease of a lost host), host-session-expired, fenced (this
    /// host's agent killed a holder because its session could not be renewed in time);
    /// `error` ends a stream that missed events (it fell behind, or etcd compacted them).
    pub kind: String,
    /// The resource, when the event concerns one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// When.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<Time>,
    /// The lease granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
    /// The lease ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<Ended>,
    /// Who did it (cleaned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// The host concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// fenced: the process the agent killed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// error: why the stream ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
}

/// The host's session with a shared backend (etcd).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostSession {
    /// The etcd lease id.
    pub lease_id: u64,
    /// The ttl etcd granted.
    pub ttl: Dur,
    /// How long ago the last renewal etcd confirmed was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_renewal_ago: Option<Dur>,
    /// How long the session is sure to live without another renewal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safe_for: Option<Dur>,
    /// Round trips of the most recent confirmed renewals, oldest first, in microseconds.
    pub renewal_latency_us: Vec<u64>,
    /// Whether etcd said the session is gone (a new one follows).
    pub expired: bool,
    /// Renewals sent since the last one confirmed.
    pub failed_renewals: u64,
    /// The most recent renewals the agent saw end, oldest first (at most 20): each confirmed
    /// one with its round trip, each failed one, and when.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub renewals: Vec<Renewal>,
}

/// One renewal of the host session, as it ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Renewal {
    /// When the agent learned how it ended.
    pub at: Time,
    /// How it ended.
    pub outcome: RenewalOutcome,
    /// Its round trip, when confirmed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency: Option<Dur>,
}

/// How a renewal of the host session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RenewalOutcome {
    /// The backend confirmed it: the session lives a ttl from when it was sent.
    Confirmed,
    /// It failed (the backend did not answer in time, or refused).
    Failed,
}

/// etcd's space and history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EtcdStatus {
    /// The database's size, bytes.
    pub db_size: u64,
    /// The quota it may reach, bytes.
    pub quota: u64,
    /// The store's revision.
    pub revision: i64,
    /// The revision up to which its history is compacted.
    pub compacted_revision: i64,
    /// Whether etcd's NOSPACE alarm is raised (it refuses every write).
    pub nospace: bool,
    /// Who compacts the history.
    pub compactor: String,
    /// Free, clean records this agent deleted since it started.
    pub forgotten: u64,
    /// What to do, when something is.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub warning: String,
}

/// The answer to `GET /v1/hosts`: every host's session on the backend, by host id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostsResponse {
    /// The hosts: those with a live session, and those this agent saw lose theirs.
    pub hosts: Vec<Host>,
}

/// One host's session, as `leasehold hosts` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Host {
    /// The host id.
    pub host: String,
    /// Whether its session is alive.
    pub alive: bool,
    /// Its session (on etcd, the lease id); absent on the local store, which has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<u64>,
    /// Alive: when the session began; expired: when this agent saw it end. Absent when it
    /// ended before this agent started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
    /// The leases its processes hold now (none once expired).
    pub leases: u64,
    /// Its agent's pid, as that agent recorded it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_pid: Option<u32>,
    /// About how long ago its session was last renewed (whole seconds on etcd); absent where
    /// sessions do not expire (the local store) or once expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewed_ago: Option<Dur>,
    /// How long its session lives without another renewal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<Dur>,
    /// Whether this is the answering agent's own host.
    pub this_host: bool,
}

/// The answer to `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusResponse {
    /// This host's id.
    pub host: String,
    /// The backend: local or etcd.
    pub backend: String,
    /// The agent's version.
    pub version: String,
    /// The agent's pid.
    pub pid: u64,
    /// How long the agent has run.
    pub uptime: Dur,
    /// Its state directory.
    pub state_dir: String,
    /// Its socket.
    pub socket: String,
    /// Known resources.
    pub resources: u64,
    /// Live leases.
    pub leases: u64,
    /// Processes holding leases.
    pub processes: u64,
    /// Dirty resources.
    pub dirty: u64,
    /// The host session, in words.
    pub session: String,
    /// How long the host's leases are sure to stay safe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub safe_for: Option<Dur>,
    /// The host's session with a shared backend, answered also while it is unreachable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_session: Option<HostSession>,
    /// Why the counts are missing (the backend did not answer), when they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_error: Option<String>,
    /// etcd's space and history (etcd backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etcd: Option<EtcdStatus>,
    /// How holders that ask for it (`leasehold run`) are contained; absent from older agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub containment: Option<Containment>,
    /// Holders that died holding leases and left what they started running, which SIGKILL
    /// has not ended yet (a process in uninterruptible sleep, or frozen): their leases stay
    /// held until it is gone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stuck: Vec<StuckHolder>,
}

/// A holder that died holding leases, whose cgroup or process group still has processes
/// that SIGKILL has not ended ([`StatusResponse::stuck`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StuckHolder {
    /// The dead holder's pid.
    pub pid: u64,
    /// Its cgroup, when that is what cannot be emptied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// The process group it led, when that is what is left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_group: Option<u64>,
    /// How long the agent has been killing what is left.
    pub stuck_for: Dur,
}

/// Every type of the API, for the schema.
#[derive(JsonSchema)]
#[allow(dead_code)]
struct Api {
    acquire_request: AcquireRequest,
    acquire_event: AcquireEvent,
    release_request: ReleaseRequest,
    release_response: ReleaseResponse,
    force_release_request: ForceReleaseRequest,
    resource_request: ResourceRequest,
    mark_clean_response: MarkCleanResponse,
    validate_request: ValidateRequest,
    validate_response: ValidateResponse,
    inspect_response: InspectResponse,
    list_response: ListResponse,
    watch_request: WatchRequest,
    event: Event,
    status_response: StatusResponse,
    error: ApiError,
}

/// The JSON schema of the whole API (every request, answer and line), generated from these
/// types; `docs/api/v1.schema.json` holds a copy that a test keeps equal.
pub fn schema() -> String {
    let s = schemars::schema_for!(Api);
    let mut text = serde_json::to_string_pretty(&s).unwrap_or_default();
    text.push('\n');
    text
}
