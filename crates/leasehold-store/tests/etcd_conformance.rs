//! The conformance suite against the etcd store, on a real etcd started by the test.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use leasehold_core::HostId;
use leasehold_store::conformance::Harness;
use leasehold_store::{EtcdOptions, EtcdStore};
use leasehold_testkit::Etcd;

/// One etcd for the whole test binary; each case uses its own key prefix. The testkit kills
/// it when this process ends, however it ends.
static ETCD: OnceLock<Etcd> = OnceLock::new();
static N: AtomicU64 = AtomicU64::new(0);

struct OnEtcd {
    endpoints: Vec<String>,
    prefix: String,
    dir: tempfile::TempDir,
}

impl OnEtcd {
    fn new() -> OnEtcd {
        let etcd = ETCD.get_or_init(Etcd::start);
        OnEtcd {
            endpoints: vec![etcd.endpoint()],
            prefix: format!(
                "/conformance-{}-{}/",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ),
            dir: tempfile::tempdir().unwrap(),
        }
    }
}

impl Harness for OnEtcd {
    type S = EtcdStore;

    async fn open(&self, host: &HostId) -> EtcdStore {
        let mut o = EtcdOptions::new(self.endpoints.clone());
        o.prefix = self.prefix.clone();
        o.session_file = Some(self.dir.path().join(format!("{host}.session")));
        EtcdStore::open(host.clone(), o)
            .await
            .expect("open etcd store")
    }
}

leasehold_store::conformance_suite!(OnEtcd::new(), multi_host);
