//! The vocabulary of leases: names, modes, owners, tokens and time.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The longest resource name, in bytes (SPEC §2).
pub const MAX_RESOURCE_NAME: usize = 1024;
/// The longest host id, in bytes (a DNS name fits).
pub const MAX_HOST_ID: usize = 253;
/// The longest owner label, in bytes.
pub const MAX_LABEL: usize = 256;
/// The longest command name kept for display, in bytes.
pub const MAX_COMMAND: usize = 64;
/// The longest free text (a force-release reason, a release note), in bytes.
pub const MAX_TEXT: usize = 1024;
/// The longest owner id, in bytes (a UUID takes 36).
pub const MAX_OWNER_ID: usize = 64;

/// Why a name, id, label or text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// The value is empty.
    #[error("{what} is empty")]
    Empty {
        /// What was being named.
        what: &'static str,
    },
    /// The value is longer than allowed.
    #[error("{what} is {len} bytes long; the limit is {max}")]
    TooLong {
        /// What was being named.
        what: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// The value holds a byte that is not allowed.
    #[error("{what} holds a forbidden character {ch:?} at byte {at}{hint}")]
    BadChar {
        /// What was being named.
        what: &'static str,
        /// The character.
        ch: char,
        /// Its byte offset.
        at: usize,
        /// What is allowed, when it is worth saying.
        hint: &'static str,
    },
}

fn check_text(
    what: &'static str,
    s: &str,
    max: usize,
    allow_empty: bool,
    ok: impl Fn(char) -> bool,
    hint: &'static str,
) -> Result<(), NameError> {
    if s.is_empty() && !allow_empty {
        return Err(NameError::Empty { what });
    }
    if s.len() > max {
        return Err(NameError::TooLong {
            what,
            len: s.len(),
            max,
        });
    }
    if let Some((at, ch)) = s.char_indices().find(|&(_, c)| !ok(c)) {
        return Err(NameError::BadChar { what, ch, at, hint });
    }
    Ok(())
}

/// Checks a free-text field (a label, a reason, a note): no control characters, bounded length.
///
/// # Errors
/// [`NameError`] naming `what` when the text is too long or holds a control character.
pub fn check_free_text(what: &'static str, s: &str, max: usize) -> Result<(), NameError> {
    check_text(what, s, max, true, |c| !c.is_control(), "")
}

/// The name of a shared resource: UTF-8, 1 to 1024 bytes, no NUL (SPEC §2).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ResourceName(String);

impl ResourceName {
    /// Validates and wraps a resource name.
    ///
    /// # Errors
    /// [`NameError`] when the name is empty, longer than 1024 bytes, or holds a NUL.
    pub fn new(name: impl Into<String>) -> Result<Self, NameError> {
        let name = name.into();
        check_text(
            "resource name",
            &name,
            MAX_RESOURCE_NAME,
            false,
            |c| c != '\0',
            "",
        )?;
        Ok(Self(name))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ResourceName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        Self::new(s)
    }
}

impl From<ResourceName> for String {
    fn from(r: ResourceName) -> String {
        r.0
    }
}

impl fmt::Display for ResourceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The id of a host: 1 to 253 bytes of ASCII letters, digits, `-`, `_` and `.`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostId(String);

impl HostId {
    /// Validates and wraps a host id.
    ///
    /// # Errors
    /// [`NameError`] when the id is empty, too long, or holds anything but `[A-Za-z0-9._-]`.
    pub fn new(id: impl Into<String>) -> Result<Self, NameError> {
        let id = id.into();
        check_text(
            "host id",
            &id,
            MAX_HOST_ID,
            false,
            |c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'),
            " (allowed: ASCII letters, digits, '-', '_', '.')",
        )?;
        Ok(Self(id))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for HostId {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        Self::new(s)
    }
}

impl From<HostId> for String {
    fn from(h: HostId) -> String {
        h.0
    }
}

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a lease may use its resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Read-write: one holder and nobody else.
    Exclusive,
    /// Read-only: any number of shared holders together, never with an exclusive one.
    Shared,
}

impl Mode {
    /// Whether a lease in mode `self` may coexist with one in mode `other`.
    pub fn compatible_with(self, other: Mode) -> bool {
        self == Mode::Shared && other == Mode::Shared
    }

