//! Snapshots of whole clusters (`drydock snapshot`, `restore`, `snapshots`, `snapshot --rm`).
//!
//! **Taking one** is the owner's work (a control request, [`ControlOp::Snapshot`]): every
//! machine of the plan must run; every hub is frozen (no frame crosses a VLAN from here on),
//! every machine is paused (QMP `stop`, one after the other), then each machine's state, disk
//! and launch record are saved by drydock-vm's [`drydock_vm::save_paused`] in parallel, one
//! thread each; then the hubs thaw and every machine resumes (or, with `--stop`, every machine
//! is stopped and the owner ends). So the cut is consistent: what any machine's saved state
//! says was sent on a VLAN, no other machine's state received after its own pause. The
//! snapshot is written as `.TAG.tmp` and renamed into place once complete, its manifest
//! (`snapshot.json`) last, with every file's size: a folder without a readable manifest, or
//! whose files differ from it, is corrupt. It is recorded as a finished run named
//! `snapshot CLUSTER TAG` that pins every machine's system (and a nixos-test node's closure
//! registration) and owns the snapshot's folder as its artifact: `gc` never collects what a
//! snapshot needs, and `gc` selecting that run removes the snapshot with it.
//!
//! **Restoring** ([`restore`]) checks the snapshot first (corrupt: exit 1 naming the file;
//! another layout than the cluster as last brought up, another QEMU, or a system gone from the
//! store: exit 2 naming the difference), stops the cluster if it is up, then starts a detached
//! owner that brings every machine back from its saved state, paused, on fresh hubs, resumes
//! them all at once, sets each guest's clock to the host's through the backdoor, and reports
//! the cluster ready once every backdoor answers (see `run`).
//!
//! The checks are pure functions of the manifest, the folder's listing and the cluster's last
//! plan, tested as tables at the bottom.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use drydock_gc::{Cancel, StoreLayout};
use drydock_vm::{LaunchRecord, Qmp, VmPaths};

use crate::compose::ClusterPlan;
use crate::control::{ControlError, ControlOp, ControlRequest};
use crate::run::RunningCluster;
use crate::state::{ClusterError, ClusterLaunch, ClusterState, OwnerLock, cluster_paths};

/// The manifest's format; another one is refused as corrupt.
pub const SNAPSHOT_FORMAT: u32 = 1;
/// The manifest's file name in a snapshot's folder.
const MANIFEST: &str = "snapshot.json";
/// How long connecting to a machine's QMP socket may take.
const QMP_CONNECT: Duration = Duration::from_secs(5);
/// How long the owner of a cluster being restored may take to quit its machines.
const QUIT_DEADLINE: Duration = Duration::from_secs(60);
/// How long a snapshot request may take, end to end (saving 4 GiB of guest memory included).
pub const SNAPSHOT_DEADLINE: Duration = Duration::from_secs(900);

/// A cluster snapshot's manifest (`snapshot.json`), and what `snapshots --json` lists.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterSnapshot {
    pub format: u32,
    pub cluster: String,
    pub tag: String,
    /// Seconds since the epoch.
    pub created: u64,
    /// QEMU's `--version` first line (every machine's QEMU said the same).
    pub qemu_version: String,
    /// The cluster's plan at the cut: machines, networks, numbering.
    pub plan: ClusterPlan,
    pub machines: Vec<SnapshotMachine>,
    /// From the first machine's pause to the last one's resume (or stop).
    pub paused_secs: f64,
    /// Whether the cluster was stopped after the save (`--stop`).
    pub stopped: bool,
    /// The run that pins the snapshot's systems (`None` if it could not be recorded).
    pub run_id: Option<i64>,
    /// How the owner launched machines (`--accel`, `--qemu`, the logs' bound): a restored
    /// cluster's owner starts and restarts machines the same way.
    pub accel: String,
    pub qemu: Option<PathBuf>,
    pub log_limit: u64,
    /// The store its systems are in (a restore and its owner use it, whatever `--store` says).
    pub store: StoreLayout,
}

/// One machine in a snapshot (its files in `machines/MACHINE/`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotMachine {
    pub machine: String,
    pub vm_name: String,
    /// The system it ran (a store path), if it booted one.
    pub system: Option<String>,
    /// Every file saved, with its size: a file missing or of another size is corruption.
    pub files: BTreeMap<String, u64>,
    /// How long saving it took (its state, its disk).
    pub save_secs: f64,
}

impl ClusterSnapshot {
    /// Bytes of every file of every machine.
    pub fn bytes(&self) -> u64 {
        self.machines.iter().map(SnapshotMachine::bytes).sum()
    }

    /// The systems it holds, each once.
    pub fn systems(&self) -> Vec<String> {
        let mut s: Vec<String> = self
            .machines
            .iter()
            .filter_map(|m| m.system.clone())
            .collect();
        s.sort();
        s.dedup();
        s
    }
}

