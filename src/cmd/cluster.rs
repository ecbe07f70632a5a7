//! `drydock up|down|ps|exec|logs` and the hidden `__cluster-supervise` that owns a detached cluster:
//! argument handling over `drydock_vm`'s cluster module (evaluation, planning, the one tracked
//! build, hubs, machines, backdoors).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use drydock_vm::{
    ClusterLaunch, ClusterPlan, ClusterState, ConsoleTail, MachineEvent, VmPaths, VmState,
};

use crate::cancel::CANCEL;
use crate::cli::{AccelArg, ClusterArgs, ClusterSuperviseArgs, ExecArgs, LogsArgs, UpArgs};
use crate::context::Context;
use crate::exit::{Outcome, bad_input};

/// How long `down` waits for the owner to stop every machine.
const DOWN_DEADLINE: Duration = Duration::from_secs(120);

pub fn cluster_name(a: &ClusterArgs) -> anyhow::Result<String> {
    let name = a
        .name
        .clone()
        .unwrap_or_else(|| drydock_vm::default_cluster_name(&a.file));
    drydock_vm::validate_cluster_name(&name)?;
    Ok(name)
}

fn accel_word(a: AccelArg) -> &'static str {
    match a {
        AccelArg::Auto => "auto",
        AccelArg::Kvm => "kvm",
        AccelArg::Tcg => "tcg",
    }
}

fn launch_opts(
    ctx: &Context,
    a: AccelArg,
    qemu: Option<&Path>,
    timeout: Duration,
) -> anyhow::Result<ClusterLaunch> {
    Ok(ClusterLaunch {
        layout: ctx.layout(),
        state_dir: ctx.state_dir.clone(),
        exe: std::env::current_exe().context("locating the drydock binary")?,
        accel: drydock_vm::AccelChoice::from(a),
        qemu: qemu.map(Path::to_path_buf),
        ready_timeout: timeout,
        argv: std::env::args().collect(),
    })
}

pub fn plan_file(ctx: &Context, name: &str) -> std::path::PathBuf {
    drydock_vm::cluster_paths(&ctx.state_dir, name)
        .dir
        .join("up.json")
}

/// `up`: evaluate, plan, build (one tracked run), then boot in the foreground or detached. On
/// a cluster that is up: a hot reload (see `reload`).
pub fn up(ctx: &Context, a: &UpArgs) -> anyhow::Result<Outcome> {
    let name = cluster_name(&a.cluster)?;
    crate::cancel::install();
    if let Some(s) = ClusterState::read(&ctx.state_dir, &name).filter(ClusterState::owner_alive) {
        if !s.ready {
            return Err(bad_input(format!(
                "the cluster {name} is still starting (owner pid {}); try again once it is up",
                s.owner_pid
            )));
        }
        return crate::cmd::reload::reload(ctx, a, &name);
    }
    let (plan, _) = prepare(ctx, a, &name, None)?;
    if a.dry_run {
        return crate::cmd::reload::print_fresh_plan(ctx, &plan);
    }
    drydock_vm::write_json(&plan_file(ctx, &name), &plan)?;
    if a.detach {
        return detach(ctx, a, &name, &plan);
    }
    foreground(ctx, a, &plan)
}

/// How long evaluating and building took.
#[derive(Debug, Clone, Copy, Default)]
pub struct Phases {
    pub evaluate: Duration,
    pub build: Duration,
}

