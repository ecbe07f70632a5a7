//! Snapshots of running VMs: QEMU's full state migrated to a file (`exec:cat > FILE`; QEMU 7.2
//! has no `file:` URI) plus a copy of the writable overlay taken while the guest is paused, and
//! the metadata that decides whether a snapshot may be loaded again: the closure key, the QEMU
//! version and the machine options. Restoring starts QEMU with `-incoming` from the file.
//!
//! Only VMs whose store is an image can be snapshotted: QEMU cannot migrate a vhost-user-fs
//! device.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::launch::{LaunchRecord, VmState, write_json};
use crate::plan::{StoreAttachment, VmPaths, plan};
use crate::qmp::{Qmp, QmpError, incoming_file_uri};

const MIGRATION_DEADLINE: Duration = Duration::from_secs(600);

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
    /// Bytes of the saved state.
    pub state_bytes: u64,
    /// Seconds the save took (guest paused).
    pub save_seconds: f64,
}

/// Why a snapshot cannot be taken or loaded.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(
        "QEMU cannot migrate a vhost-user-fs (virtio-fs) device, so a VM sharing the store over virtio-fs cannot be snapshotted: start it with --store-mode image"
    )]
    VirtioFs,
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
                Self::VirtioFs
                    | Self::BadTag(_)
                    | Self::NoSnapshot { .. }
                    | Self::Mismatch { .. }
                    | Self::NotRunning(_)
            ),
        }
    }
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

