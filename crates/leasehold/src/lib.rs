//! `leasehold`: the agent (`leasehold agent`) and the commands that talk to it.
//!
//! Exit codes (SPEC §6): 0 ok, 1 error, 2 usage, 3 held by another owner (or `--wait` timed
//! out), 4 needs check, 5 agent unreachable. `run` exits with its command's status.
//!
//! Two binaries share this command line: `leasehold` ([`main_lean`]), the commands people
//! and scripts call, linked without the agent's runtime, store and etcd client so that it
//! starts fast (`leasehold run -- true` is mostly process start); and `leasehold-agent`
//! ([`main_full`]), the whole program, which `leasehold agent` and `leasehold bench` execute
//! in their place (same process, same arguments). See docs/performance.md.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use leasehold_client::blocking::{Client, Error as ClientError, ExitCode};
use leasehold_core::ResourceName;

/// Prints a line on standard output. When the reader has gone (`leasehold list | head -1`),
/// the command ends quietly with [`BROKEN_PIPE`] instead of panicking; other write errors end
/// it with exit 1.
macro_rules! out {
    ($($t:tt)*) => { $crate::write_out(format_args!($($t)*))? };
}

/// Prints a line on standard error, ignoring a closed standard error: a message nobody can
/// read must not end the command (it may hold a lease or wait on a child).
macro_rules! note {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let line = format!($($t)*);
        let _ = writeln!(std::io::stderr(), "{}", $crate::output::tame(&line));
    }};
}

/// Like [`note!`] without the newline, and raw: for the live progress line, whose own
/// control sequences redraw it (its names are escaped where they appear).
macro_rules! note_part {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr(), $($t)*);
    }};
}

mod bench;
mod commands;
mod logging;
mod manual;
mod output;
mod report;
mod run;

/// The exit codes, for `--help`: every [`ExitCode`] with what it means.
fn exit_codes_help() -> String {
    let mut s = String::from("Exit codes:\n");
    for c in ExitCode::ALL {
        s.push_str(&format!("  {:<3} {}\n", c.code(), c.meaning()));
    }
    s.push_str("  run exits with its command's exit status (128+N if killed by signal N).");
    s
}

/// Leases for VM disks and other shared resources.
#[derive(Parser, Debug)]
#[command(name = "leasehold", version, about, after_help = exit_codes_help())]
struct Cli {
    #[command(flatten)]
    global: Global,

    #[command(subcommand)]
    command: Command,
}

/// The flags every command takes.
#[derive(Args, Debug)]
struct Global {
    /// The agent's socket [default: $LEASEHOLD_SOCKET, else /run/leasehold/agent.sock for
    /// root, else $XDG_RUNTIME_DIR/leasehold/agent.sock]
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,

    /// Give up (exit 5) when the agent has not answered within DUR, or "off". A --wait adds
    /// its own deadline; run's command and watch's stream are not limited.
    #[arg(long, global = true, value_name = "DUR", default_value = DEFAULT_TIMEOUT,
          value_parser = parse_timeout)]
    timeout: Timeout,
}

/// `--timeout` when not given.
const DEFAULT_TIMEOUT: &str = "30s";

/// The command line of `leasehold run` alone: parsed first when the command is `run`, so
/// that the hot path does not build every command's parser (the whole [`Cli`] parses
/// anything this one does not accept, help included, with its own messages).
#[derive(Parser, Debug)]
#[command(name = "leasehold")]
struct RunCli {
    #[command(flatten)]
    global: Global,

    #[command(subcommand)]
    command: RunOnly,
}

#[derive(Subcommand, Debug)]
enum RunOnly {
    Run(run::RunArgs),
}

/// Whether the command named on this command line is `run` (after any global flags).
fn is_run(args: &[std::ffi::OsString]) -> bool {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("--socket" | "--timeout") => {
                it.next();
            }
            Some(a) if a.starts_with("--socket=") || a.starts_with("--timeout=") => {}
            Some(a) => return a == "run",
            None => return false,
        }
    }
    false
}

