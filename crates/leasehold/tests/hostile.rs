//! Hostile and careless input (issue 10): a reader that goes away, a corrupted database,
//! unsafe directories, control characters in names, permanent configuration errors. Each
//! gets a clear message and changes nothing; nothing panics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Write as _};
use std::process::Stdio;
use std::time::Duration;

use common::*;

/// Runs `cmd` with its standard output closed by the reader before anything is written, as
/// `leasehold ... | true` does. Returns the exit code and standard error.
fn with_stdout_closed(mut cmd: std::process::Command) -> (i32, String) {
    // The read end is closed before the command starts: however fast it writes, the write
    // fails (closing it after the spawn raced a fast command's write into the pipe).
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut fds = [0; 2];
    // SAFETY: pipe writes two new descriptors into the array it is given.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors were just created and are owned by nothing else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    let child = cmd
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (code(&out), text(&out.stderr))
}

#[test]
fn list_into_a_closed_pipe_ends_quietly() {
    let a = Agent::start();
    let h = Holder::new();
    expect_code(&a.lh(&["acquire", "disk", "--pid", &h.pid_arg()]), 0);
    for args in [["list"].as_slice(), &["list", "--json"], &["status"]] {
        let mut cmd = a.cli();
        cmd.args(args);
        let (code, err) = with_stdout_closed(cmd);
        assert_eq!(code, 141, "{args:?}: exit {code}, stderr: {err}");
        assert!(err.is_empty(), "{args:?}: stderr: {err}");
    }
}

#[test]
fn watch_into_a_pipe_closed_after_one_line_ends_quietly() {
    let a = Agent::start();
    let h = Holder::new();
    let mut watch = a
        .cli()
        .arg("watch")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // `watch | head -1`: read one line, then go away.
    let mut first = String::new();
    let mut reader = BufReader::new(watch.stdout.take().unwrap());
    let pid = h.pid_arg();
    let read = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let events = s.spawn(|| {
            // Events until the watcher has read its line (it may subscribe late).
            while !read.load(std::sync::atomic::Ordering::SeqCst) {
                expect_code(&a.lh(&["acquire", "disk", "--pid", &pid]), 0);
                expect_code(&a.lh(&["release", "disk", "--pid", &pid]), 0);
            }
        });
        reader.read_line(&mut first).unwrap();
        drop(reader);
        read.store(true, std::sync::atomic::Ordering::SeqCst);
        events.join().unwrap();
    });
    assert!(first.contains("disk"), "{first}");
    let mut status = None;
    wait_until("watch exits", Duration::from_secs(20), || {
        if status.is_none() {
            expect_code(&a.lh(&["acquire", "other", "--pid", &pid]), 0);
            expect_code(&a.lh(&["release", "other", "--pid", &pid]), 0);
        }
        status = watch.try_wait().unwrap();
        status.is_some()
    });
    let out = watch.wait_with_output().unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{err}");
    // Only the line saying what it watches: no panic, no error about the pipe.
    assert!(!err.contains("panicked") && !err.contains("pipe"), "{err}");
}

