//! A small etcd v3 client over the generated gRPC stubs: what the etcd store needs and no
//! more (ranges, transactions, leases with keep-alive, watches), over plaintext or TLS (with a
//! client certificate), as an etcd user when etcd's authentication is enabled.

mod error;
mod lease;
mod maintenance;
mod multiwatch;
mod security;
mod txn;

use std::sync::Arc;
use std::time::Duration;

use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Channel, Endpoint};

use super::pb::etcdserverpb as rpc;
use super::pb::mvccpb::KeyValue;
pub use error::{EtcdCode, EtcdError, EtcdErrorKind, Setting};
use error::{never_sent, stale_token};
pub(crate) use error::{tls_error, transport_setting};
pub use lease::LeaseId;
pub use maintenance::MemberStatus;
pub use multiwatch::{WatchSender, WatchSpec};
use security::tls_config;
pub use security::{EtcdSecurity, EtcdUser, check_endpoints};
pub use txn::{Txn, TxnResult, batch_results, prefix_end, range_of};

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
    /// Key-value requests (ranges and transactions) made through this client and its clones.
    kv_requests: Arc<std::sync::atomic::AtomicU64>,
    /// Those the store's view makes to bring keys in (see [`Etcd::upkeep`]), counted apart.
    upkeep_requests: Arc<std::sync::atomic::AtomicU64>,
    /// Commits per written revision, as [`Etcd::note_batch`] was told (an `f64`'s bits).
    commits_per_revision: Arc<std::sync::atomic::AtomicU64>,
    /// Bytes of keys and values the transactions of this client and its clones wrote per
    /// revision of late (an `f64`'s bits; see [`Etcd::bytes_per_revision`]).
    bytes_per_revision: Arc<std::sync::atomic::AtomicU64>,
    /// Told when a transaction of this client or its clones reaches a revision (see
    /// [`Etcd::wake_at_revision`]).
    revision_alarm: Arc<RevisionAlarm>,
}

/// A revision to be told of, and who waits for it.
#[derive(Debug)]
struct RevisionAlarm {
    /// The revision; `i64::MAX`: none.
    at: std::sync::atomic::AtomicI64,
    reached: tokio::sync::Notify,
}

impl Default for RevisionAlarm {
    fn default() -> RevisionAlarm {
        RevisionAlarm {
            at: std::sync::atomic::AtomicI64::new(i64::MAX),
            reached: tokio::sync::Notify::new(),
        }
    }
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

/// Bytes of keys and values that `ops` put (of a transaction within, its larger branch).
fn written_bytes(ops: &[rpc::RequestOp]) -> usize {
    use rpc::request_op::Request;
    ops.iter()
        .map(|op| match &op.request {
            Some(Request::RequestPut(p)) => p.key.len() + p.value.len(),
            Some(Request::RequestTxn(t)) => {
                written_bytes(&t.success).max(written_bytes(&t.failure))
            }
            _ => 0,
        })
        .sum()
}

/// `msg` as a request carrying `token`, etcd's authentication token.
fn authed<T>(msg: T, token: Option<&AsciiMetadataValue>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Some(t) = token {
        r.metadata_mut().insert("token", t.clone());
    }
    r
}

/// How often an unanswered keep-alive is sent again.
pub const KEEPALIVE_RESEND: Duration = Duration::from_millis(250);

/// One keep-alive request on its own stream; the first answer's TTL.
async fn keep_alive_attempt(etcd: Etcd, lease: LeaseId) -> Result<i64, EtcdError> {
    let mut reauthed = false;
    loop {
        let token = etcd.token().await?;
        // Each attempt has its own request stream; its sender lives until the answer.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let _ = tx.send(rpc::LeaseKeepAliveRequest { id: lease.0 }).await;
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
        return r.map(|r| r.ttl).ok_or(EtcdError::no_answer(
            "keep-alive",
            "the stream closed without an answer",
        ));
    }
}

/// The largest answer accepted: a range over every record of a big cluster is large.
pub const MAX_MESSAGE: usize = 1 << 30;

/// The request timeout for ordinary calls.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

impl Etcd {
    /// How many key-value requests (ranges and transactions, each counted once however often
    /// it was sent again) this client and its clones have made: the round trips an operation
    /// costs etcd, for tests and measurements.
    pub fn kv_requests(&self) -> u64 {
        self.kv_requests.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// This client, its key-value requests counted as upkeep ([`Etcd::upkeep_requests`]), not
    /// in [`Etcd::kv_requests`]: the reads that bring a resource's keys into the store's view
    /// once its watchers exist, which no one operation costs.
    pub fn upkeep(&self) -> Etcd {
        let mut e = self.clone();
        e.kv_requests = Arc::clone(&self.upkeep_requests);
        e
    }

    /// How many key-value requests were made through [`Etcd::upkeep`].
    pub fn upkeep_requests(&self) -> u64 {
        self.upkeep_requests
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Notes that one transaction wrote `commits` of the store's commits at one revision.
    pub fn note_batch(&self, commits: usize) {
        use std::sync::atomic::Ordering;
        let n = commits.max(1) as f64;
        let _ =
            self.commits_per_revision
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                    let now = f64::from_bits(bits);
                    // Up at once, down slowly: what the history still holds is sized by the
                    // biggest batches of the last while.
                    Some((if n >= now { n } else { now * 0.99 + n * 0.01 }).to_bits())
                });
    }

