//! A small etcd v3 client over the generated gRPC stubs: what the etcd store needs and no
//! more (ranges, transactions, leases with keep-alive, watches), over plaintext or TLS (with a
//! client certificate), as an etcd user when etcd's authentication is enabled.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::pb::etcdserverpb as rpc;
use super::pb::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use super::pb::etcdserverpb::request_op::Request;
use super::pb::mvccpb::KeyValue;

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
    fn new(op: &'static str, message: impl Into<String>, transient: bool) -> EtcdError {
        EtcdError {
            op,
            message: message.into(),
            transient,
            misconfigured: false,
        }
    }

    fn misconfigured(op: &'static str, message: impl Into<String>) -> EtcdError {
        EtcdError {
            op,
            message: message.into(),
            transient: false,
            misconfigured: true,
        }
    }

    fn from_status(op: &'static str, s: &tonic::Status) -> EtcdError {
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
fn status_text(s: &tonic::Status) -> String {
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
fn misconfiguration(s: &tonic::Status, text: &str) -> Option<&'static str> {
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

/// How to reach etcd beyond its URLs: TLS files and an etcd user, as etcdctl's `--cacert`,
/// `--cert`, `--key` and `--user`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EtcdSecurity {
    /// The CA certificate(s), PEM, that sign etcd's server certificates; without it,
    /// `https://` endpoints are checked against the system's roots.
    pub cacert: Option<PathBuf>,
    /// This agent's client certificate, PEM, for an etcd that checks them
    /// (`--client-cert-auth`).
    pub cert: Option<PathBuf>,
    /// The client certificate's private key, PEM.
    pub key: Option<PathBuf>,
    /// The etcd user to authenticate as, when etcd's authentication is enabled.
    pub user: Option<EtcdUser>,
}

impl EtcdSecurity {
    /// Whether any TLS setting is given.
    pub fn has_tls_files(&self) -> bool {
        self.cacert.is_some() || self.cert.is_some() || self.key.is_some()
    }
}

/// An etcd user and its password (never shown by `Debug`).
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdUser {
    /// The user's name.
    pub name: String,
    /// Its password.
    pub password: String,
}

impl std::fmt::Debug for EtcdUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdUser")
            .field("name", &self.name)
            .field("password", &"(hidden)")
            .finish()
    }
}

/// A connection to an etcd cluster.
#[derive(Debug, Clone)]
pub struct Etcd {
    kv: rpc::kv_client::KvClient<Channel>,
    lease: rpc::lease_client::LeaseClient<Channel>,
    watch: rpc::watch_client::WatchClient<Channel>,
    maintenance: rpc::maintenance_client::MaintenanceClient<Channel>,
    auth: rpc::auth_client::AuthClient<Channel>,
    /// The user to authenticate as, and its current token (etcd's simple tokens expire when
    /// unused for a while, and with a restarted member: a refused token is renewed).
    user: Option<Arc<(EtcdUser, tokio::sync::Mutex<Option<AsciiMetadataValue>>)>>,
    /// The endpoints and settings, for [`Etcd::diagnose`].
    endpoints: Arc<(Vec<String>, EtcdSecurity)>,
    timeout: Duration,
}

/// An error with the chain of errors under it.
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// `msg` as a request carrying `token`, etcd's authentication token.
fn authed<T>(msg: T, token: Option<&AsciiMetadataValue>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut().insert("token", t.clone());
    }
    r
}

/// Whether etcd refused a call's token as expired or unknown: authenticate again and resend.
fn stale_token(s: &tonic::Status) -> bool {
    let m = s.message();
    m.contains("invalid auth token") || m.contains("revision in header is old")
}

/// Whether a failed call never reached etcd (its connection could not be made), so it is
/// safe to send again, to another member. A connection refused for a reason that retrying
/// cannot change (a certificate, a protocol) is not retried.
fn never_sent(s: &tonic::Status) -> bool {
    let m = s.message();
    s.code() == tonic::Code::Unavailable
        && (m.contains("connect")
            || m.contains("Connection refused")
            || m.contains("transport error"))
        && misconfiguration(s, &status_text(s)).is_none()
}

/// How often an unanswered keep-alive is sent again.
pub const KEEPALIVE_RESEND: Duration = Duration::from_millis(250);

