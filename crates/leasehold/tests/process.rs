//! Leases follow their processes (SPEC G4) and survive the agent (SPEC G6).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;

#[test]
fn a_lease_ends_soon_after_its_process_exits() {
    let a = Agent::start();
    // Several rounds; the bound is generous (the benchmark measures the real figure), but far
    // below anything a restart or poll loop would give.
    for round in 0..5 {
        let mut h = Holder::new();
        let r = format!("disk{round}");
        expect_code(&a.lh(&["acquire", &r, "--pid", &h.pid_arg()]), 0);
        h.kill9();
        let took = wait_until("the lease ends", Duration::from_secs(2), || {
            a.holders(&r).is_empty()
        });
        assert!(took < Duration::from_secs(1), "round {round}: {took:?}");
        assert!(a.is_dirty(&r));
        assert!(a.log().contains("holder exited; lease ended"));
    }
}

#[test]
fn the_agent_refuses_a_pid_reused_by_another_process() {
    // A request naming the start time of an earlier process with the same pid is refused:
    // acquire and release go through the client library here to set start_time.
    let a = Agent::start();
    let h = Holder::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = leasehold_client::Client::connect(&a.socket).await.unwrap();
        let real = leasehold_agent::procfs::start_time(h.pid()).unwrap();
        let r = leasehold_core::ResourceName::new("disk").unwrap();
        let mut o =
            leasehold_client::AcquireOptions::new([(r.clone(), leasehold_core::Mode::Exclusive)]);
        o.pid = Some(h.pid());
        o.start_time = Some(real - 1);
        let e = c.acquire(o.clone()).await.unwrap_err();
        assert!(e.to_string().contains("different process"), "{e}");
        o.start_time = Some(real);
        let g = c.acquire(o).await.unwrap();
        assert_eq!(g.owner.process.start_time, real);
    });
}

#[test]
fn kill_9_of_the_agent_keeps_live_holders_and_dirties_the_dead() {
    let mut a = Agent::start();
    let keeper = Holder::new();
    let mut dies = Holder::new();
    let reader = Holder::new();
    let t = text(
        &a.lh(&[
            "acquire",
            "keep",
            "--pid",
            &keeper.pid_arg(),
            "--owner",
            "vm-k",
        ])
        .stdout,
    );
    expect_code(&a.lh(&["acquire", "lost", "--pid", &dies.pid_arg()]), 0);
    expect_code(
        &a.lh(&["acquire", "ro", "--shared", "--pid", &reader.pid_arg()]),
        0,
    );
    a.kill9();
    // While no agent watches, one holder dies.
    dies.kill9();
    a.spawn();
    wait_until(
        "the dead holder's lease ends",
        Duration::from_secs(5),
        || a.holders("lost").is_empty(),
    );
    assert!(
        a.is_dirty("lost"),
        "ended dirty: its process died meanwhile"
    );
    let v = a.inspect("lost").unwrap();
    assert_eq!(v["dirty_record"]["how"], "process-died");
    assert_eq!(a.holders("keep"), vec![u64::from(keeper.pid())]);
    assert_eq!(a.holders("ro"), vec![u64::from(reader.pid())]);
    let v = a.inspect("keep").unwrap();
    assert_eq!(v["holders"][0]["owner"], "vm-k");
    assert_eq!(v["holders"][0]["token"].to_string(), t.trim());
    // The re-adopted holder is watched again: its exit ends its lease at once.
    let mut keeper = keeper;
    keeper.kill9();
    wait_until("the re-adopted lease ends", Duration::from_secs(2), || {
        a.holders("keep").is_empty()
    });
}

#[test]
fn stopping_the_agent_does_not_release_leases() {
    let mut a = Agent::start();
    let h = Holder::new();
    expect_code(&a.lh(&["acquire", "disk", "--pid", &h.pid_arg()]), 0);
    a.stop();
    assert!(!a.socket.exists(), "a clean stop removes the socket");
    a.spawn();
    assert_eq!(a.holders("disk"), vec![u64::from(h.pid())]);
    assert!(!a.is_dirty("disk"));
}

#[test]
fn tokens_keep_growing_across_agent_restarts() {
    let mut a = Agent::start();
    let mut last = 0u64;
    for _ in 0..3 {
        let h = Holder::new();
        let out = a.lh(&["acquire", "disk", "--pid", &h.pid_arg()]);
        expect_code(&out, 0);
        let t: u64 = text(&out.stdout).trim().parse().unwrap();
        assert!(t > last);
        last = t;
        expect_code(&a.lh(&["release", "disk", "--pid", &h.pid_arg()]), 0);
        a.restart_after_kill9();
    }
}

/// More holders exit at once than the watcher's exit set reports in one read (32): each of
/// their leases ends, and the lease of a holder still running stays. (Seen failing with the
/// exit set's readiness cleared after one read.)
#[test]
fn many_holders_exiting_at_once_all_lose_their_leases() {
    let a = Agent::start();
    let mut dying: Vec<Holder> = (0..80).map(|_| Holder::new()).collect();
    for (i, h) in dying.iter().enumerate() {
        expect_code(
            &a.lh(&["acquire", &format!("disk{i}"), "--pid", &h.pid_arg()]),
            0,
        );
    }
    let keeper = Holder::new();
    expect_code(&a.lh(&["acquire", "kept", "--pid", &keeper.pid_arg()]), 0);
    // All killed while the agent is stopped: their exits are ready together when it goes on.
    signal(a.pid(), libc::SIGSTOP);
    let state = |pid: u32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        stat.rsplit(") ").next().and_then(|r| r.chars().next())
    };
    wait_until("the agent is stopped", Duration::from_secs(5), || {
        state(a.pid()) == Some('T')
    });
    for h in &mut dying {
        h.kill9();
    }
    signal(a.pid(), libc::SIGCONT);
    let held = |a: &Agent| {
        a.list()
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["holders"].as_array().is_some_and(|h| !h.is_empty()))
            .map(|r| r["resource"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    wait_until(
        "the dead holders' leases end",
        Duration::from_secs(10),
        || held(&a).len() == 1,
    );
    assert_eq!(held(&a), vec!["kept".to_owned()]);
    assert_eq!(a.holders("kept"), vec![u64::from(keeper.pid())]);
    for i in 0..80 {
        assert!(a.is_dirty(&format!("disk{i}")), "disk{i}");
    }
}
