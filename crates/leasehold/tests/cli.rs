//! The CLI against a real agent: output, JSON, exit codes, bad input, config and socket.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[test]
fn acquire_prints_the_token_and_a_second_owner_is_told_who_holds_it() {
    let a = Agent::start();
    let h1 = Holder::new();
    let h2 = Holder::new();
    let out = a.lh(&[
        "acquire",
        "vm1.qcow2",
        "--pid",
        &h1.pid_arg(),
        "--owner",
        "vm-1",
    ]);
    expect_code(&out, 0);
    let token: u64 = text(&out.stdout)
        .trim()
        .parse()
        .expect("the token alone on stdout");
    assert!(token > 0);

    let out = a.lh(&["acquire", "vm1.qcow2", "--pid", &h2.pid_arg()]);
    expect_code(&out, 3);
    let err = text(&out.stderr);
    assert!(err.contains(&format!("pid {}", h1.pid())), "{err}");
    assert!(err.contains("(sleep)"), "names the command: {err}");
    assert!(err.contains("[vm-1]"), "names the label: {err}");
    assert!(err.contains(&format!("token {token}")), "{err}");
    assert!(err.contains("--wait"), "says what to do next: {err}");
    assert!(text(&out.stdout).is_empty());

    // A shared request meets the exclusive holder too.
    let out = a.lh(&["acquire", "vm1.qcow2", "--shared", "--pid", &h2.pid_arg()]);
    expect_code(&out, 3);
}

#[test]
fn list_and_inspect_json_carry_the_spec_fields() {
    let a = Agent::start();
    let h1 = Holder::new();
    let h2 = Holder::new();
    let h3 = Holder::new();
    expect_code(
        &a.lh(&["acquire", "disk", "--pid", &h1.pid_arg(), "--owner", "vm-a"]),
        0,
    );
    expect_code(
        &a.lh(&["acquire", "cache", "--shared", "--pid", &h2.pid_arg()]),
        0,
    );
    expect_code(
        &a.lh(&["acquire", "cache", "--shared", "--pid", &h3.pid_arg()]),
        0,
    );
    let list = a.list();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    let cache = list.iter().find(|r| r["resource"] == "cache").unwrap();
    assert_eq!(cache["dirty"], false);
    assert_eq!(cache["holders"].as_array().unwrap().len(), 2);
    let disk = list.iter().find(|r| r["resource"] == "disk").unwrap();
    let h = &disk["holders"][0];
    assert_eq!(h["host"], "node1");
    assert_eq!(h["pid"], h1.pid());
    assert_eq!(h["mode"], "exclusive");
    assert_eq!(h["owner"], "vm-a");
    assert!(h["token"].as_u64().unwrap() > 0);
    assert_eq!(h["command"], "sleep");

    let v = a.inspect("disk").unwrap();
    assert_eq!(v["resource"], "disk");
    assert!(v.get("last_ended").is_some());
    let out = a.lh(&["inspect", "nothing-here"]);
    expect_code(&out, 1);
    assert!(text(&out.stderr).contains("not a known resource"));

    // Human output names holders too.
    let out = a.lh(&["list"]);
    expect_code(&out, 0);
    let s = text(&out.stdout);
    assert!(
        s.contains("disk") && s.contains("[vm-a]") && s.contains("exclusive"),
        "{s}"
    );
}

#[test]
fn a_dead_writer_leaves_needs_check_until_marked_clean() {
    let a = Agent::start();
    let mut h1 = Holder::new();
    let h2 = Holder::new();
    let out = a.lh(&["acquire", "disk", "--pid", &h1.pid_arg()]);
    expect_code(&out, 0);
    let first: u64 = text(&out.stdout).trim().parse().unwrap();
    h1.kill9();
    wait_until("the lease ends", Duration::from_secs(5), || {
        a.holders("disk").is_empty()
    });

    let out = a.lh(&["acquire", "disk", "--pid", &h2.pid_arg()]);
    expect_code(&out, 4);
    let err = text(&out.stderr);
    assert!(err.contains("needs a check"), "{err}");
    assert!(err.contains("process died"), "{err}");
    assert!(err.contains(&format!("token {first}")), "{err}");
    assert!(err.contains("mark-clean"), "says what to do: {err}");
    let v = a.inspect("disk").unwrap();
    assert_eq!(v["dirty"], true);
    assert_eq!(v["dirty_record"]["how"], "process-died");
    assert_eq!(v["dirty_record"]["token"], first);

    // Accepting the check grants it, still dirty; mark-clean clears.
    let out = a.lh(&["acquire", "disk", "--pid", &h2.pid_arg(), "--accept-dirty"]);
    expect_code(&out, 0);
    assert!(text(&out.stderr).contains("dirty"));
    assert!(a.is_dirty("disk"));
    expect_code(&a.lh(&["mark-clean", "disk"]), 0);
    assert!(!a.is_dirty("disk"));
}

