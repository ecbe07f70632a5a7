//! The effectful layer of a cluster: its owner process starts one hub per VLAN and one
//! long-lived thread per machine (so QEMU's parent-death signal is tied to a thread that lives
//! as long as the machine). Each machine thread launches its VM through the one launch path
//! (`resolve_launch`, `record_vm_run`, `start_with`), listens on the backdoor socket QEMU
//! connects to, waits for the guest's ready line, then serves `exec` requests from other drydock
//! processes on `exec.sock` (one JSON line each way; calls queue on the backdoor), until the
//! owner stops the cluster, QEMU exits or the machine's store server dies: the thread blocks on
//! all of these at once (its stop, QEMU's and the store server's pidfds, the exec socket).
//!
//! The owner itself waits on one channel (see `events`): the machines' events, their console
//! lines (stamped into `console.timed` and handed on by each VM's console pump), the control
//! socket's requests (read by a thread of their own) and interruptions. Stopping wakes every
//! machine's stop: every machine thread stops its VM at once (powerdown → quit → SIGTERM →
//! SIGKILL), in parallel, then the hubs stop. A hot reload (`apply`) stops, starts and rewires
//! single machines of a running cluster through the same pieces: one stop and one thread per
//! machine, hubs whose ports can change.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::AsFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant};

use drydock_gc::{Cancel, Deadline};

use crate::backdoor::Backdoor;
use crate::compose::{ClusterPlan, HOSTS_FW_CFG, MachinePlan};
use crate::events::{ConsoleEcho, ControlCall, MachineEvent, OwnerEvent};
use crate::hub::Hub;
use crate::logs::{TimedLog, clear_logs};
use crate::state::{
    ClusterError, ClusterLaunch, ClusterState, cluster_paths, exec_socket, hub_socket, nic_socket,
    record_failure,
};
use drydock_vm::{Boot, LaunchRequest, Share, StoreMode};
use drydock_vm::{ConsoleOptions, WakeFd, Waker, wait_readable, wake_pair};
use drydock_vm::{FwCfgFile, GuestDevices, Nic, VmPaths};
use drydock_vm::{LaunchRecord, VmState};

/// How long stopping machines may take before the owner stops waiting for their threads (each
/// VM's own stop is bounded well within it: powerdown, quit, SIGTERM, SIGKILL).
const STOP_DEADLINE: Duration = Duration::from_secs(120);
/// How long a machine that failed waits for QEMU's exit, to tell whether QEMU died under it.
const QEMU_EXIT_GRACE: Duration = Duration::from_secs(2);
/// How many of a failed machine's last console lines its error shows.
const FAILED_CONSOLE_LINES: usize = 15;

/// One machine's thread and its stop.
#[derive(Debug)]
pub(crate) struct MachineThread {
    /// Which thread this is (the events it sends carry it).
    id: u64,
    stop: Waker,
    thread: std::thread::JoinHandle<()>,
}

/// A thread that feeds the owner's channel (the control socket's), and its stop.
#[derive(Debug)]
struct Feeder {
    stop: Waker,
    thread: std::thread::JoinHandle<()>,
}

/// An up cluster, owned by this process. Dropping it stops everything.
#[derive(Debug)]
pub struct RunningCluster {
    pub plan: ClusterPlan,
    pub(crate) opts: ClusterLaunch,
    pub(crate) state_dir: PathBuf,
    pub(crate) hubs: Vec<Hub>,
    /// The machines whose thread runs (a machine whose thread ended is not here).
    pub(crate) machines: BTreeMap<String, MachineThread>,
    next_thread: u64,
    pub(crate) tx: SyncSender<OwnerEvent>,
    events: Receiver<OwnerEvent>,
    /// Events taken off the channel while waiting for something else, for the owner's loop.
    pub(crate) deferred: VecDeque<OwnerEvent>,
    /// Where a second `up` asks for a hot reload (see `apply`), and its thread.
    control: Option<Feeder>,
    stopped: bool,
}

