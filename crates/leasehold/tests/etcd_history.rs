//! etcd's history: the agents compact it and forget old free records, so a small quota is
//! never reached by leasehold's own churn; when another user of the same etcd fills it anyway,
//! the agent says what to run, keeps its holders, and carries on once the alarm is cleared.
//!
//! The soak runs about a minute in the normal suite (4 MiB quota); `LEASEHOLD_SOAK_SECS=N`
//! runs it for at least N seconds at a 32 MiB quota.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::*;
use leasehold_testkit::{Etcd, EtcdCluster};

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

/// (seconds since the start, dbSize, dbSizeInUse, revision).
type Sample = (f64, u64, u64, u64);

/// etcd's database file size, the part of it in use, and the revision, once a second in a
/// thread, until dropped: the soak's figures.
struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<Sample>>>,
}

impl Sampler {
    fn start(etcd: &Etcd) -> Sampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        let mut cmd = etcd.etcdctl_command();
        cmd.args(["endpoint", "status", "-w", "json"]);
        let started = std::time::Instant::now();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                if let Ok(out) = cmd.output()
                    && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout)
                {
                    let s = &v[0]["Status"];
                    samples.push((
                        started.elapsed().as_secs_f64(),
                        s["dbSize"].as_u64().unwrap_or(0),
                        s["dbSizeInUse"].as_u64().unwrap_or(0),
                        s["header"]["revision"].as_u64().unwrap_or(0),
                    ));
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            samples
        });
        Sampler {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling; the samples: (seconds, dbSize, dbSizeInUse, revision).
    fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// Prints the samples, for the report or the failure.
fn print_samples(samples: &[Sample]) {
    for (t, db, used, rev) in samples {
        eprintln!("t={t:6.1}s dbSize={db:>9} dbSizeInUse={used:>9} revision={rev}");
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take()
            && std::thread::panicking()
            && let Ok(samples) = t.join()
        {
            print_samples(&samples);
        }
    }
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

/// How many times over the churn writes what fills the quota without compaction.
const FILLS: u64 = 3;

#[test]
fn full_rate_churn_through_two_agents_stays_far_below_a_small_quota() {
    // The agents run with their default compaction (every minute, keeping 5 minutes): at
    // full rate that much history alone is several times a small quota.
    let (secs, quota): (u64, u64) = match std::env::var("LEASEHOLD_SOAK_SECS") {
        Ok(s) => (s.parse().expect("LEASEHOLD_SOAK_SECS: seconds"), 32 << 20),
        Err(_) => (0, 4 << 20),
    };
    let etcd = Etcd::start_with(&[&format!("--quota-backend-bytes={quota}")]);
    let p = prefix();
    let quota_arg = quota.to_string();
    let flags = ["--etcd-quota", &quota_arg];
    let a = Agent::on_etcd("host-a", &etcd.endpoint(), &p, &flags, &[]);
    let b = Agent::on_etcd("host-b", &etcd.endpoint(), &p, &flags, &[]);
    // Churn in rounds of 5 s until both the time has passed and the history written is
    // FILLS times what fills the quota without compaction (on a busy machine that takes
    // longer).
    let target = FILLS * quota / BYTES_PER_REVISION;
    let started = std::time::Instant::now();
    let limit = Duration::from_secs((3 * secs).max(240));
    let mut rounds = 0;
    let sampler = Sampler::start(&etcd);
    let (db, revision) = loop {
        churn(&a, &b, 5, &etcd);
        rounds += 1;
        let (db, revision) = etcd_status(&etcd);
        assert_eq!(alarms(&etcd), "", "no alarm after {rounds} rounds of churn");
        if started.elapsed() >= Duration::from_secs(secs) && revision >= target {
            break (db, revision);
        }
        assert!(
            started.elapsed() < limit,
            "the churn ({revision} revisions in {:?}) was too slow to fill the quota {FILLS} times over; the soak shows nothing",
            started.elapsed()
        );
    };
    let elapsed = started.elapsed();
    let samples = sampler.finish();
    print_samples(&samples);
    let peak = samples.iter().map(|s| s.1).max().unwrap_or(db).max(db);
    let defrags: usize = [&a, &b]
        .iter()
        .map(|x| x.log().matches("defragmented an etcd member").count())
        .sum();
    eprintln!(
        "{elapsed:?} of churn: {revision} revisions ({:.0}/s; without compaction about {} MiB, \
         {:.1} times the quota), db {db} bytes at the end, {peak} at most, quota {quota}, \
         {defrags} defragmentations",
        revision as f64 / elapsed.as_secs_f64(),
        (revision * BYTES_PER_REVISION) >> 20,
        (revision * BYTES_PER_REVISION) as f64 / quota as f64,
    );
    assert!(
        revision * BYTES_PER_REVISION >= FILLS * quota,
        "the churn wrote {FILLS} times what fills the quota without compaction"
    );
    assert_eq!(alarms(&etcd), "", "no alarm");
    // Bounded: below the level the agents warn at (75%) all along.
    assert!(
        peak < quota * 3 / 4,
        "etcd's database ({peak} bytes at most) stays well below the quota ({quota})"
    );
    for agent in [&a, &b] {
        assert!(!agent.log().contains("of its quota"), "{}", agent.log());
    }
}

/// A member's database file size and the part in use.
fn member_sizes(m: &Etcd) -> (u64, u64) {
    let out = m.etcdctl(&["endpoint", "status", "-w", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = &v[0]["Status"];
    (
        s["dbSize"].as_u64().unwrap(),
        s["dbSizeInUse"].as_u64().unwrap(),
    )
}

#[test]
fn agents_defragment_one_member_at_a_time_and_fence_nobody() {
    let quota: u64 = 8 << 20;
    let cluster = EtcdCluster::start_with(3, &[&format!("--quota-backend-bytes={quota}")]);
    let p = prefix();
    let flags = [
        "--etcd-compact-every",
        "1s",
        "--etcd-history",
        "1s",
        "--etcd-quota",
        "8MiB",
    ];
    let eps = cluster.endpoints_joined();
    let a = Agent::on_etcd("host-a", &eps, &p, &flags, &[]);
    let b = Agent::on_etcd("host-b", &eps, &p, &flags, &[]);
    let (ha, hb) = (Holder::new(), Holder::new());
    expect_code(&a.lh(&["acquire", "disk", "--pid", &ha.pid_arg()]), 0);
    expect_code(&b.lh(&["acquire", "cache", "--pid", &hb.pid_arg()]), 0);
    // Another user writes 5 MiB and deletes it: once the agents compact, each member's file
    // is mostly free pages, past half the quota.
    let first = cluster.member(0);
    for n in 0..80 {
        expect_code(&put_other(first, &n.to_string(), 64 << 10), 0);
    }
    let del = first.etcdctl(&["del", "--prefix", "/other/"]);
    assert!(del.status.success(), "{}", text(&del.stderr));
    for m in cluster.members() {
        assert!(member_sizes(m).0 >= quota / 2, "{:?}", member_sizes(m));
    }
    let leader = cluster.leader();
    let defrags = || {
        [&a, &b]
            .iter()
            .map(|x| x.log().matches("defragmented an etcd member").count())
            .sum::<usize>()
    };
    wait_until(
        "every member is defragmented",
        Duration::from_secs(90),
        || {
            defrags() >= 3
                && cluster
                    .members()
                    .iter()
                    .all(|m| member_sizes(m).0 < quota / 4)
        },
    );
    let logs = format!("{}\n{}", a.log(), b.log());
    // The leader was defragmented after handing its leadership over, never while leading.
    assert!(
        logs.contains("handed etcd's leadership to another member"),
        "{logs}"
    );
    assert_ne!(cluster.leader(), leader, "{logs}");
    // One at a time: each defragmentation is logged by the agent that claimed it, at least
    // 10 s (the gap) after the one before.
    let mut at: Vec<u64> = [&a, &b]
        .iter()
        .flat_map(|x| {
            x.log()
                .lines()
                .filter(|l| l.contains("defragmented an etcd member"))
                .map(|l| {
                    let t = l.split_whitespace().next().unwrap();
                    humantime::parse_rfc3339_weak(t.trim_end_matches('Z'))
                        .map(|t| {
                            t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
                        })
                        .unwrap()
                })
                .collect::<Vec<_>>()
        })
        .collect();
    at.sort_unstable();
    for w in at.windows(2) {
        assert!(w[1] - w[0] >= 9_000, "{at:?}\n{logs}");
    }
    // Nobody was fenced, and both holders keep their leases.
    assert!(!logs.contains("fenced"), "{logs}");
    assert!(!logs.contains("not answering session renewals"), "{logs}");
    assert!(alive(ha.pid()) && alive(hb.pid()));
    assert_eq!(a.holders("disk"), vec![u64::from(ha.pid())]);
    assert_eq!(b.holders("cache"), vec![u64::from(hb.pid())]);
}

/// Another user of the same etcd writes `bytes` under `/other/`.
fn put_other(etcd: &Etcd, key: &str, bytes: usize) -> std::process::Output {
    use std::io::Write;
    let mut child = etcd
        .etcdctl_command()
        .args(["put", &format!("/other/{key}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&vec![b'x'; bytes])
        .unwrap();
    child.wait_with_output().unwrap()
}

/// `leasehold status --json`, parsed.
fn status(a: &Agent) -> serde_json::Value {
    let out = a.lh(&["status", "--json"]);
    expect_code(&out, 0);
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn at_the_quota_the_agent_names_the_remedy_keeps_its_holders_and_recovers_after_disarm() {
    let quota: u64 = 4 << 20;
    let etcd = Etcd::start_with(&[&format!("--quota-backend-bytes={quota}")]);
    let p = prefix();
    let flags = [
        "--etcd-compact-every",
        "1s",
        "--etcd-history",
        "2s",
        "--etcd-quota",
        "4MiB",
    ];
    let a = Agent::on_etcd("host-a", &etcd.endpoint(), &p, &flags, &[]);
    let keeper = Holder::new();
    let mut leaver = Holder::new();
    expect_code(&a.lh(&["acquire", "disk", "--pid", &keeper.pid_arg()]), 0);
    expect_code(&a.lh(&["acquire", "cache", "--pid", &leaver.pid_arg()]), 0);

    // Another user fills etcd: first past 75% of the quota, which the agent warns of.
    let mut n = 0;
    while etcd_status(&etcd).0 < quota * 77 / 100 {
        let o = put_other(&etcd, &n.to_string(), 64 << 10);
        expect_code(&o, 0);
        n += 1;
    }
    wait_until("a warning near the quota", Duration::from_secs(20), || {
        a.log().contains("of its quota")
    });
    let s = status(&a);
    assert!(
        s["etcd"]["warning"]
            .as_str()
            .is_some_and(|w| w.contains("of its quota") && w.contains("etcdctl defrag")),
        "{s}"
    );
    assert!(
        s["etcd"]["db_size"].as_u64().unwrap() >= quota * 3 / 4,
        "{s}"
    );
    assert_eq!(s["etcd"]["quota"], quota, "{s}");

    // Then to the quota: etcd raises NOSPACE.
    loop {
        let o = put_other(&etcd, &n.to_string(), 64 << 10);
        n += 1;
        if !o.status.success() {
            assert!(
                text(&o.stderr).contains("database space exceeded"),
                "{}",
                text(&o.stderr)
            );
            break;
        }
        assert!(n < 400, "etcd never reached its quota");
    }
    wait_until(
        "the agent says etcd is out of space",
        Duration::from_secs(20),
        || a.log().contains("NOSPACE alarm is raised"),
    );
    assert!(a.log().contains("etcdctl alarm disarm"), "{}", a.log());
    let s = status(&a);
    assert_eq!(s["etcd"]["nospace"], true, "{s}");

    // A new lease is refused, saying what to run.
    let other = Holder::new();
    let o = a.lh(&["acquire", "other", "--pid", &other.pid_arg()]);
    assert!(!o.status.success());
    let err = text(&o.stderr);
    assert!(
        err.contains("out of space")
            && err.contains("etcdctl compact")
            && err.contains("etcdctl defrag")
            && err.contains("etcdctl alarm disarm"),
        "{err}"
    );

    // An exited holder's lease is owed: the agent keeps trying to end it.
    leaver.kill9();
    wait_until(
        "the agent retries ending the exited holder's lease",
        Duration::from_secs(20),
        || {
            a.log()
                .contains("cannot end the leases of an exited process yet")
        },
    );
    // The session still renews (keep-alives are not writes): across three session lifetimes
    // (ttl 3 s) the holder keeps its lease and is not fenced.
    std::thread::sleep(Duration::from_secs(9));
    assert!(alive(keeper.pid()), "{}", a.log());
    assert_eq!(a.holders("disk"), vec![u64::from(keeper.pid())]);
    assert!(!a.log().contains("session has expired"), "{}", a.log());

    // The operator: the other user's keys go, then compact, defragment, disarm.
    let del = etcd.etcdctl(&["del", "--prefix", "/other/"]);
    assert!(del.status.success(), "{}", text(&del.stderr));
    let rev = etcd_status(&etcd).1.to_string();
    for args in [
        vec!["compact", rev.as_str()],
        vec!["defrag"],
        vec!["alarm", "disarm"],
    ] {
        let o = etcd.etcdctl(&args);
        assert!(o.status.success(), "{args:?}: {}", text(&o.stderr));
    }

    // leasehold carries on by itself.
    wait_until(
        "the exited holder's lease ends",
        Duration::from_secs(20),
        || a.holders("cache").is_empty(),
    );
    expect_code(&a.lh(&["acquire", "other", "--pid", &other.pid_arg()]), 0);
    wait_until(
        "the agent sees the alarm cleared",
        Duration::from_secs(20),
        || a.log().contains("alarm is cleared"),
    );
    assert_eq!(a.holders("disk"), vec![u64::from(keeper.pid())]);
    assert_eq!(status(&a)["etcd"]["nospace"], false);
}

#[test]
fn free_clean_records_are_forgotten_and_tokens_still_grow() {
    let etcd = Etcd::start();
    let p = prefix();
    let a = Agent::on_etcd(
        "host-a",
        &etcd.endpoint(),
        &p,
        &["--etcd-compact-every", "1s", "--etcd-forget-after", "3s"],
        &[],
    );
    let h = Holder::new();
    let mut gone = Holder::new();
    expect_code(&a.lh(&["acquire", "old", "--pid", &h.pid_arg()]), 0);
    let first = a.inspect("old").unwrap()["holders"][0]["token"]
        .as_u64()
        .unwrap();
    expect_code(&a.lh(&["release", "old", "--pid", &h.pid_arg()]), 0);
    expect_code(&a.lh(&["acquire", "kept", "--pid", &h.pid_arg()]), 0);
    expect_code(&a.lh(&["acquire", "dirty", "--pid", &gone.pid_arg()]), 0);
    gone.kill9();
    wait_until("dirty is dirty", Duration::from_secs(10), || {
        a.is_dirty("dirty")
    });
    // A marker of a record that vanished while held is refused until an operator acts: it
    // looks free and clean, but is never forgotten.
    let junk = format!("{p}res/junk");
    let marker = r#"{"holders":[],"last_token":3,"damaged":"gone while held"}"#;
    let o = etcd.etcdctl(&["put", &junk, marker]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    wait_until("old is forgotten", Duration::from_secs(30), || {
        a.inspect("old").is_none()
    });
    assert!(
        a.log().contains("forgot free, clean resource records"),
        "{}",
        a.log()
    );
    // Held and dirty records stay, whatever their age.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(a.holders("kept"), vec![u64::from(h.pid())]);
    assert!(a.is_dirty("dirty"));
    let o = etcd.etcdctl(&["get", &junk, "--print-value-only"]);
    assert_eq!(text(&o.stdout).trim(), marker);
    assert!(status(&a)["etcd"]["forgotten"].as_u64().unwrap() >= 1);
    // A forgotten resource is leased again with a greater token.
    expect_code(&a.lh(&["acquire", "old", "--pid", &h.pid_arg()]), 0);
    let again = a.inspect("old").unwrap()["holders"][0]["token"]
        .as_u64()
        .unwrap();
    assert!(again > first, "token {again} after {first}");
}

#[test]
fn history_compacted_by_someone_else_is_left_to_them() {
    let etcd = Etcd::start();
    let p = prefix();
    let a = Agent::on_etcd(
        "host-a",
        &etcd.endpoint(),
        &p,
        &["--etcd-compact-every", "1s", "--etcd-history", "1s"],
        &[],
    );
    let h = Holder::new();
    // Some history, then leasehold compacts it.
    for _ in 0..5 {
        expect_code(&a.lh(&["acquire", "r", "--pid", &h.pid_arg()]), 0);
        expect_code(&a.lh(&["release", "r", "--pid", &h.pid_arg()]), 0);
    }
    wait_until("leasehold compacts", Duration::from_secs(20), || {
        let s = status(&a);
        s["etcd"]["compacted_revision"].as_i64().unwrap() > 0
            && s["etcd"]["compactor"] == "leasehold"
    });
    // An operator (or etcd's auto-compaction) compacts further.
    for _ in 0..5 {
        expect_code(&a.lh(&["acquire", "r", "--pid", &h.pid_arg()]), 0);
        expect_code(&a.lh(&["release", "r", "--pid", &h.pid_arg()]), 0);
    }
    let rev = etcd_status(&etcd).1;
    let o = etcd.etcdctl(&["compact", &rev.to_string()]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    wait_until("the agent notices", Duration::from_secs(20), || {
        a.log().contains("compacted by someone else")
    });
    // Rounds go by (one a second, keeping 1 s of history) and leasehold compacts no further:
    // it stands aside.
    for _ in 0..5 {
        expect_code(&a.lh(&["acquire", "r", "--pid", &h.pid_arg()]), 0);
        expect_code(&a.lh(&["release", "r", "--pid", &h.pid_arg()]), 0);
    }
    std::thread::sleep(Duration::from_secs(4));
    let s = status(&a);
    assert_eq!(
        s["etcd"]["compacted_revision"].as_u64().unwrap(),
        rev,
        "{s}"
    );
    assert!(
        s["etcd"]["compactor"]
            .as_str()
            .unwrap()
            .contains("someone else"),
        "{s}"
    );
}
