//! The worker thread: it applies a batch of commands to the engine, commits the batch in one
//! write transaction, and only then answers.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use leasehold_core::{
    AcquireError, AcquireRequest, Acquired, Conflict, Engine, Event, Grant, Mode, Now, Output,
    Owner, ReleaseKind, ReleaseRequest, ResourceName, SessionId, Token, WaiterId,
};
use redb::Database;
use tokio::sync::{broadcast, oneshot};

use super::db::{
    ENGINE_KEY, FORMAT, FORMAT_KEY, META, RESOURCES, damaged_running, load, panic_text, quietly,
};
use super::forget::Touched;
use super::{AcquireReply, Cmd, LocalStoreOptions, Reply, fresh};
use crate::sync::lock;
use crate::{Cause, Clock, StoreError};

pub(super) enum Cleanup {
    Release(Vec<(ResourceName, Owner, Token)>),
    Abandon(WaiterId),
}

/// An answer held back until the batch is durable; called with the commit error, if any.
pub(super) type Deferred = Box<dyn FnOnce(Option<&StoreError>) -> Option<Cleanup> + Send>;

pub(super) fn defer<T: Send + 'static>(
    out: &mut Vec<Deferred>,
    reply: Reply<T>,
    value: Result<T, StoreError>,
) {
    out.push(Box::new(move |failed| {
        let value = match failed {
            Some(e) => Err(e.clone()),
            None => value,
        };
        let _ = reply.send(value);
        None
    }));
}

pub(super) struct Pending {
    pub(super) reply: oneshot::Sender<Result<Vec<Grant>, AcquireError>>,
    pub(super) owner: Owner,
    pub(super) items: Vec<(ResourceName, Mode)>,
}

pub(super) struct Worker {
    pub(super) engine: Engine,
    /// The database; `None` after a write failed and it could not be opened again yet
    /// (the disk is full, or failing): then every command is refused, and reopening is
    /// retried every [`RETRY_STORAGE`], until the engine is reloaded from what is on disk.
    pub(super) db: Option<Database>,
    /// The database file.
    pub(super) path: PathBuf,
    /// Why the database cannot be used, while it cannot.
    pub(super) broken: Option<Cause>,
    pub(super) clock: Clock,
    pub(super) session: SessionId,
    pub(super) options: LocalStoreOptions,
    pub(super) events: broadcast::Sender<Event>,
    pub(super) pending: HashMap<WaiterId, Pending>,
    pub(super) orphans: Vec<(ResourceName, Owner, Token)>,
    /// Whether the database has no format marker yet (a new state directory).
    pub(super) fresh: bool,
    /// When each record last changed, for forgetting old free ones.
    pub(super) touched: Touched,
    /// How many write transactions were committed (for the tests).
    pub(super) commits: u64,
}

/// How often a store whose database failed tries to open it again.
pub(super) const RETRY_STORAGE: Duration = Duration::from_millis(500);

/// Commands waiting for a commit, and who commits them.
///
/// Whoever sets `busy` applies and commits the next batch: the caller of a command when it
/// finds the store idle (nothing waiting, nothing being committed: its command is committed
/// on its own thread, with no hand-off to the store thread and back), the store thread
/// otherwise. Commands that arrive while a batch is committed wait here and go together in
/// the next one (group commit), which the store thread takes.
#[derive(Default)]
pub(super) struct Queue {
    pub(super) cmds: Vec<Cmd>,
    /// A batch is being applied and committed.
    pub(super) busy: bool,
    /// When a step is due without any command (a wait's deadline, a sweep, a retry of a
    /// failed database, grants to release); `None`: only for commands.
    pub(super) due: Option<Instant>,
    /// How many commands the last batch held: a caller commits its own command only when
    /// that was one (no concurrency seen), so that under load commands share commits.
    last_batch: usize,
    /// While the store thread sleeps: until when (`Some(None)`: until woken).
    pub(super) sleeping: Option<Option<Instant>>,
    /// The store has stopped: commands are refused.
    pub(super) closed: bool,
}

