//! Read-only access to Nix's own database (`db.sqlite`): a consistent snapshot of
//! `ValidPaths`, `Refs` and `DerivationOutputs`, and the few narrow queries `track` needs.
//! The database is opened read-only, with a busy timeout, inside one read transaction, so a
//! concurrent Nix writer (WAL mode) is never blocked and never seen half-way.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use crate::exitclass::{Classify, ExitClass};
use crate::names::NameList;
use crate::store_path::{StoreLayout, StorePath, parse_base_name};

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
    /// `self.exit_class() == ExitClass::BadInput`, for drydock-vm's own `is_bad_input`s until
    /// they ask [`Classify`]; remove then.
    pub fn is_bad_input(&self) -> bool {
        self.exit_class() == ExitClass::BadInput
    }
}

impl Classify for NixDbError {
    /// Bad input when the error comes from what the user named (a `--store` that is not a
    /// store, a file that is not Nix's database); a failure otherwise.
    fn exit_class(&self) -> ExitClass {
        let bad = match self {
            Self::NotAStore { .. } | Self::NotNixDb { .. } => true,
            Self::Open { source, .. } | Self::Query { source, .. } => matches!(
                source.sqlite_error_code(),
                Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt)
            ),
        };
        if bad {
            ExitClass::BadInput
        } else {
            ExitClass::Failed
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

/// "No node" in the snapshot's dense per-node arrays.
const NO_NODE: Node = Node::MAX;

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

/// Compressed sparse rows: for each node, a list of items (nodes, by default), all in one
/// array.
#[derive(Debug, Clone)]
struct Csr<T = Node> {
    /// Row `n` is `items[starts[n]..starts[n + 1]]`.
    starts: Vec<u32>,
    items: Vec<T>,
}

impl<T> Default for Csr<T> {
    fn default() -> Self {
        Self {
            starts: vec![0],
            items: Vec::new(),
        }
    }
}

impl<T: Copy + Default> Csr<T> {
    /// Rows over `n` nodes from `(row, item)` pairs, every row below `n`; each row keeps the
    /// order of its pairs. `pairs` is walked twice (count, then fill).
    fn from_pairs<I: Iterator<Item = (Node, T)>>(n: usize, pairs: impl Fn() -> I) -> Self {
        let mut starts = vec![0u32; n + 1];
        for (r, _) in pairs() {
            starts[r as usize + 1] += 1;
        }
        for i in 0..n {
            starts[i + 1] += starts[i];
        }
        let mut items = vec![T::default(); starts[n] as usize];
        let mut next: Vec<u32> = starts[..n].to_vec();
        for (r, x) in pairs() {
            let at = &mut next[r as usize];
            items[*at as usize] = x;
            *at += 1;
        }
        Self { starts, items }
    }

    fn row(&self, n: Node) -> &[T] {
        let n = n as usize;
        &self.items[self.starts[n] as usize..self.starts[n + 1] as usize]
    }
}

/// Open-addressing hash index from base name to node (names live in the snapshot's
/// [`NameList`], the table holds only node numbers).
#[derive(Debug, Default, Clone)]
struct NameIndex {
    slots: Vec<Node>,
    shift: u32,
}

impl NameIndex {
    fn hash(name: &str) -> u64 {
        let mut h = FastHasher::default();
        std::hash::Hasher::write(&mut h, name.as_bytes());
        std::hash::Hasher::finish(&h)
    }

    /// Index `names`; a name given twice maps to its last node.
    fn build(names: &NameList) -> Self {
        let bits = (names.len().max(4) * 2)
            .next_power_of_two()
            .trailing_zeros();
        let mut ix = Self {
            slots: vec![NO_NODE; 1 << bits],
            shift: 64 - bits,
        };
        for (n, name) in names.iter().enumerate() {
            let mut i = (Self::hash(name) >> ix.shift) as usize;
            loop {
                let s = ix.slots[i];
                if s == NO_NODE || names.get(s as usize) == name {
                    ix.slots[i] = n as Node;
                    break;
                }
                i = (i + 1) & (ix.slots.len() - 1);
            }
        }
        ix
    }

    fn get(&self, names: &NameList, name: &str) -> Option<Node> {
        if self.slots.is_empty() {
            return None;
        }
        let mut i = (Self::hash(name) >> self.shift) as usize;
        loop {
            match self.slots[i] {
                NO_NODE => return None,
                s if names.get(s as usize) == name => return Some(s),
                _ => i = (i + 1) & (self.slots.len() - 1),
            }
        }
    }
}

/// A consistent, in-memory view of the registered paths and their relations, held
/// compactly: per node a few numbers, base names in one [`NameList`], relations as
/// compressed rows of node numbers.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Base names; a [`Node`] indexes this and the other per-node arrays.
    names: NameList,
    ids: Vec<i64>,
    nar_sizes: Vec<u64>,
    /// The deriver of each node when it is a valid path, else `NO_NODE`.
    derivers: Vec<Node>,
    /// References and referrers (self references removed).
    refs: Csr,
    referrers: Csr,
    /// Valid outputs recorded in `DerivationOutputs` for each derivation: (output name as an
    /// index into `output_names`, output node).
    drv_outputs: Csr<(u32, Node)>,
    output_names: Vec<Box<str>>,
    /// Derivations that list a node as one of their outputs.
    output_of: Csr,
    index: NameIndex,
}

/// Maps Nix's row ids to nodes while a snapshot is read: a table when the ids are dense
/// enough, else a binary search over the sorted ids.
struct IdMap<'a> {
    ids: &'a [i64],
    first: i64,
    table: Vec<Node>,
}

