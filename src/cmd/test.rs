//! `drydock test [SCRIPT]`: arguments into a `TestRequest` for drydock-cluster's `run_tests`,
//! and its [`TestEvent`]s printed on stderr (each subtest and call with its duration, the
//! machines' console lines as `up` shows them, the failure and a summary), the report as JSON
//! on stdout (`--json`) and as JUnit XML (`--junit FILE`).

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};

use drydock_cluster::{
    CallReport, DriverMessage, Ending, Phase, ScriptSource, TestEvent, TestReport, TestRequest,
    UpEvent, UpRequest,
};
use drydock_vm::escape_control;

use crate::cancel::CANCEL;
use crate::cli::TestArgs;
use crate::cmd::cluster::{Target, launch_opts, target};
use crate::cmd::reload::{UpPrinter, plural};
use crate::context::Context;
use crate::exit::Outcome;
use crate::paint::{Paint, colour_on};

/// How long a machine started by a test may take to become ready (as `up`'s default).
const READY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// Where `copy_from_machine` puts files: `$out` (as in a Nix build), else `cwd` (pure).
fn out_dir(out: Option<OsString>, cwd: &Path) -> PathBuf {
    out.filter(|o| !o.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| cwd.to_path_buf())
}

/// What the arguments ask (pure): `exe` is drydock.
fn test_request(
    a: &TestArgs,
    t: &Target,
    exe: &Path,
    state_dir: &Path,
    store_root: Option<&Path>,
    out_dir: PathBuf,
    verbose: bool,
) -> TestRequest {
    let mut shell: Vec<String> = vec![
        exe.display().to_string(),
        "--state-dir".into(),
        state_dir.display().to_string(),
    ];
    if let Some(root) = store_root {
        shell.extend(["--store".into(), root.display().to_string()]);
    }
    shell.extend(["-p".into(), t.name.clone(), "shell".into()]);
    TestRequest {
        up: UpRequest {
            file: t.file.clone(),
            name: t.name.clone(),
            machines: Vec::new(),
            mentioned: a.hide.iter().chain(&a.show).cloned().collect(),
            restart: false,
            dry_run: false,
            ready_timeout: READY_TIMEOUT,
            argv: std::env::args().collect(),
            show_build_outputs: verbose,
            build_timeout: a.build_timeout,
            allow_overcommit: a.allow_overcommit,
            watch: a.watch,
        },
        script: match &a.script {
            Some(p) => ScriptSource::File(p.clone()),
            None => ScriptSource::Composition,
        },
        python: a.python.clone(),
        keep: a.keep,
        timeout: a.timeout,
        watch: a.watch,
        from: a.from.clone(),
        out_dir,
        shell,
    }
}

/// `drydock test`.
pub fn run(ctx: &Context, a: &TestArgs) -> anyhow::Result<Outcome> {
    let mut t = target(ctx, &a.cluster)?;
    // `-p NAME` alone names a cluster that is up: its composition is the one it records.
    if let (Ok(None), Some(f)) = (
        t.checked_file(),
        drydock_cluster::ClusterState::read_up(&ctx.state_dir, &t.name).and_then(|s| s.plan.file),
    ) {
        t.file = f;
    }
    if !t.file.is_file() {
        return Err(drydock_cluster::ClusterError::NoFile(
            std::path::absolute(&t.file).unwrap_or_else(|_| t.file.clone()),
        )
        .into());
    }
    crate::cancel::install();
    let exe = std::env::current_exe()?;
    let cwd = std::env::current_dir()?;
    let req = test_request(
        a,
        &t,
        &exe,
        &ctx.state_dir,
        ctx.store_root.as_deref(),
        out_dir(std::env::var_os("out"), &cwd),
        ctx.verbose > 0,
    );
    let launch = launch_opts(
        ctx,
        a.accel,
        a.qemu.as_deref(),
        READY_TIMEOUT,
        drydock_vm::DEFAULT_LOG_LIMIT,
    )?;
    let mut printer = TestPrinter::new(ctx.json, a);
    let outcome = drydock_cluster::run_tests(
        &ctx.layout(),
        &ctx.state_dir,
        &req,
        &launch,
        ctx.store_root.as_deref(),
        &CANCEL,
        &mut |ev| printer.event(ev),
    );
    if let Some(e) = printer.junit_error.take() {
        return Err(e);
    }
    let outcome = match outcome {
        Err(e) if e.is_interrupted() => {
            eprintln!("drydock: interrupted; what this run started was stopped");
            return Ok(Outcome::Interrupted);
        }
        r => r?,
    };
    if outcome.interrupted {
        return Ok(Outcome::Interrupted);
    }
    Ok(match outcome.report.map(|r| r.exit) {
        Some(0) => Outcome::Success,
        Some(130) => Outcome::Interrupted,
        _ => Outcome::Failed,
    })
}

