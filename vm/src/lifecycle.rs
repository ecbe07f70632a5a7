//! A VM's life as its owner sees it, in one call per way of owning it: in the foreground (start,
//! wait until ready, stay until it stops or Ctrl-C, stop it, end its run), detached (a supervisor
//! owns it; return once it is ready), and as that supervisor. The caller prints; this module
//! decides how the launch ended ([`Ending`]). Every wait has a deadline or ends with `cancel`, and
//! the VM is stopped (powerdown → quit → SIGTERM → SIGKILL) on every path that gives it up.

use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use drydock_gc::Cancel;

use crate::console::{ConsoleTail, WaitOutcome, follow};
use crate::launch::{LaunchError, LaunchRecord, POWERDOWN_GRACE, start, stop_remote};
use crate::owner::{OwnerError, SupervisorCommand, end_vm_run, spawn_supervisor};
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
    Launch(#[from] LaunchError),
    #[error(transparent)]
    Owner(#[from] OwnerError),
    #[error("cannot load the snapshot")]
    Snapshot(#[source] Box<crate::snapshot::SnapshotError>),
}

impl LifecycleError {
    pub fn is_bad_input(&self) -> bool {
        match self {
            Self::Launch(e) => e.is_bad_input(),
            Self::Owner(e) => e.is_bad_input(),
            Self::Snapshot(e) => e.is_bad_input(),
        }
    }
}

fn end_run(state_dir: &Path, record: &LaunchRecord, status: Option<ExitStatus>) {
    if let Err(e) = end_vm_run(state_dir, record, status.and_then(|s| s.code())) {
        tracing::warn!("{}", crate::error_chain(&e));
    }
}

/// Own the VM in this process: start it, follow its console (`echo` gets every line;
/// `on_ready` is called once the ready line appears), and stay with it until it stops, the
/// deadline passes or `cancel` is set; then stop it and end its run.
pub fn run_foreground(
    state_dir: &Path,
    record: &LaunchRecord,
    wait: &WaitSpec,
    cancel: &Cancel,
    echo: &mut dyn FnMut(&str),
    on_ready: &mut dyn FnMut(&str, Duration),
) -> Result<LaunchEnd, LifecycleError> {
    let mut vm = start(&record.spec, record.share.as_ref(), None)?;
    let started = Instant::now();
    let mut tail = ConsoleTail::new(vm.paths().console_log());
    let mut ready_line = None;
    let echo = &mut |l: &str| {
        echo(l);
        true
    };
    let mut outcome = follow(
        &mut tail,
        wait.ready.as_ref(),
        wait.timeout,
        cancel,
        vm.qemu_exit(),
        echo,
    );
    if let WaitOutcome::Ready(line) = &outcome {
        let after = started.elapsed();
        on_ready(line, after);
        ready_line = Some(line.clone());
        // Foreground: stay with the VM until it ends or Ctrl-C.
        outcome = follow(&mut tail, None, None, cancel, vm.qemu_exit(), echo);
    }
    let status = vm.exited();
    vm.stop(POWERDOWN_GRACE)?;
    end_run(state_dir, record, status.or_else(|| vm.exited()));
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

/// Start the VM under a detached supervisor and follow its console until it is ready (it then
/// runs on: [`Ending::Running`]); if it stops first, the deadline passes or `cancel` is set, stop
/// it.
pub fn run_detached(
    sup: &SupervisorCommand<'_>,
    record: &LaunchRecord,
    wait: &WaitSpec,
    cancel: &Cancel,
    echo: &mut dyn FnMut(&str),
) -> Result<LaunchEnd, LifecycleError> {
    let paths = &record.spec.paths;
    let started = Instant::now();
    let (_, state) = spawn_supervisor(sup, paths, cancel)?;
    let mut tail = ConsoleTail::new(paths.console_log());
    let qemu = ProcessWatch::open(state.qemu_pid, state.qemu_start_ticks);
    let echo = &mut |l: &str| {
        echo(l);
        true
    };
    let outcome = match &qemu {
        Some(q) => follow(
            &mut tail,
            wait.ready.as_ref(),
            wait.timeout,
            cancel,
            Some(q),
            echo,
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
    stop_remote(paths, &state, POWERDOWN_GRACE, false)?;
    Ok(LaunchEnd {
        ending,
        ready_line: None,
        elapsed: started.elapsed(),
    })
}

/// The supervisor's part (`__vm-supervise`): start the recorded launch (with `incoming`, load
/// the snapshot `(uri, tag)` and resume it, within two minutes), stay until QEMU exits or
/// `cancel` is set, then stop it and end its run. Returns QEMU's exit status, if it exited.
pub fn supervise(
    state_dir: &Path,
    record: &LaunchRecord,
    incoming: Option<(&str, &str)>,
    cancel: &Cancel,
) -> Result<Option<ExitStatus>, LifecycleError> {
    let mut vm = start(
        &record.spec,
        record.share.as_ref(),
        incoming.map(|(uri, _)| uri),
    )?;
    tracing::info!(
        "supervising {} (QEMU pid {})",
        record.spec.name,
        vm.state.qemu_pid
    );
    if let Some((_, tag)) = incoming {
        if let Err(e) = crate::snapshot::resume_incoming(&mut vm, tag, Duration::from_secs(120)) {
            vm.stop(Duration::ZERO)?;
            return Err(LifecycleError::Snapshot(Box::new(e)));
        }
        tracing::info!("{} resumed from its snapshot", record.spec.name);
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
    end_run(state_dir, record, status.or_else(|| vm.exited()));
    Ok(status)
}
