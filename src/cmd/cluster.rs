//! `drydock up|down|ps|exec|wait|shell|logs` and the hidden `__cluster-supervise` that owns a detached cluster:
//! argument handling over `drydock_vm`'s cluster module (evaluation, planning, the one tracked
//! build, hubs, machines, backdoors).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use drydock_cluster::{
    ClusterLaunch, ClusterPlan, ClusterState, ReloadReport, UpEvent, UpRequest, Watching,
};
use drydock_vm::{VmPaths, VmState};

use crate::cancel::CANCEL;
use crate::cli::{
    AccelArg, ClusterArgs, ClusterSuperviseArgs, CpArgs, ExecArgs, ExecOpts, LogsArgs,
    MachineWaitArgs, ShellArgs, UpArgs,
};
use crate::cmd::reload::{Echo, UpPrinter, plural, report_event};
use crate::context::Context;
use crate::exit::{Outcome, bad_input};

/// The cluster a command names: its composition and its name, each given (before or after the
/// subcommand) or defaulted.
#[derive(Debug, Clone)]
pub struct Target {
    pub file: PathBuf,
    pub name: String,
    file_given: bool,
    name_given: bool,
}

/// A target as the arguments would give it (for other modules' tests).
#[cfg(test)]
pub(crate) fn test_target(file: &str, name: &str) -> Target {
    Target {
        file: file.into(),
        name: name.into(),
        file_given: true,
        name_given: false,
    }
}

/// Resolve `-f`/`-p` from before the subcommand (`ctx.compose`) and after it (`a`).
pub fn target(ctx: &Context, a: &ClusterArgs) -> anyhow::Result<Target> {
    resolve_target(&ctx.compose, a)
}

/// [`target`], from the options before the subcommand and after it (pure).
fn resolve_target(before: &crate::cli::ComposeOpts, a: &ClusterArgs) -> anyhow::Result<Target> {
    let files: Vec<&PathBuf> = before.file.iter().chain(&a.file).collect();
    if files.len() > 1 {
        let shown: Vec<String> = files
            .iter()
            .map(|f| format!("-f {}", f.display()))
            .collect();
        return Err(bad_input(format!(
            "{}: a cluster has one composition file; drydock does not merge files as docker compose does (import one from the other in Nix, e.g. `machines = (import ./base.nix).machines // {{ ... }}`)",
            shown.join(" ")
        )));
    }
    let name = match (&before.name, &a.name) {
        (Some(x), Some(y)) if x != y => {
            return Err(bad_input(format!(
                "-p {x} and -p {y}: a command acts on one cluster"
            )));
        }
        (x, y) => y.clone().or_else(|| x.clone()),
    };
    let file = files
        .first()
        .map(|f| f.to_path_buf())
        .unwrap_or_else(|| PathBuf::from("drydock.nix"));
    let t = Target {
        name: name
            .clone()
            .unwrap_or_else(|| drydock_cluster::default_cluster_name(&file)),
        file_given: !files.is_empty(),
        name_given: name.is_some(),
        file,
    };
    drydock_cluster::validate_cluster_name(&t.name)?;
    Ok(t)
}

impl Target {
    /// The composition a running cluster must have been started from: the one given, or the
    /// one its name came from; `None` when only `-p` names it. Such a composition must exist.
    pub fn checked_file(&self) -> Result<Option<&Path>, drydock_cluster::ClusterError> {
        if self.name_given && !self.file_given {
            return Ok(None);
        }
        if !self.file.is_file() {
            return Err(drydock_cluster::ClusterError::NoFile(
                std::path::absolute(&self.file).unwrap_or_else(|_| self.file.clone()),
            ));
        }
        Ok(Some(&self.file))
    }

    /// The cluster's record (its owner alive or not), checked against the composition; `None`
    /// when there is none.
    fn record(&self, ctx: &Context) -> anyhow::Result<Option<ClusterState>> {
        let file = self.checked_file()?;
        let Some(state) = ClusterState::read(&ctx.state_dir, &self.name) else {
            return Ok(None);
        };
        if let Some(f) = file {
            drydock_cluster::check_file(&state, f)?;
        }
        Ok(Some(state))
    }

    /// The not-up error for this cluster.
    fn not_up(&self, ctx: &Context) -> anyhow::Error {
        drydock_cluster::ClusterError::not_up(&ctx.state_dir, &self.name).into()
    }
}

pub(crate) fn launch_opts(
    ctx: &Context,
    a: AccelArg,
    qemu: Option<&Path>,
    timeout: Duration,
    log_limit: u64,
) -> anyhow::Result<ClusterLaunch> {
    Ok(ClusterLaunch {
        layout: ctx.layout(),
        state_dir: ctx.state_dir.clone(),
        exe: std::env::current_exe().context("locating the drydock binary")?,
        accel: drydock_vm::AccelChoice::from(a),
        qemu: qemu.map(Path::to_path_buf),
        ready_timeout: timeout,
        argv: std::env::args().collect(),
        run: None,
        log_limit,
    })
}

