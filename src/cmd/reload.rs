//! `up` on a cluster that is up (hot reload) and `up --watch`, and the printing of everything an
//! `up` reports ([`UpPrinter`]): the library's `reload_cycle`/`watch_reloads` do the work and
//! report [`UpEvent`]s; here they become text (the plan before anything changes, the changed
//! machines' console lines as `MACHINE │ line`, every machine's outcome and the time of each
//! phase) or `--json` from the one [`ReloadReport`].

use std::io::Write;

use drydock_cluster::{
    ActionOutcome, ClusterPlan, MachineEvent, ReloadAction, ReloadOutcome, ReloadOwner,
    ReloadReport, SessionError, UpEvent, UpRequest, WatchEnd, Watching,
};
use drydock_vm::escape_control;

use crate::cancel::CANCEL;
use crate::cli::UpArgs;
use crate::context::Context;
use crate::exit::Outcome;

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
                writeln!(out, "{:<w$} │ {}", m.planned.machine, escape_control(line))?;
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

/// The report of one reload (`up` on a cluster that is up, or `up --dry-run`): the plan for a
/// dry run, the document with `--json`; exit 1 if an action failed.
pub fn emit(ctx: &Context, report: &ReloadReport) -> anyhow::Result<Outcome> {
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

pub fn report_event(ev: &MachineEvent) {
    match ev {
        MachineEvent::Ready { machine, after } => {
            eprintln!(
                "drydock: {machine} ready after {:.2} s",
                after.as_secs_f64()
            )
        }
        MachineEvent::Failed { machine, error } => {
            eprintln!(
                "drydock: {machine} failed: {}",
                drydock_vm::error_chain(&**error)
            )
        }
        MachineEvent::Stopped { machine } => eprintln!("drydock: {machine} stopped"),
        MachineEvent::Paused { machine } => {
            eprintln!("drydock: {machine} restored (paused until every machine is)")
        }
    }
}

/// The machines a detached owner's log (`drydock.log`, written by [`report_event`]) says are
/// ready, with the owner's seconds.
pub fn ready_in_log(log: &str) -> Vec<(String, f64)> {
    log.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("drydock: ")?;
            let (machine, secs) = rest.split_once(" ready after ")?;
            let secs = secs.strip_suffix(" s")?.parse().ok()?;
            Some((machine.to_string(), secs))
        })
        .collect()
}

/// The consoles a foreground `up` echoes as `MACHINE │ line`: the machines `--hide`/`--show`
/// let through, following the cluster as reloads add and remove machines.
pub struct Echo {
    hide: Vec<String>,
    show: Vec<String>,
    width: usize,
}

impl Echo {
    pub fn new(a: &UpArgs, plan: &ClusterPlan) -> Self {
        let mut e = Self {
            hide: a.hide.clone(),
            show: a.show.clone(),
            width: 0,
        };
        e.follow(plan);
        e
    }

    fn shown(&self, machine: &str) -> bool {
        match self.show.is_empty() {
            false => self.show.iter().any(|m| m == machine),
            true => !self.hide.iter().any(|m| m == machine),
        }
    }

    /// The names' width as the cluster's machines change.
    fn follow(&mut self, plan: &ClusterPlan) {
        self.width = plan
            .machines
            .iter()
            .map(|m| m.machine.len())
            .max()
            .unwrap_or(0);
    }
}

/// Prints what an `up` reports. With `--json` stdout is the one document (or one line per
/// watched reload): the plan and the consoles go to stderr then.
pub struct UpPrinter {
    json: bool,
    echo: Option<Echo>,
    /// The width of the machine names of the plan being applied.
    width: usize,
}

impl UpPrinter {
    pub fn new(json: bool, echo: Option<Echo>) -> Self {
        Self {
            json,
            echo,
            width: 0,
        }
    }

    fn out(&self) -> Box<dyn Write> {
        match self.json {
            true => Box::new(std::io::stderr().lock()),
            false => Box::new(std::io::stdout().lock()),
        }
    }

