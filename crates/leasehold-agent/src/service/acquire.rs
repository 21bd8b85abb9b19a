//! Acquire: the request's checks, the wait with its progress reports, the grant and its
//! confirmation, and with `hold` the lease's life after (safe-until, lost).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use leasehold_api::v1::{self, ApiError, ErrorCode, conflict_to_v1};
use leasehold_api::words;
use leasehold_core::{
    AcquireError, Conflict, EndReason, Ended, Grant, Owner, OwnerId, ProcessKey, ReleaseKind,
    Released, ResourceName, Token,
};
use leasehold_store::{AcquireSpec, Finish, SessionState, Store, StoreError};
use tokio::sync::{broadcast, mpsc};
use tracing::{info, warn};

use super::{Caller, Service, fault_of, refuse_non_process, resource};
use crate::config::Timing;
use crate::holds::{Note, Registration};
use crate::metrics;
use crate::procfs::{Pidfd, ProcError};
use crate::watcher::{Prepared, retrying};

use super::undecided::{Asking, Undecided};

/// How often a waiting request is told who is in its way.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// What an acquire tells its caller, in order: waiting reports, then a grant or an error;
/// with `hold`, safe-until updates and lost leases after the grant.
#[derive(Debug)]
pub(crate) enum Out {
    /// Still waiting: who is in the way (and the grace left), or a note about the wait.
    Waiting {
        /// Who is in the way, with the grace left.
        conflict: Option<Conflict>,
        /// How long the request has waited.
        waited: Duration,
        /// Something the caller should know about its wait.
        note: Option<String>,
    },
    /// Granted.
    Granted {
        /// One grant per resource.
        grants: Vec<Grant>,
        /// The owner as recorded.
        owner: Owner,
        /// For new leases: told by the front end once the client read the grant, dropped
        /// untold if it did not (it went away just as it was granted: a withdrawn wait), and
        /// then the new leases are released clean, so none is left that nobody knows of.
        delivered: Option<Delivered>,
        /// With a host session: safe until this instant of CLOCK_MONOTONIC, in nanoseconds
        /// ([`safe_until_at_grant`]); `None` without one (the local store).
        safe_until: Option<u64>,
        /// For a request with `contain`: how the holder is contained.
        containment: Option<v1::Containment>,
        /// For a request with `clone_into_cgroup`, let: the cgroup the holder starts its
        /// processes in (it was not moved).
        cgroup: Option<std::path::PathBuf>,
    },
    /// Safe until this instant of CLOCK_MONOTONIC, in nanoseconds.
    Safe(u64),
    /// A held lease ended by other means than the holder's release.
    Lost {
        /// The resource.
        resource: ResourceName,
        /// How.
        ended: Ended,
    },
    /// Refused or failed: the last message.
    Failed(ApiError),
}

/// What follows a grant its client read: its hold, which only tells the client of the
/// leases' life after the grant (safe-until, lost), run as long as the client is served.
pub(crate) type After = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// A grant's new leases, counting once its client read the grant ([`Delivered::settled`]);
/// dropped untold (the client went away without reading it, or the answer was never
/// written), they are undone.
pub(crate) struct Delivered {
    settle: Arc<Mutex<Settle>>,
}

/// What follows a grant once its client read it or not.
type Then = Box<dyn FnOnce(bool) -> Option<After> + Send>;

/// What a [`Delivered`] does once the client's reading is known, shared with the task that
/// put the grant on the front end's channel ([`hand_grant`]).
#[derive(Default)]
struct Settle {
    /// Called with whether the client read the grant; dropped untold, with false. A grant
    /// not read is undone by a task spawned here, which runs to its end; what follows a grant
    /// read (its hold) is given back, to be run by whoever serves the client: on a switched
    /// hold the connection's own task, else the delivery check's. No task waits for the word,
    /// and none is spawned for a grant read (a task per grant waiting for the word cost a
    /// spawn and a wake-up of another worker per acquire, before its answer; a task spawned
    /// by the check once it knew, one more after it).
    then: Option<Then>,
    /// The front end took the grant off its channel: from then on only it settles.
    taken: bool,
}

impl Settle {
    fn take(settle: &Mutex<Settle>) -> Option<Then> {
        settle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .then
            .take()
    }
}

impl Delivered {
    fn new(then: impl FnOnce(bool) -> Option<After> + Send + 'static) -> Delivered {
        Delivered {
            settle: Arc::new(Mutex::new(Settle {
                then: Some(Box::new(then)),
                taken: false,
            })),
        }
    }

    /// The front end took the grant off the acquire's channel, to write it: it alone tells
    /// whether the client read it ([`hand_grant`] does not).
    pub(crate) fn taken(&self) {
        self.settle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .taken = true;
    }

    /// The client read the grant (`read`: its leases count) or not (they are undone, on a
    /// task of their own). What follows a grant read, if anything, for the caller to run.
    pub(crate) fn settled(self, read: bool) -> Option<After> {
        Settle::take(&self.settle).and_then(|then| then(read))
    }
}

impl Drop for Delivered {
    fn drop(&mut self) {
        if let Some(then) = Settle::take(&self.settle) {
            // Not read: nothing follows but the undoing, which `then` started.
            drop(then(false));
        }
    }
}

impl std::fmt::Debug for Delivered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivered").finish_non_exhaustive()
    }
}

impl Out {
    /// The line a waiting report shows people.
    pub(crate) fn waiting_words(conflict: Option<&Conflict>, note: Option<&str>) -> String {
        match (conflict, note) {
            (_, Some(n)) => words::escaped(n),
            (Some(c), None) => format!("waiting: {}", words::conflict(c)),
            (None, None) => "waiting".into(),
        }
    }
}

type Tx = mpsc::Sender<Out>;