/// What `up`'s arguments ask of the composition.
fn up_request(ctx: &Context, a: &UpArgs, t: &Target) -> UpRequest {
    UpRequest {
        file: t.file.clone(),
        name: t.name.clone(),
        machines: a.machines.clone(),
        mentioned: a.hide.iter().chain(&a.show).cloned().collect(),
        restart: a.restart,
        dry_run: a.dry_run,
        ready_timeout: a.timeout,
        argv: std::env::args().collect(),
        show_build_outputs: ctx.verbose > 0,
        build_timeout: a.build_timeout,
        allow_overcommit: a.allow_overcommit,
        watch: a.watch,
    }
}

/// `up`: evaluate, plan, build (one tracked run), then boot in the foreground or detached. On
/// a cluster that is up: a hot reload (see `reload`).
pub fn up(ctx: &Context, a: &UpArgs) -> anyhow::Result<Outcome> {
    let t = target(ctx, &a.cluster)?;
    let name = t.name.clone();
    if !t.file.is_file() {
        return Err(drydock_cluster::ClusterError::NoFile(
            std::path::absolute(&t.file).unwrap_or_else(|_| t.file.clone()),
        )
        .into());
    }
    crate::cancel::install();
    let req = up_request(ctx, a, &t);
    if let Some(s) = ClusterState::read_up(&ctx.state_dir, &name) {
        drydock_cluster::check_file(&s, &t.file)?;
        if !s.ready {
            return Err(bad_input(format!(
                "the cluster {name} is still starting (owner pid {}); try again once it is up",
                s.owner_pid
            )));
        }
        return crate::cmd::reload::reload(ctx, a, &req);
    }
    // One `up` at a time starts a cluster: it holds the owner lock while it prepares, and the
    // owner holds it for its life (a dry run changes nothing and takes none). A second `up`
    // meanwhile is exit 2 naming the holder; once the cluster is up, `up` is a reload.
    let lock = match a.dry_run {
        true => None,
        false => match drydock_cluster::OwnerLock::claim(&ctx.state_dir, &name) {
            Ok(lock) => Some(lock),
            Err(e) => {
                // It came up meanwhile: a reload, from the file it was started from only.
                if let Some(s) = ClusterState::read_up(&ctx.state_dir, &name).filter(|s| s.ready) {
                    drydock_cluster::check_file(&s, &t.file)?;
                    return crate::cmd::reload::reload(ctx, a, &req);
                }
                return Err(e.into());
            }
        },
    };
    let mut printer = UpPrinter::new(ctx.json, None);
    // With --watch: what the evaluation read, which the watch reloads on.
    let mut reads = None;
    // What this `up` built stays rooted until `roots` is dropped: once every machine's run
    // pins its system (or the cluster is stopped, and nothing needs it).
    let drydock_cluster::Prepared { plan, roots, .. } = drydock_cluster::prepare_cluster(
        &ctx.layout(),
        &ctx.state_dir,
        &req,
        None,
        &CANCEL,
        &mut |ev| {
            if let UpEvent::Evaluated { reads: r, .. } = &ev {
                reads = Some((*r).clone());
            }
            printer.event(ev)
        },
    )?;
    let Some(lock) = lock else {
        return crate::cmd::reload::emit(ctx, &ReloadReport::fresh(&plan));
    };
    drydock_vm::write_json(&drydock_cluster::up_plan_file(&ctx.state_dir, &name), &plan)?;
    if a.detach {
        return detach(ctx, a, &name, &plan, &lock);
    }
    foreground(ctx, a, &req, &plan, roots, lock, reads)
}

fn foreground(
    ctx: &Context,
    a: &UpArgs,
    req: &UpRequest,
    plan: &ClusterPlan,
    roots: drydock_cluster::BuildRoots,
    // Held until this owner returns, everything stopped.
    _lock: drydock_cluster::OwnerLock,
    reads: Option<drydock_cluster::Reads>,
) -> anyhow::Result<Outcome> {
    let opts = launch_opts(ctx, a.accel, a.qemu.as_deref(), a.timeout, a.log_limit)?;
    let mut printer = UpPrinter::new(ctx.json, Some(Echo::new(a, plan)));
    let started = Instant::now();
    let up = drydock_cluster::cluster_up(plan, &opts, &CANCEL, &mut |ev| printer.event(ev));
    // Every machine's run pins its system now (or none runs): the build's roots can go.
    drop(roots);
    let mut cluster = match up {
        Ok(c) => c,
        Err(drydock_cluster::ClusterError::Interrupted) => {
            eprintln!("drydock: interrupted; every machine is stopped");
            return Ok(Outcome::Interrupted);
        }
        Err(e) => return Err(e.into()),
    };
    cluster.write_state(true)?;
    eprintln!(
        "drydock: cluster {} up after {:.2} s ({}); Ctrl-C stops it",
        plan.name,
        started.elapsed().as_secs_f64(),
        plural(plan.machines.len(), "machine")
    );
    let mut watching = match a.watch {
        true => {
            let mut w = Watching::new(&req.file, &ctx.state_dir)?;
            if let Some(r) = &reads {
                w.evaluated(r, true);
            }
            Some(w)
        }
        false => None,
    };
    cluster.own(watching.as_mut().map(|w| (w, req)), &CANCEL, &mut |ev| {
        printer.event(ev)
    });
    eprintln!("drydock: cluster {} stopped", plan.name);
    Ok(if CANCEL.load(Ordering::SeqCst) {
        Outcome::Interrupted
    } else {
        Outcome::Success
    })
}