/// The usual `run` command line read without clap (building even `run`'s own parser is a
/// measurable part of a `run -- true`: docs/performance.md): `run`, then `--exclusive R`,
/// `--shared R`, `--owner L`, `--path` and the global `--socket P` (a value as the next
/// argument or after `=`), then `--` and the command. Anything else (another flag, a value
/// that is empty or starts with `-`, a flag given twice where it may be given once, text
/// that is not UTF-8) is `None`: clap parses it and answers as it does.
fn parse_run_fast(args: &[std::ffi::OsString]) -> Option<Cli> {
    let mut it = args.iter().skip(1);
    let (mut socket, mut owner, mut path) = (None, None, false);
    let (mut exclusive, mut shared) = (Vec::new(), Vec::new());
    let mut seen_run = false;
    loop {
        let a = it.next()?.to_str()?;
        if a == "--" {
            break;
        }
        if a == "run" && !seen_run {
            seen_run = true;
            continue;
        }
        if a == "--path" && seen_run && !path {
            path = true;
            continue;
        }
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) => (f, Some(v)),
            None => (a, None),
        };
        let value = match inline {
            Some(v) => v,
            None => it.next()?.to_str()?,
        };
        if value.is_empty() || value.starts_with('-') {
            return None;
        }
        let value = value.to_owned();
        match flag {
            "--socket" if socket.is_none() => socket = Some(PathBuf::from(value)),
            "--exclusive" if seen_run => exclusive.push(value),
            "--shared" if seen_run => shared.push(value),
            "--owner" if seen_run && owner.is_none() => owner = Some(value),
            _ => return None,
        }
    }
    let command: Vec<std::ffi::OsString> = it.cloned().collect();
    if !seen_run || command.is_empty() {
        return None;
    }
    Some(Cli {
        global: Global {
            socket,
            timeout: parse_timeout(DEFAULT_TIMEOUT).ok()?,
        },
        command: Command::Run(run::RunArgs::plain(exclusive, shared, path, owner, command)),
    })
}

/// Parses the command line: `run` by [`parse_run_fast`] or by its own small parser when it
/// can, else the whole one.
fn parse(args: &[std::ffi::OsString]) -> Result<Cli, clap::Error> {
    if let Some(cli) = parse_run_fast(args) {
        return Ok(cli);
    }
    if is_run(args)
        && let Ok(RunCli {
            global,
            command: RunOnly::Run(a),
        }) = RunCli::try_parse_from(args)
    {
        return Ok(Cli {
            global,
            command: Command::Run(a),
        });
    }
    Cli::try_parse_from(args)
}

/// Each command's arguments are defined only when that command is the one parsed (`defer`):
/// a start builds the parser of one command, not of fifteen (the agent's forty flags among
/// them). Help, the manual page and the completions build them all, as before. A command's
/// arguments are then added after its description, so the structs of its arguments have no
/// doc comment: clap would take it as the description.
#[derive(Subcommand, Debug)]
#[command(defer = true)]
enum Command {
    /// Run the agent (one per host) in the foreground.
    Agent(Box<AgentArgs>),
    /// Take a lease for a process (by default the caller's parent, such as the shell running
    /// this command) and print its token. The lease lasts until released; a holder that exits
    /// still holding an exclusive lease leaves the resource dirty, so release it (in a script:
    /// trap 'leasehold release R' EXIT), or use run.
    Acquire(AcquireArgs),
    /// Release leases of a process (by default the caller's parent).
    Release(ReleaseArgs),
    /// Take leases, run a command, release: clean if it exits 0, dirty otherwise.
    Run(run::RunArgs),
    /// List every known resource with its holders.
    List(ListArgs),
    /// Show one resource: holders, waiters, dirty mark, how its last lease ended.
    Inspect(InspectArgs),
    /// Show the agent's state.
    Status(JsonArg),
    /// Show every host's session on the backend: alive or expired since when, leases held.
    Hosts(JsonArg),
    /// Revoke every lease on a resource (root or the admin group). The holder is killed and
    /// the resource is left dirty.
    ForceRelease(ForceArgs),
    /// Clear a resource's dirty mark after checking it.
    MarkClean(NameArg),
    /// Exit 0 if TOKEN is the current grant of the resource, 1 otherwise.
    Validate(ValidateArgs),
    /// Stream lease events.
    Watch(WatchArgs),
    /// Measure acquire/release latency and throughput through a running agent, and
    /// `leasehold run -- true` beside `flock FILE true`.
    Bench(bench::BenchArgs),
    /// Print the manual page leasehold(1) (roff) on standard output.
    Man,
    /// Print a shell completion script on standard output.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: manual::Shell,
    },
}

