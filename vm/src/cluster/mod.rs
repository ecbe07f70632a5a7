//! Clusters: compositions of machines (`drydock.nix`), each a VM of the one launch path, on
//! private layer-2 segments (one hub per VLAN), with a backdoor shell into each guest.
//!
//! `compose` is the pure layer (settings → plan); `eval` runs Nix (settings, the one build);
//! `hub` forwards frames on a VLAN; `backdoor` runs commands in a guest's shell; `run` owns an
//! up cluster (hubs, one thread per machine, the exec service); `wait` waits on a machine;
//! `control` starts a detached cluster's owner and stops it (`down`). Hot reload: `reload` plans
//! it (pure: which machines keep, switch, restart, come or go) and `apply` carries it out in the
//! owner, asked over the cluster's control socket; `watch` waits for edits of a composition.
//! `session` is what one `up` does with them: prepare, reload cycles, the owner's loop.

pub(crate) mod apply;
pub(crate) mod backdoor;
pub(crate) mod compose;
pub(crate) mod control;
pub(crate) mod eval;
pub(crate) mod hub;
pub(crate) mod reload;
pub(crate) mod run;
pub(crate) mod session;
pub(crate) mod wait;
pub(crate) mod watch;

/// A read or receive that timed out or was interrupted: try again (after looking at a flag).
pub(crate) fn try_again(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::Interrupted
    )
}
