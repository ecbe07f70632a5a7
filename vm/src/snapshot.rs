//! Snapshots of running VMs: QEMU's full state migrated to a file, a copy of the writable
//! overlay taken while the guest is paused, the launch record, and the metadata that decides
//! whether a snapshot may be loaded again: the closure key, the QEMU version and the machine
//! options. Restoring starts the store servers, then QEMU waiting for an incoming migration,
//! and loads the file into it (see [`StateFormat`] for how, by QEMU version).
//!
//! A snapshot is a folder (`vm snapshot`'s is `VMDIR/snapshots/TAG`; a cluster's are its own):
//! `state` (the migration stream), `disk.qcow2` (the overlay, if the VM has one), `meta.json`
//! ([`SnapshotMeta`]) and `launch.json` (the [`LaunchRecord`]). [`save_paused`] writes one of a
//! VM its caller paused; [`read_snapshot_dir`] reads one back and refuses a damaged one.
//!
//! VMs with virtio-fs devices (the store, a nixos-test node's writable folders) need QEMU 8.2 or
//! newer: that is when QEMU learnt to migrate a vhost-user-fs device, whose back-end (drydock's
//! store server, see `storefs`) hands its state over through QEMU. Older QEMUs snapshot VMs
//! whose store is an image.
//!
//! Saving reads every page of the guest's RAM, and a shared memfd (a virtio-fs VM's) allocates
//! the pages it is read at: after its first snapshot such a VM holds all of its RAM on the host
//! (measured: 96 MiB before, 512 MiB after, for a 512 MiB guest), and that first save is the
//! slow one (1 GiB: 5.6-6.5 s on a loaded machine, 0.7 s the next time). A restored VM holds
//! only what was saved.
//!
//! How the RAM is stored (a stream, or QEMU's `mapped-ram` from 9.0 on, which restores a
//! 256 MiB guest about twice and a 1 GiB guest about four times as fast) was measured: see
//! [`StateFormat::for_qemu`]. The disk is copied (`copy_file_range`: the blocks are shared
//! where the file system can): a test guest's overlay is about 200 KiB, and 64 MiB copy in
//! 30 ms here (ext4), where a qcow2 external snapshot would grow the running VM's backing chain
//! at each snapshot.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::launch::{LaunchRecord, VmState, write_json};
use crate::plan::{ShareTransport, StoreAttachment, VmPaths, plan};
use crate::qemu_version::{QemuVersion, qemu_can_migrate_virtiofs};
use crate::qmp::{Qmp, QmpError, file_uri, incoming_file_uri};

const MIGRATION_DEADLINE: Duration = Duration::from_secs(600);

/// How the state file holds the VM's state, and so how it is loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StateFormat {
    /// A migration stream written through `exec:cat > FILE` and read back through
    /// `-incoming exec:cat FILE` (QEMU before 8.2 has no `file:` URI).
    #[default]
    ExecStream,
    /// A migration stream written to a `file:` URI and read from one (`-incoming defer`, then
    /// `migrate-incoming`).
    FileStream,
    /// QEMU's `mapped-ram` capability (QEMU 9.0 or newer): each RAM page at a fixed offset of
    /// the file, which is sparse (its length is the RAM's, its blocks what was saved), read back
    /// with positioned reads.
    MappedRam,
}

impl StateFormat {
    /// The format a snapshot taken with the QEMU that says `qemu_version` is written in:
    /// `mapped-ram` from QEMU 9.0 on (where it appeared), a `file:` stream on 8.2, `exec:cat`
    /// before.
    ///
    /// Measured here (QEMU 10.0, TCG, 2 shared cores with other VMs running, the test guest
    /// booted and idle over virtio-fs, `vm restore` wall time, 3 runs each; the state on disk is
    /// about 66 MiB at 256 MiB of RAM, 80 MiB at 1 GiB, in every format):
    ///
    /// | RAM     | `file:` stream   | `mapped-ram`     | `mapped-ram` + multifd (2 channels) |
    /// |---------|------------------|------------------|-------------------------------------|
    /// | 256 MiB | 0.49, 0.65, 0.95 | 0.27, 0.27, 0.41 | 0.31, 0.39, 0.69                    |
    /// | 1 GiB   | 1.09, 1.17, 1.18 | 0.20, 0.27, 0.30 | 0.23, 0.25, 0.29                    |
    ///
    /// A stream is parsed page by page, zero pages included, so its load grows with the RAM;
    /// `mapped-ram` puts each page at its own offset of a sparse file and reads only the pages
    /// that were saved, in large positioned reads. multifd's threads do not pay on two cores
    /// at 256 MiB and gain little at 1 GiB: not used. Saving takes the same time in each (0.7 s
    /// at 256 MiB, 1.4 s at 1 GiB). Mapping the saved memory instead of reading it (a
    /// file-backed RAM whose file is the snapshot's) would have to be `MAP_PRIVATE` to leave the
    /// snapshot intact, which the store server, mapping the guest's memory to serve it, would
    /// not see: not sound with vhost-user; a shared mapping of a copy costs the copy.
    pub fn for_qemu(qemu_version: &str) -> Self {
        match parse_qemu_version(qemu_version) {
            Some(v) if v >= (9, 0) => StateFormat::MappedRam,
            Some(v) if v >= (8, 2) => StateFormat::FileStream,
            _ => StateFormat::ExecStream,
        }
    }

