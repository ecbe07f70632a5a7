//! `drydock vm run|list|stop|logs|restart|snapshot|restore` and the hidden `__vm-supervise`
//! that owns a detached VM: each turns its arguments into one `drydock_vm` call (a launch goes
//! through `drydock_vm::launch_vm`, the library's one launch sequence) and prints its report.

mod snapshot;

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use drydock_vm::{
    LaunchEvent, LaunchKind, LaunchRecord, Launcher, LauncherError, LifecycleError,
    StoreAttachment, StoreShare, VmPaths,
};

use crate::cli::{
    ShareArg, StoreModeArg, VmArgs, VmCommand, VmLogsArgs, VmRestartArgs, VmRunArgs, VmStopArgs,
    VmSuperviseArgs, WaitArgs,
};
use crate::context::Context;
use crate::exit::{Outcome, bad_input};

use crate::cancel::CANCEL;

fn install_cancel_handler() {
    crate::cancel::install();
}

pub fn run(ctx: &Context, args: &VmArgs) -> anyhow::Result<Outcome> {
    match &args.command {
        VmCommand::Run(a) => run_vm(ctx, a),
        VmCommand::List => list(ctx),
        VmCommand::Stop(a) => stop(ctx, a),
        VmCommand::Logs(a) => logs(ctx, a),
        VmCommand::Restart(a) => restart(ctx, a),
        VmCommand::Snapshot(a) => snapshot::snapshot(ctx, a),
        VmCommand::Restore(a) => snapshot::restore(ctx, a),
        VmCommand::Exec(a) => {
            let paths = vm_paths(ctx, &a.name)?;
            crate::cmd::cluster::exec_vm(ctx, &a.name, &paths, &a.exec)
        }
    }
}

fn vm_paths(ctx: &Context, name: &str) -> anyhow::Result<VmPaths> {
    drydock_vm::validate_name(name).map_err(|e| bad_input(e.to_string()))?;
    Ok(VmPaths::in_state_dir(&ctx.state_dir, name))
}

/// Where store images and the blank base disk live: shared by every VM of this state dir.
pub(crate) fn images_dir(ctx: &Context) -> PathBuf {
    drydock_vm::images_dir(&ctx.state_dir)
}

/// Before `runs`, `du` and `gc` read the runs: end the runs of VMs whose owner died.
pub(crate) fn reap_dead(ctx: &Context) {
    for name in drydock_vm::reap_dead_vms(&ctx.state_dir) {
        eprintln!("drydock: VM {name} had died with its owner; its run is ended now");
    }
}

/// The library's launcher for this command line: its store, state dir and binary.
pub(super) fn launcher(ctx: &Context) -> anyhow::Result<Launcher> {
    Ok(Launcher {
        layout: ctx.layout(),
        state_dir: ctx.state_dir.clone(),
        store_root: ctx.store_root.clone(),
        exe: std::env::current_exe().context("locating the drydock binary")?,
        argv: std::env::args().collect(),
        shared_run: None,
    })
}

/// What `vm run` asks for.
fn run_request(a: &VmRunArgs) -> anyhow::Result<drydock_vm::LaunchRequest> {
    let boot = match (&a.system, &a.kernel) {
        (Some(sys), _) => drydock_vm::Boot::System(sys.clone()),
        (None, Some(k)) => drydock_vm::Boot::Kernel {
            kernel: k.clone(),
            initrd: a.initrd.clone(),
        },
        (None, None) => return Err(drydock_vm::ResolveError::NothingToBoot.into()),
    };
    let profile: drydock_vm::Profile = a.profile.into();
    let defaults = profile.defaults();
    Ok(drydock_vm::LaunchRequest {
        name: a.name.clone(),
        boot,
        append: a.append.clone(),
        share: match a.share {
            ShareArg::Closure => drydock_vm::Share::Closure,
            ShareArg::Store => drydock_vm::Share::Store,
        },
        store_mode: match a.store_mode {
            StoreModeArg::Virtiofs => drydock_vm::StoreMode::VirtioFs,
            StoreModeArg::Image => drydock_vm::StoreMode::Image,
        },
        accel: a.accel.into(),
        qemu: a.qemu.clone(),
        memory_mib: a.memory.unwrap_or(defaults.memory_mib),
        cpus: a.cpus.unwrap_or(defaults.cpus),
        disk_size_mib: a.disk_size.unwrap_or(defaults.disk_mib),
        devices: Default::default(),
        allow_overcommit: a.allow_overcommit,
        profile,
        shared_dir: None,
    })
}

