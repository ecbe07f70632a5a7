//! Waiting for a child process to exit as a blocking wait with a deadline, instead of polling
//! `try_wait`: a thread blocks in `waitid` without reaping the child and says so on a channel,
//! which the caller waits on with `recv_timeout`. The caller keeps the child: it may still
//! signal it (its pid stays reserved until it is reaped) and reaps it with `Child::wait`.

use std::process::Child;
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};

use crate::deadline::Deadline;

/// A watch on one child's exit.
#[derive(Debug)]
pub struct ExitWatch {
    exited: Receiver<()>,
}

impl ExitWatch {
    /// Start watching `child`, which must not be reaped before the watch reports (or be
    /// killed and reaped by the caller, which also ends the watch).
    pub fn start(child: &Child) -> Self {
        let pid = child.id();
        let (tx, exited) = channel();
        std::thread::spawn(move || {
            if let Err(e) = crate::sys::wait_exited(pid) {
                tracing::debug!("waiting for process {pid}: {e}");
            }
            // The caller may have stopped waiting; then nobody listens.
            let _ = tx.send(());
        });
        Self { exited }
    }

    /// Wait until the child has exited (`true`, then `Child::wait` returns at once) or
    /// `deadline` has passed (`false`).
    pub fn wait_until(&self, deadline: Deadline) -> bool {
        match self.exited.recv_timeout(deadline.remaining()) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => true,
            Err(RecvTimeoutError::Timeout) => false,
        }
    }

    /// Wait until the child has exited, however long that takes.
    pub fn wait(&self) {
        let _ = self.exited.recv();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    use std::time::Duration;

    /// Set in the environment of [`child`]'s process: it sleeps this many seconds.
    const SLEEP_VAR: &str = "DRYDOCK_GC_TEST_CHILD_SLEEP";

    /// A child that runs no other program: this test binary itself, running only
    /// [`child_process`], which sleeps `secs` seconds there. Also used by `sys`'s tests.
    pub(crate) fn child(secs: u64) -> Child {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child::tests::child_process", "--nocapture"])
            .env(SLEEP_VAR, secs.to_string())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    }

    /// The body of [`child`]'s process (in the test run itself it returns at once).
    #[test]
    fn child_process() {
        if let Ok(secs) = std::env::var(SLEEP_VAR) {
            std::thread::sleep(Duration::from_secs(secs.parse().unwrap()));
        }
    }

    #[test]
    fn an_exited_child_is_reported_and_left_for_wait() {
        let mut c = child(0);
        let w = ExitWatch::start(&c);
        assert!(w.wait_until(Deadline::after(Duration::from_secs(60))));
        // Not reaped by the watch: the status is still there.
        assert!(c.try_wait().unwrap().unwrap().success());
    }

    #[test]
    fn a_running_child_outlasts_the_deadline_and_a_kill_ends_the_watch() {
        let mut c = child(60);
        let w = ExitWatch::start(&c);
        let start = std::time::Instant::now();
        assert!(!w.wait_until(Deadline::after(Duration::from_millis(200))));
        assert!(start.elapsed() >= Duration::from_millis(200));
        assert!(c.try_wait().unwrap().is_none());
        c.kill().unwrap();
        assert!(w.wait_until(Deadline::after(Duration::from_secs(60))));
        c.wait().unwrap();
    }
}
