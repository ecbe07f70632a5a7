//! drydock's VM side: the host preflight (`doctor`), turning a VM spec into a QEMU plan, and
//! launching it with the Nix store shared read-only over an in-process virtio-fs server.
//!
//! Modules are private; the small public API is re-exported here.

mod cgroup;
mod cluster;
mod doctor;
mod host;
mod image;
mod launch;
mod lifecycle;
mod owner;
mod plan;
mod qmp;
mod resolve;
mod snapshot;
mod spawn;
mod storefs;
#[allow(unsafe_code)]
mod sys;
mod system;

pub use cluster::apply::{ReloadError, restart_machine};
pub use cluster::backdoor::{BackdoorError, ExecOutput};
pub use cluster::compose::{
    ClusterPlan, ComposeError, Composition, HOSTS_FW_CFG, MACHINE_PARAM, MachinePlan,
    MachineSettings, NicPlan, SystemRef, default_cluster_name, parse_settings, plan_cluster,
    valid_machine_name, validate_cluster_name,
};
pub use cluster::control::{Detached, DetachedOwner, Down, down as cluster_down, start_detached};
pub use cluster::eval::EvalError;
pub use cluster::hub::{Hub, HubCounters, HubError};
pub use cluster::reload::{
    Action as ReloadAction, MachineOutcome as ReloadOutcome, Outcome as ActionOutcome,
    PlannedAction,
};
pub use cluster::run::{
    ClusterError, ClusterLaunch, ClusterMachine, ClusterState, MachineEvent, RunningCluster,
    ShellOptions, cluster_machine, cluster_paths, exec_remote, merge_timed, parse_timed,
    refuse_cluster_machine, shell_remote, timed_log, up as cluster_up, up_machine,
};
pub use cluster::session::{
    BuildRoots, Built, Prepared, ReloadOwner, ReloadReport, SessionError, UpEvent, UpRequest,
    WatchEnd, Watching, prepare as prepare_cluster, reload_cycle, up_plan_file, watch_reloads,
};
pub use cluster::wait::{WaitFor, WaitReport, wait as wait_machine};
pub use cluster::watch::WatchError;
pub use doctor::{
    BootProbe, DoctorError, DoctorOptions, Finding, Host, Status, overall, run_checks,
};
pub use image::{
    ImageError, ImagesInUse, StoreImage, images_in_use, list_images, remove_unused_images,
};
pub use launch::{
    ConsoleTail, LaunchError, LaunchRecord, POWERDOWN_GRACE, Phase, StoreShare, Vm, VmState,
    WaitOutcome, discard_disk, follow, log_tail, start, stop_remote, write_json,
};
pub use lifecycle::{
    Ending, LaunchEnd, LifecycleError, WaitSpec, run_detached, run_foreground, supervise,
};
pub use owner::{
    OwnerError, SupervisorCommand, claim_name, end_vm_run, reap_dead_vms, reap_stale,
    record_vm_run, recorded_store, reopen_vm_run, spawn_supervisor, wait_running,
};
pub use plan::{
    Accel, Disk, FwCfgFile, GuestDevices, Nic, PlanError, QemuPlan, StoreAttachment, VmPaths,
    VmSpec, current_uid, plan, validate_name,
};
pub use qmp::{Event, MigrationInfo, MigrationStatus, Qmp, QmpError, RunState, VmStatus};
pub use resolve::{
    AccelChoice, Boot, LaunchRequest, ResolveError, Resolved, Share, StoreMode, configured_qemu,
    images_dir, resolve_launch,
};
pub use snapshot::{
    SnapshotError, SnapshotMeta, check_restorable, prepare_restore, qemu_version, read_snapshot,
    resume_incoming, save_snapshot,
};
pub use spawn::{SpawnError, Supervised};
pub use storefs::{
    StoreServeOptions, StoreServer, StoreServerError, parse_allow_list, serve_store, update_closure,
};
pub use system::{SystemBoot, SystemError};

/// An error and its causes on one line, `a: b: c` (for warnings in the log).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    std::iter::successors(Some(e), |e| e.source())
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}
