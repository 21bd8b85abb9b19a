//! One agent on etcd: resuming its session after a restart, fencing stale holders, the
//! watchdog, and renewal cost independent of the number of leases.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::*;
use leasehold_testkit::Etcd;

static N: AtomicU32 = AtomicU32::new(0);

fn prefix() -> String {
    format!(
        "/a{}-{}/",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// `leasehold run --exclusive disk -- sh -c 'exec sleep 3600'` on `a`, its stderr piped: the
/// wrapper, and the command's pid once it runs.
fn run_sleep_holding_disk(a: &Agent) -> (std::process::Child, u32) {
    let pidfile = a.path("child.pid");
    let script = format!("echo $$ > {}; exec sleep 3600", pidfile.display());
    let wrapper = a
        .cli()
        .args(["run", "--exclusive", "disk", "--", "sh", "-c", &script])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (wrapper, wait_pid_file(&pidfile, Duration::from_secs(10)))
}

#[test]
fn a_restarted_agent_resumes_its_session_and_its_run_wrappers_carry_on() {
    let etcd = Etcd::start();
    let p = prefix();
    let mut a = Agent::on_etcd("host-a", &etcd.endpoint(), &p, &[], &[]);
    let (mut wrapper, child) = run_sleep_holding_disk(&a);
    let token = a.inspect("disk").unwrap()["holders"][0]["token"].clone();
    let mut err = Lines::new(wrapper.stderr.take().unwrap());
    let killed = std::time::Instant::now();
    a.restart_after_kill9();
    err.wait_for("reattached", Duration::from_secs(20));
    assert!(a.log().contains("resumed the host session"), "{}", a.log());
    // The condition under test: the command outlives the deadline its wrapper had when the
    // agent died (at most ttl 3 s later), plus a renew interval. Reattached, the wrapper
    // follows the new agent's deadlines; had it not, its own would have killed the command.
    let past_old_deadline = killed + Duration::from_secs(3 + 1);
    std::thread::sleep(past_old_deadline.saturating_duration_since(std::time::Instant::now()));
    assert!(
        alive(child),
        "the command was killed; the wrapper did not reattach"
    );
    let v = a.inspect("disk").unwrap();
    assert_eq!(v["holders"][0]["token"], token, "same lease, same token");
    assert_eq!(v["holders"][0]["pid"], wrapper.id());
    signal(wrapper.id(), libc::SIGTERM);
    let status = wrapper.wait().unwrap();
    assert!(!status.success(), "SIGTERM ends the sleep: a failure exit");
    let err = err.rest(Duration::from_secs(5));
    assert!(err.contains("reattached"), "{err}");
}

#[test]
fn holders_of_a_session_that_ended_while_the_agent_was_down_are_killed_at_start() {
    let etcd = Etcd::start();
    let p = prefix();
    let mut a = Agent::on_etcd("host-a", &etcd.endpoint(), &p, &[], &[]);
    let holder = Holder::new();
    expect_code(&a.lh(&["acquire", "disk", "--pid", &holder.pid_arg()]), 0);
    // The host's key lives on its session's etcd lease: gone from etcd when the session ends.
    let host_key = format!("{p}hosts/host-a");
    let host_key_present = || {
        let out = etcd.etcdctl(&["get", &host_key, "--print-value-only"]);
        assert!(out.status.success(), "etcdctl get: {}", text(&out.stderr));
        !out.stdout.is_empty()
    };
    assert!(
        host_key_present(),
        "the session's key {host_key} is in etcd"
    );
    a.kill9();
    // The session (ttl 3 s) ends while no agent runs; nothing fences the holder meanwhile.
    wait_until("the session ends in etcd", Duration::from_secs(15), || {
        !host_key_present()
    });
    assert!(alive(holder.pid()));
    a.spawn();
    wait_until("the stale holder is killed", Duration::from_secs(5), || {
        !alive(holder.pid())
    });
    assert!(
        a.log().contains("killed a holder whose host session ended"),
        "{}",
        a.log()
    );
}

/// A file standing in for /dev/watchdog: every feed appends a byte.
fn watchdog_file(a_dir: &std::path::Path) -> std::path::PathBuf {
    let p = a_dir.join("watchdog");
    std::fs::write(&p, b"").unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
    p
}

fn feeds(p: &std::path::Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| m.len())
}

#[test]
fn the_watchdog_is_fed_while_all_is_well_and_starved_when_a_holder_survives() {
    let etcd = Etcd::start();
    let p = prefix();
    // The agent runs as nobody, so it cannot SIGKILL root's holder: a holder that survives
    // the kill, for real.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let wd = watchdog_file(dir.path());
    let mut a = Agent::on_etcd_unstarted(
        "host-a",
        &etcd.endpoint(),
        &p,
        &[
            "--watchdog",
            wd.to_str().unwrap(),
            "--watchdog-timeout",
            "1s",
        ],
        &[
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ],
    );
    // The agent's directories are its user's alone (it refuses ones others may write to).
    std::os::unix::fs::chown(a.dir.path(), Some(65534), Some(65534)).unwrap();
    a.spawn();
    wait_until("the watchdog is fed", Duration::from_secs(5), || {
        feeds(&wd) >= 2
    });
    let holder = Holder::new();
    expect_code(&a.lh(&["acquire", "disk", "--pid", &holder.pid_arg()]), 0);
    // etcd stops answering: no renewal, so the agent fences, fails to kill, and starves the
    // watchdog once the session can end.
    etcd.stop();
    wait_until("the watchdog starves", Duration::from_secs(15), || {
        a.log().contains("stopped feeding the watchdog")
    });
    let starved_at = feeds(&wd);
    // The condition under test is an absence: no feed for twice the watchdog timeout.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(feeds(&wd), starved_at, "no feed after starving");
    assert!(
        alive(holder.pid()),
        "the holder survived (that is the point)"
    );
    assert!(a.log().contains("survived SIGKILL"), "{}", a.log());
    etcd.cont();
}

#[test]
fn the_watchdog_keeps_being_fed_when_fenced_holders_die() {
    let etcd = Etcd::start();
    let p = prefix();
    let dir = tempfile::tempdir().unwrap();
    let wd = watchdog_file(dir.path());
    let a = Agent::on_etcd(
        "host-a",
        &etcd.endpoint(),
        &p,
        &[
            "--watchdog",
            wd.to_str().unwrap(),
            "--watchdog-timeout",
            "1s",
        ],
        &[],
    );
    let holder = Holder::new();
    expect_code(&a.lh(&["acquire", "disk", "--pid", &holder.pid_arg()]), 0);
    etcd.stop();
    wait_until("the holder is fenced", Duration::from_secs(10), || {
        !alive(holder.pid())
    });
    // Past the moment the agent judges whether the fenced holders are dead (the session's
    // end), the watchdog is still fed.
    wait_until(
        "the agent finds the fenced holder dead",
        Duration::from_secs(10),
        || a.log().contains("every fenced holder is dead"),
    );
    let before = feeds(&wd);
    wait_until("a feed after the judgement", Duration::from_secs(5), || {
        feeds(&wd) > before
    });
    assert!(!a.log().contains("stopped feeding"), "{}", a.log());
    etcd.cont();
}

/// etcd's own count of lease renewals seen by the leader.
fn renewals(etcd: &Etcd) -> u64 {
    let port = etcd.endpoint().rsplit(':').next().unwrap().to_owned();
    let mut s = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
    use std::io::{Read, Write};
    write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix("etcd_debugging_lease_renewed_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .expect("etcd exposes its lease renewals") as u64
}

#[test]
fn ten_thousand_leases_cost_one_keep_alive_per_renew_interval() {
    let etcd = Etcd::start();
    let p = prefix();
    let a = Agent::on_etcd("host-a", &etcd.endpoint(), &p, &[], &[]);
    let holder = Holder::new();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let started = std::time::Instant::now();
    rt.block_on(async {
        // 10,000 leases for one process, 40 resources a request, 16 requests at a time.
        let mut tasks = Vec::new();
        for w in 0..16u32 {
            let socket = a.socket.clone();
            let pid = holder.pid();
            tasks.push(tokio::spawn(async move {
                let c = leasehold_client::Client::connect(&socket).await.unwrap();
                let mut batch = w;
                while batch < 250 {
                    let items = (0..40).map(|i| {
                        let r = format!("many/{}", batch * 40 + i);
                        (
                            leasehold_core::ResourceName::new(r).unwrap(),
                            leasehold_core::Mode::Exclusive,
                        )
                    });
                    let mut o = leasehold_client::AcquireOptions::new(items);
                    o.pid = Some(pid);
                    c.acquire(o).await.unwrap();
                    batch += 16;
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    let took = started.elapsed();
    let out = a.lh(&["status", "--json"]);
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["leases"], 10_000);
    let before = renewals(&etcd);
    // A measuring window, not a wait: keep-alives counted over 5 s.
    std::thread::sleep(Duration::from_secs(5));
    let after = renewals(&etcd);
    let rss_kib = std::fs::read_to_string(format!("/proc/{}/status", a.pid()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap();
    eprintln!(
        "10,000 leases taken in {:.1} s; {} keep-alives in 5 s (renew 1 s); agent RSS {} MiB",
        took.as_secs_f64(),
        after - before,
        rss_kib / 1024
    );
    // One per renew interval (1 s): about 5, whatever the number of leases; never one per
    // lease. The bounds leave room for a busy machine, where a late renewal (fewer) or one
    // retried after a timeout (a few more) is not what this test is about.
    assert!(
        (1..=10).contains(&(after - before)),
        "{} renewals in 5 s for 10,000 leases",
        after - before
    );
}

// Issue 8 item 6: `status` shows the real etcd session, also while etcd does not answer, and
// the agent keeps saying so in its log while renewals fail.
#[test]
fn status_shows_the_host_session_also_while_etcd_is_unreachable() {
    let etcd = Etcd::start();
    let p = prefix();
    let a = Agent::on_etcd("host-a", &etcd.endpoint(), &p, &[], &[]);
    let status = || -> serde_json::Value {
        let out = a.lh(&["status", "--json"]);
        expect_code(&out, 0);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    wait_until(
        "two renewals are confirmed",
        Duration::from_secs(15),
        || {
            status()["host_session"]["renewal_latency_us"]
                .as_array()
                .is_some_and(|l| l.len() >= 2)
        },
    );
    let s = status();
    let h = &s["host_session"];
    let out = etcd.etcdctl(&["get", &format!("{p}hosts/host-a"), "-w", "json"]);
    let key: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let lease = format!("{:x}", key["kvs"][0]["lease"].as_i64().unwrap());
    assert_eq!(h["lease_id"], lease.as_str(), "{s}");
    assert_eq!(h["ttl_ms"], 3000, "{s}");
    assert!(h["last_renewal_ms_ago"].as_u64().unwrap() < 3000, "{s}");
    assert!(h["safe_for_ms"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(h["expired"], false, "{s}");
    assert!(s["backend_error"].is_null(), "{s}");
    // Issue 12 item 5: the renewal history, each with its outcome, time and round trip.
    let outcomes = |h: &serde_json::Value, what: &str| -> Vec<serde_json::Value> {
        h["renewals"]
            .as_array()
            .unwrap_or_else(|| panic!("no renewals in {h}"))
            .iter()
            .filter(|r| r["outcome"] == what)
            .cloned()
            .collect()
    };
    let confirmed = outcomes(h, "confirmed");
    assert!(!confirmed.is_empty(), "{s}");
    for r in &confirmed {
        assert!(r["latency_us"].as_u64().is_some_and(|us| us > 0), "{s}");
        assert!(r["at"].is_string() && r["at_ms"].as_u64().is_some(), "{s}");
    }

    etcd.stop();
    let warning = "etcd is not answering session renewals";
    wait_until("the agent warns twice", Duration::from_secs(15), || {
        a.log().matches(warning).count() >= 2
    });
    let s = status();
    let out = a.lh(&["status"]);
    etcd.cont();
    let h = &s["host_session"];
    assert_eq!(h["lease_id"], lease.as_str(), "{s}");
    assert!(h["failed_renewals"].as_u64().unwrap() >= 1, "{s}");
    let failed = outcomes(h, "failed");
    assert!(!failed.is_empty(), "{s}");
    assert!(failed.iter().all(|r| r["latency_us"].is_null()), "{s}");
    assert!(h["last_renewal_ms_ago"].as_u64().unwrap() >= 1000, "{s}");
    assert!(s["backend_error"].is_string(), "{s}");
    expect_code(&out, 0);
    let text_out = text(&out.stdout);
    assert!(
        text_out.contains(&format!("etcd lease {lease}")),
        "{text_out}"
    );
    assert!(text_out.contains("leases:   unknown"), "{text_out}");
}

// Regression (issue 16, item 2): a `run --wait` whose agent restarted while it waited exited
// ("the agent closed the request"), and the dead agent's waiting keys stayed in the queue on
// the session the new agent resumed. The wrapper must ask the restarted agent again within its
// deadline, say so, and get the disk once it is free.
#[test]
fn a_run_waiting_through_an_agent_restart_asks_again_and_gets_the_disk() {
    let etcd = Etcd::start();
    let p = prefix();
    let mut a = Agent::on_etcd("host-a", &etcd.endpoint(), &p, &[], &[]);
    let holder = Holder::new();
    expect_code(&a.lh(&["acquire", "disk", "--pid", &holder.pid_arg()]), 0);
    let pidfile = a.path("child.pid");
    let script = format!("echo $$ > {}; exec sleep 3600", pidfile.display());
    let mut wrapper = a
        .cli()
        .args(["run", "--exclusive", "disk", "--wait=60s"])
        .args(["--", "sh", "-c", &script])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the run waits", Duration::from_secs(10), || {
        a.inspect("disk")
            .is_some_and(|v| !v["waiters"].as_array().unwrap().is_empty())
    });
    a.restart_after_kill9();
    expect_code(&a.lh(&["release", "disk", "--pid", &holder.pid_arg()]), 0);
    wait_until("the command starts", Duration::from_secs(30), || {
        if let Some(status) = wrapper.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(wrapper.stderr.as_mut().unwrap(), &mut err).unwrap();
            panic!("the run ended ({status}) before its command started:\n{err}");
        }
        std::fs::read_to_string(&pidfile).is_ok_and(|s| s.ends_with('\n'))
    });
    let child: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(a.holders("disk"), vec![u64::from(wrapper.id())]);
    signal(child, libc::SIGTERM);
    let out = wrapper.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert!(err.contains("asking again"), "{err}");
}

/// A revocable holder (issue 14 item 3): a Python service, through the `leasehold` package
/// of this tree, that takes `lock` with `on_lost="revoke"`, prints `token N`, then answers
/// each line on its stdin with `owner True|False` (`is_still_owner()`); when stdin closes it
/// releases and prints how that went.
const REVOCABLE: &str = r#"
import sys, leasehold
c = leasehold.Client()
lease = c.acquire("lock", on_lost="revoke")
print("token", lease.tokens["lock"], flush=True)
for _ in sys.stdin:
    print("owner", lease.is_still_owner(), flush=True)
try:
    lease.release()
    print("released", flush=True)
except leasehold.LeaseLost as e:
    print("lost:", e, flush=True)
"#;

/// The revocable service under `a`: the child, its stdin and its output lines, and its token.
fn revocable_holder(a: &Agent) -> (std::process::Child, std::process::ChildStdin, Lines, u64) {
    let python = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../python");
    let mut child = std::process::Command::new("python3")
        .args(["-c", REVOCABLE])
        .env("PYTHONPATH", python)
        .env("LEASEHOLD_SOCKET", &a.socket)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 runs");
    let stdin = child.stdin.take().unwrap();
    let mut out = Lines::new(child.stdout.take().unwrap());
    let line = out.wait_for("token ", Duration::from_secs(30));
    let token = line.trim().rsplit(' ').next().unwrap().parse().unwrap();
    (child, stdin, out, token)
}

/// Asks the service whether it still owns its lease.
fn still_owner(stdin: &mut std::process::ChildStdin, out: &mut Lines) -> String {
    use std::io::Write;
    out.seen.clear();
    writeln!(stdin, "check").unwrap();
    out.wait_for("owner ", Duration::from_secs(30))
        .trim()
        .to_owned()
}

/// Whether `token` of `lock` is valid, by the agent's `validate` (exit 0: valid).
fn validates(a: &Agent, token: u64) -> bool {
    a.lh(&["validate", "lock", &token.to_string()])
        .status
        .success()
}

/// The lease of the revocable service ended in etcd, and is nobody's now: as fenced (the
/// agent ended it) or as its session's expiry (etcd ended the session first).
fn revoked_lease_recorded(a: &Agent, token: u64) {
    let mut last = None;
    let recorded = |v: &serde_json::Value| {
        v["holders"].as_array().is_some_and(Vec::is_empty)
            && v["last_ended"]["token"] == token
            && ["fenced", "session-expired"]
                .contains(&v["last_ended"]["how"].as_str().unwrap_or(""))
    };
    let limit = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < limit {
        last = a.inspect("lock");
        if last.as_ref().is_some_and(recorded) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "the revoked lease's end is not recorded in 30 s: {last:?}\n{}",
        a.log()
    );
}

/// The service finishes: its release is refused as lost, and it exits by itself.
fn service_ends_told_lost(
    mut child: std::process::Child,
    stdin: std::process::ChildStdin,
    mut out: Lines,
) {
    drop(stdin);
    let line = out.wait_for("lost:", Duration::from_secs(30));
    assert!(line.contains("lock"), "{line}");
    assert!(child.wait().unwrap().success());
}

/// Issue 14 item 3, on etcd: when etcd says the host session ended, a holder whose leases
/// asked `on_lost = revoke` is not killed: it is told (`is_still_owner()` false), its lease
/// ends as fenced, and `validate` refuses its token under the new session; a plain holder
/// beside it is still SIGKILLed (G3 unchanged for it).
#[test]
fn an_ended_session_revokes_the_leases_of_revocable_holders_and_kills_the_others() {
    let etcd = Etcd::start();
    let p = prefix();
    let a = Agent::on_etcd("host-a", &etcd.endpoint(), &p, &[], &[]);
    let plain = Holder::new();
    expect_code(&a.lh(&["acquire", "disk", "--pid", &plain.pid_arg()]), 0);
    let (service, mut stdin, mut out, token) = revocable_holder(&a);
    assert_eq!(still_owner(&mut stdin, &mut out), "owner True");
    assert!(validates(&a, token));
    let key = format!("{p}hosts/host-a");
    let lease = |etcd: &Etcd| {
        let out = etcd.etcdctl(&["get", &key, "-w", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["kvs"][0]["lease"].as_i64()
    };
    let old = lease(&etcd).expect("the host key is on the session's lease");
    let out_revoke = etcd.etcdctl(&["lease", "revoke", &format!("{old:x}")]);
    assert!(out_revoke.status.success(), "{}", text(&out_revoke.stderr));
    wait_until(
        "the plain holder is killed",
        Duration::from_secs(15),
        || !alive(plain.pid()),
    );
    wait_until("a new session is open", Duration::from_secs(15), || {
        lease(&etcd).is_some_and(|l| l != old)
    });
    revoked_lease_recorded(&a, token);
    assert!(alive(service.id()), "the revocable holder lives on");
    assert_eq!(still_owner(&mut stdin, &mut out), "owner False");
    assert!(!validates(&a, token), "the old token is refused");
    let log = a.log();
    assert!(log.contains("holder not killed"), "{log}");
    service_ends_told_lost(service, stdin, out);
}

/// Issue 14 item 3, on etcd: when renewals fail until the fence deadline (etcd frozen), the
/// revocable holder is told at once: `validate` refuses its token while etcd still does not
/// answer; its lease ends as fenced once etcd is back. The plain holder beside it is killed.
#[test]
fn a_fence_revokes_revocable_holders_at_once_while_etcd_is_unreachable() {
    let etcd = Etcd::start();
    let p = prefix();
    let a = Agent::on_etcd("host-a", &etcd.endpoint(), &p, &[], &[]);
    let plain = Holder::new();
    expect_code(&a.lh(&["acquire", "disk", "--pid", &plain.pid_arg()]), 0);
    let (service, mut stdin, mut out, token) = revocable_holder(&a);
    assert_eq!(still_owner(&mut stdin, &mut out), "owner True");
    etcd.stop();
    wait_until(
        "the plain holder is fenced",
        Duration::from_secs(15),
        || !alive(plain.pid()),
    );
    // etcd still answers nothing: the agent refuses the token from what it revoked.
    assert_eq!(still_owner(&mut stdin, &mut out), "owner False");
    assert!(!validates(&a, token), "the old token is refused");
    assert!(alive(service.id()), "the revocable holder lives on");
    etcd.cont();
    revoked_lease_recorded(&a, token);
    assert!(!validates(&a, token));
    service_ends_told_lost(service, stdin, out);
}

/// The agent is killed and what answers at its socket next accepts the wrapper's connection
/// but never answers (an agent restarted and hung): the wrapper's reattach gives up at its
/// leases' safe-until, and the command is dead by then (ttl 3 s after the last renewal), not
/// after the CLI's 30 s call timeout.
#[test]
fn a_run_whose_agent_restarts_hung_kills_its_command_by_the_safe_until() {
    let etcd = Etcd::start();
    let mut a = Agent::on_etcd("host-a", &etcd.endpoint(), &prefix(), &[], &[]);
    let (mut wrapper, child) = run_sleep_holding_disk(&a);
    let mut err = Lines::new(wrapper.stderr.take().unwrap());
    a.kill9();
    let killed = std::time::Instant::now();
    // A listener that never accepts: connections queue, requests are never answered.
    let _ = std::fs::remove_file(&a.socket);
    let _hung = std::os::unix::net::UnixListener::bind(&a.socket).unwrap();
    err.wait_for("lost contact", Duration::from_secs(10));
    wait_until(
        "the command is killed by its safe-until",
        Duration::from_secs(3 + 3),
        || !alive(child),
    );
    let status = wrapper.wait().unwrap();
    assert!(!status.success());
    assert!(
        killed.elapsed() < Duration::from_secs(20),
        "the wrapper waited for the hung agent"
    );
    let err = err.rest(Duration::from_secs(5));
    assert!(err.contains("did not confirm"), "{err}");
}

/// The agent is SIGKILLed after the grant and before any `safe` line reached the wrapper (the
/// agent's test-only `LEASEHOLD_TEST_HOLD_BACK_SAFE=1` holds them back, making the window
/// certain): the wrapper knows the safe-until from the `granted` line itself and kills its
/// command by it, `ttl - fence_margin` (2.4 s) after the last renewal, before another host may
/// be granted the disk (`ttl + grace`, 5 s, after it). Before, the wrapper had no deadline
/// until a `safe` line: it retried to reattach forever while the command kept running.
#[test]
fn a_run_whose_agent_dies_before_any_safe_line_kills_its_command_by_the_grants_safe_until() {
    let etcd = Etcd::start();
    let hold_back = ["env", "LEASEHOLD_TEST_HOLD_BACK_SAFE=1"];
    let mut a = Agent::on_etcd("host-a", &etcd.endpoint(), &prefix(), &[], &hold_back);
    let (mut wrapper, child) = run_sleep_holding_disk(&a);
    // Should the wrapper not kill its command, the failing test leaves neither behind.
    let mut leftovers = KillOnDrop(vec![wrapper.id(), child]);
    let mut err = Lines::new(wrapper.stderr.take().unwrap());
    let died = death_watch(child);
    let killed = monotonic_ns();
    a.kill9();
    err.wait_for("lost contact", Duration::from_secs(10));
    wait_until(
        "the command is killed by the grant's safe-until",
        Duration::from_secs(15),
        || !alive(child),
    );
    // Dead, and the wrapper not yet reaped: no pid of theirs can be another process's.
    leftovers.0.clear();
    let died = died.join().unwrap();
    // The last renewal was sent before the kill, so the safe-until is at most 2.4 s after
    // it; 3.5 s leaves room for a busy machine and is still short of ttl + grace.
    assert!(
        died < killed + 3_500_000_000,
        "the command died {} ms after the agent",
        (died - killed) / 1_000_000
    );
    let status = wrapper.wait().unwrap();
    assert!(!status.success());
    let err = err.rest(Duration::from_secs(5));
    assert!(err.contains("did not confirm"), "{err}");
}

/// `run --check 'sleep 3'` on a dirty disk with ttl 3 s: the check outlasts the safe-until
/// the grant carried (at most 2.4 s after it). With the agent renewing and its `safe` lines
/// reaching the wrapper meanwhile, the command starts: the wrapper reads them before it
/// decides. With them held back (test-only `LEASEHOLD_TEST_HOLD_BACK_SAFE=1`), the wrapper
/// knows of nothing after the passed safe-until: it does not start the command, says why, and
/// releases the disk clean. Before, it started it with no deadline at all.
#[test]
fn run_does_not_start_its_command_once_the_grants_safe_until_has_passed() {
    let etcd = Etcd::start();
    let hold_back = ["env", "LEASEHOLD_TEST_HOLD_BACK_SAFE=1"];
    for (wrap, starts) in [(&[][..], true), (&hold_back[..], false)] {
        let a = Agent::on_etcd("host-a", &etcd.endpoint(), &prefix(), &[], wrap);
        expect_code(&a.lh(&["run", "--exclusive", "disk", "--", "false"]), 1);
        assert!(a.is_dirty("disk"));
        let marker = a.path("started");
        let out = a.lh(&[
            "run",
            "--check",
            "sleep 3",
            "--exclusive",
            "disk",
            "--",
            "touch",
            marker.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(marker.exists(), starts, "{wrap:?}: {err}");
        if starts {
            expect_code(&out, 0);
        } else {
            expect_code(&out, 1);
            assert!(
                err.contains("did not confirm") && err.contains("not started"),
                "{err}"
            );
        }
        // Checked and marked clean; released clean either way (nothing ran, or touch).
        assert!(a.holders("disk").is_empty(), "{err}");
        assert!(!a.is_dirty("disk"), "{err}");
    }
}

/// SIGKILLs these processes when dropped (a test that fails half-way).
struct KillOnDrop(Vec<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for pid in &self.0 {
            signal(*pid, libc::SIGKILL);
        }
    }
}

/// A process holding more leases than one etcd transaction can end (etcd allows 128
/// operations, and ending a lease takes three) has them all ended when it exits, in several
/// transactions. Before, ending them was refused as a request naming too many resources, and
/// the 60 leases stayed held by the dead process.
#[test]
fn a_process_holding_sixty_leases_has_them_all_ended_when_it_dies() {
    let etcd = Etcd::start();
    let a = Agent::on_etcd("host-a", &etcd.endpoint(), &prefix(), &[], &[]);
    let mut h = Holder::new();
    let names: Vec<String> = (0..60).map(|i| format!("disk/{i}")).collect();
    for r in &names {
        expect_code(&a.lh(&["acquire", r, "--pid", &h.pid_arg()]), 0);
    }
    // Resources held, from one `list --json`.
    let held = |a: &Agent| {
        let list = a.list();
        list.as_array()
            .or_else(|| list["resources"].as_array())
            .expect("list --json: an array of resources")
            .iter()
            .filter(|r| r["holders"].as_array().is_some_and(|h| !h.is_empty()))
            .count()
    };
    assert_eq!(held(&a), 60);
    h.kill9();
    wait_until(
        "the dead process's 60 leases end",
        Duration::from_secs(20),
        || held(&a) == 0,
    );
    assert!(
        !a.log()
            .contains("ending the leases of an exited process failed"),
        "{}",
        a.log()
    );
}
