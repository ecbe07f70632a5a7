//! The operations behind `gc`, `runs`, `du` and `store check/repair`: take a snapshot, find
//! roots, plan with the pure layer, and (for real runs) delete through [`crate::reclaim`],
//! recording everything in the runs database. Runs are looked at only in their own store
//! ([`RunsDb::runs_in_store`]): another store's run is neither listed, measured nor selected.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;

use crate::check::{Damage, RepairPlan, plan_repair};
use crate::classify::{PathClass, classify};
use crate::du::{InodeSet, links_inodes};
use crate::error::GcError;
use crate::names::NameList;
use crate::nixdb::{NixDb, Node, Snapshot};
use crate::ondisk::{OnDisk, StoreEntries, list_store_dir, read_store_dir};
use crate::plan::{ChainStep, GcSettings, Liveness, batches, dead_set_on_disk, deletable_subset};
use crate::reclaim::{DeleteResult, delete_batch, remove_artifact};
use crate::roots::{Root, find_roots};
use crate::runsdb::{Run, RunsDb};
use crate::select::{SelectError, Selection, select_runs};
use crate::store_path::{StoreLayout, StorePath};

/// A store loaded for planning: snapshot, roots, settings.
#[derive(Debug)]
pub struct Loaded {
    /// The store.
    pub layout: StoreLayout,
    /// The database snapshot.
    pub snap: Snapshot,
    /// Every root found.
    pub roots: Vec<Root>,
    /// Nix's keep-* settings.
    pub settings: GcSettings,
    /// The store directory's entries, resolved against the snapshot.
    pub disk: OnDisk,
}

/// Threads for filesystem walks (the kernel work of `stat` and `getdents` overlaps well).
fn walk_threads() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4))
}

impl Loaded {
    /// Snapshot the database, find roots and read Nix's keep-* settings (an unreadable Nix
    /// configuration is an error: the plan could disagree with Nix about what is alive).
    pub fn load(layout: &StoreLayout) -> Result<Self, GcError> {
        let db = NixDb::open(layout)?;
        let settings = GcSettings::load()?;
        // Roots, the directory listing and the database snapshot are read side by side. Any
        // interleaving is safe: a path rooted or registered meanwhile is either not planned
        // or refused by `nix-store --delete`, which checks roots itself.
        // The listing is kept as names in one buffer until the snapshot can resolve them.
        std::thread::scope(|s| {
            let roots = s.spawn(|| find_roots(layout));
            let entries = s.spawn(|| {
                let (mut names, mut junk) = (NameList::default(), Vec::new());
                list_store_dir(layout, |base| names.push(base), &mut junk).map(|()| (names, junk))
            });
            let snap = db.snapshot();
            let roots = roots
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e));
            let entries = entries
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e));
            let snap = snap?;
            let (names, junk) = entries?;
            let disk = OnDisk::resolve(&snap, &names, junk);
            Ok(Self {
                layout: layout.clone(),
                snap,
                roots: roots?,
                settings,
                disk,
            })
        })
    }

    /// Liveness, ignoring the pins of `unpinned` runs.
    pub fn liveness_without_pins(&self, runs: Option<&RunsDb>, unpinned: &[i64]) -> Liveness {
        let dirs: Vec<PathBuf> = match runs {
            Some(db) => unpinned.iter().map(|&id| db.pins_dir(id)).collect(),
            None => Vec::new(),
        };
        Liveness::compute_filtered(&self.snap, &self.roots, self.settings, |r| {
            !dirs.iter().any(|d| r.link.starts_with(d))
        })
    }

    /// A human description of why `n` is alive.
    pub fn explain(&self, live: &Liveness, n: Node) -> Option<Explanation> {
        let (ri, chain) = live.why(n)?;
        let root = &self.roots[ri];
        Some(Explanation {
            root: root.link.display().to_string(),
            root_kind: format!("{:?}", root.kind).to_lowercase(),
            chain: chain_names(&self.layout, &self.snap, &chain),
        })
    }
}

fn chain_names(layout: &StoreLayout, snap: &Snapshot, chain: &[ChainStep]) -> Vec<String> {
    chain
        .iter()
        .map(|s| layout.logical_of_base(snap.base_name(s.node)))
        .collect()
}

/// Why a path is alive: the root and the chain from the root's path down to it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Explanation {
    /// The link or `/proc` entry that is the root.
    pub root: String,
    /// `direct`, `indirect`, `runtime`, `temporary`.
    pub root_kind: String,
    /// Store paths from the root's path to the one explained.
    pub chain: Vec<String>,
}

