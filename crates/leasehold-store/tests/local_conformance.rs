//! The conformance suite against the embedded local store, restarted by dropping and
//! reopening it on the same state directory.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use leasehold_core::HostId;
use leasehold_store::LocalStore;
use leasehold_store::conformance::Harness;

struct Local {
    dir: tempfile::TempDir,
}

impl Local {
    fn new() -> Local {
        Local {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }
}

impl Harness for Local {
    type S = LocalStore;

    async fn open(&self, host: &HostId) -> LocalStore {
        LocalStore::open(self.dir.path(), host.clone()).expect("open local store")
    }
}

leasehold_store::conformance_suite!(Local::new());
