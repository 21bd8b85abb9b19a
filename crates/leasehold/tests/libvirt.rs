//! The libvirt lock driver (`lock_manager = "leasehold"`), black-box: a private `libvirtd`
//! (Debian's libvirt 9.0) loads the plugin this checkout built, starts QEMU domains of type
//! `qemu` (64 MiB, no OS) and is driven with `virsh`. Needs root and libvirt (scripts/test
//! installs it); fails saying so otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod libvirt_support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use libvirt_support::Libvirtd;

const LONG: Duration = Duration::from_secs(60);

/// The lease name of a disk: its canonical path.
fn lease(p: &Path) -> String {
    std::fs::canonicalize(p).unwrap().display().to_string()
}

/// The holder of `r` as `list --json` shows it: (host, pid, label, token).
fn holder(a: &Agent, r: &str) -> Option<(String, u64, String, u64)> {
    let v = a.inspect(r)?;
    let h = v["holders"].as_array()?.first()?.clone();
    Some((
        h["host"].as_str()?.to_string(),
        h["pid"].as_u64()?,
        h["owner"].as_str().unwrap_or_default().to_string(),
        h["token"].as_u64()?,
    ))
}

fn wait_released(a: &Agent, r: &str) {
    wait_until(&format!("{r} to be released"), LONG, || {
        a.holders(r).is_empty()
    });
}

fn start_refused(l: &Libvirtd, dom: &str) -> String {
    let o = l.virsh(&["start", dom]);
    assert!(!o.status.success(), "{dom} started on a held disk");
    assert_eq!(l.state(dom), "shut off");
    text(&o.stderr)
}

#[test]
fn a_domain_holds_its_disks_and_a_second_one_is_refused_naming_the_holder() {
    let a = Agent::start();
    let l = Libvirtd::start("a", &a.socket, "");
    let disk = l.image("shared.qcow2");
    let spare = l.image("spare.qcow2");
    let iso = l.image("tools.qcow2");
    l.define("vm1", &[(&disk, ""), (&iso, "<readonly/>")], "");
    l.define("vm2", &[(&spare, ""), (&disk, "")], "");
    l.ok(&["start", "vm1"]);
    let qemu = l.qemu_pid("vm1");
    let (host, pid, label, _) = holder(&a, &lease(&disk)).expect("vm1 holds its disk");
    assert_eq!((host.as_str(), pid), ("node1", u64::from(qemu)));
    assert!(
        label.contains("vm1"),
        "the lease is labelled with the domain: {label}"
    );
    // A read-only disk takes no exclusive lease (the default policy is shared).
    assert!(
        a.inspect(&lease(&iso))
            .is_some_and(|v| v["holders"][0]["mode"] == "shared")
    );

    let err = start_refused(&l, "vm2");
    assert!(
        err.contains("held") && err.contains(&format!("pid {qemu}")) && err.contains("vm1"),
        "virsh names the holder: {err}"
    );
    // All or nothing: vm2's other disk was not taken either.
    assert!(a.holders(&lease(&spare)).is_empty());
}

#[test]
fn shutdown_and_destroy_release_clean_and_a_killed_qemu_leaves_the_disk_dirty() {
    let a = Agent::start();
    let l = Libvirtd::start("b", &a.socket, "");
    let disk = l.image("vm.qcow2");
    let r = lease(&disk);
    l.define("vm1", &[(&disk, "")], "");

    // `virsh destroy`: QEMU ends on SIGTERM with status 0, its image flushed: clean.
    l.ok(&["start", "vm1"]);
    l.ok(&["destroy", "vm1"]);
    wait_released(&a, &r);
    assert!(!a.is_dirty(&r), "destroy leaves the disk clean");

    // The guest powers off (QEMU quits by itself): clean.
    l.ok(&["start", "vm1"]);
    // (QEMU may close the monitor before it answers: virsh's status does not matter, the exit
    // that follows does.)
    let _ = l.virsh(&["qemu-monitor-command", "vm1", "--hmp", "quit"]);
    wait_released(&a, &r);
    wait_until("libvirt to see vm1 gone", LONG, || {
        l.state("vm1") == "shut off"
    });
    assert!(!a.is_dirty(&r), "a guest poweroff leaves the disk clean");

    // kill -9: QEMU may have died mid-write: dirty, and the next start needs a check.
    l.ok(&["start", "vm1"]);
    signal(l.qemu_pid("vm1"), libc::SIGKILL);
    wait_released(&a, &r);
    assert!(a.is_dirty(&r), "a killed QEMU leaves its disk dirty");
    wait_until("libvirt to see vm1 gone", LONG, || {
        l.state("vm1") == "shut off"
    });
    let err = start_refused(&l, "vm1");
    assert!(
        err.contains("needs a check") && err.contains("mark-clean"),
        "virsh says what to do: {err}"
    );
    let check = Command::new("qemu-img")
        .args(["check", "-q"])
        .arg(&disk)
        .status()
        .unwrap();
    assert!(check.success());
    expect_code(&a.lh(&["mark-clean", &r]), 0);
    l.ok(&["start", "vm1"]);
}