    /// The mode as the word used in the CLI and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Exclusive => "exclusive",
            Mode::Shared => "shared",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A fencing token: every grant of a resource gets a larger one than any grant before it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Token(pub u64);

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A point on the monotonic clock, in milliseconds from an origin the caller chooses.
///
/// The engine never reads a clock; every operation is told the time.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Time(pub u64);

impl Time {
    /// This time plus a duration, saturating.
    pub fn after(self, d: Duration) -> Time {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Time(self.0.saturating_add(ms))
    }
}

/// Wall-clock time in milliseconds since the Unix epoch, kept for people to read, never for
/// decisions.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct WallTime(pub u64);

/// The time of an operation: the monotonic reading that decisions use, and the wall-clock
/// reading that records keep for display.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Now {
    /// Monotonic time, for expiry and grace.
    pub mono: Time,
    /// Wall-clock time, for records.
    pub wall: WallTime,
}

impl Now {
    /// A time whose wall-clock reading equals its monotonic one; handy in tests.
    pub fn at(ms: u64) -> Now {
        Now {
            mono: Time(ms),
            wall: WallTime(ms),
        }
    }
}

/// A process on a host, told apart from any later process that reuses its pid by its start
/// time (for Linux, field 22 of `/proc/PID/stat`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ProcessKey {
    /// The host the process runs on.
    pub host: HostId,
    /// Its pid.
    pub pid: u32,
    /// Its start time, in clock ticks after boot.
    pub start_time: u64,
}

impl fmt::Display for ProcessKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/pid {}", self.host, self.pid)
    }
}

/// The id of one owner among several inside one process (threads of a service, each lease
/// of a Python client): 1 to 64 bytes of ASCII letters, digits, `-`, `_`, `.` and `:`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct OwnerId(String);

impl OwnerId {
    /// Validates and wraps an owner id.
    ///
    /// # Errors
    /// [`NameError`] when the id is empty, too long, or holds anything but
    /// `[A-Za-z0-9._:-]`.
    pub fn new(id: impl Into<String>) -> Result<Self, NameError> {
        let id = id.into();
        check_text(
            "owner id",
            &id,
            MAX_OWNER_ID,
            false,
            |c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'),
            " (allowed: ASCII letters, digits, '-', '_', '.', ':')",
        )?;
        Ok(Self(id))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for OwnerId {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        Self::new(s)
    }
}

impl From<OwnerId> for String {
    fn from(o: OwnerId) -> String {
        o.0
    }
}

impl fmt::Display for OwnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who holds or waits for a lease: a process, and what helps a person recognise it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    /// The process; with `id`, the owner's identity.
    pub process: ProcessKey,
    /// Tells apart several owners inside one process: two owners of one process with
    /// different ids are two owners (an exclusive lease of one excludes the other). The
    /// process's exit still ends the leases of all of them. Records written before owner ids
    /// existed have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<OwnerId>,
    /// An optional label, such as a VM name or uuid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The user id of the process, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// The command name of the process, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Only root or the admin group may release or hand over its leases, not the process's
    /// own user (libvirt's restricted QEMU).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restricted: bool,
    /// What the process's exit does to its exclusive leases.
    #[serde(default, skip_serializing_if = "OnExit::is_default")]
    pub on_exit: OnExit,
    /// What losing a lease (force-release, or the host session lost) does to the process.
    #[serde(default, skip_serializing_if = "OnLost::is_default")]
    pub on_lost: OnLost,
}

/// What the agent does to a holder whose lease is lost: revoked by force-release, or its host
/// session lost (the fence).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnLost {
    /// SIGKILL the process (a VM: it must not write once another may).
    #[default]
    Kill,
    /// End the lease only: the process lives on and learns it from `validate` (a service
    /// holding short locks). Writes checked against the token stay safe; unchecked ones do
    /// not.
    Revoke,
}

impl OnLost {
    fn is_default(&self) -> bool {
        *self == OnLost::Kill
    }

    /// The word used on the wire: `kill` or `revoke`.
    pub fn as_str(&self) -> &'static str {
        match self {
            OnLost::Kill => "kill",
            OnLost::Revoke => "revoke",
        }
    }
}

/// What a holder's exit without a release does to its exclusive leases.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnExit {
    /// Any exit leaves them dirty: the process may have stopped mid-write (SPEC G5).
    #[default]
    Dirty,
    /// Its exit status decides: status 0 ends them clean (a program that flushes and exits
    /// 0 only when its writes are complete, as QEMU does); a signal or another status leaves
    /// them dirty. Where the kernel cannot tell the status, they are left dirty.
    Status,
}

impl OnExit {
    fn is_default(&self) -> bool {
        *self == OnExit::Dirty
    }

