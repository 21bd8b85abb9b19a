//! The embedded single-host store: the engine on one thread, its records in a redb file.
//!
//! The [`Engine`] and the database are stepped by one thread at a time. A command that finds
//! the store idle (no batch being committed, none waiting) is applied and committed on its
//! caller's thread, which then has its answer without waking any other thread. Commands that
//! arrive while a batch is committed wait; the store thread takes every one waiting (up to a
//! batch limit), applies them to the engine in order, writes every changed record in **one**
//! write transaction, commits it (one fsync), and only then answers every caller of the batch.
//! So concurrent grants share an fsync (group commit), nobody is told of a grant before it is
//! durable, and reads answered in a batch never show a change that a crash could still undo.
//! The store thread also steps when a wait's deadline or a sweep is due.
//!
//! If a commit fails, the engine is rebuilt from the database (dropping the batch) and every
//! caller of the batch gets [`StoreError::Storage`]: nothing they asked for took effect.

mod db;
mod forget;
mod worker;

use std::collections::HashMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use leasehold_core::{
    AcquireError, Conflict, EndReason, Ended, EngineConfig, Event, Grant, HostId, Mode, Owner,
    OwnerId, ProcessKey, ReleaseKind, Released, ResourceName, Token, WaiterId,
};
use tokio::sync::{broadcast, oneshot};

use crate::{AcquireSpec, Cause, Clock, Store, StoreError};
use db::{DB_FILE, adopt_session, damaged, open_db, panic_text, private_file, quietly, storage_at};
use leasehold_core::ResourceView;
use worker::{Shared, Worker};

/// Settings of a [`LocalStore`].
#[derive(Debug, Clone)]
pub struct LocalStoreOptions {
    /// The engine settings. Grace matters only where sessions expire, which they do not on
    /// the local store; kept for symmetry.
    pub engine: EngineConfig,
    /// The most commands applied in one commit.
    pub max_batch: usize,
    /// Capacity of the event channel; slow subscribers miss events beyond it.
    pub event_capacity: usize,
    /// redb's page cache, in bytes.
    pub cache_bytes: usize,
    /// Records of resources that are free, clean, unreserved, without waiters or grace, and
    /// unchanged this long are forgotten (`None`: kept forever). Tokens still grow: the
    /// store's token counter is kept durable above every forgotten record's last token.
    pub forget_after: Option<std::time::Duration>,
}

impl Default for LocalStoreOptions {
    fn default() -> Self {
        LocalStoreOptions {
            engine: EngineConfig::default(),
            max_batch: 4096,
            event_capacity: 4096,
            cache_bytes: 16 << 20,
            forget_after: Some(std::time::Duration::from_secs(3600)),
        }
    }
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum AcquireReply {
    Done(Vec<Grant>),
    Queued(
        WaiterId,
        oneshot::Receiver<Result<Vec<Grant>, AcquireError>>,
    ),
}

enum Cmd {
    Acquire {
        owner: Owner,
        items: Vec<(ResourceName, Mode)>,
        accept_dirty: bool,
        wait: bool,
        expect_tokens: Vec<(ResourceName, Token)>,
        reply: Reply<AcquireReply>,
    },
    /// Withdraws a wait that timed out; answers the conflict, or `None` when the outcome was
    /// already decided (and is on its way).
    CancelWait {
        id: WaiterId,
        reply: Reply<Option<Conflict>>,
    },
    /// The waiting caller went away: withdraw, answering nobody.
    Abandon(WaiterId),
    /// Release grants that a caller received but could not use.
    ReleaseOrphans(Vec<(ResourceName, Owner, Token)>),
    Release {
        resource: ResourceName,
        process: ProcessKey,
        owner_id: Option<OwnerId>,
        token: Option<Token>,
        kind: ReleaseKind,
        reply: Reply<Released>,
    },
    EndProcess {
        process: ProcessKey,
        /// How its leases end: as died, or as exited with status 0.
        how: EndReason,
        reply: Reply<Vec<Released>>,
    },
    EndLeases {
        leases: Vec<(ResourceName, Token)>,
        how: EndReason,
        reply: Reply<Vec<Released>>,
    },
    ForceRelease {
        resource: ResourceName,
        reason: String,
        by: String,
        reply: Reply<Vec<Released>>,
    },
    MarkClean {
        resource: ResourceName,
        by: String,
        reply: Reply<Option<Ended>>,
    },
    Validate {
        resource: ResourceName,
        token: Token,
        reply: Reply<bool>,
    },
    Inspect {
        resource: ResourceName,
        reply: Reply<Option<ResourceView>>,
    },
    Conflict {
        owner: Owner,
        items: Vec<(ResourceName, Mode)>,
        reply: Reply<Option<Conflict>>,
    },
    List {
        reply: Reply<Vec<ResourceView>>,
    },
    HoldsAny {
        process: ProcessKey,
        reply: Reply<bool>,
    },
    Counts {
        reply: Reply<crate::Counts>,
    },
    Shutdown,
}

/// The embedded single-host store. See the module documentation for how it commits.
pub struct LocalStore {
    host: HostId,
    /// When this store was opened (the agent's start), for `hosts`.
    opened_at: leasehold_core::WallTime,
    dir: PathBuf,
    shared: Arc<Shared>,
    events: broadcast::Sender<Event>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for LocalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalStore")
            .field("host", &self.host)
            .field("dir", &self.dir)
            .finish()
    }
}

