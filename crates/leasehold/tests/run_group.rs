//! `leasehold run` and the processes its command starts: they run in the process group the
//! wrapper leads, and none outlives the leases: not when the wrapper is SIGKILLed (the agent
//! kills the group before it ends the leases), not when a lease is lost (the wrapper kills
//! the group), not when the command exits leaving one behind (killed, released dirty). And a
//! command still reads the terminal and gets its Ctrl-C.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// A writer the command starts and does not `exec`: `sh -c "sh -c 'echo $$ > F; exec sleep
/// 3600'; true"`. The writer (the inner `sleep`) records its pid in F.
fn command_starting_a_writer(pidfile: &Path) -> String {
    format!(
        "sh -c 'echo $$ > {}; exec sleep 3600'; true",
        pidfile.display()
    )
}

/// Kills the writer when the test ends, whatever happened (on failure it may still run).
struct Writer(u32);

impl Drop for Writer {
    fn drop(&mut self) {
        let still_sleep = std::fs::read(format!("/proc/{}/cmdline", self.0))
            .is_ok_and(|c| c.starts_with(b"sleep"));
        if still_sleep && alive(self.0) {
            signal(self.0, libc::SIGKILL);
        }
    }
}

/// Starts `run --exclusive disk -- sh -c COMMAND_STARTING_A_WRITER` on agent `a`, with the
/// wrapper's stderr as given, and waits until the writer has recorded its pid.
fn run_with_writer(a: &Agent, stderr: Stdio) -> (std::process::Child, Writer) {
    let pidfile = a.path("writer.pid");
    let wrapper = a
        .cli()
        .args(["run", "--exclusive", "disk", "--", "sh", "-c"])
        .arg(command_starting_a_writer(&pidfile))
        .stderr(stderr)
        .spawn()
        .unwrap();
    let writer = Writer(wait_pid_file(&pidfile, Duration::from_secs(10)));
    (wrapper, writer)
}

/// Acquires "disk" (accepting it dirty) for a new holder, trying again while the answer is one
/// of `not_yet` (3: held; 5: agent not back yet); any other refusal fails the test.
fn grant_to_next(a: &Agent, not_yet: &[i32]) -> Holder {
    let next = Holder::new();
    wait_until(
        "the disk is granted to the next",
        Duration::from_secs(10),
        || {
            let out = a.lh(&[
                "acquire",
                "disk",
                "--accept-dirty",
                "--pid",
                &next.pid_arg(),
            ]);
            match code(&out) {
                0 => true,
                c if not_yet.contains(&c) => false,
                _ => panic!("acquire: {}", text(&out.stderr)),
            }
        },
    );
    next
}

/// The wrapper SIGKILLed while its command (a shell) waits for the writer it started: the
/// agent kills the writer before it ends the lease, so when another process is granted the
/// disk the writer is already dead. (Before: the parent-death signal killed the shell only;
/// the writer wrote on while the disk was granted to the next.)
#[test]
fn a_killed_wrappers_writer_is_dead_before_the_disk_is_granted_again() {
    let a = Agent::start();
    let (mut wrapper, writer) = run_with_writer(&a, Stdio::inherit());
    assert_eq!(a.holders("disk"), vec![u64::from(wrapper.id())]);
    let _ = wrapper.kill();
    let _ = wrapper.wait();
    let _next = grant_to_next(&a, &[3]);
    assert!(
        !alive(writer.0),
        "the writer still runs while the disk is granted to another process"
    );
    let v = a.inspect("disk").unwrap();
    assert_eq!(v["last_ended"]["how"], "process-died", "{v}");
    assert!(
        a.log().contains("SIGKILLed its process group"),
        "{}",
        a.log()
    );
}

/// The wrapper SIGKILLed while the agent is down: the restarted agent, re-adopting the
/// wrapper's leases and finding it dead, kills the writer its command started before it ends
/// them. (Before: the writer ran on, and the disk was granted again.)
#[test]
fn a_wrapper_that_died_while_the_agent_was_down_has_its_writer_killed_at_restart() {
    let mut a = Agent::start();
    let (mut wrapper, writer) = run_with_writer(&a, Stdio::null());
    a.kill9();
    let _ = wrapper.kill();
    let _ = wrapper.wait();
    assert!(
        alive(writer.0),
        "nothing kills the writer while the agent is down"
    );
    a.spawn();
    let _next = grant_to_next(&a, &[3, 5]);
    assert!(
        !alive(writer.0),
        "the writer still runs while the disk is granted to another process"
    );
}

/// A force-released lease: the writer the command started is killed too, not only the
/// command. (Before: it ran on.)
#[test]
fn a_force_released_runs_writer_is_killed() {
    let a = Agent::start();
    let (mut wrapper, writer) = run_with_writer(&a, Stdio::null());
    expect_code(&a.lh(&["force-release", "disk", "--reason", "test"]), 0);
    // The agent kills the wrapper (and its group), or the wrapper, told first, kills its
    // command and the group itself.
    assert!(!wrapper.wait().unwrap().success());
    wait_until("the writer is killed", Duration::from_secs(5), || {
        !alive(writer.0)
    });
}

