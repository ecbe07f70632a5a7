//! Detaching a child from the terminal's session, for VMs that outlive the command that
//! started them (`vm run --detach`).

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Make the child the leader of a new session (no controlling terminal, no terminal signals).
pub(crate) fn new_session(cmd: &mut Command) {
    let hook = || -> io::Result<()> {
        // SAFETY: setsid(2) is async-signal-safe and touches no memory; it runs in the forked
        // child before exec, as pre_exec requires.
        if unsafe { libc::setsid() } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the hook only makes an async-signal-safe system call (see above).
    unsafe {
        cmd.pre_exec(hook);
    }
}