    /// Commits per revision this client has written of late (1 when each commit is a
    /// revision of its own): what a revision of history costs, in commits, for the history
    /// keeper's bound.
    pub fn commits_per_revision(&self) -> f64 {
        f64::from_bits(
            self.commits_per_revision
                .load(std::sync::atomic::Ordering::Relaxed),
        )
        .max(1.0)
    }

    /// Bytes of keys and values that the transactions of this client and its clones wrote
    /// at one revision of late (0 until one wrote): up at once, down slowly, like
    /// [`Etcd::commits_per_revision`]. What a revision of history holds beyond etcd's own
    /// overhead, for the history keeper's bound when records are large.
    pub fn bytes_per_revision(&self) -> f64 {
        f64::from_bits(
            self.bytes_per_revision
                .load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    /// Notes that one transaction wrote `bytes` of keys and values at one revision.
    fn note_written(&self, bytes: usize) {
        use std::sync::atomic::Ordering;
        if bytes == 0 {
            return;
        }
        let n = bytes as f64;
        let _ =
            self.bytes_per_revision
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                    let now = f64::from_bits(bits);
                    Some((if n >= now { n } else { now * 0.99 + n * 0.01 }).to_bits())
                });
    }

    /// Asks to be told (by [`Etcd::revision_reached`]) once a transaction made through this
    /// client or a clone of it answers with `revision` or later: the history keeper's cue
    /// that its own host's commits have written enough history to look again, however
    /// fast they come. Replaces the revision asked for before.
    pub fn wake_at_revision(&self, revision: i64) {
        self.revision_alarm
            .at
            .store(revision, std::sync::atomic::Ordering::Relaxed);
    }

    /// Waits until a transaction reaches the revision [`Etcd::wake_at_revision`] asked for
    /// (at once if one did since the last wait ended).
    ///
    /// # Cancel safety
    /// Cancel safe: a revision reached while nobody waits is kept for the next wait.
    pub async fn revision_reached(&self) {
        self.revision_alarm.reached.notified().await;
    }