/// Start the cluster `plan`: hubs, then every machine in parallel. Returns once every machine
/// is ready; a machine that fails, `cancel` or the timeout stops everything started. `on_event`
/// sees each event meanwhile (the machines' and their console lines).
pub(crate) fn up(
    plan: &ClusterPlan,
    opts: &ClusterLaunch,
    cancel: &Cancel,
    on_event: &mut dyn FnMut(&OwnerEvent),
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
    let (tx, rx) = crate::events::channel();
    let mut running = RunningCluster {
        plan: plan.clone(),
        opts: opts.clone(),
        state_dir: opts.state_dir.clone(),
        hubs: Vec::new(),
        machines: BTreeMap::new(),
        next_thread: 0,
        tx,
        events: rx,
        deferred: VecDeque::new(),
        control: None,
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
    // A new cluster's logs start empty (a restarted machine's carry on).
    for m in &plan.machines {
        clear_logs(&VmPaths::in_state_dir(&opts.state_dir, &m.vm_name));
    }
    for m in &plan.machines {
        running.spawn_machine(m)?;
    }
    let tx = running.tx.clone();
    let _interrupt = cancel.on_cancel(move || {
        let _ = tx.try_send(OwnerEvent::Interrupt);
    });
    let deadline = Deadline::after(opts.ready_timeout + Duration::from_secs(60));
    let mut ready = 0;
    while ready < plan.machines.len() {
        if cancel.is_set() {
            running.stop();
            return Err(ClusterError::Interrupted);
        }
        let Some(ev) = running.next_event(Some(deadline)) else {
            running.stop();
            return Err(ClusterError::Machine {
                machine: "?".into(),
                message: "the cluster did not become ready in time".into(),
            });
        };
        on_event(&ev);
        if let OwnerEvent::Machine { event, .. } = ev {
            match event {
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
    }
    running.start_control()?;
    Ok(running)
}

/// The NIC sockets of the machines of `plan` on `vlan`: the ports of its hub.
pub(crate) fn vlan_ports(plan: &ClusterPlan, state_dir: &Path, vlan: u8) -> Vec<PathBuf> {
    plan.on_vlan(vlan)
        .map(|m| nic_socket(&VmPaths::in_state_dir(state_dir, &m.vm_name), vlan))
        .collect()
}

/// The control socket's thread: each connection's request line, read (within its deadline)
/// before the owner sees it, so a slow client never holds the owner.
fn feed_control(listener: UnixListener, stop: WakeFd, tx: SyncSender<OwnerEvent>) {
    loop {
        match wait_readable(&[listener.as_fd(), stop.as_fd()], None) {
            Ok(r) if r[1] => return,
            Ok(r) if r[0] => {}
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!("control socket: {e}");
                return;
            }
        }
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if drydock_vm::retry(&e) => continue,
            Err(e) => {
                tracing::warn!("control socket: {e}");
                return;
            }
        };
        let request = crate::control::read_request(&stream);
        // Blocks while the owner is busy (a reload); the owner drops its end before joining.
        if tx
            .send(OwnerEvent::Control(ControlCall { stream, request }))
            .is_err()
        {
            return;
        }
    }
}

impl RunningCluster {
    /// Listen on the control socket (its thread feeds the owner's channel).
    fn start_control(&mut self) -> Result<(), ClusterError> {
        let cpaths = cluster_paths(&self.state_dir, &self.plan.name);
        let listener = crate::control::bind_control(&cpaths)?;
        let files = |source| ClusterError::Files {
            path: cpaths.sockets.clone(),
            source,
        };
        let (stop, stopped) = wake_pair().map_err(files)?;
        let tx = self.tx.clone();
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || feed_control(listener, stopped, tx))
            .map_err(files)?;
        self.control = Some(Feeder { stop, thread });
        Ok(())
    }

    /// The next event: a deferred one, else the channel's, waiting until `deadline` (none: for
    /// ever); `None` once it passed. A machine thread's last event ends its thread here (it is
    /// joined: the event is the last thing it does).
    pub(crate) fn next_event(&mut self, deadline: Option<Deadline>) -> Option<OwnerEvent> {
        if let Some(ev) = self.deferred.pop_front() {
            return Some(ev);
        }
        let ev = match deadline {
            None => self.events.recv().ok()?,
            Some(d) => match self.events.recv_timeout(d.remaining()) {
                Ok(ev) => ev,
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            },
        };
        if let OwnerEvent::Machine { thread, event } = &ev {
            if event.is_last() {
                self.ended(event.machine(), *thread);
            }
        }
        Some(ev)
    }

    /// The thread `id` of `machine` has ended (its last event came): join it, forget it.
    fn ended(&mut self, machine: &str, id: u64) {
        if self.machines.get(machine).is_some_and(|t| t.id == id) {
            if let Some(t) = self.machines.remove(machine) {
                let _ = t.thread.join();
            }
        }
    }

    /// Start the thread of machine `m` (its VM boots; it reports on the owner's channel).
    pub(crate) fn spawn_machine(&mut self, m: &MachinePlan) -> Result<(), ClusterError> {
        let cpaths = cluster_paths(&self.state_dir, &self.plan.name);
        let hosts = cpaths.dir.join("hosts");
        let files = |source| ClusterError::Files {
            path: cpaths.dir.clone(),
            source,
        };
        let (stop, stopped) = wake_pair().map_err(files)?;
        let id = self.next_thread;
        self.next_thread += 1;
        let (m2, opts, tx) = (m.clone(), self.opts.clone(), self.tx.clone());
        let cp = cpaths.clone();
        let thread = std::thread::Builder::new()
            .name(format!("machine-{}", m.machine))
            .spawn(move || {
                let event = machine_main(&m2, &opts, &cp, &hosts, &stopped, &tx);
                // The thread's last act: the owner joins it once it has this.
                let _ = tx.send(OwnerEvent::Machine { thread: id, event });
            })
            .map_err(files)?;
        self.machines
            .insert(m.machine.clone(), MachineThread { id, stop, thread });
        Ok(())
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
        self.machines.is_empty()
    }

    /// Stop the machines `names`, in parallel (every stop first, then the wait for each thread's
    /// last event), and forget their threads. Meanwhile the events of other machines and the
    /// console lines go to `on_event`; anything else waits in `deferred` for the owner's loop.
    pub(crate) fn stop_machines(
        &mut self,
        names: &[String],
        on_event: &mut dyn FnMut(&OwnerEvent),
    ) {
        let mut waiting: BTreeMap<String, u64> = BTreeMap::new();
        for m in names {
            if let Some(t) = self.machines.get(m) {
                t.stop.wake();
                waiting.insert(m.clone(), t.id);
            }
        }
        let deadline = Deadline::after(STOP_DEADLINE);
        while waiting
            .iter()
            .any(|(m, id)| self.machines.get(m).is_some_and(|t| t.id == *id))
        {
            // Taken from the channel only: deferred events wait for the owner's loop.
            let ev = match self.events.recv_timeout(deadline.remaining()) {
                Ok(ev) => ev,
                Err(_) => {
                    for (m, id) in &waiting {
                        if self.machines.get(m).is_some_and(|t| t.id == *id) {
                            tracing::warn!("machine {m}: its thread did not end in time");
                            self.machines.remove(m);
                        }
                    }
                    break;
                }
            };
            if let OwnerEvent::Machine { thread, event } = &ev {
                if event.is_last() {
                    self.ended(event.machine(), *thread);
                }
            }
            match ev {
                ev @ (OwnerEvent::Machine { .. } | OwnerEvent::Console { .. }) => on_event(&ev),
                ev => self.deferred.push_back(ev),
            }
        }
    }

    /// Stop every machine in parallel, then the hubs; remove the owner's state. Idempotent.
    pub fn stop(&mut self) {
        self.stop_with(&mut |_| {});
    }

    /// [`Self::stop`], with the machines' last events and console lines going to `on_event`.
    pub(crate) fn stop_with(&mut self, on_event: &mut dyn FnMut(&OwnerEvent)) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let cpaths = cluster_paths(&self.state_dir, &self.plan.name);
        if let Some(c) = &self.control {
            c.stop.wake();
        }
        let _ = std::fs::remove_file(crate::control::control_socket(&cpaths));
        let all: Vec<String> = self.machines.keys().cloned().collect();
        self.stop_machines(&all, on_event);
        // Requests that came meanwhile are answered: the cluster is going down.
        for ev in std::mem::take(&mut self.deferred) {
            if let OwnerEvent::Control(call) = ev {
                crate::control::reply(
                    &call.stream,
                    Err((format!("the cluster {} is stopping", self.plan.name), false)),
                );
            }
        }
        // Nothing is received from here on: a feeder blocked on a full channel gets an error
        // and ends.
        let (_, closed) = crate::events::channel();
        drop(std::mem::replace(&mut self.events, closed));
        if let Some(c) = self.control.take() {
            let _ = c.thread.join();
        }
        for h in &mut self.hubs {
            h.stop();
        }
        let _ = std::fs::remove_file(cpaths.dir.join("cluster.json"));
        // The socket folders drydock made, if nothing else is in them.
        let _ = std::fs::remove_dir(&cpaths.sockets);
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
    }
}

