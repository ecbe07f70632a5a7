//! What one `drydock up` does with a composition, above the pieces: [`prepare`] (evaluate, plan,
//! the one tracked build), [`reload_cycle`] (a hot reload against the cluster's owner: this
//! process, or another one over its control socket), [`watch_reloads`] (a reload per edit of a
//! cluster another process owns) and [`RunningCluster::own`] (the owner's loop: machine events,
//! control requests, watched edits, until it is stopped). What they have to say reaches the
//! caller as [`UpEvent`]s; the caller prints them. The planning inside is pure ([`narrow`] here,
//! `reload` and `compose`); the effects are the modules' below.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use drydock_gc::{Cancel, Deadline, GcError, RunsDb, StoreLayout};
use serde::Serialize;

use crate::apply::ReloadError;
use crate::compose::{ClusterPlan, ComposeError, TestScript, plan_cluster};
use crate::control::{ControlOp, ControlRequest, request};
use crate::eval::{EvalError, build, check_systems, evaluate, release_build_roots};
use crate::events::{MachineEvent, OwnerEvent};
use crate::reload::{Action, MachineOutcome, PlannedAction, all_done};
use crate::run::Boot;
use crate::run::RunningCluster;
use crate::state::{ClusterError, ClusterLaunch, ClusterState, cluster_paths};
use crate::watch::{Change, Debounce, Reads, Recorder, WatchError, Watcher, triggers};
use drydock_vm::VmPaths;
use drydock_vm::{ConsoleTail, LogWatch, ProcessWatch, Waker, wait_readable, wake_pair};

/// How long a change must be followed by quiet before it is applied (an editor's burst).
const QUIET: Duration = Duration::from_millis(300);
/// How long a remote owner may take to plan.
const PLAN_DEADLINE: Duration = Duration::from_secs(300);
/// A remote owner waits up to the ready timeout for booting machines; this is its margin.
const APPLY_MARGIN: Duration = Duration::from_secs(600);