    fn count_kv_request(&self) {
        self.kv_requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

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
                    EtcdError::given(
                        "connect",
                        format!("endpoint {e:?} is not a URL ({err}): write http://HOST:PORT"),
                    )
                    .with_source(err)
                })?;
                let ep = match &tls {
                    Some(t) => ep.tls_config(t.clone()).map_err(|err| {
                        EtcdError::given(
                            "connect",
                            format!("TLS for endpoint {e:?}: {}", chain(&err)),
                        )
                        .with_source(err)
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
            kv_requests: Arc::default(),
            upkeep_requests: Arc::default(),
            commits_per_revision: Arc::new(std::sync::atomic::AtomicU64::new(1f64.to_bits())),
            bytes_per_revision: Arc::default(),
            revision_alarm: Arc::default(),
        })
    }

    /// After a first contact failed for want of a connection: whether an endpoint refuses
    /// this client's settings (a certificate, TLS on one side only), which a gRPC error often
    /// hides behind "connection closed". `None` when no endpoint tells (etcd may be down).
    pub async fn diagnose(&self) -> Option<EtcdError> {
        let (endpoints, sec) = &*self.endpoints;
        for e in endpoints {
            if let Some(why) = super::probe::diagnose(e, sec, self.timeout).await {
                return Some(why);
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
                    return Err(EtcdError::from_status("authenticate", &s)
                        .context(format_args!("as etcd user {:?}", user.0.name)));
                }
            }
        };
        let t = AsciiMetadataValue::try_from(answer.token).map_err(|e| {
            EtcdError::new(
                "authenticate",
                EtcdErrorKind::BadAnswer,
                "etcd answered a token that is not text",
            )
            .with_source(e)
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
        let r = self
            .range_with(rpc::RangeRequest {
                key,
                range_end,
                revision,
                ..Default::default()
            })
            .await?;
        Ok((r.kvs, r.header.map_or(0, |h| h.revision)))
    }

    /// Reads at most `limit` keys of `[key, range_end)`, in key order, leaving out keys
    /// changed after `max_mod_revision` (0: none left out). Returns the keys and whether more
    /// are in the range after the last one returned. For walking a large range a page at a
    /// time: etcd holds one answer in memory whole, and builds it in one read.
    ///
    /// # Errors
    /// An [`EtcdError`].
    pub async fn range_page(
        &self,
        key: Vec<u8>,
        range_end: Vec<u8>,
        limit: i64,
        max_mod_revision: i64,
    ) -> Result<(Vec<KeyValue>, bool), EtcdError> {
        let r = self
            .range_with(rpc::RangeRequest {
                key,
                range_end,
                limit,
                max_mod_revision,
                ..Default::default()
            })
            .await?;
        Ok((r.kvs, r.more))
    }

    /// One range request, counted and retried.
    async fn range_with(&self, req: rpc::RangeRequest) -> Result<rpc::RangeResponse, EtcdError> {
        self.count_kv_request();
        Ok(self
            .retrying("range", |t| {
                let mut kv = self.kv.clone();
                let req = req.clone();
                async move { kv.range(authed(req, t.as_ref())).await }
            })
            .await?
            .into_inner())
    }

    /// Runs a transaction. Returns whether the compares held, the responses, and the
    /// revision after it.
    ///
    /// # Errors
    /// An [`EtcdError`].
    pub async fn txn(&self, t: Txn) -> Result<TxnResult, EtcdError> {
        self.count_kv_request();
        let req = rpc::TxnRequest {
            compare: t.compare,
            success: t.success,
            failure: t.failure,
        };
        let written = (written_bytes(&req.success), written_bytes(&req.failure));
        let r = self
            .retrying("txn", |t| {
                let mut kv = self.kv.clone();
                let req = req.clone();
                async move { kv.txn(authed(req, t.as_ref())).await }
            })
            .await?
            .into_inner();
        let revision = r.header.map_or(0, |h| h.revision);
        self.note_written(if r.succeeded { written.0 } else { written.1 });
        if revision
            >= self
                .revision_alarm
                .at
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            self.revision_alarm.reached.notify_one();
        }
        Ok(TxnResult {
            succeeded: r.succeeded,
            revision,
            responses: r.responses,
        })
    }