/// The store image line of a launch with `--store-mode image`.
fn describe_image(plan: &drydock_vm::LaunchPlan) {
    if let Some((image, paths_in, took)) = plan.image() {
        eprintln!(
            "drydock: store image {} ({paths_in} paths, {:.1} MiB, {})",
            image.path.display(),
            image.bytes as f64 / 1048576.0,
            if image.built {
                format!("built in {:.2} s", took.as_secs_f64())
            } else {
                "cached".into()
            }
        );
    }
}

/// How a launch waits for its VM: the library's wait, and whether to return once ready.
struct Wait {
    spec: drydock_vm::WaitSpec,
    detach: bool,
}

impl Wait {
    fn from_args(a: &WaitArgs) -> anyhow::Result<Self> {
        let ready = a
            .ready
            .as_deref()
            .map(|r| regex::Regex::new(r).map_err(|e| bad_input(format!("--ready {r:?}: {e}"))))
            .transpose()?;
        Ok(Self {
            spec: drydock_vm::WaitSpec {
                ready,
                timeout: a.timeout,
            },
            detach: a.detach,
        })
    }
}

fn run_vm(ctx: &Context, a: &VmRunArgs) -> anyhow::Result<Outcome> {
    let wait = Wait::from_args(&a.wait)?;
    let req = run_request(a)?;
    launch(ctx, &a.name, LaunchKind::New(req), &wait)
}

/// The one-line summary printed when a VM starts.
fn describe(name: &str, record: &LaunchRecord) {
    let store = match (&record.spec.store, record.share.as_ref()) {
        (StoreAttachment::Image { path }, _) => {
            format!("closure image {} on /dev/vda, read-only", path.display())
        }
        (
            _,
            Some(StoreShare {
                allow: Some(names), ..
            }),
        ) => format!("{} closure paths over virtio-fs, read-only", names.len()),
        (_, Some(_)) => "the whole store over virtio-fs, read-only".into(),
        _ => "none".into(),
    };
    eprintln!(
        "drydock: starting {name} ({}, {} MiB, {} vCPU; {}; store: {store})",
        record.spec.accel.as_str(),
        record.spec.memory_mib,
        record.spec.cpus,
        record.accel_reason,
    );
}

/// Launch `kind` with the library's launch sequence: the summary once it is planned, the
/// console as it comes, then how it ended.
fn launch(ctx: &Context, name: &str, kind: LaunchKind, wait: &Wait) -> anyhow::Result<Outcome> {
    let launcher = launcher(ctx)?;
    let opts = drydock_vm::LaunchOptions {
        detach: wait.detach,
        wait: wait.spec.clone(),
    };
    let mut echo = echo_to(ctx.json, name);
    let end = drydock_vm::launch_vm(&launcher, kind, &opts, &CANCEL, &mut |ev| match ev {
        LaunchEvent::Planned(plan) => {
            describe_image(plan);
            describe(name, plan.record());
            install_cancel_handler();
        }
        LaunchEvent::Console(line) => echo(line),
        LaunchEvent::Ready { after, .. } => {
            eprintln!("drydock: {name} ready after {:.2} s", after.as_secs_f64())
        }
    });
    let end = match end {
        // A restart whose pinned files are gone: said plainly, exit 1.
        Err(LifecycleError::Launcher(e @ LauncherError::Gone { .. })) => {
            eprintln!("drydock: {e}");
            return Ok(Outcome::Failed);
        }
        end => end?,
    };
    report_end(
        ctx,
        name,
        &VmPaths::in_state_dir(&ctx.state_dir, name),
        &end,
        wait,
    )
}

fn echo_to(json: bool, name: &str) -> impl FnMut(&str) {
    let prefix = format!("{name} │ ");
    // What the guest prints is shown, never obeyed by the terminal.
    move |line: &str| {
        let line = drydock_vm::escape_control(line);
        if json {
            eprintln!("{prefix}{line}");
        } else {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{prefix}{line}");
        }
    }
}

