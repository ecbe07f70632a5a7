//! drydock's own runs database (`runs.sqlite` in the state directory; SQLite in WAL mode,
//! schema versioned with `user_version` and applied migrations). It records runs (builds
//! tracked by `drydock track`, VM launches), the store paths each run claimed, the VM
//! artifacts it owns, its pins (indirect GC roots), and what GC did.
//!
//! One state directory may serve several Nix stores (`--store ROOT` is chosen per command), so
//! every run and GC event records the store it belongs to ([`StoreLayout::id`]). Commands look
//! only at the runs of their own store; runs recorded before stores were (`store` NULL) belong
//! to whichever store a command uses.
//!
//! The API the VM side uses: [`RunsDb::open`], [`RunsDb::begin_run`],
//! [`RunsDb::add_artifact`], [`RunsDb::pin`], [`RunsDb::unpin_run`], [`RunsDb::finish_run`].

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, OptionalExtension, params};

use crate::classify::PathClass;
use crate::deadline::Deadline;
use crate::exitclass::{Classify, ExitClass};
use crate::store_path::{StoreLayout, StorePath};

/// File name of the database inside the state directory.
pub const RUNS_DB_FILE: &str = "runs.sqlite";

/// How long opening the database sleeps between two tries to switch it to WAL.
const WAL_RETRY: Duration = Duration::from_millis(5);

/// Schema migrations; `user_version` is the number applied.
const MIGRATIONS: &[&str] = &[
    // 1: runs, their paths, artifacts, pins, GC events.
    "CREATE TABLE runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL,
        command TEXT NOT NULL,
        kind TEXT NOT NULL CHECK (kind IN ('build', 'vm')),
        started_at INTEGER NOT NULL,
        ended_at INTEGER,
        exit_status INTEGER,
        collected_at INTEGER
     );
     CREATE TABLE run_paths (
        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        path TEXT NOT NULL,
        class TEXT NOT NULL,
        nar_size INTEGER NOT NULL,
        gc_state TEXT,
        PRIMARY KEY (run_id, path)
     );
     CREATE INDEX run_paths_path ON run_paths(path);
     CREATE TABLE artifacts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        kind TEXT NOT NULL,
        path TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        removed_at INTEGER
     );
     CREATE TABLE pins (
        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        store_path TEXT NOT NULL,
        link TEXT NOT NULL,
        root_link TEXT NOT NULL,
        PRIMARY KEY (run_id, store_path)
     );
     CREATE TABLE gc_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        started_at INTEGER NOT NULL,
        finished_at INTEGER,
        mode TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('running', 'done', 'interrupted', 'failed')),
        planned_paths INTEGER NOT NULL,
        planned_bytes INTEGER NOT NULL,
        freed_bytes INTEGER
     );
     CREATE TABLE gc_paths (
        event_id INTEGER NOT NULL REFERENCES gc_events(id) ON DELETE CASCADE,
        path TEXT NOT NULL,
        outcome TEXT NOT NULL CHECK (outcome IN ('planned', 'deleted', 'refused')),
        detail TEXT,
        PRIMARY KEY (event_id, path)
     );",
    // 2: the store each run and GC event belongs to (`StoreLayout::id`); NULL = recorded
    // before stores were, belongs to any store.
    "ALTER TABLE runs ADD COLUMN store TEXT;
     ALTER TABLE gc_events ADD COLUMN store TEXT;
     CREATE INDEX runs_store ON runs(store);",
];

/// The columns [`row_to_run`] reads, in order.
const RUN_COLUMNS: &str =
    "id, name, command, kind, started_at, ended_at, exit_status, collected_at, store";

/// Errors of the runs database.
#[derive(Debug, thiserror::Error)]
pub enum RunsDbError {
    /// The state directory cannot be created.
    #[error("cannot create state directory {}", path.display())]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The state directory belongs to another user, or others can write it.
    #[error(transparent)]
    NotPrivate(crate::private::PrivateError),
    /// The file is not a database, or it is damaged.
    #[error("runs database {} is corrupt or not a drydock database", path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// The database (or its WAL files) cannot be opened for writing: permissions, a read-only
    /// file system.
    #[error("cannot write the runs database {} (is the state directory writable by this user?)", path.display())]
    Unwritable {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// The schema is newer than this drydock knows.
    #[error("runs database {} has schema version {found}, newer than this drydock ({known})", path.display())]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    /// No run with this id.
    #[error("no run with id {0}")]
    UnknownRun(i64),
    /// The run belongs to another store than the one the command uses.
    #[error(
        "run {id} belongs to the store {store}, not to this command's store {current}: pass the matching store ({})",
        crate::store_path::store_option_hint(store)
    )]
    OtherStore {
        id: i64,
        store: String,
        current: String,
    },
    /// Making or removing a pin failed.
    #[error("cannot create pin link {}", path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Removing a pin failed.
    #[error("cannot remove pin")]
    Unpin(#[source] crate::reclaim::ReclaimError),
    /// Any other SQLite error.
    #[error("runs database {}", path.display())]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
}

impl Classify for RunsDbError {
    /// Bad input: a corrupt, unwritable or too-new database (or state directory), a state
    /// directory of another user or one others can write, an unknown run id, another store's
    /// run. A state directory that cannot be inspected and removing a pin are classified as
    /// their cause; the rest are failures.
    fn exit_class(&self) -> ExitClass {
        match self {
            Self::NotPrivate(e) => e.exit_class(),
            Self::Corrupt { .. }
            | Self::StateDir { .. }
            | Self::Unwritable { .. }
            | Self::TooNew { .. }
            | Self::UnknownRun(_)
            | Self::OtherStore { .. } => ExitClass::BadInput,
            Self::Unpin(e) => e.exit_class(),
            Self::Pin { .. } | Self::Sqlite { .. } => ExitClass::Failed,
        }
    }
}

