//! `drydock test`: a NixOS-test-driver-style Python script run against a cluster.
//!
//! The script runs in the distribution's `python3` with drydock's driver module
//! (`driver/drydock_driver.py`, embedded here and written, private, into the cluster's folder):
//! the NixOS test driver's API, whose shell commands go straight to each machine's exec socket.
//! This process is the driver's other end (its stdin and stdout, one socket, JSON lines both
//! ways): it gets every call and subtest of the script as it ends (and a retrying call as it
//! starts), prints them through its caller's [`TestEvent`]s and builds the [`TestReport`]
//! ([`ReportBuilder`], pure); and it carries out what changes the cluster (start, shutdown,
//! crash, block, unblock: the owner's machine operations on its control socket; copies and the
//! wait for a machine to stop: here, as `cp` does), each on a thread of its own so that the
//! machines' console lines keep coming meanwhile (a thread follows their timed logs).
//!
//! [`run_tests`] is the whole command: the script checked first (Python's own compiler, so a
//! syntax error is exit 2 before anything starts), then the cluster: one that is up is used as
//! it is and stays up; one that is not is prepared (evaluated, built, planned) and given an
//! owner with no machine booted (the script's `start_all()` and `start()` boot them), which goes
//! down at the end unless `keep`. With `watch`, each edit of the composition's directory (or of
//! the script) reloads the cluster (`session`'s hot-reload cycle) and runs the script again.
//! The JUnit XML of a report ([`junit_xml`]) is pure, and escapes what the guests printed.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use drydock_gc::{Cancel, Deadline, StoreLayout};
use serde::{Deserialize, Serialize};

use crate::compose::{ClusterPlan, TestScript};
use crate::control::{ControlError, ControlOp, machine_op};
use crate::logs::timed_log;
use crate::session::{ReloadOwner, ReloadReport, SessionError, UpEvent, UpRequest, Watching};
use crate::state::{ClusterError, ClusterLaunch, ClusterState, OwnerLock, cluster_paths};
use drydock_vm::{ConsoleTail, LogWatch, ProcessWatch, VmPaths, VmState, WakeFd, wake_pair};

/// The driver module, as the repository has it.
pub const DRIVER: &str = include_str!("../../driver/drydock_driver.py");
/// How long Python may take to compile a script (or to say its version).
const CHECK_DEADLINE: Duration = Duration::from_secs(60);
/// How long a machine may take to stop (powerdown, quit, signals) when a script asks.
const STOP_DEADLINE: Duration = Duration::from_secs(180);
/// How long a block or unblock may take (the owner may be busy with another request).
const QUICK_DEADLINE: Duration = Duration::from_secs(60);
/// How long a copy may take in the guest.
const COPY_DEADLINE: Duration = Duration::from_secs(600);
/// How long a start may take past the machines' ready timeout.
const START_MARGIN: Duration = Duration::from_secs(120);
/// How long the driver gets to exit once its channel is closed.
const DRIVER_EXIT: Duration = Duration::from_secs(5);
/// The longest line the driver may send (its outputs are clipped well below).
const MAX_LINE: u64 = 8 << 20;
/// How many of a failing machine's last console lines a failure shows.
const CONSOLE_LINES: usize = 20;

/// Why `drydock test` could not run a script (a script that fails is a report, not an error).
#[derive(Debug, thiserror::Error)]
pub enum TestError {
    #[error(
        "{python}: not found: `drydock test` runs scripts with the distribution's python3 (Debian: `apt-get install python3`; scripts/setup installs it)"
    )]
    NoPython { python: String },
    #[error("{python}: {message}")]
    Python { python: String, message: String },
    #[error("cannot run {python}")]
    PythonSpawn {
        python: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: cannot read the script", path.display())]
    Script {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}, line {line}: {kind}: {message}{}", shown_text(text, *offset))]
    Syntax {
        file: String,
        line: u64,
        offset: Option<u64>,
        kind: String,
        message: String,
        text: String,
    },
    #[error(
        "{}: no test script: give SCRIPT, or give the composition a top-level `testScript` (a string of Python, as in NixOS tests)",
        .0.display()
    )]
    NoTestScript(PathBuf),
    #[error("{}: testScript must be a string of Python, not {found}", file.display())]
    TestScriptType { file: PathBuf, found: String },
    /// `--from TAG`: the restore before a run failed.
    #[error("--from {tag}")]
    Restore {
        tag: String,
        #[source]
        source: Box<crate::snapshot::SnapshotError>,
    },
    #[error("cannot write {}", path.display())]
    Files {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the test driver (python3)")]
    Channel(#[source] std::io::Error),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error("taking the cluster down after the test")]
    Down(#[source] ClusterError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Watch(#[from] crate::watch::WatchError),
    #[error("waiting for changes")]
    Waiting(#[source] std::io::Error),
    #[error("interrupted; what this run started was stopped")]
    Interrupted,
}

fn shown_text(text: &str, offset: Option<u64>) -> String {
    if text.trim().is_empty() {
        return String::new();
    }
    let lead = text.len() - text.trim_start().len();
    let caret = offset
        .and_then(|o| usize::try_from(o).ok())
        .filter(|o| *o >= 1 && *o > lead)
        .map(|o| format!("\n    {}^", " ".repeat(o - 1 - lead)))
        .unwrap_or_default();
    format!("\n    {}{caret}", text.trim())
}

impl TestError {
    /// A script that does not parse, a missing python3, a bad composition or request: exit 2.
    pub fn is_bad_input(&self) -> bool {
        match self {
            Self::NoPython { .. }
            | Self::Python { .. }
            | Self::Script { .. }
            | Self::Syntax { .. }
            | Self::NoTestScript(_)
            | Self::TestScriptType { .. } => true,
            Self::Restore { source, .. } => source.is_bad_input(),
            Self::Session(e) => e.is_bad_input(),
            Self::Cluster(e) | Self::Down(e) => e.is_bad_input(),
            Self::Control(e) => e.is_bad_input(),
            Self::PythonSpawn { .. }
            | Self::Files { .. }
            | Self::Channel(_)
            | Self::Watch(_)
            | Self::Waiting(_) => false,
            Self::Interrupted => false,
        }
    }

    pub fn is_interrupted(&self) -> bool {
        match self {
            Self::Interrupted => true,
            Self::Session(e) => e.is_interrupted(),
            Self::Cluster(ClusterError::Interrupted) => true,
            Self::Restore { source, .. } => source.is_interrupted(),
            _ => false,
        }
    }
}

// ---- what the driver sends (pure) ----

/// A guest command as the driver saw it last in a call (its outputs clipped).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecRecord {
    pub command: String,
    pub status: i32,
    #[serde(default)]
    pub stdout: String,
    #[serde(default)]
    pub stderr: String,
}

/// A call of the script (`server.succeed("…")`, `start_all()`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallReport {
    /// `None` for the global calls (`start_all`, `join_all`).
    pub machine: Option<String>,
    pub call: String,
    /// The arguments as written in Python, shortened.
    pub args: String,
    pub secs: f64,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The last guest command the call ran, when it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecRecord>,
}

impl CallReport {
    /// `server: succeed('true')`, `start_all()`.
    pub fn shown(&self) -> String {
        match &self.machine {
            Some(m) => format!("{m}: {}({})", self.call, self.args),
            None => format!("{}({})", self.call, self.args),
        }
    }
}

/// A line of the script's traceback.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Frame {
    pub line: u64,
    pub function: String,
    pub text: String,
}

/// The exception that ended the script, as the driver describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScriptError {
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
    #[serde(default)]
    pub frames: Vec<Frame>,
    /// The call that raised it, if a call of the driver did.
    #[serde(default)]
    pub call: Option<CallReport>,
    /// Python's whole traceback (the driver's own frames too).
    #[serde(default)]
    pub traceback: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Start,
    End,
}

