//! A VM's run and its owner. Every launch is a run (kind `vm`) in the runs database that pins
//! the VM's system while it lives ([`record_vm_run`], [`reopen_vm_run`], [`end_vm_run`]); the
//! process that owns the VM (the foreground `vm run`, or a detached `__vm-supervise` started by
//! [`spawn_supervisor`]) ends that run when the VM stops. An owner that was SIGKILLed
//! cannot: whoever next notices its dead entry (`vm list` ([`list_vms`]), `vm stop`
//! ([`stop_vm`]), a launch of the same name, `runs`, `du`, `gc`) cleans the entry up and ends
//! its run, exactly once, so GC can then collect it like any stopped VM.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use drydock_gc::{ArtifactKind, RunKind, RunsDb, RunsDbError, StoreLayout};

use crate::launch::{LaunchError, LaunchRecord, Phase, VmState, stop_remote};
use crate::plan::{VmPaths, validate_name};
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
    #[error("reading {}", path.display())]
    List {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Launch(Box<LaunchError>),
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
    /// Load the snapshot in this folder, and resume the guest (`true`) or leave it paused.
    pub snapshot: Option<(&'a Path, bool)>,
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
    let log = drydock_gc::create_nofollow(&log_path).map_err(|source| OwnerError::Log {
        path: log_path.clone(),
        source,
    })?;
    let mut cmd = crate::spawn::drydock_command(sup.exe, sup.state_dir, sup.store_root);
    cmd.arg("__vm-supervise").arg("--name").arg(sup.name);
    if let Some((dir, resume)) = sup.snapshot {
        cmd.arg("--snapshot").arg(dir);
        if !resume {
            cmd.arg("--paused");
        }
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
            .begin_run(&l, &format!("vm {}", record.spec.name), argv, RunKind::Vm)
            .map_err(|e| db_err(0, record, e))?;
        db.add_artifact(id, ArtifactKind::StateDir, &record.spec.paths.dir)
            .map_err(|e| db_err(id, record, e))?;
        pin_launch(&db, id, &l, record)?;
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

/// Add this launch to the shared run `id` (a cluster's): its folder as an artifact (once) and its
/// system pinned; the run is reopened if it had ended. `None`, said in the log, when it cannot.
pub fn join_vm_run(
    state_dir: &Path,
    fallback: &StoreLayout,
    record: &LaunchRecord,
    id: i64,
) -> Option<i64> {
    let result = (|| -> Result<(), OwnerError> {
        let db = RunsDb::open(state_dir).map_err(|e| db_err(id, record, e))?;
        let run = db.run(id).map_err(|e| db_err(id, record, e))?;
        if run.ended_at.is_some() {
            db.reopen_run(id).map_err(|e| db_err(id, record, e))?;
        }
        let dir = &record.spec.paths.dir;
        let known = db
            .artifacts(id)
            .map_err(|e| db_err(id, record, e))?
            .iter()
            .any(|a| a.path == *dir && a.removed_at.is_none());
        if !known {
            db.add_artifact(id, ArtifactKind::StateDir, dir)
                .map_err(|e| db_err(id, record, e))?;
        }
        let l = record.store.clone().unwrap_or_else(|| fallback.clone());
        pin_launch(&db, id, &l, record)
    })();
    match result {
        Ok(()) => Some(id),
        Err(e) => {
            tracing::warn!(
                "the launch of {} is not recorded in its cluster's run: {}",
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

/// Pin the system of `record` (and a nixos-test node's closure registration) in run `id`.
pub fn pin_launch(
    db: &RunsDb,
    id: i64,
    layout: &StoreLayout,
    record: &LaunchRecord,
) -> Result<(), OwnerError> {
    // The system, and a nixos-test node's closure registration (its `regInfo=`).
    for top in record.toplevel.iter().chain(&record.reginfo) {
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
    pin_launch(&db, id, &l, record)
}

impl OwnerError {
    /// Whether the user's input is at fault (exit 2).
    pub fn is_bad_input(&self) -> bool {
        match self {
            Self::Launch(e) => e.is_bad_input(),
            _ => matches!(self, Self::OtherStore { .. } | Self::Collected { .. }),
        }
    }
}

/// End a VM's run with QEMU's exit code, unless it has ended already or is a cluster's shared
/// run (its owner ends that). Returns whether this call ended it.
pub fn end_vm_run(
    state_dir: &Path,
    record: &LaunchRecord,
    exit_code: Option<i32>,
) -> Result<bool, OwnerError> {
    if record.shared_run {
        return Ok(false);
    }
    end_run_of(state_dir, record, exit_code)
}

/// End the run of `record`, shared or not.
fn end_run_of(
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
    // Its owner is dead: a cluster's shared run ends too (the whole cluster died with it).
    match record {
        Some(r) => end_run_of(state_dir, r, None),
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

/// How `vm stop` ([`stop_vm`]) found the VM and what it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Nothing ran under the name.
    NotRunning,
    /// It ran, and stopped after this long.
    Stopped { after: Duration },
    /// Its owner had died: the entry was cleaned up and its run ended.
    StaleCleaned,
}

/// `vm stop`: stop the VM `name` (powerdown within `grace`, then quit and signals; `force`
/// goes straight to SIGKILL), or clean up its entry if its owner died. A VM that was never
/// launched is bad input.
pub fn stop_vm(
    state_dir: &Path,
    name: &str,
    grace: Duration,
    force: bool,
) -> Result<Stopped, OwnerError> {
    let launch = |e: LaunchError| OwnerError::Launch(Box::new(e));
    validate_name(name).map_err(|e| launch(e.into()))?;
    let paths = VmPaths::in_state_dir(state_dir, name);
    if !paths.dir.is_dir() {
        return Err(launch(LaunchError::NoVm {
            name: name.to_owned(),
            dir: state_dir.join("vms"),
        }));
    }
    let Some(state) = VmState::read(&paths) else {
        return Ok(Stopped::NotRunning);
    };
    let t = Instant::now();
    if state.qemu_alive() {
        stop_remote(&paths, &state, grace, force).map_err(launch)?;
        return Ok(Stopped::Stopped { after: t.elapsed() });
    }
    let record = LaunchRecord::read(&paths).ok();
    reap_stale(state_dir, &paths, &state, record.as_ref())?;
    Ok(Stopped::StaleCleaned)
}

/// Where a listed VM is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ListedState {
    #[serde(rename = "running")]
    Running,
    #[serde(rename = "stopped")]
    Stopped,
    /// Its owner had died; listing it cleaned it up and ended its run.
    #[serde(rename = "stale (cleaned)")]
    StaleCleaned,
}

impl ListedState {
    /// As `vm list` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Stopped => "stopped",
            Self::StaleCleaned => "stale (cleaned)",
        }
    }
}

/// One VM of [`list_vms`] (what `vm list --json` prints for it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ListedVm {
    pub name: String,
    pub state: ListedState,
    /// QEMU's pid, while it runs.
    pub pid: Option<u32>,
    pub accel: Option<&'static str>,
    pub memory_mib: Option<u32>,
    pub uptime_seconds: Option<u64>,
    /// The system's toplevel, when booted from one.
    pub system: Option<String>,
}

/// The VMs of a state dir (`vm list`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VmListing {
    /// Where they are (`STATE/vms`).
    #[serde(skip)]
    pub dir: PathBuf,
    /// By name.
    pub vms: Vec<ListedVm>,
}

/// `vm list`: every VM under `STATE/vms`, by name. An entry whose owner died is cleaned up and
/// its run ended as it is listed (a failure to is logged; the listing goes on).
pub fn list_vms(state_dir: &Path) -> Result<VmListing, OwnerError> {
    let dir = state_dir.join("vms");
    let mut names: Vec<String> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(source) => return Err(OwnerError::List { path: dir, source }),
    };
    names.sort();
    let mut vms = Vec::new();
    for name in names {
        if validate_name(&name).is_err() {
            continue;
        }
        let paths = VmPaths::in_state_dir(state_dir, &name);
        let record = LaunchRecord::read(&paths).ok();
        let (state, pid, uptime) = match VmState::read(&paths) {
            Some(s) if s.qemu_alive() => (
                ListedState::Running,
                Some(s.qemu_pid),
                Some((drydock_gc::epoch_secs().max(0) as u64).saturating_sub(s.started)),
            ),
            Some(s) => {
                // Stale: the owner died without cleaning up. Clean now, and end its run.
                if let Err(e) = reap_stale(state_dir, &paths, &s, record.as_ref()) {
                    tracing::warn!("{}", crate::error_chain(&e));
                }
                (ListedState::StaleCleaned, None, None)
            }
            None => (ListedState::Stopped, None, None),
        };
        vms.push(ListedVm {
            name,
            state,
            pid,
            accel: record.as_ref().map(|r| r.spec.accel.as_str()),
            memory_mib: record.as_ref().map(|r| r.spec.memory_mib),
            uptime_seconds: uptime,
            system: record.as_ref().and_then(|r| r.toplevel.clone()),
        });
    }
    Ok(VmListing { dir, vms })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VM folder under `state`, with a state file naming no live process when `stale`.
    fn vm(state: &Path, name: &str, stale: bool) -> VmPaths {
        let paths = VmPaths::in_state_dir(state, name);
        std::fs::create_dir_all(&paths.dir).unwrap();
        if stale {
            let s = VmState {
                name: name.into(),
                // Above any pid_max: nothing is signalled.
                supervisor_pid: 999_999_999,
                qemu_pid: 999_999_999,
                server_pid: None,
                accel: "tcg".into(),
                memory_mib: 256,
                started: 0,
                cgroup: None,
                phase: Phase::Running,
                qemu_start_ticks: Some(1),
                supervisor_start_ticks: Some(1),
                server_start_ticks: None,
            };
            crate::launch::write_json(&paths.state_file(), &s).unwrap();
        }
        paths
    }

    #[test]
    fn listing_reaps_dead_entries_and_skips_what_is_not_a_vm() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path();
        assert!(list_vms(state).unwrap().vms.is_empty(), "no vms folder yet");
        vm(state, "b-stopped", false);
        let dead = vm(state, "a-dead", true);
        std::fs::create_dir_all(state.join("vms/.not-a-name")).unwrap();
        std::fs::write(state.join("vms/a-file"), b"").unwrap();
        let listing = list_vms(state).unwrap();
        assert_eq!(listing.dir, state.join("vms"));
        let rows: Vec<(&str, ListedState)> = listing
            .vms
            .iter()
            .map(|v| (v.name.as_str(), v.state))
            .collect();
        assert_eq!(
            rows,
            [
                ("a-dead", ListedState::StaleCleaned),
                ("b-stopped", ListedState::Stopped)
            ]
        );
        assert!(VmState::read(&dead).is_none(), "the dead entry was cleaned");
        // As `vm list --json` prints it.
        let json = serde_json::to_value(&listing).unwrap();
        assert_eq!(json["vms"][0]["state"], "stale (cleaned)");
        assert!(json.get("dir").is_none());
        assert_eq!(list_vms(state).unwrap().vms[0].state, ListedState::Stopped);
    }

    #[test]
    fn stopping_names_what_it_found() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path();
        vm(state, "idle", false);
        vm(state, "dead", true);
        let g = Duration::ZERO;
        assert_eq!(
            stop_vm(state, "idle", g, false).unwrap(),
            Stopped::NotRunning
        );
        assert_eq!(
            stop_vm(state, "dead", g, false).unwrap(),
            Stopped::StaleCleaned
        );
        assert_eq!(
            stop_vm(state, "dead", g, false).unwrap(),
            Stopped::NotRunning
        );
        for (name, says) in [
            ("never", "no VM named never in"),
            ("../x", "invalid VM name"),
        ] {
            let e = stop_vm(state, name, g, false).unwrap_err();
            assert!(e.is_bad_input(), "{e}");
            assert!(e.to_string().contains(says), "{e}");
        }
    }
}