#[test]
fn an_acquire_whose_token_cannot_be_printed_releases_the_grant_and_says_so() {
    let a = Agent::start();
    let h = Holder::new();
    let mut cmd = a.cli();
    cmd.args(["acquire", "disk", "--pid", &h.pid_arg()]);
    let (code, err) = with_stdout_closed(cmd);
    assert_eq!(code, 1, "stderr: {err}");
    assert!(err.contains("the token could not be printed"), "{err}");
    assert!(
        err.contains("released disk again: nothing is held"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    assert!(a.holders("disk").is_empty(), "the lease is still held");

    // A lease already held stays held: the caller has its token from before.
    expect_code(&a.lh(&["acquire", "disk", "--pid", &h.pid_arg()]), 0);
    let mut cmd = a.cli();
    cmd.args(["acquire", "disk", "--pid", &h.pid_arg()]);
    let (code, err) = with_stdout_closed(cmd);
    assert_eq!(code, 1, "stderr: {err}");
    assert!(err.contains("already held"), "{err}");
    assert_eq!(a.holders("disk"), vec![u64::from(h.pid())]);
}

/// Decodes `LEASEHOLD_TOKENS` as the README says: split on `,`, each pair on `=`, then `%XX`.
fn decode_tokens(v: &str) -> Vec<(String, u64)> {
    v.split(',')
        .map(|p| {
            let (n, t) = p.split_once('=').unwrap();
            let mut name = Vec::new();
            let b = n.as_bytes();
            let mut i = 0;
            while i < b.len() {
                if b[i] == b'%' {
                    name.push(u8::from_str_radix(&n[i + 1..i + 3], 16).unwrap());
                    i += 3;
                } else {
                    name.push(b[i]);
                    i += 1;
                }
            }
            (String::from_utf8(name).unwrap(), t.parse().unwrap())
        })
        .collect()
}

#[test]
fn tokens_of_names_with_commas_equals_and_percents_decode_unambiguously() {
    let a = Agent::start();
    let names = ["a=1,b=2", "c%2C", "plain"];
    let mut args = vec!["run"];
    for n in &names {
        args.extend(["--exclusive", n]);
    }
    args.extend(["--", "sh", "-c", "printf %s \"$LEASEHOLD_TOKENS\""]);
    let out = a.lh(&args);
    expect_code(&out, 0);
    let got = decode_tokens(&text(&out.stdout));
    let mut want: Vec<&str> = names.to_vec();
    want.sort();
    assert_eq!(got.iter().map(|p| p.0.as_str()).collect::<Vec<_>>(), want);
    assert!(got.iter().all(|p| p.1 > 0), "{got:?}");
}

#[test]
fn control_characters_in_names_are_escaped_in_output_and_logs() {
    let a = Agent::start();
    let h = Holder::new();
    let evil = "vm\x1b[31mRED\nleasehold: forged line";
    let label = "vm-42";
    expect_code(
        &a.lh(&["acquire", evil, "--pid", &h.pid_arg(), "--owner", label]),
        0,
    );
    // Refused: the message names the holder, escaped.
    let refused = a.lh(&["acquire", evil, "--pid", &std::process::id().to_string()]);
    expect_code(&refused, 3);
    let list = a.lh(&["list"]);
    let inspect = a.lh(&["inspect", evil]);
    expect_code(&a.lh(&["force-release", evil, "--reason", "test"]), 0);
    for (what, o) in [
        ("refused", &refused),
        ("list", &list),
        ("inspect", &inspect),
    ] {
        for bytes in [&o.stdout, &o.stderr] {
            let t = text(bytes);
            assert!(
                !t.contains('\x1b') && !t.contains('\x07') && !t.contains('\r'),
                "{what}: {t:?}"
            );
            assert!(
                !t.lines().any(|l| l.starts_with("leasehold: forged")),
                "{what}: a forged line: {t}"
            );
        }
    }
    assert!(
        text(&list.stdout).contains(r"vm\u{1b}[31mRED\nleasehold: forged line"),
        "{}",
        text(&list.stdout)
    );
    assert!(
        text(&refused.stderr).contains(r"vm\u{1b}[31mRED\nleasehold: forged line is held"),
        "{}",
        text(&refused.stderr)
    );
    // The JSON keeps the name exactly (JSON escapes it).
    let v = a.inspect(evil).unwrap();
    assert_eq!(v["resource"], evil);
    // The agent's log: no raw control character, no forged line.
    let log = a.log();
    assert!(
        !log.contains('\x1b') && !log.contains('\x07') && !log.contains('\r'),
        "{log:?}"
    );
    assert!(
        !log.lines()
            .any(|l| l.starts_with("forged") || l.starts_with("leasehold: forged")),
        "{log}"
    );
    assert!(log.contains(r"RED\nleasehold: forged line"), "{log}");
}

/// Starts `a`, expecting it to refuse at once: returns its exit code and log.
fn start_refused(a: &Agent) -> (i32, String) {
    let out = a
        .command()
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = out;
    let mut status = None;
    let waited = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until("the agent exits", Duration::from_secs(20), || {
            status = child.try_wait().unwrap();
            status.is_some()
        })
    }));
    if waited.is_err() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let log = text(&out.stderr);
    assert!(
        status.is_some(),
        "the agent did not refuse to start:\n{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
    (code(&out), log)
}