/// One keep-alive request on its own stream; the first answer's TTL.
async fn keep_alive_attempt(etcd: Etcd, id: i64) -> Result<i64, EtcdError> {
    let mut reauthed = false;
    loop {
        let token = etcd.token().await?;
        // Each attempt has its own request stream; its sender lives until the answer.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let _ = tx.send(rpc::LeaseKeepAliveRequest { id }).await;
        let opened = etcd
            .lease
            .clone()
            .lease_keep_alive(authed(
                tokio_stream::wrappers::ReceiverStream::new(rx),
                token.as_ref(),
            ))
            .await;
        let mut stream = match opened {
            Ok(r) => r.into_inner(),
            Err(s) if never_sent(&s) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Err(s) if stale_token(&s) && !reauthed => {
                reauthed = true;
                etcd.forget_token(token.as_ref()).await;
                continue;
            }
            Err(s) => return Err(EtcdError::from_status("keep-alive", &s)),
        };
        let r = stream
            .message()
            .await
            .map_err(|s| EtcdError::from_status("keep-alive", &s))?;
        drop(tx);
        return r.map(|r| r.ttl).ok_or(EtcdError::new(
            "keep-alive",
            "the stream closed without an answer",
            true,
        ));
    }
}

/// The largest answer accepted: a range over every record of a big cluster is large.
pub const MAX_MESSAGE: usize = 1 << 30;

/// The request timeout for ordinary calls.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// Reads a PEM file named by setting `field`.
fn read_pem(field: &str, path: &std::path::Path) -> Result<Vec<u8>, EtcdError> {
    let pem = std::fs::read(path).map_err(|e| {
        EtcdError::misconfigured("connect", format!("{field} {}: {e}", path.display()))
    })?;
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN ") {
        return Err(EtcdError::misconfigured(
            "connect",
            format!("{field} {}: not a PEM file", path.display()),
        ));
    }
    Ok(pem)
}

/// The TLS settings for `https://` endpoints, from `sec`.
fn tls_config(sec: &EtcdSecurity, timeout: Duration) -> Result<ClientTlsConfig, EtcdError> {
    // etcd speaks HTTP/2 on its TLS port whether or not it offers it through ALPN.
    let mut tls = ClientTlsConfig::new().assume_http2(true).timeout(timeout);
    tls = match &sec.cacert {
        Some(p) => tls.ca_certificate(Certificate::from_pem(read_pem("etcd-cacert", p)?)),
        None => tls.with_native_roots(),
    };
    match (&sec.cert, &sec.key) {
        (Some(c), Some(k)) => Ok(tls.identity(Identity::from_pem(
            read_pem("etcd-cert", c)?,
            read_pem("etcd-key", k)?,
        ))),
        (None, None) => Ok(tls),
        (Some(_), None) => Err(EtcdError::misconfigured(
            "connect",
            "etcd-cert is set without etcd-key: give both, or neither",
        )),
        (None, Some(_)) => Err(EtcdError::misconfigured(
            "connect",
            "etcd-key is set without etcd-cert: give both, or neither",
        )),
    }
}

/// Checks `endpoints` against `sec`: every one `http://` (no TLS settings) or every one
/// `https://`. Returns whether they use TLS.
///
/// # Errors
/// A misconfigured [`EtcdError`] saying what to change.
pub fn check_endpoints(endpoints: &[String], sec: &EtcdSecurity) -> Result<bool, EtcdError> {
    let bad = |m: String| Err(EtcdError::misconfigured("connect", m));
    if endpoints.is_empty() {
        return bad("no endpoints: give at least one etcd URL".into());
    }
    let mut tls = None;
    for e in endpoints {
        let this = if e.starts_with("https://") {
            true
        } else if e.starts_with("http://") {
            false
        } else {
            return bad(format!(
                "endpoint {e:?} is not an etcd URL: write http://HOST:PORT, or https://HOST:PORT \
                 for TLS"
            ));
        };
        let host = e.split_once("://").map_or("", |(_, rest)| rest);
        if host.is_empty() || host.starts_with(':') || host.starts_with('/') {
            return bad(format!(
                "endpoint {e:?} names no host: write http://HOST:PORT"
            ));
        }
        if tls.is_some_and(|t| t != this) {
            return bad(format!(
                "endpoints mix http:// and https:// ({}): use https:// for every member of a \
                 TLS cluster",
                endpoints.join(",")
            ));
        }
        tls = Some(this);
    }
    let tls = tls.unwrap_or(false);
    if !tls && sec.has_tls_files() {
        return bad(format!(
            "etcd-cacert, etcd-cert or etcd-key is set but the endpoints are http:// ({}): use \
             https:// to reach etcd over TLS, or drop the TLS settings",
            endpoints.join(",")
        ));
    }
    Ok(tls)
}