/// `--detach`: a supervisor owns the cluster; wait here until every machine is ready.
fn detach(
    ctx: &Context,
    a: &UpArgs,
    name: &str,
    plan: &ClusterPlan,
    lock: &drydock_cluster::OwnerLock,
) -> anyhow::Result<Outcome> {
    let opts = launch_opts(ctx, a.accel, a.qemu.as_deref(), a.timeout, a.log_limit)?;
    let owner = drydock_cluster::DetachedOwner {
        plan,
        launch: &opts,
        store_root: ctx.store_root.as_deref(),
        lock,
        idle: false,
        restore: None,
    };
    let mut progress =
        crate::progress::Progress::new(plan.machines.iter().map(|m| m.machine.clone()));
    let log = drydock_cluster::cluster_paths(&ctx.state_dir, name)
        .dir
        .join("drydock.log");
    let look = |progress: &mut crate::progress::Progress| {
        // The owner's log is new for this boot: it says which machines are ready.
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let ready = crate::cmd::reload::ready_in_log(&text);
        progress.update(|m| ready.iter().find(|(r, _)| r == m).map(|(_, s)| *s));
    };
    // The progress line is redrawn from the owner's log every 250 ms by a thread of its own,
    // while the library waits for the owner (blocking) here.
    let (done, stop) = std::sync::mpsc::channel::<()>();
    let started = std::thread::scope(|scope| {
        let progress = &mut progress;
        let look = &look;
        scope.spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stop.recv_timeout(Duration::from_millis(250))
            {
                look(progress);
            }
        });
        let started = drydock_cluster::start_detached(&owner, &CANCEL);
        drop(done);
        started
    });
    if started.is_ok() {
        look(&mut progress);
    }
    progress.clear();
    match started {
        Ok(d) => {
            eprintln!(
                "drydock: cluster {name} up after {:.2} s ({}, owner pid {}); `drydock down -p {name}` stops it",
                d.after_secs,
                plural(plan.machines.len(), "machine"),
                d.owner_pid
            );
            Ok(Outcome::Success)
        }
        Err(drydock_cluster::ClusterError::Interrupted) => {
            eprintln!("drydock: interrupted; every machine is stopped");
            Ok(Outcome::Interrupted)
        }
        Err(e) => Err(e.into()),
    }
}

/// `__cluster-supervise`: own the cluster planned in `up.json` until `down` (SIGTERM).
pub fn supervise(ctx: &Context, a: &ClusterSuperviseArgs) -> anyhow::Result<Outcome> {
    crate::cancel::install();
    // The owner lock the `up` that started us handed over (our stdin), held for our life.
    let _lock = drydock_cluster::OwnerLock::inherit_or_claim(&ctx.state_dir, &a.name)?;
    let path = drydock_cluster::up_plan_file(&ctx.state_dir, &a.name);
    let bytes = drydock_gc::read_regular(
        &path,
        drydock_gc::Links::Refuse,
        drydock_gc::MAX_STATE_BYTES,
    )
    .with_context(|| format!("reading {}", path.display()))?;
    let plan: ClusterPlan = serde_json::from_slice(&bytes)?;
    let mut opts = launch_opts(ctx, a.accel, a.qemu.as_deref(), a.timeout, a.log_limit)?;
    opts.run = a.run;
    let mut on = |ev: UpEvent<'_>| {
        if let UpEvent::Machine(ev) = ev {
            report_event(ev);
        }
    };
    let mut cluster = match (&a.restore, a.idle) {
        (Some(tag), _) => drydock_cluster::start_restored(&plan, tag, &opts, &CANCEL, &mut on)?,
        (None, true) => drydock_cluster::start_idle(&plan, &opts, &CANCEL, &mut on)?,
        (None, false) => drydock_cluster::cluster_up(&plan, &opts, &CANCEL, &mut on)?,
    };
    cluster.write_state(true)?;
    cluster.own(None, &CANCEL, &mut |ev| {
        if let UpEvent::Machine(ev) = ev {
            report_event(ev);
        }
    });
    eprintln!("drydock: cluster {} stopped", plan.name);
    Ok(Outcome::Success)
}

/// `down`: ask the owner to stop everything and wait; then make sure no machine is left.
pub fn down(ctx: &Context, a: &ClusterArgs) -> anyhow::Result<Outcome> {
    let t = target(ctx, a)?;
    let name = t.name.clone();
    if t.record(ctx)?.is_none() {
        return Err(t.not_up(ctx));
    }
    let d = drydock_cluster::cluster_down(&ctx.state_dir, &name)?;
    if ctx.json {
        crate::out::json(&mut crate::out::stdout(), &d)?;
    } else if !d.was_up {
        if d.runs_ended > 0 {
            eprintln!(
                "drydock: the {} its machines had left open {} ended now",
                plural(d.runs_ended, "run"),
                if d.runs_ended == 1 { "is" } else { "are" }
            );
        }
        return Err(t.not_up(ctx));
    } else {
        eprintln!(
            "drydock: cluster {name} down ({}) in {:.2} s{}",
            plural(d.machines, "machine"),
            d.after_secs,
            if d.killed {
                " (its owner did not stop in time and was killed)"
            } else {
                ""
            }
        );
    }
    Ok(Outcome::Success)
}

