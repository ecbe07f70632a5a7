//! `up` on a cluster that is up (hot reload) and `up --watch`: evaluate and build again, ask
//! the cluster's owner for the plan (printed before anything changes), then to apply it; print
//! every machine's outcome and the time of each phase. The owner is this process (a foreground
//! `up --watch`) or another one, reached over its control socket; while a remote owner applies,
//! the changed machines' console lines stream here as `MACHINE │ line`. Text and `--json` come
//! from the one [`ReloadReport`].

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use drydock_vm::{
    ActionOutcome, ClusterPlan, ClusterState, ConsoleTail, ControlOp, ControlRequest, MachineEvent,
    ReloadAction, ReloadOutcome, RunningCluster, VmPaths,
};
use serde::Serialize;

use crate::cancel::CANCEL;
use crate::cli::UpArgs;
use crate::cmd::cluster::{Phases, plan_file, prepare, report_event};
use crate::context::Context;
use crate::exit::Outcome;

/// How long a change must be followed by quiet before it is applied (an editor's burst).
const QUIET: Duration = Duration::from_millis(300);
/// How long the owner may take to plan.
const PLAN_DEADLINE: Duration = Duration::from_secs(300);

/// What one reload did, as printed (text) or as `--json`.
#[derive(Debug, Serialize)]
pub struct ReloadReport {
    pub cluster: String,
    pub dry_run: bool,
    pub evaluate_secs: f64,
    pub build_secs: f64,
    pub plan_secs: f64,
    /// Absent when nothing was applied (`--dry-run`, or nothing to do).
    pub apply_secs: Option<f64>,
    pub machines: Vec<ReloadOutcome>,
    /// Every action that ran went well.
    pub ok: bool,
}

/// Who applies the plan: this process's own cluster, or the owner of a cluster that is up.
enum Owner<'a> {
    Local(&'a mut RunningCluster),
    Remote { state_dir: PathBuf, name: String },
}

fn width(machines: &[ReloadOutcome]) -> usize {
    machines
        .iter()
        .map(|m| m.planned.machine.len())
        .max()
        .unwrap_or(0)
}

fn print_plan(out: &mut dyn Write, name: &str, machines: &[ReloadOutcome]) -> std::io::Result<()> {
    writeln!(out, "drydock: plan for cluster {name}:")?;
    let w = width(machines);
    for m in machines {
        writeln!(
            out,
            "  {:<8} {:<w$}  {}",
            m.planned.action.as_str(),
            m.planned.machine,
            m.planned.why
        )?;
    }
    Ok(())
}

fn print_outcomes(out: &mut dyn Write, r: &ReloadReport) -> std::io::Result<()> {
    let w = width(&r.machines);
    for m in r
        .machines
        .iter()
        .filter(|m| m.planned.action != ReloadAction::Keep)
    {
        let what = match m.outcome {
            ActionOutcome::Done => "done",
            ActionOutcome::Failed => "FAILED",
            ActionOutcome::Planned => "not applied",
        };
        writeln!(
            out,
            "drydock: {:<8} {:<w$}  {what} in {:.2} s{}",
            m.planned.action.as_str(),
            m.planned.machine,
            m.seconds,
            m.error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        )?;
        if m.outcome == ActionOutcome::Failed && !m.output.is_empty() {
            for line in m.output.lines() {
                writeln!(out, "{:<w$} │ {line}", m.planned.machine)?;
            }
        }
    }
    writeln!(
        out,
        "drydock: reload of {}: evaluate {:.2} s, build {:.2} s, plan {:.2} s{}",
        r.cluster,
        r.evaluate_secs,
        r.build_secs,
        r.plan_secs,
        r.apply_secs
            .map(|s| format!(", apply {s:.2} s"))
            .unwrap_or_default()
    )
}

/// `up --dry-run` on a cluster that is not up: every machine would be created.
pub fn print_fresh_plan(ctx: &Context, plan: &ClusterPlan) -> anyhow::Result<Outcome> {
    let machines: Vec<ReloadOutcome> = plan
        .machines
        .iter()
        .map(|m| {
            ReloadOutcome::planned(drydock_vm::PlannedAction {
                machine: m.machine.clone(),
                action: ReloadAction::Create,
                why: "the cluster is not up".into(),
                from: None,
                to: Some(m.settings.system.target().to_string()),
            })
        })
        .collect();
    let report = ReloadReport {
        cluster: plan.name.clone(),
        dry_run: true,
        evaluate_secs: 0.0,
        build_secs: 0.0,
        plan_secs: 0.0,
        apply_secs: None,
        machines,
        ok: true,
    };
    emit(ctx, &report)
}

fn emit(ctx: &Context, report: &ReloadReport) -> anyhow::Result<Outcome> {
    let mut out = crate::out::stdout();
    if ctx.json {
        crate::out::json(&mut out, report)?;
    } else if report.dry_run {
        print_plan(&mut out, &report.cluster, &report.machines)?;
    }
    Ok(if report.ok {
        Outcome::Success
    } else {
        Outcome::Failed
    })
}