    /// The migration capabilities both sides set for this format.
    fn capabilities(self) -> &'static [(&'static str, bool)] {
        match self {
            StateFormat::ExecStream | StateFormat::FileStream => &[],
            StateFormat::MappedRam => &[("mapped-ram", true)],
        }
    }

    /// The `-incoming` argument QEMU starts with to load `state` in this format.
    pub(crate) fn incoming_arg(self, state: &Path) -> Result<String, SnapshotError> {
        Ok(match self {
            StateFormat::ExecStream => incoming_file_uri(state)?,
            StateFormat::FileStream | StateFormat::MappedRam => "defer".to_owned(),
        })
    }
}

/// What a snapshot was taken of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub tag: String,
    /// Seconds since the epoch.
    pub created: u64,
    pub closure_key: Option<String>,
    /// QEMU's `--version` first line.
    pub qemu_version: String,
    /// The machine options: QEMU's arguments for this VM.
    pub machine: Vec<String>,
    /// Bytes of the saved state: the state file's length (`mapped-ram`: the RAM's size, the
    /// file being sparse).
    pub state_bytes: u64,
    /// What the state file takes on disk (its blocks), if known.
    #[serde(default)]
    pub state_disk_bytes: Option<u64>,
    /// Seconds the save took (guest paused).
    pub save_seconds: f64,
    /// How the state file is written (a snapshot of an older drydock: `exec-stream`).
    #[serde(default)]
    pub format: StateFormat,
    /// Bytes of the saved disk (`disk.qcow2`), if the VM has one.
    #[serde(default)]
    pub disk_bytes: Option<u64>,
}