impl ClusterSnapshot {
    /// `base` with the snapshotted owner's accelerator, QEMU and logs' bound.
    pub fn launch_like(&self, base: &ClusterLaunch) -> ClusterLaunch {
        let mut l = base.clone();
        l.accel = match self.accel.as_str() {
            "kvm" => drydock_vm::AccelChoice::Kvm,
            "tcg" => drydock_vm::AccelChoice::Tcg,
            _ => drydock_vm::AccelChoice::Auto,
        };
        l.qemu = self.qemu.clone();
        l.log_limit = self.log_limit;
        l.layout = self.store.clone();
        l
    }
}

impl SnapshotMachine {
    pub fn bytes(&self) -> u64 {
        self.files.values().sum()
    }
}

/// Why a cluster snapshot could not be taken, listed, removed or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(
        "invalid snapshot tag {0:?}: use letters, digits, '-', '_' or '.' (not starting with '.')"
    )]
    BadTag(String),
    #[error("the cluster {cluster} has no snapshot {tag:?}{}", have_list(have))]
    NoSnapshot {
        cluster: String,
        tag: String,
        have: Vec<String>,
    },
    #[error(
        "machine {machine} of {cluster} is not running: a snapshot holds every machine of the cluster (start it first)"
    )]
    NotRunning { cluster: String, machine: String },
    #[error("machine {machine}: {source}")]
    Machine {
        machine: String,
        #[source]
        source: drydock_vm::SnapshotError,
    },
    #[error(
        "machine {machine} shares folders over 9p, which QEMU cannot migrate while the guest has them mounted: give it the virtio-fs flavour of the nixos-test profile to snapshot it"
    )]
    NineP { machine: String },
    #[error("machine {machine}: cannot pause or resume it over QMP")]
    Qmp {
        machine: String,
        #[source]
        source: drydock_vm::QmpError,
    },
    #[error("snapshot {tag:?} is corrupt: {} {reason}", path.display())]
    Corrupt {
        tag: String,
        path: PathBuf,
        reason: String,
    },
    #[error(
        "snapshot {tag:?} of {cluster} does not fit the cluster as last brought up ({}): {}; bring that layout up again, or take a new snapshot",
        up_json.display(), differences.join("; ")
    )]
    Layout {
        cluster: String,
        tag: String,
        up_json: PathBuf,
        differences: Vec<String>,
    },
    #[error("snapshot {tag:?} was taken with {then}, but machine {machine}'s QEMU ({}) is now {now}", qemu.display())]
    Qemu {
        tag: String,
        machine: String,
        qemu: PathBuf,
        then: String,
        now: String,
    },
    #[error("snapshot {tag:?}: machine {machine}'s system {system} is gone from the store")]
    SystemGone {
        tag: String,
        machine: String,
        system: String,
    },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: drydock_vm::LaunchError,
    },
    #[error("cannot write the snapshot at {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Private(#[from] drydock_gc::PrivateError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
}

fn have_list(have: &[String]) -> String {
    match have.is_empty() {
        true => " (it has none)".to_string(),
        false => format!(" (it has {})", have.join(", ")),
    }
}

impl SnapshotError {
    pub fn is_bad_input(&self) -> bool {
        match self {
            Self::BadTag(_)
            | Self::NoSnapshot { .. }
            | Self::NotRunning { .. }
            | Self::NineP { .. }
            | Self::Layout { .. }
            | Self::Qemu { .. }
            | Self::SystemGone { .. } => true,
            Self::Machine { source, .. } => source.is_bad_input(),
            Self::Control(e) => e.is_bad_input(),
            Self::Cluster(e) => e.is_bad_input(),
            Self::Private(_) => true,
            Self::Qmp { .. } | Self::Corrupt { .. } | Self::Io { .. } | Self::Write { .. } => false,
        }
    }

    pub fn is_interrupted(&self) -> bool {
        matches!(self, Self::Cluster(ClusterError::Interrupted))
    }
}

/// Check a snapshot tag: named like a VM, and not a hidden name (`.TAG.tmp` is a snapshot
/// being written).
pub fn validate_tag(tag: &str) -> Result<(), SnapshotError> {
    match !tag.starts_with('.') && drydock_vm::validate_name(tag).is_ok() {
        true => Ok(()),
        false => Err(SnapshotError::BadTag(tag.to_string())),
    }
}

/// `STATE/clusters/NAME/snapshots`.
pub fn snapshots_dir(state_dir: &Path, cluster: &str) -> PathBuf {
    cluster_paths(state_dir, cluster).dir.join("snapshots")
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The regular files directly in `dir`, with their sizes.
fn listing(dir: &Path) -> std::io::Result<BTreeMap<String, u64>> {
    let mut files = BTreeMap::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let meta = e.metadata()?;
        if meta.is_file() {
            files.insert(e.file_name().to_string_lossy().into_owned(), meta.len());
        }
    }
    Ok(files)
}

