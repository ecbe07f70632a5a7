//! A detached cluster's life from the outside: `up --detach` checks every machine's launch, starts
//! its owner (the hidden `__cluster-supervise`, which runs `run::up`) and waits until every
//! machine is ready;
//! `down` asks the owner to stop everything (SIGTERM), waits with a deadline, and reaps what an
//! owner that died uncleanly left behind.

use std::path::Path;
use std::time::{Duration, Instant};

use drydock_gc::{Cancel, Deadline};

use serde::Serialize;

use std::io::{BufRead, BufReader};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

use serde::Deserialize;

use crate::compose::ClusterPlan;
use crate::reload::MachineOutcome;
use crate::state::{
    ClusterError, ClusterLaunch, ClusterMachine, ClusterState, OwnerLock, cluster_paths,
};
use drydock_vm::Awaited;
use drydock_vm::VmPaths;
use drydock_vm::{LaunchRecord, VmState};

/// How long `down` waits for the owner to stop every machine before it kills it.
pub const DOWN_DEADLINE: Duration = Duration::from_secs(120);
/// How long past the machines' ready timeout `up --detach` waits for the owner.
const OWNER_SLACK: Duration = Duration::from_secs(120);

/// The owner to start for a detached cluster.
#[derive(Debug, Clone)]
pub struct DetachedOwner<'a> {
    /// The cluster, as also written to `up.json` (which the owner reads).
    pub plan: &'a ClusterPlan,
    /// How its machines launch (the owner gets the same accelerator, QEMU and timeout).
    pub launch: &'a ClusterLaunch,
    pub store_root: Option<&'a Path>,
    /// The cluster's owner lock, which this `up` holds: the owner holds it from its start on
    /// (it is the owner's stdin), and this process may let go of it once the owner is up.
    pub lock: &'a OwnerLock,
    /// Boot no machine: each boots when asked (`drydock test`), and the owner stays up while
    /// none runs.
    pub idle: bool,
    /// Bring every machine back from this cluster snapshot instead of booting it.
    pub restore: Option<&'a str>,
}

/// A detached cluster that is up.
#[derive(Debug, Clone, Serialize)]
pub struct Detached {
    pub owner_pid: u32,
    pub after_secs: f64,
}

/// Check every machine's launch (a machine that cannot launch is the error, here, typed, and
/// nothing starts), start the owner and wait until it reports every machine ready. On `cancel`
/// or the deadline the owner is stopped (it stops everything it started) before returning.
pub fn start_detached(o: &DetachedOwner<'_>, cancel: &Cancel) -> Result<Detached, ClusterError> {
    // A restore's launches are the snapshot's, checked by `snapshot::check_restore`.
    if o.restore.is_none() {
        crate::launches::plan_launches(o.plan, o.launch)?;
    }
    let (state_dir, name, l) = (o.launch.state_dir.as_path(), o.plan.name.as_str(), o.launch);
    let dir = cluster_paths(state_dir, name).dir;
    let log_path = dir.join("drydock.log");
    let files = |source| ClusterError::Files {
        path: log_path.clone(),
        source,
    };
    let log = drydock_gc::create_nofollow(&log_path).map_err(files)?;
    let mut cmd = drydock_vm::drydock_command(&l.exe, state_dir, o.store_root);
    cmd.args([
        "__cluster-supervise",
        "--name",
        name,
        "--accel",
        l.accel.as_arg(),
    ])
    .arg("--timeout")
    .arg(l.ready_timeout.as_secs_f64().to_string())
    .arg("--log-limit")
    .arg(l.log_limit.to_string());
    if let Some(q) = &l.qemu {
        cmd.arg("--qemu").arg(q);
    }
    if o.idle {
        cmd.arg("--idle");
    }
    if let Some(tag) = o.restore {
        cmd.arg("--restore").arg(tag);
    }
    let held = o.lock.handle().map_err(|source| ClusterError::Lock {
        path: dir.join("owner.lock"),
        source,
    })?;
    // The machines' run is recorded here, with the command line the user typed; the owner
    // joins it.
    let run = crate::run::begin_machines_run(l, name);
    if let Some(id) = run {
        cmd.arg("--run").arg(id.to_string());
    }
    let end_run = || {
        if let Some(id) = run {
            crate::run::end_machines_run(state_dir, id);
        }
    };
    let started = Instant::now();
    let child =
        drydock_vm::spawn_detached_holding("cluster supervisor", cmd, log, held).map_err(|e| {
            end_run();
            ClusterError::Spawn(e)
        })?;
    let pid = child.pid;
    let deadline = l.ready_timeout + OWNER_SLACK;
    let ready = || ClusterState::read(state_dir, name).filter(|s| s.ready && s.owner_pid == pid);
    let report = dir.join("cluster.json");
    match drydock_vm::await_report(pid, deadline, &report, cancel, ready) {
        Awaited::Ready(_) => Ok(Detached {
            owner_pid: pid,
            after_secs: started.elapsed().as_secs_f64(),
        }),
        Awaited::Died => {
            // The owner is our child: how it ended is known (its reaper has it at once).
            let how = match child.status(Deadline::after(Duration::from_secs(2))) {
                Some(st) => describe_exit(st),
                None => "died".to_string(),
            };
            // What it left (its machines died with it) is cleaned up, their runs ended.
            if let Some(plan) = last_plan(state_dir, name) {
                let (_, problems) = reap_machines(state_dir, name, &plan);
                for p in problems {
                    tracing::warn!("{p}");
                }
            }
            end_run();
            Err(ClusterError::DidNotStart {
                pid,
                how,
                log_path: log_path.clone(),
                log: drydock_vm::log_tail(&log_path, 40).trim().to_owned(),
            })
        }
        Awaited::Late => {
            terminate(pid, None);
            end_run();
            if cancel.is_set() {
                return Err(ClusterError::Interrupted);
            }
            Err(ClusterError::NotReady {
                after: started.elapsed(),
                log: drydock_vm::log_tail(&log_path, 40).trim().to_owned(),
            })
        }
    }
}