/// One row of `ps`.
#[derive(Debug, serde::Serialize)]
struct PsRow {
    machine: String,
    vm: String,
    state: &'static str,
    qemu_pid: Option<u32>,
    addresses: Vec<String>,
    system: String,
    uptime_secs: Option<u64>,
    /// Why a `failed` machine failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    problem: Option<String>,
    /// `drydock` or `nixos-test`.
    profile: &'static str,
    /// What of the store the guest sees, and how.
    store: &'static str,
    /// The host folder the guest sees as `shared` (nixos-test machines whose fstab has it).
    #[serde(skip_serializing_if = "Option::is_none")]
    shared: Option<PathBuf>,
}

/// What of the store a launch shows its guest, and how, in words.
fn store_words(r: &drydock_vm::LaunchRecord) -> &'static str {
    use drydock_vm::StoreAttachment as S;
    match (&r.spec.store, r.share.as_ref().map(|s| s.allow.is_some())) {
        (S::VirtioFs { .. }, Some(true)) => "closure, read-only, virtio-fs",
        (S::VirtioFs { .. }, _) => "whole store, read-only, virtio-fs",
        (S::Image { .. }, _) => "closure image, read-only",
        (S::NineP { .. }, _) => "whole store, read-only, 9p",
        (S::None, _) => "none",
    }
}

pub fn ps(ctx: &Context, a: &ClusterArgs) -> anyhow::Result<Outcome> {
    let t = target(ctx, a)?;
    let Some(state) = t.record(ctx)? else {
        return Err(t.not_up(ctx));
    };
    let now = drydock_gc::epoch_secs().max(0) as u64;
    let rows: Vec<PsRow> = state
        .plan
        .machines
        .iter()
        .map(|m| {
            let paths = VmPaths::in_state_dir(&ctx.state_dir, &m.vm_name);
            let vs = VmState::read(&paths);
            let alive = vs.as_ref().is_some_and(|s| s.qemu_alive());
            // A machine that lost its store server is stopped by its owner, which says why.
            let problem = drydock_cluster::machine_failure(&paths).filter(|_| !alive);
            let record = drydock_vm::LaunchRecord::read(&paths).ok();
            PsRow {
                machine: m.machine.clone(),
                vm: m.vm_name.clone(),
                state: match (alive, &problem) {
                    (true, _) => "running",
                    (false, Some(_)) => "failed",
                    (false, None) => "stopped",
                },
                qemu_pid: vs.as_ref().filter(|_| alive).map(|s| s.qemu_pid),
                addresses: m.nics.iter().map(|n| format!("{}/24", n.address)).collect(),
                system: m.settings.system.target().to_string(),
                uptime_secs: vs
                    .as_ref()
                    .filter(|_| alive)
                    .map(|s| now.saturating_sub(s.started)),
                problem,
                profile: m.settings.profile.as_str(),
                store: record.as_ref().map_or("-", store_words),
                shared: record.as_ref().and_then(|r| {
                    r.spec
                        .shares
                        .iter()
                        .find(|s| s.tag == "shared")
                        .map(|s| s.dir.clone())
                }),
            }
        })
        .collect();
    let mut out = crate::out::stdout();
    if ctx.json {
        crate::out::json(&mut out, &rows)?;
    } else {
        writeln!(
            out,
            "{:<16} {:<8} {:>8} {:<28} {:>8}  SYSTEM",
            "MACHINE", "STATE", "PID", "ADDRESSES", "UPTIME"
        )?;
        for r in &rows {
            writeln!(
                out,
                "{:<16} {:<8} {:>8} {:<28} {:>8}  {}",
                r.machine,
                r.state,
                r.qemu_pid.map(|p| p.to_string()).unwrap_or("-".into()),
                if r.addresses.is_empty() {
                    "-".to_string()
                } else {
                    r.addresses.join(",")
                },
                r.uptime_secs.map(|s| format!("{s}s")).unwrap_or("-".into()),
                r.system
            )?;
        }
        let nixos: Vec<String> = rows
            .iter()
            .filter(|r| r.profile != "drydock")
            .map(|r| format!("{} ({}: store {})", r.machine, r.profile, r.store))
            .collect();
        if !nixos.is_empty() {
            writeln!(out, "profiles: {}", nixos.join(", "))?;
        }
        if let Some(dir) = rows.iter().find_map(|r| r.shared.as_ref()) {
            writeln!(
                out,
                "shared folder (/tmp/shared in the guests): {}",
                dir.display()
            )?;
        }
        for r in rows.iter().filter(|r| r.problem.is_some()) {
            writeln!(
                out,
                "{}: {}",
                r.machine,
                r.problem.as_deref().unwrap_or_default()
            )?;
        }
    }
    Ok(Outcome::Success)
}