/// A command that exits 0 leaving a writer running in the background: the writer is killed
/// before the release, and the release is dirty, saying why. (Before: released clean while
/// the writer ran on.)
#[test]
fn a_writer_left_running_by_the_command_is_killed_and_the_release_is_dirty() {
    let a = Agent::start();
    let pidfile = a.path("writer.pid");
    let script = format!("sleep 3600 & echo $! > {}; exit 0", pidfile.display());
    // Not a pipe: a writer left running would hold it open.
    let errfile = a.path("stderr");
    let status = a
        .cli()
        .args(["run", "--exclusive", "disk", "--", "sh", "-c", &script])
        .stderr(std::fs::File::create(&errfile).unwrap())
        .status()
        .unwrap();
    let writer = Writer(wait_pid_file(&pidfile, Duration::from_secs(1)));
    assert_eq!(status.code(), Some(0));
    assert!(!alive(writer.0), "the background writer outlived the run");
    assert!(a.holders("disk").is_empty());
    let v = a.inspect("disk").unwrap();
    assert_eq!(v["dirty_record"]["how"], "released-dirty", "{v}");
    let note = v["dirty_record"]["note"].as_str().unwrap();
    assert!(
        note.contains("leaving processes running") && note.contains(&format!("pid {}", writer.0)),
        "{note}"
    );
    let err = std::fs::read_to_string(&errfile).unwrap();
    assert!(err.contains("leaving processes running"), "{err}");
    // A command that leaves nothing behind still releases clean.
    expect_code(&a.lh(&["mark-clean", "disk"]), 0);
    expect_code(
        &a.lh(&[
            "run",
            "--exclusive",
            "disk",
            "--",
            "sh",
            "-c",
            "true & wait",
        ]),
        0,
    );
    assert!(!a.is_dirty("disk"));
}

/// What both pseudo-terminal drivers share, put before each: the imports, `until` (wait for
/// the child to have written `word` `count` times, else print what it wrote, kill it and
/// fail) and `finish` (read the rest, up to the terminal's end, and print it all).
const PTY_TOOLS: &str = r#"
import os, pty, select, signal, subprocess, sys, time
lh = sys.argv[1]
out = b""
def until(word, count=1, limit=30):
    global out
    end = time.time() + limit
    while out.count(word.encode()) < count:
        if time.time() > end:
            sys.stdout.write(out.decode(errors="replace"))
            os.kill(pid, signal.SIGKILL)
            sys.exit("timed out waiting for " + word)
        r, _, _ = select.select([fd], [], [], 0.1)
        if r:
            out += os.read(fd, 4096)
def finish():
    global out
    # The rest of what the child wrote, up to the terminal's end (EIO once it is gone).
    while True:
        try:
            b = os.read(fd, 4096)
        except OSError:
            break
        if not b:
            break
        out += b
    sys.stdout.write(out.decode(errors="replace"))
"#;

/// Runs a pseudo-terminal driver (after [`PTY_TOOLS`]) against the agent at `socket`.
fn drive_pty(driver: &str, socket: &std::path::Path) -> std::process::Output {
    std::process::Command::new("python3")
        .args(["-c", &format!("{PTY_TOOLS}{driver}\nfinish()\n"), bin()])
        .env("LEASEHOLD_SOCKET", socket)
        .output()
        .unwrap()
}

/// Drives `leasehold run ... -- sh -c 'print pgid and tpgid; exec cat'` under a pseudo-terminal
/// whose session leader is a Python process (the wrapper is not a group leader there, as in a
/// script run from a shell): first EOF (Ctrl-D), then Ctrl-C. Prints what it saw.
const PTY_DRIVER: &str = r#"
pid, fd = pty.fork()
if pid == 0:
    got = []
    signal.signal(signal.SIGINT, lambda s, f: got.append(s))
    cmd = [lh, "run", "--exclusive", "disk", "--", "sh", "-c",
           'set -- $(cat /proc/$$/stat); echo "in-group $5 fg $8"; exec cat']
    for round in ("eof", "int"):
        p = subprocess.Popen(cmd)
        print("wrapper", p.pid, flush=True)
        st = p.wait()
        print("round", round, "status", st, "fg-back", os.tcgetpgrp(0) == os.getpgrp(),
              "parent-sigint", len(got) > 0, flush=True)
    os._exit(0)
until("in-group")
os.write(fd, b"ping\n")
until("ping\r\nping")
os.write(fd, b"\x04")
until("round eof")
until("in-group", 2)
os.write(fd, b"\x03")
until("round int")
os.waitpid(pid, 0)
"#;

/// Under a terminal, the command reads it and gets its Ctrl-C as before; it runs in the group
/// the wrapper leads, which has the terminal meanwhile; the terminal goes back to the
/// caller's group afterwards, and the caller gets the Ctrl-C too, as it did.
#[test]
fn under_a_terminal_the_command_reads_it_and_gets_ctrl_c_and_the_terminal_comes_back() {
    let a = Agent::start();
    let out = drive_pty(PTY_DRIVER, &a.socket);
    let shown = text(&out.stdout);
    assert!(out.status.success(), "{shown}\n{}", text(&out.stderr));
    let words: Vec<&str> = shown.split_whitespace().collect();
    let after = |w: &str, n: usize| -> Vec<String> {
        words
            .windows(2)
            .filter(|p| p[0] == w)
            .map(|p| p[1].to_owned())
            .take(n)
            .collect()
    };
    let wrappers = after("wrapper", 2);
    let groups = after("in-group", 2);
    let fgs = after("fg", 2);
    assert_eq!(wrappers.len(), 2, "{shown}");
    // The command is in the wrapper's group, and that group has the terminal.
    assert_eq!(groups, wrappers, "{shown}");
    assert_eq!(fgs, wrappers, "{shown}");
    assert!(shown.contains("round eof status 0 fg-back True"), "{shown}");
    assert!(
        shown.contains("round int status 130 fg-back True parent-sigint True"),
        "{shown}"
    );
    assert!(a.holders("disk").is_empty());
}