/// One line from the driver.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "t", rename_all = "lowercase")]
pub enum DriverMessage {
    /// A subtest began or ended (`path`: the names of the subtests it is nested in, then its
    /// own).
    Subtest {
        phase: Phase,
        path: Vec<String>,
        #[serde(default)]
        secs: f64,
        #[serde(default)]
        ok: bool,
        #[serde(default)]
        error: Option<String>,
    },
    /// A call began; `retrying`: one that tries until a condition holds
    /// (`wait_until_succeeds`, `wait_for_open_port`, ...).
    Begin {
        machine: Option<String>,
        call: String,
        args: String,
        #[serde(default)]
        retrying: bool,
    },
    /// A call ended.
    Call(CallReport),
    /// A message of the script (`log.info`) or of the driver.
    Log {
        #[serde(default)]
        machine: Option<String>,
        text: String,
    },
    /// `serial_stdout_on()` / `serial_stdout_off()`: whether console lines are shown.
    Serial { on: bool },
    /// What the script printed (`print`): its own text, shown as it is.
    Out { text: String },
    /// A request for this process; answered with its `id`.
    Op(OpRequest),
    /// The script ended (`ok`), or raised `error`.
    End {
        ok: bool,
        #[serde(default)]
        error: Option<ScriptError>,
    },
}

/// What the driver asks this process to do.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct OpRequest {
    pub id: u64,
    pub op: String,
    #[serde(default)]
    pub machines: Vec<String>,
    #[serde(default)]
    pub machine: Option<String>,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub target: Option<String>,
    /// `net`: a fault to set or undo (`partition()`, `shape()`, `heal()`).
    #[serde(default)]
    pub net: Option<crate::net::NetRequest>,
}

/// The answer to an [`OpRequest`].
#[derive(Debug, Clone, PartialEq, Serialize)]
struct OpReply {
    id: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

// ---- the report (pure) ----

/// A subtest, as a test case of the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SubtestReport {
    pub name: String,
    /// The names of the subtests it is nested in, then its own.
    pub path: Vec<String>,
    pub secs: f64,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The failing call inside it and its guest command, when one failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_call: Option<CallReport>,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Ending {
    /// The script ran to its end.
    Passed,
    /// It raised.
    Failed,
    /// It did not end within `--timeout` (it was stopped).
    Timeout,
    /// The driver ended without saying how the script did.
    Died,
    /// Ctrl-C or SIGTERM.
    Interrupted,
}

/// Why a run failed, with what it takes to see why: the exception and where in the script, the
/// call and its guest command, the machine's last console lines.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Failure {
    /// `RequestedAssertionFailed: command `false` failed (exit code 1)`, or what stopped it.
    pub message: String,
    /// The script's file (or `FILE (testScript)`) and its lines on the way to the error,
    /// innermost last.
    pub file: String,
    pub frames: Vec<Frame>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub call: Option<CallReport>,
    /// The last console lines of the call's machine (as printed: escape them for a terminal).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub console: Vec<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub traceback: String,
}

/// One run of a script, as printed at its end, as `--json` and as JUnit XML.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TestReport {
    pub cluster: String,
    pub script: String,
    pub ending: Ending,
    /// Exit code: 0 passed, 1 failed (or timed out, or the driver died), 130 interrupted.
    pub exit: u8,
    pub secs: f64,
    pub passed: usize,
    pub failed: usize,
    pub subtests: Vec<SubtestReport>,
    pub calls: Vec<CallReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    /// Under `--watch`: the reload before this run (seconds), if there was one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reload_secs: Option<f64>,
}

/// Builds a [`TestReport`] from the driver's messages as they come.
#[derive(Debug)]
pub struct ReportBuilder {
    cluster: String,
    script: String,
    subtests: Vec<SubtestReport>,
    /// The subtests begun and not ended (indexes into `subtests`).
    open: Vec<usize>,
    calls: Vec<CallReport>,
    /// The call begun and not ended, and when it began.
    running: Option<(CallReport, Instant)>,
    end: Option<(bool, Option<ScriptError>)>,
}

impl ReportBuilder {
    pub fn new(cluster: &str, script: &str) -> Self {
        Self {
            cluster: cluster.to_string(),
            script: script.to_string(),
            subtests: Vec::new(),
            open: Vec::new(),
            calls: Vec::new(),
            running: None,
            end: None,
        }
    }

    /// Take in one message of the driver (an `op` changes nothing here).
    pub fn push(&mut self, m: &DriverMessage) {
        match m {
            DriverMessage::Subtest {
                phase: Phase::Start,
                path,
                ..
            } => {
                self.open.push(self.subtests.len());
                self.subtests.push(SubtestReport {
                    name: path.last().cloned().unwrap_or_default(),
                    path: path.clone(),
                    secs: 0.0,
                    ok: true,
                    error: None,
                    failed_call: None,
                });
            }
            DriverMessage::Subtest {
                phase: Phase::End,
                path,
                secs,
                ok,
                error,
            } => {
                let Some(pos) = self
                    .open
                    .iter()
                    .rposition(|&i| self.subtests[i].path == *path)
                else {
                    return;
                };
                let i = self.open.remove(pos);
                let failed_call = match ok {
                    true => None,
                    false => self.calls.iter().rev().find(|c| !c.ok).cloned(),
                };
                let s = &mut self.subtests[i];
                (s.secs, s.ok, s.error, s.failed_call) = (*secs, *ok, error.clone(), failed_call);
            }
            DriverMessage::Begin {
                machine,
                call,
                args,
                ..
            } => {
                let c = CallReport {
                    machine: machine.clone(),
                    call: call.clone(),
                    args: args.clone(),
                    secs: 0.0,
                    ok: false,
                    error: None,
                    exec: None,
                };
                self.running = Some((c, Instant::now()));
            }
            DriverMessage::Call(c) => {
                self.running = None;
                self.calls.push(c.clone());
            }
            DriverMessage::End { ok, error } => self.end = Some((*ok, error.clone())),
            DriverMessage::Log { .. }
            | DriverMessage::Out { .. }
            | DriverMessage::Serial { .. }
            | DriverMessage::Op(_) => {}
        }
    }

    /// The report of a run that took `secs` and was stopped as `stopped` says (`None`: it ended
    /// by itself); `console` gives a machine's last console lines.
    pub fn finish(
        mut self,
        secs: f64,
        stopped: Option<Ending>,
        console: &dyn Fn(&str) -> Vec<String>,
    ) -> TestReport {
        let ending = match (&stopped, &self.end) {
            (Some(e), _) => *e,
            (None, Some((true, _))) => Ending::Passed,
            (None, Some((false, _))) => Ending::Failed,
            (None, None) => Ending::Died,
        };
        // Subtests still open did not end: the run stopped inside them.
        let why = match ending {
            Ending::Timeout => "the script did not finish within its timeout",
            Ending::Interrupted => "interrupted",
            _ => "the script ended inside it",
        };
        for i in std::mem::take(&mut self.open) {
            let s = &mut self.subtests[i];
            s.ok = false;
            s.error.get_or_insert_with(|| why.to_string());
        }
        let failure =
            match ending {
                Ending::Passed => None,
                Ending::Failed => {
                    let err = self.end.as_ref().and_then(|(_, e)| e.clone());
                    Some(match err {
                        Some(e) => Failure {
                            message: format!("{}: {}", e.kind, e.message),
                            file: self.script.clone(),
                            frames: e.frames,
                            console: e
                                .call
                                .as_ref()
                                .and_then(|c| c.machine.as_deref())
                                .map(console)
                                .unwrap_or_default(),
                            call: e.call,
                            traceback: e.traceback,
                        },
                        None => self.stopped_failure("the script failed"),
                    })
                }
                Ending::Timeout => Some(self.stopped_failure(
                    "it did not finish within its time (--timeout) and was stopped",
                )),
                Ending::Died => {
                    Some(self.stopped_failure("python3 ended without saying how the script ended"))
                }
                Ending::Interrupted => Some(self.stopped_failure("interrupted")),
            };
        let failed = self.subtests.iter().filter(|s| !s.ok).count();
        TestReport {
            cluster: self.cluster,
            script: self.script,
            ending,
            exit: match ending {
                Ending::Passed => 0,
                Ending::Interrupted => 130,
                _ => 1,
            },
            secs,
            passed: self.subtests.len() - failed,
            failed,
            subtests: self.subtests,
            calls: self.calls,
            failure,
            reload_secs: None,
        }
    }

    /// A run stopped from outside (or whose driver died): the call in progress, if one was.
    fn stopped_failure(&self, message: &str) -> Failure {
        let call = self.running.clone().map(|(mut c, began)| {
            c.error = Some(format!("stopped in this call: {message}"));
            c.secs = began.elapsed().as_secs_f64();
            c
        });
        Failure {
            message: message.to_string(),
            file: self.script.clone(),
            frames: Vec::new(),
            call,
            console: Vec::new(),
            traceback: String::new(),
        }
    }
}