/// A GC plan.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GcPlan {
    /// `all` or `runs`.
    pub mode: String,
    /// Runs selected.
    pub runs: Vec<i64>,
    /// Paths to delete, in order.
    pub paths: NameList,
    /// Estimated bytes freed: disk blocks of inodes whose every link goes.
    pub bytes: u64,
    /// Sum of NAR sizes of the registered paths in the plan.
    pub nar_bytes: u64,
    /// Selected paths kept, with the reason.
    pub kept: Vec<KeptPath>,
    /// Store directory entries that are not store paths (left alone).
    pub junk: Vec<String>,
    /// Where each `nix-store --delete` batch ends in `paths`.
    #[serde(skip)]
    batch_ends: Vec<usize>,
}

/// A selected path that will not be deleted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeptPath {
    /// The path.
    pub path: String,
    /// Why.
    pub reason: String,
    /// If alive: the root and chain.
    pub alive: Option<Explanation>,
}

/// Default number of paths per `nix-store --delete` call.
pub const DEFAULT_BATCH: usize = 500;

/// Plan a collection.
pub fn plan_gc(
    loaded: &Loaded,
    runs: Option<&RunsDb>,
    sel: &Selection,
    batch_size: usize,
) -> Result<GcPlan, GcError> {
    let l = &loaded.layout;
    let snap = &loaded.snap;
    let mut plan = GcPlan::default();
    let mut invalid: Vec<StorePath> = Vec::new();
    let nodes: Vec<Node>;
    if sel.all {
        plan.mode = "all".into();
        let live = Liveness::compute(snap, &loaded.roots, loaded.settings);
        let d = dead_set_on_disk(snap, &live, loaded.settings, &loaded.disk);
        nodes = d.valid;
        invalid = d.invalid;
        invalid.sort();
        plan.junk = loaded.disk.junk.clone();
    } else {
        let db = runs.ok_or(SelectError::NothingSelected)?;
        // Only this store's runs: another store's run named by id is bad input.
        let all_runs = db.runs_in_store(l)?;
        for id in &sel.runs {
            let run = db.run_in_store(l, *id)?;
            if run.ended_at.is_none() && !db.pins(*id)?.is_empty() {
                return Err(SelectError::StillRunning(*id).into());
            }
        }
        let selected = select_runs(&all_runs, sel, crate::runsdb::now());
        if selected.is_empty() && sel.keep_last.is_none() && sel.older_than.is_none() {
            return Err(SelectError::NothingSelected.into());
        }
        plan.mode = "runs".into();
        let live = loaded.liveness_without_pins(Some(db), &selected);
        let mut cands: Vec<Node> = Vec::new();
        for &id in &selected {
            for p in db.run_paths(id)? {
                if let Some(n) = l.parse(&p.path).ok().and_then(|sp| snap.node(&sp)) {
                    cands.push(n);
                }
            }
        }
        cands.sort_unstable();
        cands.dedup();
        let (del, held) = deletable_subset(snap, &live, loaded.settings, &cands);
        for h in held {
            let path = l.logical_of_base(snap.base_name(h.node));
            let alive = loaded.explain(&live, h.node);
            let reason = if alive.is_some() {
                "alive".to_owned()
            } else {
                format!(
                    "needed by {} (not selected)",
                    l.logical_of_base(snap.base_name(h.holder))
                )
            };
            plan.kept.push(KeptPath {
                path,
                reason,
                alive,
            });
        }
        nodes = del;
        plan.runs = selected;
    }
    plan.nar_bytes = nodes.iter().map(|&n| snap.nar_size(n)).sum();
    // The plan's paths go straight into one buffer, batch by batch; the walk that estimates
    // the space freed makes each physical path as it goes.
    let order = batches(snap, loaded.settings, &nodes, batch_size);
    drop(nodes);
    let avg = l.logical_store_dir.len() + 64;
    let count = order.iter().map(Vec::len).sum::<usize>() + invalid.len();
    plan.paths = NameList::with_capacity(count, avg);
    for b in order {
        for n in b {
            plan.paths.push(&l.logical_of_base(snap.base_name(n)));
        }
        plan.batch_ends.push(plan.paths.len());
    }
    for c in invalid.chunks(batch_size.max(1)) {
        for p in c {
            plan.paths.push(&l.logical(p));
        }
        plan.batch_ends.push(plan.paths.len());
    }
    drop(invalid);
    let paths = &plan.paths;
    let inodes = InodeSet::walk_parallel(paths.len(), walk_threads(), |i| {
        l.parse(paths.get(i))
            .map(|p| l.physical(&p))
            .expect("planned paths are store paths")
    })?;
    plan.bytes = inodes.freeable_bytes(&links_inodes(l));
    Ok(plan)
}

