//! The conformance suite against the etcd store on a real etcd that serves clients over TLS
//! only, checks their certificates (`--client-cert-auth`), and has authentication enabled:
//! the store connects as a user whose role may read and write only under leasehold's prefix.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use leasehold_core::HostId;
use leasehold_store::conformance::Harness;
use leasehold_store::{EtcdOptions, EtcdSecurity, EtcdStore, EtcdUser};
use leasehold_testkit::{Etcd, TestCerts};

/// The prefix the user's role covers; each case uses a prefix under it.
const PREFIX: &str = "/conformance-tls-";

/// One etcd (and its certificates) for the whole test binary.
static ETCD: OnceLock<(TestCerts, Etcd)> = OnceLock::new();
static N: AtomicU64 = AtomicU64::new(0);

fn etcd() -> &'static (TestCerts, Etcd) {
    ETCD.get_or_init(|| {
        let certs = TestCerts::generate("leasehold");
        let etcd = Etcd::start_tls(&certs, &[]);
        etcd.enable_auth("root-pw", "leasehold", "lh-pw", PREFIX);
        (certs, etcd)
    })
}

struct OnTlsEtcd {
    endpoints: Vec<String>,
    security: EtcdSecurity,
    prefix: String,
    dir: tempfile::TempDir,
}

impl OnTlsEtcd {
    fn new() -> OnTlsEtcd {
        let (certs, etcd) = etcd();
        OnTlsEtcd {
            endpoints: vec![etcd.endpoint()],
            security: EtcdSecurity {
                cacert: Some(certs.ca()),
                cert: Some(certs.client_cert()),
                key: Some(certs.client_key()),
                user: Some(EtcdUser {
                    name: "leasehold".into(),
                    password: "lh-pw".into(),
                }),
            },
            prefix: format!(
                "{PREFIX}{}-{}/",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ),
            dir: tempfile::tempdir().unwrap(),
        }
    }
}

impl Harness for OnTlsEtcd {
    type S = EtcdStore;

    async fn open(&self, host: &HostId) -> EtcdStore {
        let mut o = EtcdOptions::new(self.endpoints.clone());
        o.prefix = self.prefix.clone();
        o.session_file = Some(self.dir.path().join(format!("{host}.session")));
        o.security = self.security.clone();
        EtcdStore::open(host.clone(), o)
            .await
            .expect("open etcd store over TLS as a user limited to the prefix")
    }
}

leasehold_store::conformance_suite!(OnTlsEtcd::new(), multi_host);
