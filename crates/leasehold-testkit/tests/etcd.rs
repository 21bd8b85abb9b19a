//! One real etcd member: start, put/get, kill and restart with the data kept, stop and continue.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use leasehold_testkit::Etcd;

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn put(etcd: &Etcd, key: &str, value: &str) {
    let out = etcd.etcdctl(&["put", key, value]);
    assert!(
        out.status.success(),
        "put failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn get(etcd: &Etcd, key: &str) -> String {
    let out = etcd.etcdctl(&["get", "--print-value-only", key]);
    assert!(
        out.status.success(),
        "get failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout(&out).trim().to_owned()
}

#[test]
fn a_member_starts_and_serves_puts_and_gets() {
    let t = Instant::now();
    let etcd = Etcd::start();
    eprintln!("one member answered in {:?}", t.elapsed());
    assert!(etcd.endpoint().starts_with("http://127.0.0.1:"));
    assert!(etcd.is_running() && etcd.is_healthy());
    put(&etcd, "greeting", "hello");
    assert_eq!(get(&etcd, "greeting"), "hello");

    let pid = etcd.pid().unwrap();
    drop(etcd);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "drop kills and reaps etcd"
    );
}

#[test]
fn kill_and_restart_keep_the_data_and_the_endpoint() {
    let etcd = Etcd::start();
    let endpoint = etcd.endpoint();
    put(&etcd, "durable", "yes");

    etcd.kill();
    assert!(!etcd.is_running() && etcd.pid().is_none());
    let out = etcd.etcdctl(&[
        "--dial-timeout=300ms",
        "--command-timeout=300ms",
        "get",
        "durable",
    ]);
    assert!(!out.status.success(), "a killed member does not answer");

    let t = Instant::now();
    etcd.restart();
    eprintln!("restart answered in {:?}", t.elapsed());
    assert_eq!(etcd.endpoint(), endpoint);
    assert_eq!(get(&etcd, "durable"), "yes");
}

#[test]
fn a_stopped_member_hangs_until_continued() {
    let etcd = Etcd::start();
    etcd.stop();
    let t = Instant::now();
    let out = etcd.etcdctl(&["--command-timeout=500ms", "put", "frozen", "1"]);
    assert!(!out.status.success(), "a stopped member answers nothing");
    assert!(
        t.elapsed().as_millis() >= 400,
        "it hangs rather than refuses"
    );
    assert!(etcd.is_running(), "stopped still counts as running");
    etcd.cont();
    put(&etcd, "frozen", "2");
    assert_eq!(get(&etcd, "frozen"), "2");
}

#[test]
fn members_listen_on_the_ip_they_are_given() {
    let etcd = Etcd::start_on("0.0.0.0");
    assert!(etcd.endpoint().starts_with("http://127.0.0.1:"));
    put(&etcd, "anywhere", "ok");
}

/// Run by `etcd_dies_with_the_test_process` in a child test process: starts etcd on a thread
/// that then exits, keeps it forever (as a `static` would), prints its PID and sleeps.
#[test]
#[ignore = "a helper run by etcd_dies_with_the_test_process"]
fn helper_hold_etcd_forever() {
    let etcd = std::thread::spawn(Etcd::start).join().unwrap();
    let pid = etcd.pid().unwrap();
    std::mem::forget(etcd);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(alive(pid), "etcd outlives the thread that started it");
    println!("ETCD_PID {pid}");
    std::io::Write::flush(&mut std::io::stdout()).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(60));
}

/// Whether `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|s| !s.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[test]
fn etcd_dies_with_the_test_process() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    let mut helper = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "helper_hold_etcd_forever",
            "--nocapture",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(helper.stdout.take().unwrap());
    let pid: u32 = stdout
        .lines()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("ETCD_PID ").map(|p| p.parse().unwrap()))
        .expect("the helper prints etcd's pid");
    assert!(alive(pid));
    let helper_pid = helper.id();
    helper.kill().unwrap();
    helper.wait().unwrap();
    let t = Instant::now();
    while alive(pid) {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "etcd {pid} survived its SIGKILLed test process"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // The helper's etcd directory would be reaped by the next test process; reap it now.
    let prefix = format!("leasehold-testkit-etcd-{helper_pid}-");
    for entry in std::fs::read_dir(std::env::temp_dir()).unwrap().flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            std::fs::remove_dir_all(entry.path()).unwrap();
        }
    }
}
