//! `vm snapshot` and `vm restore`: save a running VM's full state beside its folder (its store
//! an image, or over virtio-fs on QEMU 8.2 or newer), and bring it back (detached, owned by a
//! supervisor) with `-incoming`, after the library checked that the snapshot fits the VM
//! (closure, QEMU, machine options).

use drydock_vm::{Ending, LaunchEvent, LaunchKind};

use super::{CANCEL, install_cancel_handler, launcher};
use crate::cli::{VmRestoreArgs, VmSnapshotArgs};
use crate::context::Context;
use crate::exit::Outcome;

pub fn snapshot(ctx: &Context, a: &VmSnapshotArgs) -> anyhow::Result<Outcome> {
    drydock_cluster::refuse_cluster_machine(&ctx.state_dir, &a.name, "snapshot")?;
    let meta = drydock_vm::snapshot_vm(&ctx.state_dir, &a.name, &a.tag)?;
    eprintln!(
        "drydock: snapshot {:?} of {}: {:.1} MiB of state saved in {:.2} s (guest paused meanwhile, now running again)",
        a.tag,
        a.name,
        meta.state_disk_bytes.unwrap_or(meta.state_bytes) as f64 / 1048576.0,
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
    let kind = LaunchKind::Restore {
        name: a.name.clone(),
        tag: a.tag.clone(),
    };
    let opts = drydock_vm::LaunchOptions {
        detach: true,
        wait: drydock_vm::WaitSpec {
            ready: None,
            timeout: Some(a.timeout),
        },
    };
    let end = drydock_vm::launch_vm(&launcher(ctx)?, kind, &opts, &CANCEL, &mut |ev| {
        if let LaunchEvent::Planned(_) = ev {
            install_cancel_handler();
        }
    })?;
    let Ending::Running { qemu_pid } = end.ending else {
        eprintln!("drydock: {} was not restored ({:?})", a.name, end.ending);
        return Ok(Outcome::Failed);
    };
    let seconds = end.elapsed.as_secs_f64();
    eprintln!(
        "drydock: {} restored from snapshot {:?} in {seconds:.3} s; running in the background (QEMU pid {qemu_pid})",
        a.name, a.tag,
    );
    if ctx.json {
        let report = RestoreReport {
            name: &a.name,
            tag: &a.tag,
            result: "running",
            seconds,
            qemu_pid,
        };
        crate::out::json(&mut crate::out::stdout(), &report)?;
    }
    Ok(Outcome::Success)
}