/// Evaluate the composition, plan the cluster and build its systems (one tracked run). With
/// `running` (a hot reload), machines left out on the command line keep their running plan.
pub fn prepare(
    ctx: &Context,
    a: &UpArgs,
    name: &str,
    running: Option<&ClusterPlan>,
) -> anyhow::Result<(ClusterPlan, Phases)> {
    let layout = ctx.layout();
    let t = Instant::now();
    let composition = drydock_vm::evaluate_composition(&layout, &a.cluster.file)?;
    let mut plan = drydock_vm::plan_cluster(name, &composition)?;
    let evaluate = t.elapsed();
    for m in a.machines.iter().chain(&a.hide).chain(&a.show) {
        if !composition.machines.contains_key(m) {
            return Err(drydock_vm::ComposeError::NoSuchMachine {
                file: composition.file.clone(),
                name: m.clone(),
            }
            .into());
        }
    }
    if !a.machines.is_empty() {
        let keep = |m: &drydock_vm::MachinePlan| a.machines.contains(&m.machine);
        plan.machines = plan
            .machines
            .iter()
            .filter_map(|m| {
                if keep(m) {
                    Some(m.clone())
                } else {
                    running.and_then(|r| r.machine(&m.machine).cloned())
                }
            })
            .collect();
        let mut vlans: Vec<u8> = plan
            .machines
            .iter()
            .flat_map(|m| m.settings.vlans.clone())
            .collect();
        vlans.sort_unstable();
        vlans.dedup();
        plan.vlans = vlans;
    }
    let names: Vec<&str> = plan
        .machines
        .iter()
        .filter(|m| a.machines.is_empty() || a.machines.contains(&m.machine))
        .map(|m| m.machine.as_str())
        .collect();
    let runs = drydock_gc::RunsDb::open(&ctx.state_dir).map_err(drydock_gc::GcError::from)?;
    let cdir = drydock_vm::cluster_paths(&ctx.state_dir, name).dir;
    let t = Instant::now();
    if let Some(report) = drydock_vm::build_composition(
        &layout,
        &runs,
        &composition,
        &names,
        &format!("cluster {name}"),
        &cdir,
        &CANCEL,
    )? {
        eprintln!(
            "drydock: built {} systems in {:.1} s (run {}, {} paths recorded)",
            names.len(),
            t.elapsed().as_secs_f64(),
            report.run_id,
            report.claimed.len()
        );
    }
    let build = t.elapsed();
    drydock_vm::check_systems(&layout, &composition, &names)?;
    Ok((plan, Phases { evaluate, build }))
}

pub fn shown(a: &UpArgs, machine: &str) -> bool {
    if !a.show.is_empty() {
        return a.show.iter().any(|m| m == machine);
    }
    !a.hide.iter().any(|m| m == machine)
}

pub fn report_event(ev: &MachineEvent) {
    match ev {
        MachineEvent::Ready { machine, after } => {
            eprintln!(
                "drydock: {machine} ready after {:.2} s",
                after.as_secs_f64()
            )
        }
        MachineEvent::Failed { machine, message } => {
            eprintln!("drydock: {machine} failed: {message}")
        }
        MachineEvent::Stopped { machine } => eprintln!("drydock: {machine} stopped"),
    }
}