#[test]
fn shared_holders_dying_leave_no_dirt() {
    let a = Agent::start();
    let mut h1 = Holder::new();
    let h2 = Holder::new();
    expect_code(
        &a.lh(&["acquire", "img", "--shared", "--pid", &h1.pid_arg()]),
        0,
    );
    h1.kill9();
    wait_until("the lease ends", Duration::from_secs(5), || {
        a.holders("img").is_empty()
    });
    assert!(!a.is_dirty("img"));
    expect_code(&a.lh(&["acquire", "img", "--pid", &h2.pid_arg()]), 0);
}

#[test]
fn release_clean_dirty_and_not_held() {
    let a = Agent::start();
    let h = Holder::new();
    let h2 = Holder::new();
    expect_code(&a.lh(&["acquire", "a", "--pid", &h.pid_arg()]), 0);
    expect_code(&a.lh(&["acquire", "b", "--pid", &h.pid_arg()]), 0);
    expect_code(&a.lh(&["release", "a", "--pid", &h.pid_arg()]), 0);
    assert!(a.holders("a").is_empty());
    assert!(!a.is_dirty("a"));
    expect_code(
        &a.lh(&["release", "b", "--pid", &h.pid_arg(), "--dirty"]),
        0,
    );
    assert!(a.is_dirty("b"));
    let out = a.lh(&["release", "a", "--pid", &h2.pid_arg()]);
    expect_code(&out, 1);
    assert!(
        text(&out.stderr).contains("not held"),
        "{}",
        text(&out.stderr)
    );
}

/// `release --token T` ends the lease only while it has token T: another token (a later
/// grant, or a wrong one) is exit 1 naming the token held and changes nothing; tokens that do
/// not match the resources one for one are a usage error (exit 2).
#[test]
fn release_with_a_token_ends_only_that_lease() {
    let a = Agent::start();
    let h = Holder::new();
    let out = a.lh(&["acquire", "d", "--pid", &h.pid_arg()]);
    expect_code(&out, 0);
    let token: u64 = text(&out.stdout).trim().parse().unwrap();
    let wrong = (token + 5).to_string();
    let out = a.lh(&["release", "d", "--pid", &h.pid_arg(), "--token", &wrong]);
    expect_code(&out, 1);
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("holds token {token} now")) && err.contains("nothing was released"),
        "{err}"
    );
    assert_eq!(a.holders("d"), vec![u64::from(h.pid())]);
    let t = token.to_string();
    let out = a.lh(&[
        "release",
        "d",
        "--pid",
        &h.pid_arg(),
        "--token",
        &t,
        "--token",
        &t,
    ]);
    expect_code(&out, 2);
    assert_eq!(a.holders("d"), vec![u64::from(h.pid())]);
    expect_code(
        &a.lh(&["release", "d", "--pid", &h.pid_arg(), "--token", &t]),
        0,
    );
    assert!(a.holders("d").is_empty());
}

#[test]
fn validate_answers_with_its_exit_code() {
    let a = Agent::start();
    let h = Holder::new();
    let out = a.lh(&["acquire", "disk", "--pid", &h.pid_arg()]);
    let t = text(&out.stdout).trim().to_owned();
    expect_code(&a.lh(&["validate", "disk", &t]), 0);
    let stale = (t.parse::<u64>().unwrap() + 1).to_string();
    expect_code(&a.lh(&["validate", "disk", &stale]), 1);
    expect_code(&a.lh(&["release", "disk", "--pid", &h.pid_arg()]), 0);
    expect_code(&a.lh(&["validate", "disk", &t]), 1);
}

