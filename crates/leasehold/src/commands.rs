//! The commands other than `run` and `bench`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use leasehold_client::blocking::{
    Acquisition, Client, Error as ClientError, Event, ExitCode, ReleaseReport,
};
use leasehold_client::{AcquireEvent, AcquireOptions, Granted, ReleaseOptions};
use leasehold_core::{Mode, Token};
use serde_json::json;

use crate::output::{self, view_json, view_text};
use crate::{
    AcquireArgs, AgentArgs, Failure, ForceArgs, InspectArgs, NameArg, ReleaseArgs, ValidateArgs,
    WatchArgs, connect, name, names,
};

/// `leasehold agent`.
pub fn agent(a: AgentArgs, socket: Option<PathBuf>) -> Result<u8, Failure> {
    use leasehold_agent::{Config, FileConfig};
    let backend = a
        .backend
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(|e: leasehold_agent::ConfigError| Failure::usage(e.to_string()))?;
    // The socket clients find through $LEASEHOLD_SOCKET is where the agent listens too.
    let socket = socket.or_else(|| {
        std::env::var_os("LEASEHOLD_SOCKET")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    });
    let state_dir = a.state_dir.or_else(|| {
        std::env::var_os("LEASEHOLD_STATE_DIR")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
    });
    let flags = FileConfig {
        socket,
        state_dir,
        host_id: a.host_id,
        backend,
        etcd_endpoints: a.etcd_endpoints,
        ttl: a.ttl,
        renew: a.renew,
        fence_margin: a.fence_margin,
        grace: a.grace,
        kill_timeout: a.kill_timeout,
        admin_group: a.admin_group,
        socket_group: a.socket_group,
        max_connections_per_user: a.max_connections_per_user,
        max_connections: a.max_connections,
        request_timeout: a.request_timeout,
        etcd_prefix: a.etcd_prefix,
        watchdog: a.watchdog,
        cgroup_root: a.cgroup_root,
        watchdog_timeout: a.watchdog_timeout,
        etcd_compact_every: a.etcd_compact_every,
        etcd_history: a.etcd_history,
        etcd_forget_after: a.etcd_forget_after,
        forget_after: a.forget_after,
        etcd_quota: a.etcd_quota,
        etcd_defrag: a.etcd_defrag,
        etcd_cacert: a.etcd_cacert,
        etcd_cert: a.etcd_cert,
        etcd_key: a.etcd_key,
        etcd_user: a.etcd_user,
        etcd_password_file: a.etcd_password_file,
        log_level: a.log_level,
        log_json: a.log_json.then_some(true),
        metrics_listen: a.metrics_listen,
        metrics_allow_remote: a.metrics_allow_remote.then_some(true),
        // A file-only setting (`allow-revoke = false`).
        allow_revoke: None,
    };
    let file = match &a.config {
        Some(p) => FileConfig::read(p).map_err(|e| Failure::usage(e.to_string()))?,
        None => FileConfig::default(),
    };
    let merged = file.overlay(flags);
    let filter = crate::logging::filter(merged.log_level.as_deref()).map_err(Failure::usage)?;
    let json = merged.log_json.unwrap_or(false);
    let config = Config::resolve(merged).map_err(|e| Failure::usage(e.to_string()))?;
    crate::logging::init(filter, json);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| Failure::error(format!("starting the runtime: {e}")))?;
    rt.block_on(async {
        leasehold_agent::run(config, shutdown_signal())
            .await
            .map_err(|e| {
                // What a restart cannot fix exits 2, like a bad flag: the systemd unit does
                // not restart on it.
                let f = if e.is_final() {
                    Failure::usage
                } else {
                    Failure::error
                };
                f(output::escaped(&e.to_string()))
            })
    })?;
    Ok(0)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// The parent of this process, with its start time: the default holder for `acquire` and
/// `release`, so that a shell script holds what it acquires until it exits.
fn parent() -> Result<(u32, Option<u64>), Failure> {
    let ppid = rustix::process::getppid()
        .map(|p| p.as_raw_nonzero().get() as u32)
        .ok_or_else(|| {
            Failure::usage("this process has no parent to hold the lease; pass --pid")
        })?;
    // Reparented to init: the shell that ran this has exited, or this runs straight under
    // init. A lease for pid 1 would never end.
    if ppid == 1 {
        return Err(Failure::usage(
            "the parent of this process is pid 1 (init): the shell that started it has gone, so nothing would ever release the lease\n  pass --pid PID of the process that will hold it",
        ));
    }
    Ok((ppid, leasehold_api::host::start_time(ppid).ok()))
}

