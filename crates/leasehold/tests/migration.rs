//! Live migration between two hosts on etcd (SPEC G2, G7), with real QEMU tools, and
//! revocation from another host.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::*;
use leasehold_testkit::Etcd;

static N: AtomicU32 = AtomicU32::new(0);

fn prefix() -> String {
    format!(
        "/m{}-{}/",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

const BLOCK: usize = 4096;

/// The README's guarded write, run as written there: `leasehold validate` asks agent `a`
/// whether `token` is the current grant of `r`, and only then is block `seq` written, stamped
/// with `token`. Returns whether the write happened (false: refused as stale).
fn guarded_write(a: &Agent, r: &str, dir: &Path, img: &Path, seq: usize, token: u64) -> bool {
    let pattern = dir.join(format!("pattern-{seq}"));
    let mut stamp = format!("token={token} seq={seq}\n").into_bytes();
    stamp.resize(BLOCK, b'.');
    std::fs::write(&pattern, &stamp).unwrap();
    let bin_dir = Path::new(bin()).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let script = r#"leasehold validate "$R" "$TOKEN" || { echo "stale token: not writing"; exit 1; }
exec qemu-io -f qcow2 -c "write -q -s $PATTERN $OFFSET $LEN" "$IMG""#;
    let out = Command::new("sh")
        .args(["-c", script])
        .env("PATH", path)
        .env("LEASEHOLD_SOCKET", &a.socket)
        .env("R", r)
        .env("TOKEN", token.to_string())
        .env("PATTERN", &pattern)
        .env("OFFSET", (seq * BLOCK).to_string())
        .env("LEN", BLOCK.to_string())
        .env("IMG", img)
        .output()
        .unwrap();
    match code(&out) {
        0 => true,
        1 if text(&out.stdout).contains("stale token: not writing") => false,
        _ => panic!(
            "guarded write failed: exit {}\nstdout: {}\nstderr: {}",
            code(&out),
            text(&out.stdout),
            text(&out.stderr)
        ),
    }
}

/// The stamps of the image's first `n` blocks (None: never written).
fn stamps(dir: &Path, img: &Path, n: usize) -> Vec<Option<(u64, usize)>> {
    let raw = dir.join("read.raw");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(img)
        .arg(&raw)
        .output()
        .unwrap();
    expect_code(&out, 0);
    let bytes = std::fs::read(&raw).unwrap();
    (0..n)
        .map(|i| {
            let block = &bytes[i * BLOCK..(i + 1) * BLOCK];
            let text = String::from_utf8_lossy(block);
            let line = text.lines().next()?;
            let mut parts = line.split_whitespace();
            let token = parts.next()?.strip_prefix("token=")?.parse().ok()?;
            let seq = parts.next()?.strip_prefix("seq=")?.parse().ok()?;
            Some((token, seq))
        })
        .collect()
}

#[test]
fn migration_hands_the_disk_over_and_the_old_token_is_refused() {
    let etcd = Etcd::start();
    let p = prefix();
    let src = Agent::on_etcd("src", &etcd.endpoint(), &p, &[], &[]);
    let dst = Agent::on_etcd("dst", &etcd.endpoint(), &p, &[], &[]);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm1.qcow2");
    expect_code(
        &Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&img)
            .arg("1M")
            .output()
            .unwrap(),
        0,
    );
    let r = std::fs::canonicalize(&img)
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let (vm_src, vm_dst, other) = (Holder::new(), Holder::new(), Holder::new());

    // The source runs the VM: every write is checked with validate, then stamped.
    let out = src.lh(&["acquire", &r, "--pid", &vm_src.pid_arg(), "--owner", "vm1"]);
    expect_code(&out, 0);
    let old: u64 = text(&out.stdout).trim().parse().unwrap();
    let k = 8;
    for seq in 0..k {
        assert!(
            guarded_write(&src, &r, dir.path(), &img, seq, old),
            "the source's write {seq} with the current token {old}"
        );
    }

    // Someone else on the destination asked first; the destination VM waits too.
    let early = dst
        .cli()
        .args([
            "acquire",
            &r,
            "--wait=60s",
            "--pid",
            &other.pid_arg(),
            "--owner",
            "vm-other",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the early waiter queues", Duration::from_secs(10), || {
        src.inspect(&r)
            .is_some_and(|v| v["waiters"].as_array().unwrap().len() == 1)
    });
    let waiting = dst
        .cli()
        .args([
            "acquire",
            &r,
            "--wait=60s",
            "--pid",
            &vm_dst.pid_arg(),
            "--owner",
            "vm1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the destination waits", Duration::from_secs(10), || {
        src.inspect(&r)
            .is_some_and(|v| v["waiters"].as_array().unwrap().len() == 2)
    });

    // The source has drained its writes: hand over to the VM's owner on the destination.
    expect_code(
        &src.lh(&[
            "release",
            &r,
            "--pid",
            &vm_src.pid_arg(),
            "--handover-to",
            "dst/vm1",
        ]),
        0,
    );
    let out = waiting.wait_with_output().unwrap();
    expect_code(&out, 0);
    let new: u64 = text(&out.stdout).trim().parse().unwrap();
    assert!(new > old, "new token {new} after {old}");
    let v = dst.inspect(&r).unwrap();
    assert_eq!(
        v["holders"][0]["pid"],
        vm_dst.pid(),
        "the named waiter, not the earlier one"
    );
    assert_eq!(v["dirty"], false, "a handover is clean");

    // The destination writes; the source's late write, with the old token, is refused.
    for seq in k..2 * k {
        assert!(
            guarded_write(&dst, &r, dir.path(), &img, seq, new),
            "the destination's write {seq} with the current token {new}"
        );
    }
    assert!(
        !guarded_write(&src, &r, dir.path(), &img, 2 * k, old),
        "the source's late write with the old token {old} must be refused"
    );
    let late = src.lh(&["validate", &r, &old.to_string()]);
    expect_code(&late, 1);
    assert!(
        text(&late.stdout).contains(&format!("current: {new}")),
        "{}",
        text(&late.stdout)
    );

    let blocks = stamps(dir.path(), &img, 2 * k + 1);
    let first_new = blocks
        .iter()
        .position(|b| b.is_some_and(|(t, _)| t == new))
        .expect("the destination wrote");
    assert!(
        blocks[first_new..]
            .iter()
            .all(|b| b.is_none_or(|(t, _)| t == new)),
        "a block with the old token after the first block of the new one: {blocks:?}"
    );
    assert_eq!(blocks[2 * k], None, "the refused late write never landed");
    for (seq, b) in blocks[..2 * k].iter().enumerate() {
        let (t, s) = b.expect("written");
        assert_eq!(s, seq);
        assert_eq!(t, if seq < k { old } else { new });
    }
    // The earlier waiter still waits: nobody took the disk in between.
    let mut early = early;
    assert!(early.try_wait().unwrap().is_none());
    let _ = early.kill();
}

#[test]
fn a_source_that_dies_before_handing_over_leaves_the_destination_a_check() {
    let etcd = Etcd::start();
    let p = prefix();
    let mut src = Agent::on_etcd("src", &etcd.endpoint(), &p, &[], &[]);
    let dst = Agent::on_etcd("dst", &etcd.endpoint(), &p, &[], &[]);
    let (mut vm_src, vm_dst) = (Holder::new(), Holder::new());
    expect_code(
        &src.lh(&["acquire", "vm1-disk", "--pid", &vm_src.pid_arg()]),
        0,
    );
    let waiting = dst
        .cli()
        .args([
            "acquire",
            "vm1-disk",
            "--wait=60s",
            "--pid",
            &vm_dst.pid_arg(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the destination waits", Duration::from_secs(10), || {
        dst.inspect("vm1-disk")
            .is_some_and(|v| v["waiters"].as_array().unwrap().len() == 1)
    });
    // The source host dies mid-migration.
    let t = std::time::Instant::now();
    src.kill9();
    vm_src.kill9();
    let out = waiting.wait_with_output().unwrap();
    expect_code(&out, 4);
    // ttl 3 s + grace 2 s, less the time since the last renewal.
    assert!(t.elapsed() >= Duration::from_secs(3), "{:?}", t.elapsed());
    assert!(
        text(&out.stderr).contains("needs a check"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn a_force_release_on_one_host_kills_the_holder_on_another() {
    let etcd = Etcd::start();
    let p = prefix();
    let a = Agent::on_etcd("host-a", &etcd.endpoint(), &p, &[], &[]);
    let b = Agent::on_etcd("host-b", &etcd.endpoint(), &p, &[], &[]);
    let holder = Holder::new();
    expect_code(&a.lh(&["acquire", "disk", "--pid", &holder.pid_arg()]), 0);
    let t = std::time::Instant::now();
    expect_code(
        &b.lh(&["force-release", "disk", "--reason", "host-a hung"]),
        0,
    );
    // Within one renew interval (1 s here).
    wait_until("host-a kills its holder", Duration::from_secs(1), || {
        !alive(holder.pid())
    });
    eprintln!(
        "holder on host-a killed {} ms after the force-release on host-b",
        t.elapsed().as_millis()
    );
    let v = a.inspect("disk").unwrap();
    assert_eq!(v["dirty_record"]["how"], "forced");
    assert_eq!(v["dirty_record"]["reason"], "host-a hung");
    assert!(
        v["dirty_record"]["by"].as_str().unwrap().contains("host-b"),
        "{v}"
    );
    assert!(
        a.log().contains("lease revoked; holder killed"),
        "{}",
        a.log()
    );
}