/// One machine, start to stop. Everything it started it stops before returning; the returned
/// event is its last (`Stopped`, or `Failed` and why).
fn machine_main(
    m: &MachinePlan,
    opts: &ClusterLaunch,
    cpaths: &VmPaths,
    hosts: &Path,
    stop: &WakeFd,
    tx: &SyncSender<OwnerEvent>,
) -> MachineEvent {
    let fail = |message: String| MachineEvent::Failed {
        machine: m.machine.clone(),
        message,
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
    record_failure(&paths, None);
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
    // Each console line: stamped into the timed log, and to the owner (echo), once.
    let mut timed = TimedLog::open(&paths, opts.log_limit);
    let mut echo = ConsoleEcho::new(&m.machine, tx.clone());
    let console = ConsoleOptions {
        log_limit: opts.log_limit,
        on_line: Some(Box::new(move |line: &str| {
            timed.line(line);
            echo.line(line);
        })),
    };
    let mut vm = match drydock_vm::start_with(&record.spec, record.share.as_ref(), None, console) {
        Ok(vm) => vm,
        Err(e) => {
            let _ = drydock_vm::end_vm_run(&opts.state_dir, &record, None);
            return fail(error_text(&e));
        }
    };
    // From here on the VM is stopped on every path out.
    let mut calls = Vec::new();
    let ready = Deadline::at(started + opts.ready_timeout);
    let result = serve(
        m, &mut vm, &listener, &exec_path, stop, tx, started, ready, &mut calls,
    );
    if let Err(Failure::Lost(why)) = &result {
        // Calls in progress and to come fail at once, saying why; so do `ps` and `exec`.
        record_failure(&paths, Some(why));
    }
    if let (Err(Failure::Other(_)), Some(w)) = (&result, vm.qemu_exit()) {
        // A backdoor that closed may be QEMU going away: give its exit a moment to show, so
        // that the error says so rather than blame the guest.
        w.wait(Deadline::after(QEMU_EXIT_GRACE));
    }
    let status = vm.exited();
    if let Err(e) = vm.stop(drydock_vm::POWERDOWN_GRACE) {
        tracing::warn!("stopping {}: {}", m.vm_name, error_text(&e));
    }
    // The VM is gone, so is its backdoor: every call thread ends now.
    for c in calls {
        let _ = c.join();
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
    // A socket folder of its own (a VM folder too deep for socket paths) goes once empty.
    if paths.sockets != paths.dir {
        let _ = std::fs::remove_dir(&paths.sockets);
    }
    match result {
        Ok(()) => MachineEvent::Stopped {
            machine: m.machine.clone(),
        },
        Err(Failure::Lost(why)) => fail(why),
        Err(Failure::Other(message)) => {
            // Whether QEMU had died under the guest, and what it said.
            let message = match status {
                Some(st) => {
                    let said = drydock_vm::log_tail(&paths.dir.join("qemu.log"), 5);
                    let said = said.trim();
                    match said.is_empty() {
                        true => format!("{message}; QEMU had ended ({st})"),
                        false => format!("{message}; QEMU had ended ({st}), saying: {said}"),
                    }
                }
                None => message,
            };
            // What the guest printed last usually says why (a panic, a failed mount).
            let tail = drydock_vm::log_tail(&paths.console_log(), FAILED_CONSOLE_LINES);
            let shown: Vec<String> = tail
                .lines()
                .map(|l| format!("  {}", drydock_vm::escape_control(l)))
                .collect();
            fail(match shown.is_empty() {
                true => message,
                false => format!(
                    "{message}; the last lines of its console:\n{}",
                    shown.join("\n")
                ),
            })
        }
    }
}

/// Why a machine's serving ended other than by its stop.
#[derive(Debug)]
enum Failure {
    /// It lost a process it needs (its store server): the reason, for `ps` and `exec`.
    Lost(String),
    Other(String),
}

/// Why the store server of `vm` ended, as a sentence.
fn server_died(vm: &mut drydock_vm::Vm) -> Failure {
    let why = match vm.server_status() {
        Some((pid, Some(status))) => format!("its store server (pid {pid}) died ({status})"),
        Some((pid, None)) => format!("its store server (pid {pid}) died"),
        None => "its store server died".to_string(),
    };
    Failure::Lost(format!(
        "{why}; the guest cannot reach its store (`drydock up` restarts it)"
    ))
}

/// Wait for the backdoor, report ready, serve `exec` until stopped, QEMU exits or the store
/// server dies. Exec calls started are in `calls` (joined once the VM is stopped).
#[allow(clippy::too_many_arguments)]
fn serve(
    m: &MachinePlan,
    vm: &mut drydock_vm::Vm,
    listener: &UnixListener,
    exec_path: &Path,
    stop: &WakeFd,
    tx: &SyncSender<OwnerEvent>,
    started: Instant,
    ready: Deadline,
    calls: &mut Vec<std::thread::JoinHandle<()>>,
) -> Result<(), Failure> {
    let other = |what: &str, e: std::io::Error| Failure::Other(format!("{what}: {e}"));
    // QEMU connects the backdoor as it starts: wait for that, the stop, or a process's end.
    let stream = loop {
        let mut fds = vec![listener.as_fd(), stop.as_fd()];
        fds.extend(vm.qemu_exit().map(|w| w.as_fd()));
        fds.extend(vm.server_exit().map(|w| w.as_fd()));
        let r = wait_readable(&fds, Some(ready)).map_err(|e| other("backdoor socket", e))?;
        if r[1] {
            return Ok(());
        }
        if vm.qemu_exit().is_some_and(|w| w.exited()) {
            return Err(Failure::Other(
                "QEMU exited before it connected the backdoor".into(),
            ));
        }
        if vm.server_exit().is_some_and(|w| w.exited()) {
            return Err(server_died(vm));
        }
        if ready.expired() {
            return Err(Failure::Other(
                "QEMU did not connect the backdoor in time".into(),
            ));
        }
        if r[0] {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if drydock_vm::retry(&e) => {}
                Err(e) => return Err(other("backdoor socket", e)),
            }
        }
    };
    let backdoor = {
        // Until ready: the stop, QEMU's and the store server's ends interrupt the wait.
        let mut fds = vec![stop.as_fd()];
        fds.extend(vm.qemu_exit().map(|w| w.as_fd()));
        fds.extend(vm.server_exit().map(|w| w.as_fd()));
        Backdoor::wait_ready(stream, ready.remaining(), &fds, &mut |_| {})
    };
    let backdoor = match backdoor {
        Ok(b) => Arc::new(b),
        Err(_) if stop.is_woken() => return Ok(()),
        Err(_) if vm.server_exit().is_some_and(|w| w.exited()) => return Err(server_died(vm)),
        Err(_) if vm.qemu_exit().is_some_and(|w| w.exited()) => {
            return Err(Failure::Other(format!(
                "QEMU exited before the guest was ready (see {})",
                vm.paths().console_log().display()
            )));
        }
        Err(e) => {
            return Err(Failure::Other(format!(
                "{} (see {})",
                error_text(&e),
                vm.paths().console_log().display()
            )));
        }
    };
    let exec = UnixListener::bind(exec_path)
        .map_err(|e| other(&format!("cannot listen on {}", exec_path.display()), e))?;
    let _ = tx.send(OwnerEvent::Machine {
        // Not the last event: which thread sent it does not matter.
        thread: u64::MAX,
        event: MachineEvent::Ready {
            machine: m.machine.clone(),
            after: started.elapsed(),
        },
    });
    match crate::exec::serve(&m.machine, &backdoor, &exec, stop, vm, calls) {
        Ok(crate::exec::ServeEnd::Stopped | crate::exec::ServeEnd::QemuExited) => Ok(()),
        Ok(crate::exec::ServeEnd::ServerDied) => {
            let lost = server_died(vm);
            if let Failure::Lost(why) = &lost {
                backdoor.close(&format!("machine {}: {why}", m.machine));
            }
            Err(lost)
        }
        Err(e) => Err(other("exec socket", e)),
    }
}
