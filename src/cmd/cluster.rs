//! `drydock up|down|ps|exec|wait|shell|logs` and the hidden `__cluster-supervise` that owns a detached cluster:
//! argument handling over `drydock_vm`'s cluster module (evaluation, planning, the one tracked
//! build, hubs, machines, backdoors).

use std::io::Write;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use drydock_cluster::{
    ClusterLaunch, ClusterPlan, ClusterState, ReloadReport, UpEvent, UpRequest, Watching,
};
use drydock_vm::{VmPaths, VmState};

use crate::cancel::CANCEL;
use crate::cli::{
    AccelArg, ClusterArgs, ClusterSuperviseArgs, ExecArgs, LogsArgs, MachineWaitArgs, ShellArgs,
    UpArgs,
};
use crate::cmd::reload::{Echo, UpPrinter, report_event};
use crate::context::Context;
use crate::exit::{Outcome, bad_input};

pub fn cluster_name(a: &ClusterArgs) -> anyhow::Result<String> {
    let name = a
        .name
        .clone()
        .unwrap_or_else(|| drydock_cluster::default_cluster_name(&a.file));
    drydock_cluster::validate_cluster_name(&name)?;
    Ok(name)
}

fn launch_opts(
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
        log_limit,
    })
}

/// What `up`'s arguments ask of the composition.
fn up_request(a: &UpArgs, name: &str) -> UpRequest {
    UpRequest {
        file: a.cluster.file.clone(),
        name: name.to_string(),
        machines: a.machines.clone(),
        mentioned: a.hide.iter().chain(&a.show).cloned().collect(),
        restart: a.restart,
        dry_run: a.dry_run,
        ready_timeout: a.timeout,
        build_timeout: a.build_timeout,
        allow_overcommit: a.allow_overcommit,
        watch: a.watch,
    }
}

/// `up`: evaluate, plan, build (one tracked run), then boot in the foreground or detached. On
/// a cluster that is up: a hot reload (see `reload`).
pub fn up(ctx: &Context, a: &UpArgs) -> anyhow::Result<Outcome> {
    let name = cluster_name(&a.cluster)?;
    crate::cancel::install();
    let req = up_request(a, &name);
    if let Some(s) = ClusterState::read_up(&ctx.state_dir, &name) {
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
                if ClusterState::read_up(&ctx.state_dir, &name).is_some_and(|s| s.ready) {
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
        "drydock: cluster {} up after {:.2} s ({} machines); Ctrl-C stops it",
        plan.name,
        started.elapsed().as_secs_f64(),
        plan.machines.len()
    );
    let mut watching = match a.watch {
        true => {
            let mut w = Watching::new(&a.cluster.file, &ctx.state_dir)?;
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
    };
    match drydock_cluster::start_detached(&owner, &CANCEL) {
        Ok(d) => {
            eprintln!(
                "drydock: cluster {name} up after {:.2} s ({} machines, owner pid {}); `drydock down -p {name}` stops it",
                d.after_secs,
                plan.machines.len(),
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
    let opts = launch_opts(ctx, a.accel, a.qemu.as_deref(), a.timeout, a.log_limit)?;
    let mut cluster = drydock_cluster::cluster_up(&plan, &opts, &CANCEL, &mut |ev| {
        if let UpEvent::Machine(ev) = ev {
            report_event(ev);
        }
    })?;
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
    let name = cluster_name(a)?;
    let d = drydock_cluster::cluster_down(&ctx.state_dir, &name)?;
    if ctx.json {
        crate::out::json(&mut crate::out::stdout(), &d)?;
    } else if !d.was_up {
        eprintln!(
            "drydock: the cluster {name} is not up{}",
            match d.runs_ended {
                0 => String::new(),
                n => format!(" (the {n} runs its machines had left open are ended now)"),
            }
        );
    } else {
        eprintln!(
            "drydock: cluster {name} down ({} machines) in {:.2} s{}",
            d.machines,
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
}

pub fn ps(ctx: &Context, a: &ClusterArgs) -> anyhow::Result<Outcome> {
    let name = cluster_name(a)?;
    let Some(state) = ClusterState::read(&ctx.state_dir, &name) else {
        return Err(bad_input(format!("the cluster {name} is not up")));
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
    exec_vm(&vm, &paths, &a.command, a.timeout)
}

/// A machine of an up cluster: its VM name and folder; bad input if the cluster is not up or
/// has no such machine.
fn up_machine(ctx: &Context, a: &ClusterArgs, machine: &str) -> anyhow::Result<(String, VmPaths)> {
    let m = drydock_cluster::up_machine(&ctx.state_dir, &cluster_name(a)?, machine)?;
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

/// Run `words` (joined with spaces, as `ssh` does) in the VM `vm`; its outputs become ours and
/// its exit status our exit code. Ctrl-C or SIGTERM kills the command in the guest: exit 130.
pub fn exec_vm(
    vm: &str,
    paths: &VmPaths,
    words: &[String],
    timeout: Duration,
) -> anyhow::Result<Outcome> {
    let o = match drydock_cluster::exec_remote(vm, paths, &words.join(" "), timeout, Some(&CANCEL))
    {
        Err(drydock_cluster::ClusterError::Interrupted) => return Ok(Outcome::Interrupted),
        r => r?,
    };
    std::io::stderr().write_all(&o.stderr)?;
    let mut out = std::io::stdout().lock();
    out.write_all(&o.stdout)?;
    out.flush()?;
    Ok(Outcome::Code(o.status.clamp(0, 255) as u8))
}

/// `logs`: the machines' timed console logs, merged in time order.
pub fn logs(ctx: &Context, a: &LogsArgs) -> anyhow::Result<Outcome> {
    let name = cluster_name(&a.cluster)?;
    let path = drydock_cluster::up_plan_file(&ctx.state_dir, &name);
    let bytes = drydock_gc::read_regular(
        &path,
        drydock_gc::Links::Refuse,
        drydock_gc::MAX_STATE_BYTES,
    )
    .map_err(|_| bad_input(format!("the cluster {name} was never up here")))?;
    let plan: ClusterPlan = serde_json::from_slice(&bytes)?;
    for m in a.machines.iter().chain(&a.hide) {
        if plan.machine(m).is_none() {
            return Err(bad_input(format!("the cluster {name} has no machine {m}")));
        }
    }
    let chosen: Vec<_> = plan
        .machines
        .iter()
        .filter(|m| a.machines.is_empty() || a.machines.contains(&m.machine))
        .filter(|m| !a.hide.contains(&m.machine))
        .collect();
    let width = chosen.iter().map(|m| m.machine.len()).max().unwrap_or(0);
    crate::cancel::install();
    let machines: Vec<(String, VmPaths)> = chosen
        .iter()
        .map(|m| {
            let paths = VmPaths::in_state_dir(&ctx.state_dir, &m.vm_name);
            (m.machine.clone(), paths)
        })
        .collect();
    let mut out = crate::out::stdout();
    drydock_cluster::follow_logs(
        &ctx.state_dir,
        &name,
        &machines,
        a.follow,
        &CANCEL,
        &mut |_, m, line| {
            writeln!(out, "{m:width$} │ {}", drydock_vm::escape_control(line))?;
            out.flush()
        },
    )?;
    Ok(if CANCEL.is_set() {
        Outcome::Interrupted
    } else {
        Outcome::Success
    })
}
