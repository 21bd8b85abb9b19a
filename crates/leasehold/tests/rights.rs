//! Rights on the local socket (SPEC G8): peer credentials decide. These tests run the CLI as
//! `nobody` (uid 65534) beside an agent run by root; they need root to switch users and fail
//! saying so otherwise (scripts/test runs as root in CI).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::{Child, Command, Output};

use common::*;

const NOBODY: u32 = 65534;
const NOGROUP: u32 = 65534;
/// A group id for admins; numeric, so it need not exist in /etc/group.
const ADMINS: u32 = 4242;
/// How long a test waits for what it expects.
const LONG: std::time::Duration = std::time::Duration::from_secs(60);

/// An agent whose socket group is nogroup and whose admin group is ADMINS, reachable by
/// `nobody`.
fn agent() -> Agent {
    let a = Agent::start_with(&["--socket-group", "nogroup", "--admin-group", "4242"]);
    std::fs::set_permissions(a.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    a
}

/// A command run as nobody with these supplementary groups (primary group nogroup).
fn nobody_with(c: Command, groups: &'static [u32]) -> Command {
    as_nobody_in(c, NOGROUP, groups)
}

fn lh_as(a: &Agent, groups: &'static [u32], args: &[&str]) -> Output {
    let mut c = a.cli();
    c.args(args);
    nobody_with(c, groups).output().unwrap()
}

/// A `sleep` of nobody's, to hold leases.
fn nobodys_process() -> Child {
    let mut c = Command::new("sleep");
    c.arg("3600");
    nobody_with(c, &[]).spawn().unwrap()
}

#[test]
fn the_socket_belongs_to_its_group_and_is_not_world_writable() {
    require_root("to run the CLI as nobody");
    let a = agent();
    let m = std::fs::metadata(&a.socket).unwrap();
    assert_eq!(m.permissions().mode() & 0o777, 0o660);
    assert_eq!(m.gid(), NOGROUP);
    // Outside the group, nobody cannot even connect.
    let mut c = a.cli();
    c.arg("list");
    let out = as_nobody_in(c, ADMINS + 1, &[]).output().unwrap();
    expect_code(&out, 5);
}

#[test]
fn a_user_acts_only_for_its_own_processes() {
    require_root("to run the CLI as nobody");
    let a = agent();
    let roots = Holder::new();
    let mut mine = nobodys_process();
    let before = a.list();
    let out = lh_as(&a, &[], &["acquire", "disk", "--pid", &roots.pid_arg()]);
    expect_code(&out, 1);
    let err = text(&out.stderr);
    assert!(
        err.contains("belongs to uid 0") && err.contains("uid 65534"),
        "{err}"
    );
    assert_eq!(a.list(), before, "a refused request changes nothing");

    let out = lh_as(
        &a,
        &[],
        &["acquire", "disk", "--pid", &mine.id().to_string()],
    );
    expect_code(&out, 0);
    assert_eq!(a.inspect("disk").unwrap()["holders"][0]["uid"], NOBODY);
    // Root's holder cannot be released by nobody either.
    expect_code(
        &a.lh(&["acquire", "root-disk", "--pid", &roots.pid_arg()]),
        0,
    );
    let out = lh_as(
        &a,
        &[],
        &["release", "root-disk", "--pid", &roots.pid_arg()],
    );
    expect_code(&out, 1);
    assert_eq!(a.holders("root-disk"), vec![u64::from(roots.pid())]);
    // Reading is open to anyone who may connect.
    expect_code(&lh_as(&a, &[], &["list", "--json"]), 0);
    let _ = mine.kill();
    let _ = mine.wait();
}

#[test]
fn force_release_and_mark_clean_need_root_or_the_admin_group() {
    require_root("to run the CLI as nobody");
    let a = agent();
    let mut h = Holder::new();
    expect_code(&a.lh(&["acquire", "disk", "--pid", &h.pid_arg()]), 0);
    let out = lh_as(&a, &[], &["force-release", "disk", "--reason", "mine now"]);
    expect_code(&out, 1);
    assert!(
        text(&out.stderr).contains("needs root or a member of group 4242"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(a.holders("disk"), vec![u64::from(h.pid())]);

    h.kill9();
    wait_until("the lease ends", std::time::Duration::from_secs(5), || {
        a.holders("disk").is_empty()
    });
    assert!(a.is_dirty("disk"));
    let out = lh_as(&a, &[], &["mark-clean", "disk"]);
    expect_code(&out, 1);
    assert!(a.is_dirty("disk"));

    // A member of the admin group (a supplementary group) may.
    expect_code(&lh_as(&a, &[ADMINS], &["mark-clean", "disk"]), 0);
    assert!(!a.is_dirty("disk"));
    let h2 = Holder::new();
    expect_code(&a.lh(&["acquire", "disk", "--pid", &h2.pid_arg()]), 0);
    expect_code(
        &lh_as(
            &a,
            &[ADMINS],
            &["force-release", "disk", "--reason", "admin"],
        ),
        0,
    );
    let v = a.inspect("disk").unwrap();
    assert!(
        v["dirty_record"]["by"].as_str().unwrap().contains("nobody"),
        "{v}"
    );
}

// SPEC G8: clearing a dirty mark needs root or the admin group, even for the user whose own
// process left it dirty: `mark-clean`, `acquire --accept-dirty` and `run --check` alike.
#[test]
fn a_user_outside_the_admin_group_cannot_take_or_clean_a_dirty_disk() {
    require_root("to run the CLI as nobody");
    let a = agent();
    // nobody's own run leaves the disk dirty.
    expect_code(
        &lh_as(&a, &[], &["run", "--exclusive", "disk", "--", "false"]),
        1,
    );
    assert!(a.is_dirty("disk"));
    let scratch = a.path("scratch");
    std::fs::create_dir(&scratch).unwrap();
    std::fs::set_permissions(&scratch, std::fs::Permissions::from_mode(0o777)).unwrap();
    let marker = scratch.join("ran");
    let touch = format!("touch {}", marker.display());
    let out = lh_as(
        &a,
        &[],
        &[
            "run",
            "--check",
            "true",
            "--exclusive",
            "disk",
            "--",
            "sh",
            "-c",
            &touch,
        ],
    );
    expect_code(&out, 4);
    let err = text(&out.stderr);
    assert!(
        err.contains("needs root or a member of group 4242") && err.contains("mark-clean"),
        "{err}"
    );
    assert!(!marker.exists(), "the command must not run");
    let mut mine = nobodys_process();
    let out = lh_as(
        &a,
        &[],
        &[
            "acquire",
            "disk",
            "--accept-dirty",
            "--pid",
            &mine.id().to_string(),
        ],
    );
    expect_code(&out, 4);
    assert!(a.holders("disk").is_empty());
    expect_code(&lh_as(&a, &[], &["mark-clean", "disk"]), 1);
    assert!(a.is_dirty("disk"));
    // On a clean disk the flag is harmless: nobody's run --check starts at once.
    expect_code(&a.lh(&["mark-clean", "disk"]), 0);
    expect_code(
        &lh_as(
            &a,
            &[],
            &[
                "run",
                "--check",
                "false",
                "--exclusive",
                "disk",
                "--",
                "sh",
                "-c",
                &touch,
            ],
        ),
        0,
    );
    assert!(marker.exists());
    // A member of the admin group checks and cleans.
    expect_code(
        &lh_as(&a, &[], &["run", "--exclusive", "disk", "--", "false"]),
        1,
    );
    expect_code(
        &lh_as(
            &a,
            &[ADMINS],
            &[
                "run",
                "--check",
                "true",
                "--exclusive",
                "disk",
                "--",
                "true",
            ],
        ),
        0,
    );
    assert!(!a.is_dirty("disk"));
    let _ = mine.kill();
    let _ = mine.wait();
}

fn waiting(a: &Agent, n: usize) -> bool {
    a.inspect("vm")
        .is_some_and(|v| v["waiters"].as_array().is_some_and(|w| w.len() == n))
}

/// A waiting `acquire --wait`, started in the background as `nobody` or as root, for `pid`, labelled `label`.
fn waiter(a: &Agent, as_nobody_: bool, pid: u32, label: &str) -> KillOnDrop {
    let mut c = a.cli();
    c.args(["acquire", "vm", "--wait", "--owner", label, "--pid"])
        .arg(pid.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut c = if as_nobody_ { nobody_with(c, &[]) } else { c };
    KillOnDrop(c.spawn().unwrap())
}

// A label is not an identity (SPEC G8): a user who queues first with the label of root's
// destination does not get root's handover; root's destination does.
#[test]
fn a_handover_goes_to_the_holders_user_or_root_not_to_a_label() {
    require_root("to run the CLI as nobody");
    let a = agent();
    let source = Holder::new();
    let dest = Holder::new();
    let mut intruder = nobodys_process();
    expect_code(&a.lh(&["acquire", "vm", "--pid", &source.pid_arg()]), 0);
    let _stolen = waiter(&a, true, intruder.id(), "vm1-dest");
    wait_until("nobody waits", std::time::Duration::from_secs(10), || {
        waiting(&a, 1)
    });
    // With only nobody waiting, root's handover is refused and the source keeps the lease.
    let to = format!("{}/vm1-dest", a.host);
    let out = a.lh(&[
        "release",
        "vm",
        "--pid",
        &source.pid_arg(),
        "--handover-to",
        &to,
    ]);
    expect_code(&out, 1);
    let err = text(&out.stderr);
    assert!(
        err.contains("uid 65534") && err.contains("not an identity"),
        "{err}"
    );
    assert_eq!(a.holders("vm"), vec![u64::from(source.pid())]);

    let mut mine = waiter(&a, false, dest.pid(), "vm1-dest");
    wait_until(
        "root's destination waits",
        std::time::Duration::from_secs(10),
        || waiting(&a, 2),
    );
    let out = a.lh(&[
        "release",
        "vm",
        "--pid",
        &source.pid_arg(),
        "--handover-to",
        &to,
    ]);
    expect_code(&out, 0);
    let status = mine.0.wait().unwrap();
    assert!(status.success(), "root's destination is granted: {status}");
    assert_eq!(a.holders("vm"), vec![u64::from(dest.pid())]);
    let _ = intruder.kill();
    let _ = intruder.wait();
}

/// Run by `a_non_dumpable_process_still_belongs_to_its_user`: marks itself non-dumpable (so
/// /proc/PID belongs to root) and sleeps.
#[test]
#[ignore = "the child process of a_non_dumpable_process_still_belongs_to_its_user"]
fn non_dumpable_child() {
    assert!(
        std::env::var_os("LEASEHOLD_NONDUMPABLE_CHILD").is_some(),
        "run only by a_non_dumpable_process_still_belongs_to_its_user, as its child"
    );
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) takes no pointers.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
    std::thread::sleep(std::time::Duration::from_secs(3600));
}

/// Kills a child when dropped, so a failing test leaves nothing running.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

// A non-dumpable process's /proc files belong to root; its /proc/PID directory keeps its
// effective uid. Rights must follow the process, not those files.
#[test]
fn a_non_dumpable_process_still_belongs_to_its_user() {
    require_root("to run the CLI as nobody");
    let a = agent();
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.args(["non_dumpable_child", "--exact", "--ignored", "--nocapture"])
        .env("LEASEHOLD_NONDUMPABLE_CHILD", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let child = KillOnDrop(nobody_with(c, &[]).spawn().unwrap());
    let pid = child.0.id();
    wait_until(
        "the child is non-dumpable",
        std::time::Duration::from_secs(10),
        || std::fs::metadata(format!("/proc/{pid}/status")).is_ok_and(|m| m.uid() == 0),
    );
    let out = lh_as(&a, &[], &["acquire", "disk", "--pid", &pid.to_string()]);
    expect_code(&out, 0);
    assert_eq!(a.inspect("disk").unwrap()["holders"][0]["uid"], NOBODY);
}

#[test]
fn a_user_shut_out_by_the_sockets_mode_is_told_how_socket_group_opens_it() {
    require_root("to run the CLI as nobody");
    // No socket group: the socket is root's alone (0600). Its directory is open.
    let a = Agent::start();
    std::fs::set_permissions(a.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = lh_as(&a, &[], &["list"]);
    expect_code(&out, 5);
    let err = text(&out.stderr);
    assert!(err.contains("permission denied"), "{err}");
    assert!(
        err.contains("owner only") && err.contains("mode 600"),
        "{err}"
    );
    assert!(err.contains("socket-group"), "{err}");
    assert!(!err.contains("is the agent running"), "{err}");
}

#[test]
fn a_user_refused_by_a_holder_is_not_told_to_force_release_as_if_it_could() {
    require_root("to run the CLI as nobody");
    let a = agent();
    let roots = Holder::new();
    expect_code(&a.lh(&["acquire", "disk", "--pid", &roots.pid_arg()]), 0);
    let mut mine = nobodys_process();
    let pid = mine.id().to_string();
    let out = lh_as(&a, &[], &["acquire", "disk", "--pid", &pid]);
    expect_code(&out, 3);
    let err = text(&out.stderr);
    assert!(err.contains("add --wait"), "{err}");
    assert!(
        err.contains(
            "an admin (root, or the agent's admin group) can run: leasehold force-release disk"
        ),
        "{err}"
    );
    // A wait that ran out does not advise adding the --wait it had.
    let out = lh_as(&a, &[], &["acquire", "disk", "--wait=200ms", "--pid", &pid]);
    expect_code(&out, 3);
    let err = text(&out.stderr);
    assert!(err.contains("timed out waiting"), "{err}");
    assert!(!err.contains("add --wait"), "{err}");
    assert!(err.contains("--wait=10m"), "{err}");
    // Root is told the command itself.
    let out = a.lh(&["acquire", "disk", "--pid", &Holder::new().pid_arg()]);
    expect_code(&out, 3);
    assert!(
        text(&out.stderr).contains("gone for good: leasehold force-release disk"),
        "{}",
        text(&out.stderr)
    );
    let _ = mine.kill();
    let _ = mine.wait();
}

/// Connects to the agent's socket, forks, prints its pid and exits: the child keeps the
/// connection and, given a line on stdin, sends an acquire on it without a pid (for "the
/// caller", the connection's process) and prints the answer.
const OPENER: &str = r#"
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
if os.fork() == 0:
    sys.stdin.readline()
    body = json.dumps({"items": [{"resource": sys.argv[2], "mode": "exclusive"}]}).encode()
    s.sendall(b"POST /v1/acquire HTTP/1.1\r\nHost: leasehold\r\nContent-Type: application/json\r\n"
              b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    out = b""
    while True:
        d = s.recv(65536)
        if not d:
            break
        out += d
    sys.stdout.write(out.decode())
    sys.stdout.flush()
    os._exit(0)
print(os.getpid(), flush=True)
os._exit(0)
"#;

/// A `sleep` started with pid `pid` (free now), given by `clone3` (root).
fn sleep_with_pid(pid: u32) -> ProcessWithPid {
    SpawnWithPid::new("sleep")
        .args(["3600"])
        .spawn(pid)
        .unwrap_or_else(|e| panic!("a sleep with the exited opener's pid {pid}: {e}"))
}

/// Runs `script` (an [`OPENER`]-like script) against `a`: its process opens a connection,
/// forks a child that keeps it, and exits; `before_reuse` runs once the opener is reaped, then
/// a `sleep` takes its pid and the child asks on the connection for a lease of "disk" for "the
/// caller". The answer must be a refusal naming the exit, and no lease granted.
fn opener_gone_then_its_pid_taken(a: &Agent, script: &str, before_reuse: impl FnOnce()) {
    let mut opener = Command::new("python3")
        .args(["-c", script, a.socket.to_str().unwrap(), "disk"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = Lines::new(opener.stdout.take().unwrap());
    // Taken before the wait, which would close it.
    let mut send = opener.stdin.take().unwrap();
    let pid: u32 = out.wait_for("", LONG).trim().parse().unwrap();
    assert_eq!(pid, opener.id());
    // The process that opened the connection is gone (reaped); its child keeps the
    // connection open. A new process gets its pid.
    assert!(opener.wait().unwrap().success());
    before_reuse();
    let sleeper = sleep_with_pid(pid);
    // The connection asks for a lease for "itself".
    std::io::Write::write_all(&mut send, b"go\n").unwrap();
    let answer = out.rest(LONG);
    assert!(
        answer.contains("\"code\":\"refused\"") && answer.contains("has exited"),
        "{answer}"
    );
    assert!(
        a.holders("disk").is_empty(),
        "the lease went to pid {pid} (now another process, {}): {answer}",
        sleeper.id()
    );
}

#[test]
fn a_connection_whose_process_exited_cannot_act_for_a_process_that_took_its_pid() {
    require_root("to give a new process the pid of one that exited (clone3 with set_tid)");
    let a = Agent::start();
    opener_gone_then_its_pid_taken(&a, OPENER, || {});
}

/// [`OPENER`] on a connection switched to `leasehold-calls` (one line a call): the opener
/// switches it with a status call and takes a lease for itself on a line (its facts are then
/// the connection's), forks and exits; the child, given a line on stdin, asks on a line for a
/// lease for "the caller" and prints the answer's line.
const OPENER_ON_LINES: &str = r#"
import json, os, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rb")
s.sendall(b"GET /v1/status HTTP/1.1\r\nhost: leasehold\r\nconnection: upgrade\r\n"
          b"upgrade: leasehold-calls\r\n\r\n")
assert f.readline().startswith(b"HTTP/1.1 101 ")
while f.readline() != b"\r\n":
    pass
assert f.readline().startswith(b"200 ")
def acquire(resource):
    items = [{"resource": resource, "mode": "exclusive"}]
    s.sendall(b"POST /v1/acquire " + json.dumps({"items": items}).encode() + b"\n")
    return f.readline().decode()
first = acquire("first")
assert first.startswith("200 ") and '"granted"' in first, first
if os.fork() == 0:
    sys.stdin.readline()
    sys.stdout.write(acquire(sys.argv[2]))
    sys.stdout.flush()
    os._exit(0)
print(os.getpid(), flush=True)
os._exit(0)
"#;

/// The check above holds on a connection switched to `leasehold-calls`, whose rights and facts
/// of its process are read once for the connection: once the process that opened it exited
/// (its own lease ended with it), a line asking for "the caller" is refused, not granted to the
/// process that took its pid.
#[test]
fn a_switched_connection_whose_process_exited_cannot_act_for_a_process_that_took_its_pid() {
    require_root("to give a new process the pid of one that exited (clone3 with set_tid)");
    let a = Agent::start();
    opener_gone_then_its_pid_taken(&a, OPENER_ON_LINES, || {
        wait_until("the opener's own lease ends with it", LONG, || {
            a.holders("first").is_empty()
        });
    });
}
