//! Stopping the agent (SIGTERM, as systemd does) with clients connected: it exits at once,
//! closing their streams; `run` wrappers keep their commands running and reattach to the next
//! agent, waiters ask the next agent again, and every lease stays with its process.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

/// Sends each line of `r` down a channel, from a thread.
fn lines(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                return;
            }
        }
    });
    rx
}

/// Waits for a line containing `word`, returning every line read meanwhile.
#[track_caller]
fn expect_line(rx: &mpsc::Receiver<String>, word: &str, limit: Duration) -> Vec<String> {
    let end = Instant::now() + limit;
    let mut seen = Vec::new();
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => {
                let hit = l.contains(word);
                seen.push(l);
                if hit {
                    return seen;
                }
            }
            Err(e) => panic!("no line with {word:?} within {limit:?} ({e}); saw {seen:?}"),
        }
    }
}

#[test]
fn sigterm_with_a_wrapper_a_watch_and_a_waiter_connected_stops_at_once_and_leases_stay() {
    let mut a = Agent::start();
    // A `run` wrapper holding "disk", its command recording its pid.
    let pidfile = a.path("child.pid");
    let script = format!("echo $$ > {}; exec sleep 3600", pidfile.display());
    let mut wrapper = a
        .cli()
        .args(["run", "--exclusive", "disk", "--", "sh", "-c", &script])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let wrapper_err = lines(wrapper.stderr.take().unwrap());
    let child = wait_pid_file(&pidfile, Duration::from_secs(20));
    let token = a.inspect("disk").unwrap()["holders"][0]["token"].clone();

    // A watch, seen to be connected: it reports a probe lease.
    let mut watch = a.cli().arg("watch").stdout(Stdio::piped()).spawn().unwrap();
    let watch_out = lines(watch.stdout.take().unwrap());
    let probe = Holder::new();
    wait_until(
        "the watch reports the probe",
        Duration::from_secs(20),
        || {
            expect_code(&a.lh(&["acquire", "probe", "--pid", &probe.pid_arg()]), 0);
            expect_code(&a.lh(&["release", "probe", "--pid", &probe.pid_arg()]), 0);
            watch_out.try_iter().any(|l| l.contains("probe"))
        },
    );

    // A waiter, queued behind another holder.
    let blocker = Holder::new();
    let waiting = Holder::new();
    expect_code(&a.lh(&["acquire", "queue", "--pid", &blocker.pid_arg()]), 0);
    let mut waiter = a
        .cli()
        .args([
            "acquire",
            "queue",
            "--wait=120s",
            "--pid",
            &waiting.pid_arg(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the waiter queues", Duration::from_secs(20), || {
        a.inspect("queue").unwrap()["waiters"]
            .as_array()
            .is_some_and(|w| !w.is_empty())
    });

    // Stop, as systemd does.
    let took = a.stop_within(Duration::from_secs(30));
    println!(
        "the agent stopped {took:?} after SIGTERM with a wrapper, a watch and a waiter connected"
    );
    assert!(
        took < Duration::from_secs(2),
        "stopping took {took:?}\n{}",
        a.log()
    );
    assert!(
        a.log().contains("agent stopped"),
        "a clean stop, logged:\n{}",
        a.log()
    );
    // The watch's stream was closed: it ends rather than hanging.
    wait_until("the watch ends", Duration::from_secs(10), || {
        watch.try_wait().unwrap().is_some()
    });
    assert!(alive(child), "the wrapped command keeps running");
    assert!(wrapper.try_wait().unwrap().is_none(), "the wrapper too");
    assert!(
        waiter.try_wait().unwrap().is_none(),
        "the waiter keeps waiting"
    );

    // The next agent: the wrapper reattaches to the same lease, the waiter asks again.
    a.spawn();
    expect_line(&wrapper_err, "reattached", Duration::from_secs(20));
    let v = a.inspect("disk").unwrap();
    assert_eq!(v["holders"][0]["token"], token, "same lease, same token");
    assert_eq!(v["holders"][0]["pid"], wrapper.id());
    assert!(!a.is_dirty("disk"));
    assert_eq!(
        a.holders("queue"),
        vec![u64::from(blocker.pid())],
        "the blocker keeps its lease"
    );
    wait_until("the waiter queues again", Duration::from_secs(20), || {
        a.inspect("queue").unwrap()["waiters"]
            .as_array()
            .is_some_and(|w| !w.is_empty())
    });
    expect_code(&a.lh(&["release", "queue", "--pid", &blocker.pid_arg()]), 0);
    let out = waiter.wait_with_output().unwrap();
    expect_code(&out, 0);
    assert_eq!(a.holders("queue"), vec![u64::from(waiting.pid())]);

    // The wrapper still supervises its command: SIGTERM reaches it, the lease is released.
    signal(wrapper.id(), libc::SIGTERM);
    wrapper.wait().unwrap();
    assert!(a.holders("disk").is_empty());
    let _ = watch.wait();
}
