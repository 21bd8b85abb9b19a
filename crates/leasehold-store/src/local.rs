//! The embedded single-host store: the engine on one thread, its records in a redb file.
//!
//! One worker thread owns the [`Engine`] and the database. Callers send it commands; it
//! takes every command that is waiting (up to a batch limit), applies them to the engine in
//! order, writes every changed record in **one** write transaction, commits it (one fsync),
//! and only then answers every caller of the batch. So concurrent grants share an fsync
//! (group commit), nobody is told of a grant before it is durable, and reads answered in a
//! batch never show a change that a crash could still undo.
//!
//! If a commit fails, the engine is rebuilt from the database (dropping the batch) and every
//! caller of the batch gets [`StoreError::Storage`]: nothing they asked for took effect.

use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use leasehold_core::{
    AcquireError, AcquireRequest, Acquired, Conflict, Ended, Engine, EngineConfig, Event, Grant,
    HostId, Meta, Mode, Now, Output, Owner, ProcessKey, ReleaseKind, ReleaseRequest, Released,
    ResourceName, ResourceState, SessionId, Token, WaiterId,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{broadcast, oneshot};

use crate::{AcquireSpec, Clock, Store, StoreError};
use leasehold_core::{ResourceView, WaiterView};

/// Resource records: name to the JSON of its durable [`ResourceState`].
const RESOURCES: TableDefinition<&str, &[u8]> = TableDefinition::new("resources");
/// Engine metadata: `"engine"` to the JSON of [`Meta`], `"format"` to the format version.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const FORMAT_KEY: &str = "format";
const ENGINE_KEY: &str = "engine";
/// The store's identity, also kept in [`ID_FILE`]: a database that lacks it, or holds
/// another, while the file exists is not the state this directory held.
const STORE_ID_KEY: &str = "store-id";
/// The file in the state directory that remembers which database belongs there.
const ID_FILE: &str = "leasehold.id";
/// The on-disk format this code writes and reads.
const FORMAT: &[u8] = b"leasehold-local-1";
/// The file in the state directory.
const DB_FILE: &str = "leasehold.redb";

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
}

impl Default for LocalStoreOptions {
    fn default() -> Self {
        LocalStoreOptions {
            engine: EngineConfig::default(),
            max_batch: 4096,
            event_capacity: 4096,
            cache_bytes: 16 << 20,
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
    ReleaseOrphans(Vec<(ResourceName, ProcessKey)>),
    Release {
        resource: ResourceName,
        process: ProcessKey,
        kind: ReleaseKind,
        reply: Reply<Released>,
    },
    EndProcess {
        process: ProcessKey,
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
        process: ProcessKey,
        items: Vec<(ResourceName, Mode)>,
        reply: Reply<Option<(Conflict, Option<Duration>)>>,
    },
    List {
        reply: Reply<Vec<ResourceView>>,
    },
    Shutdown,
}

/// The embedded single-host store. See the module documentation for how it commits.
pub struct LocalStore {
    host: HostId,
    dir: PathBuf,
    tx: mpsc::Sender<Cmd>,
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
            .map_err(|e| storage(format!("creating {}: {e}", dir.display())))?;
        let path = dir.join(DB_FILE);
        private_file(&path)?;
        // redb panics on some damaged pages instead of returning an error: whatever it does,
        // a damaged file is a clear, final error naming the file, never a crash (a crash under
        // a service manager's restart would only loop).
        let opened = quietly(|| open_db(&path, &dir, &options));
        let (db, mut engine, fresh) = match opened {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => return Err(e),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "an internal error".into());
                return Err(damaged(&path, &what));
            }
        };
        let clock = Clock::new();
        let now = clock.now();
        let session = adopt_session(&mut engine, &host, now)?;
        let (events, _) = broadcast::channel(options.event_capacity.max(1));
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
        };
        let out = worker.engine.take_output();
        if out.needs_persist() || worker.fresh {
            worker.persist(&out).map_err(storage)?;
            worker.fresh = false;
        }
        let (tx, rx) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("leasehold-store".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| storage(format!("starting the store thread: {e}")))?;
        Ok(LocalStore {
            host,
            dir,
            tx,
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
        let _ = self.tx.send(Cmd::Shutdown);
        let handle = self.worker.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    fn send(&self, cmd: Cmd) -> Result<(), StoreError> {
        self.tx.send(cmd).map_err(|_| StoreError::Closed)
    }

    async fn call<T>(&self, cmd: impl FnOnce(Reply<T>) -> Cmd) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(cmd(tx))?;
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
    process: ProcessKey,
    rx: Option<oneshot::Receiver<Result<Vec<Grant>, AcquireError>>>,
    tx: mpsc::Sender<Cmd>,
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
                let orphans = fresh(&grants, &self.process);
                let _ = self.tx.send(Cmd::ReleaseOrphans(orphans));
            }
            Ok(Err(_)) => {}
            Err(_) => {
                let _ = self.tx.send(Cmd::Abandon(self.id));
            }
        }
    }
}