// Flags of `leasehold agent` (a comment, not a doc comment: see `Command`).
#[derive(Args, Debug, Default)]
struct AgentArgs {
    /// A TOML config file; flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where the local store keeps its state [default: $LEASEHOLD_STATE_DIR, else
    /// /var/lib/leasehold for root, else ~/.local/state/leasehold]
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// This host's id [default: the hostname]
    #[arg(long)]
    host_id: Option<String>,
    /// local (embedded, default) or etcd.
    #[arg(long)]
    backend: Option<String>,
    /// etcd client URLs, comma-separated (or the flag repeated).
    #[arg(long, value_delimiter = ',', value_name = "URL,...")]
    etcd_endpoints: Option<Vec<String>>,
    /// Host session lifetime without renewal [default: 10s]
    #[arg(long)]
    ttl: Option<String>,
    /// Heartbeat interval [default: ttl/3]
    #[arg(long)]
    renew: Option<String>,
    /// Kill holders this long before the session could expire [default: ttl/5]
    #[arg(long)]
    fence_margin: Option<String>,
    /// After a session expires its resources stay unavailable this long [default: ttl/2]
    #[arg(long)]
    grace: Option<String>,
    /// The longest a killed holder may take to die [default: 1s]
    #[arg(long)]
    kill_timeout: Option<String>,
    /// Members of this group may force-release and mark-clean.
    #[arg(long)]
    admin_group: Option<String>,
    /// Members of this group may connect to the socket (mode 0660); without it, 0600.
    #[arg(long)]
    socket_group: Option<String>,
    /// The most connections one user other than root may have open at once [default: 1024]
    #[arg(long, value_name = "N")]
    max_connections_per_user: Option<usize>,
    /// The most connections all users other than root may have open together [default: 4096]
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Close a connection that takes longer than this to send a request's headers, or stays
    /// idle this long between requests [default: 10s]
    #[arg(long, value_name = "DUR")]
    request_timeout: Option<String>,
    /// The key prefix in etcd [default: /leasehold/]
    #[arg(long)]
    etcd_prefix: Option<String>,
    /// A watchdog device to feed while all is well; if a holder survives SIGKILL when this
    /// host must fence, feeding stops and the host resets (etcd backend).
    #[arg(long, value_name = "PATH")]
    watchdog: Option<PathBuf>,
    /// How long the watchdog takes to reset the host [default: 2s]; must be below grace.
    #[arg(long)]
    watchdog_timeout: Option<String>,
    /// Where `run` commands get a cgroup of their own (killed whole with their holder):
    /// a cgroup2 directory, `auto` (the agent's own cgroup, when root) or `off` (process
    /// groups only) [default: auto].
    #[arg(long, value_name = "PATH|auto|off")]
    cgroup_root: Option<String>,
    /// How often the agents compact etcd's history, or "off" when etcd's own
    /// --auto-compaction-* does it [default: 1m]
    #[arg(long)]
    etcd_compact_every: Option<String>,
    /// How much of etcd's history compaction keeps behind the present [default: 5m]
    #[arg(long)]
    etcd_history: Option<String>,
    /// Free, clean resource records unchanged this long are deleted, or "off" [default: 1h]
    #[arg(long)]
    etcd_forget_after: Option<String>,
    /// Local backend: records of free, clean resources unchanged this long are forgotten, or
    /// "off" [default: 1h]
    #[arg(long)]
    forget_after: Option<String>,
    /// etcd's --quota-backend-bytes, for the warning near it [default: 2GiB, etcd's default]
    #[arg(long)]
    etcd_quota: Option<String>,
    /// "on": the agents defragment an etcd member whose file is mostly free pages, one member
    /// at a time; "off": the operator does (`etcdctl defrag`) [default: on]
    #[arg(long)]
    etcd_defrag: Option<String>,
    /// The CA certificate (PEM) that signs etcd's server certificates; https:// endpoints
    /// without it are checked against the system's roots.
    #[arg(long, value_name = "FILE")]
    etcd_cacert: Option<PathBuf>,
    /// This agent's client certificate (PEM), for an etcd with --client-cert-auth.
    #[arg(long, value_name = "FILE")]
    etcd_cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long, value_name = "FILE")]
    etcd_key: Option<PathBuf>,
    /// The etcd user, when etcd's authentication is enabled (its password in
    /// --etcd-password-file).
    #[arg(long, value_name = "USER")]
    etcd_user: Option<String>,
    /// A file (mode 0600) holding the etcd user's password.
    #[arg(long, value_name = "FILE")]
    etcd_password_file: Option<PathBuf>,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// The log's level (error, warn, info, debug, trace) or a filter such as
    /// info,leasehold_store=debug [default: $LEASEHOLD_LOG, else $RUST_LOG, else info]
    #[arg(long, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Serve Prometheus /metrics, /livez and /readyz over plain HTTP at ADDR (IP:PORT, such as
    /// 127.0.0.1:9464) [default: off]
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// Allow a --metrics-listen address that is not loopback (the endpoints have no
    /// authentication).
    #[arg(long)]
    metrics_allow_remote: bool,
}

