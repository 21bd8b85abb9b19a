//! Metrics and health (issue 12 item 4): a live agent's `/metrics` passes `promtool check
//! metrics`, its values follow acquires, refusals, releases and deaths; `/readyz` turns
//! not-ready while etcd does not answer and ready again after; a non-loopback address is
//! refused unless allowed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use leasehold_testkit::Etcd;

/// The address the agent's metrics listener bound (it was given port 0), from its log.
fn metrics_addr(a: &Agent) -> String {
    let mut found = None;
    wait_until(
        "the agent logs its metrics address",
        Duration::from_secs(10),
        || {
            found = a
                .log()
                .lines()
                .find(|l| l.contains("serving metrics"))
                .and_then(|l| l.split("addr=").nth(1))
                .map(|s| s.split_whitespace().next().unwrap_or("").to_owned());
            found.is_some()
        },
    );
    found.unwrap()
}

/// GET `path`: the status code and the body.
fn get(addr: &str, path: &str) -> (u16, String) {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    c.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head}"));
    (code, body.to_owned())
}

/// The value of the sample `name` (with its labels, as printed) in a metrics text.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn metric(addr: &str, name: &str) -> f64 {
    let (code, body) = get(addr, "/metrics");
    assert_eq!(code, 200, "{body}");
    sample(&body, name).unwrap_or_else(|| panic!("no {name} in:\n{body}"))
}

#[track_caller]
fn wait_metric(addr: &str, name: &str, want: f64) {
    let mut last = f64::NAN;
    wait_until(
        &format!("{name} to be {want}"),
        Duration::from_secs(10),
        || {
            last = metric(addr, name);
            last == want
        },
    );
}