fn fresh(grants: &[Grant], process: &ProcessKey) -> Vec<(ResourceName, ProcessKey)> {
    grants
        .iter()
        .filter(|g| !g.existing)
        .map(|g| (g.resource.clone(), process.clone()))
        .collect()
}

impl Store for LocalStore {
    fn host(&self) -> &HostId {
        &self.host
    }

    async fn acquire(&self, spec: AcquireSpec) -> Result<Vec<Grant>, StoreError> {
        crate::check_host(&self.host, &spec)?;
        let process = spec.owner.process.clone();
        let reply = self
            .call(|reply| Cmd::Acquire {
                owner: spec.owner,
                items: spec.items,
                accept_dirty: spec.accept_dirty,
                wait: spec.wait.is_some(),
                reply,
            })
            .await?;
        let (id, rx) = match reply {
            AcquireReply::Done(grants) => return Ok(grants),
            AcquireReply::Queued(id, rx) => (id, rx),
        };
        let mut guard = WaitGuard {
            id,
            process,
            rx: Some(rx),
            tx: self.tx.clone(),
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
        kind: ReleaseKind,
    ) -> Result<Released, StoreError> {
        self.call(|reply| Cmd::Release {
            resource,
            process,
            kind,
            reply,
        })
        .await
    }

    async fn end_process(&self, process: ProcessKey) -> Result<Vec<Released>, StoreError> {
        self.call(|reply| Cmd::EndProcess { process, reply }).await
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
        process: ProcessKey,
        items: Vec<(ResourceName, Mode)>,
    ) -> Result<Option<(Conflict, Option<Duration>)>, StoreError> {
        self.call(|reply| Cmd::Conflict {
            process,
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

    fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }
}

fn storage(e: impl std::fmt::Display) -> StoreError {
    StoreError::Storage(e.to_string())
}

/// Creates `path` (or finds it) as a regular file of mode 0600, never through a symbolic
/// link (SPEC G8).
fn private_file(path: &Path) -> Result<(), StoreError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            storage(format!(
                "opening {}: {e} (a symbolic link there is refused)",
                path.display()
            ))
        })?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| storage(format!("setting the mode of {}: {e}", path.display())))
}