/// What differs between a manifest's files and the folder's (pure): the first difference, as
/// the file and why.
pub(crate) fn files_differ(
    expected: &BTreeMap<String, u64>,
    found: &BTreeMap<String, u64>,
) -> Option<(String, String)> {
    for (name, bytes) in expected {
        match found.get(name) {
            None => return Some((name.clone(), "is missing".to_string())),
            Some(b) if b != bytes => {
                return Some((
                    name.clone(),
                    format!("has {b} bytes, the snapshot recorded {bytes} (truncated or changed)"),
                ));
            }
            Some(_) => {}
        }
    }
    None
}

/// How the layout of `then` (a snapshot's plan) differs from `now` (the cluster's last plan),
/// as phrases naming machines, VLANs, addresses and settings (pure). Systems are not compared:
/// a restore brings the snapshot's systems back, and a reload afterwards switches to new ones.
pub(crate) fn layout_differences(then: &ClusterPlan, now: &ClusterPlan) -> Vec<String> {
    let mut d = Vec::new();
    for m in &now.machines {
        if then.machine(&m.machine).is_none() {
            d.push(format!(
                "machine {} is new (the snapshot has {})",
                m.machine,
                then.machine_names().join(", ")
            ));
        }
    }
    for m in &then.machines {
        let Some(n) = now.machine(&m.machine) else {
            d.push(format!(
                "machine {} is gone (the cluster has {})",
                m.machine,
                now.machine_names().join(", ")
            ));
            continue;
        };
        let (a, b) = (&m.settings, &n.settings);
        let mut diff = |what: &str, x: String, y: String| {
            if x != y {
                d.push(format!("machine {}: {what} {x} then, {y} now", m.machine));
            }
        };
        diff(
            "memory (MiB)",
            a.memory_mib.to_string(),
            b.memory_mib.to_string(),
        );
        diff("cores", a.cores.to_string(), b.cores.to_string());
        diff("disk (MiB)", a.disk_mib.to_string(), b.disk_mib.to_string());
        diff(
            "profile",
            format!("{:?}", a.profile),
            format!("{:?}", b.profile),
        );
        let nics = |p: &crate::compose::MachinePlan| -> String {
            p.nics
                .iter()
                .map(|n| format!("vlan {} {} {}", n.vlan, n.address, n.mac))
                .collect::<Vec<_>>()
                .join(", ")
        };
        diff("NICs", nics(m), nics(n));
    }
    d
}

/// The names of the snapshots of `cluster` (complete or not), sorted.
fn tags(state_dir: &Path, cluster: &str) -> Vec<String> {
    let mut t: Vec<String> = std::fs::read_dir(snapshots_dir(state_dir, cluster))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    t.sort();
    t
}

/// Read the snapshot `tag` of `cluster` and check its files against its manifest: absent is
/// bad input naming the tags there are; a manifest that cannot be read, or a file missing or
/// of another size, is corruption naming the file.
pub fn read_snapshot(
    state_dir: &Path,
    cluster: &str,
    tag: &str,
) -> Result<ClusterSnapshot, SnapshotError> {
    validate_tag(tag)?;
    let dir = snapshots_dir(state_dir, cluster).join(tag);
    cluster_paths(state_dir, cluster).check_private()?;
    if !dir.is_dir() {
        return Err(SnapshotError::NoSnapshot {
            cluster: cluster.to_string(),
            tag: tag.to_string(),
            have: tags(state_dir, cluster),
        });
    }
    let corrupt = |path: PathBuf, reason: String| SnapshotError::Corrupt {
        tag: tag.to_string(),
        path,
        reason,
    };
    let manifest = dir.join(MANIFEST);
    let bytes = drydock_gc::read_regular(
        &manifest,
        drydock_gc::Links::Refuse,
        drydock_gc::MAX_STATE_BYTES,
    )
    .map_err(|e| corrupt(manifest.clone(), format!("cannot be read ({e})")))?;
    let snap: ClusterSnapshot = serde_json::from_slice(&bytes).map_err(|e| {
        corrupt(
            manifest.clone(),
            format!("is not a snapshot manifest ({e})"),
        )
    })?;
    if snap.format != SNAPSHOT_FORMAT || snap.tag != tag || snap.cluster != cluster {
        return Err(corrupt(
            manifest,
            format!(
                "is format {} of {} {:?} (expected format {SNAPSHOT_FORMAT} of {cluster} {tag:?})",
                snap.format, snap.cluster, snap.tag
            ),
        ));
    }
    for m in &snap.machines {
        let mdir = dir.join("machines").join(&m.machine);
        let found = listing(&mdir).unwrap_or_default();
        if let Some((file, why)) = files_differ(&m.files, &found) {
            return Err(corrupt(mdir.join(file), why));
        }
    }
    Ok(snap)
}

