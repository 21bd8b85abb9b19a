//! The plugin's calls to the leasehold agent: one blocking HTTP/JSON request each on the
//! agent's Unix socket ([`leasehold_client::blocking`]), with no thread and no async runtime,
//! so they are safe in the child libvirt forks for QEMU.

use leasehold_api::{v1, words};
use leasehold_client::blocking::{Client, Error};
use leasehold_client::{RefusalKind, ReleaseOptions};
use leasehold_core::{Mode, ResourceName, Token};

use crate::config::Config;
use crate::state::Held;

/// A lease to take: a name, a mode, and for a resume the token it must still have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// The lease's name.
    pub name: String,
    /// Exclusive for a writable disk.
    pub mode: Mode,
    /// Take it only if this token is still its last (a resume, a migration's arrival).
    pub expect_token: Option<u64>,
}

/// Which of libvirt's acquires this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start<'a> {
    /// In the child forked for QEMU, before `exec` (`REGISTER_ONLY`): the leases are taken
    /// here, so a disk held elsewhere is refused before QEMU opens it. The uuid tells an
    /// incoming migration (the same domain holds the disks on its source host) from a
    /// conflict: the arriving domain takes them later, with the source's state.
    Child {
        /// The domain's uuid.
        uuid: &'a str,
    },
    /// In the daemon, when the CPUs start (no state), or on resume and a migration's arrival
    /// (with state: the items carry their expected tokens).
    Daemon,
}

/// Why the agent did not do what the plugin asked: for libvirt's error report.
#[derive(Debug)]
pub struct AgentFailure {
    /// A lease is held by another owner, or needs a check: libvirt's "resource busy".
    pub busy: bool,
    /// For the operator: what is in the way and what to do.
    pub message: String,
}

fn client(c: &Config) -> Client {
    Client::new(&c.socket).with_timeout(Some(c.timeout))
}

fn failure(e: Error, what: &str) -> AgentFailure {
    let busy = matches!(e, Error::Refused(_)) || e.code() == Some(v1::ErrorCode::Moved);
    let message = match &e {
        Error::Refused(r) => match (r.kind, &r.conflict) {
            (RefusalKind::Busy | RefusalKind::TimedOut, Some(c)) => format!(
                "{}: stop the domain that holds it first; if that holder is gone for good, an admin can run `leasehold force-release`",
                words::conflict(c)
            ),
            (RefusalKind::NeedsCheck, _) => {
                let name = r
                    .resource
                    .as_ref()
                    .map_or("the disk".into(), ToString::to_string);
                let last = r.dirty.as_ref().map(words::ended).unwrap_or_default();
                format!(
                    "{name} needs a check before any domain may use it ({last}): check the image (e.g. `qemu-img check`), then run `leasehold mark-clean {name}`"
                )
            }
            _ => r.message.clone(),
        },
        Error::NoSocket | Error::Unreachable { .. } => format!(
            "{e}: is the leasehold agent running? (the socket is set by `socket` in qemu-leasehold.conf)"
        ),
        _ => e.to_string(),
    };
    AgentFailure {
        busy,
        message: format!("leasehold: {what}: {message}"),
    }
}

/// A lease name checked as the agent checks it.
fn lease_name(n: &str) -> Result<ResourceName, AgentFailure> {
    ResourceName::new(n).map_err(|e| AgentFailure {
        busy: false,
        message: format!("leasehold: bad lease name {n:?}: {e}"),
    })
}

/// What the agent does to QEMU before it SIGKILLs it when this host loses its session: the
/// domain's `<on_lockfailure>` (libvirt's `action` argument of Acquire) where it can be
/// honoured. `poweroff` (1): SIGTERM, QEMU's graceful quit; `pause` (3): SIGSTOP, which stops
/// the vCPUs and I/O (continued if the session recovers in time). The default (0), `restart`
/// (2) and `ignore` (4) ask nothing: QEMU is SIGKILLed at the fencing deadline, as it is after
/// `pause` and `poweroff` too. `ignore` cannot be honoured: once the session may have expired,
/// another host may be granted the disk, and a QEMU still writing it would corrupt it (G3).
/// `restart` is libvirt's to do once QEMU has died (it needs the leases again, which a host
/// without a session cannot have).
pub fn before_fence(action: i32) -> Option<v1::BeforeFence> {
    match action {
        1 => Some(v1::BeforeFence::Terminate),
        3 => Some(v1::BeforeFence::Pause),
        _ => None,
    }
}

