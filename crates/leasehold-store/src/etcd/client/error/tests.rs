//! How each kind of failure is classified: sent again at once (never reached etcd), retried
//! (transient), or permanent, and then whether a setting is to blame. Decided from codes and
//! typed sources: a message that merely mentions a condition decides nothing.

use std::io;

use tonic::{Code, Status};

use super::*;

fn classify(code: Code, message: &str) -> EtcdError {
    EtcdError::from_status("txn", &Status::new(code, message))
}

#[test]
fn each_named_error_is_recognised_by_its_code_and_description() {
    for (code, desc, named) in NAMED {
        assert_eq!(EtcdCode::of(*code, desc), Some(*named), "{code:?} {desc}");
        let e = classify(*code, desc);
        assert_eq!(e.code(), Some(*named), "{e:?}");
    }
    // The same description under another code is not etcd's error.
    assert_eq!(
        EtcdCode::of(Code::Internal, "etcdserver: mvcc: database space exceeded"),
        None
    );
}

#[test]
fn an_unavailable_or_timed_out_cluster_is_retried() {
    for code in [
        Code::Unavailable,
        Code::DeadlineExceeded,
        Code::Unknown,
        Code::Cancelled,
    ] {
        let e = classify(code, "anything at all");
        assert!(e.transient() && !e.misconfigured(), "{code:?}: {e:?}");
    }
    for desc in [
        "etcdserver: request timed out",
        "etcdserver: request timed out, possibly due to previous leader failure",
        "etcdserver: no leader",
        "etcdserver: leader changed",
        "etcdserver: server stopped",
        "etcdserver: unhealthy cluster",
    ] {
        let e = classify(Code::Unavailable, desc);
        assert!(e.transient() && !e.misconfigured(), "{desc}: {e:?}");
        assert!(e.code().is_some_and(EtcdCode::transient), "{e:?}");
    }
}

#[test]
fn a_member_that_is_not_the_leader_is_retried() {
    let e = classify(Code::FailedPrecondition, "etcdserver: not leader");
    assert_eq!(e.code(), Some(EtcdCode::NotLeader));
    assert!(e.transient() && !e.misconfigured(), "{e:?}");
}

#[test]
fn a_message_that_mentions_a_leader_is_not_a_leader_change() {
    // Before, any message containing "leader" was retried, whatever its code.
    let e = classify(
        Code::FailedPrecondition,
        "etcdserver: bad leader transferee",
    );
    assert!(!e.transient(), "{e:?}");
    let e = classify(Code::InvalidArgument, "the leader of the band said no");
    assert!(!e.transient(), "{e:?}");
}

#[test]
fn a_denied_permission_is_permanent_and_says_what_to_grant() {
    let e = classify(Code::PermissionDenied, "etcdserver: permission denied");
    assert!(!e.transient() && e.misconfigured(), "{e:?}");
    assert_eq!(e.kind(), EtcdErrorKind::Settings(Setting::Rights));
    assert!(e.to_string().contains("grant-permission"), "{e}");
}

#[test]
fn a_wrong_password_is_permanent_and_names_the_settings() {
    let e = classify(
        Code::InvalidArgument,
        "etcdserver: authentication failed, invalid user ID or password",
    );
    assert!(!e.transient() && e.misconfigured(), "{e:?}");
    assert!(e.to_string().contains("etcd-password-file"), "{e}");
}

#[test]
fn authentication_enabled_or_not_blames_the_user_setting() {
    let e = classify(Code::InvalidArgument, "etcdserver: user name is empty");
    assert_eq!(e.kind(), EtcdErrorKind::Settings(Setting::AuthEnabled));
    let e = classify(
        Code::FailedPrecondition,
        "etcdserver: authentication is not enabled",
    );
    assert_eq!(e.kind(), EtcdErrorKind::Settings(Setting::AuthNotEnabled));
}

#[test]
fn another_invalid_argument_is_permanent_but_no_setting_is_blamed() {
    let e = classify(
        Code::InvalidArgument,
        "etcdserver: too many operations in txn request",
    );
    assert_eq!(e.code(), Some(EtcdCode::TooManyOps));
    assert!(!e.transient() && !e.misconfigured(), "{e:?}");
    // A message that reads like a wrong password, under no etcd error, blames nothing.
    let e = classify(Code::InvalidArgument, "authentication failed somewhere");
    assert!(!e.misconfigured(), "{e:?}");
}

#[test]
fn a_full_database_is_permanent_and_recognised() {
    let e = classify(
        Code::ResourceExhausted,
        "etcdserver: mvcc: database space exceeded",
    );
    assert!(!e.transient() && e.is_nospace(), "{e:?}");
    let e = classify(Code::ResourceExhausted, "database space exceeded, they say");
    assert!(!e.is_nospace(), "{e:?}");
}

