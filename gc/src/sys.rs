//! The only place with `unsafe`: thin wrappers over a few libc calls (file locks, signals).
//! Each call is small, checked, and documented with its safety argument.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Try to take an exclusive `flock` on `f` without waiting. Returns whether it was taken (it
/// stays held until the file is closed or [`unlock`] is called).
pub fn try_lock_exclusive(f: &File) -> bool {
    // SAFETY: `f` owns an open file descriptor for the duration of the call; flock does not
    // touch memory.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

/// Send `sig` to process `pid`. Errors (e.g. the process already exited) are returned.
pub fn send_signal(pid: u32, sig: i32) -> io::Result<()> {
    let pid = i32::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::kill(pid, sig) };
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
    fn signal_to_child() {
        let mut c = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        send_signal(c.id(), libc::SIGTERM).unwrap();
        let st = c.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(libc::SIGTERM));
    }
}