/// How a process ended, as words ("exited with status 1", "was killed by signal 9 (SIGKILL)").
fn describe_exit(st: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(sig)) => {
            let name = match sig {
                libc::SIGKILL => " (SIGKILL)",
                libc::SIGTERM => " (SIGTERM)",
                libc::SIGINT => " (SIGINT)",
                libc::SIGSEGV => " (SIGSEGV)",
                libc::SIGABRT => " (SIGABRT)",
                _ => "",
            };
            format!("was killed by signal {sig}{name}")
        }
        _ => "died".to_string(),
    }
}

/// SIGTERM to an owner (it stops everything it started), SIGKILL if it has not exited within
/// [`DOWN_DEADLINE`]; whether it had to be killed. `ticks`: its start time, when known.
fn terminate(pid: u32, ticks: Option<u64>) -> bool {
    let exit = drydock_vm::ProcessWatch::open(pid, ticks);
    let _ = drydock_gc::send_signal(pid, libc::SIGTERM);
    if exit
        .as_ref()
        .is_none_or(|w| w.wait(Deadline::after(DOWN_DEADLINE)))
    {
        return false;
    }
    let _ = drydock_gc::send_signal(pid, libc::SIGKILL);
    true
}

/// What `down` did.
#[derive(Debug, Clone, Serialize)]
pub struct Down {
    pub name: String,
    /// Whether the cluster was up (an owner's record existed).
    pub was_up: bool,
    pub machines: usize,
    /// The owner did not stop within [`DOWN_DEADLINE`] and was killed.
    pub killed: bool,
    /// Runs of machines that `down` ended itself (their owner could not: it was killed, or
    /// the state dir was full).
    pub runs_ended: usize,
    pub after_secs: f64,
}