fn set_mode(p: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mode_of(p: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn a_corrupted_database_is_a_clear_final_error_naming_the_file() {
    let mut a = Agent::start();
    let h = Holder::new();
    for i in 0..200 {
        let r = format!("disk-{i}-{}", "x".repeat(200));
        expect_code(&a.lh(&["acquire", &r, "--pid", &h.pid_arg()]), 0);
    }
    a.stop();
    let db = a.state.join("leasehold.redb");
    let len = std::fs::metadata(&db).unwrap().len();
    // Overwrite every page after the header with garbage, as a failing disk might.
    let mut bytes = std::fs::read(&db).unwrap();
    let mut x: u32 = 0x9e37_79b9;
    for b in bytes.iter_mut().skip(4096) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    assert_eq!(bytes.len() as u64, len);
    std::fs::write(&db, &bytes).unwrap();
    let (code, log) = start_refused(&a);
    assert_eq!(code, 2, "{log}");
    assert!(log.contains(&db.display().to_string()), "{log}");
    assert!(log.contains("is damaged"), "{log}");
    assert!(log.contains("backup"), "{log}");
    assert!(!log.contains("another leasehold agent"), "{log}");
}

#[test]
fn a_second_agent_on_the_same_state_directory_is_told_so() {
    let a = Agent::start();
    let mut b = Agent::unstarted("node1", &[], &[]);
    b.state = a.state.clone();
    let (code, log) = start_refused(&b);
    assert_eq!(code, 1, "{log}");
    assert!(log.contains("is open in another process"), "{log}");
    assert!(
        log.contains("another leasehold agent uses this state directory"),
        "{log}"
    );
    expect_code(&a.lh(&["status"]), 0);
}

#[test]
fn unsafe_state_and_socket_directories_are_refused() {
    // A state directory every user may write to.
    let a = Agent::unstarted("node1", &[], &[]);
    std::fs::create_dir(&a.state).unwrap();
    set_mode(&a.state, 0o777);
    let (code, log) = start_refused(&a);
    assert_eq!(code, 2, "{log}");
    assert!(log.contains("writable by every user"), "{log}");
    assert!(log.contains("chmod go-w"), "{log}");
    assert!(!a.state.join("leasehold.redb").exists());

    // A socket directory its group may write to.
    let mut b = Agent::unstarted("node1", &[], &[]);
    let dir = b.path("sockets");
    std::fs::create_dir(&dir).unwrap();
    set_mode(&dir, 0o775);
    b.socket = dir.join("agent.sock");
    let (code, log) = start_refused(&b);
    assert_eq!(code, 2, "{log}");
    assert!(log.contains("writable by its group"), "{log}");
    assert!(!b.socket.exists());

    // A state directory that is a link into a directory every user may write to.
    let mut c = Agent::unstarted("node1", &[], &[]);
    let real = c.path("real-state");
    std::fs::create_dir(&real).unwrap();
    set_mode(&real, 0o777);
    std::os::unix::fs::symlink(&real, &c.state).unwrap();
    let (code, log) = start_refused(&c);
    assert_eq!(code, 2, "{log}");
    assert!(log.contains("is a symbolic link"), "{log}");
    assert!(log.contains("--state-dir"), "{log}");
    assert!(std::fs::read_dir(&real).unwrap().next().is_none());

    // A safe one works, and what the agent creates is its user's only.
    c.state = c.path("fresh");
    c.spawn();
    assert_eq!(mode_of(&c.state), 0o700);
    assert_eq!(mode_of(&c.state.join("leasehold.redb")), 0o600);
    assert_eq!(mode_of(&c.socket), 0o600);
}

#[test]
fn a_dangling_symlink_at_the_socket_path_is_named_and_left_alone() {
    let a = Agent::unstarted("node1", &[], &[]);
    let target = a.path("nowhere");
    std::os::unix::fs::symlink(&target, &a.socket).unwrap();
    let (code, log) = start_refused(&a);
    assert_eq!(code, 2, "{log}");
    assert!(log.contains("a symbolic link, not a socket"), "{log}");
    assert!(!log.contains("Address already in use"), "{log}");
    assert!(std::fs::symlink_metadata(&a.socket).unwrap().is_symlink());
    assert!(!target.exists());
}

#[test]
fn permanent_etcd_configuration_errors_exit_2_at_once() {
    for (extra, want) in [
        (
            ["--etcd-endpoints", "not-a-url", "--ttl", "10s"],
            "is not an etcd client URL",
        ),
        (
            [
                "--etcd-endpoints",
                "http://127.0.0.1:1",
                "--ttl",
                "1000years",
            ],
            "9000000000s",
        ),
    ] {
        let mut args = vec!["--backend", "etcd"];
        args.extend(extra);
        let a = Agent::unstarted("node1", &args, &[]);
        let (code, log) = start_refused(&a);
        assert_eq!(code, 2, "{log}");
        assert!(log.contains(want), "{log}");
        assert!(!log.contains("not reachable yet"), "{log}");
    }
}

#[test]
fn a_bad_owner_label_is_a_usage_error_like_a_bad_name() {
    let a = Agent::start();
    let h = Holder::new();
    let bad_name = a.lh(&["acquire", "", "--pid", &h.pid_arg()]);
    expect_code(&bad_name, 2);
    for args in [
        vec!["acquire", "disk", "--pid", &h.pid_arg(), "--owner", "a\nb"],
        vec![
            "run",
            "--exclusive",
            "disk",
            "--owner",
            "a\x1bb",
            "--",
            "true",
        ],
    ] {
        let out = a.lh(&args);
        expect_code(&out, 2);
        let err = text(&out.stderr);
        assert!(err.contains("--owner label"), "{err}");
        assert!(!err.contains('\x1b') && !err.contains("a\nb"), "{err}");
    }
    assert!(a.holders("disk").is_empty());
}

#[test]
fn a_full_disk_is_reported_and_recovered_from_without_a_restart() {
    // The agent's state directory is a 1 MiB tmpfs of its own mount namespace (gone with it).
    let mut a = Agent::unstarted("node1", &[], &[]);
    std::fs::create_dir(&a.state).unwrap();
    let script = format!(
        "mount -t tmpfs -o size=1m,mode=0700 leasehold-test {} && exec \"$0\" \"$@\"",
        a.state.display()
    );
    a.wrap = [
        "unshare",
        "-m",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
    ]
    .map(String::from)
    .to_vec();
    a.spawn();
    let inside = std::path::PathBuf::from(format!("/proc/{}/root", a.pid()))
        .join(a.state.strip_prefix("/").unwrap());
    let mut dead = Holder::new();
    expect_code(&a.lh(&["acquire", "held", "--pid", &dead.pid_arg()]), 0);
    let h = Holder::new();

    // Fill the disk, then take leases until a commit fails.
    let fill = inside.join("fill");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&fill).unwrap();
        while f.write_all(&[0u8; 4096]).is_ok() {}
    }
    let mut failed = None;
    for i in 0..400 {
        let r = format!("r{i}-{}", "x".repeat(900));
        let out = a.lh(&["acquire", &r, "--pid", &h.pid_arg()]);
        if !out.status.success() {
            failed = Some(out);
            break;
        }
    }
    let failed = failed.expect("no acquire failed on a full disk");
    expect_code(&failed, 1);
    let err = text(&failed.stderr);
    assert!(err.contains("could not be written"), "{err}");
    assert!(
        err.contains("nothing of what was asked took effect"),
        "{err}"
    );

    // The holder dies meanwhile; status says the store is not healthy.
    dead.kill9();
    let status = a.lh(&["status"]);
    expect_code(&status, 0);
    assert!(
        text(&status.stdout).contains("leases:   unknown"),
        "{}",
        text(&status.stdout)
    );

    // Space comes back: writes work again without a restart, and the dead holder's lease
    // ends (dirty: it died holding it).
    std::fs::remove_file(&fill).unwrap();
    wait_until("acquire works again", Duration::from_secs(20), || {
        a.lh(&["acquire", "after", "--pid", &h.pid_arg()])
            .status
            .success()
    });
    wait_until(
        "the dead holder's lease ends",
        Duration::from_secs(20),
        || a.holders("held").is_empty(),
    );
    assert!(a.is_dirty("held"));
    let status = a.lh(&["status"]);
    assert!(
        !text(&status.stdout).contains("unknown"),
        "{}",
        text(&status.stdout)
    );
    assert!(a.log().contains("can be written again"), "{}", a.log());
}