/// The folder of machine `machine` in the snapshot `tag`.
pub(crate) fn machine_dir(state_dir: &Path, cluster: &str, tag: &str, machine: &str) -> PathBuf {
    snapshots_dir(state_dir, cluster)
        .join(tag)
        .join("machines")
        .join(machine)
}

/// One row of `snapshots`.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotRow {
    pub tag: String,
    pub created: Option<u64>,
    pub machines: Vec<String>,
    pub bytes: u64,
    pub systems: Vec<String>,
    /// Why it cannot be restored (corrupt, or being written), if it cannot.
    pub problem: Option<String>,
}

/// `snapshots`: every snapshot of `cluster`, oldest first; a corrupt one is listed with its
/// problem.
pub fn list_snapshots(state_dir: &Path, cluster: &str) -> Result<Vec<SnapshotRow>, SnapshotError> {
    cluster_paths(state_dir, cluster).check_private()?;
    let mut rows: Vec<SnapshotRow> = tags(state_dir, cluster)
        .into_iter()
        .map(|tag| match read_snapshot(state_dir, cluster, &tag) {
            Ok(s) => SnapshotRow {
                created: Some(s.created),
                machines: s.machines.iter().map(|m| m.machine.clone()).collect(),
                bytes: s.bytes(),
                systems: s.systems(),
                problem: None,
                tag,
            },
            Err(e) => SnapshotRow {
                created: None,
                machines: Vec::new(),
                bytes: drydock_gc::disk_usage(&[snapshots_dir(state_dir, cluster).join(&tag)])
                    .unwrap_or(0),
                systems: Vec::new(),
                problem: Some(drydock_vm::error_chain(&e)),
                tag,
            },
        })
        .collect();
    rows.sort_by_key(|r| (r.created.unwrap_or(u64::MAX), r.tag.clone()));
    Ok(rows)
}

/// What `snapshot --rm` removed.
#[derive(Debug, Clone, Serialize)]
pub struct Removed {
    pub cluster: String,
    pub tag: String,
    pub bytes: u64,
    /// Its run, whose pins went with it.
    pub run_id: Option<i64>,
}

/// `snapshot --rm TAG`: the snapshot's folder and its run's pins (the run is kept, with its
/// artifact marked removed, as `gc` leaves a run it reclaimed). A corrupt one is removed too.
pub fn remove_snapshot(
    state_dir: &Path,
    cluster: &str,
    tag: &str,
) -> Result<Removed, SnapshotError> {
    validate_tag(tag)?;
    cluster_paths(state_dir, cluster).check_private()?;
    let dir = snapshots_dir(state_dir, cluster).join(tag);
    if !dir.is_dir() {
        return Err(SnapshotError::NoSnapshot {
            cluster: cluster.to_string(),
            tag: tag.to_string(),
            have: tags(state_dir, cluster),
        });
    }
    let run_id = manifest_run(&dir);
    let bytes = drydock_gc::disk_usage(std::slice::from_ref(&dir)).unwrap_or(0);
    std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
    if let Some(id) = run_id {
        forget_run(state_dir, id, &dir);
    }
    Ok(Removed {
        cluster: cluster.to_string(),
        tag: tag.to_string(),
        bytes,
        run_id,
    })
}

/// The run that recorded the snapshot in `dir`, as its manifest says (`None` if it cannot be
/// read: the snapshot's files are not checked).
fn manifest_run(dir: &Path) -> Option<i64> {
    let bytes = drydock_gc::read_regular(
        &dir.join(MANIFEST),
        drydock_gc::Links::Refuse,
        drydock_gc::MAX_STATE_BYTES,
    )
    .ok()?;
    serde_json::from_slice::<ClusterSnapshot>(&bytes)
        .ok()?
        .run_id
}

/// The snapshot folder `dir` of run `id` goes (removed, or replaced by a new snapshot of the
/// same tag, which has a run of its own): the run's artifact is marked removed, so no `gc` of
/// it removes that folder again, and its pins go (the run stays, as after `gc`).
fn forget_run(state_dir: &Path, id: i64, dir: &Path) {
    let forgot = drydock_gc::RunsDb::open(state_dir).and_then(|db| {
        for a in db.artifacts(id)? {
            if Path::new(&a.path) == dir {
                db.artifact_removed(a.id)?;
            }
        }
        db.unpin_run(id)
    });
    if let Err(e) = forgot {
        tracing::warn!("unpinning run {id}: {}", drydock_vm::error_chain(&e));
    }
}

