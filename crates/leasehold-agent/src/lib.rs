//! The leasehold agent, one per host, as a library; `leasehold agent` is a thin front.
//!
//! The agent opens the store, re-adopts the leases of processes that still run (ending those
//! whose processes died while it was down), watches every holder with a pidfd, and serves the
//! API on a local Unix socket whose peer credentials decide what a caller may do. Stopping the
//! agent does not release leases: they belong to processes.
//!
//! ```no_run
//! # async fn demo() -> Result<(), leasehold_agent::AgentError> {
//! use leasehold_agent::{Config, FileConfig};
//! let config = Config::resolve(FileConfig {
//!     host_id: Some("node1".into()),
//!     ..FileConfig::default()
//! })?;
//! leasehold_agent::run(config, async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use leasehold_core::{EndReason, Event};
use leasehold_store::{LocalStore, Store, StoreError};
use tokio::net::UnixListener;
use tracing::{info, warn};

mod accounts;
mod before_fence;
pub mod cgroup;
pub mod config;
mod delivery;
pub mod fence;
mod holds;
mod http;
pub mod metrics;
mod notify;
mod peer;
pub mod procfs;
mod service;
mod watcher;

pub use config::{Backend, Config, ConfigError, FileConfig, Timing};
pub use notify::notify;
pub use service::Service;
pub use watcher::{Prepared, Watcher};

/// Why the agent could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The configuration was refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The store could not be opened or failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// Another agent answers on the socket.
    #[error("another agent is already serving {0}; stop it first, or pass another --socket")]
    SocketInUse(PathBuf),
    /// The socket could not be set up.
    #[error("socket {path}: {doing}: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// What was being done.
        doing: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// A directory the agent keeps its socket or state in is not safe to use, or the socket
    /// path holds something other than a socket.
    #[error("{0}")]
    UnsafePath(String),
}

impl AgentError {
    /// Whether starting again cannot help: the configuration, or state a person must repair or
    /// move (a damaged database, an unsafe directory). `leasehold agent` exits 2 for these,
    /// and the systemd unit does not restart on 2.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            AgentError::Config(_)
                | AgentError::UnsafePath(_)
                | AgentError::Store(StoreError::BadState(_))
                // Settings etcd refuses (TLS, user, password, rights).
                | AgentError::Store(StoreError::Misconfigured(_))
        )
    }
}
/// How long calls in flight may take to finish once the agent is told to stop, before every
/// connection is closed.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_millis(250);

/// Runs the agent described by `config` until `shutdown` completes.
///
/// # Errors
/// [`AgentError`] when the store, the socket or the server fails.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    // Before touching the store: a live agent on the socket is the clearest reason to stop.
    refuse_live_socket(&config.socket)?;
    if let Some(dir) = config.socket.parent() {
        private_dir(dir, "socket", "--socket", 0o755)?;
    }
    private_dir(&config.state_dir, "state", "--state-dir", 0o700)?;
    raise_fd_limit();
    match config.backend {
        Backend::Local => {
            let store = LocalStore::open_with(
                &config.state_dir,
                config.host_id.clone(),
                leasehold_store::LocalStoreOptions {
                    engine: leasehold_core::EngineConfig {
                        grace: config.timing.grace,
                    },
                    forget_after: config.forget_after,
                    ..Default::default()
                },
            )?;
            serve(store, config, shutdown).await
        }
        Backend::Etcd => {
            let t = &config.timing;
            let opts = leasehold_store::EtcdOptions {
                endpoints: config.etcd_endpoints.clone(),
                prefix: config.etcd_prefix.clone(),
                ttl: t.ttl,
                renew: t.renew,
                grace: t.grace,
                // A request must fail well before the fencing deadline could pass unnoticed.
                timeout: t.renew.min(std::time::Duration::from_secs(2)),
                session_file: Some(config.state_dir.join("etcd-session.json")),
                history: config.etcd_history.clone(),
                security: config.etcd_security.clone(),
            };
            // etcd may not be up yet (a host booting): wait for it, saying so. Anything else,
            // such as the host id being in use, or settings etcd refuses (a certificate, a
            // password), is final.
            tokio::pin!(shutdown);
            let store = loop {
                match leasehold_store::EtcdStore::open(config.host_id.clone(), opts.clone()).await {
                    Ok(s) => break s,
                    Err(StoreError::Unavailable(e)) => {
                        warn!(error = %e, endpoints = ?config.etcd_endpoints, "etcd is not reachable yet; retrying");
                        tokio::select! {
                            () = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
                            () = &mut shutdown => return Ok(()),
                        }
                    }
                    Err(e) => return Err(e.into()),
                }
            };
            serve(store, config, shutdown).await
        }
    }
}

