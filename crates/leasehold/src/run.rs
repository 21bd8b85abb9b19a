//! `leasehold run`: take leases (all or none), run a command while holding them, release.
//!
//! The leases are held by this wrapper process, which leads the process group the command
//! and everything it starts run in ([`group`]). The command runs as its child with
//! `PR_SET_PDEATHSIG = SIGKILL`, so if the wrapper is killed the command dies with it, and
//! the agent kills the rest of the group before it ends the leases: no process keeps writing
//! without a lease. If a lease is lost (force-released), the command and its group are
//! killed. SIGINT, SIGTERM and SIGHUP are passed to the command (not a Ctrl-C, which the
//! terminal sent the whole group), and its exit status is returned; exit 0 releases clean,
//! anything else releases dirty, and so does a command that left processes running (killed).
//!
//! No async runtime and no thread: the hold is one streaming request, read without blocking;
//! the signals are blocked and read from a signalfd (the command starts with them unblocked);
//! one `poll` waits on both, with the safe-until deadline as its timeout. The command is
//! started by a vfork-style clone ([`spawn`]), with no copy of the wrapper's memory, in the
//! cgroup the agent made for the run when the grant names one ([`Start`]).

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use clap::Args;
use leasehold_api::host::instant_of_monotonic;
use leasehold_client::blocking::{Acquisition, Client, Error as ClientError, ExitCode, HoldEvents};
use leasehold_client::{AcquireEvent, AcquireOptions, Granted, ReleaseOptions};
use leasehold_core::{Mode, ResourceName, Token};

use crate::commands::{acquire_waiting, released_or_not};
use crate::output::{self, quote};
use crate::{Failure, connect, names};

mod group;
mod spawn;

// Flags of `leasehold run` (a comment, not a doc comment: see `Command` in lib.rs).
#[derive(Args, Debug)]
pub struct RunArgs {
    /// A resource to hold exclusively (read-write); repeatable.
    #[arg(long = "exclusive", value_name = "R")]
    exclusive: Vec<String>,
    /// A resource to hold shared (read-only); repeatable.
    #[arg(long = "shared", value_name = "R")]
    shared: Vec<String>,
    /// Resource arguments are files, named by their canonical path.
    #[arg(long)]
    path: bool,
    /// Wait until free, forever or up to DUR, showing who holds them meanwhile.
    #[arg(long, value_name = "DUR", num_args = 0..=1, require_equals = true,
          default_missing_value = "forever", value_parser = crate::parse_wait)]
    wait: Option<Duration>,
    /// On a dirty resource, run CMD first ({path} is replaced by the resource) and mark it
    /// clean if CMD succeeds; otherwise give up with exit 4.
    #[arg(long, value_name = "CMD")]
    check: Option<String>,
    /// A label for people, such as a VM name or uuid.
    #[arg(long, value_name = "LABEL")]
    owner: Option<String>,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<std::ffi::OsString>,
}

impl RunArgs {
    /// `run` with these flags and no `--wait` or `--check` (the command line's fast path).
    pub(crate) fn plain(
        exclusive: Vec<String>,
        shared: Vec<String>,
        path: bool,
        owner: Option<String>,
        command: Vec<std::ffi::OsString>,
    ) -> RunArgs {
        RunArgs {
            exclusive,
            shared,
            path,
            wait: None,
            check: None,
            owner,
            command,
        }
    }
}

/// The environment variable that tells the command how it is contained: `cgroup` (a cgroup
/// of the wrapper's own, which nothing the command starts can leave) or `group` (the
/// wrapper's process group: a process that calls `setsid` leaves it).
pub const CONTAINMENT_ENV: &str = "LEASEHOLD_CONTAINMENT";

/// The environment variable that carries the tokens to the command: `NAME=TOKEN,NAME=TOKEN`,
/// each NAME with `%`, `,` and `=` percent-encoded (see [`token_name`]).
pub const TOKENS_ENV: &str = "LEASEHOLD_TOKENS";

/// A resource name as it appears in [`TOKENS_ENV`]: `%` as `%25`, `,` as `%2C` and `=` as
/// `%3D`, everything else as it is. So the value splits unambiguously: on `,` into pairs, each
/// on its `=` into name and token, then `%XX` decodes to the byte XX.
pub fn token_name(name: &str) -> String {
    let mut s = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            '%' => s.push_str("%25"),
            ',' => s.push_str("%2C"),
            '=' => s.push_str("%3D"),
            c => s.push(c),
        }
    }
    s
}