#[test]
fn one_user_cannot_take_every_connection_and_root_still_gets_in() {
    common::require_root("to run clients as nobody");
    let a = Agent::start_with(&[
        "--socket-group",
        "nogroup",
        "--max-connections-per-user",
        "3",
    ]);
    set_mode(a.dir.path(), 0o755);
    // nobody fills its share with watches, each holding its connection open.
    let mut watches = Vec::new();
    for _ in 0..3 {
        let mut c = a.cli();
        c.arg("watch");
        let mut w = as_nobody(c)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(w.stderr.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains("watching"), "{line}");
        watches.push(w);
    }
    let mut c = a.cli();
    c.arg("list");
    let out = as_nobody(c).output().unwrap();
    expect_code(&out, 1);
    let err = text(&out.stderr);
    assert!(
        err.contains("uid 65534 already has 3 connections open"),
        "{err}"
    );
    assert!(err.contains("max-connections-per-user"), "{err}");
    // Root still gets in.
    expect_code(&a.lh(&["list"]), 0);
    // One closes: nobody may connect again.
    let mut w = watches.pop().unwrap();
    w.kill().unwrap();
    w.wait().unwrap();
    wait_until("nobody may connect again", Duration::from_secs(20), || {
        let mut c = a.cli();
        c.arg("list");
        as_nobody(c).output().unwrap().status.success()
    });
    for mut w in watches {
        let _ = w.kill();
        let _ = w.wait();
    }
}