/// Kind of run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunKind {
    /// A tracked build (`drydock track`).
    Build,
    /// A VM launch.
    Vm,
}

impl RunKind {
    /// The stable name used in the runs database and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Build => "build",
            Self::Vm => "vm",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [Self::Build, Self::Vm]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for RunKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// A text column holding one of an enum's stable names; anything else is a corrupt database
/// (bad input naming the file, through [`RunsDbError::Corrupt`]).
fn text_enum<T>(
    v: rusqlite::types::ValueRef<'_>,
    what: &'static str,
    parse: fn(&str) -> Option<T>,
) -> rusqlite::types::FromSqlResult<T> {
    let s = v.as_str()?;
    parse(s).ok_or_else(|| {
        rusqlite::types::FromSqlError::Other(format!("{s:?} is not a {what}").into())
    })
}

impl rusqlite::types::FromSql for RunKind {
    fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        text_enum(v, "run kind", Self::parse)
    }
}

impl rusqlite::types::FromSql for ArtifactKind {
    fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        text_enum(v, "artifact kind", Self::parse)
    }
}

/// Remove a pin's two links (its GC root and drydock's own link).
fn remove_pin_links(p: &Pin) -> Result<(), RunsDbError> {
    crate::reclaim::remove_link(&p.root_link).map_err(RunsDbError::Unpin)?;
    crate::reclaim::remove_link(&p.link).map_err(RunsDbError::Unpin)
}

impl rusqlite::types::FromSql for crate::classify::PathClass {
    fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        text_enum(v, "path class", Self::from_name)
    }
}

/// Kind of VM artifact a run owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactKind {
    /// A VM's state folder.
    StateDir,
    /// A disk overlay.
    Overlay,
    /// A log file.
    Log,
    /// Anything else.
    Other,
}

impl ArtifactKind {
    /// The stable name used in the runs database and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::StateDir => "state_dir",
            Self::Overlay => "overlay",
            Self::Log => "log",
            Self::Other => "other",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [Self::StateDir, Self::Overlay, Self::Log, Self::Other]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for ArtifactKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

/// A recorded run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Run {
    /// Id.
    pub id: i64,
    /// Name given (or derived from the command).
    pub name: String,
    /// The command line.
    pub command: Vec<String>,
    /// `build` or `vm`.
    pub kind: RunKind,
    /// Start, seconds since the epoch.
    pub started_at: i64,
    /// End, if finished.
    pub ended_at: Option<i64>,
    /// Exit status, if finished.
    pub exit_status: Option<i64>,
    /// When GC collected it.
    pub collected_at: Option<i64>,
    /// The store it belongs to ([`StoreLayout::id`]); `None` if recorded before stores were.
    pub store: Option<String>,
}

impl Run {
    /// Whether the run belongs to the store with this [`StoreLayout::id`]: its own store, or
    /// any store for a run recorded before stores were.
    pub fn belongs_to(&self, store_id: &str) -> bool {
        self.store.as_deref().is_none_or(|s| s == store_id)
    }
}

/// Runs of a store other than the current one (`drydock runs` says they are not shown).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OtherStoreRuns {
    /// The store ([`StoreLayout::id`]).
    pub store: String,
    /// How many runs belong to it.
    pub runs: usize,
}

/// Split runs into those of the store `store_id` (with the legacy runs of no recorded store)
/// and a count per other store, stores in name order.
pub fn partition_by_store(runs: Vec<Run>, store_id: &str) -> (Vec<Run>, Vec<OtherStoreRuns>) {
    let mut others: std::collections::BTreeMap<String, usize> = Default::default();
    let mut own = Vec::new();
    for r in runs {
        match &r.store {
            Some(s) if !r.belongs_to(store_id) => *others.entry(s.clone()).or_default() += 1,
            _ => own.push(r),
        }
    }
    let others = others
        .into_iter()
        .map(|(store, runs)| OtherStoreRuns { store, runs })
        .collect();
    (own, others)
}
/// A store path claimed by a run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RunPath {
    /// Full logical path.
    pub path: String,
    /// Its class.
    pub class: crate::classify::PathClass,
    /// NAR size when claimed.
    pub nar_size: u64,
    /// What GC did (`deleted`, `refused`), if anything.
    pub gc_state: Option<String>,
}

/// A VM artifact owned by a run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Artifact {
    /// Id.
    pub id: i64,
    /// What it is.
    pub kind: ArtifactKind,
    /// Path on disk.
    pub path: String,
    /// When GC removed it.
    pub removed_at: Option<i64>,
}

/// A pin: an indirect GC root that keeps a store path alive for a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    /// The pinned store path (full logical path).
    pub store_path: String,
    /// drydock's symlink to the store path (in the state directory).
    pub link: PathBuf,
    /// The link in the store's `gcroots/auto` pointing at `link`.
    pub root_link: PathBuf,
}

/// A GC event still marked running (drydock was killed during a `gc`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnfinishedGc {
    /// Event id.
    pub id: i64,
    /// The store it collected in ([`StoreLayout::id`]); `None` if recorded before stores were.
    pub store: Option<String>,
    /// Paths still marked planned.
    pub planned: Vec<String>,
}

/// Seconds since the epoch, now.
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs() as i64
}

/// The runs database.
#[derive(Debug)]
pub struct RunsDb {
    conn: Connection,
    path: PathBuf,
    state_dir: PathBuf,
}