impl<'a> IdMap<'a> {
    fn new(ids: &'a [i64]) -> Self {
        let first = ids.first().copied().unwrap_or(0);
        let span = ids
            .last()
            .map_or(0, |&l| l.abs_diff(first).saturating_add(1));
        let mut table = Vec::new();
        if span <= 4 * ids.len() as u64 + 1024 {
            table = vec![NO_NODE; span as usize];
            for (n, &id) in ids.iter().enumerate() {
                table[(id - first) as usize] = n as Node;
            }
        }
        Self { ids, first, table }
    }

    fn get(&self, id: i64) -> Option<Node> {
        if !self.table.is_empty() {
            let i = usize::try_from(id.checked_sub(self.first)?).ok()?;
            return self.table.get(i).copied().filter(|&n| n != NO_NODE);
        }
        self.ids.binary_search(&id).ok().map(|n| n as Node)
    }
}

/// Builds a [`Snapshot`] from streamed rows: paths first (in row id order), then derivers,
/// references and derivation outputs by node.
#[derive(Default)]
struct Builder {
    snap: Snapshot,
    refs: Vec<(Node, Node)>,
    outs: Vec<(Node, u32, Node)>,
    out_name_ix: FastMap<Box<str>, u32>,
}

impl Builder {
    fn with_capacity(n: usize) -> Self {
        let mut b = Self::default();
        b.snap.names = NameList::with_capacity(n, 48);
        b.snap.ids.reserve_exact(n);
        b.snap.nar_sizes.reserve_exact(n);
        b
    }

    fn path(&mut self, id: i64, base: &str, nar_size: u64) {
        self.snap.names.push(base);
        self.snap.ids.push(id);
        self.snap.nar_sizes.push(nar_size);
    }

    /// All paths are in: index them.
    fn index(&mut self) {
        self.snap.names.shrink_to_fit();
        self.snap.ids.shrink_to_fit();
        self.snap.nar_sizes.shrink_to_fit();
        self.snap.index = NameIndex::build(&self.snap.names);
        self.snap.derivers = vec![NO_NODE; self.snap.len()];
    }

    fn deriver(&mut self, n: Node, deriver_base: &str) {
        if let Some(d) = self.snap.node_of_base(deriver_base) {
            self.snap.derivers[n as usize] = d;
        }
    }