/// The plan the cluster `name` last ran: its owner's record, else `up.json` (an owner that
/// died before it was up wrote no record).
fn last_plan(state_dir: &Path, name: &str) -> Option<ClusterPlan> {
    if let Some(s) = ClusterState::read(state_dir, name) {
        return Some(s.plan);
    }
    let bytes = drydock_gc::read_regular(
        &crate::state::up_plan_file(state_dir, name),
        drydock_gc::Links::Refuse,
        drydock_gc::MAX_STATE_BYTES,
    )
    .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Remove the sockets drydock made in `dir` (nothing listens once their owner is gone), and
/// `dir` itself when it is a socket folder of its own (`own`) and empty.
fn remove_sockets(dir: &Path, own: bool) {
    use std::os::unix::fs::FileTypeExt as _;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let ours = name.ends_with(".sock") || name.ends_with(".sock.ctl");
            if ours && e.file_type().is_ok_and(|t| t.is_socket()) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    if own {
        let _ = std::fs::remove_dir(dir);
    }
}

/// Once the owner of a cluster whose machines were `plan` is gone: what it left of each machine
/// is cleaned up (processes, state files, cgroups, sockets and socket folders), and every run it
/// left open is ended, from the state file or, when that is gone (the owner could not end the
/// run: a full state dir), from the machine's launch record. Each stopped machine's writable
/// disk goes first (its next start makes a new one): on a full state dir, that is the room the
/// runs database needs to record the ends. Returns how many runs were ended, and what could
/// not be done.
pub(crate) fn reap_machines(
    state_dir: &Path,
    name: &str,
    plan: &ClusterPlan,
) -> (usize, Vec<String>) {
    let (mut ended, mut problems) = (0, Vec::new());
    for m in &plan.machines {
        let paths = VmPaths::in_state_dir(state_dir, &m.vm_name);
        let state = VmState::read(&paths);
        if state.as_ref().is_some_and(|s| s.supervisor_alive()) {
            // Someone owns it (a new `up` of the cluster): not ours to touch.
            continue;
        }
        let _ = std::fs::remove_file(paths.overlay());
        let record = LaunchRecord::read(&paths).ok();
        let result = match &state {
            Some(vs) => drydock_vm::reap_stale(state_dir, &paths, vs, record.as_ref()),
            None => {
                // An owner killed between making the VM's cgroup and recording its state.
                drydock_vm::remove_stale_cgroup(&m.vm_name);
                match &record {
                    Some(r) => drydock_vm::end_vm_run(state_dir, r, None),
                    None => Ok(false),
                }
            }
        };
        match result {
            Ok(true) => ended += 1,
            Ok(false) => {}
            Err(e) => problems.push(format!("{}: {}", m.vm_name, drydock_vm::error_chain(&e))),
        }
        remove_sockets(&paths.sockets, paths.sockets != paths.dir);
    }
    let cpaths = cluster_paths(state_dir, name);
    remove_sockets(&cpaths.sockets, cpaths.sockets != cpaths.dir);
    (ended, problems)
}

/// Stop the cluster `name`: SIGTERM to its owner, which stops every machine and hub; SIGKILL
/// at the deadline; then what the owner left is cleaned up and the runs it left open are
/// ended (see [`reap_machines`]; also when the cluster is not up: a `down` that could not end
/// them, on a full state dir, is run again), and build roots a killed `up` left are released.
pub fn down(state_dir: &Path, name: &str) -> Result<Down, ClusterError> {
    let t = Instant::now();
    // An `up` killed between its build and its machines' pins left its roots behind.
    crate::eval::release_build_roots(&cluster_paths(state_dir, name).dir);
    let state = ClusterState::read(state_dir, name);
    let killed = state
        .as_ref()
        .is_some_and(|s| s.owner_alive() && terminate(s.owner_pid, s.owner_start_ticks));
    let plan = last_plan(state_dir, name);
    let (mut runs_ended, problems) = match &plan {
        Some(p) => reap_machines(state_dir, name, p),
        None => (0, Vec::new()),
    };
    // The machines' shared run, if the owner could not end it (reaping its dead machines ends
    // it too, but not one whose machines left no state).
    if let Some(id) = state.as_ref().and_then(|s| s.run_id)
        && crate::run::end_machines_run(state_dir, id)
    {
        runs_ended += 1;
    }
    let _ = std::fs::remove_file(cluster_paths(state_dir, name).dir.join("cluster.json"));
    if !problems.is_empty() {
        return Err(ClusterError::Unreaped {
            state_dir: state_dir.to_path_buf(),
            problems,
        });
    }
    Ok(Down {
        name: name.to_string(),
        was_up: state.is_some(),
        machines: state.as_ref().map_or(0, |s| s.plan.machines.len()),
        killed,
        runs_ended,
        after_secs: t.elapsed().as_secs_f64(),
    })
}

/// Why a call to a cluster's owner on its control socket failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the cluster {0} is not up (no owner answers on its control socket)")]
    NotUp(String),
    #[error("talking to the owner of the cluster {name}")]
    Io {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    NotPrivate(drydock_gc::PrivateError),
    #[error("the owner of the cluster {name}: {message}")]
    Owner {
        name: String,
        message: String,
        bad_input: bool,
    },
}

impl ControlError {
    pub fn is_bad_input(&self) -> bool {
        match self {
            Self::NotUp(_) => true,
            Self::NotPrivate(e) => e.is_bad_input(),
            Self::Owner { bad_input, .. } => *bad_input,
            Self::Io { .. } => false,
        }
    }
}

/// How long the owner waits for a request line once a connection is accepted, and a client
/// for its request to be taken.
const REQUEST_DEADLINE: Duration = Duration::from_secs(30);

/// The owner's control socket, in the cluster's socket folder.
pub fn control_socket(cpaths: &VmPaths) -> PathBuf {
    cpaths.sockets.join("control.sock")
}

pub(crate) fn bind_control(cpaths: &VmPaths) -> Result<UnixListener, ClusterError> {
    let path = control_socket(cpaths);
    let files = |source| ClusterError::Files {
        path: path.clone(),
        source,
    };
    let l = drydock_gc::bind_listener(&path).map_err(files)?;
    l.set_nonblocking(true).map_err(files)?;
    Ok(l)
}

/// What a second `up` (or `vm restart`, or `drydock test`) asks the owner.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ControlRequest {
    /// `plan` (nothing changes) or `apply`; or an operation on the machines `machines`.
    pub op: ControlOp,
    /// The new plan (`plan`, `apply`); empty for the machine operations.
    #[serde(default)]
    pub plan: ClusterPlan,
    /// `--restart`.
    #[serde(default)]
    pub restart: bool,
    /// Machines to restart even if the plan would keep or switch them (`vm restart`).
    #[serde(default)]
    pub restart_machines: Vec<String>,
    /// The machines of a machine operation (`start`: each that is not running, in parallel;
    /// the others: exactly one).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub machines: Vec<String>,
    /// `snapshot`: its tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// `snapshot --stop`: stop the cluster once it is saved.
    #[serde(default)]
    pub stop: bool,
    /// `net`: what to see or change on the cluster's networks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<Box<crate::net::NetRequest>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControlOp {
    #[default]
    Plan,
    Apply,
    /// Boot the machines that are not running; answered once each is ready (or failed).
    Start,
    /// Stop a machine in order (powerdown, quit, SIGTERM, SIGKILL).
    Stop,
    /// Stop a machine at once (QMP quit), as a power failure.
    Crash,
    /// Drop a machine's frames at every hub it is on (its VLAN links down).
    Block,
    /// Forward them again.
    Unblock,
    /// Save the whole cluster as the snapshot `tag` (see `snapshot`).
    Snapshot,
    /// Stop every machine at once (QMP quit, no powerdown) and end the owner: a restore
    /// replaces the machines, so their guests need not shut down.
    Quit,
    /// See or change the cluster's networks (`net`: faults, findings, a capture).
    Net,
}

