//! The effectful layer of a cluster: its owner process checks every machine's launch first
//! (`launches`: resolved and checked by drydock-vm's launcher, so a bad machine starts
//! nothing), then starts one hub per VLAN and one long-lived thread per machine (so QEMU's
//! parent-death signal is tied to a thread that lives as long as the machine). Each machine
//! thread carries its checked launch out with the launcher (claim, then its backdoor socket,
//! then disk, run, record, QEMU), listens on the backdoor socket QEMU connects to, waits for
//! the guest's ready line, then serves `exec` requests from other drydock processes on
//! `exec.sock` (one JSON line each way; calls queue on the backdoor), until the owner stops the
//! cluster or QEMU exits; what fails reaches the owner as a typed [`MachineError`]. Stopping
//! sets every machine's flag: every machine
//! thread stops its VM at once (powerdown → quit → SIGTERM → SIGKILL), in parallel, then the hubs
//! stop. A hot reload (`apply`) stops, starts and rewires single machines of a running cluster
//! through the same pieces: one flag and one thread per machine, hubs whose ports can change.

use std::collections::BTreeMap;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::time::{Duration, Instant};

use crate::backdoor::Backdoor;
use crate::compose::{ClusterPlan, MachinePlan};
use crate::hub::Hub;
use crate::launches::plan_launches;
use crate::logs::timed_log;
use crate::logs::{Stamp, Tails, stamp_consoles};
use crate::state::{
    ClusterError, ClusterLaunch, ClusterState, MachineError, cluster_paths, exec_socket,
    hub_socket, machines_run_name, nic_socket,
};
use drydock_vm::LaunchPlan;
use drydock_vm::VmPaths;

/// What a machine thread reports.
#[derive(Debug)]
pub enum MachineEvent {
    Ready {
        machine: String,
        after: Duration,
    },
    /// Its error as it happened (shared: the owner reports it and may return it).
    Failed {
        machine: String,
        error: Arc<MachineError>,
    },
    Stopped {
        machine: String,
    },
}

/// One machine's thread and its stop flag.
#[derive(Debug)]
pub(crate) struct MachineThread {
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) thread: std::thread::JoinHandle<()>,
}

/// An up cluster, owned by this process. Dropping it stops everything.
#[derive(Debug)]
pub struct RunningCluster {
    pub plan: ClusterPlan,
    pub(crate) opts: ClusterLaunch,
    pub(crate) state_dir: PathBuf,
    pub(crate) hubs: Vec<Hub>,
    pub(crate) machines: BTreeMap<String, MachineThread>,
    pub(crate) tx: Sender<MachineEvent>,
    pub(crate) tails: Tails,
    /// Where a second `up` asks for a hot reload (see `apply`).
    pub(crate) control: Option<UnixListener>,
    /// Stops the console stamping, after the machines (their last lines are stamped too).
    stamp_stop: Arc<AtomicBool>,
    stamper: Option<std::thread::JoinHandle<()>>,
    pub events: Receiver<MachineEvent>,
    stopped: bool,
}