/// The store's state shared by its thread and its callers.
pub(super) struct Shared {
    /// A recovered lock (see `crate::sync`): each change under it is whole.
    pub(super) queue: Mutex<Queue>,
    /// Wakes the store thread.
    pub(super) wake: Condvar,
    /// The engine and the database; taken only by whoever set `queue.busy`. A fatal lock:
    /// a panic while stepping closes the store ([`Committing`]).
    pub(super) worker: Mutex<Worker>,
    max_batch: usize,
    /// The store thread's id in the kernel, once it runs (for the tests: its context switches).
    pub(super) thread_tid: AtomicI32,
}

/// Whether `a` comes before `b`, `None` being never.
fn earlier(a: Option<Instant>, b: Option<Instant>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a < b,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// Closes the store if a step panics: otherwise `busy` would stay set and every later
/// command would wait forever.
struct Committing<'a>(&'a Shared);

impl Drop for Committing<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut q = lock(&self.0.queue, "queue");
            q.closed = true;
            q.busy = false;
            q.cmds.clear();
            drop(q);
            self.0.wake.notify_one();
        }
    }
}

impl Shared {
    pub(super) fn new(worker: Worker) -> Shared {
        let max_batch = worker.options.max_batch.max(1);
        let due = worker.due();
        Shared {
            queue: Mutex::new(Queue {
                due,
                ..Queue::default()
            }),
            wake: Condvar::new(),
            worker: Mutex::new(worker),
            max_batch,
            thread_tid: AtomicI32::new(0),
        }
    }

