//! Starting the agent: timing it refuses, its private socket, a stale socket replaced, and
//! readiness sent to systemd.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::*;

#[test]
fn the_agent_refuses_unsafe_timing_naming_the_inequality() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin())
        .args(["agent", "--socket"])
        .arg(dir.path().join("s.sock"))
        .args(["--state-dir"])
        .arg(dir.path().join("state"))
        .args([
            "--ttl",
            "10s",
            "--fence-margin",
            "200ms",
            "--grace",
            "300ms",
        ])
        .output()
        .unwrap();
    expect_code(&out, 2);
    let err = text(&out.stderr);
    assert!(err.contains("fence_margin + grace > kill_timeout"), "{err}");

    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, "ttl = \"10s\"\nrenw = \"1s\"\n").unwrap();
    let out = std::process::Command::new(bin())
        .args(["agent", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    expect_code(&out, 2);
    assert!(text(&out.stderr).contains("renw"), "{}", text(&out.stderr));
}

#[test]
fn the_socket_is_private_and_a_second_agent_is_refused() {
    let a = Agent::start();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&a.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "not world-writable");
    let out = a.command().output().unwrap();
    expect_code(&out, 1);
    assert!(
        text(&out.stderr).contains("already serving"),
        "{}",
        text(&out.stderr)
    );
    // Same state directory, other socket: the store is locked.
    let mut c = a.command();
    let args: Vec<String> = c
        .get_args()
        .map(|s| s.to_string_lossy().into_owned())
        .collect();
    let mut c2 = std::process::Command::new(bin());
    for (i, arg) in args.iter().enumerate() {
        if i > 0 && args[i - 1] == "--socket" {
            c2.arg(a.path("other.sock"));
        } else {
            c2.arg(arg);
        }
    }
    let _ = &mut c;
    let out = c2.output().unwrap();
    expect_code(&out, 1);
    assert!(
        text(&out.stderr).contains("state directory"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_stale_socket_is_replaced() {
    let mut a = Agent::start();
    a.kill9();
    assert!(a.socket.exists(), "kill -9 leaves the socket file");
    a.spawn();
    expect_code(&a.lh(&["status"]), 0);
}

#[test]
fn readiness_is_sent_to_systemd() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut child = std::process::Command::new(bin())
        .args(["agent", "--host-id", "n1", "--socket"])
        .arg(dir.path().join("a.sock"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("NOTIFY_SOCKET", &notify)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).expect("a notification");
    let msg = text(&buf[..n]);
    // Ready means serving: a client gets an answer right away.
    let out = std::process::Command::new(bin())
        .args(["--socket"])
        .arg(dir.path().join("a.sock"))
        .arg("status")
        .output()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(msg.contains("READY=1"), "{msg}");
    expect_code(&out, 0);
}
