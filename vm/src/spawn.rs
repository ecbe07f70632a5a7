//! The one place where drydock starts processes (the store server, QEMU, the detached VM
//! supervisor, and short-lived helpers such as `qemu-img` or `nix-build`), and the rules they
//! all follow:
//!
//! - every child gets `PR_SET_PDEATHSIG = SIGKILL` between fork and exec, so if drydock dies —
//!   even by SIGKILL — its children die too (spawn from a long-lived thread: the signal follows
//!   the spawning *thread*);
//! - readiness is a line the child prints on its stdout, awaited with a deadline;
//! - stopping is SIGTERM, then SIGKILL once a grace period has passed, and always a reap; dropping
//!   a [`Supervised`] stops it the same way, so no child outlives its handle;
//! - a short-lived helper ([`run_captured`]) has a deadline and is killed, with everything it
//!   started (its process group: `nix` and the `ssh` it runs), when it overruns;
//! - only [`spawn_detached`] makes a process that outlives drydock (a VM left running on purpose).

use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsFd;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use drydock_gc::{Cancel, Deadline};

use crate::console::LogWatch;
use crate::sys::proc as sysproc;
use crate::wait::{ProcessWatch, wait_readable, wake_pair};

/// How long [`Supervised`]'s `Drop` waits after SIGTERM before it sends SIGKILL.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

/// Why a helper process could not be started, did not become ready, or could not be stopped.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The program could not be executed (missing, not executable, ...).
    #[error("cannot start {name} ({program})")]
    Start {
        name: String,
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// The child exited before it said it was ready.
    #[error("{name} exited before it was ready ({status})")]
    ExitedEarly { name: String, status: ExitStatus },
    /// The child did not say it was ready within the deadline (it has been stopped).
    #[error("{name} was not ready after {waited:?}")]
    NotReady { name: String, waited: Duration },
    /// The child printed something other than the expected readiness line.
    #[error("{name} printed {line:?} instead of {expected:?}")]
    UnexpectedOutput {
        name: String,
        line: String,
        expected: String,
    },
    /// Waiting for, or signalling, the child failed.
    #[error("cannot control {name} (pid {pid})")]
    Control {
        name: String,
        pid: u32,
        #[source]
        source: std::io::Error,
    },
}