/// `exec MACHINE -- CMD...`.
pub fn exec(ctx: &Context, a: &ExecArgs) -> anyhow::Result<Outcome> {
    let (vm, paths) = up_machine(ctx, &a.cluster, &a.machine)?;
    crate::cancel::install();
    exec_vm(ctx, &vm, &paths, &a.exec)
}

/// A machine of an up cluster: its VM name and folder; bad input if the cluster is not up or
/// has no such machine.
fn up_machine(ctx: &Context, a: &ClusterArgs, machine: &str) -> anyhow::Result<(String, VmPaths)> {
    let t = target(ctx, a)?;
    let m = drydock_cluster::up_machine(&ctx.state_dir, &t.name, t.checked_file()?, machine)?;
    let paths = VmPaths::in_state_dir(&ctx.state_dir, &m.vm);
    Ok((m.vm, paths))
}

/// `wait MACHINE (--console REGEX | --succeeds CMD)`.
pub fn wait(ctx: &Context, a: &MachineWaitArgs) -> anyhow::Result<Outcome> {
    let what = match (&a.console, &a.succeeds) {
        (Some(re), _) => drydock_cluster::WaitFor::Console(
            regex::Regex::new(re).map_err(|e| bad_input(format!("--console {re:?}: {e}")))?,
        ),
        (None, Some(cmd)) => drydock_cluster::WaitFor::Succeeds(cmd.clone()),
        (None, None) => return Err(bad_input("give --console REGEX or --succeeds CMD")),
    };
    let (vm, paths) = up_machine(ctx, &a.cluster, &a.machine)?;
    crate::cancel::install();
    let r = drydock_cluster::wait_machine(&vm, &paths, &what, a.timeout, &CANCEL)?;
    if ctx.json {
        crate::out::json(&mut crate::out::stdout(), &r)?;
    } else if r.met {
        match &what {
            drydock_cluster::WaitFor::Console(_) => eprintln!(
                "drydock: {} printed {:?} after {:.1} s",
                a.machine,
                drydock_vm::escape_control(r.lines.first().map(String::as_str).unwrap_or("")),
                r.after_secs
            ),
            drydock_cluster::WaitFor::Succeeds(cmd) => eprintln!(
                "drydock: `{cmd}` succeeded on {} after {:.1} s ({} tries)",
                a.machine, r.after_secs, r.tries
            ),
        }
    } else {
        match &what {
            drydock_cluster::WaitFor::Console(re) => {
                eprintln!(
                    "drydock: no console line of {} matched {:?} within {:.0} s; its last lines:",
                    a.machine,
                    re.as_str(),
                    r.after_secs
                );
                for l in &r.lines {
                    eprintln!("  {}", drydock_vm::escape_control(l));
                }
            }
            drydock_cluster::WaitFor::Succeeds(cmd) => {
                eprintln!(
                    "drydock: `{cmd}` did not succeed on {} within {:.0} s ({} tries); the last try exited {}:",
                    a.machine,
                    r.after_secs,
                    r.tries,
                    r.last_status.unwrap_or(-1)
                );
                for l in r
                    .last_stdout
                    .iter()
                    .chain(&r.last_stderr)
                    .flat_map(|t| t.lines())
                {
                    eprintln!("  {}", drydock_vm::escape_control(l));
                }
            }
        }
    }
    if CANCEL.load(Ordering::SeqCst) && !r.met {
        return Ok(Outcome::Interrupted);
    }
    Ok(if r.met {
        Outcome::Success
    } else {
        Outcome::Failed
    })
}

/// The terminal on stdin in raw mode (keys go to the guest's line editing as typed) until
/// dropped; set and restored with `stty`, as a shell script would.
struct RawTerminal {
    saved: String,
}

impl RawTerminal {
    fn enter() -> Option<Self> {
        use std::io::IsTerminal;
        if !std::io::stdin().is_terminal() {
            return None;
        }
        let stty = |args: &[&str]| {
            std::process::Command::new("stty")
                .args(args)
                .stdin(std::process::Stdio::inherit())
                .output()
                .ok()
                .filter(|o| o.status.success())
        };
        let saved = String::from_utf8(stty(&["-g"])?.stdout).ok()?;
        stty(&["raw", "-echo", "opost"])?;
        Some(Self {
            saved: saved.trim().to_string(),
        })
    }

    /// Rows and columns, as `stty size` prints them.
    fn size() -> Option<(u16, u16)> {
        let o = std::process::Command::new("stty")
            .arg("size")
            .stdin(std::process::Stdio::inherit())
            .output()
            .ok()?;
        let text = String::from_utf8(o.stdout).ok()?;
        let (r, c) = text.trim().split_once(' ')?;
        Some((r.parse().ok()?, c.parse().ok()?))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        let _ = std::process::Command::new("stty")
            .arg(&self.saved)
            .stdin(std::process::Stdio::inherit())
            .status();
    }
}