/// Why a snapshot cannot be taken or loaded.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The VM has virtio-fs devices and its QEMU is older than 8.2.
    #[error(
        "snapshotting a virtio-fs VM needs QEMU 8.2 or newer (migration of vhost-user-fs devices); {} is QEMU {version}",
        qemu.display()
    )]
    VirtioFsNeedsQemu { qemu: PathBuf, version: String },
    #[error("invalid snapshot tag {0:?}: use letters, digits, '-', '_' or '.'")]
    BadTag(String),
    #[error("no snapshot {tag:?} of this VM (looked in {})", dir.display())]
    NoSnapshot { tag: String, dir: PathBuf },
    #[error(
        "snapshot {tag:?} was taken of another {what}: snapshot has {then}, the VM now has {now}"
    )]
    Mismatch {
        tag: String,
        what: &'static str,
        then: String,
        now: String,
    },
    #[error("snapshot {tag:?} is unreadable ({}): {reason}", path.display())]
    Corrupt {
        tag: String,
        path: PathBuf,
        reason: String,
    },
    #[error("the store image {} is gone", .0.display())]
    ImageMissing(PathBuf),
    #[error("{0} is not running: only a running VM can be snapshotted")]
    NotRunning(String),
    #[error("QMP")]
    Qmp(#[from] QmpError),
    #[error(transparent)]
    Launch(#[from] crate::launch::LaunchError),
    #[error("cannot write {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl SnapshotError {
    pub fn is_bad_input(&self) -> bool {
        match self {
            Self::Launch(e) => e.is_bad_input(),
            _ => matches!(
                self,
                Self::VirtioFsNeedsQemu { .. }
                    | Self::BadTag(_)
                    | Self::NoSnapshot { .. }
                    | Self::Mismatch { .. }
                    | Self::NotRunning(_)
            ),
        }
    }
}

/// `(major, minor)` of QEMU's `--version` first line (`QEMU emulator version 10.0.2 (Debian
/// ...)`), as [`QemuVersion::parse`] reads it.
fn parse_qemu_version(line: &str) -> Option<(u32, u32)> {
    QemuVersion::parse(line).map(|v| (v.major, v.minor))
}

/// Whether the VM has a vhost-user-fs device (its store, or a writable folder).
fn has_virtiofs(record: &LaunchRecord) -> bool {
    matches!(record.spec.store, StoreAttachment::VirtioFs { .. })
        || record
            .spec
            .shares
            .iter()
            .any(|s| matches!(s.transport, ShareTransport::VirtioFs { .. }))
}

/// A virtio-fs VM needs a QEMU that migrates it (exit 2 naming the version otherwise).
/// (Checked again by [`save_paused`]; a caller saving several VMs checks each first.)
pub fn check_snapshottable(record: &LaunchRecord, qemu_version: &str) -> Result<(), SnapshotError> {
    if has_virtiofs(record) && !qemu_can_migrate_virtiofs(qemu_version) {
        let version = QemuVersion::parse(qemu_version)
            .map(|v| v.to_string())
            .unwrap_or_else(|| qemu_version.to_owned());
        return Err(SnapshotError::VirtioFsNeedsQemu {
            qemu: record.spec.qemu.clone(),
            version,
        });
    }
    Ok(())
}

fn validate_tag(tag: &str) -> Result<(), SnapshotError> {
    crate::plan::validate_name(tag).map_err(|_| SnapshotError::BadTag(tag.to_string()))
}

/// The folder of a snapshot.
pub fn snapshot_dir(paths: &VmPaths, tag: &str) -> PathBuf {
    paths.snapshots().join(tag)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `vm snapshot`: the snapshot `tag` of the running VM `name` under `state_dir` (see
/// [`save_snapshot`]). A VM that was never launched, or does not run, is bad input.
pub fn snapshot_vm(state_dir: &Path, name: &str, tag: &str) -> Result<SnapshotMeta, SnapshotError> {
    let record = LaunchRecord::of_vm(state_dir, name)?;
    let paths = VmPaths::in_state_dir(state_dir, name);
    if !VmState::read(&paths).is_some_and(|s| s.qemu_alive()) {
        return Err(SnapshotError::NotRunning(name.to_owned()));
    }
    let version = qemu_version(&record.spec.qemu)?;
    save_snapshot(&record, tag, &version)
}

/// Pause the running VM, save it into a temporary folder with [`save_paused`], make that the
/// snapshot `tag` (replacing one of that name), and resume the guest whatever happened.
pub fn save_snapshot(
    record: &LaunchRecord,
    tag: &str,
    qemu_version: &str,
) -> Result<SnapshotMeta, SnapshotError> {
    validate_tag(tag)?;
    check_snapshottable(record, qemu_version)?;
    let paths = &record.spec.paths;
    let final_dir = snapshot_dir(paths, tag);
    let tmp = paths.snapshots().join(format!(".{tag}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    paths
        .check_private()
        .map_err(crate::launch::LaunchError::NotPrivate)?;
    drydock_gc::private_dir(&paths.snapshots()).map_err(crate::launch::LaunchError::NotPrivate)?;
    let mut qmp = Qmp::connect(&paths.qmp_socket(), Duration::from_secs(5))?;
    qmp.stop()?;
    let result = (|| -> Result<SnapshotMeta, SnapshotError> {
        let meta = save_into(record, &mut qmp, &tmp, qemu_version, tag)?;
        let _ = std::fs::remove_dir_all(&final_dir);
        std::fs::rename(&tmp, &final_dir).map_err(io(&final_dir))?;
        Ok(meta)
    })();
    // Whatever happened, the guest carries on.
    let resumed = qmp.cont();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    let meta = result?;
    resumed?;
    Ok(meta)
}

/// Save the VM of `record`, which the caller has paused (QMP `stop`) and keeps paused, into
/// `dir` (made private if new): its state (`state`, migrated by `qmp`, the VM's QMP session),
/// its writable disk (`disk.qcow2`), `meta.json` (returned; its tag is the folder's name) and
/// `launch.json` (the record). The guest is not resumed. A virtio-fs VM needs QEMU 8.2 or newer
/// (bad input otherwise); `qemu_version` is its QEMU's `--version` first line ([`qemu_version`]).
pub fn save_paused(
    record: &LaunchRecord,
    qmp: &mut Qmp,
    dir: &Path,
    qemu_version: &str,
) -> Result<SnapshotMeta, SnapshotError> {
    let tag = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    save_into(record, qmp, dir, qemu_version, &tag)
}

fn save_into(
    record: &LaunchRecord,
    qmp: &mut Qmp,
    dir: &Path,
    qemu_version: &str,
    tag: &str,
) -> Result<SnapshotMeta, SnapshotError> {
    check_snapshottable(record, qemu_version)?;
    drydock_gc::private_dir(dir).map_err(crate::launch::LaunchError::NotPrivate)?;
    let start = Instant::now();
    let state = dir.join("state");
    let format = StateFormat::for_qemu(qemu_version);
    match format {
        StateFormat::ExecStream => qmp.migrate_to_file(&state)?,
        StateFormat::FileStream | StateFormat::MappedRam => {
            if !format.capabilities().is_empty() {
                qmp.set_migration_capabilities(format.capabilities())?;
            }
            qmp.migrate(&file_uri(&state)?)?
        }
    }
    qmp.wait_migration(MIGRATION_DEADLINE)?;
    let disk_bytes = match &record.spec.disk {
        Some(disk) => {
            let saved = dir.join("disk.qcow2");
            Some(copy_private(&disk.overlay, &saved)?)
        }
        None => None,
    };
    let save_seconds = start.elapsed().as_secs_f64();
    let state_meta = std::fs::metadata(&state).map_err(io(&state))?;
    let state_bytes = state_meta.len();
    let state_disk_bytes = Some(std::os::unix::fs::MetadataExt::blocks(&state_meta) * 512);
    let meta = SnapshotMeta {
        tag: tag.to_string(),
        created: drydock_gc::epoch_secs().max(0) as u64,
        closure_key: record.closure_key.clone(),
        qemu_version: qemu_version.to_string(),
        machine: plan(&record.spec)
            .map_err(crate::launch::LaunchError::from)?
            .args,
        state_bytes,
        state_disk_bytes,
        save_seconds,
        format,
        disk_bytes,
    };
    write_json(&dir.join("launch.json"), record)?;
    write_json(&dir.join("meta.json"), &meta)?;
    Ok(meta)
}

/// Copy `from` to `to` (replaced; 0600 whatever `from`'s mode), returning its bytes. The
/// kernel copies (`copy_file_range`), which shares the blocks where the file system can.
fn copy_private(from: &Path, to: &Path) -> Result<u64, SnapshotError> {
    let _ = std::fs::remove_file(to);
    let mut src = std::fs::File::open(from).map_err(io(from))?;
    let mut dst = drydock_gc::create_nofollow(to).map_err(io(to))?;
    std::io::copy(&mut src, &mut dst).map_err(io(to))
}

/// Read the snapshot `tag` of the VM `paths`: its metadata and, if it has one, its launch
/// record (a snapshot of an older drydock has none).
pub fn read_snapshot(
    paths: &VmPaths,
    tag: &str,
) -> Result<(SnapshotMeta, Option<LaunchRecord>), SnapshotError> {
    validate_tag(tag)?;
    let dir = snapshot_dir(paths, tag);
    if !dir.is_dir() {
        return Err(SnapshotError::NoSnapshot {
            tag: tag.to_string(),
            dir,
        });
    }
    read_parts(&dir, tag)
}

/// Read the snapshot in `dir` (as [`save_paused`] writes it): its metadata and the launch record
/// it was taken of. A missing, truncated or unreadable file of it is [`SnapshotError::Corrupt`]
/// naming that file (exit 1); nothing is trusted that was not checked: the record's paths must
/// lie where drydock puts a VM's files, the state must have the length that was saved, and the
/// disk must be there if the VM has one.
pub fn read_snapshot_dir(dir: &Path) -> Result<(SnapshotMeta, LaunchRecord), SnapshotError> {
    let tag = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let (meta, record) = read_parts(dir, &tag)?;
    let record = record.ok_or_else(|| SnapshotError::Corrupt {
        tag,
        path: dir.join("launch.json"),
        reason: "the launch record is missing".into(),
    })?;
    Ok((meta, record))
}

fn read_parts(
    dir: &Path,
    tag: &str,
) -> Result<(SnapshotMeta, Option<LaunchRecord>), SnapshotError> {
    let corrupt = |path: &Path, reason: String| SnapshotError::Corrupt {
        tag: tag.to_string(),
        path: path.to_path_buf(),
        reason,
    };
    let read = |path: &Path| {
        drydock_gc::read_regular(path, drydock_gc::Links::Refuse, drydock_gc::MAX_STATE_BYTES)
            .map_err(|e| match std::error::Error::source(&e) {
                Some(cause) => corrupt(path, cause.to_string()),
                None => corrupt(path, e.to_string()),
            })
    };
    let meta_path = dir.join("meta.json");
    let meta: SnapshotMeta = serde_json::from_slice(&read(&meta_path)?)
        .map_err(|e| corrupt(&meta_path, e.to_string()))?;
    let launch = dir.join("launch.json");
    let record = match std::fs::symlink_metadata(&launch) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        _ => {
            let record: LaunchRecord = serde_json::from_slice(&read(&launch)?)
                .map_err(|e| corrupt(&launch, e.to_string()))?;
            let own = record.spec.paths.clone();
            record
                .check_paths(&own)
                .map_err(|(field, value, expected)| {
                    corrupt(
                        &launch,
                        format!("{field} is {}, but it must be {expected}", value.display()),
                    )
                })?;
            Some(record)
        }
    };
    let state = dir.join("state");
    let len = match std::fs::symlink_metadata(&state) {
        Ok(m) if m.file_type().is_file() => m.len(),
        Ok(_) => return Err(corrupt(&state, "not a regular file".into())),
        Err(e) => {
            return Err(corrupt(&state, format!("the saved state is missing ({e})")));
        }
    };
    if len != meta.state_bytes {
        return Err(corrupt(
            &state,
            format!(
                "{len} bytes, {} were saved (truncated or replaced)",
                meta.state_bytes
            ),
        ));
    }
    if let Some(want) = meta.disk_bytes {
        let disk = dir.join("disk.qcow2");
        match std::fs::symlink_metadata(&disk) {
            Ok(m) if m.file_type().is_file() && m.len() == want => {}
            Ok(m) if m.file_type().is_file() => {
                return Err(corrupt(
                    &disk,
                    format!(
                        "{} bytes, {want} were saved (truncated or replaced)",
                        m.len()
                    ),
                ));
            }
            Ok(_) => return Err(corrupt(&disk, "not a regular file".into())),
            Err(e) => {
                return Err(corrupt(&disk, format!("the saved disk is missing ({e})")));
            }
        }
    }
    Ok((meta, record))
}

/// Decide whether `meta` may be loaded into the VM `record` describes, with the QEMU that says
/// `qemu_version`; name the first difference.
pub fn check_restorable(
    meta: &SnapshotMeta,
    record: &LaunchRecord,
    qemu_version: &str,
) -> Result<(), SnapshotError> {
    check_snapshottable(record, qemu_version)?;
    let mismatch = |what, then: String, now: String| SnapshotError::Mismatch {
        tag: meta.tag.clone(),
        what,
        then,
        now,
    };
    let show = |k: &Option<String>| k.clone().unwrap_or_else(|| "none".into());
    if meta.closure_key != record.closure_key {
        return Err(mismatch(
            "closure",
            show(&meta.closure_key),
            show(&record.closure_key),
        ));
    }
    if meta.qemu_version != qemu_version {
        return Err(mismatch(
            "QEMU",
            meta.qemu_version.clone(),
            qemu_version.to_string(),
        ));
    }
    let now = plan(&record.spec)
        .map_err(crate::launch::LaunchError::from)?
        .args;
    if meta.machine != now {
        let diff = meta
            .machine
            .iter()
            .zip(now.iter())
            .find(|(a, b)| a != b)
            .map(|(a, b)| (a.clone(), b.clone()))
            .unwrap_or_else(|| (meta.machine.join(" "), now.join(" ")));
        return Err(mismatch("machine configuration", diff.0, diff.1));
    }
    if let StoreAttachment::Image { path } = &record.spec.store {
        if !path.exists() {
            return Err(SnapshotError::ImageMissing(path.clone()));
        }
    }
    Ok(())
}

/// Put the snapshot's disk (in `dir`) back as the VM's overlay.
pub(crate) fn prepare_restore(record: &LaunchRecord, dir: &Path) -> Result<(), SnapshotError> {
    if let Some(disk) = &record.spec.disk {
        copy_private(&dir.join("disk.qcow2"), &disk.overlay)?;
    }
    Ok(())
}

/// QEMU's version line (`QEMU emulator version 7.2.22 (...)`), as snapshots record it.
pub fn qemu_version(qemu: &Path) -> Result<String, SnapshotError> {
    // Asked once per binary and process (a restore checks every machine's QEMU, in the CLI and
    // in the owner): the answer is kept while the file's size, inode and time stay the same.
    use std::os::unix::fs::MetadataExt;
    type Key = (PathBuf, u64, u64, i64, i64);
    static SEEN: std::sync::Mutex<Vec<(Key, String)>> = std::sync::Mutex::new(Vec::new());
    let key = std::fs::metadata(qemu).ok().map(|m| {
        (
            qemu.to_path_buf(),
            m.len(),
            m.ino(),
            m.mtime(),
            m.mtime_nsec(),
        )
    });
    if let Some(k) = &key {
        let seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, v)) = seen.iter().find(|(s, _)| s == k) {
            return Ok(v.clone());
        }
    }
    let line = ask_qemu_version(qemu)?;
    if let Some(k) = key {
        SEEN.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((k, line.clone()));
    }
    Ok(line)
}

/// QEMU's `--version` first line, asked.
fn ask_qemu_version(qemu: &Path) -> Result<String, SnapshotError> {
    let mut cmd = std::process::Command::new(qemu);
    cmd.arg("--version");
    let out = crate::spawn::run_captured(cmd, Duration::from_secs(10)).map_err(io(qemu))?;
    let line = out.stdout.lines().next().unwrap_or("").trim().to_string();
    if out.code != Some(0) || line.is_empty() {
        return Err(SnapshotError::Io {
            path: qemu.to_path_buf(),
            source: std::io::Error::other(format!("`--version` failed: {}", out.stderr.trim())),
        });
    }
    Ok(line)
}

/// How often [`load_incoming`] asks QEMU whether an `exec:` stream has loaded.
const LOAD_POLL: Duration = Duration::from_millis(20);

/// A snapshot to load into a VM that QEMU started with `format`'s `-incoming` argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Incoming {
    /// The snapshot's folder (its `state` is loaded).
    pub dir: PathBuf,
    pub format: StateFormat,
    /// Resume the guest once loaded; otherwise it stays paused (phase `loading`) for the
    /// caller to resume (QMP `cont`, then [`crate::Vm::mark_running`]).
    pub resume: bool,
}

impl Incoming {
    /// The snapshot in `dir` to load (its metadata read and checked, as [`read_snapshot`] does).
    pub(crate) fn of_dir(dir: &Path, resume: bool) -> Result<Self, SnapshotError> {
        let tag = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (meta, _) = read_parts(dir, &tag)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            format: meta.format,
            resume,
        })
    }

    fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// QEMU's `-incoming` argument.
    pub(crate) fn arg(&self) -> Result<String, SnapshotError> {
        self.format.incoming_arg(&self.state())
    }
}

