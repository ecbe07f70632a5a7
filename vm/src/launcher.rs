//! The one launch sequence of a VM: `vm run`, `vm restart`, `vm restore` and every machine of a
//! cluster go through it. It has two parts.
//!
//! - [`Launcher::plan`] resolves and checks a launch ([`LaunchKind`]: a new [`LaunchRequest`], or
//!   a VM's recorded launch again, maybe from a snapshot) into a [`LaunchPlan`] that is ready to
//!   start. It changes nothing of the VM: no name is claimed, no disk touched, no run recorded, no
//!   record written, nothing started (only a store image may be built, into the images every VM
//!   shares); the VM's existing folders are checked (another user's, or one others can write, is
//!   refused) before anything in them is read. So a caller with many launches (a cluster) checks them all
//!   before it starts any, and each failure is a typed [`LauncherError`] that says whether the
//!   input is at fault.
//! - [`Launcher::claim`], then [`Launcher::start_here`] or [`Launcher::start_supervised`], carry
//!   a plan out, always in this order: claim the name (the VM's folders made private, 0700, or
//!   refused if another user's or others can write them; a new launch refuses a live VM and
//!   reaps a dead entry; a recorded launch stops what runs under its name) → the disk
//!   (discarded, kept, or a snapshot's put back) → the run (a new one recorded, or the recorded
//!   one reopened) → `launch.json` written → QEMU started, as a child of this process (thread) or of a detached
//!   supervisor. A launch that fails after its run was recorded ends that run. `claim` is a step
//!   of its own so that a caller can prepare what QEMU connects to (a cluster machine's backdoor
//!   socket) once the name is its own.
//!
//! Which steps a launch takes follows from where it comes from, decided as data ([`Steps`]).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use drydock_gc::{Cancel, StoreLayout};

use crate::console::ConsoleOptions;
use crate::image::StoreImage;
use crate::launch::{
    LaunchError, LaunchRecord, POWERDOWN_GRACE, Vm, VmState, discard_disk, start_with, stop_remote,
};
use crate::owner::{
    OwnerError, SupervisorCommand, end_vm_run, join_vm_run, reap_stale, record_vm_run,
    recorded_store, reopen_vm_run, spawn_supervisor,
};
use crate::plan::{PlanError, VmPaths, validate_name};
use crate::resolve::{LaunchRequest, ResolveError, resolve_launch};
use crate::snapshot::{
    Incoming, SnapshotError, check_restorable, load_incoming, prepare_restore, qemu_version,
    read_snapshot, read_snapshot_dir, snapshot_dir,
};

/// Where launches come from and go: the store the command line names, drydock's state, the
/// binary, and the command line recorded with a new run.
#[derive(Debug, Clone)]
pub struct Launcher {
    /// The store a new launch resolves its system in (a recorded launch keeps its own).
    pub layout: StoreLayout,
    pub state_dir: PathBuf,
    /// `--store ROOT` as given: a recorded launch must come from that store (bad input
    /// otherwise), and a detached supervisor is started with it.
    pub store_root: Option<PathBuf>,
    /// The drydock binary: the store server, the detached supervisor.
    pub exe: PathBuf,
    /// The command line recorded with a new run.
    pub argv: Vec<String>,
    /// A run to join instead of recording one per launch: a cluster's, which its machines
    /// share (each adds its folder and pins its system; a machine's stop does not end it).
    pub shared_run: Option<i64>,
}

/// What to launch.
#[derive(Debug, Clone)]
pub enum LaunchKind {
    /// A new launch (`vm run`, a cluster machine): the name must be free.
    New(LaunchRequest),
    /// The VM's recorded launch again (`vm restart`), without Nix; its disk is discarded unless
    /// `keep_disk`.
    Restart { name: String, keep_disk: bool },
    /// The VM's recorded launch, loading its snapshot `tag` (`vm restore`) and resuming it.
    Restore { name: String, tag: String },
    /// The launch `record` (a VM's, as [`crate::read_snapshot_dir`] reads it from a snapshot),
    /// loading the snapshot in `dir` (a cluster's restore): whatever runs under its name is
    /// stopped, `dir`'s disk put back, the store servers and QEMU started, and the state loaded;
    /// the guest is resumed only with `resume` (otherwise [`Launcher::start_here`] returns it
    /// paused, loaded: resume it with QMP `cont`, then [`Vm::mark_running`]). With the
    /// launcher's `shared_run`, the launch joins that run; otherwise it reopens the record's.
    RestoreFrom {
        record: Box<LaunchRecord>,
        dir: PathBuf,
        resume: bool,
    },
}

