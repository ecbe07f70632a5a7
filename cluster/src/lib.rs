//! drydock's clusters: compositions of machines (`drydock.nix`), each a VM of the one launch path, on
//! private layer-2 segments (one hub per VLAN), with a backdoor shell into each guest.
//!
//! `compose` is the pure layer (settings → plan); `eval` runs Nix (settings, the one build);
//! `hub` forwards frames on a VLAN; `backdoor` runs commands in a guest's shell; `run` owns an
//! up cluster (hubs, one thread per machine, the exec service); `wait` waits on a machine;
//! `control` starts a detached cluster's owner and stops it (`down`). Hot reload: `reload` plans
//! it (pure: which machines keep, switch, restart, come or go) and `apply` carries it out in the
//! owner, asked over the cluster's control socket; `watch` waits for edits of a composition.
//! `session` is what one `up` does with them: prepare, reload cycles, the owner's loop.

//!
//! Modules are private; the small public API is re-exported here.

mod apply;
mod backdoor;
mod compose;
mod control;
mod eval;
mod hub;
mod reload;
mod run;
mod session;
#[allow(unsafe_code)]
mod sys;
mod wait;
mod watch;

pub use apply::{ReloadError, restart_machine};
pub use backdoor::{BackdoorError, ExecOutput};
pub use compose::{
    ClusterPlan, ComposeError, Composition, HOSTS_FW_CFG, MACHINE_PARAM, MachinePlan,
    MachineSettings, NicPlan, SystemRef, default_cluster_name, parse_settings, plan_cluster,
    valid_machine_name, validate_cluster_name,
};
pub use control::{Detached, DetachedOwner, Down, down as cluster_down, start_detached};
pub use eval::EvalError;
pub use hub::{Hub, HubCounters, HubError};
pub use reload::{
    Action as ReloadAction, MachineOutcome as ReloadOutcome, Outcome as ActionOutcome,
    PlannedAction,
};
pub use run::{
    ClusterError, ClusterLaunch, ClusterMachine, ClusterState, MachineEvent, RunningCluster,
    ShellOptions, cluster_machine, cluster_paths, exec_remote, merge_timed, parse_timed,
    refuse_cluster_machine, shell_remote, timed_log, up as cluster_up, up_machine,
};
pub use session::{
    BuildRoots, Built, Prepared, ReloadOwner, ReloadReport, SessionError, UpEvent, UpRequest,
    WatchEnd, Watching, prepare as prepare_cluster, reload_cycle, up_plan_file, watch_reloads,
};
pub use wait::{WaitFor, WaitReport, wait as wait_machine};
pub use watch::WatchError;

/// A read or receive that timed out or was interrupted: try again (after looking at a flag).
pub(crate) fn try_again(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::Interrupted
    )
}

/// Send `value` as one JSON line: the framing of the exec and control sockets.
pub(crate) fn write_json_line(
    s: &std::os::unix::net::UnixStream,
    value: &impl serde::Serialize,
) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut text = serde_json::to_string(value).map_err(std::io::Error::other)?;
    text.push('\n');
    let mut w = s;
    w.write_all(text.as_bytes())
}

/// Read one JSON line (see [`write_json_line`]); a peer that closed without a line is an error.
pub(crate) fn read_json_line<T: serde::de::DeserializeOwned>(
    r: &mut impl std::io::BufRead,
) -> std::io::Result<T> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the owner closed the connection without an answer",
        ));
    }
    serde_json::from_str(&line).map_err(std::io::Error::other)
}