fn holder(pid: Option<u32>) -> Result<(u32, Option<u64>), Failure> {
    match pid {
        Some(0) => Err(Failure::usage(
            "--pid 0 names no process; pass the pid of the running process that holds the lease, or leave --pid out for the calling shell",
        )),
        Some(p) => Ok((p, leasehold_api::host::start_time(p).ok())),
        None => parent(),
    }
}

/// Waits for a grant, showing who is in the way: a live line on a terminal, plain lines
/// (when the holder changes, and every 10 s) otherwise.
pub fn wait_for_grant(acq: &mut Acquisition) -> Result<Granted, ClientError> {
    let tty = std::io::stderr().is_terminal();
    let mut shown = false;
    let mut last_key = String::new();
    let mut last_print = Instant::now();
    let clear = |shown: bool| {
        if tty && shown {
            note_part!("\r\x1b[2K");
        }
    };
    loop {
        let ev = acq.next_event();
        match ev {
            Ok(Some(AcquireEvent::Waiting {
                conflict, waited, ..
            })) => {
                let line = format!(
                    "waiting {}: {}",
                    humantime::format_duration(Duration::from_secs(waited.as_secs())),
                    output::conflict(&conflict)
                );
                let key = format!(
                    "{}{:?}{}{}",
                    conflict.resource,
                    conflict.holders.iter().map(|l| l.token).collect::<Vec<_>>(),
                    conflict.waiting,
                    conflict.reserved
                );
                if tty {
                    note_part!("\r\x1b[2K{line}");
                    shown = true;
                } else if key != last_key || last_print.elapsed() >= Duration::from_secs(10) {
                    note!("leasehold: {line}");
                    last_print = Instant::now();
                }
                last_key = key;
            }
            Ok(Some(AcquireEvent::Note(note))) => {
                clear(shown);
                shown = false;
                note!("leasehold: note: {note}");
            }
            Ok(Some(AcquireEvent::Granted(g))) => {
                clear(shown);
                return Ok(g);
            }
            Ok(Some(
                AcquireEvent::Lost { .. } | AcquireEvent::Safe { .. } | AcquireEvent::Released(_),
            )) => {}
            Ok(None) => {
                clear(shown);
                return Err(ClientError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the agent closed the request before answering",
                )));
            }
            Err(e) => {
                clear(shown);
                return Err(e);
            }
        }
    }
}

