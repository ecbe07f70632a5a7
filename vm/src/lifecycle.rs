//! A VM's life as its owner sees it: [`launch_vm`] is `vm run`, `vm restart` and `vm restore` in
//! one call (the `launcher`'s sequence, then the wait: in the foreground, start, wait until
//! ready, stay until it stops or Ctrl-C, stop it, end its run; detached, a supervisor owns it and
//! the call returns once it is ready, or once a snapshot is loaded), and [`supervise`] is that
//! supervisor. The caller prints what it is told ([`LaunchEvent`]); this module decides how the
//! launch ended ([`Ending`]). Every wait has a deadline or ends with `cancel`, and the VM is
//! stopped (powerdown → quit → SIGTERM → SIGKILL) on every path that gives it up.

use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use drydock_gc::Cancel;

use crate::console::{ConsoleOptions, ConsoleTail, WaitOutcome, follow};
use crate::launch::{LaunchError, LaunchRecord, POWERDOWN_GRACE, Vm, VmState, start, stop_remote};
use crate::launcher::{
    LaunchKind, LaunchPlan, Launcher, LauncherError, RESUME_DEADLINE, SupervisedLaunch, end_run,
};
use crate::owner::{OwnerError, end_vm_run, wait_running};
use crate::wait::ProcessWatch;

/// What a launch waits for.
#[derive(Debug, Clone, Default)]
pub struct WaitSpec {
    /// A console line that means "ready".
    pub ready: Option<regex::Regex>,
    /// Give up (stop the VM) after this long; without `ready`, stop it then.
    pub timeout: Option<Duration>,
}

/// How a launch ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// The VM stopped by itself (its exit status, if QEMU exited).
    Stopped(Option<ExitStatus>),
    /// It stopped before its ready line appeared.
    StoppedBeforeReady,
    /// The deadline passed (waiting for the ready line, if there was one); the VM was stopped.
    TimedOut,
    /// Ctrl-C / SIGTERM; the VM was stopped.
    Interrupted,
    /// Detached and ready: it runs on, owned by its supervisor.
    Running { qemu_pid: u32 },
}

/// The end of a launch and what was seen on the way.
#[derive(Debug, Clone)]
pub struct LaunchEnd {
    pub ending: Ending,
    /// The console line that matched `ready`.
    pub ready_line: Option<String>,
    /// From the start to the end.
    pub elapsed: Duration,
}