impl SpawnError {
    /// True when the caller asked for something that cannot work (a program that does not
    /// exist), as opposed to a failure of the child or of the host.
    pub fn is_bad_input(&self) -> bool {
        matches!(self, SpawnError::Start { source, .. }
            if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// A child process that dies with drydock and is stopped (SIGTERM, then SIGKILL) and reaped when
/// its handle is dropped.
#[derive(Debug)]
pub struct Supervised {
    name: String,
    child: Child,
    stdout: Option<ChildStdout>,
    status: Option<ExitStatus>,
}

impl Supervised {
    /// Start `cmd` as a supervised child named `name` (for messages). Its stdout is a pipe read by
    /// [`Supervised::wait_ready`]; stdin and stderr are whatever `cmd` says (inherited by default).
    pub fn spawn(name: &str, mut cmd: Command) -> Result<Self, SpawnError> {
        cmd.stdout(Stdio::piped());
        sysproc::die_with_parent(&mut cmd);
        let mut child = cmd.spawn().map_err(|source| SpawnError::Start {
            name: name.to_owned(),
            program: cmd.get_program().to_string_lossy().into_owned(),
            source,
        })?;
        let stdout = child.stdout.take();
        tracing::debug!(name, pid = child.id(), "started");
        Ok(Self {
            name: name.to_owned(),
            child,
            stdout,
            status: None,
        })
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child's stdin, if `cmd` asked for a pipe.
    pub fn stdin(&mut self) -> Option<std::process::ChildStdin> {
        self.child.stdin.take()
    }

    /// Wait until the child prints `expected` as a whole line on its stdout. Fails if it exits
    /// first, prints something else first, or says nothing within `timeout`; on failure the child
    /// is stopped before this returns.
    pub fn wait_ready(&mut self, expected: &str, timeout: Duration) -> Result<(), SpawnError> {
        let result = self.read_ready_line(expected, timeout);
        if result.is_err() {
            let _ = self.stop(Duration::from_secs(1));
        }
        result
    }

    fn read_ready_line(&mut self, expected: &str, timeout: Duration) -> Result<(), SpawnError> {
        let Some(stdout) = self.stdout.take() else {
            return Err(self.not_ready(Duration::ZERO));
        };
        let start = Instant::now();
        let (tx, rx) = mpsc::channel();
        // The reader thread owns the pipe; it ends when the line arrives or the child closes its
        // stdout (exit). If we give up first, it is left blocked on a pipe that the stop below
        // closes by killing the child.
        std::thread::Builder::new()
            .name(format!("{}-ready", self.name))
            .spawn(move || {
                let mut line = String::new();
                let res = BufReader::new(stdout)
                    .read_line(&mut line)
                    .map(|n| (n, line));
                let _ = tx.send(res);
            })
            .map_err(|source| self.control(source))?;
        match rx.recv_timeout(timeout) {
            Ok(Ok((n, line))) if n > 0 => {
                let line = line.trim_end_matches('\n');
                if line == expected {
                    tracing::debug!(name = %self.name, waited = ?start.elapsed(), "ready");
                    Ok(())
                } else {
                    Err(SpawnError::UnexpectedOutput {
                        name: self.name.clone(),
                        line: line.to_owned(),
                        expected: expected.to_owned(),
                    })
                }
            }
            // EOF or read error: the child closed stdout, almost always by exiting.
            Ok(_) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = self.child.wait().map_err(|source| self.control(source))?;
                self.status = Some(status);
                Err(SpawnError::ExitedEarly {
                    name: self.name.clone(),
                    status,
                })
            }
            Err(mpsc::RecvTimeoutError::Timeout) => Err(self.not_ready(start.elapsed())),
        }
    }

    /// The exit status if the child has exited (reaping it), `None` while it runs.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, SpawnError> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .map_err(|source| self.control(source))?;
        }
        Ok(self.status)
    }

    /// Wait until the child exits (its status, reaping it) or `deadline` passes (`None`).
    pub fn wait_until(&mut self, deadline: Deadline) -> Result<Option<ExitStatus>, SpawnError> {
        if let Some(status) = self.try_wait()? {
            return Ok(Some(status));
        }
        if let Some(w) = ProcessWatch::child(self.pid()) {
            w.wait(deadline);
        }
        self.try_wait()
    }

    /// The child's exit as a descriptor to wait on with others (`None` if it has exited).
    pub fn exit_watch(&self) -> Option<ProcessWatch> {
        ProcessWatch::child(self.pid())
    }

    /// Stop the child: SIGTERM, wait up to `grace`, then SIGKILL; always reaps. Returns how it
    /// ended. Stopping an already exited child just returns its status.
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus, SpawnError> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        let pid = self.pid();
        // The child is unreaped here, so its pid cannot have been reused.
        let exit = ProcessWatch::child(pid);
        match drydock_gc::send_signal(pid, libc::SIGTERM) {
            Err(e) if e.raw_os_error() != Some(libc::ESRCH) => return Err(self.control(e)),
            _ => {}
        }
        if let Some(w) = &exit {
            w.wait(Deadline::after(grace));
        }
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        tracing::warn!(name = %self.name, pid, ?grace, "did not stop on SIGTERM; killing");
        self.child.kill().map_err(|source| self.control(source))?;
        let status = self.child.wait().map_err(|source| self.control(source))?;
        self.status = Some(status);
        Ok(status)
    }