#[test]
fn a_paused_domain_resumes_only_if_nobody_took_its_disk() {
    let a = Agent::start();
    let l = Libvirtd::start("c", &a.socket, "");
    let disk = l.image("vm.qcow2");
    let r = lease(&disk);
    l.define("vm1", &[(&disk, "")], "");
    l.ok(&["start", "vm1"]);
    let (_, _, _, first) = holder(&a, &r).unwrap();

    l.ok(&["suspend", "vm1"]);
    wait_released(&a, &r);
    l.ok(&["resume", "vm1"]);
    let (_, pid, _, again) = holder(&a, &r).expect("resumed with its disk");
    assert_eq!(pid, u64::from(l.qemu_pid("vm1")));
    assert!(again > first, "a resume takes a new token");

    // Paused again; meanwhile someone else writes the disk and lets go.
    l.ok(&["suspend", "vm1"]);
    wait_released(&a, &r);
    let mut other = Holder::new();
    expect_code(&a.lh(&["acquire", &r, "--pid", &other.pid_arg()]), 0);
    expect_code(&a.lh(&["release", &r, "--pid", &other.pid_arg()]), 0);
    other.kill9();
    let o = l.virsh(&["resume", "vm1"]);
    assert!(!o.status.success(), "resumed on a disk someone else held");
    let err = text(&o.stderr);
    assert!(
        err.contains("taken by another owner"),
        "virsh says why: {err}"
    );
    assert_eq!(l.state("vm1"), "paused");
    assert!(a.holders(&r).is_empty());
}

#[test]
fn qemus_own_user_cannot_release_its_disks() {
    let a = Agent::start_with(&["--socket-group", "kvm"]);
    std::fs::set_permissions(
        a.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let l = Libvirtd::start("d", &a.socket, "");
    let disk = l.image("vm.qcow2");
    let r = lease(&disk);
    l.define("vm1", &[(&disk, "")], "");
    l.ok(&["start", "vm1"]);
    let qemu = l.qemu_pid("vm1").to_string();
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            "libvirt-qemu",
            "--regid",
            "kvm",
            "--clear-groups",
            "--",
        ])
        .arg(bin())
        .args(["--socket"])
        .arg(&a.socket)
        .args(["release", &r, "--pid", &qemu])
        .output()
        .unwrap();
    expect_code(&out, 1);
    assert!(
        text(&out.stderr).contains("restricted"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(a.holders(&r), vec![qemu.parse::<u64>().unwrap()]);
}

#[test]
fn live_migration_moves_the_lease_between_hosts_of_one_etcd() {
    let etcd = leasehold_testkit::Etcd::start();
    let p = format!("/lh-libvirt-{}", std::process::id());
    let agent_a = Agent::on_etcd("host-a", &etcd.endpoint(), &p, &[], &[]);
    let agent_b = Agent::on_etcd("host-b", &etcd.endpoint(), &p, &[], &[]);
    let src = Libvirtd::start("src", &agent_a.socket, "");
    let dst = Libvirtd::start("dst", &agent_b.socket, "");
    let disk = src.image("vm.qcow2");
    let r = lease(&disk);
    src.define("vm1", &[(&disk, "")], "");
    dst.define("intruder", &[(&disk, "")], "");
    src.ok(&["start", "vm1"]);
    let (host, _, _, before) = holder(&agent_b, &r).expect("held, as host-b sees it");
    assert_eq!(host, "host-a");

    // Another host cannot start a domain on the disk.
    let err = start_refused(&dst, "intruder");
    assert!(err.contains("host-a") && err.contains("vm1"), "{err}");

    let dst_sock = dst.dir.path().join("run/libvirt-sock");
    src.ok(&[
        "migrate",
        "--live",
        // Both "hosts" see the image at the same path on one machine; libvirt cannot tell
        // that this local file system is shared.
        "--unsafe",
        "vm1",
        &format!("qemu+unix:///system?socket={}", dst_sock.display()),
        "--migrateuri",
        "tcp://127.0.0.1",
    ]);
    assert_eq!(dst.state("vm1"), "running");
    let (host, pid, _, after) = holder(&agent_a, &r).expect("held after migration");
    assert_eq!(host, "host-b");
    assert_eq!(pid, u64::from(dst.qemu_pid("vm1")));
    assert!(after > before, "the destination holds a newer token");
    wait_until("the source QEMU to end", LONG, || {
        src.state("vm1") != "running"
    });
    // The source's QEMU exited after handing over: nothing of it is left, nothing dirty.
    assert!(!agent_a.is_dirty(&r));
}

/// The state letter of `pid` (field 3 of `/proc/PID/stat`): `T` when stopped; `None` once gone.
fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..].trim_start().chars().next()
}