/// Start the cluster `plan`: every machine's launch checked (a machine that cannot launch is
/// the error, and nothing starts), then hubs, then every machine in parallel. Returns once
/// every machine is ready; a machine that fails, `cancel` or the timeout stops everything
/// started. `on_event` sees each machine's event, and `None` every 50 ms meanwhile.
pub fn up(
    plan: &ClusterPlan,
    opts: &ClusterLaunch,
    cancel: &AtomicBool,
    on_event: &mut dyn FnMut(Option<&MachineEvent>),
) -> Result<RunningCluster, ClusterError> {
    let launches = plan_launches(plan, opts)?;
    let mut opts = opts.clone();
    if opts.run.is_none() {
        opts.run = begin_machines_run(&opts, &plan.name);
    }
    let opts = &opts;
    let cpaths = cluster_paths(&opts.state_dir, &plan.name);
    crate::state::make_private(&opts.state_dir, plan)?;
    let hosts = cpaths.dir.join("hosts");
    drydock_gc::write_atomic(&hosts, plan.hosts.as_bytes()).map_err(|source| {
        ClusterError::Files {
            path: hosts.clone(),
            source,
        }
    })?;
    let (tx, rx) = channel();
    let mut running = RunningCluster {
        plan: plan.clone(),
        opts: opts.clone(),
        state_dir: opts.state_dir.clone(),
        hubs: Vec::new(),
        machines: BTreeMap::new(),
        tx,
        tails: Tails::default(),
        control: None,
        stamp_stop: Arc::new(AtomicBool::new(false)),
        stamper: None,
        events: rx,
        stopped: false,
    };
    for &v in &plan.vlans {
        running.hubs.push(
            Hub::start(
                v,
                &hub_socket(&cpaths, v),
                vlan_ports(plan, &opts.state_dir, v),
            )
            .map_err(ClusterError::Hub)?,
        );
    }
    // Each console is read as it grows and its lines written, stamped on arrival, to the
    // machine's timed log (what `drydock logs` merges); QEMU writes the console log itself.
    for m in &plan.machines {
        let paths = VmPaths::in_state_dir(&opts.state_dir, &m.vm_name);
        let _ = std::fs::remove_file(paths.console_log());
        let _ = std::fs::remove_file(timed_log(&paths));
        running.add_tail(m);
    }
    let (stop, tails) = (running.stamp_stop.clone(), running.tails.clone());
    running.stamper = Some(
        std::thread::Builder::new()
            .name("console-stamps".into())
            .spawn(move || stamp_consoles(&tails, &stop))
            .map_err(|source| ClusterError::Files {
                path: cpaths.dir.clone(),
                source,
            })?,
    );
    for (m, launch) in plan.machines.iter().zip(launches) {
        running.spawn_machine(m, launch)?;
    }
    let started = Instant::now();
    let mut ready = 0;
    while ready < plan.machines.len() {
        if cancel.load(Ordering::SeqCst) {
            running.stop();
            return Err(ClusterError::Interrupted);
        }
        match running.events.recv_timeout(Duration::from_millis(50)) {
            Ok(ev) => {
                on_event(Some(&ev));
                match ev {
                    MachineEvent::Ready { .. } => ready += 1,
                    MachineEvent::Failed { machine, error } => {
                        running.stop();
                        return Err(ClusterError::Machine {
                            machine,
                            source: error,
                        });
                    }
                    MachineEvent::Stopped { machine } => {
                        running.stop();
                        return Err(ClusterError::machine(
                            &machine,
                            MachineError::StoppedBeforeReady,
                        ));
                    }
                }
            }
            Err(_) if started.elapsed() > opts.ready_timeout + Duration::from_secs(60) => {
                running.stop();
                return Err(ClusterError::machine("?", MachineError::Late));
            }
            Err(_) => on_event(None),
        }
    }
    running.control = Some(crate::control::bind_control(&cpaths)?);
    Ok(running)
}

/// Record the run the machines of cluster `name` share (a VM run named
/// [`machines_run_name`], with the command line that started the cluster); `None`, said in the
/// log, if it cannot be (each machine then records its own).
pub(crate) fn begin_machines_run(opts: &ClusterLaunch, name: &str) -> Option<i64> {
    let run = drydock_gc::RunsDb::open(&opts.state_dir).and_then(|db| {
        db.begin_run(
            &opts.layout,
            &machines_run_name(name),
            &opts.argv,
            drydock_gc::RunKind::Vm,
        )
    });
    match run {
        Ok(id) => Some(id),
        Err(e) => {
            tracing::warn!(
                "the machines of {name} are not recorded as one run: {}",
                drydock_vm::error_chain(&e)
            );
            None
        }
    }
}

/// End the machines' run `id` (the cluster stopped), unless it has ended.
pub(crate) fn end_machines_run(state_dir: &Path, id: i64) {
    if let Err(e) = drydock_gc::RunsDb::open(state_dir).and_then(|db| db.finish_open_run(id, None))
    {
        tracing::warn!("ending run {id}: {}", drydock_vm::error_chain(&e));
    }
}

