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

/// The command prefix that runs the agent with at most 64 open files (soft and hard, so
/// the agent cannot raise it).
const FEW_FDS: &[&str] = &["prlimit", "--nofile=64:64"];

/// What one `acquire` of the fd test answered: its exit code and stderr.
fn acquire_all(a: &Agent, holders: &[Holder], resource: impl Fn(usize) -> String) -> Vec<i32> {
    let children: Vec<_> = holders
        .iter()
        .enumerate()
        .map(|(i, h)| {
            a.cli()
                .args(["acquire", &resource(i), "--pid", &h.pid_arg()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            let code = code(&out);
            if code != 0 && code != 3 {
                let err = text(&out.stderr);
                assert!(
                    err.contains("file descriptors") || err.contains("connect"),
                    "unexpected refusal (exit {code}): {err}"
                );
            }
            code
        })
        .collect()
}

#[test]
fn running_out_of_file_descriptors_never_ends_a_live_processs_lease() {
    let a = Agent::launch("node1", &[], FEW_FDS);
    let holders: Vec<Holder> = (0..80).map(|_| Holder::new()).collect();
    // Each process its own resource: 80 grants need 80 pidfds, more than the agent has.
    let codes = acquire_all(&a, &holders, |i| format!("vm{i}"));
    assert!(codes.contains(&0), "nothing was granted: {codes:?}");
    // Then all of them at once for one resource.
    let one = acquire_all(&a, &holders, |_| "disk".into());
    assert!(one.iter().filter(|c| **c == 0).count() <= 1, "{one:?}");
    // Every answer is in: a lease ended for want of a pidfd would have been logged by now.
    let log = a.log();
    assert!(!log.contains("ending its leases"), "{log}");
    // The limit was really reached (else this test shows nothing).
    assert!(
        codes.iter().any(|c| *c != 0) || log.contains("out of file descriptors"),
        "{codes:?}\n{log}"
    );
    let listed = a.list();
    let by_resource = |r: &str| {
        listed
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["resource"] == r)
            .cloned()
    };
    for (i, h) in holders.iter().enumerate() {
        let r = format!("vm{i}");
        if codes[i] == 0 {
            assert_eq!(a.holders(&r), vec![u64::from(h.pid())], "{r}:\n{log}");
        }
        // A lease ended while its process lives would have left the resource dirty.
        assert!(!a.is_dirty(&r), "{r} dirty: {:?}", by_resource(&r));
        assert!(alive(h.pid()));
    }
    let disk = a.holders("disk");
    assert!(disk.len() <= 1);
    assert!(!a.is_dirty("disk"), "disk dirty: {:?}", by_resource("disk"));
    for (i, c) in one.iter().enumerate() {
        if *c == 0 {
            assert_eq!(disk, vec![u64::from(holders[i].pid())]);
        }
    }
}

#[test]
fn readopting_holders_with_too_few_file_descriptors_keeps_their_leases() {
    let mut a = Agent::start();
    let holders: Vec<Holder> = (0..80).map(|_| Holder::new()).collect();
    for (i, h) in holders.iter().enumerate() {
        expect_code(
            &a.lh(&["acquire", &format!("vm{i}"), "--pid", &h.pid_arg()]),
            0,
        );
    }
    a.kill9();
    // Restarted with fewer descriptors than holders: it cannot watch them all.
    a.wrap = FEW_FDS.iter().map(|s| s.to_string()).collect();
    let log = std::fs::File::create(a.path("few.log")).unwrap();
    let mut child = a
        .command()
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let few = || std::fs::read_to_string(a.path("few.log")).unwrap();
    wait_until(
        "the agent finds it cannot watch every holder",
        Duration::from_secs(30),
        || few().contains("cannot watch"),
    );
    let _ = child.kill();
    let _ = child.wait();
    let text = few();
    assert!(!text.contains("ending its leases"), "{text}");
    assert!(!text.contains("lease ended"), "{text}");
    a.wrap.clear();
    a.spawn();
    for (i, h) in holders.iter().enumerate() {
        let r = format!("vm{i}");
        assert_eq!(a.holders(&r), vec![u64::from(h.pid())], "{r}:\n{text}");
        assert!(!a.is_dirty(&r));
    }
}

#[test]
fn holders_the_agent_could_not_watch_are_fenced_too() {
    let etcd = leasehold_testkit::Etcd::start();
    let prefix = format!("/fds{}/", std::process::id());
    let mut a = Agent::on_etcd("host-a", &etcd.endpoint(), &prefix, &[], &[]);
    let holders: Vec<Holder> = (0..80).map(|_| Holder::new()).collect();
    for (i, h) in holders.iter().enumerate() {
        expect_code(
            &a.lh(&["acquire", &format!("vm{i}"), "--pid", &h.pid_arg()]),
            0,
        );
    }
    a.kill9();
    // Restarted (within the session's ttl) with fewer descriptors than holders.
    a.wrap = FEW_FDS.iter().map(|s| s.to_string()).collect();
    let log = std::fs::File::create(a.path("few.log")).unwrap();
    let mut child = a
        .command()
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let few = || std::fs::read_to_string(a.path("few.log")).unwrap();
    wait_until(
        "the agent finds it cannot watch every holder",
        Duration::from_secs(30),
        || few().contains("cannot watch a holder yet"),
    );
    // Its session cannot be renewed: every holder must die, watched or not.
    etcd.stop();
    let all_dead = std::panic::catch_unwind(|| {
        wait_until("every holder is fenced", Duration::from_secs(15), || {
            holders.iter().all(|h| !alive(h.pid()))
        })
    });
    etcd.cont();
    let _ = child.kill();
    let _ = child.wait();
    let survivors: Vec<u32> = holders
        .iter()
        .map(Holder::pid)
        .filter(|p| alive(*p))
        .collect();
    assert!(
        all_dead.is_ok(),
        "survived the fence: {survivors:?}\n{}",
        few()
    );
}
