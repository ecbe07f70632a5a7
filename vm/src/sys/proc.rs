//! Process control and process facts that std does not offer: the parent-death signal
//! (`prctl(PR_SET_PDEATHSIG)`), a child's umask, signalling a child's process group, `unshare(2)`,
//! `PR_SET_NO_NEW_PRIVS`, the effective uid, and what `/proc/PID/stat` says about a process
//! (state, flags, start time: whether a pid is still the process drydock started). Used by
//! `spawn` (every child drydock starts dies with it), `launch` (liveness) and the store server's
//! sandbox. Signalling one process is `drydock_gc::send_signal`.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

/// Ask the kernel to send `signal` to this process when its parent dies.
///
/// The "parent" is the *thread* that forked this process: see [`die_with_parent`].
pub(crate) fn set_parent_death_signal(signal: libc::c_int) -> io::Result<()> {
    // SAFETY: PR_SET_PDEATHSIG takes a signal number as its only argument and touches no memory
    // of ours; the unused arguments are passed as zero, as prctl(2) asks.
    let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Make the child that `cmd` will start receive SIGKILL when this process dies, including by
/// SIGKILL. The setting is made between fork and exec and survives the exec (it is cleared only
/// for set-user-ID binaries). If this process is already gone by then, the child exits at once
/// with status 127 instead of running unsupervised.
///
/// Caveat (Linux semantics): the signal fires when the *thread* that spawned the child exits, so
/// long-lived children must be spawned from a long-lived thread (e.g. the main thread).
pub fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id();
    let hook = move || -> io::Result<()> {
        // Only async-signal-safe calls below: prctl, getppid and _exit are plain system calls
        // and nothing here allocates.
        set_parent_death_signal(libc::SIGKILL)?;
        if std::os::unix::process::parent_id() != parent {
            // SAFETY: _exit ends the forked child at once without running any destructor or
            // atexit handler of the parent's copied state, which is exactly what is wanted here.
            unsafe { libc::_exit(127) };
        }
        Ok(())
    };
    // SAFETY: the hook runs in the forked child before exec and only makes async-signal-safe
    // system calls (see above); it neither allocates nor takes locks.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Make the child that `cmd` will start create its files and sockets 0600 (umask 0177, set
/// between fork and exec): QEMU binds its QMP and NIC sockets and writes its pid file and
/// console log itself, and drydock's own umask may be anything.
pub(crate) fn private_umask(cmd: &mut Command) {
    let hook = || -> io::Result<()> {
        // SAFETY: umask(2) only sets this process's file mode creation mask; it cannot fail and
        // touches no memory.
        unsafe { libc::umask(0o177) };
        Ok(())
    };
    // SAFETY: the hook runs in the forked child before exec and makes one async-signal-safe
    // system call; it neither allocates nor takes locks.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Send `signal` to every process in the process group `pgid` (a child started as the leader of
/// its own group, see `CommandExt::process_group`).
pub(crate) fn signal_group(pgid: u32, signal: libc::c_int) -> io::Result<()> {
    let pgid =
        libc::pid_t::try_from(pgid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    if pgid <= 1 {
        // killpg(0) is our own group, killpg(1) init's: never what is meant here.
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    // SAFETY: killpg(2) takes two integers and touches no memory; `pgid` is a positive group id
    // other than init's.
    let rc = unsafe { libc::killpg(pgid, signal) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Move this process into new namespaces (`CLONE_NEW*` flags, see unshare(2)).
///
/// Namespaces that need a fork to take effect (PID) are not meant for this call.
pub(crate) fn unshare(flags: libc::c_int) -> io::Result<()> {
    // SAFETY: unshare(2) takes an integer flag set and touches no memory of ours.
    let rc = unsafe { libc::unshare(flags) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Set `PR_SET_NO_NEW_PRIVS`: no later exec can gain privileges (set-user-ID, file capabilities).
pub(crate) fn set_no_new_privs() -> io::Result<()> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes the value 1 and zero for the unused arguments; no memory
    // is touched.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The effective user id of this process.
pub(crate) fn effective_uid() -> u32 {
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    unsafe { libc::geteuid() }
}

/// What `/proc/PID/stat` says about a process, as far as liveness goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcStat {
    /// One-letter state (`R`, `S`, `D`, `Z`, ...).
    pub(crate) state: char,
    /// Kernel task flags (`PF_*`).
    pub(crate) flags: u64,
    /// Start time in clock ticks after boot: with the pid, it names one process.
    pub(crate) start_ticks: u64,
}

/// `PF_EXITING`: the task is inside `exit()`. Its memory and command line may already be
/// gone while its state letter still reads `R` or `D`.
const PF_EXITING: u64 = 0x4;

impl ProcStat {
    /// Parse the text of `/proc/PID/stat`; the command name may hold spaces and parentheses,
    /// so fields are counted from the last `)`.
    pub(crate) fn parse(text: &str) -> Option<Self> {
        let (_, rest) = text.rsplit_once(')')?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // After the name: state(3) ppid(4) pgrp(5) session(6) tty(7) tpgid(8) flags(9) ...
        // starttime(22).
        Some(Self {
            state: fields.first()?.chars().next()?,
            flags: fields.get(6)?.parse().ok()?,
            start_ticks: fields.get(19)?.parse().ok()?,
        })
    }

    /// Running in any sense that matters: not a zombie, not dead, not on its way out.
    pub(crate) fn alive(&self) -> bool {
        !matches!(self.state, 'Z' | 'X' | 'x') && self.flags & PF_EXITING == 0
    }
}

/// `/proc/PID/stat` of the process `pid`, if it exists.
pub(crate) fn proc_stat(pid: u32) -> Option<ProcStat> {
    ProcStat::parse(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Whether a process is alive (and not a zombie).
pub fn pid_alive(pid: u32) -> bool {
    same_process_alive(pid, None)
}

/// When process `pid` started (clock ticks after boot), if it exists.
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    proc_stat(pid).map(|st| st.start_ticks)
}

/// Whether `pid` is alive and, when `start_ticks` is known, still the same process (a pid
/// that the kernel handed to someone else after the VM died is not the VM).
pub fn same_process_alive(pid: u32, start_ticks: Option<u64>) -> bool {
    proc_stat(pid).is_some_and(|st| st.alive() && start_ticks.is_none_or(|t| t == st.start_ticks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_is_killed_when_the_spawning_thread_ends() {
        use std::os::unix::process::ExitStatusExt;
        // PR_SET_PDEATHSIG follows the spawning thread: spawn `sleep` from a thread that then
        // ends, and the child must be killed by SIGKILL instead of sleeping its minute out.
        let mut child = std::thread::spawn(|| {
            let mut cmd = Command::new("sleep");
            cmd.arg("60");
            die_with_parent(&mut cmd);
            cmd.spawn().expect("spawn sleep")
        })
        .join()
        .expect("spawning thread");
        let status = child.wait().expect("wait for sleep");
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    }

    #[test]
    fn hooked_child_runs_normally_while_parent_lives() {
        let mut cmd = Command::new("true");
        die_with_parent(&mut cmd);
        assert!(cmd.status().expect("spawn true").success());
    }

    #[test]
    fn proc_stat_fields_are_counted_from_the_last_parenthesis() {
        let line = "4242 (qemu (x) 1) S 1 4242 4242 0 -1 4194560 100 0 0 0 5 3 0 0 20 0 \
                    4 0 987654 1000 100 18446744073709551615";
        let st = ProcStat::parse(line).unwrap();
        assert_eq!(
            st,
            ProcStat {
                state: 'S',
                flags: 4194560,
                start_ticks: 987654
            }
        );
        assert!(st.alive());
        let table = [
            ('R', 0, true),
            ('D', 0, true),
            ('S', PF_EXITING, false),
            ('D', PF_EXITING | 0x400000, false),
            ('Z', 0, false),
            ('X', 0, false),
        ];
        for (state, flags, alive) in table {
            let st = ProcStat {
                state,
                flags,
                start_ticks: 1,
            };
            assert_eq!(st.alive(), alive, "{state} {flags:#x}");
        }
        assert_eq!(ProcStat::parse("12 (x) S 1"), None);
        assert_eq!(ProcStat::parse("garbage"), None);
    }
}
