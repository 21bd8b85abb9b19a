//! `leasehold status` and `leasehold hosts`: the agent's state and every host's session.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::json;

use crate::output;
use crate::{Failure, connect};

/// `leasehold hosts`: every host's session on the backend.
pub fn hosts(json_out: bool, socket: &Option<PathBuf>) -> Result<u8, Failure> {
    let hosts = connect(socket)?.hosts()?;
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let when = |h: &leasehold_api::v1::Host| {
        h.since
            .map(|t| output::when(leasehold_core::WallTime(t.unix_ms())))
    };
    if json_out {
        let v: Vec<_> = hosts
            .iter()
            .map(|h| {
                json!({
                    "host": h.host, "alive": h.alive, "session": h.session.map(|s| format!("{s:x}")),
                    "since": when(h), "since_ms": h.since.map(|t| t.unix_ms()),
                    "leases": h.leases, "agent_pid": h.agent_pid, "this_host": h.this_host,
                    "renewed_ms_ago": h.renewed_ago.map(|d| ms(d.0)),
                    "expires_in_ms": h.expires_in.map(|d| ms(d.0)),
                    "renewed": h.renewed_ago.map(|d| format!("{}s ago", d.0.as_secs())),
                })
            })
            .collect();
        out!("{}", serde_json::Value::Array(v));
        return Ok(0);
    }
    let w = hosts
        .iter()
        .map(|h| output::tame(&h.host).chars().count())
        .max()
        .unwrap_or(4)
        .max(4);
    out!(
        "{:w$}  {:7}  {:6}  {:9}  {:8}  {:10}  SINCE",
        "HOST",
        "SESSION",
        "LEASES",
        "AGENT PID",
        "RENEWED",
        "EXPIRES IN"
    );
    let secs = |d: Option<leasehold_api::v1::Dur>, suffix: &str| {
        d.map_or("-".into(), |d| format!("{}s{suffix}", d.0.as_secs()))
    };
    for h in &hosts {
        let state = if h.alive { "alive" } else { "expired" };
        let (renewed, expires) = (secs(h.renewed_ago, " ago"), secs(h.expires_in, ""));
        let since = when(h).unwrap_or_else(|| "before this agent started".into());
        let me = if h.this_host { " (this host)" } else { "" };
        out!(
            "{:w$}  {state:7}  {:6}  {:9}  {renewed:8}  {expires:10}  {since}{me}",
            output::tame(&h.host),
            h.leases,
            h.agent_pid.map_or("-".into(), |p| p.to_string()),
        );
    }
    Ok(0)
}