thread_local! {
    /// Whether a panic on this thread is caught and reported by [`quietly`].
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, catching a panic, without the panic hook's report for it (the caller turns it
/// into an error that says what to do). Panics of other threads are reported as before.
fn quietly<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let before = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(std::cell::Cell::get) {
                before(info);
            }
        }));
    });
    QUIET.with(|q| q.set(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET.with(|q| q.set(false));
    r
}

/// Opens the database at `path`, checks its identity and loads the engine from it. Each
/// failure says what is wrong: another process has it open, the agent may not open it, or it
/// is damaged.
fn open_db(
    path: &Path,
    dir: &Path,
    options: &LocalStoreOptions,
) -> Result<(Database, Engine, bool), StoreError> {
    // The engine holds every record in memory; redb's cache only speeds up the B-tree pages a
    // commit rewrites, so a small one keeps the agent's memory flat as leases grow.
    let db = Database::builder()
        .set_cache_size(options.cache_bytes)
        .create(path)
        .map_err(|e| open_error(path, e))?;
    check_identity(&db, dir)?;
    let (engine, fresh) = load(&db, options.engine).map_err(|e| match e {
        StoreError::Storage(m) => damaged(path, &m),
        other => other,
    })?;
    Ok((db, engine, fresh))
}

/// What went wrong opening the database, in words that say what to do.
fn open_error(path: &Path, e: redb::DatabaseError) -> StoreError {
    use redb::{DatabaseError as D, StorageError as S};
    match e {
        D::DatabaseAlreadyOpen | D::LockProtocolMismatch => storage(format!(
            "{} is open in another process: another leasehold agent uses this state directory; \
             stop it first, or pass another --state-dir",
            path.display()
        )),
        D::Storage(S::Io(io)) if io.kind() == std::io::ErrorKind::PermissionDenied => {
            StoreError::BadState(format!(
                "{} cannot be opened: {io}; the state directory and its files must belong to \
                 the user the agent runs as",
                path.display()
            ))
        }
        D::Storage(S::Io(io)) => storage(format!("opening {}: {io}", path.display())),
        D::UpgradeRequired(v) => StoreError::BadState(format!(
            "{} is in redb file format {v}, which this leasehold cannot read: open it with the \
             leasehold version that wrote it",
            path.display()
        )),
        other => damaged(path, &other.to_string()),
    }
}

/// A damaged database: final, with the way to recover.
fn damaged(path: &Path, what: &str) -> StoreError {
    StoreError::BadState(format!(
        "{} is damaged ({what}); the agent will not start on it. Restore the state directory \
         from a backup; or, with every holder on this host stopped and every resource it used \
         checked, move the state directory away and start afresh",
        path.display()
    ))
}

/// Checks that the database is the one this state directory held, so that a deleted or
/// emptied database file is never taken for a fresh store (tokens would restart and dirty
/// marks vanish while the old holders still run). A database without an identity gets one,
/// recorded in the database first and then in [`ID_FILE`].
fn check_identity(db: &Database, dir: &Path) -> Result<(), StoreError> {
    let id_path = dir.join(ID_FILE);
    let db_path = dir.join(DB_FILE);
    let recorded = match std::fs::read_to_string(&id_path) {
        Ok(s) => Some(s.trim().to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(storage(format!("reading {}: {e}", id_path.display()))),
    };
    let in_db = stored_id(db).map_err(|e| match e {
        StoreError::Storage(m) => damaged(&db_path, &m),
        other => other,
    })?;
    let start_fresh = format!(
        "restore the database from a backup; or, to start afresh deliberately (every holder on \
         this host stopped and every resource it used checked), delete {}",
        id_path.display()
    );
    match (in_db, recorded) {
        (Some(d), Some(f)) if d == f => Ok(()),
        (Some(d), Some(f)) => Err(StoreError::BadState(format!(
            "{} is store {d}, but {} says this directory holds store {f}: this is another \
             store's database; {start_fresh}",
            db_path.display(),
            id_path.display()
        ))),
        (Some(d), None) => write_id_file(&id_path, &d),
        (None, Some(f)) => Err(StoreError::BadState(format!(
            "the state of store {f} is lost: {} is missing, empty or not this store's (its \
             leases, tokens and dirty marks are gone, and holders may still run); the agent \
             will not start on an empty store in its place: {start_fresh}",
            db_path.display()
        ))),
        (None, None) => {
            let id = new_store_id()?;
            let txn = db.begin_write().map_err(storage)?;
            {
                let mut meta = txn.open_table(META).map_err(storage)?;
                if meta.get(FORMAT_KEY).map_err(storage)?.is_none() {
                    meta.insert(FORMAT_KEY, FORMAT).map_err(storage)?;
                }
                meta.insert(STORE_ID_KEY, id.as_bytes()).map_err(storage)?;
            }
            txn.commit().map_err(storage)?;
            write_id_file(&id_path, &id)
        }
    }
}

fn stored_id(db: &Database) -> Result<Option<String>, StoreError> {
    let txn = db.begin_read().map_err(storage)?;
    let meta = match txn.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(storage(e)),
    };
    let id = meta.get(STORE_ID_KEY).map_err(storage)?;
    Ok(id.map(|v| String::from_utf8_lossy(v.value()).into_owned()))
}

/// 128 random bits, in hex.
fn new_store_id() -> Result<String, StoreError> {
    let mut bytes = [0u8; 16];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").map_err(storage)?,
        &mut bytes,
    )
    .map_err(storage)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes the id file (mode 0600) durably: the file, then its directory entry.
fn write_id_file(path: &Path, id: &str) -> Result<(), StoreError> {
    let fail = |e: std::io::Error| storage(format!("writing {}: {e}", path.display()));
    let tmp = path.with_extension("id.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(fail)?;
    std::io::Write::write_all(&mut f, format!("{id}\n").as_bytes()).map_err(fail)?;
    f.sync_all().map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(fail)?;
    }
    Ok(())
}

/// Reads the engine's durable state from the database.
/// Also says whether the database is new (no engine state yet).
fn load(db: &Database, config: EngineConfig) -> Result<(Engine, bool), StoreError> {
    let txn = db.begin_read().map_err(storage)?;
    let meta_table = match txn.open_table(META) {
        Ok(t) => Some(t),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(storage(e)),
    };
    let Some(meta_table) = meta_table else {
        return Ok((Engine::new(config), true));
    };
    match meta_table.get(FORMAT_KEY).map_err(storage)? {
        Some(v) if v.value() == FORMAT => {}
        Some(v) => {
            return Err(StoreError::BadState(format!(
                "the state directory holds format {:?}; this leasehold reads {:?}",
                String::from_utf8_lossy(v.value()),
                String::from_utf8_lossy(FORMAT)
            )));
        }
        None => {
            return Err(StoreError::BadState(
                "the state database has no format marker".into(),
            ));
        }
    }
    // A database that has its identity but no engine state yet is still new.
    let (meta, fresh): (Meta, bool) = match meta_table.get(ENGINE_KEY).map_err(storage)? {
        Some(v) => (
            serde_json::from_slice(v.value())
                .map_err(|e| StoreError::BadState(format!("engine metadata: {e}")))?,
            false,
        ),
        None => (Meta::default(), true),
    };
    let mut records = Vec::new();
    if let Ok(table) = txn.open_table(RESOURCES) {
        for row in table.iter().map_err(storage)? {
            let (k, v) = row.map_err(storage)?;
            let name = ResourceName::new(k.value())
                .map_err(|e| StoreError::BadState(format!("resource record key: {e}")))?;
            let st: ResourceState = serde_json::from_slice(v.value())
                .map_err(|e| StoreError::BadState(format!("record of {name}: {e}")))?;
            if let Some(v) = st.violation() {
                return Err(StoreError::BadState(format!(
                    "the record of {name} breaks the lease rules ({v}); the state was changed \
                     outside leasehold: restore it from a backup, or move the state directory \
                     away and check every resource it held before starting afresh"
                )));
            }
            records.push((name, st));
        }
    }
    Ok((Engine::restore(config, meta, records), fresh))
}

/// Finds or opens this host's session, refusing a state directory whose leases belong to
/// another host id.
fn adopt_session(engine: &mut Engine, host: &HostId, now: Now) -> Result<SessionId, StoreError> {
    let others: Vec<(SessionId, HostId)> = engine
        .sessions()
        .filter(|s| &s.host != host)
        .map(|s| (s.id, s.host.clone()))
        .collect();
    for (id, other) in others {
        if engine.holders().any(|p| p.host == other) {
            return Err(StoreError::BadState(format!(
                "this state directory holds live leases of host id {other}, not {host}; \
                 start with --host-id {other}, or use another state directory"
            )));
        }
        let _ = engine.expire_session(id, now);
    }
    match engine.session_of(host) {
        Some(s) => Ok(s.id),
        None => engine
            .open_session(host.clone(), None, now)
            .map_err(|e| StoreError::BadState(e.to_string())),
    }
}

/// What to do when a deferred answer finds its caller gone.
enum Cleanup {
    Release(Vec<(ResourceName, ProcessKey)>),
    Abandon(WaiterId),
}

/// An answer held back until the batch is durable; called with the commit error, if any.
type Deferred = Box<dyn FnOnce(Option<&StoreError>) -> Option<Cleanup> + Send>;

fn defer<T: Send + 'static>(
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

struct Pending {
    reply: oneshot::Sender<Result<Vec<Grant>, AcquireError>>,
    process: ProcessKey,
    items: Vec<(ResourceName, Mode)>,
}

struct Worker {
    engine: Engine,
    /// The database; `None` after a write failed and it could not be opened again yet
    /// (the disk is full, or failing): then every command is refused, and reopening is
    /// retried every [`RETRY_STORAGE`], until the engine is reloaded from what is on disk.
    db: Option<Database>,
    /// The database file.
    path: PathBuf,
    /// Why the database cannot be used, while it cannot.
    broken: Option<String>,
    clock: Clock,
    session: SessionId,
    options: LocalStoreOptions,
    events: broadcast::Sender<Event>,
    pending: HashMap<WaiterId, Pending>,
    orphans: Vec<(ResourceName, ProcessKey)>,
    /// Whether the database has no format marker yet (a new state directory).
    fresh: bool,
}

/// How often a store whose database failed tries to open it again.
const RETRY_STORAGE: Duration = Duration::from_millis(500);

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Cmd>) {
        loop {
            let first = if self.broken.is_some() {
                match rx.recv_timeout(RETRY_STORAGE) {
                    Ok(cmd) => Some(cmd),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return self.shutdown(),
                }
            } else if !self.orphans.is_empty() {
                rx.try_recv().ok()
            } else {
                let deadline = self.engine.next_deadline();
                let received = match deadline {
                    Some(t) => {
                        let wait = self
                            .clock
                            .instant(t)
                            .saturating_duration_since(std::time::Instant::now());
                        rx.recv_timeout(wait.max(Duration::from_millis(1)))
                    }
                    None => rx.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected),
                };
                match received {
                    Ok(cmd) => Some(cmd),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => return self.shutdown(),
                }
            };
            let mut batch: Vec<Cmd> = first.into_iter().collect();
            while batch.len() < self.options.max_batch {
                match rx.try_recv() {
                    Ok(cmd) => batch.push(cmd),
                    Err(_) => break,
                }
            }
            let stop = batch.iter().any(|c| matches!(c, Cmd::Shutdown));
            self.step(batch);
            if stop {
                return self.shutdown();
            }
        }
    }

    fn shutdown(self) {
        for (_, p) in self.pending {
            let _ = p.reply.send(Err(AcquireError::Cancelled(
                "the store is shutting down".into(),
            )));
        }
    }

    /// Applies a batch, commits it once, then answers.
    fn step(&mut self, batch: Vec<Cmd>) {
        if self.broken.is_some() && !self.recover() {
            let e = StoreError::Storage(self.broken.clone().unwrap_or_default());
            for cmd in batch {
                refuse(cmd, &e, &mut self.orphans);
            }
            return;
        }
        let now = self.clock.now();
        self.engine.tick(now);
        let orphans = self.orphans.clone();
        for (resource, process) in std::mem::take(&mut self.orphans) {
            let _ = self.engine.release(
                ReleaseRequest {
                    resource,
                    process,
                    kind: ReleaseKind::Clean,
                },
                now,
            );
        }
        let mut answers: Vec<Deferred> = Vec::with_capacity(batch.len());
        for cmd in batch {
            self.apply(cmd, now, &mut answers);
        }
        let out = self.engine.take_output();
        let failed = if out.needs_persist() {
            self.persist(&out).err().map(|e| {
                storage(format!(
                    "the state database {} could not be written ({e}); nothing of what was \
                     asked took effect; the agent retries every {} ms (free disk space, or \
                     check the disk)",
                    self.path.display(),
                    RETRY_STORAGE.as_millis()
                ))
            })
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
        self.deliver(out);
    }

    /// Withdraws a waiter whose caller went away. One the engine already decided in this
    /// batch keeps its pending entry, so that `deliver` finds its caller gone and releases
    /// what it was granted: dropping the entry here would leave that grant to nobody.
    fn abandon(&mut self, id: WaiterId, now: Now) {
        if self.engine.cancel_wait(id, now) {
            self.pending.remove(&id);
        }
    }

    /// Answers waiters decided in this batch and publishes its events.
    fn deliver(&mut self, out: Output) {
        for (id, outcome) in out.waiters {
            let Some(p) = self.pending.remove(&id) else {
                continue;
            };
            if let Err(Ok(grants)) = p.reply.send(outcome) {
                self.orphans.extend(fresh(&grants, &p.process));
            }
        }
        for e in out.events {
            let _ = self.events.send(e);
        }
    }

    fn apply(&mut self, cmd: Cmd, now: Now, answers: &mut Vec<Deferred>) {
        match cmd {
            Cmd::Acquire {
                owner,
                items,
                accept_dirty,
                wait,
                reply,
            } => {
                let process = owner.process.clone();
                let req = AcquireRequest {
                    owner,
                    session: self.session,
                    items: items.clone(),
                    accept_dirty,
                    wait,
                };
                let value = match self.engine.acquire(req, now) {
                    Ok(Acquired::Granted(g)) => Ok(AcquireReply::Done(g)),
                    Ok(Acquired::Queued(id)) => {
                        let (tx, rx) = oneshot::channel();
                        self.pending.insert(
                            id,
                            Pending {
                                reply: tx,
                                process: process.clone(),
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
                            Some(Cleanup::Release(fresh(&grants, &process)))
                        }
                        Err(Ok(AcquireReply::Queued(id, _))) => Some(Cleanup::Abandon(id)),
                        Err(Err(_)) => None,
                    }
                }));
            }
            Cmd::CancelWait { id, reply } => {
                let conflict = match self.pending.remove(&id) {
                    Some(p) if self.engine.cancel_wait(id, now) => {
                        let c = self.engine.conflict(&p.process, &p.items, now);
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
                kind,
                reply,
            } => {
                let r = self.engine.release(
                    ReleaseRequest {
                        resource,
                        process,
                        kind,
                    },
                    now,
                );
                defer(answers, reply, r.map_err(StoreError::from));
            }
            Cmd::EndProcess { process, reply } => {
                let r = self.engine.end_process(&process, now);
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
                process,
                items,
                reply,
            } => {
                let c = self.engine.conflict(&process, &items, now).map(|c| {
                    let left = c
                        .blocked_until
                        .map(|t| Duration::from_millis(t.0.saturating_sub(now.mono.0)));
                    (c, left)
                });
                defer(answers, reply, Ok(c));
            }
            Cmd::Inspect { resource, reply } => {
                let v = view(&self.engine, &resource, now);
                defer(answers, reply, Ok(v));
            }
            Cmd::List { reply } => {
                let v = self
                    .engine
                    .resources()
                    .filter_map(|(name, _)| view(&self.engine, name, now))
                    .collect();
                defer(answers, reply, Ok(v));
            }
            Cmd::Shutdown => {}
        }
    }

    /// Writes the records changed in `out` and commits: one fsync.
    fn persist(&self, out: &Output) -> Result<(), String> {
        let db = self.db.as_ref().ok_or("the database is not open")?;
        let txn = db.begin_write().map_err(|e| e.to_string())?;
        {
            let mut table = txn.open_table(RESOURCES).map_err(|e| e.to_string())?;
            for name in &out.changed {
                match self.engine.resource(name) {
                    Some(st) => {
                        let bytes = serde_json::to_vec(st).map_err(|e| e.to_string())?;
                        table
                            .insert(name.as_str(), bytes.as_slice())
                            .map_err(|e| e.to_string())?;
                    }
                    None => {
                        table.remove(name.as_str()).map_err(|e| e.to_string())?;
                    }
                }
            }
            // Grants touch only their resources' records: the token counter is rebuilt from
            // their `last_token` on load, so the metadata is written only when sessions change.
            if out.meta_changed || self.fresh {
                let mut meta = txn.open_table(META).map_err(|e| e.to_string())?;
                meta.insert(FORMAT_KEY, FORMAT).map_err(|e| e.to_string())?;
                let bytes = serde_json::to_vec(&self.engine.meta()).map_err(|e| e.to_string())?;
                meta.insert(ENGINE_KEY, bytes.as_slice())
                    .map_err(|e| e.to_string())?;
            }
        }
        txn.commit().map_err(|e| e.to_string())
    }

    /// After a failed commit: forget the batch by rebuilding the engine from disk. The
    /// database is opened again first: after an I/O error (a full disk) redb refuses every
    /// later write until then, even once space is back.
    fn reload(&mut self, err: &StoreError) {
        for (_, p) in self.pending.drain() {
            let _ = p.reply.send(Err(AcquireError::Cancelled(format!(
                "the store failed: {err}"
            ))));
        }
        self.orphans.clear();
        self.db = None;
        self.broken = Some(match err {
            StoreError::Storage(m) => m.clone(),
            other => other.to_string(),
        });
        let _ = self.engine.take_output();
    }

    /// After a failed write: opens the database again, rebuilds the engine from it, and
    /// proves that a write commits now. False while any of that fails: the store stays
    /// unhealthy, refusing every command (its `list` fails, so `status` says so).
    fn recover(&mut self) -> bool {
        if self.db.is_none() && !self.reopen() {
            return false;
        }
        let probe = || -> Result<(), String> {
            let db = self.db.as_ref().ok_or("the database is not open")?;
            let txn = db.begin_write().map_err(|e| e.to_string())?;
            {
                let mut meta = txn.open_table(META).map_err(|e| e.to_string())?;
                meta.insert(FORMAT_KEY, FORMAT).map_err(|e| e.to_string())?;
            }
            txn.commit().map_err(|e| e.to_string())
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
                self.db = None;
                false
            }
        }
    }

    /// Opens the database again and rebuilds the engine from it; false while it cannot.
    fn reopen(&mut self) -> bool {
        self.db = None;
        let opened = quietly(|| {
            let db = Database::builder()
                .set_cache_size(self.options.cache_bytes)
                .create(&self.path)
                .map_err(|e| e.to_string())?;
            let (engine, _) = load(&db, self.options.engine).map_err(|e| e.to_string())?;
            Ok::<_, String>((db, engine))
        });
        match opened {
            Ok(Ok((db, engine))) => {
                self.db = Some(db);
                self.engine = engine;
                true
            }
            Ok(Err(_)) | Err(_) => false,
        }
    }
}

