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
use std::io::{BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use drydock_gc::StoreLayout;
use serde::{Deserialize, Serialize};

use crate::backdoor::{Backdoor, ExecOutput};
use crate::compose::{ClusterPlan, HOSTS_FW_CFG, MachinePlan};
use crate::hub::Hub;
use drydock_vm::{AccelChoice, Boot, LaunchRequest, Share, StoreMode};
use drydock_vm::{FwCfgFile, GuestDevices, Nic, VmPaths};
use drydock_vm::{LaunchRecord, VmState};

/// Why a cluster could not start, or a call could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot write {}", path.display())]
    Files {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Hub(crate::hub::HubError),
    #[error("machine {machine}: {message}")]
    Machine { machine: String, message: String },
    #[error("the cluster {0} is not up (no owner found)")]
    NotUp(String),
    #[error("the VM {0} has no backdoor service (is it a cluster machine, and up?)")]
    NoExec(String),
    #[error("the cluster {cluster} has no machine {machine} (it has {})", has.join(", "))]
    NoMachine {
        cluster: String,
        machine: String,
        has: Vec<String>,
    },
    #[error("the exec call to {vm} failed")]
    Call {
        vm: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{vm}: {message}")]
    Remote { vm: String, message: String },
    #[error("interrupted while the cluster started; everything started was stopped")]
    Interrupted,
    #[error("cannot start the cluster's owner")]
    Spawn(#[source] drydock_vm::SpawnError),
    #[error("the cluster did not start:\n{log}")]
    DidNotStart { log: String },
    #[error("the cluster was not ready after {:.0} s; it is stopped:\n{log}", after.as_secs_f64())]
    NotReady { after: Duration, log: String },
    #[error("cannot record the cluster's state")]
    Record(#[source] drydock_vm::LaunchError),
    #[error("cannot clean up after the cluster's dead owner")]
    Reap(#[source] Box<drydock_vm::OwnerError>),
    #[error(
        "{} is machine {} of the cluster {} (owner pid {}), which is up: `vm {what}` would take it from its cluster; `vm restart {}` restarts it in the cluster, `drydock down -p {}` stops the cluster",
        machine.vm, machine.machine, machine.cluster, machine.owner_pid, machine.vm, machine.cluster
    )]
    OwnedByCluster {
        machine: ClusterMachine,
        what: &'static str,
    },
}

impl ClusterError {
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            Self::NotUp(_) | Self::NoExec(_) | Self::NoMachine { .. } | Self::OwnedByCluster { .. }
        )
    }
}

/// How to launch a cluster's machines.
#[derive(Debug, Clone)]
pub struct ClusterLaunch {
    pub layout: StoreLayout,
    pub state_dir: PathBuf,
    /// The drydock binary (the store servers).
    pub exe: PathBuf,
    pub accel: AccelChoice,
    pub qemu: Option<PathBuf>,
    /// How long a machine may take from start to its backdoor's ready line.
    pub ready_timeout: Duration,
    /// The command line recorded with each machine's run.
    pub argv: Vec<String>,
}

/// The owner of an up cluster, as `down`, `ps` and `exec` find it (`cluster.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterState {
    pub name: String,
    pub owner_pid: u32,
    pub owner_start_ticks: Option<u64>,
    /// Every machine's backdoor is ready.
    pub ready: bool,
    pub plan: ClusterPlan,
}

impl ClusterState {
    pub fn read(state_dir: &Path, name: &str) -> Option<Self> {
        let bytes = drydock_gc::read_regular(
            &cluster_paths(state_dir, name).dir.join("cluster.json"),
            drydock_gc::Links::Refuse,
            drydock_gc::MAX_STATE_BYTES,
        )
        .ok()?;
        serde_json::from_slice(&bytes).ok()
    }
    /// The record of the cluster `name` if it is up (its owner alive).
    pub fn read_up(state_dir: &Path, name: &str) -> Option<Self> {
        Self::read(state_dir, name).filter(Self::owner_alive)
    }
    pub fn owner_alive(&self) -> bool {
        drydock_vm::same_process_alive(self.owner_pid, self.owner_start_ticks)
    }
    fn write(&self, state_dir: &Path) -> Result<(), ClusterError> {
        let path = cluster_paths(state_dir, &self.name)
            .dir
            .join("cluster.json");
        drydock_vm::write_json(&path, self).map_err(ClusterError::Record)
    }
}