#[test]
fn force_release_kills_the_holder_dirties_and_records_why() {
    let a = Agent::start();
    let mut h = Holder::new();
    expect_code(&a.lh(&["acquire", "disk", "--pid", &h.pid_arg()]), 0);
    let out = a.lh(&["force-release", "disk"]);
    expect_code(&out, 2); // --reason is required
    expect_code(
        &a.lh(&["force-release", "disk", "--reason", "host hung"]),
        0,
    );
    wait_until("the holder is killed", Duration::from_secs(5), || {
        !alive(h.pid())
    });
    h.kill9(); // reap
    let v = a.inspect("disk").unwrap();
    assert_eq!(v["dirty"], true);
    assert_eq!(v["dirty_record"]["how"], "forced");
    assert_eq!(v["dirty_record"]["reason"], "host hung");
    assert!(v["dirty_record"]["by"].as_str().unwrap().contains("root"));
    let out = a.lh(&["inspect", "disk"]);
    assert!(text(&out.stdout).contains("host hung"));
    expect_code(&a.lh(&["force-release", "disk", "--reason", "again"]), 1);
}

#[test]
fn acquire_wait_names_the_holder_on_plain_lines_then_prints_the_token() {
    let a = Agent::start();
    let h1 = Holder::new();
    let h2 = Holder::new();
    expect_code(&a.lh(&["acquire", "disk", "--pid", &h1.pid_arg()]), 0);
    let mut waiter = a
        .cli()
        .args(["acquire", "disk", "--wait", "--pid", &h2.pid_arg()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = Lines::new(waiter.stderr.take().unwrap());
    let line = err.wait_for("waiting", Duration::from_secs(10));
    assert!(line.contains(&format!("pid {}", h1.pid())), "{line}");
    assert_eq!(
        a.inspect("disk").unwrap()["waiters"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    expect_code(&a.lh(&["release", "disk", "--pid", &h1.pid_arg()]), 0);
    let out = waiter.wait_with_output().unwrap();
    expect_code(&out, 0);
    let err = err.rest(Duration::from_secs(5));
    assert!(
        !err.contains('\r'),
        "no live line when not a terminal: {err:?}"
    );
    assert!(text(&out.stdout).trim().parse::<u64>().is_ok());
    assert_eq!(a.holders("disk"), vec![u64::from(h2.pid())]);
}

#[test]
fn a_wait_that_times_out_exits_3() {
    let a = Agent::start();
    let h1 = Holder::new();
    let h2 = Holder::new();
    expect_code(&a.lh(&["acquire", "disk", "--pid", &h1.pid_arg()]), 0);
    let out = a.lh(&["acquire", "disk", "--wait=300ms", "--pid", &h2.pid_arg()]);
    expect_code(&out, 3);
    assert!(
        text(&out.stderr).contains("timed out"),
        "{}",
        text(&out.stderr)
    );
    let v = a.inspect("disk").unwrap();
    assert!(v["waiters"].as_array().unwrap().is_empty());
}

#[test]
fn acquire_holds_for_the_calling_shell_until_it_exits() {
    let a = Agent::start();
    let script = format!(
        "{} acquire disk >/dev/null && {} list --json && sleep 0.2",
        bin(),
        bin()
    );
    let out = a.cli().args(["--version"]).output().unwrap();
    expect_code(&out, 0);
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(&script)
        .env("LEASEHOLD_SOCKET", &a.socket)
        .output()
        .unwrap();
    expect_code(&out, 0);
    let during: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        during[0]["holders"][0]["command"], "sh",
        "held by the shell: {during}"
    );
    wait_until("the shell's lease ends", Duration::from_secs(5), || {
        a.holders("disk").is_empty()
    });
}

#[test]
fn bad_input_is_refused_with_exit_2_and_changes_nothing() {
    let a = Agent::start();
    let h = Holder::new();
    expect_code(&a.lh(&["acquire", "keep", "--pid", &h.pid_arg()]), 0);
    let before = a.list();
    let long = "x".repeat(1025);
    for args in [
        vec!["acquire", long.as_str()],
        vec!["acquire", ""],
        vec!["acquire", "disk", "--wait=soon"],
        vec!["acquire", "disk", "--bogus-flag"],
        vec!["run", "--", "true"],
        vec!["run", "--exclusive", "a", "--shared", "a", "--", "true"],
        vec!["validate", "disk", "not-a-number"],
    ] {
        let out = a.lh(&args);
        expect_code(&out, 2);
        assert!(!text(&out.stderr).is_empty());
    }
    // Refused by the agent (not a usage error): acting for a process that does not exist.
    let out = a.lh(&["acquire", "disk", "--pid", "999999999"]);
    expect_code(&out, 1);
    assert!(
        text(&out.stderr).contains("no process"),
        "{}",
        text(&out.stderr)
    );
    let out = a.lh(&[
        "release",
        "keep",
        "--pid",
        &h.pid_arg(),
        "--handover-to",
        "bad host",
    ]);
    // A malformed host name is a usage error, as the agent's code says (`usage`: exit 2).
    expect_code(&out, 2);
    assert_eq!(a.list(), before, "nothing changed");
}

/// A usage error whose words cannot be written (stderr a pipe nobody reads) still exits 2:
/// before, the hint after clap's message panicked (exit 101) writing to the closed pipe.
#[test]
fn a_usage_error_exits_2_with_its_stderr_closed() {
    let out = Command::new(bin())
        .args(["acquire", "disk", "--wait", "5s"])
        .env("LEASEHOLD_SOCKET", "/nonexistent/agent.sock")
        .stderr(widowed_pipe())
        .output()
        .unwrap();
    expect_code(&out, 2);
}

#[test]
fn an_unreachable_agent_is_exit_5() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin())
        .args([
            "--socket",
            dir.path().join("none.sock").to_str().unwrap(),
            "list",
        ])
        .output()
        .unwrap();
    expect_code(&out, 5);
    assert!(
        text(&out.stderr).contains("leasehold agent"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn status_reports_the_agent() {
    let a = Agent::start();
    let h = Holder::new();
    expect_code(&a.lh(&["acquire", "disk", "--pid", &h.pid_arg()]), 0);
    let out = a.lh(&["status", "--json"]);
    expect_code(&out, 0);
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["host"], "node1");
    assert_eq!(s["backend"], "local");
    assert_eq!(s["leases"], 1);
    assert_eq!(s["pid"], a.pid());
}

#[test]
fn watch_streams_events_as_json_lines() {
    let a = Agent::start();
    let mut h = Holder::new();
    let (mut w, mut events) = watch_json(&a);
    expect_code(&a.lh(&["acquire", "disk", "--pid", &h.pid_arg()]), 0);
    h.kill9();
    events.wait_until("three events", Duration::from_secs(10), |l| l.len() >= 3);
    let _ = w.kill();
    let _ = w.wait();
    assert_eq!(
        {
            events.rest(Duration::from_secs(5));
            kinds(&events.seen)
        },
        vec!["granted", "process-died", "dirtied"]
    );
}

#[test]
fn watch_names_every_kind_of_lease_event() {
    let a = Agent::start();
    let (h1, h2) = (Holder::new(), Holder::new());
    let (mut w, mut events) = watch_json(&a);
    expect_code(&a.lh(&["acquire", "d", "--pid", &h1.pid_arg()]), 0);
    let waiter = a
        .cli()
        .args([
            "acquire",
            "d",
            "--wait=10s",
            "--owner",
            "next",
            "--pid",
            &h2.pid_arg(),
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("the waiter queues", Duration::from_secs(5), || {
        a.inspect("d")
            .is_some_and(|v| !v["waiters"].as_array().unwrap().is_empty())
    });
    expect_code(
        &a.lh(&[
            "release",
            "d",
            "--pid",
            &h1.pid_arg(),
            "--handover-to",
            "node1/next",
        ]),
        0,
    );
    assert!(waiter.wait_with_output().unwrap().status.success());
    expect_code(
        &a.lh(&["release", "d", "--pid", &h2.pid_arg(), "--dirty"]),
        0,
    );
    expect_code(&a.lh(&["mark-clean", "d"]), 0);
    let mut h3 = Holder::new();
    expect_code(&a.lh(&["acquire", "d", "--pid", &h3.pid_arg()]), 0);
    expect_code(&a.lh(&["force-release", "d", "--reason", "test"]), 0);
    wait_until("the holder is killed", Duration::from_secs(5), || {
        !alive(h3.pid())
    });
    h3.kill9();
    expect_code(&a.lh(&["mark-clean", "d"]), 0);
    expect_code(&a.lh(&["acquire", "d", "--pid", &h1.pid_arg()]), 0);
    expect_code(&a.lh(&["release", "d", "--pid", &h1.pid_arg()]), 0);
    events.wait_until("twelve events", Duration::from_secs(10), |l| l.len() >= 12);
    let _ = w.kill();
    let _ = w.wait();
    events.rest(Duration::from_secs(5));
    assert_eq!(
        kinds(&events.seen),
        vec![
            "granted",
            "handed-over",
            "granted",
            "released-dirty",
            "dirtied",
            "cleaned",
            "granted",
            "forced",
            "dirtied",
            "cleaned",
            "granted",
            "released"
        ]
    );
}

#[test]
fn wait_0_tries_once_and_wait_with_a_space_gets_a_hint() {
    let a = Agent::start();
    let h1 = Holder::new();
    let h2 = Holder::new();
    expect_code(&a.lh(&["acquire", "disk", "--pid", &h1.pid_arg()]), 0);
    // --wait=0: one try, refused at once as without --wait (it used to wait forever).
    let mut c = a.cli();
    c.args(["acquire", "disk", "--wait=0", "--pid", &h2.pid_arg()]);
    let out = output_within(c, Duration::from_secs(20));
    expect_code(&out, 3);
    let err = text(&out.stderr);
    assert!(
        err.contains("is held") && err.contains("add --wait"),
        "{err}"
    );
    assert!(!err.contains("timed out"), "{err}");
    assert!(
        a.inspect("disk").unwrap()["waiters"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    // A free resource is taken with --wait=0.
    expect_code(
        &a.lh(&["acquire", "free", "--wait=0", "--pid", &h2.pid_arg()]),
        0,
    );
    // --wait 2s (a space): a usage error that shows the right spelling; nothing acquired.
    let pid = h2.pid_arg();
    for args in [
        vec!["acquire", "other", "--wait", "2s", "--pid", pid.as_str()],
        vec!["run", "--exclusive", "other", "--wait", "2s", "--", "true"],
    ] {
        let out = a.lh(&args);
        expect_code(&out, 2);
        let err = text(&out.stderr);
        assert!(err.contains("write --wait=2s"), "{err}");
    }
    assert!(a.inspect("other").is_none());
}

/// Runs `c`, killing it and failing if it has not exited within `limit`.
fn output_within(mut c: std::process::Command, limit: Duration) -> std::process::Output {
    let child = c
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output().unwrap()));
    match rx.recv_timeout(limit) {
        Ok(out) => out,
        Err(_) => {
            signal(pid, libc::SIGKILL);
            panic!("the command had not exited after {limit:?}");
        }
    }
}

#[test]
fn a_call_to_an_agent_that_does_not_answer_gives_up_after_its_timeout() {
    let a = Agent::start();
    // A stopped agent: connections are accepted by the kernel, nothing answers.
    a.freeze();
    let started = std::time::Instant::now();
    let mut c = a.cli();
    c.args(["--timeout", "1s", "list"]);
    let out = output_within(c, Duration::from_secs(20));
    let took = started.elapsed();
    signal(a.pid(), libc::SIGCONT);
    println!("list against a stopped agent gave up after {took:?} (--timeout 1s)");
    expect_code(&out, 5);
    let err = text(&out.stderr);
    assert!(
        err.contains("did not answer") && err.contains("--timeout"),
        "{err}"
    );
    // The default applies too, and "off" and nonsense are told apart from durations.
    let out = a.lh(&["--timeout", "0", "list"]);
    expect_code(&out, 2);
    expect_code(&a.lh(&["--timeout", "off", "list"]), 0);
    expect_code(&a.lh(&["--timeout=5s", "status"]), 0);
}

/// The README's advice for scripts: a script that exits holding an exclusive lease leaves it
/// dirty; one that releases on exit through a trap leaves it clean.
#[test]
fn a_script_releases_through_a_trap_or_leaves_the_resource_dirty() {
    let a = Agent::start();
    let script = |r: &str, trap: bool| {
        let t = if trap {
            format!("trap 'leasehold release {r}' EXIT; ")
        } else {
            String::new()
        };
        let path = format!(
            "{}:{}",
            std::path::Path::new(bin()).parent().unwrap().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut sh = std::process::Command::new("sh");
        sh.env("PATH", path)
            .env("LEASEHOLD_SOCKET", &a.socket)
            .arg("-c")
            .arg(format!(
                "T=$(leasehold acquire {r}) || exit; {t}echo \"token $T\""
            ));
        sh.output().unwrap()
    };
    let out = script("with-trap", true);
    expect_code(&out, 0);
    assert!(
        text(&out.stdout).contains("token "),
        "{}",
        text(&out.stderr)
    );
    assert!(a.holders("with-trap").is_empty());
    assert!(!a.is_dirty("with-trap"));
    let out = script("no-trap", false);
    expect_code(&out, 0);
    wait_until("the script's lease ends", Duration::from_secs(10), || {
        a.holders("no-trap").is_empty()
    });
    assert!(a.is_dirty("no-trap"), "exiting holding it leaves it dirty");
}

/// The needs-check advice fits the resource: qemu-img only for qcow2 images.
#[test]
fn needs_check_advice_fits_qcow2_raw_and_names_that_are_no_file() {
    let a = Agent::start();
    let h = Holder::new();
    let dirty = |r: &str| {
        expect_code(&a.lh(&["acquire", r, "--pid", &h.pid_arg()]), 0);
        expect_code(&a.lh(&["release", r, "--dirty", "--pid", &h.pid_arg()]), 0);
        let out = a.lh(&["acquire", r, "--pid", &h.pid_arg()]);
        expect_code(&out, 4);
        text(&out.stderr)
    };
    let err = dirty("vm1.qcow2");
    assert!(err.contains("qemu-img check vm1.qcow2"), "{err}");
    let err = dirty("disk.raw");
    assert!(!err.contains("qemu-img check disk.raw"), "{err}");
    assert!(
        err.contains("raw image") && err.contains("fsck -n disk.raw"),
        "{err}"
    );
    let err = dirty("san/vm1-disk");
    assert!(!err.contains("qemu-img"), "{err}");
    assert!(err.contains("not a file here"), "{err}");
}

/// `list` filters: a name prefix, --held, --dirty, --host; long names stay aligned.
#[test]
fn list_filters_by_prefix_held_dirty_and_host() {
    let a = Agent::start();
    let h = Holder::new();
    let long = "/srv/images/a-rather-long-directory-name/vm-with-a-long-name.qcow2";
    expect_code(&a.lh(&["acquire", "vm/a", "--pid", &h.pid_arg()]), 0);
    expect_code(&a.lh(&["acquire", long, "--pid", &h.pid_arg()]), 0);
    expect_code(&a.lh(&["acquire", "vm/b", "--pid", &h.pid_arg()]), 0);
    expect_code(
        &a.lh(&["release", "vm/b", "--dirty", "--pid", &h.pid_arg()]),
        0,
    );
    expect_code(&a.lh(&["acquire", "other", "--pid", &h.pid_arg()]), 0);
    expect_code(&a.lh(&["release", "other", "--pid", &h.pid_arg()]), 0);
    let names = |args: &[&str]| {
        let mut all = vec!["list", "--json"];
        all.extend_from_slice(args);
        let out = a.lh(&all);
        expect_code(&out, 0);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut n: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["resource"].as_str().unwrap().to_owned())
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(&["vm/"]), vec!["vm/a", "vm/b"]);
    assert_eq!(names(&["--held"]), vec![long.to_owned(), "vm/a".into()]);
    assert_eq!(names(&["--dirty"]), vec!["vm/b"]);
    assert_eq!(names(&["--held", "vm/"]), vec!["vm/a"]);
    assert_eq!(names(&["--host", "node1", "vm/"]), vec!["vm/a"]);
    assert!(names(&["--host", "elsewhere"]).is_empty());
    // Text: every STATE column starts at the same place, the long name included.
    let out = a.lh(&["list"]);
    expect_code(&out, 0);
    let t = text(&out.stdout);
    let cols: Vec<usize> = t
        .lines()
        .filter(|l| !l.starts_with(' '))
        .map(|l| l.find(' ').unwrap())
        .collect();
    let state_at: Vec<usize> = t
        .lines()
        .filter(|l| !l.starts_with(' '))
        .filter_map(|l| {
            ["STATE", "held", "free", "DIRTY"]
                .iter()
                .find_map(|w| l.find(&format!(" {w} ")))
        })
        .collect();
    assert!(cols.len() >= 4, "{t}");
    assert!(
        state_at.windows(2).all(|p| p[0] == p[1]),
        "misaligned:\n{t}"
    );
}

/// `--help` lists every exit code the CLI uses, from the one enum the agent's error codes map
/// to (an error code's exit code is what the CLI exits with: see the refusals above).
#[test]
fn help_lists_every_exit_code_with_its_meaning() {
    use leasehold_api::v1::{ErrorCode, ExitCode};
    let out = std::process::Command::new(bin())
        .arg("--help")
        .output()
        .unwrap();
    expect_code(&out, 0);
    let help = text(&out.stdout);
    for c in ExitCode::ALL {
        let line = format!("  {:<3} {}", c.code(), c.meaning());
        assert!(help.contains(&line), "{line:?} missing from:\n{help}");
    }
    for e in ErrorCode::ALL {
        assert!(ExitCode::ALL.contains(&e.exit_code()), "{e}");
    }
}

/// Layering (issue 9): the CLI's commands talk to the agent through the client only; they
/// reach into the agent crate only to run the agent (its config and `run`), never for its
/// clock or procfs (both now read through `leasehold_api::host`, as the agent does).
#[test]
fn the_cli_reaches_into_the_agent_crate_only_to_run_the_agent() {
    let src = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
    let allowed = [
        "leasehold_agent::{Config, FileConfig}",
        "leasehold_agent::ConfigError",
        "leasehold_agent::run(",
        // The SPEC §4 default the bench's failover figure is printed against.
        "leasehold_agent::Timing::etcd_default_grace",
    ];
    // Every source file, in subdirectories too (src/bench/, src/bin/).
    let mut files = Vec::new();
    let mut dirs = vec![std::path::PathBuf::from(src)];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    assert!(
        files.iter().any(|f| f.ends_with("bench/hosts.rs")),
        "{files:?}"
    );
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        for (n, line) in text.lines().enumerate() {
            let mut rest = line;
            while let Some(i) = rest.find("leasehold_agent::") {
                let at = &rest[i..];
                assert!(
                    allowed.iter().any(|a| at.starts_with(a)),
                    "{}:{}: the CLI uses the agent crate: {}",
                    path.display(),
                    n + 1,
                    line.trim()
                );
                rest = &at["leasehold_agent::".len()..];
            }
        }
    }
}

/// `cmd` with standard input, output or error (`fd`) closed when it starts.
fn with_closed(mut c: std::process::Command, fd: i32) -> std::process::Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: close() is async-signal-safe; the closure allocates nothing.
    unsafe {
        c.pre_exec(move || {
            libc::close(fd);
            Ok(())
        });
    }
    c
}

/// A pipe whose reader is gone: its write end, as a command's output.
fn widowed_pipe() -> Stdio {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array; each is owned once below.
    let (read, write) = unsafe {
        assert_eq!(libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC), 0);
        (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1]))
    };
    drop(read);
    Stdio::from(write)
}

