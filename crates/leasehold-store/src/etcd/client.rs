//! A small etcd v3 client over the generated gRPC stubs: what the etcd store needs and no
//! more (ranges, transactions, leases with keep-alive, watches).

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

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
}

impl EtcdError {
    fn from_status(op: &'static str, s: &tonic::Status) -> EtcdError {
        use tonic::Code;
        let transient = matches!(
            s.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
        ) || s.message().contains("leader");
        EtcdError {
            op,
            message: s.message().to_owned(),
            transient,
        }
    }
}

/// A connection to an etcd cluster.
#[derive(Debug, Clone)]
pub struct Etcd {
    kv: rpc::kv_client::KvClient<Channel>,
    lease: rpc::lease_client::LeaseClient<Channel>,
    watch: rpc::watch_client::WatchClient<Channel>,
    maintenance: rpc::maintenance_client::MaintenanceClient<Channel>,
    timeout: Duration,
}

/// Whether a failed call never reached etcd (its connection could not be made), so it is
/// safe to send again, to another member.
fn never_sent(s: &tonic::Status) -> bool {
    let m = s.message();
    s.code() == tonic::Code::Unavailable
        && (m.contains("connect")
            || m.contains("Connection refused")
            || m.contains("transport error"))
}

/// How often an unanswered keep-alive is sent again.
pub const KEEPALIVE_RESEND: Duration = Duration::from_millis(250);

/// One keep-alive request on its own stream; the first answer's TTL.
async fn keep_alive_attempt(
    mut lease: rpc::lease_client::LeaseClient<Channel>,
    id: i64,
) -> Result<i64, EtcdError> {
    loop {
        // Each attempt has its own request stream; its sender lives until the answer.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let _ = tx.send(rpc::LeaseKeepAliveRequest { id }).await;
        let opened = lease
            .lease_keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await;
        let mut stream = match opened {
            Ok(r) => r.into_inner(),
            Err(s) if never_sent(&s) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Err(s) => return Err(EtcdError::from_status("keep-alive", &s)),
        };
        let r = stream
            .message()
            .await
            .map_err(|s| EtcdError::from_status("keep-alive", &s))?;
        drop(tx);
        return r.map(|r| r.ttl).ok_or(EtcdError {
            op: "keep-alive",
            message: "the stream closed without an answer".into(),
            transient: true,
        });
    }
}

/// Runs `call` until it succeeds, fails for a reason other than an unreachable member, or
/// `timeout` passes: a balanced channel may try a member that is down before one that is up.
async fn retrying<T, F, Fut>(
    op: &'static str,
    timeout: Duration,
    mut call: F,
) -> Result<T, EtcdError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(s) if never_sent(&s) && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(s) => return Err(EtcdError::from_status(op, &s)),
        }
    }
}

/// The largest answer accepted: a range over every record of a big cluster is large.
pub const MAX_MESSAGE: usize = 1 << 30;

/// The request timeout for ordinary calls.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

impl Etcd {
    /// Connects lazily to `endpoints` (`http://host:port`), balancing over them; calls fail
    /// after `timeout`.
    ///
    /// # Errors
    /// An [`EtcdError`] for a malformed endpoint.
    pub fn connect(endpoints: &[String], timeout: Duration) -> Result<Etcd, EtcdError> {
        if endpoints.is_empty() {
            return Err(EtcdError {
                op: "connect",
                message: "no endpoints".into(),
                transient: false,
            });
        }
        let eps = endpoints
            .iter()
            .map(|e| {
                Endpoint::from_shared(e.clone())
                    .map(|ep| {
                        ep.connect_timeout(timeout)
                            .timeout(timeout)
                            .tcp_nodelay(true)
                            .http2_keep_alive_interval(Duration::from_secs(1))
                            .keep_alive_timeout(timeout)
                            .keep_alive_while_idle(true)
                    })
                    .map_err(|e| EtcdError {
                        op: "connect",
                        message: format!("bad endpoint {e:?}"),
                        transient: false,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let channel = Channel::balance_list(eps.into_iter());
        Ok(Etcd {
            kv: rpc::kv_client::KvClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE),
            lease: rpc::lease_client::LeaseClient::new(channel.clone()),
            watch: rpc::watch_client::WatchClient::new(channel.clone())
                .max_decoding_message_size(MAX_MESSAGE),
            maintenance: rpc::maintenance_client::MaintenanceClient::new(channel),
            timeout,
        })
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
        let r = retrying("range", self.timeout, || {
            let mut kv = self.kv.clone();
            let req = req.clone();
            async move { kv.range(req).await }
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
        let r = retrying("txn", self.timeout, || {
            let mut kv = self.kv.clone();
            let req = req.clone();
            async move { kv.txn(req).await }
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
        let r = retrying("lease grant", self.timeout, || {
            let mut lease = self.lease.clone();
            async move { lease.lease_grant(req).await }
        })
        .await?
        .into_inner();
        if !r.error.is_empty() {
            return Err(EtcdError {
                op: "lease grant",
                message: r.error,
                transient: false,
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
        let r = retrying("lease ttl", self.timeout, || {
            let mut lease = self.lease.clone();
            async move { lease.lease_time_to_live(req).await }
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
        retrying("lease revoke", self.timeout, || {
            let mut lease = self.lease.clone();
            async move { lease.lease_revoke(rpc::LeaseRevokeRequest { id }).await }
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
                    return Err(EtcdError {
                        op: "keep-alive",
                        message: match last_err {
                            Some(e) => format!("no answer in {:?} (last: {e})", self.timeout),
                            None => format!("no answer in {:?}", self.timeout),
                        },
                        transient: true,
                    });
                }
                _ = resend.tick() => {
                    attempts.spawn(keep_alive_attempt(self.lease.clone(), id));
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
    ) -> Result<tonic::Streaming<rpc::WatchResponse>, EtcdError> {
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
        // The request stream stays open while the watch lives: etcd ends a watch whose client
        // half-closes.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let _ = tx.send(create).await;
        let stream = self
            .watch
            .clone()
            .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|s| EtcdError::from_status("watch", &s))?
            .into_inner();
        // Keep the sender alive for the stream's lifetime.
        tokio::spawn(async move {
            tx.closed().await;
        });
        Ok(stream)
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
        retrying("compact", self.timeout, || {
            let mut kv = self.kv.clone();
            async move { kv.compact(req).await }
        })
        .await?;
        Ok(())
    }

    /// The status of the member answering, with the cluster's NOSPACE alarm.
    ///
    /// # Errors
    /// An [`EtcdError`].
    pub async fn status(&self) -> Result<MemberStatus, EtcdError> {
        let s = retrying("status", self.timeout, || {
            let mut m = self.maintenance.clone();
            async move { m.status(rpc::StatusRequest {}).await }
        })
        .await?
        .into_inner();
        let alarms = retrying("alarm list", self.timeout, || {
            let mut m = self.maintenance.clone();
            async move { m.alarm(rpc::AlarmRequest::default()).await }
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
        retrying("defragment", self.timeout, || {
            let mut m = self.maintenance.clone();
            async move { m.defragment(rpc::DefragmentRequest {}).await }
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
        retrying("move leader", self.timeout, || {
            let mut m = self.maintenance.clone();
            async move {
                m.move_leader(rpc::MoveLeaderRequest { target_id: target })
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