impl Etcd {
    /// Connects lazily to `endpoints` (`http://host:port`), balancing over them; calls fail
    /// after `timeout`.
    ///
    /// # Errors
    /// An [`EtcdError`] for a malformed endpoint.
    pub fn connect(endpoints: &[String], timeout: Duration) -> Result<Etcd, EtcdError> {
        Etcd::connect_with(endpoints, timeout, &EtcdSecurity::default())
    }

    /// Connects lazily to `endpoints` (all `http://`, or all `https://` with TLS), balancing
    /// over them, as `sec` says; calls fail after `timeout`. The TLS files are read now; the
    /// user authenticates at the first call.
    ///
    /// # Errors
    /// A misconfigured [`EtcdError`] for a malformed endpoint, endpoints that mix or do not
    /// match the TLS settings, or a TLS file that cannot be read.
    pub fn connect_with(
        endpoints: &[String],
        timeout: Duration,
        sec: &EtcdSecurity,
    ) -> Result<Etcd, EtcdError> {
        let tls = if check_endpoints(endpoints, sec)? {
            Some(tls_config(sec, timeout)?)
        } else {
            None
        };
        let eps = endpoints
            .iter()
            .map(|e| {
                let ep = Endpoint::from_shared(e.clone()).map_err(|err| {
                    EtcdError::misconfigured(
                        "connect",
                        format!("endpoint {e:?} is not a URL ({err}): write http://HOST:PORT"),
                    )
                })?;
                let ep = match &tls {
                    Some(t) => ep.tls_config(t.clone()).map_err(|err| {
                        EtcdError::misconfigured(
                            "connect",
                            format!("TLS for endpoint {e:?}: {}", chain(&err)),
                        )
                    })?,
                    None => ep,
                };
                Ok(ep
                    .connect_timeout(timeout)
                    .timeout(timeout)
                    .tcp_nodelay(true)
                    .http2_keep_alive_interval(Duration::from_secs(1))
                    .keep_alive_timeout(timeout)
                    .keep_alive_while_idle(true))
            })
            .collect::<Result<Vec<_>, EtcdError>>()?;
        let channel = Channel::balance_list(eps.into_iter());
        Ok(Etcd {
            kv: rpc::kv_client::KvClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE),
            lease: rpc::lease_client::LeaseClient::new(channel.clone()),
            watch: rpc::watch_client::WatchClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE),
            maintenance: rpc::maintenance_client::MaintenanceClient::new(channel.clone()),
            auth: rpc::auth_client::AuthClient::new(channel),
            user: sec
                .user
                .clone()
                .map(|u| Arc::new((u, tokio::sync::Mutex::new(None)))),
            endpoints: Arc::new((endpoints.to_vec(), sec.clone())),
            timeout,
        })
    }

    /// After a first contact failed for want of a connection: whether an endpoint refuses
    /// this client's settings (a certificate, TLS on one side only), which a gRPC error often
    /// hides behind "connection closed". `None` when no endpoint tells (etcd may be down).
    pub async fn diagnose(&self) -> Option<EtcdError> {
        let (endpoints, sec) = &*self.endpoints;
        for e in endpoints {
            if let Some(why) = super::probe::diagnose(e, sec, self.timeout).await {
                return Some(EtcdError::misconfigured("connect", format!("{e}: {why}")));
            }
        }
        None
    }

    /// The token to send with a call: `None` without a user; else the current one, after
    /// authenticating if there is none.
    async fn token(&self) -> Result<Option<AsciiMetadataValue>, EtcdError> {
        let Some(user) = &self.user else {
            return Ok(None);
        };
        let mut token = user.1.lock().await;
        if let Some(t) = token.as_ref() {
            return Ok(Some(t.clone()));
        }
        let req = rpc::AuthenticateRequest {
            name: user.0.name.clone(),
            password: user.0.password.clone(),
        };
        let deadline = tokio::time::Instant::now() + self.timeout;
        let answer = loop {
            match self.auth.clone().authenticate(req.clone()).await {
                Ok(r) => break r.into_inner(),
                Err(s) if never_sent(&s) && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(s) => {
                    let mut e = EtcdError::from_status("authenticate", &s);
                    e.message = format!("as etcd user {:?}: {}", user.0.name, e.message);
                    return Err(e);
                }
            }
        };
        let t = AsciiMetadataValue::try_from(answer.token).map_err(|_| {
            EtcdError::new(
                "authenticate",
                "etcd answered a token that is not text",
                false,
            )
        })?;
        *token = Some(t.clone());
        Ok(Some(t))
    }

    /// Drops `stale`, the token etcd refused, so that the next call authenticates again
    /// (unless another call already did).
    async fn forget_token(&self, stale: Option<&AsciiMetadataValue>) {
        if let Some(user) = &self.user {
            let mut token = user.1.lock().await;
            if token.as_ref() == stale {
                *token = None;
            }
        }
    }

    /// Runs `call` (given the token to send) until it succeeds, fails for a reason other
    /// than an unreachable member or a stale token, or `timeout` passes: a balanced channel
    /// may try a member that is down before one that is up.
    async fn retrying<T, F, Fut>(&self, op: &'static str, mut call: F) -> Result<T, EtcdError>
    where
        F: FnMut(Option<AsciiMetadataValue>) -> Fut,
        Fut: std::future::Future<Output = Result<T, tonic::Status>>,
    {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut reauthed = false;
        loop {
            let token = self.token().await?;
            match call(token.clone()).await {
                Ok(v) => return Ok(v),
                Err(s) if never_sent(&s) && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(s) if stale_token(&s) && self.user.is_some() && !reauthed => {
                    reauthed = true;
                    self.forget_token(token.as_ref()).await;
                }
                Err(s) => return Err(EtcdError::from_status(op, &s)),
            }
        }
    }

    /// Reads every key in `[key, range_end)` (or `key` alone when `range_end` is empty), at
    /// `revision` (0: the latest). Returns the keys and the store's revision.
    ///
    /// # Errors
    /// An [`EtcdError`].
    pub async fn range(
        &self,
        key: Vec<u8>,
        range_end: Vec<u8>,
        revision: i64,
    ) -> Result<(Vec<KeyValue>, i64), EtcdError> {
        let req = rpc::RangeRequest {
            key,
            range_end,
            revision,
            ..Default::default()
        };
        let r = self
            .retrying("range", |t| {
                let mut kv = self.kv.clone();
                let req = req.clone();
                async move { kv.range(authed(req, t.as_ref())).await }
            })
            .await?
            .into_inner();
        Ok((r.kvs, r.header.map_or(0, |h| h.revision)))
    }

    /// Runs a transaction. Returns whether the compares held, the responses, and the
    /// revision after it.
    ///
    /// # Errors
    /// An [`EtcdError`].
    pub async fn txn(&self, t: Txn) -> Result<TxnResult, EtcdError> {
        let req = rpc::TxnRequest {
            compare: t.compare,
            success: t.success,
            failure: t.failure,
        };
        let r = self
            .retrying("txn", |t| {
                let mut kv = self.kv.clone();
                let req = req.clone();
                async move { kv.txn(authed(req, t.as_ref())).await }
            })
            .await?
            .into_inner();
        Ok(TxnResult {
            succeeded: r.succeeded,
            revision: r.header.map_or(0, |h| h.revision),
            responses: r.responses,
        })
    }

    /// Grants a lease of `ttl`; returns its id and the TTL etcd granted.
    ///
    /// # Errors
    /// An [`EtcdError`].
    pub async fn lease_grant(&self, ttl: Duration) -> Result<(i64, i64), EtcdError> {
        let req = rpc::LeaseGrantRequest {
            // Whole seconds, rounded up: never a shorter lease than asked.
            ttl: i64::try_from((ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0)).max(1))
                .unwrap_or(i64::MAX),
            id: 0,
        };
        let r = self
            .retrying("lease grant", |t| {
                let mut lease = self.lease.clone();
                async move { lease.lease_grant(authed(req, t.as_ref())).await }
            })
            .await?
            .into_inner();
        if !r.error.is_empty() {
            return Err(EtcdError {
                op: "lease grant",
                message: r.error,
                transient: false,
                misconfigured: false,
            });
        }
        Ok((r.id, r.ttl))
    }

    /// The seconds left of lease `id`; `None` when it has expired or never was.
    ///
    /// # Errors
    /// An [`EtcdError`].
    pub async fn lease_ttl(&self, id: i64) -> Result<Option<i64>, EtcdError> {
        let req = rpc::LeaseTimeToLiveRequest { id, keys: false };
        let r = self
            .retrying("lease ttl", |t| {
                let mut lease = self.lease.clone();
                async move { lease.lease_time_to_live(authed(req, t.as_ref())).await }
            })
            .await?
            .into_inner();
        Ok((r.ttl > 0).then_some(r.ttl))
    }

    /// Revokes lease `id`, deleting its keys.
    ///
    /// # Errors
    /// An [`EtcdError`].
    pub async fn lease_revoke(&self, id: i64) -> Result<(), EtcdError> {
        self.retrying("lease revoke", |t| {
            let mut lease = self.lease.clone();
            async move {
                lease
                    .lease_revoke(authed(rpc::LeaseRevokeRequest { id }, t.as_ref()))
                    .await
            }
        })
        .await?;
        Ok(())
    }

    /// Renews lease `id` once, over a keep-alive stream; returns the TTL etcd answered (0: the
    /// lease has expired). While no answer comes, the request is sent again every
    /// [`KEEPALIVE_RESEND`] on a new stream (which the balanced channel may route to another
    /// member: a request stuck with a member that lost its leadership does not hold the
    /// renewal up); the first answer wins. Bounded by the client's timeout.
    ///
    /// # Errors
    /// An [`EtcdError`], transient when etcd could not be reached in time.
    pub async fn keep_alive_once(&self, id: i64) -> Result<i64, EtcdError> {
        let deadline = tokio::time::sleep(self.timeout);
        tokio::pin!(deadline);
        let mut attempts = tokio::task::JoinSet::new();
        let mut resend = tokio::time::interval(KEEPALIVE_RESEND);
        let mut last_err = None;
        loop {
            tokio::select! {
                () = &mut deadline => {
                    return Err(EtcdError::new(
                        "keep-alive",
                        match last_err {
                            Some(e) => format!("no answer in {:?} (last: {e})", self.timeout),
                            None => format!("no answer in {:?}", self.timeout),
                        },
                        true,
                    ));
                }
                _ = resend.tick() => {
                    attempts.spawn(keep_alive_attempt(self.clone(), id));
                }
                Some(done) = attempts.join_next() => match done {
                    Ok(Ok(ttl)) => return Ok(ttl),
                    Ok(Err(e)) if !e.transient => return Err(e),
                    Ok(Err(e)) => last_err = Some(e),
                    Err(_) => {}
                },
            }
        }
    }

    /// Watches `[key, range_end)` from `start_revision`, with previous values.
    ///
    /// # Errors
    /// An [`EtcdError`] when the watch cannot be created.
    pub async fn watch(
        &self,
        key: Vec<u8>,
        range_end: Vec<u8>,
        start_revision: i64,
    ) -> Result<WatchStream, EtcdError> {
        let create = rpc::WatchRequest {
            request_union: Some(rpc::watch_request::RequestUnion::CreateRequest(
                rpc::WatchCreateRequest {
                    key,
                    range_end,
                    start_revision,
                    prev_kv: true,
                    progress_notify: true,
                    ..Default::default()
                },
            )),
        };
        let mut reauthed = false;
        loop {
            let token = self.token().await?;
            // The request stream stays open while the watch lives: etcd ends a watch whose
            // client half-closes.
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let _ = tx.send(create.clone()).await;
            let mut stream = self
                .watch
                .clone()
                .watch(authed(
                    tokio_stream::wrappers::ReceiverStream::new(rx),
                    token.as_ref(),
                ))
                .await
                .map_err(|s| EtcdError::from_status("watch", &s))?
                .into_inner();
            // etcd answers the create first; a watch it refuses (a stale token, no right to
            // read the range) is cancelled there, and the stream would otherwise stay silent.
            let first = tokio::time::timeout(self.timeout, stream.message()).await;
            match first {
                Ok(Ok(Some(r))) if r.canceled => {
                    let why = r.cancel_reason;
                    if why.contains("permission denied") && self.user.is_some() && !reauthed {
                        // The token may have expired: once more with a fresh one.
                        reauthed = true;
                        self.forget_token(token.as_ref()).await;
                        continue;
                    }
                    return Err(if why.contains("permission denied") {
                        EtcdError::misconfigured(
                            "watch",
                            format!(
                                "{why}: the etcd user may not read the range watched; grant its \
                                 role readwrite on leasehold's prefix"
                            ),
                        )
                    } else {
                        EtcdError::new("watch", format!("cancelled: {why}"), true)
                    });
                }
                Ok(Ok(Some(r))) => {
                    // Keep the sender alive for the stream's lifetime.
                    tokio::spawn(async move {
                        tx.closed().await;
                    });
                    return Ok(WatchStream {
                        first: Some(r),
                        stream,
                    });
                }
                Ok(Ok(None)) => {
                    return Err(EtcdError::new(
                        "watch",
                        "the stream closed before the watch was created",
                        true,
                    ));
                }
                Ok(Err(s)) => return Err(EtcdError::from_status("watch", &s)),
                Err(_) => {
                    return Err(EtcdError::new(
                        "watch",
                        format!("not created in {:?}", self.timeout),
                        true,
                    ));
                }
            }
        }
    }
}

