//! The only place with `unsafe`: thin wrappers over a few libc calls (file locks, signals,
//! waiting for a child's exit, the effective uid).
//! Each call is small, checked, and documented with its safety argument.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use crate::deadline::Deadline;

/// How long [`lock_exclusive_within`] sleeps between two tries.
const LOCK_RETRY: Duration = Duration::from_millis(20);

/// Try to take an exclusive `flock` on `f` without waiting. Returns whether it was taken (it
/// stays held until the file is closed or [`unlock`] is called).
pub fn try_lock_exclusive(f: &File) -> bool {
    // SAFETY: `f` owns an open file descriptor for the duration of the call; flock does not
    // touch memory.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Take an exclusive `flock` on `f`, waiting at most `within` for another holder. Returns
/// whether it was taken (it stays held until the file is closed).
pub fn lock_exclusive_within(f: &File, within: std::time::Duration) -> bool {
    let deadline = Deadline::after(within);
    loop {
        if try_lock_exclusive(f) {
            return true;
        }
        if deadline.expired() {
            return false;
        }
        // A back-off, bounded by the deadline: a blocking flock(2) cannot be given a timeout
        // (a thread blocked in it would take the lock after we gave up), and another process's
        // unlock wakes nothing here.
        std::thread::sleep(LOCK_RETRY.min(deadline.remaining()));
    }
}

/// Block until the child process `pid` has exited, without reaping it (`waitid` with
/// `WNOWAIT`): its status stays for `Child::wait`, and its pid cannot be reused until then, so
/// that signalling it meanwhile is safe. Interrupted waits are retried; an error (`ECHILD`: not
/// a child of this process, or already reaped) is returned.
pub fn wait_exited(pid: u32) -> io::Result<()> {
    let pid = libc::id_t::from(pid);
    if pid == 0 {
        return Err(io::Error::from_raw_os_error(libc::ECHILD));
    }
    loop {
        let mut info = std::mem::MaybeUninit::<libc::siginfo_t>::zeroed();
        // SAFETY: `info` is a writable siginfo_t that outlives the call; waitid writes at most
        // one siginfo_t through the pointer and keeps no reference to it. P_PID with a nonzero
        // pid waits for that one child only.
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid,
                info.as_mut_ptr(),
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Make the child that `cmd` will start receive SIGKILL when the thread that spawns it (this
/// process's main thread, for `track`) ends, SIGKILL of drydock included: a build does not
/// outlive the drydock that started it. If drydock is already gone by then, the child exits
/// at once with status 127.
pub fn die_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    let hook = move || -> io::Result<()> {
        // SAFETY: PR_SET_PDEATHSIG takes a signal number and zeros; it touches no memory.
        let rc = unsafe {
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        if std::os::unix::process::parent_id() != parent {
            // SAFETY: _exit ends the forked child at once, running nothing of the parent's
            // copied state, which is what a child whose parent is already gone must do.
            unsafe { libc::_exit(127) };
        }
        Ok(())
    };
    // SAFETY: the hook runs in the forked child before exec and makes only async-signal-safe
    // system calls (prctl, getppid, _exit); it neither allocates nor takes locks.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// The effective user id of this process (the owner of what it creates).
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// Send `sig` to the process `pid` (one process: pid 0 and negative pids, which would signal
/// process groups, are refused with ESRCH). Errors (e.g. the process already exited) are
/// returned.
pub fn send_signal(pid: u32, sig: i32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    if pid <= 0 {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    // SAFETY: kill(2) takes two integers and touches no memory; `pid` is a single positive pid.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Make a FIFO at `path` (`mkfifo(3)`), for tests of readers that must not block on one.
#[cfg(test)]
pub fn make_fifo(path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a NUL-terminated string that outlives the call; mkfifo only reads it.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o600) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flock_is_exclusive_between_open_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l");
        std::fs::write(&p, b"").unwrap();
        let a = File::open(&p).unwrap();
        let b = File::open(&p).unwrap();
        assert!(try_lock_exclusive(&a));
        assert!(!try_lock_exclusive(&b));
        drop(a);
        assert!(try_lock_exclusive(&b));
    }

    #[test]
    fn signal_zero_probes_own_process_and_rejects_group_pids() {
        send_signal(std::process::id(), 0).expect("own pid exists");
        let err = send_signal(0, 0).expect_err("pid 0 means a process group");
        assert_eq!(err.raw_os_error(), Some(libc::ESRCH));
    }

    #[test]
    fn a_held_lock_is_waited_for_within_the_deadline_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l");
        std::fs::write(&p, b"").unwrap();
        let a = File::open(&p).unwrap();
        let b = File::open(&p).unwrap();
        assert!(lock_exclusive_within(&a, std::time::Duration::ZERO));
        let t = std::time::Instant::now();
        assert!(!lock_exclusive_within(
            &b,
            std::time::Duration::from_millis(100)
        ));
        assert!(t.elapsed() >= std::time::Duration::from_millis(100));
        drop(a);
        assert!(lock_exclusive_within(
            &b,
            std::time::Duration::from_millis(100)
        ));
    }

    #[test]
    fn signal_to_child() {
        // The child runs no other program: it is this test binary (see `child::tests`).
        let mut c = crate::child::tests::child(30);
        send_signal(c.id(), libc::SIGTERM).unwrap();
        let st = c.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(libc::SIGTERM));
    }

    #[test]
    fn a_fifo_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fifo");
        make_fifo(&p).unwrap();
        use std::os::unix::fs::FileTypeExt;
        assert!(std::fs::symlink_metadata(&p).unwrap().file_type().is_fifo());
        assert!(make_fifo(&p).is_err(), "it exists");
    }
}
