//! Raw etcd operations that leasehold's figures are measured against (SPEC §7): what a client
//! doing the same work on etcd directly pays. For `leasehold bench`, which then needs no etcd
//! types of its own; every key is under the prefix given.

use std::time::{Duration, Instant};

use super::client::{Etcd, EtcdError, EtcdErrorKind, LeaseId, Txn, prefix_end};

/// How long one raw call may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// A plain etcd client for reference measurements.
#[derive(Debug, Clone)]
pub struct RawEtcd {
    etcd: Etcd,
    prefix: String,
}

impl RawEtcd {
    /// Connects lazily to `endpoints` (`http://`); its keys are under `prefix`.
    ///
    /// # Errors
    /// An [`EtcdError`] for a malformed endpoint.
    pub fn connect(endpoints: &[String], prefix: &str) -> Result<RawEtcd, EtcdError> {
        Ok(RawEtcd {
            etcd: Etcd::connect(endpoints, TIMEOUT)?,
            prefix: prefix.to_owned(),
        })
    }

    fn key(&self, name: &str) -> Vec<u8> {
        format!("{}{name}", self.prefix).into_bytes()
    }

    /// One create-if-absent transaction (what taking a free lease costs etcd at the least) on
    /// a key of its own; returns how long it took. The key is deleted after, untimed.
    ///
    /// # Errors
    /// An [`EtcdError`]; one that says so when the key was there already.
    pub async fn create_if_absent(&self) -> Result<Duration, EtcdError> {
        let key = self.key("k");
        let started = Instant::now();
        let done = self
            .etcd
            .txn(Txn::new().if_create_revision(key.clone(), 0).put(
                key.clone(),
                b"x".to_vec(),
                None,
            ))
            .await?;
        let took = started.elapsed();
        if !done.succeeded {
            return Err(EtcdError::new(
                "txn",
                EtcdErrorKind::BadAnswer,
                format!(
                    "the reference's key {} was there already: is another bench using the \
                     prefix?",
                    String::from_utf8_lossy(&key)
                ),
            ));
        }
        self.etcd.txn(Txn::new().delete(key)).await?;
        Ok(took)
    }

    /// A reference of the shape of a grant (see [`GrantShaped`]): its host key is put, on a
    /// lease of its own, first.
    ///
    /// # Errors
    /// An [`EtcdError`].
    pub async fn grant_shaped(&self) -> Result<GrantShaped, EtcdError> {
        let (lease, _) = self.etcd.lease_grant(Duration::from_secs(60)).await?;
        let host = self.key("hosts/h");
        let r = self
            .etcd
            .txn(Txn::new().put(host, b"h".to_vec(), Some(lease)))
            .await?;
        Ok(GrantShaped {
            raw: self.clone(),
            lease,
            record_rev: 0,
            revision: r.revision,
        })
    }

    /// Put-then-delete cycles (what an acquire and a release write at the least) by
    /// `clients` concurrent tasks, each on a key of its own, for `length`. Returns the cycles
    /// done and the time they took.
    ///
    /// # Errors
    /// The first [`EtcdError`] of any task.
    pub async fn put_delete_cycles(
        &self,
        clients: usize,
        length: Duration,
    ) -> Result<(u64, Duration), EtcdError> {
        let started = Instant::now();
        let deadline = started + length;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..clients {
            let etcd = self.etcd.clone();
            let key = self.key(&format!("t{i}"));
            tasks.spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    etcd.txn(Txn::new().put(key.clone(), b"x".to_vec(), None))
                        .await?;
                    etcd.txn(Txn::new().delete(key.clone())).await?;
                    n += 1;
                }
                Ok::<_, EtcdError>(n)
            });
        }
        let mut total = 0;
        while let Some(done) = tasks.join_next().await {
            total += done.map_err(|e| {
                EtcdError::new("txn", EtcdErrorKind::BadAnswer, "a task failed").with_source(e)
            })??;
        }
        Ok((total, started.elapsed()))
    }

    /// Deletes every key under the prefix.
    ///
    /// # Errors
    /// An [`EtcdError`].
    pub async fn clean(&self) -> Result<(), EtcdError> {
        let from = self.prefix.as_bytes().to_vec();
        let to = prefix_end(&from);
        self.etcd.txn(Txn::new().delete_range(from, to)).await?;
        Ok(())
    }
}