/// Serves the API over `store` until `shutdown` completes.
///
/// # Errors
/// [`AgentError`] when the socket or the server fails.
pub async fn serve<S: Store>(
    store: S,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let store = Arc::new(store);
    let watcher = Watcher::new(store.clone());
    // Before re-adopting: a holder that died meanwhile has its cgroup killed first.
    let cgroups =
        cgroup::Cgroups::open(&config.cgroup_root).map_err(|message| ConfigError::Invalid {
            field: "cgroup-root",
            message,
        })?;
    if let Some(c) = cgroups {
        info!(base = %c.base().display(), "containment of run commands: a cgroup each");
        watcher.set_cgroups(c);
    }
    let holds = Arc::new(holds::Holds::default());
    let events = tokio::spawn(follow_events(
        store.clone(),
        watcher.clone(),
        holds.clone(),
        config.host_id.clone(),
    ));
    readopt(&store, &watcher).await?;
    watcher.sweep_cgroups();
    kill_stale(&watcher, store.stale_holders());
    let (deadline_tx, deadline) = tokio::sync::watch::channel(None);
    // Events of the agent itself (fencing), merged into `watch` with the store's.
    let (agent_events, _) = tokio::sync::broadcast::channel(256);
    let mut background = vec![events.abort_handle()];
    if let Some(session) = store.session() {
        // What holders asked to be done before a fence (libvirt's <on_lockfailure>).
        background.push(
            tokio::spawn(before_fence::run(
                session.clone(),
                watcher.clone(),
                config.timing,
            ))
            .abort_handle(),
        );
        let watchdog = config.watchdog.clone().map(fence::Watchdog::new);
        if let Some(w) = &watchdog {
            let every = (config.timing.renew / 2).min(std::time::Duration::from_secs(1));
            background.push(tokio::spawn(Arc::clone(w).feed(every)).abort_handle());
        }
        let fencer = Arc::new(fence::Fencer {
            store: store.clone(),
            watcher: watcher.clone(),
            holds: holds.clone(),
            events: agent_events.clone(),
            host: config.host_id.clone(),
            watchdog,
        });
        // The backend says the session is over (revoked, expired, restored away): every
        // holder of it dies now (but the revocable ones), before the store opens a new session.
        let f = fencer.clone();
        store.on_session_end(Box::new(move |_| {
            f.fence_now(
                std::time::Instant::now(),
                "the host session ended: fenced (SIGKILLed) every local holder but the revocable ones",
            );
        }));
        background.push(
            tokio::spawn(fence::fence(session, fencer, config.timing, deadline_tx)).abort_handle(),
        );
    }
    let (listener, bound) = bind(&config.socket, config.socket_group.as_ref())?;
    let config = Arc::new(config);
    if let Some(addr) = config.metrics_listen {
        let listener = metrics::bind(addr).await.map_err(|e| AgentError::Socket {
            path: PathBuf::from(format!("metrics-listen {addr}")),
            doing: "binding".into(),
            source: e,
        })?;
        let backend = config.backend.to_string();
        background
            .push(tokio::spawn(metrics::serve(listener, store.clone(), backend)).abort_handle());
    }
    let service = Service::new(
        store.clone(),
        watcher.clone(),
        holds,
        deadline,
        agent_events,
        config.clone(),
    );
    info!(
        host = %config.host_id,
        backend = %config.backend,
        socket = %config.socket.display(),
        state_dir = %config.state_dir.display(),
        watched = watcher.len(),
        "agent ready"
    );
    if let Err(e) = notify("READY=1\nSTATUS=serving") {
        warn!(error = %e, "could not notify the service manager");
    }
    // Stopping: no new connections, a moment for calls in flight, then every connection is
    // cut, streams included (run wrappers, watches, waiters): their clients carry on with the
    // next agent, as after a crash. Waiting for them to end would never end.
    let (cut_tx, cut_rx) = tokio::sync::watch::channel(false);
    let (stopping_tx, stopping) = tokio::sync::watch::channel(false);
    let stop_started = Arc::new(std::sync::OnceLock::new());
    let stop = {
        let stop_started = stop_started.clone();
        async move {
            shutdown.await;
            let _ = stop_started.set(std::time::Instant::now());
            let _ = stopping_tx.send(true);
            let _ = notify("STOPPING=1");
            info!("agent stopping: closing client connections; leases stay with their processes");
            tokio::spawn(async move {
                tokio::time::sleep(STOP_GRACE).await;
                let _ = cut_tx.send(true);
            });
        }
    };
    let connections =
        peer::Connections::new(config.max_connections_per_user, config.max_connections);
    let accepting = tokio::spawn(accept(
        Incoming::new(listener, cut_rx, connections),
        service.clone(),
        config.request_timeout,
        stopping,
    ));
    stop.await;
    // Connections already served finish on their own (they are cut after STOP_GRACE).
    accepting.abort();
    info!(
        took_ms = stop_started.get().map_or(0, |at| at.elapsed().as_millis()),
        "agent stopped; leases stay with their processes"
    );
    for t in background {
        t.abort();
    }
    watcher.stop();
    remove_own_socket(&config.socket, bound);
    Ok(())
}

