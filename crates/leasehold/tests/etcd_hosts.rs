//! Several hosts on one etcd (SPEC G1–G5 across hosts, G3 self-fencing). Each "host" is an
//! agent with its own host id, socket and state; etcd is started by the test. Timing is short
//! (ttl 3 s, renew 1 s, fence margin 600 ms, grace 2 s) so faults resolve in seconds.
//!
//! The fault tests compare CLOCK_MONOTONIC timestamps (shared by every process here): the
//! moment the old holder died, seen through a pidfd by the test, must come before the moment
//! the other host's agent granted the resource, from its log.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::*;
use leasehold_testkit::{Etcd, EtcdCluster, Netns};

static N: AtomicU32 = AtomicU32::new(0);

fn prefix() -> String {
    format!(
        "/t{}-{}/",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A `run` wrapper under `a` holding `r` exclusively with a `sleep` command; returns the
/// wrapper and the command's pid.
fn run_holder(a: &Agent, r: &str) -> (std::process::Child, u32) {
    let pidfile = a.path(&format!("{r}.child"));
    let script = format!("echo $$ > {}; exec sleep 3600", pidfile.display());
    let wrapper = a
        .cli()
        .args(["run", "--exclusive", r, "--", "sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = wait_pid_file(&pidfile, Duration::from_secs(10));
    (wrapper, pid)
}

/// B waits for `r`, gets needs-check once A's session is over, then takes it accepting the
/// check. Returns B's grant time (CLOCK_MONOTONIC ns, from B's log) and B's holder.
fn b_takes_after_check(b: &Agent, r: &str) -> (u64, Holder) {
    let h = Holder::new();
    let out = b.lh(&["acquire", r, "--wait=30s", "--pid", &h.pid_arg()]);
    expect_code(&out, 4);
    assert!(
        text(&out.stderr).contains("host session expired"),
        "{}",
        text(&out.stderr)
    );
    let out = b.lh(&["acquire", r, "--accept-dirty", "--pid", &h.pid_arg()]);
    expect_code(&out, 0);
    let token = text(&out.stdout).trim().to_owned();
    let at = b.wait_logged_mono_ns(&[
        "granted",
        &format!("resource={r} "),
        &format!("token={token} "),
    ]);
    (at, h)
}

#[test]
fn hosts_share_exclusive_and_shared_leases_and_see_each_other() {
    let etcd = Etcd::start();
    let p = prefix();
    let a = Agent::on_etcd("host-a", &etcd.endpoint(), &p, &[], &[]);
    let b = Agent::on_etcd("host-b", &etcd.endpoint(), &p, &[], &[]);
    let (ha, hb) = (Holder::new(), Holder::new());
    let out = a.lh(&[
        "acquire",
        "vm1.qcow2",
        "--pid",
        &ha.pid_arg(),
        "--owner",
        "vm1",
    ]);
    expect_code(&out, 0);
    let out = b.lh(&["acquire", "vm1.qcow2", "--pid", &hb.pid_arg()]);
    expect_code(&out, 3);
    assert!(
        text(&out.stderr).contains("on host-a [vm1]"),
        "{}",
        text(&out.stderr)
    );
    expect_code(
        &a.lh(&["acquire", "cache", "--shared", "--pid", &ha.pid_arg()]),
        0,
    );
    expect_code(
        &b.lh(&["acquire", "cache", "--shared", "--pid", &hb.pid_arg()]),
        0,
    );
    for agent in [&a, &b] {
        let v = agent.inspect("cache").unwrap();
        let mut hosts: Vec<&str> = v["holders"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["host"].as_str().unwrap())
            .collect();
        hosts.sort();
        assert_eq!(hosts, vec!["host-a", "host-b"]);
        assert_eq!(
            agent.inspect("vm1.qcow2").unwrap()["holders"][0]["host"],
            "host-a"
        );
    }
    // A waiter on B gets the disk when A's holder releases it.
    let waiter = b
        .cli()
        .args(["acquire", "vm1.qcow2", "--wait=20s", "--pid", &hb.pid_arg()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("B waits", Duration::from_secs(10), || {
        a.inspect("vm1.qcow2")
            .is_some_and(|v| !v["waiters"].as_array().unwrap().is_empty())
    });
    expect_code(&a.lh(&["release", "vm1.qcow2", "--pid", &ha.pid_arg()]), 0);
    let out = waiter.wait_with_output().unwrap();
    expect_code(&out, 0);
    assert_eq!(a.holders("vm1.qcow2"), vec![u64::from(hb.pid())]);
}

#[test]
fn a_host_id_in_use_is_refused_with_its_name() {
    let etcd = Etcd::start();
    let p = prefix();
    let _a = Agent::on_etcd("twin", &etcd.endpoint(), &p, &[], &[]);
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin())
        .args([
            "agent",
            "--backend",
            "etcd",
            "--etcd-endpoints",
            &etcd.endpoint(),
        ])
        .args(["--etcd-prefix", &p, "--host-id", "twin", "--socket"])
        .arg(dir.path().join("s.sock"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    expect_code(&out, 1);
    let err = text(&out.stderr);
    assert!(err.contains("host id twin is in use"), "{err}");
}

#[test]
fn a_stopped_agents_run_is_dead_before_another_host_gets_the_disk() {
    let etcd = Etcd::start();
    let p = prefix();
    let a = Agent::on_etcd("host-a", &etcd.endpoint(), &p, &[], &[]);
    let b = Agent::on_etcd("host-b", &etcd.endpoint(), &p, &[], &[]);
    let (_wrapper, child) = run_holder(&a, "disk");
    let died = death_watch(child);
    a.freeze();
    let (granted, _b_holder) = b_takes_after_check(&b, "disk");
    let died = died.join().unwrap();
    signal(a.pid(), libc::SIGCONT);
    assert!(
        died < granted,
        "the old holder died at {died} ns, after B's grant at {granted} ns"
    );
    eprintln!(
        "holder dead {} ms before B's grant",
        (granted - died) / 1_000_000
    );
}

#[test]
fn a_killed_agents_run_is_dead_before_another_host_gets_the_disk() {
    let etcd = Etcd::start();
    let p = prefix();
    let mut a = Agent::on_etcd("host-a", &etcd.endpoint(), &p, &[], &[]);
    let b = Agent::on_etcd("host-b", &etcd.endpoint(), &p, &[], &[]);
    let (_wrapper, child) = run_holder(&a, "disk");
    let died = death_watch(child);
    a.kill9();
    let (granted, _b_holder) = b_takes_after_check(&b, "disk");
    let died = died.join().unwrap();
    assert!(
        died < granted,
        "holder died at {died}, B granted at {granted}"
    );
}

#[test]
fn a_host_cut_off_from_etcd_fences_its_holders_first() {
    let netns = Netns::new("lh-cut");
    let etcd = Etcd::start_on(netns.host_ip());
    let p = prefix();
    let a = Agent::on_etcd(
        "host-a",
        &etcd.endpoint(),
        &p,
        &[],
        &["ip", "netns", "exec", netns.name()],
    );
    let b = Agent::on_etcd("host-b", &etcd.endpoint(), &p, &[], &[]);
    // A plain holder (no wrapper): only the agent can fence it.
    let holder = Holder::new();
    expect_code(&a.lh(&["acquire", "disk", "--pid", &holder.pid_arg()]), 0);
    let died = death_watch(holder.pid());
    let (mut watch, mut events) = watch_json(&a);
    netns.cut();
    let (granted, _b_holder) = b_takes_after_check(&b, "disk");
    let died = died.join().unwrap();
    let fenced = a.wait_logged_mono_ns(&["fenced"]);
    assert!(
        fenced <= died + 50_000_000,
        "fenced at {fenced}, holder died at {died}"
    );
    assert!(
        died < granted,
        "holder died at {died}, B granted at {granted}"
    );
    events.wait_for(r#""kind":"fenced""#, Duration::from_secs(10));
    let _ = watch.kill();
    let _ = watch.wait();
    let all = events.rest(Duration::from_secs(5));
    let fenced: Vec<serde_json::Value> = all
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|e: &serde_json::Value| e["kind"] == "fenced")
        .collect();
    assert_eq!(fenced.len(), 1, "{all}");
    assert_eq!(fenced[0]["pid"], holder.pid());
    assert_eq!(fenced[0]["host"], "host-a");
    netns.heal();
}

/// An agent for `host` on `endpoints` under `prefix`, with the default timing but `extra`.
fn agent_with(host: &str, endpoints: &str, prefix: &str, extra: &[&str]) -> Agent {
    let mut args = vec![
        "--backend",
        "etcd",
        "--etcd-endpoints",
        endpoints,
        "--etcd-prefix",
        prefix,
    ];
    args.extend_from_slice(extra);
    let mut a = Agent::unstarted(host, &args, &[]);
    a.spawn();
    a
}

/// Waits until `a` has a renewal confirmed that it sent after `since`; false if its holder
/// `pid` died first (it was fenced).
fn renewed_after(a: &Agent, since: std::time::Instant, pid: u32) -> bool {
    let mut renewed = false;
    wait_until(
        "a renewal after the fault, or a fence",
        Duration::from_secs(60),
        || {
            let out = a.lh(&["status", "--json"]);
            let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let ago = s["host_session"]["last_renewal_ms_ago"].as_u64();
            renewed = ago.is_some_and(|ago| u128::from(ago) < since.elapsed().as_millis());
            renewed || !alive(pid)
        },
    );
    renewed && alive(pid)
}

// The guarantee is for the default ttl (10 s): at ttl 3 s an election on a busy machine can
// take most of a session (see the measurement below).
#[test]
fn losing_the_etcd_leader_loses_no_lease_and_kills_no_holder() {
    let cluster = EtcdCluster::start(3);
    let p = prefix();
    let a = agent_with("host-a", &cluster.endpoints_joined(), &p, &[]);
    let holder = Holder::new();
    let out = a.lh(&["acquire", "disk", "--pid", &holder.pid_arg()]);
    expect_code(&out, 0);
    let token = text(&out.stdout).trim().to_owned();
    let leader = cluster.leader();
    let killed = std::time::Instant::now();
    cluster.member(leader).kill();
    cluster.wait_for_leader(Duration::from_secs(30));
    assert!(
        renewed_after(&a, killed, holder.pid()),
        "the holder must not be fenced:\n{}",
        a.log()
    );
    assert!(!a.log().contains("fenced"), "{}", a.log());
    expect_code(&a.lh(&["validate", "disk", &token]), 0);
    assert_eq!(a.holders("disk"), vec![u64::from(holder.pid())]);
}

/// Measures how many leader kills fence a healthy holder: `LEASEHOLD_LEADER_KILLS` kills
/// (default 6) at ttl `LEASEHOLD_LEADER_TTL` (default 3s), one holder each.
/// `cargo test -p leasehold --test etcd_hosts leader_kills -- --ignored --nocapture`
#[test]
#[ignore = "a measurement; run on demand"]
fn leader_kills_measured() {
    let kills: usize = std::env::var("LEASEHOLD_LEADER_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let ttl = std::env::var("LEASEHOLD_LEADER_TTL").unwrap_or_else(|_| "3s".into());
    let cluster = EtcdCluster::start(3);
    let p = prefix();
    let a = agent_with("host-a", &cluster.endpoints_joined(), &p, &["--ttl", &ttl]);
    let mut fenced = 0;
    for i in 0..kills {
        let holder = Holder::new();
        let r = format!("disk{i}");
        expect_code(&a.lh(&["acquire", &r, "--pid", &holder.pid_arg()]), 0);
        let leader = cluster.leader();
        let killed = std::time::Instant::now();
        cluster.member(leader).kill();
        cluster.wait_for_leader(Duration::from_secs(30));
        if !renewed_after(&a, killed, holder.pid()) {
            fenced += 1;
        }
        cluster.member(leader).restart();
        cluster.wait_writable(Duration::from_secs(30));
        if alive(holder.pid()) {
            expect_code(&a.lh(&["release", &r, "--pid", &holder.pid_arg()]), 0);
        }
    }
    eprintln!("ttl {ttl}: {fenced} of {kills} leader kills fenced a healthy holder");
}

#[test]
fn losing_etcd_quorum_fences_holders_and_service_returns_with_it() {
    let cluster = EtcdCluster::start(3);
    let p = prefix();
    let a = Agent::on_etcd("host-a", &cluster.endpoints_joined(), &p, &[], &[]);
    let holder = Holder::new();
    expect_code(&a.lh(&["acquire", "disk", "--pid", &holder.pid_arg()]), 0);
    let died = death_watch(holder.pid());
    let leader = cluster.leader();
    let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    for i in &others {
        cluster.member(*i).stop();
    }
    // No renewal can be confirmed without quorum: the holder is fenced before ttl passes.
    let died = died.join().unwrap();
    let fenced = a.wait_logged_mono_ns(&["fenced"]);
    assert!(fenced <= died + 50_000_000);
    for i in &others {
        cluster.member(*i).cont();
    }
    cluster.wait_writable(Duration::from_secs(20));
    // Service comes back: the disk can be taken again (dirty: its holder was fenced).
    let h2 = Holder::new();
    let ok = wait_until("service returns", Duration::from_secs(30), || {
        let out = a.lh(&["acquire", "disk", "--accept-dirty", "--pid", &h2.pid_arg()]);
        out.status.success()
    });
    eprintln!("service back {} ms after quorum returned", ok.as_millis());
}

/// The etcd lease of `host`'s session under `prefix`, in hex as `etcdctl` wants it.
fn session_lease(etcd: &Etcd, prefix: &str, host: &str) -> String {
    let out = etcd.etcdctl(&["get", &format!("{prefix}hosts/{host}"), "-w", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    format!(
        "{:x}",
        v["kvs"][0]["lease"]
            .as_i64()
            .expect("the host key has a lease")
    )
}

#[test]
fn a_revoked_session_kills_its_plain_holders_before_another_host_gets_the_disk() {
    let etcd = Etcd::start();
    let p = prefix();
    let a = Agent::on_etcd("host-a", &etcd.endpoint(), &p, &[], &[]);
    let b = Agent::on_etcd("host-b", &etcd.endpoint(), &p, &[], &[]);
    // A plain holder (no run wrapper): only A's agent can stop it.
    let holder = Holder::new();
    expect_code(&a.lh(&["acquire", "disk", "--pid", &holder.pid_arg()]), 0);
    let died = death_watch(holder.pid());
    let lease = session_lease(&etcd, &p, "host-a");
    let out = etcd.etcdctl(&["lease", "revoke", &lease]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (granted, _b_holder) = b_takes_after_check(&b, "disk");
    wait_until("A's holder is dead", Duration::from_secs(10), || {
        !alive(holder.pid())
    });
    let died = died.join().unwrap();
    assert!(
        died < granted,
        "A's holder died at {died} ns, after B's grant at {granted} ns"
    );
    // A opened a new session, and the old holder did not carry on under it.
    wait_until("A has a new session", Duration::from_secs(10), || {
        let out = etcd.etcdctl(&["get", &format!("{p}hosts/host-a"), "--print-value-only"]);
        !text(&out.stdout).trim().is_empty()
    });
    assert_ne!(session_lease(&etcd, &p, "host-a"), lease);
    assert!(a.log().contains("host session ended"), "{}", a.log());
}

/// An agent for `host` on `etcd` with a wide fence margin (ttl 6 s, fence at 3 s): a stall of
/// etcd fences its holders while its session survives, so leases end by the fence alone.
fn wide_margin_agent(host: &str, etcd: &Etcd, prefix: &str) -> Agent {
    let endpoint = etcd.endpoint();
    let mut a = Agent::unstarted(
        host,
        &[
            "--backend",
            "etcd",
            "--etcd-endpoints",
            &endpoint,
            "--etcd-prefix",
            prefix,
            "--ttl",
            "6s",
            "--renew",
            "1s",
            "--fence-margin",
            "3s",
            "--grace",
            "2s",
        ],
        &[],
    );
    a.spawn();
    a
}

#[test]
fn a_fence_kills_exactly_the_current_holders_and_records_them_as_fenced() {
    let etcd = Etcd::start();
    let p = prefix();
    let a = wide_margin_agent("host-a", &etcd, &p);
    let b = Agent::on_etcd("host-b", &etcd.endpoint(), &p, &[], &[]);
    // One process released its lease, one handed its lease over; neither holds anything.
    let released = Holder::new();
    expect_code(&a.lh(&["acquire", "rel", "--pid", &released.pid_arg()]), 0);
    expect_code(&a.lh(&["release", "rel", "--pid", &released.pid_arg()]), 0);
    let (source, dest) = (Holder::new(), Holder::new());
    let src = source.pid_arg();
    expect_code(
        &a.lh(&["acquire", "vm", "--pid", &src, "--owner", "src"]),
        0,
    );
    let waiting = a
        .cli()
        .args(["acquire", "vm", "--wait=30s", "--owner", "dst"])
        .args(["--pid", &dest.pid_arg()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the destination waits", Duration::from_secs(10), || {
        a.inspect("vm")
            .is_some_and(|v| !v["waiters"].as_array().unwrap().is_empty())
    });
    let handover = [
        "release",
        "vm",
        "--pid",
        &src,
        "--handover-to",
        "host-a/dst",
    ];
    expect_code(&a.lh(&handover), 0);
    expect_code(&waiting.wait_with_output().unwrap(), 0);
    // The real holders: the destination, and a plain holder of a disk.
    let holder = Holder::new();
    expect_code(&a.lh(&["acquire", "disk", "--pid", &holder.pid_arg()]), 0);
    let (holder_died, dest_died) = (death_watch(holder.pid()), death_watch(dest.pid()));

    // Subscribed from here on.
    let (mut watch, mut events) = watch_json(&b);
    etcd.stop();
    holder_died.join().unwrap();
    etcd.cont();
    dest_died.join().unwrap();
    wait_until("A logs its fence", Duration::from_secs(10), || {
        a.log().contains("fenced (SIGKILLed)")
    });
    assert!(alive(released.pid()), "a released process was fenced");
    assert!(alive(source.pid()), "a handed-over process was fenced");

    // Every host records the ending as a fence, in the dirty record and in the events.
    for agent in [&a, &b] {
        for r in ["disk", "vm"] {
            wait_until("the ending is recorded", Duration::from_secs(20), || {
                agent.inspect(r).is_some_and(|v| {
                    v["holders"].as_array().unwrap().is_empty()
                        && v["dirty_record"]["how"] == "fenced"
                })
            });
        }
    }
    assert_eq!(a.inspect("rel").unwrap()["last_ended"]["how"], "released");
    let fenced_disk = |events: &[String]| {
        events
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["kind"] == "fenced" && e["resource"] == "disk")
            .count()
    };
    events.wait_until("B's events show the fence", Duration::from_secs(20), |l| {
        fenced_disk(l) > 0
    });
    let _ = watch.kill();
    let _ = watch.wait();
    let all = events.rest(Duration::from_secs(10));
    assert_eq!(fenced_disk(&events.seen), 1, "B's events: {all}");
}

/// Issue 8 item 3: `etcdctl put P/res/NAME junk` while a `run` on A holds the disk once let B
/// take it while A's command still wrote. B is refused, told the key and what to do; A's
/// command is killed; `inspect` says the record is damaged.
#[test]
fn a_junk_record_under_a_run_is_refused_elsewhere_and_its_holder_fenced() {
    let etcd = Etcd::start();
    let p = prefix();
    let a = Agent::on_etcd("host-a", &etcd.endpoint(), &p, &[], &[]);
    let b = Agent::on_etcd("host-b", &etcd.endpoint(), &p, &[], &[]);
    let (_wrapper, child) = run_holder(&a, "disk");
    let key = format!("{p}res/disk");
    let out = etcd.etcdctl(&["put", &key, "junk"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    wait_until("A's command is killed", Duration::from_secs(10), || {
        !alive(child)
    });
    let h = Holder::new();
    let out = b.lh(&["acquire", "disk", "--accept-dirty", "--pid", &h.pid_arg()]);
    assert_ne!(code(&out), 0, "B was granted a disk whose record is junk");
    let err = text(&out.stderr);
    assert!(err.contains(&key), "{err}");
    assert!(
        err.contains("damaged") && err.contains("force-release"),
        "{err}"
    );
    let v = b.inspect("disk").unwrap();
    assert!(
        v["damaged"].as_str().unwrap().contains("does not decode"),
        "{v}"
    );
    let out = b.lh(&["inspect", "disk"]);
    assert!(
        text(&out.stdout).contains("damaged"),
        "{}",
        text(&out.stdout)
    );
    assert!(a.log().contains("fencing its holder"), "{}", a.log());
}

/// Issue 8 item 3: a record deleted, or replaced by a valid record naming no holder, while a
/// `run` on A holds the disk looked free to B until A's agent noticed and fenced its holder:
/// one watch round trip, or as long as A's agent was slow. With A's agent stopped (so it
/// notices nothing), B is refused, told which session holds the disk; once A's agent runs
/// again it fences its holder, and only an admin's `force-release` frees the disk.
#[test]
fn a_record_changed_outside_leasehold_is_refused_before_the_holders_host_notices() {
    let etcd = Etcd::start();
    let p = prefix();
    // A long ttl on A: its session must outlive the stop, or B would rightly take the disk.
    let endpoint = etcd.endpoint();
    let a = agent_with(
        "host-a",
        &endpoint,
        &p,
        &["--ttl", "20s", "--renew", "2s", "--grace", "2s"],
    );
    let b = Agent::on_etcd("host-b", &endpoint, &p, &[], &[]);
    let (_wrapper, child) = run_holder(&a, "disk");
    let key = format!("{p}res/disk");
    let out = etcd.etcdctl(&["get", &key, "--print-value-only"]);
    let held: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let free = serde_json::json!({"holders": [], "last_token": held["last_token"]});
    a.freeze();
    let refused = |what: &str, words: &[&str]| {
        let h = Holder::new();
        let out = b.lh(&["acquire", "disk", "--accept-dirty", "--pid", &h.pid_arg()]);
        assert_ne!(
            code(&out),
            0,
            "B was granted a disk whose record was {what}"
        );
        let err = text(&out.stderr);
        for w in words {
            assert!(err.contains(w), "{what}: no {w:?} in: {err}");
        }
    };
    let out = etcd.etcdctl(&["put", &key, &free.to_string()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    refused(
        "replaced by a free one",
        &["host-a", "without an ending", "force-release"],
    );
    let out = etcd.etcdctl(&["del", &key]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    refused("deleted", &["host-a", "missing", "force-release"]);
    assert!(
        alive(child),
        "A's holder must not be touched while A's agent is stopped"
    );
    signal(a.pid(), libc::SIGCONT);
    wait_until("A fences its holder", Duration::from_secs(15), || {
        !alive(child)
    });
    refused("deleted, its holder fenced", &["force-release"]);
    let out = b.lh(&["force-release", "disk", "--reason", "repaired by the test"]);
    expect_code(&out, 0);
    let h = Holder::new();
    let out = b.lh(&["acquire", "disk", "--accept-dirty", "--pid", &h.pid_arg()]);
    expect_code(&out, 0);
}

// Regression (issue 16): etcd stalls past ttl + grace with a holder on A and a waiter on B. The
// holder is fenced in the stall; B's waiting keys expire with B's session. Once etcd returns,
// B's wait must go on under B's new session (told why) and B must get the disk, checked first
// because A's holder died holding it, within ttl + grace of etcd's return, never while A's
// holder lives.
#[test]
fn after_an_etcd_stall_the_waiting_host_takes_the_disk_over() {
    let etcd = Etcd::start();
    let p = prefix();
    let a = Agent::on_etcd("host-a", &etcd.endpoint(), &p, &[], &[]);
    let b = Agent::on_etcd("host-b", &etcd.endpoint(), &p, &[], &[]);
    let (_a_wrapper, a_child) = run_holder(&a, "disk");
    let a_died = death_watch(a_child);
    let b_pidfile = b.path("disk.child");
    let script = format!("echo $$ > {}; exec sleep 3600", b_pidfile.display());
    let mut b_wrapper = b
        .cli()
        .args([
            "run",
            "--exclusive",
            "disk",
            "--wait=60s",
            "--check",
            "true",
        ])
        .args(["--", "sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("B waits", Duration::from_secs(10), || {
        a.inspect("disk")
            .is_some_and(|v| !v["waiters"].as_array().unwrap().is_empty())
    });
    etcd.stop();
    // The stall itself, the condition under test (not a wait for something): etcd answers
    // nothing for longer than ttl + grace (3 s + 2 s), as in the issue.
    std::thread::sleep(Duration::from_secs(9));
    wait_until("A fences its holder", Duration::from_secs(5), || {
        !alive(a_child)
    });
    let a_died = a_died.join().unwrap();
    let resumed = monotonic_ns();
    etcd.cont();
    wait_until("B's command starts", Duration::from_secs(30), || {
        if let Some(status) = b_wrapper.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(b_wrapper.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("B's run ended ({status}) before its command started:\n{err}");
        }
        std::fs::read_to_string(&b_pidfile).is_ok_and(|s| s.ends_with('\n'))
    });
    let granted = b.wait_logged_mono_ns(&["granted", "resource=disk "]);
    assert!(
        a_died < resumed && a_died < granted,
        "A's holder died at {a_died} ns; etcd returned at {resumed}, B was granted at {granted}"
    );
    let after = Duration::from_nanos(granted - resumed);
    eprintln!("B granted {} ms after etcd returned", after.as_millis());
    // ttl + grace, plus the detection: a renewal interval and etcd's 0.5 s expiry tick, with
    // room for a busy machine.
    assert!(
        after < Duration::from_secs(3 + 2 + 4),
        "B was granted {after:?} after etcd returned\nB's log:\n{}",
        b.log()
    );
    let b_child: u32 = std::fs::read_to_string(&b_pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    signal(b_child, libc::SIGKILL);
    let out = b_wrapper.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert!(err.contains("queued again"), "{err}");
    assert!(err.contains("disk is dirty"), "{err}");
    assert!(err.contains("checked and marked clean"), "{err}");
}

/// `leasehold hosts`: every host's session, as `sanlock client host_status` shows them. A host
/// whose agent is killed shows as expired once its session's TTL has run out.
#[test]
fn hosts_shows_every_session_alive_or_expired_with_its_leases() {
    let etcd = Etcd::start();
    let p = prefix();
    let mut a = Agent::on_etcd("host-a", &etcd.endpoint(), &p, &[], &[]);
    let b = Agent::on_etcd("host-b", &etcd.endpoint(), &p, &[], &[]);
    let (ha, hb) = (Holder::new(), Holder::new());
    for r in ["d1", "d2"] {
        expect_code(&a.lh(&["acquire", r, "--pid", &ha.pid_arg()]), 0);
    }
    expect_code(&b.lh(&["acquire", "d3", "--pid", &hb.pid_arg()]), 0);
    let hosts = |who: &Agent| -> Vec<serde_json::Value> {
        let o = who.lh(&["hosts", "--json"]);
        expect_code(&o, 0);
        serde_json::from_slice::<serde_json::Value>(&o.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    };
    let find = |hs: &[serde_json::Value], h: &str| {
        hs.iter()
            .find(|x| x["host"] == h)
            .unwrap_or_else(|| panic!("{h} missing from {hs:?}"))
            .clone()
    };
    let seen = hosts(&b);
    let (ra, rb) = (find(&seen, "host-a"), find(&seen, "host-b"));
    assert_eq!(
        (ra["alive"].as_bool(), ra["leases"].as_u64()),
        (Some(true), Some(2))
    );
    assert_eq!(
        (rb["alive"].as_bool(), rb["leases"].as_u64()),
        (Some(true), Some(1))
    );
    assert_eq!(rb["this_host"], true);
    assert_eq!(ra["this_host"], false);
    assert_eq!(ra["agent_pid"].as_u64(), Some(u64::from(a.pid())));
    // Renewed every second (renew 1 s) with a 3 s TTL: whole seconds, at most the TTL.
    let (renewed, left) = (ra["renewed_ms_ago"].as_u64(), ra["expires_in_ms"].as_u64());
    assert!(
        renewed.is_some_and(|r| r <= 3000) && left.is_some_and(|l| (1..=3000).contains(&l)),
        "{ra}"
    );
    let human = text(&b.lh(&["hosts"]).stdout);
    assert!(
        human.contains("host-a") && human.contains("alive") && human.contains("(this host)"),
        "{human}"
    );

    // host-a's agent dies: its session is not renewed and expires after its TTL (3 s).
    a.kill9();
    wait_until(
        "host-a's session to expire",
        Duration::from_secs(30),
        || find(&hosts(&b), "host-a")["alive"] == false,
    );
    let ra = find(&hosts(&b), "host-a");
    assert_eq!(ra["leases"].as_u64(), Some(0), "{ra}");
    assert!(
        ra["expires_in_ms"].is_null(),
        "an expired session has no time left: {ra}"
    );
    assert!(ra["since"].is_string(), "when it expired: {ra}");
    assert!(text(&b.lh(&["hosts"]).stdout).contains("expired"));
}
