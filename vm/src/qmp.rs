//! A small, blocking QMP (QEMU Machine Protocol) client for drydock's VM launcher.
//!
//! [`Qmp::connect`] opens QEMU's QMP unix socket (retrying while QEMU is still creating it),
//! reads the greeting (QEMU's version is kept, see [`Qmp::version`]) and negotiates
//! capabilities. After that the client offers typed helpers for what the launcher needs
//! ([`Qmp::status`], [`Qmp::stop`], [`Qmp::cont`], [`Qmp::powerdown`], [`Qmp::quit`], snapshot
//! migration to a file with [`Qmp::migrate_to_file`] / [`Qmp::wait_migration`]), a typed
//! escape hatch for any command of the `qapi` schema ([`Qmp::execute`]) and a raw one for
//! anything else ([`Qmp::execute_raw`]).
//!
//! # Deadlines and failures
//!
//! Every blocking call has a deadline: each command waits at most the command timeout
//! ([`Qmp::set_command_timeout`], 10 s by default) and the waiting helpers take their own
//! timeout. The socket is read with a read timeout, and partial lines are kept across timeouts,
//! so a late reply can never desynchronise the stream: every command carries a fresh `id` and
//! replies to commands that already timed out are recognised and dropped. A QEMU that exits or
//! is killed gives [`QmpError::Disconnected`], never a hang.
//!
//! # Events
//!
//! QMP interleaves asynchronous events with command replies. Every event that arrives while the
//! client waits for anything is parsed and queued (bounded, oldest dropped first), so the socket
//! is drained as events arrive. [`Qmp::events`] takes the queue, [`Qmp::wait_event`] /
//! [`Qmp::wait_event_where`] first look at the queue and then read the socket until the event
//! comes or the deadline passes, and [`Qmp::poll_events`] reads whatever is pending without
//! blocking (for a caller that is idle for a long time and wants to keep the socket drained).
//!
//! Writing to a closed socket raises `SIGPIPE`; like every Rust program by default, drydock
//! ignores it, so a dead QEMU shows as `EPIPE` and then [`QmpError::Disconnected`].
//!
//! # How the `qapi` crate is used, and why not more
//!
//! The transport is our own, synchronous, over a [`UnixStream`]: `qapi`'s synchronous `Qmp`
//! reads lines with `BufRead::read_until`, which loses the bytes of a partial line when a read
//! times out (so it cannot be given a read timeout safely), panics on an EOF before the
//! greeting, and deserializes every event into its typed `Event` enum, so one event or enum value
//! newer or older than its schema turns into an I/O error that eats the pending reply. Its async
//! API needs a tokio runtime and a task that keeps polling the event stream, which buys nothing
//! in a synchronous launcher.
//!
//! What is used from `qapi` is the part that helps:
//! - requests are built from `qapi`'s typed command structs (`qapi::qmp::query_status`,
//!   `migrate`, ...) wrapped in `qapi::Execute`, so command and argument names are checked by the
//!   compiler; [`Qmp::execute`] accepts any `qapi::Command` and decodes its typed reply;
//! - typed decoding is tried where it is useful (the greeting, `query-migrate`, events through
//!   [`Event::typed`]) and falls back to the raw JSON when it fails. QEMU 7.2 is older than
//!   the schema `qapi` 0.15 was generated from, so replies may miss fields the schema requires
//!   or carry enum values it does not know; [`RunState`] and [`MigrationStatus`] are therefore
//!   our own enums with an `Other(String)` variant, parsed from the raw JSON.
//!
//! # Migration to a file
//!
//! QEMU 7.2 rejects `file:` migration URIs ("Parameter 'uri' expects a valid migration
//! protocol"; they appeared in QEMU 8.2), so [`Qmp::migrate_to_file`] uses
//! `exec:cat > 'PATH'` (QEMU runs it with `/bin/sh -c`, `cat` is looked up in QEMU's `PATH`),
//! which works on every QEMU version; it is restored by starting QEMU with `-incoming` and
//! [`incoming_file_uri`] (`exec:cat 'PATH'`), either directly on the command line or with
//! `-incoming defer` and [`Qmp::migrate_incoming`]. On QEMU 8.2 and newer, [`file_uri`] with
//! [`Qmp::migrate`] and [`Qmp::migrate_incoming`] needs no process, and allows capabilities
//! such as `mapped-ram` ([`Qmp::set_migration_capabilities`]). When the source VM was stopped
//! before the migration, the restored VM stays paused until [`Qmp::cont`].

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use drydock_gc::Deadline;
use qapi::qmp as q;
use serde::Serialize;
use serde_json::{Value, json};
use tracing::{debug, trace, warn};

/// Default deadline for one command (see [`Qmp::set_command_timeout`]).
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause between two connection attempts while QEMU creates its socket.
const CONNECT_RETRY: Duration = Duration::from_millis(20);
/// How often [`Qmp::wait_migration`] asks `query-migrate`.
const MIGRATION_POLL: Duration = Duration::from_millis(50);
/// A single QMP message larger than this is treated as a protocol error.
const MAX_MESSAGE: usize = 64 << 20;
/// Events kept before the oldest are dropped.
const MAX_QUEUED_EVENTS: usize = 4096;

