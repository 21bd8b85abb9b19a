//! The leasehold agent's API: the HTTP/1.1 + JSON types ([`v1`], from which
//! docs/api/v1.schema.json is generated), with conversions to and from `leasehold-core`'s
//! types, the wording of leases for people ([`words`]), and the host facts both ends read
//! ([`host`]). HTTP/JSON is the agent's only API: these types are its one definition.
//!
//! Conversions from core types are infallible (`From`); conversions from wire messages
//! validate every name and field and fail with [`WireError`] (`TryFrom`), so nothing
//! malformed reaches the engine.

use leasehold_core::{EndReason, NameError};

pub mod host;
pub mod v1;
pub mod words;

/// A wire message that does not make a valid request or answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// A required field is missing.
    #[error("missing field {0}")]
    Missing(&'static str),
    /// A name or text field is invalid.
    #[error(transparent)]
    Name(#[from] NameError),
    /// An enum field holds a value this version does not know.
    #[error("unknown {what} {value}")]
    Unknown {
        /// The field.
        what: &'static str,
        /// Its value.
        value: String,
    },
}

/// The wire word for how a lease ended.
pub fn how_word(how: &EndReason) -> &'static str {
    match how {
        EndReason::Released => "released",
        EndReason::ReleasedDirty { .. } => "released-dirty",
        EndReason::ProcessDied => "process-died",
        EndReason::ExitedClean => "exited-clean",
        EndReason::SessionExpired => "session-expired",
        EndReason::Fenced => "fenced",
        EndReason::Forced { .. } => "forced",
        EndReason::HandedOver { .. } => "handed-over",
    }
}

/// Where clients find the agent when told nothing: `$LEASEHOLD_SOCKET`, else
/// `/run/leasehold/agent.sock` for root, else `$XDG_RUNTIME_DIR/leasehold/agent.sock`
/// (SPEC §6). `None` when none of these can be formed.
pub fn default_socket() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("LEASEHOLD_SOCKET").filter(|p| !p.is_empty()) {
        return Some(p.into());
    }
    default_socket_for_user()
}

/// The default socket path for the current user, ignoring `$LEASEHOLD_SOCKET`.
pub fn default_socket_for_user() -> Option<std::path::PathBuf> {
    if rustix::process::geteuid().is_root() {
        return Some("/run/leasehold/agent.sock".into());
    }
    std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|d| !d.is_empty())
        .map(|d| std::path::PathBuf::from(d).join("leasehold/agent.sock"))
}
