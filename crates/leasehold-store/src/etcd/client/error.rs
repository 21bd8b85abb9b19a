//! Errors of etcd calls, and what they mean: worth retrying, or a setting to change.

/// An etcd failure, with the operation that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("etcd {op}: {message}")]
pub struct EtcdError {
    /// What was being done.
    pub op: &'static str,
    /// What etcd or the transport said.
    pub message: String,
    /// Whether it is worth retrying (the cluster or the network was unavailable).
    pub transient: bool,
    /// Whether the agent's settings are wrong (TLS, user, password, rights): retrying the
    /// same thing cannot help; the message says what to change.
    pub misconfigured: bool,
}

impl EtcdError {
    pub(super) fn new(op: &'static str, message: impl Into<String>, transient: bool) -> EtcdError {
        EtcdError {
            op,
            message: message.into(),
            transient,
            misconfigured: false,
        }
    }

    pub(super) fn misconfigured(op: &'static str, message: impl Into<String>) -> EtcdError {
        EtcdError {
            op,
            message: message.into(),
            transient: false,
            misconfigured: true,
        }
    }

    pub(super) fn from_status(op: &'static str, s: &tonic::Status) -> EtcdError {
        use tonic::Code;
        let message = status_text(s);
        if let Some(advice) = misconfiguration(s, &message) {
            return EtcdError::misconfigured(op, format!("{message}: {advice}"));
        }
        let transient = matches!(
            s.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
        ) || message.contains("leader");
        EtcdError::new(op, message, transient)
    }
}

/// A status's message with the chain of errors under it (a transport failure says only
/// "transport error"; the reason, such as a certificate refused, is below it).
pub(super) fn status_text(s: &tonic::Status) -> String {
    let mut text = s.message().to_owned();
    let mut source = std::error::Error::source(s);
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

/// What to change when `s` says the agent's TLS or authentication settings are wrong.
pub(super) fn misconfiguration(s: &tonic::Status, text: &str) -> Option<&'static str> {
    use tonic::Code;
    let has = |needle: &str| text.contains(needle);
    match s.code() {
        _ if s.code() == Code::PermissionDenied || has("permission denied") => Some(
            "the etcd user lacks a permission: grant its role readwrite on leasehold's prefix \
             (`etcdctl role grant-permission ROLE --prefix=true readwrite PREFIX`)",
        ),
        Code::InvalidArgument if has("authentication failed") || has("invalid user ID") => {
            Some("check etcd-user and the password in etcd-password-file")
        }
        Code::InvalidArgument if has("user name is empty") => {
            Some("etcd's authentication is enabled: set etcd-user and etcd-password-file")
        }
        Code::FailedPrecondition if has("authentication is not enabled") => {
            Some("etcd-user is set but etcd's authentication is not enabled: unset etcd-user")
        }
        _ if has("invalid peer certificate") || has("UnknownIssuer") => Some(
            "etcd's certificate is not signed by the CA this agent trusts: set etcd-cacert to \
             the CA that signed etcd's server certificate (etcd's --trusted-ca-file)",
        ),
        _ if has("NotValidForName") || has("not valid for name") => Some(
            "etcd's certificate does not name the endpoint's host: use a host name or address \
             its certificate lists",
        ),
        _ if has("CertificateRequired") || has("BadCertificate") || has("bad certificate") => Some(
            "etcd refused this agent's client certificate (etcd runs with \
                 --client-cert-auth): set etcd-cert and etcd-key to a certificate signed by \
                 etcd's --trusted-ca-file",
        ),
        _ if has("InvalidContentType") || has("corrupt message") => {
            Some("the endpoint does not speak TLS: use http:// for it, without TLS settings")
        }
        _ if has("frame with invalid size") || has("HTTP request to an HTTPS server") => Some(
            "the endpoint answers with TLS: use https:// and set etcd-cacert (and etcd-cert and \
             etcd-key if etcd checks client certificates)",
        ),
        _ => None,
    }
}

