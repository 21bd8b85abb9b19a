//! The state database: opening and checking it, its identity, and the records and engine
//! metadata it holds.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use leasehold_core::{
    Engine, EngineConfig, HostId, Meta, Now, ResourceName, ResourceState, SessionId,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::LocalStoreOptions;
use crate::{Cause, StoreError};

/// Resource records: name to the JSON of its durable [`ResourceState`].
pub(super) const RESOURCES: TableDefinition<&str, &[u8]> = TableDefinition::new("resources");
/// Engine metadata: `"engine"` to the JSON of [`Meta`], `"format"` to the format version.
pub(super) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub(super) const FORMAT_KEY: &str = "format";
pub(super) const ENGINE_KEY: &str = "engine";
/// The store's identity, also kept in [`ID_FILE`]: a database that lacks it, or holds
/// another, while the file exists is not the state this directory held.
pub(super) const STORE_ID_KEY: &str = "store-id";
/// The file in the state directory that remembers which database belongs there.
pub(super) const ID_FILE: &str = "leasehold.id";
/// The on-disk format this code writes and reads.
pub(super) const FORMAT: &[u8] = b"leasehold-local-1";
/// The file in the state directory.
pub(super) const DB_FILE: &str = "leasehold.redb";

/// A storage failure that is `e` (a redb or I/O error), kept under it.
pub(super) fn storage(e: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::Storage(Cause::of(e))
}

/// A storage failure that is `e`, met while doing `context`.
pub(super) fn storage_at(
    context: impl std::fmt::Display,
    e: impl std::error::Error + Send + Sync + 'static,
) -> StoreError {
    StoreError::Storage(Cause::at(context, e))
}

/// Creates `path` (or finds it) as a regular file of mode 0600, never through a symbolic
/// link (SPEC G8).
pub(super) fn private_file(path: &Path) -> Result<(), StoreError> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            StoreError::Storage(
                Cause::new(format!(
                    "opening {}: {e} (a symbolic link there is refused)",
                    path.display()
                ))
                .with_source(e),
            )
        })?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| storage_at(format!("setting the mode of {}", path.display()), e))
}

thread_local! {
    /// Whether a panic on this thread is caught and reported by [`quietly`].
    static QUIET: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, catching a panic, without the panic hook's report for it (the caller turns it
/// into an error that says what to do). Panics of other threads are reported as before.
pub(super) fn quietly<T>(f: impl FnOnce() -> T) -> std::thread::Result<T> {
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

/// What a panic caught by [`quietly`] said.
pub(super) fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "an internal error".into())
}

/// Opens the database at `path`, checks its identity and loads the engine from it. Each
/// failure says what is wrong: another process has it open, the agent may not open it, or it
/// is damaged.
pub(super) fn open_db(
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
        StoreError::Storage(m) => damaged(path, m),
        other => other,
    })?;
    Ok((db, engine, fresh))
}

/// What went wrong opening the database, in words that say what to do.
pub(super) fn open_error(path: &Path, e: redb::DatabaseError) -> StoreError {
    use redb::{DatabaseError as D, StorageError as S};
    match e {
        e @ (D::DatabaseAlreadyOpen | D::LockProtocolMismatch) => StoreError::Storage(
            Cause::new(format!(
                "{} is open in another process: another leasehold agent uses this state \
                 directory; stop it first, or pass another --state-dir",
                path.display()
            ))
            .with_source(e),
        ),
        D::Storage(S::Io(io)) if io.kind() == std::io::ErrorKind::PermissionDenied => {
            StoreError::BadState(
                Cause::new(format!(
                    "{} cannot be opened: {io}; the state directory and its files must belong \
                     to the user the agent runs as",
                    path.display()
                ))
                .with_source(io),
            )
        }
        D::Storage(S::Io(io)) => storage_at(format!("opening {}", path.display()), io),
        e @ D::UpgradeRequired(v) => StoreError::BadState(
            Cause::new(format!(
                "{} is in redb file format {v}, which this leasehold cannot read: open it with \
                 the leasehold version that wrote it",
                path.display()
            ))
            .with_source(e),
        ),
        other => damaged(path, Cause::of(other)),
    }
}

/// A damaged database: final, with the way to recover; `what` (the error found, or what a
/// panic said) is kept under it.
pub(super) fn damaged(path: &Path, what: Cause) -> StoreError {
    StoreError::BadState(
        Cause::new(format!(
            "{} is damaged ({what}); the agent will not start on it. Restore the state \
             directory from a backup; or, with every holder on this host stopped and every \
             resource it used checked, move the state directory away and start afresh",
            path.display()
        ))
        .with_source(what),
    )
}

/// A database found damaged while the store runs: nothing of the failed write took effect,
/// and every request is refused until the file can be used again.
pub(super) fn damaged_running(path: &Path, what: Cause) -> StoreError {
    StoreError::BadState(
        Cause::new(format!(
            "{} is damaged ({what}); nothing of what was asked took effect, and the agent \
             refuses every request until it can use the file again. Stop the agent and \
             restore the state directory from a backup; or, with every holder on this host \
             stopped and every resource it used checked, move the state directory away and \
             start afresh",
            path.display()
        ))
        .with_source(what),
    )
}