/// Text for XML: `&`, `<`, `>`, `"` and `'` as entities; characters XML 1.0 cannot hold at all
/// (controls other than tab, newline and carriage return, lone surrogates' replacements, the
/// non-characters U+FFFE and U+FFFF) as `\xNN` / `\u{NNNN}` text. What a guest printed is
/// safe in an attribute and in element text.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\x{:02x}", c as u32)),
            '\u{fffe}' | '\u{ffff}' => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// A failure as text: the message, where in the script, the call, its guest command's status
/// and output, the machine's last console lines.
pub fn failure_text(f: &Failure) -> String {
    let mut t = format!("{}\n", f.message);
    for fr in &f.frames {
        t.push_str(&format!("  {}, line {}: {}\n", f.file, fr.line, fr.text));
    }
    if let Some(c) = &f.call {
        t.push_str(&call_text(c));
    }
    if !f.console.is_empty() {
        t.push_str("last console lines:\n");
        for l in &f.console {
            t.push_str(&format!("  {l}\n"));
        }
    }
    t
}

/// A failed call as text: the call, its error, its guest command's status and outputs.
pub fn call_text(c: &CallReport) -> String {
    let mut t = format!("call: {} after {:.2} s\n", c.shown(), c.secs);
    if let Some(e) = &c.error {
        t.push_str(&format!("error: {e}\n"));
    }
    if let Some(x) = &c.exec {
        t.push_str(&format!(
            "command: {}\nexit status: {}\n",
            x.command, x.status
        ));
        for (name, out) in [("stdout", &x.stdout), ("stderr", &x.stderr)] {
            if !out.is_empty() {
                t.push_str(&format!("{name}:\n"));
                for l in out.lines() {
                    t.push_str(&format!("  {l}\n"));
                }
            }
        }
    }
    t
}

/// The report as JUnit XML (what CI systems read): a test case per subtest (nested ones named
/// by their path, `outer / inner`) with its time and, when it failed, its failure text; and
/// `main` for the whole script.
pub fn junit_xml(r: &TestReport) -> String {
    let main_failed = r.ending != Ending::Passed;
    let tests = r.subtests.len() + 1;
    let failures = r.failed + usize::from(main_failed);
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"utf-8\"?>\n");
    x.push_str(&format!(
        "<testsuites tests=\"{tests}\" failures=\"{failures}\" errors=\"0\" skipped=\"0\" time=\"{:.3}\">\n",
        r.secs
    ));
    x.push_str(&format!(
        "\t<testsuite name=\"{}\" tests=\"{tests}\" errors=\"0\" failures=\"{failures}\" skipped=\"0\" time=\"{:.3}\">\n",
        xml_escape(&format!("drydock test {} ({})", r.cluster, r.script)),
        r.secs
    ));
    for s in &r.subtests {
        let name = xml_escape(&s.path.join(" / "));
        if s.ok {
            x.push_str(&format!(
                "\t\t<testcase name=\"{name}\" time=\"{:.3}\"/>\n",
                s.secs
            ));
            continue;
        }
        let message = s.error.clone().unwrap_or_else(|| "failed".into());
        let mut body = format!("{message}\n");
        if let Some(c) = &s.failed_call {
            body.push_str(&call_text(c));
        }
        x.push_str(&format!(
            "\t\t<testcase name=\"{name}\" time=\"{:.3}\">\n\t\t\t<failure message=\"{}\">{}</failure>\n\t\t</testcase>\n",
            s.secs,
            xml_escape(&message),
            xml_escape(&body)
        ));
    }
    match (&r.failure, main_failed) {
        (Some(f), true) => x.push_str(&format!(
            "\t\t<testcase name=\"main\" time=\"{:.3}\">\n\t\t\t<failure message=\"{}\">{}</failure>\n\t\t</testcase>\n",
            r.secs,
            xml_escape(&f.message),
            xml_escape(&failure_text(f))
        )),
        _ => x.push_str(&format!(
            "\t\t<testcase name=\"main\" time=\"{:.3}\"/>\n",
            r.secs
        )),
    }
    x.push_str("\t</testsuite>\n</testsuites>\n");
    x
}

/// What `python3 DRIVER --check` printed: nothing wrong, or the error (pure).
pub fn check_result(python: &str, stdout: &str) -> Result<(), TestError> {
    #[derive(Deserialize)]
    struct Checked {
        #[serde(default)]
        error: Option<CheckError>,
    }
    #[derive(Deserialize)]
    struct CheckError {
        #[serde(rename = "type")]
        kind: String,
        message: String,
        #[serde(default)]
        file: Option<String>,
        #[serde(default)]
        line: Option<u64>,
        #[serde(default)]
        offset: Option<u64>,
        #[serde(default)]
        text: Option<String>,
    }
    let last = stdout.lines().last().unwrap_or_default();
    let checked: Checked = serde_json::from_str(last).map_err(|_| TestError::Python {
        python: python.to_string(),
        message: format!(
            "the test driver's check printed {:?}, not its answer",
            stdout.trim()
        ),
    })?;
    let Some(e) = checked.error else {
        return Ok(());
    };
    match (e.file, e.line) {
        (Some(file), Some(line)) => Err(TestError::Syntax {
            file,
            line,
            offset: e.offset,
            kind: e.kind,
            message: e.message,
            text: e.text.unwrap_or_default(),
        }),
        _ => Err(TestError::Python {
            python: python.to_string(),
            message: e.message,
        }),
    }
}

// ---- running it ----

/// Where the script comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScriptSource {
    /// A Python file.
    File(PathBuf),
    /// The composition's top-level `testScript`.
    Composition,
}

/// What `drydock test` asks.
#[derive(Debug, Clone)]
pub struct TestRequest {
    /// The composition, the cluster's name, how to evaluate and build it (its `watch` notes
    /// what the evaluation reads, for `watch` here).
    pub up: UpRequest,
    pub script: ScriptSource,
    /// The python3 to run (default `python3`, from PATH).
    pub python: PathBuf,
    /// Leave a cluster this run started up at the end.
    pub keep: bool,
    /// How long one run of the script may take (none: as long as it takes).
    pub timeout: Option<Duration>,
    /// Stay up and run again on every edit.
    pub watch: bool,
    /// `--from TAG` (refused until cluster snapshots exist).
    pub from: Option<String>,
    /// Where `copy_from_machine` puts files (`$out`, else the current directory).
    pub out_dir: PathBuf,
    /// drydock and its global options, for `shell_interact()` (`drydock … -p NAME shell`).
    pub shell: Vec<String>,
}