/// The NIC sockets of the machines of `plan` on `vlan`: the ports of its hub.
pub(crate) fn vlan_ports(plan: &ClusterPlan, state_dir: &Path, vlan: u8) -> Vec<PathBuf> {
    plan.on_vlan(vlan)
        .map(|m| nic_socket(&VmPaths::in_state_dir(state_dir, &m.vm_name), vlan))
        .collect()
}

impl RunningCluster {
    /// Start the thread of machine `m`, which carries out its checked `launch` (its VM boots;
    /// it reports on `events`).
    pub(crate) fn spawn_machine(
        &mut self,
        m: &MachinePlan,
        launch: LaunchPlan,
    ) -> Result<(), ClusterError> {
        let cpaths = cluster_paths(&self.state_dir, &self.plan.name);
        let stop = Arc::new(AtomicBool::new(false));
        let (m2, opts, tx, flag) = (m.clone(), self.opts.clone(), self.tx.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name(format!("machine-{}", m.machine))
            .spawn(move || machine_main(&m2, &opts, launch, &flag, &tx))
            .map_err(|source| ClusterError::Files {
                path: cpaths.dir.clone(),
                source,
            })?;
        self.machines
            .insert(m.machine.clone(), MachineThread { stop, thread });
        Ok(())
    }

    /// Stamp the console of machine `m` (from the start of its log).
    pub(crate) fn add_tail(&self, m: &MachinePlan) {
        let paths = VmPaths::in_state_dir(&self.state_dir, &m.vm_name);
        self.tails.lock().unwrap_or_else(|e| e.into_inner()).insert(
            m.machine.clone(),
            Stamp::new(
                drydock_vm::ConsoleTail::new(paths.console_log()),
                timed_log(&paths),
            ),
        );
    }

    /// Record this process as the cluster's owner (`cluster.json`, for `down`, `ps`, `exec`)
    /// and the machines it runs (`up.json`, which `logs` reads after `down` too).
    pub fn write_state(&self, ready: bool) -> Result<(), ClusterError> {
        let pid = std::process::id();
        ClusterState {
            name: self.plan.name.clone(),
            owner_pid: pid,
            owner_start_ticks: drydock_vm::process_start_ticks(pid),
            ready,
            since: None,
            run_id: self.opts.run,
            plan: self.plan.clone(),
        }
        .write(&self.state_dir)?;
        let up = crate::state::up_plan_file(&self.state_dir, &self.plan.name);
        drydock_vm::write_json(&up, &self.plan).map_err(ClusterError::Record)
    }

    /// Whether every machine thread has ended (their VMs stopped).
    pub fn all_stopped(&self) -> bool {
        self.machines.values().all(|t| t.thread.is_finished())
    }

    /// Stop the machines `names`, in parallel (every stop flag first, then the joins), and
    /// forget their threads.
    pub(crate) fn stop_machines(&mut self, names: &[String]) {
        for m in names {
            if let Some(t) = self.machines.get(m) {
                t.stop.store(true, Ordering::SeqCst);
            }
        }
        for m in names {
            if let Some(t) = self.machines.remove(m) {
                let _ = t.thread.join();
            }
        }
    }

    /// Stop every machine in parallel, then the hubs; remove the owner's state. Idempotent.
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        self.control = None;
        let cpaths = cluster_paths(&self.state_dir, &self.plan.name);
        let _ = std::fs::remove_file(crate::control::control_socket(&cpaths));
        let all: Vec<String> = self.machines.keys().cloned().collect();
        self.stop_machines(&all);
        self.stamp_stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.stamper.take() {
            let _ = t.join();
        }
        for h in &mut self.hubs {
            h.stop();
        }
        if let Some(id) = self.opts.run {
            end_machines_run(&self.state_dir, id);
        }
        let dir = cluster_paths(&self.state_dir, &self.plan.name).dir;
        let _ = std::fs::remove_file(dir.join("cluster.json"));
    }
}

