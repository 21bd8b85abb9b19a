//! The README's five-minute tour works as written (run by `scripts/tour`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::*;

#[test]
fn the_readme_tour_works_as_written() {
    let a = Agent::start();
    let bin_dir = Path::new(bin()).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/tour");
    let out = std::process::Command::new(script)
        .env("PATH", path)
        .env("LEASEHOLD_SOCKET", &a.socket)
        .output()
        .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "the tour failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("refused: exit 3"), "{stdout}");
    assert!(
        stderr.contains("[vm1]"),
        "the refusal names the holder's label: {stderr}"
    );
    assert!(stdout.contains("needs check: exit 4"), "{stdout}");
    assert!(stderr.contains("qemu-img check"), "the check ran: {stderr}");
    assert!(stderr.contains("marked clean"), "{stderr}");
    assert!(
        stdout.contains("\"resource\":"),
        "list --json printed: {stdout}"
    );
    // The tour leaves the image clean and free.
    let list = a.list();
    let r = &list.as_array().unwrap()[0];
    assert_eq!(r["dirty"], false);
    assert!(r["holders"].as_array().unwrap().is_empty());
}

#[test]
fn the_readme_three_host_walk_through_works_as_written() {
    let bin_dir = Path::new(bin()).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/tour-cluster");
    let out = std::process::Command::new(script)
        .env("PATH", path)
        .env_remove("LEASEHOLD_SOCKET")
        .output()
        .unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        out.status.success(),
        "the walk-through failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stdout.contains("refused: exit 3"), "{stdout}");
    assert!(
        stderr.contains("on host-a [vm1]"),
        "the refusal names host-a: {stderr}"
    );
    assert!(
        stdout.contains("host-a") && stdout.contains("san/vm1-disk"),
        "list: {stdout}"
    );
    assert!(stdout.contains("needs check: exit 4"), "{stdout}");
    assert!(stdout.contains("VM 1 runs on host-b"), "{stdout}");
}

/// The README's libvirt hook sketch, extracted and run as written (with libvirt's pid
/// directory, `/run/libvirt/qemu`, moved to a temporary one): `prepare` takes and releases
/// each writable disk, `started` binds them to the "QEMU" process, a second domain is refused,
/// and after that QEMU dies its `prepare` checks the dirty disks and its `started` takes them.
#[test]
fn the_readme_libvirt_hook_sketch_works() {
    let a = Agent::start();
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .unwrap();
    let section = &readme[readme
        .find("## From libvirt hooks")
        .expect("the hook section")..];
    let start = section.find("```sh\n").unwrap() + "```sh\n".len();
    let end = start + section[start..].find("```").unwrap();
    let pids = a.path("libvirt-qemu");
    std::fs::create_dir_all(&pids).unwrap();
    let hook_text = section[start..end].replace("/run/libvirt/qemu", pids.to_str().unwrap());
    assert!(
        hook_text.contains("acquire --path") && hook_text.contains("--pid"),
        "{hook_text}"
    );
    let hook = a.path("qemu-hook");
    std::fs::write(&hook, hook_text).unwrap();
    let disks: Vec<_> = ["d1.qcow2", "d 2.qcow2"]
        .iter()
        .map(|d| a.path(d))
        .collect();
    let mut xml = String::from("<domain><devices>");
    for d in &disks {
        let made = std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(d)
            .arg("16M")
            .status()
            .unwrap();
        assert!(made.success());
        xml += &format!(
            "<disk type='file' device='disk'><source file='{}'/></disk>",
            d.display()
        );
    }
    xml += "<disk type='file' device='disk'><readonly/><source file='/nonexistent.iso'/></disk>";
    xml += "</devices></domain>";
    let bin_dir = Path::new(bin()).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let run_hook = |dom: &str, op: &str| {
        use std::io::Write;
        let mut c = std::process::Command::new("sh")
            .arg(&hook)
            .args([dom, op, "begin", "-"])
            .env("PATH", &path)
            .env("LEASEHOLD_SOCKET", &a.socket)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        c.stdin.take().unwrap().write_all(xml.as_bytes()).unwrap();
        c.wait_with_output().unwrap()
    };
    let names: Vec<String> = disks.iter().map(|d| d.display().to_string()).collect();
    let mut qemu1 = Holder::new();
    std::fs::write(pids.join("vm1.pid"), qemu1.pid_arg()).unwrap();
    expect_code(&run_hook("vm1", "prepare"), 0);
    for n in &names {
        assert!(a.holders(n).is_empty(), "prepare keeps nothing");
    }
    expect_code(&run_hook("vm1", "started"), 0);
    for n in &names {
        assert_eq!(a.holders(n), vec![u64::from(qemu1.pid())], "{n}");
    }
    // Another domain on the same disks fails its start, and is told who holds them.
    let qemu2 = Holder::new();
    std::fs::write(pids.join("vm2.pid"), qemu2.pid_arg()).unwrap();
    let refused = run_hook("vm2", "prepare");
    expect_code(&refused, 1);
    assert!(
        text(&refused.stderr).contains("[vm1]"),
        "{}",
        text(&refused.stderr)
    );
    // vm1's QEMU dies: the disks are dirty; vm2's prepare checks them, and it starts.
    qemu1.kill9();
    wait_until(
        "the disks are dirty",
        std::time::Duration::from_secs(10),
        || names.iter().all(|n| a.is_dirty(n)),
    );
    let checked = run_hook("vm2", "prepare");
    expect_code(&checked, 0);
    assert!(
        text(&checked.stderr).contains("marked clean"),
        "{}",
        text(&checked.stderr)
    );
    expect_code(&run_hook("vm2", "started"), 0);
    for n in &names {
        assert_eq!(a.holders(n), vec![u64::from(qemu2.pid())], "{n}");
    }
}