    /// Grants a lease of `ttl`; returns its id and the TTL etcd granted.
    ///
    /// # Errors
    /// An [`EtcdError`].
    pub async fn lease_grant(&self, ttl: Duration) -> Result<(LeaseId, i64), EtcdError> {
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
            return Err(EtcdError::new(
                "lease grant",
                EtcdErrorKind::BadAnswer,
                r.error,
            ));
        }
        Ok((LeaseId(r.id), r.ttl))
    }

    /// The whole seconds left of `lease` and the TTL it was granted; `None` when it has
    /// expired or never was.
    ///
    /// # Errors
    /// An [`EtcdError`].
    pub async fn lease_ttl(&self, lease: LeaseId) -> Result<Option<(i64, i64)>, EtcdError> {
        let req = rpc::LeaseTimeToLiveRequest {
            id: lease.0,
            keys: false,
        };
        let r = self
            .retrying("lease ttl", |t| {
                let mut lease = self.lease.clone();
                async move { lease.lease_time_to_live(authed(req, t.as_ref())).await }
            })
            .await?
            .into_inner();
        Ok((r.ttl > 0).then_some((r.ttl, r.granted_ttl)))
    }

    /// Revokes `lease`, deleting its keys.
    ///
    /// # Errors
    /// An [`EtcdError`].
    pub async fn lease_revoke(&self, lease: LeaseId) -> Result<(), EtcdError> {
        let id = lease.0;
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

    /// Renews `lease` once, over a keep-alive stream; returns the TTL etcd answered (0: the
    /// lease has expired). While no answer comes, the request is sent again every
    /// [`KEEPALIVE_RESEND`] on a new stream (which the balanced channel may route to another
    /// member: a request stuck with a member that lost its leadership does not hold the
    /// renewal up); the first answer wins. Bounded by the client's timeout.
    ///
    /// # Errors
    /// An [`EtcdError`], transient when etcd could not be reached in time.
    pub async fn keep_alive_once(&self, lease: LeaseId) -> Result<i64, EtcdError> {
        let deadline = tokio::time::sleep(self.timeout);
        tokio::pin!(deadline);
        let mut attempts = tokio::task::JoinSet::new();
        let mut resend = tokio::time::interval(KEEPALIVE_RESEND);
        let mut last_err = None;
        loop {
            tokio::select! {
                () = &mut deadline => {
                    let e = EtcdError::no_answer(
                        "keep-alive",
                        format!("no answer in {:?}", self.timeout),
                    );
                    return Err(match last_err {
                        Some(last) => e.context("the last attempt failed").with_source(last),
                        None => e,
                    });
                }
                _ = resend.tick() => {
                    attempts.spawn(keep_alive_attempt(self.clone(), lease));
                }
                Some(done) = attempts.join_next() => match done {
                    Ok(Ok(ttl)) => return Ok(ttl),
                    Ok(Err(e)) if !e.transient() => return Err(e),
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
                    let denied =
                        EtcdCode::of_cancel_reason(&why) == Some(EtcdCode::PermissionDenied);
                    if denied && self.user.is_some() && !reauthed {
                        // The token may have expired: once more with a fresh one.
                        reauthed = true;
                        self.forget_token(token.as_ref()).await;
                        continue;
                    }
                    return Err(if denied {
                        EtcdError::new(
                            "watch",
                            EtcdErrorKind::Settings(Setting::Rights),
                            format!("{why}: the etcd user may not read the range watched"),
                        )
                    } else {
                        EtcdError::no_answer("watch", format!("cancelled: {why}"))
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
                    return Err(EtcdError::no_answer(
                        "watch",
                        "the stream closed before the watch was created",
                    ));
                }
                Ok(Err(s)) => return Err(EtcdError::from_status("watch", &s)),
                Err(_) => {
                    return Err(EtcdError::no_answer(
                        "watch",
                        format!("not created in {:?}", self.timeout),
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
