//! The blocking Rust client (`leasehold_client::blocking`): plain `std` calls on the agent's
//! HTTP/JSON API, refusals and release outcomes as data.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Agent, Holder};
use leasehold_client::blocking::{Client, Error, ErrorCode};
use leasehold_client::{AcquireEvent, AcquireOptions, RefusalKind, ReleaseOptions};
use leasehold_core::{Mode, ResourceName};

fn name(s: &str) -> ResourceName {
    ResourceName::new(s).unwrap()
}

fn for_pid(r: &ResourceName, pid: u32) -> AcquireOptions {
    AcquireOptions {
        pid: Some(pid),
        ..AcquireOptions::new([(r.clone(), Mode::Exclusive)])
    }
}

fn release_for(pid: u32) -> ReleaseOptions {
    ReleaseOptions {
        pid: Some(pid),
        ..Default::default()
    }
}

#[test]
fn acquire_wait_watch_and_release_with_plain_std_calls() {
    let a = Agent::start();
    let c = Client::new(&a.socket).with_timeout(Some(Duration::from_secs(30)));
    let (h1, h2) = (Holder::new(), Holder::new());
    let disk = name("disk");

    let mut watch = c.watch(Some(&disk)).unwrap();
    let g = c.acquire(&for_pid(&disk, h1.pid())).unwrap();
    assert_eq!(g.owner.process.pid, h1.pid());
    let token = g.grants[0].token;
    assert_eq!(watch.next().unwrap().unwrap().kind, "granted");
    assert!(c.validate(&disk, token).unwrap().current);

    // Refused: the holder, as data, and the exit code the CLI uses.
    let e = c.acquire(&for_pid(&disk, h2.pid())).unwrap_err();
    let Error::Refused(r) = &e else {
        panic!("not a refusal: {e:?}")
    };
    assert_eq!(r.kind, RefusalKind::Busy);
    let holder = &r.conflict.as_ref().unwrap().holders[0];
    assert_eq!(holder.owner.process.pid, h1.pid());
    assert_eq!((e.code(), e.exit_code().code()), (Some(ErrorCode::Held), 3));

    // A wait reports who is in the way, then is granted when the holder releases.
    let mut o = for_pid(&disk, h2.pid());
    o.wait = Some(Duration::MAX);
    let mut waiting = c.start_acquire(&o).unwrap();
    match waiting.next_event().unwrap() {
        Some(AcquireEvent::Waiting { conflict, .. }) => {
            assert_eq!(conflict.holders[0].owner.process.pid, h1.pid());
        }
        other => panic!("not a waiting report: {other:?}"),
    }
    // Several names: each one's outcome.
    let report = c
        .release(&[disk.clone(), name("never-held")], &release_for(h1.pid()))
        .unwrap();
    assert_eq!(report.released.len(), 1, "{report:?}");
    assert_eq!(report.released[0].resource, disk);
    assert_eq!(report.failed.len(), 1, "{report:?}");
    assert_eq!(report.failed[0].resource, "never-held");
    assert_eq!(report.failed[0].code, ErrorCode::Refused);
    let g2 = waiting.granted().unwrap();
    assert_eq!(g2.owner.process.pid, h2.pid());
    assert!(g2.grants[0].token > token);
    assert_eq!(watch.next().unwrap().unwrap().kind, "released");
    assert_eq!(watch.next().unwrap().unwrap().kind, "granted");

    let view = c.inspect(&disk).unwrap().unwrap();
    assert_eq!(view.holders[0].owner.process.pid, h2.pid());
    assert_eq!(c.list().unwrap().len(), 1);
    assert_eq!(c.status().unwrap().host, "node1");

    // A malformed request as a whole is an error, nothing released.
    let e = c
        .release(
            std::slice::from_ref(&disk),
            &ReleaseOptions {
                dirty: true,
                handover_to: Some("node2".into()),
                ..release_for(h2.pid())
            },
        )
        .unwrap_err();
    assert_eq!(
        (e.code(), e.exit_code().code()),
        (Some(ErrorCode::Usage), 2),
        "{e}"
    );
    assert_eq!(a.holders("disk"), vec![u64::from(h2.pid())]);
}