    fn reference(&mut self, a: Node, b: Node) {
        let n = self.snap.len();
        if a != b && (a as usize) < n && (b as usize) < n {
            self.refs.push((a, b));
        }
    }

    fn output(&mut self, d: Node, name: &str, out_base: &str) {
        if (d as usize) >= self.snap.len() {
            return;
        }
        let Some(o) = self.snap.node_of_base(out_base) else {
            return;
        };
        let k = match self.out_name_ix.get(name) {
            Some(&k) => k,
            None => {
                let k = self.snap.output_names.len() as u32;
                self.snap.output_names.push(name.into());
                self.out_name_ix.insert(name.into(), k);
                k
            }
        };
        self.outs.push((d, k, o));
    }

    fn finish(mut self) -> Snapshot {
        let n = self.snap.len();
        let refs = std::mem::take(&mut self.refs);
        self.snap.refs = Csr::from_pairs(n, || refs.iter().copied());
        self.snap.referrers = Csr::from_pairs(n, || refs.iter().map(|&(a, b)| (b, a)));
        drop(refs);
        let outs = std::mem::take(&mut self.outs);
        self.snap.drv_outputs = Csr::from_pairs(n, || outs.iter().map(|&(d, k, o)| (d, (k, o))));
        self.snap.output_of = Csr::from_pairs(n, || outs.iter().map(|&(d, _, o)| (o, d)));
        self.snap
    }
}

impl Snapshot {
    /// Build a snapshot from plain data (used by the planner's unit tests and fixtures).
    /// `refs` are pairs (referrer, reference) of indexes into `paths`; `drv_outputs` are
    /// (derivation index, output name, output path). Outputs that are not among `paths` are
    /// left out, as are pairs out of range and self references.
    pub fn from_parts(
        paths: Vec<PathInfo>,
        refs: &[(Node, Node)],
        drv_outputs: &[(Node, String, StorePath)],
    ) -> Self {
        let mut b = Builder::with_capacity(paths.len());
        for p in &paths {
            b.path(p.id, p.path.base_name(), p.nar_size);
        }
        b.index();
        for (n, p) in paths.iter().enumerate() {
            if let Some(d) = &p.deriver {
                b.deriver(n as Node, d.base_name());
            }
        }
        for &(a, r) in refs {
            b.reference(a, r);
        }
        for (d, name, out) in drv_outputs {
            b.output(*d, name, out.base_name());
        }
        b.finish()
    }

    /// The node of a path, if it is valid.
    pub fn node(&self, p: &StorePath) -> Option<Node> {
        self.node_of_base(p.base_name())
    }

    /// The node of a base name `<hash>-<name>`, if it is a valid path.
    pub fn node_of_base(&self, base: &str) -> Option<Node> {
        self.index.get(&self.names, base)
    }

    /// The path of a node.
    pub fn path(&self, n: Node) -> StorePath {
        StorePath::from_base_name(self.base_name(n)).expect("snapshot names are validated")
    }

    /// The base name `<hash>-<name>` of a node.
    pub fn base_name(&self, n: Node) -> &str {
        self.names.get(n as usize)
    }

    /// Whether a node is a derivation (`.drv`).
    pub fn is_derivation(&self, n: Node) -> bool {
        self.base_name(n).ends_with(".drv")
    }

    /// Nix's row id of a node.
    pub fn id(&self, n: Node) -> i64 {
        self.ids[n as usize]
    }

    /// NAR size of a node in bytes (0 if unknown).
    pub fn nar_size(&self, n: Node) -> u64 {
        self.nar_sizes[n as usize]
    }

    /// The deriver Nix recorded for a node, if it is a valid path.
    pub fn deriver(&self, n: Node) -> Option<Node> {
        Some(self.derivers[n as usize]).filter(|&d| d != NO_NODE)
    }

    /// References of a node (self references removed).
    pub fn refs(&self, n: Node) -> &[Node] {
        self.refs.row(n)
    }

    /// Referrers of a node (self references removed).
    pub fn referrers(&self, n: Node) -> &[Node] {
        self.referrers.row(n)
    }