/// [`Service::undo_unread`] with `release` releasing one lease of `owner`'s, clean: each
/// retried while the store cannot answer ([`retrying`], as the watcher ends an exited
/// holder's leases). The process stays watched, so its exit would end the lease, but a live
/// process would keep, for as long as it lives, a lease it never received. A lease another
/// answer handed out meanwhile (the process asked again on another connection) is kept
/// ([`Undecided`]).
async fn undo_unread_with<F, Fut>(
    undecided: &Undecided,
    owner: &Owner,
    fresh: Vec<(ResourceName, Token)>,
    release: F,
) where
    F: Fn(ResourceName, Token) -> Fut,
    Fut: std::future::Future<Output = Result<Released, StoreError>>,
{
    let pid = owner.process.pid;
    for (r, token) in fresh {
        if !undecided.undo(&owner.process, &r, token) {
            info!(
                resource = %r,
                pid,
                %token,
                "a grant its client never read is not released: the process was answered that lease again, on another request, or holds a newer one"
            );
            continue;
        }
        let retry = |e: &StoreError| {
            warn!(resource = %r, pid, error = %e, "a grant its client never read cannot be released yet; retrying");
        };
        // Checked again before each try: the process may have been granted a newer lease of
        // the resource while the store was away. A try already under way when that happens
        // (the store re-running its transaction, or a commit queued) is covered by the token
        // the release names: it ends that lease or nothing.
        let attempt = || {
            let go = undecided.undoing(&owner.process, &r, token);
            let release = go.then(|| release(r.clone(), token));
            async move {
                match release {
                    Some(f) => f.await.map(Some),
                    None => Ok(None),
                }
            }
        };
        match retrying(attempt, retry).await {
            Ok(None) => info!(
                resource = %r,
                pid,
                %token,
                "a grant its client never read is not released: the process holds a newer lease of it"
            ),
            Ok(Some(_)) => warn!(
                resource = %r,
                pid,
                "released a grant its client went away without reading"
            ),
            Err(e) => warn!(
                resource = %r,
                pid,
                error = %e,
                "a grant its client never read could not be released"
            ),
        }
        undecided.undone(&owner.process, &r, token);
    }
}

/// The refusal of a request answered a lease of its process whose earlier grant went unread
/// and is being undone ([`Undecided::granted`]).
fn being_undone(owner: &Owner, resource: &ResourceName) -> ApiError {
    warn!(resource = %resource, pid = owner.process.pid, "acquire refused: its lease is being undone (an earlier grant of it was never read)");
    ApiError::new(
        ErrorCode::Unavailable,
        format!(
            "{resource}: pid {}'s lease of it is being released, as an earlier grant of it was never read; acquire again",
            owner.process.pid
        ),
    )
}

/// The safe-until a grant carries on a backend with a host session (SPEC G3): the fencing
/// deadline of the session as it is `now`, or the one the fence task last published if that is
/// earlier (it has not seen the latest renewal yet), so never later than the instant this
/// agent fences its holders. An expired session, or one no renewal of which was confirmed,
/// gives `now`: an instant already past, so a holder does not start (`run` releases and
/// starts nothing) instead of running with no bound, as it would if the grant said nothing
/// and no `safe` line followed before the agent died or hung. Refusing the grant instead
/// would need it undone in the store; the past instant is as safe and says what happened.
pub(crate) fn safe_until_at_grant(
    state: &SessionState,
    published: Option<Instant>,
    timing: &Timing,
    now: Instant,
) -> Instant {
    let current = (!state.expired)
        .then(|| crate::fence::fence_at(state, timing))
        .flatten();
    match (current, published) {
        (Some(c), Some(p)) => c.min(p),
        (Some(c), None) => c,
        (None, _) => now,
    }
}

/// Test-only fault: `LEASEHOLD_TEST_HOLD_BACK_SAFE=1` in the agent's environment (read once)
/// holds back every `safe` line of holds; the grant's own safe-until still goes. The tests
/// use it to kill the agent, deterministically, after a grant before any `safe` line reached
/// the holder. Nothing else reads it; never set it on a real host.
fn test_hold_back_safe() -> bool {
    static HOLD_BACK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HOLD_BACK
        .get_or_init(|| std::env::var_os("LEASEHOLD_TEST_HOLD_BACK_SAFE").is_some_and(|v| v == "1"))
}

/// Test-only fault: `LEASEHOLD_TEST_GRANT_AFTER_CLOSE=1` in the agent's environment (read
/// once): a grant put on a connection's channel ([`hand_grant`]) waits, between taking its
/// place there and putting it in, until the connection's receiver is gone (at most 10 s), as
/// a worker preempted between the two while the client goes away would. Nothing else reads
/// it; never set it on a real host.
fn test_grant_after_close() -> bool {
    static AFTER_CLOSE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AFTER_CLOSE.get_or_init(|| {
        std::env::var_os("LEASEHOLD_TEST_GRANT_AFTER_CLOSE").is_some_and(|v| v == "1")
    })
}

/// Puts a grant on `tx` for the front end: whether it went.
///
/// A grant put there just as the front end went away is settled unread here. Its place on the
/// channel is taken first, then the grant put in it; a receiver dropped between the two has
/// already thrown away what the channel held, and the grant, put in after, stays in a channel
/// nobody reads. Nor is it dropped with the channel: its [`Delivered`]'s settle holds a sender
/// of the channel, for what follows the grant (its hold), and keeps it open. Unsettled, its
/// new leases would stay held for a process that never learnt them, as long as the process
/// lives (G4). A receiver gone by the time the grant is in (the channel closed) will take
/// nothing more: what the front end has not taken, it never will.
async fn hand_grant(tx: &Tx, granted: Out) -> bool {
    let settle = match &granted {
        Out::Granted {
            delivered: Some(d), ..
        } => Some(d.settle.clone()),
        _ => None,
    };
    let Ok(place) = tx.reserve().await else {
        // Dropped here: settled unread.
        return false;
    };
    if test_grant_after_close() {
        let _ = tokio::time::timeout(Duration::from_secs(10), tx.closed()).await;
    }
    place.send(granted);
    if tx.is_closed()
        && let Some(settle) = settle
    {
        let then = {
            let mut s = settle.lock().unwrap_or_else(PoisonError::into_inner);
            if s.taken { None } else { s.then.take() }
        };
        if let Some(then) = then {
            // Not read: nothing follows but the undoing, which `then` started.
            drop(then(false));
        }
    }
    true
}

