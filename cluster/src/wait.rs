//! `wait`: until a machine's console prints a matching line, or until a command succeeds in
//! it (retried once a second, like the NixOS test driver's `wait_until_succeeds`; a try that the
//! guest's backdoor restarting cut short counts as one that failed). Both have a deadline and
//! report what they saw last, so a wait that gives up says why.

use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use drydock_gc::{Cancel, Deadline};

use serde::Serialize;

use crate::exec::exec_remote;
use crate::state::ClusterError;
use drydock_vm::VmPaths;
use drydock_vm::{ConsoleTail, WaitOutcome};

/// The pause between two tries of `--succeeds`.
const RETRY: Duration = Duration::from_secs(1);
/// How many of the last console lines a `--console` wait that gave up reports.
const LAST_LINES: usize = 20;

/// What a wait waits for.
#[derive(Debug, Clone)]
pub enum WaitFor {
    /// A console line (since the machine booted) matching this expression.
    Console(regex::Regex),
    /// This command exits 0 in the guest.
    Succeeds(String),
}

/// How a wait ended.
#[derive(Debug, Clone, Serialize)]
pub struct WaitReport {
    pub vm: String,
    /// Whether the condition was met before the deadline.
    pub met: bool,
    pub after_secs: f64,
    /// `--succeeds`: how many times the command ran.
    pub tries: u32,
    /// `--console`: the matching line; when not met, the last lines seen.
    pub lines: Vec<String>,
    /// `--succeeds`: the last try's status and outputs (lossy text).
    pub last_status: Option<i32>,
    pub last_stdout: Option<String>,
    pub last_stderr: Option<String>,
}

/// Wait for `what` on the VM `vm` (folder `paths`) for at most `timeout`. `Err` only when the
/// wait itself cannot be made (no such machine up, a broken backdoor); an unmet condition is a
/// report with `met: false`. `cancel` ends it early, as not met.
pub fn wait(
    vm: &str,
    paths: &VmPaths,
    what: &WaitFor,
    timeout: Duration,
    cancel: &Cancel,
) -> Result<WaitReport, ClusterError> {
    let started = Instant::now();
    let deadline = Deadline::after(timeout);
    let mut report = WaitReport {
        vm: vm.to_string(),
        met: false,
        after_secs: 0.0,
        tries: 0,
        lines: Vec::new(),
        last_status: None,
        last_stdout: None,
        last_stderr: None,
    };
    match what {
        WaitFor::Console(re) => {
            if !drydock_vm::VmState::read(paths).is_some_and(|s| s.qemu_alive()) {
                return Err(ClusterError::NoExec(vm.to_string()));
            }
            let mut tail = ConsoleTail::with_rotated(paths.console_log());
            let mut last: std::collections::VecDeque<String> = Default::default();
            // A machine restarted meanwhile (`vm restart`) is waited for across its restart:
            // its QEMU going away does not end the wait.
            let outcome = drydock_vm::follow(
                &mut tail,
                Some(re),
                Some(timeout),
                cancel,
                None,
                &mut |line| {
                    last.push_back(line.to_string());
                    if last.len() > LAST_LINES {
                        last.pop_front();
                    }
                    true
                },
            );
            match outcome {
                WaitOutcome::Ready(line) => {
                    report.met = true;
                    report.lines = vec![line];
                }
                _ => report.lines = last.into(),
            }
        }
        WaitFor::Succeeds(cmd) => loop {
            let left = deadline.remaining();
            report.tries += 1;
            match exec_remote(
                vm,
                paths,
                cmd,
                left.max(Duration::from_secs(1)),
                Some(cancel),
            ) {
                Ok(o) => {
                    report.last_status = Some(o.status);
                    report.last_stdout = Some(String::from_utf8_lossy(&o.stdout).into_owned());
                    report.last_stderr = Some(String::from_utf8_lossy(&o.stderr).into_owned());
                    if o.status == 0 {
                        report.met = true;
                        break;
                    }
                }
                // The guest's backdoor restarted under the try: a try that did not succeed (it
                // says why); the next one goes to the new shell.
                Err(e @ ClusterError::Restarted { .. }) => {
                    report.last_status = None;
                    report.last_stdout = None;
                    report.last_stderr = Some(e.to_string());
                }
                Err(ClusterError::Interrupted) => break,
                Err(e) => return Err(e),
            }
            if deadline.remaining() <= RETRY || cancel.is_set() {
                break;
            }
            // The pause between tries, which only the cancel ends early.
            if let Ok((w, woken)) = drydock_vm::wake_pair() {
                let _woken = cancel.on_cancel(move || w.wake());
                let _ = drydock_vm::wait_readable(&[woken.as_fd()], Some(Deadline::after(RETRY)));
            }
        },
    }
    report.after_secs = started.elapsed().as_secs_f64();
    Ok(report)
}
