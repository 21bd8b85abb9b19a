//! A three-member cluster: a leader is elected, and the cluster stays writable when it dies.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use leasehold_testkit::EtcdCluster;

#[test]
fn three_members_survive_the_death_of_their_leader() {
    let t = Instant::now();
    let cluster = EtcdCluster::start(3);
    eprintln!("three members answered in {:?}", t.elapsed());
    let endpoints = cluster.endpoints();
    assert_eq!(endpoints.len(), 3);
    assert_eq!(cluster.endpoints_joined(), endpoints.join(","));
    let mut sorted = endpoints.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 3, "distinct endpoints: {endpoints:?}");

    let leader = cluster.leader();
    assert!(leader < 3);
    let out = cluster.etcdctl(&["put", "before", "1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let t = Instant::now();
    cluster.member(leader).kill();
    let writable = cluster.wait_writable(Duration::from_secs(10));
    eprintln!("writable again {writable:?} after SIGKILL of the leader");
    assert!(writable < Duration::from_secs(5), "took {writable:?}");
    let new_leader = cluster.leader();
    eprintln!(
        "new leader m{new_leader} known {:?} after the kill",
        t.elapsed()
    );
    assert_ne!(new_leader, leader);

    let follower = (0..3).find(|&i| i != leader).unwrap();
    let out = cluster.member(follower).etcdctl(&["put", "during", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The old leader rejoins with its data directory and catches up.
    let t = Instant::now();
    cluster.member(leader).restart();
    eprintln!("old leader rejoined in {:?}", t.elapsed());
    let out = cluster
        .member(leader)
        .etcdctl(&["get", "--print-value-only", "during"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2");
    assert!(cluster.members().iter().all(|m| m.is_healthy()));
}
