//! The effectful layer of a cluster: its owner process starts one hub per VLAN and one
//! long-lived thread per machine (so QEMU's parent-death signal is tied to a thread that lives
//! as long as the machine). Each machine thread launches its VM through the one launch path
//! (`resolve_launch`, `record_vm_run`, `start`), listens on the backdoor socket QEMU connects
//! to, waits for the guest's ready line, then serves `exec` requests from other drydock
//! processes on `exec.sock` (one JSON line each way; calls queue on the backdoor), until the
//! owner stops the cluster or QEMU exits. Stopping sets every machine's flag: every machine
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
use crate::compose::{ClusterPlan, HOSTS_FW_CFG, MachinePlan};
use crate::hub::Hub;
use crate::logs::timed_log;
use crate::logs::{Stamp, Tails, stamp_consoles};
use crate::state::{
    ClusterError, ClusterLaunch, ClusterState, cluster_paths, exec_socket, hub_socket, nic_socket,
};
use drydock_vm::{Boot, LaunchRequest, Share, StoreMode};
use drydock_vm::{FwCfgFile, GuestDevices, Nic, VmPaths};
use drydock_vm::{LaunchRecord, VmState};

/// What a machine thread reports.
#[derive(Debug)]
pub enum MachineEvent {
    Ready { machine: String, after: Duration },
    Failed { machine: String, message: String },
    Stopped { machine: String },
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

/// Start the cluster `plan`: hubs, then every machine in parallel. Returns once every machine
/// is ready; a machine that fails, `cancel` or the timeout stops everything started.
/// `on_event` sees each machine's event, and `None` every 50 ms meanwhile.
pub fn up(
    plan: &ClusterPlan,
    opts: &ClusterLaunch,
    cancel: &AtomicBool,
    on_event: &mut dyn FnMut(Option<&MachineEvent>),
) -> Result<RunningCluster, ClusterError> {
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
    for m in &plan.machines {
        running.spawn_machine(m)?;
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
                    MachineEvent::Failed { machine, message } => {
                        running.stop();
                        return Err(ClusterError::Machine { machine, message });
                    }
                    MachineEvent::Stopped { machine } => {
                        running.stop();
                        return Err(ClusterError::Machine {
                            machine,
                            message: "stopped before it became ready".into(),
                        });
                    }
                }
            }
            Err(_) if started.elapsed() > opts.ready_timeout + Duration::from_secs(60) => {
                running.stop();
                return Err(ClusterError::Machine {
                    machine: "?".into(),
                    message: "the cluster did not become ready in time".into(),
                });
            }
            Err(_) => on_event(None),
        }
    }
    running.control = Some(crate::control::bind_control(&cpaths)?);
    Ok(running)
}

/// The NIC sockets of the machines of `plan` on `vlan`: the ports of its hub.
pub(crate) fn vlan_ports(plan: &ClusterPlan, state_dir: &Path, vlan: u8) -> Vec<PathBuf> {
    plan.on_vlan(vlan)
        .map(|m| nic_socket(&VmPaths::in_state_dir(state_dir, &m.vm_name), vlan))
        .collect()
}

impl RunningCluster {
    /// Start the thread of machine `m` (its VM boots; it reports on `events`).
    pub(crate) fn spawn_machine(&mut self, m: &MachinePlan) -> Result<(), ClusterError> {
        let cpaths = cluster_paths(&self.state_dir, &self.plan.name);
        let hosts = cpaths.dir.join("hosts");
        let stop = Arc::new(AtomicBool::new(false));
        let (m2, opts, tx, flag) = (m.clone(), self.opts.clone(), self.tx.clone(), stop.clone());
        let cp = cpaths.clone();
        let thread = std::thread::Builder::new()
            .name(format!("machine-{}", m.machine))
            .spawn(move || machine_main(&m2, &opts, &cp, &hosts, &flag, &tx))
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
        let dir = cluster_paths(&self.state_dir, &self.plan.name).dir;
        let _ = std::fs::remove_file(dir.join("cluster.json"));
    }
}

impl Drop for RunningCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    drydock_vm::error_chain(e)
}

/// The launch of machine `m` of a cluster whose folder is `cpaths` (its hosts table `hosts`).
pub(crate) fn machine_request(
    m: &MachinePlan,
    opts: &ClusterLaunch,
    cpaths: &VmPaths,
    hosts: &Path,
) -> LaunchRequest {
    let paths = VmPaths::in_state_dir(&opts.state_dir, &m.vm_name);
    let nics: Vec<Nic> = m
        .nics
        .iter()
        .map(|n| Nic {
            mac: n.mac.clone(),
            socket: nic_socket(&paths, n.vlan),
            hub: hub_socket(cpaths, n.vlan),
        })
        .collect();
    LaunchRequest {
        name: m.vm_name.clone(),
        boot: Boot::System(m.settings.system.target().to_string()),
        append: Some(m.append.clone()),
        share: Share::Closure,
        store_mode: StoreMode::VirtioFs,
        accel: opts.accel,
        qemu: opts.qemu.clone(),
        memory_mib: m.settings.memory_mib,
        cpus: m.settings.cores,
        disk_size_mib: m.settings.disk_mib,
        exe: opts.exe.clone(),
        devices: GuestDevices {
            nics,
            backdoor: Some(paths.sockets.join("backdoor.sock")),
            fw_cfg: vec![FwCfgFile {
                name: HOSTS_FW_CFG.into(),
                file: hosts.to_path_buf(),
            }],
        },
        // The cluster's memory, all machines together, was checked when it was planned
        // (`session::prepare`), with the user's `--allow-overcommit`.
        allow_overcommit: true,
    }
}

