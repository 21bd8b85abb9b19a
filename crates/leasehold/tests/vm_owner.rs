//! What the libvirt lock driver asks of the agent, through the HTTP/JSON API with the
//! blocking client it uses: leases whose holder's exit status decides clean or dirty
//! (`on_exit = status`), restricted leases the holder's own user may not release, and a
//! resume that is granted only while nobody held the disk since (expected tokens).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use leasehold_api::v1;
use leasehold_client::ReleaseOptions;
use leasehold_client::blocking::{Client, Error, ErrorCode};
use leasehold_core::{EndReason, ResourceName, Token};

fn name(s: &str) -> ResourceName {
    ResourceName::new(s).unwrap()
}

/// A process that exits with the status written to its stdin (`exit N`), or is killed.
fn shell() -> Child {
    Command::new("sh")
        .args(["-c", "read code; exit $code"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap()
}

fn vm_request(r: &str, pid: u32) -> v1::AcquireRequest {
    v1::AcquireRequest {
        items: vec![v1::Item {
            resource: r.into(),
            mode: v1::Mode::Exclusive,
        }],
        pid: Some(pid),
        label: Some("libvirt vm1".into()),
        restricted: true,
        on_exit: v1::OnExit::Status,
        ..v1::AcquireRequest::default()
    }
}

fn take(c: &Client, req: &v1::AcquireRequest) -> Result<u64, Error> {
    Ok(c.start_acquire_request(req)?.granted()?.grants[0].token.0)
}

/// Waits until nobody holds `r`, then says how its last lease ended.
fn ended(a: &Agent, c: &Client, r: &str) -> (EndReason, bool) {
    wait_until(
        &format!("{r} to be released"),
        Duration::from_secs(30),
        || a.holders(r).is_empty(),
    );
    let v = c.inspect(&name(r)).unwrap().unwrap();
    (v.last_ended.unwrap().how, v.dirty.is_some())
}

#[test]
fn the_exit_status_decides_clean_or_dirty_for_owners_that_ask() {
    let a = Agent::start();
    let c = Client::new(&a.socket).with_timeout(Some(Duration::from_secs(30)));

    // Exit 0: clean (a guest powered off, `virsh destroy`'s SIGTERM).
    let mut vm = shell();
    take(&c, &vm_request("clean-disk", vm.id())).unwrap();
    writeln!(vm.stdin.take().unwrap(), "0").unwrap();
    assert!(vm.wait().unwrap().success());
    assert_eq!(ended(&a, &c, "clean-disk"), (EndReason::ExitedClean, false));

    // Another status, or a signal: dirty.
    let mut vm = shell();
    take(&c, &vm_request("failed-disk", vm.id())).unwrap();
    writeln!(vm.stdin.take().unwrap(), "3").unwrap();
    assert_eq!(vm.wait().unwrap().code(), Some(3));
    assert_eq!(ended(&a, &c, "failed-disk"), (EndReason::ProcessDied, true));

    let mut vm = shell();
    take(&c, &vm_request("killed-disk", vm.id())).unwrap();
    vm.kill().unwrap();
    vm.wait().unwrap();
    assert_eq!(ended(&a, &c, "killed-disk"), (EndReason::ProcessDied, true));

    // An owner that did not ask: exit 0 still dirties (it may have stopped mid-write).
    let mut script = shell();
    let mut plain = vm_request("script-disk", script.id());
    plain.on_exit = v1::OnExit::Dirty;
    take(&c, &plain).unwrap();
    writeln!(script.stdin.take().unwrap(), "0").unwrap();
    script.wait().unwrap();
    assert_eq!(ended(&a, &c, "script-disk"), (EndReason::ProcessDied, true));
}

/// Kernels before 6.15 keep no exit status for pidfds: the agent reads it from the zombie's
/// `/proc/PID/stat` before its parent reaps it (forced here by `LEASEHOLD_EXIT_STATUS_FROM=proc`,
/// which this 6.15+ kernel needs to take that path). Reaped first, it is unknown: dirty.
#[test]
fn before_linux_6_15_the_exit_status_is_read_from_the_zombie_until_it_is_reaped() {
    let a = Agent::launch("node1", &[], &["env", "LEASEHOLD_EXIT_STATUS_FROM=proc"]);
    let c = Client::new(&a.socket).with_timeout(Some(Duration::from_secs(30)));

    // Exit 0, not reaped until its lease has ended (a parent that reaps late): clean.
    let mut vm = shell();
    take(&c, &vm_request("zombie-clean", vm.id())).unwrap();
    writeln!(vm.stdin.take().unwrap(), "0").unwrap();
    assert_eq!(
        ended(&a, &c, "zombie-clean"),
        (EndReason::ExitedClean, false)
    );
    assert!(vm.wait().unwrap().success());

    // Another status, or a signal: dirty.
    let mut vm = shell();
    take(&c, &vm_request("zombie-failed", vm.id())).unwrap();
    writeln!(vm.stdin.take().unwrap(), "3").unwrap();
    assert_eq!(
        ended(&a, &c, "zombie-failed"),
        (EndReason::ProcessDied, true)
    );
    assert_eq!(vm.wait().unwrap().code(), Some(3));

    let mut vm = shell();
    take(&c, &vm_request("zombie-killed", vm.id())).unwrap();
    vm.kill().unwrap();
    assert_eq!(
        ended(&a, &c, "zombie-killed"),
        (EndReason::ProcessDied, true)
    );
    vm.wait().unwrap();

    // Exit 0, but reaped before the agent looked (it was stopped): the status is gone, so
    // the disk is dirty (with PIDFD_GET_INFO it would be clean).
    let mut vm = shell();
    take(&c, &vm_request("zombie-reaped", vm.id())).unwrap();
    a.freeze();
    writeln!(vm.stdin.take().unwrap(), "0").unwrap();
    assert!(vm.wait().unwrap().success());
    signal(a.pid(), libc::SIGCONT);
    assert_eq!(
        ended(&a, &c, "zombie-reaped"),
        (EndReason::ProcessDied, true)
    );
    assert!(
        a.log()
            .contains("reaped before the agent could read its status"),
        "{}",
        a.log()
    );
}

#[test]
fn a_resume_is_refused_when_someone_held_the_disk_while_paused() {
    let a = Agent::start();
    let c = Client::new(&a.socket).with_timeout(Some(Duration::from_secs(30)));
    let (vm, other) = (Holder::new(), Holder::new());
    let paused = take(&c, &vm_request("disk", vm.pid())).unwrap();
    let release = |pid: u32| {
        let o = ReleaseOptions {
            pid: Some(pid),
            ..ReleaseOptions::default()
        };
        let report = c.release(&[name("disk")], &o).unwrap();
        assert!(report.failed.is_empty(), "{report:?}");
    };
    release(vm.pid());
    let mut resume = vm_request("disk", vm.pid());
    resume.expect_tokens = vec![v1::ExpectToken {
        resource: "disk".into(),
        token: paused,
    }];
    let back = take(&c, &resume).unwrap();
    assert!(back > paused, "a resume gets a new token");
    release(vm.pid());

    // Someone else holds it meanwhile, and lets go: the VM may not resume on it.
    take(&c, &vm_request("disk", other.pid())).unwrap();
    release(other.pid());
    resume.expect_tokens[0].token = back;
    let e = take(&c, &resume).unwrap_err();
    assert_eq!(
        (e.code(), e.exit_code().code()),
        (Some(ErrorCode::Moved), 3),
        "{e}"
    );
    assert!(e.to_string().contains("taken by another owner"), "{e}");
    assert!(
        a.holders("disk").is_empty(),
        "a refused resume takes nothing"
    );
}

#[test]
fn the_holders_own_user_cannot_release_a_restricted_lease() {
    require_root("to run the holder and the CLI as nobody");
    let a = Agent::start_with(&["--socket-group", "nogroup"]);
    std::fs::set_permissions(
        a.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut sleep = Command::new("sleep");
    sleep.arg("3600");
    let mut qemu = as_nobody(sleep).spawn().unwrap();
    let c = Client::new(&a.socket).with_timeout(Some(Duration::from_secs(30)));
    let token = take(&c, &vm_request("vm-disk", qemu.id())).unwrap();

    let pid = qemu.id().to_string();
    for how in [
        vec!["release", "vm-disk", "--pid", &pid],
        vec![
            "release",
            "vm-disk",
            "--pid",
            &pid,
            "--handover-to",
            "other-host",
        ],
    ] {
        let mut cli = a.cli();
        cli.args(&how);
        let out = as_nobody(cli).output().unwrap();
        expect_code(&out, 1);
        let err = text(&out.stderr);
        assert!(
            err.contains("restricted") && err.contains("virsh"),
            "the refusal says why and what to do: {err}"
        );
    }
    assert_eq!(
        a.holders("vm-disk"),
        vec![u64::from(qemu.id())],
        "still held by the VM"
    );
    assert!(c.validate(&name("vm-disk"), Token(token)).unwrap().current);
    // Root (libvirt pausing the domain) may.
    expect_code(&a.lh(&["release", "vm-disk", "--pid", &pid]), 0);
    assert!(a.holders("vm-disk").is_empty());
    qemu.kill().unwrap();
    qemu.wait().unwrap();
}