/// A flood of idle connections from users other than root (20,000 in the field hung root's
/// `list`) is bounded in total, not only per user, and every idle connection is answered and
/// closed after the request timeout; root's `list` answers throughout.
#[test]
fn a_flood_of_idle_connections_is_bounded_and_closed_and_root_still_lists() {
    common::require_root("to run clients as nobody");
    let a = Agent::start_with(&[
        "--socket-group",
        "nogroup",
        "--max-connections",
        "20",
        "--request-timeout",
        "10s",
    ]);
    set_mode(a.dir.path(), 0o755);
    // nobody opens 100 connections and sends nothing; then reads what each is answered.
    let script = r#"
import socket, sys
path, n = sys.argv[1], int(sys.argv[2])
conns = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(60)
    s.connect(path)
    conns.append(s)
print("open", flush=True)
sys.stdin.readline()
kept = refused = 0
for s in conns:
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    if data.startswith(b"HTTP/1.1 408") and b"request-timeout" in data:
        kept += 1
    elif data.startswith(b"HTTP/1.1 503") and b"max-connections" in data:
        refused += 1
    else:
        print("unexpected", data, flush=True)
print("kept", kept, "refused", refused, flush=True)
"#;
    let mut c = std::process::Command::new("python3");
    c.args(["-c", script]).arg(&a.socket).arg("100");
    let mut flood = as_nobody(c)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = Lines::new(flood.stdout.take().unwrap());
    out.wait_for("open", Duration::from_secs(30));
    // Root gets in while nobody's connections are open.
    expect_code(&a.lh(&["list"]), 0);
    flood.stdin.take().unwrap().write_all(b"\n").unwrap();
    let counts = out.wait_for("kept", Duration::from_secs(60));
    assert_eq!(counts, "kept 20 refused 80", "{}", out.seen.join("\n"));
    assert!(flood.wait().unwrap().success());
}

#[test]
fn a_release_of_too_many_names_is_refused_whole() {
    let a = Agent::start();
    let h = Holder::new();
    expect_code(&a.lh(&["acquire", "r0", "--pid", &h.pid_arg()]), 0);
    let many: Vec<String> = (0..300).map(|i| format!("r{i}")).collect();
    // The CLI refuses before asking.
    let mut args = vec!["release", "--pid"];
    let pid = h.pid_arg();
    args.push(&pid);
    args.extend(many.iter().map(String::as_str));
    let out = a.lh(&args);
    expect_code(&out, 2);
    assert!(
        text(&out.stderr).contains("at most 256 per command"),
        "{}",
        text(&out.stderr)
    );
    // The agent refuses such a request whole, from any client.
    let names: Vec<leasehold_core::ResourceName> = many
        .iter()
        .map(|n| leasehold_core::ResourceName::new(n.clone()).unwrap())
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt.block_on(async {
        let c = leasehold_client::Client::connect(&a.socket).await.unwrap();
        c.release(
            &names,
            leasehold_client::ReleaseOptions {
                pid: Some(h.pid()),
                ..Default::default()
            },
        )
        .await
        .unwrap_err()
    });
    assert!(err.to_string().contains("at most 256 per request"), "{err}");
    assert_eq!(a.holders("r0"), vec![u64::from(h.pid())]);
}

