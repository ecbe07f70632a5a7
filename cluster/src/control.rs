//! A detached cluster's life from the outside: `up --detach` checks every machine's launch, starts
//! its owner (the hidden `__cluster-supervise`, which runs `run::up`) and waits until every
//! machine is ready;
//! `down` asks the owner to stop everything (SIGTERM), waits with a deadline, and reaps what an
//! owner that died uncleanly left behind.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

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
/// `waiting` runs every 20 ms while the owner boots the machines (a progress display).
pub fn start_detached(
    o: &DetachedOwner<'_>,
    cancel: &AtomicBool,
    waiting: &mut dyn FnMut(),
) -> Result<Detached, ClusterError> {
    crate::launches::plan_launches(o.plan, o.launch)?;
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
    .arg(l.ready_timeout.as_secs_f64().to_string());
    if let Some(q) = &l.qemu {
        cmd.arg("--qemu").arg(q);
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
    let pid =
        drydock_vm::spawn_detached_holding("cluster supervisor", cmd, log, held).map_err(|e| {
            end_run();
            ClusterError::Spawn(e)
        })?;
    let deadline = l.ready_timeout + OWNER_SLACK;
    let every = Duration::from_millis(20);
    let ready = || {
        waiting();
        ClusterState::read(state_dir, name).filter(|s| s.ready && s.owner_pid == pid)
    };
    match drydock_vm::await_report(pid, deadline, every, cancel, ready) {
        Awaited::Ready(_) => Ok(Detached {
            owner_pid: pid,
            after_secs: started.elapsed().as_secs_f64(),
        }),
        Awaited::Died => {
            end_run();
            Err(ClusterError::DidNotStart {
                log: drydock_vm::log_tail(&log_path, 40).trim().to_owned(),
            })
        }
        Awaited::Late => {
            terminate(pid);
            end_run();
            if cancel.load(Ordering::SeqCst) {
                return Err(ClusterError::Interrupted);
            }
            Err(ClusterError::NotReady {
                after: started.elapsed(),
                log: drydock_vm::log_tail(&log_path, 40).trim().to_owned(),
            })
        }
    }
}

/// SIGTERM to an owner (it stops everything it started), SIGKILL if it has not exited within
/// [`DOWN_DEADLINE`]; whether it had to be killed.
fn terminate(pid: u32) -> bool {
    let _ = drydock_gc::send_signal(pid, libc::SIGTERM);
    if wait_gone(pid, DOWN_DEADLINE) {
        return false;
    }
    let _ = drydock_gc::send_signal(pid, libc::SIGKILL);
    true
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

/// What `down` did.
#[derive(Debug, Clone, Serialize)]
pub struct Down {
    pub name: String,
    /// Whether the cluster was up (an owner's record existed).
    pub was_up: bool,
    pub machines: usize,
    /// The owner did not stop within [`DOWN_DEADLINE`] and was killed.
    pub killed: bool,
    pub after_secs: f64,
}

/// Stop the cluster `name`: SIGTERM to its owner, which stops every machine and hub; SIGKILL
/// at the deadline; then the machines' records of an owner that died uncleanly are reaped,
/// and build roots a killed `up` left are released.
pub fn down(state_dir: &Path, name: &str) -> Result<Down, ClusterError> {
    let t = Instant::now();
    // An `up` killed between its build and its machines' pins left its roots behind.
    crate::eval::release_build_roots(&cluster_paths(state_dir, name).dir);
    let Some(state) = ClusterState::read(state_dir, name) else {
        return Ok(Down {
            name: name.to_string(),
            was_up: false,
            machines: 0,
            killed: false,
            after_secs: 0.0,
        });
    };
    let killed = state.owner_alive() && terminate(state.owner_pid);
    for m in &state.plan.machines {
        let paths = VmPaths::in_state_dir(state_dir, &m.vm_name);
        if let Some(vs) = VmState::read(&paths) {
            let record = LaunchRecord::read(&paths).ok();
            drydock_vm::reap_stale(state_dir, &paths, &vs, record.as_ref())
                .map_err(|e| ClusterError::Reap(Box::new(e)))?;
        }
    }
    if let Some(id) = state.run_id {
        crate::run::end_machines_run(state_dir, id);
    }
    let _ = std::fs::remove_file(cluster_paths(state_dir, name).dir.join("cluster.json"));
    Ok(Down {
        name: name.to_string(),
        was_up: true,
        machines: state.plan.machines.len(),
        killed,
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

/// What a second `up` asks the owner.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControlRequest {
    /// `plan` (nothing changes) or `apply`.
    pub op: ControlOp,
    pub plan: ClusterPlan,
    /// `--restart`.
    pub restart: bool,
    /// Machines to restart even if the plan would keep or switch them (`vm restart`).
    #[serde(default)]
    pub restart_machines: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ControlOp {
    Plan,
    Apply,
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
    crate::wire::write_json_line(&s, req).map_err(io)?;
    let reply: ControlReply = crate::wire::read_json_line(&mut BufReader::new(&s)).map_err(io)?;
    match reply.error {
        Some(message) => Err(ControlError::Owner {
            name: name.to_string(),
            message,
            bad_input: reply.bad_input,
        }),
        None => Ok(reply.machines),
    }
}

/// Answer one request on the owner's control socket if one is waiting (non-blocking when none
/// is): read its line, let `handle` plan or apply it, write the reply. Whether one was served.
pub(crate) fn answer_one(
    listener: &UnixListener,
    handle: &mut dyn FnMut(ControlRequest) -> Result<Vec<MachineOutcome>, (String, bool)>,
) -> bool {
    let Ok((s, _)) = listener.accept() else {
        return false;
    };
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(REQUEST_DEADLINE));
    let mut line = String::new();
    let req = BufReader::new(&s)
        .read_line(&mut line)
        .map_err(|e| e.to_string())
        .and_then(|_| serde_json::from_str::<ControlRequest>(&line).map_err(|e| e.to_string()));
    let reply = match req {
        Err(e) => ControlReply {
            machines: Vec::new(),
            error: Some(format!("bad request: {e}")),
            bad_input: true,
        },
        Ok(req) => match handle(req) {
            Ok(machines) => ControlReply {
                machines,
                error: None,
                bad_input: false,
            },
            Err((error, bad_input)) => ControlReply {
                machines: Vec::new(),
                error: Some(error),
                bad_input,
            },
        },
    };
    let _ = s.set_write_timeout(Some(REQUEST_DEADLINE));
    let _ = crate::wire::write_json_line(&s, &reply);
    true
}
