//! The client library's RAII lease guard, against a real agent.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::*;
use leasehold_client::{AcquireOptions, Client, LeaseGuard, RefusalKind};
use leasehold_core::{Mode, ResourceName, Token};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn res(n: &str) -> ResourceName {
    ResourceName::new(n).unwrap()
}

#[test]
fn a_guard_holds_its_leases_and_releases_them() {
    let a = Agent::start();
    rt().block_on(async {
        let client = Client::connect(&a.socket).await.unwrap();
        let g = LeaseGuard::acquire(
            &client,
            AcquireOptions::new([(res("disk"), Mode::Exclusive)]),
        )
        .await
        .unwrap();
        let token = g.token(&res("disk")).unwrap();
        let current = client.validate(&res("disk"), token).await.unwrap().current;
        assert!(current);
        assert_eq!(a.holders("disk"), vec![u64::from(std::process::id())]);
        // Another owner is refused, with the holder as data.
        let h = Holder::new();
        let mut o = AcquireOptions::new([(res("disk"), Mode::Exclusive)]);
        o.pid = Some(h.pid());
        match client.clone().acquire(o).await {
            Err(leasehold_client::ClientError::Refused(r)) => {
                assert_eq!(r.kind, RefusalKind::Busy);
                let c = r.conflict.unwrap();
                assert_eq!(c.holders[0].owner.process.pid, std::process::id());
            }
            other => panic!("{other:?}"),
        }
        assert!(g.lost().is_none());
        g.release().await.unwrap();
        assert!(a.holders("disk").is_empty());
        assert!(!a.is_dirty("disk"));

        // Dropping releases too, cleanly.
        let g = LeaseGuard::acquire(
            &client,
            AcquireOptions::new([(res("dropped"), Mode::Exclusive)]),
        )
        .await
        .unwrap();
        drop(g);
        let a2 = &a;
        wait_until("the drop releases", Duration::from_secs(5), || {
            a2.holders("dropped").is_empty()
        });
        assert!(!a.is_dirty("dropped"));
    });
}

#[test]
fn a_guard_dropped_while_panicking_leaves_the_resource_dirty() {
    let a = Agent::start();
    let socket = a.socket.clone();
    let rt = rt();
    let handle = rt.handle().clone();
    let r = std::thread::spawn(move || {
        handle.block_on(async {
            let client = Client::connect(&socket).await.unwrap();
            let _g = LeaseGuard::acquire(
                &client,
                AcquireOptions::new([(res("disk"), Mode::Exclusive)]),
            )
            .await
            .unwrap();
            panic!("the writer failed half-way");
        })
    })
    .join();
    assert!(r.is_err());
    wait_until("the drop releases", Duration::from_secs(5), || {
        a.holders("disk").is_empty()
    });
    assert!(a.is_dirty("disk"));
    let v = a.inspect("disk").unwrap();
    assert_eq!(v["dirty_record"]["note"], "the holder panicked");
}

#[test]
fn a_guard_hands_over_to_a_waiter() {
    let a = Agent::start();
    rt().block_on(async {
        let client = Client::connect(&a.socket).await.unwrap();
        let g = LeaseGuard::acquire(&client, AcquireOptions::new([(res("vm"), Mode::Exclusive)]))
            .await
            .unwrap();
        let old = g.token(&res("vm")).unwrap();
        let dest = Holder::new();
        let mut cmd = a.cli();
        cmd.args([
            "acquire",
            "vm",
            "--wait=30s",
            "--owner",
            "dest",
            "--pid",
            &dest.pid_arg(),
        ]);
        let waiter = tokio::task::spawn_blocking(move || cmd.output().unwrap());
        let a2 = &a;
        wait_until("the destination waits", Duration::from_secs(10), || {
            a2.inspect("vm")
                .is_some_and(|v| !v["waiters"].as_array().unwrap().is_empty())
        });
        g.handover("node1/dest").await.unwrap();
        let out = waiter.await.unwrap();
        expect_code(&out, 0);
        let new = Token(text(&out.stdout).trim().parse().unwrap());
        assert!(new > old);
        assert_eq!(a.holders("vm"), vec![u64::from(dest.pid())]);
    });
}

/// A lost lease is reported to the guard. The agent runs as nobody, so it cannot kill this
/// (root) test process when an administrator revokes the lease: the guard hears of it.
#[test]
fn a_guard_learns_that_its_lease_was_lost() {
    require_root("to run the agent as nobody");
    let mut a = Agent::unstarted(
        "node1",
        &[],
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
    rt().block_on(async {
        let client = Client::connect(&a.socket).await.unwrap();
        let g = LeaseGuard::acquire(
            &client,
            AcquireOptions::new([(res("disk"), Mode::Exclusive)]),
        )
        .await
        .unwrap();
        // The agent (nobody) may not force-release, so root asks it: root is always an admin.
        expect_code(
            &a.lh(&["force-release", "disk", "--reason", "maintenance"]),
            0,
        );
        let t = std::time::Instant::now();
        while g.lost().is_none() {
            assert!(t.elapsed() < Duration::from_secs(5), "no loss reported");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (r, ended) = g.lost().unwrap();
        assert_eq!(r, res("disk"));
        assert_eq!(
            ended.how,
            leasehold_core::EndReason::Forced {
                reason: "maintenance".into(),
                by: "root on node1".into()
            }
        );
        assert!(g.release().await.is_err(), "the lease is gone");
    });
}

/// On etcd the guard knows until when its leases are safe from the grant on, before any
/// `safe` line (the agent's test-only `LEASEHOLD_TEST_HOLD_BACK_SAFE=1` holds them back): a
/// writer checking it never sees "no bound" while the agent could already be dead. Before,
/// it was `None` until the first `safe` line, as on a single host.
#[test]
fn a_guard_on_etcd_knows_its_safe_until_from_the_grant() {
    let etcd = leasehold_testkit::Etcd::start();
    let prefix = format!("/g{}/", std::process::id());
    let hold_back = ["env", "LEASEHOLD_TEST_HOLD_BACK_SAFE=1"];
    let a = Agent::on_etcd("host-a", &etcd.endpoint(), &prefix, &[], &hold_back);
    rt().block_on(async {
        let client = Client::connect(&a.socket).await.unwrap();
        let before = monotonic_ns();
        let g = LeaseGuard::acquire(
            &client,
            AcquireOptions::new([(res("disk"), Mode::Exclusive)]),
        )
        .await
        .unwrap();
        let until = g
            .safe_until_monotonic_ns()
            .expect("a safe-until with the grant");
        // ttl 3 s, fence margin 0.6 s: at most 2.4 s after a renewal sent before the grant.
        assert!(
            until > before && until <= monotonic_ns() + 2_400_000_000,
            "safe until {until}, asked at {before}"
        );
        g.release().await.unwrap();
    });
}