/// Why an `up` (or a reload) could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Eval(#[from] EvalError),
    #[error(transparent)]
    Compose(#[from] ComposeError),
    #[error(transparent)]
    Runs(#[from] GcError),
    #[error(transparent)]
    Reload(#[from] ReloadError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Watch(#[from] WatchError),
    /// The machines ask for more memory than the host has.
    #[error(transparent)]
    Memory(drydock_vm::PlanError),
    #[error("the thread asking the cluster's owner to apply the reload panicked")]
    Panicked,
    #[error("interrupted; the cluster's owner carries the reload on (`drydock ps` shows it)")]
    LeftToOwner,
}

impl SessionError {
    /// A composition, machine name or request that is wrong: exit 2.
    pub fn is_bad_input(&self) -> bool {
        match self {
            Self::Eval(e) => e.is_bad_input(),
            Self::Compose(e) => e.is_bad_input(),
            Self::Runs(e) => e.is_bad_input(),
            Self::Reload(e) => e.is_bad_input(),
            Self::Cluster(e) => e.is_bad_input(),
            Self::Memory(e) => e.is_bad_input(),
            Self::Watch(_) | Self::Panicked | Self::LeftToOwner => false,
        }
    }

    /// Ctrl-C ended the build: exit 130.
    pub fn is_interrupted(&self) -> bool {
        match self {
            Self::Runs(e) => e.is_interrupted(),
            Self::Eval(EvalError::Track(e)) => e.is_interrupted(),
            Self::Eval(EvalError::Interrupted) => true,
            Self::Cluster(ClusterError::Interrupted) => true,
            Self::LeftToOwner => true,
            _ => false,
        }
    }
}

/// What `up` asks of a composition.
#[derive(Debug, Clone)]
pub struct UpRequest {
    /// The composition (`drydock.nix`).
    pub file: PathBuf,
    /// The cluster's name.
    pub name: String,
    /// Only these machines are built and planned anew (all when empty); the others keep the
    /// running cluster's plan.
    pub machines: Vec<String>,
    /// Machines the caller names otherwise (`--hide`, `--show`): each must exist.
    pub mentioned: Vec<String>,
    /// Restart instead of switching.
    pub restart: bool,
    /// Plan, and stop there.
    pub dry_run: bool,
    /// How long a booting machine may take to become ready.
    pub ready_timeout: Duration,
    /// The command line that asked (recorded with the build's run).
    pub argv: Vec<String>,
    /// Show the store paths the build prints (`-v`); its messages on stderr are shown anyway.
    pub show_build_outputs: bool,
    /// How long the evaluation, and then the build, may take.
    pub build_timeout: Duration,
    /// Start the machines even if together they ask for more memory than the host has.
    pub allow_overcommit: bool,
    /// Note what the evaluation reads under the composition's directory (for `--watch`,
    /// reported as [`UpEvent::Evaluated`]).
    pub watch: bool,
}

/// The one tracked build of a `prepare`.
#[derive(Debug, Clone, Serialize)]
pub struct Built {
    pub systems: usize,
    pub secs: f64,
    /// The build's run; `None` when it built nothing new (then no run is recorded).
    pub run_id: Option<i64>,
    pub paths_recorded: usize,
}

/// A composition, evaluated, planned and built.
#[derive(Debug)]
pub struct Prepared {
    pub plan: ClusterPlan,
    pub evaluate: Duration,
    pub build: Duration,
    /// Absent when no machine needed a build (systems given as store paths).
    pub built: Option<Built>,
    /// What the build made stays rooted until this is dropped.
    pub roots: BuildRoots,
    /// The composition's `testScript` (`drydock test`'s default script).
    pub test_script: TestScript,
}

/// The GC roots of a cluster's build (its `result*` links beside the cluster's files),
/// released when dropped: drop it once the machines' runs pin what they run, or once nothing
/// needs it. (`down` releases those that a killed `up` left behind.)
#[derive(Debug)]
pub struct BuildRoots(PathBuf);

impl Drop for BuildRoots {
    fn drop(&mut self) {
        release_build_roots(&self.0);
    }
}

/// The owner's events that an `up` reports (machines' events and console lines).
fn report(ev: &OwnerEvent, on: &mut dyn FnMut(UpEvent<'_>)) {
    match ev {
        OwnerEvent::Machine { event, .. } => on(UpEvent::Machine(event)),
        OwnerEvent::Console {
            machine,
            line,
            skipped,
        } => on(UpEvent::Console {
            machine,
            line,
            skipped: *skipped,
        }),
        _ => {}
    }
}

/// Start the cluster `plan` in this process, its owner: hubs, then every machine in parallel.
/// Returns once every machine is ready (`on` sees each machine's events and console lines
/// meanwhile); a machine that fails, `cancel` or the timeout stops everything started.
pub fn start(
    plan: &ClusterPlan,
    opts: &ClusterLaunch,
    cancel: &Cancel,
    on: &mut dyn FnMut(UpEvent<'_>),
) -> Result<RunningCluster, ClusterError> {
    crate::run::up(plan, opts, Boot::Fresh, cancel, &mut |ev| report(ev, on))
}

/// [`start`] with no machine booted: each boots when asked (`drydock test`'s `start()`,
/// `start_all()`); the owner stays up while none runs, until it is stopped.
pub fn start_idle(
    plan: &ClusterPlan,
    opts: &ClusterLaunch,
    cancel: &Cancel,
    on: &mut dyn FnMut(UpEvent<'_>),
) -> Result<RunningCluster, ClusterError> {
    crate::run::up(plan, opts, Boot::Idle, cancel, &mut |ev| report(ev, on))
}

/// [`start`] from the cluster snapshot `tag` of `plan`'s cluster (checked again): every machine
/// loads its saved state, paused; once all have, they resume at once, each guest's clock is set
/// to the host's, and it returns once every backdoor answers.
pub fn start_restored(
    plan: &ClusterPlan,
    tag: &str,
    opts: &ClusterLaunch,
    cancel: &Cancel,
    on: &mut dyn FnMut(UpEvent<'_>),
) -> Result<RunningCluster, crate::snapshot::SnapshotError> {
    let snap = crate::snapshot::check_restore(&opts.state_dir, &opts.layout, &plan.name, tag)?;
    Ok(crate::run::up(
        &snap.plan,
        opts,
        Boot::Restore(&snap),
        cancel,
        &mut |ev| report(ev, on),
    )?)
}

/// Something an `up` has to say while it works.
#[derive(Debug)]
pub enum UpEvent<'a> {
    /// The composition was evaluated (`ok`, or it failed), reading `reads` under its directory
    /// (with [`UpRequest::watch`] only): what a [`Watching`] reloads on.
    Evaluated { reads: &'a Reads, ok: bool },
    /// A machine became ready, failed or stopped.
    Machine(&'a MachineEvent),
    /// The systems were built.
    Built(&'a Built),
    /// A reload's plan, before anything changes.
    Planned {
        cluster: &'a str,
        machines: &'a [MachineOutcome],
    },
    /// A reload found every machine unchanged.
    NothingToDo,
    /// A line a machine printed (as the guest printed it: escape it for a terminal), as it
    /// came; `skipped` lines before it were not passed on (the owner was busy; the machine's
    /// logs have them).
    Console {
        machine: &'a str,
        line: &'a str,
        skipped: u64,
    },
    /// Watched files changed (those still there, or all of them if none is).
    Changed(&'a [PathBuf]),
    /// A watched reload ended; with an error, nothing changed.
    Reloaded(&'a Result<ReloadReport, SessionError>),
    /// The cluster's machines changed (a reload, a restart asked for).
    PlanChanged(&'a ClusterPlan),
}

/// What one reload did, as printed (text) or as `--json`.
#[derive(Debug, Serialize)]
pub struct ReloadReport {
    pub cluster: String,
    pub dry_run: bool,
    pub evaluate_secs: f64,
    pub build_secs: f64,
    pub plan_secs: f64,
    /// Absent when nothing was applied (`--dry-run`, or nothing to do).
    pub apply_secs: Option<f64>,
    pub machines: Vec<MachineOutcome>,
    /// Every action that ran went well.
    pub ok: bool,
    /// The composition's `testScript` as this reload evaluated it (for `drydock test --watch`;
    /// not part of the report).
    #[serde(skip)]
    pub test_script: TestScript,
}

impl ReloadReport {
    /// `up --dry-run` of a cluster that is not up: every machine would be created.
    pub fn fresh(plan: &ClusterPlan) -> Self {
        let machines = plan
            .machines
            .iter()
            .map(|m| {
                MachineOutcome::planned(PlannedAction {
                    machine: m.machine.clone(),
                    action: Action::Create,
                    why: "the cluster is not up".into(),
                    from: None,
                    to: Some(m.settings.system.target().to_string()),
                })
            })
            .collect();
        Self {
            cluster: plan.name.clone(),
            dry_run: true,
            evaluate_secs: 0.0,
            build_secs: 0.0,
            plan_secs: 0.0,
            apply_secs: None,
            machines,
            ok: true,
            test_script: TestScript::Absent,
        }
    }
}

/// `plan` narrowed to the machines `only` (every machine when empty): the others keep their
/// plan in `running`, or are left out when nothing runs them. The VLANs are those left in use.
pub fn narrow(plan: ClusterPlan, only: &[String], running: Option<&ClusterPlan>) -> ClusterPlan {
    if only.is_empty() {
        return plan;
    }
    let machines: Vec<_> = plan
        .machines
        .iter()
        .filter_map(|m| match only.contains(&m.machine) {
            true => Some(m.clone()),
            false => running.and_then(|r| r.machine(&m.machine).cloned()),
        })
        .collect();
    let mut vlans: Vec<u8> = machines
        .iter()
        .flat_map(|m| m.settings.vlans.clone())
        .collect();
    vlans.sort_unstable();
    vlans.dedup();
    ClusterPlan {
        machines,
        vlans,
        ..plan
    }
}

/// Evaluate the composition, plan the cluster and build its systems (one tracked run, named
/// `cluster NAME`). With `running` (a hot reload), machines the request leaves out keep their
/// running plan. The build's outputs stay rooted until the returned [`Prepared::roots`] is
/// dropped (on an error, before this returns).
pub fn prepare(
    layout: &StoreLayout,
    state_dir: &Path,
    req: &UpRequest,
    running: Option<&ClusterPlan>,
    cancel: &Cancel,
    on: &mut dyn FnMut(UpEvent<'_>),
) -> Result<Prepared, SessionError> {
    let t = Instant::now();
    let composition = match req.watch {
        false => evaluate(layout, &req.file, req.build_timeout, cancel)?,
        true => {
            let dir = composition_dir(&req.file);
            let recorder = Recorder::start(&dir)
                .map_err(|e| tracing::warn!("{}", drydock_vm::error_chain(&e)))
                .ok();
            let composition = evaluate(layout, &req.file, req.build_timeout, cancel);
            let mut reads = recorder.map(Recorder::finish).unwrap_or_default();
            // The composition itself, whatever the evaluation did (it may not exist yet).
            reads
                .paths
                .insert(dir.join(req.file.file_name().unwrap_or_default()));
            on(UpEvent::Evaluated {
                reads: &reads,
                ok: composition.is_ok(),
            });
            composition?
        }
    };
    let planned = plan_cluster(&req.name, &composition)?;
    let evaluate = t.elapsed();
    if let Some(m) = req
        .machines
        .iter()
        .chain(&req.mentioned)
        .find(|m| !composition.machines.contains_key(*m))
    {
        return Err(ComposeError::NoSuchMachine {
            file: composition.file.clone(),
            name: m.clone(),
            has: composition.machines.keys().cloned().collect(),
        }
        .into());
    }
    let plan = narrow(planned, &req.machines, running);
    // The machines the cluster will run, all together, must fit the host's memory (before
    // anything is built or booted).
    let memory: Vec<(String, u32)> = plan
        .machines
        .iter()
        .map(|m| (m.machine.clone(), m.settings.memory_mib))
        .collect();
    drydock_vm::check_host_memory(&memory, req.allow_overcommit).map_err(SessionError::Memory)?;
    // The cluster's and the machines' folders are this user's alone, before anything is
    // written there (the build's expression and roots are the first); the machines' are made
    // when they launch.
    crate::state::make_private(state_dir, &plan)?;
    let names: Vec<&str> = plan
        .machines
        .iter()
        .filter(|m| req.machines.is_empty() || req.machines.contains(&m.machine))
        .map(|m| m.machine.as_str())
        .collect();
    let runs = RunsDb::open(state_dir).map_err(GcError::from)?;
    let cdir = cluster_paths(state_dir, &req.name).dir;
    let roots = BuildRoots(cdir.clone());
    let t = Instant::now();
    let report = build(
        layout,
        &runs,
        &composition,
        &names,
        &crate::eval::BuildRun {
            name: &format!(
                "{} {}",
                if running.is_some() { "reload" } else { "up" },
                req.name
            ),
            command: &req.argv,
            show_outputs: req.show_build_outputs,
        },
        &cdir,
        req.build_timeout,
        cancel,
    )?;
    let build_took = t.elapsed();
    let built = report.map(|r| Built {
        systems: names.len(),
        secs: build_took.as_secs_f64(),
        run_id: (r.run_id != 0).then_some(r.run_id),
        paths_recorded: r.claimed.len(),
    });
    if let Some(b) = &built {
        on(UpEvent::Built(b));
    }
    check_systems(layout, &composition, &names)?;
    Ok(Prepared {
        plan,
        evaluate,
        build: build_took,
        built,
        roots,
        test_script: composition.test_script,
    })
}

/// Who applies a reload: this process's own cluster, or the owner of a cluster that is up.
#[derive(Debug)]
pub enum ReloadOwner<'a> {
    Local(&'a mut RunningCluster),
    Remote { state_dir: PathBuf, name: String },
}

impl ReloadOwner<'_> {
    /// The plan the cluster runs now.
    fn running(&self) -> Result<ClusterPlan, SessionError> {
        match self {
            Self::Local(c) => Ok(c.plan.clone()),
            Self::Remote { state_dir, name } => ClusterState::read(state_dir, name)
                .map(|s| s.plan)
                .ok_or_else(|| {
                    ReloadError::from(crate::control::ControlError::NotUp(name.clone())).into()
                }),
        }
    }

    fn request(op: ControlOp, new: &ClusterPlan, restart: bool) -> ControlRequest {
        ControlRequest {
            op,
            plan: new.clone(),
            restart,
            restart_machines: Vec::new(),
            machines: Vec::new(),
            tag: None,
            stop: false,
            net: None,
        }
    }

    fn plan(&self, new: &ClusterPlan, restart: bool) -> Result<Vec<MachineOutcome>, SessionError> {
        Ok(match self {
            Self::Local(c) => c
                .plan_reload(new, restart, &[])?
                .into_iter()
                .map(MachineOutcome::planned)
                .collect(),
            Self::Remote { state_dir, name } => request(
                state_dir,
                name,
                &Self::request(ControlOp::Plan, new, restart),
                PLAN_DEADLINE,
            )
            .map_err(ReloadError::from)?,
        })
    }

    fn apply(
        &mut self,
        new: &ClusterPlan,
        req: &UpRequest,
        planned: &[MachineOutcome],
        cancel: &Cancel,
        on: &mut dyn FnMut(UpEvent<'_>),
    ) -> Result<Vec<MachineOutcome>, SessionError> {
        match self {
            Self::Local(c) => {
                Ok(c.apply_reload(new, req.restart, &[], cancel, &mut |ev| report(ev, on))?)
            }
            Self::Remote { state_dir, name } => {
                apply_remote(state_dir, name, new, req, planned, cancel, on)
            }
        }
    }
}

/// Tails of the consoles of the machines a reload changes, from their current end.
fn changed_tails(
    state_dir: &Path,
    name: &str,
    machines: &[MachineOutcome],
) -> BTreeMap<String, ConsoleTail> {
    machines
        .iter()
        .filter(|m| !matches!(m.planned.action, Action::Keep | Action::Remove))
        .map(|m| {
            let vm = format!("{name}.{}", m.planned.machine);
            let path = VmPaths::in_state_dir(state_dir, &vm).console_log();
            (m.planned.machine.clone(), ConsoleTail::at_end(path))
        })
        .collect()
}

/// Ask the remote owner to apply, passing the changed machines' console lines on meanwhile
/// (each as it is written: the files are followed, blocking between lines, until the call's
/// thread says the owner answered). `cancel` ends the wait (the owner carries on).
fn apply_remote(
    state_dir: &Path,
    name: &str,
    new: &ClusterPlan,
    req: &UpRequest,
    planned: &[MachineOutcome],
    cancel: &Cancel,
    on: &mut dyn FnMut(UpEvent<'_>),
) -> Result<Vec<MachineOutcome>, SessionError> {
    let mut tails = changed_tails(state_dir, name, planned);
    let mut watch = LogWatch::new();
    for t in tails.values() {
        watch.add(t.path());
    }
    let call = ReloadOwner::request(ControlOp::Apply, new, req.restart);
    let deadline = req.ready_timeout + APPLY_MARGIN;
    let (sd, n) = (state_dir.to_path_buf(), name.to_string());
    let (answered, answered_fd) = wake_pair().map_err(|e| {
        ReloadError::from(crate::control::ControlError::Io {
            name: name.to_string(),
            source: e,
        })
    })?;
    let a = answered.clone();
    let _interrupt = cancel.on_cancel(move || a.wake());
    let call = std::thread::spawn(move || {
        let r = request(&sd, &n, &call, deadline).map_err(ReloadError::from);
        answered.wake();
        r
    });
    let mut echo = |tails: &mut BTreeMap<String, ConsoleTail>| {
        for (m, t) in tails.iter_mut() {
            for line in t.lines() {
                on(UpEvent::Console {
                    machine: m,
                    line: &line,
                    skipped: 0,
                });
            }
        }
    };
    while !answered_fd.is_woken() {
        echo(&mut tails);
        if let Err(e) = watch.wait(&[answered_fd.as_fd()], None) {
            tracing::warn!("following the consoles: {e}");
            break;
        }
    }
    echo(&mut tails);
    if cancel.is_set() && !call.is_finished() {
        // The call's thread stays blocked on the owner's answer until this process exits.
        return Err(SessionError::LeftToOwner);
    }
    Ok(call.join().map_err(|_| SessionError::Panicked)??)
}

/// One hot reload: evaluate, build, plan (reported as [`UpEvent::Planned`] before anything
/// changes), apply (unless `dry_run`). Afterwards the build's roots are released (the runs pin
/// the new systems); the owner has recorded the cluster as it now is.
pub fn reload_cycle(
    layout: &StoreLayout,
    state_dir: &Path,
    req: &UpRequest,
    owner: &mut ReloadOwner<'_>,
    cancel: &Cancel,
    on: &mut dyn FnMut(UpEvent<'_>),
) -> Result<ReloadReport, SessionError> {
    let running = owner.running()?;
    let Prepared {
        plan: new,
        evaluate,
        build,
        roots,
        test_script,
        ..
    } = prepare(layout, state_dir, req, Some(&running), cancel, on)?;
    let t = Instant::now();
    let planned = owner.plan(&new, req.restart)?;
    let mut report = ReloadReport {
        cluster: req.name.clone(),
        dry_run: req.dry_run,
        evaluate_secs: evaluate.as_secs_f64(),
        build_secs: build.as_secs_f64(),
        plan_secs: t.elapsed().as_secs_f64(),
        apply_secs: None,
        machines: planned,
        ok: true,
        test_script,
    };
    if req.dry_run {
        return Ok(report);
    }
    on(UpEvent::Planned {
        cluster: &req.name,
        machines: &report.machines,
    });
    if report
        .machines
        .iter()
        .all(|m| m.planned.action == Action::Keep)
    {
        on(UpEvent::NothingToDo);
        return Ok(report);
    }
    let t = Instant::now();
    let outcomes = owner.apply(&new, req, &report.machines, cancel, on);
    // The switched and booted machines' runs pin their new systems now.
    drop(roots);
    let outcomes = outcomes?;
    report.apply_secs = Some(t.elapsed().as_secs_f64());
    report.ok = all_done(&outcomes);
    report.machines = outcomes;
    Ok(report)
}

/// The directory of the composition `file`, as the watches name it (links resolved, so that
/// the paths of drydock's own output files compare equal).
fn composition_dir(file: &Path) -> PathBuf {
    let abs = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
    let dir = abs
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    std::fs::canonicalize(&dir).unwrap_or(dir)
}

/// The regular files this process's stdout and stderr go to (`up --watch > up.log`): drydock
/// writes them, so their changes are its own.
fn own_output_files() -> Vec<PathBuf> {
    [1, 2]
        .iter()
        .filter_map(|fd| std::fs::read_link(format!("/proc/self/fd/{fd}")).ok())
        .filter(|p| p.is_absolute() && p.is_file())
        .collect()
}

/// The composition's directory, watched; what the last evaluation read there; and the burst of
/// changes being collected.
#[derive(Debug)]
pub struct Watching {
    pub dir: PathBuf,
    /// The inotify watch, here until it moves into the thread that feeds an owner.
    watcher: Option<Watcher>,
    debounce: Debounce,
    /// The thread that reads the watch for the owner's channel, and its stop.
    feeder: Option<(Waker, std::thread::JoinHandle<()>)>,
    /// What the last evaluation read (unknown until one was recorded: every change counts).
    reads: Option<Reads>,
    /// The last evaluation failed.
    failed: bool,
    /// drydock's own files: its state dir and its output files, where they are in the tree.
    own: Vec<PathBuf>,
    /// Files whose every change counts, wherever they are (`drydock test --watch`'s script).
    extra: Vec<PathBuf>,
}

impl Watching {
    /// Watch the directory of the composition `file` (and below it); drydock's own files there
    /// (the state dir `state_dir`, the files its output goes to) never count.
    pub fn new(file: &Path, state_dir: &Path) -> Result<Self, WatchError> {
        let dir = composition_dir(file);
        let state = std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
        Ok(Self {
            watcher: Some(Watcher::new(&dir)?),
            dir,
            debounce: Debounce::default(),
            feeder: None,
            reads: None,
            failed: false,
            own: std::iter::once(state).chain(own_output_files()).collect(),
            extra: Vec::new(),
        })
    }

    /// Changes of `file` count too, wherever it is (its folder is watched, not below it, when
    /// it is outside the composition's directory); it must exist.
    pub(crate) fn also(&mut self, file: &Path) -> Result<(), WatchError> {
        let watch = |source| WatchError::Watch {
            path: file.to_path_buf(),
            source,
        };
        let abs = std::path::absolute(file).map_err(watch)?;
        let dir = abs.parent().map(Path::to_path_buf).unwrap_or_default();
        let dir = std::fs::canonicalize(&dir).map_err(watch)?;
        let path = dir.join(abs.file_name().unwrap_or_default());
        if !dir.starts_with(&self.dir) {
            if let Some(w) = self.watcher.as_mut() {
                w.add_dir(&dir)?;
            }
        }
        self.extra.push(path);
        Ok(())
    }

    /// The burst of changes that is over (as of now), if one is: the paths still there (or all
    /// of them if none is).
    pub(crate) fn due_changes(&mut self) -> Option<Vec<PathBuf>> {
        self.take_changes();
        let changed = self.debounce.take(Instant::now(), QUIET)?;
        let there: Vec<PathBuf> = changed.iter().filter(|p| p.exists()).cloned().collect();
        Some(if there.is_empty() { changed } else { there })
    }

    /// Block until the watch has changes, a burst is over, or one of `also` is readable.
    pub(crate) fn wait(&mut self, also: &[std::os::fd::BorrowedFd<'_>]) -> std::io::Result<()> {
        let mut fds: Vec<std::os::fd::BorrowedFd<'_>> = also.to_vec();
        fds.extend(self.watcher.as_ref().map(|w| w.as_fd()));
        wait_readable(&fds, self.due_at())?;
        self.take_changes();
        Ok(())
    }

    /// An evaluation read `reads` (see [`UpEvent::Evaluated`]): from now on only changes of
    /// those reload.
    pub fn evaluated(&mut self, reads: &Reads, ok: bool) {
        self.reads = Some(reads.clone());
        self.failed = !ok;
    }

    /// Note the `changes` that call for a reload (see `watch::triggers`: not drydock's own
    /// files, and only what the last evaluation read).
    fn push(&mut self, changes: Vec<Change>) {
        let reads = self.reads.as_ref();
        let wanted = changes
            .into_iter()
            .filter(|c| {
                self.extra.contains(&c.path)
                    || (c.path.starts_with(&self.dir) && triggers(c, reads, self.failed, &self.own))
            })
            .map(|c| c.path)
            .collect();
        self.debounce.push(wanted, Instant::now());
    }

    /// Note the changes the watch has now (never blocks).
    fn take_changes(&mut self) {
        let Some(w) = self.watcher.as_mut() else {
            return;
        };
        match w.poll() {
            Ok(changes) => self.push(changes),
            Err(e) => tracing::warn!("{}", drydock_vm::error_chain(&e)),
        }
    }

    /// When the burst being collected is over (if one is): the owner's next deadline.
    fn due_at(&self) -> Option<Deadline> {
        self.debounce.due(QUIET).map(Deadline::at)
    }

    /// From now on the watch's changes reach the owner as [`OwnerEvent::Edits`], from a thread
    /// blocked on the watch (the owner keeps those that call for a reload: [`Self::push`]).
    fn feed(&mut self, tx: std::sync::mpsc::SyncSender<OwnerEvent>) {
        let Some(mut w) = self.watcher.take() else {
            return;
        };
        let Ok((stop, stopped)) = wake_pair() else {
            self.watcher = Some(w);
            return;
        };
        let thread = std::thread::Builder::new()
            .name("watch".into())
            .spawn(move || {
                loop {
                    match wait_readable(&[w.as_fd(), stopped.as_fd()], None) {
                        Ok(r) if r[1] => return,
                        Ok(r) if !r[0] => continue,
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!("watching for changes: {e}");
                            return;
                        }
                    }
                    match w.poll() {
                        Ok(changes) if changes.is_empty() => {}
                        Ok(changes) => {
                            if tx.send(OwnerEvent::Edits(changes)).is_err() {
                                return;
                            }
                        }
                        Err(e) => tracing::warn!("{}", drydock_vm::error_chain(&e)),
                    }
                }
            });
        match thread {
            Ok(t) => self.feeder = Some((stop, t)),
            Err(e) => tracing::warn!("watching for changes: {e}"),
        }
    }

    /// Stop the feeding thread (once the owner's channel is closed, or it might block).
    fn stop_feed(&mut self) {
        if let Some((stop, t)) = self.feeder.take() {
            stop.wake();
            let _ = t.join();
        }
    }

    /// One reload ([`reload_cycle`]), noting what its evaluation read.
    pub(crate) fn cycle(
        &mut self,
        layout: &StoreLayout,
        state_dir: &Path,
        req: &UpRequest,
        owner: &mut ReloadOwner<'_>,
        cancel: &Cancel,
        on: &mut dyn FnMut(UpEvent<'_>),
    ) -> Result<ReloadReport, SessionError> {
        let mut evaluated = None;
        let r = reload_cycle(layout, state_dir, req, owner, cancel, &mut |ev| {
            if let UpEvent::Evaluated { reads, ok } = &ev {
                evaluated = Some(((*reads).clone(), *ok));
            }
            on(ev)
        });
        if let Some((reads, ok)) = evaluated {
            self.evaluated(&reads, ok);
        }
        // Changes made while it ran (still in the watch, or waiting on the owner's channel)
        // are looked at afresh against what it read.
        r
    }

    /// A burst of edits is over (as of now): report it, then reload.
    fn reload_if_due(
        &mut self,
        layout: &StoreLayout,
        state_dir: &Path,
        req: &UpRequest,
        owner: &mut ReloadOwner<'_>,
        cancel: &Cancel,
        on: &mut dyn FnMut(UpEvent<'_>),
    ) -> bool {
        let Some(changed) = self.debounce.take(Instant::now(), QUIET) else {
            return false;
        };
        // An editor's or sed's temporary file, gone again, is not worth naming.
        let there: Vec<PathBuf> = changed.iter().filter(|p| p.exists()).cloned().collect();
        on(UpEvent::Changed(if there.is_empty() {
            &changed
        } else {
            &there
        }));
        let r = self.cycle(layout, state_dir, req, owner, cancel, on);
        on(UpEvent::Reloaded(&r));
        true
    }
}

/// How [`watch_reloads`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEnd {
    /// The cluster went down.
    Down,
    /// `cancel` was set.
    Interrupted,
}

/// `up --watch` on a cluster another process owns: one reload now, then one per burst of edits
/// (each reported as [`UpEvent::Reloaded`]), until the cluster is down or `cancel`. Between
/// them it blocks on the watch, the owner's exit and the cancel.
pub fn watch_reloads(
    layout: &StoreLayout,
    state_dir: &Path,
    req: &UpRequest,
    watching: &mut Watching,
    cancel: &Cancel,
    on: &mut dyn FnMut(UpEvent<'_>),
) -> WatchEnd {
    let mut owner = ReloadOwner::Remote {
        state_dir: state_dir.to_path_buf(),
        name: req.name.clone(),
    };
    let r = watching.cycle(layout, state_dir, req, &mut owner, cancel, on);
    on(UpEvent::Reloaded(&r));
    let wake = wake_pair().ok();
    let _woken = wake.as_ref().map(|(w, _)| {
        let w = w.clone();
        cancel.on_cancel(move || w.wake())
    });
    while !cancel.is_set() {
        // The owner now (a reload may have been answered by a new one after a restart of it).
        let Some(state) = ClusterState::read_up(state_dir, &req.name) else {
            return WatchEnd::Down;
        };
        let Some(owner_exit) = ProcessWatch::open(state.owner_pid, state.owner_start_ticks) else {
            return WatchEnd::Down;
        };
        if watching.reload_if_due(layout, state_dir, req, &mut owner, cancel, on) {
            continue;
        }
        let mut fds = vec![owner_exit.as_fd()];
        fds.extend(watching.watcher.as_ref().map(|w| w.as_fd()));
        fds.extend(wake.as_ref().map(|(_, fd)| fd.as_fd()));
        if let Err(e) = wait_readable(&fds, watching.due_at()) {
            tracing::warn!("watching for changes: {e}");
            return WatchEnd::Interrupted;
        }
        watching.take_changes();
    }
    WatchEnd::Interrupted
}

impl RunningCluster {
    /// Own the cluster until `cancel` or until every machine stopped: report machine events and
    /// console lines, answer control requests (a second `up`, `vm restart`), and with `watch`
    /// reload on each burst of edits. It blocks on the owner's channel between events (or until
    /// a burst of edits is over). Everything is stopped before it returns.
    pub fn own(
        &mut self,
        mut watch: Option<(&mut Watching, &UpRequest)>,
        cancel: &Cancel,
        on: &mut dyn FnMut(UpEvent<'_>),
    ) {
        let (state_dir, layout) = (self.state_dir.clone(), self.opts.layout.clone());
        let tx = self.tx.clone();
        let _interrupt = cancel.on_cancel(move || {
            let _ = tx.try_send(OwnerEvent::Interrupt);
        });
        if let Some((w, _)) = watch.as_mut() {
            w.feed(self.tx.clone());
        }
        while !cancel.is_set() && !self.done() {
            let due = watch.as_ref().and_then(|(w, _)| w.due_at());
            let mut changed = false;
            match self.next_event(due) {
                Some(OwnerEvent::Control(call)) => {
                    changed = self.serve_control(call, cancel, &mut |ev| report(ev, on));
                }
                Some(OwnerEvent::Edits(changes)) => {
                    if let Some((w, _)) = watch.as_mut() {
                        w.push(changes);
                    }
                }
                Some(OwnerEvent::Machine { event, .. }) => {
                    on(UpEvent::Machine(&event));
                }
                Some(ev) => report(&ev, on),
                None => {}
            }
            if let Some((w, req)) = watch.as_mut() {
                let mut owner = ReloadOwner::Local(self);
                changed |= w.reload_if_due(&layout, &state_dir, req, &mut owner, cancel, on);
            }
            if changed {
                on(UpEvent::PlanChanged(&self.plan));
            }
        }
        self.stop_with(&mut |ev| report(ev, on));
        if let Some((w, _)) = watch.as_mut() {
            w.stop_feed();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compose::Composition;

    fn composition(machines: &[(&str, &[u8])]) -> Composition {
        crate::compose::test_composition(machines)
    }

    fn names(p: &ClusterPlan) -> Vec<&str> {
        p.machines.iter().map(|m| m.machine.as_str()).collect()
    }

    #[test]
    fn narrowing_keeps_the_running_plan_of_machines_left_out() {
        let running = plan_cluster("c", &composition(&[("a", &[1]), ("b", &[1, 2])])).unwrap();
        let new = || {
            plan_cluster(
                "c",
                &composition(&[("a", &[1]), ("b", &[1, 2]), ("z", &[3])]),
            )
            .unwrap()
        };
        // (only, running?) → machines, vlans
        type Case<'a> = (&'a [&'a str], bool, &'a [&'a str], &'a [u8]);
        let cases: [Case; 5] = [
            (&[], true, &["a", "b", "z"], &[1, 2, 3]),
            (&[], false, &["a", "b", "z"], &[1, 2, 3]),
            (&["z"], true, &["a", "b", "z"], &[1, 2, 3]),
            (&["z"], false, &["z"], &[3]),
            (&["a"], true, &["a", "b"], &[1, 2]),
        ];
        for (only, with_running, want, vlans) in cases {
            let only: Vec<String> = only.iter().map(|s| s.to_string()).collect();
            let got = narrow(new(), &only, with_running.then_some(&running));
            assert_eq!(names(&got), want, "{only:?} {with_running}");
            assert_eq!(got.vlans, vlans, "{only:?} {with_running}");
        }
        // A machine left out keeps what it runs, not the new plan's settings.
        let mut changed = new();
        changed.machines[1].settings.memory_mib = 1024;
        let got = narrow(changed, &["a".into()], Some(&running));
        assert_eq!(got.machine("b").unwrap().settings.memory_mib, 256);
    }

    #[test]
    fn a_fresh_dry_run_creates_every_machine() {
        let plan = plan_cluster("c", &composition(&[("a", &[1]), ("b", &[])])).unwrap();
        let r = ReloadReport::fresh(&plan);
        assert!(r.dry_run && r.ok && r.apply_secs.is_none());
        assert_eq!(r.machines.len(), 2);
        assert!(
            r.machines
                .iter()
                .all(|m| m.planned.action == Action::Create && m.planned.from.is_none())
        );
    }

    #[test]
    fn errors_keep_their_exit_class() {
        let e: SessionError = ClusterError::Interrupted.into();
        assert!(e.is_interrupted() && !e.is_bad_input());
        let e: SessionError = ComposeError::NoSuchMachine {
            file: "/c/drydock.nix".into(),
            name: "sever".into(),
            has: vec!["agent".into(), "server".into()],
        }
        .into();
        assert!(e.is_bad_input() && !e.is_interrupted());
        assert!(
            e.to_string()
                .ends_with("/c/drydock.nix: the machine \"sever\" is not in the composition (it has agent, server)"),
            "{e}"
        );
    }
}
