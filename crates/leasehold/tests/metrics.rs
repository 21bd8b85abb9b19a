//! Metrics and health (issue 12 item 4): a live agent's `/metrics` passes `promtool check
//! metrics`, its values follow acquires, refusals, releases and deaths; `/readyz` turns
//! not-ready while etcd does not answer and ready again after; a non-loopback address is
//! refused unless allowed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;
use leasehold_testkit::Etcd;

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
    // Every count with a fixed label set is there from the start, at 0: a scrape before the
    // first release shows none yet, not no such count.
    let (_, body) = get(&addr, "/metrics");
    for name in [
        "leasehold_lease_ends_total{how=\"released\"}",
        "leasehold_lease_ends_total{how=\"handed_over\"}",
        "leasehold_acquires_total{result=\"withdrawn\"}",
        "leasehold_grant_deliveries_total{outcome=\"unread\"}",
        "leasehold_store_operation_seconds_count{op=\"release\"}",
    ] {
        assert_eq!(sample(&body, name), Some(0.0), "{name} in:\n{body}");
    }

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