/// `shell MACHINE`: stdin to the guest's shell, its output to stdout, until it exits.
pub fn shell(ctx: &Context, a: &ShellArgs) -> anyhow::Result<Outcome> {
    let (vm, paths) = up_machine(ctx, &a.cluster, &a.machine)?;
    let size = RawTerminal::size();
    let raw = RawTerminal::enter();
    eprint!(
        "drydock: a root shell on {}; `exit`{} leaves{}",
        a.machine,
        if raw.is_some() {
            ", Ctrl-D or ~."
        } else {
            " or the end of input"
        },
        if raw.is_some() { "\r\n" } else { "\n" }
    );
    let opts = drydock_cluster::ShellOptions {
        size,
        escape: raw.is_some(),
    };
    // SIGTERM (and Ctrl-C off a raw terminal) ends the session; the terminal is restored.
    crate::cancel::install();
    let result = drydock_cluster::shell_remote(
        &vm,
        &paths,
        opts,
        std::io::stdin(),
        &mut std::io::stdout(),
        Some(&CANCEL),
    );
    drop(raw);
    match result {
        Err(drydock_cluster::ClusterError::Interrupted) => Ok(Outcome::Interrupted),
        r => r.map(|()| Outcome::Success).map_err(Into::into),
    }
}

/// `exec`'s report with `--json`: the outputs as text (invalid UTF-8 replaced).
#[derive(Debug, serde::Serialize)]
struct ExecReport {
    status: i32,
    timed_out: bool,
    stdout: String,
    stderr: String,
}

/// Run `a.command` in the VM `vm` (one word: a command line; several: an argv), with our
/// stdin when it is not a terminal (or `-i`); its outputs become ours and its exit status our
/// exit code. Ctrl-C or SIGTERM kills the command in the guest: exit 130.
pub fn exec_vm(ctx: &Context, vm: &str, paths: &VmPaths, a: &ExecOpts) -> anyhow::Result<Outcome> {
    let command = drydock_cluster::GuestCommand::from_words(a.command.clone());
    if a.tty {
        return exec_tty(ctx, vm, paths, &command);
    }
    let stdin = read_stdin(a.interactive)?;
    let started = Instant::now();
    let o = match drydock_cluster::exec_in(vm, paths, &command, &stdin, a.timeout, Some(&CANCEL)) {
        Err(drydock_cluster::ClusterError::Interrupted) => return Ok(Outcome::Interrupted),
        r => r?,
    };
    // 124 is also what the watchdog reports; a command that said 124 itself did so early.
    let timed_out = o.status == 124 && started.elapsed() >= a.timeout;
    if ctx.json {
        let report = ExecReport {
            status: o.status,
            timed_out,
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        };
        crate::out::json(&mut crate::out::stdout(), &report)?;
    } else {
        std::io::stderr().write_all(&o.stderr)?;
        let mut out = crate::out::stdout();
        out.write_all(&o.stdout)?;
        out.flush()?;
    }
    if timed_out {
        eprintln!(
            "drydock: `{}` did not finish on {vm} within {} s (--timeout); it was killed, exit 124",
            command.shown(),
            secs(a.timeout)
        );
    }
    Ok(Outcome::Code(o.status.clamp(0, 255) as u8))
}

/// `exec -t`: the command in a session, as `shell` runs its shell, on this terminal.
fn exec_tty(
    ctx: &Context,
    vm: &str,
    paths: &VmPaths,
    command: &drydock_cluster::GuestCommand,
) -> anyhow::Result<Outcome> {
    use std::io::IsTerminal;
    if !std::io::stdin().is_terminal() {
        return Err(bad_input(
            "exec -t needs a terminal on stdin (without -t, stdin is forwarded to the command)",
        ));
    }
    if ctx.json {
        return Err(bad_input(
            "exec -t prints the command's terminal as it comes: it has no --json report",
        ));
    }
    let size = RawTerminal::size();
    let raw = RawTerminal::enter();
    let opts = drydock_cluster::ShellOptions {
        size,
        escape: raw.is_some(),
    };
    let status = drydock_cluster::exec_tty(
        vm,
        paths,
        command,
        opts,
        std::io::stdin(),
        &mut std::io::stdout(),
        Some(&CANCEL),
    );
    drop(raw);
    match status {
        Err(drydock_cluster::ClusterError::Interrupted) => Ok(Outcome::Interrupted),
        s => Ok(Outcome::Code(s?.clamp(0, 255) as u8)),
    }
}

/// Seconds as the user would write them.
fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0}")
    } else {
        format!("{s}")
    }
}

/// Our stdin for the guest's command: read to its end unless it is a terminal (or `forced`);
/// bounded.
fn read_stdin(forced: bool) -> anyhow::Result<Vec<u8>> {
    use std::io::{IsTerminal, Read};
    let stdin = std::io::stdin();
    if !forced && stdin.is_terminal() {
        return Ok(Vec::new());
    }
    let max = drydock_cluster::MAX_STDIN;
    let mut bytes = Vec::new();
    match stdin.lock().take(max as u64 + 1).read_to_end(&mut bytes) {
        Ok(_) => {}
        // No stdin at all (a closed descriptor): nothing to forward.
        Err(e) if e.raw_os_error() == Some(libc::EBADF) => return Ok(Vec::new()),
        Err(e) => return Err(anyhow::Error::new(e).context("reading stdin")),
    }
    if bytes.len() > max {
        return Err(bad_input(format!(
            "stdin is more than {} MiB, the most a command takes; `drydock cp` copies files",
            max >> 20
        )));
    }
    Ok(bytes)
}