/// Takes every item for QEMU's `pid`, all or none, as restricted leases whose end QEMU's exit
/// status decides (exit 0 clean, anything else dirty); `on_failure` is [`before_fence`] of the
/// domain's `<on_lockfailure>`.
///
/// # Errors
/// [`AgentFailure`] naming the holder when a lease is held, or what else went wrong.
pub fn acquire(
    c: &Config,
    pid: i32,
    label: &str,
    items: &[Item],
    start: Start<'_>,
    on_failure: Option<v1::BeforeFence>,
) -> Result<(), AgentFailure> {
    if items.is_empty() {
        return Ok(());
    }
    for i in items {
        lease_name(&i.name)?;
    }
    let req = v1::AcquireRequest {
        items: items
            .iter()
            .map(|i| v1::Item {
                resource: i.name.clone(),
                mode: i.mode.into(),
            })
            .collect(),
        pid: u32::try_from(pid).ok(),
        label: Some(label.to_owned()),
        restricted: true,
        on_exit: v1::OnExit::Status,
        before_fence: on_failure,
        expect_tokens: items
            .iter()
            .filter_map(|i| {
                i.expect_token.map(|token| v1::ExpectToken {
                    resource: i.name.clone(),
                    token,
                })
            })
            .collect(),
        ..v1::AcquireRequest::default()
    };
    let taken = client(c)
        .start_acquire_request(&req)
        .and_then(|mut a| a.granted());
    match (taken, start) {
        (Ok(_), _) => Ok(()),
        // An incoming migration: the same domain holds the disks on its source host. The
        // daemon's acquire with the source's state takes them once the source lets go.
        (Err(Error::Refused(r)), Start::Child { uuid })
            if r.kind == RefusalKind::Busy
                && r.conflict.as_ref().is_some_and(|c| {
                    !c.holders.is_empty()
                        && c.holders
                            .iter()
                            .all(|l| l.owner.label.as_deref().is_some_and(|x| x.ends_with(uuid)))
                }) =>
        {
            Ok(())
        }
        (Err(e), _) => Err(failure(e, "cannot take the domain's disks")),
    }
}

/// The leases among `names` that QEMU's `pid` holds on this agent's host, with tokens.
///
/// # Errors
/// [`AgentFailure`] when the agent cannot be asked.
pub fn held(c: &Config, pid: i32, names: &[String]) -> Result<Vec<Held>, AgentFailure> {
    let cl = client(c);
    let host = cl
        .status()
        .map_err(|e| failure(e, "cannot ask for the domain's leases"))?
        .host;
    let mut out = Vec::new();
    for n in names {
        let name = lease_name(n)?;
        let Some(view) = cl
            .inspect(&name)
            .map_err(|e| failure(e, "cannot ask for the domain's leases"))?
        else {
            continue;
        };
        out.extend(
            view.holders
                .iter()
                .filter(|l| {
                    i64::from(l.owner.process.pid) == i64::from(pid)
                        && l.owner.process.host.as_str() == host
                })
                .map(|l| Held {
                    name: n.clone(),
                    mode: l.mode,
                    token: l.token.0,
                }),
        );
    }
    Ok(out)
}

/// Releases, clean, what QEMU's `pid` holds among `names` (a pause: QEMU has stopped
/// writing), and returns what was released with its tokens, for the state string.
///
/// # Errors
/// [`AgentFailure`] when a lease could not be released.
pub fn release(c: &Config, pid: i32, names: &[String]) -> Result<Vec<Held>, AgentFailure> {
    release_held(c, pid, held(c, pid, names)?)
}

/// Releases, clean, the leases of QEMU's `pid` that [`held`] found, each by its token: a
/// lease of the same process granted after the one found (once that one ended, e.g. by a
/// force-release) is left alone, and the state string never names a token that was not the
/// one released. Returns `held`.
///
/// # Errors
/// [`AgentFailure`] when a lease could not be released.
pub fn release_held(c: &Config, pid: i32, held: Vec<Held>) -> Result<Vec<Held>, AgentFailure> {
    if held.is_empty() {
        return Ok(held);
    }
    let resources = held
        .iter()
        .map(|h| lease_name(&h.name))
        .collect::<Result<Vec<_>, _>>()?;
    let o = ReleaseOptions {
        pid: u32::try_from(pid).ok(),
        tokens: held.iter().map(|h| Token(h.token)).collect(),
        ..ReleaseOptions::default()
    };
    let report = client(c)
        .release(&resources, &o)
        .map_err(|e| failure(e, "cannot release the domain's disks"))?;
    if let Some(f) = report.failed.first() {
        return Err(AgentFailure {
            busy: false,
            message: format!(
                "leasehold: cannot release the domain's disks: {}: {}",
                f.resource, f.message
            ),
        });
    }
    Ok(held)
}