/// Tails of the consoles of the machines a reload changes, from their current end.
fn changed_tails(
    state_dir: &Path,
    name: &str,
    machines: &[ReloadOutcome],
) -> BTreeMap<String, ConsoleTail> {
    machines
        .iter()
        .filter(|m| !matches!(m.planned.action, ReloadAction::Keep | ReloadAction::Remove))
        .map(|m| {
            let vm = format!("{name}.{}", m.planned.machine);
            let mut t = ConsoleTail::new(VmPaths::in_state_dir(state_dir, &vm).console_log());
            let _ = t.lines();
            (m.planned.machine.clone(), t)
        })
        .collect()
}

/// One cycle: evaluate, build, plan (printed), apply (unless `--dry-run`).
fn cycle(
    ctx: &Context,
    a: &UpArgs,
    name: &str,
    owner: &mut Owner<'_>,
    on_event: &mut dyn FnMut(Option<&MachineEvent>),
) -> anyhow::Result<ReloadReport> {
    let running = match owner {
        Owner::Local(c) => c.plan.clone(),
        Owner::Remote { state_dir, .. } => ClusterState::read(state_dir, name)
            .map(|s| s.plan)
            .ok_or_else(|| drydock_vm::ReloadError::NotUp(name.to_string()))?,
    };
    let (new, Phases { evaluate, build }) = prepare(ctx, a, name, Some(&running))?;
    let t = Instant::now();
    let planned: Vec<ReloadOutcome> = match owner {
        Owner::Local(c) => c
            .plan_reload(&new, a.restart, &[])?
            .into_iter()
            .map(ReloadOutcome::planned)
            .collect(),
        Owner::Remote { state_dir, name } => drydock_vm::reload_request(
            state_dir,
            name,
            &ControlRequest {
                op: ControlOp::Plan,
                plan: new.clone(),
                restart: a.restart,
                restart_machines: Vec::new(),
            },
            PLAN_DEADLINE,
        )?,
    };
    let plan_secs = t.elapsed().as_secs_f64();
    let mut report = ReloadReport {
        cluster: name.to_string(),
        dry_run: a.dry_run,
        evaluate_secs: evaluate.as_secs_f64(),
        build_secs: build.as_secs_f64(),
        plan_secs,
        apply_secs: None,
        machines: planned,
        ok: true,
    };
    if a.dry_run {
        return Ok(report);
    }
    // The plan, before anything changes (on stderr with --json: stdout is the one document).
    {
        let mut text = Vec::new();
        print_plan(&mut text, name, &report.machines)?;
        if ctx.json {
            std::io::stderr().write_all(&text)?;
        } else {
            let mut out = crate::out::stdout();
            out.write_all(&text)?;
            out.flush()?;
        }
    }
    if report
        .machines
        .iter()
        .all(|m| m.planned.action == ReloadAction::Keep)
    {
        eprintln!("drydock: nothing to do: every machine is unchanged");
        return Ok(report);
    }
    let t = Instant::now();
    let outcomes = match owner {
        Owner::Local(c) => c.apply_reload(&new, a.restart, &[], &CANCEL, on_event)?,
        Owner::Remote { state_dir, name } => {
            apply_remote(state_dir, name, &new, a, &report.machines, ctx.json)?
        }
    };
    // The switched and booted machines' runs pin their new systems now.
    drydock_vm::release_build_roots(&drydock_vm::cluster_paths(&ctx.state_dir, name).dir);
    report.apply_secs = Some(t.elapsed().as_secs_f64());
    report.ok = drydock_vm::reload_succeeded(&outcomes);
    report.machines = outcomes;
    let state_plan = match owner {
        Owner::Local(c) => Some(c.plan.clone()),
        Owner::Remote { state_dir, .. } => ClusterState::read(state_dir, name).map(|s| s.plan),
    };
    if let Some(p) = state_plan {
        drydock_vm::write_json(&plan_file(ctx, name), &p)?;
    }
    let mut text = Vec::new();
    print_outcomes(&mut text, &report)?;
    std::io::stderr().write_all(&text)?;
    Ok(report)
}