#[test]
fn on_lockfailure_pause_and_poweroff_act_before_the_fence_which_kills_regardless() {
    let etcd = leasehold_testkit::Etcd::start();
    let p = format!("/lh-libvirt-lf-{}", std::process::id());
    // A long enough session that the steps fit between the warning and the fence: renewals
    // are late from `sent + 1 s`, the agent acts at `sent + 5 s` and fences at `sent + 9 s`.
    let a = Agent::launch(
        "host-a",
        &[
            "--backend",
            "etcd",
            "--etcd-endpoints",
            &etcd.endpoint(),
            "--etcd-prefix",
            &p,
            "--ttl",
            "10s",
            "--renew",
            "1s",
            "--fence-margin",
            "1s",
            "--grace",
            "2s",
        ],
        &[],
    );
    let l = Libvirtd::start("lf", &a.socket, "");
    let (d1, d2) = (l.image("vm1.qcow2"), l.image("vm2.qcow2"));
    l.define(
        "vm1",
        &[(&d1, "")],
        "<on_lockfailure>pause</on_lockfailure>",
    );
    l.define(
        "vm2",
        &[(&d2, "")],
        "<on_lockfailure>poweroff</on_lockfailure>",
    );
    l.ok(&["start", "vm1"]);
    l.ok(&["start", "vm2"]);
    let (q1, q2) = (l.qemu_pid("vm1"), l.qemu_pid("vm2"));
    let q2_died = death_watch(q2);

    // etcd hangs: renewals are late. vm1's QEMU is paused (SIGSTOP: its vCPUs and I/O stop),
    // vm2's quits gracefully (SIGTERM), both before the fence.
    etcd.stop();
    wait_until("vm1's QEMU to be stopped", LONG, || {
        proc_state(q1) == Some('T')
    });
    q2_died.join().unwrap();
    // etcd answers again before the fencing deadline: vm1 continues, still holding its disk.
    etcd.cont();
    wait_until("vm1's QEMU to continue", LONG, || {
        proc_state(q1).is_some_and(|s| s != 'T')
    });
    assert!(
        !a.log().contains("no session renewal confirmed in time"),
        "nothing was fenced: {}",
        a.log()
    );
    assert_eq!(holder(&a, &lease(&d1)).unwrap().1, u64::from(q1));
    assert_eq!(l.state("vm1"), "running");
    // vm2's QEMU exited 0 after flushing: its disk is clean.
    wait_released(&a, &lease(&d2));
    assert!(!a.is_dirty(&lease(&d2)), "a graceful poweroff is clean");

    // etcd hangs again, for good: vm1 is paused first, then SIGKILLed at the fencing deadline
    // all the same (`pause` does not keep a QEMU alive on a lease that may end).
    let q1_died = death_watch(q1);
    etcd.stop();
    wait_until("vm1's QEMU to be stopped again", LONG, || {
        proc_state(q1) == Some('T')
    });
    let paused_at = monotonic_ns();
    let died_at = q1_died.join().unwrap();
    let fenced_at = a.wait_logged_mono_ns(&["no session renewal confirmed in time"]);
    assert!(paused_at < died_at, "paused before it died");
    assert!(
        paused_at < fenced_at,
        "paused before the fence ({} ms before)",
        (fenced_at - paused_at) / 1_000_000
    );
    let log = a.log();
    assert!(
        log.contains("paused (SIGSTOP)") && log.contains(&q1.to_string()),
        "{log}"
    );
    etcd.cont();
}