/// Pause the running VM, save its state and its overlay, record the metadata, resume it.
pub fn save_snapshot(
    record: &LaunchRecord,
    tag: &str,
    qemu_version: &str,
) -> Result<SnapshotMeta, SnapshotError> {
    validate_tag(tag)?;
    if matches!(record.spec.store, StoreAttachment::VirtioFs { .. }) {
        return Err(SnapshotError::VirtioFs);
    }
    let paths = &record.spec.paths;
    let final_dir = snapshot_dir(paths, tag);
    let tmp = paths.snapshots().join(format!(".{tag}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    paths
        .check_private()
        .map_err(crate::launch::LaunchError::NotPrivate)?;
    for d in [&paths.snapshots(), &tmp] {
        drydock_gc::private_dir(d).map_err(crate::launch::LaunchError::NotPrivate)?;
    }
    let mut qmp = Qmp::connect(&paths.qmp_socket(), Duration::from_secs(5))?;
    let start = Instant::now();
    qmp.stop()?;
    let result = (|| -> Result<SnapshotMeta, SnapshotError> {
        let state = tmp.join("state");
        qmp.migrate_to_file(&state)?;
        qmp.wait_migration(MIGRATION_DEADLINE)?;
        if let Some(disk) = &record.spec.disk {
            std::fs::copy(&disk.overlay, tmp.join("disk.qcow2")).map_err(io(&disk.overlay))?;
        }
        let save_seconds = start.elapsed().as_secs_f64();
        let state_bytes = std::fs::metadata(&state).map_err(io(&state))?.len();
        let meta = SnapshotMeta {
            tag: tag.to_string(),
            created: drydock_gc::epoch_secs().max(0) as u64,
            closure_key: record.closure_key.clone(),
            qemu_version: qemu_version.to_string(),
            machine: plan(&record.spec)
                .map_err(crate::launch::LaunchError::from)?
                .args,
            state_bytes,
            save_seconds,
        };
        write_json(&tmp.join("meta.json"), &meta)?;
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

/// Read a snapshot's metadata.
pub fn read_snapshot(paths: &VmPaths, tag: &str) -> Result<SnapshotMeta, SnapshotError> {
    validate_tag(tag)?;
    let dir = snapshot_dir(paths, tag);
    if !dir.is_dir() {
        return Err(SnapshotError::NoSnapshot {
            tag: tag.to_string(),
            dir,
        });
    }
    let meta_path = dir.join("meta.json");
    let corrupt = |reason: String| SnapshotError::Corrupt {
        tag: tag.to_string(),
        path: meta_path.clone(),
        reason,
    };
    let bytes = drydock_gc::read_regular(
        &meta_path,
        drydock_gc::Links::Refuse,
        drydock_gc::MAX_STATE_BYTES,
    )
    .map_err(|e| match std::error::Error::source(&e) {
        Some(cause) => corrupt(cause.to_string()),
        None => corrupt(e.to_string()),
    })?;
    let meta: SnapshotMeta = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
    let state = dir.join("state");
    let len = match std::fs::symlink_metadata(&state) {
        Ok(m) if m.file_type().is_file() => m.len(),
        Ok(_) => {
            return Err(SnapshotError::Corrupt {
                tag: tag.to_string(),
                path: state,
                reason: "not a regular file".into(),
            });
        }
        Err(e) => {
            return Err(SnapshotError::Corrupt {
                tag: tag.to_string(),
                path: state,
                reason: format!("the saved state is missing ({e})"),
            });
        }
    };
    if len != meta.state_bytes {
        return Err(SnapshotError::Corrupt {
            tag: tag.to_string(),
            path: state,
            reason: format!(
                "{len} bytes, {} were saved (truncated or replaced)",
                meta.state_bytes
            ),
        });
    }
    Ok(meta)
}

/// Decide whether `meta` may be loaded into the VM `record` describes, with the QEMU that says
/// `qemu_version`; name the first difference.
pub fn check_restorable(
    meta: &SnapshotMeta,
    record: &LaunchRecord,
    qemu_version: &str,
) -> Result<(), SnapshotError> {
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

/// Put the snapshot's disk back as the VM's overlay and return the `-incoming` URI of its state.
pub fn prepare_restore(record: &LaunchRecord, tag: &str) -> Result<String, SnapshotError> {
    let dir = snapshot_dir(&record.spec.paths, tag);
    if let Some(disk) = &record.spec.disk {
        let saved = dir.join("disk.qcow2");
        std::fs::copy(&saved, &disk.overlay).map_err(io(&disk.overlay))?;
    }
    Ok(incoming_file_uri(&dir.join("state"))?)
}

/// QEMU's version line (`QEMU emulator version 7.2.22 (...)`), as snapshots record it.
pub fn qemu_version(qemu: &Path) -> Result<String, SnapshotError> {
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

/// How often [`resume_incoming`] asks QEMU whether the snapshot has loaded.
const LOAD_POLL: Duration = Duration::from_millis(20);

/// After starting QEMU with `-incoming`: wait (bounded) until the state has loaded, then resume
/// the guest. A corrupt or truncated state makes QEMU exit: that is an error naming QEMU's words,
/// and the VM is left stopped.
pub fn resume_incoming(
    vm: &mut crate::launch::Vm,
    tag: &str,
    deadline: Duration,
) -> Result<(), SnapshotError> {
    let qemu_log = vm.paths().dir.join("qemu.log");
    let state = snapshot_dir(vm.paths(), tag).join("state");
    let failed = |vm: &mut crate::launch::Vm| {
        let said = crate::console::log_tail(&qemu_log, 10);
        let status = vm.exited().map(|s| s.to_string()).unwrap_or_default();
        SnapshotError::Corrupt {
            tag: tag.to_string(),
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
    loop {
        if vm.exited().is_some() {
            return Err(failed(vm));
        }
        let Some(left) = deadline.timeout() else {
            return Err(SnapshotError::Qmp(QmpError::Timeout {
                waiting_for: "the snapshot to load".into(),
                after: within,
            }));
        };
        match Qmp::connect(&vm.paths().qmp_socket(), left.min(Duration::from_secs(2))) {
            Ok(mut qmp) => match qmp.status() {
                Ok(st) if st.running => break,
                Ok(st) if st.state == crate::qmp::RunState::InMigrate => {}
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
        // migration starts, which `-incoming` does at once), so its state is asked again.
        std::thread::sleep(LOAD_POLL.min(deadline.remaining()));
    }
    vm.mark_running()?;
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
            save_seconds: 0.0,
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

    #[test]
    fn virtiofs_vms_cannot_be_snapshotted() {
        let d = tempfile::tempdir().unwrap();
        let r = record(
            d.path(),
            StoreAttachment::VirtioFs {
                socket: d.path().join("fs.sock"),
            },
            "k",
        );
        let e = save_snapshot(&r, "t", "QEMU").unwrap_err();
        assert!(e.to_string().contains("--store-mode image"), "{e}");
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
}