/// `leasehold run`.
pub fn run(a: RunArgs, socket: &Option<PathBuf>) -> Result<u8, Failure> {
    if a.exclusive.is_empty() && a.shared.is_empty() {
        return Err(Failure::usage(
            "run needs at least one --exclusive R or --shared R",
        ));
    }
    let mut items: Vec<(ResourceName, Mode)> = names(&a.exclusive, a.path)?
        .into_iter()
        .map(|r| (r, Mode::Exclusive))
        .chain(
            names(&a.shared, a.path)?
                .into_iter()
                .map(|r| (r, Mode::Shared)),
        )
        .collect();
    items.sort();
    let mut seen = BTreeSet::new();
    for (r, _) in &items {
        if !seen.insert(r.clone()) {
            return Err(Failure::usage(format!(
                "{} is named twice",
                quote(r.as_str())
            )));
        }
    }
    let request = AcquireOptions {
        items,
        pid: Some(std::process::id()),
        start_time: None,
        label: crate::label(a.owner)?,
        accept_dirty: a.check.is_some(),
        wait: crate::wait_option(a.wait),
        hold: true,
        // A cgroup of its own, before the command starts: nothing it starts can leave it.
        contain: true,
        // The command started into it (not this process moved), where the agent lets it.
        // Not with a check, which runs before the command as a plain child: this process is
        // moved then, and the check with it.
        clone_into_cgroup: spawn::CGROUP_CLONE && a.check.is_none(),
    };
    // SIGCHLD ignored by whoever started this process (exec keeps that) would have the
    // kernel reap the command and the check itself, their exit status lost: back to default.
    // SAFETY: setting SIGCHLD's disposition to its default has no preconditions.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_DFL) };
    // Before acquiring: the pid that holds the leases is the id of the command's group.
    let group = group::Group::lead()?;
    let client = connect(socket)?;
    // The hold stream is read without blocking from here on (`supervise`): no timeout.
    let (acq, granted) = acquire_waiting(&client, &request)?;
    let all: Vec<ResourceName> = granted.grants.iter().map(|g| g.resource.clone()).collect();
    // Every release of these leases names their tokens: it ends them, never a later grant
    // to this process (SPEC G1).
    let all_tokens: Vec<Token> = granted.grants.iter().map(|g| g.token).collect();
    let held: Vec<(ResourceName, Token)> = all.iter().cloned().zip(all_tokens).collect();

    if let Some(check) = &a.check
        && let Err(f) = check_dirty(&client, &granted, check)
    {
        let _ = release(&client, None, &held, true, None);
        return Err(f);
    }

    let tokens = granted
        .grants
        .iter()
        .map(|g| format!("{}={}", token_name(g.resource.as_str()), g.token))
        .collect::<Vec<_>>()
        .join(",");
    let mut start = Start {
        client: &client,
        again: AcquireOptions {
            wait: None,
            hold: false,
            clone_into_cgroup: false,
            ..request.clone()
        },
        tokens: &tokens,
        containment: word(granted.containment),
        cgroup: granted
            .cgroup
            .as_ref()
            .map(|dir| std::fs::File::open(dir).map(OwnedFd::from)),
    };
    let hold = Hold {
        client: client.clone(),
        reattach: AcquireOptions {
            wait: None,
            accept_dirty: true,
            ..request
        },
        tokens: granted
            .grants
            .iter()
            .map(|g| (g.resource.clone(), g.token))
            .collect(),
        // On etcd the grant says until when the leases are safe: bounded from the start,
        // before any `safe` line, so an agent dying right after the grant cannot leave the
        // command running with no deadline (an old agent sends none: the first `safe` sets it).
        deadline: granted.safe_until_monotonic_ns.map(instant_of_monotonic),
        retry_at: None,
    };
    // The hold's stream, read without blocking from here on; the final release goes on its
    // connection where the agent switched it (`HoldEvents::release`).
    let mut stream = Some(acq.into_events()?);
    let (status, left) = match supervise(&a.command, &mut start, hold, &mut stream, &group)? {
        Outcome::Exited { status, left } => (status, left),
        Outcome::NotStarted { prog, error } => {
            // Nothing ran, so nothing was written: release clean.
            let released = release(&client, None, &held, true, None);
            let after = match released {
                Ok(()) => "the leases were released clean (nothing ran)".to_owned(),
                Err(f) => format!("releasing the leases failed: {}", f.message),
            };
            let (code, why) = match error.kind() {
                std::io::ErrorKind::NotFound => (127, "command not found".to_owned()),
                _ => (126, error.to_string()),
            };
            note!("leasehold: cannot run {}: {why}; {after}", quote(&prog));
            return Ok(code);
        }
        Outcome::Withheld(why) => {
            // Nothing ran, so nothing was written: release clean what is still held.
            let after = match release(&client, None, &held, true, None) {
                Ok(()) => "the leases were released clean".to_owned(),
                Err(f) => format!("releasing the leases: {}", f.message),
            };
            return Err(Failure::error(format!(
                "{why}: the command was not started; {after}"
            )));
        }
        Outcome::Unconfirmed { status } => {
            note!(
                "leasehold: the agent did not confirm the leases in time (host cut off, or agent hung or gone); killed the command so it cannot write past them"
            );
            return Ok(exit_code(status));
        }
        Outcome::Lost {
            status,
            resource,
            how,
        } => {
            note!(
                "leasehold: lost the lease on {} ({how}); killed the command so it cannot write without it",
                crate::output::name(&resource)
            );
            // The lease is gone; release what remains, dirty: the command was cut off.
            let rest: Vec<(ResourceName, Token)> = held
                .iter()
                .filter(|(r, _)| *r != resource)
                .cloned()
                .collect();
            if !rest.is_empty() {
                let _ = release(
                    &client,
                    None,
                    &rest,
                    false,
                    Some("command killed after a lease was lost".into()),
                );
            }
            return Ok(exit_code(status));
        }
    };
    let clean = status.success() && left.is_empty();
    let note = (!clean).then(|| describe(status, &left));
    let released = release(&client, stream.as_mut(), &held, clean, note.clone());
    if let Err(f) = released {
        // What is known: the release was not confirmed. It may still be carried out (an
        // agent that answers late); else the agent ends the leases at this process's exit,
        // each as a holder's death ends it: an exclusive lease dirty, a shared one clean.
        note!(
            "leasehold: {}\n  the release was not confirmed; what it did not release ends when this process exits: an exclusive lease then dirty (the next user must check), a shared one clean",
            f.message
        );
    } else if !clean {
        note!(
            "leasehold: the command {}; released {} dirty: the next user must check",
            note.unwrap_or_default(),
            all.iter()
                .map(|r| quote(r.as_str()))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(exit_code(status))
}

/// `LEASEHOLD_CONTAINMENT`'s word for how the agent says the wrapper is contained.
fn word(containment: Option<leasehold_api::v1::Containment>) -> &'static str {
    match containment {
        Some(leasehold_api::v1::Containment::Cgroup) => "cgroup",
        _ => "group",
    }
}

/// How the command is started: in the cgroup the agent made for it (the grant named one),
/// else as this process's child, in the cgroup this process was moved into, if any.
struct Start<'a> {
    client: &'a Client,
    /// The request again, to be moved into the cgroup after all: the same items, not held.
    again: AcquireOptions,
    /// [`TOKENS_ENV`]'s value.
    tokens: &'a str,
    /// [`CONTAINMENT_ENV`]'s value.
    containment: &'static str,
    /// The cgroup's directory, opened, when the grant named one.
    cgroup: Option<std::io::Result<OwnedFd>>,
}

