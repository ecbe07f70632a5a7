//! drydock's clusters: compositions of machines (`drydock.nix`), each a VM of drydock-vm's one
//! launch path, on private layer-2 segments (one hub per VLAN), with a backdoor shell into each
//! guest, and hot reload.
//!
//! Layers, each module using only those above it (no circles):
//! - leaves: `wire` (JSON-line framing on drydock's sockets), `sys` (the only `unsafe`),
//!   `compose` (pure: settings → plan), `reload` (pure: which machines keep, switch, restart,
//!   come or go), `watch` (waiting for edits of what the evaluation read), `netview` (pure:
//!   what the hubs saw → findings about the networks, for `drydock net`), `pcap` (pure: the
//!   capture format), `shaper` (delay, loss and rate of a hub's port; the thread that sends
//!   delayed frames at their time);
//! - `hub` (forwards frames on a VLAN; its faults, ring of recent frames and capture taps),
//!   `backdoor` (commands in a guest's shell), `command`
//!   (pure: an argv or a command line and its stdin as the text a call runs), `eval` (Nix:
//!   settings and the one build);
//! - `state` (the cluster's paths, `cluster.json`, `up.json`, the owner lock, its errors, a
//!   machine's error and its recorded failure);
//! - `launches` (each machine's launch request, and every machine's launch checked by
//!   drydock-vm's launcher before anything starts);
//! - `logs` (console stamping, the timed logs' merge and follow), `exec` (the exec server per
//!   machine and its client), `copy` (`cp`: a tar archive through `exec`, checked before it is
//!   unpacked), `control` (the owner's control socket: protocol, client and server; starting a
//!   detached owner, `down`), `wait`;
//! - `events` (what the owner reacts to, on one channel);
//! - `run` (the owner: hubs, one thread per machine), `apply` (a reload carried out in the
//!   owner), `ops` (one machine's start, stop, crash, block, unblock in the owner), `session`
//!   (what one `up` does: prepare, reload cycles, the owner's loop);
//! - `snapshot` (whole-cluster snapshots: the cut in the owner, the checks, `restore`);
//! - `net` (the owner's faults by machine, `drydock net`'s requests and captures);
//! - `testrun` (`drydock test`: a Python test script against the cluster, its report).
//!
//! Modules are private; the small public API is re-exported here.

mod apply;
mod backdoor;
mod class;
mod command;
mod compose;
mod control;
mod copy;
mod eval;
mod events;
mod exec;
mod hub;
mod launches;
mod logs;
mod net;
mod netview;
mod ops;
mod pcap;
mod reload;
mod run;
mod session;
mod shaper;
mod snapshot;
mod state;
#[allow(unsafe_code)]
mod sys;
mod testrun;
mod wait;
mod watch;
mod wire;

pub use apply::ReloadError;
pub use backdoor::{
    Backdoor, BackdoorError, CHUNK, ExecOutput, READY_LINE, Session, call_line, parse_reply,
};
pub use class::exit_class_of;
pub use command::{GuestCommand, MAX_STDIN, tty_script, tty_status_file, with_stdin};
pub use compose::{
    ClusterPlan, ComposeError, Composition, HOSTS_FW_CFG, MACHINE_PARAM, MachinePlan,
    MachineSettings, NicPlan, SystemRef, TestScript, default_cluster_name, parse_settings,
    plan_cluster, valid_machine_name, validate_cluster_name,
};
pub use control::{
    Detached, DetachedOwner, Down, down as cluster_down, restart_machine, start_detached,
};
pub use copy::{CopyError, CopyReport, MAX_ARCHIVE, copy_from_guest, copy_to_guest};
pub use eval::{EvalError, evaluate as evaluate_composition};
pub use events::MachineEvent;
pub use exec::{ShellOptions, exec_in, exec_remote, exec_tty, shell_remote};
pub use hub::{FrameRecord, HEAD_BYTES, Hub, HubCounters, HubError, HubFaults, RING_BYTES, Shape};
pub use logs::{follow_logs, merge_timed, parse_timed, timed_log};
pub use net::{
    CaptureReport, CaptureRequest, HubStats, NetError, NetFaults, NetReport, NetRequest, ShapeSpec,
    capture as net_capture, net_request, parse_groups, parse_millis, parse_percent, parse_rate,
};
pub use netview::{
    Finding, FindingKind, NetFindings, NetMachine, Seen, age, findings as net_findings,
    render as render_net,
};
pub use pcap::{global_header as pcap_global_header, record as pcap_record};
pub use reload::{
    Action as ReloadAction, MachineOutcome as ReloadOutcome, Outcome as ActionOutcome,
    PlannedAction,
};
pub use run::RunningCluster;
pub use session::{
    BuildRoots, Built, Prepared, ReloadOwner, ReloadReport, SessionError, UpEvent, UpRequest,
    WatchEnd, Watching, prepare as prepare_cluster, reload_cycle, start as cluster_up, start_idle,
    start_restored, watch_reloads,
};
pub use shaper::{RATE_QUEUE, SHAPE_QUEUE_BYTES};
pub use snapshot::{
    ClusterSnapshot, Removed as SnapshotRemoved, RestoreReport, RestoreRequest, SnapshotError,
    SnapshotMachine, SnapshotRow, check_restore, list_snapshots, read_snapshot, remove_snapshot,
    restore as restore_cluster, take_snapshot,
};
pub use state::{
    ClusterError, ClusterLaunch, ClusterMachine, ClusterState, LockHolder, MachineError, OwnerLock,
    check_file, cluster_machine, cluster_paths, list_up, machine_failure, refuse_cluster_machine,
    up_cluster, up_machine, up_plan_file,
};
pub use testrun::{
    CallReport, DRIVER, DriverMessage, Ending, ExecRecord, Failure, Frame, Phase, ReportBuilder,
    ScriptError, ScriptSource, SubtestReport, TestError, TestEvent, TestOutcome, TestReport,
    TestRequest, call_text, failure_text, junit_xml, run_tests, xml_escape,
};
pub use wait::{WaitFor, WaitReport, wait as wait_machine};
pub use watch::{Reads, WatchError};