    /// True if `status` is how a child stopped by [`Supervised::stop`] normally ends: a zero exit
    /// or death by the SIGTERM it was sent.
    pub fn is_clean_stop(status: &ExitStatus) -> bool {
        status.success() || status.signal() == Some(libc::SIGTERM)
    }

    fn control(&self, source: std::io::Error) -> SpawnError {
        SpawnError::Control {
            name: self.name.clone(),
            pid: self.pid(),
            source,
        }
    }

    fn not_ready(&self, waited: Duration) -> SpawnError {
        SpawnError::NotReady {
            name: self.name.clone(),
            waited,
        }
    }
}

impl Drop for Supervised {
    fn drop(&mut self) {
        if let Err(e) = self.stop(DEFAULT_GRACE) {
            tracing::warn!(name = %self.name, "stopping on drop failed: {e}");
        }
    }
}

/// drydock itself (`exe`) with the global options a detached helper needs to find the same
/// state and store: `--state-dir DIR [--store ROOT]`; the subcommand and its arguments follow.
pub fn drydock_command(exe: &Path, state_dir: &Path, store_root: Option<&Path>) -> Command {
    let mut cmd = Command::new(exe);
    cmd.arg("--state-dir").arg(state_dir);
    if let Some(root) = store_root {
        cmd.arg("--store").arg(root);
    }
    cmd
}

/// How a wait for a detached process to report in ended.
#[derive(Debug)]
pub enum Awaited<T> {
    Ready(T),
    /// The process exited first (its log says why).
    Died,
    /// The deadline passed, or the wait was cancelled; the process is left to the caller.
    Late,
}

/// A process started by [`spawn_detached`]: its pid, its exit to wait on, and how it ended
/// once it has (it is reaped by a thread of ours while we run).
#[derive(Debug)]
pub struct DetachedChild {
    pub pid: u32,
    exit: Option<ProcessWatch>,
    status: mpsc::Receiver<ExitStatus>,
}

impl DetachedChild {
    /// How it ended, once it has (waiting at most until `deadline` for its reaper).
    pub fn status(&self, deadline: Deadline) -> Option<ExitStatus> {
        self.status.recv_timeout(deadline.remaining()).ok()
    }

    /// Whether it has exited (never blocks).
    pub fn exited(&self) -> bool {
        self.exit.as_ref().is_none_or(ProcessWatch::exited)
    }
}

/// Wait until `ready` gives a value, the process `pid` exits, `within` passes or `cancel` is
/// set, whichever comes first. `ready` reads what the process writes to `report` (a file it
/// writes whole, by rename): it is asked again each time that file changes, blocking meanwhile.
pub fn await_report<T>(
    pid: u32,
    within: Duration,
    report: &Path,
    cancel: &Cancel,
    mut ready: impl FnMut() -> Option<T>,
) -> Awaited<T> {
    let deadline = Deadline::after(within);
    let exit = ProcessWatch::open(pid, None);
    let mut watch = LogWatch::new();
    watch.add(report);
    let wake = wake_pair().ok();
    let _woken = wake.as_ref().map(|(w, _)| {
        let w = w.clone();
        cancel.on_cancel(move || w.wake())
    });
    loop {
        if let Some(v) = ready() {
            return Awaited::Ready(v);
        }
        if exit.as_ref().is_none_or(ProcessWatch::exited) {
            // It may have reported just before it died.
            return match ready() {
                Some(v) => Awaited::Ready(v),
                None => Awaited::Died,
            };
        }
        if deadline.expired() || cancel.is_set() {
            return Awaited::Late;
        }
        let mut also = Vec::new();
        also.extend(exit.as_ref().map(|w| w.as_fd()));
        also.extend(wake.as_ref().map(|(_, fd)| fd.as_fd()));
        if let Err(e) = watch.wait(&also, Some(deadline)) {
            tracing::warn!("waiting for {}: {e}", report.display());
            return Awaited::Late;
        }
    }
}

