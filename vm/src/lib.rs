//! drydock's VM side: the host preflight (`doctor`), turning a VM spec into a QEMU plan, and
//! launching it with the Nix store shared read-only over an in-process virtio-fs server.
//!
//! Modules are private; the small public API is re-exported here.

mod cgroup;
mod doctor;
mod qmp;
mod launch;
mod plan;
mod spawn;
mod storefs;
#[allow(unsafe_code)]
mod sys;
mod system;

pub use doctor::{
    BootProbe, DoctorError, DoctorOptions, Finding, Host, NixConfSources, Status, kvm_usable, overall, run_checks,
};
pub use qmp::{Event, MigrationInfo, MigrationStatus, Qmp, QmpError, RunState, VmStatus, incoming_file_uri};
pub use spawn::{SpawnError, Supervised, spawn_detached};
pub use storefs::{
    READY_LINE, STORE_SERVER_SUBCOMMAND, StoreServeOptions, StoreServer, StoreServerError,
    parse_allow_list, serve_store,
};
pub use plan::{Accel, PlanError, QemuPlan, StoreAttachment, VmPaths, VmSpec, kernel_cmdline, plan, validate_name};
pub use system::{SystemBoot, SystemError, resolve_logical, resolve_system, toplevel_path};
pub use launch::{POWERDOWN_GRACE, ConsoleTail, LaunchError, LaunchRecord, StoreShare, Vm, VmState, WaitOutcome, follow, log_tail, orderly_shutdown, pid_alive, start, stop_remote, write_json};
