//! Read-only access to Nix's own database (`db.sqlite`): a consistent snapshot of
//! `ValidPaths`, `Refs` and `DerivationOutputs`, and the few narrow queries `track` needs.
//! The database is opened read-only, with a busy timeout, inside one read transaction, so a
//! concurrent Nix writer (WAL mode) is never blocked and never seen half-way.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use crate::store_path::{StoreLayout, StorePath};

/// How long to wait for Nix's write lock before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors reading Nix's database.
#[derive(Debug, thiserror::Error)]
pub enum NixDbError {
    /// There is no database file: the directory is not a Nix store.
    #[error("'{}' is not a Nix store: no database at {}", root.display(), db.display())]
    NotAStore { root: PathBuf, db: PathBuf },
    /// SQLite could not open the database.
    #[error("cannot open Nix database {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// The file is a database (or empty), but not Nix's: it has no `ValidPaths` table.
    #[error("{} is not a Nix database (it has no ValidPaths table)", path.display())]
    NotNixDb { path: PathBuf },
    /// A query failed.
    #[error("reading Nix database {}", path.display())]
    Query {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
}

impl NixDbError {
    /// Whether the error comes from what the user named (a `--store` that is not a store).
    pub fn is_bad_input(&self) -> bool {
        match self {
            Self::NotAStore { .. } | Self::NotNixDb { .. } => true,
            Self::Open { source, .. } | Self::Query { source, .. } => matches!(
                source.sqlite_error_code(),
                Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
            ),
        }
    }
}

/// A fast, non-cryptographic hasher (FxHash's multiply-rotate) for the snapshot's indexes:
/// keys are store paths and row ids read from a local database, not attacker-chosen.
#[derive(Debug, Default, Clone, Copy)]
pub struct FastHasher(u64);

impl std::hash::Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            self.write_u64(u64::from_le_bytes(b));
        }
        for &b in chunks.remainder() {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }
    fn write_i64(&mut self, v: i64) {
        self.write_u64(v as u64);
    }
    fn write_u8(&mut self, v: u8) {
        self.write_u64(u64::from(v));
    }
    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }
}

/// `HashMap` with [`FastHasher`].
pub type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<FastHasher>>;

/// Index of a path inside a [`Snapshot`].
pub type Node = u32;

/// One registered path.
#[derive(Debug, Clone)]
pub struct PathInfo {
    /// Nix's row id (grows with registration order).
    pub id: i64,
    /// The path.
    pub path: StorePath,
    /// Registration time, seconds since the epoch.
    pub registration_time: i64,
    /// The deriver Nix recorded, if any (it need not be valid).
    pub deriver: Option<StorePath>,
    /// NAR size in bytes (0 if unknown).
    pub nar_size: u64,
}

/// A consistent, in-memory view of the registered paths and their relations.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// All valid paths; a [`Node`] indexes this.
    pub paths: Vec<PathInfo>,
    /// References of each node (self references removed).
    pub refs: Vec<Vec<Node>>,
    /// Referrers of each node (self references removed).
    pub referrers: Vec<Vec<Node>>,
    /// Outputs recorded in `DerivationOutputs` for each derivation node: (output name, path).
    pub drv_outputs: FastMap<Node, Vec<(String, StorePath)>>,
    /// Derivations that list a node as one of their outputs.
    pub output_of: FastMap<Node, Vec<Node>>,
    index: FastMap<StorePath, Node>,
}