/// One machine, start to stop. Everything it started it stops before returning.
fn machine_main(
    m: &MachinePlan,
    opts: &ClusterLaunch,
    cpaths: &VmPaths,
    hosts: &Path,
    stop: &AtomicBool,
    tx: &Sender<MachineEvent>,
) {
    let fail = |message: String| {
        let _ = tx.send(MachineEvent::Failed {
            machine: m.machine.clone(),
            message,
        });
    };
    let paths = VmPaths::in_state_dir(&opts.state_dir, &m.vm_name);
    if let Some(state) = VmState::read(&paths) {
        if state.qemu_alive() || state.supervisor_alive() {
            return fail(format!(
                "a VM named {} is already running (QEMU pid {})",
                m.vm_name, state.qemu_pid
            ));
        }
        let record = LaunchRecord::read(&paths).ok();
        if let Err(e) = drydock_vm::reap_stale(&opts.state_dir, &paths, &state, record.as_ref()) {
            return fail(error_text(&e));
        }
    }
    if let Err(e) = paths.make_private() {
        return fail(error_text(&e));
    }
    let backdoor_path = paths.sockets.join("backdoor.sock");
    let exec_path = exec_socket(&paths);
    let req = machine_request(m, opts, cpaths, hosts);
    for p in req
        .devices
        .nics
        .iter()
        .map(|n| &n.socket)
        .chain([&backdoor_path, &exec_path])
    {
        let _ = std::fs::remove_file(p);
    }
    let listener = match drydock_gc::bind_listener(&backdoor_path) {
        Ok(l) => l,
        Err(e) => return fail(format!("cannot listen on {}: {e}", backdoor_path.display())),
    };
    let mut record = match drydock_vm::resolve_launch(&opts.layout, &opts.state_dir, &paths, &req) {
        Ok(r) => r.record,
        Err(e) => {
            return fail(format!(
                "system {}: {}",
                m.settings.system.target(),
                error_text(&e)
            ));
        }
    };
    if let Some(disk) = &record.spec.disk {
        if let Err(e) = drydock_vm::discard_disk(disk) {
            return fail(error_text(&e));
        }
    }
    record.run_id = drydock_vm::record_vm_run(&opts.state_dir, &opts.layout, &record, &opts.argv);
    if let Err(e) = record.write(&paths) {
        return fail(error_text(&e));
    }
    let started = Instant::now();
    let mut vm = match drydock_vm::start(&record.spec, record.share.as_ref(), None) {
        Ok(vm) => vm,
        Err(e) => {
            let _ = drydock_vm::end_vm_run(&opts.state_dir, &record, None);
            return fail(error_text(&e));
        }
    };
    // From here on the VM is stopped on every path out.
    let result = serve(m, opts, &mut vm, &listener, &exec_path, stop, tx, started);
    let status = vm.exited();
    if let Err(e) = vm.stop(drydock_vm::POWERDOWN_GRACE) {
        tracing::warn!("stopping {}: {}", m.vm_name, error_text(&e));
    }
    let _ = drydock_vm::end_vm_run(
        &opts.state_dir,
        &record,
        status.or_else(|| vm.exited()).and_then(|s| s.code()),
    );
    for p in [&backdoor_path, &exec_path] {
        let _ = std::fs::remove_file(p);
    }
    for n in &record.spec.devices.nics {
        let _ = std::fs::remove_file(&n.socket);
    }
    match result {
        Ok(()) => {
            let _ = tx.send(MachineEvent::Stopped {
                machine: m.machine.clone(),
            });
        }
        Err(message) => fail(message),
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
) -> Result<(), String> {
    let deadline = started + opts.ready_timeout;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("backdoor socket: {e}"))?;
    let stream = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("backdoor socket: {e}")),
        }
        if stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        if vm.exited().is_some() {
            return Err("QEMU exited before it connected the backdoor".into());
        }
        if Instant::now() > deadline {
            return Err("QEMU did not connect the backdoor in time".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let _ = stream.set_nonblocking(false);
    let left = deadline.saturating_duration_since(Instant::now());
    let backdoor = Backdoor::wait_ready(stream, left, stop, &mut |_| {}).map_err(|e| {
        format!(
            "{} (see {})",
            error_text(&e),
            vm.paths().console_log().display()
        )
    })?;
    let backdoor = Arc::new(backdoor);
    let _ = tx.send(MachineEvent::Ready {
        machine: m.machine.clone(),
        after: started.elapsed(),
    });
    crate::exec::serve(&m.machine, backdoor, exec_path, stop, &mut || {
        vm.exited().is_none()
    })
}