/// Watches the holders recorded for this host: those still running keep their leases, those
/// that died while no agent watched have their leases ended (dirty if exclusive).
async fn readopt<S: Store>(store: &Arc<S>, watcher: &Arc<Watcher<S>>) -> Result<(), AgentError> {
    let views = store.list().await?;
    let host = store.host().clone();
    let mut processes: Vec<_> = views
        .iter()
        .flat_map(|v| v.holders.iter())
        .filter(|l| l.owner.host() == &host)
        .map(|l| l.owner.process.clone())
        .collect();
    processes.sort();
    processes.dedup();
    // Those whose exit status decides how their leases end (libvirt's QEMU).
    for l in views.iter().flat_map(|v| v.holders.iter()) {
        if l.owner.host() == &host && l.owner.on_exit == leasehold_core::OnExit::Status {
            watcher.by_exit_status(&l.owner.process);
        }
    }
    for p in processes {
        watcher.watch(p);
    }
    Ok(())
}

/// Kills processes recorded as holders under an ended session of this host: they hold
/// nothing any more (the agent was down while its session expired, and nothing fenced them).
fn kill_stale<S: Store>(watcher: &Watcher<S>, stale: Vec<leasehold_core::ProcessKey>) {
    for p in stale {
        // What it started, in its cgroup, holds nothing either.
        watcher.kill_cgroup(&p);
        if let Ok(fd) = procfs::Pidfd::open(p.pid, p.start_time) {
            let killed = fd.signal(rustix::process::Signal::KILL).is_ok();
            warn!(
                pid = p.pid,
                killed,
                mono_ns = fence::monotonic_ns(),
                "killed a holder whose host session ended while no agent watched it"
            );
        }
    }
}

