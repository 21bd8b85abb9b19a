//! Test harness for leasehold: real etcd servers and network partitions.
//!
//! - [`Etcd`] is one real `etcd` member on free ports with a temporary data directory; it can be
//!   killed, frozen ([`Etcd::stop`]/[`Etcd::cont`]) and restarted on the same ports and data.
//! - [`EtcdCluster`] is several members on one IP, each an [`Etcd`], with [`EtcdCluster::leader`]
//!   and [`EtcdCluster::wait_writable`] for failover tests.
//! - [`TestCerts`] makes a CA with server and client certificates; [`Etcd::start_tls`] serves
//!   clients over TLS with them, and [`Etcd::enable_auth`] turns on etcd's users and roles.
//! - [`Netns`] is a network namespace joined to the root namespace by a veth pair, whose link
//!   can be cut and healed ([`Netns::cut`]/[`Netns::heal`]) to partition the processes inside it
//!   from an etcd listening on [`Netns::host_ip`].
//! - [`SpawnWithPid`] starts a process with a chosen pid (`clone3` with `set_tid`, root), for
//!   tests of a pid that is reused.
//!
//! Everything is plain blocking `std` code: call it from synchronous tests, or from async tests
//! inside `spawn_blocking` (or simply before the runtime starts work; each call blocks for at
//! most a few seconds).
//!
//! # Requirements
//!
//! `etcd` and `etcdctl` (3.4 or later; Debian's `etcd-server` and `etcd-client`) on `PATH`.
//! [`Netns`] also needs root (`CAP_NET_ADMIN` and `CAP_SYS_ADMIN`), `ip` (iproute2) and `nft`
//! (nftables).
//!
//! # Cleanup
//!
//! Dropping a value kills its processes (by PID, never by name) and removes what it created.
//! etcd processes are also started with `PR_SET_PDEATHSIG` = `SIGKILL` tied to a thread that
//! lives as long as the test process, so an [`Etcd`] kept in a `static` (where `Drop` never
//! runs) or a test binary killed by a signal leaves no etcd behind. Namespaces left behind by
//! a test process that was killed are removed by the next [`Netns::new`] in any process.
//!
//! # Example
//!
//! ```no_run
//! use leasehold_testkit::{Etcd, Netns};
//!
//! let ns = Netns::new("partition");
//! let etcd = Etcd::start_on(ns.host_ip());
//! let put = ns
//!     .command("etcdctl")
//!     .env("ETCDCTL_API", "3")
//!     .args(["--endpoints", &etcd.endpoint(), "put", "k", "v"])
//!     .output()
//!     .unwrap();
//! assert!(put.status.success());
//! ns.cut(); // from now on the namespace cannot reach etcd, nor etcd the namespace
//! ns.heal();
//! ```

mod cluster;
mod etcd;
mod netns;
mod pid;
mod proc;
mod tls;

pub use cluster::EtcdCluster;
pub use etcd::Etcd;
pub use netns::Netns;
pub use pid::{PidSpawnError, ProcessWithPid, SpawnWithPid};
pub use tls::TestCerts;

/// How many cases each property test runs: `LEASEHOLD_FUZZ_CASES` (millions in a long run),
/// else 256.
pub fn fuzz_cases() -> u32 {
    std::env::var("LEASEHOLD_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}
