//! A VM's run and its owner. Every launch is a run (kind `vm`) in the runs database that pins
//! the VM's system while it lives ([`record_vm_run`], [`reopen_vm_run`], [`end_vm_run`]); the
//! process that owns the VM (the foreground `vm run`, or a detached `__vm-supervise` started by
//! [`spawn_supervisor`]) ends that run when the VM stops. An owner that was SIGKILLed
//! cannot: whoever next notices its dead entry (`vm list`, `vm stop`, `vm run` of the same
//! name, `runs`, `du`, `gc`) cleans the entry up and ends its run, exactly once, so GC can then
//! collect it like any stopped VM.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use drydock_gc::{ArtifactKind, RunKind, RunsDb, RunsDbError, StoreLayout};

use crate::launch::{LaunchError, LaunchRecord, Phase, VmState, stop_remote};
use crate::plan::VmPaths;
use crate::spawn::Awaited;

/// What can go wrong while ending a dead owner's run.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error("cannot clean up the dead VM entry in {}", dir.display())]
    Cleanup {
        dir: PathBuf,
        #[source]
        source: Box<LaunchError>,
    },
    #[error(
        "a VM named {name} is already running (QEMU pid {qemu_pid}); stop it with `drydock vm stop {name}` or choose another --name"
    )]
    NameInUse { name: String, qemu_pid: u32 },
    #[error("cannot create the supervisor's log {}", path.display())]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the VM supervisor")]
    Spawn(#[source] Box<crate::spawn::SpawnError>),
    #[error("the VM did not start:\n{log}")]
    DidNotStart { log: String },
    #[error("the VM supervisor did not start QEMU within {} s (see {})", after.as_secs(), log.display())]
    StartTimeout { after: Duration, log: PathBuf },
    #[error("the VM did not come back; it is stopped:\n{log}")]
    NotBack { log: String },
    #[error("the VM was not running again after {:.1} s; it is stopped", after.as_secs_f64())]
    NotRunningAgain { after: Duration },
    #[error("{toplevel}: not a store path")]
    Toplevel {
        toplevel: String,
        #[source]
        source: drydock_gc::StorePathError,
    },
    #[error("--store {}: {name} was launched from the store {recorded}; leave out --store (the VM remembers its store)", given.display())]
    OtherStore {
        given: PathBuf,
        name: String,
        recorded: String,
    },
    #[error(
        "run {id} of this VM was collected by `drydock gc`; start it anew with `drydock vm run`"
    )]
    Collected {
        id: i64,
        #[source]
        source: Box<RunsDbError>,
    },
    #[error("cannot end run {id} of the VM in {}", dir.display())]
    Run {
        id: i64,
        dir: PathBuf,
        #[source]
        source: Box<RunsDbError>,
    },
}

/// How long a new supervisor may take to start QEMU.
const SUPERVISOR_START: Duration = Duration::from_secs(30);

/// The detached owner of a VM: drydock re-executed as `__vm-supervise`.
#[derive(Debug, Clone)]
pub struct SupervisorCommand<'a> {
    /// The drydock binary.
    pub exe: &'a Path,
    pub state_dir: &'a Path,
    /// `--store ROOT`, if the launch had one.
    pub store_root: Option<&'a Path>,
    pub name: &'a str,
    /// Load a snapshot: the `-incoming` URI and the snapshot's tag (named in errors).
    pub incoming: Option<(&'a str, &'a str)>,
}

/// Start the detached supervisor of the VM `paths` and wait until it has started QEMU (its
/// state file appears), it died (its log says why), `cancel` was set or 30 s passed. Returns
/// the supervisor's pid and the VM's state.
pub fn spawn_supervisor(
    sup: &SupervisorCommand<'_>,
    paths: &VmPaths,
    cancel: &drydock_gc::Cancel,
) -> Result<(u32, VmState), OwnerError> {
    let log_path = paths.supervisor_log();
    let log = std::fs::File::create(&log_path).map_err(|source| OwnerError::Log {
        path: log_path.clone(),
        source,
    })?;
    let mut cmd = crate::spawn::drydock_command(sup.exe, sup.state_dir, sup.store_root);
    cmd.arg("__vm-supervise").arg("--name").arg(sup.name);
    if let Some((uri, tag)) = sup.incoming {
        cmd.arg("--incoming")
            .arg(uri)
            .arg("--snapshot-tag")
            .arg(tag);
    }
    let pid = crate::spawn::spawn_detached("vm supervisor", cmd, log)
        .map_err(|e| OwnerError::Spawn(Box::new(e)))?
        .pid;
    let report = paths.state_file();
    match crate::spawn::await_report(pid, SUPERVISOR_START, &report, cancel, || {
        VmState::read(paths)
    }) {
        Awaited::Ready(s) => Ok((pid, s)),
        Awaited::Died => Err(OwnerError::DidNotStart {
            log: crate::console::log_tail(&log_path, 40).trim().to_owned(),
        }),
        Awaited::Late => {
            crate::launch::kill_process(pid);
            Err(OwnerError::StartTimeout {
                after: SUPERVISOR_START,
                log: log_path,
            })
        }
    }
}