impl Start<'_> {
    /// Starts the command (see [`spawn::spawn`]) in the cgroup the grant named. Where it
    /// cannot be started there (the directory cannot be opened, `clone3` is filtered, ...)
    /// nothing has started: the agent is asked to move this process into it, as it does for
    /// a wrapper that cannot start processes in a cgroup itself, and the command starts as
    /// this process's child. A move that fails leaves it contained by its process group,
    /// and [`CONTAINMENT_ENV`] says so.
    fn spawn(
        &mut self,
        argv: &[std::ffi::OsString],
        mask: libc::sigset_t,
    ) -> std::io::Result<libc::pid_t> {
        if let Some(dir) = self.cgroup.take() {
            if let Ok(fd) = dir {
                match spawn::spawn(argv, &self.env(), mask, Some(fd.as_fd())) {
                    Ok(pid) => return Ok(pid),
                    Err(spawn::Error::Run(e)) => return Err(e),
                    Err(spawn::Error::Cgroup(_)) => {}
                }
            }
            self.move_in();
        }
        spawn::spawn(argv, &self.env(), mask, None).map_err(|e| match e {
            spawn::Error::Run(e) | spawn::Error::Cgroup(e) => e,
        })
    }

    /// Asks the agent to move this process into its cgroup: the same items again, which
    /// come back as the leases held (anything granted afresh, a lease lost meanwhile, is
    /// given back; the hold stream tells of the loss).
    fn move_in(&mut self) {
        self.containment = match self.client.acquire(&self.again) {
            Ok(g) => {
                let fresh = g.fresh();
                if !fresh.is_empty() {
                    let o = ReleaseOptions {
                        tokens: g.fresh_tokens(),
                        ..Default::default()
                    };
                    let _ = self.client.release(&fresh, &o);
                }
                word(g.containment)
            }
            Err(_) => "group",
        };
    }

    fn env(&self) -> [(&str, &str); 2] {
        [
            (TOKENS_ENV, self.tokens),
            (CONTAINMENT_ENV, self.containment),
        ]
    }
}