/// Start a process that outlives this one: a new session, no parent-death signal, stdin from
/// /dev/null and stdout/stderr to `log`. It is reaped by a thread of ours while we run (so no
/// zombie lingers), by init after.
pub fn spawn_detached(
    name: &str,
    cmd: Command,
    log: std::fs::File,
) -> Result<DetachedChild, SpawnError> {
    detach(name, cmd, log, Stdio::null())
}

/// [`spawn_detached`] with `held` as the child's stdin: an open file whose `flock` the child
/// then holds too (the same open file), so a lock is handed over without a moment unheld.
pub fn spawn_detached_holding(
    name: &str,
    cmd: Command,
    log: std::fs::File,
    held: std::fs::File,
) -> Result<DetachedChild, SpawnError> {
    detach(name, cmd, log, Stdio::from(held))
}

fn detach(
    name: &str,
    mut cmd: Command,
    log: std::fs::File,
    stdin: Stdio,
) -> Result<DetachedChild, SpawnError> {
    let err_log = log.try_clone().map_err(|source| SpawnError::Start {
        name: name.to_owned(),
        program: cmd.get_program().to_string_lossy().into_owned(),
        source,
    })?;
    cmd.stdin(stdin).stdout(log).stderr(err_log);
    crate::sys::daemon::new_session(&mut cmd);
    let child = cmd.spawn().map_err(|source| SpawnError::Start {
        name: name.to_owned(),
        program: cmd.get_program().to_string_lossy().into_owned(),
        source,
    })?;
    let pid = child.id();
    // Watched before the reaper can reap it: the pid is still the child's.
    let exit = ProcessWatch::child(pid);
    let (tx, status) = mpsc::channel();
    std::thread::spawn(move || {
        let mut child = child;
        if let Ok(s) = child.wait() {
            let _ = tx.send(s);
        }
    });
    tracing::debug!(name, pid, "started detached");
    Ok(DetachedChild { pid, exit, status })
}

// ---- Short-lived helpers: run to completion with a deadline, output captured. ----

/// What a finished (or killed) child left behind.
#[derive(Debug, Clone)]
pub struct Captured {
    /// `None` when the child was killed at the deadline or by a signal.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
    /// Killed because the caller was interrupted.
    pub cancelled: bool,
}

/// Run `cmd` to completion or until `deadline` passes (then SIGKILL it and its process group:
/// a grandchild such as Nix's `ssh` would otherwise hold the output pipes open).
pub fn run_captured(cmd: Command, deadline: Duration) -> std::io::Result<Captured> {
    run_captured_until(cmd, deadline, None)
}

/// [`run_captured`], also killed (with its process group) as soon as `cancel` is set.
pub fn run_captured_until(
    mut cmd: Command,
    deadline: Duration,
    cancel: Option<&Cancel>,
) -> std::io::Result<Captured> {
    use std::os::unix::process::CommandExt;
    let deadline = Deadline::after(deadline);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    sysproc::die_with_parent(&mut cmd);
    let mut child = cmd.spawn()?;
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        s
    });
    let exit = ProcessWatch::child(child.id());
    let wake = wake_pair()?;
    let _woken = cancel.map(|c| {
        let w = wake.0.clone();
        c.on_cancel(move || w.wake())
    });
    let mut cancelled = false;
    let (status, timed_out) = loop {
        if let Some(st) = child.try_wait()? {
            break (Some(st), false);
        }
        cancelled = cancel.is_some_and(Cancel::is_set);
        if cancelled || deadline.expired() {
            let _ = sysproc::signal_group(child.id(), libc::SIGKILL);
            let _ = child.kill();
            let _ = child.wait();
            break (None, !cancelled);
        }
        let mut fds = vec![wake.1.as_fd()];
        fds.extend(exit.as_ref().map(|w| w.as_fd()));
        wait_readable(&fds, Some(deadline))?;
    };
    let stdout = String::from_utf8_lossy(&out_t.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
    Ok(Captured {
        code: status.and_then(|s| s.code()),
        stdout,
        stderr,
        timed_out,
        cancelled,
    })
}