/// Connections switched to `leasehold-calls` (one line a call) from a user other than root
/// count against the connection limit as HTTP ones do, are closed once idle past the request
/// timeout (also one left with half a line), and act only for the user's own processes: a
/// line for root's process is refused `forbidden` and ends its connection, leaving nothing
/// held. Root's `list` answers while they are open.
#[test]
fn connections_switched_to_lines_are_bounded_closed_when_idle_and_act_only_for_their_user() {
    common::require_root("to run clients as nobody");
    let a = Agent::start_with(&[
        "--socket-group",
        "nogroup",
        "--max-connections",
        "20",
        "--request-timeout",
        "10s",
    ]);
    set_mode(a.dir.path(), 0o755);
    let root_holder = Holder::new();
    // nobody opens 30 connections, each asking to switch with a status call; reads each
    // first answer; on one acquires and releases for itself, on another asks for root's
    // holder, leaves half a line on a third; then reads every connection to its end.
    let script = r#"
import json, socket, sys
path, n, root_pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ask = (b"GET /v1/status HTTP/1.1\r\nhost: leasehold\r\nconnection: upgrade\r\n"
       b"upgrade: leasehold-calls\r\n\r\n")
socks, conns = [], []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(60)
    s.connect(path)
    s.sendall(ask)
    socks.append(s)
    conns.append(s.makefile("rb"))
switched, refused = [], 0
for i, f in enumerate(conns):
    status = f.readline()
    if status.startswith(b"HTTP/1.1 101 "):
        while f.readline() != b"\r\n":
            pass
        line = f.readline()
        assert line.startswith(b"200 {"), line
        switched.append(i)
    elif status.startswith(b"HTTP/1.1 503 ") and b"max-connections" in f.read():
        refused += 1
    else:
        print("unexpected", status, flush=True)
def call(i, line):
    socks[i].sendall(line)
    return conns[i].readline()
items = [{"resource": "disk", "mode": "exclusive"}]
own = call(switched[0], b"POST /v1/acquire " + json.dumps({"items": items}).encode() + b"\n")
assert own.startswith(b"200 ") and json.loads(own[4:])["event"] == "granted", own
back = call(switched[0], b'POST /v1/release {"resources": ["disk"]}\n')
assert back.startswith(b"200 ") and json.loads(back[4:])["released"][0]["resource"] == "disk", back
theirs = call(switched[1], b"POST /v1/acquire "
              + json.dumps({"items": items, "pid": root_pid}).encode() + b"\n")
assert theirs.startswith(b"403 ") and json.loads(theirs[4:])["code"] == "forbidden", theirs
socks[switched[2]].sendall(b"POST /v1/acq")
print("open", len(switched), "refused", refused, flush=True)
sys.stdin.readline()
closed = 0
for i in switched:
    rest = conns[i].read()
    if rest == b"":
        closed += 1
    else:
        print("unexpected", i, rest, flush=True)
print("closed", closed, flush=True)
"#;
    let mut c = std::process::Command::new("python3");
    c.args(["-c", script])
        .arg(&a.socket)
        .arg("30")
        .arg(root_holder.pid_arg());
    let mut flood = as_nobody(c)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = Lines::new(flood.stdout.take().unwrap());
    let open = out.wait_for("open", Duration::from_secs(30));
    assert_eq!(open, "open 20 refused 10", "{}", out.seen.join("\n"));
    // Root gets in while they are open; nothing is held.
    let listed = a.lh(&["list", "--json"]);
    expect_code(&listed, 0);
    assert!(a.holders("disk").is_empty(), "{}", text(&listed.stdout));
    flood.stdin.take().unwrap().write_all(b"\n").unwrap();
    let closed = out.wait_for("closed", Duration::from_secs(60));
    assert_eq!(closed, "closed 20", "{}", out.seen.join("\n"));
    assert!(flood.wait().unwrap().success());
    assert!(a.holders("disk").is_empty());
}