/// After [`spawn_supervisor`] with a snapshot: wait until the supervisor reports the VM running.
/// If it dies first (QEMU refused the state) its log says why; at the deadline or on `cancel`
/// the VM is stopped, not left half-started.
pub fn wait_running(
    paths: &VmPaths,
    supervisor: u32,
    deadline: Duration,
    cancel: &drydock_gc::Cancel,
) -> Result<VmState, OwnerError> {
    let t = Instant::now();
    let running = || VmState::read(paths).filter(|s| s.phase == Phase::Running);
    let report = paths.state_file();
    match crate::spawn::await_report(supervisor, deadline, &report, cancel, running) {
        Awaited::Ready(s) => Ok(s),
        Awaited::Died => Err(OwnerError::NotBack {
            log: crate::console::log_tail(&paths.supervisor_log(), 40)
                .trim()
                .to_owned(),
        }),
        Awaited::Late => {
            if let Some(s) = VmState::read(paths) {
                stop_remote(paths, &s, Duration::ZERO, true).map_err(|source| {
                    OwnerError::Cleanup {
                        dir: paths.dir.clone(),
                        source: Box::new(source),
                    }
                })?;
            }
            Err(OwnerError::NotRunningAgain { after: t.elapsed() })
        }
    }
}

/// Record a launch as a run of kind `vm` owning the VM's folder, and pin its system with a GC
/// root for as long as the run lives, in the store the system comes from (`fallback` for a bare
/// kernel). A runs database that cannot be written costs the record, not the VM: warn, `None`.
pub fn record_vm_run(
    state_dir: &Path,
    fallback: &StoreLayout,
    record: &LaunchRecord,
    argv: &[String],
) -> Option<i64> {
    let result = (|| -> Result<i64, OwnerError> {
        let db = RunsDb::open(state_dir).map_err(|e| db_err(0, record, e))?;
        let l = record.store.clone().unwrap_or_else(|| fallback.clone());
        let id = db
            .begin_run(&l, &record.spec.name, argv, RunKind::Vm)
            .map_err(|e| db_err(0, record, e))?;
        db.add_artifact(id, ArtifactKind::StateDir, &record.spec.paths.dir)
            .map_err(|e| db_err(id, record, e))?;
        pin_system(&db, id, &l, record)?;
        Ok(id)
    })();
    match result {
        Ok(id) => Some(id),
        Err(e) => {
            tracing::warn!(
                "the launch of {} is not recorded as a run: {}",
                record.spec.name,
                crate::error_chain(&e)
            );
            None
        }
    }
}

fn db_err(id: i64, record: &LaunchRecord, source: RunsDbError) -> OwnerError {
    OwnerError::Run {
        id,
        dir: record.spec.paths.dir.clone(),
        source: Box::new(source),
    }
}

fn pin_system(
    db: &RunsDb,
    id: i64,
    layout: &StoreLayout,
    record: &LaunchRecord,
) -> Result<(), OwnerError> {
    if let Some(top) = &record.toplevel {
        let sp = layout.parse(top).map_err(|source| OwnerError::Toplevel {
            toplevel: top.clone(),
            source,
        })?;
        db.pin(layout, id, &sp).map_err(|e| db_err(id, record, e))?;
    }
    Ok(())
}

/// The store a recorded launch belongs to. A restart or restore needs only the VM's name; a
/// `--store` (`explicit`) naming another store than the one the system came from is bad input.
/// `current` is the store the command line names (or the default).
pub fn recorded_store(
    record: &LaunchRecord,
    current: &StoreLayout,
    explicit: Option<&Path>,
) -> Result<StoreLayout, OwnerError> {
    let Some(recorded) = &record.store else {
        // Launched from a kernel (nothing pinned), or recorded before stores were recorded.
        return Ok(current.clone());
    };
    // Stores are told apart as the runs database tells them apart (resolved store directory).
    if let Some(root) = explicit {
        if recorded.id() != current.id() {
            return Err(OwnerError::OtherStore {
                given: root.to_owned(),
                name: record.spec.name.clone(),
                recorded: recorded.id(),
            });
        }
    }
    Ok(recorded.clone())
}

/// A restart or restore runs the recorded launch again: its run is live again (GC must wait for
/// it), and its pin is renewed, in the VM's own store, in case someone removed it.
pub fn reopen_vm_run(
    state_dir: &Path,
    record: &LaunchRecord,
    current: &StoreLayout,
    explicit: Option<&Path>,
) -> Result<(), OwnerError> {
    let Some(id) = record.run_id else {
        return Ok(());
    };
    let db = RunsDb::open(state_dir).map_err(|e| db_err(id, record, e))?;
    db.reopen_run(id).map_err(|source| OwnerError::Collected {
        id,
        source: Box::new(source),
    })?;
    let l = recorded_store(record, current, explicit)?;
    pin_system(&db, id, &l, record)
}

impl OwnerError {
    /// Whether the user's input is at fault (exit 2).
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Self::OtherStore { .. } | Self::Collected { .. } | Self::NameInUse { .. }
        )
    }
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

/// Take the name `name` for a new launch: refuse it while its VM lives (bad input), and reap a
/// dead entry of that name (ending its run) first.
pub fn claim_name(state_dir: &Path, paths: &VmPaths, name: &str) -> Result<(), OwnerError> {
    if let Some(state) = VmState::read(paths) {
        if state.qemu_alive() || state.supervisor_alive() {
            return Err(OwnerError::NameInUse {
                name: name.to_owned(),
                qemu_pid: state.qemu_pid,
            });
        }
        tracing::info!("cleaning up the stale entry of VM {name}");
        let record = LaunchRecord::read(paths).ok();
        reap_stale(state_dir, paths, &state, record.as_ref())?;
    }
    Ok(())
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
