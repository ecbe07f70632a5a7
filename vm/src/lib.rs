//! drydock's VM side: the host preflight (`doctor`), turning a VM spec into a QEMU plan, and
//! launching it with the Nix store shared read-only over an in-process virtio-fs server.
//!
//! Modules are private; the small public API is re-exported here.

mod cgroup;
mod cluster;
mod doctor;
mod image;
mod launch;
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

pub use cluster::backdoor::{
    Backdoor, BackdoorError, ExecOutput, READY_LINE as BACKDOOR_READY_LINE, call_line, parse_reply,
};
pub use cluster::compose::{
    ClusterPlan, ComposeError, Composition, HOSTS_FW_CFG, MACHINE_PARAM, MachinePlan,
    MachineSettings, NicPlan, SystemRef, default_cluster_name, parse_settings, plan_cluster,
    valid_machine_name, validate_cluster_name,
};
pub use cluster::eval::{
    EvalError, build as build_composition, check_systems, evaluate as evaluate_composition,
};
pub use cluster::hub::{Hub, HubCounters, HubError};
pub use cluster::run::{
    ClusterError, ClusterLaunch, ClusterState, MachineEvent, RunningCluster, cluster_paths,
    exec_remote, exec_socket, merge_timed, parse_timed, timed_log, up as cluster_up,
};
pub use doctor::{
    BootProbe, DoctorError, DoctorOptions, Finding, Host, Status, kvm_usable, overall, run_checks,
};
pub use image::{
    ImageError, ImagesInUse, StoreImage, closure_key, ensure_store_image, images_in_use,
    list_images, remove_unused_images,
};
pub use launch::{
    ConsoleTail, LaunchError, LaunchRecord, POWERDOWN_GRACE, Phase, StoreShare, Vm, VmState,
    WaitOutcome, discard_disk, follow, fresh_disk, kill_process, log_tail, orderly_shutdown,
    pid_alive, start, stop_remote, write_json,
};
pub use owner::{
    OwnerError, SupervisorCommand, end_vm_run, reap_dead_vms, reap_stale, record_vm_run,
    recorded_store, reopen_vm_run, spawn_supervisor, wait_running,
};
pub use plan::{
    Accel, Disk, FwCfgFile, GuestDevices, Nic, PlanError, QemuPlan, StoreAttachment, VmPaths,
    VmSpec, current_uid, kernel_cmdline, plan, plan_incoming, validate_name,
};
pub use qmp::{
    Event, MigrationInfo, MigrationStatus, Qmp, QmpError, RunState, VmStatus, incoming_file_uri,
};
pub use resolve::{
    AccelChoice, Boot, LaunchRequest, ResolveError, Resolved, Share, StoreMode, choose_accel,
    configured_qemu, find_qemu, images_dir, resolve_launch,
};
pub use snapshot::{
    SnapshotError, SnapshotMeta, check_restorable, prepare_restore, qemu_version, read_snapshot,
    resume_incoming, save_snapshot, snapshot_dir, snapshots_size,
};
pub use spawn::{SpawnError, Supervised, spawn_detached};
pub use storefs::{
    READY_LINE, STORE_SERVER_SUBCOMMAND, StoreServeOptions, StoreServer, StoreServerError,
    parse_allow_list, serve_store,
};
pub use system::{SystemBoot, SystemError, resolve_logical, resolve_system, toplevel_path};

/// An error and its causes on one line, `a: b: c` (for warnings in the log).
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    std::iter::successors(Some(e), |e| e.source())
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}