#[test]
fn a_compacted_revision_is_recognised() {
    let e = classify(
        Code::OutOfRange,
        "etcdserver: mvcc: required revision has been compacted",
    );
    assert_eq!(e.code(), Some(EtcdCode::Compacted));
    assert!(!e.transient(), "{e:?}");
}

/// A status as tonic makes it when a connection cannot be made: `ConnectError` in its chain.
fn connect_failure(under: io::Error) -> Status {
    Status::from_error(Box::new(tonic::ConnectError(Box::new(under))))
}

#[test]
fn a_refused_connection_is_sent_again_a_refused_certificate_is_not() {
    let refused = connect_failure(io::Error::from(io::ErrorKind::ConnectionRefused));
    assert_eq!(refused.code(), Code::Unavailable);
    assert!(never_sent(&refused), "{refused:?}");
    let cert = connect_failure(io::Error::new(
        io::ErrorKind::InvalidData,
        rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
    ));
    assert!(!never_sent(&cert), "{cert:?}");
    let e = EtcdError::from_status("connect", &cert);
    assert!(!e.transient() && e.misconfigured(), "{e:?}");
    assert_eq!(e.kind(), EtcdErrorKind::Settings(Setting::UnknownCa));
    assert!(e.to_string().contains("etcd-cacert"), "{e}");
}

#[test]
fn an_unavailable_status_from_etcd_itself_was_sent() {
    // etcd's "timed out, possibly due to connection lost" says "connect" but was received
    // by etcd: not sent again at once (before, its text made it so).
    let s = Status::new(
        Code::Unavailable,
        "etcdserver: request timed out, possibly due to connection lost",
    );
    assert!(!never_sent(&s));
    let s = Status::new(
        Code::Unavailable,
        "error trying to connect: tcp connect error",
    );
    assert!(!never_sent(&s), "a message alone decides nothing");
}

#[test]
fn tls_errors_blame_the_setting_they_concern() {
    use rustls::{AlertDescription as A, CertificateError as C, Error as R};
    let cases = [
        (
            R::InvalidCertificate(C::NotValidForName),
            Setting::WrongName,
        ),
        (
            R::InvalidCertificate(C::Expired),
            Setting::ServerCertificate,
        ),
        (
            R::AlertReceived(A::CertificateRequired),
            Setting::ClientCertificate,
        ),
        (
            R::AlertReceived(A::BadCertificate),
            Setting::ClientCertificate,
        ),
        (
            R::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
            Setting::NotTls,
        ),
    ];
    for (tls, setting) in cases {
        let s = connect_failure(io::Error::new(io::ErrorKind::InvalidData, tls));
        let e = EtcdError::from_status("connect", &s);
        assert_eq!(e.kind(), EtcdErrorKind::Settings(setting), "{e:?}");
        assert!(!never_sent(&s));
    }
}

#[test]
fn an_expired_token_is_renewed() {
    let s = Status::new(Code::Unauthenticated, "etcdserver: invalid auth token");
    assert!(stale_token(&s));
    assert!(stale_token(&Status::new(
        Code::Unknown,
        "auth: revision in header is old"
    )));
    assert!(!stale_token(&Status::new(
        Code::PermissionDenied,
        "etcdserver: permission denied"
    )));
    assert!(!stale_token(&Status::new(
        Code::Unauthenticated,
        "not etcd's invalid auth token"
    )));
}

#[test]
fn a_watch_cancel_reason_names_etcds_error() {
    assert_eq!(
        EtcdCode::of_cancel_reason(
            "rpc error: code = PermissionDenied desc = etcdserver: permission denied"
        ),
        Some(EtcdCode::PermissionDenied)
    );
    assert_eq!(
        EtcdCode::of_cancel_reason("etcdserver: mvcc: required revision has been compacted"),
        Some(EtcdCode::Compacted)
    );
    assert_eq!(
        EtcdCode::of_cancel_reason("rpc error: code = Unknown desc = permission denied, sort of"),
        None
    );
}

/// A real connection refused: a gRPC call over tonic's channel to a port nobody listens on.
#[tokio::test]
async fn a_real_refused_connection_is_never_sent() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .expect("endpoint")
        .connect_lazy();
    let mut kv = crate::etcd::pb::etcdserverpb::kv_client::KvClient::new(channel);
    let s = kv
        .range(crate::etcd::pb::etcdserverpb::RangeRequest::default())
        .await
        .expect_err("nobody listens");
    assert!(never_sent(&s), "{s:?}");
    let e = EtcdError::from_status("range", &s);
    assert!(e.transient() && !e.misconfigured(), "{e:?}");
}