/// A VM that is a machine of a cluster that is up (its owner alive).
#[derive(Debug, Clone)]
pub struct ClusterMachine {
    pub cluster: String,
    pub machine: String,
    /// `CLUSTER.MACHINE`.
    pub vm: String,
    pub owner_pid: u32,
}

impl ClusterMachine {
    fn of(state: &ClusterState, m: &MachinePlan) -> Self {
        Self {
            cluster: state.name.clone(),
            machine: m.machine.clone(),
            vm: m.vm_name.clone(),
            owner_pid: state.owner_pid,
        }
    }
}

/// Whether the VM `vm` (named `CLUSTER.MACHINE`) is a machine of a cluster that is up: then its
/// owner, not a VM supervisor, runs it, and only the owner may stop or relaunch it.
pub fn cluster_machine(state_dir: &Path, vm: &str) -> Option<ClusterMachine> {
    let (cluster, _) = vm.split_once('.')?;
    let state = ClusterState::read_up(state_dir, cluster)?;
    let m = state.plan.machines.iter().find(|m| m.vm_name == vm)?;
    Some(ClusterMachine::of(&state, m))
}

/// `vm stop`, `vm snapshot`, `vm restore` (`what`) act on a VM's own supervisor: refused, as
/// bad input, for a machine of a cluster that is up (see [`cluster_machine`]).
pub fn refuse_cluster_machine(
    state_dir: &Path,
    vm: &str,
    what: &'static str,
) -> Result<(), ClusterError> {
    match cluster_machine(state_dir, vm) {
        Some(machine) => Err(ClusterError::OwnedByCluster { machine, what }),
        None => Ok(()),
    }
}

/// The machine `machine` of the cluster `cluster`, which must be up: bad input otherwise.
pub fn up_machine(
    state_dir: &Path,
    cluster: &str,
    machine: &str,
) -> Result<ClusterMachine, ClusterError> {
    let state = ClusterState::read_up(state_dir, cluster)
        .ok_or_else(|| ClusterError::NotUp(cluster.into()))?;
    let m = state
        .plan
        .machine(machine)
        .ok_or_else(|| ClusterError::NoMachine {
            cluster: cluster.into(),
            machine: machine.into(),
            has: state
                .plan
                .machines
                .iter()
                .map(|m| m.machine.clone())
                .collect(),
        })?;
    Ok(ClusterMachine::of(&state, m))
}

/// The cluster's folder (`STATE/clusters/NAME`) and its socket folder (the hubs).
pub fn cluster_paths(state_dir: &Path, name: &str) -> VmPaths {
    VmPaths::in_folder(state_dir, "clusters", name)
}

/// The socket a machine's owner serves `exec` on.
pub fn exec_socket(paths: &VmPaths) -> PathBuf {
    paths.sockets.join("exec.sock")
}

pub(super) fn hub_socket(cluster: &VmPaths, vlan: u8) -> PathBuf {
    cluster.sockets.join(format!("vlan{vlan}.sock"))
}

/// What a machine thread reports.
#[derive(Debug)]
pub enum MachineEvent {
    Ready { machine: String, after: Duration },
    Failed { machine: String, message: String },
    Stopped { machine: String },
}

/// One machine's thread and its stop flag.
#[derive(Debug)]
pub(super) struct MachineThread {
    pub(super) stop: Arc<AtomicBool>,
    pub(super) thread: std::thread::JoinHandle<()>,
}

/// One console being stamped: its tail, its timed log and that log once opened.
#[derive(Debug)]
pub(super) struct Stamp {
    tail: drydock_vm::ConsoleTail,
    path: PathBuf,
    file: Option<std::fs::File>,
}

