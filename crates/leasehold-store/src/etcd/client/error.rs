//! Errors of etcd calls, and what they mean: worth retrying, or a setting to change.
//!
//! Every decision is made from types, never from an error's text: etcd's own errors by the
//! identity its clients use (a gRPC code and etcd's exact description, its `rpctypes` table:
//! [`EtcdCode`]), other statuses by their code, and failures under the transport by the typed
//! errors in their source chain (a connection never made, a TLS error of rustls, an HTTP/2
//! frame error).

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

use tokio_rustls::rustls;
use tonic::Code;

/// An error etcd names: etcd's clients recognise each by its gRPC code and its exact
/// description (etcd's `api/v3rpc/rpctypes`), which is how etcd tells them apart on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EtcdCode {
    /// The cluster has no leader (an election is under way).
    NoLeader,
    /// The member asked is not the leader.
    NotLeader,
    /// The leader changed while the request was in flight.
    LeaderChanged,
    /// The member stopped.
    Stopped,
    /// The request timed out inside etcd (possibly because a leader failed or a connection
    /// between members was lost).
    TimedOut,
    /// The cluster is unhealthy.
    Unhealthy,
    /// The member cannot serve the request yet.
    NotCapable,
    /// Too many requests are pending.
    TooManyRequests,
    /// The database is full: etcd's NOSPACE alarm is raised and every write is refused.
    NoSpace,
    /// The revision asked for has been compacted.
    Compacted,
    /// The revision asked for is in the future.
    FutureRevision,
    /// The lease does not exist (it expired or was revoked).
    LeaseNotFound,
    /// A transaction has more operations than etcd allows (`--max-txn-ops`).
    TooManyOps,
    /// The request is larger than etcd allows (`--max-request-bytes`).
    RequestTooLarge,
    /// The etcd user lacks a permission.
    PermissionDenied,
    /// The user or password is wrong.
    AuthFailed,
    /// Authentication is enabled and no user was given.
    UserEmpty,
    /// A user was given and authentication is not enabled.
    AuthNotEnabled,
    /// The token sent is unknown or expired.
    InvalidAuthToken,
    /// The token predates a change of etcd's users or roles.
    AuthOldRevision,
    /// etcd found its data corrupt.
    Corrupt,
}

/// etcd's named errors: code, description, and which [`EtcdCode`] (etcd 3.4 and later).
const NAMED: &[(Code, &str, EtcdCode)] = &[
    (
        Code::Unavailable,
        "etcdserver: no leader",
        EtcdCode::NoLeader,
    ),
    (
        Code::FailedPrecondition,
        "etcdserver: not leader",
        EtcdCode::NotLeader,
    ),
    (
        Code::Unavailable,
        "etcdserver: leader changed",
        EtcdCode::LeaderChanged,
    ),
    (
        Code::Unavailable,
        "etcdserver: server stopped",
        EtcdCode::Stopped,
    ),
    (
        Code::Unavailable,
        "etcdserver: request timed out",
        EtcdCode::TimedOut,
    ),
    (
        Code::Unavailable,
        "etcdserver: request timed out, possibly due to previous leader failure",
        EtcdCode::TimedOut,
    ),
    (
        Code::Unavailable,
        "etcdserver: request timed out, possibly due to connection lost",
        EtcdCode::TimedOut,
    ),
    (
        Code::Unavailable,
        "etcdserver: request timed out, leader transfer took too long",
        EtcdCode::TimedOut,
    ),
    (
        Code::Unavailable,
        "etcdserver: unhealthy cluster",
        EtcdCode::Unhealthy,
    ),
    (
        Code::Unavailable,
        "etcdserver: not capable",
        EtcdCode::NotCapable,
    ),
    (
        Code::ResourceExhausted,
        "etcdserver: too many requests",
        EtcdCode::TooManyRequests,
    ),
    // etcd 3.4 sends this one without its code.
    (
        Code::Unknown,
        "etcdserver: too many requests",
        EtcdCode::TooManyRequests,
    ),
    (
        Code::ResourceExhausted,
        "etcdserver: mvcc: database space exceeded",
        EtcdCode::NoSpace,
    ),
    (
        Code::OutOfRange,
        "etcdserver: mvcc: required revision has been compacted",
        EtcdCode::Compacted,
    ),
    (
        Code::OutOfRange,
        "etcdserver: mvcc: required revision is a future revision",
        EtcdCode::FutureRevision,
    ),
    (
        Code::NotFound,
        "etcdserver: requested lease not found",
        EtcdCode::LeaseNotFound,
    ),
    (
        Code::InvalidArgument,
        "etcdserver: too many operations in txn request",
        EtcdCode::TooManyOps,
    ),
    (
        Code::InvalidArgument,
        "etcdserver: request is too large",
        EtcdCode::RequestTooLarge,
    ),
    (
        Code::PermissionDenied,
        "etcdserver: permission denied",
        EtcdCode::PermissionDenied,
    ),
    (
        Code::InvalidArgument,
        "etcdserver: authentication failed, invalid user ID or password",
        EtcdCode::AuthFailed,
    ),
    (
        Code::InvalidArgument,
        "etcdserver: user name is empty",
        EtcdCode::UserEmpty,
    ),
    (
        Code::FailedPrecondition,
        "etcdserver: authentication is not enabled",
        EtcdCode::AuthNotEnabled,
    ),
    (
        Code::Unauthenticated,
        "etcdserver: invalid auth token",
        EtcdCode::InvalidAuthToken,
    ),
    // etcd 3.4 sends its auth store's error as it is; 3.5 and later name it.
    (
        Code::Unknown,
        "auth: revision in header is old",
        EtcdCode::AuthOldRevision,
    ),
    (
        Code::InvalidArgument,
        "etcdserver: revision of auth store is old",
        EtcdCode::AuthOldRevision,
    ),
    (
        Code::DataLoss,
        "etcdserver: corrupt cluster",
        EtcdCode::Corrupt,
    ),
];