/// Answers a command with `e` while the database cannot be used: nothing is applied.
/// Grants to release are kept for when it can.
fn refuse(cmd: Cmd, e: &StoreError, orphans: &mut Vec<(ResourceName, ProcessKey)>) {
    let e = e.clone();
    match cmd {
        Cmd::Acquire { reply, .. } => drop(reply.send(Err(e))),
        Cmd::CancelWait { reply, .. } => drop(reply.send(Err(e))),
        Cmd::Release { reply, .. } => drop(reply.send(Err(e))),
        Cmd::EndProcess { reply, .. } | Cmd::ForceRelease { reply, .. } => {
            drop(reply.send(Err(e)));
        }
        Cmd::MarkClean { reply, .. } => drop(reply.send(Err(e))),
        Cmd::Validate { reply, .. } => drop(reply.send(Err(e))),
        Cmd::Inspect { reply, .. } => drop(reply.send(Err(e))),
        Cmd::Conflict { reply, .. } => drop(reply.send(Err(e))),
        Cmd::List { reply } => drop(reply.send(Err(e))),
        Cmd::ReleaseOrphans(v) => orphans.extend(v),
        Cmd::Abandon(_) | Cmd::Shutdown => {}
    }
}

/// The view of one resource for callers.
fn view(engine: &Engine, name: &ResourceName, now: Now) -> Option<ResourceView> {
    let st = engine.resource(name)?;
    Some(ResourceView {
        resource: name.clone(),
        holders: st.holders.clone(),
        dirty: st.dirty.clone(),
        last_ended: st.last_ended.clone(),
        last_token: st.last_token,
        waiters: engine
            .waiters_of(name)
            .into_iter()
            .map(|(_, owner, mode)| WaiterView {
                owner: owner.clone(),
                mode,
            })
            .collect(),
        blocked_for: st
            .blocked_until
            .filter(|t| *t > now.mono)
            .map(|t| Duration::from_millis(t.0 - now.mono.0)),
        handover_pending: st.reserved_for.is_some(),
        damaged: None,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use leasehold_core::{Mode, Owner};

    use super::*;

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
            let mut merged: ResourceState =
                serde_json::from_slice(table.get("r10").unwrap().unwrap().value()).unwrap();
            let shared: ResourceState =
                serde_json::from_slice(table.get("r11").unwrap().unwrap().value()).unwrap();
            merged.holders.extend(shared.holders);
            merged.last_token = merged.last_token.max(shared.last_token);
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
}