/// Prints a test's events on stderr; the report on stdout (`--json`) and in `--junit FILE`.
struct TestPrinter {
    json: bool,
    watch: bool,
    junit: Option<PathBuf>,
    junit_error: Option<anyhow::Error>,
    hide: Vec<String>,
    show: Vec<String>,
    paint: Paint,
    up: UpPrinter,
    /// How deep in subtests the script is.
    depth: usize,
    /// The widest machine name seen (console prefixes line up).
    width: usize,
    /// The error of the call that failed last, if the last call failed.
    last_failure: Option<String>,
    runs: usize,
}

impl TestPrinter {
    fn new(json: bool, a: &TestArgs) -> Self {
        Self {
            json,
            watch: a.watch,
            junit: a.junit.clone(),
            junit_error: None,
            hide: a.hide.clone(),
            show: a.show.clone(),
            paint: Paint::new(colour_on(std::io::IsTerminal::is_terminal(
                &std::io::stderr(),
            ))),
            // Everything an `up` prints goes to stderr here (stdout is the report's).
            up: UpPrinter::new(true, None),
            depth: 0,
            width: 0,
            last_failure: None,
            runs: 0,
        }
    }

    fn shown(&self, machine: &str) -> bool {
        match self.show.is_empty() {
            false => self.show.iter().any(|m| m == machine),
            true => !self.hide.iter().any(|m| m == machine),
        }
    }

    fn indent(&self) -> String {
        "  ".repeat(self.depth)
    }

    fn call_name(&self, machine: Option<&str>, call: &str, args: &str) -> String {
        let args = escape_control(args);
        match machine {
            Some(m) => format!("{}: {call}({args})", self.paint.machine(m, 0)),
            None => format!("{call}({args})"),
        }
    }

    fn event(&mut self, ev: TestEvent<'_>) {
        match ev {
            TestEvent::Up(UpEvent::Reloaded(Ok(r))) => self.up.outcomes(r),
            TestEvent::Up(UpEvent::Reloaded(Err(e))) => {
                eprintln!("drydock: reload failed: {}", drydock_vm::error_chain(e))
            }
            TestEvent::Up(ev) => self.up.event(ev),
            TestEvent::OwnerStarted { cluster, after } => eprintln!(
                "drydock: cluster {cluster} prepared in {after:.2} s; its machines boot as the script starts them"
            ),
            TestEvent::Running {
                cluster,
                script,
                machines,
                running,
            } => {
                self.depth = 0;
                self.runs += 1;
                eprintln!(
                    "drydock: running {script} on cluster {cluster} ({}, {running} running)",
                    plural(machines, "machine")
                );
            }
            TestEvent::Console { machine, line } => {
                if !self.shown(machine) {
                    return;
                }
                self.width = self.width.max(machine.len());
                eprintln!(
                    "{} │ {}",
                    self.paint.machine(machine, self.width),
                    escape_control(line)
                );
            }
            TestEvent::Driver(m) => self.driver(m),
            TestEvent::Finished(r) => self.finished(r),
            TestEvent::Changed(paths) => {
                let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
                eprintln!("drydock: changed: {}", names.join(", "));
            }
            TestEvent::ReloadFailed(e) => eprintln!(
                "drydock: reload failed, the script did not run: {}\ndrydock: waiting for the next change",
                drydock_vm::error_chain(e)
            ),
            TestEvent::ScriptFailed(e) => eprintln!(
                "drydock: the script cannot run: {}\ndrydock: waiting for the next change",
                drydock_vm::error_chain(e)
            ),
            TestEvent::Watching { dir } => eprintln!(
                "drydock: watching {} for changes; Ctrl-C stops",
                dir.display()
            ),
            TestEvent::Down { cluster } => {
                eprintln!("drydock: taking down the cluster {cluster} this run started")
            }
            TestEvent::Restored { cluster, tag, secs } => {
                eprintln!("drydock: cluster {cluster} put back to snapshot {tag:?} in {secs:.2} s")
            }
        }
    }