/// On etcd, the session lost (etcd stopped): the fence kills the wrapper and the writer its
/// command started, not the wrapper alone. (Before: the writer ran on past the session.)
#[test]
fn a_fence_kills_the_writer_a_runs_command_started() {
    let etcd = leasehold_testkit::Etcd::start();
    let prefix = format!("/group{}/", std::process::id());
    let a = Agent::on_etcd("host-a", &etcd.endpoint(), &prefix, &[], &[]);
    let (mut wrapper, writer) = run_with_writer(&a, Stdio::null());
    etcd.stop();
    wait_until("the agent fences", Duration::from_secs(15), || {
        a.log().contains("fenced (SIGKILLed)")
    });
    wait_until("the wrapper is gone", Duration::from_secs(10), || {
        wrapper.try_wait().unwrap().is_some()
    });
    let killed = std::panic::catch_unwind(|| {
        wait_until("the writer is killed", Duration::from_secs(5), || {
            !alive(writer.0)
        })
    });
    etcd.cont();
    assert!(killed.is_ok(), "the writer outlived the fence");
}

/// On etcd, the agent killed and a hung one in its place: the wrapper kills its command by
/// the safe-until, and the writer the command started with it. (Before: the command only.)
#[test]
fn a_run_past_its_safe_until_kills_the_writer_its_command_started() {
    let etcd = leasehold_testkit::Etcd::start();
    let prefix = format!("/group-hung{}/", std::process::id());
    let mut a = Agent::on_etcd("host-a", &etcd.endpoint(), &prefix, &[], &[]);
    let (mut wrapper, writer) = run_with_writer(&a, Stdio::piped());
    let mut err = Lines::new(wrapper.stderr.take().unwrap());
    a.kill9();
    // A listener that never accepts: connections queue, requests are never answered.
    let _ = std::fs::remove_file(&a.socket);
    let _hung = std::os::unix::net::UnixListener::bind(&a.socket).unwrap();
    err.wait_for("lost contact", Duration::from_secs(10));
    let status = wrapper.wait().unwrap();
    assert!(!status.success());
    let err = err.rest(Duration::from_secs(5));
    assert!(err.contains("did not confirm"), "{err}");
    // The wrapper reaps what it kills before it exits.
    assert!(!alive(writer.0), "the writer outlived the safe-until");
}

/// A shell with job control, as far as this test needs one: runs a job (a script running
/// `leasehold run -- cat`) in its own group with the terminal, waits for it to stop or end,
/// and on a stop continues it in the foreground (`fg`).
const PTY_JOB_DRIVER: &str = r#"
pid, fd = pty.fork()
if pid == 0:
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    script = lh + ' run --exclusive disk -- sh -c "echo go; exec cat"; echo job-done $?'
    def job_start():
        # The job takes the terminal in its child, before it runs: a tcsetpgrp by this parent
        # after Popen returns may come after `run` handed the terminal to its own group, and
        # take it back (the command then stops on SIGTTIN).
        os.setpgrp()
        os.tcsetpgrp(0, os.getpid())
    job = subprocess.Popen(["sh", "-c", script], preexec_fn=job_start)
    _, st = os.waitpid(job.pid, os.WUNTRACED)
    os.tcsetpgrp(0, os.getpgrp())
    print("job-stopped", os.WIFSTOPPED(st), flush=True)
    os.tcsetpgrp(0, job.pid)
    os.killpg(job.pid, signal.SIGCONT)
    _, st = os.waitpid(job.pid, 0)
    os.tcsetpgrp(0, os.getpgrp())
    print("job-exit", os.waitstatus_to_exitcode(st), flush=True)
    os._exit(0)
until("go")
os.write(fd, b"one\n")
until("one\r\none")
os.write(fd, b"\x1a")
until("job-stopped True")
os.write(fd, b"two\n")
# The terminal's echo, then the command's copy once it runs again.
end = time.time() + 30
while out.count(b"two") < 2:
    if time.time() > end:
        sys.stdout.write(out.decode(errors="replace"))
        os.kill(pid, signal.SIGKILL)
        sys.exit("timed out waiting for the command to read on")
    r, _, _ = select.select([fd], [], [], 0.1)
    if r:
        out += os.read(fd, 4096)
os.write(fd, b"\x04")
until("job-exit")
os.waitpid(pid, 0)
"#;

/// Ctrl-Z on a script running `leasehold run` from a shell: the job stops (the wrapper hands
/// the terminal and the stop to the script's group), and `fg` continues the command, which
/// reads the terminal again. (Without it, the run's group stopped alone and the shell never
/// saw its job stop.)
#[test]
fn ctrl_z_stops_the_job_running_run_and_fg_continues_the_command() {
    let a = Agent::start();
    let out = drive_pty(PTY_JOB_DRIVER, &a.socket);
    let shown = text(&out.stdout);
    assert!(out.status.success(), "{shown}\n{}", text(&out.stderr));
    assert!(shown.contains("job-stopped True"), "{shown}");
    assert!(shown.contains("job-done 0"), "{shown}");
    assert!(shown.contains("job-exit 0"), "{shown}");
    assert!(a.holders("disk").is_empty());
    assert!(!a.is_dirty("disk"));
}

/// A shell script leading its own process group (a job, a service) that runs `SCRIPT` (with
/// `$LH` the CLI, aimed at agent `a`), then starts a long job recording its pid in
/// `job.pid` and exits 0; returns the job, once recorded and the script has exited.
fn script_leaving_a_job(a: &Agent, script: &str) -> Writer {
    use std::os::unix::process::CommandExt;
    let pidfile = a.path("job.pid");
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{script}\nsleep 3600 & echo $! > {}; exit 0",
            pidfile.display()
        ))
        .env("LH", bin())
        .env("LEASEHOLD_SOCKET", &a.socket)
        .process_group(0)
        .status()
        .unwrap();
    assert!(status.success(), "the script failed: {status}");
    Writer(wait_pid_file(&pidfile, Duration::from_secs(10)))
}