/// The responses of one watch, its first (the answer to its creation) included.
#[derive(Debug)]
pub struct WatchStream {
    first: Option<rpc::WatchResponse>,
    stream: tonic::Streaming<rpc::WatchResponse>,
}

impl WatchStream {
    /// The next response; `None` when the stream has ended.
    ///
    /// # Errors
    /// The status the stream ended with.
    pub async fn message(&mut self) -> Result<Option<rpc::WatchResponse>, tonic::Status> {
        match self.first.take() {
            Some(r) => Ok(Some(r)),
            None => self.stream.message().await,
        }
    }
}

/// What one etcd member says of itself and of the cluster's alarms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberStatus {
    /// The size of its database file, bytes.
    pub db_size: i64,
    /// The part of it in use, bytes (the rest is free pages, reused before the file grows).
    pub db_size_in_use: i64,
    /// Its quota (`--quota-backend-bytes`) when it tells (etcd 3.6 and later), else 0.
    pub quota: i64,
    /// The store's revision.
    pub revision: i64,
    /// Whether a NOSPACE alarm is raised anywhere in the cluster.
    pub nospace: bool,
    /// The answering member's id.
    pub member_id: u64,
    /// The member it believes leads the cluster (0: none).
    pub leader: u64,
}

impl Etcd {
    /// Compacts the history up to `revision`: older versions of keys can no longer be read or
    /// watched, and their space is reused.
    ///
    /// # Errors
    /// An [`EtcdError`]; compacting to a revision already compacted is one ("required revision
    /// has been compacted").
    pub async fn compact(&self, revision: i64) -> Result<(), EtcdError> {
        let req = rpc::CompactionRequest {
            revision,
            physical: false,
        };
        self.retrying("compact", |t| {
            let mut kv = self.kv.clone();
            async move { kv.compact(authed(req, t.as_ref())).await }
        })
        .await?;
        Ok(())
    }