impl EtcdCode {
    /// The error etcd names with `code` and `description`, if it is one of [`NAMED`].
    pub fn of(code: Code, description: &str) -> Option<EtcdCode> {
        NAMED
            .iter()
            .find(|(c, d, _)| *c == code && *d == description)
            .map(|(_, _, e)| *e)
    }

    /// The error in a watch's cancel reason: etcd writes it there as gRPC-go prints a status
    /// (`rpc error: code = PermissionDenied desc = etcdserver: permission denied`), or as the
    /// bare description.
    pub fn of_cancel_reason(reason: &str) -> Option<EtcdCode> {
        let described = reason
            .strip_prefix("rpc error: code = ")
            .and_then(|r| r.split_once(" desc = "));
        match described {
            Some((code, desc)) => NAMED
                .iter()
                .find(|(c, d, _)| code_name(*c) == code && *d == desc)
                .map(|(_, _, e)| *e),
            None => NAMED
                .iter()
                .find(|(_, d, _)| *d == reason)
                .map(|(_, _, e)| *e),
        }
    }

    /// Whether the condition passes by itself (an election, a busy or restarting member), so
    /// that the same request may succeed when sent again.
    pub fn transient(self) -> bool {
        matches!(
            self,
            EtcdCode::NoLeader
                | EtcdCode::NotLeader
                | EtcdCode::LeaderChanged
                | EtcdCode::Stopped
                | EtcdCode::TimedOut
                | EtcdCode::Unhealthy
                | EtcdCode::NotCapable
                | EtcdCode::TooManyRequests
        )
    }

    /// The setting to blame, when the error says the agent's etcd settings are wrong.
    fn setting(self) -> Option<Setting> {
        match self {
            EtcdCode::PermissionDenied => Some(Setting::Rights),
            EtcdCode::AuthFailed => Some(Setting::Password),
            EtcdCode::UserEmpty => Some(Setting::AuthEnabled),
            EtcdCode::AuthNotEnabled => Some(Setting::AuthNotEnabled),
            _ => None,
        }
    }
}

/// How gRPC-go names a code in a printed status.
fn code_name(c: Code) -> &'static str {
    match c {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// A setting of the agent that etcd, or the connection to it, refuses: retrying the same
/// thing cannot help.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Setting {
    /// The etcd user lacks a permission.
    Rights,
    /// The etcd user or its password is wrong.
    Password,
    /// etcd's authentication is enabled and no user is set.
    AuthEnabled,
    /// A user is set and etcd's authentication is not enabled.
    AuthNotEnabled,
    /// etcd's certificate is not signed by a CA this agent trusts.
    UnknownCa,
    /// etcd's certificate does not name the endpoint's host.
    WrongName,
    /// etcd's certificate is refused for another reason (expired, not yet valid, revoked...).
    ServerCertificate,
    /// etcd refused this agent's client certificate.
    ClientCertificate,
    /// The endpoint does not speak TLS and was reached with it.
    NotTls,
    /// The endpoint speaks TLS and was reached without it.
    IsTls,
    /// A setting the client checked itself (an endpoint, a TLS file): the message says which.
    Given,
}