/// Transactions of the shape of the agent's grant of a free resource, on keys of their own:
/// what etcd does for our transaction beyond the create-if-absent one (3 compares: the host
/// key's lease, the record's mod revision, no grace key since; 2 puts: a record of
/// [`GRANT_RECORD_BYTES`] and a held key; the 4 reads of the failure branch, sent, not run),
/// with no watcher on its keys (the agent's view watches its own).
#[derive(Debug)]
pub struct GrantShaped {
    raw: RawEtcd,
    lease: LeaseId,
    /// The record's mod revision (0: none yet).
    record_rev: i64,
    /// The revision last seen.
    revision: i64,
}

/// The size of a record as the latency row's grant writes it (format 2).
pub const GRANT_RECORD_BYTES: usize = 300;

impl GrantShaped {
    /// One such transaction; returns how long it took. The held key is deleted after,
    /// untimed, as a release would (the record stays).
    ///
    /// # Errors
    /// An [`EtcdError`]; one that says so when a compare failed.
    pub async fn once(&mut self) -> Result<Duration, EtcdError> {
        let k = |n: &str| self.raw.key(n);
        let (record, held, grace) = (k("res/r"), k("res/r\0held"), k("grace/r"));
        let (hosts, waiters) = (k("hosts/"), k("wait/r/"));
        let t = Txn::new()
            .if_lease(k("hosts/h"), self.lease)
            .if_mod_revision(record.clone(), self.record_rev)
            .if_none_created_after(grace.clone(), Vec::new(), self.revision)
            .put(held.clone(), b"h".to_vec(), None)
            .put(record.clone(), vec![b'x'; GRANT_RECORD_BYTES], None)
            .or_get(hosts.clone(), prefix_end(&hosts))
            .or_get(record.clone(), k("res/r\u{1}"))
            .or_get(waiters.clone(), prefix_end(&waiters))
            .or_get(grace, Vec::new());
        let started = Instant::now();
        let done = self.raw.etcd.txn(t).await?;
        let took = started.elapsed();
        if !done.succeeded {
            return Err(EtcdError::new(
                "txn",
                EtcdErrorKind::BadAnswer,
                "the grant-shaped reference's compares failed: is another bench using the prefix?",
            ));
        }
        self.record_rev = done.revision;
        let r = self.raw.etcd.txn(Txn::new().delete(held)).await?;
        self.revision = r.revision;
        Ok(took)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a real etcd: each reference operation does its work and leaves no key behind.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_references_write_and_leave_nothing() {
        let etcd = leasehold_testkit::Etcd::start();
        let prefix = format!("/reference-{}/", std::process::id());
        let raw = RawEtcd::connect(&[etcd.endpoint()], &prefix).unwrap();
        for _ in 0..3 {
            assert!(raw.create_if_absent().await.unwrap() > Duration::ZERO);
        }
        let (cycles, took) = raw
            .put_delete_cycles(4, Duration::from_millis(300))
            .await
            .unwrap();
        assert!(cycles >= 4, "{cycles} cycles in {took:?}");
        assert!(took >= Duration::from_millis(300), "{took:?}");
        let client = Etcd::connect(&[etcd.endpoint()], TIMEOUT).unwrap();
        let from = prefix.as_bytes().to_vec();
        let (left, _) = client
            .range(from.clone(), prefix_end(&from), 0)
            .await
            .unwrap();
        assert!(left.is_empty(), "{left:?}");
        // A key already there is an error that says so.
        client
            .txn(Txn::new().put(raw.key("k"), b"y".to_vec(), None))
            .await
            .unwrap();
        let e = raw.create_if_absent().await.unwrap_err();
        assert!(e.to_string().contains("there already"), "{e}");
        // The grant-shaped transactions compare and write as a grant does, again and again.
        let mut g = raw.grant_shaped().await.unwrap();
        for _ in 0..3 {
            assert!(g.once().await.unwrap() > Duration::ZERO);
        }
        raw.clean().await.unwrap();
        let (left, _) = client
            .range(from.clone(), prefix_end(&from), 0)
            .await
            .unwrap();
        assert!(left.is_empty(), "{left:?}");
    }
}