/// What a real collection did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GcOutcome {
    /// Paths gone.
    pub deleted: Vec<String>,
    /// Paths Nix refused, with its reason.
    pub refused: Vec<(String, String)>,
    /// The plan's estimate.
    pub estimated_bytes: u64,
    /// Bytes really freed: the disk blocks of the inodes that only the paths this collection
    /// deleted held (never negative, never another process's deletions).
    pub freed_bytes: i64,
    /// VM artifacts removed.
    pub artifacts_removed: Vec<String>,
    /// Interrupted earlier collections that were reconciled first.
    pub recovered_events: Vec<i64>,
}

/// Close GC events left running by a killed drydock: paths that are gone are recorded
/// deleted, the event is marked interrupted. Returns the event ids.
pub fn recover_interrupted(layout: &StoreLayout, runs: &RunsDb) -> Result<Vec<i64>, GcError> {
    // Only this store's events (and those of no recorded store): another store's paths cannot
    // be checked here.
    let id = layout.id();
    let unfinished: Vec<_> = runs
        .unfinished_gcs()?
        .into_iter()
        .filter(|u| u.store.as_deref().is_none_or(|s| s == id))
        .collect();
    if unfinished.is_empty() {
        return Ok(Vec::new());
    }
    let db = NixDb::open(layout)?;
    let mut ids = Vec::new();
    for u in unfinished {
        let mut gone = Vec::new();
        for p in &u.planned {
            if let Ok(sp) = layout.parse(p)
                && !db.is_valid(&sp)?
                && std::fs::symlink_metadata(layout.physical(&sp)).is_err()
            {
                gone.push(p.clone());
            }
        }
        runs.record_outcomes(u.id, &gone, &[])?;
        runs.finish_gc(u.id, "interrupted", None)?;
        tracing::warn!("reconciled interrupted collection {}", u.id);
        ids.push(u.id);
    }
    Ok(ids)
}

/// How long a collection waits for another drydock collection of the same store.
const GC_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30 * 60);

/// Take the per-store collection lock: `drydock-gc.lock` in Nix's state directory of the
/// store, or, where this user cannot create it (the system store as an ordinary user), one in
/// drydock's state directory named after the store. Waits, bounded, for another holder.
fn lock_store_for_gc(
    layout: &StoreLayout,
    state_dir: Option<&std::path::Path>,
) -> Result<std::fs::File, GcError> {
    let open = |p: std::path::PathBuf| {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map(|f| (f, p))
    };
    let opened = open(layout.state_dir.join("drydock-gc.lock")).or_else(|e| match state_dir {
        Some(dir) => {
            let name = format!(
                "gc-{:016x}.lock",
                crate::runsdb::fnv1a(layout.id().as_bytes())
            );
            open(dir.join(name))
        }
        None => Err(e),
    });
    let (file, path) = opened.map_err(|source| crate::reclaim::ReclaimError::Lock {
        path: layout.state_dir.join("drydock-gc.lock"),
        source,
    })?;
    if !crate::sys::try_lock_exclusive(&file) {
        tracing::warn!(
            "waiting for another drydock gc of this store ({})",
            path.display()
        );
        if !crate::sys::lock_exclusive_within(&file, GC_LOCK_WAIT) {
            return Err(crate::reclaim::ReclaimError::LockTimeout {
                path,
                after: GC_LOCK_WAIT,
            }
            .into());
        }
    }
    Ok(file)
}

