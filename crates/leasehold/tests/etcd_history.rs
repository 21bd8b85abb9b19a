//! etcd's history: the agents compact it and forget old free records, so a small quota is
//! never reached by leasehold's own churn; when another user of the same etcd fills it anyway,
//! the agent says what to run, keeps its holders, and carries on once the alarm is cleared.
//!
//! The soak runs about a minute in the normal suite (8 MiB quota); `LEASEHOLD_SOAK_SECS=N`
//! runs it for N seconds at a 32 MiB quota.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::*;
use leasehold_testkit::Etcd;

static N: AtomicU32 = AtomicU32::new(0);

fn prefix() -> String {
    format!(
        "/h{}-{}/",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// etcd's own view: database size, revision.
fn etcd_status(etcd: &Etcd) -> (u64, u64) {
    let out = etcd.etcdctl(&["endpoint", "status", "-w", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = &v[0]["Status"];
    (
        s["dbSize"].as_u64().unwrap(),
        s["header"]["revision"].as_u64().unwrap(),
    )
}

fn alarms(etcd: &Etcd) -> String {
    let out = etcd.etcdctl(&["alarm", "list"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

/// Bytes etcd keeps per revision of leasehold's churn (measured: an etcd with a 16 MiB quota
/// and no compaction raises NOSPACE after about 20,000 revisions).
const BYTES_PER_REVISION: u64 = 840;

/// Full-rate acquire/release through both agents for `secs` seconds; panics unless every
/// acquire and release was answered.
fn churn(a: &Agent, b: &Agent, secs: u64, etcd: &Etcd) {
    let seconds = secs.to_string();
    // The bench names its resources after its client count: different counts, different
    // resources, so the two hosts churn side by side instead of waiting for each other.
    let load = |agent: &Agent, clients: &str| {
        agent
            .cli()
            .args([
                "bench",
                "--external",
                "--seconds",
                &seconds,
                "--clients",
                clients,
                "--runs",
                "0",
                "--exits",
                "0",
                "--leases",
                "0",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (la, lb) = (load(a, "16"), load(b, "15"));
    let (oa, ob) = (
        la.wait_with_output().unwrap(),
        lb.wait_with_output().unwrap(),
    );
    for (o, agent) in [(&oa, a), (&ob, b)] {
        // The bench stops at the first acquire or release that fails: exit 0 means every
        // lease asked for was answered.
        assert!(
            o.status.success(),
            "churn failed: {}\n{}\nagent log:\n{}\netcd log:\n{}",
            text(&o.stdout),
            text(&o.stderr),
            agent.log(),
            etcd.log_tail(20)
        );
    }
}

#[test]
fn full_rate_churn_through_two_agents_stays_far_below_a_small_quota() {
    let (secs, quota): (u64, u64) = match std::env::var("LEASEHOLD_SOAK_SECS") {
        Ok(s) => (s.parse().expect("LEASEHOLD_SOAK_SECS: seconds"), 32 << 20),
        Err(_) => (40, 6 << 20),
    };
    let etcd = Etcd::start_with(&[&format!("--quota-backend-bytes={quota}")]);
    let p = prefix();
    let quota_arg = quota.to_string();
    let flags = [
        "--etcd-compact-every",
        "1s",
        "--etcd-history",
        "3s",
        "--etcd-quota",
        &quota_arg,
    ];
    let a = Agent::on_etcd("host-a", &etcd.endpoint(), &p, &flags, &[]);
    let b = Agent::on_etcd("host-b", &etcd.endpoint(), &p, &flags, &[]);
    // Churn in rounds of 10 s until both the time has passed and the history written is
    // twice what fills the quota without compaction (on a busy machine that takes longer).
    let target = 2 * quota / BYTES_PER_REVISION;
    let started = std::time::Instant::now();
    let limit = Duration::from_secs((3 * secs).max(300));
    let mut rounds = 0;
    let (db, revision) = loop {
        churn(&a, &b, 10, &etcd);
        rounds += 1;
        let (db, revision) = etcd_status(&etcd);
        assert_eq!(alarms(&etcd), "", "no alarm after {rounds} rounds of churn");
        if started.elapsed() >= Duration::from_secs(secs) && revision >= target {
            break (db, revision);
        }
        assert!(
            started.elapsed() < limit,
            "the churn ({revision} revisions in {:?}) was too slow to fill the quota twice over; the soak shows nothing",
            started.elapsed()
        );
    };
    eprintln!(
        "{:?} of churn: {revision} revisions (about {} MiB of history without compaction), db {db} bytes, quota {quota}",
        started.elapsed(),
        (revision * BYTES_PER_REVISION) >> 20
    );
    assert_eq!(alarms(&etcd), "", "no alarm");
    assert!(
        db < quota / 2,
        "etcd's database ({db} bytes) stays well below the quota ({quota})"
    );
}