impl Drop for RunningCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One machine, start to stop: its checked `launch` carried out, then served. Everything it
/// started it stops before returning.
fn machine_main(
    m: &MachinePlan,
    opts: &ClusterLaunch,
    launch: LaunchPlan,
    stop: &AtomicBool,
    tx: &Sender<MachineEvent>,
) {
    let fail = |error: MachineError| {
        let _ = tx.send(MachineEvent::Failed {
            machine: m.machine.clone(),
            error: Arc::new(error),
        });
    };
    let launcher = opts.launcher();
    let claimed = match launcher.claim(launch) {
        Ok(c) => c,
        Err(e) => return fail(MachineError::launching(e)),
    };
    let paths = VmPaths::in_state_dir(&opts.state_dir, &m.vm_name);
    // The claim made the VM's folder and its socket folder private (or refused them).
    let backdoor_path = paths.sockets.join("backdoor.sock");
    let exec_path = exec_socket(&paths);
    let nics: Vec<PathBuf> = claimed
        .record()
        .spec
        .devices
        .nics
        .iter()
        .map(|n| n.socket.clone())
        .collect();
    for p in nics.iter().chain([&backdoor_path, &exec_path]) {
        let _ = std::fs::remove_file(p);
    }
    let listener = match drydock_gc::bind_listener(&backdoor_path) {
        Ok(l) => l,
        Err(source) => {
            return fail(MachineError::Listen {
                path: backdoor_path,
                source,
            });
        }
    };
    let started = Instant::now();
    let (record, mut vm) = match launcher.start_here(claimed) {
        Ok(started) => started,
        Err(e) => return fail(MachineError::launching(e)),
    };
    // From here on the VM is stopped on every path out.
    let result = serve(m, opts, &mut vm, &listener, &exec_path, stop, tx, started);
    let status = vm.exited();
    if let Err(e) = vm.stop(drydock_vm::POWERDOWN_GRACE) {
        tracing::warn!("stopping {}: {}", m.vm_name, drydock_vm::error_chain(&e));
    }
    let _ = drydock_vm::end_vm_run(
        &opts.state_dir,
        &record,
        status.or_else(|| vm.exited()).and_then(|s| s.code()),
    );
    for p in [&backdoor_path, &exec_path] {
        let _ = std::fs::remove_file(p);
    }
    for n in &nics {
        let _ = std::fs::remove_file(n);
    }
    match result {
        Ok(()) => {
            let _ = tx.send(MachineEvent::Stopped {
                machine: m.machine.clone(),
            });
        }
        Err(e) => fail(e),
    }
}

/// Wait for the backdoor, report ready, serve `exec` until stopped or QEMU exits.
#[allow(clippy::too_many_arguments)]
fn serve(
    m: &MachinePlan,
    opts: &ClusterLaunch,
    vm: &mut drydock_vm::Vm,
    listener: &UnixListener,
    exec_path: &Path,
    stop: &AtomicBool,
    tx: &Sender<MachineEvent>,
    started: Instant,
) -> Result<(), MachineError> {
    let deadline = started + opts.ready_timeout;
    listener
        .set_nonblocking(true)
        .map_err(MachineError::BackdoorSocket)?;
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(MachineError::BackdoorSocket(e)),
        }
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        if vm.exited().is_some() {
            return Err(MachineError::ExitedEarly);
        }
        if Instant::now() > deadline {
            return Err(MachineError::NoBackdoor);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = stream.set_nonblocking(false);
    let left = deadline.saturating_duration_since(Instant::now());
    let backdoor = Backdoor::wait_ready(stream, left, stop, &mut |_| {}).map_err(|error| {
        MachineError::NotReady {
            error,
            console: vm.paths().console_log(),
        }
    })?;
    let backdoor = Arc::new(backdoor);
    let _ = tx.send(MachineEvent::Ready {
        machine: m.machine.clone(),
        after: started.elapsed(),
    });
    crate::exec::serve(&m.machine, backdoor, exec_path, stop, &mut || {
        vm.exited().is_none()
    })
    .map_err(MachineError::Exec)
}