    fn driver(&mut self, m: &DriverMessage) {
        match m {
            DriverMessage::Subtest {
                phase: Phase::Start,
                path,
                ..
            } => {
                self.depth = path.len().saturating_sub(1);
                eprintln!(
                    "{}subtest: {}",
                    self.indent(),
                    escape_control(path.last().map(String::as_str).unwrap_or(""))
                );
                self.depth = path.len();
            }
            DriverMessage::Subtest {
                phase: Phase::End,
                path,
                secs,
                ok,
                error,
            } => {
                self.depth = path.len().saturating_sub(1);
                let name = escape_control(path.last().map(String::as_str).unwrap_or(""));
                // The error once: a failed call printed it already.
                let error = match error == &self.last_failure {
                    true => String::new(),
                    false => format!(": {}", escape_control(error.as_deref().unwrap_or(""))),
                };
                match ok {
                    true => eprintln!(
                        "{}subtest {name}: {} in {secs:.2} s",
                        self.indent(),
                        self.paint.good("passed")
                    ),
                    false => eprintln!(
                        "{}subtest {name}: {} after {secs:.2} s{error}",
                        self.indent(),
                        self.paint.bad("FAILED"),
                    ),
                }
            }
            DriverMessage::Begin {
                machine,
                call,
                args,
                retrying: true,
            } => eprintln!(
                "{}{} …",
                self.indent(),
                self.call_name(machine.as_deref(), call, args)
            ),
            DriverMessage::Begin { .. } => {}
            DriverMessage::Call(c) => {
                self.call(c);
                self.last_failure = c.error.clone().filter(|_| !c.ok);
            }
            DriverMessage::Log { machine, text } => {
                let who = machine
                    .as_deref()
                    .map(|m| format!("{}: ", self.paint.machine(m, 0)))
                    .unwrap_or_default();
                for l in text.lines() {
                    eprintln!("{}{who}{}", self.indent(), escape_control(l));
                }
            }
            DriverMessage::Out { text } => {
                // The script's own output, as `exec` passes a command's on.
                let _ = std::io::stderr().write_all(text.as_bytes());
            }
            DriverMessage::Serial { .. } | DriverMessage::Op(_) | DriverMessage::End { .. } => {}
        }
    }

    fn call(&self, c: &CallReport) {
        let name = self.call_name(c.machine.as_deref(), &c.call, &c.args);
        match c.ok {
            true => eprintln!("{}{name} {:.2} s", self.indent(), c.secs),
            false => eprintln!(
                "{}{name} {} after {:.2} s: {}",
                self.indent(),
                self.paint.bad("FAILED"),
                c.secs,
                escape_control(c.error.as_deref().unwrap_or(""))
            ),
        }
    }