    /// The status of the member answering, with the cluster's NOSPACE alarm.
    ///
    /// # Errors
    /// An [`EtcdError`].
    pub async fn status(&self) -> Result<MemberStatus, EtcdError> {
        let s = self
            .retrying("status", |t| {
                let mut m = self.maintenance.clone();
                async move { m.status(authed(rpc::StatusRequest {}, t.as_ref())).await }
            })
            .await?
            .into_inner();
        let alarms = self
            .retrying("alarm list", |t| {
                let mut m = self.maintenance.clone();
                async move {
                    m.alarm(authed(rpc::AlarmRequest::default(), t.as_ref()))
                        .await
                }
            })
            .await?
            .into_inner();
        Ok(MemberStatus {
            db_size: s.db_size,
            db_size_in_use: s.db_size_in_use,
            quota: s.db_size_quota,
            revision: s.header.as_ref().map_or(0, |h| h.revision),
            member_id: s.header.as_ref().map_or(0, |h| h.member_id),
            leader: s.leader,
            nospace: alarms
                .alarms
                .iter()
                .any(|a| a.alarm == rpc::AlarmType::Nospace as i32),
        })
    }

    /// The revision up to which the history is compacted (0: none), read by watching `key`
    /// from revision 1: etcd answers such a watch with its compacted revision. Waits at most
    /// `wait` for that answer; no answer means no compaction.
    ///
    /// # Errors
    /// An [`EtcdError`] when the watch cannot be created.
    pub async fn compacted_revision(&self, key: Vec<u8>, wait: Duration) -> Result<i64, EtcdError> {
        let mut stream = self.watch(key, Vec::new(), 1).await?;
        let found = tokio::time::timeout(wait, async {
            loop {
                match stream.message().await {
                    Ok(Some(m)) if m.compact_revision > 0 => return Ok(m.compact_revision),
                    // History from revision 1 is there: nothing is compacted.
                    Ok(Some(m)) if !m.events.is_empty() || m.canceled => return Ok(0),
                    Ok(Some(_)) => {}
                    Ok(None) => return Ok(0),
                    Err(s) => return Err(EtcdError::from_status("watch", &s)),
                }
            }
        })
        .await;
        found.unwrap_or(Ok(0))
    }
}