/// An error while opening the runs database: the true cause, not always "corrupt".
fn classify_open_error(path: &Path, source: rusqlite::Error) -> RunsDbError {
    use rusqlite::ErrorCode as C;
    match source.sqlite_error_code() {
        Some(
            C::CannotOpen | C::ReadOnly | C::PermissionDenied | C::AuthorizationForStatementDenied,
        ) => RunsDbError::Unwritable {
            path: path.to_owned(),
            source,
        },
        Some(C::DatabaseBusy | C::DatabaseLocked | C::SystemIoFailure | C::DiskFull) => {
            RunsDbError::Sqlite {
                path: path.to_owned(),
                source,
            }
        }
        _ => RunsDbError::Corrupt {
            path: path.to_owned(),
            source,
        },
    }
}

impl RunsDb {
    /// Open (creating if needed) `STATE_DIR/runs.sqlite` and bring its schema up to date.
    /// The state directory is made 0700 if missing, and refused if it belongs to another user
    /// or others can write it (see `private`).
    pub fn open(state_dir: &Path) -> Result<Self, RunsDbError> {
        crate::private::private_tree(state_dir, state_dir).map_err(|e| match e {
            crate::private::PrivateError::Io { path, source } => {
                RunsDbError::StateDir { path, source }
            }
            e => RunsDbError::NotPrivate(e),
        })?;
        let state_dir = &std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.to_owned());
        let path = state_dir.join(RUNS_DB_FILE);
        let corrupt = |source| classify_open_error(&path, source);
        let conn = Connection::open(&path).map_err(corrupt)?;
        conn.busy_timeout(Duration::from_secs(30))
            .map_err(corrupt)?;
        // Switching a new file to WAL needs an exclusive lock, and SQLite reports a concurrent
        // opener's lock at once (no busy handler for this step): retry within the same bound.
        let wal_deadline = Deadline::after(Duration::from_secs(30));
        loop {
            match conn.pragma_update(None, "journal_mode", "WAL") {
                Ok(()) => break,
                Err(e)
                    if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy)
                        && !wal_deadline.expired() =>
                {
                    // A back-off, bounded by the deadline: SQLite's busy handler does not cover
                    // this step, and there is nothing to block on until the other opener's
                    // lock is gone.
                    std::thread::sleep(WAL_RETRY.min(wal_deadline.remaining()));
                }
                Err(e) => return Err(corrupt(e)),
            }
        }
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(corrupt)?;
        let known = MIGRATIONS.len() as i64;
        let read_version = |c: &Connection| -> Result<i64, RunsDbError> {
            c.pragma_query_value(None, "user_version", |r| r.get(0))
                .map_err(|source| RunsDbError::Corrupt {
                    path: path.clone(),
                    source,
                })
        };
        let mut conn = conn;
        if read_version(&conn)? < known {
            // Migrate under the write lock, re-reading the version inside it, so that two
            // drydock processes opening a new database at once do not both migrate.
            let tx = conn
                .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                .map_err(corrupt)?;
            let version = read_version(&tx)?;
            if version == 0 {
                // A fresh file must be empty; anything else is not ours.
                let tables: i64 = tx
                    .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
                    .map_err(corrupt)?;
                if tables > 0 {
                    return Err(RunsDbError::Corrupt {
                        path: path.clone(),
                        source: rusqlite::Error::InvalidQuery,
                    });
                }
            }
            for (i, m) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
                tx.execute_batch(m).map_err(corrupt)?;
                tx.pragma_update(None, "user_version", (i + 1) as i64)
                    .map_err(corrupt)?;
            }
            tx.commit().map_err(corrupt)?;
        }
        let version = read_version(&conn)?;
        if version > known {
            return Err(RunsDbError::TooNew {
                path,
                found: version,
                known,
            });
        }
        // Touch the schema to detect damage early.
        conn.query_row("SELECT count(*) FROM runs", [], |r| r.get::<_, i64>(0))
            .map_err(corrupt)?;
        // SQLite makes its files 0644 less the umask: they are drydock's, so 0600 (best effort:
        // they lie in a private folder anyway).
        for suffix in ["", "-wal", "-shm"] {
            let mut f = path.clone().into_os_string();
            f.push(suffix);
            let _ = std::fs::set_permissions(
                &f,
                std::os::unix::fs::PermissionsExt::from_mode(crate::private::FILE_MODE),
            );
        }
        Ok(Self {
            conn,
            path,
            state_dir: state_dir.to_owned(),
        })
    }

    fn e(&self) -> impl Fn(rusqlite::Error) -> RunsDbError + '_ {
        |source| {
            let bad_value = matches!(
                source,
                rusqlite::Error::InvalidColumnType(..)
                    | rusqlite::Error::FromSqlConversionFailure(..)
                    | rusqlite::Error::IntegralValueOutOfRange(..)
            );
            if bad_value
                || matches!(
                    source.sqlite_error_code(),
                    Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
                )
            {
                RunsDbError::Corrupt {
                    path: self.path.clone(),
                    source,
                }
            } else {
                RunsDbError::Sqlite {
                    path: self.path.clone(),
                    source,
                }
            }
        }
    }

    /// The state directory this database lives in.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Record the start of a run in `store` (the store its paths are built in or its VM runs
    /// from); returns its id.
    pub fn begin_run(
        &self,
        store: &StoreLayout,
        name: &str,
        command: &[String],
        kind: RunKind,
    ) -> Result<i64, RunsDbError> {
        let cmd = serde_json::to_string(command).unwrap_or_default();
        self.conn
            .execute(
                "INSERT INTO runs (name, command, kind, started_at, store) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![name, cmd, kind.as_str(), now(), store.id()],
            )
            .map_err(self.e())?;
        Ok(self.conn.last_insert_rowid())
    }

    /// Record the end of a run and its exit status.
    pub fn finish_run(&self, id: i64, exit_status: Option<i32>) -> Result<(), RunsDbError> {
        let n = self
            .conn
            .execute(
                "UPDATE runs SET ended_at = ?2, exit_status = ?3 WHERE id = ?1",
                params![id, now(), exit_status],
            )
            .map_err(self.e())?;
        if n == 0 {
            return Err(RunsDbError::UnknownRun(id));
        }
        Ok(())
    }

    /// End a run that is still open (its owner died, or stopped it): like [`Self::finish_run`],
    /// but a run that has already ended or been collected is left as it is. Returns whether
    /// this call ended it, so that of several who notice a dead owner, exactly one ends it.
    pub fn finish_open_run(&self, id: i64, exit_status: Option<i32>) -> Result<bool, RunsDbError> {
        self.require(id)?;
        let n = self
            .conn
            .execute(
                "UPDATE runs SET ended_at = ?2, exit_status = ?3 \
                 WHERE id = ?1 AND ended_at IS NULL AND collected_at IS NULL",
                params![id, now(), exit_status],
            )
            .map_err(self.e())?;
        Ok(n == 1)
    }

    /// Mark a finished run as running again (a VM restarted or restored from its recorded
    /// launch), so that GC leaves it and its artifacts alone until it finishes again.
    pub fn reopen_run(&self, id: i64) -> Result<(), RunsDbError> {
        let n = self
            .conn
            .execute(
                "UPDATE runs SET ended_at = NULL, exit_status = NULL WHERE id = ?1 AND collected_at IS NULL",
                params![id],
            )
            .map_err(self.e())?;
        if n == 0 {
            return Err(RunsDbError::UnknownRun(id));
        }
        Ok(())
    }

    /// Record the store paths a run claimed.
    pub fn add_paths(
        &self,
        id: i64,
        paths: &[(String, PathClass, u64)],
    ) -> Result<(), RunsDbError> {
        self.require(id)?;
        let tx = self.conn.unchecked_transaction().map_err(self.e())?;
        {
            let mut st = tx
                .prepare(
                    "INSERT OR IGNORE INTO run_paths (run_id, path, class, nar_size) \
                     VALUES (?1, ?2, ?3, ?4)",
                )
                .map_err(self.e())?;
            for (p, c, n) in paths {
                st.execute(params![id, p, c.as_str(), *n as i64])
                    .map_err(self.e())?;
            }
        }
        tx.commit().map_err(self.e())
    }

    /// Record a VM artifact (state folder, overlay, log) owned by a run. GC removes it with
    /// the run (only if it lies inside the state directory).
    pub fn add_artifact(
        &self,
        id: i64,
        kind: ArtifactKind,
        path: &Path,
    ) -> Result<i64, RunsDbError> {
        self.require(id)?;
        self.conn
            .execute(
                "INSERT INTO artifacts (run_id, kind, path, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![id, kind.as_str(), path.to_string_lossy(), now()],
            )
            .map_err(self.e())?;
        Ok(self.conn.last_insert_rowid())
    }

    fn require(&self, id: i64) -> Result<(), RunsDbError> {
        self.run(id).map(|_| ())
    }

    /// One run, whatever its store.
    pub fn run(&self, id: i64) -> Result<Run, RunsDbError> {
        self.conn
            .query_row(
                &format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"),
                [id],
                row_to_run,
            )
            .optional()
            .map_err(self.e())?
            .ok_or(RunsDbError::UnknownRun(id))
    }

    /// One run of `store`: a run of another store is [`RunsDbError::OtherStore`].
    pub fn run_in_store(&self, store: &StoreLayout, id: i64) -> Result<Run, RunsDbError> {
        let run = self.run(id)?;
        let current = store.id();
        match &run.store {
            Some(s) if !run.belongs_to(&current) => Err(RunsDbError::OtherStore {
                id,
                store: s.clone(),
                current,
            }),
            _ => Ok(run),
        }
    }

    /// All runs of every store, oldest first. Commands use [`RunsDb::runs_in_store`].
    pub fn runs(&self) -> Result<Vec<Run>, RunsDbError> {
        let mut st = self
            .conn
            .prepare(&format!("SELECT {RUN_COLUMNS} FROM runs ORDER BY id"))
            .map_err(self.e())?;
        let rows = st.query_map([], row_to_run).map_err(self.e())?;
        rows.collect::<Result<_, _>>().map_err(self.e())
    }

    /// The runs of `store` (and those recorded before stores were), oldest first, and how
    /// many runs each other store has.
    pub fn runs_by_store(
        &self,
        store: &StoreLayout,
    ) -> Result<(Vec<Run>, Vec<OtherStoreRuns>), RunsDbError> {
        Ok(partition_by_store(self.runs()?, &store.id()))
    }

    /// The runs of `store` (and those recorded before stores were), oldest first.
    pub fn runs_in_store(&self, store: &StoreLayout) -> Result<Vec<Run>, RunsDbError> {
        Ok(self.runs_by_store(store)?.0)
    }

    /// The paths a run claimed.
    pub fn run_paths(&self, id: i64) -> Result<Vec<RunPath>, RunsDbError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT path, class, nar_size, gc_state FROM run_paths WHERE run_id = ?1 \
                 ORDER BY path",
            )
            .map_err(self.e())?;
        let rows = st
            .query_map([id], |r| {
                Ok(RunPath {
                    path: r.get(0)?,
                    class: r.get(1)?,
                    nar_size: r.get::<_, i64>(2)?.max(0) as u64,
                    gc_state: r.get(3)?,
                })
            })
            .map_err(self.e())?;
        rows.collect::<Result<_, _>>().map_err(self.e())
    }

    /// The artifacts of a run.
    pub fn artifacts(&self, id: i64) -> Result<Vec<Artifact>, RunsDbError> {
        let mut st = self
            .conn
            .prepare(
                "SELECT id, kind, path, removed_at FROM artifacts WHERE run_id = ?1 ORDER BY id",
            )
            .map_err(self.e())?;
        let rows = st
            .query_map([id], |r| {
                Ok(Artifact {
                    id: r.get(0)?,
                    kind: r.get(1)?,
                    path: r.get(2)?,
                    removed_at: r.get(3)?,
                })
            })
            .map_err(self.e())?;
        rows.collect::<Result<_, _>>().map_err(self.e())
    }

    /// Mark an artifact removed.
    pub fn artifact_removed(&self, artifact_id: i64) -> Result<(), RunsDbError> {
        self.conn
            .execute(
                "UPDATE artifacts SET removed_at = ?2 WHERE id = ?1",
                params![artifact_id, now()],
            )
            .map_err(self.e())?;
        Ok(())
    }

    /// The directory holding a run's pin links.
    pub fn pins_dir(&self, id: i64) -> PathBuf {
        self.state_dir.join("pins").join(format!("run-{id}"))
    }

    /// Pin a store path for a run: a symlink `STATE/pins/run-ID/BASE -> STORE_PATH`, made an
    /// indirect GC root by a link in the store's `gcroots/auto`. Idempotent.
    pub fn pin(&self, layout: &StoreLayout, id: i64, p: &StorePath) -> Result<Pin, RunsDbError> {
        self.require(id)?;
        let dir = self.pins_dir(id);
        let pin_err = |path: &Path| {
            let path = path.to_owned();
            move |source| RunsDbError::Pin { path, source }
        };
        crate::private::private_tree(&self.state_dir, &dir).map_err(|e| match e {
            crate::private::PrivateError::Io { path, source } => RunsDbError::Pin { path, source },
            e => RunsDbError::NotPrivate(e),
        })?;
        let link = std::path::absolute(dir.join(p.base_name())).map_err(pin_err(&dir))?;
        let target = layout.logical(p);
        replace_symlink(Path::new(&target), &link).map_err(pin_err(&link))?;
        let auto = layout.gcroots_dir().join("auto");
        std::fs::create_dir_all(&auto).map_err(pin_err(&auto))?;
        let root_link = auto.join(format!(
            "drydock-{:016x}",
            fnv1a(link.as_os_str().as_encoded_bytes())
        ));
        replace_symlink(&link, &root_link).map_err(pin_err(&root_link))?;
        self.conn
            .execute(
                "INSERT OR REPLACE INTO pins (run_id, store_path, link, root_link) VALUES (?1, ?2, ?3, ?4)",
                params![id, target, link.to_string_lossy(), root_link.to_string_lossy()],
            )
            .map_err(self.e())?;
        Ok(Pin {
            store_path: target,
            link,
            root_link,
        })
    }

    /// The pins of a run.
    pub fn pins(&self, id: i64) -> Result<Vec<Pin>, RunsDbError> {
        let mut st = self
            .conn
            .prepare("SELECT store_path, link, root_link FROM pins WHERE run_id = ?1")
            .map_err(self.e())?;
        let rows = st
            .query_map([id], |r| {
                Ok(Pin {
                    store_path: r.get(0)?,
                    link: PathBuf::from(r.get::<_, String>(1)?),
                    root_link: PathBuf::from(r.get::<_, String>(2)?),
                })
            })
            .map_err(self.e())?;
        rows.collect::<Result<_, _>>().map_err(self.e())
    }

    /// Remove one pin of a run (both links), e.g. the old system of a VM that switched to a
    /// new one; `store_path` is the logical path as [`RunsDb::pin`] recorded it. Removing a pin
    /// that is not there is not an error. Returns whether there was one.
    pub fn unpin(&self, id: i64, store_path: &str) -> Result<bool, RunsDbError> {
        let Some(p) = self
            .pins(id)?
            .into_iter()
            .find(|p| p.store_path == store_path)
        else {
            return Ok(false);
        };
        remove_pin_links(&p)?;
        self.conn
            .execute(
                "DELETE FROM pins WHERE run_id = ?1 AND store_path = ?2",
                params![id, store_path],
            )
            .map_err(self.e())?;
        Ok(true)
    }

    /// Remove every pin of a run (both links), e.g. when its VM stops or GC takes it.
    pub fn unpin_run(&self, id: i64) -> Result<(), RunsDbError> {
        for p in self.pins(id)? {
            remove_pin_links(&p)?;
        }
        self.conn
            .execute("DELETE FROM pins WHERE run_id = ?1", [id])
            .map_err(self.e())?;
        Ok(())
    }

    /// Start recording a GC in `store`: the event and every planned path, in one transaction.
    pub fn begin_gc(
        &self,
        store: &StoreLayout,
        mode: &str,
        planned: &crate::names::NameList,
        planned_bytes: u64,
    ) -> Result<i64, RunsDbError> {
        let tx = self.conn.unchecked_transaction().map_err(self.e())?;
        tx.execute(
            "INSERT INTO gc_events (started_at, mode, status, planned_paths, planned_bytes, store) \
             VALUES (?1, ?2, 'running', ?3, ?4, ?5)",
            params![
                now(),
                mode,
                planned.len() as i64,
                planned_bytes as i64,
                store.id()
            ],
        )
        .map_err(self.e())?;
        let ev = tx.last_insert_rowid();
        {
            let mut st = tx
                .prepare("INSERT OR IGNORE INTO gc_paths (event_id, path, outcome) VALUES (?1, ?2, 'planned')")
                .map_err(self.e())?;
            for p in planned {
                st.execute(params![ev, p]).map_err(self.e())?;
            }
        }
        tx.commit().map_err(self.e())?;
        Ok(ev)
    }

    /// Record the outcome of some paths of a GC (after a batch), in one transaction, and
    /// mirror it on the runs of the event's store that claimed them (the same path in another
    /// store is another file).
    pub fn record_outcomes(
        &self,
        event: i64,
        deleted: &[String],
        refused: &[(String, String)],
    ) -> Result<(), RunsDbError> {
        let tx = self.conn.unchecked_transaction().map_err(self.e())?;
        {
            let mut up = tx
                .prepare("UPDATE gc_paths SET outcome = ?3, detail = ?4 WHERE event_id = ?1 AND path = ?2")
                .map_err(self.e())?;
            // An event of no recorded store (from before stores were) mirrors on every run.
            let store: Option<String> = tx
                .query_row("SELECT store FROM gc_events WHERE id = ?1", [event], |r| {
                    r.get(0)
                })
                .optional()
                .map_err(self.e())?
                .flatten();
            let mut rp = tx
                .prepare(
                    "UPDATE run_paths SET gc_state = ?2 WHERE path = ?1 AND (?3 IS NULL OR \
                     run_id IN (SELECT id FROM runs WHERE store IS NULL OR store = ?3))",
                )
                .map_err(self.e())?;
            for p in deleted {
                up.execute(params![event, p, "deleted", Option::<String>::None])
                    .map_err(self.e())?;
                rp.execute(params![p, "deleted", store]).map_err(self.e())?;
            }
            for (p, why) in refused {
                up.execute(params![event, p, "refused", why])
                    .map_err(self.e())?;
                rp.execute(params![p, "refused", store]).map_err(self.e())?;
            }
        }
        tx.commit().map_err(self.e())
    }

    /// Close a GC event.
    pub fn finish_gc(
        &self,
        event: i64,
        status: &str,
        freed_bytes: Option<i64>,
    ) -> Result<(), RunsDbError> {
        self.conn
            .execute(
                "UPDATE gc_events SET status = ?2, finished_at = ?3, freed_bytes = ?4 WHERE id = ?1",
                params![event, status, now(), freed_bytes],
            )
            .map_err(self.e())?;
        Ok(())
    }

    /// GC events left running by a killed drydock (in any store), with their still-planned
    /// paths.
    pub fn unfinished_gcs(&self) -> Result<Vec<UnfinishedGc>, RunsDbError> {
        let events: Vec<(i64, Option<String>)> = {
            let mut st = self
                .conn
                .prepare("SELECT id, store FROM gc_events WHERE status = 'running' ORDER BY id")
                .map_err(self.e())?;
            let rows = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(self.e())?;
            rows.collect::<Result<_, _>>().map_err(self.e())?
        };
        let mut out = Vec::new();
        for (id, store) in events {
            let mut st = self
                .conn
                .prepare("SELECT path FROM gc_paths WHERE event_id = ?1 AND outcome = 'planned'")
                .map_err(self.e())?;
            let planned = st
                .query_map([id], |r| r.get(0))
                .map_err(self.e())?
                .collect::<Result<_, _>>()
                .map_err(self.e())?;
            out.push(UnfinishedGc { id, store, planned });
        }
        Ok(out)
    }

    /// Mark runs as collected (all their claimed paths handled, VM state removed).
    pub fn mark_collected(&self, id: i64) -> Result<(), RunsDbError> {
        self.conn
            .execute(
                "UPDATE runs SET collected_at = ?2 WHERE id = ?1",
                params![id, now()],
            )
            .map_err(self.e())?;
        Ok(())
    }

    /// Count of GC events by status (for tests and reports).
    pub fn gc_event_statuses(&self) -> Result<Vec<(i64, String)>, RunsDbError> {
        let mut st = self
            .conn
            .prepare("SELECT id, status FROM gc_events ORDER BY id")
            .map_err(self.e())?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(self.e())?;
        rows.collect::<Result<_, _>>().map_err(self.e())
    }
}