/// `leasehold status`.
pub fn status(json_out: bool, socket: &Option<PathBuf>) -> Result<u8, Failure> {
    let s = connect(socket)?.status()?;
    let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let ms_of = |d: Option<leasehold_api::v1::Dur>| d.map(|d| ms(d.0));
    if json_out {
        out!(
            "{}",
            json!({
                "host": s.host, "backend": s.backend, "version": s.version, "pid": s.pid,
                "uptime_ms": ms(s.uptime.0), "state_dir": s.state_dir, "socket": s.socket,
                "resources": s.resources, "leases": s.leases, "processes": s.processes,
                "dirty": s.dirty, "session": s.session, "safe_for_ms": ms_of(s.safe_for),
                "backend_error": s.backend_error,
                "containment": s.containment,
                "stuck": s.stuck.iter().map(|h| json!({
                    "pid": h.pid, "cgroup": h.cgroup, "process_group": h.process_group,
                    "stuck_for_ms": ms(h.stuck_for.0),
                })).collect::<Vec<_>>(),
                "host_session": s.host_session.as_ref().map(|h| json!({
                    "lease_id": format!("{:x}", h.lease_id), "ttl_ms": ms(h.ttl.0),
                    "last_renewal_ms_ago": ms_of(h.last_renewal_ago), "safe_for_ms": ms_of(h.safe_for),
                    "renewal_latency_us": h.renewal_latency_us, "expired": h.expired,
                    "failed_renewals": h.failed_renewals,
                    "renewals": h.renewals.iter().map(|r| json!({
                        "at": output::when(leasehold_core::WallTime(r.at.unix_ms())),
                        "at_ms": r.at.unix_ms(),
                        "outcome": r.outcome,
                        "latency_us": r.latency.map(|d| u64::try_from(d.0.as_micros()).unwrap_or(u64::MAX)),
                    })).collect::<Vec<_>>(),
                })),
                "etcd": s.etcd.as_ref().map(|e| json!({
                    "db_size": e.db_size, "quota": e.quota, "revision": e.revision,
                    "compacted_revision": e.compacted_revision, "nospace": e.nospace,
                    "compactor": e.compactor, "forgotten": e.forgotten,
                    "warning": (!e.warning.is_empty()).then_some(&e.warning),
                })),
            })
        );
        return Ok(0);
    }
    out!(
        "leasehold agent on host {} (backend {}), version {}, pid {}, up {}",
        s.host,
        s.backend,
        s.version,
        s.pid,
        humantime::format_duration(Duration::from_secs(s.uptime.0.as_secs()))
    );
    out!("  socket:   {}", s.socket);
    out!("  state:    {}", s.state_dir);
    match &s.backend_error {
        None => out!(
            "  leases:   {} held by {}, on {} known; {} dirty",
            output::count(s.leases, "lease", "leases"),
            output::count(s.processes, "process", "processes"),
            output::count(s.resources, "resource", "resources"),
            s.dirty
        ),
        Some(e) => out!("  leases:   unknown: {e}"),
    }
    out!("  session:  {}", s.session);
    match s.containment {
        Some(leasehold_api::v1::Containment::Cgroup) => {
            out!("  run:      each command in a cgroup of its own, killed whole with its wrapper")
        }
        Some(leasehold_api::v1::Containment::Group) => out!(
            "  run:      each command in its wrapper's process group (no cgroups: a command that calls setsid escapes it)"
        ),
        None => {}
    }
    for h in &s.stuck {
        let what = match (&h.cgroup, h.process_group) {
            (Some(c), _) => format!("its cgroup {}", output::tame(c)),
            (None, Some(g)) => format!("its process group {g}"),
            (None, None) => "what it started".into(),
        };
        out!(
            "  stuck:    holder {} died; {what} survives SIGKILL for {} (a process in uninterruptible sleep, or frozen): its leases stay held until it is empty",
            h.pid,
            humantime::format_duration(Duration::from_secs(h.stuck_for.0.as_secs()))
        );
    }
    if let Some(h) = &s.host_session {
        let ago = |v: leasehold_api::v1::Dur| {
            humantime::format_duration(Duration::from_millis(ms(v.0))).to_string()
        };
        out!(
            "  last renewal confirmed: {} ago; {} renewals failed since",
            h.last_renewal_ago.map_or_else(|| "never".into(), ago),
            h.failed_renewals
        );
        let lat: Vec<String> = h
            .renewal_latency_us
            .iter()
            .map(|us| format!("{:.1}ms", *us as f64 / 1000.0))
            .collect();
        out!("  recent renewal round trips: {}", lat.join(" "));
    }
    if let Some(e) = &s.etcd {
        let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
        out!(
            "  etcd:     database {:.1} MiB of a {:.1} MiB quota ({:.0}%); revision {}, history compacted to {} (by {}); {} old records forgotten",
            mib(e.db_size),
            mib(e.quota),
            if e.quota > 0 {
                e.db_size as f64 * 100.0 / e.quota as f64
            } else {
                0.0
            },
            e.revision,
            e.compacted_revision,
            if e.compactor.is_empty() {
                "nobody yet"
            } else {
                &e.compactor
            },
            e.forgotten
        );
        if !e.warning.is_empty() {
            out!("  WARNING:  {}", e.warning);
        }
    }
    Ok(0)
}