/// Ask the owner of the up cluster `cluster` for the snapshot `tag` (see the module's doc);
/// with `stop`, the cluster stops once it is saved. Returns the manifest written.
pub fn take_snapshot(
    state_dir: &Path,
    cluster: &str,
    tag: &str,
    stop: bool,
    cancel: Option<&Cancel>,
) -> Result<ClusterSnapshot, SnapshotError> {
    validate_tag(tag)?;
    let req = ControlRequest {
        op: ControlOp::Snapshot,
        tag: Some(tag.to_string()),
        stop,
        ..ControlRequest::default()
    };
    crate::control::request_until(state_dir, cluster, &req, SNAPSHOT_DEADLINE, cancel)?;
    read_snapshot(state_dir, cluster, tag)
}

impl RunningCluster {
    /// The owner's half of [`take_snapshot`] (see the module's doc).
    pub(crate) fn snapshot(
        &mut self,
        tag: &str,
        stop: bool,
        on_event: &mut dyn FnMut(&crate::events::OwnerEvent),
    ) -> Result<ClusterSnapshot, SnapshotError> {
        validate_tag(tag)?;
        let cluster = self.plan.name.clone();
        let mut records = Vec::new();
        for m in &self.plan.machines {
            if !self.machines.contains_key(&m.machine) {
                return Err(SnapshotError::NotRunning {
                    cluster,
                    machine: m.machine.clone(),
                });
            }
            let paths = VmPaths::in_state_dir(&self.state_dir, &m.vm_name);
            let record = LaunchRecord::read(&paths).map_err(|e| SnapshotError::Machine {
                machine: m.machine.clone(),
                source: e.into(),
            })?;
            if record.spec.shares_over_9p() {
                return Err(SnapshotError::NineP {
                    machine: m.machine.clone(),
                });
            }
            records.push((m.clone(), record, paths));
        }
        // Every check before anything pauses: each QEMU's version, and what it can migrate.
        let mut versions: BTreeMap<PathBuf, String> = BTreeMap::new();
        for (m, record, _) in &records {
            let q = &record.spec.qemu;
            if !versions.contains_key(q) {
                let v = drydock_vm::qemu_version(q).map_err(|source| SnapshotError::Machine {
                    machine: m.machine.clone(),
                    source,
                })?;
                versions.insert(q.clone(), v);
            }
            drydock_vm::check_snapshottable(record, &versions[q]).map_err(|source| {
                SnapshotError::Machine {
                    machine: m.machine.clone(),
                    source,
                }
            })?;
        }
        let root = snapshots_dir(&self.state_dir, &cluster);
        let tmp = root.join(format!(".{tag}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        drydock_gc::private_dir(&root)?;
        drydock_gc::private_dir(&tmp)?;
        drydock_gc::private_dir(&tmp.join("machines"))?;
        let mut qmps = Vec::new();
        for (m, _, paths) in &records {
            let q = Qmp::connect(&paths.qmp_socket(), QMP_CONNECT).map_err(|source| {
                SnapshotError::Qmp {
                    machine: m.machine.clone(),
                    source,
                }
            })?;
            qmps.push(q);
        }
        // The cut: no frame crosses a VLAN from here on; then every machine pauses.
        for h in &self.hubs {
            h.set_frozen(true);
        }
        let cut = Instant::now();
        let mut paused = Vec::new();
        let mut result = Ok(());
        for ((m, _, _), q) in records.iter().zip(qmps.iter_mut()) {
            match q.stop() {
                Ok(()) => paused.push(m.machine.clone()),
                Err(source) => {
                    result = Err(SnapshotError::Qmp {
                        machine: m.machine.clone(),
                        source,
                    });
                    break;
                }
            }
        }
        let mut saved = Vec::new();
        if result.is_ok() {
            let outcomes: Vec<Result<SnapshotMachine, SnapshotError>> = std::thread::scope(|s| {
                let handles: Vec<_> = records
                    .iter()
                    .zip(qmps.iter_mut())
                    .map(|((m, record, _), q)| {
                        let dir = tmp.join("machines").join(&m.machine);
                        let version = versions[&record.spec.qemu].clone();
                        s.spawn(move || save_machine(m, record, q, &dir, &version))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| panic!("a save thread panicked"))
                    })
                    .collect()
            });
            for o in outcomes {
                match o {
                    Ok(m) => saved.push(m),
                    Err(e) if result.is_ok() => result = Err(e),
                    Err(_) => {}
                }
            }
        }
        // Resume (or stop): the hubs first, then every machine that was paused.
        let resume = !stop || result.is_err();
        if resume {
            for h in &self.hubs {
                h.set_frozen(false);
            }
            for ((m, _, _), q) in records.iter().zip(qmps.iter_mut()) {
                if paused.contains(&m.machine) {
                    if let Err(e) = q.cont() {
                        tracing::warn!("resuming {}: {}", m.machine, drydock_vm::error_chain(&e));
                    }
                }
            }
        }
        let paused_secs = cut.elapsed().as_secs_f64();
        drop(qmps);
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let version = versions.values().next().cloned().unwrap_or_default();
        let mut snap = ClusterSnapshot {
            format: SNAPSHOT_FORMAT,
            cluster: cluster.clone(),
            tag: tag.to_string(),
            created: drydock_gc::epoch_secs().max(0) as u64,
            qemu_version: version,
            plan: self.plan.clone(),
            machines: saved,
            paused_secs,
            stopped: stop,
            run_id: None,
            accel: self.opts.accel.as_arg().to_string(),
            qemu: self.opts.qemu.clone(),
            log_limit: self.opts.log_limit,
            store: self.opts.layout.clone(),
        };
        let dir = root.join(tag);
        snap.run_id = record_run(&self.opts, &snap, &records, &dir);
        let write = (|| -> Result<(), SnapshotError> {
            drydock_vm::write_json(&tmp.join(MANIFEST), &snap).map_err(|source| {
                SnapshotError::Write {
                    path: tmp.join(MANIFEST),
                    source,
                }
            })?;
            if dir.exists() {
                // The snapshot this one replaces: its run lets go of the folder (now this
                // one's) and of its pins.
                if let Some(old) = manifest_run(&dir).filter(|&old| Some(old) != snap.run_id) {
                    forget_run(&self.state_dir, old, &dir);
                }
                std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
            }
            std::fs::rename(&tmp, &dir).map_err(io(&dir))
        })();
        if let Err(e) = write {
            let _ = std::fs::remove_dir_all(&tmp);
            if let Some(id) = snap.run_id {
                let _ = drydock_gc::RunsDb::open(&self.state_dir).and_then(|db| db.unpin_run(id));
            }
            return Err(e);
        }
        if stop {
            // Paused guests cannot power down: each QEMU quits at once.
            self.quit_all(on_event);
        }
        Ok(snap)
    }

    /// Stop every machine at once (QMP quit, no powerdown), in parallel, and let the owner end
    /// (`snapshot --stop`; `ControlOp::Quit`, before a restore replaces the machines).
    pub(crate) fn quit_all(&mut self, on_event: &mut dyn FnMut(&crate::events::OwnerEvent)) {
        let all: Vec<String> = self.machines.keys().cloned().collect();
        for t in self.machines.values() {
            t.crash.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        self.stay = false;
        self.stop_machines(&all, on_event);
    }
}

/// Save the paused machine `m` into `dir` and list what was saved.
fn save_machine(
    m: &crate::compose::MachinePlan,
    record: &LaunchRecord,
    qmp: &mut Qmp,
    dir: &Path,
    version: &str,
) -> Result<SnapshotMachine, SnapshotError> {
    let started = Instant::now();
    drydock_gc::private_dir(dir)?;
    drydock_vm::save_paused(record, qmp, dir, version).map_err(|source| {
        SnapshotError::Machine {
            machine: m.machine.clone(),
            source,
        }
    })?;
    Ok(SnapshotMachine {
        machine: m.machine.clone(),
        vm_name: m.vm_name.clone(),
        system: record.toplevel.clone(),
        files: listing(dir).map_err(io(dir))?,
        save_secs: started.elapsed().as_secs_f64(),
    })
}

/// Record the snapshot as a finished run that pins its systems and owns its folder; `None`
/// (said in the log) if it cannot be recorded.
fn record_run(
    opts: &ClusterLaunch,
    snap: &ClusterSnapshot,
    records: &[(crate::compose::MachinePlan, LaunchRecord, VmPaths)],
    dir: &Path,
) -> Option<i64> {
    let recorded = (|| -> Result<i64, String> {
        let db = drydock_gc::RunsDb::open(&opts.state_dir).map_err(|e| e.to_string())?;
        let name = format!("snapshot {} {}", snap.cluster, snap.tag);
        let argv = vec![
            "drydock".to_string(),
            "snapshot".to_string(),
            "-p".to_string(),
            snap.cluster.clone(),
            snap.tag.clone(),
        ];
        let id = db
            .begin_run(&opts.layout, &name, &argv, drydock_gc::RunKind::Vm)
            .map_err(|e| e.to_string())?;
        for (_, record, _) in records {
            drydock_vm::pin_launch(&db, id, &opts.layout, record)
                .map_err(|e| drydock_vm::error_chain(&e))?;
        }
        db.add_artifact(id, drydock_gc::ArtifactKind::Other, dir)
            .map_err(|e| e.to_string())?;
        db.finish_run(id, Some(0)).map_err(|e| e.to_string())?;
        Ok(id)
    })();
    match recorded {
        Ok(id) => Some(id),
        Err(e) => {
            tracing::warn!(
                "snapshot {} of {}: its systems are not pinned: {e}",
                snap.tag,
                snap.cluster
            );
            None
        }
    }
}

/// What `restore` needs besides the snapshot.
#[derive(Debug, Clone)]
pub struct RestoreRequest<'a> {
    pub cluster: &'a str,
    pub tag: &'a str,
    /// How the owner launches machines later (a start, a reload); its `ready_timeout` bounds
    /// the restore.
    pub launch: &'a ClusterLaunch,
}

/// What `restore` did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub cluster: String,
    pub tag: String,
    pub machines: Vec<String>,
    /// The cluster was up and was stopped first (how long that took).
    pub stopped_first_secs: Option<f64>,
    /// From the owner's start to every backdoor answering (clocks set).
    pub restore_secs: f64,
    pub owner_pid: u32,
}