/// Runs the check on every dirty resource granted, marking each clean when it succeeds.
fn check_dirty(client: &Client, granted: &Granted, check: &str) -> Result<(), Failure> {
    for g in granted.grants.iter().filter(|g| g.dirty.is_some()) {
        let cmd = check.replace("{path}", &crate::output::sh_quote(g.resource.as_str()));
        note!(
            "leasehold: {} is dirty ({}); checking: {cmd}",
            crate::output::name(&g.resource),
            g.dirty.as_ref().map(output::ended).unwrap_or_default()
        );
        let status = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(&cmd)
            .status()
            .map_err(|e| Failure::error(format!("starting the check {cmd:?}: {e}")))?;
        if !status.success() {
            return Err(Failure {
                code: ExitCode::NeedsCheck,
                message: format!(
                    "the check of {} failed ({}); it stays dirty and the command was not started",
                    crate::output::name(&g.resource),
                    describe(status, &[])
                ),
            });
        }
        client.mark_clean(&g.resource)?;
        note!(
            "leasehold: {} checked and marked clean",
            crate::output::name(&g.resource)
        );
    }
    Ok(())
}

enum Outcome {
    /// The command exited; `left` are the processes it left running, killed since.
    Exited { status: ExitStatus, left: Vec<u32> },
    /// The command could not be started (not found: 127; not executable: 126).
    NotStarted { prog: String, error: std::io::Error },
    Lost {
        status: ExitStatus,
        resource: ResourceName,
        how: String,
    },
    /// The command was not started, for this reason: the leases' safe-until had passed, or
    /// a lease was lost, before it could start.
    Withheld(String),
    /// The leases' safe-until passed without the agent extending it.
    Unconfirmed { status: ExitStatus },
}

/// The wrapper's hold on its leases: how to reattach after the agent restarts, and the
/// latest safe-until.
struct Hold {
    client: Client,
    /// The request again, to reattach: the same leases for this process, not waiting.
    reattach: AcquireOptions,
    tokens: BTreeMap<ResourceName, Token>,
    /// Kill the command by this instant unless the agent extends it.
    deadline: Option<Instant>,
    /// When to try reattaching, while the agent is away.
    retry_at: Option<Instant>,
}

impl Hold {
    /// Reconnects to a (restarted) agent and re-acquires the same leases; they must come
    /// back as the very grants this process holds, or they were lost. The new stream, if so.
    fn reattach(&mut self) -> Result<Option<Acquisition>, Option<(ResourceName, String)>> {
        // An agent that takes the connection but does not answer must not hold this thread
        // past the safe-until, when the command has to be killed: wait for it until then.
        let left = self.deadline.map(|d| {
            d.saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1))
        });
        let client = match left {
            Some(left) => self.client.clone().with_timeout(Some(left)),
            None => self.client.clone(),
        };
        let Ok(mut acq) = client.start_acquire(&self.reattach) else {
            return Ok(None);
        };
        if acq.socket().set_read_timeout(left).is_err() {
            return Ok(None);
        }
        match acq.granted() {
            Ok(g) => {
                // The agent that answers confirms the leases until its own fencing deadline.
                if let Some(ns) = g.safe_until_monotonic_ns {
                    self.deadline = Some(instant_of_monotonic(ns));
                }
                let same = g
                    .grants
                    .iter()
                    .all(|x| x.existing && self.tokens.get(&x.resource) == Some(&x.token));
                if same {
                    self.retry_at = None;
                    note!("leasehold: reattached to the agent; the leases are still held");
                    Ok(Some(acq))
                } else {
                    let fresh = g.fresh();
                    let o = ReleaseOptions {
                        tokens: g.fresh_tokens(),
                        ..Default::default()
                    };
                    let _ = self.client.release(&fresh, &o);
                    let r = fresh
                        .first()
                        .cloned()
                        .or_else(|| self.tokens.keys().next().cloned());
                    Err(r.map(|r| (r, "it ended while the agent was away".into())))
                }
            }
            Err(ClientError::Refused(r)) => Err(r.resource.clone().map(|res| {
                (
                    res,
                    format!("it ended while the agent was away: {}", r.message),
                )
            })),
            Err(_) => Ok(None),
        }
    }
}