fn row_to_run(r: &rusqlite::Row<'_>) -> rusqlite::Result<Run> {
    let cmd: String = r.get(2)?;
    Ok(Run {
        id: r.get(0)?,
        name: r.get(1)?,
        command: serde_json::from_str(&cmd).unwrap_or_else(|_| vec![cmd]),
        kind: r.get(3)?,
        started_at: r.get(4)?,
        ended_at: r.get(5)?,
        exit_status: r.get(6)?,
        collected_at: r.get(7)?,
        store: r.get(8)?,
    })
}

fn replace_symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    let tmp = link.with_extension("tmp-link");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)?;
    std::fs::rename(&tmp, link)
}

pub(crate) fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::roots::{RootKind, find_link_roots};

    /// A chroot store layout (nothing on disk needed: its id is its absolute store dir).
    fn store(name: &str) -> StoreLayout {
        StoreLayout::chroot(format!("/nonexistent-drydock-test/{name}"))
    }

    #[test]
    fn runs_paths_artifacts_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let db = RunsDb::open(dir.path()).unwrap();
        let id = db
            .begin_run(
                &store("a"),
                "t",
                &["nix-build".into(), "x.nix".into()],
                RunKind::Build,
            )
            .unwrap();
        db.add_paths(id, &[("/nix/store/a".into(), PathClass::TestRun, 5)])
            .unwrap();
        let art = db
            .add_artifact(id, ArtifactKind::StateDir, &dir.path().join("vms/a"))
            .unwrap();
        db.finish_run(id, Some(3)).unwrap();
        let r = db.run(id).unwrap();
        assert_eq!(r.command, vec!["nix-build", "x.nix"]);
        assert_eq!(r.exit_status, Some(3));
        assert!(r.ended_at.is_some());
        assert_eq!(
            db.run_paths(id).unwrap()[0].class,
            crate::classify::PathClass::TestRun
        );
        db.artifact_removed(art).unwrap();
        assert!(db.artifacts(id).unwrap()[0].removed_at.is_some());
        assert!(matches!(db.run(99), Err(RunsDbError::UnknownRun(99))));
        assert_eq!(
            db.finish_run(99, None).unwrap_err().exit_class(),
            ExitClass::BadInput
        );
        drop(db);
        // Reopening keeps data and does not re-migrate.
        let db = RunsDb::open(dir.path()).unwrap();
        assert_eq!(db.runs().unwrap().len(), 1);
    }

    #[test]
    fn concurrent_first_opens_migrate_once() {
        for _ in 0..10 {
            let dir = tempfile::tempdir().unwrap();
            std::thread::scope(|s| {
                let hs: Vec<_> = (0..4)
                    .map(|_| s.spawn(|| RunsDb::open(dir.path()).map(|_| ())))
                    .collect();
                for h in hs {
                    h.join().unwrap().unwrap();
                }
            });
        }
    }

    #[test]
    fn gc_events_and_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let db = RunsDb::open(dir.path()).unwrap();
        let id = db.begin_run(&store("a"), "t", &[], RunKind::Build).unwrap();
        db.add_paths(id, &[("/nix/store/a".into(), PathClass::Other, 1)])
            .unwrap();
        let ev = db
            .begin_gc(
                &store("a"),
                "runs",
                &["/nix/store/a", "/nix/store/b"].into_iter().collect(),
                10,
            )
            .unwrap();
        db.record_outcomes(ev, &["/nix/store/a".into()], &[])
            .unwrap();
        let u = db.unfinished_gcs().unwrap();
        assert_eq!(
            u,
            vec![UnfinishedGc {
                id: ev,
                store: Some(store("a").id()),
                planned: vec!["/nix/store/b".into()]
            }]
        );
        assert_eq!(
            db.run_paths(id).unwrap()[0].gc_state.as_deref(),
            Some("deleted")
        );
        db.finish_gc(ev, "interrupted", None).unwrap();
        assert!(db.unfinished_gcs().unwrap().is_empty());
    }

    #[test]
    fn corrupt_and_foreign_files_are_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(RUNS_DB_FILE), vec![b'x'; 4096]).unwrap();
        let e = RunsDb::open(dir.path()).unwrap_err();
        assert_eq!(e.exit_class(), ExitClass::BadInput, "{e}");
        let dir = tempfile::tempdir().unwrap();
        let c = Connection::open(dir.path().join(RUNS_DB_FILE)).unwrap();
        c.execute_batch("CREATE TABLE other (x)").unwrap();
        drop(c);
        assert_eq!(
            RunsDb::open(dir.path()).unwrap_err().exit_class(),
            ExitClass::BadInput
        );
        let dir = tempfile::tempdir().unwrap();
        let c = Connection::open(dir.path().join(RUNS_DB_FILE)).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        assert!(matches!(
            RunsDb::open(dir.path()),
            Err(RunsDbError::TooNew { found: 99, .. })
        ));
    }

    #[test]
    fn pins_are_indirect_roots_nix_finds() {
        let dir = tempfile::tempdir().unwrap();
        let layout = StoreLayout::chroot(dir.path().join("root"));
        let db = RunsDb::open(&dir.path().join("state")).unwrap();
        let id = db.begin_run(&layout, "vm", &[], RunKind::Vm).unwrap();
        let p = StorePath::from_base_name(&format!("{}-nixos-system-x", "1".repeat(32))).unwrap();
        let pin = db.pin(&layout, id, &p).unwrap();
        db.pin(&layout, id, &p).unwrap();
        let roots = find_link_roots(&layout).unwrap();
        assert_eq!(roots.len(), 1);
        assert_eq!(roots[0].path, p);
        assert_eq!(roots[0].kind, RootKind::Indirect);
        assert_eq!(roots[0].link, pin.link);
        assert!(pin.link.starts_with(db.pins_dir(id)));
        db.unpin_run(id).unwrap();
        assert!(find_link_roots(&layout).unwrap().is_empty());
        assert!(db.pins(id).unwrap().is_empty());
    }

    #[test]
    fn one_pin_moves_and_the_other_stays() {
        let dir = tempfile::tempdir().unwrap();
        let layout = StoreLayout::chroot(dir.path().join("root"));
        let db = RunsDb::open(&dir.path().join("state")).unwrap();
        let id = db.begin_run(&layout, "vm", &[], RunKind::Vm).unwrap();
        let sys = |c: &str| {
            StorePath::from_base_name(&format!("{}-nixos-system-x", c.repeat(32))).unwrap()
        };
        let (old, new) = (sys("1"), sys("2"));
        let old_pin = db.pin(&layout, id, &old).unwrap();
        db.pin(&layout, id, &new).unwrap();
        assert!(db.unpin(id, &old_pin.store_path).unwrap());
        assert!(!db.unpin(id, &old_pin.store_path).unwrap(), "already gone");
        let roots = find_link_roots(&layout).unwrap();
        assert_eq!(roots.iter().map(|r| &r.path).collect::<Vec<_>>(), [&new]);
        assert!(!old_pin.link.exists() && !old_pin.root_link.exists());
        let pins = db.pins(id).unwrap();
        assert_eq!(pins.len(), 1);
        assert_eq!(pins[0].store_path, layout.logical(&new));
    }

    #[test]
    fn runs_belong_to_their_store() {
        let dir = tempfile::tempdir().unwrap();
        let db = RunsDb::open(dir.path()).unwrap();
        let (a, b) = (store("a"), store("b"));
        let ra = db.begin_run(&a, "in-a", &[], RunKind::Build).unwrap();
        let rb = db.begin_run(&b, "in-b", &[], RunKind::Vm).unwrap();
        let rb2 = db.begin_run(&b, "in-b-2", &[], RunKind::Build).unwrap();
        assert_eq!(
            db.run(ra).unwrap().store.as_deref(),
            Some("/nonexistent-drydock-test/a/nix/store")
        );
        let ids = |v: Vec<Run>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(ids(db.runs_in_store(&a).unwrap()), vec![ra]);
        assert_eq!(ids(db.runs_in_store(&b).unwrap()), vec![rb, rb2]);
        let (own, others) = db.runs_by_store(&a).unwrap();
        assert_eq!(ids(own), vec![ra]);
        assert_eq!(
            others,
            vec![OtherStoreRuns {
                store: b.id(),
                runs: 2
            }]
        );
        assert_eq!(
            db.runs_by_store(&b).unwrap().1,
            vec![OtherStoreRuns {
                store: a.id(),
                runs: 1
            }]
        );
        assert_eq!(db.run_in_store(&a, ra).unwrap().id, ra);
        let e = db.run_in_store(&a, rb).unwrap_err();
        assert_eq!(e.exit_class(), ExitClass::BadInput);
        let msg = e.to_string();
        assert!(
            msg.contains(&b.id()) && msg.contains("--store /nonexistent-drydock-test/b"),
            "{msg}"
        );
        assert!(matches!(
            db.run_in_store(&a, 99),
            Err(RunsDbError::UnknownRun(99))
        ));
        // A third store sees neither.
        assert!(db.runs_in_store(&store("c")).unwrap().is_empty());
    }

    #[test]
    fn gc_outcomes_mirror_only_on_runs_of_the_events_store() {
        let dir = tempfile::tempdir().unwrap();
        let db = RunsDb::open(dir.path()).unwrap();
        let (a, b) = (store("a"), store("b"));
        // The same derivation built in two stores: the same logical path, two files.
        let p = "/nix/store/aaaa-same".to_owned();
        let ra = db.begin_run(&a, "a", &[], RunKind::Build).unwrap();
        let rb = db.begin_run(&b, "b", &[], RunKind::Build).unwrap();
        for id in [ra, rb] {
            db.add_paths(id, &[(p.clone(), PathClass::Other, 1)])
                .unwrap();
        }
        let ev = db
            .begin_gc(&a, "runs", &[&p].into_iter().collect(), 1)
            .unwrap();
        db.record_outcomes(ev, std::slice::from_ref(&p), &[])
            .unwrap();
        assert_eq!(
            db.run_paths(ra).unwrap()[0].gc_state.as_deref(),
            Some("deleted")
        );
        assert_eq!(db.run_paths(rb).unwrap()[0].gc_state, None);
        assert_eq!(
            db.unfinished_gcs().unwrap()[0].store.as_deref(),
            Some(a.id().as_str())
        );
    }

    #[test]
    fn a_version_1_database_migrates_and_keeps_its_runs() {
        let dir = tempfile::tempdir().unwrap();
        {
            // What drydock before stores were recorded left behind.
            let c = Connection::open(dir.path().join(RUNS_DB_FILE)).unwrap();
            c.execute_batch(MIGRATIONS[0]).unwrap();
            c.pragma_update(None, "user_version", 1).unwrap();
            c.execute(
                "INSERT INTO runs (name, command, kind, started_at, ended_at, exit_status) \
                 VALUES ('old', '[\"nix-build\"]', 'build', 100, 110, 0)",
                [],
            )
            .unwrap();
            c.execute(
                "INSERT INTO run_paths (run_id, path, class, nar_size) VALUES (1, '/nix/store/o', 'other', 7)",
                [],
            )
            .unwrap();
            c.execute(
                "INSERT INTO gc_events (started_at, mode, status, planned_paths, planned_bytes) \
                 VALUES (120, 'runs', 'running', 1, 7)",
                [],
            )
            .unwrap();
            c.execute(
                "INSERT INTO gc_paths (event_id, path, outcome) VALUES (1, '/nix/store/o', 'planned')",
                [],
            )
            .unwrap();
        }
        let db = RunsDb::open(dir.path()).unwrap();
        let version: i64 = db
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        let old = db.run(1).unwrap();
        assert_eq!((old.name.as_str(), old.store.as_deref()), ("old", None));
        assert_eq!(db.run_paths(1).unwrap()[0].nar_size, 7);
        // A run of no recorded store belongs to whichever store a command uses.
        let (a, b) = (store("a"), store("b"));
        let new = db.begin_run(&b, "new", &[], RunKind::Build).unwrap();
        let ids = |v: Vec<Run>| v.into_iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(ids(db.runs_in_store(&a).unwrap()), vec![1]);
        assert_eq!(ids(db.runs_in_store(&b).unwrap()), vec![1, new]);
        assert_eq!(db.run_in_store(&a, 1).unwrap().id, 1);
        assert!(db.runs_by_store(&b).unwrap().1.is_empty());
        // An interrupted GC from before has no store, and mirrors on every run.
        let u = db.unfinished_gcs().unwrap();
        assert_eq!((u[0].id, u[0].store.clone()), (1, None));
        db.record_outcomes(1, &["/nix/store/o".into()], &[])
            .unwrap();
        assert_eq!(
            db.run_paths(1).unwrap()[0].gc_state.as_deref(),
            Some("deleted")
        );
        drop(db);
        // Reopening does not migrate again.
        let db = RunsDb::open(dir.path()).unwrap();
        assert_eq!(db.runs().unwrap().len(), 2);
    }
}