/// Carry out a plan: unpin the selected runs, delete batch by batch through Nix (recording
/// each batch), remove the runs' VM artifacts, measure the space freed.
pub fn execute_gc(
    layout: &StoreLayout,
    runs: Option<&RunsDb>,
    plan: &GcPlan,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<GcOutcome, GcError> {
    let mut out = GcOutcome {
        estimated_bytes: plan.bytes,
        ..GcOutcome::default()
    };
    // One drydock collection per store at a time, so that what one of them measured as
    // freed was deleted by it and not by a concurrent one.
    let _lock = lock_store_for_gc(layout, runs.map(|r| r.state_dir()))?;
    let event = match runs {
        Some(r) => Some(r.begin_gc(layout, &plan.mode, &plan.paths, plan.bytes)?),
        None => None,
    };
    if let Some(r) = runs {
        for &id in &plan.runs {
            r.unpin_run(id)?;
        }
    }
    let db = NixDb::open(layout)?;
    let total = plan.paths.len();
    let mut done = 0;
    progress(0, total);
    let mut start = 0;
    for &end in &plan.batch_ends {
        let b: Vec<StorePath> = (start..end)
            .filter_map(|i| layout.parse(plan.paths.get(i)).ok())
            .collect();
        start = end;
        // Freed bytes are measured, not estimated from the free space (which counts whatever
        // else the machine wrote meanwhile): the blocks of the inodes that only the paths this
        // batch confirmed gone held (a `.links` entry counts if Nix removed it too). Paths that
        // were not there before the batch free nothing here.
        let walked: Vec<(StorePath, crate::du::InodeSet)> = b
            .iter()
            .map(|p| {
                let mut set = crate::du::InodeSet::default();
                set.add_tree(&layout.physical(p)).map(|()| (p.clone(), set))
            })
            .collect::<Result<_, _>>()?;
        let links_before = crate::du::links_inodes(layout);
        let res: DeleteResult = delete_batch(layout, &db, &b)?;
        let links_after = crate::du::links_inodes(layout);
        let removed_links: std::collections::HashSet<u64> =
            links_before.difference(&links_after).copied().collect();
        let gone: std::collections::HashSet<&StorePath> = res.gone.iter().collect();
        let mut gone_inodes = crate::du::InodeSet::default();
        for (p, set) in walked {
            if gone.contains(&p) {
                gone_inodes.merge(set);
            }
        }
        out.freed_bytes += gone_inodes.freeable_bytes(&removed_links) as i64;
        let gone: Vec<String> = res.gone.iter().map(|p| layout.logical(p)).collect();
        let refused: Vec<(String, String)> = res
            .refused
            .iter()
            .map(|(p, w)| (layout.logical(p), w.clone()))
            .collect();
        if let (Some(r), Some(ev)) = (runs, event) {
            r.record_outcomes(ev, &gone, &refused)?;
        }
        done += b.len();
        progress(done, total);
        out.deleted.extend(gone);
        out.refused.extend(refused);
    }
    if let Some(r) = runs {
        for &id in &plan.runs {
            for a in r.artifacts(id)? {
                if a.removed_at.is_some() {
                    continue;
                }
                if remove_artifact(r.state_dir(), std::path::Path::new(&a.path))? {
                    out.artifacts_removed.push(a.path.clone());
                }
                r.artifact_removed(a.id)?;
            }
            let left = r
                .run_paths(id)?
                .iter()
                .filter_map(|p| layout.parse(&p.path).ok())
                .filter(|p| db.is_valid(p).unwrap_or(true))
                .count();
            if left == 0 {
                r.mark_collected(id)?;
            }
        }
    }
    if let (Some(r), Some(ev)) = (runs, event) {
        r.finish_gc(ev, "done", Some(out.freed_bytes))?;
    }
    Ok(out)
}

/// One row of `drydock runs`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunSummary {
    /// The run.
    #[serde(flatten)]
    pub run: Run,
    /// Paths claimed.
    pub paths: usize,
    /// Paths still registered.
    pub live_paths: usize,
    /// NAR bytes of the claimed paths still registered.
    pub size: u64,
    /// NAR bytes that `gc --run ID` would delete now.
    pub reclaimable: u64,
}

/// Status of a claimed path in `runs show`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PathStatus {
    /// Path.
    pub path: String,
    /// Class.
    pub class: crate::classify::PathClass,
    /// NAR size.
    pub nar_size: u64,
    /// `alive`, `reclaimable`, `held`, `deleted` or `missing`.
    pub status: String,
    /// For alive paths: why.
    pub why: Option<Explanation>,
    /// For held paths: what needs it.
    pub held_by: Option<String>,
}