impl Setting {
    /// What to change.
    pub fn advice(self) -> &'static str {
        match self {
            Setting::Rights => {
                "the etcd user lacks a permission: grant its role readwrite on leasehold's prefix \
                 (`etcdctl role grant-permission ROLE --prefix=true readwrite PREFIX`)"
            }
            Setting::Password => "check etcd-user and the password in etcd-password-file",
            Setting::AuthEnabled => {
                "etcd's authentication is enabled: set etcd-user and etcd-password-file"
            }
            Setting::AuthNotEnabled => {
                "etcd-user is set but etcd's authentication is not enabled: unset etcd-user"
            }
            Setting::UnknownCa => {
                "etcd's certificate is not signed by the CA this agent trusts: set etcd-cacert to \
                 the CA that signed etcd's server certificate (etcd's --trusted-ca-file)"
            }
            Setting::WrongName => {
                "etcd's certificate does not name the endpoint's host: use a host name or address \
                 its certificate lists"
            }
            Setting::ServerCertificate => {
                "etcd's certificate is refused: give etcd a valid certificate, signed by the CA \
                 in etcd-cacert"
            }
            Setting::ClientCertificate => {
                "etcd refused this agent's client certificate (etcd runs with \
                 --client-cert-auth): set etcd-cert and etcd-key to a certificate signed by \
                 etcd's --trusted-ca-file"
            }
            Setting::NotTls => {
                "the endpoint does not speak TLS: use http:// for it, without TLS settings"
            }
            Setting::IsTls => {
                "the endpoint answers with TLS: use https:// and set etcd-cacert (and etcd-cert \
                 and etcd-key if etcd checks client certificates)"
            }
            Setting::Given => "",
        }
    }
}

/// What kind of failure an [`EtcdError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EtcdErrorKind {
    /// etcd answered with an error it names.
    Etcd(EtcdCode),
    /// A gRPC status etcd does not name: its code.
    Status(Code),
    /// A setting is wrong.
    Settings(Setting),
    /// No answer came in time, or the stream closed before it: the cluster or the network
    /// was unavailable.
    NoAnswer,
    /// etcd answered something this client cannot use.
    BadAnswer,
}

/// An etcd failure, with the operation that failed and the error under it.
#[derive(Debug, Clone)]
pub struct EtcdError {
    /// What was being done.
    pub op: &'static str,
    kind: EtcdErrorKind,
    /// What etcd or the transport said, for people.
    detail: String,
    source: Option<Arc<dyn StdError + Send + Sync>>,
}

impl fmt::Display for EtcdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "etcd {}: {}", self.op, self.detail)?;
        match self.kind {
            EtcdErrorKind::Settings(s) if s != Setting::Given => write!(f, ": {}", s.advice()),
            _ => Ok(()),
        }
    }
}

impl StdError for EtcdError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn StdError + 'static))
    }
}

impl EtcdError {
    /// An error of `kind`, described by `detail`.
    pub(crate) fn new(op: &'static str, kind: EtcdErrorKind, detail: impl Into<String>) -> Self {
        EtcdError {
            op,
            kind,
            detail: detail.into(),
            source: None,
        }
    }

    /// A setting the client checked itself is wrong; `detail` says which and what to do.
    pub(crate) fn given(op: &'static str, detail: impl Into<String>) -> Self {
        EtcdError::new(op, EtcdErrorKind::Settings(Setting::Given), detail)
    }

    /// No answer in time (transient).
    pub(crate) fn no_answer(op: &'static str, detail: impl Into<String>) -> Self {
        EtcdError::new(op, EtcdErrorKind::NoAnswer, detail)
    }