#[derive(Args, Debug)]
struct JsonArg {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

// Flags of `leasehold list` (a comment, not a doc comment: see `Command`).
#[derive(Args, Debug)]
pub(crate) struct ListArgs {
    /// Only resources whose names start with PREFIX.
    #[arg(value_name = "PREFIX")]
    prefix: Option<String>,
    /// Only resources held now.
    #[arg(long)]
    held: bool,
    /// Only dirty resources (needing a check).
    #[arg(long)]
    dirty: bool,
    /// Only resources with a holder on host H.
    #[arg(long, value_name = "H")]
    host: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct PathArg {
    /// Resource arguments are files, named by their canonical path.
    #[arg(long)]
    path: bool,
}

#[derive(Args, Debug)]
struct AcquireArgs {
    /// The resource.
    resource: String,
    /// Read-only: coexists with other shared leases, never with an exclusive one.
    #[arg(long)]
    shared: bool,
    /// The process to hold the lease [default: the caller's parent]
    #[arg(long)]
    pid: Option<u32>,
    /// A label for people, such as a VM name or uuid.
    #[arg(long, value_name = "LABEL")]
    owner: Option<String>,
    /// Wait until free, forever or up to DUR (e.g. --wait=30s).
    #[arg(long, value_name = "DUR", num_args = 0..=1, require_equals = true,
          default_missing_value = "forever", value_parser = parse_wait)]
    wait: Option<Duration>,
    /// Accept a dirty resource: you will check it before use (then mark-clean).
    #[arg(long)]
    accept_dirty: bool,
    #[command(flatten)]
    path: PathArg,
}