/// An acquire checked whole, to be asked of the store.
struct Asked {
    owner: Owner,
    spec: AcquireSpec,
    /// Who may take a dirty resource unchecked, when the caller asked to and may not.
    dirty_needs: Option<String>,
    hold: bool,
    contain: bool,
    /// Contained by starting its processes into the cgroup itself (not moved).
    clone_into: bool,
    before_fence: Option<v1::BeforeFence>,
    /// A pidfd of the process, opened as it was read (none when it is watched already, or
    /// the pidfd could not be opened then: [`Service::prepare_watch`] opens one).
    pidfd: Option<Pidfd>,
}

/// A grant handed to the front end, with what follows it.
struct Handed {
    owner: Owner,
    grants: Vec<Grant>,
    /// The new leases of the grant.
    fresh: Vec<(ResourceName, Token)>,
    /// Whether the grant reached the front end.
    sent: bool,
    /// With `hold`: the lease's notes after the grant.
    registration: Option<Registration>,
}

/// Logs each new lease of a grant to `owner`; returns their resources and tokens.
fn log_granted(owner: &Owner, grants: &[Grant]) -> Vec<(ResourceName, Token)> {
    let fresh = grants.iter().filter(|g| !g.existing);
    for g in fresh.clone() {
        info!(
            resource = %g.resource,
            pid = owner.process.pid,
            token = %g.token,
            mode = %g.mode,
            mono_ns = crate::fence::monotonic_ns(),
            "granted"
        );
    }
    fresh.map(|g| (g.resource.clone(), g.token)).collect()
}

/// Logs a refused acquire of `owner` and words it for the caller (`dirty_needs`: who may
/// take a dirty resource unchecked, when the caller asked to and may not).
fn refused(owner: &Owner, e: StoreError, dirty_needs: Option<&str>) -> ApiError {
    info!(pid = owner.process.pid, reason = %e, "acquire refused");
    let mut r = refusal(e);
    if let Some(needs) = dirty_needs
        && r.code == ErrorCode::NeedsCheck
    {
        r.message = format!(
            "{}; taking a dirty resource (--accept-dirty, run --check) needs {needs}: ask an admin to check it and run `leasehold mark-clean {}`",
            r.message,
            r.resource.as_deref().unwrap_or("R")
        );
        r.accept_dirty_needs = Some(needs.to_owned());
    }
    r
}

/// The refusal of an acquire as an API error: who is in the way, and what to do next.
fn refusal(e: StoreError) -> ApiError {
    let (code, conflict, resource, dirty) = match &e {
        StoreError::Acquire(AcquireError::Busy(c)) => (ErrorCode::Held, Some(c), None, None),
        StoreError::TimedOut(c) => (ErrorCode::TimedOut, Some(c), None, None),
        StoreError::Acquire(AcquireError::NeedsCheck { resource, dirty }) => {
            (ErrorCode::NeedsCheck, None, Some(resource), Some(&**dirty))
        }
        StoreError::Acquire(AcquireError::ModeConflict { resource, .. }) => {
            (ErrorCode::ModeConflict, None, Some(resource), None)
        }
        StoreError::Acquire(AcquireError::Cancelled(_)) => (ErrorCode::Cancelled, None, None, None),
        StoreError::Acquire(AcquireError::Moved { resource, .. }) => {
            (ErrorCode::Moved, None, Some(resource), None)
        }
        _ => return fault_of(e),
    };
    let resource = resource
        .or(conflict.map(|c| &c.resource))
        .map(ToString::to_string);
    let message = match (code, conflict) {
        (ErrorCode::Held, Some(c)) => format!(
            "{}; to wait for it, acquire with a wait (\"wait\": \"5m\", or \"forever\"); if that holder is gone for good, an admin can force-release it",
            words::conflict(c)
        ),
        (ErrorCode::TimedOut, Some(c)) => format!(
            "timed out waiting: {}; to wait longer, raise the wait",
            words::conflict(c)
        ),
        (ErrorCode::Moved, _) => format!(
            "{e}; check the disk (another owner held it since), then take it afresh without the expected token"
        ),
        (ErrorCode::NeedsCheck, _) => format!(
            "{e}; check it, then mark it clean (leasehold mark-clean), or take it anyway with accept_dirty and check it first"
        ),
        _ => e.to_string(),
    };
    ApiError {
        code,
        message,
        resource,
        conflict: conflict.map(|c| Box::new(conflict_to_v1(c))),
        dirty: dirty.map(|d| Box::new(d.into())),
        accept_dirty_needs: None,
    }
}