impl Snapshot {
    /// Build a snapshot from plain data (used by the planner's unit tests and fixtures).
    /// `refs` are pairs (referrer, reference) of indexes into `paths`; `drv_outputs` are
    /// (derivation index, output name, output path).
    pub fn from_parts(
        paths: Vec<PathInfo>,
        refs: &[(Node, Node)],
        drv_outputs: &[(Node, String, StorePath)],
    ) -> Self {
        let n = paths.len();
        let index = paths
            .iter()
            .enumerate()
            .map(|(i, p)| (p.path.clone(), i as Node))
            .collect::<FastMap<_, _>>();
        let mut s = Self {
            refs: vec![Vec::new(); n],
            referrers: vec![Vec::new(); n],
            paths,
            index,
            ..Self::default()
        };
        for &(a, b) in refs {
            if a != b && (a as usize) < n && (b as usize) < n {
                s.refs[a as usize].push(b);
                s.referrers[b as usize].push(a);
            }
        }
        for (d, name, out) in drv_outputs {
            if (*d as usize) >= n {
                continue;
            }
            if let Some(&o) = s.index.get(out) {
                s.output_of.entry(o).or_default().push(*d);
            }
            s.drv_outputs
                .entry(*d)
                .or_default()
                .push((name.clone(), out.clone()));
        }
        s
    }

    /// The node of a path, if it is valid.
    pub fn node(&self, p: &StorePath) -> Option<Node> {
        self.index.get(p).copied()
    }

    /// The path of a node.
    pub fn path(&self, n: Node) -> &StorePath {
        &self.paths[n as usize].path
    }

    /// Number of valid paths.
    pub fn len(&self) -> usize {
        self.paths.len()
    }

    /// Whether no path is registered.
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// The highest row id (0 for an empty store).
    pub fn max_id(&self) -> i64 {
        self.paths.iter().map(|p| p.id).max().unwrap_or(0)
    }

    /// The reference closure of some nodes (including them).
    pub fn closure(&self, start: impl IntoIterator<Item = Node>) -> Vec<Node> {
        let mut seen = vec![false; self.len()];
        let mut stack: Vec<Node> = Vec::new();
        for s in start {
            if !seen[s as usize] {
                seen[s as usize] = true;
                stack.push(s);
            }
        }
        let mut out = Vec::new();
        while let Some(n) = stack.pop() {
            out.push(n);
            for &r in &self.refs[n as usize] {
                if !seen[r as usize] {
                    seen[r as usize] = true;
                    stack.push(r);
                }
            }
        }
        out
    }
}

/// A read-only connection to Nix's database.
#[derive(Debug)]
pub struct NixDb {
    conn: Connection,
    path: PathBuf,
    layout: StoreLayout,
}

