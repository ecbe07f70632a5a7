//! drydock's VM side: the host preflight (`doctor`), turning a VM spec into a QEMU plan, and
//! launching it with the Nix store shared read-only over an in-process virtio-fs server.
//!
//! Every launch goes through one sequence, `launcher` ([`Launcher`]: plan, then claim and
//! start); `lifecycle` owns a VM around it (`vm run`, `restart`, `restore`, the supervisor).
//! Module imports form no circle: `lifecycle` → `launcher` → `resolve`, `owner`, `snapshot` →
//! `launch` → `storefs`, `qmp`, `cgroup` → `spawn` → `console` → `wait` → `sys`; `resolve` →
//! `profile` (pure), `reginfo` → `spawn`; `collect` (`gc`) → `owner`, `image`; `qemu_version`
//! (pure: what a QEMU version can do) is used by `doctor` and `snapshot`.
//!
//! Modules are private; the small public API is re-exported here.

mod cgroup;
mod class;
mod collect;
mod console;
mod doctor;
mod host;
mod image;
mod launch;
mod launcher;
mod lifecycle;
mod owner;
mod plan;
mod profile;
mod qemu_version;
mod qmp;
mod reginfo;
mod resolve;
mod snapshot;
mod spawn;
mod storefs;
#[allow(unsafe_code)]
mod sys;
mod system;
mod wait;

pub use class::exit_class_of;
pub use collect::{CollectError, Collection, GcEvent, GcRequest, ImageSweep, collect};
pub use console::{
    BoundedLog, ConsoleOptions, ConsoleTail, DEFAULT_LOG_LIMIT, LineSink, LogWatch, MIN_LOG_LIMIT,
    WaitOutcome, Woke, escape_control, follow, log_tail, rotate_at, rotated,
};
pub use doctor::{
    Answer, Asked, BootProbe, BuilderAnswer, DoctorError, DoctorOptions, Finding, Host, NixAnswer,
    Status, Verdict, VmsAnswer, run_checks, verdict,
};
pub use image::{
    ImageError, Staging, StoreImage, Tools as ImageTools, closure_key, ensure_store_image,
    ensure_with as ensure_store_image_with, list_images,
};
pub use launch::{
    LaunchError, LaunchRecord, POWERDOWN_GRACE, Phase, StoreShare, Vm, VmState, follow_console,
    remove_stale_cgroup, stop_remote, write_json,
};
pub use launcher::{Claimed, LaunchKind, LaunchPlan, Launcher, LauncherError, SupervisedLaunch};
pub use lifecycle::{
    Ending, LaunchEnd, LaunchEvent, LaunchOptions, LifecycleError, WaitSpec, launch_vm, supervise,
};
pub use owner::{
    ListedState, ListedVm, OwnerError, Stopped, VmListing, end_vm_run, list_vms, pin_launch,
    reap_dead_vms, reap_stale, stop_vm,
};
pub use plan::{
    Accel, DirShare, Disk, FwCfgFile, GuestDevices, Nic, PlanError, QemuPlan, ShareTransport,
    StoreAttachment, VmPaths, VmSpec, check_memory, current_uid, plan, validate_name,
};
pub use profile::{FstabError, Profile, ProfileDefaults, ShareTag, Transport, parse_fstab};
pub use qemu_version::{QemuVersion, VIRTIOFS_MIGRATION_MIN, qemu_can_migrate_virtiofs};
pub use qmp::{
    Event, MigrationInfo, MigrationStatus, Qmp, QmpError, RunState, VmStatus, file_uri,
    incoming_file_uri,
};
pub use reginfo::RegInfoError;
pub use resolve::{
    AccelChoice, Boot, LaunchRequest, ResolveError, Share, StoreMode, check_host_memory,
    configured_qemu, images_dir,
};
pub use snapshot::{
    SnapshotError, SnapshotMeta, StateFormat, check_snapshottable, qemu_version, read_snapshot_dir,
    save_paused, snapshot_vm,
};
pub use spawn::{
    Awaited, Captured, DetachedChild, SpawnError, Supervised, await_report, drydock_command,
    run_captured, run_captured_until, spawn_detached, spawn_detached_holding,
};
pub use storefs::{
    StoreServeOptions, StoreServer, StoreServerError, parse_allow_list, serve_store, update_closure,
};
pub use sys::proc::{die_with_parent, pid_alive, process_start_ticks, same_process_alive};
pub use system::{SystemBoot, SystemError, resolve_system, toplevel_path};
pub use wait::{
    ProcessWatch, WakeFd, Waker, readable_now, retry, wait_readable, wait_ready, wake_pair,
};

/// An error and its causes on one line, `a: b: c` (for warnings in the log).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    std::iter::successors(Some(e), |e| e.source())
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}
