//! `drydock vm run|list|stop|logs|restart|snapshot|restore` and the hidden `__vm-supervise`
//! that owns a detached VM. Resolution (system, closure, store image, accelerator, QEMU) happens
//! here; planning and launching are `drydock_vm`'s.

mod snapshot;

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use drydock_vm::{
    ConsoleTail, LaunchRecord, StoreAttachment, StoreShare, VmPaths, VmState, WaitOutcome,
};

use crate::cli::{
    AccelArg, ShareArg, StoreModeArg, VmArgs, VmCommand, VmLogsArgs, VmRestartArgs, VmRunArgs,
    VmStopArgs, VmSuperviseArgs, WaitArgs,
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

/// Refuse a name whose VM is alive; clean up a stale entry.
fn claim_name(ctx: &Context, paths: &VmPaths, name: &str) -> anyhow::Result<()> {
    if let Some(state) = VmState::read(paths) {
        let alive = state.qemu_alive() || state.supervisor_alive();
        if alive {
            return Err(bad_input(format!(
                "a VM named {name} is already running (QEMU pid {}); stop it with `drydock vm stop {name}` or choose another --name",
                state.qemu_pid
            )));
        }
        tracing::info!("cleaning up the stale entry of VM {name}");
        let record = LaunchRecord::read(paths).ok();
        drydock_vm::reap_stale(&ctx.state_dir, paths, &state, record.as_ref())?;
    }
    Ok(())
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
        accel: match a.accel {
            AccelArg::Auto => drydock_vm::AccelChoice::Auto,
            AccelArg::Kvm => drydock_vm::AccelChoice::Kvm,
            AccelArg::Tcg => drydock_vm::AccelChoice::Tcg,
        },
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

/// Mark the launch's run finished with QEMU's exit code.
pub(super) fn finish_run(
    ctx: &Context,
    record: &LaunchRecord,
    status: Option<std::process::ExitStatus>,
) {
    if let Err(e) = drydock_vm::end_vm_run(&ctx.state_dir, record, status.and_then(|s| s.code())) {
        tracing::warn!("{:#}", anyhow!(e));
    }
}

/// How a launch waits for its VM.
struct Wait {
    ready: Option<regex::Regex>,
    timeout: Option<Duration>,
    detach: bool,
}

impl Wait {
    fn from_args(a: &WaitArgs) -> anyhow::Result<Self> {
        let ready = a
            .ready
            .as_deref()
            .map(|r| regex::Regex::new(r).map_err(|e| bad_input(format!("--ready {r:?}: {e}"))))
            .transpose()?;
        let timeout = a.timeout;
        Ok(Self {
            ready,
            timeout,
            detach: a.detach,
        })
    }

    /// Follow the console until ready, timed out, QEMU gone (`gone`) or Ctrl-C.
    fn follow(
        &self,
        tail: &mut ConsoleTail,
        gone: &mut dyn FnMut() -> bool,
        echo: &mut dyn FnMut(&str),
    ) -> WaitOutcome {
        drydock_vm::follow(tail, self.ready.as_ref(), self.timeout, &CANCEL, gone, echo)
    }
}

fn run_vm(ctx: &Context, a: &VmRunArgs) -> anyhow::Result<Outcome> {
    let paths = vm_paths(ctx, &a.name)?;
    let wait = Wait::from_args(&a.wait)?;
    claim_name(ctx, &paths, &a.name)?;
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
    move |line: &str| {
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
    let mut vm =
        drydock_vm::start(&record.spec, record.share.as_ref(), None).map_err(launch_error)?;
    let started = Instant::now();
    let mut tail = ConsoleTail::new(vm.paths().console_log());
    let mut echo = echo_to(ctx.json, name);
    let mut ready_line = None;
    let mut outcome = wait.follow(&mut tail, &mut || vm.exited().is_some(), &mut echo);
    if let WaitOutcome::Ready(line) = &outcome {
        ready_line = Some(line.clone());
        eprintln!(
            "drydock: {name} ready after {:.2} s",
            started.elapsed().as_secs_f64()
        );
        // Foreground: stay with the VM until it ends or Ctrl-C.
        let mut gone = || vm.exited().is_some();
        outcome = drydock_vm::follow(&mut tail, None, None, &CANCEL, &mut gone, &mut echo);
    }
    let status = vm.exited();
    vm.stop(drydock_vm::POWERDOWN_GRACE)?;
    finish_run(ctx, record, status.or_else(|| vm.exited()));
    let (code, why) = match &outcome {
        WaitOutcome::Exited if wait.ready.is_some() && ready_line.is_none() => (
            Outcome::Failed,
            "the VM stopped before it became ready".to_string(),
        ),
        WaitOutcome::Exited => (
            Outcome::Success,
            format!(
                "the VM stopped ({})",
                status.map(|s| s.to_string()).unwrap_or_default()
            ),
        ),
        WaitOutcome::TimedOut => (
            Outcome::Failed,
            format!(
                "timed out after {:.1} s{}",
                started.elapsed().as_secs_f64(),
                if wait.ready.is_some() {
                    " waiting for --ready"
                } else {
                    ""
                }
            ),
        ),
        WaitOutcome::Cancelled => (Outcome::Interrupted, "interrupted; VM stopped".to_string()),
        // The second follow has no pattern, so it cannot report Ready.
        WaitOutcome::Ready(_) => (Outcome::Failed, "internal: ready twice".to_string()),
    };
    report_end(
        ctx,
        name,
        &record.spec.paths,
        code,
        &why,
        ready_line.as_deref(),
        started.elapsed(),
    )
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
    code: Outcome,
    why: &str,
    ready_line: Option<&str>,
    elapsed: Duration,
) -> anyhow::Result<Outcome> {
    if code == Outcome::Failed {
        let tail = drydock_vm::log_tail(&paths.console_log(), 15);
        eprintln!(
            "drydock: {name}: {why}\n--- last console lines ({}) ---\n{tail}",
            paths.console_log().display()
        );
    } else {
        eprintln!("drydock: {name}: {why}");
    }
    if ctx.json {
        let result = match code {
            Outcome::Success => "ok",
            Outcome::Failed => "failed",
            _ => "interrupted",
        };
        let report = LaunchReport {
            name,
            result,
            reason: Some(why),
            ready_line,
            qemu_pid: None,
            seconds: elapsed.as_secs_f64(),
            console_log: Some(paths.console_log()),
        };
        crate::out::json(&mut crate::out::stdout(), &report)?;
    }
    Ok(code)
}

fn launch_error(e: drydock_vm::LaunchError) -> anyhow::Error {
    if e.is_bad_input() {
        bad_input(format!("{:#}", anyhow!(e)))
    } else {
        anyhow!(e)
    }
}

/// Start the detached supervisor of a VM (see [`drydock_vm::spawn_supervisor`]).
pub(super) fn spawn_supervisor(
    ctx: &Context,
    name: &str,
    paths: &VmPaths,
    incoming: Option<(&str, &str)>,
) -> anyhow::Result<(u32, VmState)> {
    let exe = std::env::current_exe().context("locating the drydock binary")?;
    let sup = drydock_vm::SupervisorCommand {
        exe: &exe,
        state_dir: &ctx.state_dir,
        store_root: ctx.store_root.as_deref(),
        name,
        incoming,
    };
    Ok(drydock_vm::spawn_supervisor(&sup, paths, &CANCEL)?)
}

/// `--detach`: a supervisor process owns the VM; wait here until it is ready.
fn detach(
    ctx: &Context,
    name: &str,
    record: &LaunchRecord,
    wait: &Wait,
) -> anyhow::Result<Outcome> {
    let paths = &record.spec.paths;
    let started = Instant::now();
    let (_, state) = spawn_supervisor(ctx, name, paths, None)?;
    let mut tail = ConsoleTail::new(paths.console_log());
    let mut echo = echo_to(ctx.json, name);
    let outcome = wait.follow(&mut tail, &mut || !state.qemu_alive(), &mut echo);
    match outcome {
        WaitOutcome::Ready(line) => {
            eprintln!(
                "drydock: {name} ready after {:.2} s; running in the background (pid {}); `drydock vm stop {name}` stops it",
                started.elapsed().as_secs_f64(),
                state.qemu_pid,
            );
            if ctx.json {
                let report = LaunchReport {
                    name,
                    result: "ready",
                    reason: None,
                    ready_line: Some(&line),
                    qemu_pid: Some(state.qemu_pid),
                    seconds: started.elapsed().as_secs_f64(),
                    console_log: None,
                };
                crate::out::json(&mut crate::out::stdout(), &report)?;
            }
            Ok(Outcome::Success)
        }
        other => {
            drydock_vm::stop_remote(paths, &state, drydock_vm::POWERDOWN_GRACE, false)?;
            let (code, why) = match other {
                WaitOutcome::TimedOut => (
                    Outcome::Failed,
                    format!(
                        "not ready after {:.1} s; VM stopped",
                        started.elapsed().as_secs_f64()
                    ),
                ),
                WaitOutcome::Cancelled => (Outcome::Interrupted, "interrupted; VM stopped".into()),
                _ => (
                    Outcome::Failed,
                    "the VM stopped before it became ready".into(),
                ),
            };
            report_end(ctx, name, paths, code, &why, None, started.elapsed())
        }
    }
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
    let mut vm = drydock_vm::start(&record.spec, record.share.as_ref(), a.incoming.as_deref())?;
    eprintln!(
        "drydock: supervising {} (QEMU pid {})",
        a.name, vm.state.qemu_pid
    );
    if a.incoming.is_some() {
        // Load the snapshot (bounded), resume the guest, tell the waiting `vm restore`.
        let tag = a.snapshot_tag.as_deref().unwrap_or("default");
        if let Err(e) = drydock_vm::resume_incoming(&mut vm, tag, Duration::from_secs(120)) {
            vm.stop(Duration::ZERO)?;
            return Err(anyhow!(e));
        }
        eprintln!("drydock: {} resumed from its snapshot", a.name);
    }
    while vm.exited().is_none() && !CANCEL.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = vm.exited();
    vm.stop(drydock_vm::POWERDOWN_GRACE)?;
    finish_run(ctx, &record, status.or_else(|| vm.exited()));
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
    let paths = vm_paths(ctx, &a.name)?;
    let wait = Wait::from_args(&a.wait)?;
    let mut record = existing_record(ctx, &paths, &a.name)?;
    drydock_vm::recorded_store(&record, &ctx.layout(), explicit_store(ctx))?;
    if let Some(state) = VmState::read(&paths) {
        drydock_vm::stop_remote(&paths, &state, drydock_vm::POWERDOWN_GRACE, false)?;
    }
    if let Err(missing) = check_pinned(&record) {
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

/// Every file the recorded launch needs must still be there (they are pinned, but someone may
/// have deleted them by hand): name the first one that is not.
fn check_pinned(record: &LaunchRecord) -> Result<(), String> {
    let spec = &record.spec;
    let mut files: Vec<(&str, PathBuf)> = vec![("kernel", spec.kernel.clone())];
    if let Some(i) = &spec.initrd {
        files.push(("initrd", i.clone()));
    }
    if let StoreAttachment::Image { path } = &spec.store {
        files.push(("store image", path.clone()));
    }
    if let Some(share) = &record.share {
        for name in share.allow.iter().flatten() {
            files.push(("store path", share.shared_dir.join(name)));
        }
    }
    match files
        .into_iter()
        .find(|(_, p)| std::fs::symlink_metadata(p).is_err())
    {
        Some((what, p)) => Err(format!("the pinned {what} {} is gone", p.display())),
        None => Ok(()),
    }
}

fn stop(ctx: &Context, a: &VmStopArgs) -> anyhow::Result<Outcome> {
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
    let mut tail = ConsoleTail::new(log);
    let mut out = crate::out::stdout();
    if !a.follow {
        for l in tail.lines() {
            writeln!(out, "{l}")?;
        }
        if let Some(r) = tail.rest() {
            writeln!(out, "{r}")?;
        }
        out.flush()?;
        return Ok(Outcome::Success);
    }
    install_cancel_handler();
    // A reader that went away ends the follow, quietly.
    let failed = std::cell::RefCell::new(None);
    let mut echo = |l: &str| {
        if failed.borrow().is_none() {
            if let Err(e) = writeln!(out, "{l}").and_then(|()| out.flush()) {
                *failed.borrow_mut() = Some(e);
            }
        }
    };
    let mut gone =
        || failed.borrow().is_some() || VmState::read(&paths).is_none_or(|s| !s.qemu_alive());
    drydock_vm::follow(&mut tail, None, None, &CANCEL, &mut gone, &mut echo);
    if let Some(e) = failed.take() {
        return Err(e.into());
    }
    Ok(Outcome::Success)
}