/// Summaries of every run of the loaded store.
pub fn summarize_runs(loaded: &Loaded, runs: &RunsDb) -> Result<Vec<RunSummary>, GcError> {
    let base = loaded.liveness_without_pins(None, &[]);
    let mut out = Vec::new();
    for run in runs.runs_in_store(&loaded.layout)? {
        let (paths, statuses) = run_statuses(loaded, runs, run.id, Some(&base))?;
        let size = statuses
            .iter()
            .filter(|s| s.status != "deleted" && s.status != "missing")
            .map(|s| s.nar_size)
            .sum();
        let reclaimable = statuses
            .iter()
            .filter(|s| s.status == "reclaimable")
            .map(|s| s.nar_size)
            .sum();
        out.push(RunSummary {
            run,
            paths,
            live_paths: statuses
                .iter()
                .filter(|s| s.status != "deleted" && s.status != "missing")
                .count(),
            size,
            reclaimable,
        });
    }
    Ok(out)
}

/// The claimed paths of a run with their status and, for alive ones, why.
pub fn run_statuses(
    loaded: &Loaded,
    runs: &RunsDb,
    id: i64,
    base: Option<&Liveness>,
) -> Result<(usize, Vec<PathStatus>), GcError> {
    let l = &loaded.layout;
    let snap = &loaded.snap;
    // Another store's run has no statuses here (its paths are other files).
    runs.run_in_store(l, id)?;
    let claimed = runs.run_paths(id)?;
    let has_pins = !runs.pins(id)?.is_empty();
    let own;
    let live = match base {
        Some(b) if !has_pins => b,
        _ => {
            own = loaded.liveness_without_pins(Some(runs), &[id]);
            &own
        }
    };
    let nodes: Vec<Node> = claimed
        .iter()
        .filter_map(|p| l.parse(&p.path).ok().and_then(|sp| snap.node(&sp)))
        .collect();
    let (del, held) = deletable_subset(snap, live, loaded.settings, &nodes);
    let del: HashSet<Node> = del.into_iter().collect();
    let held: HashMap<Node, Node> = held.into_iter().map(|h| (h.node, h.holder)).collect();
    let mut out = Vec::new();
    for p in &claimed {
        let node = l.parse(&p.path).ok().and_then(|sp| snap.node(&sp));
        let (status, why, held_by) = match node {
            None if p.gc_state.as_deref() == Some("deleted") => ("deleted", None, None),
            None => ("missing", None, None),
            Some(n) if live.is_alive(n) => ("alive", loaded.explain(live, n), None),
            Some(n) if del.contains(&n) => ("reclaimable", None, None),
            Some(n) => (
                "held",
                None,
                held.get(&n).map(|h| l.logical_of_base(snap.base_name(*h))),
            ),
        };
        out.push(PathStatus {
            path: p.path.clone(),
            class: p.class,
            nar_size: p.nar_size,
            status: status.to_owned(),
            why,
            held_by,
        });
    }
    Ok((claimed.len(), out))
}

/// `drydock du`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DuReport {
    /// Bytes on disk per class (each inode once within a class).
    pub by_class: BTreeMap<PathClass, u64>,
    /// Bytes per run of this store: (id, name, bytes), each inode once within a run.
    pub by_run: Vec<(i64, String, u64)>,
    /// drydock's state directory.
    pub state_dir: u64,
    /// Test artifacts plus state, each inode once overall.
    pub total: u64,
}

/// Measure test artifacts in the store (every entry classified as one) and drydock state.
pub fn du(layout: &StoreLayout, runs: Option<&RunsDb>) -> Result<DuReport, GcError> {
    let entries: StoreEntries = read_store_dir(layout)?;
    let mut per_class_paths: BTreeMap<PathClass, Vec<PathBuf>> = BTreeMap::new();
    for p in &entries.paths {
        let c = classify(p);
        if c.is_test_artifact() {
            per_class_paths
                .entry(c)
                .or_default()
                .push(layout.physical(p));
        }
    }
    let mut per_class: BTreeMap<PathClass, InodeSet> = BTreeMap::new();
    let mut total = InodeSet::default();
    for (c, paths) in per_class_paths {
        let set = InodeSet::walk_parallel(paths.len(), walk_threads(), |i| paths[i].clone())?;
        per_class.insert(c, set);
    }
    let mut rep = DuReport::default();
    for (c, s) in per_class {
        rep.by_class.insert(c, s.bytes());
        total.merge(s);
    }
    if let Some(r) = runs {
        let mut st = InodeSet::default();
        st.add_tree(r.state_dir())?;
        total.add_tree(r.state_dir())?;
        rep.state_dir = st.bytes();
        for run in r.runs_in_store(layout)? {
            let mut s = InodeSet::default();
            for p in r.run_paths(run.id)? {
                if let Ok(sp) = layout.parse(&p.path) {
                    s.add_tree(&layout.physical(&sp))?;
                }
            }
            // A VM run's own files (its folder: console log, overlay, snapshots) count too.
            for a in r.artifacts(run.id)? {
                let p = std::path::Path::new(&a.path);
                if a.removed_at.is_none() && p.exists() {
                    s.add_tree(p)?;
                }
            }
            rep.by_run.push((run.id, run.name.clone(), s.bytes()));
        }
    }
    rep.total = total.bytes();
    Ok(rep)
}