/// The outcome and the sentence for how a launch ended.
fn judge(end: &drydock_vm::LaunchEnd, waited_for_ready: bool, detached: bool) -> (Outcome, String) {
    use drydock_vm::Ending;
    let secs = end.elapsed.as_secs_f64();
    match &end.ending {
        Ending::Stopped(status) => (
            Outcome::Success,
            format!(
                "the VM stopped ({})",
                status.map(|s| s.to_string()).unwrap_or_default()
            ),
        ),
        Ending::StoppedBeforeReady => (
            Outcome::Failed,
            "the VM stopped before it became ready".to_string(),
        ),
        Ending::TimedOut if detached => (
            Outcome::Failed,
            format!("not ready after {secs:.1} s; VM stopped"),
        ),
        Ending::TimedOut => (
            Outcome::Failed,
            format!(
                "timed out after {secs:.1} s{}",
                if waited_for_ready {
                    " waiting for --ready"
                } else {
                    ""
                }
            ),
        ),
        Ending::Interrupted => (Outcome::Interrupted, "interrupted; VM stopped".to_string()),
        Ending::Running { qemu_pid } => (
            Outcome::Success,
            format!("ready after {secs:.2} s; running in the background (pid {qemu_pid})"),
        ),
    }
}

/// What `vm run`, `vm restart` and `vm restore` print with `--json`: how the launch ended.
#[derive(Debug, serde::Serialize)]
pub(super) struct LaunchReport<'a> {
    pub name: &'a str,
    /// `ok`, `ready` (detached), `failed` or `interrupted`.
    pub result: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
    pub ready_line: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qemu_pid: Option<u32>,
    pub seconds: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub console_log: Option<PathBuf>,
}

fn report_end(
    ctx: &Context,
    name: &str,
    paths: &VmPaths,
    end: &drydock_vm::LaunchEnd,
    wait: &Wait,
) -> anyhow::Result<Outcome> {
    let (code, why) = judge(end, wait.spec.ready.is_some(), wait.detach);
    let running = matches!(end.ending, drydock_vm::Ending::Running { .. });
    if code == Outcome::Failed {
        let tail = drydock_vm::log_tail(&paths.console_log(), 15);
        let tail: Vec<String> = tail
            .lines()
            .map(|l| drydock_vm::escape_control(l).into_owned())
            .collect();
        let tail = tail.join("\n");
        eprintln!(
            "drydock: {name}: {why}\n--- last console lines ({}) ---\n{tail}",
            paths.console_log().display()
        );
    } else if running {
        eprintln!("drydock: {name} {why}; `drydock vm stop {name}` stops it");
    } else {
        eprintln!("drydock: {name}: {why}");
    }
    if ctx.json {
        let report = LaunchReport {
            name,
            result: match (&end.ending, code) {
                (drydock_vm::Ending::Running { .. }, _) => "ready",
                (_, Outcome::Success) => "ok",
                (_, Outcome::Failed) => "failed",
                _ => "interrupted",
            },
            reason: (!running).then_some(why.as_str()),
            ready_line: end.ready_line.as_deref(),
            qemu_pid: match end.ending {
                drydock_vm::Ending::Running { qemu_pid } => Some(qemu_pid),
                _ => None,
            },
            seconds: end.elapsed.as_secs_f64(),
            console_log: (!running).then(|| paths.console_log()),
        };
        crate::out::json(&mut crate::out::stdout(), &report)?;
    }
    Ok(code)
}

/// The hidden `__vm-supervise`: start the recorded launch (or load a snapshot into it) and stay
/// with it until QEMU exits or we are told to stop (SIGTERM/SIGHUP/SIGINT), then clean up.
pub fn supervise(ctx: &Context, a: &VmSuperviseArgs) -> anyhow::Result<Outcome> {
    let launcher = launcher(ctx)?;
    install_cancel_handler();
    let snapshot = a.snapshot.as_deref().map(|dir| (dir, !a.paused));
    eprintln!("drydock: supervising {}", a.name);
    let status = drydock_vm::supervise(&launcher, &a.name, snapshot, &CANCEL)?;
    eprintln!(
        "drydock: {} stopped ({})",
        a.name,
        status
            .map(|s| s.to_string())
            .unwrap_or_else(|| "on request".into())
    );
    Ok(Outcome::Success)
}

/// `vm restart`: the recorded launch again. Everything it needs is pinned; nothing is evaluated
/// or built, and Nix is not called.
fn restart(ctx: &Context, a: &VmRestartArgs) -> anyhow::Result<Outcome> {
    if let Some(cm) = drydock_cluster::cluster_machine(&ctx.state_dir, &a.name) {
        return restart_in_cluster(ctx, a, &cm);
    }
    let wait = Wait::from_args(&a.wait)?;
    let kind = LaunchKind::Restart {
        name: a.name.clone(),
        keep_disk: a.keep_state,
    };
    launch(ctx, &a.name, kind, &wait)
}