impl<S: Store> Service<S> {
    /// Checks an acquire for `c` whole (a bad request is an error here, nothing asked of the
    /// store): what to ask the store, and how.
    fn asked(&self, c: &Caller, r: v1::AcquireRequest) -> Result<Asked, ApiError> {
        // Checked before anything is asked of the store: refused whole, as a usage error.
        if r.items.len() > leasehold_core::MAX_ITEMS {
            return Err(super::usage(format!(
                "{} resources named; at most {} per request: acquire them in several",
                r.items.len(),
                leasehold_core::MAX_ITEMS
            )));
        }
        let items = r
            .items
            .into_iter()
            .map(|i| Ok((resource(i.resource)?, i.mode.into())))
            .collect::<Result<Vec<_>, ApiError>>()?;
        let expect_tokens = r
            .expect_tokens
            .into_iter()
            .map(|e| Ok((resource(e.resource)?, Token(e.token))))
            .collect::<Result<Vec<_>, ApiError>>()?;
        // The pidfd that watches a grant's process is opened with this read of /proc, and
        // tells a thread from a process too (see `refuse_non_process`).
        let (info, opened) = self.target_with_pidfd(c, r.pid, r.start_time)?;
        let watched = self.watched(&info);
        let opened_error = opened.as_ref().map(|o| o.as_ref().err().copied());
        refuse_non_process(&info, watched, opened_error)?;
        let pidfd = opened.and_then(Result::ok).filter(|_| !watched);
        // Only the caller's own process may be moved into a cgroup (SPEC G8).
        if r.contain && c.pid != Some(info.pid) {
            return Err(super::usage(format!(
                "contain is for the calling process itself, not pid {}: ask from that process, or without contain",
                info.pid
            )));
        }
        let contain = r.contain;
        // A caller that starts its processes into the cgroup itself is not moved, where the
        // kernel will let it: root may start a child in any cgroup; another user would need
        // write access to the cgroup.procs of the common ancestor of its cgroup and the
        // agent's, which is root's (crate::cgroup). Those are moved, as without it.
        let clone_into = contain && r.clone_into_cgroup && c.uid == 0;
        let owner = Owner {
            process: ProcessKey {
                host: self.config.host_id.clone(),
                pid: info.pid,
                start_time: info.start_time,
            },
            id: r
                .owner_id
                .map(OwnerId::new)
                .transpose()
                .map_err(super::usage)?,
            label: r.label,
            uid: Some(info.uid),
            command: Some(info.command),
            restricted: r.restricted,
            on_exit: match r.on_exit {
                v1::OnExit::Dirty => leasehold_core::OnExit::Dirty,
                v1::OnExit::Status => leasehold_core::OnExit::Status,
            },
            on_lost: r.on_lost.into(),
        };
        owner.validate().map_err(super::usage)?;
        if owner.on_lost == leasehold_core::OnLost::Revoke && !self.config.allow_revoke {
            return Err(super::usage(
                "this agent forbids on_lost = revoke (allow-revoke = false in its config): a \
                 force-release or a lost host session kills the holder here; ask without \
                 on_lost, or ask the agent's administrator",
            ));
        }
        // A lease the fence revoked is still recorded until etcd answers: asking again must
        // not hand back its old token as if nothing happened.
        if let Some((name, e)) = items.iter().find_map(|(n, _)| {
            self.holds
                .revoked_of(n, &owner.process, owner.id.as_ref())
                .map(|e| (n, e))
        }) {
            return Err(ApiError::new(
                ErrorCode::BackendUnavailable,
                format!(
                    "{name}: this owner's lease (token {}) was revoked when the host's etcd \
                     session was lost, and etcd has not recorded its end yet; try again once \
                     etcd answers (leasehold status shows the session)",
                    e.token
                ),
            ));
        }
        let before_fence = r.before_fence;
        let wait = r.wait.map(|d| d.0);
        // Taking a dirty resource unchecked clears its purpose as surely as mark-clean: only
        // root or the admin group may (SPEC G8). Others are told it needs a check, and by whom.
        let admin = self.is_admin(c);
        let spec = AcquireSpec {
            owner: owner.clone(),
            items,
            accept_dirty: r.accept_dirty && admin,
            wait,
            expect_tokens,
        };
        let dirty_needs = (r.accept_dirty && !admin).then(|| self.admin_words());
        Ok(Asked {
            owner,
            spec,
            dirty_needs,
            hold: r.hold,
            contain,
            clone_into,
            before_fence,
            pidfd,
        })
    }

    /// Starts an acquire for `c`: checked at once (a bad request is an error here, nothing
    /// asked of the store), then carried out, reporting on the receiver. Dropping the
    /// receiver withdraws a waiting request.
    ///
    /// A request that waits is carried out in the background from the start. One that does
    /// not (`run`'s) is carried out on the caller's task up to its grant, which is on the
    /// receiver when this returns: no task is spawned and nothing crosses to another worker
    /// before the answer. Dropped meanwhile (the client went away), that part is finished
    /// as a task as [`Service::acquire_now`]'s is, and its grant, never read, undone. What
    /// follows the grant (its delivery, the hold) is a task of its own in both cases.
    pub(crate) async fn acquire(
        &self,
        c: &Caller,
        r: v1::AcquireRequest,
    ) -> Result<mpsc::Receiver<Out>, ApiError> {
        let waits = r.wait.is_some();
        let asked = self.asked(c, r)?;
        let (tx, rx) = mpsc::channel(8);
        let me = self.clone();
        let carried = async move {
            let granted = me.until_granted(asked, &tx).await;
            if let Some(hold) = granted.and_then(|g| me.after_granted(g, true, tx)) {
                tokio::spawn(hold);
            }
        };
        if waits {
            tokio::spawn(carried);
        } else {
            Finish::new(carried).await;
        }
        Ok(rx)
    }