/// The lean binary starts without std's runtime start (src/main.rs) and does its visible
/// part itself: a standard stream closed at start is opened on /dev/null, before anything
/// else is opened. Otherwise the agent's socket would take the free number: `run`'s command
/// would find its standard stream closed, and a closed standard error would be the socket
/// that the wrapper's messages are written to.
#[test]
fn a_standard_stream_closed_at_start_is_dev_null_for_run_and_its_command() {
    let a = Agent::start();
    for fd in 0..3 {
        let seen = a.dir.path().join(format!("fds-{fd}"));
        let script = format!(
            "l=$(readlink /proc/$$/fd/0 /proc/$$/fd/1 /proc/$$/fd/2); echo \"$l\" > '{}'; echo out; echo err >&2",
            seen.display()
        );
        let mut c = a.cli();
        c.args(["run", "--exclusive", "disk", "--", "sh", "-c", &script]);
        let out = with_closed(c, fd).output().unwrap();
        expect_code(&out, 0);
        let links = std::fs::read_to_string(&seen).unwrap();
        let links: Vec<&str> = links.lines().collect();
        assert_eq!(links.len(), 3, "fd {fd} closed: {links:?}");
        assert_eq!(links[fd as usize], "/dev/null", "fd {fd} closed: {links:?}");
        assert_eq!(text(&out.stdout), if fd == 1 { "" } else { "out\n" });
        assert_eq!(text(&out.stderr), if fd == 2 { "" } else { "err\n" });
        assert!(a.holders("disk").is_empty());
        assert!(!a.is_dirty("disk"), "fd {fd} closed");

        // The plain commands too, as before: what goes to a closed stream is lost, quietly.
        let mut c = a.cli();
        c.arg("list");
        let out = with_closed(c, fd).output().unwrap();
        expect_code(&out, 0);
        let listed = text(&out.stdout);
        assert_eq!(listed.contains("disk"), fd != 1, "fd {fd} closed: {listed}");
        let mut c = std::process::Command::new(bin());
        c.arg("--version");
        let out = with_closed(c, fd).output().unwrap();
        expect_code(&out, 0);
        let version = text(&out.stdout);
        assert_eq!(version.starts_with("leasehold "), fd != 1, "{version}");
    }
}

