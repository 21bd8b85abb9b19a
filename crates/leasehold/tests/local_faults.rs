//! One host, things going wrong around the agent: a socket path that holds something else,
//! a lost state file, running out of file descriptors (issue 8, items 8-10).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;

/// Starts `a`, expecting it to refuse: returns its log. Fails if it is still running after
/// a generous limit (it would have started serving).
fn start_refused(a: &Agent) -> String {
    let log = std::fs::File::create(a.path("refused.log")).unwrap();
    let mut child = a
        .command()
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut status = None;
    let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until("the agent exits", Duration::from_secs(20), || {
            status = child.try_wait().unwrap();
            status.is_some()
        })
    }));
    if waited.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let text = std::fs::read_to_string(a.path("refused.log")).unwrap();
    let status = status.unwrap_or_else(|| panic!("the agent did not refuse to start:\n{text}"));
    assert!(!status.success(), "the agent exited 0:\n{text}");
    text
}

#[test]
fn a_socket_path_holding_a_regular_file_is_refused_and_left_alone() {
    let a = Agent::unstarted("node1", &[], &[]);
    std::fs::write(&a.socket, b"precious").unwrap();
    let log = start_refused(&a);
    assert!(log.contains("a regular file, not a socket"), "{log}");
    assert!(log.contains("pass another --socket"), "{log}");
    assert_eq!(std::fs::read(&a.socket).unwrap(), b"precious");
}

#[test]
fn a_socket_path_naming_the_state_database_is_refused_and_the_leases_stay() {
    let mut a = Agent::start();
    let h = Holder::new();
    expect_code(&a.lh(&["acquire", "disk", "--pid", &h.pid_arg()]), 0);
    a.stop();
    let db = a.state.join("leasehold.redb");
    let mut wrong = Agent::unstarted("node1", &[], &[]);
    wrong.state = a.state.clone();
    wrong.socket = db.clone();
    let log = start_refused(&wrong);
    assert!(log.contains("not a socket"), "{log}");
    assert!(db.is_file(), "the state database is gone");
    a.spawn();
    assert_eq!(a.holders("disk"), vec![u64::from(h.pid())]);
}

#[test]
fn a_stopping_agent_removes_only_its_own_socket() {
    // Agent A's socket is removed by hand and agent B starts on the same path; stopping A
    // must leave B's socket (and B reachable).
    let mut a = Agent::start();
    std::fs::remove_file(&a.socket).unwrap();
    let mut b = Agent::unstarted("node1", &[], &[]);
    b.socket = a.socket.clone();
    b.spawn();
    a.stop();
    expect_code(&b.lh(&["status"]), 0);
    // B, stopping, removes its own socket.
    b.stop();
    assert!(!b.socket.exists());
}

#[test]
fn an_emptied_or_deleted_state_database_stops_the_agent_from_starting() {
    let mut a = Agent::start();
    let h = Holder::new();
    expect_code(&a.lh(&["acquire", "disk", "--pid", &h.pid_arg()]), 0);
    a.kill9();
    let db = a.state.join("leasehold.redb");
    // Emptied (a bad restore, a full disk) and then deleted: either way the holder still
    // runs, and an agent on an empty store would grant its disk again with token 1.
    std::fs::write(&db, b"").unwrap();
    for round in ["emptied", "deleted"] {
        let log = start_refused(&a);
        assert!(log.contains("is lost"), "{round}: {log}");
        assert!(log.contains("leasehold.id"), "{round}: {log}");
        let _ = std::fs::remove_file(&db);
    }
}