    /// An acquire's part up to its grant, sent on `tx`: `None` if nothing was granted (the
    /// refusal sent) or the caller went away.
    async fn until_granted(&self, asked: Asked, tx: &Tx) -> Option<Handed> {
        let Asked {
            owner,
            spec,
            dirty_needs,
            hold,
            contain,
            clone_into,
            before_fence,
            pidfd,
        } = asked;
        let waits = spec.wait.is_some();
        // Register before the grant so no loss after it can be missed.
        let registration = hold.then(|| self.holds.register(owner.process.clone()));
        // The pidfd is opened before the grant: a grant the agent could not watch would
        // have to end at once, although its process lives.
        let prepared = match self.prepare_watch(&owner.process, pidfd).await {
            Ok(p) => p,
            Err(e) => {
                let _ = tx.send(Out::Failed(e)).await;
                return None;
            }
        };
        // Moved into its cgroup while the grant is decided; back if nothing is granted.
        let containing =
            (contain && !clone_into).then(|| self.watcher.start_containing(&owner.process));
        // Or its cgroup made meanwhile, for a holder that starts its processes in it (not
        // for a wait, which may last: made once granted); removed if nothing is granted.
        let making = (clone_into && !waits)
            .then(|| self.watcher.start_making(&owner.process))
            .flatten();
        let asking = self.undecided.asking(&owner.process);
        let grants = match self.acquire_reporting(spec, tx).await {
            None => {
                // The caller went away; the wait was withdrawn.
                if let Some(c) = containing {
                    self.watcher.not_contained(&owner.process, c).await;
                }
                self.watcher.not_made(&owner.process, making).await;
                return None;
            }
            Some(Ok(grants)) => grants,
            Some(Err(e)) => {
                if let Some(c) = containing {
                    self.watcher.not_contained(&owner.process, c).await;
                }
                self.watcher.not_made(&owner.process, making).await;
                let r = refused(&owner, e, dirty_needs.as_deref());
                let _ = tx.send(Out::Failed(r)).await;
                return None;
            }
        };
        self.watch_granted(&owner, before_fence, prepared);
        // Before the grant is answered: the holder starts nothing before it reads it.
        let (containment, cgroup) = match containing {
            Some(c) => (Some(self.watcher.contained(&owner.process, c).await), None),
            None if clone_into => {
                let (how, dir) = self.watcher.making_done(&owner.process, making).await;
                (Some(how), dir)
            }
            None => (None, None),
        };
        // New leases count only once the client received them: one that went away as
        // it was granted (a withdrawn wait) must not leave them behind.
        let fresh = match self.answerable(&owner, &grants, asking).await {
            Ok(fresh) => fresh,
            Err(e) => {
                let _ = tx.send(Out::Failed(e)).await;
                return None;
            }
        };
        let safe_until = self.grant_safe_until().map(crate::fence::monotonic_ns_of);
        let handed = Handed {
            owner: owner.clone(),
            grants: grants.clone(),
            fresh,
            sent: true,
            registration,
        };
        // With new leases, what follows the grant starts once the front end knows whether
        // the client read it (within a bound, even if the stream closed meanwhile: a client
        // that read the grant and closed at once has it); dropped unsent, with false.
        let (delivered, after) = if handed.fresh.is_empty() {
            (None, Some(handed))
        } else {
            let me = self.clone();
            let tx = tx.clone();
            let settle = move |read: bool| me.after_granted(handed, read, tx);
            (Some(Delivered::new(settle)), None)
        };
        let granted = Out::Granted {
            grants,
            owner,
            delivered,
            safe_until,
            containment,
            cgroup,
        };
        let sent = hand_grant(tx, granted).await;
        after.map(|g| Handed { sent, ..g })
    }