impl ControlOp {
    /// Whether it acts on single machines (and carries no plan).
    pub fn on_machines(self) -> bool {
        !matches!(
            self,
            Self::Plan | Self::Apply | Self::Snapshot | Self::Quit | Self::Net
        )
    }
}

/// The owner's answer: every machine's action (and outcome, for `apply`), or why not.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControlReply {
    #[serde(default)]
    pub machines: Vec<MachineOutcome>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub bad_input: bool,
    /// `net`'s answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<crate::net::NetReport>,
}

/// `vm restart` of a machine of an up cluster: its owner restarts it on the cluster's networks,
/// with the cluster's current plan (nothing else changes). Its outcome, within `deadline`.
pub fn restart_machine(
    state_dir: &Path,
    cm: &ClusterMachine,
    deadline: Duration,
) -> Result<MachineOutcome, ControlError> {
    let state = ClusterState::read_up(state_dir, &cm.cluster)
        .ok_or_else(|| ControlError::NotUp(cm.cluster.clone()))?;
    let req = ControlRequest {
        op: ControlOp::Apply,
        plan: state.plan,
        restart: false,
        restart_machines: vec![cm.machine.clone()],
        ..ControlRequest::default()
    };
    request(state_dir, &cm.cluster, &req, deadline)?
        .into_iter()
        .find(|o| o.planned.machine == cm.machine)
        .ok_or_else(|| ControlError::NotUp(cm.cluster.clone()))
}