    fn finished(&mut self, r: &TestReport) {
        self.depth = 0;
        if let Some(f) = &r.failure {
            let what = match r.ending {
                Ending::Failed => "the script failed",
                Ending::Timeout => "the script timed out",
                Ending::Died => "the test driver died",
                Ending::Interrupted => "the script was interrupted",
                Ending::Passed => "",
            };
            if r.ending != Ending::Interrupted {
                let mut text = format!(
                    "drydock: {}: {}\n",
                    self.paint.bad(what),
                    escape_control(&f.message)
                );
                for fr in &f.frames {
                    text.push_str(&format!(
                        "  {}, line {}: {}\n",
                        f.file,
                        fr.line,
                        escape_control(&fr.text)
                    ));
                }
                if let Some(c) = &f.call {
                    for l in drydock_cluster::call_text(c).lines() {
                        text.push_str(&format!("  {}\n", escape_control(l)));
                    }
                }
                if !f.console.is_empty() {
                    let m = f
                        .call
                        .as_ref()
                        .and_then(|c| c.machine.clone())
                        .unwrap_or_default();
                    text.push_str(&format!("  the last console lines of {m}:\n"));
                    for l in &f.console {
                        text.push_str(&format!("    {}\n", escape_control(l)));
                    }
                }
                let _ = std::io::stderr().write_all(text.as_bytes());
            }
        }
        let verdict = match r.ending {
            Ending::Passed => self.paint.good("passed"),
            Ending::Interrupted => "interrupted".to_string(),
            _ => self.paint.bad("FAILED"),
        };
        let subtests = match r.subtests.len() {
            0 => "no subtests".to_string(),
            _ => format!(
                "{} passed, {} failed",
                plural(r.passed, "subtest"),
                r.failed
            ),
        };
        match (self.watch, r.reload_secs) {
            (true, reload) => eprintln!(
                "drydock: run {}: {verdict} ({subtests}){}, test {:.2} s",
                self.runs,
                reload
                    .map(|s| format!(", reload {s:.2} s"))
                    .unwrap_or_default(),
                r.secs
            ),
            (false, _) => eprintln!("drydock: {verdict}: {subtests}, in {:.2} s", r.secs),
        }
        if let Some(path) = &self.junit {
            if let Err(e) = drydock_gc::write_atomic(path, drydock_cluster::junit_xml(r).as_bytes())
            {
                self.junit_error =
                    Some(anyhow::Error::new(e).context(format!("writing {}", path.display())));
            }
        }
        if self.json {
            let mut out = crate::out::stdout();
            let written = match self.watch {
                true => serde_json::to_string(r)
                    .map_err(anyhow::Error::new)
                    .and_then(|t| Ok(writeln!(out, "{t}").and_then(|()| out.flush())?)),
                false => crate::out::json(&mut out, r),
            };
            if let Err(e) = written {
                tracing::warn!("printing the report: {e:#}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(words: &[&str]) -> TestArgs {
        let cli = crate::cli::Cli::try_parse_from(
            std::iter::once("drydock")
                .chain(std::iter::once("test"))
                .chain(words.iter().copied()),
        )
        .unwrap();
        match cli.command {
            crate::cli::Command::Test(a) => a,
            other => panic!("{other:?}"),
        }
    }

    fn target() -> Target {
        crate::cmd::cluster::test_target("/c/demo/drydock.nix", "demo")
    }

    #[test]
    fn arguments_become_the_request() {
        let req = |words: &[&str], out: Option<&str>| {
            test_request(
                &args(words),
                &target(),
                Path::new("/bin/drydock"),
                Path::new("/s"),
                Some(Path::new("/store")),
                out_dir(out.map(OsString::from), Path::new("/home/u/proj")),
                false,
            )
        };
        let r = req(&[], None);
        assert_eq!(r.script, ScriptSource::Composition);
        assert_eq!(r.python, PathBuf::from("python3"));
        assert!(!r.keep && !r.watch && !r.up.watch && r.timeout.is_none() && r.from.is_none());
        assert_eq!(r.out_dir, PathBuf::from("/home/u/proj"));
        assert_eq!(
            r.shell,
            [
                "/bin/drydock",
                "--state-dir",
                "/s",
                "--store",
                "/store",
                "-p",
                "demo",
                "shell"
            ]
        );
        assert_eq!(r.up.ready_timeout, READY_TIMEOUT);
        let r = req(
            &[
                "t.py",
                "--keep",
                "--watch",
                "--timeout",
                "90",
                "--show",
                "a,b",
                "--from",
                "x",
                "--python",
                "/usr/bin/python3.11",
            ],
            Some("/nix/out"),
        );
        assert_eq!(r.script, ScriptSource::File("t.py".into()));
        assert!(r.keep && r.watch && r.up.watch);
        assert_eq!(r.timeout, Some(std::time::Duration::from_secs(90)));
        assert_eq!(r.up.mentioned, ["a", "b"]);
        assert_eq!(r.from.as_deref(), Some("x"));
        assert_eq!(r.python, PathBuf::from("/usr/bin/python3.11"));
        assert_eq!(r.out_dir, PathBuf::from("/nix/out"));
        // An empty $out is no $out.
        assert_eq!(req(&[], Some("")).out_dir, PathBuf::from("/home/u/proj"));
        // --hide and --show exclude each other, as for `up`.
        assert!(
            crate::cli::Cli::try_parse_from(["drydock", "test", "--hide", "a", "--show", "b"])
                .is_err()
        );
    }
}