    /// The same error, with `source` under it.
    pub(crate) fn with_source(mut self, source: impl StdError + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    /// The same error, its description preceded by `context`.
    pub(crate) fn context(mut self, context: impl fmt::Display) -> Self {
        self.detail = format!("{context}: {}", self.detail);
        self
    }

    /// What a failed call's status means.
    pub(crate) fn from_status(op: &'static str, s: &tonic::Status) -> EtcdError {
        let kind = if let Some(setting) = transport_setting(s) {
            EtcdErrorKind::Settings(setting)
        } else if s.code() == Code::PermissionDenied {
            EtcdErrorKind::Settings(Setting::Rights)
        } else {
            match EtcdCode::of(s.code(), s.message()) {
                Some(c) => c
                    .setting()
                    .map_or(EtcdErrorKind::Etcd(c), EtcdErrorKind::Settings),
                None => EtcdErrorKind::Status(s.code()),
            }
        };
        EtcdError::new(op, kind, status_text(s)).with_source(s.clone())
    }

    /// What etcd, the transport or the client's own check said, without the operation and
    /// the advice.
    pub fn detail(&self) -> &str {
        &self.detail
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> EtcdErrorKind {
        self.kind
    }

    /// The error etcd named, if it named one.
    pub fn code(&self) -> Option<EtcdCode> {
        match self.kind {
            EtcdErrorKind::Etcd(c) => Some(c),
            EtcdErrorKind::Settings(Setting::Rights) => Some(EtcdCode::PermissionDenied),
            EtcdErrorKind::Settings(Setting::Password) => Some(EtcdCode::AuthFailed),
            EtcdErrorKind::Settings(Setting::AuthEnabled) => Some(EtcdCode::UserEmpty),
            EtcdErrorKind::Settings(Setting::AuthNotEnabled) => Some(EtcdCode::AuthNotEnabled),
            _ => None,
        }
    }

    /// Whether it is worth retrying: the cluster or the network was unavailable, or etcd
    /// named a condition that passes (an election, a timeout inside etcd).
    pub fn transient(&self) -> bool {
        match self.kind {
            EtcdErrorKind::Etcd(c) => c.transient(),
            EtcdErrorKind::Status(code) => matches!(
                code,
                Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
            ),
            EtcdErrorKind::NoAnswer => true,
            EtcdErrorKind::Settings(_) | EtcdErrorKind::BadAnswer => false,
        }
    }

    /// Whether the agent's settings are wrong (TLS, user, password, rights): retrying the
    /// same thing cannot help; the message says what to change.
    pub fn misconfigured(&self) -> bool {
        matches!(self.kind, EtcdErrorKind::Settings(_))
    }

    /// Whether this is etcd's "database space exceeded": its NOSPACE alarm is raised and it
    /// refuses every write until an operator compacts, defragments and disarms it.
    pub fn is_nospace(&self) -> bool {
        self.kind == EtcdErrorKind::Etcd(EtcdCode::NoSpace)
    }
}

/// A status's message with the chain of errors under it (a transport failure says only
/// "transport error"; the reason, such as a certificate refused, is below it). For people.
pub(super) fn status_text(s: &tonic::Status) -> String {
    let mut text = s.message().to_owned();
    let mut source = StdError::source(s);
    while let Some(e) = source {
        let more = e.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = e.source();
    }
    text
}

/// The errors under `e`, `e` first. An `io::Error` wrapping another error shows it (its own
/// `source` skips it).
fn chain<'a>(e: &'a (dyn StdError + 'static)) -> Vec<&'a (dyn StdError + 'static)> {
    let mut out = Vec::new();
    let mut next = Some(e);
    while let Some(e) = next {
        out.push(e);
        next = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn StdError + 'static)),
            None => e.source(),
        };
    }
    out
}

/// The setting a TLS error of rustls blames.
fn tls_setting(e: &rustls::Error) -> Option<Setting> {
    use rustls::{AlertDescription as A, CertificateError as C};
    match e {
        rustls::Error::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => {
            Some(Setting::UnknownCa)
        }
        rustls::Error::InvalidCertificate(
            C::NotValidForName | C::NotValidForNameContext { .. },
        ) => Some(Setting::WrongName),
        rustls::Error::InvalidCertificate(_) => Some(Setting::ServerCertificate),
        rustls::Error::AlertReceived(
            A::CertificateRequired
            | A::BadCertificate
            | A::UnknownCA
            | A::CertificateUnknown
            | A::UnsupportedCertificate
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::AccessDenied,
        ) => Some(Setting::ClientCertificate),
        rustls::Error::InvalidMessage(_) => Some(Setting::NotTls),
        _ => None,
    }
}

/// The setting the errors under `e` blame: a TLS error, or an HTTP/2 frame too large to be
/// one (the first bytes of a TLS record, read as a frame header).
pub(crate) fn transport_setting(e: &(dyn StdError + 'static)) -> Option<Setting> {
    chain(e).into_iter().find_map(|e| {
        if let Some(t) = e.downcast_ref::<rustls::Error>() {
            return tls_setting(t);
        }
        match e.downcast_ref::<h2::Error>() {
            Some(h) if h.reason() == Some(h2::Reason::FRAME_SIZE_ERROR) => Some(Setting::IsTls),
            _ => None,
        }
    })
}

/// The TLS error under `e`, if any.
pub(crate) fn tls_error<'a>(e: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    chain(e)
        .into_iter()
        .find_map(|e| e.downcast_ref::<rustls::Error>())
}

/// Whether etcd refused a call's token as expired or unknown: authenticate again and resend.
pub(super) fn stale_token(s: &tonic::Status) -> bool {
    matches!(
        EtcdCode::of(s.code(), s.message()),
        Some(EtcdCode::InvalidAuthToken | EtcdCode::AuthOldRevision)
    )
}

/// Whether a failed call never reached etcd (its connection could not be made), so it is
/// safe to send again, to another member. A connection refused for a reason that retrying
/// cannot change (a certificate, a protocol) is not retried.
pub(super) fn never_sent(s: &tonic::Status) -> bool {
    s.code() == Code::Unavailable
        && chain(s).into_iter().any(|e| e.is::<tonic::ConnectError>())
        && transport_setting(s).is_none()
}

#[cfg(test)]
mod tests;