/// `MACHINE:PATH` as (machine, path); `None` for a host path (a `/` before any `:`, no `:`, or
/// nothing before it: write `./a:b` for a host file named `a:b`).
fn remote_path(arg: &str) -> Option<(&str, &str)> {
    let (machine, path) = arg.split_once(':')?;
    (!machine.is_empty() && !machine.contains('/')).then_some((machine, path))
}

/// `cp SRC DST`: one of them `MACHINE:PATH`. Ctrl-C or SIGTERM ends it (exit 130), the guest's
/// side killed.
pub fn cp(ctx: &Context, a: &CpArgs) -> anyhow::Result<Outcome> {
    crate::cancel::install();
    let report = match (remote_path(&a.src), remote_path(&a.dst)) {
        (Some(_), Some(_)) | (None, None) => {
            return Err(bad_input(format!(
                "cp {} {}: exactly one of the two must be MACHINE:PATH (a host path with a `:` is written ./{})",
                a.src, a.dst, a.src
            )));
        }
        (_, Some((_, ""))) | (Some((_, "")), _) => {
            return Err(bad_input(
                "cp: a path in the machine is empty (MACHINE:PATH)",
            ));
        }
        (None, Some((machine, path))) => {
            let (vm, paths) = up_machine(ctx, &a.cluster, machine)?;
            drydock_cluster::copy_to_guest(
                &vm,
                &paths,
                Path::new(&a.src),
                path,
                a.timeout,
                Some(&CANCEL),
            )?
        }
        (Some((machine, path)), None) => {
            let (vm, paths) = up_machine(ctx, &a.cluster, machine)?;
            drydock_cluster::copy_from_guest(
                &vm,
                &paths,
                path,
                Path::new(&a.dst),
                a.timeout,
                Some(&CANCEL),
            )?
        }
    };
    if ctx.json {
        crate::out::json(&mut crate::out::stdout(), &report)?;
    } else {
        eprintln!(
            "drydock: copied {} to {} ({})",
            report.from,
            report.to,
            humansize::format_size(report.bytes, humansize::BINARY)
        );
    }
    Ok(Outcome::Success)
}

/// `logs`: the machines' timed console logs, merged in time order. A cluster that is not up
/// but was: its last run's logs, said so; one never up here: the not-up error.
pub fn logs(ctx: &Context, a: &LogsArgs) -> anyhow::Result<Outcome> {
    let t = target(ctx, &a.cluster())?;
    let name = t.name.clone();
    let record = t.record(ctx)?;
    let up_now = record.as_ref().is_some_and(ClusterState::owner_alive);
    let path = drydock_cluster::up_plan_file(&ctx.state_dir, &name);
    let Ok(bytes) = drydock_gc::read_regular(
        &path,
        drydock_gc::Links::Refuse,
        drydock_gc::MAX_STATE_BYTES,
    ) else {
        return Err(t.not_up(ctx));
    };
    let plan: ClusterPlan = serde_json::from_slice(&bytes)?;
    if let (Some(f), false) = (t.checked_file()?, up_now)
        && let Some(last) = &plan.file
        && std::fs::canonicalize(f).ok() != std::fs::canonicalize(last).ok()
    {
        // Its last run came from another composition: not this file's cluster.
        return Err(t.not_up(ctx));
    }
    for m in a.machines.iter().chain(&a.hide) {
        if plan.machine(m).is_none() {
            return Err(drydock_cluster::ClusterError::NoMachine {
                cluster: name.clone(),
                machine: m.clone(),
                has: plan.machines.iter().map(|m| m.machine.clone()).collect(),
            }
            .into());
        }
    }
    if !up_now {
        eprintln!(
            "drydock: the cluster {name} is not up; these are the logs of its last run{}",
            if a.follow { " (nothing to follow)" } else { "" }
        );
    }
    let chosen: Vec<_> = plan
        .machines
        .iter()
        .filter(|m| a.machines.is_empty() || a.machines.contains(&m.machine))
        .filter(|m| !a.hide.contains(&m.machine))
        .collect();
    let width = chosen.iter().map(|m| m.machine.len()).max().unwrap_or(0);
    let paint = crate::paint::Paint::for_stdout();
    crate::cancel::install();
    let machines: Vec<(String, VmPaths)> = chosen
        .iter()
        .map(|m| {
            let paths = VmPaths::in_state_dir(&ctx.state_dir, &m.vm_name);
            (m.machine.clone(), paths)
        })
        .collect();
    let mut out = crate::out::stdout();
    let paint = &paint;
    drydock_cluster::follow_logs(
        &ctx.state_dir,
        &name,
        &machines,
        a.follow,
        a.tail,
        &CANCEL,
        &mut |ms, m, line| {
            let stamp = match a.timestamps {
                true => format!("{} ", utc_millis(ms)),
                false => String::new(),
            };
            writeln!(
                out,
                "{stamp}{} │ {}",
                paint.machine(m, width),
                drydock_vm::escape_control(line)
            )?;
            out.flush()
        },
    )?;
    Ok(if CANCEL.is_set() {
        Outcome::Interrupted
    } else {
        Outcome::Success
    })
}

