//! Errors: a stable machine-readable code, the CLI exit code it maps to, and a message for
//! people that names the holder and what to do next.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Conflict, Ended};

/// What went wrong, for programs. Each code has one exit code of the CLI
/// ([`ErrorCode::exit_code`]) and one HTTP status ([`ErrorCode::http_status`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// Held by another owner (exit 3).
    Held,
    /// The wait ran out (exit 3).
    TimedOut,
    /// An acquire with an expected token found that another owner took the resource since
    /// (exit 3): a paused VM must not resume on a disk someone else may have written.
    Moved,
    /// Dirty: check it, then mark it clean, or accept it dirty (exit 4).
    NeedsCheck,
    /// The caller holds it in the other mode (exit 1).
    ModeConflict,
    /// The waiting request was withdrawn (exit 1).
    Cancelled,
    /// The request is malformed: an unknown field, a wrong type, a bad name (exit 2).
    Usage,
    /// The request body is larger than the agent reads (exit 2).
    TooLarge,
    /// The caller may not do this (exit 1).
    Forbidden,
    /// No such resource, lease, route or grant (exit 1).
    NotFound,
    /// The request cannot be done in the present state: no such process, not held, ...
    /// (exit 1).
    Refused,
    /// The agent is overloaded, stopping, or out of descriptors; retry (exit 5).
    Unavailable,
    /// The agent answers but its backend (etcd) does not, or refuses it (exit 1).
    BackendUnavailable,
    /// The agent or its storage ran out of something (connections allowed to a user,
    /// descriptors, space): nothing was changed; retry later (exit 1).
    Exhausted,
    /// The request was not sent in time (its headers never finished) (exit 1).
    RequestTimeout,
    /// The agent failed (exit 1).
    Internal,
}

/// The CLI's exit codes (SPEC §6), one for each [`ErrorCode`] ([`ErrorCode::exit_code`]).
/// `leasehold run` exits with its command's status instead, when the command ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ExitCode {
    /// Done.
    Ok = 0,
    /// An error.
    Error = 1,
    /// Bad flags, names or config; for the agent, anything a restart cannot fix.
    Usage = 2,
    /// Held by another owner, or `--wait` ran out.
    Held = 3,
    /// The resource is dirty: check it, then mark it clean.
    NeedsCheck = 4,
    /// The agent is unreachable, or did not answer in time.
    Unreachable = 5,
    /// Standard output was closed by its reader (as SIGPIPE would end the command).
    BrokenPipe = 141,
}

impl ExitCode {
    /// Every exit code, in order.
    pub const ALL: [ExitCode; 7] = [
        ExitCode::Ok,
        ExitCode::Error,
        ExitCode::Usage,
        ExitCode::Held,
        ExitCode::NeedsCheck,
        ExitCode::Unreachable,
        ExitCode::BrokenPipe,
    ];

    /// The number the process exits with.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// What the code means, for `--help`.
    pub fn meaning(self) -> &'static str {
        match self {
            ExitCode::Ok => "ok",
            ExitCode::Error => "error",
            ExitCode::Usage => {
                "usage (bad flags, names or config); for the agent, anything a restart cannot fix \
                 (bad config, an unsafe directory, a damaged database)"
            }
            ExitCode::Held => "held by another owner, or --wait timed out",
            ExitCode::NeedsCheck => {
                "needs check: the resource is dirty (its last writer died mid-write)"
            }
            ExitCode::Unreachable => "the agent is unreachable, or did not answer within --timeout",
            ExitCode::BrokenPipe => {
                "standard output was closed by its reader (as SIGPIPE would end it)"
            }
        }
    }
}

impl ErrorCode {
    /// The CLI's exit code for this error (SPEC §6: 1 error, 2 usage, 3 held, 4 needs check,
    /// 5 agent unreachable).
    pub fn exit_code(self) -> ExitCode {
        match self {
            ErrorCode::Held | ErrorCode::TimedOut | ErrorCode::Moved => ExitCode::Held,
            ErrorCode::NeedsCheck => ExitCode::NeedsCheck,
            ErrorCode::Usage | ErrorCode::TooLarge => ExitCode::Usage,
            ErrorCode::Unavailable => ExitCode::Unreachable,
            ErrorCode::ModeConflict
            | ErrorCode::Cancelled
            | ErrorCode::Forbidden
            | ErrorCode::NotFound
            | ErrorCode::Refused
            | ErrorCode::BackendUnavailable
            | ErrorCode::Exhausted
            | ErrorCode::RequestTimeout
            | ErrorCode::Internal => ExitCode::Error,
        }
    }

    /// The HTTP status of an answer with this error.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::Usage => 400,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::RequestTimeout => 408,
            ErrorCode::Held
            | ErrorCode::TimedOut
            | ErrorCode::Moved
            | ErrorCode::NeedsCheck
            | ErrorCode::ModeConflict
            | ErrorCode::Cancelled
            | ErrorCode::Refused => 409,
            ErrorCode::TooLarge => 413,
            ErrorCode::Internal => 500,
            ErrorCode::Unavailable | ErrorCode::BackendUnavailable => 503,
            ErrorCode::Exhausted => 503,
        }
    }

    /// The code's word on the wire (`needs-check`).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Held => "held",
            ErrorCode::TimedOut => "timed-out",
            ErrorCode::Moved => "moved",
            ErrorCode::NeedsCheck => "needs-check",
            ErrorCode::ModeConflict => "mode-conflict",
            ErrorCode::Cancelled => "cancelled",
            ErrorCode::Usage => "usage",
            ErrorCode::TooLarge => "too-large",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not-found",
            ErrorCode::Refused => "refused",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::BackendUnavailable => "backend-unavailable",
            ErrorCode::Exhausted => "exhausted",
            ErrorCode::RequestTimeout => "request-timeout",
            ErrorCode::Internal => "internal",
        }
    }

    /// Every code, for tests and documentation.
    pub const ALL: [ErrorCode; 15] = [
        ErrorCode::Held,
        ErrorCode::TimedOut,
        ErrorCode::NeedsCheck,
        ErrorCode::ModeConflict,
        ErrorCode::Cancelled,
        ErrorCode::Usage,
        ErrorCode::TooLarge,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::Refused,
        ErrorCode::Unavailable,
        ErrorCode::BackendUnavailable,
        ErrorCode::Exhausted,
        ErrorCode::RequestTimeout,
        ErrorCode::Internal,
    ];
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error answer: the body of every non-2xx answer, and the last line of a stream that
/// fails. Refusals of an acquire carry who is in the way as data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, thiserror::Error)]
#[serde(deny_unknown_fields)]
#[error("{message}")]
pub struct ApiError {
    /// What went wrong, for programs.
    pub code: ErrorCode,
    /// What went wrong and what to do next, for people.
    pub message: String,
    /// The resource concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// `held`, `timed-out`: who is in the way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conflict: Option<Box<Conflict>>,
    /// `needs-check`: the lease that left the resource dirty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty: Option<Box<Ended>>,
    /// `needs-check`, when the caller asked to take it dirty but may not: who may.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accept_dirty_needs: Option<String>,
}

impl ApiError {
    /// An error with only a code and a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            resource: None,
            conflict: None,
            dirty: None,
            accept_dirty_needs: None,
        }
    }

    /// A malformed request (`usage`).
    pub fn usage(message: impl Into<String>) -> ApiError {
        ApiError::new(ErrorCode::Usage, message)
    }
}