/// What can go wrong owning a VM (its console and guest problems are [`Ending`]s, not errors).
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    #[error(transparent)]
    Launcher(#[from] LauncherError),
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error(transparent)]
    Owner(#[from] OwnerError),
    #[error("cannot load the snapshot")]
    Snapshot(#[source] Box<crate::snapshot::SnapshotError>),
}

impl LifecycleError {
    pub fn is_bad_input(&self) -> bool {
        match self {
            Self::Launcher(e) => e.is_bad_input(),
            Self::Launch(e) => e.is_bad_input(),
            Self::Owner(e) => e.is_bad_input(),
            Self::Snapshot(e) => e.is_bad_input(),
        }
    }
}

/// How a launch is owned, and what it waits for.
#[derive(Debug, Clone, Default)]
pub struct LaunchOptions {
    /// A detached supervisor owns the VM; return once it is ready (a restore always is).
    pub detach: bool,
    /// A restore waits `timeout` (default 2 minutes) for the snapshot to load, not for a line.
    pub wait: WaitSpec,
}

/// What a launch has to say while it happens; the caller prints.
#[derive(Debug)]
pub enum LaunchEvent<'a> {
    /// Resolved and checked; the name is claimed and the VM started next.
    Planned(&'a LaunchPlan),
    /// A line of the guest's console.
    Console(&'a str),
    /// In the foreground: the ready line appeared, this long after QEMU started (detached, the
    /// launch ends there: [`Ending::Running`]).
    Ready { line: &'a str, after: Duration },
}

/// `vm run`, `vm restart`, `vm restore`: plan `kind` and carry it out with `launcher` (see the
/// `launcher` module), then own the VM as `opts` says until it ends (foreground) or is ready
/// (detached; a restore, always detached: its snapshot loaded and the guest running). `on` is
/// told what happens.
pub fn launch_vm(
    launcher: &Launcher,
    kind: LaunchKind,
    opts: &LaunchOptions,
    cancel: &Cancel,
    on: &mut dyn FnMut(LaunchEvent<'_>),
) -> Result<LaunchEnd, LifecycleError> {
    let plan = launcher.plan(kind)?;
    on(LaunchEvent::Planned(&plan));
    let restore = plan.is_restore();
    let claimed = launcher.claim(plan)?;
    let state_dir = &launcher.state_dir;
    if !(opts.detach || restore) {
        let (record, vm) = launcher.start_here(claimed, ConsoleOptions::default())?;
        return foreground(state_dir, &record, vm, &opts.wait, cancel, on);
    }
    let SupervisedLaunch {
        record,
        supervisor,
        state,
        since,
    } = launcher.start_supervised(claimed, cancel)?;
    if !restore {
        return detached(&record, &state, since, &opts.wait, cancel, on);
    }
    let deadline = opts.wait.timeout.unwrap_or(RESUME_DEADLINE);
    match wait_running(&record.spec.paths, supervisor, deadline, cancel) {
        Ok(state) => Ok(LaunchEnd {
            ending: Ending::Running {
                qemu_pid: state.qemu_pid,
            },
            ready_line: None,
            elapsed: since.elapsed(),
        }),
        Err(e) => {
            // It is stopped: its run ends (the supervisor may have ended it already).
            end_run(state_dir, &record);
            Err(e.into())
        }
    }
}

fn end_run_with(state_dir: &Path, record: &LaunchRecord, status: Option<ExitStatus>) {
    if let Err(e) = end_vm_run(state_dir, record, status.and_then(|s| s.code())) {
        tracing::warn!("{}", crate::error_chain(&e));
    }
}

/// Own the started VM in this process: follow its console until the ready line appears, then
/// stay with it until it stops, the deadline passes or `cancel` is set; then stop it and end
/// its run.
fn foreground(
    state_dir: &Path,
    record: &LaunchRecord,
    mut vm: Vm,
    wait: &WaitSpec,
    cancel: &Cancel,
    on: &mut dyn FnMut(LaunchEvent<'_>),
) -> Result<LaunchEnd, LifecycleError> {
    let started = Instant::now();
    let mut tail = ConsoleTail::new(vm.paths().console_log());
    let mut ready_line = None;
    let mut outcome = follow(
        &mut tail,
        wait.ready.as_ref(),
        wait.timeout,
        cancel,
        vm.qemu_exit(),
        &mut |l| {
            on(LaunchEvent::Console(l));
            true
        },
    );
    if let WaitOutcome::Ready(line) = &outcome {
        on(LaunchEvent::Ready {
            line,
            after: started.elapsed(),
        });
        ready_line = Some(line.clone());
        // Foreground: stay with the VM until it ends or Ctrl-C.
        outcome = follow(&mut tail, None, None, cancel, vm.qemu_exit(), &mut |l| {
            on(LaunchEvent::Console(l));
            true
        });
    }
    let status = vm.exited();
    vm.stop(POWERDOWN_GRACE)?;
    end_run_with(state_dir, record, status.or_else(|| vm.exited()));
    let ending = match outcome {
        WaitOutcome::Exited if wait.ready.is_some() && ready_line.is_none() => {
            Ending::StoppedBeforeReady
        }
        WaitOutcome::Exited | WaitOutcome::Ready(_) => Ending::Stopped(status),
        WaitOutcome::TimedOut => Ending::TimedOut,
        WaitOutcome::Cancelled => Ending::Interrupted,
    };
    Ok(LaunchEnd {
        ending,
        ready_line,
        elapsed: started.elapsed(),
    })
}

/// A supervisor owns the started VM (`state`): follow its console until it is ready (it then
/// runs on: [`Ending::Running`]); if it stops first, the deadline passes or `cancel` is set,
/// stop it.
fn detached(
    record: &LaunchRecord,
    state: &VmState,
    started: Instant,
    wait: &WaitSpec,
    cancel: &Cancel,
    on: &mut dyn FnMut(LaunchEvent<'_>),
) -> Result<LaunchEnd, LifecycleError> {
    let paths = &record.spec.paths;
    let mut tail = ConsoleTail::new(paths.console_log());
    // Until its QEMU exits (its pidfd), the ready line, the deadline or the cancel.
    let qemu = ProcessWatch::open(state.qemu_pid, state.qemu_start_ticks);
    let outcome = match &qemu {
        Some(q) => follow(
            &mut tail,
            wait.ready.as_ref(),
            wait.timeout,
            cancel,
            Some(q),
            &mut |l| {
                on(LaunchEvent::Console(l));
                true
            },
        ),
        None => WaitOutcome::Exited,
    };
    let ending = match outcome {
        WaitOutcome::Ready(line) => {
            return Ok(LaunchEnd {
                ending: Ending::Running {
                    qemu_pid: state.qemu_pid,
                },
                ready_line: Some(line),
                elapsed: started.elapsed(),
            });
        }
        WaitOutcome::TimedOut => Ending::TimedOut,
        WaitOutcome::Cancelled => Ending::Interrupted,
        WaitOutcome::Exited => Ending::StoppedBeforeReady,
    };
    stop_remote(paths, state, POWERDOWN_GRACE, false)?;
    Ok(LaunchEnd {
        ending,
        ready_line: None,
        elapsed: started.elapsed(),
    })
}

/// The supervisor's part (`__vm-supervise`): start the recorded launch of the VM `name` (with
/// this process's binary as its store server; with `snapshot`, load the snapshot in that folder
/// and resume the guest if asked, within two minutes), stay until QEMU exits or `cancel` is
/// set, then stop it and end its run. Returns QEMU's exit status, if it exited.
pub fn supervise(
    launcher: &Launcher,
    name: &str,
    snapshot: Option<(&Path, bool)>,
    cancel: &Cancel,
) -> Result<Option<ExitStatus>, LifecycleError> {
    let mut record = LaunchRecord::of_vm(&launcher.state_dir, name)?;
    if let Some(share) = &mut record.share {
        share.exe = launcher.exe.clone();
    }
    let incoming = snapshot
        .map(|(dir, resume)| crate::snapshot::Incoming::of_dir(dir, resume))
        .transpose()
        .map_err(|e| LifecycleError::Snapshot(Box::new(e)))?;
    let arg = incoming
        .as_ref()
        .map(crate::snapshot::Incoming::arg)
        .transpose()
        .map_err(|e| LifecycleError::Snapshot(Box::new(e)))?;
    let mut vm = start(&record.spec, record.share.as_ref(), arg.as_deref())?;
    tracing::info!(
        "supervising {} (QEMU pid {})",
        record.spec.name,
        vm.state.qemu_pid
    );
    if let Some(incoming) = &incoming {
        if let Err(e) = crate::snapshot::load_incoming(&mut vm, incoming, RESUME_DEADLINE) {
            vm.stop(Duration::ZERO)?;
            return Err(LifecycleError::Snapshot(Box::new(e)));
        }
        tracing::info!("{} loaded from its snapshot", record.spec.name);
    }
    // Until QEMU exits or the cancel wakes us: both are descriptors to block on.
    let (waker, woken) = crate::wait::wake_pair().map_err(|source| LaunchError::Files {
        path: vm.paths().dir.clone(),
        source,
    })?;
    let _wake = cancel.on_cancel(move || waker.wake());
    if let Some(q) = vm.qemu_exit() {
        use std::os::fd::AsFd;
        while !cancel.is_set() && !q.exited() {
            let _ = crate::wait::wait_readable(&[q.as_fd(), woken.as_fd()], None);
        }
    }
    let status = vm.exited();
    vm.stop(POWERDOWN_GRACE)?;
    end_run_with(&launcher.state_dir, &record, status.or_else(|| vm.exited()));
    Ok(status)
}