/// Errors of the QMP client.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be connected before the deadline (or connecting failed for good).
    #[error("could not connect to the QMP socket {} (gave up after {waited:?})", path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// How long we tried.
        waited: Duration,
        /// The last connection error.
        #[source]
        source: io::Error,
    },
    /// QEMU did not answer (or send the awaited event) in time.
    #[error("timed out after {after:?} waiting for {waiting_for}")]
    Timeout {
        /// What was awaited.
        waiting_for: String,
        /// The deadline that passed.
        after: Duration,
    },
    /// QEMU closed the connection (it exited, was killed, or `quit` was sent).
    #[error("QEMU closed the QMP connection {context}")]
    Disconnected {
        /// What we were doing.
        context: String,
        /// The socket error, when the closing showed as one.
        #[source]
        source: Option<io::Error>,
    },
    /// Any other socket error.
    #[error("QMP socket error while {context}")]
    Io {
        /// What we were doing.
        context: String,
        /// The socket error.
        #[source]
        source: io::Error,
    },
    /// QEMU sent something that is not QMP as we know it.
    #[error("QMP protocol error: {detail}")]
    Protocol {
        /// What was wrong.
        detail: String,
        /// The JSON error, if any.
        #[source]
        source: Option<serde_json::Error>,
    },
    /// QEMU answered a command with an error.
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        /// The command name.
        command: String,
        /// QEMU's error class (`GenericError`, `CommandNotFound`, ...).
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// A reply did not match the typed shape `qapi` expects (see [`Qmp::execute`]).
    #[error("reply to QMP command {command} does not match its schema")]
    Decode {
        /// The command name.
        command: String,
        /// The reply as QEMU sent it.
        raw: Value,
        /// The decoding error.
        #[source]
        source: serde_json::Error,
    },
    /// A migration ended in `failed` or `cancelled`.
    #[error("migration {status}{}", desc.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Migration {
        /// The final migration status.
        status: MigrationStatus,
        /// QEMU's `error-desc`, if it gave one.
        desc: Option<String>,
    },
    /// A path cannot be used in a migration URI.
    #[error("cannot use {} as a migration file", path.display())]
    InvalidPath {
        /// The path.
        path: PathBuf,
        /// Why not.
        #[source]
        source: io::Error,
    },
}

impl QmpError {
    /// Whether the error comes from the caller's input rather than from QEMU or the host:
    /// only an unusable migration path is.
    pub fn is_bad_input(&self) -> bool {
        matches!(self, QmpError::InvalidPath { .. })
    }
}

/// QEMU's run state, as `query-status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RunState {
    /// `debug`
    Debug,
    /// `inmigrate`: waiting for an incoming migration.
    InMigrate,
    /// `internal-error`
    InternalError,
    /// `io-error`
    IoError,
    /// `paused`: stopped by `stop` (or restored from a paused snapshot).
    Paused,
    /// `postmigrate`: stopped after an outgoing migration.
    PostMigrate,
    /// `prelaunch`: started with `-S`, never run.
    Prelaunch,
    /// `finish-migrate`
    FinishMigrate,
    /// `restore-vm`
    RestoreVm,
    /// `running`
    Running,
    /// `save-vm`
    SaveVm,
    /// `shutdown`: the guest shut down (with `-no-shutdown`).
    Shutdown,
    /// `suspended`
    Suspended,
    /// `watchdog`
    Watchdog,
    /// `guest-panicked`
    GuestPanicked,
    /// `colo`
    Colo,
    /// A state this client does not know.
    Other(String),
}

impl RunState {
    const NAMES: [(&'static str, RunState); 16] = [
        ("debug", RunState::Debug),
        ("inmigrate", RunState::InMigrate),
        ("internal-error", RunState::InternalError),
        ("io-error", RunState::IoError),
        ("paused", RunState::Paused),
        ("postmigrate", RunState::PostMigrate),
        ("prelaunch", RunState::Prelaunch),
        ("finish-migrate", RunState::FinishMigrate),
        ("restore-vm", RunState::RestoreVm),
        ("running", RunState::Running),
        ("save-vm", RunState::SaveVm),
        ("shutdown", RunState::Shutdown),
        ("suspended", RunState::Suspended),
        ("watchdog", RunState::Watchdog),
        ("guest-panicked", RunState::GuestPanicked),
        ("colo", RunState::Colo),
    ];

    /// Parses QEMU's name for a run state; unknown names become [`RunState::Other`].
    pub fn from_name(name: &str) -> RunState {
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| s.clone())
            .unwrap_or_else(|| RunState::Other(name.to_owned()))
    }

