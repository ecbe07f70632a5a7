//! `vm snapshot` and `vm restore`: save a running VM's full state beside its folder, and bring
//! it back (detached, owned by a supervisor) with `-incoming`, after checking that the snapshot
//! fits the VM (closure, QEMU, machine options).

use std::time::{Duration, Instant};

use drydock_vm::VmState;

use super::{CANCEL, existing_record, vm_paths};
use crate::cli::{VmRestoreArgs, VmSnapshotArgs};
use crate::context::Context;
use crate::exit::{Outcome, bad_input};

pub fn snapshot(ctx: &Context, a: &VmSnapshotArgs) -> anyhow::Result<Outcome> {
    drydock_cluster::refuse_cluster_machine(&ctx.state_dir, &a.name, "snapshot")?;
    let paths = vm_paths(ctx, &a.name)?;
    let record = existing_record(ctx, &paths, &a.name)?;
    let running = VmState::read(&paths).is_some_and(|s| s.qemu_alive());
    if !running {
        return Err(bad_input(format!(
            "{} is not running: only a running VM can be snapshotted",
            a.name
        )));
    }
    let version = drydock_vm::qemu_version(&record.spec.qemu)?;
    let meta = drydock_vm::save_snapshot(&record, &a.tag, &version)?;
    eprintln!(
        "drydock: snapshot {:?} of {}: {:.1} MiB of state saved in {:.2} s (guest paused meanwhile, now running again)",
        a.tag,
        a.name,
        meta.state_bytes as f64 / 1048576.0,
        meta.save_seconds
    );
    if ctx.json {
        crate::out::json(&mut crate::out::stdout(), &meta)?;
    }
    Ok(Outcome::Success)
}

/// `vm restore --json`.
#[derive(Debug, serde::Serialize)]
struct RestoreReport<'a> {
    name: &'a str,
    tag: &'a str,
    result: &'a str,
    seconds: f64,
    qemu_pid: u32,
}

pub fn restore(ctx: &Context, a: &VmRestoreArgs) -> anyhow::Result<Outcome> {
    drydock_cluster::refuse_cluster_machine(&ctx.state_dir, &a.name, "restore")?;
    let paths = vm_paths(ctx, &a.name)?;
    let mut record = existing_record(ctx, &paths, &a.name)?;
    drydock_vm::recorded_store(&record, &ctx.layout(), super::explicit_store(ctx))?;
    let deadline = a.timeout;
    let meta = drydock_vm::read_snapshot(&paths, &a.tag)?;
    let version = drydock_vm::qemu_version(&record.spec.qemu)?;
    drydock_vm::check_restorable(&meta, &record, &version)?;
    // The snapshot replaces whatever runs now.
    if let Some(state) = VmState::read(&paths) {
        drydock_vm::stop_remote(&paths, &state, Duration::ZERO, false)?;
    }
    if let Some(share) = &mut record.share {
        share.exe = std::env::current_exe()?;
    }
    super::reopen_run(ctx, &record)?;
    record.write(&paths)?;
    let uri = drydock_vm::prepare_restore(&record, &a.tag)?;
    super::install_cancel_handler();
    let t = Instant::now();
    let exe = std::env::current_exe()?;
    let sup = super::supervisor(ctx, &exe, &a.name, Some((&uri, &a.tag)));
    let (sup, _) = drydock_vm::spawn_supervisor(&sup, &paths, &CANCEL)?;
    let state = drydock_vm::wait_running(&paths, sup, deadline, &CANCEL)?;
    eprintln!(
        "drydock: {} restored from snapshot {:?} in {:.3} s; running in the background (QEMU pid {})",
        a.name,
        a.tag,
        t.elapsed().as_secs_f64(),
        state.qemu_pid
    );
    if ctx.json {
        let report = RestoreReport {
            name: &a.name,
            tag: &a.tag,
            result: "running",
            seconds: t.elapsed().as_secs_f64(),
            qemu_pid: state.qemu_pid,
        };
        crate::out::json(&mut crate::out::stdout(), &report)?;
    }
    Ok(Outcome::Success)
}