#[derive(Args, Debug)]
struct ReleaseArgs {
    /// The resources.
    #[arg(required = true)]
    resources: Vec<String>,
    /// The holder [default: the caller's parent]
    #[arg(long)]
    pid: Option<u32>,
    /// Mark the resources dirty: the next user must check them.
    #[arg(long)]
    dirty: bool,
    /// Hand the exclusive lease to the owner waiting on HOST (with LABEL), in one step.
    #[arg(long, value_name = "HOST[/LABEL]")]
    handover_to: Option<String>,
    /// Release only the lease with this fencing token (one per resource, in their order):
    /// a later grant of the resource to the same holder is left alone.
    #[arg(long, value_name = "TOKEN")]
    token: Vec<u64>,
    #[command(flatten)]
    path: PathArg,
}

#[derive(Args, Debug)]
struct InspectArgs {
    /// The resource.
    resource: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    path: PathArg,
}

#[derive(Args, Debug)]
struct NameArg {
    /// The resource.
    resource: String,
    #[command(flatten)]
    path: PathArg,
}

#[derive(Args, Debug)]
struct ForceArgs {
    /// The resource.
    resource: String,
    /// Why; recorded and shown by inspect.
    #[arg(long, required = true)]
    reason: String,
    #[command(flatten)]
    path: PathArg,
}

#[derive(Args, Debug)]
struct ValidateArgs {
    /// The resource.
    resource: String,
    /// The token to check.
    token: u64,
    #[command(flatten)]
    path: PathArg,
}

#[derive(Args, Debug)]
struct WatchArgs {
    /// Only this resource.
    resource: Option<String>,
    /// One JSON object per line.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    path: PathArg,
}

/// `forever` waits without end; `0` tries once, as no `--wait` at all (see [`wait_option`]);
/// otherwise a duration such as `30s`.
fn parse_wait(s: &str) -> Result<Duration, String> {
    match s {
        "forever" => Ok(Duration::MAX),
        s => humantime::parse_duration(s).map_err(|e| {
            format!("{s:?} is not a duration ({e}); write e.g. --wait=30s, --wait=forever (or a bare --wait), or --wait=0 to try once")
        }),
    }
}

/// The exit status when standard output was closed by its reader, as for a process killed by
/// SIGPIPE (128 + 13): the shell's view of `yes | head -1`.
pub const BROKEN_PIPE: ExitCode = ExitCode::BrokenPipe;

/// Writes one line on standard output, flushing it, so that a reader that went away is
/// noticed here: [`BROKEN_PIPE`] with no message, never a panic.
pub fn write_out(args: std::fmt::Arguments<'_>) -> Result<(), Failure> {
    use std::io::Write;
    let line = args.to_string();
    let mut o = std::io::stdout().lock();
    o.write_all(output::tame(&line).as_bytes())
        .and_then(|()| o.write_all(b"\n"))
        .and_then(|()| o.flush())
        .map_err(Failure::stdout)
}

/// A parsed `--wait` as the request's wait: none for `--wait=0` (try once, not waiting).
pub fn wait_option(w: Option<Duration>) -> Option<Duration> {
    w.filter(|d| !d.is_zero())
}

/// How long to wait for the agent's answer; `None` for ever.
#[derive(Debug, Clone, Copy)]
struct Timeout(Option<Duration>);

/// `off` never gives up; otherwise a duration above zero.
fn parse_timeout(s: &str) -> Result<Timeout, String> {
    if s == "off" {
        return Ok(Timeout(None));
    }
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("0 would give up at once; write e.g. 30s, or off".into()),
        Ok(d) => Ok(Timeout(Some(d))),
        Err(e) => Err(format!(
            "{s:?} is not a duration ({e}); write e.g. 30s, or off"
        )),
    }
}

/// The `--timeout` of this invocation.
static TIMEOUT: std::sync::OnceLock<Option<Duration>> = std::sync::OnceLock::new();

/// The `--timeout` of this invocation; `None` for ever.
pub fn timeout() -> Option<Duration> {
    TIMEOUT.get().copied().flatten()
}