    /// The valid outputs recorded in `DerivationOutputs` for a derivation node:
    /// (output name, output node).
    pub fn drv_outputs(&self, n: Node) -> impl Iterator<Item = (&str, Node)> + '_ {
        self.drv_outputs
            .row(n)
            .iter()
            .map(|&(k, o)| (&*self.output_names[k as usize], o))
    }

    /// Derivations that list a node as one of their outputs.
    pub fn output_of(&self, n: Node) -> &[Node] {
        self.output_of.row(n)
    }

    /// Number of valid paths.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether no path is registered.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The highest row id (0 for an empty store).
    pub fn max_id(&self) -> i64 {
        self.ids.iter().copied().max().unwrap_or(0)
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
            for &r in self.refs(n) {
                if !seen[r as usize] {
                    seen[r as usize] = true;
                    stack.push(r);
                }
            }
        }
        out
    }
}

/// A text column of a row, borrowed from SQLite (no allocation).
fn text<'r>(row: &'r rusqlite::Row<'_>, i: usize) -> rusqlite::Result<&'r str> {
    let v = row.get_ref(i)?;
    v.as_str()
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(i, v.data_type(), Box::new(e)))
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

    /// Read every valid path, reference and derivation output in one read transaction,
    /// row by row into the snapshot's compact arrays (no per-row allocation).
    pub fn snapshot(&self) -> Result<Snapshot, NixDbError> {
        let tx = self.conn.unchecked_transaction().map_err(self.q())?;
        let sd = &self.layout.logical_store_dir;
        let count: i64 = tx
            .query_row("SELECT count(*) FROM ValidPaths", [], |r| r.get(0))
            .map_err(self.q())?;
        let mut b = Builder::with_capacity(usize::try_from(count).unwrap_or(0));
        {
            let mut st = tx
                .prepare("SELECT id, path, narSize FROM ValidPaths ORDER BY id")
                .map_err(self.q())?;
            let mut rows = st.query([]).map_err(self.q())?;
            while let Some(row) = rows.next().map_err(self.q())? {
                let id: i64 = row.get(0).map_err(self.q())?;
                let p = text(row, 1).map_err(self.q())?;
                let Ok(base) = parse_base_name(sd, p) else {
                    tracing::warn!("ignoring malformed path in Nix database: {p}");
                    continue;
                };
                let nar: Option<i64> = row.get(2).map_err(self.q())?;
                b.path(id, base, nar.unwrap_or(0).max(0) as u64);
            }
        }
        b.index();
        let ids = std::mem::take(&mut b.snap.ids);
        let by_id = IdMap::new(&ids);
        {
            let mut st = tx
                .prepare("SELECT id, deriver FROM ValidPaths WHERE deriver IS NOT NULL")
                .map_err(self.q())?;
            let mut rows = st.query([]).map_err(self.q())?;
            while let Some(row) = rows.next().map_err(self.q())? {
                let id: i64 = row.get(0).map_err(self.q())?;
                let d = text(row, 1).map_err(self.q())?;
                if let (Some(n), Ok(d)) = (by_id.get(id), parse_base_name(sd, d)) {
                    b.deriver(n, d);
                }
            }
        }
        {
            let mut st = tx
                .prepare("SELECT referrer, reference FROM Refs")
                .map_err(self.q())?;
            let mut rows = st.query([]).map_err(self.q())?;
            while let Some(row) = rows.next().map_err(self.q())? {
                let a: i64 = row.get(0).map_err(self.q())?;
                let r: i64 = row.get(1).map_err(self.q())?;
                if let (Some(a), Some(r)) = (by_id.get(a), by_id.get(r)) {
                    b.reference(a, r);
                }
            }
        }
        {
            let mut st = tx
                .prepare("SELECT drv, id, path FROM DerivationOutputs")
                .map_err(self.q())?;
            let mut rows = st.query([]).map_err(self.q())?;
            while let Some(row) = rows.next().map_err(self.q())? {
                let d: i64 = row.get(0).map_err(self.q())?;
                let name = text(row, 1).map_err(self.q())?;
                let p = text(row, 2).map_err(self.q())?;
                if let (Some(d), Ok(p)) = (by_id.get(d), parse_base_name(sd, p)) {
                    b.output(d, name, p);
                }
            }
        }
        tx.finish().map_err(self.q())?;
        drop(by_id);
        b.snap.ids = ids;
        Ok(b.finish())
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
        assert_eq!(s.refs(a), vec![b], "self reference dropped");
        assert_eq!(s.referrers(b), vec![a]);
        assert_eq!(s.deriver(a).map(|d| s.path(d)), Some(s.path(d)));
        assert_eq!(s.nar_size(a), 200);
        assert_eq!(s.nar_size(b), 0);
        assert_eq!(s.output_of(a), vec![d]);
        assert_eq!(s.drv_outputs(d).next().unwrap().0, "out");
        assert_eq!(s.max_id(), 3);
        assert_eq!(db.max_path_id().unwrap(), 4);
        let since = db.paths_since(1).unwrap();
        assert_eq!(since.len(), 2);
        assert_eq!(db.references(&s.path(a)).unwrap().len(), 2);
        assert_eq!(db.derivers_of(&s.path(a)).unwrap(), vec![s.path(d)]);
        assert!(db.is_valid(&s.path(b)).unwrap());
        assert!(!db.is_valid(&sp("zzz")).unwrap());
        let mut c = s.closure([a]);
        c.sort();
        let mut want = vec![a, b];
        want.sort();
        assert_eq!(c, want); // The recursive query agrees with the snapshot's walk.
        let mut q = db.closure_of(&s.path(a)).unwrap().unwrap();
        q.sort();
        let mut w: Vec<StorePath> = want.iter().map(|n| s.path(*n)).collect();
        w.sort();
        assert_eq!(q, w);
        assert_eq!(db.closure_of(&sp("zzz")).unwrap(), None);
    }

    #[test]
    fn missing_or_corrupt_database_is_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let layout = StoreLayout::chroot(dir.path());
        let e = NixDb::open(&layout).unwrap_err();
        assert_eq!(e.exit_class(), ExitClass::BadInput, "{e}");
        std::fs::create_dir_all(layout.db_path().parent().unwrap()).unwrap();
        std::fs::write(layout.db_path(), vec![7u8; 8192]).unwrap();
        let e = NixDb::open(&layout)
            .and_then(|db| db.snapshot())
            .unwrap_err();
        assert_eq!(e.exit_class(), ExitClass::BadInput, "{e}");
    }

    #[test]
    fn id_map_dense_and_sparse() {
        let dense = [3, 4, 6];
        let sparse = [1, 1 << 40, (1 << 40) + 7];
        for ids in [&dense[..], &sparse[..]] {
            let m = IdMap::new(ids);
            assert_eq!(m.table.is_empty(), ids == sparse);
            for (n, &id) in ids.iter().enumerate() {
                assert_eq!(m.get(id), Some(n as Node));
            }
            assert_eq!(m.get(5), None);
            assert_eq!(m.get(0), None);
            assert_eq!(m.get(-1), None);
            assert_eq!(m.get(i64::MAX), None);
        }
    }

    #[test]
    fn name_index_finds_every_name_and_nothing_else() {
        // Hash parts that differ only at the end, as in hand-made fixtures.
        let names: NameList = (0..5000).map(|i| format!("{i:0>32}-p")).collect();
        let ix = NameIndex::build(&names);
        for (n, name) in names.iter().enumerate() {
            assert_eq!(ix.get(&names, name), Some(n as Node));
        }
        assert_eq!(ix.get(&names, &format!("{:0>32}-p", 5000)), None);
        assert_eq!(ix.get(&names, &format!("{:0>32}-q", 1)), None);
    }

    #[test]
    fn from_parts_ignores_out_of_range() {
        let s = Snapshot::from_parts(vec![info(1, sp("x"))], &[(0, 5), (0, 0)], &[]);
        assert!(s.refs(0).is_empty());
    }
}