/// Ask the owner of the cluster `name` (state in `state_dir`) to plan or apply `req`, waiting
/// at most `deadline` for its answer.
pub fn request(
    state_dir: &Path,
    name: &str,
    req: &ControlRequest,
    deadline: Duration,
) -> Result<Vec<MachineOutcome>, ControlError> {
    request_until(state_dir, name, req, deadline, None)
}

/// Ask the owner of the cluster `name` to carry out the machine operation `op` on `machines`
/// (see [`ControlOp`]), waiting at most `deadline`; `cancel` ends the wait (the connection is
/// shut: the owner carries on).
pub fn machine_op(
    state_dir: &Path,
    name: &str,
    op: ControlOp,
    machines: &[String],
    deadline: Duration,
    cancel: Option<&Cancel>,
) -> Result<(), ControlError> {
    let req = ControlRequest {
        op,
        machines: machines.to_vec(),
        ..ControlRequest::default()
    };
    request_until(state_dir, name, &req, deadline, cancel).map(|_| ())
}

/// [`request`], which `cancel` ends at once (the connection is shut).
pub fn request_until(
    state_dir: &Path,
    name: &str,
    req: &ControlRequest,
    deadline: Duration,
    cancel: Option<&Cancel>,
) -> Result<Vec<MachineOutcome>, ControlError> {
    request_reply(state_dir, name, req, deadline, cancel).map(|r| r.machines)
}

/// [`request_until`], the owner's whole reply (an error in it is the error).
pub fn request_reply(
    state_dir: &Path,
    name: &str,
    req: &ControlRequest,
    deadline: Duration,
    cancel: Option<&Cancel>,
) -> Result<ControlReply, ControlError> {
    let cpaths = cluster_paths(state_dir, name);
    cpaths.check_private().map_err(ControlError::NotPrivate)?;
    let s = UnixStream::connect(control_socket(&cpaths))
        .map_err(|_| ControlError::NotUp(name.to_string()))?;
    let io = |source| ControlError::Io {
        name: name.to_string(),
        source,
    };
    s.set_read_timeout(Some(deadline)).map_err(io)?;
    s.set_write_timeout(Some(REQUEST_DEADLINE)).map_err(io)?;
    let shut = s.try_clone().map_err(io)?;
    let _interrupt = cancel.map(|c| {
        c.on_cancel(move || {
            let _ = shut.shutdown(std::net::Shutdown::Both);
        })
    });
    crate::wire::write_json_line(&s, req).map_err(io)?;
    let reply: ControlReply = crate::wire::read_json_line(&mut BufReader::new(&s)).map_err(io)?;
    match reply.error {
        Some(message) => Err(ControlError::Owner {
            name: name.to_string(),
            message,
            bad_input: reply.bad_input,
        }),
        None => Ok(reply),
    }
}

/// Read the request line of a connection to the owner's control socket (within
/// [`REQUEST_DEADLINE`]), or why it could not be read.
pub(crate) fn read_request(s: &UnixStream) -> Result<ControlRequest, String> {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(REQUEST_DEADLINE));
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| e.to_string())
        .and_then(|_| serde_json::from_str::<ControlRequest>(&line).map_err(|e| e.to_string()))
}

/// Answer a network request: its report, or why not.
pub(crate) fn reply_net(
    s: &UnixStream,
    result: Result<crate::net::NetReport, crate::net::NetError>,
) {
    let reply = match result {
        Ok(report) => ControlReply {
            machines: Vec::new(),
            error: None,
            bad_input: false,
            net: Some(report),
        },
        Err(e) => ControlReply {
            machines: Vec::new(),
            error: Some(drydock_vm::error_chain(&e)),
            bad_input: e.is_bad_input(),
            net: None,
        },
    };
    let _ = s.set_write_timeout(Some(REQUEST_DEADLINE));
    let _ = crate::wire::write_json_line(s, &reply);
}

/// Answer a request: every machine's outcome, or an error (its text, and whether it is bad
/// input).
pub(crate) fn reply(s: &UnixStream, result: Result<Vec<MachineOutcome>, (String, bool)>) {
    let reply = match result {
        Ok(machines) => ControlReply {
            machines,
            error: None,
            bad_input: false,
            net: None,
        },
        Err((error, bad_input)) => ControlReply {
            machines: Vec::new(),
            error: Some(error),
            bad_input,
            net: None,
        },
    };
    let _ = s.set_write_timeout(Some(REQUEST_DEADLINE));
    let _ = crate::wire::write_json_line(s, &reply);
}