    /// An acquire's part after its grant was handed to the front end and, with new leases,
    /// the client `read` it or not: its new leases undone if the client did not receive it
    /// (on a task of its own, run to its end), else, with `hold`, the hold, given back to be
    /// run while the client is served.
    fn after_granted(&self, g: Handed, read: bool, tx: Tx) -> Option<After> {
        let kept = g.sent && read;
        let me = self.clone();
        if !kept {
            // Outside a runtime only as the agent stops: its tasks end too.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { me.undo_unread(&g.owner, g.fresh).await });
            }
            return None;
        }
        self.undecided.read(&g.owner.process, &g.fresh);
        let registration = g.registration?;
        Some(Box::pin(async move {
            me.hold(&g.grants, registration, &tx).await;
        }))
    }

    /// An acquire that neither waits nor holds, carried out on the caller's task (no task of
    /// its own and no channel between, as [`Service::acquire`] has): its grant, or its refusal
    /// as the error. A request that waits, holds or is to be contained is given back: those
    /// go through [`Service::acquire`]. Dropping the future does not stop the store's part once
    /// asked (a grant may be written): it is finished as a task, and its grant, never
    /// answered, undone. The grant's new leases count once its `delivered` fires; if it is
    /// dropped unsent (the client never read the grant), they are released.
    pub(crate) async fn acquire_now(
        &self,
        c: &Caller,
        r: v1::AcquireRequest,
    ) -> Result<Result<Out, ApiError>, Box<v1::AcquireRequest>> {
        if r.wait.is_some() || r.hold || r.contain {
            return Err(Box::new(r));
        }
        Ok(self.acquire_now_checked(c, r).await)
    }

    async fn acquire_now_checked(
        &self,
        c: &Caller,
        r: v1::AcquireRequest,
    ) -> Result<Out, ApiError> {
        let Asked {
            owner,
            spec,
            dirty_needs,
            before_fence,
            pidfd,
            ..
        } = self.asked(c, r)?;
        // As in `acquire`: the pidfd before the grant.
        let prepared = self.prepare_watch(&owner.process, pidfd).await?;
        // Carried out to its end even if the caller drops this future (hyper drops the
        // request's future when the client closes mid-request): once the store is asked, the
        // grant may be written, and only the rest of this watches its process and undoes it
        // unread (its `delivered` dropped unsent). Dropped midway, the rest goes on as a task.
        let me = self.clone();
        Finish::new(async move {
            me.grant_now(owner, spec, dirty_needs, before_fence, prepared)
                .await
        })
        .await
    }

    /// The store's part of [`Service::acquire_now`], run to its end (see there).
    async fn grant_now(
        &self,
        owner: Owner,
        spec: AcquireSpec,
        dirty_needs: Option<String>,
        before_fence: Option<v1::BeforeFence>,
        prepared: Prepared,
    ) -> Result<Out, ApiError> {
        let started = Instant::now();
        let asking = self.undecided.asking(&owner.process);
        let r = self.store.acquire(spec).await;
        metrics::store_op(metrics::StoreOp::acquire, started.elapsed());
        metrics::acquired(metrics::acquire_result(&r), None);
        let grants = r.map_err(|e| refused(&owner, e, dirty_needs.as_deref()))?;
        self.watch_granted(&owner, before_fence, prepared);
        let fresh = self.answerable(&owner, &grants, asking).await?;
        let delivered = (!fresh.is_empty()).then(|| {
            let me = self.clone();
            let owner = owner.clone();
            let settle = move |read: bool| -> Option<After> {
                if read {
                    me.undecided.read(&owner.process, &fresh);
                } else if let Ok(rt) = tokio::runtime::Handle::try_current() {
                    // Outside a runtime only as the agent stops: its tasks end too.
                    rt.spawn(async move { me.undo_unread(&owner, fresh).await });
                }
                None
            };
            Delivered::new(settle)
        });
        Ok(Out::Granted {
            grants,
            owner,
            delivered,
            safe_until: self.grant_safe_until().map(crate::fence::monotonic_ns_of),
            containment: None,
            cgroup: None,
        })
    }

    /// Watches the holder of a grant, with what it asked for: its exit status read, its
    /// action before a fence.
    fn watch_granted(
        &self,
        owner: &Owner,
        before_fence: Option<v1::BeforeFence>,
        prepared: Prepared,
    ) {
        if owner.on_exit == leasehold_core::OnExit::Status {
            self.watcher.by_exit_status(&owner.process);
        }
        if let Some(action) = before_fence {
            self.watcher.before_fence(&owner.process, action);
        }
        self.watcher.watch_with(prepared);
    }

    /// The safe-until a grant carries: [`safe_until_at_grant`] of the host session as it is
    /// now and of the fencing deadline the fence task published.
    fn grant_safe_until(&self) -> Option<Instant> {
        let session = self.store.session()?;
        let state = session.borrow().clone();
        let published = *self.deadline.borrow();
        Some(safe_until_at_grant(
            &state,
            published,
            &self.config.timing,
            Instant::now(),
        ))
    }

    /// Prepares to watch `process` (with `pidfd`, a pidfd known to be of it, if one was
    /// opened already), waiting a little while the agent is out of file descriptors, then
    /// refusing: no lease is granted that could not be watched.
    async fn prepare_watch(
        &self,
        process: &ProcessKey,
        pidfd: Option<Pidfd>,
    ) -> Result<Prepared, ApiError> {
        if let Some(fd) = pidfd {
            return Ok(self.watcher.prepared_with(process, fd));
        }
        let mut delay = Duration::from_millis(20);
        let give_up = Instant::now() + Duration::from_secs(3);
        loop {
            match self.watcher.prepare(process) {
                Ok(p) => return Ok(p),
                Err(ProcError::NoDescriptors { .. }) if Instant::now() < give_up => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(500));
                }
                Err(e @ ProcError::NoDescriptors { .. }) => {
                    warn!(pid = process.pid, error = %e, "out of file descriptors; request refused");
                    return Err(ApiError::new(
                        ErrorCode::Exhausted,
                        format!(
                            "the agent is out of file descriptors and cannot watch pid {}: no lease \
                             was granted; retry later (and raise the agent's LimitNOFILE)",
                            process.pid
                        ),
                    ));
                }
                Err(e @ (ProcError::NoProcess(_) | ProcError::Reused { .. })) => {
                    return Err(ApiError::new(
                        ErrorCode::Refused,
                        format!("{e}; leases are held for a running process"),
                    ));
                }
                Err(e) => return Err(ApiError::new(ErrorCode::Internal, e.to_string())),
            }
        }
    }

    /// The new leases of `grants` to `owner`, logged, once [`Undecided`] lets them be answered
    /// (`asking`, the request's registration there, ends here); else, an earlier grant of one
    /// of them having gone unread and being undone, the grant's new leases are undone too (it
    /// was contained as if granted: only the answer differs) and the refusal is returned.
    async fn answerable(
        &self,
        owner: &Owner,
        grants: &[Grant],
        asking: Asking,
    ) -> Result<Vec<(ResourceName, Token)>, ApiError> {
        let fresh = log_granted(owner, grants);
        let checked = self.undecided.granted(&owner.process, grants);
        drop(asking);
        match checked {
            Ok(()) => Ok(fresh),
            Err(r) => {
                self.undo_unread(owner, fresh).await;
                Err(being_undone(owner, &r))
            }
        }
    }

    /// Releases, clean, the new leases of a grant whose client went away before receiving
    /// it: nobody learnt their tokens, so nothing was written under them.
    async fn undo_unread(&self, owner: &Owner, fresh: Vec<(ResourceName, Token)>) {
        // By token: only the lease that was granted unread, never a later one of the owner.
        undo_unread_with(&self.undecided, owner, fresh, |r, token| {
            self.store.release(
                r,
                owner.process.clone(),
                owner.id.clone(),
                Some(token),
                ReleaseKind::Clean,
            )
        })
        .await;
    }

    /// Runs an acquire, telling a waiting caller every second who is in its way. Returns
    /// `None` if the caller went away (dropping the store's future withdraws the request).
    async fn acquire_reporting(
        &self,
        spec: AcquireSpec,
        tx: &Tx,
    ) -> Option<Result<Vec<Grant>, StoreError>> {
        let owner = spec.owner.clone();
        let process = owner.process.clone();
        let items = spec.items.clone();
        let waits = spec.wait.is_some();
        // Subscribed before the request starts, so no note about it is missed.
        let mut notes = self.store.wait_notes();
        let mut notes_open = waits;
        let fut = self.store.acquire(spec);
        tokio::pin!(fut);
        let started = Instant::now();
        // The first report comes quickly, so a caller sees who is in the way at once.
        let mut next = tokio::time::Instant::now() + Duration::from_millis(100);
        let waited = || waits.then(|| started.elapsed());
        loop {
            tokio::select! {
                r = &mut fut => {
                    if !waits {
                        metrics::store_op(metrics::StoreOp::acquire, started.elapsed());
                    }
                    metrics::acquired(metrics::acquire_result(&r), waited());
                    return Some(r);
                }
                // A wait is withdrawn when its caller goes away. A request that does not wait
                // is carried out to its end (the store may be writing its grant: dropped
                // midway, the grant may be written all the same for a process nobody
                // watches); its grant, never read, is then undone.
                () = tx.closed(), if waits => {
                    metrics::acquired(metrics::AcquireResult::withdrawn, waited());
                    return None;
                }
                n = notes.recv(), if notes_open => match n {
                    Ok(n) if n.process == process && n.items == items => {
                        info!(pid = process.pid, note = %n.note, "told a waiting caller");
                        let waiting = Out::Waiting {
                            conflict: None,
                            waited: started.elapsed(),
                            note: Some(n.note),
                        };
                        if tx.send(waiting).await.is_err() {
                            return None;
                        }
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => notes_open = false,
                },
                () = tokio::time::sleep_until(next), if waits => {
                    next += PROGRESS_EVERY;
                    let in_way = self.store.conflict(owner.clone(), items.clone()).await;
                    if let Ok(Some(conflict)) = in_way {
                        let waiting = Out::Waiting {
                            conflict: Some(conflict),
                            waited: started.elapsed(),
                            note: None,
                        };
                        if tx.send(waiting).await.is_err() {
                            return None;
                        }
                    }
                }
            }
        }
    }

    /// After a grant with `hold`: reports leases lost by other means than the holder's own
    /// release, until every lease of the grant has ended or the caller goes away.
    async fn hold(&self, grants: &[Grant], mut reg: Registration, tx: &Tx) {
        let mut live: BTreeMap<ResourceName, Token> = grants
            .iter()
            .map(|g| (g.resource.clone(), g.token))
            .collect();
        let mut deadline = self.deadline.clone();
        let mut deadline_live = true;
        let hold_back = test_hold_back_safe();
        let safe = |at: Option<Instant>| {
            at.filter(|_| !hold_back)
                .map(|at| Out::Safe(crate::fence::monotonic_ns_of(at)))
        };
        let first = *deadline.borrow_and_update();
        if let Some(msg) = safe(first)
            && tx.send(msg).await.is_err()
        {
            return;
        }
        while !live.is_empty() {
            let note = tokio::select! {
                n = reg.notes.recv() => n,
                () = tx.closed() => return,
                changed = deadline.changed(), if deadline_live => {
                    if changed.is_err() {
                        deadline_live = false;
                        continue;
                    }
                    // None: the session is gone; the last deadline stands.
                    let at = *deadline.borrow_and_update();
                    if let Some(msg) = safe(at)
                        && tx.send(msg).await.is_err()
                    {
                        return;
                    }
                    continue;
                }
            };
            let ended = match note {
                Some(Note::Ended { resource, ended })
                    if live.get(&resource) == Some(&ended.token) =>
                {
                    live.remove(&resource);
                    vec![(resource, *ended)]
                }
                Some(Note::Ended { .. }) => continue,
                // Missed events: look at each lease directly.
                Some(Note::Resync) => {
                    let mut lost = Vec::new();
                    for (r, t) in &live {
                        if !self.store.validate(r.clone(), *t).await.unwrap_or(false) {
                            lost.push(r.clone());
                        }
                    }
                    let mut ended = Vec::new();
                    for r in lost {
                        live.remove(&r);
                        let v = self.store.inspect(r.clone()).await.ok().flatten();
                        if let Some(e) = v.and_then(|v| v.last_ended) {
                            ended.push((r, e));
                        }
                    }
                    ended
                }
                None => return,
            };
            for (resource, ended) in ended {
                let own = matches!(
                    ended.how,
                    EndReason::Released
                        | EndReason::ReleasedDirty { .. }
                        | EndReason::HandedOver { .. }
                );
                if own {
                    continue;
                }
                if tx.send(Out::Lost { resource, ended }).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn session(sent: Option<Instant>, expired: bool) -> SessionState {
        SessionState {
            id: leasehold_core::SessionId(1),
            ttl: Duration::from_secs(10),
            renewed_sent_at: sent,
            expired,
            latencies: Vec::new(),
            failed_renewals: 0,
        }
    }

    /// A grant its client never read is released once the store answers again: while the
    /// store is unavailable, the release is tried again (200 ms, then 400 ms, ...), as the
    /// watcher ends an exited holder's leases; an answer that is no failure of the store (the
    /// lease is not held any more: the holder exited and its leases ended) stops it. Before,
    /// the first failure was only logged, and a live holder kept a lease it never received.
    #[tokio::test]
    async fn a_grant_never_read_is_released_once_the_store_answers_again() {
        use leasehold_core::{HostId, ReleaseError};
        use leasehold_store::Cause;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let owner = Owner::new(HostId::new("host-a").unwrap(), 10, 1);
        let name = |n: &str| ResourceName::new(n).unwrap();
        let tries = std::sync::Mutex::new(BTreeMap::<ResourceName, usize>::new());
        let released = AtomicUsize::new(0);
        let started = Instant::now();
        let undecided = Undecided::default();
        let fresh = vec![(name("disk"), Token(1)), (name("gone"), Token(2))];
        undo_unread_with(&undecided, &owner, fresh, |r, _| {
            let n = {
                let mut t = tries.lock().unwrap();
                let n = t.entry(r.clone()).or_default();
                *n += 1;
                *n
            };
            let process = owner.process.clone();
            let released = &released;
            async move {
                match (r.as_str(), n) {
                    // Unavailable twice, then released.
                    ("disk", 1 | 2) => Err(StoreError::Unavailable(Cause::new("etcd is away"))),
                    ("disk", _) => {
                        released.fetch_add(1, Ordering::SeqCst);
                        Ok(Released {
                            resource: r,
                            ended: Ended {
                                owner: Owner::new(process.host.clone(), process.pid, 1),
                                mode: leasehold_core::Mode::Exclusive,
                                token: Token(1),
                                granted_at: leasehold_core::WallTime(0),
                                ended_at: leasehold_core::WallTime(1),
                                how: EndReason::Released,
                            },
                            dirtied: false,
                        })
                    }
                    // Not held any more: nothing to retry.
                    _ => Err(StoreError::Release(ReleaseError::NotHeld {
                        resource: r,
                        process,
                        owner_id: None,
                    })),
                }
            }
        })
        .await;
        let tries = tries.into_inner().unwrap();
        assert_eq!(tries.get(&name("disk")), Some(&3), "{tries:?}");
        assert_eq!(tries.get(&name("gone")), Some(&1), "{tries:?}");
        assert_eq!(released.load(Ordering::SeqCst), 1);
        // It waited between tries: 200 ms, then 400 ms.
        assert!(started.elapsed() >= Duration::from_millis(600));
    }

    /// An undo retrying while the store is away does not release, once it answers, a newer
    /// lease of the process (its unread one ended meanwhile, force-released, and the process
    /// was granted the resource afresh): a release is by owner, so each try first checks that
    /// the lease to undo is still the process's one.
    #[tokio::test]
    async fn an_undo_retrying_leaves_a_newer_lease_of_the_process_alone() {
        use leasehold_core::{Grant, HostId, Mode};
        use leasehold_store::Cause;
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let owner = Owner::new(HostId::new("host-a").unwrap(), 10, 1);
        let disk = ResourceName::new("disk").unwrap();
        let grant = |token: u64| Grant {
            resource: disk.clone(),
            mode: Mode::Exclusive,
            token: Token(token),
            dirty: None,
            existing: false,
        };
        let undecided = Arc::new(Undecided::default());
        {
            let _asking = undecided.asking(&owner.process);
            undecided.granted(&owner.process, &[grant(7)]).unwrap();
        }
        let tries = AtomicUsize::new(0);
        undo_unread_with(
            &undecided,
            &owner,
            vec![(disk.clone(), Token(7))],
            |_, _| {
                let n = tries.fetch_add(1, Ordering::SeqCst);
                if n == 0 {
                    // While the store is away, the lease ends and the process is granted anew.
                    let _asking = undecided.asking(&owner.process);
                    undecided.granted(&owner.process, &[grant(8)]).unwrap();
                }
                async move {
                    assert_eq!(n, 0, "released the newer lease");
                    Err(StoreError::Unavailable(Cause::new("etcd is away")))
                }
            },
        )
        .await;
        assert_eq!(tries.load(Ordering::SeqCst), 1);
    }

    /// The undo names, to the store's release, the token of each grant it undoes: the store
    /// then ends that lease or nothing, so a try under way (re-run by etcd's transaction after
    /// a lost compare, or queued on the local store) while the lease was force-released and
    /// the process granted the resource again cannot end the newer lease (the store's side:
    /// `a_release_rerun_after_a_lost_compare_leaves_a_regrant_to_the_same_owner`).
    #[tokio::test]
    async fn an_undo_names_the_token_of_the_grant_it_undoes() {
        use leasehold_core::{Grant, HostId, Mode, ReleaseError};
        let owner = Owner::new(HostId::new("host-a").unwrap(), 10, 1);
        let name = |n: &str| ResourceName::new(n).unwrap();
        let undecided = std::sync::Arc::new(Undecided::default());
        let grants: Vec<Grant> = [("disk", 7), ("img", 9)]
            .into_iter()
            .map(|(r, t)| Grant {
                resource: name(r),
                mode: Mode::Exclusive,
                token: Token(t),
                dirty: None,
                existing: false,
            })
            .collect();
        {
            let _asking = undecided.asking(&owner.process);
            undecided.granted(&owner.process, &grants).unwrap();
        }
        let asked = std::sync::Mutex::new(Vec::new());
        let fresh = vec![(name("disk"), Token(7)), (name("img"), Token(9))];
        undo_unread_with(&undecided, &owner, fresh, |r, token| {
            asked.lock().unwrap().push((r.clone(), token));
            let process = owner.process.clone();
            // The store found another token held: nothing to retry.
            async move {
                Err(StoreError::Release(ReleaseError::StaleToken {
                    resource: r,
                    process,
                    owner_id: None,
                    token,
                    holding: Some(Token(token.0 + 1)),
                }))
            }
        })
        .await;
        assert_eq!(
            asked.into_inner().unwrap(),
            vec![(name("disk"), Token(7)), (name("img"), Token(9))]
        );
    }

    /// A grant's safe-until is never later than the fencing deadline, whether the fence task
    /// has published it yet or not, and is already past when the session is not confirmed.
    #[test]
    fn a_grants_safe_until_is_the_fencing_deadline_or_already_past() {
        let timing = Timing::default();
        let now = Instant::now();
        let sent = now - Duration::from_secs(1);
        let fence = crate::fence::fence_at(&session(Some(sent), false), &timing).unwrap();
        assert!(fence > now);
        let live = session(Some(sent), false);
        // Not published yet (the agent just started): the session's own deadline.
        assert_eq!(safe_until_at_grant(&live, None, &timing, now), fence);
        assert_eq!(safe_until_at_grant(&live, Some(fence), &timing, now), fence);
        // The fence task has not seen the latest renewal: its earlier deadline stands.
        let older = fence - Duration::from_secs(1);
        assert_eq!(safe_until_at_grant(&live, Some(older), &timing, now), older);
        // Expired, or never renewed: already past, whatever was published before.
        let expired = session(Some(sent), true);
        assert_eq!(
            safe_until_at_grant(&expired, Some(fence), &timing, now),
            now
        );
        assert_eq!(
            safe_until_at_grant(&session(None, false), None, &timing, now),
            now
        );
    }
}