    /// QEMU's name for the state.
    pub fn as_str(&self) -> &str {
        match self {
            RunState::Other(name) => name,
            known => Self::NAMES
                .iter()
                .find(|(_, s)| s == known)
                .map(|(n, _)| *n)
                .unwrap_or("?"),
        }
    }
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The reply to `query-status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmStatus {
    /// The run state.
    pub state: RunState,
    /// Whether the vCPUs are running.
    pub running: bool,
}

impl VmStatus {
    fn from_reply(reply: &Value) -> Result<VmStatus, QmpError> {
        let state = reply
            .get("status")
            .and_then(Value::as_str)
            .map(RunState::from_name)
            .ok_or_else(|| protocol(format!("query-status reply without a status: {reply}")))?;
        let running = reply
            .get("running")
            .and_then(Value::as_bool)
            .unwrap_or(state == RunState::Running);
        Ok(VmStatus { state, running })
    }
}

/// A migration's status, as `query-migrate` (or the `MIGRATION` event) reports it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MigrationStatus {
    /// `none`: no migration was started.
    None,
    /// `setup`
    Setup,
    /// `cancelling`
    Cancelling,
    /// `cancelled`
    Cancelled,
    /// `active`
    Active,
    /// `postcopy-active`
    PostcopyActive,
    /// `postcopy-paused`
    PostcopyPaused,
    /// `postcopy-recover`
    PostcopyRecover,
    /// `completed`
    Completed,
    /// `failed`
    Failed,
    /// `colo`
    Colo,
    /// `pre-switchover`
    PreSwitchover,
    /// `device`
    Device,
    /// `wait-unplug`
    WaitUnplug,
    /// A status this client does not know.
    Other(String),
}

impl MigrationStatus {
    const NAMES: [(&'static str, MigrationStatus); 14] = [
        ("none", MigrationStatus::None),
        ("setup", MigrationStatus::Setup),
        ("cancelling", MigrationStatus::Cancelling),
        ("cancelled", MigrationStatus::Cancelled),
        ("active", MigrationStatus::Active),
        ("postcopy-active", MigrationStatus::PostcopyActive),
        ("postcopy-paused", MigrationStatus::PostcopyPaused),
        ("postcopy-recover", MigrationStatus::PostcopyRecover),
        ("completed", MigrationStatus::Completed),
        ("failed", MigrationStatus::Failed),
        ("colo", MigrationStatus::Colo),
        ("pre-switchover", MigrationStatus::PreSwitchover),
        ("device", MigrationStatus::Device),
        ("wait-unplug", MigrationStatus::WaitUnplug),
    ];

    /// Parses QEMU's name for a status; unknown names become [`MigrationStatus::Other`].
    pub fn from_name(name: &str) -> MigrationStatus {
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, s)| s.clone())
            .unwrap_or_else(|| MigrationStatus::Other(name.to_owned()))
    }

    /// QEMU's name for the status.
    pub fn as_str(&self) -> &str {
        match self {
            MigrationStatus::Other(name) => name,
            known => Self::NAMES
                .iter()
                .find(|(_, s)| s == known)
                .map(|(n, _)| *n)
                .unwrap_or("?"),
        }
    }
}

impl std::fmt::Display for MigrationStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The reply to `query-migrate`, reduced to what drydock uses; `raw` has everything.
#[derive(Debug, Clone, PartialEq)]
pub struct MigrationInfo {
    /// The status (`none` when QEMU reports none).
    pub status: MigrationStatus,
    /// QEMU's `error-desc` for a failed migration.
    pub error_desc: Option<String>,
    /// `total-time`, once the migration has ended.
    pub total_time: Option<Duration>,
    /// `ram.transferred`: bytes of RAM sent so far.
    pub ram_transferred: Option<u64>,
    /// The reply as QEMU sent it.
    pub raw: Value,
}

impl MigrationInfo {
    /// Decodes a `query-migrate` reply: with `qapi`'s typed `MigrationInfo` when the reply fits
    /// its schema, from the raw JSON otherwise.
    fn from_reply(reply: Value) -> MigrationInfo {
        let millis = |ms: Option<i64>| {
            ms.and_then(|ms| u64::try_from(ms).ok())
                .map(Duration::from_millis)
        };
        match serde_json::from_value::<q::MigrationInfo>(reply.clone()) {
            Ok(typed) => MigrationInfo {
                status: typed
                    .status
                    .and_then(|s| serde_json::to_value(s).ok())
                    .and_then(|s| s.as_str().map(MigrationStatus::from_name))
                    .unwrap_or(MigrationStatus::None),
                error_desc: typed.error_desc,
                total_time: millis(typed.total_time),
                ram_transferred: typed.ram.and_then(|r| u64::try_from(r.transferred).ok()),
                raw: reply,
            },
            Err(e) => {
                debug!(error = %e, "query-migrate reply does not fit the qapi schema; using raw JSON");
                MigrationInfo {
                    status: reply
                        .get("status")
                        .and_then(Value::as_str)
                        .map(MigrationStatus::from_name)
                        .unwrap_or(MigrationStatus::None),
                    error_desc: reply
                        .get("error-desc")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                    total_time: millis(reply.get("total-time").and_then(Value::as_i64)),
                    ram_transferred: reply
                        .get("ram")
                        .and_then(|r| r.get("transferred"))
                        .and_then(Value::as_u64),
                    raw: reply,
                }
            }
        }
    }
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The event name (`STOP`, `RESUME`, `SHUTDOWN`, `POWERDOWN`, `MIGRATION`, ...).
    pub name: String,
    /// The event's `data` (`Value::Null` when it has none).
    pub data: Value,
    /// When QEMU emitted it, if QEMU knew.
    pub timestamp: Option<SystemTime>,
    raw: Value,
}

impl Event {
    fn from_message(raw: Value) -> Option<Event> {
        let name = raw.get("event")?.as_str()?.to_owned();
        let data = raw.get("data").cloned().unwrap_or(Value::Null);
        let timestamp = raw.get("timestamp").and_then(|t| {
            let secs = u64::try_from(t.get("seconds")?.as_i64()?).ok()?;
            let micros = u64::try_from(t.get("microseconds")?.as_i64()?).ok()?;
            SystemTime::UNIX_EPOCH
                .checked_add(Duration::from_secs(secs) + Duration::from_micros(micros))
        });
        Some(Event {
            name,
            data,
            timestamp,
            raw,
        })
    }

    /// The event decoded with `qapi`'s schema, or `None` when it does not fit (an event or a
    /// value the schema does not know).
    pub fn typed(&self) -> Option<q::Event> {
        serde_json::from_value(self.raw.clone()).ok()
    }

    /// The event as QEMU sent it.
    pub fn raw(&self) -> &Value {
        &self.raw
    }
}

/// A wait that ran out of time: `after` is filled in by the public call that knows the budget
/// it was given (see [`with_budget`]).
fn timed_out(waiting_for: &str) -> QmpError {
    QmpError::Timeout {
        waiting_for: waiting_for.to_owned(),
        after: Duration::ZERO,
    }
}

/// A call's result with its timeout's budget named in the error.
fn with_budget<T>(r: Result<T, QmpError>, budget: Duration) -> Result<T, QmpError> {
    r.map_err(|e| match e {
        QmpError::Timeout { waiting_for, after } if after.is_zero() => QmpError::Timeout {
            waiting_for,
            after: budget,
        },
        e => e,
    })
}

/// One parsed QMP message.
enum Message {
    Greeting(Value),
    Event(Event),
    Reply {
        id: Option<Value>,
        result: Result<Value, (String, String)>,
    },
    Unknown(Value),
}

impl Message {
    fn classify(v: Value) -> Message {
        if v.get("QMP").is_some() {
            return Message::Greeting(v);
        }
        if v.get("event").is_some() {
            return match Event::from_message(v.clone()) {
                Some(e) => Message::Event(e),
                None => Message::Unknown(v),
            };
        }
        let id = v.get("id").cloned();
        if let Some(ret) = v.get("return") {
            return Message::Reply {
                id,
                result: Ok(ret.clone()),
            };
        }
        if let Some(err) = v.get("error") {
            let field = |k: &str| {
                err.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            return Message::Reply {
                id,
                result: Err((field("class"), field("desc"))),
            };
        }
        Message::Unknown(v)
    }
}

fn protocol(detail: String) -> QmpError {
    QmpError::Protocol {
        detail,
        source: None,
    }
}

fn is_disconnect(kind: io::ErrorKind) -> bool {
    matches!(
        kind,
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NotConnected
            | io::ErrorKind::UnexpectedEof
    )
}

/// A connected QMP session (see the module documentation).
#[derive(Debug)]
pub struct Qmp {
    stream: UnixStream,
    socket: PathBuf,
    /// Bytes read but not yet a complete message.
    buf: Vec<u8>,
    events: VecDeque<Event>,
    version: (u32, u32, u32),
    package: String,
    next_id: u64,
    command_timeout: Duration,
    /// Set once the connection is known to be unusable, with the reason.
    closed: Option<String>,
}

impl Qmp {
    /// Connects to QEMU's QMP socket at `socket`, retrying while it does not exist yet or
    /// refuses connections, reads the greeting and negotiates capabilities. All of it must
    /// finish within `timeout`: a socket nobody listens on gives [`QmpError::Connect`], one
    /// that accepts but never greets gives [`QmpError::Timeout`] (QEMU serves one QMP client
    /// per socket at a time, so a second client waits like that).
    pub fn connect(socket: &Path, timeout: Duration) -> Result<Qmp, QmpError> {
        with_budget(Self::connect_by(socket, Deadline::after(timeout)), timeout)
    }

    fn connect_by(socket: &Path, deadline: Deadline) -> Result<Qmp, QmpError> {
        let started = Instant::now();
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(stream) => break stream,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound
                            | io::ErrorKind::ConnectionRefused
                            | io::ErrorKind::WouldBlock
                    ) =>
                {
                    match deadline.timeout() {
                        // A back-off, bounded by the deadline: a socket that is not there yet
                        // (QEMU starting) or whose listener is gone cannot be waited on.
                        Some(left) => std::thread::sleep(left.min(CONNECT_RETRY)),
                        None => {
                            return Err(QmpError::Connect {
                                path: socket.to_owned(),
                                waited: started.elapsed(),
                                source: e,
                            });
                        }
                    }
                }
                Err(e) => {
                    return Err(QmpError::Connect {
                        path: socket.to_owned(),
                        waited: started.elapsed(),
                        source: e,
                    });
                }
            }
        };
        debug!(socket = %socket.display(), "connected to QMP socket");
        let mut qmp = Qmp {
            stream,
            socket: socket.to_owned(),
            buf: Vec::new(),
            events: VecDeque::new(),
            version: (0, 0, 0),
            package: String::new(),
            next_id: 1,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            closed: None,
        };
        let greeting = loop {
            match Message::classify(qmp.read_message(deadline, "the QMP greeting")?) {
                Message::Greeting(g) => break g,
                Message::Event(e) => qmp.queue_event(e),
                _ => return Err(protocol("QEMU did not start with a QMP greeting".into())),
            }
        };
        (qmp.version, qmp.package) = parse_greeting(&greeting)?;
        qmp.call(&q::qmp_capabilities { enable: None }, deadline)?;
        debug!(version = ?qmp.version, package = %qmp.package, "QMP capabilities negotiated");
        Ok(qmp)
    }

    /// QEMU's version from the greeting, as `(major, minor, micro)`.
    pub fn version(&self) -> (u32, u32, u32) {
        self.version
    }

    /// QEMU's package string from the greeting (e.g. the distribution's version).
    pub fn package(&self) -> &str {
        &self.package
    }

    /// The socket this session is connected to.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The deadline of each command (10 s unless changed).
    pub fn command_timeout(&self) -> Duration {
        self.command_timeout
    }

    /// Changes the deadline of each command.
    pub fn set_command_timeout(&mut self, timeout: Duration) {
        self.command_timeout = timeout;
    }

    /// `query-status`: the run state and whether the vCPUs run.
    pub fn status(&mut self) -> Result<VmStatus, QmpError> {
        let reply = self.command(&q::query_status {})?;
        VmStatus::from_reply(&reply)
    }

    /// `stop`: pauses the vCPUs (QEMU emits `STOP`).
    pub fn stop(&mut self) -> Result<(), QmpError> {
        self.command(&q::stop {}).map(drop)
    }

    /// `cont`: resumes the vCPUs (QEMU emits `RESUME`).
    pub fn cont(&mut self) -> Result<(), QmpError> {
        self.command(&q::cont {}).map(drop)
    }

    /// `system_powerdown`: presses the ACPI power button (QEMU emits `POWERDOWN`; a guest
    /// that handles it then shuts down, giving `SHUTDOWN`).
    pub fn powerdown(&mut self) -> Result<(), QmpError> {
        self.command(&q::system_powerdown {}).map(drop)
    }

    /// `quit`: makes QEMU exit. The connection closing before the reply counts as success;
    /// afterwards every call gives [`QmpError::Disconnected`]. Use
    /// [`Qmp::wait_disconnected`] to wait until QEMU has closed the socket.
    pub fn quit(&mut self) -> Result<(), QmpError> {
        match self.command(&q::quit {}) {
            Ok(_) | Err(QmpError::Disconnected { .. }) => {
                self.closed.get_or_insert_with(|| "after quit".to_owned());
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Reads (queueing events) until QEMU closes the connection, e.g. after [`Qmp::quit`].
    pub fn wait_disconnected(&mut self, timeout: Duration) -> Result<(), QmpError> {
        let deadline = Deadline::after(timeout);
        // `quit` marks the session closed for commands; the socket itself may still be open.
        let closed = self.closed.take();
        let result = loop {
            match self.read_message(deadline, "QEMU to close the QMP connection") {
                Ok(v) => self.dispatch_unsolicited(v),
                Err(QmpError::Disconnected { .. }) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        if self.closed.is_none() {
            self.closed = closed;
        }
        with_budget(result, timeout)
    }

    /// Runs any command of `qapi`'s schema and decodes the reply with its typed shape. A reply
    /// that does not fit (QEMU older or newer than the schema) gives [`QmpError::Decode`] with
    /// the raw reply.
    pub fn execute<C: qapi::Command>(&mut self, command: &C) -> Result<C::Ok, QmpError> {
        let reply = self.command(command)?;
        serde_json::from_value(reply.clone()).map_err(|source| QmpError::Decode {
            command: C::NAME.to_owned(),
            raw: reply,
            source,
        })
    }

    /// Runs `command` with `arguments` (`Value::Null` for none) and returns QEMU's raw reply.
    /// An error reply gives [`QmpError::Command`] with QEMU's class and description.
    pub fn execute_raw(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let id = self.take_id();
        let mut request = json!({ "execute": command, "id": id });
        if !arguments.is_null() {
            request["arguments"] = arguments;
        }
        let deadline = self.command_deadline();
        with_budget(
            self.round_trip(command, id, &request, deadline),
            self.command_timeout,
        )
    }

    /// Takes the queued events, oldest first.
    pub fn events(&mut self) -> Vec<Event> {
        self.events.drain(..).collect()
    }

    /// Reads every message QEMU has already sent, without blocking, and queues the events.
    pub fn poll_events(&mut self) -> Result<(), QmpError> {
        loop {
            while let Some(v) = self.take_message()? {
                self.dispatch_unsolicited(v);
            }
            if !self.fill_nonblocking()? {
                return Ok(());
            }
        }
    }

    /// Waits for the event called `name` (the oldest queued one first), up to `timeout`.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<Event, QmpError> {
        self.wait_event_where(&format!("event {name}"), timeout, |e| e.name == name)
    }

    /// Waits for the first event (queued or new) for which `matches` holds, up to `timeout`;
    /// other events stay queued. `what` names the awaited event in a timeout error.
    pub fn wait_event_where(
        &mut self,
        what: &str,
        timeout: Duration,
        mut matches: impl FnMut(&Event) -> bool,
    ) -> Result<Event, QmpError> {
        if let Some(i) = self.events.iter().position(&mut matches) {
            if let Some(event) = self.events.remove(i) {
                return Ok(event);
            }
        }
        let deadline = Deadline::after(timeout);
        loop {
            let v = with_budget(self.read_message(deadline, what), timeout)?;
            match Message::classify(v) {
                Message::Event(e) if matches(&e) => return Ok(e),
                Message::Event(e) => self.queue_event(e),
                other => self.ignore(other),
            }
        }
    }

    /// Starts an outgoing migration to `uri` (`migrate`). See [`Qmp::wait_migration`].
    pub fn migrate(&mut self, uri: &str) -> Result<(), QmpError> {
        let command = q::migrate {
            uri: Some(uri.to_owned()),
            channels: None,
            detach: None,
            resume: None,
        };
        self.command(&command).map(drop)
    }

    /// Starts migrating the VM's state into the file at `path` (created or truncated), with
    /// an `exec:cat > 'PATH'` URI (see the module documentation). For a consistent snapshot,
    /// [`Qmp::stop`] first; QEMU leaves the VM in `postmigrate` when the migration completes.
    /// A relative `path` is made absolute against this process's directory.
    pub fn migrate_to_file(&mut self, path: &Path) -> Result<(), QmpError> {
        let path = absolute_utf8(path)?;
        let uri = format!("exec:cat > {}", shell_quote(&path));
        debug!(%uri, "migrating to file");
        self.migrate(&uri)
    }

    /// `migrate-incoming`: for a QEMU started with `-incoming defer`, starts receiving a
    /// migration from `uri` (e.g. [`incoming_file_uri`]).
    pub fn migrate_incoming(&mut self, uri: &str) -> Result<(), QmpError> {
        let command = q::migrate_incoming {
            uri: Some(uri.to_owned()),
            channels: None,
            exit_on_error: None,
        };
        self.command(&command).map(drop)
    }

    /// `migrate-set-capabilities`: each `(capability, state)` (e.g. `("mapped-ram", true)`), on
    /// both sides of a migration before it starts.
    pub fn set_migration_capabilities(&mut self, caps: &[(&str, bool)]) -> Result<(), QmpError> {
        let caps: Vec<Value> = caps
            .iter()
            .map(|(c, on)| json!({ "capability": c, "state": on }))
            .collect();
        self.execute_raw("migrate-set-capabilities", json!({ "capabilities": caps }))
            .map(drop)
    }

    /// `query-migrate`, decoded tolerantly (see [`MigrationInfo`]).
    pub fn query_migrate(&mut self) -> Result<MigrationInfo, QmpError> {
        let reply = self.command(&q::query_migrate {})?;
        Ok(MigrationInfo::from_reply(reply))
    }

    /// Polls `query-migrate` until the migration completes (its info is returned), fails or is
    /// cancelled ([`QmpError::Migration`]), or `timeout` passes ([`QmpError::Timeout`]).
    /// Events keep being read between polls.
    pub fn wait_migration(&mut self, timeout: Duration) -> Result<MigrationInfo, QmpError> {
        with_budget(self.wait_migration_by(Deadline::after(timeout)), timeout)
    }

    fn wait_migration_by(&mut self, deadline: Deadline) -> Result<MigrationInfo, QmpError> {
        loop {
            let reply = self.call(&q::query_migrate {}, self.command_deadline().min(deadline))?;
            let info = MigrationInfo::from_reply(reply);
            trace!(status = %info.status, "migration status");
            match info.status {
                MigrationStatus::Completed => return Ok(info),
                MigrationStatus::Failed | MigrationStatus::Cancelled => {
                    return Err(QmpError::Migration {
                        status: info.status,
                        desc: info.error_desc,
                    });
                }
                _ => {}
            }
            if deadline.expired() {
                return Err(timed_out("the migration to complete"));
            }
            // Between two queries (QEMU reports no progress by itself): the events that came.
            self.pump(Deadline::after(MIGRATION_POLL).min(deadline))?;
        }
    }

    // ---- internals ----

    fn command_deadline(&self) -> Deadline {
        Deadline::after(self.command_timeout)
    }

    /// Sends a typed command with the command deadline.
    fn command<C: qapi::Command>(&mut self, command: &C) -> Result<Value, QmpError> {
        let deadline = self.command_deadline();
        with_budget(self.call(command, deadline), self.command_timeout)
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// Sends a typed `qapi` command and returns the raw reply.
    fn call<C: qapi::Command>(
        &mut self,
        command: &C,
        deadline: Deadline,
    ) -> Result<Value, QmpError> {
        let id = self.take_id();
        let request = qapi::Execute::with_id(command, id);
        self.round_trip(C::NAME, id, &request, deadline)
    }

    fn round_trip(
        &mut self,
        name: &str,
        id: u64,
        request: &impl Serialize,
        deadline: Deadline,
    ) -> Result<Value, QmpError> {
        self.send(name, request, deadline)?;
        let what = format!("the reply to {name}");
        loop {
            match Message::classify(self.read_message(deadline, &what)?) {
                Message::Event(e) => self.queue_event(e),
                // A reply without an id answers a request QEMU could not even parse: ours.
                Message::Reply { id: Some(got), .. } if got != json!(id) => {
                    debug!(id = %got, "dropping the reply to a command that timed out");
                }
                Message::Reply { result, .. } => {
                    return result.map_err(|(class, desc)| QmpError::Command {
                        command: name.to_owned(),
                        class,
                        desc,
                    });
                }
                other => self.ignore(other),
            }
        }
    }

    fn send(
        &mut self,
        name: &str,
        request: &impl Serialize,
        deadline: Deadline,
    ) -> Result<(), QmpError> {
        if let Some(why) = &self.closed {
            return Err(QmpError::Disconnected {
                context: format!("({why}); cannot send {name}"),
                source: None,
            });
        }
        let mut line = serde_json::to_vec(request).map_err(|e| QmpError::Protocol {
            detail: format!("cannot encode {name}"),
            source: Some(e),
        })?;
        line.push(b'\n');
        trace!(request = %String::from_utf8_lossy(&line).trim_end(), "-> QMP");
        let left = deadline
            .timeout()
            .ok_or_else(|| timed_out(&format!("sending {name}")))?;
        let io_err = |context: String, source: io::Error| QmpError::Io { context, source };
        self.stream
            .set_write_timeout(Some(left))
            .map_err(|e| io_err(format!("sending {name}"), e))?;
        match self.stream.write_all(&line) {
            Ok(()) => Ok(()),
            Err(e) if is_disconnect(e.kind()) => {
                self.closed = Some("while sending a command".into());
                Err(QmpError::Disconnected {
                    context: format!("while sending {name}"),
                    source: Some(e),
                })
            }
            Err(e) => {
                // A partial write leaves the stream unusable.
                self.closed = Some(format!("after failing to send {name}: {e}"));
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) {
                    Err(timed_out(&format!("QEMU to accept {name}")))
                } else {
                    Err(io_err(format!("sending {name}"), e))
                }
            }
        }
    }

    /// Returns the next complete message, reading until `deadline`.
    fn read_message(&mut self, deadline: Deadline, what: &str) -> Result<Value, QmpError> {
        loop {
            if let Some(v) = self.take_message()? {
                return Ok(v);
            }
            self.fill(deadline, what)?;
        }
    }

    /// Parses one complete buffered line, if there is one.
    fn take_message(&mut self) -> Result<Option<Value>, QmpError> {
        while let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=end).collect();
            let line = line.trim_ascii();
            if line.is_empty() {
                continue;
            }
            trace!(message = %String::from_utf8_lossy(line), "<- QMP");
            return serde_json::from_slice(line)
                .map(Some)
                .map_err(|e| QmpError::Protocol {
                    detail: format!("not JSON: {}", String::from_utf8_lossy(line)),
                    source: Some(e),
                });
        }
        if self.buf.len() > MAX_MESSAGE {
            self.closed = Some("after an oversized message".into());
            return Err(protocol(format!("message longer than {MAX_MESSAGE} bytes")));
        }
        Ok(None)
    }

    /// Reads more bytes, blocking until `deadline`.
    fn fill(&mut self, deadline: Deadline, what: &str) -> Result<(), QmpError> {
        self.check_open(what)?;
        let left = deadline.timeout().ok_or_else(|| timed_out(what))?;
        self.stream
            .set_read_timeout(Some(left))
            .map_err(|source| QmpError::Io {
                context: format!("waiting for {what}"),
                source,
            })?;
        self.read_some(what).map(drop)
    }

    /// Reads what is available without blocking; `false` when nothing was.
    fn fill_nonblocking(&mut self) -> Result<bool, QmpError> {
        let what = "pending QMP messages";
        self.check_open(what)?;
        let set = |s: &UnixStream, on: bool| {
            s.set_nonblocking(on).map_err(|source| QmpError::Io {
                context: "polling for events".into(),
                source,
            })
        };
        set(&self.stream, true)?;
        let got = self.read_some(what);
        set(&self.stream, false)?;
        got
    }

    fn check_open(&self, what: &str) -> Result<(), QmpError> {
        match &self.closed {
            Some(why) => Err(QmpError::Disconnected {
                context: format!("({why}) while waiting for {what}"),
                source: None,
            }),
            None => Ok(()),
        }
    }

    /// One `read`; `Ok(false)` when it timed out or would block.
    fn read_some(&mut self, what: &str) -> Result<bool, QmpError> {
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => {
                self.closed = Some("QEMU closed the socket".into());
                Err(QmpError::Disconnected {
                    context: format!("while waiting for {what}"),
                    source: None,
                })
            }
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(true)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(false)
            }
            Err(e) if is_disconnect(e.kind()) => {
                self.closed = Some(format!("socket error: {e}"));
                Err(QmpError::Disconnected {
                    context: format!("while waiting for {what}"),
                    source: Some(e),
                })
            }
            Err(source) => Err(QmpError::Io {
                context: format!("waiting for {what}"),
                source,
            }),
        }
    }

    /// Reads and queues events until `deadline` (a quiet socket is not an error here).
    fn pump(&mut self, deadline: Deadline) -> Result<(), QmpError> {
        loop {
            match self.read_message(deadline, "QMP events") {
                Ok(v) => self.dispatch_unsolicited(v),
                Err(QmpError::Timeout { .. }) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    fn dispatch_unsolicited(&mut self, v: Value) {
        match Message::classify(v) {
            Message::Event(e) => self.queue_event(e),
            other => self.ignore(other),
        }
    }

    fn ignore(&self, message: Message) {
        match message {
            Message::Reply { id, .. } => {
                debug!(id = ?id, "dropping the reply to a command that timed out");
            }
            Message::Greeting(v) | Message::Unknown(v) => {
                warn!(message = %v, "ignoring an unexpected QMP message");
            }
            Message::Event(e) => warn!(event = %e.name, "dropping an event"),
        }
    }

    fn queue_event(&mut self, event: Event) {
        debug!(event = %event.name, data = %event.data, "QMP event");
        if self.events.len() >= MAX_QUEUED_EVENTS {
            if let Some(old) = self.events.pop_front() {
                warn!(event = %old.name, "QMP event queue full; dropping the oldest event");
            }
        }
        self.events.push_back(event);
    }
}

/// The `-incoming` / [`Qmp::migrate_incoming`] URI that reads a snapshot written by
/// [`Qmp::migrate_to_file`]: `exec:cat 'PATH'`. A relative `path` is made absolute against
/// this process's directory.
pub fn incoming_file_uri(path: &Path) -> Result<String, QmpError> {
    Ok(format!("exec:cat {}", shell_quote(&absolute_utf8(path)?)))
}

/// QEMU's `file:` migration URI of `path` (QEMU 8.2 or newer), for [`Qmp::migrate`] and
/// [`Qmp::migrate_incoming`]. A comma would start an option of the URI: such a path is refused.
/// A relative `path` is made absolute against this process's directory.
pub fn file_uri(path: &Path) -> Result<String, QmpError> {
    let path_text = absolute_utf8(path)?;
    if path_text.contains(',') {
        return Err(QmpError::InvalidPath {
            path: path.to_owned(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "the path contains a comma"),
        });
    }
    Ok(format!("file:{path_text}"))
}

/// `path` made absolute, as UTF-8 (QMP strings are JSON strings).
fn absolute_utf8(path: &Path) -> Result<String, QmpError> {
    let invalid = |source: io::Error| QmpError::InvalidPath {
        path: path.to_owned(),
        source,
    };
    let absolute = std::path::absolute(path).map_err(invalid)?;
    absolute.into_os_string().into_string().map_err(|_| {
        invalid(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the path is not valid UTF-8",
        ))
    })
}

/// Quotes `s` as one POSIX shell word.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `(major, minor, micro)` and the package string from the greeting, typed when the greeting
/// fits `qapi`'s schema, raw otherwise.
fn parse_greeting(greeting: &Value) -> Result<((u32, u32, u32), String), QmpError> {
    let inner = &greeting["QMP"];
    if let Ok(typed) = serde_json::from_value::<q::QMP>(inner.clone()) {
        let part = |n: i64| u32::try_from(n).unwrap_or(0);
        let v = typed.version.qemu;
        return Ok((
            (part(v.major), part(v.minor), part(v.micro)),
            typed.version.package,
        ));
    }
    debug!(greeting = %greeting, "greeting does not fit the qapi schema; using raw JSON");
    let qemu = &inner["version"]["qemu"];
    let part = |k: &str| {
        qemu[k]
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| protocol(format!("greeting without version.qemu.{k}: {greeting}")))
    };
    let version = (part("major")?, part("minor")?, part("micro")?);
    let package = inner["version"]["package"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    Ok((version, package))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake QEMU on a QMP socket in a temp dir: it greets, then answers each request line
    /// with `replies(request)` (the lines to send back, `ID` replaced by the request's id), and
    /// hangs up when `replies` has nothing more to say.
    fn fake_qemu(
        mut replies: impl FnMut(&Value) -> Option<Vec<String>> + Send + 'static,
    ) -> (
        tempfile::TempDir,
        PathBuf,
        std::thread::JoinHandle<Vec<String>>,
    ) {
        use std::io::{BufRead, BufReader};
        let dir = tempfile::Builder::new()
            .prefix("dq")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let sock = dir.path().join("q.sock");
        let listener = UnixListener::bind(&sock).expect("bind");
        let peer = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().expect("accept");
            let greeting = r#"{"QMP": {"version": {"qemu": {"micro": 1, "minor": 2, "major": 7}, "package": "fake"}, "capabilities": []}}"#;
            writeln!(conn, "{greeting}").expect("greet");
            let mut seen = Vec::new();
            for line in BufReader::new(conn.try_clone().expect("clone")).lines() {
                let request: Value = serde_json::from_str(&line.expect("line")).expect("JSON");
                seen.push(request["execute"].as_str().unwrap_or_default().to_owned());
                let Some(answer) = replies(&request) else {
                    break;
                };
                for l in answer {
                    writeln!(conn, "{}", l.replace("ID", &request["id"].to_string()))
                        .expect("reply");
                }
            }
            seen
        });
        (dir, sock, peer)
    }

    #[test]
    fn a_fake_peer_is_greeted_answered_and_its_events_and_errors_kept() {
        // What the client does with QEMU's messages, without QEMU (tests/qmp.rs has the real
        // one): the greeting's version, events that come before a reply, an error class that
        // leaves the session usable, and a hang-up as Disconnected at once.
        let (_dir, sock, peer) = fake_qemu(|request| {
            match request["execute"].as_str()? {
            "qmp_capabilities" => Some(vec![r#"{"return": {}, "id": ID}"#.into()]),
            "query-status" => Some(vec![
                r#"{"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}"#
                    .into(),
                r#"{"return": {"status": "paused", "running": false}, "id": ID}"#.into(),
            ]),
            "no-such-command" => Some(vec![
                r#"{"error": {"class": "CommandNotFound", "desc": "The command no-such-command has not been found"}, "id": ID}"#
                    .into(),
            ]),
            _ => None,
        }
        });
        let mut qmp = Qmp::connect(&sock, Duration::from_secs(10)).expect("connect");
        assert_eq!(qmp.version(), (7, 2, 1));
        assert_eq!(qmp.package(), "fake");
        assert_eq!(
            qmp.status().expect("status"),
            VmStatus {
                state: RunState::Paused,
                running: false
            }
        );
        let events = qmp.events();
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].name, "STOP");
        assert!(events[0].timestamp.is_some());
        let err = qmp
            .execute_raw("no-such-command", Value::Null)
            .expect_err("unknown command");
        assert!(
            matches!(&err, QmpError::Command { command, class, .. }
                if command == "no-such-command" && class == "CommandNotFound"),
            "{err:?}"
        );
        // The fake hangs up on the next request: the client says so without waiting out its
        // command timeout.
        let started = Instant::now();
        let err = qmp.stop().expect_err("hung up");
        assert!(matches!(err, QmpError::Disconnected { .. }), "{err:?}");
        assert!(started.elapsed() < qmp.command_timeout() / 2);
        assert_eq!(
            peer.join().expect("fake QEMU"),
            [
                "qmp_capabilities",
                "query-status",
                "no-such-command",
                "stop"
            ]
        );
    }

    #[test]
    fn connect_fails_within_the_timeout_when_nobody_listens() {
        let dir = tempfile::Builder::new()
            .prefix("dq")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let timeout = Duration::from_millis(400);
        let slack = Duration::from_secs(3);

        // No socket at all.
        let missing = dir.path().join("none.sock");
        let started = Instant::now();
        let err = Qmp::connect(&missing, timeout).expect_err("no socket");
        let took = started.elapsed();
        assert!(
            matches!(&err, QmpError::Connect { source, .. } if source.kind() == io::ErrorKind::NotFound),
            "{err:?}"
        );
        assert!(took >= timeout && took < timeout + slack, "{took:?}");

        // A stale socket file: connection refused until the deadline.
        let stale = dir.path().join("stale.sock");
        drop(UnixListener::bind(&stale).expect("bind"));
        let started = Instant::now();
        let err = Qmp::connect(&stale, timeout).expect_err("stale socket");
        let took = started.elapsed();
        assert!(
            matches!(&err, QmpError::Connect { source, .. } if source.kind() == io::ErrorKind::ConnectionRefused),
            "{err:?}"
        );
        assert!(took >= timeout && took < timeout + slack, "{took:?}");

        // Something listens but never greets.
        let silent = dir.path().join("silent.sock");
        let _listener = UnixListener::bind(&silent).expect("bind");
        let started = Instant::now();
        let err = Qmp::connect(&silent, timeout).expect_err("silent socket");
        let took = started.elapsed();
        assert!(matches!(err, QmpError::Timeout { .. }), "{err:?}");
        assert!(took < timeout + slack, "{took:?}");
    }

    #[test]
    fn unknown_states_are_kept_verbatim() {
        assert_eq!(RunState::from_name("postmigrate"), RunState::PostMigrate);
        assert_eq!(
            RunState::from_name("frobnicating"),
            RunState::Other("frobnicating".into())
        );
        for (name, state) in RunState::NAMES {
            assert_eq!(state.as_str(), name);
            assert_eq!(RunState::from_name(name), state);
        }
        for (name, status) in MigrationStatus::NAMES {
            assert_eq!(status.as_str(), name);
            assert_eq!(MigrationStatus::from_name(name), status);
        }
        let status = VmStatus::from_reply(&json!({ "status": "hibernating", "running": false }))
            .expect("status");
        assert_eq!(status.state, RunState::Other("hibernating".into()));

        // A reply the typed schema rejects still decodes from the raw JSON.
        let info = MigrationInfo::from_reply(json!({
            "status": "teleporting",
            "total-time": 12,
            "ram": { "transferred": 42 }
        }));
        assert_eq!(info.status, MigrationStatus::Other("teleporting".into()));
        assert_eq!(info.total_time, Some(Duration::from_millis(12)));
        assert_eq!(info.ram_transferred, Some(42));
        assert_eq!(
            MigrationInfo::from_reply(json!({})).status,
            MigrationStatus::None
        );
    }

    #[test]
    fn shell_quoting_and_incoming_uri() {
        assert_eq!(shell_quote("/a b/c"), "'/a b/c'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(
            incoming_file_uri(Path::new("/tmp/x y.bin")).expect("uri"),
            "exec:cat '/tmp/x y.bin'"
        );
        assert_eq!(
            file_uri(Path::new("/tmp/x y.bin")).expect("uri"),
            "file:/tmp/x y.bin"
        );
        assert!(file_uri(Path::new("/tmp/a,offset=9")).is_err());
        assert_eq!(
            incoming_file_uri(Path::new("/tmp/x y.bin")).expect("uri"),
            "exec:cat '/tmp/x y.bin'"
        );
        let relative = incoming_file_uri(Path::new("snap.bin")).expect("uri");
        assert!(relative.starts_with("exec:cat '/"), "{relative}");
        use std::os::unix::ffi::OsStrExt;
        let err = incoming_file_uri(Path::new(std::ffi::OsStr::from_bytes(b"/tmp/\xff")))
            .expect_err("non-UTF-8 path");
        assert!(err.is_bad_input(), "{err:?}");
    }
}
