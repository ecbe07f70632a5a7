//! Blocking waits on file descriptors that std does not offer: `poll(2)` on several descriptors
//! at once with a timeout, and `pidfd_open(2)`, a descriptor that becomes readable when a
//! process exits (any process this one may see, not only a child), so that a process's end is
//! waited for together with sockets and pipes instead of being looked for now and then.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// Wait until at least one of `fds` is readable (or hung up, or in error), at most `timeout`
/// (`None`: no limit). Returns which are, in `fds`' order; all `false` when the time ran out. A
/// wait interrupted by a signal returns all `false` too (the caller looks at its deadline).
pub(crate) fn poll_readable(
    fds: &[BorrowedFd<'_>],
    timeout: Option<Duration>,
) -> io::Result<Vec<bool>> {
    let interest: Vec<(BorrowedFd<'_>, bool)> = fds.iter().map(|fd| (*fd, false)).collect();
    poll_ready(&interest, timeout)
}

/// Wait until at least one of `fds` is ready, each for reading (`false`) or for writing
/// (`true`), or hung up or in error, at most `timeout` (`None`: no limit). Returns which are,
/// in `fds`' order; all `false` when the time ran out or a signal interrupted the wait.
pub(crate) fn poll_ready(
    fds: &[(BorrowedFd<'_>, bool)],
    timeout: Option<Duration>,
) -> io::Result<Vec<bool>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|(fd, write)| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: if *write { libc::POLLOUT } else { libc::POLLIN },
            revents: 0,
        })
        .collect();
    let ms = match timeout {
        // Round up, so that a wait of 0.4 ms does not become a busy poll of 0 ms.
        Some(t) => t.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as libc::c_int,
        None => -1,
    };
    // SAFETY: `p` is a vector of initialised pollfd structs, valid for `p.len()` entries for
    // the duration of the call; each fd is borrowed from a live owner for that duration.
    let n = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(e);
    }
    let ready = libc::POLLIN | libc::POLLOUT | libc::POLLHUP | libc::POLLERR | libc::POLLNVAL;
    Ok(p.iter().map(|p| p.revents & ready != 0).collect())
}

/// A descriptor that refers to the process `pid` and becomes readable once it has exited.
pub(crate) fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    if pid <= 0 {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    // SAFETY: pidfd_open(2) takes a pid and a flags word (0) and touches no memory of ours; it
    // returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0 as libc::c_uint) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a non-negative return is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_pidfd_becomes_readable_when_its_process_exits() {
        let mut c = std::process::Command::new("sleep")
            .arg("0.2")
            .spawn()
            .unwrap();
        let fd = pidfd_open(c.id()).unwrap();
        assert_eq!(
            poll_readable(&[fd.as_fd()], Some(Duration::ZERO)).unwrap(),
            [false]
        );
        assert_eq!(
            poll_readable(&[fd.as_fd()], Some(Duration::from_secs(30))).unwrap(),
            [true]
        );
        c.wait().unwrap();
        assert!(pidfd_open(0).is_err());
    }

    #[test]
    fn poll_says_which_descriptor_is_readable() {
        let (r1, _w1) = std::io::pipe().unwrap();
        let (r2, w2) = std::io::pipe().unwrap();
        drop(w2);
        let got = poll_readable(&[r1.as_fd(), r2.as_fd()], Some(Duration::from_secs(5))).unwrap();
        assert_eq!(got, [false, true]);
        let t = std::time::Instant::now();
        let got = poll_readable(&[r1.as_fd()], Some(Duration::from_millis(50))).unwrap();
        assert_eq!(got, [false]);
        assert!(t.elapsed() >= Duration::from_millis(50));
    }
}