#[test]
fn hotplug_takes_a_lease_refuses_a_held_disk_naming_its_holder_and_unplug_releases() {
    let a = Agent::start();
    let l = Libvirtd::start("hp", &a.socket, "");
    let (d1, d2) = (l.image("vm1.qcow2"), l.image("vm2.qcow2"));
    let (held, free) = (l.image("held.qcow2"), l.image("free.qcow2"));
    l.define("vm1", &[(&d1, "")], "");
    l.define("vm2", &[(&d2, ""), (&held, "")], "");
    l.ok(&["start", "vm1"]);
    l.ok(&["start", "vm2"]);
    let (q1, q2) = (l.qemu_pid("vm1"), l.qemu_pid("vm2"));
    // A USB disk: its unplug needs no guest (these domains run no OS to acknowledge one).
    let attach = |disk: &Path| {
        l.virsh(&[
            "attach-disk",
            "vm1",
            disk.to_str().unwrap(),
            "sdb",
            "--targetbus",
            "usb",
            "--subdriver",
            "qcow2",
            "--live",
        ])
    };

    // A disk vm2 holds: refused, naming the holder; nothing changes.
    let o = attach(&held);
    assert!(!o.status.success(), "attached a disk another domain holds");
    let err = text(&o.stderr);
    assert!(
        err.contains("held") && err.contains(&format!("pid {q2}")) && err.contains("vm2"),
        "virsh names the holder: {err}"
    );
    assert_eq!(a.holders(&lease(&held)), vec![u64::from(q2)]);
    assert!(!l.ok(&["domblklist", "vm1"]).contains("held.qcow2"));

    // A free disk: attached, and held by vm1's QEMU with the domain's label.
    let o = attach(&free);
    assert!(o.status.success(), "attach-disk: {}", text(&o.stderr));
    let (_, pid, label, _) = holder(&a, &lease(&free)).expect("the attached disk is held");
    assert_eq!(pid, u64::from(q1));
    assert!(label.contains("vm1"), "{label}");

    // Unplugged: released clean; vm1 keeps its other disk.
    l.ok(&["detach-disk", "vm1", "sdb", "--live"]);
    wait_released(&a, &lease(&free));
    assert!(!a.is_dirty(&lease(&free)), "an unplugged disk is clean");
    assert_eq!(a.holders(&lease(&d1)), vec![u64::from(q1)]);

    // An attach that QEMU fails after the lease was taken (not a qcow2 image): libvirt's
    // rollback releases it, so the disk is not left held by a domain that never had it.
    let bad = l.dir.path().join("images/bad.qcow2");
    std::fs::write(&bad, b"not an image").unwrap();
    let o = attach(&bad);
    assert!(!o.status.success(), "attached a broken image");
    // (The lease was taken first: libvirt locks an image before QEMU opens it.)
    let granted = format!("resource={}", lease(&bad));
    assert!(
        a.log()
            .lines()
            .any(|l| l.contains("granted") && l.contains(&granted)),
        "{}",
        a.log()
    );
    assert!(
        a.holders(&lease(&bad)).is_empty(),
        "a failed attach left its lease held: {}",
        text(&o.stderr)
    );
    assert_eq!(a.holders(&lease(&d1)), vec![u64::from(q1)]);
}

/// The driver's release (a pause, a migration's end) names the tokens it found: a lease the
/// same QEMU was granted after the one found (that one ended meanwhile) is left alone, and the
/// state string never names a token other than the one released. No libvirt needed: the
/// driver's functions against an agent.
#[test]
fn the_drivers_release_ends_only_the_leases_it_found_by_token() {
    use leasehold_libvirt::{agent, config::Config};
    let a = Agent::start();
    let qemu = Holder::new();
    let pid = i32::try_from(qemu.pid()).unwrap();
    let c = Config {
        socket: a.socket.clone(),
        ..Config::default()
    };
    let names = ["disk".to_owned()];
    let first = a.lh(&["acquire", "disk", "--pid", &qemu.pid_arg()]);
    expect_code(&first, 0);
    let found = agent::held(&c, pid, &names).unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].token.to_string(), text(&first.stdout).trim());
    // Meanwhile the lease found ends, and the same process is granted the disk again.
    expect_code(&a.lh(&["release", "disk", "--pid", &qemu.pid_arg()]), 0);
    let again = a.lh(&["acquire", "disk", "--pid", &qemu.pid_arg()]);
    expect_code(&again, 0);
    let newer: u64 = text(&again.stdout).trim().parse().unwrap();
    let e = agent::release_held(&c, pid, found).unwrap_err();
    assert!(e.message.contains("disk"), "{}", e.message);
    let h = holder(&a, "disk").expect("the newer lease was released");
    assert_eq!((h.1, h.3), (u64::from(qemu.pid()), newer));
}