/// `store check`: the damage found.
pub fn check(loaded: &Loaded) -> Result<Damage, GcError> {
    Ok(Damage::of(&loaded.snap, &loaded.disk))
}

/// What [`clear_blocking_roots`] did: the store as it is now, its damage, and the roots.
#[derive(Debug)]
pub struct ClearedRoots {
    /// The store, loaded again after the last removal.
    pub loaded: Loaded,
    /// Its damage now.
    pub damage: Damage,
    /// Roots removed.
    pub removed: Vec<String>,
    /// Roots that hold damage but are not drydock's to remove (profiles, runtime, temporary).
    pub refused: Vec<String>,
}

/// `store repair --remove-roots`: remove the roots that hold damaged paths, then look again
/// (removing one may show another), at most 16 rounds, until no removable root blocks the
/// repair.
pub fn clear_blocking_roots(mut loaded: Loaded) -> Result<ClearedRoots, GcError> {
    let mut damage = check(&loaded)?;
    let mut removed_all = Vec::new();
    let mut refused_now = Vec::new();
    for _ in 0..16 {
        let (plan, _) = repair(&loaded, &damage, true)?;
        if plan.blocked.is_empty() {
            break;
        }
        let (removed, refused) = remove_blocking_roots(&loaded, &plan)?;
        refused_now = refused;
        if removed.is_empty() {
            break;
        }
        removed_all.extend(removed);
        loaded = Loaded::load(&loaded.layout)?;
        damage = check(&loaded)?;
    }
    Ok(ClearedRoots {
        loaded,
        damage,
        removed: removed_all,
        refused: refused_now,
    })
}

/// Remove the symlink roots (links in `gcroots`, and the user links behind indirect roots
/// such as `./result`) that hold paths of a blocked repair. Profiles, runtime and temporary
/// roots are never removed: they are returned as refusals.
pub fn remove_blocking_roots(
    loaded: &Loaded,
    plan: &RepairPlan,
) -> Result<(Vec<String>, Vec<String>), GcError> {
    let gcroots = loaded.layout.gcroots_dir();
    let mut removed = Vec::new();
    let mut refused = Vec::new();
    let mut seen = HashSet::new();
    for b in &plan.blocked {
        let root = &loaded.roots[b.root];
        if !seen.insert(root.link.clone()) {
            continue;
        }
        let removable = match root.kind {
            crate::roots::RootKind::Indirect => true,
            crate::roots::RootKind::Direct => root.link.starts_with(&gcroots),
            _ => false,
        };
        let is_link = std::fs::symlink_metadata(&root.link)
            .map(|m| m.file_type().is_symlink())
            .unwrap_or(false);
        if removable && is_link {
            crate::reclaim::remove_link(&root.link)?;
            removed.push(root.link.display().to_string());
        } else {
            refused.push(root.link.display().to_string());
        }
    }
    Ok((removed, refused))
}

/// `store repair`: the plan (and, unless `dry_run` or blocked, its execution).
pub fn repair(
    loaded: &Loaded,
    damage: &Damage,
    dry_run: bool,
) -> Result<(RepairPlan, Option<DeleteResult>), GcError> {
    let live = Liveness::compute(&loaded.snap, &loaded.roots, loaded.settings);
    let plan = plan_repair(&loaded.snap, &live, loaded.settings, &damage.missing);
    if dry_run || !plan.blocked.is_empty() || plan.delete.is_empty() {
        return Ok((plan, None));
    }
    let db = NixDb::open(&loaded.layout)?;
    let paths: Vec<StorePath> = plan.delete.iter().map(|&n| loaded.snap.path(n)).collect();
    let res = delete_batch(&loaded.layout, &db, &paths)?;
    Ok((plan, Some(res)))
}