impl LocalStore {
    /// Opens (creating if needed) the store in directory `dir` for `host`.
    ///
    /// # Errors
    /// [`StoreError::Storage`] when the directory or database cannot be opened (another
    /// process has it open, or it is not writable); [`StoreError::BadState`] when it holds
    /// a format this code does not know, or live leases of another host id.
    pub fn open(dir: impl AsRef<Path>, host: HostId) -> Result<LocalStore, StoreError> {
        LocalStore::open_with(dir, host, LocalStoreOptions::default())
    }

    /// Opens the store with explicit options.
    ///
    /// # Errors
    /// As [`LocalStore::open`].
    pub fn open_with(
        dir: impl AsRef<Path>,
        host: HostId,
        options: LocalStoreOptions,
    ) -> Result<LocalStore, StoreError> {
        let dir = dir.as_ref().to_path_buf();
        // A new state directory is for the agent's user only (SPEC G8); an existing one is
        // left as its owner made it.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| storage_at(format!("creating {}", dir.display()), e))?;
        let path = dir.join(DB_FILE);
        private_file(&path)?;
        // redb panics on some damaged pages instead of returning an error: whatever it does,
        // a damaged file is a clear, final error naming the file, never a crash (a crash under
        // a service manager's restart would only loop).
        let opened = quietly(|| open_db(&path, &dir, &options));
        let (db, mut engine, fresh) = match opened {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => return Err(e),
            Err(panic) => return Err(damaged(&path, Cause::new(panic_text(&*panic)))),
        };
        let clock = Clock::new();
        let now = clock.now();
        let session = adopt_session(&mut engine, &host, now)?;
        let (events, _) = broadcast::channel(options.event_capacity.max(1));
        let touched = forget::Touched::new(&engine, now);
        let mut worker = Worker {
            engine,
            db: Some(db),
            path: path.clone(),
            broken: None,
            clock,
            session,
            options,
            events: events.clone(),
            pending: HashMap::new(),
            orphans: Vec::new(),
            fresh,
            touched,
            commits: 0,
        };
        let out = worker.engine.take_output();
        if out.needs_persist() || worker.fresh {
            worker.persist(&out).map_err(StoreError::Storage)?;
            worker.fresh = false;
        }
        let shared = Arc::new(Shared::new(worker));
        let thread = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("leasehold-store".into())
            .spawn(move || thread.run())
            .map_err(|e| storage_at("starting the store thread", e))?;
        Ok(LocalStore {
            host,
            opened_at: now.wall,
            dir,
            shared,
            events,
            worker: Mutex::new(Some(handle)),
        })
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stops the worker after it finishes the commands already sent, and closes the
    /// database. Dropping the store does the same.
    pub fn close(&self) {
        let _ = self.shared.submit(Cmd::Shutdown, false);
        // A recovered lock (see `crate::sync`): the handle is taken whole; skipping a poisoned
        // one would leave the database open behind a close that returned.
        let handle = crate::sync::lock(&self.worker, "worker").take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    /// Sends a command and waits for its answer. A command that finds the store idle is
    /// committed here, on the caller's thread (one commit: its fsync, on a busy disk a few
    /// milliseconds); under concurrency it joins the store thread's next batch.
    async fn call<T>(&self, cmd: impl FnOnce(Reply<T>) -> Cmd) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.shared.submit(cmd(tx), true)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

impl Drop for LocalStore {
    fn drop(&mut self) {
        self.close();
    }
}

/// Withdraws a waiting request if the caller goes away before learning its outcome.
struct WaitGuard {
    id: WaiterId,
    owner: Owner,
    rx: Option<oneshot::Receiver<Result<Vec<Grant>, AcquireError>>>,
    shared: Arc<Shared>,
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        // After close() no outcome can arrive; one that arrived before is still readable.
        rx.close();
        match rx.try_recv() {
            Ok(Ok(grants)) => {
                let orphans = fresh(&grants, &self.owner);
                let _ = self.shared.submit(Cmd::ReleaseOrphans(orphans), false);
            }
            Ok(Err(_)) => {}
            Err(_) => {
                let _ = self.shared.submit(Cmd::Abandon(self.id), false);
            }
        }
    }
}

/// The leases a grant made new, each with its owner and token: what is released, by token,
/// when nobody learnt of the grant (the owner may be granted the resource again before the
/// release is carried out, and that later lease must stay).
fn fresh(grants: &[Grant], owner: &Owner) -> Vec<(ResourceName, Owner, Token)> {
    grants
        .iter()
        .filter(|g| !g.existing)
        .map(|g| (g.resource.clone(), owner.clone(), g.token))
        .collect()
}

impl Store for LocalStore {
    fn host(&self) -> &HostId {
        &self.host
    }

    async fn acquire(&self, spec: AcquireSpec) -> Result<Vec<Grant>, StoreError> {
        crate::check_host(&self.host, &spec)?;
        let owner = spec.owner.clone();
        let reply = self
            .call(|reply| Cmd::Acquire {
                owner: spec.owner,
                items: spec.items,
                accept_dirty: spec.accept_dirty,
                wait: spec.wait.is_some(),
                expect_tokens: spec.expect_tokens,
                reply,
            })
            .await?;
        let (id, rx) = match reply {
            AcquireReply::Done(grants) => return Ok(grants),
            AcquireReply::Queued(id, rx) => (id, rx),
        };
        let mut guard = WaitGuard {
            id,
            owner,
            rx: Some(rx),
            shared: Arc::clone(&self.shared),
        };
        let wait = spec.wait.unwrap_or_default();
        let outcome = match &mut guard.rx {
            Some(rx) => tokio::time::timeout(wait, rx).await,
            None => return Err(StoreError::Closed),
        };
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(_elapsed) => {
                match self.call(|reply| Cmd::CancelWait { id, reply }).await? {
                    Some(conflict) => {
                        guard.rx = None;
                        return Err(StoreError::TimedOut(conflict));
                    }
                    // Decided just before the cancel: the outcome is on its way.
                    None => match &mut guard.rx {
                        Some(rx) => rx.await,
                        None => return Err(StoreError::Closed),
                    },
                }
            }
        };
        guard.rx = None;
        match outcome {
            Ok(result) => result.map_err(StoreError::from),
            Err(_) => Err(StoreError::Closed),
        }
    }

    async fn release(
        &self,
        resource: ResourceName,
        process: ProcessKey,
        owner_id: Option<OwnerId>,
        token: Option<Token>,
        kind: ReleaseKind,
    ) -> Result<Released, StoreError> {
        self.call(|reply| Cmd::Release {
            resource,
            process,
            owner_id,
            token,
            kind,
            reply,
        })
        .await
    }

    async fn end_process(&self, process: ProcessKey) -> Result<Vec<Released>, StoreError> {
        self.call(|reply| Cmd::EndProcess {
            process,
            how: EndReason::ProcessDied,
            reply,
        })
        .await
    }

    async fn end_exited_zero(&self, process: ProcessKey) -> Result<Vec<Released>, StoreError> {
        self.call(|reply| Cmd::EndProcess {
            process,
            how: EndReason::ExitedClean,
            reply,
        })
        .await
    }

    async fn end_leases(
        &self,
        leases: Vec<(ResourceName, Token)>,
        how: EndReason,
    ) -> Result<Vec<Released>, StoreError> {
        self.call(|reply| Cmd::EndLeases { leases, how, reply })
            .await
    }

    async fn force_release(
        &self,
        resource: ResourceName,
        reason: String,
        by: String,
    ) -> Result<Vec<Released>, StoreError> {
        self.call(|reply| Cmd::ForceRelease {
            resource,
            reason,
            by,
            reply,
        })
        .await
    }

    async fn mark_clean(
        &self,
        resource: ResourceName,
        by: String,
    ) -> Result<Option<Ended>, StoreError> {
        self.call(|reply| Cmd::MarkClean {
            resource,
            by,
            reply,
        })
        .await
    }

    async fn validate(&self, resource: ResourceName, token: Token) -> Result<bool, StoreError> {
        self.call(|reply| Cmd::Validate {
            resource,
            token,
            reply,
        })
        .await
    }

    async fn conflict(
        &self,
        owner: Owner,
        items: Vec<(ResourceName, Mode)>,
    ) -> Result<Option<Conflict>, StoreError> {
        self.call(|reply| Cmd::Conflict {
            owner,
            items,
            reply,
        })
        .await
    }

    async fn inspect(&self, resource: ResourceName) -> Result<Option<ResourceView>, StoreError> {
        self.call(|reply| Cmd::Inspect { resource, reply }).await
    }

    async fn list(&self) -> Result<Vec<ResourceView>, StoreError> {
        self.call(|reply| Cmd::List { reply }).await
    }

    async fn holds_any(&self, process: &ProcessKey) -> Option<bool> {
        let process = process.clone();
        self.call(|reply| Cmd::HoldsAny { process, reply })
            .await
            .ok()
    }

    async fn counts(&self) -> Result<crate::Counts, StoreError> {
        self.call(|reply| Cmd::Counts { reply }).await
    }

    async fn hosts(&self) -> Result<Vec<crate::HostView>, StoreError> {
        let leases = usize::try_from(self.counts().await?.leases).unwrap_or(usize::MAX);
        Ok(vec![crate::HostView {
            host: self.host.clone(),
            session: None,
            alive: true,
            since: Some(self.opened_at),
            leases,
            agent_pid: Some(std::process::id()),
            renewed_ago: None,
            expires_in: None,
        }])
    }

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use leasehold_core::{Mode, Owner, ReleaseKind};
    use redb::{Database, ReadableTable};

    use super::db::RESOURCES;
    use super::*;

    /// The context switches of thread `tid` of this process so far.
    fn switches(tid: i32) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
        status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .map(|l| l.split_whitespace().last().unwrap().parse::<u64>().unwrap())
            .sum()
    }

