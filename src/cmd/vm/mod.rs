//! `drydock vm run|list|stop|logs|restart|snapshot|restore` and the hidden `__vm-supervise`
//! that owns a detached VM. Resolution (system, closure, store image, accelerator, QEMU) happens
//! here; planning and launching are `drydock_vm`'s.

mod snapshot;

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use drydock_vm::{ConsoleTail, LaunchRecord, StoreAttachment, StoreShare, VmPaths, VmState};

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
            crate::cmd::cluster::exec_vm(&a.name, &paths, &a.command, a.timeout)
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

/// A dead entry found while listing: clean it up and end its run (a failure is logged; the
/// listing goes on).
fn reap_stale(ctx: &Context, paths: &VmPaths, state: &VmState, record: Option<&LaunchRecord>) {
    if let Err(e) = drydock_vm::reap_stale(&ctx.state_dir, paths, state, record) {
        tracing::warn!("{:#}", anyhow!(e));
    }
}

/// Build the launch record: the library resolves the system or kernel, the closure, the store
/// image, QEMU and the accelerator.
fn prepare(ctx: &Context, a: &VmRunArgs, paths: &VmPaths) -> anyhow::Result<LaunchRecord> {
    let boot = match (&a.system, &a.kernel) {
        (Some(sys), _) => drydock_vm::Boot::System(sys.clone()),
        (None, Some(k)) => drydock_vm::Boot::Kernel {
            kernel: k.clone(),
            initrd: a.initrd.clone(),
        },
        (None, None) => return Err(drydock_vm::ResolveError::NothingToBoot.into()),
    };
    let req = drydock_vm::LaunchRequest {
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
        memory_mib: a.memory,
        cpus: a.cpus,
        disk_size_mib: a.disk_size,
        exe: std::env::current_exe().context("locating the drydock binary")?,
        devices: Default::default(),
    };
    let resolved = drydock_vm::resolve_launch(&ctx.layout(), &ctx.state_dir, paths, &req)?;
    if let Some((image, paths_in, took)) = &resolved.image {
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
    Ok(resolved.record)
}

/// `--store` as given, for the checks that a restart or restore names the VM's own store.
pub(super) fn explicit_store(ctx: &Context) -> Option<&std::path::Path> {
    ctx.store_root.as_deref()
}

/// A restart or restore: the run is live again and its pin renewed in the VM's own store.
pub(super) fn reopen_run(ctx: &Context, record: &LaunchRecord) -> anyhow::Result<()> {
    drydock_vm::reopen_vm_run(&ctx.state_dir, record, &ctx.layout(), explicit_store(ctx))?;
    Ok(())
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
    let paths = vm_paths(ctx, &a.name)?;
    let wait = Wait::from_args(&a.wait)?;
    drydock_vm::claim_name(&ctx.state_dir, &paths, &a.name)?;
    let mut record = prepare(ctx, a, &paths)?;
    if let Some(disk) = &record.spec.disk {
        drydock_vm::discard_disk(disk)?;
    }
    let argv: Vec<String> = std::env::args().collect();
    record.run_id = drydock_vm::record_vm_run(&ctx.state_dir, &ctx.layout(), &record, &argv);
    record.write(&paths)?;
    launch(ctx, &a.name, &record, &wait)
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

fn launch(
    ctx: &Context,
    name: &str,
    record: &LaunchRecord,
    wait: &Wait,
) -> anyhow::Result<Outcome> {
    describe(name, record);
    install_cancel_handler();
    if wait.detach {
        detach(ctx, name, record, wait)
    } else {
        foreground(ctx, name, record, wait)
    }
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

fn foreground(
    ctx: &Context,
    name: &str,
    record: &LaunchRecord,
    wait: &Wait,
) -> anyhow::Result<Outcome> {
    let mut echo = echo_to(ctx.json, name);
    let end = drydock_vm::run_foreground(
        &ctx.state_dir,
        record,
        &wait.spec,
        &CANCEL,
        &mut echo,
        &mut |_, after| eprintln!("drydock: {name} ready after {:.2} s", after.as_secs_f64()),
    )?;
    report_end(ctx, name, &record.spec.paths, &end, wait)
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

/// The detached supervisor command of a VM of this state dir and store.
pub(super) fn supervisor<'a>(
    ctx: &'a Context,
    exe: &'a std::path::Path,
    name: &'a str,
    incoming: Option<(&'a str, &'a str)>,
) -> drydock_vm::SupervisorCommand<'a> {
    drydock_vm::SupervisorCommand {
        exe,
        state_dir: &ctx.state_dir,
        store_root: ctx.store_root.as_deref(),
        name,
        incoming,
    }
}

/// `--detach`: a supervisor process owns the VM; wait here until it is ready.
fn detach(
    ctx: &Context,
    name: &str,
    record: &LaunchRecord,
    wait: &Wait,
) -> anyhow::Result<Outcome> {
    let exe = std::env::current_exe().context("locating the drydock binary")?;
    let sup = supervisor(ctx, &exe, name, None);
    let mut echo = echo_to(ctx.json, name);
    let end = drydock_vm::run_detached(&sup, record, &wait.spec, &CANCEL, &mut echo)?;
    report_end(ctx, name, &record.spec.paths, &end, wait)
}

/// The hidden `__vm-supervise`: start the recorded launch (or load a snapshot into it) and stay
/// with it until QEMU exits or we are told to stop (SIGTERM/SIGHUP/SIGINT), then clean up.
pub fn supervise(ctx: &Context, a: &VmSuperviseArgs) -> anyhow::Result<Outcome> {
    let paths = vm_paths(ctx, &a.name)?;
    let mut record = LaunchRecord::read(&paths)?;
    if let Some(share) = &mut record.share {
        share.exe = std::env::current_exe().context("locating the drydock binary")?;
    }
    install_cancel_handler();
    let incoming = a
        .incoming
        .as_deref()
        .map(|uri| (uri, a.snapshot_tag.as_deref().unwrap_or("default")));
    eprintln!("drydock: supervising {}", a.name);
    let status = drydock_vm::supervise(&ctx.state_dir, &record, incoming, &CANCEL)?;
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
    let paths = vm_paths(ctx, &a.name)?;
    let wait = Wait::from_args(&a.wait)?;
    let mut record = existing_record(ctx, &paths, &a.name)?;
    drydock_vm::recorded_store(&record, &ctx.layout(), explicit_store(ctx))?;
    if let Some(state) = VmState::read(&paths) {
        drydock_vm::stop_remote(&paths, &state, drydock_vm::POWERDOWN_GRACE, false)?;
    }
    if let Some(missing) = record.missing_file() {
        eprintln!("drydock: cannot restart {}: {missing}", a.name);
        return Ok(Outcome::Failed);
    }
    if let Some(share) = &mut record.share {
        share.exe = std::env::current_exe().context("locating the drydock binary")?;
    }
    if let Some(disk) = &record.spec.disk {
        if !a.keep_state {
            drydock_vm::discard_disk(disk)?;
        }
    }
    reopen_run(ctx, &record)?;
    record.write(&paths)?;
    launch(ctx, &a.name, &record, &wait)
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

/// The launch record of an existing VM, or bad input naming the VM.
fn existing_record(ctx: &Context, paths: &VmPaths, name: &str) -> anyhow::Result<LaunchRecord> {
    if !paths.launch_file().exists() {
        return Err(bad_input(format!(
            "no VM named {name} in {}",
            ctx.state_dir.join("vms").display()
        )));
    }
    Ok(LaunchRecord::read(paths)?)
}

fn stop(ctx: &Context, a: &VmStopArgs) -> anyhow::Result<Outcome> {
    drydock_cluster::refuse_cluster_machine(&ctx.state_dir, &a.name, "stop")?;
    let paths = vm_paths(ctx, &a.name)?;
    if !paths.dir.is_dir() {
        return Err(bad_input(format!(
            "no VM named {} in {}",
            a.name,
            ctx.state_dir.join("vms").display()
        )));
    }
    let Some(state) = VmState::read(&paths) else {
        eprintln!("drydock: {} is not running", a.name);
        return Ok(Outcome::Success);
    };
    let grace = a.grace;
    let t = Instant::now();
    let was_alive = state.qemu_alive();
    if was_alive {
        drydock_vm::stop_remote(&paths, &state, grace, a.force)?;
    } else {
        let record = LaunchRecord::read(&paths).ok();
        drydock_vm::reap_stale(&ctx.state_dir, &paths, &state, record.as_ref())?;
    }
    if was_alive {
        eprintln!(
            "drydock: {} stopped in {:.2} s",
            a.name,
            t.elapsed().as_secs_f64()
        );
    } else {
        eprintln!("drydock: {} was not running (stale entry cleaned)", a.name);
    }
    Ok(Outcome::Success)
}

/// One line of `vm list`.
#[derive(Debug, serde::Serialize)]
struct VmRow {
    name: String,
    /// `running`, `stopped` or `stale (cleaned)`.
    state: &'static str,
    pid: Option<u32>,
    accel: Option<&'static str>,
    memory_mib: Option<u32>,
    uptime_seconds: Option<u64>,
    system: Option<String>,
}

/// `vm list --json`.
#[derive(Debug, serde::Serialize)]
struct VmList {
    vms: Vec<VmRow>,
}

fn list(ctx: &Context) -> anyhow::Result<Outcome> {
    let root = ctx.state_dir.join("vms");
    let mut rows = Vec::new();
    let mut names: Vec<String> = match std::fs::read_dir(&root) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(anyhow!(e).context(format!("reading {}", root.display()))),
    };
    names.sort();
    for name in names {
        let Ok(paths) = vm_paths(ctx, &name) else {
            continue;
        };
        let record = LaunchRecord::read(&paths).ok();
        let state = VmState::read(&paths);
        let (status, pid, uptime) = match &state {
            Some(s) if s.qemu_alive() => (
                "running",
                Some(s.qemu_pid),
                Some((drydock_gc::epoch_secs().max(0) as u64).saturating_sub(s.started)),
            ),
            Some(s) => {
                // Stale: the owner died without cleaning up. Clean now, and end its run.
                reap_stale(ctx, &paths, s, record.as_ref());
                ("stale (cleaned)", None, None)
            }
            None => ("stopped", None, None),
        };
        rows.push(VmRow {
            name,
            state: status,
            pid,
            accel: record.as_ref().map(|r| r.spec.accel.as_str()),
            memory_mib: record.as_ref().map(|r| r.spec.memory_mib),
            uptime_seconds: uptime,
            system: record.as_ref().and_then(|r| r.toplevel.clone()),
        });
    }
    let mut out = crate::out::stdout();
    if ctx.json {
        crate::out::json(&mut out, &VmList { vms: rows })?;
        return Ok(Outcome::Success);
    }
    if rows.is_empty() {
        writeln!(out, "no VMs in {}", root.display())?;
        out.flush()?;
        return Ok(Outcome::Success);
    }
    writeln!(
        out,
        "{:<20} {:<16} {:>8} {:<5} {:>7} {:>9}",
        "NAME", "STATE", "PID", "ACCEL", "MEMORY", "UPTIME"
    )?;
    let dash = || "-".to_string();
    for r in rows {
        writeln!(
            out,
            "{:<20} {:<16} {:>8} {:<5} {:>7} {:>9}",
            r.name,
            r.state,
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
    let paths = vm_paths(ctx, &a.name)?;
    let log = paths.console_log();
    if !log.exists() {
        return Err(bad_input(format!(
            "no console log for a VM named {} ({} does not exist)",
            a.name,
            log.display()
        )));
    }
    let mut tail = ConsoleTail::with_rotated(log);
    let mut out = crate::out::stdout();
    // What the guest printed is shown escaped, never obeyed by the terminal.
    let show = |l: &str| drydock_vm::escape_control(l).into_owned();
    if !a.follow {
        for l in tail.lines() {
            writeln!(out, "{}", show(&l))?;
        }
        if let Some(r) = tail.rest() {
            writeln!(out, "{}", show(&r))?;
        }
        out.flush()?;
        return Ok(Outcome::Success);
    }
    install_cancel_handler();
    // A reader that went away ends the follow, quietly.
    let mut failed = None;
    let mut echo = |l: &str| match writeln!(out, "{}", show(l)).and_then(|()| out.flush()) {
        Ok(()) => true,
        Err(e) => {
            failed = Some(e);
            false
        }
    };
    // Until the VM's QEMU is gone.
    let qemu = VmState::read(&paths)
        .and_then(|s| drydock_vm::ProcessWatch::open(s.qemu_pid, s.qemu_start_ticks));
    let end = match &qemu {
        Some(q) => drydock_vm::follow(&mut tail, None, None, &CANCEL, Some(q), &mut echo),
        None => drydock_vm::follow(
            &mut tail,
            None,
            Some(Duration::ZERO),
            &CANCEL,
            None,
            &mut echo,
        ),
    };
    if let Some(e) = failed {
        return Err(e.into());
    }
    Ok(match end {
        drydock_vm::WaitOutcome::Cancelled if CANCEL.is_set() => Outcome::Interrupted,
        _ => Outcome::Success,
    })
}
