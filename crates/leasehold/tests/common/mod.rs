//! Helpers for black-box tests: real `leasehold agent` processes on temporary sockets and
//! state directories, the real CLI, and real holder processes. Everything a test starts is
//! stopped by PID when the test ends.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_leasehold")
}

/// A running agent on its own socket and state directory.
pub struct Agent {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub state: PathBuf,
    pub host: String,
    pub args: Vec<String>,
    /// A command prefix, e.g. `ip netns exec NS`, to run the agent inside something.
    pub wrap: Vec<String>,
    child: Option<Child>,
}

impl Agent {
    /// An agent for host `node1` with default settings.
    pub fn start() -> Agent {
        Agent::start_with(&[])
    }

    /// An agent with extra flags.
    pub fn start_with(args: &[&str]) -> Agent {
        Agent::launch("node1", args, &[])
    }

    /// An agent for `host` with extra flags, its command run after the prefix `wrap`.
    pub fn launch(host: &str, args: &[&str], wrap: &[&str]) -> Agent {
        let mut a = Agent::unstarted(host, args, wrap);
        a.spawn();
        a
    }

    /// The same, not started yet (call `spawn`).
    pub fn unstarted(host: &str, args: &[&str], wrap: &[&str]) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        Agent {
            socket: dir.path().join("agent.sock"),
            state: dir.path().join("state"),
            dir,
            host: host.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            wrap: wrap.iter().map(|s| s.to_string()).collect(),
            child: None,
        }
    }

    /// An agent for `host` on etcd at `endpoints` under `prefix`, with short timing so fault
    /// tests run in seconds: ttl 3 s, renew 1 s, fence margin 600 ms, grace 2 s.
    pub fn on_etcd(
        host: &str,
        endpoints: &str,
        prefix: &str,
        extra: &[&str],
        wrap: &[&str],
    ) -> Agent {
        let mut a = Agent::on_etcd_unstarted(host, endpoints, prefix, extra, wrap);
        a.spawn();
        a
    }

    /// The same, not started yet (call `spawn`).
    pub fn on_etcd_unstarted(
        host: &str,
        endpoints: &str,
        prefix: &str,
        extra: &[&str],
        wrap: &[&str],
    ) -> Agent {
        let mut args = vec![
            "--backend",
            "etcd",
            "--etcd-endpoints",
            endpoints,
            "--etcd-prefix",
            prefix,
            "--ttl",
            "3s",
            "--renew",
            "1s",
            "--fence-margin",
            "600ms",
            "--grace",
            "2s",
        ];
        args.extend_from_slice(extra);
        Agent::unstarted(host, &args, wrap)
    }

    /// The command that starts this agent.
    pub fn command(&self) -> Command {
        let mut c = match self.wrap.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin());
                c
            }
            None => Command::new(bin()),
        };
        c.arg("agent")
            .arg("--socket")
            .arg(&self.socket)
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--host-id")
            .arg(&self.host)
            .args(&self.args)
            .env_remove("LEASEHOLD_SOCKET")
            .env_remove("NOTIFY_SOCKET");
        c
    }

    /// Starts the agent and waits until it answers.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .unwrap();
        let child = self
            .command()
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        wait_until("the agent answers", Duration::from_secs(20), || {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("agent exited early ({status}):\n{}", self.log());
            }
            self.lh(&["status"]).status.success()
        });
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    /// kill -9 the agent.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM the agent and wait for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), libc::SIGTERM);
            let _ = c.wait();
        }
    }

    /// SIGTERM the agent; returns how long it took to exit. Panics, with its log, if it has
    /// not exited after `limit` (and kills it).
    pub fn stop_within(&mut self, limit: Duration) -> Duration {
        let mut c = self.child.take().expect("agent running");
        let start = Instant::now();
        signal(c.id(), libc::SIGTERM);
        loop {
            if c.try_wait().unwrap().is_some() {
                return start.elapsed();
            }
            if start.elapsed() > limit {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "the agent had not stopped {limit:?} after SIGTERM:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGSTOPs the agent and waits until every one of its threads is stopped: kill(2) only
    /// queues the stop, and a thread already running can still act for a moment after it.
    pub fn freeze(&self) {
        let pid = self.pid();
        signal(pid, libc::SIGSTOP);
        wait_until(
            "every thread of the agent to stop",
            Duration::from_secs(10),
            || all_threads_stopped(pid),
        );
    }

    /// kill -9, then start again on the same socket and state.
    pub fn restart_after_kill9(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Runs the CLI against this agent.
    pub fn lh(&self, args: &[&str]) -> Output {
        self.cli().args(args).output().unwrap()
    }

    /// The CLI command, aimed at this agent.
    pub fn cli(&self) -> Command {
        let mut c = Command::new(bin());
        c.env("LEASEHOLD_SOCKET", &self.socket);
        c
    }

    /// `list --json`, parsed.
    pub fn list(&self) -> serde_json::Value {
        let out = self.lh(&["list", "--json"]);
        assert!(out.status.success(), "list failed: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `inspect R --json`, parsed; `None` when unknown.
    pub fn inspect(&self, r: &str) -> Option<serde_json::Value> {
        let out = self.lh(&["inspect", r, "--json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    /// The pids holding `r`.
    pub fn holders(&self, r: &str) -> Vec<u64> {
        self.inspect(r)
            .map(|v| {
                v["holders"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|h| h["pid"].as_u64().unwrap())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn is_dirty(&self, r: &str) -> bool {
        self.inspect(r).is_some_and(|v| v["dirty"] == true)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// When the first log line containing every one of `words` was logged, on
    /// CLOCK_MONOTONIC in nanoseconds: human lines carry a wall-clock time (to the
    /// microsecond), converted here; the monotonic field itself is in JSON lines only.
    pub fn logged_mono_ns(&self, words: &[&str]) -> Option<u64> {
        let line = self
            .log()
            .lines()
            .find(|l| words.iter().all(|w| l.contains(w)))?
            .to_owned();
        let wall = humantime::parse_rfc3339(line.split_whitespace().next()?).ok()?;
        let wall_ns = wall.duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos();
        let now_wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_nanos();
        let now_mono = u128::from(monotonic_ns());
        u64::try_from((wall_ns + now_mono).checked_sub(now_wall)?).ok()
    }

    /// The same, waiting up to 10 s for the line: an agent may log an action just after
    /// the effect a test observes (a holder killed, a grant answered).
    #[track_caller]
    pub fn wait_logged_mono_ns(&self, words: &[&str]) -> u64 {
        let mut at = None;
        wait_until(
            &format!("the agent to log {words:?}"),
            Duration::from_secs(10),
            || {
                at = self.logged_mono_ns(words);
                at.is_some()
            },
        );
        at.unwrap()
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `c`, run as nobody (uid 65534) with primary group `gid` and these supplementary groups.
pub fn as_nobody_in(mut c: Command, gid: u32, groups: &'static [u32]) -> Command {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: setgroups, setgid and setuid are async-signal-safe; the slice is 'static.
    // They run in this order so that each still has the rights it needs.
    unsafe {
        c.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(65534) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c
}

/// `c`, run as nobody (uid and gid 65534, no supplementary groups).
pub fn as_nobody(c: Command) -> Command {
    as_nobody_in(c, 65534, &[])
}

/// A process that holds leases for a test: `sleep`, killed by PID when dropped.
pub struct Holder {
    child: Child,
}

impl Holder {
    pub fn new() -> Holder {
        Holder {
            child: Command::new("sleep").arg("3600").spawn().unwrap(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn pid_arg(&self) -> String {
        self.pid().to_string()
    }

    /// kill -9 and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid this test started; no memory is involved.
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// Whether every thread of `pid` is in the stopped state (`T` in `/proc/PID/task/TID/stat`).
pub fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // The state follows the command name's closing parenthesis.
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('T') || rest.starts_with('t'))
    })
}

pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// Now, in nanoseconds on CLOCK_MONOTONIC (shared by every process and namespace here).
pub use leasehold_agent::fence::monotonic_ns;

/// Waits, in a thread, for process `pid` to exit; the handle answers when (CLOCK_MONOTONIC
/// nanoseconds). It watches a pidfd, so it works for processes that are not our children.
pub fn death_watch(pid: u32) -> std::thread::JoinHandle<u64> {
    use std::os::fd::AsFd;
    let fd = rustix::process::pidfd_open(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::PidfdFlags::empty(),
    )
    .unwrap();
    std::thread::spawn(move || {
        let borrowed = fd.as_fd();
        let mut fds = [rustix::event::PollFd::new(
            &borrowed,
            rustix::event::PollFlags::IN,
        )];
        // Bounded: a process that outlives what was to kill it fails the test here (with
        // the caller's `join().unwrap()`) instead of hanging the suite.
        let deadline = std::time::Instant::now() + DEATH_WATCH_LIMIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            assert!(
                !left.is_zero(),
                "process {pid} is still alive {} s after its death watch began",
                DEATH_WATCH_LIMIT.as_secs()
            );
            let timeout = rustix::time::Timespec::try_from(left).ok();
            if rustix::event::poll(&mut fds, timeout.as_ref()).is_ok()
                && !fds[0].revents().is_empty()
            {
                return monotonic_ns();
            }
        }
    })
}

/// How long [`death_watch`] waits: far past any ttl + grace the tests use, on a busy machine.
const DEATH_WATCH_LIMIT: std::time::Duration = std::time::Duration::from_secs(180);

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// Asserts the exit code, showing the output otherwise.
#[track_caller]
pub fn expect_code(o: &Output, want: i32) {
    assert_eq!(
        code(o),
        want,
        "exit {} (want {want})\nstdout: {}\nstderr: {}",
        code(o),
        text(&o.stdout),
        text(&o.stderr)
    );
}

/// Polls `f` every 5 ms until true; panics naming `what` after `limit`.
#[track_caller]
pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if f() {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until a command has written its pid and a newline to `pidfile` (`echo $$ > F`), and
/// returns the pid.
pub fn wait_pid_file(pidfile: &Path, limit: Duration) -> u32 {
    wait_until("the command starts", limit, || {
        std::fs::read_to_string(pidfile).is_ok_and(|s| s.ends_with('\n'))
    });
    std::fs::read_to_string(pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A process given a chosen pid (`clone3` with `set_tid`, root), for tests of a pid that a
/// process which exited is seen to hold again. It lives in the test kit so that the agent's
/// unit tests use the same one. (Not every test file that includes this module uses it.)
#[allow(unused_imports)]
pub use leasehold_testkit::{PidSpawnError, ProcessWithPid, SpawnWithPid};

/// Fails the test, saying why, unless it runs as root: a test that cannot run must not pass.
/// `scripts/test` runs as root in CI.
#[track_caller]
pub fn require_root(why: &str) {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test needs root ({why}); run it as root, as scripts/test does in CI"
    );
}

/// The lines a child writes to one of its pipes, read by a thread as they come, so that a
/// test can wait for a line (an observable state) instead of sleeping.
pub struct Lines {
    rx: std::sync::mpsc::Receiver<String>,
    /// Every line read so far.
    pub seen: Vec<String>,
    eof: bool,
}

impl Lines {
    /// Starts reading `pipe` (e.g. `child.stdout.take().unwrap()`).
    pub fn new(pipe: impl std::io::Read + Send + 'static) -> Lines {
        use std::io::BufRead as _;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(pipe).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Lines {
            rx,
            seen: Vec::new(),
            eof: false,
        }
    }

    /// Reads lines until `f` holds of those seen, for up to `limit`; panics naming `what`
    /// and showing the lines otherwise (or when the pipe closes first).
    #[track_caller]
    pub fn wait_until(&mut self, what: &str, limit: Duration, f: impl Fn(&[String]) -> bool) {
        let deadline = Instant::now() + limit;
        while !f(&self.seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(e) => panic!(
                    "waiting for {what}: {}; lines so far:\n{}",
                    match e {
                        std::sync::mpsc::RecvTimeoutError::Timeout =>
                            format!("timed out after {limit:?}"),
                        std::sync::mpsc::RecvTimeoutError::Disconnected =>
                            "the pipe closed".to_owned(),
                    },
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits for a line containing `s`; returns it.
    #[track_caller]
    pub fn wait_for(&mut self, s: &str, limit: Duration) -> String {
        self.wait_until(&format!("a line with {s:?}"), limit, |l| {
            l.iter().any(|x| x.contains(s))
        });
        self.seen.iter().find(|x| x.contains(s)).unwrap().clone()
    }

    /// Every line up to the end of the pipe (the child has exited or closed it), for up to
    /// `limit`.
    #[track_caller]
    pub fn rest(&mut self, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        while !self.eof {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => self.eof = true,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!(
                    "the pipe stayed open {limit:?}; lines so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
        self.seen.join("\n")
    }
}

/// `leasehold watch --json` on `a`, returned once the agent has subscribed it (the CLI says
/// so on stderr), with its stdout's lines.
pub fn watch_json(a: &Agent) -> (Child, Lines) {
    let mut w = a
        .cli()
        .args(["watch", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = Lines::new(w.stderr.take().unwrap());
    err.wait_for("watching", Duration::from_secs(10));
    let out = Lines::new(w.stdout.take().unwrap());
    (w, out)
}

/// The `kind` of each JSON event line.
pub fn kinds(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

// Metrics (an agent started with `--metrics-listen 127.0.0.1:0`).

/// The address the agent's metrics listener bound (it was given port 0), from its log.
pub fn metrics_addr(a: &Agent) -> String {
    let mut found = None;
    wait_until(
        "the agent logs its metrics address",
        Duration::from_secs(10),
        || {
            found = a
                .log()
                .lines()
                .find(|l| l.contains("serving metrics"))
                .and_then(|l| l.split("addr=").nth(1))
                .map(|s| s.split_whitespace().next().unwrap_or("").to_owned());
            found.is_some()
        },
    );
    found.unwrap()
}

/// GET `path`: the status code and the body.
pub fn get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    c.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").expect("an HTTP reply");
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad status line: {head}"));
    (code, body.to_owned())
}

/// The value of the sample `name` (with its labels, as printed) in a metrics text.
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

pub fn metric(addr: &str, name: &str) -> f64 {
    let (code, body) = get(addr, "/metrics");
    assert_eq!(code, 200, "{body}");
    sample(&body, name).unwrap_or_else(|| panic!("no {name} in:\n{body}"))
}

#[track_caller]
pub fn wait_metric(addr: &str, name: &str, want: f64) {
    let mut last = f64::NAN;
    wait_until(
        &format!("{name} to be {want}"),
        Duration::from_secs(10),
        || {
            last = metric(addr, name);
            last == want
        },
    );
}