impl Etcd {
    /// Defragments the member answering (connect to one endpoint to choose it): it rewrites
    /// its database file without free pages, so the file shrinks to what is in use. The
    /// member answers nothing else meanwhile.
    ///
    /// # Errors
    /// An [`EtcdError`].
    pub async fn defragment(&self) -> Result<(), EtcdError> {
        self.retrying("defragment", |t| {
            let mut m = self.maintenance.clone();
            async move {
                m.defragment(authed(rpc::DefragmentRequest {}, t.as_ref()))
                    .await
            }
        })
        .await?;
        Ok(())
    }

    /// Asks the member answering, which must be the leader, to hand its leadership to
    /// `target`.
    ///
    /// # Errors
    /// An [`EtcdError`].
    pub async fn move_leader(&self, target: u64) -> Result<(), EtcdError> {
        self.retrying("move leader", |t| {
            let mut m = self.maintenance.clone();
            async move {
                m.move_leader(authed(
                    rpc::MoveLeaderRequest { target_id: target },
                    t.as_ref(),
                ))
                .await
            }
        })
        .await?;
        Ok(())
    }
}

/// Whether an error is etcd's "database space exceeded": its NOSPACE alarm is raised and it
/// refuses every write until an operator compacts, defragments and disarms it.
pub fn is_nospace(e: &EtcdError) -> bool {
    e.message.contains("database space exceeded")
}