/// Something `drydock test` has to say while it works.
#[derive(Debug)]
pub enum TestEvent<'a> {
    /// Preparing or reloading the cluster (build, plan, machine events, console lines).
    Up(UpEvent<'a>),
    /// An owner with no machine booted was started for this run.
    OwnerStarted { cluster: &'a str, after: f64 },
    /// A run of the script begins.
    Running {
        cluster: &'a str,
        script: &'a str,
        machines: usize,
        running: usize,
    },
    /// A line a machine printed on its console (as printed: escape it), while the script runs.
    Console { machine: &'a str, line: &'a str },
    /// A subtest or call began or ended, a log line.
    Driver(&'a DriverMessage),
    /// A run ended.
    Finished(&'a TestReport),
    /// Under `watch`: files changed; a run follows.
    Changed(&'a [PathBuf]),
    /// Under `watch`: the reload before a run failed (nothing changed; no run).
    ReloadFailed(&'a SessionError),
    /// Under `watch`: the edited script cannot run (it does not parse); no run.
    ScriptFailed(&'a TestError),
    /// Under `watch`: waiting for the next change.
    Watching { dir: &'a Path },
    /// The cluster this run started is being taken down.
    Down { cluster: &'a str },
    /// `--from TAG`: the cluster was put back to the snapshot (before the reload and the run).
    Restored {
        cluster: &'a str,
        tag: &'a str,
        secs: f64,
    },
}

/// How `drydock test` ended.
#[derive(Debug)]
pub struct TestOutcome {
    /// The last run's report (under `watch`, every run's was a [`TestEvent::Finished`]).
    pub report: Option<TestReport>,
    pub interrupted: bool,
}

/// The script to run, checked, in a file Python reads.
#[derive(Debug)]
struct Script {
    path: PathBuf,
    label: String,
    /// A file of ours (the composition's `testScript`), removed with this.
    ours: bool,
}

impl Drop for Script {
    fn drop(&mut self) {
        if self.ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// What every run needs.
struct Ctx<'a> {
    layout: &'a StoreLayout,
    state_dir: &'a Path,
    req: &'a TestRequest,
    driver: PathBuf,
    python: String,
    launch: &'a ClusterLaunch,
}

impl Ctx<'_> {
    fn name(&self) -> &str {
        &self.req.up.name
    }

    /// With `--from TAG`: put the cluster back to the snapshot (stopping it first if it is up);
    /// the restored cluster stays up after the run. Whether it restored.
    fn restore_from(
        &self,
        cancel: &Cancel,
        on: &mut dyn FnMut(TestEvent<'_>),
    ) -> Result<bool, TestError> {
        let Some(tag) = &self.req.from else {
            return Ok(false);
        };
        let req = crate::snapshot::RestoreRequest {
            cluster: self.name(),
            tag,
            launch: self.launch,
        };
        let r = crate::snapshot::restore(&req, cancel).map_err(|e| match e.is_interrupted() {
            true => TestError::Interrupted,
            false => TestError::Restore {
                tag: tag.clone(),
                source: Box::new(e),
            },
        })?;
        on(TestEvent::Restored {
            cluster: self.name(),
            tag,
            secs: r.restore_secs,
        });
        Ok(true)
    }

    /// `python3 DRIVER --check SCRIPT LABEL`: a script Python cannot compile is the error.
    fn check(&self, script: &Script) -> Result<(), TestError> {
        let mut cmd = Command::new(&self.req.python);
        cmd.arg(&self.driver)
            .arg("--check")
            .arg(&script.path)
            .arg(&script.label);
        let r = drydock_vm::run_captured(cmd, CHECK_DEADLINE).map_err(|source| {
            match source.kind() {
                std::io::ErrorKind::NotFound => TestError::NoPython {
                    python: self.python.clone(),
                },
                _ => TestError::PythonSpawn {
                    python: self.python.clone(),
                    source,
                },
            }
        })?;
        if r.code != Some(0) && r.stdout.trim().is_empty() {
            return Err(TestError::Python {
                python: self.python.clone(),
                message: format!(
                    "the test driver's check failed ({}): {}",
                    r.code
                        .map_or("killed".into(), |c| format!("exit status {c}")),
                    r.stderr.trim()
                ),
            });
        }
        check_result(&self.python, &r.stdout)
    }

    /// The script of `source`: the file, or the composition's `testScript` written to a
    /// private file of ours.
    fn script(&self, test_script: Option<&TestScript>) -> Result<Script, TestError> {
        match (&self.req.script, test_script) {
            (ScriptSource::File(p), _) => {
                std::fs::metadata(p)
                    .and_then(|m| match m.is_file() {
                        true => Ok(()),
                        false => Err(std::io::Error::other("not a file")),
                    })
                    .map_err(|source| TestError::Script {
                        path: p.clone(),
                        source,
                    })?;
                Ok(Script {
                    path: std::path::absolute(p).unwrap_or_else(|_| p.clone()),
                    label: p.display().to_string(),
                    ours: false,
                })
            }
            (ScriptSource::Composition, Some(TestScript::Text(text))) => {
                let file = std::path::absolute(&self.req.up.file)
                    .unwrap_or_else(|_| self.req.up.file.clone());
                // A name of its own per script (a watched run's new script replaces the old,
                // whose file goes when it is dropped).
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let path = test_dir(self.state_dir, self.name())
                    .join(format!("testScript-{}-{n}.py", std::process::id()));
                drydock_gc::write_atomic(&path, text.as_bytes()).map_err(|source| {
                    TestError::Files {
                        path: path.clone(),
                        source,
                    }
                })?;
                Ok(Script {
                    path,
                    label: format!("{} (testScript)", file.display()),
                    ours: true,
                })
            }
            (ScriptSource::Composition, Some(TestScript::Other(found))) => {
                Err(TestError::TestScriptType {
                    file: self.req.up.file.clone(),
                    found: found.clone(),
                })
            }
            (ScriptSource::Composition, _) => {
                Err(TestError::NoTestScript(self.req.up.file.clone()))
            }
        }
    }
}

/// The folder of `drydock test`'s files (the driver, a composition's script), in the cluster's.
fn test_dir(state_dir: &Path, name: &str) -> PathBuf {
    cluster_paths(state_dir, name).dir.join("test")
}

/// Write the driver module into the cluster's folder (private), where Python runs it from.
fn write_driver(state_dir: &Path, name: &str) -> Result<PathBuf, TestError> {
    let cpaths = cluster_paths(state_dir, name);
    cpaths
        .make_private()
        .map_err(|e| TestError::Cluster(ClusterError::NotPrivate(e)))?;
    let dir = test_dir(state_dir, name);
    let files = |source| TestError::Files {
        path: dir.clone(),
        source,
    };
    drydock_gc::private_dir(&dir).map_err(|e| files(std::io::Error::other(e)))?;
    let path = dir.join("drydock_driver.py");
    drydock_gc::write_atomic(&path, DRIVER.as_bytes()).map_err(files)?;
    Ok(path)
}

/// `drydock test`: check the script, make sure the cluster is up (preparing and starting an
/// owner with no machine booted when it is not), run the script, and with `watch` again after
/// every edit. A cluster this call started goes down at the end unless `keep` (or `watch`, which
/// ends only by `cancel`). `launch` says how machines launch when the cluster is started here.
pub fn run_tests(
    layout: &StoreLayout,
    state_dir: &Path,
    req: &TestRequest,
    launch: &ClusterLaunch,
    store_root: Option<&Path>,
    cancel: &Cancel,
    on: &mut dyn FnMut(TestEvent<'_>),
) -> Result<TestOutcome, TestError> {
    let ctx = Ctx {
        layout,
        state_dir,
        req,
        driver: write_driver(state_dir, &req.up.name)?,
        python: req.python.display().to_string(),
        launch,
    };
    let name = req.up.name.as_str();
    // A script file is checked before anything else happens.
    let mut script = match &req.script {
        ScriptSource::File(_) => {
            let s = ctx.script(None)?;
            ctx.check(&s)?;
            Some(s)
        }
        ScriptSource::Composition => None,
    };
    let mut reads = None;
    // `--from TAG`: the snapshot first, then the composition as it is now (a hot reload: the
    // machines whose system changed since the snapshot switch).
    if ctx.restore_from(cancel, on)? {
        let mut owner = ReloadOwner::Remote {
            state_dir: state_dir.to_path_buf(),
            name: name.to_string(),
        };
        let r = crate::session::reload_cycle(
            layout,
            state_dir,
            &req.up,
            &mut owner,
            cancel,
            &mut |ev| on(TestEvent::Up(ev)),
        );
        on(TestEvent::Up(UpEvent::Reloaded(&r)));
        let report = r?;
        if script.is_none() {
            let s = ctx.script(Some(&report.test_script))?;
            ctx.check(&s)?;
            script = Some(s);
        }
    }
    // A cluster that is up (and ready) is used as it is; else this run starts one, holding
    // its owner lock from before the evaluation (a second `up` or `test` meanwhile is refused,
    // naming this one). One that came up meanwhile is used as it is.
    let lock = match ClusterState::read_up(state_dir, name) {
        Some(s) if s.ready => None,
        _ => match OwnerLock::claim(state_dir, name) {
            Ok(lock) => Some(lock),
            Err(e) => match ClusterState::read_up(state_dir, name) {
                Some(s) if s.ready => None,
                _ => return Err(e.into()),
            },
        },
    };
    let started = match lock {
        None => {
            let state = crate::state::up_cluster(state_dir, name, Some(&req.up.file))?;
            if let Some(m) = req
                .up
                .mentioned
                .iter()
                .find(|m| state.plan.machine(m).is_none())
            {
                return Err(ClusterError::NoMachine {
                    cluster: name.to_string(),
                    machine: m.clone(),
                    has: state.plan.machine_names(),
                }
                .into());
            }
            if script.is_none() {
                let c = crate::eval::evaluate(layout, &req.up.file, req.up.build_timeout, cancel)
                    .map_err(SessionError::from)?;
                let s = ctx.script(Some(&c.test_script))?;
                ctx.check(&s)?;
                script = Some(s);
            }
            None
        }
        Some(lock) => {
            let prepared =
                crate::session::prepare(layout, state_dir, &req.up, None, cancel, &mut |ev| {
                    if let UpEvent::Evaluated { reads: r, .. } = &ev {
                        reads = Some((*r).clone());
                    }
                    on(TestEvent::Up(ev))
                })?;
            if script.is_none() {
                let s = ctx.script(Some(&prepared.test_script))?;
                ctx.check(&s)?;
                script = Some(s);
            }
            let plan = prepared.plan.clone();
            drydock_vm::write_json(&crate::state::up_plan_file(state_dir, name), &plan)
                .map_err(ClusterError::Record)?;
            let owner = crate::control::DetachedOwner {
                plan: &plan,
                launch,
                store_root,
                lock: &lock,
                idle: true,
                restore: None,
            };
            let d = match crate::control::start_detached(&owner, cancel) {
                Err(ClusterError::Interrupted) => return Err(TestError::Interrupted),
                r => r?,
            };
            // Every system is pinned by the machines' run now.
            drop(prepared.roots);
            on(TestEvent::OwnerStarted {
                cluster: name,
                after: d.after_secs,
            });
            Some(plan)
        }
    };
    let Some(script) = script else {
        return Err(TestError::NoTestScript(req.up.file.clone()));
    };
    let ours = started.is_some();
    let result = match req.watch {
        false => run_once(&ctx, &script, ours, None, cancel, on).map(|report| TestOutcome {
            interrupted: report.ending == Ending::Interrupted,
            report: Some(report),
        }),
        true => watch_runs(&ctx, script, ours, reads, cancel, on),
    };
    // What this run started goes down, unless kept (an interrupted run stops it anyway; a
    // watch ends only so).
    if ours && (!req.keep || matches!(&result, Ok(o) if o.interrupted)) {
        on(TestEvent::Down { cluster: name });
        let down = crate::control::down(state_dir, name);
        if let (Ok(_), Err(e)) = (&result, down) {
            return Err(TestError::Down(e));
        }
    }
    result
}

/// A machine as a run sees it.
struct RunMachine {
    name: String,
    paths: VmPaths,
    /// Its QEMU runs now.
    running: bool,
}

/// What a run needs of the cluster: its machines, their folders, which run now.
fn machines_now(state_dir: &Path, plan: &ClusterPlan) -> Vec<RunMachine> {
    plan.machines
        .iter()
        .map(|m| {
            let paths = VmPaths::in_state_dir(state_dir, &m.vm_name);
            let running = VmState::read(&paths).is_some_and(|s| s.qemu_alive());
            RunMachine {
                name: m.machine.clone(),
                paths,
                running,
            }
        })
        .collect()
}

/// What reaches a run's loop.
enum Incoming {
    Line(Vec<u8>),
    Eof,
    Console(String, String),
    OpDone(u64, String, Result<(), String>),
    Cancel,
}

/// The driver: python3, and this end of its channel.
struct DriverProcess {
    child: Child,
    chan: UnixStream,
}

impl DriverProcess {
    fn spawn(ctx: &Ctx<'_>, config: &serde_json::Value) -> Result<Self, TestError> {
        let (ours, theirs) = UnixStream::pair().map_err(TestError::Channel)?;
        let stdin = theirs.try_clone().map_err(TestError::Channel)?;
        let mut cmd = Command::new(&ctx.req.python);
        cmd.arg("-u")
            .arg(&ctx.driver)
            .stdin(Stdio::from(std::os::fd::OwnedFd::from(stdin)))
            .stdout(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
            .stderr(Stdio::inherit())
            .env("PYTHONDONTWRITEBYTECODE", "1");
        drydock_vm::die_with_parent(&mut cmd);
        let child = cmd.spawn().map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => TestError::NoPython {
                python: ctx.python.clone(),
            },
            _ => TestError::PythonSpawn {
                python: ctx.python.clone(),
                source,
            },
        })?;
        // The child holds its ends now; ours alone stay here.
        drop(cmd);
        let mut me = Self { child, chan: ours };
        me.send(config)?;
        Ok(me)
    }

    fn send(&mut self, v: &impl Serialize) -> Result<(), TestError> {
        crate::wire::write_json_line(&self.chan, v).map_err(TestError::Channel)
    }

    /// Kill it (its calls in progress end: the owner kills their commands in the guest).
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.chan.shutdown(std::net::Shutdown::Both);
    }

    /// Wait for its exit (it exits once it said how the script ended), killing it if it does
    /// not within [`DRIVER_EXIT`].
    fn reap(&mut self) {
        if let Some(w) = ProcessWatch::child(self.child.id()) {
            if !w.wait(Deadline::after(DRIVER_EXIT)) {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
    }
}

impl Drop for DriverProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = self.child.wait();
    }
}

/// Read the driver's lines into the run's channel, until it closes.
fn read_lines(chan: UnixStream, tx: Sender<Incoming>) {
    let mut r = BufReader::new(chan);
    loop {
        let mut line = Vec::new();
        match (&mut r).take(MAX_LINE).read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if tx.send(Incoming::Line(line)).is_err() {
                    return;
                }
            }
        }
    }
    let _ = tx.send(Incoming::Eof);
}

/// How often the console follower looks for the folders of machines that are being started
/// (a launch's claim makes a machine's folder; nothing here can wait on that): a back-off,
/// only while a start is in flight and some folder is missing.
const FOLDER_POLL: Duration = Duration::from_millis(100);

/// Follow the machines' timed logs into the run's channel until `stop`: from their end for the
/// machines whose folder is there, from their start for those that appear (a machine's folder
/// is made at its first boot). On `rescan`, a byte `+` says a start began (look for new folders
/// until it ends), `-` that it ended.
fn echo_consoles(
    machines: Vec<(String, VmPaths)>,
    rescan: UnixStream,
    stop: WakeFd,
    tx: Sender<Incoming>,
) {
    let mut tails: BTreeMap<String, ConsoleTail> = BTreeMap::new();
    let mut watch = LogWatch::new();
    let mut first = true;
    let mut starting = false;
    loop {
        for (m, paths) in &machines {
            if tails.contains_key(m) || !paths.dir.is_dir() {
                continue;
            }
            let log = timed_log(paths);
            watch.add(&log);
            let tail = match first {
                true => ConsoleTail::at_end(log),
                false => ConsoleTail::with_rotated(log),
            };
            tails.insert(m.clone(), tail);
        }
        first = false;
        for (m, t) in tails.iter_mut() {
            for l in t.lines() {
                let line = l.split_once('\t').map_or(l.as_str(), |(_, rest)| rest);
                if tx
                    .send(Incoming::Console(m.clone(), line.to_string()))
                    .is_err()
                {
                    return;
                }
            }
        }
        if stop.is_woken() {
            return;
        }
        let missing = tails.len() < machines.len();
        let deadline = (starting && missing).then(|| Deadline::after(FOLDER_POLL));
        if let Err(e) = watch.wait(&[stop.as_fd(), rescan.as_fd()], deadline) {
            tracing::warn!("following the consoles: {e}");
            return;
        }
        let mut buf = [0u8; 64];
        while let Ok(n @ 1..) = (&rescan).read(&mut buf) {
            for b in &buf[..n] {
                starting = *b == b'+';
            }
        }
    }
}

/// Carry out the driver's request `op` (on a thread of its own): an owner's machine operation,
/// a copy, or the wait for machines to stop.
fn do_op(
    state_dir: &Path,
    name: &str,
    ready_timeout: Duration,
    op: &OpRequest,
    cancel: &Cancel,
) -> Result<(), String> {
    let err = |e: &(dyn std::error::Error + 'static)| drydock_vm::error_chain(e);
    let one = || {
        op.machine
            .clone()
            .ok_or_else(|| format!("{}: which machine?", op.op))
    };
    let control = |o: ControlOp, machines: &[String], deadline| {
        machine_op(state_dir, name, o, machines, deadline, Some(cancel)).map_err(|e| err(&e))
    };
    let paths_of = |machine: &str| {
        let vm = format!("{name}.{machine}");
        let paths = VmPaths::in_state_dir(state_dir, &vm);
        (vm, paths)
    };
    match op.op.as_str() {
        "start" => control(ControlOp::Start, &op.machines, ready_timeout + START_MARGIN),
        "shutdown" => control(ControlOp::Stop, &[one()?], STOP_DEADLINE),
        "crash" => control(ControlOp::Crash, &[one()?], STOP_DEADLINE),
        "block" => control(ControlOp::Block, &[one()?], QUICK_DEADLINE),
        "unblock" => control(ControlOp::Unblock, &[one()?], QUICK_DEADLINE),
        "net" => match &op.net {
            Some(crate::net::NetRequest::Capture { .. }) | None => {
                Err("net: a partition, shape or heal".to_string())
            }
            Some(req) => crate::net::net_request(state_dir, name, req.clone())
                .map(|_| ())
                .map_err(|e| err(&e)),
        },
        "wait_down" => {
            let (wake, woken) = wake_pair().map_err(|e| err(&e))?;
            let _w = cancel.on_cancel(move || wake.wake());
            for m in &op.machines {
                let (_, paths) = paths_of(m);
                let Some(st) = VmState::read(&paths).filter(|s| s.qemu_alive()) else {
                    continue;
                };
                let Some(exit) = ProcessWatch::open(st.qemu_pid, st.qemu_start_ticks) else {
                    continue;
                };
                drydock_vm::wait_readable(&[exit.as_fd(), woken.as_fd()], None)
                    .map_err(|e| err(&e))?;
                if cancel.is_set() {
                    return Err("interrupted".into());
                }
            }
            Ok(())
        }
        "copy_to" | "copy_from" => {
            let machine = one()?;
            let (vm, paths) = paths_of(&machine);
            let (Some(source), Some(target)) = (&op.source, &op.target) else {
                return Err(format!("{}: a source and a target", op.op));
            };
            let r = match op.op.as_str() {
                "copy_to" => crate::copy::copy_to_guest(
                    &vm,
                    &paths,
                    Path::new(source),
                    target,
                    COPY_DEADLINE,
                    Some(cancel),
                ),
                _ => crate::copy::copy_from_guest(
                    &vm,
                    &paths,
                    source,
                    Path::new(target),
                    COPY_DEADLINE,
                    Some(cancel),
                ),
            };
            r.map(|_| ()).map_err(|e| err(&e))
        }
        other => Err(format!(
            "the test driver asked for {other:?}, which drydock does not know"
        )),
    }
}

/// One run of the script against the cluster as it is now.
fn run_once(
    ctx: &Ctx<'_>,
    script: &Script,
    ours: bool,
    reload_secs: Option<f64>,
    cancel: &Cancel,
    on: &mut dyn FnMut(TestEvent<'_>),
) -> Result<TestReport, TestError> {
    let name = ctx.name().to_string();
    let state = ClusterState::read_up(ctx.state_dir, &name)
        .ok_or_else(|| ClusterError::not_up(ctx.state_dir, &name))?;
    let machines = machines_now(ctx.state_dir, &state.plan);
    let was_running: BTreeSet<String> = machines
        .iter()
        .filter(|m| m.running)
        .map(|m| m.name.clone())
        .collect();
    for m in &machines {
        // The sockets the driver connects to are in folders of this user alone.
        if m.paths.dir.is_dir() {
            m.paths
                .check_private()
                .map_err(|e| TestError::Cluster(ClusterError::NotPrivate(e)))?;
        }
    }
    let config = serde_json::json!({
        "script": script.path,
        "label": script.label,
        "cluster": name,
        "out_dir": ctx.req.out_dir,
        "shell": ctx.req.shell,
        "machines": machines.iter().map(|m| serde_json::json!({
            "name": m.name,
            "exec": crate::state::exec_socket(&m.paths),
            "console": m.paths.console_log(),
            "running": m.running,
        })).collect::<Vec<_>>(),
    });
    on(TestEvent::Running {
        cluster: &name,
        script: &script.label,
        machines: machines.len(),
        running: was_running.len(),
    });
    let started_at = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel::<Incoming>();
    let mut driver = DriverProcess::spawn(ctx, &config)?;
    let reader = driver.chan.try_clone().map_err(TestError::Channel)?;
    let reading = {
        let tx = tx.clone();
        std::thread::Builder::new()
            .name("test-driver".into())
            .spawn(move || read_lines(reader, tx))
            .map_err(TestError::Channel)?
    };
    let (rescan, rescan_fd) = UnixStream::pair().map_err(TestError::Channel)?;
    rescan_fd
        .set_nonblocking(true)
        .map_err(TestError::Channel)?;
    let (stop_echo, stop_echo_fd) = wake_pair().map_err(TestError::Channel)?;
    let echo = {
        let tx = tx.clone();
        let list = machines
            .iter()
            .map(|m| (m.name.clone(), m.paths.clone()))
            .collect();
        std::thread::Builder::new()
            .name("test-consoles".into())
            .spawn(move || echo_consoles(list, rescan_fd, stop_echo_fd, tx))
            .map_err(TestError::Channel)?
    };
    let _interrupt = {
        let tx = std::sync::Mutex::new(tx.clone());
        cancel.on_cancel(move || {
            if let Ok(tx) = tx.lock() {
                let _ = tx.send(Incoming::Cancel);
            }
        })
    };
    // Requests in flight end with the run: at its end, or with the cancel.
    let ops_cancel = std::sync::Arc::new(Cancel::new());
    let _ops_interrupt = {
        let c = ops_cancel.clone();
        cancel.on_cancel(move || c.cancel())
    };
    let mut builder = ReportBuilder::new(&name, &script.label);
    let deadline = ctx.req.timeout.map(Deadline::after);
    let mut stopped = None;
    let mut started_here: BTreeSet<String> = BTreeSet::new();
    let mut ops = Vec::new();
    let mut serial = true;
    loop {
        let next = match deadline {
            Some(d) => rx.recv_timeout(d.remaining()),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        let msg = match next {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => {
                stopped = Some(Ending::Timeout);
                break;
            }
            Err(RecvTimeoutError::Disconnected) => break,
        };
        match msg {
            Incoming::Cancel => {
                stopped = Some(Ending::Interrupted);
                break;
            }
            Incoming::Eof => break,
            Incoming::Console(m, line) => {
                if serial {
                    on(TestEvent::Console {
                        machine: &m,
                        line: &line,
                    });
                }
            }
            Incoming::OpDone(id, op, result) => {
                if op == "start" {
                    let _ = (&rescan).write(b"-");
                }
                if let Err(e) = driver.send(&OpReply {
                    id,
                    error: result.err(),
                }) {
                    tracing::warn!("answering the test driver: {e}");
                }
            }
            Incoming::Line(line) => {
                let m: DriverMessage = match serde_json::from_slice(&line) {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(
                            "the test driver sent {:?}: {e}",
                            String::from_utf8_lossy(&line)
                        );
                        continue;
                    }
                };
                match &m {
                    DriverMessage::Op(op) => {
                        if op.op == "start" {
                            let _ = (&rescan).write(b"+");
                            started_here.extend(
                                op.machines
                                    .iter()
                                    .filter(|m| !was_running.contains(*m))
                                    .cloned(),
                            );
                        }
                        let (op, tx) = (op.clone(), tx.clone());
                        let (sd, n) = (ctx.state_dir.to_path_buf(), name.clone());
                        let ready = ctx.req.up.ready_timeout;
                        let op_cancel = ops_cancel.clone();
                        ops.push(std::thread::spawn(move || {
                            let r = do_op(&sd, &n, ready, &op, &op_cancel);
                            let _ = tx.send(Incoming::OpDone(op.id, op.op.clone(), r));
                        }));
                    }
                    DriverMessage::Serial { on: s } => serial = *s,
                    _ => {}
                }
                builder.push(&m);
                if !matches!(m, DriverMessage::Op(_) | DriverMessage::End { .. }) {
                    on(TestEvent::Driver(&m));
                }
            }
        }
    }
    let secs = started_at.elapsed().as_secs_f64();
    match stopped {
        Some(_) => driver.kill(),
        None => driver.reap(),
    }
    stop_echo.wake();
    let _ = echo.join();
    drop(driver);
    let _ = reading.join();
    ops_cancel.cancel();
    for t in ops {
        let _ = t.join();
    }
    let console = |machine: &str| {
        let paths = VmPaths::in_state_dir(ctx.state_dir, &format!("{name}.{machine}"));
        drydock_vm::log_tail(&paths.console_log(), CONSOLE_LINES)
            .lines()
            .map(str::to_string)
            .collect()
    };
    let mut report = builder.finish(secs, stopped, &console);
    report.reload_secs = reload_secs;
    if report.ending == Ending::Interrupted && !ours {
        // The machines this run booted on a cluster that was up are stopped again.
        for m in &started_here {
            let _ = machine_op(
                ctx.state_dir,
                &name,
                ControlOp::Stop,
                std::slice::from_ref(m),
                STOP_DEADLINE,
                None,
            );
        }
    }
    on(TestEvent::Finished(&report));
    Ok(report)
}

/// `watch`: after a first run, a reload and a run per burst of edits (a run only, when only the
/// script changed), until `cancel` or the cluster is down.
fn watch_runs(
    ctx: &Ctx<'_>,
    mut script: Script,
    ours: bool,
    reads: Option<crate::watch::Reads>,
    cancel: &Cancel,
    on: &mut dyn FnMut(TestEvent<'_>),
) -> Result<TestOutcome, TestError> {
    let mut watching = Watching::new(&ctx.req.up.file, ctx.state_dir)?;
    if let Some(r) = &reads {
        watching.evaluated(r, true);
    }
    if let ScriptSource::File(p) = &ctx.req.script {
        watching.also(p)?;
    }
    let mut last = Some(run_once(ctx, &script, ours, None, cancel, on)?);
    let (wake, woken) = wake_pair().map_err(TestError::Channel)?;
    let _interrupt = cancel.on_cancel(move || wake.wake());
    let name = ctx.name().to_string();
    while !cancel.is_set() {
        on(TestEvent::Watching { dir: &watching.dir });
        let changed = loop {
            let Some(state) = ClusterState::read_up(ctx.state_dir, &name) else {
                return Ok(TestOutcome {
                    report: last,
                    interrupted: false,
                });
            };
            let Some(owner_exit) = ProcessWatch::open(state.owner_pid, state.owner_start_ticks)
            else {
                return Ok(TestOutcome {
                    report: last,
                    interrupted: false,
                });
            };
            if cancel.is_set() {
                break None;
            }
            if let Some(changed) = watching.due_changes() {
                break Some(changed);
            }
            watching
                .wait(&[owner_exit.as_fd(), woken.as_fd()])
                .map_err(TestError::Waiting)?;
        };
        let Some(changed) = changed else {
            break;
        };
        on(TestEvent::Changed(&changed));
        // `--from TAG`: the snapshot before each run; the reload below then applies the edited
        // composition to it (always: the snapshot may predate earlier edits).
        let restored = match ctx.restore_from(cancel, on) {
            Ok(r) => r,
            Err(TestError::Interrupted) => break,
            Err(e) => return Err(e),
        };
        let only_script = !restored
            && match &ctx.req.script {
                ScriptSource::File(p) => {
                    let p = std::path::absolute(p).unwrap_or_else(|_| p.clone());
                    changed.iter().all(|c| *c == p)
                }
                ScriptSource::Composition => false,
            };
        let mut reload_secs = None;
        if !only_script {
            let t = Instant::now();
            let mut owner = ReloadOwner::Remote {
                state_dir: ctx.state_dir.to_path_buf(),
                name: name.clone(),
            };
            let r: Result<ReloadReport, SessionError> = watching.cycle(
                ctx.layout,
                ctx.state_dir,
                &ctx.req.up,
                &mut owner,
                cancel,
                &mut |ev| on(TestEvent::Up(ev)),
            );
            let test_script = match &r {
                Ok(report) => report.test_script.clone(),
                Err(e) if e.is_interrupted() => break,
                Err(e) => {
                    on(TestEvent::ReloadFailed(e));
                    continue;
                }
            };
            on(TestEvent::Up(UpEvent::Reloaded(&r)));
            reload_secs = Some(t.elapsed().as_secs_f64());
            if ctx.req.script == ScriptSource::Composition {
                match ctx.script(Some(&test_script)).and_then(|s| {
                    ctx.check(&s)?;
                    Ok(s)
                }) {
                    Ok(s) => script = s,
                    Err(e) => {
                        on(TestEvent::ScriptFailed(&e));
                        continue;
                    }
                }
            }
        } else if let Err(e) = ctx.check(&script) {
            on(TestEvent::ScriptFailed(&e));
            continue;
        }
        let report = run_once(ctx, &script, ours, reload_secs, cancel, on)?;
        let interrupted = report.ending == Ending::Interrupted;
        last = Some(report);
        if interrupted {
            break;
        }
    }
    Ok(TestOutcome {
        report: last,
        interrupted: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The driver's lines, as `drydock_driver.py` writes them.
    fn messages(lines: &[&str]) -> Vec<DriverMessage> {
        lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .collect()
    }

    fn built(lines: &[&str], stopped: Option<Ending>) -> TestReport {
        let mut b = ReportBuilder::new("c", "t.py");
        for m in messages(lines) {
            b.push(&m);
        }
        b.finish(9.5, stopped, &|m| vec![format!("{m} said goodbye")])
    }

    const FAILING: &[&str] = &[
        r#"{"t": "begin", "machine": null, "call": "start_all", "args": "", "retrying": false}"#,
        r#"{"t": "call", "machine": null, "call": "start_all", "args": "", "secs": 4.2, "ok": true}"#,
        r#"{"t": "subtest", "phase": "start", "path": ["outer"]}"#,
        r#"{"t": "subtest", "phase": "start", "path": ["outer", "fine"]}"#,
        r#"{"t": "call", "machine": "server", "call": "succeed", "args": "'true'", "secs": 0.02, "ok": true}"#,
        r#"{"t": "subtest", "phase": "end", "path": ["outer", "fine"], "secs": 0.03, "ok": true}"#,
        r#"{"t": "subtest", "phase": "start", "path": ["outer", "broken"]}"#,
        r#"{"t": "log", "machine": "server", "text": "hello"}"#,
        r#"{"t": "out", "text": "printed\n"}"#,
        r#"{"t": "call", "machine": "server", "call": "succeed", "args": "'false'", "secs": 0.02, "ok": false, "error": "RequestedAssertionFailed: command `false` failed (exit code 1)", "exec": {"command": "false", "status": 1, "stdout": "", "stderr": "nope\n"}}"#,
        r#"{"t": "subtest", "phase": "end", "path": ["outer", "broken"], "secs": 0.04, "ok": false, "error": "RequestedAssertionFailed: command `false` failed (exit code 1)"}"#,
        r#"{"t": "subtest", "phase": "end", "path": ["outer"], "secs": 0.1, "ok": false, "error": "RequestedAssertionFailed: command `false` failed (exit code 1)"}"#,
        r#"{"t": "end", "ok": false, "error": {"type": "RequestedAssertionFailed", "message": "command `false` failed (exit code 1)", "frames": [{"line": 7, "function": "<module>", "text": "server.succeed(\"false\")"}], "call": {"machine": "server", "call": "succeed", "args": "'false'", "secs": 0.02, "ok": false, "error": "x", "exec": {"command": "false", "status": 1}}, "traceback": "Traceback ..."}}"#,
    ];

    #[test]
    fn a_report_is_built_from_the_driver_messages() {
        let r = built(FAILING, None);
        assert_eq!((r.ending, r.exit, r.secs), (Ending::Failed, 1, 9.5));
        assert_eq!((r.passed, r.failed), (1, 2));
        let names: Vec<String> = r.subtests.iter().map(|s| s.path.join("/")).collect();
        assert_eq!(names, ["outer", "outer/fine", "outer/broken"]);
        assert_eq!(r.subtests[1].secs, 0.03);
        // A failed subtest keeps the call that failed in it, with its guest command.
        let broken = &r.subtests[2];
        let call = broken.failed_call.as_ref().unwrap();
        assert_eq!(call.shown(), "server: succeed('false')");
        assert_eq!(call.exec.as_ref().unwrap().stderr, "nope\n");
        assert!(r.subtests[1].failed_call.is_none());
        assert_eq!(r.calls.len(), 3);
        let f = r.failure.as_ref().unwrap();
        assert_eq!(
            f.message,
            "RequestedAssertionFailed: command `false` failed (exit code 1)"
        );
        assert_eq!((f.file.as_str(), f.frames[0].line), ("t.py", 7));
        // The failing machine's last console lines come with it.
        assert_eq!(f.console, ["server said goodbye"]);
        let text = failure_text(f);
        assert!(
            text.contains("t.py, line 7: server.succeed(\"false\")"),
            "{text}"
        );
        assert!(text.contains("exit status: 1"), "{text}");
        // A script that ran to its end.
        let ok = built(
            &[
                r#"{"t": "subtest", "phase": "start", "path": ["a"]}"#,
                r#"{"t": "subtest", "phase": "end", "path": ["a"], "secs": 1.0, "ok": true}"#,
                r#"{"t": "end", "ok": true}"#,
            ],
            None,
        );
        assert_eq!(
            (ok.ending, ok.exit, ok.passed, ok.failed),
            (Ending::Passed, 0, 1, 0)
        );
        assert!(ok.failure.is_none());
    }

    #[test]
    fn a_run_stopped_from_outside_names_the_call_in_progress() {
        let lines = [
            r#"{"t": "subtest", "phase": "start", "path": ["slow"]}"#,
            r#"{"t": "begin", "machine": "db", "call": "sleep", "args": "30", "retrying": false}"#,
        ];
        for (stopped, exit, says) in [
            (Ending::Timeout, 1, "(--timeout)"),
            (Ending::Interrupted, 130, "interrupted"),
        ] {
            let r = built(&lines, Some(stopped));
            assert_eq!((r.ending, r.exit), (stopped, exit));
            let f = r.failure.unwrap();
            assert!(f.message.contains(says), "{}", f.message);
            let call = f.call.unwrap();
            assert_eq!(call.shown(), "db: sleep(30)");
            assert!(call.error.unwrap().starts_with("stopped in this call"));
            // The subtest it was in did not end: failed.
            assert!(!r.subtests[0].ok && r.failed == 1);
        }
        // A driver that ended without a word.
        let r = built(&lines[..1], None);
        assert_eq!((r.ending, r.exit), (Ending::Died, 1));
        assert!(r.failure.unwrap().call.is_none());
        assert_eq!(
            r.subtests[0].error.as_deref(),
            Some("the script ended inside it")
        );
    }

    #[test]
    fn requests_and_their_answers_are_one_line_each() {
        let m = messages(&[
            r#"{"t": "op", "id": 3, "op": "start", "machines": ["a", "b"]}"#,
            r#"{"t": "op", "id": 4, "op": "copy_to", "machine": "a", "source": "/h/f", "target": "/g/f"}"#,
            r#"{"t": "serial", "on": false}"#,
        ]);
        let DriverMessage::Op(op) = &m[0] else {
            panic!()
        };
        assert_eq!((op.id, op.op.as_str(), op.machines.len()), (3, "start", 2));
        let DriverMessage::Op(op) = &m[1] else {
            panic!()
        };
        assert_eq!(
            (
                op.machine.as_deref(),
                op.source.as_deref(),
                op.target.as_deref()
            ),
            (Some("a"), Some("/h/f"), Some("/g/f"))
        );
        assert_eq!(m[2], DriverMessage::Serial { on: false });
        let ok = serde_json::to_string(&OpReply { id: 3, error: None }).unwrap();
        assert_eq!(ok, r#"{"id":3}"#);
        let no = serde_json::to_string(&OpReply {
            id: 4,
            error: Some("gone".into()),
        })
        .unwrap();
        assert_eq!(no, r#"{"id":4,"error":"gone"}"#);
    }

    #[test]
    fn junit_holds_each_subtest_and_escapes_what_guests_print() {
        let mut r = built(FAILING, None);
        // What a guest printed, hostile: markup, quotes, an escape sequence, NUL, a
        // non-character; XML 1.0 cannot hold the controls even as entities.
        let nasty = "</failure><x a='1'>&amp; \"q\" \u{1b}[31m\u{0}\u{ffff} ok\n";
        let call = r.subtests[2].failed_call.as_mut().unwrap();
        call.exec.as_mut().unwrap().stdout = nasty.into();
        r.subtests[2].error = Some(nasty.into());
        let x = junit_xml(&r);
        assert!(
            x.starts_with(
                "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<testsuites tests=\"4\" failures=\"3\""
            ),
            "{x}"
        );
        for name in [
            "\"outer\"",
            "\"outer / fine\"",
            "\"outer / broken\"",
            "\"main\"",
        ] {
            assert!(x.contains(&format!("<testcase name={name}")), "{name}: {x}");
        }
        assert!(
            x.contains("<testcase name=\"outer / fine\" time=\"0.030\"/>"),
            "{x}"
        );
        assert!(
            x.contains("&lt;/failure&gt;&lt;x a=&apos;1&apos;&gt;&amp;amp; &quot;q&quot; \\x1b[31m\\x00\\u{ffff} ok"),
            "{x}"
        );
        // Nothing the guest printed opens or closes an element, and no control but tab,
        // newline and carriage return is left.
        assert_eq!(x.matches("<failure").count(), 3);
        assert_eq!(x.matches("</failure>").count(), 3);
        assert!(!x.contains("<x "));
        assert!(
            !x.chars()
                .any(|c| (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r')),
            "a control character is left"
        );
        assert!(!x.contains('\u{ffff}'));
        // A run that passed: no failure anywhere.
        let ok = built(&[r#"{"t": "end", "ok": true}"#], None);
        let x = junit_xml(&ok);
        assert!(!x.contains("<failure"), "{x}");
        assert!(
            x.contains("<testcase name=\"main\" time=\"9.500\"/>"),
            "{x}"
        );
        assert_eq!(xml_escape("a\tb\r\n"), "a\tb\r\n");
    }

    #[test]
    fn a_script_that_does_not_parse_is_named_by_file_and_line() {
        assert!(check_result("python3", "{\"ok\": true}\n").is_ok());
        let e = check_result(
            "python3",
            r#"{"error": {"type": "SyntaxError", "message": "'(' was never closed", "file": "t.py", "line": 3, "offset": 9, "text": "    x = (\n"}}"#,
        )
        .unwrap_err();
        assert!(e.is_bad_input() && !e.is_interrupted());
        assert_eq!(
            e.to_string(),
            "t.py, line 3: SyntaxError: '(' was never closed\n    x = (\n        ^"
        );
        // An error without a place: Python itself (too old, say).
        let e = check_result(
            "python3",
            r#"{"error": {"type": "Python", "message": "Python 3.8.10 is too old"}}"#,
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "python3: Python 3.8.10 is too old");
        assert!(e.is_bad_input());
        // Something else answered.
        let e = check_result("python9", "hello\n").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("python9: the test driver's check printed"),
            "{e}"
        );
        // The caret stays under the offset, whatever the indentation.
        assert_eq!(shown_text("  foo(", Some(6)), "\n    foo(\n       ^");
        assert_eq!(shown_text("", Some(1)), "");
        assert_eq!(shown_text("x", None), "\n    x");
    }

    #[test]
    fn test_errors_keep_their_exit_class() {
        use drydock_gc::ExitClass;
        let class = |e: &TestError| crate::class::exit_class_of(e);
        assert_eq!(
            class(&TestError::NoPython {
                python: "python3".into()
            }),
            Some(ExitClass::BadInput)
        );
        let restore = |e| TestError::Restore {
            tag: "t".into(),
            source: Box::new(e),
        };
        assert_eq!(
            class(&restore(crate::snapshot::SnapshotError::BadTag(
                ".t".into()
            ))),
            Some(ExitClass::BadInput)
        );
        assert_eq!(
            class(&restore(crate::snapshot::SnapshotError::Corrupt {
                tag: "t".into(),
                path: "/s/snapshot.json".into(),
                reason: "cannot be read".into(),
            })),
            Some(ExitClass::Failed)
        );
        assert_eq!(class(&TestError::Interrupted), Some(ExitClass::Interrupted));
        assert_eq!(
            class(&TestError::Cluster(ClusterError::Interrupted)),
            Some(ExitClass::Interrupted)
        );
        assert_eq!(
            class(&TestError::Channel(std::io::Error::other("x"))),
            Some(ExitClass::Failed)
        );
    }

    #[test]
    fn the_driver_is_the_repositorys() {
        // Embedded as written: the names scripts use are there.
        for name in [
            "def start_all",
            "def wait_until_succeeds(self, command, timeout=900)",
            "def wait_for_unit(self, unit, user=None, timeout=900)",
            "def wait_for_open_port(self, port, addr=\"localhost\", timeout=900)",
            "def execute(self, command, check_return=True, check_output=True, timeout=900)",
            "def succeed(self, *commands, timeout=None)",
            "def copy_from_vm",
            "def retry(fn, timeout_seconds=900",
        ] {
            assert!(DRIVER.contains(name), "{name}");
        }
    }
}