/// Starts an acquire and waits for its grant. While the request waits, losing the agent (it
/// restarted, or could not reach its backend for a moment) does not end the wait: the request
/// is made again, to the agent that answers, within the same deadline, and the caller is told.
/// Returns the client, the request (still open, for a hold) and the grant.
pub fn acquire_waiting(
    client: &Client,
    o: &AcquireOptions,
) -> Result<(Acquisition, Granted), Failure> {
    let deadline = o.wait.and_then(|w| Instant::now().checked_add(w));
    let mut told = false;
    loop {
        let mut attempt = o.clone();
        if let Some(d) = deadline {
            attempt.wait = Some(
                d.saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            );
        }
        let e = match try_acquire(client, &attempt) {
            Ok(done) => return Ok(done),
            Err(e) => e,
        };
        let retry = o.wait.is_some() && lost_agent(&e);
        if !retry {
            return Err(e.into());
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(Failure {
                code: ExitCode::Held,
                message: format!(
                    "the wait ran out while the agent could not be asked ({e}); nothing was acquired"
                ),
            });
        }
        // Once per outage: an agent that is down answers nothing until it is back.
        let unreachable = matches!(e, ClientError::Unreachable { .. });
        if !told || !unreachable {
            note!(
                "leasehold: note: lost the agent while waiting ({e}); asking again, within the same deadline (the request goes to the back of the queue)"
            );
            told = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn try_acquire(client: &Client, o: &AcquireOptions) -> Result<(Acquisition, Granted), ClientError> {
    let mut acq = client.start_acquire(o)?;
    // The stream is as long as the wait; give up when the agent says nothing for longer than
    // the --timeout beyond it.
    acq.socket().set_read_timeout(crate::timeout_with(o.wait))?;
    let g = wait_for_grant(&mut acq)?;
    Ok((acq, g))
}

/// Whether `e` says the agent went away or could not serve the request for now, rather than
/// refusing it or not answering in time.
fn lost_agent(e: &ClientError) -> bool {
    use leasehold_client::blocking::ErrorCode;
    match e {
        ClientError::Unreachable { .. } => true,
        ClientError::Io(io) => !matches!(
            io.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        ClientError::Agent { code, .. } => {
            matches!(code, ErrorCode::Unavailable | ErrorCode::BackendUnavailable)
        }
        _ => false,
    }
}

/// `leasehold acquire`.
pub fn acquire(a: AcquireArgs, socket: &Option<PathBuf>) -> Result<u8, Failure> {
    let r = name(&a.resource, a.path.path)?;
    let (pid, start_time) = holder(a.pid)?;
    let mode = if a.shared {
        Mode::Shared
    } else {
        Mode::Exclusive
    };
    let wait = crate::wait_option(a.wait);
    let label = crate::label(a.owner)?;
    let client = connect(socket)?;
    let (_acq, g) = acquire_waiting(
        &client,
        &AcquireOptions {
            items: vec![(r, mode)],
            pid: Some(pid),
            start_time,
            label,
            accept_dirty: a.accept_dirty,
            wait,
            hold: false,
            contain: false,
            clone_into_cgroup: false,
        },
    )?;
    for grant in &g.grants {
        if let Some(d) = &grant.dirty {
            note!(
                "leasehold: note: {} is dirty; check it before use, then: leasehold mark-clean {}\n  last writer: the {}",
                output::name(&grant.resource),
                output::quote(grant.resource.as_str()),
                output::ended(d)
            );
        }
    }
    let tokens: Vec<String> = g.grants.iter().map(|x| x.token.to_string()).collect();
    if let Err(f) = crate::write_out(format_args!("{}", tokens.join("\n"))) {
        return Err(unprinted_grant(&client, &g, pid, start_time, f));
    }
    Ok(0)
}

/// The token of a grant could not be printed (`leasehold acquire R | true`): nobody can use
/// or validate a lease whose token was lost, so a new grant is released again, and the caller
/// told on standard error. A lease the caller already held stays as it was.
fn unprinted_grant(
    client: &Client,
    g: &Granted,
    pid: u32,
    start_time: Option<u64>,
    f: Failure,
) -> Failure {
    let why = if f.message.is_empty() {
        "standard output was closed".to_owned()
    } else {
        f.message
    };
    let fresh = g.fresh();
    let shown = |rs: &[leasehold_core::ResourceName]| {
        rs.iter()
            .map(|r| output::quote(r.as_str()))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let message = if fresh.is_empty() {
        format!(
            "the token could not be printed ({why}); the lease was already held by pid {pid} and stays held"
        )
    } else {
        let released = client.release(
            &fresh,
            &ReleaseOptions {
                pid: Some(pid),
                start_time,
                tokens: g.fresh_tokens(),
                ..ReleaseOptions::default()
            },
        );
        match released {
            Ok(r) if r.failed.is_empty() => format!(
                "the token could not be printed ({why}); released {} again: nothing is held",
                shown(&fresh)
            ),
            Ok(r) => format!(
                "the token could not be printed ({why}), and releasing {} again failed ({}); it is held by pid {pid}: leasehold release --pid {pid} {}",
                shown(&fresh),
                r.failed
                    .iter()
                    .map(|f| f.message.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
                shown(&fresh)
            ),
            Err(e) => format!(
                "the token could not be printed ({why}), and releasing {} again failed ({e}); it is held by pid {pid}: leasehold release --pid {pid} {}",
                shown(&fresh),
                shown(&fresh)
            ),
        }
    };
    Failure {
        code: ExitCode::Error,
        message,
    }
}

/// `leasehold release`.
pub fn release(a: ReleaseArgs, socket: &Option<PathBuf>) -> Result<u8, Failure> {
    let rs = names(&a.resources, a.path.path)?;
    let (pid, start_time) = holder(a.pid)?;
    let report = connect(socket)?.release(
        &rs,
        &ReleaseOptions {
            pid: Some(pid),
            start_time,
            dirty: a.dirty,
            note: None,
            handover_to: a.handover_to,
            tokens: a.token.into_iter().map(Token).collect(),
        },
    )?;
    for r in &report.released {
        if r.dirtied {
            note!(
                "leasehold: released {} dirty; the next user must check it",
                output::name(&r.resource)
            );
        }
    }
    released_or_not(&report)
}

/// Each resource a release did not release, with why; the exit code of the first.
pub fn released_or_not(report: &ReleaseReport) -> Result<u8, Failure> {
    let Some(first) = report.failed.first() else {
        return Ok(0);
    };
    let message = if report.failed.len() == 1 && report.released.is_empty() {
        first.message.clone()
    } else {
        format!(
            "{} of {} releases failed:\n  {}",
            report.failed.len(),
            report.failed.len() + report.released.len(),
            report
                .failed
                .iter()
                .map(|f| format!("{}: {}", output::quote(&f.resource), f.message))
                .collect::<Vec<_>>()
                .join("\n  ")
        )
    };
    Err(Failure {
        code: first.code.exit_code(),
        message,
    })
}

/// `leasehold list`.
pub fn list(a: crate::ListArgs, socket: &Option<PathBuf>) -> Result<u8, Failure> {
    let json_out = a.json;
    // The agent filters, and answers page by page; every page is shown.
    let views = connect(socket)?.list_where(&leasehold_api::v1::ListQuery {
        prefix: a.prefix,
        held: a.held,
        dirty: a.dirty,
        host: a.host,
        ..Default::default()
    })?;
    if json_out {
        let v: Vec<_> = views.iter().map(view_json).collect();
        out!("{}", serde_json::Value::Array(v));
        return Ok(0);
    }
    if views.is_empty() {
        out!("no resources known");
        return Ok(0);
    }
    // The resource column is as wide as the longest name shown: long paths stay aligned.
    let w = views
        .iter()
        .map(|v| output::name(&v.resource).chars().count())
        .max()
        .unwrap_or(0)
        .max(8);
    out!(
        "{:<w$} {:<6} {:<10} {:>8}  HOLDER",
        "RESOURCE",
        "STATE",
        "MODE",
        "TOKEN"
    );
    for v in &views {
        let state = if v.dirty.is_some() {
            "DIRTY"
        } else if v.holders.is_empty() {
            "free"
        } else {
            "held"
        };
        if v.holders.is_empty() {
            let note = v
                .dirty
                .as_ref()
                .map(|d| format!("(needs check: {})", d.how.describe()))
                .unwrap_or_default();
            out!(
                "{:<w$} {:<6} {:<10} {:>8}  {note}",
                output::name(&v.resource),
                state,
                "-",
                "-"
            );
        }
        for (i, l) in v.holders.iter().enumerate() {
            let (name, state) = if i == 0 {
                (output::name(&v.resource), state)
            } else {
                (String::new(), "")
            };
            let stuck = if v.stuck.contains(&l.owner.process) {
                format!("; STUCK: {}", output::STUCK)
            } else {
                String::new()
            };
            out!(
                "{:<w$} {:<6} {:<10} {:>8}  {}, since {} ago{stuck}",
                name,
                state,
                l.mode.as_str(),
                l.token.to_string(),
                output::owner(&l.owner),
                output::ago(l.granted_at)
            );
        }
        if !v.waiters.is_empty() {
            out!("{:<w$} {:<6} {} waiting", "", "", v.waiters.len());
        }
    }
    Ok(0)
}

/// `leasehold inspect`.
pub fn inspect(a: InspectArgs, socket: &Option<PathBuf>) -> Result<u8, Failure> {
    let r = name(&a.resource, a.path.path)?;
    match connect(socket)?.inspect(&r)? {
        Some(v) if a.json => out!("{}", view_json(&v)),
        Some(v) => out!("{}", view_text(&v).trim_end()),
        None => {
            return Err(Failure::error(format!(
                "{} is not a known resource (never leased here)",
                output::quote(r.as_str())
            )));
        }
    }
    Ok(0)
}

/// `leasehold force-release`.
pub fn force_release(a: ForceArgs, socket: &Option<PathBuf>) -> Result<u8, Failure> {
    let r = name(&a.resource, a.path.path)?;
    leasehold_core::check_free_text("--reason", &a.reason, leasehold_core::MAX_TEXT)
        .map_err(|e| Failure::usage(output::escaped(&e.to_string())))?;
    let released = connect(socket)?.force_release(&r, &a.reason)?;
    for x in released {
        note!(
            "leasehold: revoked the {}{}",
            output::ended(&x.ended),
            if x.dirtied {
                format!("; {} is now dirty", output::name(&x.resource))
            } else {
                String::new()
            }
        );
    }
    Ok(0)
}

/// `leasehold mark-clean`.
pub fn mark_clean(a: NameArg, socket: &Option<PathBuf>) -> Result<u8, Failure> {
    let r = name(&a.resource, a.path.path)?;
    match connect(socket)?.mark_clean(&r)? {
        Some(was) => note!(
            "leasehold: {} marked clean (was dirty from the {})",
            output::name(&r),
            output::ended(&was)
        ),
        None => note!("leasehold: {} was not dirty", output::name(&r)),
    }
    Ok(0)
}

/// `leasehold validate`.
pub fn validate(a: ValidateArgs, socket: &Option<PathBuf>) -> Result<u8, Failure> {
    let r = name(&a.resource, a.path.path)?;
    let v = connect(socket)?.validate(&r, Token(a.token))?;
    let tokens = v.current_tokens;
    if v.current {
        out!("current");
        Ok(0)
    } else {
        let now: Vec<String> = tokens.iter().map(ToString::to_string).collect();
        out!(
            "stale (current: {})",
            if now.is_empty() {
                "none".into()
            } else {
                now.join(", ")
            }
        );
        Ok(1)
    }
}

/// `leasehold watch`.
pub fn watch(a: WatchArgs, socket: &Option<PathBuf>) -> Result<u8, Failure> {
    let r = a
        .resource
        .as_deref()
        .map(|x| name(x, a.path.path))
        .transpose()?;
    let stream = connect(socket)?.watch(r.as_ref())?;
    // The agent has subscribed this stream: every event from now on is shown. Scripts (and
    // the tests) wait for this line rather than guess.
    match &r {
        Some(r) => note!("leasehold: watching {}", output::name(r)),
        None => note!("leasehold: watching every resource"),
    }
    for e in stream {
        // Once streaming, an error is the agent going away (stopping, restarting).
        let e = e.map_err(|e| Failure {
            code: ExitCode::Unreachable,
            message: format!(
                "lost the agent ({e}): it stopped or restarted; events from now on need a new: leasehold watch"
            ),
        })?;
        if a.json {
            out!("{}", event_json(&e));
        } else {
            out!("{}", event_text(&e));
        }
    }
    Ok(0)
}

fn event_json(e: &Event) -> serde_json::Value {
    let lease = e
        .lease
        .clone()
        .and_then(|l| leasehold_core::Lease::try_from(l).ok());
    let ended = e
        .ended
        .clone()
        .and_then(|x| leasehold_core::Ended::try_from(x).ok());
    let at_ms = e.at.map_or(0, |t| t.unix_ms());
    json!({
        "kind": e.kind,
        "resource": e.resource,
        "at": (at_ms > 0).then(|| output::when(leasehold_core::WallTime(at_ms))),
        "at_ms": at_ms,
        "lease": lease.as_ref().map(output::lease_json),
        "ended": ended.as_ref().map(output::ended_json),
        "by": e.by,
        "host": e.host,
        "pid": e.pid,
    })
}

fn event_text(e: &Event) -> String {
    // Every line has a time: the event's, else when it arrived.
    let at_ms = e.at.map_or(0, |t| t.unix_ms());
    let at = if at_ms > 0 {
        output::when(leasehold_core::WallTime(at_ms))
    } else {
        humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
    };
    let r = output::escaped(e.resource.as_deref().unwrap_or_default());
    let detail = if let Some(l) = e
        .lease
        .clone()
        .and_then(|l| leasehold_core::Lease::try_from(l).ok())
    {
        format!(
            "{} to {}, token {}",
            l.mode,
            output::owner(&l.owner),
            l.token
        )
    } else if let Some(x) = e
        .ended
        .clone()
        .and_then(|x| leasehold_core::Ended::try_from(x).ok())
    {
        output::ended(&x)
    } else if let Some(by) = &e.by {
        format!("by {by}")
    } else if let (Some(h), Some(pid)) = (&e.host, e.pid) {
        format!("killed pid {pid} on {h}: its host session could not be renewed in time")
    } else {
        e.host
            .clone()
            .map(|h| format!("host {h}"))
            .unwrap_or_default()
    };
    format!("{at} {:<14} {r} {detail}", e.kind)
}