/// After starting QEMU with the `-incoming` of `incoming`: load the state (a `file:` format
/// through QMP's `migrate-incoming`) and wait, until `deadline`, until it has loaded; then
/// resume the guest if asked. A corrupt or truncated state makes QEMU exit: that is an error
/// naming QEMU's words, and the VM is left stopped.
pub(crate) fn load_incoming(
    vm: &mut crate::launch::Vm,
    incoming: &Incoming,
    deadline: Duration,
) -> Result<(), SnapshotError> {
    let qemu_log = vm.paths().dir.join("qemu.log");
    let state = incoming.state();
    let tag = incoming
        .dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let failed = |vm: &mut crate::launch::Vm| {
        let said = crate::console::log_tail(&qemu_log, 10);
        let status = vm.exited().map(|s| s.to_string()).unwrap_or_default();
        SnapshotError::Corrupt {
            tag: tag.clone(),
            path: state.clone(),
            reason: format!(
                "QEMU could not load it ({status}; its log {}): {}",
                qemu_log.display(),
                said.trim()
            ),
        }
    };
    let within = deadline;
    let deadline = drydock_gc::Deadline::after(within);
    let timed_out = || {
        SnapshotError::Qmp(QmpError::Timeout {
            waiting_for: "the snapshot to load".into(),
            after: within,
        })
    };
    let loading = Instant::now();
    if incoming.format != StateFormat::ExecStream {
        // One session for the whole load: nothing else talks to a VM that is loading.
        let left = deadline.timeout().ok_or_else(timed_out)?;
        let mut qmp = match Qmp::connect(&vm.paths().qmp_socket(), left) {
            Ok(q) => q,
            Err(_) if vm.exited().is_some() => return Err(failed(vm)),
            Err(e) => return Err(e.into()),
        };
        let loaded = (|| -> Result<(), QmpError> {
            let mut caps = vec![("events", true)];
            caps.extend_from_slice(incoming.format.capabilities());
            qmp.set_migration_capabilities(&caps)?;
            qmp.migrate_incoming(&file_uri(&state)?)?;
            let left = deadline.remaining();
            let event = qmp.wait_event_where("the snapshot to load", left, |e| {
                e.name == "MIGRATION"
                    && matches!(
                        e.data.get("status").and_then(|s| s.as_str()),
                        Some("completed" | "failed" | "cancelled")
                    )
            })?;
            match event.data.get("status").and_then(|s| s.as_str()) {
                Some("completed") => Ok(()),
                other => Err(QmpError::Migration {
                    status: crate::qmp::MigrationStatus::from_name(other.unwrap_or("failed")),
                    desc: None,
                }),
            }
        })();
        match loaded {
            Ok(()) => {}
            // QEMU exits when an incoming migration fails: its log says why.
            Err(_)
                if vm.qemu_exit().is_some_and(|w| {
                    w.wait(deadline.min(drydock_gc::Deadline::after(Duration::from_secs(2))))
                }) =>
            {
                return Err(failed(vm));
            }
            Err(QmpError::Timeout { .. }) => return Err(timed_out()),
            Err(e) => return Err(e.into()),
        }
        tracing::info!(
            "snapshot loaded in {:.3} s",
            loading.elapsed().as_secs_f64()
        );
        if incoming.resume {
            qmp.cont()?;
            vm.mark_running()?;
        }
        return Ok(());
    }
    loop {
        if vm.exited().is_some() {
            return Err(failed(vm));
        }
        let Some(left) = deadline.timeout() else {
            return Err(timed_out());
        };
        match Qmp::connect(&vm.paths().qmp_socket(), left.min(Duration::from_secs(2))) {
            Ok(mut qmp) => match qmp.status() {
                Ok(st) if st.state == crate::qmp::RunState::InMigrate => {}
                Ok(st) if st.running || !incoming.resume => break,
                Ok(_) => {
                    qmp.cont()?;
                    break;
                }
                Err(e) => tracing::debug!("query-status while loading: {e}"),
            },
            Err(e) => tracing::debug!("QMP while loading: {e}"),
        }
        // A back-off, bounded by the deadline: QEMU says nothing when an incoming migration
        // has loaded (it only pauses; its MIGRATION events are off unless asked for before the
        // migration starts, which `-incoming exec:` does at once), so its state is asked again.
        std::thread::sleep(LOAD_POLL.min(deadline.remaining()));
    }
    if incoming.resume {
        vm.mark_running()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Accel, VmSpec};

    fn record(dir: &Path, store: StoreAttachment, key: &str) -> LaunchRecord {
        let paths = VmPaths::new(dir.to_path_buf(), dir, "x");
        LaunchRecord {
            spec: VmSpec {
                name: "s".into(),
                qemu: "/usr/bin/qemu-system-x86_64".into(),
                kernel: "/k".into(),
                initrd: None,
                cmdline: String::new(),
                memory_mib: 256,
                cpus: 1,
                accel: Accel::Tcg,
                store,
                disk: None,
                paths,
                devices: Default::default(),
                shares: Vec::new(),
            },
            share: None,
            toplevel: None,
            accel_reason: String::new(),
            run_id: None,
            shared_run: false,
            closure_key: Some(key.into()),
            store: None,
            profile: Default::default(),
            reginfo: None,
        }
    }

    fn meta(r: &LaunchRecord) -> SnapshotMeta {
        SnapshotMeta {
            tag: "t".into(),
            created: 0,
            closure_key: r.closure_key.clone(),
            qemu_version: "QEMU 7.2".into(),
            machine: plan(&r.spec).unwrap().args,
            state_bytes: 0,
            state_disk_bytes: None,
            save_seconds: 0.0,
            format: StateFormat::ExecStream,
            disk_bytes: None,
        }
    }

    #[test]
    fn mismatches_are_named() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("img");
        std::fs::write(&img, "").unwrap();
        let r = record(d.path(), StoreAttachment::Image { path: img.clone() }, "k1");
        let m = meta(&r);
        assert!(check_restorable(&m, &r, "QEMU 7.2").is_ok());
        let e = check_restorable(
            &m,
            &record(d.path(), StoreAttachment::Image { path: img.clone() }, "k2"),
            "QEMU 7.2",
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("another closure: snapshot has k1, the VM now has k2"),
            "{e}"
        );
        assert!(e.is_bad_input());
        let e = check_restorable(&m, &r, "QEMU 8.0").unwrap_err();
        assert!(e.to_string().contains("another QEMU"), "{e}");
        let mut bigger = r.clone();
        bigger.spec.memory_mib = 512;
        let e = check_restorable(&m, &bigger, "QEMU 7.2").unwrap_err();
        assert!(
            e.to_string()
                .contains("machine configuration: snapshot has 256, the VM now has 512"),
            "{e}"
        );
        std::fs::remove_file(&img).unwrap();
        assert!(matches!(
            check_restorable(&m, &r, "QEMU 7.2"),
            Err(SnapshotError::ImageMissing(_))
        ));
    }

    const OLD_QEMU: &str = "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u16)";
    const NEW_QEMU: &str = "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)";

    #[test]
    fn qemu_versions_that_migrate_virtiofs() {
        for (line, can, format) in [
            (OLD_QEMU, false, StateFormat::ExecStream),
            (
                "QEMU emulator version 8.1.5",
                false,
                StateFormat::ExecStream,
            ),
            ("QEMU emulator version 8.2.0", true, StateFormat::FileStream),
            (NEW_QEMU, true, StateFormat::MappedRam),
            ("QEMU emulator version 9.0", true, StateFormat::MappedRam),
            ("something else", false, StateFormat::ExecStream),
            ("", false, StateFormat::ExecStream),
        ] {
            assert_eq!(qemu_can_migrate_virtiofs(line), can, "{line}");
            assert_eq!(StateFormat::for_qemu(line), format, "{line}");
        }
        assert_eq!(parse_qemu_version(NEW_QEMU), Some((10, 0)));
    }

    #[test]
    fn virtiofs_vms_need_qemu_8_2() {
        let d = tempfile::tempdir().unwrap();
        let mut r = record(
            d.path(),
            StoreAttachment::VirtioFs {
                socket: d.path().join("fs.sock"),
            },
            "k",
        );
        r.spec.qemu = "/opt/qemu-7.2/bin/qemu-system-x86_64".into();
        let e = save_snapshot(&r, "t", OLD_QEMU).unwrap_err();
        assert_eq!(
            e.to_string(),
            "snapshotting a virtio-fs VM needs QEMU 8.2 or newer (migration of vhost-user-fs devices); /opt/qemu-7.2/bin/qemu-system-x86_64 is QEMU 7.2.22"
        );
        assert!(e.is_bad_input());
        let mut m = meta(&r);
        m.qemu_version = OLD_QEMU.into();
        let e = check_restorable(&m, &r, OLD_QEMU).unwrap_err();
        assert!(matches!(e, SnapshotError::VirtioFsNeedsQemu { .. }), "{e}");
        m.qemu_version = NEW_QEMU.into();
        check_restorable(&m, &r, NEW_QEMU).unwrap();
        // An image VM is fine on any QEMU.
        let img = d.path().join("img");
        std::fs::write(&img, "").unwrap();
        let r = record(d.path(), StoreAttachment::Image { path: img }, "k");
        let mut m = meta(&r);
        m.qemu_version = OLD_QEMU.into();
        check_restorable(&m, &r, OLD_QEMU).unwrap();
    }

    #[test]
    fn truncated_and_missing_snapshots() {
        let d = tempfile::tempdir().unwrap();
        let r = record(d.path(), StoreAttachment::None, "k");
        let paths = &r.spec.paths;
        assert!(matches!(
            read_snapshot(paths, "nope"),
            Err(SnapshotError::NoSnapshot { .. })
        ));
        assert!(matches!(
            read_snapshot(paths, "../x"),
            Err(SnapshotError::BadTag(_))
        ));
        let dir = snapshot_dir(paths, "t");
        std::fs::create_dir_all(&dir).unwrap();
        let mut m = meta(&r);
        m.state_bytes = 100;
        write_json(&dir.join("meta.json"), &m).unwrap();
        std::fs::write(dir.join("state"), [0u8; 40]).unwrap();
        let e = read_snapshot(paths, "t").unwrap_err();
        assert!(e.to_string().contains("40 bytes, 100 were saved"), "{e}");
        std::fs::write(dir.join("meta.json"), "{").unwrap();
        assert!(matches!(
            read_snapshot(paths, "t"),
            Err(SnapshotError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_snapshot_dir_is_read_whole_or_refused_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        let r = record(d.path(), StoreAttachment::None, "k");
        let dir = d.path().join("snaps/ready");
        std::fs::create_dir_all(&dir).unwrap();
        let mut m = meta(&r);
        m.state_bytes = 8;
        m.disk_bytes = Some(4);
        write_json(&dir.join("meta.json"), &m).unwrap();
        std::fs::write(dir.join("state"), [1u8; 8]).unwrap();
        std::fs::write(dir.join("disk.qcow2"), [2u8; 4]).unwrap();
        let refused = |says: &str, file: &str| {
            let e = read_snapshot_dir(&dir).unwrap_err();
            assert!(
                matches!(&e, SnapshotError::Corrupt { path, .. } if path == &dir.join(file)),
                "{e:?}"
            );
            assert!(!e.is_bad_input(), "{e}");
            assert!(
                e.to_string().contains(says)
                    && e.to_string()
                        .contains(&dir.join(file).display().to_string())
                    && e.to_string().contains("snapshot \"ready\""),
                "{e}"
            );
        };
        refused("the launch record is missing", "launch.json");
        std::fs::write(dir.join("launch.json"), "{\"spec\":").unwrap();
        refused("EOF", "launch.json");
        write_json(&dir.join("launch.json"), &r).unwrap();
        let (got_meta, got) = read_snapshot_dir(&dir).unwrap();
        assert_eq!((got_meta, got), (m.clone(), r.clone()));
        // A record naming a disk outside the VM's folder is not trusted.
        let mut moved = r.clone();
        moved.spec.paths.dir = d.path().join("elsewhere");
        write_json(&dir.join("launch.json"), &moved).unwrap();
        assert!(
            read_snapshot_dir(&dir).is_ok(),
            "its own folder, consistently"
        );
        let mut bad = r.clone();
        bad.spec.disk = Some(crate::plan::Disk {
            overlay: d.path().join("not-the-vm/disk.qcow2"),
            base: d.path().join("images/base.qcow2"),
            size_mib: 1,
            label: None,
            serial: None,
        });
        write_json(&dir.join("launch.json"), &bad).unwrap();
        refused("spec.disk.overlay", "launch.json");
        write_json(&dir.join("launch.json"), &r).unwrap();
        std::fs::write(dir.join("disk.qcow2"), [2u8; 3]).unwrap();
        refused("3 bytes, 4 were saved", "disk.qcow2");
        std::fs::remove_file(dir.join("disk.qcow2")).unwrap();
        refused("the saved disk is missing", "disk.qcow2");
        std::fs::write(dir.join("disk.qcow2"), [2u8; 4]).unwrap();
        std::fs::write(dir.join("state"), [1u8; 7]).unwrap();
        refused("7 bytes, 8 were saved", "state");
        std::fs::write(dir.join("meta.json"), "").unwrap();
        refused("EOF", "meta.json");
    }

    #[test]
    fn old_snapshots_read_as_exec_streams() {
        let d = tempfile::tempdir().unwrap();
        let r = record(d.path(), StoreAttachment::None, "k");
        let mut v = serde_json::to_value(meta(&r)).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("format");
        o.remove("disk_bytes");
        o.remove("state_disk_bytes");
        let m: SnapshotMeta = serde_json::from_value(v).unwrap();
        assert_eq!((m.format, m.disk_bytes), (StateFormat::ExecStream, None));
        let i = Incoming {
            dir: "/s/t".into(),
            format: StateFormat::FileStream,
            resume: true,
        };
        assert_eq!(i.arg().unwrap(), "defer");
        let i = Incoming {
            format: StateFormat::ExecStream,
            ..i
        };
        assert_eq!(i.arg().unwrap(), "exec:cat '/s/t/state'");
    }
}