/// Follows the store's events: passes each ending to the client holding that lease, and
/// kills local holders whose leases were force-released.
async fn follow_events<S: Store>(
    store: Arc<S>,
    watcher: Arc<Watcher<S>>,
    holds: Arc<holds::Holds>,
    host: leasehold_core::HostId,
) {
    let mut rx = store.subscribe();
    loop {
        let e = match rx.recv().await {
            Ok(e) => e,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                warn!(
                    missed = n,
                    "event follower fell behind; holders re-check their leases"
                );
                holds.resync();
                continue;
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        let Event::Ended {
            resource, ended, ..
        } = &e
        else {
            continue;
        };
        holds.ended(resource, ended);
        if let EndReason::Forced { reason, by } = &ended.how
            && ended.owner.host() == &host
            && ended.owner.on_lost == leasehold_core::OnLost::Revoke
        {
            warn!(
                resource = %resource,
                pid = ended.owner.process.pid,
                token = %ended.token,
                by = %by,
                reason = %reason,
                "lease revoked; holder not killed (it asked on_lost = revoke): its token is refused by validate"
            );
        } else if let EndReason::Forced { reason, by } = &ended.how
            && ended.owner.host() == &host
        {
            let killed = watcher.kill_holder(&ended.owner.process);
            warn!(
                resource = %resource,
                pid = ended.owner.process.pid,
                token = %ended.token,
                by = %by,
                reason = %reason,
                killed,
                "lease revoked; holder killed"
            );
        }
    }
}

/// Raises the soft limit on open files to the hard one: the agent keeps a pidfd for every
/// holding process and a descriptor per client.
fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut l = getrlimit(Resource::Nofile);
    if l.current < l.maximum {
        let was = l.current;
        l.current = l.maximum;
        match setrlimit(Resource::Nofile, l) {
            Ok(()) => info!(from = ?was, to = ?l.maximum, "raised the open-file limit"),
            Err(e) => warn!(error = %e, "could not raise the open-file limit"),
        }
    }
}

/// Accepts connections until the agent stops, and serves each by its protocol.
async fn accept<S: Store>(
    mut incoming: Incoming,
    service: Service<S>,
    request_timeout: std::time::Duration,
    mut stopping: tokio::sync::watch::Receiver<bool>,
) {
    use tokio_stream::StreamExt;
    loop {
        let conn = tokio::select! {
            c = incoming.next() => c,
            _ = stopping.wait_for(|s| *s) => return,
        };
        match conn {
            Some(Ok(conn)) => {
                tokio::spawn(http::serve_connection(
                    conn,
                    service.clone(),
                    request_timeout,
                ));
            }
            Some(Err(_)) => {}
            None => return,
        }
    }
}

/// The listener as a stream of connections that pauses accepting while the agent is out of
/// file descriptors, instead of spinning on the error (the server asks again at once), and
/// counts each user's connections.
struct Incoming {
    listener: UnixListener,
    /// Given to each connection: true when the agent stops.
    cut: tokio::sync::watch::Receiver<bool>,
    connections: Arc<peer::Connections>,
    pause: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    warned: Option<std::time::Instant>,
}

impl Incoming {
    fn new(
        listener: UnixListener,
        cut: tokio::sync::watch::Receiver<bool>,
        connections: Arc<peer::Connections>,
    ) -> Incoming {
        Incoming {
            listener,
            cut,
            connections,
            pause: None,
            warned: None,
        }
    }
}

