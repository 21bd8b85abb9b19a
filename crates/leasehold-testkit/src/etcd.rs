//! One real etcd member.

use std::fs::OpenOptions;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, Once, PoisonError};
use std::time::{Duration, Instant};

use rustix::process::Signal;

use crate::proc;
use crate::tls::TestCerts;

/// How long a member may take to answer after it is started.
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How many times a start is retried when a probed port was taken before etcd bound it.
pub(crate) const PORT_ATTEMPTS: usize = 5;
/// Lines of etcd's log quoted in panic messages.
const LOG_LINES: usize = 40;

static CLUSTERS: AtomicU64 = AtomicU64::new(0);
static REAP_STALE: Once = Once::new();
/// Prefix of every member's temporary directory: `leasehold-testkit-etcd-PID-NAME-XXXXXX`.
const DIR_PREFIX: &str = "leasehold-testkit-etcd-";

/// Removes members' temporary directories left by test processes that no longer exist (an
/// `Etcd` in a `static`, or a killed test process, never runs `Drop`). Each holds about
/// 120 MB: etcd preallocates its write-ahead log.
fn reap_stale_dirs() {
    let tmp = std::env::temp_dir();
    let Ok(entries) = std::fs::read_dir(&tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(DIR_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A cluster token unique to this process and call, so that members of different test
/// clusters never accept each other even if ports are reused.
pub(crate) fn cluster_token() -> String {
    format!(
        "leasehold-testkit-{}-{}",
        std::process::id(),
        CLUSTERS.fetch_add(1, Ordering::Relaxed)
    )
}

/// `host` of a URL for `ip` (IPv6 addresses in brackets).
fn url_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// Parses an IP given by a caller, panicking with a clear message.
pub(crate) fn parse_ip(ip: &str) -> IpAddr {
    match ip.parse() {
        Ok(ip) => ip,
        Err(e) => panic!("leasehold-testkit: {ip:?} is not an IP address: {e}"),
    }
}

/// Whether etcd is being created for a new cluster or rejoins the one in its data directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ClusterState {
    New,
    Existing,
}

/// Why a member did not become ready.
pub(crate) struct NotReady {
    /// The member's process exited and a port it wanted was in use: retry on other ports.
    pub(crate) port_in_use: bool,
    pub(crate) message: String,
}

/// How ready [`Etcd::wait`] waits for a member to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Readiness {
    /// Its client port accepts TCP connections.
    Listening,
    /// `etcdctl endpoint health` succeeds: it has a leader and serves linearizable reads.
    Healthy,
}

/// One real `etcd` member, killed (by PID) and reaped on drop, with its data and log in a
/// temporary directory removed on drop.
///
/// Clients reach it at [`endpoint`](Etcd::endpoint); peers talk on another port of
/// 127.0.0.1. etcd logs at `warn` level (zap, JSON lines) into a file, not the test's output;
/// its tail is quoted in every panic message and available from [`log_tail`](Etcd::log_tail).
///
/// All methods take `&self`, so an `Etcd` can be shared between threads or kept in a
/// `static` (`LazyLock<Etcd>`): the process still dies with the test process (see the crate
/// docs), and its directory (`$TMPDIR/leasehold-testkit-etcd-PID-...`, about 120 MB since etcd
/// preallocates its write-ahead log) is removed by the first `Etcd` of a later test process.
pub struct Etcd {
    name: String,
    client_ip: IpAddr,
    client_port: u16,
    peer_port: u16,
    initial_cluster: String,
    token: String,
    data_dir: PathBuf,
    log_path: PathBuf,
    child: Mutex<Option<Child>>,
    /// More flags for etcd, given at every start of this member.
    pub(crate) extra_args: Vec<String>,
    /// The certificates when clients must use TLS (copies in the member's directory).
    tls: Option<TlsFiles>,
    /// The root user's password once authentication is enabled: etcdctl then logs in as root.
    root_password: Mutex<Option<String>>,
    _dir: tempfile::TempDir,
}

/// The PEM files of a TLS member, copied from [`TestCerts`].
#[derive(Debug, Clone)]
struct TlsFiles {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

impl Etcd {
    /// Starts a one-member cluster whose clients listen on 127.0.0.1, and waits until it
    /// answers. Panics, quoting etcd's log, if it does not answer within 20 s.
    pub fn start() -> Etcd {
        Etcd::start_on("127.0.0.1")
    }

    /// Like [`start`](Etcd::start), but clients connect on `ip`, which must be an address of
    /// this network namespace: [`Netns::host_ip`](crate::Netns::host_ip) for an etcd that
    /// processes in a [`Netns`](crate::Netns) can reach, or `0.0.0.0` for every address (the
    /// endpoint is then given as 127.0.0.1). Peers still use 127.0.0.1.
    pub fn start_on(ip: &str) -> Etcd {
        Etcd::start_on_with(ip, &[])
    }

    /// Like [`start`](Etcd::start), with more flags for etcd, such as
    /// `--quota-backend-bytes=8388608`; they are given again at every restart.
    pub fn start_with(args: &[&str]) -> Etcd {
        Etcd::start_on_with("127.0.0.1", args)
    }

    /// Like [`start_with`](Etcd::start_with), but clients must use TLS and present a client
    /// certificate signed by `certs`' CA (`--client-cert-auth`); the endpoint is
    /// `https://127.0.0.1:PORT` and [`etcdctl`](Etcd::etcdctl) uses `certs`' client
    /// certificate. The files are copied: `certs` may be dropped.
    pub fn start_tls(certs: &TestCerts, args: &[&str]) -> Etcd {
        Etcd::start_inner("127.0.0.1", args, Some(certs))
    }

    fn start_on_with(ip: &str, args: &[&str]) -> Etcd {
        Etcd::start_inner(ip, args, None)
    }

    fn start_inner(ip: &str, args: &[&str], certs: Option<&TestCerts>) -> Etcd {
        let ip = parse_ip(ip);
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let ports = proc::free_ports(&[ip, IpAddr::V4(Ipv4Addr::LOCALHOST)]);
            let name = "m0".to_owned();
            let initial_cluster = format!("{name}=http://127.0.0.1:{}", ports[1]);
            let mut etcd = Etcd::new(
                name,
                ip,
                ports[0],
                ports[1],
                initial_cluster,
                cluster_token(),
            );
            etcd.extra_args = args.iter().map(|a| (*a).to_owned()).collect();
            if let Some(c) = certs {
                etcd.use_tls(c);
            }
            etcd.spawn(ClusterState::New);
            match etcd.wait(Readiness::Healthy, START_TIMEOUT) {
                Ok(()) => return etcd,
                Err(e) if e.port_in_use => last = e.message,
                Err(e) => panic!("leasehold-testkit: etcd did not start: {}", e.message),
            }
        }
        panic!("leasehold-testkit: etcd did not start after {PORT_ATTEMPTS} port probes: {last}")
    }

    /// A member that is not started yet, with a fresh temporary directory.
    pub(crate) fn new(
        name: String,
        client_ip: IpAddr,
        client_port: u16,
        peer_port: u16,
        initial_cluster: String,
        token: String,
    ) -> Etcd {
        REAP_STALE.call_once(reap_stale_dirs);
        let dir = match tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-{name}-", std::process::id()))
            .tempdir()
        {
            Ok(d) => d,
            Err(e) => panic!("leasehold-testkit: cannot create a temporary directory: {e}"),
        };
        Etcd {
            data_dir: dir.path().join(format!("{name}.etcd")),
            log_path: dir.path().join(format!("{name}.log")),
            name,
            client_ip,
            client_port,
            peer_port,
            initial_cluster,
            token,
            child: Mutex::new(None),
            extra_args: Vec::new(),
            tls: None,
            root_password: Mutex::new(None),
            _dir: dir,
        }
    }

    /// Copies `certs` into the member's directory and serves clients over TLS with them.
    fn use_tls(&mut self, certs: &TestCerts) {
        let dir = self.data_dir.with_file_name("certs");
        if let Err(e) = std::fs::create_dir_all(&dir) {
            panic!("leasehold-testkit: creating {}: {e}", dir.display());
        }
        let copy = |from: PathBuf, name: &str| {
            let to = dir.join(name);
            if let Err(e) = std::fs::copy(&from, &to) {
                panic!("leasehold-testkit: copying {}: {e}", from.display());
            }
            to
        };
        let files = TlsFiles {
            ca: copy(certs.ca(), "ca.pem"),
            server_cert: copy(certs.server_cert(), "server.pem"),
            server_key: copy(certs.server_key(), "server-key.pem"),
            client_cert: copy(certs.client_cert(), "client.pem"),
            client_key: copy(certs.client_key(), "client-key.pem"),
        };
        self.extra_args.extend([
            format!("--cert-file={}", files.server_cert.display()),
            format!("--key-file={}", files.server_key.display()),
            format!("--trusted-ca-file={}", files.ca.display()),
            "--client-cert-auth".to_owned(),
        ]);
        self.tls = Some(files);
    }

    /// Enables etcd's authentication: a `root` user with `root_password`, and `user` with
    /// `password` whose role `ROLE-user` may read and write only keys under `prefix`. From
    /// then on [`etcdctl`](Etcd::etcdctl) runs as root. Panics, with etcdctl's output, if a
    /// step fails.
    pub fn enable_auth(&self, root_password: &str, user: &str, password: &str, prefix: &str) {
        let role = format!("role-{user}");
        let steps: [Vec<String>; 7] = [
            vec!["user".into(), "add".into(), format!("root:{root_password}")],
            vec!["role".into(), "add".into(), role.clone()],
            vec![
                "role".into(),
                "grant-permission".into(),
                role.clone(),
                "--prefix=true".into(),
                "readwrite".into(),
                prefix.into(),
            ],
            vec!["user".into(), "add".into(), format!("{user}:{password}")],
            vec!["user".into(), "grant-role".into(), user.into(), role],
            vec![
                "user".into(),
                "grant-role".into(),
                "root".into(),
                "root".into(),
            ],
            vec!["auth".into(), "enable".into()],
        ];
        for step in steps {
            let args: Vec<&str> = step.iter().map(String::as_str).collect();
            let out = self.etcdctl(&args);
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            // `user add root` already grants root the root role in some versions.
            if !out.status.success() && !text.contains("already") {
                panic!("leasehold-testkit: etcdctl {args:?} failed: {text}");
            }
        }
        *self
            .root_password
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(root_password.to_owned());
    }

    fn child(&self) -> MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts the etcd process (not waiting for it). Panics if one is already running.
    pub(crate) fn spawn(&self, state: ClusterState) {
        let mut child = self.child();
        if let Some(c) = child.as_mut() {
            if matches!(c.try_wait(), Ok(None)) {
                panic!("leasehold-testkit: etcd {} is already running", self.name);
            }
            // Exited on its own: reap it.
            let _ = c.wait();
        }
        let log = match OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
        {
            Ok(f) => f,
            Err(e) => panic!(
                "leasehold-testkit: cannot open {}: {e}",
                self.log_path.display()
            ),
        };
        let log2 = match log.try_clone() {
            Ok(f) => f,
            Err(e) => panic!("leasehold-testkit: cannot dup a log file handle: {e}"),
        };
        let client_url = format!(
            "{}://{}:{}",
            self.scheme(),
            url_host(self.client_ip),
            self.client_port
        );
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = proc::clean_command("etcd");
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(self.endpoint())
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(&self.initial_cluster)
            .arg("--initial-cluster-token")
            .arg(&self.token)
            .arg("--initial-cluster-state")
            .arg(match state {
                ClusterState::New => "new",
                ClusterState::Existing => "existing",
            })
            .args([
                "--logger",
                "zap",
                "--log-level",
                "warn",
                "--log-outputs",
                "stderr",
            ])
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        match proc::spawn_tied(cmd) {
            Ok(c) => *child = Some(c),
            Err(e) => panic!("leasehold-testkit: cannot start etcd (is it installed?): {e}"),
        }
    }

    /// Waits until the member is `ready`, or its process exits, or `timeout` passes.
    fn wait(&self, ready: Readiness, timeout: Duration) -> Result<(), NotReady> {
        let deadline = Instant::now() + timeout;
        let addr = SocketAddr::new(
            if self.client_ip.is_unspecified() {
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            } else {
                self.client_ip
            },
            self.client_port,
        );
        let mut listening = false;
        loop {
            if let Some(status) = self.exit_status() {
                let tail = self.log_tail(LOG_LINES);
                return Err(NotReady {
                    port_in_use: tail.contains("address already in use"),
                    message: format!(
                        "etcd {} ({}) exited with {status}; its log ends:\n{tail}",
                        self.name,
                        self.endpoint()
                    ),
                });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(NotReady {
                    port_in_use: false,
                    message: format!(
                        "etcd {} ({}) is not {} after {timeout:?}; its log ends:\n{}",
                        self.name,
                        self.endpoint(),
                        match ready {
                            Readiness::Listening => "listening",
                            Readiness::Healthy => "healthy",
                        },
                        self.log_tail(LOG_LINES)
                    ),
                });
            }
            // A cheap TCP probe first: etcdctl against a port nobody listens on yet spends its
            // whole dial timeout retrying.
            if !listening {
                listening = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok();
            }
            if listening && (ready == Readiness::Listening || self.is_healthy()) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(if listening { 100 } else { 20 }));
        }
    }

    /// Waits until the member is healthy, panicking with its log if it is not in `timeout`.
    pub(crate) fn wait_healthy_or_panic(&self, timeout: Duration) {
        if let Err(e) = self.wait(Readiness::Healthy, timeout) {
            panic!("leasehold-testkit: {}", e.message);
        }
    }

    /// Waits until started members of a new cluster are healthy (see [`NotReady`]).
    pub(crate) fn wait_healthy(&self, timeout: Duration) -> Result<(), NotReady> {
        self.wait(Readiness::Healthy, timeout)
    }

    /// The exit status if the process has exited (it is then reaped), `None` if it runs or
    /// was never started.
    fn exit_status(&self) -> Option<std::process::ExitStatus> {
        self.child()
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// The client URL, `http://IP:PORT` (127.0.0.1 when listening on `0.0.0.0`), or
    /// `https://` for a member started with [`start_tls`](Etcd::start_tls).
    pub fn endpoint(&self) -> String {
        let ip = if self.client_ip.is_unspecified() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            self.client_ip
        };
        format!("{}://{}:{}", self.scheme(), url_host(ip), self.client_port)
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// The peer URL, `http://127.0.0.1:PORT`.
    pub fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    /// The member's name (`m0` for a single member, `m0`, `m1`, ... in a cluster).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The PID of the etcd process, or `None` after [`kill`](Etcd::kill) or if it has exited.
    pub fn pid(&self) -> Option<u32> {
        let mut child = self.child();
        let c = child.as_mut()?;
        matches!(c.try_wait(), Ok(None)).then(|| c.id())
    }

    /// Whether the etcd process is running (a stopped process counts as running).
    pub fn is_running(&self) -> bool {
        self.pid().is_some()
    }

    /// Kills the process with `SIGKILL` and reaps it; nothing happens if it is not running.
    /// The data directory stays, for [`restart`](Etcd::restart).
    pub fn kill(&self) {
        if let Some(mut c) = self.child().take() {
            proc::kill_and_reap(&mut c);
        }
    }

    /// Freezes the process with `SIGSTOP`: its sockets stay open but it answers nothing, like
    /// a member that hangs. Panics if it is not running.
    pub fn stop(&self) {
        self.send(Signal::STOP, "SIGSTOP");
    }

    /// Resumes a process frozen by [`stop`](Etcd::stop) with `SIGCONT`. Panics if it is not
    /// running.
    pub fn cont(&self) {
        self.send(Signal::CONT, "SIGCONT");
    }

    fn send(&self, sig: Signal, name: &str) {
        let Some(pid) = self.pid() else {
            panic!(
                "leasehold-testkit: {name} to etcd {}: it is not running",
                self.name
            );
        };
        if let Err(e) = proc::signal(pid, sig) {
            panic!(
                "leasehold-testkit: {name} to etcd {} (pid {pid}): {e}",
                self.name
            );
        }
    }

    /// Kills the process if it runs, starts it again on the same ports and data directory
    /// (`--initial-cluster-state existing`: a cluster member rejoins its cluster), and waits
    /// up to 20 s until it is healthy. A cluster member is healthy only once a quorum is up:
    /// restarting one member of a cluster that has no quorum without it never becomes
    /// healthy; use [`restart_without_waiting`](Etcd::restart_without_waiting) for that.
    ///
    /// Panics if it does not become healthy (for instance because someone else took its port
    /// meanwhile), quoting its log.
    pub fn restart(&self) {
        self.kill();
        self.spawn(ClusterState::Existing);
        self.wait_healthy_or_panic(START_TIMEOUT);
    }

    /// Like [`restart`](Etcd::restart), but waits only until the client port accepts
    /// connections (etcd is up, whether or not it has a leader).
    pub fn restart_without_waiting(&self) {
        self.kill();
        self.spawn(ClusterState::Existing);
        if let Err(e) = self.wait(Readiness::Listening, START_TIMEOUT) {
            panic!("leasehold-testkit: {}", e.message);
        }
    }

    /// Whether `etcdctl endpoint health` succeeds within 1 s: the member runs, has a leader
    /// and serves a linearizable read.
    pub fn is_healthy(&self) -> bool {
        let mut cmd = self.etcdctl_command();
        cmd.args([
            "--dial-timeout=1s",
            "--command-timeout=1s",
            "endpoint",
            "health",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        cmd.status().is_ok_and(|s| s.success())
    }

    /// Runs `etcdctl` (API v3, `--endpoints` set to this member) with `args` and returns its
    /// output, whether it succeeded or not. Panics only if `etcdctl` cannot be run.
    ///
    /// etcdctl's defaults are a 2 s dial timeout and a 5 s command timeout; pass
    /// `--dial-timeout=...`/`--command-timeout=...` for other values.
    pub fn etcdctl(&self, args: &[&str]) -> Output {
        proc::output(self.etcdctl_command().args(args))
    }

    /// An `etcdctl` command (API v3, `--endpoints` set to this member, no `ETCDCTL_*`
    /// variables inherited) to add arguments to.
    pub fn etcdctl_command(&self) -> Command {
        let mut cmd = proc::etcdctl_command(&self.endpoint());
        if let Some(t) = &self.tls {
            cmd.arg(format!("--cacert={}", t.ca.display()))
                .arg(format!("--cert={}", t.client_cert.display()))
                .arg(format!("--key={}", t.client_key.display()));
        }
        if let Some(pw) = self
            .root_password
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            cmd.arg(format!("--user=root:{pw}"));
        }
        cmd
    }

    /// The data directory (inside a temporary directory removed on drop).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The file etcd's stdout and stderr go to, across restarts.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The last `lines` lines of etcd's log.
    pub fn log_tail(&self, lines: usize) -> String {
        proc::log_tail(&self.log_path, lines)
    }
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("name", &self.name)
            .field("endpoint", &self.endpoint())
            .field("peer_url", &self.peer_url())
            .field("pid", &self.pid())
            .field("data_dir", &self.data_dir)
            .finish()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