/// Where a plan comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Origin {
    New,
    Restart { keep_disk: bool },
    Restore(Incoming),
}

/// How the name is claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClaimStep {
    /// A new launch: a live VM of that name is refused; a dead entry is reaped.
    RefuseLive,
    /// The VM's own launch again: whatever runs under the name is stopped, within `grace`.
    StopRunning { grace: Duration },
}

/// What happens to the writable disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DiskStep {
    /// Thrown away: the start makes a fresh one.
    Discard,
    Keep,
    /// The snapshot's copy is put back.
    FromSnapshot,
}

/// How the launch is recorded in the runs database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunStep {
    /// A new run.
    Begin,
    /// The recorded run, live again, its pin renewed.
    Reopen,
}

/// The steps of a launch's effectful part, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Steps {
    claim: ClaimStep,
    disk: DiskStep,
    run: RunStep,
}

/// How long a snapshot may take to load.
pub(crate) const RESUME_DEADLINE: Duration = Duration::from_secs(120);

/// The steps of a launch from `origin` (pure); `shared_run`: the launcher joins a run of many
/// launches (a cluster's).
fn steps(origin: &Origin, shared_run: bool) -> Steps {
    match origin {
        Origin::New => Steps {
            claim: ClaimStep::RefuseLive,
            disk: DiskStep::Discard,
            run: RunStep::Begin,
        },
        Origin::Restart { keep_disk } => Steps {
            claim: ClaimStep::StopRunning {
                grace: POWERDOWN_GRACE,
            },
            disk: if *keep_disk {
                DiskStep::Keep
            } else {
                DiskStep::Discard
            },
            run: RunStep::Reopen,
        },
        // The snapshot replaces whatever runs now, at once.
        Origin::Restore(_) => Steps {
            claim: ClaimStep::StopRunning {
                grace: Duration::ZERO,
            },
            disk: DiskStep::FromSnapshot,
            run: if shared_run {
                RunStep::Begin
            } else {
                RunStep::Reopen
            },
        },
    }
}

/// A launch resolved and checked, ready to claim and start.
#[derive(Debug, Clone)]
pub struct LaunchPlan {
    record: LaunchRecord,
    paths: VmPaths,
    image: Option<(StoreImage, usize, Duration)>,
    origin: Origin,
}

impl LaunchPlan {
    /// The launch as it will be recorded (its run id is the recorded one's, or none yet).
    pub fn record(&self) -> &LaunchRecord {
        &self.record
    }

    /// With `--store-mode image`: the store image, how many paths it holds and how long getting
    /// it took.
    pub fn image(&self) -> Option<&(StoreImage, usize, Duration)> {
        self.image.as_ref()
    }

    /// Whether it loads a snapshot.
    pub fn is_restore(&self) -> bool {
        matches!(self.origin, Origin::Restore(_))
    }
}

/// A plan whose name is this launch's own (see [`Launcher::claim`]).
#[derive(Debug)]
pub struct Claimed(LaunchPlan);

impl Claimed {
    pub fn record(&self) -> &LaunchRecord {
        &self.0.record
    }
}

/// A launch carried out under a detached supervisor (see [`Launcher::start_supervised`]).
#[derive(Debug)]
pub struct SupervisedLaunch {
    /// As recorded in `launch.json` (with its run).
    pub record: LaunchRecord,
    /// The supervisor (`__vm-supervise`), which has started QEMU.
    pub supervisor: u32,
    /// The VM's state as the supervisor wrote it (a restore: QEMU is loading the snapshot).
    pub state: VmState,
    /// When the supervisor was started.
    pub since: Instant,
}