/// `vm restart` of a machine of an up cluster: its owner restarts it, on the cluster's networks
/// (a fresh disk, as `up` restarts machines), and the command returns once it is ready again.
fn restart_in_cluster(
    ctx: &Context,
    a: &VmRestartArgs,
    cm: &drydock_cluster::ClusterMachine,
) -> anyhow::Result<Outcome> {
    if a.keep_state || a.wait.ready.is_some() {
        return Err(bad_input(format!(
            "{} is machine {} of the cluster {}: its owner restarts it with a fresh disk and waits for its backdoor; --keep-state and --ready do not apply",
            a.name, cm.machine, cm.cluster
        )));
    }
    let deadline = a.wait.timeout.unwrap_or(Duration::from_secs(600));
    eprintln!(
        "drydock: restarting {} through the owner of cluster {} (pid {})",
        a.name, cm.cluster, cm.owner_pid
    );
    let o = drydock_cluster::restart_machine(&ctx.state_dir, cm, deadline)?;
    if ctx.json {
        crate::out::json(&mut crate::out::stdout(), &o)?;
    }
    if o.outcome == drydock_cluster::ActionOutcome::Done {
        eprintln!("drydock: {} restarted in {:.2} s", a.name, o.seconds);
        Ok(Outcome::Success)
    } else {
        eprintln!(
            "drydock: {} did not restart: {}",
            a.name,
            o.error.as_deref().unwrap_or("see its log")
        );
        Ok(Outcome::Failed)
    }
}

fn stop(ctx: &Context, a: &VmStopArgs) -> anyhow::Result<Outcome> {
    drydock_cluster::refuse_cluster_machine(&ctx.state_dir, &a.name, "stop")?;
    match drydock_vm::stop_vm(&ctx.state_dir, &a.name, a.grace, a.force)? {
        drydock_vm::Stopped::NotRunning => eprintln!("drydock: {} is not running", a.name),
        drydock_vm::Stopped::Stopped { after } => {
            eprintln!(
                "drydock: {} stopped in {:.2} s",
                a.name,
                after.as_secs_f64()
            )
        }
        drydock_vm::Stopped::StaleCleaned => {
            eprintln!("drydock: {} was not running (stale entry cleaned)", a.name)
        }
    }
    Ok(Outcome::Success)
}

fn list(ctx: &Context) -> anyhow::Result<Outcome> {
    let listing = drydock_vm::list_vms(&ctx.state_dir)?;
    let mut out = crate::out::stdout();
    if ctx.json {
        crate::out::json(&mut out, &listing)?;
        return Ok(Outcome::Success);
    }
    if listing.vms.is_empty() {
        writeln!(out, "no VMs in {}", listing.dir.display())?;
        out.flush()?;
        return Ok(Outcome::Success);
    }
    writeln!(
        out,
        "{:<20} {:<16} {:>8} {:<5} {:>7} {:>9}",
        "NAME", "STATE", "PID", "ACCEL", "MEMORY", "UPTIME"
    )?;
    let dash = || "-".to_string();
    for r in &listing.vms {
        writeln!(
            out,
            "{:<20} {:<16} {:>8} {:<5} {:>7} {:>9}",
            r.name,
            r.state.as_str(),
            r.pid.map(|p| p.to_string()).unwrap_or_else(dash),
            r.accel.unwrap_or("-"),
            r.memory_mib.map(|m| format!("{m}M")).unwrap_or_else(dash),
            r.uptime_seconds
                .map(|s| format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60))
                .unwrap_or_else(dash),
        )?;
    }
    out.flush()?;
    Ok(Outcome::Success)
}

fn logs(ctx: &Context, a: &VmLogsArgs) -> anyhow::Result<Outcome> {
    if a.follow {
        install_cancel_handler();
    }
    let mut out = crate::out::stdout();
    // A write that fails (the reader went away) ends the reading; its error is returned. What
    // the guest printed is shown escaped, never obeyed by the terminal.
    let mut failed = None;
    let interrupted =
        drydock_vm::follow_console(&ctx.state_dir, &a.name, a.follow, &CANCEL, &mut |l| {
            let written =
                writeln!(out, "{}", drydock_vm::escape_control(l)).and_then(|()| match a.follow {
                    true => out.flush(),
                    false => Ok(()),
                });
            match written {
                Ok(()) => true,
                Err(e) => {
                    failed = Some(e);
                    false
                }
            }
        })?;
    if let Some(e) = failed {
        return Err(e.into());
    }
    out.flush()?;
    Ok(match interrupted {
        true => Outcome::Interrupted,
        false => Outcome::Success,
    })
}