/// SIGPIPE is ignored in the lean binary as std's start ignores it: output into a pipe whose
/// reader has gone is an error the command handles, quietly with 141, not a kill by SIGPIPE.
#[test]
fn output_into_a_pipe_without_reader_exits_141_quietly() {
    let a = Agent::start();
    let out = a
        .cli()
        .args(["list", "--json"])
        .stdout(widowed_pipe())
        .output()
        .unwrap();
    expect_code(&out, 141);
    assert_eq!(text(&out.stderr), "");
}

/// A panic in the lean binary (no std `fn main` there: src/main.rs catches it) prints its
/// message and exits 101, as std's start does. No panic is left that a user can provoke (the
/// last, a usage hint written into a standard error whose reader had gone, is an exit 2 now:
/// `a_usage_error_exits_2_with_its_stderr_closed`), so debug builds panic on demand.
#[test]
#[cfg_attr(
    not(debug_assertions),
    ignore = "LEASEHOLD_TEST_PANIC exists in debug builds only"
)]
fn a_panic_exits_101() {
    let out = std::process::Command::new(bin())
        .args(["list"])
        .env("LEASEHOLD_SOCKET", "/nonexistent")
        .env("LEASEHOLD_TEST_PANIC", "1")
        .output()
        .unwrap();
    expect_code(&out, 101);
    assert!(
        text(&out.stderr).contains("LEASEHOLD_TEST_PANIC is set"),
        "{}",
        text(&out.stderr)
    );
}

/// Each command's `--help` starts with the description the command list gives it. (A
/// command's arguments are defined only when it is parsed, after its description: the doc
/// comment of an arguments struct would replace it, as "Flags of `leasehold run`" did.)
#[test]
fn each_commands_help_starts_with_its_description_in_the_command_list() {
    let out = std::process::Command::new(bin())
        .arg("--help")
        .output()
        .unwrap();
    expect_code(&out, 0);
    let help = text(&out.stdout);
    let list: Vec<(String, String)> = help
        .lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| {
            let (name, about) = l.trim().split_once(' ')?;
            Some((name.to_owned(), about.trim().to_owned()))
        })
        .filter(|(name, _)| name != "help")
        .collect();
    assert!(list.len() >= 15, "{help}");
    for (name, about) in list {
        let out = std::process::Command::new(bin())
            .args([&name, "--help"])
            .output()
            .unwrap();
        expect_code(&out, 0);
        let own = text(&out.stdout);
        let first = own.lines().next().unwrap_or_default();
        assert_eq!(first, about, "leasehold {name} --help:\n{own}");
    }
}