/// The end of the range of keys that start with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A transaction being built.
#[derive(Debug, Default, Clone)]
pub struct Txn {
    compare: Vec<rpc::Compare>,
    success: Vec<rpc::RequestOp>,
    failure: Vec<rpc::RequestOp>,
}

/// The outcome of a transaction.
#[derive(Debug, Clone)]
pub struct TxnResult {
    /// Whether the compares held (the success branch ran).
    pub succeeded: bool,
    /// The store's revision after the transaction.
    pub revision: i64,
    /// The responses of the branch that ran.
    pub responses: Vec<rpc::ResponseOp>,
}

fn cmp(key: Vec<u8>, target: CompareTarget, result: CompareResult, u: TargetUnion) -> rpc::Compare {
    rpc::Compare {
        result: result.into(),
        target: target.into(),
        key,
        range_end: Vec::new(),
        target_union: Some(u),
    }
}

impl Txn {
    /// An empty transaction.
    pub fn new() -> Txn {
        Txn::default()
    }

    /// The number of compares and operations, which etcd bounds (`--max-txn-ops`, 128 by
    /// default).
    pub fn size(&self) -> usize {
        self.compare.len() + self.success.len().max(self.failure.len())
    }

    /// Requires `key`'s mod revision to be `rev` (0: the key must not exist).
    pub fn if_mod_revision(mut self, key: Vec<u8>, rev: i64) -> Txn {
        self.compare.push(if rev == 0 {
            cmp(
                key,
                CompareTarget::Create,
                CompareResult::Equal,
                TargetUnion::CreateRevision(0),
            )
        } else {
            cmp(
                key,
                CompareTarget::Mod,
                CompareResult::Equal,
                TargetUnion::ModRevision(rev),
            )
        });
        self
    }