/// Ask the remote owner to apply, streaming the changed machines' consoles meanwhile.
fn apply_remote(
    state_dir: &Path,
    name: &str,
    new: &ClusterPlan,
    a: &UpArgs,
    planned: &[ReloadOutcome],
    json: bool,
) -> anyhow::Result<Vec<ReloadOutcome>> {
    let mut tails = changed_tails(state_dir, name, planned);
    let w = width(planned);
    let req = ControlRequest {
        op: ControlOp::Apply,
        plan: new.clone(),
        restart: a.restart,
        restart_machines: Vec::new(),
    };
    // The owner waits up to its own ready timeout for booting machines, plus its margins.
    let deadline = a.timeout + Duration::from_secs(600);
    let (sd, n) = (state_dir.to_path_buf(), name.to_string());
    let call = std::thread::spawn(move || drydock_vm::reload_request(&sd, &n, &req, deadline));
    // With --json, stdout is the report: the consoles go to stderr.
    let echo = |tails: &mut BTreeMap<String, ConsoleTail>| {
        let mut out: Box<dyn Write> = match json {
            true => Box::new(std::io::stderr().lock()),
            false => Box::new(std::io::stdout().lock()),
        };
        for (m, t) in tails.iter_mut() {
            for line in t.lines() {
                let _ = writeln!(out, "{m:w$} │ {line}");
            }
        }
        let _ = out.flush();
    };
    while !call.is_finished() {
        echo(&mut tails);
        std::thread::sleep(Duration::from_millis(50));
    }
    echo(&mut tails);
    call.join()
        .map_err(|_| anyhow::anyhow!("the reload request thread panicked"))?
        .map_err(Into::into)
}

/// `up` on a cluster that is up: one reload (and then, with `--watch`, one per change).
pub fn reload(ctx: &Context, a: &UpArgs, name: &str) -> anyhow::Result<Outcome> {
    let mut owner = Owner::Remote {
        state_dir: ctx.state_dir.clone(),
        name: name.to_string(),
    };
    let mut on_event = |ev: Option<&MachineEvent>| {
        if let Some(ev) = ev {
            report_event(ev);
        }
    };
    if !a.watch {
        let report = cycle(ctx, a, name, &mut owner, &mut on_event)?;
        return emit(ctx, &report);
    }
    let mut watching = Watching::new(&a.cluster.file)?;
    eprintln!(
        "drydock: watching {} for changes; Ctrl-C stops watching (the cluster stays up)",
        watching.dir.display()
    );
    report_cycle(ctx, cycle(ctx, a, name, &mut owner, &mut on_event));
    while !CANCEL.load(Ordering::SeqCst) {
        if ClusterState::read_up(&ctx.state_dir, name).is_none() {
            eprintln!("drydock: the cluster {name} is down; stopped watching");
            return Ok(Outcome::Success);
        }
        if let Some(changed) = watching.due() {
            announce(&changed);
            report_cycle(ctx, cycle(ctx, a, name, &mut owner, &mut on_event));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(Outcome::Interrupted)
}

fn announce(changed: &[PathBuf]) {
    // An editor's or sed's temporary file, gone again, is not worth naming.
    let there: Vec<&PathBuf> = changed.iter().filter(|p| p.exists()).collect();
    let shown: Vec<&PathBuf> = match there.is_empty() {
        true => changed.iter().collect(),
        false => there,
    };
    let names: Vec<String> = shown.iter().map(|p| p.display().to_string()).collect();
    eprintln!("drydock: changed: {}", names.join(", "));
}

/// Under `--watch`: a reload's report (one JSON line each with `--json`), or why it failed
/// (nothing changed then; the next change is waited for).
fn report_cycle(ctx: &Context, r: anyhow::Result<ReloadReport>) {
    match r {
        Ok(report) => {
            if ctx.json {
                if let Ok(text) = serde_json::to_string(&report) {
                    println!("{text}");
                }
            }
            if !report.ok {
                eprintln!("drydock: the reload failed (above); waiting for the next change");
            } else {
                eprintln!("drydock: reload applied; waiting for the next change");
            }
        }
        Err(e) => eprintln!(
            "drydock: reload failed, nothing changed: {e:#}\ndrydock: waiting for the next change"
        ),
    }
}

/// A foreground owner under `--watch`: a change was seen; reload its own cluster.
pub fn watched_change(
    ctx: &Context,
    a: &UpArgs,
    cluster: &mut RunningCluster,
    changed: &[PathBuf],
    on_event: &mut dyn FnMut(Option<&MachineEvent>),
) {
    announce(changed);
    let name = cluster.plan.name.clone();
    let mut owner = Owner::Local(cluster);
    report_cycle(ctx, cycle(ctx, a, &name, &mut owner, on_event));
}

/// The composition's directory, watched, and the burst being collected.
pub struct Watching {
    pub dir: PathBuf,
    watcher: drydock_vm::Watcher,
    debounce: drydock_vm::Debounce,
}

impl Watching {
    pub fn new(file: &Path) -> anyhow::Result<Self> {
        let abs = std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf());
        let dir = abs
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let watcher = drydock_vm::Watcher::new(&dir)?;
        Ok(Self {
            dir,
            watcher,
            debounce: drydock_vm::Debounce::default(),
        })
    }

    /// The changed paths, once a burst of changes is over; never blocks.
    pub fn due(&mut self) -> Option<Vec<PathBuf>> {
        match self.watcher.poll() {
            Ok(paths) => self.debounce.push(paths, Instant::now()),
            Err(e) => tracing::warn!("{e:#}"),
        }
        self.debounce.take(Instant::now(), QUIET)
    }
}