/// Why a launch could not be planned or carried out.
#[derive(Debug, thiserror::Error)]
pub enum LauncherError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(
        "a VM named {name} is already running (QEMU pid {qemu_pid}); stop it with `drydock vm stop {name}` or choose another --name"
    )]
    NameInUse { name: String, qemu_pid: u32 },
    /// A file the recorded launch needs (pinned, but deleted by hand) is gone.
    #[error("cannot restart {name}: the pinned {what} {} is gone", path.display())]
    Gone {
        name: String,
        what: &'static str,
        path: PathBuf,
    },
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Owner(#[from] OwnerError),
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

impl LauncherError {
    /// Whether the request itself is at fault (exit 2).
    pub fn is_bad_input(&self) -> bool {
        match self {
            Self::Plan(e) => e.is_bad_input(),
            Self::NameInUse { .. } => true,
            Self::Gone { .. } => false,
            Self::Resolve(e) => e.is_bad_input(),
            Self::Owner(e) => e.is_bad_input(),
            Self::Launch(e) => e.is_bad_input(),
            Self::Snapshot(e) => e.is_bad_input(),
        }
    }
}

/// The pid of the QEMU of a VM that lives (its QEMU or its owner does), if it does.
fn live_vm(state: &VmState) -> Option<u32> {
    (state.qemu_alive() || state.supervisor_alive()).then_some(state.qemu_pid)
}

impl Launcher {
    fn paths(&self, name: &str) -> Result<VmPaths, LauncherError> {
        validate_name(name)?;
        Ok(VmPaths::in_state_dir(&self.state_dir, name))
    }

    /// Resolve and check `kind` (see the module's doc); nothing of the VM changes.
    pub fn plan(&self, kind: LaunchKind) -> Result<LaunchPlan, LauncherError> {
        match kind {
            LaunchKind::New(req) => {
                let paths = self.paths(&req.name)?;
                // Nothing is read in folders of another user or that others can write.
                paths.check_private().map_err(LaunchError::NotPrivate)?;
                if let Some(qemu_pid) = VmState::read(&paths).as_ref().and_then(live_vm) {
                    return Err(LauncherError::NameInUse {
                        name: req.name,
                        qemu_pid,
                    });
                }
                self.resolve(&req)
            }
            LaunchKind::Restart { name, keep_disk } => {
                let (record, paths) = self.recorded(&name)?;
                if let Some((what, path)) = record.missing_file() {
                    return Err(LauncherError::Gone { name, what, path });
                }
                Ok(LaunchPlan {
                    record,
                    paths,
                    image: None,
                    origin: Origin::Restart { keep_disk },
                })
            }
            LaunchKind::Restore { name, tag } => {
                let (record, paths) = self.recorded(&name)?;
                let (meta, _) = read_snapshot(&paths, &tag)?;
                let dir = snapshot_dir(&paths, &tag);
                self.restorable(record, paths, &meta, dir, true)
            }
            LaunchKind::RestoreFrom {
                mut record,
                dir,
                resume,
            } => {
                let paths = self.paths(&record.spec.name)?;
                paths.check_private().map_err(LaunchError::NotPrivate)?;
                record
                    .check_paths(&paths)
                    .map_err(|(field, value, expected)| LaunchError::Untrusted {
                        file: dir.join("launch.json"),
                        field,
                        value,
                        expected,
                    })?;
                recorded_store(&record, &self.layout, self.store_root.as_deref())?;
                if let Some(share) = &mut record.share {
                    share.exe = self.exe.clone();
                }
                let (meta, _) = read_snapshot_dir(&dir)?;
                self.restorable(*record, paths, &meta, dir, resume)
            }
        }
    }

    /// The plan of loading the snapshot in `dir` (whose metadata is `meta`) into the launch
    /// `record`, once it is checked: every file it needs is there, and the snapshot fits it.
    fn restorable(
        &self,
        record: LaunchRecord,
        paths: VmPaths,
        meta: &crate::snapshot::SnapshotMeta,
        dir: PathBuf,
        resume: bool,
    ) -> Result<LaunchPlan, LauncherError> {
        if let Some((what, path)) = record.missing_file() {
            return Err(LauncherError::Gone {
                name: record.spec.name.clone(),
                what,
                path,
            });
        }
        let version = qemu_version(&record.spec.qemu)?;
        check_restorable(meta, &record, &version)?;
        Ok(LaunchPlan {
            record,
            paths,
            image: None,
            origin: Origin::Restore(Incoming {
                dir,
                format: meta.format,
                resume,
            }),
        })
    }

    /// Resolve the new launch `req`, without looking at whether its name is free (a hot
    /// reload resolves the machines it keeps running, too; [`Launcher::claim`] decides).
    pub fn resolve(&self, req: &LaunchRequest) -> Result<LaunchPlan, LauncherError> {
        let paths = self.paths(&req.name)?;
        let resolved = resolve_launch(&self.layout, &self.state_dir, &paths, req, &self.exe)?;
        Ok(LaunchPlan {
            record: resolved.record,
            paths,
            image: resolved.image,
            origin: Origin::New,
        })
    }

    /// The recorded launch of `name`, from its own store, with this binary as its store server.
    fn recorded(&self, name: &str) -> Result<(LaunchRecord, VmPaths), LauncherError> {
        validate_name(name)?;
        VmPaths::in_state_dir(&self.state_dir, name)
            .check_private()
            .map_err(LaunchError::NotPrivate)?;
        let mut record = LaunchRecord::of_vm(&self.state_dir, name)?;
        recorded_store(&record, &self.layout, self.store_root.as_deref())?;
        if let Some(share) = &mut record.share {
            share.exe = self.exe.clone();
        }
        Ok((record, VmPaths::in_state_dir(&self.state_dir, name)))
    }

    /// Make the plan's name this launch's own: its folders are made private (or refused,
    /// before anything in them is read, if they belong to another user or others can write
    /// them); a new launch refuses a live VM of that name (bad input) and reaps a dead entry
    /// (ending its run); a recorded launch stops whatever runs under it.
    pub fn claim(&self, plan: LaunchPlan) -> Result<Claimed, LauncherError> {
        let name = &plan.record.spec.name;
        let paths = &plan.paths;
        paths.make_private().map_err(LaunchError::NotPrivate)?;
        if let Some(state) = VmState::read(paths) {
            match steps(&plan.origin, self.shared_run.is_some()).claim {
                ClaimStep::RefuseLive => {
                    if let Some(qemu_pid) = live_vm(&state) {
                        return Err(LauncherError::NameInUse {
                            name: name.clone(),
                            qemu_pid,
                        });
                    }
                    tracing::info!("cleaning up the stale entry of VM {name}");
                    let record = LaunchRecord::read(paths).ok();
                    reap_stale(&self.state_dir, paths, &state, record.as_ref())?;
                }
                ClaimStep::StopRunning { grace } => {
                    tracing::info!("stopping what runs as VM {name}");
                    stop_remote(paths, &state, grace, false)?;
                }
            }
        }
        Ok(Claimed(plan))
    }

    /// The claimed plan's disk, run and `launch.json`, before its start: the record as
    /// written (with its run) and, for a restore, the snapshot to load.
    fn commit(&self, claimed: Claimed) -> Result<(LaunchRecord, Option<Incoming>), LauncherError> {
        let LaunchPlan {
            mut record,
            paths,
            origin,
            ..
        } = claimed.0;
        let steps = steps(&origin, self.shared_run.is_some());
        let mut incoming = None;
        match (steps.disk, &origin, &record.spec.disk) {
            (DiskStep::Discard, _, Some(disk)) => discard_disk(disk)?,
            (DiskStep::FromSnapshot, Origin::Restore(from), _) => {
                prepare_restore(&record, &from.dir)?;
                incoming = Some(from.clone());
            }
            _ => {}
        }
        match steps.run {
            RunStep::Begin => match self.shared_run {
                Some(id) => {
                    record.run_id = join_vm_run(&self.state_dir, &self.layout, &record, id);
                    record.shared_run = record.run_id.is_some();
                }
                None => {
                    record.run_id =
                        record_vm_run(&self.state_dir, &self.layout, &record, &self.argv);
                }
            },
            RunStep::Reopen => {
                reopen_vm_run(
                    &self.state_dir,
                    &record,
                    &self.layout,
                    self.store_root.as_deref(),
                )?;
            }
        }
        if let Err(e) = record.write(&paths) {
            end_run(&self.state_dir, &record);
            return Err(e.into());
        }
        Ok((record, incoming))
    }

    /// Carry the claimed plan out with the VM owned by this process (thread): the disk, the
    /// run, `launch.json`, then the store servers and QEMU as its children (a restore loads its
    /// snapshot and resumes the guest, or leaves it paused as its kind says), its console read
    /// by this process as `console` says
    /// (its logs' bound, and a sink for each line). On a failure after the run was recorded,
    /// it is ended.
    pub fn start_here(
        &self,
        claimed: Claimed,
        console: ConsoleOptions,
    ) -> Result<(LaunchRecord, Vm), LauncherError> {
        let (record, incoming) = self.commit(claimed)?;
        let started = (|| -> Result<Vm, LauncherError> {
            let arg = incoming.as_ref().map(Incoming::arg).transpose()?;
            let mut vm = start_with(&record.spec, record.share.as_ref(), arg.as_deref(), console)?;
            if let Some(incoming) = &incoming {
                if let Err(e) = load_incoming(&mut vm, incoming, RESUME_DEADLINE) {
                    vm.stop(Duration::ZERO)?;
                    return Err(e.into());
                }
            }
            Ok(vm)
        })();
        match started {
            Ok(vm) => Ok((record, vm)),
            Err(e) => {
                end_run(&self.state_dir, &record);
                Err(e)
            }
        }
    }

    /// Carry the claimed plan out with the VM owned by a detached supervisor: the disk, the
    /// run, `launch.json`, then `__vm-supervise`, which starts it (a restore: QEMU loading the
    /// snapshot); returns once QEMU runs, the supervisor died, 30 s passed or `cancel` was set.
    /// On a failure after the run was recorded, it is ended.
    pub fn start_supervised(
        &self,
        claimed: Claimed,
        cancel: &Cancel,
    ) -> Result<SupervisedLaunch, LauncherError> {
        let (record, incoming) = self.commit(claimed)?;
        let paths = VmPaths::in_state_dir(&self.state_dir, &record.spec.name);
        let sup = SupervisorCommand {
            exe: &self.exe,
            state_dir: &self.state_dir,
            store_root: self.store_root.as_deref(),
            name: &record.spec.name,
            snapshot: incoming.as_ref().map(|i| (i.dir.as_path(), i.resume)),
        };
        let since = Instant::now();
        match spawn_supervisor(&sup, &paths, cancel) {
            Ok((supervisor, state)) => Ok(SupervisedLaunch {
                record,
                supervisor,
                state,
                since,
            }),
            Err(e) => {
                end_run(&self.state_dir, &record);
                Err(e.into())
            }
        }
    }
}

/// End the run of a launch that did not start (a failure to is logged).
pub(crate) fn end_run(state_dir: &Path, record: &LaunchRecord) {
    if let Err(e) = end_vm_run(state_dir, record, None) {
        tracing::warn!("{}", crate::error_chain(&e));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{Accel, GuestDevices};
    use crate::resolve::{AccelChoice, Boot, Share, StoreMode};

    #[test]
    fn each_origin_takes_its_steps() {
        let cases = [
            (
                Origin::New,
                ClaimStep::RefuseLive,
                DiskStep::Discard,
                RunStep::Begin,
            ),
            (
                Origin::Restart { keep_disk: false },
                ClaimStep::StopRunning {
                    grace: POWERDOWN_GRACE,
                },
                DiskStep::Discard,
                RunStep::Reopen,
            ),
            (
                Origin::Restart { keep_disk: true },
                ClaimStep::StopRunning {
                    grace: POWERDOWN_GRACE,
                },
                DiskStep::Keep,
                RunStep::Reopen,
            ),
            (
                Origin::Restore(Incoming {
                    dir: "/s/t".into(),
                    format: crate::snapshot::StateFormat::FileStream,
                    resume: true,
                }),
                ClaimStep::StopRunning {
                    grace: Duration::ZERO,
                },
                DiskStep::FromSnapshot,
                RunStep::Reopen,
            ),
        ];
        for (origin, claim, disk, run) in cases {
            assert_eq!(
                steps(&origin, false),
                Steps { claim, disk, run },
                "{origin:?}"
            );
        }
        // A cluster's restore joins the cluster's run; its other launches are as alone.
        let restore = Origin::Restore(Incoming {
            dir: "/s/t".into(),
            format: crate::snapshot::StateFormat::FileStream,
            resume: false,
        });
        assert_eq!(steps(&restore, true).run, RunStep::Begin);
        assert_eq!(steps(&Origin::New, true), steps(&Origin::New, false));
    }

    /// A state dir and store in a temporary directory, a kernel file, and a launcher on them.
    struct Fixture {
        dir: tempfile::TempDir,
        kernel: PathBuf,
        launcher: Launcher,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, b"k").unwrap();
        std::fs::create_dir_all(dir.path().join("store/nix/store")).unwrap();
        let launcher = Launcher {
            layout: StoreLayout::chroot(dir.path().join("store")),
            state_dir: dir.path().join("state"),
            store_root: None,
            exe: PathBuf::from("/bin/drydock"),
            argv: vec!["drydock".into()],
            shared_run: None,
        };
        Fixture {
            dir,
            kernel,
            launcher,
        }
    }

    fn request(name: &str, kernel: &Path) -> LaunchRequest {
        LaunchRequest {
            name: name.into(),
            boot: Boot::Kernel {
                kernel: kernel.to_path_buf(),
                initrd: None,
            },
            append: Some("quiet".into()),
            share: Share::Closure,
            store_mode: StoreMode::VirtioFs,
            accel: AccelChoice::Tcg,
            qemu: Some(PathBuf::from("/bin/sh")),
            memory_mib: 256,
            cpus: 1,
            disk_size_mib: 64,
            devices: GuestDevices::default(),
            allow_overcommit: false,
            profile: Default::default(),
            shared_dir: None,
        }
    }

    /// A state file saying that the VM `name` runs as this process (alive) or as no process.
    fn write_state(l: &Launcher, name: &str, alive: bool) {
        let paths = VmPaths::in_state_dir(&l.state_dir, name);
        std::fs::create_dir_all(&paths.dir).unwrap();
        let me = std::process::id();
        let (pid, ticks) = match alive {
            true => (me, crate::sys::proc::process_start_ticks(me)),
            // No such process (above any pid_max), so nothing is signalled.
            false => (999_999_999, Some(1)),
        };
        let state = VmState {
            name: name.into(),
            supervisor_pid: pid,
            qemu_pid: pid,
            server_pid: None,
            accel: "tcg".into(),
            memory_mib: 256,
            started: 0,
            cgroup: None,
            phase: crate::launch::Phase::Running,
            qemu_start_ticks: ticks,
            supervisor_start_ticks: ticks,
            server_start_ticks: None,
        };
        crate::launch::write_json(&paths.state_file(), &state).unwrap();
    }

    /// Write the recorded launch of a resolved new plan, as a launch would.
    fn record(plan: &LaunchPlan) {
        plan.record.write(&plan.paths).unwrap();
    }

    #[test]
    fn a_new_launch_resolves_and_a_recorded_one_comes_back_with_this_binary() {
        let f = fixture();
        let l = &f.launcher;
        let plan = l
            .plan(LaunchKind::New(request("a", &f.kernel)))
            .expect("a new launch");
        assert_eq!(plan.origin, Origin::New);
        assert_eq!(plan.record().spec.cmdline, "quiet");
        assert_eq!(plan.record().spec.accel, Accel::Tcg);
        assert_eq!(plan.record().share.as_ref().unwrap().exe, l.exe);
        assert!(plan.image().is_none() && !plan.is_restore());
        // Planning changed nothing of the VM.
        assert!(!l.state_dir.join("vms/a").exists());

        record(&plan);
        let other = Launcher {
            exe: PathBuf::from("/other/drydock"),
            ..l.clone()
        };
        let again = other
            .plan(LaunchKind::Restart {
                name: "a".into(),
                keep_disk: true,
            })
            .unwrap();
        assert_eq!(again.origin, Origin::Restart { keep_disk: true });
        assert_eq!(again.record().share.as_ref().unwrap().exe, other.exe);
        assert_eq!(again.record().spec, plan.record().spec);
    }

    #[test]
    fn bad_launches_are_typed_errors_before_anything_changes() {
        let f = fixture();
        let l = &f.launcher;
        let mut written = l.plan(LaunchKind::New(request("gone", &f.kernel))).unwrap();
        // As if booted from a system of this store: a restart must come from it too.
        written.record.store = Some(l.layout.clone());
        record(&written);
        write_state(l, "live", true);
        // A VM folder others can write (made by someone else, or under a loose umask).
        let loose = l.state_dir.join("vms/loose");
        std::fs::create_dir_all(&loose).unwrap();
        std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();

        type Check = fn(&LauncherError) -> bool;
        let cases: Vec<(LaunchKind, Check, bool, &str)> = vec![
            (
                LaunchKind::New(request("../x", &f.kernel)),
                |e| matches!(e, LauncherError::Plan(PlanError::BadName(_))),
                true,
                "invalid VM name",
            ),
            (
                LaunchKind::New(request("live", &f.kernel)),
                |e| matches!(e, LauncherError::NameInUse { .. }),
                true,
                "already running",
            ),
            (
                LaunchKind::New(LaunchRequest {
                    qemu: Some(PathBuf::from("/nonexistent/qemu")),
                    ..request("q", &f.kernel)
                }),
                |e| matches!(e, LauncherError::Resolve(ResolveError::QemuMissing(_))),
                true,
                "/nonexistent/qemu does not exist",
            ),
            (
                LaunchKind::New(request("loose", &f.kernel)),
                |e| matches!(e, LauncherError::Launch(LaunchError::NotPrivate(_))),
                true,
                "can be written by its group and every user",
            ),
            (
                LaunchKind::Restart {
                    name: "loose".into(),
                    keep_disk: false,
                },
                |e| matches!(e, LauncherError::Launch(LaunchError::NotPrivate(_))),
                true,
                "chmod go-w",
            ),
            (
                // More memory than any host has (unless overcommitted, below).
                LaunchKind::New(LaunchRequest {
                    memory_mib: u32::MAX,
                    ..request("big", &f.kernel)
                }),
                |e| {
                    matches!(
                        e,
                        LauncherError::Resolve(ResolveError::Plan(PlanError::HostMemory { .. }))
                    )
                },
                true,
                "more than this host has",
            ),
            (
                LaunchKind::Restart {
                    name: "never".into(),
                    keep_disk: false,
                },
                |e| matches!(e, LauncherError::Launch(LaunchError::NoVm { .. })),
                true,
                "no VM named never in",
            ),
            (
                LaunchKind::Restore {
                    name: "gone".into(),
                    tag: "t1".into(),
                },
                |e| matches!(e, LauncherError::Snapshot(SnapshotError::NoSnapshot { .. })),
                true,
                "no snapshot \"t1\"",
            ),
        ];
        for (kind, is, bad_input, says) in cases {
            let shown = format!("{kind:?}");
            let e = l.plan(kind).unwrap_err();
            assert!(is(&e), "{shown}: {e:?}");
            assert_eq!(e.is_bad_input(), bad_input, "{shown}: {e}");
            assert!(e.to_string().contains(says), "{shown}: {e}");
        }

        let big = LaunchRequest {
            memory_mib: u32::MAX,
            allow_overcommit: true,
            ..request("big", &f.kernel)
        };
        l.plan(LaunchKind::New(big)).expect("--allow-overcommit");

        // A pinned file deleted by hand: named, and not bad input (exit 1).
        std::fs::remove_file(&f.kernel).unwrap();
        let e = l
            .plan(LaunchKind::Restart {
                name: "gone".into(),
                keep_disk: false,
            })
            .unwrap_err();
        assert!(!e.is_bad_input());
        assert_eq!(
            e.to_string(),
            format!(
                "cannot restart gone: the pinned kernel {} is gone",
                f.kernel.display()
            )
        );
        // Another --store than the recorded launch's is bad input.
        let elsewhere = Launcher {
            layout: StoreLayout::chroot(f.dir.path().join("elsewhere")),
            store_root: Some(f.dir.path().join("elsewhere")),
            ..l.clone()
        };
        let e = elsewhere
            .plan(LaunchKind::Restart {
                name: "gone".into(),
                keep_disk: false,
            })
            .unwrap_err();
        assert!(
            matches!(e, LauncherError::Owner(OwnerError::OtherStore { .. })),
            "{e:?}"
        );
    }

    #[test]
    fn a_restore_from_a_folder_is_checked_before_anything_changes() {
        let f = fixture();
        let l = &f.launcher;
        let plan = l.plan(LaunchKind::New(request("m", &f.kernel))).unwrap();
        let dir = f.dir.path().join("snaps/ready");
        std::fs::create_dir_all(&dir).unwrap();
        let from = |record: &LaunchRecord| LaunchKind::RestoreFrom {
            record: Box::new(record.clone()),
            dir: dir.clone(),
            resume: false,
        };
        // No snapshot there: corrupt, naming the file (exit 1).
        let e = l.plan(from(plan.record())).unwrap_err();
        assert!(
            matches!(&e, LauncherError::Snapshot(SnapshotError::Corrupt { path, .. }) if path == &dir.join("meta.json")),
            "{e:?}"
        );
        assert!(!e.is_bad_input());
        // A record whose files lie outside its VM's folder is not used (exit 2).
        let mut moved = plan.record().clone();
        if let Some(disk) = &mut moved.spec.disk {
            disk.overlay = f.dir.path().join("elsewhere.qcow2");
        }
        let e = l.plan(from(&moved)).unwrap_err();
        assert!(
            matches!(&e, LauncherError::Launch(LaunchError::Untrusted { file, .. }) if file == &dir.join("launch.json")),
            "{e:?}"
        );
        assert!(e.is_bad_input());
        // Planning changed nothing of the VM.
        assert!(!l.state_dir.join("vms/m").exists());
    }

    #[test]
    fn a_claim_refuses_a_live_name_and_reaps_a_dead_entry() {
        let f = fixture();
        let l = &f.launcher;
        let plan = |name: &str| l.resolve(&request(name, &f.kernel)).unwrap();

        // Taken after it was planned: the claim refuses it, and leaves it alone.
        let late = plan("late");
        write_state(l, "late", true);
        let e = l.claim(late).unwrap_err();
        assert!(e.is_bad_input() && matches!(e, LauncherError::NameInUse { .. }));
        assert!(VmState::read(&VmPaths::in_state_dir(&l.state_dir, "late")).is_some());

        // Its folder made loose after it was planned: the claim refuses it before reading
        // anything there; a claim makes a missing folder 0700.
        let loosened = plan("loosened");
        let dir = l.state_dir.join("vms/loosened");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o757))
            .unwrap();
        let e = l.claim(loosened).unwrap_err();
        assert!(
            e.is_bad_input() && matches!(e, LauncherError::Launch(LaunchError::NotPrivate(_))),
            "{e:?}"
        );
        l.claim(plan("fresh")).unwrap();
        let mode = std::fs::metadata(l.state_dir.join("vms/fresh")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o700
        );

        // A dead owner's entry is cleaned up.
        write_state(l, "dead", false);
        let claimed = l.claim(plan("dead")).unwrap();
        assert_eq!(claimed.record().spec.name, "dead");
        assert!(VmState::read(&VmPaths::in_state_dir(&l.state_dir, "dead")).is_none());
    }
}
