//! `etcd-cluster N -- COMMAND...`: starts an N-member etcd cluster on 127.0.0.1 (free ports,
//! a scratch directory, Debian's `etcd`), runs COMMAND with `ETCD_ENDPOINTS` set to its client
//! URLs (comma-separated), then stops every member by PID. Exits with COMMAND's status.
//!
//! For benchmarks on a real cluster without setting one up:
//! `cargo run -p leasehold-testkit --bin etcd-cluster -- 3 -- sh -c 'leasehold bench --etcd-endpoints "$ETCD_ENDPOINTS"'`.

use std::process::{Command, ExitCode};

use leasehold_testkit::EtcdCluster;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = || {
        eprintln!("usage: etcd-cluster MEMBERS -- COMMAND [ARGS...]   (MEMBERS: 1 to 7)");
        ExitCode::from(2)
    };
    let (Some(n), Some("--")) = (
        args.first().and_then(|n| n.parse::<usize>().ok()),
        args.get(1).map(String::as_str),
    ) else {
        return usage();
    };
    if !(1..=7).contains(&n) || args.len() < 3 {
        return usage();
    }
    let cluster = EtcdCluster::start(n);
    let endpoints = cluster.endpoints_joined();
    eprintln!("etcd-cluster: {n} member(s) at {endpoints}");
    let status = Command::new(&args[2])
        .args(&args[3..])
        .env("ETCD_ENDPOINTS", &endpoints)
        .status();
    drop(cluster);
    match status {
        Ok(s) => ExitCode::from(s.code().map_or(1, |c| u8::try_from(c).unwrap_or(1))),
        Err(e) => {
            eprintln!("etcd-cluster: cannot run {}: {e}", args[2]);
            ExitCode::from(1)
        }
    }
}