    fn store_thread(s: &LocalStore) -> i32 {
        let started = std::time::Instant::now();
        loop {
            let tid = s
                .shared
                .thread_tid
                .load(std::sync::atomic::Ordering::Relaxed);
            if tid != 0 {
                return tid;
            }
            assert!(started.elapsed() < std::time::Duration::from_secs(30));
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    fn commits(s: &LocalStore) -> u64 {
        crate::sync::lock(&s.shared.worker, "worker").commits
    }

    /// A command that finds the store idle is applied and committed on its caller's thread:
    /// the store thread is not woken for it (it used to be, twice a command with the answer's
    /// hand-back), and each command is still its own durable commit before its answer.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_stores_command_is_committed_without_waking_the_store_thread() {
        let dir = tempfile::tempdir().unwrap();
        let host = HostId::new("h").unwrap();
        let s = LocalStore::open(dir.path(), host.clone()).unwrap();
        let tid = store_thread(&s);
        let disk = ResourceName::new("disk").unwrap();
        let owner = Owner::new(host.clone(), std::process::id(), 1);
        let (switches_before, commits_before) = (switches(tid), commits(&s));
        for _ in 0..50 {
            s.acquire(AcquireSpec::new(
                owner.clone(),
                [(disk.clone(), Mode::Exclusive)],
            ))
            .await
            .unwrap();
            s.release(
                disk.clone(),
                owner.process.clone(),
                None,
                None,
                ReleaseKind::Clean,
            )
            .await
            .unwrap();
        }
        let woken = switches(tid) - switches_before;
        assert!(
            woken < 10,
            "the store thread switched {woken} times for 100 commands"
        );
        assert_eq!(commits(&s) - commits_before, 100, "one commit per command");
        // Durable before the answer: the record on disk says the last release.
        drop(s);
        let s = LocalStore::open(dir.path(), host).unwrap();
        let v = s.inspect(disk).await.unwrap().unwrap();
        assert!(v.holders.is_empty(), "{v:?}");
    }

    /// The store thread, woken while a caller commits, sleeps until the step that is due, not
    /// "until woken": the commit's end does not wake it again. (It did: under load the thread
    /// woke after each commit to find the next caller committing, and slept "until woken"
    /// again, a wake per command.)
    #[test]
    fn a_store_thread_woken_during_a_commit_sleeps_until_its_due_step() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path(), HostId::new("h").unwrap()).unwrap();
        store_thread(&s);
        let queue = || crate::sync::lock(&s.shared.queue, "queue");
        let started = std::time::Instant::now();
        // Asleep after its first sweep (the next is a minute ahead).
        let asleep = || {
            let q = queue();
            let ahead = std::time::Instant::now() + std::time::Duration::from_secs(10);
            q.sleeping.is_some() && !q.busy && q.cmds.is_empty() && q.due > Some(ahead)
        };
        while !asleep() {
            assert!(started.elapsed() < std::time::Duration::from_secs(30));
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // This test is the committer now; the thread is woken meanwhile. Its sleep is marked
        // over here, so that it is marked again only once the thread has seen the store busy.
        {
            let mut q = queue();
            q.busy = true;
            q.sleeping = None;
        }
        s.shared.wake.notify_one();
        let slept = loop {
            let q = queue();
            if let Some(until) = q.sleeping {
                break Some((until, q.due));
            }
            drop(q);
            if started.elapsed() > std::time::Duration::from_secs(30) {
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        // The commit this test began ends before any assertion, so that the store can close.
        s.shared.commit(Vec::new());
        let due_after = queue().due;
        let (until, due) = slept.expect("the woken store thread sleeps again within 30 s");
        let due = due.expect("the store sweeps old records: a step is due");
        assert!(due > std::time::Instant::now(), "the sweep is ahead");
        assert_eq!(until, Some(due), "the thread sleeps until the due step");
        // So the commit's end leaves it asleep: its due step is no sooner than its sleep.
        assert_eq!(due_after, Some(due), "an empty commit keeps the due step");
    }

    /// Commands that arrive while a batch is committed share the next commit (group commit):
    /// eight threads acquiring and releasing at once need far fewer commits than commands.
    #[test]
    fn concurrent_commands_share_commits() {
        let dir = tempfile::tempdir().unwrap();
        let host = HostId::new("h").unwrap();
        let s = std::sync::Arc::new(LocalStore::open(dir.path(), host.clone()).unwrap());
        let before = commits(&s);
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let s = std::sync::Arc::clone(&s);
                let host = host.clone();
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    let r = ResourceName::new(format!("r{i}")).unwrap();
                    let owner = Owner::new(host, 100 + i, 1);
                    rt.block_on(async {
                        for _ in 0..100 {
                            s.acquire(AcquireSpec::new(
                                owner.clone(),
                                [(r.clone(), Mode::Exclusive)],
                            ))
                            .await
                            .unwrap();
                            s.release(
                                r.clone(),
                                owner.process.clone(),
                                None,
                                None,
                                ReleaseKind::Clean,
                            )
                            .await
                            .unwrap();
                        }
                    });
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let n = commits(&s) - before;
        assert!(
            n < 1_200,
            "{n} commits for 1,600 commands from 8 threads at once"
        );
    }

    /// Issue 8 item 3: a stored record with an exclusive and a shared holder together breaks
    /// G1; the store refuses to open on it instead of acting on it.
    #[tokio::test]
    async fn a_record_breaking_exclusion_is_refused_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let host = HostId::new("h").unwrap();
        let disk = ResourceName::new("disk").unwrap();
        {
            let s = LocalStore::open(dir.path(), host.clone()).unwrap();
            for (pid, mode) in [(10, Mode::Exclusive), (11, Mode::Shared)] {
                let other = ResourceName::new(format!("r{pid}")).unwrap();
                s.acquire(AcquireSpec::new(
                    Owner::new(host.clone(), pid, 1),
                    [(other, mode)],
                ))
                .await
                .unwrap();
            }
        }
        // Write one record holding both leases, as an outside edit would.
        let db = Database::create(dir.path().join(DB_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn.open_table(RESOURCES).unwrap();
            let mut merged: serde_json::Value =
                serde_json::from_slice(table.get("r10").unwrap().unwrap().value()).unwrap();
            let shared: serde_json::Value =
                serde_json::from_slice(table.get("r11").unwrap().unwrap().value()).unwrap();
            let more = shared["holders"].as_array().unwrap().clone();
            merged["holders"].as_array_mut().unwrap().extend(more);
            let last = merged["last_token"]
                .as_u64()
                .max(shared["last_token"].as_u64());
            merged["last_token"] = last.unwrap().into();
            let bytes = serde_json::to_vec(&merged).unwrap();
            table.insert(disk.as_str(), bytes.as_slice()).unwrap();
        }
        txn.commit().unwrap();
        drop(db);
        let e = LocalStore::open(dir.path(), host.clone()).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, StoreError::BadState(_)), "{e:?}");
        assert!(
            msg.contains("record of disk breaks the lease rules"),
            "{msg}"
        );
    }

    /// Issue 9 item 4: a record that does not decode refuses the open with the decoder's
    /// error kept typed under the message, not flattened into it.
    #[tokio::test]
    async fn an_undecodable_record_is_refused_with_its_error_under_it() {
        let dir = tempfile::tempdir().unwrap();
        let host = HostId::new("h").unwrap();
        drop(LocalStore::open(dir.path(), host.clone()).unwrap());
        let db = Database::create(dir.path().join(DB_FILE)).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn.open_table(RESOURCES).unwrap();
            table.insert("disk", b"{not json".as_slice()).unwrap();
        }
        txn.commit().unwrap();
        drop(db);
        let e = LocalStore::open(dir.path(), host).unwrap_err();
        assert!(matches!(e, StoreError::BadState(_)), "{e:?}");
        assert!(e.to_string().contains("record of disk"), "{e}");
        let mut under = std::error::Error::source(&e);
        let mut found = false;
        while let Some(x) = under {
            found |= x.is::<serde_json::Error>();
            under = x.source();
        }
        assert!(found, "the JSON error is kept under {e:?}");
    }
}