/// `--timeout` plus `wait` (a `--wait` deadline), the longest to wait for the agent's next
/// word on a waiting acquire; `None` for ever.
pub fn timeout_with(wait: Option<Duration>) -> Option<Duration> {
    timeout()?.checked_add(wait.unwrap_or_default())
}

/// The failure of a call the agent did not answer within `--timeout`: exit 5.
fn no_answer() -> Failure {
    Failure {
        code: ExitCode::Unreachable,
        message: format!(
            "the agent did not answer within {} (--timeout); it may be stopping, overloaded or \
             stuck: look at its log (journalctl -u leasehold), or pass a longer --timeout (or \
             --timeout=off)",
            timeout().map_or_else(
                || "its time".into(),
                |t| humantime::format_duration(t).to_string()
            )
        ),
    }
}

/// The hint for `--wait 2s` (a space where `--wait=2s` needs `=`), if the arguments have one.
fn wait_space_hint(args: &[std::ffi::OsString]) -> Option<String> {
    args.windows(2).find_map(|w| {
        let (flag, value) = (w[0].to_str()?, w[1].to_str()?);
        let looks = value == "forever" || humantime::parse_duration(value).is_ok();
        (flag == "--wait" && looks).then(|| {
            format!(
                "--wait takes its duration after an \"=\": write --wait={value} (a bare --wait waits forever)"
            )
        })
    })
}

/// A command's failure: what to print and how to exit.
#[derive(Debug)]
pub struct Failure {
    /// The exit code.
    pub code: ExitCode,
    /// The message (may span lines).
    pub message: String,
}

impl Failure {
    /// An error (exit 1).
    pub fn error(message: impl Into<String>) -> Failure {
        Failure {
            code: ExitCode::Error,
            message: message.into(),
        }
    }

    /// Standard output could not be written: quietly [`BROKEN_PIPE`] when its reader went
    /// away, else an error naming the cause.
    pub fn stdout(e: std::io::Error) -> Failure {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            Failure {
                code: BROKEN_PIPE,
                message: String::new(),
            }
        } else {
            Failure::error(format!("writing to standard output: {e}"))
        }
    }

    /// A usage error (exit 2).
    pub fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: ExitCode::Usage,
            message: message.into(),
        }
    }
}

/// The one place an error of a call becomes an exit code and a message: the code is the
/// error's own ([`ClientError::exit_code`], for the agent's errors [`ErrorCode::exit_code`]
/// one-to-one); the message adds what to do.
///
/// [`ErrorCode::exit_code`]: leasehold_client::blocking::ErrorCode::exit_code
impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Failure {
        let code = e.exit_code();
        let message = match e {
            ClientError::Unreachable { socket, source }
                if source.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                socket_denied(&socket, &source.to_string())
            }
            e @ (ClientError::Unreachable { .. } | ClientError::NoSocket) => format!(
                "{e}\n  is the agent running? start it with: leasehold agent (as root), or pass --socket"
            ),
            e if e.is_timeout() => return no_answer(),
            ClientError::Refused(r) => output::refusal(&r),
            other => other.to_string(),
        };
        Failure { code, message }
    }
}

/// Why a caller may not use the agent's socket, and how it is opened to others.
fn socket_denied(socket: &std::path::Path, message: &str) -> String {
    use std::os::unix::fs::MetadataExt;
    let uid = rustix::process::geteuid().as_raw();
    let how = match std::fs::metadata(socket) {
        Ok(m) if m.mode() & 0o077 == 0 => format!(
            "the socket is open to its owner only (uid {}, mode {:o}); you are uid {uid}",
            m.uid(),
            m.mode() & 0o777
        ),
        Ok(m) => format!(
            "the socket (uid {}, gid {}, mode {:o}) is not open to you (uid {uid})",
            m.uid(),
            m.gid(),
            m.mode() & 0o777
        ),
        Err(_) => {
            format!("you (uid {uid}) may not reach it: a directory on the way is closed to you")
        }
    };
    format!(
        "permission denied on the agent's socket {}: {how}\n  run this as root (sudo leasehold ...), or open the socket to a group: set socket-group = \"leasehold\" in /etc/leasehold/agent.toml (or start the agent with --socket-group leasehold), restart the agent, and add yourself to that group (usermod -aG leasehold $USER, then log in again)\n  ({message})",
        socket.display()
    )
}

