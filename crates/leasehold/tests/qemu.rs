//! A real client: `leasehold run --path --exclusive disk.qcow2 -- qemu-io ...` on a real qcow2
//! image. A second run exits 3 before QEMU starts; after kill -9 of the first holder the next
//! run meets needs-check, and `--check 'qemu-img check {path}'` lets it through.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// The pids of the children of `pid`.
fn children(pid: u32) -> Vec<u32> {
    let mut v = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let c = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        v.extend(c.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
    }
    v
}

#[test]
fn qemu_io_is_protected_end_to_end() {
    let a = Agent::start();
    let dir = a.path("images");
    std::fs::create_dir_all(&dir).unwrap();
    let img = dir.join("disk.qcow2");
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("16M")
        .output()
        .expect("qemu-img is installed (scripts/test installs qemu-utils)");
    expect_code(&out, 0);
    let resource = std::fs::canonicalize(&img).unwrap();
    let resource = resource.to_str().unwrap();

    // The first writer: writes a pattern, then stays in qemu-io holding the image open.
    let mut first = a
        .cli()
        .current_dir(&dir)
        .args([
            "run",
            "--path",
            "--exclusive",
            "disk.qcow2",
            "--",
            // Line-buffered, so that its report of the write arrives while it still runs.
            "stdbuf",
            "-oL",
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "sleep 600000",
            "disk.qcow2",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first_out = Lines::new(first.stdout.take().unwrap());
    wait_until(
        "qemu-io runs under the lease",
        Duration::from_secs(10),
        || {
            // The child shows before it has exec'd qemu-io (through stdbuf): wait for that.
            a.holders(resource) == vec![u64::from(first.id())]
                && children(first.id()).first().is_some_and(|c| {
                    std::fs::read_to_string(format!("/proc/{c}/comm"))
                        .is_ok_and(|s| s.starts_with("qemu-io"))
                })
        },
    );
    let qemu = children(first.id())[0];
    assert!(
        std::fs::read_to_string(format!("/proc/{qemu}/comm"))
            .unwrap()
            .starts_with("qemu-io")
    );
    // The write has landed when qemu-io reports it.
    first_out.wait_for("wrote 65536/65536 bytes", Duration::from_secs(20));

    // A second run is refused before its command starts.
    let marker = dir.join("second-started");
    let second_cmd = format!(
        "touch {}; exec qemu-io -f qcow2 -c 'write -P 0xcd 0 64k' disk.qcow2",
        marker.display()
    );
    let out = a
        .cli()
        .current_dir(&dir)
        .args([
            "run",
            "--path",
            "--exclusive",
            "disk.qcow2",
            "--",
            "sh",
            "-c",
            &second_cmd,
        ])
        .output()
        .unwrap();
    expect_code(&out, 3);
    assert!(
        !marker.exists(),
        "QEMU must not start while the disk is held"
    );
    assert!(
        text(&out.stderr).contains(&format!("pid {}", first.id())),
        "{}",
        text(&out.stderr)
    );

    // kill -9 the first holder: qemu-io dies with it, and the disk is dirty.
    first.kill().unwrap();
    first.wait().unwrap();
    wait_until(
        "qemu-io dies with its wrapper",
        Duration::from_secs(5),
        || !alive(qemu),
    );
    wait_until("the lease ends", Duration::from_secs(5), || {
        a.holders(resource).is_empty()
    });

    let out = a
        .cli()
        .current_dir(&dir)
        .args([
            "run",
            "--path",
            "--exclusive",
            "disk.qcow2",
            "--",
            "sh",
            "-c",
            &second_cmd,
        ])
        .output()
        .unwrap();
    expect_code(&out, 4);
    assert!(
        !marker.exists(),
        "QEMU must not start on a disk that needs a check"
    );
    assert!(
        text(&out.stderr).contains("needs a check"),
        "{}",
        text(&out.stderr)
    );

    // With the check, qemu-img check runs first, then the command, which reads the first
    // writer's data.
    let out = a
        .cli()
        .current_dir(&dir)
        .args([
            "run",
            "--path",
            "--check",
            "qemu-img check -q {path}",
            "--exclusive",
            "disk.qcow2",
            "--",
            "qemu-io",
            "-f",
            "qcow2",
            "-c",
            "read -P 0xab 0 64k",
            "disk.qcow2",
        ])
        .output()
        .unwrap();
    expect_code(&out, 0);
    let err = text(&out.stderr);
    assert!(err.contains("checking: qemu-img check"), "{err}");
    assert!(err.contains("marked clean"), "{err}");
    assert!(
        text(&out.stdout).contains("read 65536/65536 bytes")
            && !text(&out.stdout).contains("Pattern verification failed"),
        "{}",
        text(&out.stdout)
    );
    assert!(!a.is_dirty(resource));

    // A check that fails keeps QEMU from starting: corrupt the image header and dirty it.
    expect_code(
        &a.lh(&[
            "run",
            "--path",
            "--exclusive",
            img.to_str().unwrap(),
            "--",
            "false",
        ]),
        1,
    );
    std::fs::write(&img, b"not a qcow2 image at all").unwrap();
    let out = a
        .cli()
        .current_dir(&dir)
        .args([
            "run",
            "--path",
            "--check",
            "qemu-img check -q -f qcow2 {path}",
            "--exclusive",
            "disk.qcow2",
            "--",
            "sh",
            "-c",
            &second_cmd,
        ])
        .output()
        .unwrap();
    expect_code(&out, 4);
    assert!(!marker.exists());
    assert!(a.is_dirty(resource));
}