/// The consoles being stamped, by machine (a machine's log is closed when it is removed).
pub(super) type Tails = Arc<Mutex<BTreeMap<String, Stamp>>>;

/// An up cluster, owned by this process. Dropping it stops everything.
#[derive(Debug)]
pub struct RunningCluster {
    pub plan: ClusterPlan,
    pub(super) opts: ClusterLaunch,
    pub(super) state_dir: PathBuf,
    pub(super) hubs: Vec<Hub>,
    pub(super) machines: BTreeMap<String, MachineThread>,
    pub(super) tx: Sender<MachineEvent>,
    pub(super) tails: Tails,
    /// Where a second `up` asks for a hot reload (see `apply`).
    pub(super) control: Option<UnixListener>,
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
    for d in [&cpaths.dir, &cpaths.sockets] {
        std::fs::create_dir_all(d).map_err(|source| ClusterError::Files {
            path: d.clone(),
            source,
        })?;
    }
    let hosts = cpaths.dir.join("hosts");
    std::fs::write(&hosts, &plan.hosts).map_err(|source| ClusterError::Files {
        path: hosts.clone(),
        source,
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
    running.control = Some(crate::apply::bind_control(&cpaths)?);
    Ok(running)
}

/// The NIC sockets of the machines of `plan` on `vlan`: the ports of its hub.
pub(super) fn vlan_ports(plan: &ClusterPlan, state_dir: &Path, vlan: u8) -> Vec<PathBuf> {
    plan.on_vlan(vlan)
        .map(|m| nic_socket(&VmPaths::in_state_dir(state_dir, &m.vm_name), vlan))
        .collect()
}

impl RunningCluster {
    /// Start the thread of machine `m` (its VM boots; it reports on `events`).
    pub(super) fn spawn_machine(&mut self, m: &MachinePlan) -> Result<(), ClusterError> {
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
    pub(super) fn add_tail(&self, m: &MachinePlan) {
        let paths = VmPaths::in_state_dir(&self.state_dir, &m.vm_name);
        self.tails.lock().unwrap_or_else(|e| e.into_inner()).insert(
            m.machine.clone(),
            Stamp {
                tail: drydock_vm::ConsoleTail::new(paths.console_log()),
                path: timed_log(&paths),
                file: None,
            },
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
        let up = crate::session::up_plan_file(&self.state_dir, &self.plan.name);
        drydock_vm::write_json(&up, &self.plan).map_err(ClusterError::Record)
    }

    /// Whether every machine thread has ended (their VMs stopped).
    pub fn all_stopped(&self) -> bool {
        self.machines.values().all(|t| t.thread.is_finished())
    }

    /// Stop the machines `names`, in parallel (every stop flag first, then the joins), and
    /// forget their threads.
    pub(super) fn stop_machines(&mut self, names: &[String]) {
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
        let _ = std::fs::remove_file(crate::apply::control_socket(&cpaths));
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

/// A machine's console lines, each stamped with its arrival (ms since the epoch, a tab, the line).
pub fn timed_log(paths: &VmPaths) -> PathBuf {
    paths.dir.join("console.timed")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn stamp_consoles(tails: &Tails, stop: &AtomicBool) {
    loop {
        let last = stop.load(Ordering::SeqCst);
        let mut tails = tails.lock().unwrap_or_else(|e| e.into_inner());
        for Stamp { tail, path, file } in tails.values_mut() {
            let mut lines = tail.lines();
            if last {
                lines.extend(tail.rest());
            }
            if lines.is_empty() {
                continue;
            }
            if file.is_none() {
                *file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&*path)
                    .ok();
            }
            if let Some(f) = file {
                let t = now_ms();
                let text: String = lines.iter().map(|l| format!("{t}\t{l}\n")).collect();
                let _ = f.write_all(text.as_bytes());
            }
        }
        drop(tails);
        if last {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Parse a timed log (see [`timed_log`]); lines without a stamp are skipped.
pub fn parse_timed(text: &str) -> Vec<(u64, String)> {
    text.lines()
        .filter_map(|l| {
            let (t, line) = l.split_once('\t')?;
            Some((t.parse().ok()?, line.to_string()))
        })
        .collect()
}

/// Merge machines' timed lines in time order; lines of one machine keep their order, and
/// lines stamped in the same millisecond follow the machines' order.
pub fn merge_timed(logs: Vec<(String, Vec<(u64, String)>)>) -> Vec<(u64, String, String)> {
    let mut all: Vec<(u64, usize, usize, String, String)> = logs
        .into_iter()
        .enumerate()
        .flat_map(|(mi, (m, lines))| {
            lines
                .into_iter()
                .enumerate()
                .map(move |(li, (t, l))| (t, mi, li, m.clone(), l))
        })
        .collect();
    all.sort_by_key(|x| (x.0, x.1, x.2));
    all.into_iter().map(|(t, _, _, m, l)| (t, m, l)).collect()
}

fn nic_socket(paths: &VmPaths, vlan: u8) -> PathBuf {
    paths.sockets.join(format!("vlan{vlan}.sock"))
}

fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    drydock_vm::error_chain(e)
}

/// The launch of machine `m` of a cluster whose folder is `cpaths` (its hosts table `hosts`).
pub(super) fn machine_request(
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
    for d in [&paths.dir, &paths.sockets] {
        if let Err(e) = std::fs::create_dir_all(d) {
            return fail(format!("cannot create {}: {e}", d.display()));
        }
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
    let listener = match UnixListener::bind(&backdoor_path) {
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
    let exec = UnixListener::bind(exec_path)
        .map_err(|e| format!("cannot listen on {}: {e}", exec_path.display()))?;
    exec.set_nonblocking(true)
        .map_err(|e| format!("exec socket: {e}"))?;
    let calls: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>> = Arc::default();
    let prompt = format!("{}# ", m.machine);
    while !stop.load(Ordering::SeqCst) && vm.exited().is_none() {
        // Answer a call at once; look at the stop flag and QEMU every 100 ms meanwhile.
        match crate::sys::wait_readable(&exec, Duration::from_millis(100)) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => return Err(format!("exec socket: {e}")),
        }
        match exec.accept() {
            Ok((s, _)) => {
                let (b, prompt) = (backdoor.clone(), prompt.clone());
                if let Ok(t) = std::thread::Builder::new()
                    .name(format!("exec-{}", m.machine))
                    .spawn(move || answer(s, &b, &prompt))
                {
                    let mut c = calls.lock().unwrap_or_else(|e| e.into_inner());
                    c.retain(|t| !t.is_finished());
                    c.push(t);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(format!("exec socket: {e}")),
        }
    }
    Ok(())
}

/// An `exec` request on the wire.
#[derive(Debug, Serialize, Deserialize)]
struct ExecRequest {
    #[serde(default)]
    cmd: String,
    #[serde(default)]
    timeout_ms: u64,
    /// An interactive session instead of a call: after one reply line (`error` unset), the
    /// connection carries the session's bytes both ways until it ends.
    #[serde(default)]
    shell: bool,
    /// A session's terminal size (rows, columns), for the guest's line editing.
    #[serde(default)]
    size: Option<(u16, u16)>,
}

/// An `exec` reply on the wire (outputs base64).
#[derive(Debug, Serialize, Deserialize)]
struct ExecReply {
    #[serde(default)]
    status: i32,
    #[serde(default)]
    stdout: String,
    #[serde(default)]
    stderr: String,
    #[serde(default)]
    error: Option<String>,
}

fn send_reply(s: &UnixStream, reply: &ExecReply) {
    let _ = crate::write_json_line(s, reply);
}

fn answer(s: UnixStream, b: &Backdoor, prompt: &str) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let req = read_line_unbuffered(&s)
        .map_err(|e| e.to_string())
        .and_then(|line| serde_json::from_slice::<ExecRequest>(&line).map_err(|e| e.to_string()));
    if let Ok(ExecRequest { shell: true, .. }) = &req {
        let _ = s.set_read_timeout(None);
        let reply = |error: Option<String>| ExecReply {
            status: 0,
            stdout: String::new(),
            stderr: String::new(),
            error,
        };
        let size = req.as_ref().ok().and_then(|r| r.size);
        if let Err(e) = b.shell(&s, prompt, size, &mut || send_reply(&s, &reply(None))) {
            tracing::warn!("shell session: {}", error_text(&e));
            send_reply(&s, &reply(Some(error_text(&e))));
        }
        return;
    }
    let reply = match req {
        Ok(req) => match b.exec(&req.cmd, Duration::from_millis(req.timeout_ms)) {
            Ok(o) => ExecReply {
                status: o.status,
                stdout: B64.encode(&o.stdout),
                stderr: B64.encode(&o.stderr),
                error: None,
            },
            Err(e) => ExecReply {
                status: 1,
                stdout: String::new(),
                stderr: String::new(),
                error: Some(error_text(&e)),
            },
        },
        Err(e) => ExecReply {
            status: 2,
            stdout: String::new(),
            stderr: String::new(),
            error: Some(format!("bad request: {e}")),
        },
    };
    send_reply(&s, &reply);
}

/// One line, read a byte at a time (what follows it on the stream is left there).
fn read_line_unbuffered(s: &UnixStream) -> std::io::Result<Vec<u8>> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') && line.len() < 1 << 20 {
        if (&*s).read(&mut byte)? == 0 {
            break;
        }
        line.push(byte[0]);
    }
    Ok(line)
}

/// How a `shell` session runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct ShellOptions {
    /// The terminal's size (rows, columns), passed to the guest.
    pub size: Option<(u16, u16)>,
    /// `~.` at the start of a line leaves the session (`~~` sends one `~`), as in ssh: for a
    /// terminal in raw mode, where Ctrl-C is a byte for the guest.
    pub escape: bool,
}

/// The `~.` escape of [`ShellOptions::escape`], as a state machine over the input bytes.
#[derive(Debug, Clone, Copy)]
pub struct Escape {
    at_line_start: bool,
    tilde: bool,
}

impl Default for Escape {
    fn default() -> Self {
        Self {
            at_line_start: true,
            tilde: false,
        }
    }
}

impl Escape {
    /// The bytes of `input` to send on, and whether the escape was typed (nothing after it is
    /// sent).
    pub fn feed(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len());
        for &b in input {
            if self.tilde {
                self.tilde = false;
                match b {
                    b'.' => return (out, true),
                    b'~' => {
                        out.push(b'~');
                        self.at_line_start = false;
                        continue;
                    }
                    _ => out.push(b'~'),
                }
            } else if self.at_line_start && b == b'~' {
                self.tilde = true;
                continue;
            }
            out.push(b);
            self.at_line_start = matches!(b, b'\r' | b'\n');
        }
        (out, false)
    }
}

/// An interactive root shell in the VM `vm` through its owner: `input` goes to the guest's
/// shell, what it prints to `output`, until it exits (`exit`, or `input` ends, or the escape).
pub fn shell_remote(
    vm: &str,
    paths: &VmPaths,
    opts: ShellOptions,
    input: impl Read + Send + 'static,
    output: &mut dyn Write,
) -> Result<(), ClusterError> {
    let call = call_error(vm);
    let req = ExecRequest {
        cmd: String::new(),
        timeout_ms: 0,
        shell: true,
        size: opts.size,
    };
    // The owner answers once the session started (or why it could not); calls queue before it.
    let (mut s, _) = ask_owner(vm, paths, &req, None)?;
    let mut to_guest = s.get_ref().try_clone().map_err(&call)?;
    // The input thread may block on a terminal after the session ended; it is left to the
    // process's exit then, never joined.
    std::thread::Builder::new()
        .name("shell-stdin".into())
        .spawn(move || {
            let mut input = input;
            let mut escape = Escape::default();
            let mut buf = [0u8; 4096];
            loop {
                let n = match input.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let (bytes, leave) = if opts.escape {
                    escape.feed(&buf[..n])
                } else {
                    (buf[..n].to_vec(), false)
                };
                if to_guest.write_all(&bytes).is_err() || leave {
                    break;
                }
            }
            let _ = to_guest.shutdown(std::net::Shutdown::Write);
        })
        .map_err(&call)?;
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                output.write_all(&buf[..n]).map_err(&call)?;
                output.flush().map_err(&call)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(call(e)),
        }
    }
}

fn call_error(vm: &str) -> impl Fn(std::io::Error) -> ClusterError + '_ {
    move |source| ClusterError::Call {
        vm: vm.to_string(),
        source,
    }
}

/// Send `req` to the owner of the VM `vm` on its exec socket and read the reply line (within
/// `read_timeout`, if any): the reply, unless it carries an error, and the connection, buffered,
/// for whatever follows it.
fn ask_owner(
    vm: &str,
    paths: &VmPaths,
    req: &ExecRequest,
    read_timeout: Option<Duration>,
) -> Result<(BufReader<UnixStream>, ExecReply), ClusterError> {
    let s = UnixStream::connect(exec_socket(paths))
        .map_err(|_| ClusterError::NoExec(vm.to_string()))?;
    let call = call_error(vm);
    s.set_read_timeout(read_timeout).map_err(&call)?;
    crate::write_json_line(&s, req).map_err(&call)?;
    let mut r = BufReader::new(s);
    let reply: ExecReply = crate::read_json_line(&mut r).map_err(&call)?;
    if let Some(message) = reply.error {
        return Err(ClusterError::Remote {
            vm: vm.to_string(),
            message,
        });
    }
    Ok((r, reply))
}

/// Run `cmd` in the VM `vm` (its folder `paths`) through its owner's exec socket.
pub fn exec_remote(
    vm: &str,
    paths: &VmPaths,
    cmd: &str,
    timeout: Duration,
) -> Result<ExecOutput, ClusterError> {
    let req = ExecRequest {
        cmd: cmd.to_string(),
        timeout_ms: timeout.as_millis() as u64,
        shell: false,
        size: None,
    };
    // The owner's deadline is the call's; ours adds its grace for the reply.
    let (_, reply) = ask_owner(vm, paths, &req, Some(timeout + Duration::from_secs(30)))?;
    let call = call_error(vm);
    let dec = |s: &str| B64.decode(s).map_err(|e| call(std::io::Error::other(e)));
    Ok(ExecOutput {
        status: reply.status,
        stdout: dec(&reply.stdout)?,
        stderr: dec(&reply.stderr)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shell_escape_is_tilde_dot_at_a_line_start() {
        let cases: [(&[&str], &str, bool); 8] = [
            (&["ls\r"], "ls\r", false),
            (&["~."], "", true),
            (&["ls\r~.rest"], "ls\r", true),
            (&["ls\n~", ".x"], "ls\n", true),
            (&["a~.b"], "a~.b", false),
            (&["~~.\r"], "~.\r", false),
            (&["~x"], "~x", false),
            (&["\r~", "~", "\r~."], "\r~\r", true),
        ];
        for (inputs, want, want_leave) in cases {
            let mut e = Escape::default();
            let (mut got, mut left) = (Vec::new(), false);
            for i in inputs {
                let (b, l) = e.feed(i.as_bytes());
                got.extend(b);
                if l {
                    left = true;
                    break;
                }
            }
            assert_eq!(
                (String::from_utf8(got).unwrap(), left),
                (want.to_string(), want_leave),
                "{inputs:?}"
            );
        }
    }

    #[test]
    fn timed_logs_merge_in_time_order() {
        let a = parse_timed("10\ta1\n30\ta2\nnoise\n30\ta3\n");
        let b = parse_timed("20\tb1\n30\tb2\n");
        let merged: Vec<(String, String)> = merge_timed(vec![("a".into(), a), ("b".into(), b)])
            .into_iter()
            .map(|(_, m, l)| (m, l))
            .collect();
        let want = [
            ("a", "a1"),
            ("b", "b1"),
            ("a", "a2"),
            ("a", "a3"),
            ("b", "b2"),
        ];
        assert_eq!(
            merged,
            want.map(|(m, l)| (m.to_string(), l.to_string())).to_vec()
        );
    }
}