/// A script leading its group that took a lease and released it before starting its long
/// job: at its exit it held nothing, so the agent leaves the job running. (Before: the agent
/// SIGKILLed the group of every group-leading holder at its exit, and the job died.)
#[test]
fn a_group_leader_that_released_everything_keeps_its_jobs_at_exit() {
    let a = Agent::start();
    let job = script_leaving_a_job(
        &a,
        r#""$LH" acquire disk > /dev/null || exit 9; "$LH" release disk || exit 8"#,
    );
    a.wait_logged_mono_ns(&["after releasing every lease", "left running"]);
    assert!(alive(job.0), "the job of a holder that held nothing died");
    assert!(
        !a.log().contains("SIGKILLed its process group"),
        "{}",
        a.log()
    );
    assert!(a.holders("disk").is_empty() && !a.is_dirty("disk"));
}

/// The same script without the release: it still held the lease at its exit, so its job is
/// killed before the lease ends (dirty), as a `run` wrapper's writer is.
#[test]
fn a_group_leader_that_died_holding_a_lease_has_its_jobs_killed_first() {
    let a = Agent::start();
    let job = script_leaving_a_job(&a, r#""$LH" acquire disk > /dev/null || exit 9"#);
    let _next = grant_to_next(&a, &[3]);
    assert!(
        !alive(job.0),
        "the job still runs while the disk is granted to another process"
    );
    let v = a.inspect("disk").unwrap();
    assert_eq!(v["last_ended"]["how"], "process-died", "{v}");
    assert!(
        a.log().contains("SIGKILLed its process group"),
        "{}",
        a.log()
    );
}

/// Starts `sh -c 'sleep 3600 & exec sleep 3600'` leading its own process group with pid `pid`
/// (free now), given by `clone3` (root): no other process of the machine can take it first.
fn group_leader_with_pid(pid: u32) -> ProcessWithPid {
    require_root("gives a dead holder's pid to a new process (clone3 with set_tid)");
    SpawnWithPid::new("sh")
        .args(["-c", "sleep 3600 & exec sleep 3600"])
        .process_group()
        .spawn(pid)
        .unwrap_or_else(|e| panic!("a group leader with pid {pid}: {e}"))
}

/// The time since boot in clock ticks (as the start times of `/proc/PID/stat`), from
/// `/proc/uptime`'s seconds, given to the hundredth.
fn ticks_since_boot() -> u64 {
    let up = std::fs::read_to_string("/proc/uptime").unwrap();
    let secs = up.split_whitespace().next().unwrap();
    let (whole, hundredths) = secs.split_once('.').unwrap();
    whole.parse::<u64>().unwrap() * 100 + hundredths.parse::<u64>().unwrap()
}

/// A holder that died while the agent was down, its pid reused meanwhile by a new process
/// leading its own group (with a child): the restarted agent ends the dead holder's lease and
/// leaves the new process's group alone (its leader's start time is not the holder's).
#[test]
fn a_dead_holders_pid_reused_by_a_group_leader_is_left_alone_at_restart() {
    let mut a = Agent::start();
    let mut holder = Holder::new();
    let pid = holder.pid();
    let held_since = leasehold_api::host::start_time(pid).unwrap();
    expect_code(&a.lh(&["acquire", "disk", "--pid", &holder.pid_arg()]), 0);
    a.kill9();
    holder.kill9();
    // A process is known by its pid and its start time in clock ticks (10 ms): one that took
    // the pid within the holder's own tick would be the holder to anyone (a pid reused that
    // fast is given, as here; the kernel hands pids out in turn). The test is of a
    // reuse that can be told apart: the new process starts a tick later at least.
    wait_until(
        "a clock tick has passed since the holder started",
        Duration::from_secs(10),
        || ticks_since_boot() > held_since,
    );
    let mut leader = group_leader_with_pid(pid);
    wait_until(
        "the new group has two members",
        Duration::from_secs(10),
        || leasehold_api::host::group_members(pid, None).is_ok_and(|m| m.len() == 2),
    );
    a.spawn();
    wait_until(
        "the dead holder's lease ends",
        Duration::from_secs(10),
        || a.holders("disk").is_empty(),
    );
    let members = leasehold_api::host::group_members(pid, None).unwrap();
    // SAFETY: kill(2) on the group this test made; no memory is involved.
    unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
    let _ = leader.wait();
    assert_eq!(
        members.len(),
        2,
        "the new process's group was killed: {members:?}"
    );
    assert!(
        !a.log().contains("SIGKILLed its process group"),
        "{}",
        a.log()
    );
}

/// Fails the test, saying why, unless the agents here can give `run` a cgroup (root, and a
/// cgroup2 hierarchy with cgroup.kill): a test that cannot run must not pass.
fn require_cgroups(a: &Agent) {
    require_root("the agent moves run's wrapper into a cgroup");
    let out = a.lh(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["containment"],
        "cgroup",
        "this machine gives run no cgroup (cgroup2 with cgroup.kill needed, Linux 5.14): {}",
        a.log()
    );
}

/// `run --exclusive disk -- sh -c 'setsid sh -c "echo $$ > F; exec sleep 3600" & wait'`:
/// the writer leaves the wrapper's process group and session (a daemonizing launcher does).
fn run_with_escaping_writer(a: &Agent) -> (std::process::Child, Writer) {
    run_with_escaping_writer_by(a, a.cli())
}

/// [`run_with_escaping_writer`] with the CLI command `cli`.
fn run_with_escaping_writer_by(
    a: &Agent,
    mut cli: std::process::Command,
) -> (std::process::Child, Writer) {
    let pidfile = a.path("escaped.pid");
    let wrapper = cli
        .args(["run", "--exclusive", "disk", "--", "sh", "-c"])
        .arg(format!(
            "setsid sh -c 'echo $$ > {}; exec sleep 3600' & wait",
            pidfile.display()
        ))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let writer = Writer(wait_pid_file(&pidfile, Duration::from_secs(10)));
    (wrapper, writer)
}

/// The writer of [`run_with_escaping_writer`] is in no group of the wrapper's.
fn assert_escaped(writer: &Writer, wrapper: &std::process::Child) {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", writer.0)).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let pgrp: u32 = after.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert_ne!(pgrp, wrapper.id(), "the writer did not leave the group");
}

/// The wrapper SIGKILLed while a writer its command started has left its process group
/// (setsid): the agent kills the wrapper's cgroup, writer included, before it ends the lease.
/// (Before: the writer escaped the group kill and wrote on while the disk was granted again.)
#[test]
fn a_killed_wrappers_setsid_writer_is_dead_before_the_disk_is_granted_again() {
    let a = Agent::start();
    require_cgroups(&a);
    let (mut wrapper, writer) = run_with_escaping_writer(&a);
    assert_escaped(&writer, &wrapper);
    let _ = wrapper.kill();
    let _ = wrapper.wait();
    let _next = grant_to_next(&a, &[3]);
    assert!(
        !alive(writer.0),
        "the setsid writer still runs while the disk is granted to another process"
    );
    assert!(a.log().contains("SIGKILLed its cgroup"), "{}", a.log());
    let v = a.inspect("disk").unwrap();
    assert_eq!(v["last_ended"]["how"], "process-died", "{v}");
}

/// The cgroup v2 line of `/proc/PID/cgroup`.
fn cgroup_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("0::"))
        .unwrap_or_default()
        .to_owned()
}

