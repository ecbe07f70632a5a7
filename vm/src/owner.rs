//! A VM's run and its owner. Every launch is a run (kind `vm`) in the runs database that pins
//! the VM's system while it lives; the process that owns the VM (the foreground `vm run`, or a
//! detached `__vm-supervise`) ends that run when the VM stops. An owner that was SIGKILLed
//! cannot: whoever next notices its dead entry (`vm list`, `vm stop`, `vm run` of the same
//! name, `runs`, `du`, `gc`) cleans the entry up and ends its run, exactly once, so GC can then
//! collect it like any stopped VM.

use std::path::{Path, PathBuf};
use std::time::Duration;

use drydock_gc::{RunsDb, RunsDbError};

use crate::launch::{LaunchError, LaunchRecord, VmState, stop_remote};
use crate::plan::VmPaths;

/// What can go wrong while ending a dead owner's run.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error("cannot clean up the dead VM entry in {}", dir.display())]
    Cleanup {
        dir: PathBuf,
        #[source]
        source: Box<LaunchError>,
    },
    #[error("cannot end run {id} of the VM in {}", dir.display())]
    Run {
        id: i64,
        dir: PathBuf,
        #[source]
        source: Box<RunsDbError>,
    },
}

/// End a VM's run with QEMU's exit code, unless it has ended already. Returns whether this call
/// ended it.
pub fn end_vm_run(
    state_dir: &Path,
    record: &LaunchRecord,
    exit_code: Option<i32>,
) -> Result<bool, OwnerError> {
    let Some(id) = record.run_id else {
        return Ok(false);
    };
    let run_err = |source| OwnerError::Run {
        id,
        dir: record.spec.paths.dir.clone(),
        source: Box::new(source),
    };
    let db = RunsDb::open(state_dir).map_err(run_err)?;
    db.finish_open_run(id, exit_code).map_err(run_err)
}

/// A VM entry whose processes are gone (its owner died without cleaning up): kill whatever is
/// left of it, remove its state file and end its run. Returns whether a run was ended.
pub fn reap_stale(
    state_dir: &Path,
    paths: &VmPaths,
    state: &VmState,
    record: Option<&LaunchRecord>,
) -> Result<bool, OwnerError> {
    tracing::info!("cleaning up the dead VM entry in {}", paths.dir.display());
    stop_remote(paths, state, Duration::ZERO, true).map_err(|source| OwnerError::Cleanup {
        dir: paths.dir.clone(),
        source: Box::new(source),
    })?;
    match record {
        Some(r) => end_vm_run(state_dir, r, None),
        None => Ok(false),
    }
}

/// Reap every dead VM entry under `STATE/vms` (see [`reap_stale`]). Entries that cannot be read
/// are left alone (and said so in the log): nothing is ended on a guess. Returns the names of the
/// VMs whose runs were ended.
pub fn reap_dead_vms(state_dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(state_dir.join("vms")) else {
        return Vec::new();
    };
    let mut reaped = Vec::new();
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let paths = VmPaths::in_state_dir(state_dir, &name);
        let Some(state) = VmState::read(&paths) else {
            continue;
        };
        if state.qemu_alive() || state.supervisor_alive() {
            continue;
        }
        let record = match LaunchRecord::read(&paths) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!("VM {name}: {e}; its run is left as it is");
                None
            }
        };
        match reap_stale(state_dir, &paths, &state, record.as_ref()) {
            Ok(true) => reaped.push(name),
            Ok(false) => {}
            Err(e) => tracing::warn!("VM {name}: {e}"),
        }
    }
    reaped.sort();
    reaped
}
