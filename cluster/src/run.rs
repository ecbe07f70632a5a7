//! The effectful layer of a cluster: its owner process checks every machine's launch first
//! (`launches`: resolved and checked by drydock-vm's launcher, so a bad machine starts
//! nothing), then starts one hub per VLAN and one long-lived thread per machine (so QEMU's
//! parent-death signal is tied to a thread that lives as long as the machine). Each machine
//! thread carries its checked launch out with the launcher (claim, then its backdoor socket,
//! then disk, run, record, QEMU with its console read by this process), listens on the
//! backdoor socket QEMU connects to, waits for the guest's ready line, then serves `exec`
//! requests from other drydock processes on `exec.sock` (one JSON line each way; calls queue on
//! the backdoor), until the owner stops the cluster, QEMU exits or the machine's store server
//! dies: the thread blocks on all of these at once (its stop, QEMU's and the store server's
//! pidfds, the exec socket). What fails reaches the owner as a typed [`MachineError`].
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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant};

use drydock_gc::{Cancel, Deadline};

use crate::backdoor::Backdoor;
use crate::compose::{ClusterPlan, MachinePlan};
use crate::events::{ConsoleEcho, ControlCall, MachineEvent, OwnerEvent};
use crate::hub::Hub;
use crate::launches::plan_launches;
use crate::logs::{TimedLog, clear_logs};
use crate::state::{
    ClusterError, ClusterLaunch, ClusterState, MachineError, cluster_paths, exec_socket,
    hub_socket, machines_run_name, nic_socket, record_failure,
};
use drydock_vm::{ConsoleOptions, LaunchPlan, VmPaths, WakeFd, Waker, wait_readable, wake_pair};

/// How long stopping machines may take before the owner stops waiting for their threads (each
/// VM's own stop is bounded well within it: powerdown, quit, SIGTERM, SIGKILL).
const STOP_DEADLINE: Duration = Duration::from_secs(120);
/// How long a machine that failed waits for QEMU's exit, to tell whether QEMU died under it.
const QEMU_EXIT_GRACE: Duration = Duration::from_secs(2);
/// How many of a failed machine's last console lines its error shows.
const FAILED_CONSOLE_LINES: usize = 15;

/// How [`up`] brings the machines up.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Boot<'a> {
    /// Every machine boots.
    Fresh,
    /// None boots: each boots when asked (`ControlOp::Start`), and the owner stays up with none
    /// running.
    Idle,
    /// Every machine comes back from this snapshot, paused; once all are, they resume at once.
    Restore(&'a crate::snapshot::ClusterSnapshot),
}

/// One machine's thread and its stop.
#[derive(Debug)]
pub(crate) struct MachineThread {
    /// Which thread this is (the events it sends carry it).
    id: u64,
    stop: Waker,
    /// A restored machine's go: the owner has resumed it (it then sets the guest's clock and
    /// reports ready).
    resumed: Option<Waker>,
    /// Set before `stop` wakes: stop the VM at once (QMP quit), without the guest's powerdown.
    pub(crate) crash: Arc<AtomicBool>,
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
    /// The owner stays up when no machine runs (a cluster started with none booted, or whose
    /// machines a test stopped): only `down` or an interruption ends it.
    pub(crate) stay: bool,
    /// The faults in force on the cluster's networks (`net`, `ControlOp::Block`), by machine:
    /// each hub's are derived from them (see `net`).
    pub(crate) faults: crate::net::NetFaults,
}