impl NixDb {
    /// Open the database of a store read-only. A missing database is bad input.
    pub fn open(layout: &StoreLayout) -> Result<Self, NixDbError> {
        let path = layout.db_path();
        if !path.is_file() {
            return Err(NixDbError::NotAStore {
                root: layout
                    .root
                    .clone()
                    .unwrap_or_else(|| layout.state_dir.clone()),
                db: path,
            });
        }
        let conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|source| NixDbError::Open {
            path: path.clone(),
            source,
        })?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(|source| NixDbError::Open {
                path: path.clone(),
                source,
            })?;
        // An empty file (or another program's database) opens fine: it has no ValidPaths.
        let tables: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'ValidPaths'",
                [],
                |r| r.get(0),
            )
            .map_err(|source| NixDbError::Open {
                path: path.clone(),
                source,
            })?;
        if tables == 0 {
            return Err(NixDbError::NotNixDb { path });
        }
        Ok(Self {
            conn,
            path,
            layout: layout.clone(),
        })
    }

    fn q(&self) -> impl Fn(rusqlite::Error) -> NixDbError + '_ {
        |source| NixDbError::Query {
            path: self.path.clone(),
            source,
        }
    }

    /// Read every valid path, reference and derivation output in one read transaction.
    pub fn snapshot(&self) -> Result<Snapshot, NixDbError> {
        let tx = self.conn.unchecked_transaction().map_err(self.q())?;
        let sd = &self.layout.logical_store_dir;
        let mut paths = Vec::new();
        let mut by_id: FastMap<i64, Node> = FastMap::default();
        {
            let mut st = tx
                .prepare("SELECT id, path, registrationTime, deriver, narSize FROM ValidPaths")
                .map_err(self.q())?;
            let mut rows = st.query([]).map_err(self.q())?;
            while let Some(row) = rows.next().map_err(self.q())? {
                let id: i64 = row.get(0).map_err(self.q())?;
                let p: String = row.get(1).map_err(self.q())?;
                let Ok(path) = StorePath::parse(sd, &p) else {
                    tracing::warn!("ignoring malformed path in Nix database: {p}");
                    continue;
                };
                let deriver: Option<String> = row.get(3).map_err(self.q())?;
                let nar: Option<i64> = row.get(4).map_err(self.q())?;
                by_id.insert(id, paths.len() as Node);
                paths.push(PathInfo {
                    id,
                    path,
                    registration_time: row.get(2).map_err(self.q())?,
                    deriver: deriver.and_then(|d| StorePath::parse(sd, &d).ok()),
                    nar_size: nar.unwrap_or(0).max(0) as u64,
                });
            }
        }
        let mut refs = Vec::new();
        {
            let mut st = tx
                .prepare("SELECT referrer, reference FROM Refs")
                .map_err(self.q())?;
            let mut rows = st.query([]).map_err(self.q())?;
            while let Some(row) = rows.next().map_err(self.q())? {
                let a: i64 = row.get(0).map_err(self.q())?;
                let b: i64 = row.get(1).map_err(self.q())?;
                if let (Some(&a), Some(&b)) = (by_id.get(&a), by_id.get(&b)) {
                    refs.push((a, b));
                }
            }
        }
        let mut outs = Vec::new();
        {
            let mut st = tx
                .prepare("SELECT drv, id, path FROM DerivationOutputs")
                .map_err(self.q())?;
            let mut rows = st.query([]).map_err(self.q())?;
            while let Some(row) = rows.next().map_err(self.q())? {
                let d: i64 = row.get(0).map_err(self.q())?;
                let name: String = row.get(1).map_err(self.q())?;
                let p: String = row.get(2).map_err(self.q())?;
                if let (Some(&d), Ok(p)) = (by_id.get(&d), StorePath::parse(sd, &p)) {
                    outs.push((d, name, p));
                }
            }
        }
        tx.finish().map_err(self.q())?;
        Ok(Snapshot::from_parts(paths, &refs, &outs))
    }

    /// The highest row id of `ValidPaths` (0 when empty).
    pub fn max_path_id(&self) -> Result<i64, NixDbError> {
        self.conn
            .query_row("SELECT coalesce(max(id), 0) FROM ValidPaths", [], |r| {
                r.get(0)
            })
            .map_err(self.q())
    }

    /// Paths registered with a row id above `id`: (id, path, deriver, nar size).
    pub fn paths_since(&self, id: i64) -> Result<Vec<PathInfo>, NixDbError> {
        let sd = &self.layout.logical_store_dir;
        let mut st = self
            .conn
            .prepare(
                "SELECT id, path, registrationTime, deriver, narSize FROM ValidPaths \
                 WHERE id > ?1 ORDER BY id",
            )
            .map_err(self.q())?;
        let rows = st
            .query_map([id], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, i64>(2)?,
                    row.get::<_, Option<String>>(3)?,
                    row.get::<_, Option<i64>>(4)?,
                ))
            })
            .map_err(self.q())?;
        let mut out = Vec::new();
        for r in rows {
            let (id, p, t, d, n) = r.map_err(self.q())?;
            if let Ok(path) = StorePath::parse(sd, &p) {
                out.push(PathInfo {
                    id,
                    path,
                    registration_time: t,
                    deriver: d.and_then(|d| StorePath::parse(sd, &d).ok()),
                    nar_size: n.unwrap_or(0).max(0) as u64,
                });
            }
        }
        Ok(out)
    }

    /// Information about one path, if valid.
    pub fn path_info(&self, p: &StorePath) -> Result<Option<PathInfo>, NixDbError> {
        let sd = &self.layout.logical_store_dir;
        let full = self.layout.logical(p);
        self.conn
            .query_row(
                "SELECT id, registrationTime, deriver, narSize FROM ValidPaths WHERE path = ?1",
                [&full],
                |row| {
                    Ok(PathInfo {
                        id: row.get(0)?,
                        path: p.clone(),
                        registration_time: row.get(1)?,
                        deriver: row
                            .get::<_, Option<String>>(2)?
                            .and_then(|d| StorePath::parse(sd, &d).ok()),
                        nar_size: row.get::<_, Option<i64>>(3)?.unwrap_or(0).max(0) as u64,
                    })
                },
            )
            .optional()
            .map_err(self.q())
    }

    /// Whether a path is registered.
    pub fn is_valid(&self, p: &StorePath) -> Result<bool, NixDbError> {
        Ok(self.path_info(p)?.is_some())
    }

    /// Direct references of a valid path.
    pub fn references(&self, p: &StorePath) -> Result<Vec<StorePath>, NixDbError> {
        self.paths_for(
            "SELECT r.path FROM ValidPaths v JOIN Refs ON Refs.referrer = v.id \
             JOIN ValidPaths r ON r.id = Refs.reference WHERE v.path = ?1",
            p,
        )
    }

    /// Run `sql`, which takes `p`'s logical path as `?1` and selects store paths; rows that
    /// are not store paths of this store are skipped.
    fn paths_for(&self, sql: &str, p: &StorePath) -> Result<Vec<StorePath>, NixDbError> {
        let sd = &self.layout.logical_store_dir;
        let mut st = self.conn.prepare_cached(sql).map_err(self.q())?;
        let rows = st
            .query_map([self.layout.logical(p)], |r| r.get::<_, String>(0))
            .map_err(self.q())?;
        let mut out = Vec::new();
        for r in rows {
            if let Ok(sp) = StorePath::parse(sd, &r.map_err(self.q())?) {
                out.push(sp);
            }
        }
        Ok(out)
    }

    /// The reference closure of `p` (itself included), or `None` when `p` is not registered.
    /// One recursive query: no need to load the whole database for one closure.
    pub fn closure_of(&self, p: &StorePath) -> Result<Option<Vec<StorePath>>, NixDbError> {
        if self.path_info(p)?.is_none() {
            return Ok(None);
        }
        self.paths_for(
            "WITH RECURSIVE c(id) AS ( \
               SELECT id FROM ValidPaths WHERE path = ?1 \
               UNION SELECT Refs.reference FROM Refs JOIN c ON Refs.referrer = c.id) \
             SELECT v.path FROM c JOIN ValidPaths v ON v.id = c.id",
            p,
        )
        .map(Some)
    }

    /// Valid derivations that list `p` as an output.
    pub fn derivers_of(&self, p: &StorePath) -> Result<Vec<StorePath>, NixDbError> {
        self.paths_for(
            "SELECT v.path FROM DerivationOutputs d JOIN ValidPaths v ON d.drv = v.id \
             WHERE d.path = ?1",
            p,
        )
    }

    /// The database file.
    pub fn file(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(name: &str) -> StorePath {
        StorePath::from_base_name(&format!(
            "{}-{name}",
            "a".repeat(31) + &name.len().to_string()[..1]
        ))
        .unwrap()
    }

    fn info(id: i64, p: StorePath) -> PathInfo {
        PathInfo {
            id,
            path: p,
            registration_time: 1,
            deriver: None,
            nar_size: 10,
        }
    }

    /// A database in Nix's own schema, filled by hand.
    fn nix_db(dir: &Path) -> StoreLayout {
        let layout = StoreLayout::chroot(dir);
        std::fs::create_dir_all(layout.db_path().parent().unwrap()).unwrap();
        let c = Connection::open(layout.db_path()).unwrap();
        c.execute_batch(
            "PRAGMA journal_mode=WAL;
             CREATE TABLE ValidPaths (id integer primary key autoincrement not null,
               path text unique not null, hash text not null, registrationTime integer not null,
               deriver text, narSize integer, ultimate integer, sigs text, ca text);
             CREATE TABLE Refs (referrer integer not null, reference integer not null,
               primary key (referrer, reference));
             CREATE TABLE DerivationOutputs (drv integer not null, id text not null,
               path text not null, primary key (drv, id));
             INSERT INTO ValidPaths VALUES
               (1, '/nix/store/00000000000000000000000000000000-a.drv', 'h', 5, NULL, 100, NULL, NULL, NULL),
               (2, '/nix/store/11111111111111111111111111111111-a', 'h', 6,
                   '/nix/store/00000000000000000000000000000000-a.drv', 200, NULL, NULL, NULL),
               (3, '/nix/store/22222222222222222222222222222222-b', 'h', 7, NULL, NULL, NULL, NULL, NULL),
               (4, '/bogus/path', 'h', 7, NULL, NULL, NULL, NULL, NULL);
             INSERT INTO Refs VALUES (2, 3), (2, 2), (4, 3);
             INSERT INTO DerivationOutputs VALUES (1, 'out', '/nix/store/11111111111111111111111111111111-a');",
        )
        .unwrap();
        layout
    }

    #[test]
    fn snapshot_reads_nix_schema() {
        let dir = tempfile::tempdir().unwrap();
        let layout = nix_db(dir.path());
        let db = NixDb::open(&layout).unwrap();
        let s = db.snapshot().unwrap();
        assert_eq!(s.len(), 3, "the malformed path is skipped");
        let a = s
            .node(&StorePath::from_base_name("11111111111111111111111111111111-a").unwrap())
            .unwrap();
        let b = s
            .node(&StorePath::from_base_name("22222222222222222222222222222222-b").unwrap())
            .unwrap();
        let d = s
            .node(&StorePath::from_base_name("00000000000000000000000000000000-a.drv").unwrap())
            .unwrap();
        assert_eq!(s.refs[a as usize], vec![b], "self reference dropped");
        assert_eq!(s.referrers[b as usize], vec![a]);
        assert_eq!(s.paths[a as usize].deriver.as_ref(), Some(s.path(d)));
        assert_eq!(s.paths[a as usize].nar_size, 200);
        assert_eq!(s.paths[b as usize].nar_size, 0);
        assert_eq!(s.output_of[&a], vec![d]);
        assert_eq!(s.drv_outputs[&d][0].0, "out");
        assert_eq!(s.max_id(), 3);
        assert_eq!(db.max_path_id().unwrap(), 4);
        let since = db.paths_since(1).unwrap();
        assert_eq!(since.len(), 2);
        assert_eq!(db.references(s.path(a)).unwrap().len(), 2);
        assert_eq!(db.derivers_of(s.path(a)).unwrap(), vec![s.path(d).clone()]);
        assert!(db.is_valid(s.path(b)).unwrap());
        assert!(!db.is_valid(&sp("zzz")).unwrap());
        let mut c = s.closure([a]);
        c.sort();
        let mut want = vec![a, b];
        want.sort();
        assert_eq!(c, want); // The recursive query agrees with the snapshot's walk.
        let mut q = db.closure_of(s.path(a)).unwrap().unwrap();
        q.sort();
        let mut w: Vec<StorePath> = want.iter().map(|n| s.path(*n).clone()).collect();
        w.sort();
        assert_eq!(q, w);
        assert_eq!(db.closure_of(&sp("zzz")).unwrap(), None);
    }

    #[test]
    fn missing_or_corrupt_database_is_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let layout = StoreLayout::chroot(dir.path());
        let e = NixDb::open(&layout).unwrap_err();
        assert!(e.is_bad_input(), "{e}");
        std::fs::create_dir_all(layout.db_path().parent().unwrap()).unwrap();
        std::fs::write(layout.db_path(), vec![7u8; 8192]).unwrap();
        let e = NixDb::open(&layout)
            .and_then(|db| db.snapshot())
            .unwrap_err();
        assert!(e.is_bad_input(), "{e}");
    }

    #[test]
    fn from_parts_ignores_out_of_range() {
        let s = Snapshot::from_parts(vec![info(1, sp("x"))], &[(0, 5), (0, 0)], &[]);
        assert!(s.refs[0].is_empty());
    }
}
