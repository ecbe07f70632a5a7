//! drydock's VM side: the host preflight (`doctor`), turning a VM spec into a QEMU plan, and
//! launching it with the Nix store shared read-only over an in-process virtio-fs server.
//!
//! Modules are private; the small public API is re-exported here.

mod cgroup;
mod console;
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
mod wait;

pub use console::{
    BoundedLog, ConsoleOptions, ConsoleTail, DEFAULT_LOG_LIMIT, LineSink, LogWatch, MIN_LOG_LIMIT,
    WaitOutcome, Woke, escape_control, follow, log_tail, rotate_at, rotated,
};
pub use doctor::{
    BootProbe, DoctorError, DoctorOptions, Finding, Host, Status, overall, run_checks,
};
pub use image::{
    ImageError, ImagesInUse, StoreImage, images_in_use, list_images, remove_unused_images,
};
pub use launch::{
    LaunchError, LaunchRecord, POWERDOWN_GRACE, Phase, StoreShare, Vm, VmState, discard_disk,
    remove_stale_cgroup, start, start_with, stop_remote, write_json,
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
pub use spawn::{
    Awaited, Captured, DetachedChild, SpawnError, Supervised, await_report, drydock_command,
    run_captured, run_captured_until, spawn_detached,
};
pub use storefs::{
    StoreServeOptions, StoreServer, StoreServerError, parse_allow_list, serve_store, update_closure,
};
pub use sys::proc::{pid_alive, process_start_ticks, same_process_alive};
pub use system::{SystemBoot, SystemError, resolve_system, toplevel_path};
pub use wait::{ProcessWatch, WakeFd, Waker, readable_now, retry, wait_readable, wake_pair};

/// An error and its causes on one line, `a: b: c` (for warnings in the log).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    std::iter::successors(Some(e), |e| e.source())
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}
