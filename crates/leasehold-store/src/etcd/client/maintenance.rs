//! Maintenance calls: status and alarms, compaction, defragmentation, leadership.

use std::time::Duration;

use super::{Etcd, EtcdCode, EtcdError, authed};
use crate::etcd::pb::etcdserverpb as rpc;

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

    /// The revision up to which the history is compacted (0: none).
    ///
    /// A read of `key` at revision 1 says whether anything is compacted: it is refused as
    /// "compacted" then, and costs etcd an index lookup either way. Only then is the number
    /// read, by watching `key` from revision 1: etcd cancels such a watch at once, with its
    /// compacted revision. Never a watch from revision 1 over an uncompacted history: etcd
    /// would catch it up by reading the whole history from its database, under the lock its
    /// writes take (measured on one member with 60,000 revisions of 1.5 KB: a put's latency
    /// rose from 12 ms to 576 ms at most while 50 such watches caught up; every agent asks
    /// once a round, at once). Waits at most `wait` for the watch's answer; no answer means
    /// no compaction.
    ///
    /// # Errors
    /// An [`EtcdError`] when the read fails otherwise, or the watch cannot be created.
    pub async fn compacted_revision(&self, key: Vec<u8>, wait: Duration) -> Result<i64, EtcdError> {
        match self.range(key.clone(), Vec::new(), 1).await {
            Ok(_) => return Ok(0),
            Err(e) if e.code() == Some(EtcdCode::Compacted) => {}
            Err(e) => return Err(e),
        }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::io::{Read, Write};

    use super::*;

    /// How many watch streams `endpoint`'s member has opened, from its `/metrics`.
    fn watch_streams_opened(endpoint: &str) -> u64 {
        let addr = endpoint.trim_start_matches("http://");
        let mut c = std::net::TcpStream::connect(addr).unwrap();
        write!(
            c,
            "GET /metrics HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        c.read_to_string(&mut text).unwrap();
        text.lines()
            .find(|l| {
                l.starts_with("grpc_server_started_total{") && l.contains("grpc_method=\"Watch\"")
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse::<f64>().ok())
            .map_or(0, |n| n as u64)
    }

    /// The history keeper's cue: a transaction of a clone that reaches the revision asked
    /// for wakes the waiter, kept if nobody waits yet; one below it does not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_transaction_reaching_the_revision_asked_for_wakes_its_waiter() {
        // Whether a wait ends at its first poll.
        fn at_once(f: impl std::future::Future<Output = ()>) -> bool {
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            std::pin::pin!(f).poll(&mut cx).is_ready()
        }
        let etcd = leasehold_testkit::Etcd::start();
        let client = Etcd::connect(&[etcd.endpoint()], Duration::from_secs(5)).unwrap();
        let other = client.clone();
        let key = format!("/alarm-{}/k", std::process::id()).into_bytes();
        let put = || super::super::Txn::new().put(key.clone(), b"v".to_vec(), None);
        let first = other.txn(put()).await.unwrap().revision;
        client.wake_at_revision(first + 2);
        // One revision short: nobody is told.
        other.txn(put()).await.unwrap();
        assert!(!at_once(client.revision_reached()));
        // Reached while nobody waits: the next wait ends at once.
        assert!(other.txn(put()).await.unwrap().revision >= first + 2);
        tokio::time::timeout(Duration::from_secs(30), client.revision_reached())
            .await
            .expect("the revision reached was not told");
        // Not again until asked.
        client.wake_at_revision(i64::MAX);
        other.txn(put()).await.unwrap();
        assert!(!at_once(client.revision_reached()));
    }

    /// Regression (the 50-agent fill stall): asking for the compacted revision of an
    /// uncompacted history opened a watch from revision 1, which etcd catches up by reading
    /// the whole history under its write lock; every agent asked once a round. Now a read at
    /// revision 1 answers "nothing compacted" without a watch, and a watch is opened only
    /// to learn the number once something is compacted (etcd cancels it at once).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_compacted_revision_is_read_without_a_watch_over_the_history() {
        let etcd = leasehold_testkit::Etcd::start();
        let client = Etcd::connect(&[etcd.endpoint()], Duration::from_secs(5)).unwrap();
        let key = format!("/compacted-{}/k", std::process::id()).into_bytes();
        let mut revision = 0;
        for i in 0..20 {
            let t = super::super::Txn::new().put(key.clone(), vec![b'v'; i + 1], None);
            revision = client.txn(t).await.unwrap().revision;
        }
        let before = watch_streams_opened(&etcd.endpoint());
        assert_eq!(
            client
                .compacted_revision(key.clone(), Duration::from_secs(5))
                .await
                .unwrap(),
            0
        );
        assert_eq!(
            watch_streams_opened(&etcd.endpoint()),
            before,
            "a watch was opened to learn that nothing is compacted"
        );
        client.compact(revision - 5).await.unwrap();
        assert_eq!(
            client
                .compacted_revision(key.clone(), Duration::from_secs(5))
                .await
                .unwrap(),
            revision - 5
        );
        assert!(
            watch_streams_opened(&etcd.endpoint()) > before,
            "the metric this test reads did not count the watch that learns the number"
        );
    }
}