    /// Requires every key in `[key, range_end)` to have been created at or before revision
    /// `rev` (true of an empty range).
    pub fn if_none_created_after(mut self, key: Vec<u8>, range_end: Vec<u8>, rev: i64) -> Txn {
        let mut c = cmp(
            key,
            CompareTarget::Create,
            CompareResult::Less,
            TargetUnion::CreateRevision(rev + 1),
        );
        c.range_end = range_end;
        self.compare.push(c);
        self
    }

    /// Requires `key`'s create revision to be `rev` (0: absent).
    pub fn if_create_revision(mut self, key: Vec<u8>, rev: i64) -> Txn {
        self.compare.push(cmp(
            key,
            CompareTarget::Create,
            CompareResult::Equal,
            TargetUnion::CreateRevision(rev),
        ));
        self
    }

    /// Requires `key` to be attached to lease `lease`.
    pub fn if_lease(mut self, key: Vec<u8>, lease: i64) -> Txn {
        self.compare.push(cmp(
            key,
            CompareTarget::Lease,
            CompareResult::Equal,
            TargetUnion::Lease(lease),
        ));
        self
    }

    /// Requires `key` not to be attached to lease `lease` (a missing key is on no lease).
    pub fn if_lease_not(mut self, key: Vec<u8>, lease: i64) -> Txn {
        self.compare.push(cmp(
            key,
            CompareTarget::Lease,
            CompareResult::NotEqual,
            TargetUnion::Lease(lease),
        ));
        self
    }

    /// Puts `key = value`, attached to `lease` (0: none), when the compares hold.
    pub fn put(mut self, key: Vec<u8>, value: Vec<u8>, lease: i64) -> Txn {
        self.success.push(rpc::RequestOp {
            request: Some(Request::RequestPut(rpc::PutRequest {
                key,
                value,
                lease,
                ..Default::default()
            })),
        });
        self
    }

    /// Deletes `key` when the compares hold.
    pub fn delete(mut self, key: Vec<u8>) -> Txn {
        self.success.push(rpc::RequestOp {
            request: Some(Request::RequestDeleteRange(rpc::DeleteRangeRequest {
                key,
                ..Default::default()
            })),
        });
        self
    }

    /// Deletes every key in `[key, range_end)` when the compares hold.
    pub fn delete_range(mut self, key: Vec<u8>, range_end: Vec<u8>) -> Txn {
        self.success.push(rpc::RequestOp {
            request: Some(Request::RequestDeleteRange(rpc::DeleteRangeRequest {
                key,
                range_end,
                ..Default::default()
            })),
        });
        self
    }

    /// Reads `[key, range_end)` in the branch that runs (both, so a failed transaction still
    /// answers what it found).
    pub fn get(self, key: Vec<u8>, range_end: Vec<u8>) -> Txn {
        self.get_at(key, range_end, 0)
    }

    /// Reads `[key, range_end)` as it was at `revision` (0: the latest), in the branch that
    /// runs.
    pub fn get_at(mut self, key: Vec<u8>, range_end: Vec<u8>, revision: i64) -> Txn {
        let op = rpc::RequestOp {
            request: Some(Request::RequestRange(rpc::RangeRequest {
                key,
                range_end,
                revision,
                ..Default::default()
            })),
        };
        self.success.push(op.clone());
        self.failure.push(op);
        self
    }
}

/// The key-values of the `i`th response of a transaction, when it was a range.
pub fn range_of(r: &TxnResult, i: usize) -> &[KeyValue] {
    use super::pb::etcdserverpb::response_op::Response;
    match r.responses.get(i).and_then(|op| op.response.as_ref()) {
        Some(Response::ResponseRange(rr)) => &rr.kvs,
        _ => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_cover_exactly_the_prefix() {
        assert_eq!(prefix_end(b"a/"), b"a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