/// Milliseconds since the epoch as UTC, `2026-12-03T17:40:12.345Z`.
fn utc_millis(ms: u64) -> String {
    let secs = ms / 1000;
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// `ls`: the clusters that are up.
pub fn ls(ctx: &Context) -> anyhow::Result<Outcome> {
    #[derive(serde::Serialize)]
    struct Row {
        name: String,
        file: Option<PathBuf>,
        machines: usize,
        since: Option<i64>,
        owner_pid: u32,
    }
    #[derive(serde::Serialize)]
    struct Report {
        clusters: Vec<Row>,
    }
    let rows: Vec<Row> = drydock_cluster::list_up(&ctx.state_dir)
        .into_iter()
        .map(|s| Row {
            file: s.plan.file.clone(),
            machines: s.plan.machines.len(),
            since: s.since,
            owner_pid: s.owner_pid,
            name: s.name,
        })
        .collect();
    let mut out = crate::out::stdout();
    if ctx.json {
        crate::out::json(&mut out, &Report { clusters: rows })?;
        return Ok(Outcome::Success);
    }
    if rows.is_empty() {
        eprintln!("drydock: no cluster is up");
        return Ok(Outcome::Success);
    }
    let now = drydock_gc::epoch_secs();
    writeln!(out, "{:<30} {:>8} {:>9}  FILE", "NAME", "MACHINES", "UP")?;
    for r in &rows {
        writeln!(
            out,
            "{:<30} {:>8} {:>9}  {}",
            r.name,
            r.machines,
            r.since
                .map(|t| age(now.saturating_sub(t).max(0) as u64))
                .unwrap_or_else(|| "-".into()),
            r.file
                .as_ref()
                .map(|f| f.display().to_string())
                .unwrap_or_else(|| "-".into())
        )?;
    }
    out.flush()?;
    Ok(Outcome::Success)
}

// A duration as `45s`, `12m`, `3h`, `2d` (one copy, shared with `drydock net`'s text).
pub(crate) use drydock_cluster::age;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_machine_path_is_a_name_and_a_colon_before_any_slash() {
        for (arg, want) in [
            ("server:/tmp/f", Some(("server", "/tmp/f"))),
            ("server:", Some(("server", ""))),
            ("server:rel/x", Some(("server", "rel/x"))),
            ("./a:b", None),
            ("/tmp/a:b", None),
            (":x", None),
            ("plain", None),
        ] {
            assert_eq!(remote_path(arg), want, "{arg}");
        }
    }

    #[test]
    fn f_and_p_combine_from_both_places() {
        use crate::cli::ComposeOpts;
        let p = |s: &str| PathBuf::from(s);
        type Want = Result<(&'static str, &'static str, bool, bool), &'static str>;
        let cases: [(ComposeOpts, ClusterArgs, Want); 6] = [
            (
                ComposeOpts::default(),
                ClusterArgs::default(),
                Ok(("drydock.nix", "", false, false)),
            ),
            (
                ComposeOpts {
                    file: vec![p("/x/demo/drydock.nix")],
                    name: None,
                },
                ClusterArgs::default(),
                Ok(("/x/demo/drydock.nix", "demo", true, false)),
            ),
            (
                ComposeOpts {
                    file: vec![],
                    name: Some("c1".into()),
                },
                ClusterArgs {
                    file: vec![p("/x/a.nix")],
                    name: None,
                },
                Ok(("/x/a.nix", "c1", true, true)),
            ),
            (
                ComposeOpts {
                    file: vec![p("a.nix")],
                    name: None,
                },
                ClusterArgs {
                    file: vec![p("b.nix")],
                    name: None,
                },
                Err("a cluster has one composition file"),
            ),
            (
                ComposeOpts::default(),
                ClusterArgs {
                    file: vec![p("a.nix"), p("a.nix")],
                    name: None,
                },
                Err("-f a.nix -f a.nix: a cluster has one"),
            ),
            (
                ComposeOpts {
                    file: vec![],
                    name: Some("a".into()),
                },
                ClusterArgs {
                    file: vec![],
                    name: Some("b".into()),
                },
                Err("-p a and -p b"),
            ),
        ];
        for (before, after, want) in cases {
            let got = resolve_target(&before, &after);
            match want {
                Ok((file, name, file_given, name_given)) => {
                    let t = got.unwrap();
                    assert_eq!(t.file, p(file));
                    if !name.is_empty() {
                        assert_eq!(t.name, name);
                    }
                    assert_eq!((t.file_given, t.name_given), (file_given, name_given));
                }
                Err(part) => {
                    let e = format!("{:#}", got.unwrap_err());
                    assert!(e.contains(part), "{e}");
                }
            }
        }
    }

    #[test]
    fn times_print_as_utc() {
        for (ms, want) in [
            (0, "1970-01-01T00:00:00.000Z"),
            (951_782_400_123, "2000-02-29T00:00:00.123Z"),
            (1_796_318_412_345, "2026-12-03T17:20:12.345Z"),
        ] {
            assert_eq!(utc_millis(ms), want);
        }
        assert_eq!(
            [age(5), age(125), age(7300), age(200_000)],
            ["5s", "2m", "2h", "2d"]
        );
    }
}