/// Turns resource arguments into names: as given, or with `--path` the canonical path of the
/// file.
pub fn names(args: &[String], path: bool) -> Result<Vec<ResourceName>, Failure> {
    if args.len() > leasehold_core::MAX_ITEMS {
        return Err(Failure::usage(format!(
            "{} resources named; at most {} per command: split them into several",
            args.len(),
            leasehold_core::MAX_ITEMS
        )));
    }
    args.iter()
        .map(|a| {
            let name = if path {
                std::fs::canonicalize(a)
                    .map_err(|e| Failure::usage(format!("--path: cannot resolve {a:?}: {e}")))?
                    .to_str()
                    .ok_or_else(|| Failure::usage(format!("--path: {a:?} is not UTF-8")))?
                    .to_owned()
            } else {
                a.clone()
            };
            ResourceName::new(name).map_err(|e| Failure::usage(format!("{a:?}: {e}")))
        })
        .collect()
}

/// Checks an `--owner` label here, before anything is asked of the agent: a bad one is a
/// usage error (exit 2), like a bad name.
pub fn label(l: Option<String>) -> Result<Option<String>, Failure> {
    if let Some(l) = &l {
        leasehold_core::check_free_text("--owner label", l, leasehold_core::MAX_LABEL)
            .map_err(|e| Failure::usage(output::escaped(&e.to_string())))?;
    }
    Ok(l)
}

fn name(arg: &str, path: bool) -> Result<ResourceName, Failure> {
    let mut v = names(&[arg.to_owned()], path)?;
    v.pop().ok_or_else(|| Failure::usage("no resource named"))
}

/// A client of the agent named by `--socket`, `$LEASEHOLD_SOCKET` or the default path, giving
/// up on an answer after `--timeout`. Nothing is connected yet: each call connects.
pub fn connect(socket: &Option<PathBuf>) -> Result<Client, Failure> {
    let client = match socket {
        Some(s) => Client::new(s),
        None => Client::default_socket()?,
    };
    Ok(client.with_timeout(timeout()))
}

/// The binary that `leasehold agent` and `leasehold bench` execute: beside this one.
pub const FULL_BINARY: &str = "leasehold-agent";

/// Where the binary named `name` is: beside the running one.
pub fn sibling(name: &str) -> Result<PathBuf, Failure> {
    let me =
        std::env::current_exe().map_err(|e| Failure::error(format!("finding this binary: {e}")))?;
    Ok(me.with_file_name(name))
}

/// In the lean `leasehold` binary: `agent` and `bench` continue in [`FULL_BINARY`], exec'd in
/// this process with the same arguments (the pid stays, for systemd's `Type=notify`).
fn exec_full(args: &[std::ffi::OsString]) -> Failure {
    use std::os::unix::process::CommandExt;
    let full = match sibling(FULL_BINARY) {
        Ok(p) => p,
        Err(f) => return f,
    };
    let e = std::process::Command::new(&full)
        .args(args.iter().skip(1))
        .exec();
    Failure::error(format!(
        "cannot start {}: {e}\n  the agent and the bench are in {FULL_BINARY}, installed beside leasehold; from a source tree, build both: cargo build --release -p leasehold",
        full.display()
    ))
}