    /// Hands `cmd` to the store. With `inline`, a command that finds the store idle is
    /// applied and committed on this thread before this returns (its answer is then ready);
    /// otherwise it joins the next batch. Refused once the store has stopped.
    pub(super) fn submit(&self, cmd: Cmd, inline: bool) -> Result<(), StoreError> {
        let mut q = lock(&self.queue, "queue");
        if q.closed {
            return Err(StoreError::Closed);
        }
        if inline
            && !q.busy
            && q.cmds.is_empty()
            && q.last_batch <= 1
            && !matches!(cmd, Cmd::Shutdown)
        {
            q.busy = true;
            drop(q);
            self.commit(vec![cmd]);
            return Ok(());
        }
        q.cmds.push(cmd);
        let wake = !q.busy && q.sleeping.is_some();
        drop(q);
        if wake {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Applies and commits `batch` (the caller set `busy`), then lets the next one go: the
    /// store thread is woken if commands wait or a step is due sooner than it sleeps.
    pub(super) fn commit(&self, batch: Vec<Cmd>) {
        let guard = Committing(self);
        let size = batch.len();
        let due = {
            let mut w = self.worker.lock().unwrap_or_else(|poisoned| {
                // Only a panic while stepping poisons it, and that closed the store.
                poisoned.into_inner()
            });
            w.step(batch);
            w.due()
        };
        drop(guard);
        let mut q = lock(&self.queue, "queue");
        q.busy = false;
        q.due = due;
        q.last_batch = size;
        let wake = q
            .sleeping
            .is_some_and(|until| !q.cmds.is_empty() || earlier(due, until));
        drop(q);
        if wake {
            self.wake.notify_one();
        }
    }

    /// The store thread: commits what callers left waiting, and steps when a deadline is due.
    pub(super) fn run(&self) {
        // SAFETY: gettid has no preconditions.
        self.thread_tid
            .store(unsafe { libc::gettid() }, Ordering::Relaxed);
        loop {
            let batch = {
                let mut q = lock(&self.queue, "queue");
                loop {
                    if q.closed {
                        return self.stopped(q);
                    }
                    let now = Instant::now();
                    if !q.busy && (!q.cmds.is_empty() || q.due.is_some_and(|t| t <= now)) {
                        break;
                    }
                    // While a caller commits, the step due is the one it will replace: sleep
                    // until then, and the committer wakes this thread only if commands wait or
                    // the new due is sooner. Sleeping "until woken" instead would make every
                    // commit's end wake it, and under load it would wake to find the next
                    // caller committing, and sleep "until woken" again: a wake per command.
                    // A due already passed is the committer's to replace: until woken, then.
                    let until = match q.due {
                        Some(t) if q.busy && t <= now => None,
                        due => due,
                    };
                    q.sleeping = Some(until);
                    q = match until {
                        None => self.wake.wait(q).unwrap_or_else(PoisonError::into_inner),
                        Some(t) => {
                            let wait = t.saturating_duration_since(now);
                            self.wake
                                .wait_timeout(q, wait.max(Duration::from_millis(1)))
                                .unwrap_or_else(PoisonError::into_inner)
                                .0
                        }
                    };
                    q.sleeping = None;
                }
                q.busy = true;
                let n = q.cmds.len().min(self.max_batch);
                q.cmds.drain(..n).collect::<Vec<_>>()
            };
            let stop = batch.iter().any(|c| matches!(c, Cmd::Shutdown));
            self.commit(batch);
            if stop {
                let mut q = lock(&self.queue, "queue");
                q.closed = true;
                return self.stopped(q);
            }
        }
    }

    /// After the store stopped: commands still waiting are dropped (their callers learn the
    /// store closed), waiters are told, and the database is closed.
    fn stopped(&self, mut q: MutexGuard<'_, Queue>) {
        let left = std::mem::take(&mut q.cmds);
        drop(q);
        drop(left);
        let mut w = self.worker.lock().unwrap_or_else(PoisonError::into_inner);
        w.shutdown();
    }
}

impl Worker {
    /// When a step is due without a command.
    pub(super) fn due(&self) -> Option<Instant> {
        if self.broken.is_some() {
            return Some(Instant::now() + RETRY_STORAGE);
        }
        if !self.orphans.is_empty() {
            return Some(Instant::now());
        }
        let sweep = self.touched.due(self.options.forget_after);
        let deadline = match (self.engine.next_deadline(), sweep) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // At least a millisecond ahead, as the engine counts time: a deadline the engine's
        // tick has not passed yet is looked at again then, not in a loop.
        deadline.map(|t| {
            self.clock
                .instant(t)
                .max(Instant::now() + Duration::from_millis(1))
        })
    }

    pub(super) fn shutdown(&mut self) {
        for (_, p) in self.pending.drain() {
            let _ = p.reply.send(Err(AcquireError::Cancelled(
                "the store is shutting down".into(),
            )));
        }
        self.close_db();
    }

    /// Closes the database. redb writes on close, reading pages that may be damaged, and may
    /// panic there: caught, the file is left as it is (it is reported already).
    pub(super) fn close_db(&mut self) {
        if let Some(db) = self.db.take() {
            let _ = quietly(move || drop(db));
        }
    }

    /// Applies a batch, commits it once, then answers.
    pub(super) fn step(&mut self, batch: Vec<Cmd>) {
        if self.broken.is_some() && !self.recover() {
            let e = StoreError::Storage(
                self.broken
                    .clone()
                    .unwrap_or_else(|| Cause::new("the state database cannot be used")),
            );
            for cmd in batch {
                refuse(cmd, &e, &mut self.orphans);
            }
            return;
        }
        let now = self.clock.now();
        self.engine.tick(now);
        let orphans = self.orphans.clone();
        for (resource, owner, token) in std::mem::take(&mut self.orphans) {
            let _ = self.engine.release(
                ReleaseRequest {
                    resource,
                    process: owner.process,
                    owner_id: owner.id,
                    token: Some(token),
                    kind: ReleaseKind::Clean,
                },
                now,
            );
        }
        let mut answers: Vec<Deferred> = Vec::with_capacity(batch.len());
        for cmd in batch {
            self.apply(cmd, now, &mut answers);
        }
        let forgotten = self
            .touched
            .sweep(&mut self.engine, self.options.forget_after, now);
        let out = self.engine.take_output();
        // redb panics on some damaged pages (a failing disk, the file changed under the agent)
        // instead of returning an error. Caught, that is a damaged database, said with the way
        // to recover, and the store refuses requests until it can reopen the file; uncaught,
        // the panic would end the store's thread, and a restarted agent would only panic again.
        let failed = if out.needs_persist() {
            match quietly(|| self.persist(&out)) {
                Ok(Ok(())) => {
                    self.commits += 1;
                    None
                }
                Ok(Err(e)) => Some(StoreError::Storage(
                    Cause::new(format!(
                        "the state database {} could not be written ({e}); nothing of what \
                         was asked took effect; the agent retries every {} ms (free disk \
                         space, or check the disk)",
                        self.path.display(),
                        RETRY_STORAGE.as_millis()
                    ))
                    .with_source(e),
                )),
                Err(panic) => {
                    let e = damaged_running(&self.path, Cause::new(panic_text(&*panic)));
                    tracing::error!("{e}");
                    Some(e)
                }
            }
        } else {
            None
        };
        if let Some(err) = &failed {
            self.reload(err);
            // Those grants are still to be released, from the state on disk.
            self.orphans.extend(orphans);
        }
        for answer in answers {
            match answer(failed.as_ref()) {
                Some(Cleanup::Release(v)) => self.orphans.extend(v),
                Some(Cleanup::Abandon(id)) => self.abandon(id, now),
                None => {}
            }
        }
        if failed.is_some() {
            return;
        }
        self.touched.note(&self.engine, &out.changed, now);
        if forgotten > 0 {
            tracing::debug!(forgotten, "forgot free, clean resource records");
        }
        self.deliver(out);
    }

    /// Withdraws a waiter whose caller went away. One the engine already decided in this
    /// batch keeps its pending entry, so that `deliver` finds its caller gone and releases
    /// what it was granted: dropping the entry here would leave that grant to nobody.
    pub(super) fn abandon(&mut self, id: WaiterId, now: Now) {
        if self.engine.cancel_wait(id, now) {
            self.pending.remove(&id);
        }
    }

    /// Answers waiters decided in this batch and publishes its events.
    pub(super) fn deliver(&mut self, out: Output) {
        for (id, outcome) in out.waiters {
            let Some(p) = self.pending.remove(&id) else {
                continue;
            };
            if let Err(Ok(grants)) = p.reply.send(outcome) {
                self.orphans.extend(fresh(&grants, &p.owner));
            }
        }
        for e in out.events {
            let _ = self.events.send(e);
        }
    }

    pub(super) fn apply(&mut self, cmd: Cmd, now: Now, answers: &mut Vec<Deferred>) {
        match cmd {
            Cmd::Acquire {
                owner,
                items,
                accept_dirty,
                wait,
                expect_tokens,
                reply,
            } => {
                let holder = owner.clone();
                let req = AcquireRequest {
                    owner,
                    session: self.session,
                    items: items.clone(),
                    accept_dirty,
                    wait,
                    expect_tokens,
                };
                let value = match self.engine.acquire(req, now) {
                    Ok(Acquired::Granted(g)) => Ok(AcquireReply::Done(g)),
                    Ok(Acquired::Queued(id)) => {
                        let (tx, rx) = oneshot::channel();
                        self.pending.insert(
                            id,
                            Pending {
                                reply: tx,
                                owner: holder.clone(),
                                items,
                            },
                        );
                        Ok(AcquireReply::Queued(id, rx))
                    }
                    Err(e) => Err(StoreError::from(e)),
                };
                answers.push(Box::new(move |failed| {
                    let value = match failed {
                        Some(e) => Err(e.clone()),
                        None => value,
                    };
                    match reply.send(value) {
                        Ok(()) => None,
                        Err(Ok(AcquireReply::Done(grants))) => {
                            Some(Cleanup::Release(fresh(&grants, &holder)))
                        }
                        Err(Ok(AcquireReply::Queued(id, _))) => Some(Cleanup::Abandon(id)),
                        Err(Err(_)) => None,
                    }
                }));
            }
            Cmd::CancelWait { id, reply } => {
                let conflict = match self.pending.remove(&id) {
                    Some(p) if self.engine.cancel_wait(id, now) => {
                        let c = self.engine.conflict(&p.owner, &p.items, now);
                        Some(c.unwrap_or_else(|| Conflict::unknown(p.items[0].0.clone())))
                    }
                    // Already decided: put it back so its outcome is delivered.
                    Some(p) => {
                        self.pending.insert(id, p);
                        None
                    }
                    None => None,
                };
                defer(answers, reply, Ok(conflict));
            }
            Cmd::Abandon(id) => self.abandon(id, now),
            Cmd::ReleaseOrphans(v) => self.orphans.extend(v),
            Cmd::Release {
                resource,
                process,
                owner_id,
                token,
                kind,
                reply,
            } => {
                let r = self.engine.release(
                    ReleaseRequest {
                        resource,
                        process,
                        owner_id,
                        token,
                        kind,
                    },
                    now,
                );
                defer(answers, reply, r.map_err(StoreError::from));
            }
            Cmd::EndProcess {
                process,
                how,
                reply,
            } => {
                let r = self.engine.end_process_as(&process, how, now);
                defer(answers, reply, Ok(r));
            }
            Cmd::EndLeases { leases, how, reply } => {
                let r = self.engine.end_leases(&leases, how, now);
                defer(answers, reply, Ok(r));
            }
            Cmd::ForceRelease {
                resource,
                reason,
                by,
                reply,
            } => {
                let r = self.engine.force_release(&resource, &reason, &by, now);
                defer(answers, reply, r.map_err(StoreError::from));
            }
            Cmd::MarkClean {
                resource,
                by,
                reply,
            } => {
                let r = self.engine.mark_clean(&resource, &by, now);
                defer(answers, reply, r.map_err(StoreError::from));
            }
            Cmd::Validate {
                resource,
                token,
                reply,
            } => {
                let v = self.engine.validate(&resource, token);
                defer(answers, reply, Ok(v));
            }
            Cmd::Conflict {
                owner,
                items,
                reply,
            } => {
                let c = self.engine.conflict(&owner, &items, now);
                defer(answers, reply, Ok(c));
            }
            Cmd::Inspect { resource, reply } => {
                let v = self.engine.view(&resource, now);
                defer(answers, reply, Ok(v));
            }
            Cmd::HoldsAny { process, reply } => {
                let held = self.engine.held_by(&process).next().is_some();
                defer(answers, reply, Ok(held));
            }
            Cmd::List { reply } => {
                let v = self
                    .engine
                    .resources()
                    .filter_map(|(name, _)| self.engine.view(name, now))
                    .collect();
                defer(answers, reply, Ok(v));
            }
            Cmd::Counts { reply } => {
                // Counted from the records, without a view per resource.
                let mut c = crate::Counts::default();
                let mut processes = std::collections::BTreeSet::new();
                for (_, st) in self.engine.resources() {
                    c.resources += 1;
                    c.leases += st.holders().len() as u64;
                    c.dirty += u64::from(st.dirty().is_some());
                    processes.extend(st.holders().iter().map(|l| &l.owner.process));
                }
                c.processes = processes.len() as u64;
                defer(answers, reply, Ok(c));
            }
            Cmd::Shutdown => {}
        }
    }

    /// Writes the records changed in `out` and commits: one fsync. The error is redb's (or
    /// the encoder's), kept typed under the cause.
    pub(super) fn persist(&self, out: &Output) -> Result<(), Cause> {
        let db = self.db.as_ref().ok_or_else(not_open)?;
        let txn = db.begin_write().map_err(Cause::of)?;
        {
            let mut table = txn.open_table(RESOURCES).map_err(Cause::of)?;
            for name in &out.changed {
                match self.engine.resource(name) {
                    Some(st) => {
                        let bytes = serde_json::to_vec(st).map_err(Cause::of)?;
                        table
                            .insert(name.as_str(), bytes.as_slice())
                            .map_err(Cause::of)?;
                    }
                    None => {
                        table.remove(name.as_str()).map_err(Cause::of)?;
                    }
                }
            }
            // Grants touch only their resources' records: the token counter is rebuilt from
            // their `last_token` on load, so the metadata is written only when sessions change.
            if out.meta_changed || self.fresh {
                let mut meta = txn.open_table(META).map_err(Cause::of)?;
                meta.insert(FORMAT_KEY, FORMAT).map_err(Cause::of)?;
                let bytes = serde_json::to_vec(&self.engine.meta()).map_err(Cause::of)?;
                meta.insert(ENGINE_KEY, bytes.as_slice())
                    .map_err(Cause::of)?;
            }
        }
        txn.commit().map_err(Cause::of)
    }

    /// After a failed commit: forget the batch by rebuilding the engine from disk. The
    /// database is opened again first: after an I/O error (a full disk) redb refuses every
    /// later write until then, even once space is back.
    pub(super) fn reload(&mut self, err: &StoreError) {
        for (_, p) in self.pending.drain() {
            let _ = p.reply.send(Err(AcquireError::Cancelled(format!(
                "the store failed: {err}"
            ))));
        }
        self.orphans.clear();
        self.close_db();
        self.broken = Some(match err {
            StoreError::Storage(m) => m.clone(),
            other => Cause::of(other.clone()),
        });
        let _ = self.engine.take_output();
    }

    /// After a failed write: opens the database again, rebuilds the engine from it, and
    /// proves that a write commits now. False while any of that fails: the store stays
    /// unhealthy, refusing every command (its `list` fails, so `status` says so).
    pub(super) fn recover(&mut self) -> bool {
        if self.db.is_none() && !self.reopen() {
            return false;
        }
        let probe = || -> Result<(), Cause> {
            let db = self.db.as_ref().ok_or_else(not_open)?;
            let txn = db.begin_write().map_err(Cause::of)?;
            {
                let mut meta = txn.open_table(META).map_err(Cause::of)?;
                meta.insert(FORMAT_KEY, FORMAT).map_err(Cause::of)?;
            }
            txn.commit().map_err(Cause::of)
        };
        match quietly(probe) {
            Ok(Ok(())) => {
                if let Some(was) = self.broken.take() {
                    tracing::warn!(
                        "the state database can be written again; leases are as on disk (it failed: {was})"
                    );
                }
                true
            }
            Ok(Err(_)) | Err(_) => {
                self.close_db();
                false
            }
        }
    }

    /// Opens the database again and rebuilds the engine from it; false while it cannot.
    pub(super) fn reopen(&mut self) -> bool {
        self.close_db();
        let opened = quietly(|| {
            let db = Database::builder()
                .set_cache_size(self.options.cache_bytes)
                .create(&self.path)
                .map_err(Cause::of)?;
            let (engine, _) = load(&db, self.options.engine).map_err(Cause::of)?;
            Ok::<_, Cause>((db, engine))
        });
        match opened {
            Ok(Ok((db, engine))) => {
                self.db = Some(db);
                self.engine = engine;
                self.touched = Touched::new(&self.engine, self.clock.now());
                true
            }
            Ok(Err(_)) | Err(_) => false,
        }
    }
}

/// The database was closed after a failure and not opened again.
fn not_open() -> Cause {
    Cause::new("the database is not open")
}

/// Answers a command with `e` while the database cannot be used: nothing is applied.
/// Grants to release are kept for when it can.
pub(super) fn refuse(cmd: Cmd, e: &StoreError, orphans: &mut Vec<(ResourceName, Owner, Token)>) {
    let e = e.clone();
    match cmd {
        Cmd::Acquire { reply, .. } => drop(reply.send(Err(e))),
        Cmd::CancelWait { reply, .. } => drop(reply.send(Err(e))),
        Cmd::Release { reply, .. } => drop(reply.send(Err(e))),
        Cmd::EndProcess { reply, .. }
        | Cmd::EndLeases { reply, .. }
        | Cmd::ForceRelease { reply, .. } => {
            drop(reply.send(Err(e)));
        }
        Cmd::MarkClean { reply, .. } => drop(reply.send(Err(e))),
        Cmd::Validate { reply, .. } => drop(reply.send(Err(e))),
        Cmd::Inspect { reply, .. } => drop(reply.send(Err(e))),
        Cmd::Conflict { reply, .. } => drop(reply.send(Err(e))),
        Cmd::List { reply } => drop(reply.send(Err(e))),
        Cmd::HoldsAny { reply, .. } => drop(reply.send(Err(e))),
        Cmd::Counts { reply } => drop(reply.send(Err(e))),
        Cmd::ReleaseOrphans(v) => orphans.extend(v),
        Cmd::Abandon(_) | Cmd::Shutdown => {}
    }
}