/// The signals the wrapper passes on, and SIGCHLD.
const SIGNALS: [i32; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGCHLD];

fn sigset(signals: &[i32]) -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set it is given; sigaddset adds valid signal
    // numbers to an initialised set.
    unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        for s in signals {
            libc::sigaddset(&mut set, *s);
        }
        set
    }
}

/// Blocks [`SIGNALS`] and `extra` and returns a descriptor that reads them, and the mask the
/// command starts with: the wrapper's as it was, without them.
fn take_signals(extra: &[i32]) -> Result<(OwnedFd, libc::sigset_t), Failure> {
    let all: Vec<i32> = SIGNALS.iter().chain(extra).copied().collect();
    let set = sigset(&all);
    // SAFETY: `set` is an initialised signal set and `mask` a place for the old one, which
    // sigdelset then edits; signalfd gets the initialised set and valid flags.
    unsafe {
        let mut mask = std::mem::zeroed::<libc::sigset_t>();
        let r = libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut mask);
        if r != 0 {
            return Err(Failure::error(format!(
                "blocking signals: {}",
                std::io::Error::from_raw_os_error(r)
            )));
        }
        for s in &all {
            libc::sigdelset(&mut mask, *s);
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
        if fd < 0 {
            return Err(Failure::error(format!(
                "taking signals: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok((OwnedFd::from_raw_fd(fd), mask))
    }
}

/// The signals that arrived since last asked, in order, each with its `si_code` (`SI_KERNEL`
/// for one the terminal sent the foreground process group, such as Ctrl-C's SIGINT).
fn read_signals(fd: &OwnedFd) -> Vec<(i32, i32)> {
    let mut sigs = Vec::new();
    loop {
        // SAFETY: a zeroed signalfd_siginfo is valid; read writes at most its size into it.
        let mut info = unsafe { std::mem::zeroed::<libc::signalfd_siginfo>() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: `info` is a writable buffer of `size` bytes.
        let n = unsafe { libc::read(fd.as_raw_fd(), std::ptr::addr_of_mut!(info).cast(), size) };
        if usize::try_from(n).ok() != Some(size) {
            return sigs;
        }
        sigs.push((info.ssi_signo as i32, info.ssi_code));
    }
}

/// The command's exit status, if it has exited (reaping it).
fn try_wait(pid: libc::pid_t) -> Result<Option<ExitStatus>, Failure> {
    let mut status = 0;
    // SAFETY: `pid` is this process's unreaped child; `status` a valid place for its status.
    match unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } {
        0 => Ok(None),
        p if p == pid => Ok(Some(ExitStatus::from_raw(status))),
        _ => Err(Failure::error(format!(
            "waiting for the command: {}",
            std::io::Error::last_os_error()
        ))),
    }
}

/// Kills the command (not yet reaped, so its pid is still its own) and waits for it, then
/// kills and reaps the rest of its process group and what it left behind.
fn kill(pid: libc::pid_t, group: &group::Group) -> Result<ExitStatus, Failure> {
    let status = kill_command(pid)?;
    group.kill_rest();
    Ok(status)
}

/// Kills the command (not yet reaped, so its pid is still its own) and waits for it.
fn kill_command(pid: libc::pid_t) -> Result<ExitStatus, Failure> {
    let mut status = 0;
    // SAFETY: `pid` is this process's unreaped child; `status` a valid place for its status.
    let r = unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, &mut status, 0)
    };
    if r != pid {
        return Err(Failure::error(format!(
            "waiting for the command: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(ExitStatus::from_raw(status))
}

/// Starts the command and waits for it, passing signals on, and killing it if a lease is
/// lost or its safe-until passes unconfirmed. One thread: a `poll` over the signals (a
/// signalfd) and the hold stream, with the safe-until as its timeout.
fn supervise(
    argv: &[std::ffi::OsString],
    start: &mut Start<'_>,
    mut hold: Hold,
    stream: &mut Option<HoldEvents>,
    group: &group::Group,
) -> Result<Outcome, Failure> {
    let prog = argv
        .first()
        .ok_or_else(|| Failure::usage("no command given after --"))?;
    // Before the command starts: a signal sent as soon as it runs is passed on, not fatal.
    let (signals, mask) = take_signals(group.job_signals())?;
    // What the agent sent since the grant (a later safe-until, a loss) counts before the
    // command starts, which it does not once the safe-until has passed.
    if let Some(s) = stream.as_mut() {
        for ev in s
            .read_events()
            .map(|(events, _)| events)
            .unwrap_or_default()
        {
            match ev {
                AcquireEvent::Safe { until_monotonic_ns } => {
                    hold.deadline = Some(instant_of_monotonic(until_monotonic_ns));
                }
                AcquireEvent::Lost { resource, ended } => {
                    return Ok(Outcome::Withheld(format!(
                        "lost the lease on {} ({}) before the command started",
                        crate::output::name(&resource),
                        ended.how.describe()
                    )));
                }
                _ => {}
            }
        }
    }
    if hold.deadline.is_some_and(|d| Instant::now() >= d) {
        return Ok(Outcome::Withheld(
            "the agent did not confirm its host session (etcd) before the command could start, so the leases may not be safe; retry once `leasehold status` shows the session renewed".into(),
        ));
    }
    let pid = match start.spawn(argv, mask) {
        Ok(pid) => pid,
        Err(error) => {
            return Ok(Outcome::NotStarted {
                prog: prog.to_string_lossy().into_owned(),
                error,
            });
        }
    };
    loop {
        if let Some(status) = try_wait(pid)? {
            // What the command started and left running must not outlive the release.
            let left = if group::Group::has_children() {
                group.kill_rest()
            } else {
                Vec::new()
            };
            return Ok(Outcome::Exited { status, left });
        }
        let wake = match (hold.deadline, hold.retry_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // While stopped by Ctrl-Z, look every 100 ms whether the caller's job was continued.
        let wake = match group.suspended_wake() {
            Some(s) => Some(wake.map_or(s, |w| w.min(s))),
            None => wake,
        };
        let timeout = wake.map_or(-1, |w| {
            // Rounded up: waking before the instant would only poll again.
            let left = w.saturating_duration_since(Instant::now());
            i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
        });
        let mut fds = [
            libc::pollfd {
                fd: signals.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stream.as_ref().map_or(-1, |s| s.socket().as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is an array of two initialised pollfds (a negative fd is skipped).
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) } < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(Failure::error(format!("waiting for the command: {e}")));
            }
        }
        group.resume_if_continued();
        for (sig, code) in read_signals(&signals) {
            if sig == libc::SIGINT && code == libc::SI_KERNEL {
                // Ctrl-C: the terminal sent it to the whole group, the command with it.
                group.terminal_interrupt();
            } else if sig == libc::SIGTSTP && code == libc::SI_KERNEL {
                // Ctrl-Z (taken only while the wrapper has the caller's terminal): the
                // command stopped; the caller's job stops too, and the wrapper waits for it
                // to be continued.
                group.terminal_stop();
            } else if sig != libc::SIGCHLD {
                // SAFETY: `pid` is this process's unreaped child.
                unsafe { libc::kill(pid, sig) };
            }
        }
        if fds[1].revents != 0
            && let Some(s) = stream.as_mut()
        {
            let read = s.read_events();
            let (events, over) = match read {
                Ok((events, over)) => (events, over),
                Err(_) => (Vec::new(), true),
            };
            for ev in events {
                match ev {
                    AcquireEvent::Safe { until_monotonic_ns } => {
                        hold.deadline = Some(instant_of_monotonic(until_monotonic_ns));
                    }
                    AcquireEvent::Lost { resource, ended } => {
                        let status = kill(pid, group)?;
                        return Ok(Outcome::Lost {
                            status,
                            resource,
                            how: ended.how.describe(),
                        });
                    }
                    _ => {}
                }
            }
            // The agent went away or restarted: the leases stay with this process. Until an
            // agent confirms them again, the last safe-until stands.
            if over {
                *stream = None;
                hold.retry_at = Some(Instant::now() + Duration::from_millis(200));
                note!("leasehold: lost contact with the agent; retrying");
            }
        }
        if hold.deadline.is_some_and(|d| Instant::now() >= d) {
            let status = kill(pid, group)?;
            return Ok(Outcome::Unconfirmed { status });
        }
        if hold.retry_at.is_some_and(|r| Instant::now() >= r) {
            match hold.reattach() {
                Ok(Some(acq)) => *stream = Some(acq.into_events()?),
                Ok(None) => {
                    hold.retry_at = Some(Instant::now() + Duration::from_millis(500));
                }
                Err(lost) => {
                    let status = kill(pid, group)?;
                    let Some((resource, how)) = lost.or_else(|| {
                        hold.tokens
                            .keys()
                            .next()
                            .map(|r| (r.clone(), "lost".to_owned()))
                    }) else {
                        return Ok(Outcome::Unconfirmed { status });
                    };
                    return Ok(Outcome::Lost {
                        status,
                        resource,
                        how,
                    });
                }
            }
        }
    }
}

/// Releases `held`, each lease named by its token: on the hold's connection where the
/// agent switched it and it is open, else on a new connection (an agent that restarted
/// while the command ran is asked).
fn release(
    client: &Client,
    hold: Option<&mut HoldEvents>,
    held: &[(ResourceName, Token)],
    clean: bool,
    note: Option<String>,
) -> Result<(), Failure> {
    let (resources, tokens): (Vec<ResourceName>, Vec<Token>) = held.iter().cloned().unzip();
    let opts = ReleaseOptions {
        dirty: !clean,
        note,
        tokens,
        ..Default::default()
    };
    let on_hold = match hold {
        Some(h) => h.release(&resources, &opts, client.timeout())?,
        None => None,
    };
    let report = match on_hold {
        Some(report) => report,
        None => client.release(&resources, &opts)?,
    };
    released_or_not(&report).map(|_| ())
}

/// How the command ended, and the processes it left running (killed before the release).
fn describe(status: ExitStatus, left: &[u32]) -> String {
    let how = match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => "ended".into(),
    };
    if left.is_empty() {
        return how;
    }
    let pids = left
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    format!("{how} leaving processes running (pid {pids}), killed before the release")
}

fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(c), _) => u8::try_from(c & 0xff).unwrap_or(1),
        (None, Some(s)) => u8::try_from(128 + s).unwrap_or(1),
        _ => 1,
    }
}

#[cfg(test)]
mod token_env_tests {
    use proptest::prelude::*;

    use super::token_name;

    /// What a command reading `LEASEHOLD_TOKENS` does, as the docs say: split on `,`, then
    /// each pair on its `=`, then decode `%XX`.
    fn parse(v: &str) -> Option<Vec<(String, u64)>> {
        if v.is_empty() {
            return Some(Vec::new());
        }
        v.split(',')
            .map(|pair| {
                let (name, token) = pair.split_once('=')?;
                let mut bytes = Vec::new();
                let mut rest = name.as_bytes();
                while let Some((&b, tail)) = rest.split_first() {
                    if b == b'%' {
                        let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
                        bytes.push(u8::from_str_radix(hex, 16).ok()?);
                        rest = &tail[2..];
                    } else {
                        bytes.push(b);
                        rest = tail;
                    }
                }
                Some((String::from_utf8(bytes).ok()?, token.parse().ok()?))
            })
            .collect()
    }

    use leasehold_testkit::fuzz_cases as cases;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(cases()))]

        /// Any names, with `,`, `=` and `%` in them, come back out exactly.
        #[test]
        fn tokens_env_reads_back_exactly(
            grants in proptest::collection::vec(("[a-z,=%2C3D/ ]{1,12}|\\PC{1,12}", any::<u64>()), 0..6),
        ) {
            let v = grants
                .iter()
                .map(|(n, t)| format!("{}={t}", token_name(n)))
                .collect::<Vec<_>>()
                .join(",");
            prop_assert_eq!(parse(&v), Some(grants));
        }

    }
}