/// Checks that the database is the one this state directory held, so that a deleted or
/// emptied database file is never taken for a fresh store (tokens would restart and dirty
/// marks vanish while the old holders still run). A database without an identity gets one,
/// recorded in the database first and then in [`ID_FILE`].
pub(super) fn check_identity(db: &Database, dir: &Path) -> Result<(), StoreError> {
    let id_path = dir.join(ID_FILE);
    let db_path = dir.join(DB_FILE);
    let recorded = match std::fs::read_to_string(&id_path) {
        Ok(s) => Some(s.trim().to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(storage_at(format!("reading {}", id_path.display()), e)),
    };
    let in_db = stored_id(db).map_err(|e| match e {
        StoreError::Storage(m) => damaged(&db_path, m),
        other => other,
    })?;
    let start_fresh = format!(
        "restore the database from a backup; or, to start afresh deliberately (every holder on \
         this host stopped and every resource it used checked), delete {}",
        id_path.display()
    );
    match (in_db, recorded) {
        (Some(d), Some(f)) if d == f => Ok(()),
        (Some(d), Some(f)) => Err(StoreError::BadState(Cause::new(format!(
            "{} is store {d}, but {} says this directory holds store {f}: this is another \
             store's database; {start_fresh}",
            db_path.display(),
            id_path.display()
        )))),
        (Some(d), None) => write_id_file(&id_path, &d),
        (None, Some(f)) => Err(StoreError::BadState(Cause::new(format!(
            "the state of store {f} is lost: {} is missing, empty or not this store's (its \
             leases, tokens and dirty marks are gone, and holders may still run); the agent \
             will not start on an empty store in its place: {start_fresh}",
            db_path.display()
        )))),
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

pub(super) fn stored_id(db: &Database) -> Result<Option<String>, StoreError> {
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
pub(super) fn new_store_id() -> Result<String, StoreError> {
    let mut bytes = [0u8; 16];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").map_err(storage)?,
        &mut bytes,
    )
    .map_err(storage)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes the id file (mode 0600) durably: the file, then its directory entry.
pub(super) fn write_id_file(path: &Path, id: &str) -> Result<(), StoreError> {
    let fail = |e: std::io::Error| storage_at(format!("writing {}", path.display()), e);
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
pub(super) fn load(db: &Database, config: EngineConfig) -> Result<(Engine, bool), StoreError> {
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
            return Err(StoreError::BadState(Cause::new(format!(
                "the state directory holds format {:?}; this leasehold reads {:?}",
                String::from_utf8_lossy(v.value()),
                String::from_utf8_lossy(FORMAT)
            ))));
        }
        None => {
            return Err(StoreError::BadState(Cause::new(
                "the state database has no format marker",
            )));
        }
    }
    // A database that has its identity but no engine state yet is still new.
    let (meta, fresh): (Meta, bool) = match meta_table.get(ENGINE_KEY).map_err(storage)? {
        Some(v) => (
            serde_json::from_slice(v.value())
                .map_err(|e| StoreError::BadState(Cause::at("engine metadata", e)))?,
            false,
        ),
        None => (Meta::default(), true),
    };
    let mut records = Vec::new();
    if let Ok(table) = txn.open_table(RESOURCES) {
        for row in table.iter().map_err(storage)? {
            let (k, v) = row.map_err(storage)?;
            let name = ResourceName::new(k.value())
                .map_err(|e| StoreError::BadState(Cause::at("resource record key", e)))?;
            let st: ResourceState = serde_json::from_slice(v.value())
                .map_err(|e| StoreError::BadState(Cause::at(format!("record of {name}"), e)))?;
            if let Some(v) = st.violation() {
                return Err(StoreError::BadState(Cause::new(format!(
                    "the record of {name} breaks the lease rules ({v}); the state was changed \
                     outside leasehold: restore it from a backup, or move the state directory \
                     away and check every resource it held before starting afresh"
                ))));
            }
            records.push((name, st));
        }
    }
    Ok((Engine::restore(config, meta, records), fresh))
}

/// Finds or opens this host's session, refusing a state directory whose leases belong to
/// another host id.
pub(super) fn adopt_session(
    engine: &mut Engine,
    host: &HostId,
    now: Now,
) -> Result<SessionId, StoreError> {
    let others: Vec<(SessionId, HostId)> = engine
        .sessions()
        .filter(|s| &s.host != host)
        .map(|s| (s.id, s.host.clone()))
        .collect();
    for (id, other) in others {
        if engine.holders().any(|p| p.host == other) {
            return Err(StoreError::BadState(Cause::new(format!(
                "this state directory holds live leases of host id {other}, not {host}; \
                 start with --host-id {other}, or use another state directory"
            ))));
        }
        let _ = engine.expire_session(id, now);
    }
    match engine.session_of(host) {
        Some(s) => Ok(s.id),
        None => engine
            .open_session(host.clone(), None, now)
            .map_err(|e| StoreError::BadState(Cause::of(e))),
    }
}