/// Whether etcd refused a call's token as expired or unknown: authenticate again and resend.
pub(super) fn stale_token(s: &tonic::Status) -> bool {
    let m = s.message();
    m.contains("invalid auth token") || m.contains("revision in header is old")
}

/// Whether a failed call never reached etcd (its connection could not be made), so it is
/// safe to send again, to another member. A connection refused for a reason that retrying
/// cannot change (a certificate, a protocol) is not retried.
pub(super) fn never_sent(s: &tonic::Status) -> bool {
    let m = s.message();
    s.code() == tonic::Code::Unavailable
        && (m.contains("connect")
            || m.contains("Connection refused")
            || m.contains("transport error"))
        && misconfiguration(s, &status_text(s)).is_none()
}

/// Whether an error is etcd's "database space exceeded": its NOSPACE alarm is raised and it
/// refuses every write until an operator compacts, defragments and disarms it.
pub fn is_nospace(e: &EtcdError) -> bool {
    e.message.contains("database space exceeded")
}

/// How each kind of failure is classified: sent again at once (never reached etcd), retried
/// (transient), or permanent, and then whether a setting is to blame. These pin today's
/// classification, which still reads status messages besides codes (issue 9 item 4, open:
/// decide from codes and typed sources only); a change to it must keep these passing.
#[cfg(test)]
mod tests {
    use tonic::{Code, Status};

    use super::*;

    fn classify(code: Code, message: &str) -> EtcdError {
        EtcdError::from_status("txn", &Status::new(code, message))
    }

    #[test]
    fn an_unavailable_or_timed_out_cluster_is_retried() {
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Unknown,
            Code::Cancelled,
        ] {
            let e = classify(code, "etcdserver: request timed out");
            assert!(e.transient && !e.misconfigured, "{code:?}: {e:?}");
        }
    }

    #[test]
    fn a_member_that_is_not_the_leader_is_retried() {
        let e = classify(Code::FailedPrecondition, "etcdserver: not leader");
        assert!(e.transient && !e.misconfigured, "{e:?}");
    }

    #[test]
    fn a_denied_permission_is_permanent_and_says_what_to_grant() {
        let e = classify(Code::PermissionDenied, "etcdserver: permission denied");
        assert!(!e.transient && e.misconfigured, "{e:?}");
        assert!(e.message.contains("grant-permission"), "{e}");
    }

    #[test]
    fn a_wrong_password_is_permanent_and_names_the_settings() {
        let e = classify(
            Code::InvalidArgument,
            "etcdserver: authentication failed, invalid user ID or password",
        );
        assert!(!e.transient && e.misconfigured, "{e:?}");
        assert!(e.message.contains("etcd-password-file"), "{e}");
    }

    #[test]
    fn another_invalid_argument_is_permanent_but_no_setting_is_blamed() {
        let e = classify(
            Code::InvalidArgument,
            "etcdserver: too many operations in txn request",
        );
        assert!(!e.transient && !e.misconfigured, "{e:?}");
    }

    #[test]
    fn a_full_database_is_permanent_and_recognised() {
        let e = classify(
            Code::ResourceExhausted,
            "etcdserver: mvcc: database space exceeded",
        );
        assert!(!e.transient && is_nospace(&e), "{e:?}");
    }

    #[test]
    fn a_refused_connection_is_sent_again_a_refused_certificate_is_not() {
        let refused = Status::new(
            Code::Unavailable,
            "error trying to connect: tcp connect error: Connection refused (os error 111)",
        );
        assert!(never_sent(&refused));
        let cert = Status::new(
            Code::Unavailable,
            "transport error: invalid peer certificate: UnknownIssuer",
        );
        assert!(!never_sent(&cert));
        let e = EtcdError::from_status("connect", &cert);
        assert!(!e.transient && e.misconfigured, "{e:?}");
    }

    #[test]
    fn an_expired_token_is_renewed() {
        let s = Status::new(Code::Unauthenticated, "etcdserver: invalid auth token");
        assert!(stale_token(&s));
        assert!(!stale_token(&Status::new(
            Code::PermissionDenied,
            "etcdserver: permission denied"
        )));
    }
}