/// A root wrapper is not moved into a cgroup: the agent makes the run's cgroup and the wrapper
/// starts its command in it (`clone3` with `CLONE_INTO_CGROUP`), so everything the command
/// starts runs there, a setsid writer too, which dies with the cgroup when the wrapper is
/// SIGKILLed, before the disk is granted again. (Before: the agent moved the wrapper itself,
/// a move that waits for an RCU grace period in the kernel, +10 ms a run on a busy host:
/// docs/performance.md.)
#[test]
fn a_root_runs_command_starts_in_its_cgroup_and_the_wrapper_is_not_moved() {
    let a = Agent::start();
    require_cgroups(&a);
    let (mut wrapper, writer) = run_with_escaping_writer(&a);
    assert_escaped(&writer, &wrapper);
    let run_cgroup = format!("/leasehold/{}-", wrapper.id());
    assert!(
        cgroup_of(writer.0).contains(&run_cgroup),
        "the writer is not in the run's cgroup: {}",
        cgroup_of(writer.0)
    );
    assert_eq!(
        cgroup_of(wrapper.id()),
        cgroup_of(std::process::id()),
        "the wrapper was moved out of the cgroup it was started in"
    );
    let _ = wrapper.kill();
    let _ = wrapper.wait();
    let _next = grant_to_next(&a, &[3]);
    assert!(
        !alive(writer.0),
        "the setsid writer still runs while the disk is granted to another process"
    );
    assert!(a.log().contains("SIGKILLed its cgroup"), "{}", a.log());
}

