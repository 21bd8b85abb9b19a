//! `leasehold run`: take leases (all or none), run a command while holding them, release.
//!
//! The leases are held by this wrapper process. The command runs as its child with
//! `PR_SET_PDEATHSIG = SIGKILL`, so if the wrapper is killed the command dies with it: no
//! process keeps writing without a lease. If a lease is lost (force-released), the command is
//! killed. SIGINT, SIGTERM and SIGHUP are passed to the command, and its exit status is
//! returned; exit 0 releases clean, anything else releases dirty.
//!
//! No async runtime: the hold is one streaming request, read by a thread; another thread
//! takes the signals (blocked everywhere else, and unblocked in the command); the main thread
//! spawns the command, and acts on what the two report, and on the safe-until deadline.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::ExitStatus;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Args;
use leasehold_client::blocking::{Acquisition, Client, Error as ClientError, ExitCode};
use leasehold_client::{AcquireEvent, AcquireOptions, Granted, ReleaseOptions};
use leasehold_core::{Mode, ResourceName, Token};
use rustix::process::{Pid, Signal, kill_process};

use crate::commands::{acquire_waiting, released_or_not};
use crate::output::{self, quote};
use crate::{Failure, connect, names};

/// Flags of `leasehold run`.
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
    };
    let client = connect(socket)?;
    let (acq, granted) = acquire_waiting(&client, &request)?;
    // The hold lasts as long as the command: no timeout on its stream.
    acq.socket()
        .set_read_timeout(None)
        .map_err(|e| Failure::error(format!("holding the leases: {e}")))?;
    let all: Vec<ResourceName> = granted.grants.iter().map(|g| g.resource.clone()).collect();

    if let Some(check) = &a.check
        && let Err(f) = check_dirty(&client, &granted, check)
    {
        let _ = client.release(&all, &ReleaseOptions::default());
        return Err(f);
    }

    let tokens = granted
        .grants
        .iter()
        .map(|g| format!("{}={}", token_name(g.resource.as_str()), g.token))
        .collect::<Vec<_>>()
        .join(",");
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
        generation: 0,
        deadline: None,
        retry_at: None,
    };
    let status = match supervise(&a.command, &tokens, hold, acq)? {
        Outcome::Exited(status) => status,
        Outcome::NotStarted { prog, error } => {
            // Nothing ran, so nothing was written: release clean.
            let released = release(&client, &all, true, None);
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
            let rest: Vec<ResourceName> = all.iter().filter(|r| **r != resource).cloned().collect();
            if !rest.is_empty() {
                let _ = release(
                    &client,
                    &rest,
                    false,
                    Some("command killed after a lease was lost".into()),
                );
            }
            return Ok(exit_code(status));
        }
    };
    let clean = status.success();
    let note = (!clean).then(|| describe(status));
    let released = release(&client, &all, clean, note.clone());
    if let Err(f) = released {
        note!(
            "leasehold: {}\n  the leases end when this process exits, and count as dirty",
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
                    describe(status)
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
    Exited(ExitStatus),
    /// The command could not be started (not found: 127; not executable: 126).
    NotStarted {
        prog: String,
        error: std::io::Error,
    },
    Lost {
        status: ExitStatus,
        resource: ResourceName,
        how: String,
    },
    /// The leases' safe-until passed without the agent extending it.
    Unconfirmed {
        status: ExitStatus,
    },
}

/// The wrapper's hold on its leases: how to reattach after the agent restarts, and the
/// latest safe-until.
struct Hold {
    client: Client,
    /// The request again, to reattach: the same leases for this process, not waiting.
    reattach: AcquireOptions,
    tokens: BTreeMap<ResourceName, Token>,
    /// Which hold stream is current: lines of an older one are stale.
    generation: u64,
    /// Kill the command by this instant unless the agent extends it.
    deadline: Option<Instant>,
    /// When to try reattaching, while the agent is away.
    retry_at: Option<Instant>,
}

impl Hold {
    /// Reconnects to a (restarted) agent and re-acquires the same leases; they must come
    /// back as the very grants this process holds, or they were lost. The new stream, if so.
    fn reattach(&mut self) -> Result<Option<Acquisition>, Option<(ResourceName, String)>> {
        let Ok(mut acq) = self.client.start_acquire(&self.reattach) else {
            return Ok(None);
        };
        match acq.granted() {
            Ok(g) => {
                let same = g
                    .grants
                    .iter()
                    .all(|x| x.existing && self.tokens.get(&x.resource) == Some(&x.token));
                if same {
                    self.retry_at = None;
                    note!("leasehold: reattached to the agent; the leases are still held");
                    Ok(Some(acq))
                } else {
                    let fresh: Vec<ResourceName> = g
                        .grants
                        .iter()
                        .filter(|x| !x.existing)
                        .map(|x| x.resource.clone())
                        .collect();
                    let _ = self.client.release(&fresh, &ReleaseOptions::default());
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

/// What the threads tell the main one.
enum Msg {
    /// A line of hold stream number `.0`; `None`: it ended.
    Hold(u64, Box<Result<Option<AcquireEvent>, ClientError>>),
    /// A signal arrived (SIGCHLD: the command may have exited).
    Signal(i32),
}

/// Reads hold stream `generation` on a thread until it ends.
fn read_hold(mut acq: Acquisition, generation: u64, tx: mpsc::Sender<Msg>) {
    std::thread::spawn(move || {
        loop {
            let ev = acq.next_event();
            let end = !matches!(ev, Ok(Some(_)));
            if tx.send(Msg::Hold(generation, Box::new(ev))).is_err() || end {
                return;
            }
        }
    });
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

/// Blocks [`SIGNALS`] in this thread (and so in every thread started after) and starts the
/// thread that takes them with sigwait, one message each.
fn take_signals(tx: mpsc::Sender<Msg>) -> Result<(), Failure> {
    let set = sigset(&SIGNALS);
    // SAFETY: `set` is an initialised signal set; the old mask is not asked for.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(Failure::error(format!(
            "blocking signals: {}",
            std::io::Error::from_raw_os_error(r)
        )));
    }
    std::thread::spawn(move || {
        loop {
            let mut sig = 0;
            // SAFETY: `set` is initialised and `sig` a valid place for the signal number.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                continue;
            }
            if tx.send(Msg::Signal(sig)).is_err() {
                return;
            }
        }
    });
    Ok(())
}

/// Spawns the command and waits for it, passing signals on, and killing it if a lease is
/// lost or its safe-until passes unconfirmed.
fn supervise(
    argv: &[std::ffi::OsString],
    tokens: &str,
    mut hold: Hold,
    acq: Acquisition,
) -> Result<Outcome, Failure> {
    let (prog, args) = argv
        .split_first()
        .ok_or_else(|| Failure::usage("no command given after --"))?;
    let (tx, rx) = mpsc::channel();
    // Before the command starts: a signal sent as soon as it runs is passed on, not fatal.
    take_signals(tx.clone())?;
    read_hold(acq, hold.generation, tx.clone());
    let wrapper = rustix::process::getpid();
    let unblock = sigset(&SIGNALS);
    let mut cmd = std::process::Command::new(prog);
    cmd.args(args).env(crate::run::TOKENS_ENV, tokens);
    // SAFETY: the closure runs in the child between fork and exec and calls only
    // async-signal-safe functions (sigprocmask, prctl and getppid as raw syscalls, and
    // _exit); it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            // The command gets the signals the wrapper blocked for its own thread.
            if libc::sigprocmask(libc::SIG_UNBLOCK, &unblock, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            rustix::process::set_parent_process_death_signal(Some(Signal::KILL))?;
            // The wrapper may have died before the line above took effect.
            if rustix::process::getppid() != Some(wrapper) {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(error) => {
            return Ok(Outcome::NotStarted {
                prog: prog.to_string_lossy().into_owned(),
                error,
            });
        }
    };
    let pid =
        Pid::from_raw(child.id() as i32).ok_or_else(|| Failure::error("the command has no pid"))?;
    let wait_error = |e: std::io::Error| Failure::error(format!("waiting for the command: {e}"));
    // Kills the command (not yet reaped, so its pid is still its own) and waits for it.
    let kill = |child: &mut std::process::Child| -> Result<ExitStatus, Failure> {
        let _ = kill_process(pid, Signal::KILL);
        child.wait().map_err(wait_error)
    };
    loop {
        if let Some(status) = child.try_wait().map_err(wait_error)? {
            return Ok(Outcome::Exited(status));
        }
        let wake = match (hold.deadline, hold.retry_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let msg = match wake {
            None => rx.recv().ok(),
            Some(w) => match rx.recv_timeout(w.saturating_duration_since(Instant::now())) {
                Ok(m) => Some(m),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(Failure::error("the wrapper's threads stopped"));
                }
            },
        };
        let now = Instant::now();
        match msg {
            Some(Msg::Signal(libc::SIGCHLD)) => {}
            Some(Msg::Signal(sig)) => {
                if let Some(s) = Signal::from_named_raw(sig) {
                    let _ = kill_process(pid, s);
                }
            }
            Some(Msg::Hold(generation, _)) if generation != hold.generation => {}
            Some(Msg::Hold(_, ev)) => match *ev {
                Ok(Some(AcquireEvent::Safe { until_monotonic_ns })) => {
                    hold.deadline = Some(leasehold_api::host::instant_of_monotonic(
                        until_monotonic_ns,
                    ));
                }
                Ok(Some(AcquireEvent::Lost { resource, ended })) => {
                    let status = kill(&mut child)?;
                    return Ok(Outcome::Lost {
                        status,
                        resource,
                        how: ended.how.describe(),
                    });
                }
                Ok(Some(_)) => {}
                // The agent went away or restarted: the leases stay with this process. Until
                // an agent confirms them again, the last safe-until stands.
                Ok(None) | Err(_) => {
                    hold.retry_at = Some(now + Duration::from_millis(200));
                    note!("leasehold: lost contact with the agent; retrying");
                }
            },
            None => {}
        }
        if hold.deadline.is_some_and(|d| Instant::now() >= d) {
            let status = kill(&mut child)?;
            return Ok(Outcome::Unconfirmed { status });
        }
        if hold.retry_at.is_some_and(|r| Instant::now() >= r) {
            match hold.reattach() {
                Ok(Some(acq)) => {
                    hold.generation += 1;
                    read_hold(acq, hold.generation, tx.clone());
                }
                Ok(None) => {
                    hold.retry_at = Some(Instant::now() + Duration::from_millis(500));
                }
                Err(lost) => {
                    let status = kill(&mut child)?;
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

fn release(
    client: &Client,
    resources: &[ResourceName],
    clean: bool,
    note: Option<String>,
) -> Result<(), Failure> {
    let opts = ReleaseOptions {
        dirty: !clean,
        note,
        ..Default::default()
    };
    // Each call connects afresh: an agent that restarted while the command ran is asked.
    let report = client.release(resources, &opts)?;
    released_or_not(&report).map(|_| ())
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(s)) => format!("was killed by signal {s}"),
        _ => "ended".into(),
    }
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