/// Start the cluster `plan`: every machine's launch checked (a machine that cannot launch is
/// the error, and nothing starts), then hubs, then every machine in parallel, as `boot` says
/// (fresh; none, each booting when asked; or restored from a snapshot: each paused once its
/// state is loaded, then all resumed at once). Returns once every machine started is ready; a
/// machine that fails, `cancel` or the timeout stops everything started. `on_event` sees each
/// event meanwhile (the machines' and their console lines).
pub(crate) fn up(
    plan: &ClusterPlan,
    opts: &ClusterLaunch,
    boot: Boot<'_>,
    cancel: &Cancel,
    on_event: &mut dyn FnMut(&OwnerEvent),
) -> Result<RunningCluster, ClusterError> {
    let idle = matches!(boot, Boot::Idle);
    let launches = match boot {
        Boot::Restore(snap) => crate::launches::restore_launches(snap, opts)?,
        Boot::Fresh | Boot::Idle => plan_launches(plan, opts)?,
    };
    let mut opts = opts.clone();
    if opts.run.is_none() {
        opts.run = begin_machines_run(&opts, &plan.name);
    }
    if idle {
        // The machines boot later: their systems are pinned by the cluster's run from now on
        // (each launch pins its own again), so no GC takes one in between.
        pin_systems(&opts, &launches);
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
        stay: idle,
        faults: crate::net::NetFaults::default(),
    };
    for &v in &plan.vlans {
        running.hubs.push(
            crate::net::start_hub(
                v,
                &hub_socket(&cpaths, v),
                vlan_ports(plan, &opts.state_dir, v),
            )
            .map_err(ClusterError::Hub)?,
        );
    }
    // A new cluster's logs start empty (a restarted or restored machine's carry on).
    if !matches!(boot, Boot::Restore(_)) {
        for m in &plan.machines {
            clear_logs(&VmPaths::in_state_dir(&opts.state_dir, &m.vm_name));
        }
    }
    if !idle {
        for (m, launch) in plan.machines.iter().zip(launches) {
            running.spawn_machine(m, launch)?;
        }
    }
    let booting = if idle { 0 } else { plan.machines.len() };
    let tx = running.tx.clone();
    let _interrupt = cancel.on_cancel(move || {
        let _ = tx.try_send(OwnerEvent::Interrupt);
    });
    let deadline = Deadline::after(opts.ready_timeout + Duration::from_secs(60));
    let mut ready = 0;
    let mut paused = 0;
    while ready < booting {
        if cancel.is_set() {
            running.stop();
            return Err(ClusterError::Interrupted);
        }
        let Some(ev) = running.next_event(Some(deadline)) else {
            running.stop();
            return Err(ClusterError::machine("?", MachineError::Late));
        };
        on_event(&ev);
        if let OwnerEvent::Machine { event, .. } = ev {
            match event {
                MachineEvent::Ready { .. } => ready += 1,
                MachineEvent::Paused { .. } => {
                    paused += 1;
                    if paused == booting {
                        // Every machine is loaded and paused: all resume at once.
                        if let Err(e) = running.resume_all() {
                            running.stop();
                            return Err(e);
                        }
                    }
                }
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
    }
    running.start_control()?;
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

/// Pin every machine's system in the machines' run (for machines that boot later).
fn pin_systems(opts: &ClusterLaunch, launches: &[LaunchPlan]) {
    let Some(id) = opts.run else {
        return;
    };
    let db = match drydock_gc::RunsDb::open(&opts.state_dir) {
        Ok(db) => db,
        Err(e) => {
            tracing::warn!("pinning the systems: {}", drydock_vm::error_chain(&e));
            return;
        }
    };
    for l in launches {
        if let Err(e) = drydock_vm::pin_launch(&db, id, &opts.layout, l.record()) {
            tracing::warn!(
                "pinning the system of {}: {}",
                l.record().spec.name,
                drydock_vm::error_chain(&e)
            );
        }
    }
}

/// End the machines' run `id` (the cluster stopped), unless it has ended. Returns whether this
/// call ended it.
pub(crate) fn end_machines_run(state_dir: &Path, id: i64) -> bool {
    match drydock_gc::RunsDb::open(state_dir).and_then(|db| db.finish_open_run(id, None)) {
        Ok(ended) => ended,
        Err(e) => {
            tracing::warn!("ending run {id}: {}", drydock_vm::error_chain(&e));
            false
        }
    }
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

    /// Resume every machine restored and paused (QMP `cont`, one after the other, each a few
    /// milliseconds), then tell each machine's thread to go on.
    fn resume_all(&mut self) -> Result<(), ClusterError> {
        for m in &self.plan.machines {
            if !self.machines.contains_key(&m.machine) {
                continue;
            }
            let paths = VmPaths::in_state_dir(&self.state_dir, &m.vm_name);
            drydock_vm::Qmp::connect(&paths.qmp_socket(), Duration::from_secs(5))
                .and_then(|mut q| q.cont())
                .map_err(|e| {
                    ClusterError::machine(&m.machine, MachineError::Resume(Arc::new(e)))
                })?;
        }
        for t in self.machines.values() {
            if let Some(r) = &t.resumed {
                r.wake();
            }
        }
        Ok(())
    }

    /// Start the thread of machine `m`, which carries out its checked `launch` (its VM boots;
    /// it reports on the owner's channel).
    pub(crate) fn spawn_machine(
        &mut self,
        m: &MachinePlan,
        launch: LaunchPlan,
    ) -> Result<(), ClusterError> {
        let cpaths = cluster_paths(&self.state_dir, &self.plan.name);
        let files = |source| ClusterError::Files {
            path: cpaths.dir.clone(),
            source,
        };
        let (stop, stopped) = wake_pair().map_err(files)?;
        let resume = match launch.is_restore() {
            true => Some(wake_pair().map_err(files)?),
            false => None,
        };
        let (resumed, go) = match resume {
            Some((w, fd)) => (Some(w), Some(fd)),
            None => (None, None),
        };
        let id = self.next_thread;
        self.next_thread += 1;
        let crash = Arc::new(AtomicBool::new(false));
        let (m2, opts, tx, crashed) =
            (m.clone(), self.opts.clone(), self.tx.clone(), crash.clone());
        let thread = std::thread::Builder::new()
            .name(format!("machine-{}", m.machine))
            .spawn(move || {
                let event = machine_main(&m2, &opts, launch, &stopped, go.as_ref(), &crashed, &tx);
                // The thread's last act: the owner joins it once it has this.
                let _ = tx.send(OwnerEvent::Machine { thread: id, event });
            })
            .map_err(files)?;
        self.machines.insert(
            m.machine.clone(),
            MachineThread {
                id,
                stop,
                resumed,
                crash,
                thread,
            },
        );
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
        self.machines.is_empty()
    }

    /// Whether the owner's work is over: every machine stopped, unless it stays up without
    /// machines (see [`RunningCluster::stay`]).
    pub(crate) fn done(&self) -> bool {
        !self.stay && self.all_stopped()
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
        if let Some(id) = self.opts.run {
            end_machines_run(&self.state_dir, id);
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

/// One machine, start to stop: its checked `launch` carried out (its console stamped into the
/// timed log and echoed to the owner, each line once), then served. Everything it started it
/// stops before returning; the returned event is its last (`Stopped`, or `Failed` and why).
fn machine_main(
    m: &MachinePlan,
    opts: &ClusterLaunch,
    launch: LaunchPlan,
    stop: &WakeFd,
    resumed: Option<&WakeFd>,
    crash: &AtomicBool,
    tx: &SyncSender<OwnerEvent>,
) -> MachineEvent {
    let fail = |error: MachineError| MachineEvent::Failed {
        machine: m.machine.clone(),
        error: Arc::new(error),
    };
    let launcher = opts.launcher();
    let claimed = match launcher.claim(launch) {
        Ok(c) => c,
        Err(e) => return fail(MachineError::launching(e)),
    };
    let paths = VmPaths::in_state_dir(&opts.state_dir, &m.vm_name);
    // The claim made the VM's folder and its socket folder private (or refused them).
    record_failure(&paths, None);
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
    let (record, mut vm) = match launcher.start_here(claimed, console) {
        Ok(started) => started,
        Err(e) => return fail(MachineError::launching(e)),
    };
    // From here on the VM is stopped on every path out.
    let mut calls = Vec::new();
    let ready = Deadline::at(started + opts.ready_timeout);
    let result = serve(
        m, &mut vm, &listener, &exec_path, stop, resumed, tx, started, ready, &mut calls,
    );
    match &result {
        Err(MachineError::Lost(why)) => {
            // Calls in progress and to come fail at once, saying why; so do `ps` and `exec`.
            record_failure(&paths, Some(why));
        }
        Err(_) => {
            // A backdoor that closed may be QEMU going away: give its exit a moment to show,
            // so that the error says so rather than blame the guest.
            if let Some(w) = vm.qemu_exit() {
                w.wait(Deadline::after(QEMU_EXIT_GRACE));
            }
        }
        Ok(()) => {}
    }
    let status = vm.exited();
    // A crash skips the guest's powerdown: QEMU quits at once.
    let grace = match crash.load(Ordering::SeqCst) {
        true => Duration::ZERO,
        false => drydock_vm::POWERDOWN_GRACE,
    };
    if let Err(e) = vm.stop(grace) {
        tracing::warn!("stopping {}: {}", m.vm_name, drydock_vm::error_chain(&e));
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
    for n in &nics {
        let _ = std::fs::remove_file(n);
    }
    // A socket folder of its own (a VM folder too deep for socket paths) goes once empty.
    if paths.sockets != paths.dir {
        let _ = std::fs::remove_dir(&paths.sockets);
    }
    match result {
        Ok(()) => MachineEvent::Stopped {
            machine: m.machine.clone(),
        },
        Err(lost @ MachineError::Lost(_)) => fail(lost),
        Err(error) => {
            // Whether QEMU had died under the guest, and what it said; what the guest printed
            // last usually says why (a panic, a failed mount).
            let qemu_said = match status {
                Some(_) => drydock_vm::log_tail(&paths.dir.join("qemu.log"), 5),
                None => String::new(),
            };
            let tail = drydock_vm::log_tail(&paths.console_log(), FAILED_CONSOLE_LINES);
            fail(MachineError::Ended {
                error: Box::new(error),
                qemu_ended: status.map(|st| st.to_string()),
                qemu_said,
                console_tail: tail
                    .lines()
                    .map(|l| drydock_vm::escape_control(l).into_owned())
                    .collect(),
            })
        }
    }
}

/// The call that sets a restored guest's wall clock to the host's (whole seconds, as busybox's
/// and coreutils' `date -s @N` both take it): TLS certificates and leases in the guest care.
fn clock_call() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64().round() as u64)
        .unwrap_or(0);
    format!("date -u -s @{now} >/dev/null")
}

/// Why the store server of `vm` ended, as the machine's error.
fn server_died(vm: &mut drydock_vm::Vm) -> MachineError {
    let why = match vm.server_status() {
        Some((pid, Some(status))) => format!("its store server (pid {pid}) died ({status})"),
        Some((pid, None)) => format!("its store server (pid {pid}) died"),
        None => "its store server died".to_string(),
    };
    MachineError::Lost(format!(
        "{why}; the guest cannot reach its store (`drydock up` restarts it)"
    ))
}

/// Wait for the backdoor, report ready, serve `exec` until stopped, QEMU exits or the store
/// server dies. Exec calls started are in `calls` (joined once the VM is stopped). A lost
/// store server is [`MachineError::Lost`].
#[allow(clippy::too_many_arguments)]
fn serve(
    m: &MachinePlan,
    vm: &mut drydock_vm::Vm,
    listener: &UnixListener,
    exec_path: &Path,
    stop: &WakeFd,
    resumed: Option<&WakeFd>,
    tx: &SyncSender<OwnerEvent>,
    started: Instant,
    ready: Deadline,
    calls: &mut Vec<std::thread::JoinHandle<()>>,
) -> Result<(), MachineError> {
    // QEMU connects the backdoor as it starts: wait for that, the stop, or a process's end.
    let stream = loop {
        let mut fds = vec![listener.as_fd(), stop.as_fd()];
        fds.extend(vm.qemu_exit().map(|w| w.as_fd()));
        fds.extend(vm.server_exit().map(|w| w.as_fd()));
        let r = wait_readable(&fds, Some(ready)).map_err(MachineError::BackdoorSocket)?;
        if r[1] {
            return Ok(());
        }
        if vm.qemu_exit().is_some_and(|w| w.exited()) {
            return Err(MachineError::ExitedEarly);
        }
        if vm.server_exit().is_some_and(|w| w.exited()) {
            return Err(server_died(vm));
        }
        if ready.expired() {
            return Err(MachineError::NoBackdoor);
        }
        if r[0] {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if drydock_vm::retry(&e) => {}
                Err(e) => return Err(MachineError::BackdoorSocket(e)),
            }
        }
    };
    let backdoor = match resumed {
        Some(go) => {
            // Restored and paused: the guest's shell is where the snapshot left it, waiting for
            // a call (it prints no ready line). Once the owner resumed every machine, the
            // guest's clock is set to the host's: its first call, which also shows it answers.
            let _ = tx.send(OwnerEvent::Machine {
                thread: u64::MAX,
                event: MachineEvent::Paused {
                    machine: m.machine.clone(),
                },
            });
            let mut fds = vec![stop.as_fd(), go.as_fd()];
            fds.extend(vm.qemu_exit().map(|w| w.as_fd()));
            fds.extend(vm.server_exit().map(|w| w.as_fd()));
            let r = wait_readable(&fds, Some(ready)).map_err(MachineError::BackdoorSocket)?;
            if r[0] {
                return Ok(());
            }
            if !r[1] {
                if vm.server_exit().is_some_and(|w| w.exited()) {
                    return Err(server_died(vm));
                }
                if vm.qemu_exit().is_some_and(|w| w.exited()) {
                    return Err(MachineError::ExitedEarly);
                }
                return Err(MachineError::NoBackdoor);
            }
            // The owner resumed it: recorded as running (`ps`, `down`).
            if let Err(e) = vm.mark_running() {
                tracing::warn!("{}: {}", m.vm_name, drydock_vm::error_chain(&e));
            }
            let b = Backdoor::attached(stream);
            b.exec(&clock_call(), ready.remaining())
                .and_then(|out| match out.status {
                    0 => Ok(b),
                    s => Err(crate::backdoor::BackdoorError::Clock(s)),
                })
        }
        None => {
            // Until ready: the stop, QEMU's and the store server's ends interrupt the wait.
            let mut fds = vec![stop.as_fd()];
            fds.extend(vm.qemu_exit().map(|w| w.as_fd()));
            fds.extend(vm.server_exit().map(|w| w.as_fd()));
            Backdoor::wait_ready(stream, ready.remaining(), &fds, &mut |_| {})
        }
    };
    let backdoor = match backdoor {
        Ok(b) => Arc::new(b),
        Err(_) if stop.is_woken() => return Ok(()),
        Err(_) if vm.server_exit().is_some_and(|w| w.exited()) => return Err(server_died(vm)),
        Err(_) if vm.qemu_exit().is_some_and(|w| w.exited()) => {
            return Err(MachineError::QemuExited {
                console: vm.paths().console_log(),
            });
        }
        Err(error) => {
            return Err(MachineError::NotReady {
                error,
                console: vm.paths().console_log(),
            });
        }
    };
    let exec = drydock_gc::bind_listener(exec_path).map_err(|source| MachineError::Listen {
        path: exec_path.to_path_buf(),
        source,
    })?;
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
            backdoor.close(&format!("machine {}: {lost}", m.machine));
            Err(lost)
        }
        Err(e) => Err(MachineError::Exec(e)),
    }
}