impl tokio_stream::Stream for Incoming {
    type Item = std::io::Result<peer::PeerStream>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        if let Some(p) = self.pause.as_mut() {
            if p.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.pause = None;
        }
        match self.listener.poll_accept(cx) {
            Poll::Ready(Ok((stream, _))) => Poll::Ready(Some(Ok(peer::PeerStream::new(stream)
                .cut_on(self.cut.clone())
                .admit(&self.connections)))),
            Poll::Ready(Err(e)) => {
                if procfs::out_of_fds(e.raw_os_error()) {
                    let quiet = self
                        .warned
                        .is_some_and(|at| at.elapsed() < std::time::Duration::from_secs(10));
                    if !quiet {
                        warn!(error = %e, "out of file descriptors; pausing accepting connections");
                        self.warned = Some(std::time::Instant::now());
                    }
                    self.pause = Some(Box::pin(tokio::time::sleep(
                        std::time::Duration::from_millis(100),
                    )));
                }
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

fn refuse_live_socket(path: &Path) -> Result<(), AgentError> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(AgentError::SocketInUse(path.to_owned()));
    }
    Ok(())
}

/// Creates directory `dir` (mode `mode`, and its missing parents 0755) if it is missing, and
/// checks that nobody but the agent's user (or root) can change what is in it: it is a real
/// directory, not a symbolic link; it belongs to the agent's user or root; and no group or
/// other user may write to it (for the socket, unless it is sticky, as /tmp, where nobody may
/// remove or replace another's files). Otherwise another local user could plant or swap the
/// socket or the database under the agent. `flag` is the flag that chooses it.
fn private_dir(dir: &Path, what: &str, flag: &str, mode: u32) -> Result<(), AgentError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let unsafe_dir = |why: String| {
        AgentError::UnsafePath(format!("the {what} directory {}: {why}", dir.display()))
    };
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(parent)
            .map_err(|e| unsafe_dir(format!("cannot create its parent: {e}")))?;
    }
    match std::fs::DirBuilder::new().mode(mode).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(unsafe_dir(format!("cannot create it: {e}"))),
    }
    let m = std::fs::symlink_metadata(dir).map_err(|e| unsafe_dir(e.to_string()))?;
    if m.is_symlink() {
        let target = std::fs::canonicalize(dir)
            .map_or_else(|_| "a missing path".to_owned(), |t| t.display().to_string());
        return Err(unsafe_dir(format!(
            "is a symbolic link (to {target}); the agent does not follow links there: name the \
             real directory with {flag}"
        )));
    }
    if !m.is_dir() {
        return Err(unsafe_dir("is not a directory".into()));
    }
    let me = rustix::process::geteuid().as_raw();
    if m.uid() != me && m.uid() != 0 {
        return Err(unsafe_dir(format!(
            "belongs to uid {}, not to the agent's user (uid {me}) or root; another user could \
             replace what the agent keeps there: use a directory of the agent's user",
            m.uid()
        )));
    }
    let sticky = m.mode() & 0o1000 != 0 && what == "socket";
    if m.mode() & 0o022 != 0 && !sticky {
        return Err(unsafe_dir(format!(
            "is writable by {} (mode {:o}), so another user could replace what the agent keeps \
             there; make it writable by its owner only: chmod go-w {}",
            if m.mode() & 0o002 != 0 {
                "every user"
            } else {
                "its group"
            },
            m.mode() & 0o7777,
            dir.display()
        )));
    }
    Ok(())
}

/// The identity of a file: device and inode.
type FileId = (u64, u64);

fn file_id(m: &std::fs::Metadata) -> FileId {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino())
}

/// Removes the socket at `path` only if it is still the one this agent bound: another agent
/// may have replaced it since, and anything that is not our socket stays.
fn remove_own_socket(path: &Path, bound: FileId) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if file_id(&m) == bound => {
            let _ = std::fs::remove_file(path);
        }
        Ok(_) => {
            info!(socket = %path.display(), "the socket path holds another file now; left in place")
        }
        Err(_) => {}
    }
}

/// Binds the socket: refuses when another agent answers on it or when the path holds anything
/// but a socket, replaces a stale socket, and makes it reachable by the agent's user (and
/// `group`, when given) only. Returns the listener and the socket file's identity.
fn bind(path: &Path, group: Option<&config::Group>) -> Result<(UnixListener, FileId), AgentError> {
    use std::os::unix::fs::FileTypeExt;
    let err = |doing: &str, source: std::io::Error| AgentError::Socket {
        path: path.to_owned(),
        doing: doing.to_owned(),
        source,
    };
    refuse_live_socket(path)?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|e| err("removing a stale socket", e))?;
        }
        Ok(m) => {
            let what = if m.is_dir() {
                "a directory"
            } else if m.is_symlink() {
                "a symbolic link"
            } else if m.is_file() {
                "a regular file"
            } else {
                "a special file"
            };
            return Err(AgentError::UnsafePath(format!(
                "socket {}: the path holds {what}, not a socket; the agent only ever replaces a \
                 stale socket, so it left it alone: pass another --socket, or move that file away",
                path.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err("looking at the path", e)),
    }
    let listener = UnixListener::bind(path).map_err(|e| err("binding", e))?;
    let bound = std::fs::symlink_metadata(path)
        .map(|m| file_id(&m))
        .map_err(|e| err("looking at the new socket", e))?;
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| err("setting its mode", e))?;
    if let Some(g) = group {
        std::os::unix::fs::chown(path, None, Some(g.gid))
            .map_err(|e| err(&format!("giving it to group {}", g.name), e))?;
    }
    Ok((listener, bound))
}
