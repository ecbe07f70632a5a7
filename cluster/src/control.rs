//! A detached cluster's life from the outside: `up --detach` starts its owner (the hidden
//! `__cluster-supervise`, which runs [`crate::run::up`]) and waits until every machine is ready;
//! `down` asks the owner to stop everything (SIGTERM), waits with a deadline, and reaps what an
//! owner that died uncleanly left behind.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::run::{ClusterError, ClusterState, cluster_paths};
use drydock_vm::AccelChoice;
use drydock_vm::Awaited;
use drydock_vm::VmPaths;
use drydock_vm::{LaunchRecord, VmState};

/// How long `down` waits for the owner to stop every machine before it kills it.
pub const DOWN_DEADLINE: Duration = Duration::from_secs(120);
/// How long past the machines' ready timeout `up --detach` waits for the owner.
const OWNER_SLACK: Duration = Duration::from_secs(120);

/// The owner to start for a detached cluster (its plan is already in `up.json`).
#[derive(Debug, Clone)]
pub struct DetachedOwner<'a> {
    pub exe: &'a Path,
    pub state_dir: &'a Path,
    pub store_root: Option<&'a Path>,
    pub name: &'a str,
    pub accel: AccelChoice,
    pub qemu: Option<&'a Path>,
    pub ready_timeout: Duration,
}

/// A detached cluster that is up.
#[derive(Debug, Clone, Serialize)]
pub struct Detached {
    pub owner_pid: u32,
    pub after_secs: f64,
}

/// Start the owner and wait until it reports every machine ready. On `cancel` or the deadline
/// the owner is stopped (it stops everything it started) before returning.
pub fn start_detached(
    o: &DetachedOwner<'_>,
    cancel: &AtomicBool,
) -> Result<Detached, ClusterError> {
    let dir = cluster_paths(o.state_dir, o.name).dir;
    let log_path = dir.join("drydock.log");
    let files = |source| ClusterError::Files {
        path: log_path.clone(),
        source,
    };
    let log = std::fs::File::create(&log_path).map_err(files)?;
    let mut cmd = drydock_vm::drydock_command(o.exe, o.state_dir, o.store_root);
    cmd.args([
        "__cluster-supervise",
        "--name",
        o.name,
        "--accel",
        o.accel.as_arg(),
    ])
    .arg("--timeout")
    .arg(o.ready_timeout.as_secs_f64().to_string());
    if let Some(q) = o.qemu {
        cmd.arg("--qemu").arg(q);
    }
    let started = Instant::now();
    let pid =
        drydock_vm::spawn_detached("cluster supervisor", cmd, log).map_err(ClusterError::Spawn)?;
    let deadline = o.ready_timeout + OWNER_SLACK;
    let every = Duration::from_millis(20);
    let ready =
        || ClusterState::read(o.state_dir, o.name).filter(|s| s.ready && s.owner_pid == pid);
    match drydock_vm::await_report(pid, deadline, every, cancel, ready) {
        Awaited::Ready(_) => Ok(Detached {
            owner_pid: pid,
            after_secs: started.elapsed().as_secs_f64(),
        }),
        Awaited::Died => Err(ClusterError::DidNotStart {
            log: drydock_vm::log_tail(&log_path, 40).trim().to_owned(),
        }),
        Awaited::Late => {
            terminate(pid);
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
    let _ = std::fs::remove_file(cluster_paths(state_dir, name).dir.join("cluster.json"));
    Ok(Down {
        name: name.to_string(),
        was_up: true,
        machines: state.plan.machines.len(),
        killed,
        after_secs: t.elapsed().as_secs_f64(),
    })
}
