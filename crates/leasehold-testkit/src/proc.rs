//! Process plumbing shared by the harness: spawning children that die with the test process,
//! signals by PID, clean environments for etcd tools, free ports and log tails.

use std::ffi::OsStr;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

/// A spawn request for the spawner thread.
struct Request {
    cmd: Command,
    reply: mpsc::SyncSender<io::Result<Child>>,
}

/// The spawner thread's inbox. The thread lives as long as the process (the sender is never
/// dropped), so a parent-death signal tied to it fires only when the test process ends.
static SPAWNER: OnceLock<mpsc::Sender<Request>> = OnceLock::new();

/// Spawns `cmd` so that the child gets `SIGKILL` when the test process ends, however it ends.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, so children are
/// forked by a dedicated thread that never exits rather than by the (short-lived) test thread.
pub(crate) fn spawn_tied(cmd: Command) -> io::Result<Child> {
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        let started = std::thread::Builder::new()
            .name("leasehold-testkit-spawner".into())
            .spawn(move || {
                for mut req in rx {
                    let result = spawn_with_death_signal(&mut req.cmd);
                    // The requester may have gone away (panicked); then the child is dropped
                    // here and its death signal still fires at process exit.
                    let _ = req.reply.send(result);
                }
            });
        if let Err(e) = started {
            panic!("leasehold-testkit: cannot start the spawner thread: {e}");
        }
        tx
    });
    let (reply, result) = mpsc::sync_channel(1);
    tx.send(Request { cmd, reply })
        .map_err(|_| io::Error::other("leasehold-testkit spawner thread is gone"))?;
    result
        .recv()
        .map_err(|_| io::Error::other("leasehold-testkit spawner thread dropped the request"))?
}

/// Spawns with `PR_SET_PDEATHSIG` = `SIGKILL` set in the child, on the calling thread.
fn spawn_with_death_signal(cmd: &mut Command) -> io::Result<Child> {
    let parent = rustix::process::getpid();
    // SAFETY: the closure runs in the child between fork and exec. It only makes the
    // async-signal-safe system calls prctl(2) and getppid(2) and builds `io::Error`s from raw
    // OS error codes, which does not allocate; it touches no locks or shared state.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
            // If the parent died between fork and prctl, the signal will never come.
            if rustix::process::getppid() != Some(parent) {
                return Err(rustix::io::Errno::SRCH.into());
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Sends `sig` to `pid`.
pub(crate) fn signal(pid: u32, sig: Signal) -> io::Result<()> {
    let raw = i32::try_from(pid).map_err(|_| io::Error::other("pid out of range"))?;
    let pid = Pid::from_raw(raw).ok_or_else(|| io::Error::other("pid 0"))?;
    Ok(rustix::process::kill_process(pid, sig)?)
}

/// SIGKILLs a child and reaps it.
pub(crate) fn kill_and_reap(child: &mut Child) {
    // Fails only if the child was already reaped, which `Child` prevents, or has exited, in
    // which case `wait` reaps it.
    let _ = child.kill();
    let _ = child.wait();
}

/// A command for an etcd tool with no `ETCD_*`/`ETCDCTL_*` variables inherited: etcd reads
/// its flags from those too and refuses to start when a variable and a flag conflict.
pub(crate) fn clean_command(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("ETCD_") || k.starts_with("ETCDCTL_") {
            cmd.env_remove(&key);
        }
    }
    cmd
}

/// An `etcdctl` command (API v3) aimed at `endpoints` (comma-separated).
pub(crate) fn etcdctl_command(endpoints: &str) -> Command {
    let mut cmd = clean_command("etcdctl");
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoints}"));
    cmd
}

/// Runs `cmd` to completion, capturing its output; panics if it cannot be started.
pub(crate) fn output(cmd: &mut Command) -> Output {
    match cmd.output() {
        Ok(out) => out,
        Err(e) => panic!("leasehold-testkit: cannot run {cmd:?}: {e}"),
    }
}

/// Runs `cmd`; on failure returns a message with its status and stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<Output, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Probes `ips.len()` distinct free TCP ports, one on each IP, by binding port 0. All probes
/// are held until every port is known, so the ports are distinct; they are free again on
/// return and can be taken by someone else before etcd binds them (callers retry).
pub(crate) fn free_ports(ips: &[IpAddr]) -> Vec<u16> {
    let mut held = Vec::with_capacity(ips.len());
    for ip in ips {
        let listener = match TcpListener::bind(SocketAddr::new(*ip, 0)) {
            Ok(l) => l,
            Err(e) => panic!(
                "leasehold-testkit: cannot bind {ip}:0 to find a free port: {e} \
                 (is {ip} an address of this network namespace?)"
            ),
        };
        held.push(listener);
    }
    held.iter()
        .map(|l| match l.local_addr() {
            Ok(a) => a.port(),
            Err(e) => panic!("leasehold-testkit: local_addr of a probe socket: {e}"),
        })
        .collect()
}

/// The last `lines` lines of the file at `path`, or a note saying why there are none.
pub(crate) fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            let start = all.len().saturating_sub(lines);
            if all.is_empty() {
                format!("({} is empty)", path.display())
            } else {
                all[start..].join("\n")
            }
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Runs every command at once and returns as soon as one exits successfully (killing and
/// reaping the rest), or `false` once all have failed or `deadline` passes.
pub(crate) fn race(cmds: Vec<Command>, deadline: Instant) -> bool {
    let mut children = Vec::new();
    for mut cmd in cmds {
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        match cmd.spawn() {
            Ok(c) => children.push(c),
            Err(e) => panic!("leasehold-testkit: cannot run {cmd:?}: {e}"),
        }
    }
    // `None` once a child has exited and been reaped by `try_wait`.
    let mut running: Vec<Option<Child>> = children.into_iter().map(Some).collect();
    let mut won = false;
    while !won && running.iter().any(Option::is_some) && Instant::now() < deadline {
        for slot in &mut running {
            let Some(child) = slot else { continue };
            match child.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => {
                    *slot = None;
                    if status.success() {
                        won = true;
                        break;
                    }
                }
                Err(_) => {
                    kill_and_reap(child);
                    *slot = None;
                }
            }
        }
        if !won {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    for child in running.iter_mut().flatten() {
        kill_and_reap(child);
    }
    won
}