/// `cli` under a seccomp filter that answers ENOSYS to `clone3` (as container runtimes'
/// default profiles do on kernels they do not know): the wrapper cannot start its command in
/// a cgroup itself.
fn without_clone3(mut cli: std::process::Command) -> std::process::Command {
    use std::os::unix::process::CommandExt as _;
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    let insn = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let filter: Vec<libc::sock_filter> = vec![
        insn(LD_W_ABS, 0, 0, 4), // seccomp_data.arch
        insn(JEQ_K, 0, 3, AUDIT_ARCH_X86_64),
        insn(LD_W_ABS, 0, 0, 0), // seccomp_data.nr
        insn(JEQ_K, 0, 1, libc::SYS_clone3 as u32),
        insn(RET_K, 0, 0, libc::SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        insn(RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ];
    let filter: &'static [libc::sock_filter] = filter.leak();
    // SAFETY: prctl is async-signal-safe; the program it is given is 'static.
    unsafe {
        cli.pre_exec(move || {
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr().cast_mut(),
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER as libc::c_ulong,
                    std::ptr::addr_of!(prog),
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cli
}

/// A root wrapper that cannot start its command in the run's cgroup (`clone3` filtered) asks
/// the agent to move it in instead, as before, and starts its command as a plain child: the
/// setsid writer is in the cgroup still, and dies with it before the disk is granted again.
#[test]
fn a_wrapper_that_cannot_start_its_command_in_the_cgroup_is_moved_in() {
    let a = Agent::start();
    require_cgroups(&a);
    let out = without_clone3(a.cli())
        .args([
            "run",
            "--exclusive",
            "disk",
            "--",
            "sh",
            "-c",
            "echo $LEASEHOLD_CONTAINMENT",
        ])
        .output()
        .unwrap();
    expect_code(&out, 0);
    assert_eq!(text(&out.stdout), "cgroup\n");
    let (mut wrapper, writer) = run_with_escaping_writer_by(&a, without_clone3(a.cli()));
    assert_escaped(&writer, &wrapper);
    let run_cgroup = format!("/leasehold/{}-", wrapper.id());
    assert!(
        cgroup_of(writer.0).contains(&run_cgroup),
        "the writer is not in the run's cgroup: {}",
        cgroup_of(writer.0)
    );
    assert!(
        cgroup_of(wrapper.id()).contains(&run_cgroup),
        "the wrapper was not moved into the run's cgroup: {}",
        cgroup_of(wrapper.id())
    );
    let _ = wrapper.kill();
    let _ = wrapper.wait();
    let _next = grant_to_next(&a, &[3]);
    assert!(
        !alive(writer.0),
        "the setsid writer still runs while the disk is granted to another process"
    );
}

/// The same with the agent down when the wrapper dies: the restarted agent kills the dead
/// wrapper's cgroup (found by its pid and start time) before it ends the lease.
#[test]
fn a_setsid_writer_of_a_wrapper_that_died_while_the_agent_was_down_is_killed_at_restart() {
    let mut a = Agent::start();
    require_cgroups(&a);
    let (mut wrapper, writer) = run_with_escaping_writer(&a);
    a.kill9();
    let _ = wrapper.kill();
    let _ = wrapper.wait();
    assert!(
        alive(writer.0),
        "nothing kills the writer while the agent is down"
    );
    a.spawn();
    let _next = grant_to_next(&a, &[3, 5]);
    assert!(
        !alive(writer.0),
        "the setsid writer still runs while the disk is granted to another process"
    );
}

/// A force-released lease: the setsid writer is killed too. (Before: the agent SIGKILLed
/// the wrapper and its group, and the writer ran on.)
#[test]
fn a_force_released_runs_setsid_writer_is_killed() {
    let a = Agent::start();
    require_cgroups(&a);
    let (mut wrapper, writer) = run_with_escaping_writer(&a);
    expect_code(&a.lh(&["force-release", "disk", "--reason", "test"]), 0);
    assert!(!wrapper.wait().unwrap().success());
    wait_until(
        "the setsid writer is killed",
        Duration::from_secs(5),
        || !alive(writer.0),
    );
}

/// On etcd, the session lost: the fence kills the wrapper's cgroup, the setsid writer with
/// it. (Before: the fence killed the wrapper and its group; the writer ran on.)
#[test]
fn a_fence_kills_a_runs_setsid_writer() {
    let etcd = leasehold_testkit::Etcd::start();
    let prefix = format!("/group-setsid{}/", std::process::id());
    let a = Agent::on_etcd("host-a", &etcd.endpoint(), &prefix, &[], &[]);
    require_cgroups(&a);
    let (mut wrapper, writer) = run_with_escaping_writer(&a);
    etcd.stop();
    wait_until("the agent fences", Duration::from_secs(15), || {
        a.log().contains("fenced (SIGKILLed)")
    });
    wait_until("the wrapper is gone", Duration::from_secs(10), || {
        wrapper.try_wait().unwrap().is_some()
    });
    let killed = std::panic::catch_unwind(|| {
        wait_until(
            "the setsid writer is killed",
            Duration::from_secs(5),
            || !alive(writer.0),
        )
    });
    etcd.cont();
    assert!(killed.is_ok(), "the setsid writer outlived the fence");
}

/// `--cgroup-root off`: containment by process group only, as before cgroups: status and the
/// command say so, and a setsid writer survives its wrapper's SIGKILL (the documented limit).
#[test]
fn with_cgroups_off_run_is_contained_by_its_process_group_only() {
    let a = Agent::start_with(&["--cgroup-root", "off"]);
    let out = a.lh(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["containment"], "group", "{v}");
    let out = a.lh(&[
        "run",
        "--exclusive",
        "disk",
        "--",
        "sh",
        "-c",
        "echo $LEASEHOLD_CONTAINMENT; cat /proc/self/cgroup",
    ]);
    expect_code(&out, 0);
    let said = text(&out.stdout);
    assert!(said.starts_with("group\n"), "{said}");
    assert!(!said.contains("/leasehold/"), "{said}");
    let (mut wrapper, writer) = run_with_escaping_writer(&a);
    let _ = wrapper.kill();
    let _ = wrapper.wait();
    let _next = grant_to_next(&a, &[3]);
    assert!(alive(writer.0), "without cgroups the setsid writer escapes");
}

/// A bad --cgroup-root is refused at start, saying what to give instead.
#[test]
fn a_cgroup_root_that_is_no_cgroup2_directory_is_refused_at_start() {
    let a = Agent::unstarted("node1", &["--cgroup-root", "/tmp"], &[]);
    let out = a.command().output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("cgroup-root") && err.contains("cgroup2") && err.contains("off"),
        "{err}"
    );
}

/// A run as another user (nobody) is contained too, in a cgroup of its own; but nobody may ask
/// containment for anything but the asking process itself, not even a process of its own.
#[test]
fn a_non_root_run_is_contained_and_may_contain_only_itself() {
    let a = Agent::start_with(&["--socket-group", "nogroup"]);
    require_cgroups(&a);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(a.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut run = as_nobody(a.cli());
    run.args([
        "run",
        "--exclusive",
        "disk",
        "--",
        "sh",
        "-c",
        "echo $LEASEHOLD_CONTAINMENT; cat /proc/self/cgroup",
    ]);
    let out = run.output().unwrap();
    expect_code(&out, 0);
    let said = text(&out.stdout);
    assert!(said.starts_with("cgroup\n"), "{said}");
    assert!(said.contains("/leasehold/"), "{said}");
    // A raw request from nobody, asking containment for another process of nobody's.
    let mut other = as_nobody(std::process::Command::new("sleep"));
    let mut other = other.arg("3600").spawn().unwrap();
    let body = format!(
        r#"{{"items":[{{"resource":"disk2","mode":"exclusive"}}],"pid":{},"contain":true}}"#,
        other.id()
    );
    let script = r#"
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
b = sys.argv[2].encode()
s.sendall(b"POST /v1/acquire HTTP/1.1\r\nHost: leasehold\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(b) + b)
out = b""
while True:
    d = s.recv(65536)
    if not d:
        break
    out += d
sys.stdout.write(out.decode())
"#;
    let mut py = as_nobody(std::process::Command::new("python3"));
    py.args(["-c", script]).arg(&a.socket).arg(&body);
    let out = py.output().unwrap();
    let _ = other.kill();
    let _ = other.wait();
    let answer = text(&out.stdout);
    assert!(
        answer.contains("contain is for the calling process itself"),
        "{answer}\n{}",
        text(&out.stderr)
    );
    assert!(a.holders("disk2").is_empty());
}

/// A run refused (the disk held by another) was moved into a cgroup while its grant was
/// decided: granted nothing, it is moved back, and leaves no cgroup behind.
#[test]
fn a_refused_run_leaves_no_cgroup_behind() {
    let a = Agent::start();
    require_cgroups(&a);
    let holder = Holder::new();
    expect_code(&a.lh(&["acquire", "disk", "--pid", &holder.pid_arg()]), 0);
    let run = a
        .cli()
        .args(["run", "--exclusive", "disk", "--", "true"])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = run.id();
    let out = run.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(3));
    let log = a.log();
    let base = log
        .split("base=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("the agent names no cgroup base: {log}"));
    let left: Vec<String> = std::fs::read_dir(base)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&format!("{pid}-")))
        .collect();
    assert!(left.is_empty(), "{left:?} left in {base}");
}

/// The cgroups of ended runs are removed: each run's once it has ended, whether another run
/// follows (removed while that one's grant is committed) or not (within a second).
#[test]
fn the_cgroups_of_ended_runs_are_removed() {
    let a = Agent::start();
    require_cgroups(&a);
    let log = a.log();
    let base = log
        .split("base=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_else(|| panic!("the agent names no cgroup base: {log}"))
        .to_owned();
    let left = |pid: u32| {
        std::fs::read_dir(&base)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .any(|n| n.starts_with(&format!("{pid}-")))
    };
    let mut pids = Vec::new();
    for _ in 0..3 {
        let run = a
            .cli()
            .args(["run", "--exclusive", "disk", "--", "true"])
            .spawn()
            .unwrap();
        pids.push(run.id());
        let out = run.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(0));
    }
    wait_until(
        "the ended runs' cgroups are removed",
        Duration::from_secs(10),
        || !pids.iter().any(|p| left(*p)),
    );
    assert!(a.holders("disk").is_empty() && !a.is_dirty("disk"));
}

/// A process frozen by the cgroup v1 freezer, thawed when dropped: a SIGKILL sent to it stays
/// pending until it is thawed (it sits in `D`, as a process stuck in uninterruptible sleep
/// does), so a cgroup it is in cannot be emptied. (cgroup2's `cgroup.freeze` does not do: a
/// fatal signal kills a process it froze.)
struct Frozen {
    dir: std::path::PathBuf,
    pid: u32,
}

impl Frozen {
    /// Freezes `pid` in a freezer cgroup of its own; fails the test, saying why, where the
    /// v1 freezer is not mounted.
    fn new(pid: u32) -> Frozen {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mount = info
            .lines()
            .find_map(|l| {
                let (left, right) = l.split_once(" - ")?;
                let mut r = right.split_whitespace();
                let fstype = r.next()?;
                let opts = r.nth(1)?;
                let point = left.split_whitespace().nth(4)?;
                (fstype == "cgroup" && opts.split(',').any(|o| o == "freezer"))
                    .then(|| std::path::PathBuf::from(point))
            })
            .expect(
                "this test needs the cgroup v1 freezer mounted (to make a process SIGKILL cannot end at once)",
            );
        let dir = mount.join(format!("leasehold-test-{}-{pid}", std::process::id()));
        std::fs::create_dir(&dir).unwrap();
        let frozen = Frozen { dir, pid };
        std::fs::write(frozen.dir.join("cgroup.procs"), pid.to_string()).unwrap();
        std::fs::write(frozen.dir.join("freezer.state"), "FROZEN").unwrap();
        wait_until("the process is frozen", Duration::from_secs(10), || {
            std::fs::read_to_string(frozen.dir.join("freezer.state"))
                .is_ok_and(|s| s.trim() == "FROZEN")
        });
        frozen
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("freezer.state"), "THAWED");
        // Empty once the process is gone (or moved back to the root if it lives on).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::remove_dir(&self.dir).is_err() && std::time::Instant::now() < deadline {
            if let Some(root) = self.dir.parent() {
                let _ = std::fs::write(root.join("cgroup.procs"), self.pid.to_string());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A dead wrapper's cgroup that cannot be emptied (its writer frozen, so the agent's SIGKILL
/// does not take until it is thawed: a process stuck in uninterruptible sleep) keeps the lease
/// held for as long as it may write: nobody else is granted the disk, the log names the
/// cgroup and what to do, and `status` lists the dead holder and its cgroup. Once thawed, the
/// writer dies, the cgroup empties, and the disk is granted to the next.
#[test]
fn a_dead_wrappers_cgroup_that_cannot_be_emptied_keeps_the_lease_held_and_says_so() {
    let a = Agent::start();
    require_cgroups(&a);
    let (mut wrapper, writer) = run_with_escaping_writer(&a);
    let holder = u64::from(wrapper.id());
    listed_stuck(&a, holder, false);
    let frozen = Frozen::new(writer.0);
    let _ = wrapper.kill();
    let _ = wrapper.wait();
    let cgroup = format!("/leasehold/{}-", wrapper.id());
    wait_until(
        "the agent says the dead holder's cgroup cannot be emptied",
        Duration::from_secs(20),
        || {
            a.log()
                .lines()
                .any(|l| l.contains("survives SIGKILL") && l.contains(&cgroup))
        },
    );
    let said = a
        .log()
        .lines()
        .find(|l| l.contains("survives SIGKILL"))
        .unwrap()
        .to_owned();
    assert!(
        said.contains("force-release"),
        "what to do is not said: {said}"
    );
    assert!(
        alive(writer.0),
        "the frozen writer died: the test shows nothing"
    );
    // The lease stays held: nobody else is granted the disk; status lists it.
    let v = held_and_status(&a, holder);
    listed_stuck(&a, holder, true);
    let stuck = v["stuck"]
        .as_array()
        .unwrap_or_else(|| panic!("status does not say: {v}"));
    assert_eq!(stuck.len(), 1, "{v}");
    assert_eq!(stuck[0]["pid"], holder, "{v}");
    assert!(
        stuck[0]["cgroup"]
            .as_str()
            .is_some_and(|c| c.contains(&cgroup)),
        "{v}"
    );
    let human = text(&a.lh(&["status"]).stdout);
    assert!(human.contains(&cgroup), "{human}");
    // Thawed: the writer dies at last, and only then is the disk granted again.
    drop(frozen);
    let _next = grant_to_next(&a, &[3]);
    assert!(
        !alive(writer.0),
        "the writer runs while the disk is granted again"
    );
    assert!(a.log().contains("empty at last"), "{}", a.log());
    let out = a.lh(&["status", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["stuck"].as_array().is_none_or(|s| s.is_empty()), "{v}");
}

/// The same for a dead wrapper's process group (no cgroups): a writer in the group that
/// SIGKILL does not end keeps the lease held, the log says what to do, and `status` lists the
/// dead holder with its process group until the writer is gone.
#[test]
fn a_dead_wrappers_group_that_cannot_be_emptied_keeps_the_lease_held_and_says_so() {
    require_root("the test freezes the writer with the cgroup v1 freezer");
    let a = Agent::start_with(&["--cgroup-root", "off"]);
    let (mut wrapper, writer) = run_with_writer(&a, Stdio::null());
    let holder = u64::from(wrapper.id());
    listed_stuck(&a, holder, false);
    let frozen = Frozen::new(writer.0);
    let _ = wrapper.kill();
    let _ = wrapper.wait();
    wait_until(
        "the agent says the dead holder's group cannot be emptied",
        Duration::from_secs(20),
        || a.log().contains("process group survives SIGKILL"),
    );
    assert!(
        alive(writer.0),
        "the frozen writer died: the test shows nothing"
    );
    let v = held_and_status(&a, holder);
    listed_stuck(&a, holder, true);
    assert_eq!(v["stuck"][0]["pid"], holder, "{v}");
    assert_eq!(v["stuck"][0]["process_group"], holder, "{v}");
    drop(frozen);
    let _next = grant_to_next(&a, &[3]);
    assert!(
        !alive(writer.0),
        "the writer runs while the disk is granted again"
    );
    assert!(a.log().contains("gone at last"), "{}", a.log());
}

/// Asserts that `list` and `inspect`, as text and `--json`, and `GET /v1/leases` say whether
/// disk's holder `holder` is stuck (it died, and what it started survives SIGKILL).
#[track_caller]
fn listed_stuck(a: &Agent, holder: u64, stuck: bool) {
    let list = a.list();
    let disk = list
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["resource"] == "disk")
        .unwrap_or_else(|| panic!("no disk in {list}"));
    assert_eq!(disk["holders"][0]["pid"], holder, "{list}");
    assert_eq!(disk["holders"][0]["stuck"], stuck, "list --json: {list}");
    let v = a.inspect("disk").unwrap();
    assert_eq!(v["holders"][0]["stuck"], stuck, "inspect --json: {v}");
    let human = text(&a.lh(&["list"]).stdout);
    assert_eq!(human.contains("STUCK"), stuck, "list: {human}");
    let human = text(&a.lh(&["inspect", "disk"]).stdout);
    assert_eq!(human.contains("stuck:"), stuck, "inspect: {human}");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30", "--unix-socket"])
        .arg(&a.socket)
        .arg("http://leasehold/v1/leases")
        .output()
        .unwrap();
    let api: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("GET /v1/leases: {e}: {}", text(&out.stdout)));
    let disk = api["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["resource"] == "disk")
        .unwrap_or_else(|| panic!("no disk in {api}"));
    // The API leaves it out when false.
    assert_eq!(
        disk["holders"][0]["stuck"].as_bool().unwrap_or(false),
        stuck,
        "GET /v1/leases: {api}"
    );
}

/// Asserts that `holder` still holds disk and that another owner is refused it (exit 3, even
/// accepting a dirty disk); returns `status --json`.
fn held_and_status(a: &Agent, holder: u64) -> serde_json::Value {
    assert_eq!(a.holders("disk"), vec![holder]);
    let next = Holder::new();
    expect_code(
        &a.lh(&[
            "acquire",
            "disk",
            "--accept-dirty",
            "--pid",
            &next.pid_arg(),
        ]),
        3,
    );
    let out = a.lh(&["status", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap()
}