    pub fn event(&mut self, ev: UpEvent<'_>) {
        match ev {
            UpEvent::Evaluated { .. } => {}
            UpEvent::Machine(ev) => report_event(ev),
            UpEvent::Built(b) => match b.run_id {
                Some(id) => eprintln!(
                    "drydock: built {} in {:.1} s (run {id}, {} recorded)",
                    plural(b.systems, "system"),
                    b.secs,
                    plural(b.paths_recorded, "path")
                ),
                None => eprintln!(
                    "drydock: built {} in {:.1} s (nothing new: no run recorded)",
                    plural(b.systems, "system"),
                    b.secs
                ),
            },
            UpEvent::Planned { cluster, machines } => {
                self.width = width(machines);
                let mut out = self.out();
                let _ = print_plan(&mut out, cluster, machines);
                let _ = out.flush();
            }
            UpEvent::NothingToDo => {
                eprintln!("drydock: nothing to do: every machine is unchanged")
            }
            UpEvent::Console {
                machine,
                line,
                skipped,
            } => {
                // A foreground owner echoes the machines it is asked to; a reload, every line
                // of the machines it changes.
                let w = match &self.echo {
                    Some(e) if !e.shown(machine) => return,
                    Some(e) => e.width,
                    None => self.width,
                };
                // Prefixes in colour where the lines go, if that is a terminal.
                let paint = match self.json {
                    true => crate::paint::Paint::new(crate::paint::colour_on(
                        std::io::IsTerminal::is_terminal(&std::io::stderr()),
                    )),
                    false => crate::paint::Paint::for_stdout(),
                };
                let prefix = paint.machine(machine, w);
                let mut out = self.out();
                if skipped > 0 {
                    let _ = writeln!(
                        out,
                        "{prefix} │ ({skipped} lines not shown: `drydock logs` has them)"
                    );
                }
                // What a guest prints is shown, never obeyed by the terminal.
                let _ = writeln!(out, "{prefix} │ {}", escape_control(line));
                let _ = out.flush();
            }
            UpEvent::Changed(paths) => {
                let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
                eprintln!("drydock: changed: {}", names.join(", "));
            }
            UpEvent::Reloaded(r) => self.reloaded(r),
            UpEvent::PlanChanged(plan) => {
                if let Some(e) = self.echo.as_mut() {
                    e.follow(plan);
                }
            }
        }
    }

    /// Every changed machine's outcome and the phases, once a reload applied something.
    pub fn outcomes(&self, report: &ReloadReport) {
        if report.apply_secs.is_some() {
            let mut text = Vec::new();
            let _ = print_outcomes(&mut text, report);
            let _ = std::io::stderr().write_all(&text);
        }
    }

    /// Under `--watch`: a reload's report (one JSON line each with `--json`), or why it failed
    /// (nothing changed then; the next change is waited for).
    fn reloaded(&self, r: &Result<ReloadReport, SessionError>) {
        match r {
            Ok(report) => {
                self.outcomes(report);
                if self.json {
                    if let Ok(text) = serde_json::to_string(report) {
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
                "drydock: reload failed, nothing changed: {}\ndrydock: waiting for the next change",
                drydock_vm::error_chain(e)
            ),
        }
    }
}

/// `up` on a cluster that is up: one reload (and then, with `--watch`, one per change).
pub fn reload(ctx: &Context, a: &UpArgs, req: &UpRequest) -> anyhow::Result<Outcome> {
    let layout = ctx.layout();
    let mut printer = UpPrinter::new(ctx.json, None);
    if !a.watch {
        let mut owner = ReloadOwner::Remote {
            state_dir: ctx.state_dir.clone(),
            name: req.name.clone(),
        };
        let report = drydock_cluster::reload_cycle(
            &layout,
            &ctx.state_dir,
            req,
            &mut owner,
            &CANCEL,
            &mut |ev| printer.event(ev),
        )?;
        printer.outcomes(&report);
        return emit(ctx, &report);
    }
    let mut watching = Watching::new(&req.file, &ctx.state_dir)?;
    eprintln!(
        "drydock: watching {} for changes; Ctrl-C stops watching (the cluster stays up)",
        watching.dir.display()
    );
    match drydock_cluster::watch_reloads(
        &layout,
        &ctx.state_dir,
        req,
        &mut watching,
        &CANCEL,
        &mut |ev| printer.event(ev),
    ) {
        WatchEnd::Down => {
            eprintln!(
                "drydock: the cluster {} is down; stopped watching",
                req.name
            );
            Ok(Outcome::Success)
        }
        WatchEnd::Interrupted => Ok(Outcome::Interrupted),
    }
}

/// `1 machine`, `2 machines`.
pub fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_owner_log_says_who_is_ready() {
        let log = "WARN something\ndrydock: server ready after 12.34 s\ndrydock: agent1 failed: x\ndrydock: agent-2 ready after 3.00 s\n";
        assert_eq!(
            ready_in_log(log),
            [("server".to_string(), 12.34), ("agent-2".to_string(), 3.0)]
        );
        assert_eq!(
            [plural(1, "machine"), plural(4, "machine")],
            ["1 machine", "4 machines"]
        );
    }
}