/// The command line of the lean `leasehold`: `agent` and `bench` are handed to
/// [`FULL_BINARY`], so that none of their code (nor the runtime, store and etcd client under
/// them) is linked into this binary.
/// Returns the exit status: `src/main.rs` starts this without std's `fn main` on linux-gnu
/// and exits with it itself.
pub fn main_lean() -> u8 {
    // Test-only, in debug builds: a panic on demand, to show the lean binary's C `main`
    // catches it as std's start would (tests/cli.rs `a_panic_exits_101`).
    #[cfg(debug_assertions)]
    if std::env::var_os("LEASEHOLD_TEST_PANIC").is_some() {
        panic!("LEASEHOLD_TEST_PANIC is set");
    }
    main_with(|_, _, args| Err(exec_full(args)))
}

/// The command line of `leasehold-agent`: every command, `agent` and `bench` run here.
pub fn main_full() -> std::process::ExitCode {
    std::process::ExitCode::from(main_with(|command, socket, _| match command {
        Command::Agent(a) => commands::agent(*a, socket),
        Command::Bench(a) => bench::bench(a, &socket),
        _ => Err(Failure::error("not the agent or the bench")),
    }))
}

/// The command line of both binaries; `heavy` runs `agent` and `bench` (with the socket
/// flag and the whole command line). Returns the exit status.
fn main_with(
    heavy: impl FnOnce(Command, Option<PathBuf>, &[std::ffi::OsString]) -> Result<u8, Failure>,
) -> u8 {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let cli = match parse(&args) {
        Ok(cli) => cli,
        Err(e) => {
            let hint = e.use_stderr().then(|| wait_space_hint(&args)).flatten();
            let _ = e.print();
            if let Some(h) = hint {
                // Not `eprintln!`, which panics (exit 101) when stderr is a closed pipe: the
                // usage error's own exit code stands whether or not its words can be read.
                use std::io::Write as _;
                let _ = writeln!(std::io::stderr(), "\nhint: {h}");
            }
            return u8::try_from(e.exit_code()).unwrap_or(2);
        }
    };
    let _ = TIMEOUT.set(cli.global.timeout.0);
    let socket = cli.global.socket;
    // No async runtime for the calls: each is one request and one answer on the socket (the
    // bench alone builds a runtime, to drive many clients at once).
    let result = match cli.command {
        c @ (Command::Agent(_) | Command::Bench(_)) => heavy(c, socket, &args),
        Command::Man => manual::man(),
        Command::Completions { shell } => manual::completions(shell),
        Command::Acquire(a) => commands::acquire(a, &socket),
        Command::Release(a) => commands::release(a, &socket),
        Command::Run(a) => run::run(a, &socket),
        Command::List(a) => commands::list(a, &socket),
        Command::Inspect(a) => commands::inspect(a, &socket),
        Command::Status(a) => report::status(a.json, &socket),
        Command::Hosts(a) => report::hosts(a.json, &socket),
        Command::ForceRelease(a) => commands::force_release(a, &socket),
        Command::MarkClean(a) => commands::mark_clean(a, &socket),
        Command::Validate(a) => commands::validate(a, &socket),
        Command::Watch(a) => commands::watch(a, &socket),
    };
    match result {
        Ok(code) => code,
        Err(f) => {
            if !f.message.is_empty() {
                note!("leasehold: {}", f.message);
            }
            f.code.code()
        }
    }
}

#[cfg(test)]
mod parse_tests;

/// The binaries link the unwinder statically where the toolchain has it (build.rs): a panic
/// still unwinds, running what it passes over, and is caught. (This test binary is linked
/// the same way.)
#[cfg(test)]
mod unwind_tests {
    #[test]
    fn a_panic_unwinds_with_the_static_unwinder() {
        struct Mark<'a>(&'a std::cell::Cell<bool>);
        impl Drop for Mark<'_> {
            fn drop(&mut self) {
                self.0.set(true);
            }
        }
        let dropped = std::cell::Cell::new(false);
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _m = Mark(&dropped);
            std::panic::resume_unwind(Box::new("unwound"));
        }));
        assert_eq!(
            caught
                .err()
                .and_then(|e| e.downcast::<&str>().ok())
                .as_deref(),
            Some(&"unwound")
        );
        assert!(dropped.get());
    }
}