fn promtool(body: &str) {
    let mut p = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; scripts/test installs it)");
    p.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}\n{}\n{}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn metrics_follow_leases_and_pass_promtool() {
    let a = Agent::start_with(&["--metrics-listen", "127.0.0.1:0"]);
    let addr = metrics_addr(&a);
    assert_eq!(get(&addr, "/livez").0, 200);
    assert_eq!(get(&addr, "/readyz"), (200, "ready\n".into()));
    assert_eq!(get(&addr, "/nothing").0, 404);

    let h = Holder::new();
    expect_code(&a.lh(&["acquire", "m/x", "--pid", &h.pid_arg()]), 0);
    for r in ["m/s1", "m/s2"] {
        expect_code(&a.lh(&["acquire", r, "--shared", "--pid", &h.pid_arg()]), 0);
    }
    let other = Holder::new();
    expect_code(&a.lh(&["acquire", "m/x", "--pid", &other.pid_arg()]), 3);
    expect_code(
        &a.lh(&["acquire", "m/x", "--wait=200ms", "--pid", &other.pid_arg()]),
        3,
    );
    let (_, body) = get(&addr, "/metrics");
    promtool(&body);
    assert_eq!(
        sample(&body, "leasehold_leases_held{mode=\"exclusive\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&body, "leasehold_leases_held{mode=\"shared\"}"),
        Some(2.0)
    );
    assert_eq!(
        sample(&body, "leasehold_acquires_total{result=\"granted\"}"),
        Some(3.0)
    );
    assert_eq!(
        sample(&body, "leasehold_acquires_total{result=\"busy\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&body, "leasehold_acquires_total{result=\"timed_out\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&body, "leasehold_acquire_wait_seconds_count"),
        Some(1.0)
    );
    assert_eq!(sample(&body, "leasehold_session_confirmed"), Some(1.0));
    assert!(
        body.contains("leasehold_build_info{version=\"") && body.contains("backend=\"local\""),
        "{body}"
    );

    // A clean release, then a holder's death: the ends are counted by how, the dead
    // exclusive holder's resource is dirty, and its exit-to-release latency observed.
    expect_code(&a.lh(&["release", "m/s1", "--pid", &h.pid_arg()]), 0);
    wait_metric(&addr, "leasehold_lease_ends_total{how=\"released\"}", 1.0);
    let mut h = h;
    h.kill9();
    wait_metric(&addr, "leasehold_dirty_resources", 1.0);
    wait_metric(
        &addr,
        "leasehold_lease_ends_total{how=\"process_died\"}",
        2.0,
    );
    wait_metric(&addr, "leasehold_leases_held{mode=\"exclusive\"}", 0.0);
    wait_metric(&addr, "leasehold_leases_held{mode=\"shared\"}", 0.0);
    assert!(metric(&addr, "leasehold_holder_exit_to_release_seconds_count") >= 1.0);
    expect_code(&a.lh(&["acquire", "m/x", "--pid", &other.pid_arg()]), 4);
    let (_, body) = get(&addr, "/metrics");
    assert_eq!(
        sample(&body, "leasehold_acquires_total{result=\"needs_check\"}"),
        Some(1.0)
    );
    assert!(
        sample(
            &body,
            "leasehold_store_operation_seconds_count{op=\"release\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{body}"
    );
    promtool(&body);
}

#[test]
fn readyz_is_not_ready_while_etcd_does_not_answer() {
    let etcd = Etcd::start();
    let prefix = format!("/metrics-{}/", std::process::id());
    let a = Agent::on_etcd(
        "host-m",
        &etcd.endpoint(),
        &prefix,
        &["--metrics-listen", "127.0.0.1:0"],
        &[],
    );
    let addr = metrics_addr(&a);
    assert_eq!(get(&addr, "/readyz").0, 200);
    let (_, body) = get(&addr, "/metrics");
    promtool(&body);
    assert_eq!(sample(&body, "leasehold_session_confirmed"), Some(1.0));
    assert!(sample(&body, "leasehold_session_safe_seconds_left").is_some_and(|s| s > 0.0));
    wait_until("a renewal is observed", Duration::from_secs(10), || {
        metric(&addr, "leasehold_session_renewal_seconds_count") >= 1.0
    });

    // etcd frozen: within the ttl (3 s) the session is no longer confirmed.
    etcd.stop();
    let mut why = String::new();
    wait_until("/readyz to turn not-ready", Duration::from_secs(15), || {
        let (code, body) = get(&addr, "/readyz");
        why = body;
        code == 503
    });
    assert!(why.contains("not ready"), "{why}");
    // (The store stops answering first; the session is unconfirmed once its ttl has run.)
    wait_metric(&addr, "leasehold_session_confirmed", 0.0);
    let (code, why) = get(&addr, "/readyz");
    assert_eq!(code, 503, "{why}");
    assert!(
        why.contains("session is not confirmed") || why.contains("session has ended"),
        "{why}"
    );
    assert!(metric(&addr, "leasehold_session_renewal_failures_total") >= 1.0);
    assert_eq!(get(&addr, "/livez").0, 200, "alive while not ready");

    // etcd back: ready again (on a new session, if the old one expired meanwhile).
    etcd.cont();
    wait_until(
        "/readyz to turn ready again",
        Duration::from_secs(30),
        || get(&addr, "/readyz").0 == 200,
    );
}

#[test]
fn a_metrics_address_off_loopback_needs_its_own_flag() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin())
        .arg("agent")
        .arg("--socket")
        .arg(dir.path().join("a.sock"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--metrics-listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    expect_code(&out, 2);
    let err = text(&out.stderr);
    assert!(
        err.contains("metrics-listen") && err.contains("metrics-allow-remote"),
        "{err}"
    );
    assert!(!dir.path().join("a.sock").exists(), "nothing started");
    for bad in ["localhost", "127.0.0.1", "[::1]:x"] {
        let out = std::process::Command::new(bin())
            .arg("agent")
            .arg("--socket")
            .arg(dir.path().join("a.sock"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(["--metrics-listen", bad])
            .output()
            .unwrap();
        expect_code(&out, 2);
        assert!(
            text(&out.stderr).contains("metrics-listen"),
            "{}",
            text(&out.stderr)
        );
    }
}