/// Find a program on `PATH`.
pub(crate) fn which(program: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script);
        cmd
    }

    #[test]
    fn ready_line_is_awaited_and_stop_terminates() {
        let mut child = Supervised::spawn("t", sh("echo ready; exec sleep 60")).unwrap();
        child.wait_ready("ready", Duration::from_secs(10)).unwrap();
        assert_eq!(child.try_wait().unwrap(), None, "still running");
        let status = child.stop(Duration::from_secs(10)).unwrap();
        assert_eq!(status.signal(), Some(libc::SIGTERM));
        assert!(Supervised::is_clean_stop(&status));
    }

    #[test]
    fn early_exit_is_reported_with_status() {
        let mut child = Supervised::spawn("t", sh("exit 3")).unwrap();
        let err = child
            .wait_ready("ready", Duration::from_secs(10))
            .unwrap_err();
        match err {
            SpawnError::ExitedEarly { status, .. } => assert_eq!(status.code(), Some(3)),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn wrong_line_and_silence_are_errors_and_the_child_is_stopped() {
        let mut child = Supervised::spawn("t", sh("echo hello; exec sleep 60")).unwrap();
        let err = child
            .wait_ready("ready", Duration::from_secs(10))
            .unwrap_err();
        assert!(matches!(err, SpawnError::UnexpectedOutput { ref line, .. } if line == "hello"));
        assert!(child.try_wait().unwrap().is_some(), "stopped after failure");

        let mut child = Supervised::spawn("t", sh("exec sleep 60")).unwrap();
        let err = child
            .wait_ready("ready", Duration::from_millis(200))
            .unwrap_err();
        assert!(matches!(err, SpawnError::NotReady { .. }), "{err:?}");
        assert!(child.try_wait().unwrap().is_some(), "stopped after failure");
    }

    #[test]
    fn sigterm_ignoring_child_is_killed_after_grace() {
        let mut child = Supervised::spawn(
            "t",
            sh("trap '' TERM; echo ready; while :; do sleep 1; done"),
        )
        .unwrap();
        child.wait_ready("ready", Duration::from_secs(10)).unwrap();
        let status = child.stop(Duration::from_millis(200)).unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }

    #[test]
    fn missing_program_is_bad_input() {
        let err = Supervised::spawn("t", Command::new("/nonexistent/drydock-helper")).unwrap_err();
        assert!(err.is_bad_input(), "{err:?}");
    }
}

#[cfg(test)]
mod captured_tests {
    use super::*;

    #[test]
    fn captures_output_and_code() {
        let mut c = Command::new("sh");
        c.args(["-c", "echo out; echo err >&2; exit 3"]);
        let r = run_captured(c, Duration::from_secs(10)).unwrap();
        assert_eq!(r.code, Some(3));
        assert_eq!(r.stdout, "out\n");
        assert_eq!(r.stderr, "err\n");
        assert!(!r.timed_out);
    }

    #[test]
    fn kills_at_the_deadline() {
        let mut c = Command::new("sleep");
        c.arg("30");
        let start = Instant::now();
        let r = run_captured(c, Duration::from_millis(200)).unwrap();
        assert!(r.timed_out);
        assert_eq!(r.code, None);
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn the_deadline_kills_grandchildren_too() {
        // A grandchild holding stdout open must not keep the caller waiting.
        let start = Instant::now();
        let mut c = Command::new("sh");
        c.args(["-c", "sleep 30 & sleep 30"]);
        let r = run_captured(c, Duration::from_millis(200)).unwrap();
        assert!(r.timed_out);
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn which_finds_sh() {
        assert!(which("sh").is_some());
        assert!(which("definitely-not-a-program-drydock").is_none());
    }
}