fn foreground(ctx: &Context, a: &UpArgs, plan: &ClusterPlan) -> anyhow::Result<Outcome> {
    let opts = launch_opts(ctx, a.accel, a.qemu.as_deref(), a.timeout)?;
    let mut tails: BTreeMap<String, ConsoleTail> = plan
        .machines
        .iter()
        .filter(|m| shown(a, &m.machine))
        .map(|m| {
            let paths = VmPaths::in_state_dir(&ctx.state_dir, &m.vm_name);
            (m.machine.clone(), ConsoleTail::new(paths.console_log()))
        })
        .collect();
    let width = plan
        .machines
        .iter()
        .map(|m| m.machine.len())
        .max()
        .unwrap_or(0);
    let echo = |tails: &mut BTreeMap<String, ConsoleTail>| {
        let mut out = std::io::stdout().lock();
        for (m, t) in tails.iter_mut() {
            for line in t.lines() {
                let _ = writeln!(out, "{m:width$} │ {line}");
            }
        }
    };
    let started = Instant::now();
    let up = drydock_vm::cluster_up(plan, &opts, &CANCEL, &mut |ev| {
        if let Some(ev) = ev {
            report_event(ev);
        }
        echo(&mut tails);
    });
    let mut cluster = match up {
        Ok(c) => c,
        Err(drydock_vm::ClusterError::Interrupted) => {
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
        true => Some(crate::cmd::reload::Watching::new(&a.cluster.file)?),
        false => None,
    };
    while !CANCEL.load(Ordering::SeqCst) && !cluster.all_stopped() {
        echo(&mut tails);
        while let Ok(ev) = cluster.events.try_recv() {
            report_event(&ev);
        }
        let served = cluster.serve_control(&CANCEL, &mut |ev| {
            if let Some(ev) = ev {
                report_event(ev);
            }
            echo(&mut tails);
        });
        let due = watching.as_mut().and_then(|w| w.due());
        if let Some(changed) = &due {
            crate::cmd::reload::watched_change(ctx, a, &mut cluster, changed, &mut |ev| {
                if let Some(ev) = ev {
                    report_event(ev);
                }
                echo(&mut tails);
            });
        }
        if served || due.is_some() {
            // Machines a reload created get their console echoed, removed ones lose it.
            let _ = drydock_vm::write_json(&plan_file(ctx, &plan.name), &cluster.plan);
            tails.retain(|m, _| cluster.plan.machine(m).is_some());
            for m in cluster
                .plan
                .machines
                .iter()
                .filter(|m| shown(a, &m.machine))
            {
                tails.entry(m.machine.clone()).or_insert_with(|| {
                    let paths = VmPaths::in_state_dir(&ctx.state_dir, &m.vm_name);
                    ConsoleTail::new(paths.console_log())
                });
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let interrupted = CANCEL.load(Ordering::SeqCst);
    cluster.stop();
    echo(&mut tails);
    eprintln!("drydock: cluster {} stopped", plan.name);
    Ok(if interrupted {
        Outcome::Interrupted
    } else {
        Outcome::Success
    })
}

/// `--detach`: a supervisor owns the cluster; wait here until every machine is ready.
fn detach(ctx: &Context, a: &UpArgs, name: &str, plan: &ClusterPlan) -> anyhow::Result<Outcome> {
    let exe = std::env::current_exe().context("locating the drydock binary")?;
    let cdir = drydock_vm::cluster_paths(&ctx.state_dir, name).dir;
    let log_path = cdir.join("drydock.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("--state-dir").arg(&ctx.state_dir);
    if let Some(root) = &ctx.store_root {
        cmd.arg("--store").arg(root);
    }
    cmd.args([
        "__cluster-supervise",
        "--name",
        name,
        "--accel",
        accel_word(a.accel),
    ])
    .arg("--timeout")
    .arg(a.timeout.as_secs_f64().to_string());
    if let Some(q) = &a.qemu {
        cmd.arg("--qemu").arg(q);
    }
    let started = Instant::now();
    let pid = drydock_vm::spawn_detached("cluster supervisor", cmd, log)?;
    let deadline = a.timeout + Duration::from_secs(120);
    loop {
        if let Some(s) = ClusterState::read(&ctx.state_dir, name) {
            if s.ready && s.owner_pid == pid {
                break;
            }
        }
        if !drydock_vm::pid_alive(pid) {
            return Err(anyhow::anyhow!(
                "the cluster did not start:\n{}",
                drydock_vm::log_tail(&log_path, 40).trim()
            ));
        }
        if CANCEL.load(Ordering::SeqCst) || started.elapsed() > deadline {
            let _ = drydock_gc::send_signal(pid, libc::SIGTERM);
            wait_gone(pid, DOWN_DEADLINE);
            if CANCEL.load(Ordering::SeqCst) {
                eprintln!("drydock: interrupted; every machine is stopped");
                return Ok(Outcome::Interrupted);
            }
            return Err(anyhow::anyhow!(
                "the cluster was not ready after {:.0} s; it is stopped:\n{}",
                started.elapsed().as_secs_f64(),
                drydock_vm::log_tail(&log_path, 40).trim()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "drydock: cluster {name} up after {:.2} s ({} machines, owner pid {pid}); `drydock down -p {name}` stops it",
        started.elapsed().as_secs_f64(),
        plan.machines.len()
    );
    Ok(Outcome::Success)
}

fn wait_gone(pid: u32, within: Duration) -> bool {
    let t = Instant::now();
    while drydock_vm::pid_alive(pid) {
        if t.elapsed() > within {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// `__cluster-supervise`: own the cluster planned in `up.json` until `down` (SIGTERM).
pub fn supervise(ctx: &Context, a: &ClusterSuperviseArgs) -> anyhow::Result<Outcome> {
    crate::cancel::install();
    let path = plan_file(ctx, &a.name);
    let bytes = drydock_gc::read_regular(
        &path,
        drydock_gc::Links::Refuse,
        drydock_gc::MAX_STATE_BYTES,
    )
    .with_context(|| format!("reading {}", path.display()))?;
    let plan: ClusterPlan = serde_json::from_slice(&bytes)?;
    let opts = launch_opts(ctx, a.accel, a.qemu.as_deref(), a.timeout)?;
    let mut cluster = drydock_vm::cluster_up(&plan, &opts, &CANCEL, &mut |ev| {
        if let Some(ev) = ev {
            report_event(ev);
        }
    })?;
    cluster.write_state(true)?;
    while !CANCEL.load(Ordering::SeqCst) && !cluster.all_stopped() {
        while let Ok(ev) = cluster.events.try_recv() {
            report_event(&ev);
        }
        if cluster.serve_control(&CANCEL, &mut |ev| {
            if let Some(ev) = ev {
                report_event(ev);
            }
        }) {
            let _ = drydock_vm::write_json(&path, &cluster.plan);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cluster.stop();
    eprintln!("drydock: cluster {} stopped", plan.name);
    Ok(Outcome::Success)
}

/// `down`: ask the owner to stop everything and wait; then make sure no machine is left.
pub fn down(ctx: &Context, a: &ClusterArgs) -> anyhow::Result<Outcome> {
    let name = cluster_name(a)?;
    let Some(state) = ClusterState::read(&ctx.state_dir, &name) else {
        eprintln!("drydock: the cluster {name} is not up");
        return Ok(Outcome::Success);
    };
    let t = Instant::now();
    if state.owner_alive() {
        let _ = drydock_gc::send_signal(state.owner_pid, libc::SIGTERM);
        if !wait_gone(state.owner_pid, DOWN_DEADLINE) {
            let _ = drydock_gc::send_signal(state.owner_pid, libc::SIGKILL);
        }
    }
    // An owner that died without cleaning up: its machines' entries are reaped here.
    for m in &state.plan.machines {
        let paths = VmPaths::in_state_dir(&ctx.state_dir, &m.vm_name);
        if let Some(vs) = VmState::read(&paths) {
            let record = drydock_vm::LaunchRecord::read(&paths).ok();
            drydock_vm::reap_stale(&ctx.state_dir, &paths, &vs, record.as_ref())?;
        }
    }
    let _ = std::fs::remove_file(
        drydock_vm::cluster_paths(&ctx.state_dir, &name)
            .dir
            .join("cluster.json"),
    );
    eprintln!(
        "drydock: cluster {name} down ({} machines) in {:.2} s",
        state.plan.machines.len(),
        t.elapsed().as_secs_f64()
    );
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
            let vs = VmState::read(&VmPaths::in_state_dir(&ctx.state_dir, &m.vm_name));
            let alive = vs.as_ref().is_some_and(|s| s.qemu_alive());
            PsRow {
                machine: m.machine.clone(),
                vm: m.vm_name.clone(),
                state: if alive { "running" } else { "stopped" },
                qemu_pid: vs.as_ref().filter(|_| alive).map(|s| s.qemu_pid),
                addresses: m.nics.iter().map(|n| format!("{}/24", n.address)).collect(),
                system: m.settings.system.target().to_string(),
                uptime_secs: vs
                    .as_ref()
                    .filter(|_| alive)
                    .map(|s| now.saturating_sub(s.started)),
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
    }
    Ok(Outcome::Success)
}

/// `exec MACHINE -- CMD...`.
pub fn exec(ctx: &Context, a: &ExecArgs) -> anyhow::Result<Outcome> {
    let name = cluster_name(&a.cluster)?;
    let vm = format!("{name}.{}", a.machine);
    let paths = VmPaths::in_state_dir(&ctx.state_dir, &vm);
    exec_vm(&vm, &paths, &a.command, a.timeout)
}

/// Run `words` (joined with spaces, as `ssh` does) in the VM `vm`; its outputs become ours and
/// its exit status our exit code.
pub fn exec_vm(
    vm: &str,
    paths: &VmPaths,
    words: &[String],
    timeout: Duration,
) -> anyhow::Result<Outcome> {
    let o = drydock_vm::exec_remote(vm, paths, &words.join(" "), timeout)?;
    std::io::stderr().write_all(&o.stderr)?;
    let mut out = std::io::stdout().lock();
    out.write_all(&o.stdout)?;
    out.flush()?;
    Ok(Outcome::Code(o.status.clamp(0, 255) as u8))
}

/// `logs`: the machines' timed console logs, merged in time order.
pub fn logs(ctx: &Context, a: &LogsArgs) -> anyhow::Result<Outcome> {
    let name = cluster_name(&a.cluster)?;
    let path = plan_file(ctx, &name);
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
    let mut printed: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = crate::out::stdout();
    loop {
        let logs = chosen
            .iter()
            .map(|m| {
                let p = drydock_vm::timed_log(&VmPaths::in_state_dir(&ctx.state_dir, &m.vm_name));
                let lines =
                    drydock_vm::parse_timed(&std::fs::read_to_string(p).unwrap_or_default());
                let skip = printed.get(&m.machine).copied().unwrap_or(0);
                printed.insert(m.machine.clone(), lines.len());
                (m.machine.clone(), lines.into_iter().skip(skip).collect())
            })
            .collect();
        for (_, m, line) in drydock_vm::merge_timed(logs) {
            writeln!(out, "{m:width$} │ {line}")?;
        }
        out.flush()?;
        let up = ClusterState::read(&ctx.state_dir, &name).is_some_and(|s| s.owner_alive());
        if !a.follow || !up || CANCEL.load(Ordering::SeqCst) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(Outcome::Success)
}
