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