/// Check the snapshot `tag` for a restore (see the module's doc), without changing anything.
pub fn check_restore(
    state_dir: &Path,
    layout: &StoreLayout,
    cluster: &str,
    tag: &str,
) -> Result<ClusterSnapshot, SnapshotError> {
    let snap = read_snapshot(state_dir, cluster, tag)?;
    let up_json = crate::state::up_plan_file(state_dir, cluster);
    let last: Option<ClusterPlan> = drydock_gc::read_regular(
        &up_json,
        drydock_gc::Links::Refuse,
        drydock_gc::MAX_STATE_BYTES,
    )
    .ok()
    .and_then(|b| serde_json::from_slice(&b).ok());
    if let Some(last) = last {
        let differences = layout_differences(&snap.plan, &last);
        if !differences.is_empty() {
            return Err(SnapshotError::Layout {
                cluster: cluster.to_string(),
                tag: tag.to_string(),
                up_json,
                differences,
            });
        }
    }
    let mut versions: BTreeMap<PathBuf, String> = BTreeMap::new();
    for m in &snap.machines {
        let mdir = machine_dir(state_dir, cluster, tag, &m.machine);
        let (_, record) =
            drydock_vm::read_snapshot_dir(&mdir).map_err(|source| SnapshotError::Machine {
                machine: m.machine.clone(),
                source,
            })?;
        let q = record.spec.qemu.clone();
        if !versions.contains_key(&q) {
            let v = drydock_vm::qemu_version(&q).map_err(|source| SnapshotError::Machine {
                machine: m.machine.clone(),
                source,
            })?;
            versions.insert(q.clone(), v);
        }
        if versions[&q] != snap.qemu_version {
            return Err(SnapshotError::Qemu {
                tag: tag.to_string(),
                machine: m.machine.clone(),
                qemu: q.clone(),
                then: snap.qemu_version.clone(),
                now: versions[&q].clone(),
            });
        }
        if let Some(system) = &m.system {
            let layout = record.store.as_ref().unwrap_or(layout);
            let present = layout
                .parse(system)
                .map(|sp| layout.physical(&sp).exists())
                .unwrap_or(false);
            if !present {
                return Err(SnapshotError::SystemGone {
                    tag: tag.to_string(),
                    machine: m.machine.clone(),
                    system: system.clone(),
                });
            }
        }
    }
    Ok(snap)
}