    /// The word used on the wire and in the CLI: `dirty` or `status`.
    pub fn as_str(&self) -> &'static str {
        match self {
            OnExit::Dirty => "dirty",
            OnExit::Status => "status",
        }
    }

    /// Reads [`OnExit::as_str`]'s words.
    pub fn parse(s: &str) -> Option<OnExit> {
        match s {
            "dirty" => Some(OnExit::Dirty),
            "status" => Some(OnExit::Status),
            _ => None,
        }
    }
}

impl Owner {
    /// An owner with nothing but its process.
    pub fn new(host: HostId, pid: u32, start_time: u64) -> Owner {
        Owner {
            process: ProcessKey {
                host,
                pid,
                start_time,
            },
            id: None,
            label: None,
            uid: None,
            command: None,
            restricted: false,
            on_exit: OnExit::Dirty,
            on_lost: OnLost::Kill,
        }
    }

    /// The same owner with a label.
    pub fn with_label(mut self, label: impl Into<String>) -> Owner {
        self.label = Some(label.into());
        self
    }

    /// The same owner with an owner id.
    pub fn with_id(mut self, id: OwnerId) -> Owner {
        self.id = Some(id);
        self
    }

    /// Whether this is the owner `id` inside `process`: the owner's identity.
    pub fn is(&self, process: &ProcessKey, id: Option<&OwnerId>) -> bool {
        &self.process == process && self.id.as_ref() == id
    }

    /// Whether `self` and `other` are one owner (same process, same owner id).
    pub fn same_as(&self, other: &Owner) -> bool {
        other.is(&self.process, self.id.as_ref())
    }

    /// The host the owner runs on.
    pub fn host(&self) -> &HostId {
        &self.process.host
    }

    /// Checks the descriptive fields.
    ///
    /// # Errors
    /// [`NameError`] when the label or the command name is too long or holds control
    /// characters.
    pub fn validate(&self) -> Result<(), NameError> {
        if let Some(label) = &self.label {
            check_text(
                "owner label",
                label,
                MAX_LABEL,
                false,
                |c| !c.is_control(),
                "",
            )?;
        }
        if let Some(cmd) = &self.command {
            check_free_text("command name", cmd, MAX_COMMAND)?;
        }
        Ok(())
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.process)?;
        if let Some(id) = &self.id {
            write!(f, " owner {id}")?;
        }
        if let Some(cmd) = &self.command {
            write!(f, " ({cmd})")?;
        }
        if let Some(label) = &self.label {
            write!(f, " [{label}]")?;
        }
        Ok(())
    }
}

/// The id of a host session.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// The id of a waiting request; ids grow with arrival, so they order the queue.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct WaiterId(pub u64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_names_are_bounded_and_nul_free() {
        assert!(ResourceName::new("vm1.qcow2").is_ok());
        assert!(ResourceName::new("/srv/images/vm 1.qcow2").is_ok());
        assert!(ResourceName::new("x".repeat(1024)).is_ok());
        assert!(matches!(
            ResourceName::new("x".repeat(1025)),
            Err(NameError::TooLong { len: 1025, .. })
        ));
        assert!(matches!(
            ResourceName::new(""),
            Err(NameError::Empty { .. })
        ));
        assert!(matches!(
            ResourceName::new("a\0b"),
            Err(NameError::BadChar { at: 1, .. })
        ));
    }

    #[test]
    fn host_ids_are_dns_like() {
        assert!(HostId::new("node-1.example_a").is_ok());
        assert!(HostId::new("a/b").is_err());
        assert!(HostId::new("a b").is_err());
        assert!(HostId::new("").is_err());
    }

    #[test]
    fn names_are_validated_when_deserialized() {
        let bad: Result<ResourceName, _> = serde_json::from_str("\"a\\u0000b\"");
        assert!(bad.is_err());
        let good: ResourceName = serde_json::from_str("\"disk\"").unwrap();
        assert_eq!(good.as_str(), "disk");
    }

    #[test]
    fn only_shared_with_shared_is_compatible() {
        assert!(Mode::Shared.compatible_with(Mode::Shared));
        assert!(!Mode::Shared.compatible_with(Mode::Exclusive));
        assert!(!Mode::Exclusive.compatible_with(Mode::Shared));
        assert!(!Mode::Exclusive.compatible_with(Mode::Exclusive));
    }

    #[test]
    fn labels_refuse_control_characters() {
        let o = Owner::new(HostId::new("h").unwrap(), 1, 1).with_label("vm\n1");
        assert!(o.validate().is_err());
        let o = Owner::new(HostId::new("h").unwrap(), 1, 1).with_label("vm-1");
        assert!(o.validate().is_ok());
    }
}
