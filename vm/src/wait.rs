//! Blocking waits with deadlines, on what std cannot wait for together: several descriptors at
//! once (sockets, pipes, inotify), a process's exit (a pidfd, for any process this one may see)
//! and a one-shot wake-up ([`Waker`]) that a stop flag or a signal handler fires. A thread that
//! has nothing to do blocks here until something happens or its deadline passes, instead of
//! looking every few milliseconds.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};

use drydock_gc::Deadline;

use crate::sys::poll::{pidfd_open, poll_readable, poll_ready};
use crate::sys::proc::same_process_alive;

/// Wait until one of `fds` is readable (or hung up), or `deadline` (none: no limit) passes.
/// Which are readable, in `fds`' order; all `false` once the deadline has passed. A wait
/// interrupted by a signal returns early with all `false`: callers loop until their deadline.
pub fn wait_readable(fds: &[BorrowedFd<'_>], deadline: Option<Deadline>) -> io::Result<Vec<bool>> {
    match deadline {
        Some(d) => poll_readable(fds, Some(d.remaining())),
        None => poll_readable(fds, None),
    }
}

/// Wait until one of `fds` is ready, each for reading (`false`) or for writing (`true`: a
/// socket with room to send; hung up or in error counts as ready), or `deadline` (none: no
/// limit) passes. Which are ready, in `fds`' order; all `false` once the deadline has passed or
/// a signal interrupted the wait (callers loop until their deadline).
pub fn wait_ready(
    fds: &[(BorrowedFd<'_>, bool)],
    deadline: Option<Deadline>,
) -> io::Result<Vec<bool>> {
    poll_ready(fds, deadline.map(|d| d.remaining()))
}

/// An I/O error that means "try again" (a non-blocking call that would block, a timed-out or
/// interrupted one).
pub fn retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// Whether `fd` is readable now (never blocks).
pub fn readable_now(fd: BorrowedFd<'_>) -> bool {
    poll_readable(&[fd], Some(std::time::Duration::ZERO))
        .map(|r| r[0])
        .unwrap_or(false)
}

/// Fires a [`WakeFd`] once: its descriptor is readable for good afterwards. Dropping every
/// `Waker` of a pair fires it too (the pipe's writing end closes), so a wait never outlives
/// whoever could wake it.
#[derive(Debug, Clone)]
pub struct Waker(Arc<Mutex<Option<std::io::PipeWriter>>>);

/// The side of a wake-up pair that waits include among their descriptors.
#[derive(Debug)]
pub struct WakeFd(std::io::PipeReader);

/// A new wake-up pair.
pub fn wake_pair() -> io::Result<(Waker, WakeFd)> {
    let (r, w) = std::io::pipe()?;
    Ok((Waker(Arc::new(Mutex::new(Some(w)))), WakeFd(r)))
}

impl Waker {
    /// Fire (idempotent; never blocks).
    pub fn wake(&self) {
        drop(self.0.lock().unwrap_or_else(PoisonError::into_inner).take());
    }
}

impl WakeFd {
    /// Whether it was fired.
    pub fn is_woken(&self) -> bool {
        readable_now(self.0.as_fd())
    }
}

impl AsFd for WakeFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

/// A process's exit as a descriptor (a pidfd): readable once the process has exited.
#[derive(Debug)]
pub struct ProcessWatch {
    pid: u32,
    fd: OwnedFd,
}

impl ProcessWatch {
    /// Watch the process `pid`, if it is still the one that started at `start_ticks` (when
    /// known): `None` if it is gone (or its pid belongs to another process now).
    pub fn open(pid: u32, start_ticks: Option<u64>) -> Option<Self> {
        let fd = pidfd_open(pid).ok()?;
        // Opened first, checked after: the descriptor names whatever had the pid at the open,
        // and that is the process we want only if it still is after.
        same_process_alive(pid, start_ticks).then_some(Self { pid, fd })
    }

    /// Watch the child `pid` of this process, not yet reaped (its pid is its own until it is
    /// reaped, so no start time is needed; one that is exiting or exited is watched too, and
    /// reads as exited).
    pub fn child(pid: u32) -> Option<Self> {
        let fd = pidfd_open(pid).ok()?;
        Some(Self { pid, fd })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the process has exited (never blocks).
    pub fn exited(&self) -> bool {
        readable_now(self.fd.as_fd())
    }

    /// Wait until the process has exited (`true`) or `deadline` passes (`false`).
    pub fn wait(&self, deadline: Deadline) -> bool {
        loop {
            match wait_readable(&[self.fd.as_fd()], Some(deadline)) {
                Ok(r) if r[0] => return true,
                Ok(_) if deadline.expired() => return false,
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(pid = self.pid, "waiting for the process: {e}");
                    return !same_process_alive(self.pid, None);
                }
            }
        }
    }
}

impl AsFd for ProcessWatch {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_waker_fires_once_and_for_good_and_so_does_dropping_it() {
        let (w, fd) = wake_pair().unwrap();
        assert!(!fd.is_woken());
        let w2 = w.clone();
        w.wake();
        w2.wake();
        assert!(fd.is_woken());
        assert!(fd.is_woken(), "stays fired");
        let (w, fd) = wake_pair().unwrap();
        drop(w);
        assert!(fd.is_woken());
    }

    #[test]
    fn a_process_watch_waits_for_the_exit_with_a_deadline() {
        let mut c = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let ticks = crate::sys::proc::process_start_ticks(c.id());
        let w = ProcessWatch::open(c.id(), ticks).unwrap();
        assert!(!w.wait(Deadline::after(Duration::from_millis(50))));
        assert!(!w.exited());
        c.kill().unwrap();
        assert!(w.wait(Deadline::after(Duration::from_secs(30))));
        assert!(w.exited());
        c.wait().unwrap();
        // Gone, or another process's start time: nothing to watch.
        assert!(ProcessWatch::open(c.id(), ticks).is_none());
        let me = std::process::id();
        let mine = crate::sys::proc::process_start_ticks(me).unwrap();
        assert!(ProcessWatch::open(me, Some(mine + 1)).is_none());
    }
}