/// `restore`: check the snapshot, stop the cluster if it is up, start an owner that restores
/// every machine (see the module's doc) and wait until every backdoor answers. `cancel` (or a
/// failure) stops the owner, which stops everything it started: nothing is left running.
pub fn restore(req: &RestoreRequest<'_>, cancel: &Cancel) -> Result<RestoreReport, SnapshotError> {
    let state_dir = req.launch.state_dir.as_path();
    let snap = check_restore(state_dir, &req.launch.layout, req.cluster, req.tag)?;
    // The snapshot's own store, whatever `--store` the restore was given.
    let launch = snap.launch_like(req.launch);
    let mut stopped_first_secs = None;
    if ClusterState::read_up(state_dir, req.cluster).is_some() {
        // Its machines are replaced: they quit at once (no guest shutdown), then `down` waits
        // for the owner's end and cleans up as always.
        let t = Instant::now();
        let quit = ControlRequest {
            op: ControlOp::Quit,
            ..ControlRequest::default()
        };
        if let Err(e) = crate::control::request(state_dir, req.cluster, &quit, QUIT_DEADLINE) {
            tracing::info!("quitting {}: {}", req.cluster, drydock_vm::error_chain(&e));
        }
        crate::control::down(state_dir, req.cluster)?;
        stopped_first_secs = Some(t.elapsed().as_secs_f64());
    }
    let lock = OwnerLock::claim(state_dir, req.cluster)?;
    let up_json = crate::state::up_plan_file(state_dir, req.cluster);
    drydock_vm::write_json(&up_json, &snap.plan).map_err(|source| SnapshotError::Write {
        path: up_json.clone(),
        source,
    })?;
    let detached = crate::control::start_detached(
        &crate::control::DetachedOwner {
            plan: &snap.plan,
            launch: &launch,
            store_root: launch.layout.root.as_deref(),
            lock: &lock,
            idle: false,
            restore: Some(req.tag),
        },
        cancel,
    )?;
    Ok(RestoreReport {
        cluster: req.cluster.to_string(),
        tag: req.tag.to_string(),
        machines: snap.machines.iter().map(|m| m.machine.clone()).collect(),
        stopped_first_secs,
        restore_secs: detached.after_secs,
        owner_pid: detached.owner_pid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compose::{MachinePlan, MachineSettings, NicPlan, SystemRef};

    fn machine(name: &str, number: u8, vlans: &[u8], memory: u32) -> MachinePlan {
        MachinePlan {
            machine: name.to_string(),
            vm_name: format!("c.{name}"),
            number,
            nics: vlans
                .iter()
                .map(|&v| NicPlan {
                    vlan: v,
                    mac: format!("52:54:00:12:{v:02x}:{number:02x}"),
                    address: format!("192.168.{v}.{number}"),
                })
                .collect(),
            append: String::new(),
            settings: MachineSettings {
                system: SystemRef::Path {
                    path: format!("/nix/store/{name}"),
                },
                memory_mib: memory,
                cores: 1,
                disk_mib: 0,
                vlans: vlans.to_vec(),
                profile: Default::default(),
            },
        }
    }

    fn plan(machines: Vec<MachinePlan>) -> ClusterPlan {
        ClusterPlan {
            name: "c".into(),
            file: None,
            machines,
            vlans: vec![1],
            hosts: String::new(),
        }
    }

    #[test]
    fn layouts_are_compared_by_machines_networks_and_settings_not_systems() {
        let then = plan(vec![machine("a", 1, &[1], 256), machine("b", 2, &[1], 256)]);
        let mut same_but_new_system = then.clone();
        same_but_new_system.machines[0].settings.system = SystemRef::Path {
            path: "/nix/store/x".into(),
        };
        let cases: Vec<(&str, ClusterPlan, Vec<&str>)> = vec![
            ("identical", then.clone(), vec![]),
            ("another system only", same_but_new_system, vec![]),
            (
                "a machine added",
                plan(vec![
                    machine("a", 1, &[1], 256),
                    machine("b", 2, &[1], 256),
                    machine("c", 3, &[1], 256),
                ]),
                vec!["machine c is new (the snapshot has a, b)"],
            ),
            (
                "a machine gone",
                plan(vec![machine("a", 1, &[1], 256)]),
                vec!["machine b is gone (the cluster has a)"],
            ),
            (
                "memory and VLANs changed",
                plan(vec![machine("a", 1, &[1], 512), machine("b", 2, &[2], 256)]),
                vec![
                    "machine a: memory (MiB) 256 then, 512 now",
                    "machine b: NICs vlan 1 192.168.1.2 52:54:00:12:01:02 then, vlan 2 192.168.2.2 52:54:00:12:02:02 now",
                ],
            ),
        ];
        for (what, now, want) in cases {
            assert_eq!(layout_differences(&then, &now), want, "{what}");
        }
    }

    #[test]
    fn files_are_checked_against_the_manifest() {
        let m = |pairs: &[(&str, u64)]| -> BTreeMap<String, u64> {
            pairs.iter().map(|(n, b)| (n.to_string(), *b)).collect()
        };
        let expected = m(&[("state", 100), ("disk.qcow2", 7)]);
        let cases = [
            ("complete", m(&[("state", 100), ("disk.qcow2", 7)]), None),
            (
                "an extra file is fine",
                m(&[("state", 100), ("disk.qcow2", 7), ("x", 1)]),
                None,
            ),
            (
                "missing",
                m(&[("state", 100)]),
                Some(("disk.qcow2", "is missing")),
            ),
            (
                "truncated",
                m(&[("state", 50), ("disk.qcow2", 7)]),
                Some((
                    "state",
                    "has 50 bytes, the snapshot recorded 100 (truncated or changed)",
                )),
            ),
        ];
        for (what, found, want) in cases {
            let got = files_differ(&expected, &found);
            assert_eq!(
                got.as_ref().map(|(f, w)| (f.as_str(), w.as_str())),
                want,
                "{what}"
            );
        }
    }

    #[test]
    fn tags_are_named_like_vms_and_never_hidden() {
        for ok in ["ready", "r-1", "a.b", "A_2"] {
            assert!(validate_tag(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".hidden", "a/b", "..", "with space"] {
            assert!(
                matches!(validate_tag(bad), Err(SnapshotError::BadTag(_))),
                "{bad}"
            );
        }
    }
}