#[test]
fn an_absent_agent_is_exit_5() {
    let dir = tempfile::tempdir().unwrap();
    let c = Client::new(dir.path().join("none.sock"));
    let e = c.list().unwrap_err();
    assert!(matches!(e, Error::Unreachable { .. }), "{e:?}");
    assert_eq!(e.exit_code().code(), 5);
}

/// The inode of a socket: the same connection has the same one.
fn inode(s: &std::os::unix::net::UnixStream) -> u64 {
    use std::os::fd::AsFd as _;
    use std::os::unix::fs::MetadataExt as _;
    let fd = s.as_fd().try_clone_to_owned().unwrap();
    std::fs::File::from(fd).metadata().unwrap().ino()
}

/// A kept-alive connection makes call after call on one socket (the agent keeps it open);
/// an error answer closes it and the next call connects again; an agent that closed an idle
/// connection is connected to again without the call failing.
#[test]
fn a_kept_alive_connection_serves_call_after_call_on_one_socket() {
    let a = Agent::start_with(&["--request-timeout", "3s"]);
    let c = Client::new(&a.socket).with_timeout(Some(Duration::from_secs(30)));
    let mut conn = c.keep_alive();
    let (h1, h2) = (Holder::new(), Holder::new());
    let disk = name("disk");
    assert!(conn.socket().is_none(), "connects at its first call");
    let mut seen = None;
    for round in 0..5 {
        let g = conn.acquire(&for_pid(&disk, h1.pid())).unwrap();
        assert_eq!(g.owner.process.pid, h1.pid());
        let ino = inode(conn.socket().expect("kept open after an acquire"));
        assert_eq!(
            *seen.get_or_insert(ino),
            ino,
            "round {round}: a new connection"
        );
        assert_eq!(a.holders("disk"), vec![u64::from(h1.pid())]);
        let report = conn
            .release(std::slice::from_ref(&disk), &release_for(h1.pid()))
            .unwrap();
        assert_eq!(report.released.len(), 1, "{report:?}");
        assert_eq!(
            inode(conn.socket().expect("kept open after a release")),
            ino
        );
        assert!(a.holders("disk").is_empty());
    }
    assert_eq!(conn.status().unwrap().host, "node1");
    // Refused: the holder as data, as from the one-call client; the connection is closed.
    c.acquire(&for_pid(&disk, h2.pid())).unwrap();
    let e = conn.acquire(&for_pid(&disk, h1.pid())).unwrap_err();
    let Error::Refused(r) = &e else {
        panic!("not a refusal: {e:?}")
    };
    assert_eq!(r.kind, RefusalKind::Busy);
    assert!(conn.socket().is_none());
    // A hold needs a connection of its own.
    let e = conn
        .acquire(&AcquireOptions {
            hold: true,
            ..for_pid(&disk, h1.pid())
        })
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Usage), "{e}");
    // The agent closes a connection idle past its request timeout; the next call connects
    // again (nothing of it was read by the closed one).
    assert_eq!(conn.status().unwrap().host, "node1");
    let before = inode(conn.socket().unwrap());
    let mut probe = conn.socket().unwrap().try_clone().unwrap();
    probe
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    assert_eq!(
        std::io::Read::read(&mut probe, &mut [0u8; 16]).unwrap(),
        0,
        "the agent closes an idle connection"
    );
    drop(probe);
    c.release(std::slice::from_ref(&disk), &release_for(h2.pid()))
        .unwrap();
    let g = conn.acquire(&for_pid(&disk, h1.pid())).unwrap();
    assert_eq!(g.owner.process.pid, h1.pid());
    assert_ne!(inode(conn.socket().unwrap()), before);
}
