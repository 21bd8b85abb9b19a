//! Maintenance calls: status and alarms, compaction, defragmentation, leadership.

use std::time::Duration;

use super::{Etcd, EtcdError, authed};
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
