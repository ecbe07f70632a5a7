//! The effectful layer of hot reload, in the cluster's owner (it holds the hubs, the machine
//! threads and, through them, the store servers and backdoors). [`RunningCluster::plan_reload`]
//! gathers the facts `reload` plans from (each running machine's recorded launch, each new
//! machine's launch resolved as `up` would launch it, whether its system is switchable);
//! [`RunningCluster::apply_reload`] carries the plan out:
//!
//! 1. `remove` and `restart`: their threads stop their VMs (in parallel); a restarted machine's
//!    console log is kept aside as `console.log.prev`.
//! 2. The hubs take the new port lists (new VLANs get a hub, unused ones stop); the hosts table
//!    is rewritten for the machines that boot now. Machines that keep running are not touched.
//! 3. `create` and `restart` boot (a thread each, as `up` starts them), while every `switch`
//!    runs: the store server shows the old and new closures at once, then
//!    `NEW/bin/switch-to-configuration test` runs in the guest, started through the backdoor but
//!    detached from it (`cluster::command::switch_start`: a systemd unit of its own, or a
//!    session of its own), its output on the guest's console too (so it streams to `up` as
//!    `MACHINE │ line`); on success the view shrinks to the new closure, the launch record names
//!    the new system and the run's GC pin moves to it. On failure the machine keeps running and
//!    keeps its record and pin.
//!
//! A switch may restart the backdoor itself (NixOS restarts `backdoor.service` when the new
//! system changes it): the call that started the switch then fails with
//! [`ClusterError::Restarted`], and the switch, which runs on, is waited for again through the
//! new backdoor shell, by its folder in the guest (`cluster::command::switch_wait`), at most
//! [`MAX_REATTACH`] times and within [`SWITCH_DEADLINE`] in all.
//!
//! A machine whose records show no closure view (`LaunchRecord::share` is `None`, or shares the
//! whole store) sees the whole store: its switch changes no view. With today's types that is
//! how a machine whose store reaches it another way (over 9p, say) is switched; a machine whose
//! view would change between a closure and the whole store is not switched (a restart is).
//!
//! A second `up` reaches the owner over `STATE/clusters/NAME/.../control.sock`: one JSON request
//! line, one JSON reply line, per connection ([`request`]). Every wait has a deadline.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use drydock_gc::{Cancel, Deadline};

use crate::backdoor::{ExecOutput, nonce, sh_quote};
use crate::command::{MAX_SWITCH_OUTPUT, switch_dir, switch_start, switch_wait};
use crate::compose::ClusterPlan;
use crate::control::ControlOp;
use crate::events::{ControlCall, MachineEvent, OwnerEvent};
use crate::exec::exec_remote;
use crate::launches::resolve_machine;
use crate::reload::{Action, MachineOutcome, NewLaunch, Outcome, PlannedAction, plan_reload};
use crate::run::{RunningCluster, vlan_ports};
use crate::state::{ClusterError, cluster_paths, hub_socket, machine_failure};
use drydock_vm::VmPaths;
use drydock_vm::{LaunchPlan, LaunchRecord, StoreShare};

/// How long `switch-to-configuration` may run in a guest.
const SWITCH_DEADLINE: Duration = Duration::from_secs(300);
/// How many times a switch is waited for again after the guest's backdoor restarted under the
/// call waiting for it (a guest that prints the ready line in a loop must not hold the reload).
const MAX_REATTACH: u32 = 3;
/// How long a switch's call may take past the guest's own bound of its wait (the reply's way
/// back).
const WAIT_MARGIN: Duration = Duration::from_secs(15);
/// How long removing a switch's folder in the guest may take.
const CLEANUP_DEADLINE: Duration = Duration::from_secs(30);
/// How long one exchange with a store server's control socket may take.
const CLOSURE_DEADLINE: Duration = Duration::from_secs(30);

/// Why a reload could not be planned or carried out (before any machine was touched, unless
/// said otherwise; a machine's own failure is its outcome, not an error).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("machine {machine}: its new launch")]
    Resolve {
        machine: String,
        #[source]
        source: Box<drydock_vm::LauncherError>,
    },
    #[error("the new plan is for the cluster {got}, not {want}")]
    OtherCluster { got: String, want: String },
    #[error("cannot write {}", path.display())]
    Files {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting a machine or a hub")]
    Cluster(#[source] Box<ClusterError>),
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
}

impl ReloadError {
    pub fn is_bad_input(&self) -> bool {
        match self {
            Self::Resolve { source, .. } => source.is_bad_input(),
            Self::OtherCluster { .. } => true,
            Self::Control(e) => e.is_bad_input(),
            _ => false,
        }
    }
}

/// The facts a plan needs, gathered.
struct Facts {
    recorded: BTreeMap<String, LaunchRecord>,
    /// Machines not running, and why if they failed.
    stopped: BTreeMap<String, Option<String>>,
    launches: BTreeMap<String, NewLaunch>,
    /// Each new machine's launch, resolved: what a machine that boots carries out.
    plans: BTreeMap<String, LaunchPlan>,
}

fn switchable(layout: &drydock_gc::StoreLayout, record: &LaunchRecord) -> bool {
    let Some(top) = &record.toplevel else {
        return false;
    };
    let Ok(sp) = layout.parse(top) else {
        return false;
    };
    layout
        .physical(&sp)
        .join("bin/switch-to-configuration")
        .is_file()
}

fn union(a: &[String], b: &[String]) -> Vec<String> {
    let set: BTreeSet<&String> = a.iter().chain(b).collect();
    set.into_iter().cloned().collect()
}

/// What one switch did: `switch-to-configuration`'s output, and an error if it failed.
struct Switched {
    output: String,
    error: Option<String>,
}

/// A store view a switch moves between: the closure views to show during the switch (old and
/// new) and after it (new), or `None` when the guest sees the whole store (no closure view,
/// `share: None`, or a share of the whole store: nothing to change). Views of different kinds
/// are an error (the plan restarts such a machine).
type Views = Option<(Vec<String>, Vec<String>)>;

fn closure_views(old: Option<&StoreShare>, new: Option<&StoreShare>) -> Result<Views, String> {
    let view = |s: Option<&StoreShare>| s.and_then(|s| s.allow.clone());
    match (view(old), view(new)) {
        (Some(o), Some(n)) => Ok(Some((o, n))),
        (None, None) => Ok(None),
        (Some(_), None) | (None, Some(_)) => Err(
            "what the guest sees of the store changes between a closure and the whole store: a restart does that, a switch cannot"
                .into(),
        ),
    }
}

/// Run the switch `id` to `toplevel` in the guest through `call` (a backdoor call: its text and
/// timeout) within `deadline`: the first call starts it detached and waits for it; when the
/// guest's backdoor restarted under a call ([`ClusterError::Restarted`]), the next call only
/// waits for the same switch (its folder in the guest), at most [`MAX_REATTACH`] times.
fn run_switch(
    vm: &str,
    toplevel: &str,
    id: &str,
    deadline: Deadline,
    call: &mut dyn FnMut(&str, Duration) -> Result<ExecOutput, ClusterError>,
) -> Result<ExecOutput, String> {
    let mut restarts = 0;
    loop {
        let secs = deadline.remaining().as_secs();
        let text = match restarts {
            0 => switch_start(toplevel, id, secs),
            _ => switch_wait(id, secs),
        };
        match call(&text, Duration::from_secs(secs) + WAIT_MARGIN) {
            Ok(o) => return Ok(o),
            Err(ClusterError::Restarted { .. }) if restarts < MAX_REATTACH => {
                restarts += 1;
                tracing::info!(
                    vm,
                    restarts,
                    "the guest's backdoor restarted during the switch: waiting for the switch through the new one"
                );
            }
            Err(e @ ClusterError::Restarted { .. }) => {
                return Err(format!(
                    "{}; it restarted {} times during the switch, so drydock stopped waiting for it (the switch may still run in the guest; the machine's console shows its output)",
                    drydock_vm::error_chain(&e),
                    restarts + 1
                ));
            }
            Err(e) => return Err(drydock_vm::error_chain(&e)),
        }
    }
}

/// A switch's output as shown: stdout then stderr, each at most its last [`MAX_SWITCH_OUTPUT`]
/// bytes (the guest sends no more, but it is not trusted to keep to that), as text.
fn switch_output(o: &ExecOutput) -> String {
    let last = |b: &[u8]| -> String {
        let kept = &b[b.len().saturating_sub(MAX_SWITCH_OUTPUT)..];
        let text = String::from_utf8_lossy(kept);
        match b.len() >= MAX_SWITCH_OUTPUT {
            true => format!(
                "[only the last {} KiB; the machine's console log has the rest]\n{text}",
                MAX_SWITCH_OUTPUT >> 10
            ),
            false => text.into_owned(),
        }
    };
    format!("{}{}", last(&o.stdout), last(&o.stderr))
}

/// Switch the running machine `vm` from `old` to `new` (see the module's doc).
fn switch(
    state_dir: &Path,
    fallback: &drydock_gc::StoreLayout,
    vm: &str,
    old: &LaunchRecord,
    new: &LaunchRecord,
    others: &[String],
) -> Switched {
    let failed = |error: String, output: String| Switched {
        output,
        error: Some(error),
    };
    let paths = VmPaths::in_state_dir(state_dir, vm);
    let Some(top) = &new.toplevel else {
        return failed("the new launch names no system".into(), String::new());
    };
    let views = match closure_views(old.share.as_ref(), new.share.as_ref()) {
        Ok(v) => v,
        Err(e) => return failed(e, String::new()),
    };
    if let Some((old_allow, new_allow)) = &views {
        let both = union(old_allow, new_allow);
        if let Err(e) = drydock_vm::update_closure(&paths.fs_socket(), &both, CLOSURE_DEADLINE) {
            return failed(
                format!("showing the new closure: {}", drydock_vm::error_chain(&e)),
                String::new(),
            );
        }
        tracing::info!(vm, names = both.len(), "the guest sees the new closure");
    }
    let id = match nonce() {
        Ok(id) => id,
        Err(e) => return failed(drydock_vm::error_chain(&e), String::new()),
    };
    let deadline = Deadline::after(SWITCH_DEADLINE);
    let ran = run_switch(vm, top, &id, deadline, &mut |text, timeout| {
        exec_remote(vm, &paths, text, timeout, None)
    });
    // The switch's folder in the guest goes, whatever happened (a backdoor that cannot take the
    // call leaves it in the guest's /tmp).
    let rm = format!("rm -rf {}", sh_quote(&switch_dir(&id)));
    if let Err(e) = exec_remote(vm, &paths, &rm, CLEANUP_DEADLINE, None) {
        tracing::warn!(
            "{vm}: removing the switch's folder in the guest: {}",
            drydock_vm::error_chain(&e)
        );
    }
    let out = match ran {
        Ok(o) => o,
        Err(e) => return failed(e, String::new()),
    };
    let output = switch_output(&out);
    if out.status != 0 {
        return failed(
            format!(
                "switch-to-configuration test exited with status {}",
                out.status
            ),
            output,
        );
    }
    if let Some((_, new_allow)) = &views {
        if let Err(e) = drydock_vm::update_closure(&paths.fs_socket(), new_allow, CLOSURE_DEADLINE)
        {
            tracing::warn!(
                "{vm}: narrowing the closure view: {}",
                drydock_vm::error_chain(&e)
            );
        }
    }
    let mut record = new.clone();
    record.run_id = old.run_id;
    if let Err(e) = record.write(&paths) {
        return failed(
            format!(
                "switched, but the launch record: {}",
                drydock_vm::error_chain(&e)
            ),
            output,
        );
    }
    if let Err(e) = move_pin(state_dir, fallback, old, top, others) {
        return failed(format!("switched, but the GC pin: {e}"), output);
    }
    Switched {
        output,
        error: None,
    }
}

/// Pin `new_top` for the machine's run and unpin its old system, unless (in the cluster's
/// shared run) one of the `others` VMs still runs it.
fn move_pin(
    state_dir: &Path,
    fallback: &drydock_gc::StoreLayout,
    old: &LaunchRecord,
    new_top: &str,
    others: &[String],
) -> Result<(), String> {
    let Some(id) = old.run_id else {
        return Ok(());
    };
    let layout = old.store.clone().unwrap_or_else(|| fallback.clone());
    let db = drydock_gc::RunsDb::open(state_dir).map_err(|e| drydock_vm::error_chain(&e))?;
    let sp = layout
        .parse(new_top)
        .map_err(|e| drydock_vm::error_chain(&e))?;
    db.pin(&layout, id, &sp)
        .map_err(|e| drydock_vm::error_chain(&e))?;
    let still_used = |top: &str| {
        old.shared_run
            && others.iter().any(|vm| {
                LaunchRecord::read(&VmPaths::in_state_dir(state_dir, vm))
                    .ok()
                    .and_then(|r| r.toplevel)
                    .as_deref()
                    == Some(top)
            })
    };
    if let Some(old_top) = old
        .toplevel
        .as_deref()
        .filter(|t| *t != new_top && !still_used(t))
    {
        db.unpin(id, old_top)
            .map_err(|e| drydock_vm::error_chain(&e))?;
    }
    Ok(())
}

impl RunningCluster {
    fn gather(&self, new: &ClusterPlan) -> Result<Facts, ReloadError> {
        if new.name != self.plan.name {
            return Err(ReloadError::OtherCluster {
                got: new.name.clone(),
                want: self.plan.name.clone(),
            });
        }
        let recorded = self
            .plan
            .machines
            .iter()
            .filter_map(|m| {
                let paths = VmPaths::in_state_dir(&self.state_dir, &m.vm_name);
                LaunchRecord::read(&paths)
                    .ok()
                    .map(|r| (m.machine.clone(), r))
            })
            .collect();
        let (mut launches, mut plans) = (BTreeMap::new(), BTreeMap::new());
        for m in &new.machines {
            let plan = resolve_machine(m, &self.plan.name, &self.opts).map_err(|e| {
                ReloadError::Resolve {
                    machine: m.machine.clone(),
                    source: Box::new(e),
                }
            })?;
            let record = plan.record().clone();
            let switchable = switchable(&self.opts.layout, &record);
            launches.insert(m.machine.clone(), NewLaunch { record, switchable });
            plans.insert(m.machine.clone(), plan);
        }
        // A machine whose thread ended is not running: why, if it failed.
        let stopped = self
            .plan
            .machines
            .iter()
            .filter(|m| !self.machines.contains_key(&m.machine))
            .map(|m| {
                let paths = VmPaths::in_state_dir(&self.state_dir, &m.vm_name);
                (m.machine.clone(), machine_failure(&paths))
            })
            .collect();
        Ok(Facts {
            recorded,
            stopped,
            launches,
            plans,
        })
    }

    /// The plan from the running cluster to `new` (nothing changes).
    pub fn plan_reload(
        &self,
        new: &ClusterPlan,
        force_restart: bool,
        restart_machines: &[String],
    ) -> Result<Vec<PlannedAction>, ReloadError> {
        let f = self.gather(new)?;
        let mut plan = plan_reload(
            &self.plan,
            &f.recorded,
            &f.stopped,
            new,
            &f.launches,
            force_restart,
        );
        crate::reload::restart_named(&mut plan, restart_machines);
        Ok(plan)
    }

    /// Plan and carry out the reload to `new`; every machine's outcome, in the plan's order.
    /// `on_event` sees the machines' events and console lines meanwhile (the owner's echo);
    /// other events wait for the owner's loop. `cancel` (the owner is being stopped) ends the
    /// wait for booting machines: they are reported failed, and the owner stops them.
    pub(crate) fn apply_reload(
        &mut self,
        new: &ClusterPlan,
        force_restart: bool,
        restart_machines: &[String],
        cancel: &Cancel,
        on_event: &mut dyn FnMut(&OwnerEvent),
    ) -> Result<Vec<MachineOutcome>, ReloadError> {
        let mut facts = self.gather(new)?;
        let mut plan = plan_reload(
            &self.plan,
            &facts.recorded,
            &facts.stopped,
            new,
            &facts.launches,
            force_restart,
        );
        crate::reload::restart_named(&mut plan, restart_machines);
        let mut outcomes: Vec<MachineOutcome> =
            plan.iter().cloned().map(MachineOutcome::planned).collect();
        let of = |a: Action| -> Vec<String> {
            plan.iter()
                .filter(|p| p.action == a)
                .map(|p| p.machine.clone())
                .collect()
        };
        let (removes, restarts, creates, switches) = (
            of(Action::Remove),
            of(Action::Restart),
            of(Action::Create),
            of(Action::Switch),
        );
        let t0 = Instant::now();
        let cpaths = cluster_paths(&self.state_dir, &self.plan.name);
        let files = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ReloadError::Files { path, source }
        };
        let hosts = cpaths.dir.join("hosts");
        drydock_gc::write_atomic(&hosts, new.hosts.as_bytes()).map_err(files(&hosts))?;

        // 1. Stop what goes away or boots again, in parallel.
        let stopping: Vec<String> = removes.iter().chain(&restarts).cloned().collect();
        self.stop_machines(&stopping, on_event);
        let stopped_after = t0.elapsed();
        for m in &removes {
            set_outcome(&mut outcomes, m, Outcome::Done, stopped_after, None);
        }

        // The plan the cluster runs afterwards: the new one, but a machine whose switch fails
        // keeps its old system (fixed up below).
        let mut running = new.clone();

        // 2. The hubs: every VLAN of the new plan, with its ports.
        for &v in &running.vlans {
            let ports = vlan_ports(&running, &self.state_dir, v);
            match self.hubs.iter().find(|h| h.vlan() == v) {
                Some(h) => h.set_ports(ports),
                None => self.hubs.push(
                    crate::net::start_hub(v, &hub_socket(&cpaths, v), ports)
                        .map_err(|e| ReloadError::Cluster(Box::new(ClusterError::Hub(e))))?,
                ),
            }
        }
        // A hub no machine uses any more stops when dropped.
        self.hubs.retain(|h| running.vlans.contains(&h.vlan()));
        // The faults in force (`net`) survive the reload, on the new ports.
        for h in &self.hubs {
            h.set_faults(self.faults.for_hub(&running, &self.state_dir, h.vlan()));
        }

        // 3. Boot, and switch meanwhile.
        let booting: Vec<String> = restarts.iter().chain(&creates).cloned().collect();
        for name in &booting {
            let Some(m) = running.machine(name).cloned() else {
                continue;
            };
            let paths = VmPaths::in_state_dir(&self.state_dir, &m.vm_name);
            let log = paths.console_log();
            if log.exists() {
                let _ = std::fs::rename(&log, paths.dir.join("console.log.prev"));
            }
            let Some(launch) = facts.plans.remove(name) else {
                continue;
            };
            self.spawn_machine(&m, launch)
                .map_err(|e| ReloadError::Cluster(Box::new(e)))?;
        }
        let boot_started = Instant::now();
        let (state_dir, layout) = (self.state_dir.clone(), self.opts.layout.clone());
        let jobs: Vec<(String, String, LaunchRecord, LaunchRecord)> = switches
            .iter()
            .filter_map(|name| {
                let vm = running.machine(name)?.vm_name.clone();
                let old = facts.recorded.get(name)?.clone();
                let new = facts.launches.get(name)?.record.clone();
                Some((name.clone(), vm, old, new))
            })
            .collect();
        let all_vms: Vec<String> = running.machines.iter().map(|m| m.vm_name.clone()).collect();
        let deadline = Deadline::after(self.opts.ready_timeout + Duration::from_secs(60));
        let tx = self.tx.clone();
        let _interrupt = cancel.on_cancel(move || {
            let _ = tx.try_send(OwnerEvent::Interrupt);
        });
        let mut waiting: BTreeSet<String> = booting.iter().cloned().collect();
        let mut boot_results: Vec<(String, Outcome, Duration, Option<String>)> = Vec::new();
        let switched: Vec<(String, Duration, Switched)> = std::thread::scope(|s| {
            let handles: Vec<_> = jobs
                .iter()
                .map(|(name, vm, old, new)| {
                    let (state_dir, layout) = (&state_dir, &layout);
                    let others: Vec<String> =
                        all_vms.iter().filter(|v| *v != vm).cloned().collect();
                    let h = s.spawn(move || {
                        let t = Instant::now();
                        let r = switch(state_dir, layout, vm, old, new, &others);
                        (t.elapsed(), r)
                    });
                    (name.clone(), h)
                })
                .collect();
            while !waiting.is_empty() {
                // Blocks until an event, the cancel (an interrupt event) or the deadline.
                let ev = match self.next_event(Some(deadline)) {
                    _ if cancel.is_set() || deadline.expired() => None,
                    Some(ev) => Some(ev),
                    None => None,
                };
                let Some(ev) = ev else {
                    let why = match cancel.is_set() {
                        true => "interrupted: the cluster is being stopped",
                        false => "it did not become ready in time",
                    };
                    for m in std::mem::take(&mut waiting) {
                        boot_results.push((
                            m,
                            Outcome::Failed,
                            stopped_after + boot_started.elapsed(),
                            Some(why.into()),
                        ));
                    }
                    break;
                };
                let OwnerEvent::Machine { event, .. } = &ev else {
                    match ev {
                        ev @ OwnerEvent::Console { .. } => on_event(&ev),
                        OwnerEvent::Interrupt => {}
                        // A second request, edits: for the owner's loop, after this reload.
                        ev => self.deferred.push_back(ev),
                    }
                    continue;
                };
                let (m, result) = match event {
                    MachineEvent::Ready { machine, .. } => (machine, Ok(())),
                    MachineEvent::Failed { machine, error } => {
                        (machine, Err(drydock_vm::error_chain(&**error)))
                    }
                    MachineEvent::Stopped { machine } => {
                        (machine, Err("stopped before it became ready".to_string()))
                    }
                    // Only a restore's machines pause (never a reload's).
                    MachineEvent::Paused { .. } => {
                        on_event(&ev);
                        continue;
                    }
                };
                on_event(&ev);
                if waiting.remove(m) {
                    let outcome = if result.is_ok() {
                        Outcome::Done
                    } else {
                        Outcome::Failed
                    };
                    boot_results.push((
                        m.clone(),
                        outcome,
                        stopped_after + boot_started.elapsed(),
                        result.err(),
                    ));
                }
            }
            handles
                .into_iter()
                .map(|(name, h)| {
                    let (took, r) = h.join().unwrap_or_else(|_| {
                        (
                            Duration::ZERO,
                            Switched {
                                output: String::new(),
                                error: Some("the switch thread panicked".into()),
                            },
                        )
                    });
                    (name, took, r)
                })
                .collect()
        });
        for (m, outcome, took, error) in boot_results {
            set_outcome(&mut outcomes, &m, outcome, took, error);
        }
        for (name, took, r) in switched {
            if r.error.is_some() {
                // Still the old system: its machine plan stays the old one.
                if let (Some(old), Some(slot)) = (
                    self.plan.machine(&name).cloned(),
                    running.machines.iter_mut().find(|m| m.machine == name),
                ) {
                    *slot = old;
                }
            }
            if let Some(o) = outcomes.iter_mut().find(|o| o.planned.machine == name) {
                o.output = r.output;
            }
            let outcome = if r.error.is_some() {
                Outcome::Failed
            } else {
                Outcome::Done
            };
            set_outcome(&mut outcomes, &name, outcome, took, r.error);
        }
        self.plan = running;
        self.apply_faults();
        self.write_state(true)
            .map_err(|e| ReloadError::Cluster(Box::new(e)))?;
        Ok(outcomes)
    }

    /// Answer a request of a second `up` or `vm restart` (`plan` or `apply`), or a machine
    /// operation (`ops`). Returns whether it was an apply (the cluster may have changed). `cancel` and `on_event` as for
    /// [`Self::apply_reload`].
    pub(crate) fn serve_control(
        &mut self,
        call: ControlCall,
        cancel: &Cancel,
        on_event: &mut dyn FnMut(&OwnerEvent),
    ) -> bool {
        let ControlCall { stream, request } = call;
        let req = match request {
            Ok(req) => req,
            Err(e) => {
                crate::control::reply(&stream, Err((format!("bad request: {e}"), true)));
                return false;
            }
        };
        if req.op.on_machines() {
            let result = self.serve_op(&req, cancel, on_event);
            crate::control::reply(
                &stream,
                result
                    .map(|()| Vec::new())
                    .map_err(|e| (drydock_vm::error_chain(&e), e.is_bad_input())),
            );
            return false;
        }
        if req.op == ControlOp::Net {
            match req.net.map(|b| *b) {
                Some(crate::net::NetRequest::Capture { machines, vlan }) => {
                    // The reply line, then the pcap stream, go on this connection.
                    let started = stream
                        .try_clone()
                        .map_err(crate::net::NetError::Capture)
                        .and_then(|tap| self.start_capture(tap, &machines, vlan));
                    if let Err(e) = started {
                        crate::control::reply(
                            &stream,
                            Err((drydock_vm::error_chain(&e), e.is_bad_input())),
                        );
                    }
                }
                Some(net) => {
                    let r = self.serve_net(&net);
                    crate::control::reply_net(&stream, r);
                }
                None => crate::control::reply(&stream, Err(("no network request".into(), true))),
            }
            return false;
        }
        if req.op == ControlOp::Quit {
            self.quit_all(on_event);
            crate::control::reply(&stream, Ok(Vec::new()));
            return false;
        }
        if req.op == ControlOp::Snapshot {
            let result = self.snapshot(req.tag.as_deref().unwrap_or_default(), req.stop, on_event);
            crate::control::reply(
                &stream,
                result
                    .map(|_| Vec::new())
                    .map_err(|e| (drydock_vm::error_chain(&e), e.is_bad_input())),
            );
            return false;
        }
        let result = match req.op {
            ControlOp::Plan => self
                .plan_reload(&req.plan, req.restart, &req.restart_machines)
                .map(|p| p.into_iter().map(MachineOutcome::planned).collect()),
            _ => self.apply_reload(
                &req.plan,
                req.restart,
                &req.restart_machines,
                cancel,
                on_event,
            ),
        };
        crate::control::reply(
            &stream,
            result.map_err(|e| (drydock_vm::error_chain(&e), e.is_bad_input())),
        );
        req.op == ControlOp::Apply
    }
}

fn set_outcome(
    outcomes: &mut [MachineOutcome],
    machine: &str,
    outcome: Outcome,
    took: Duration,
    error: Option<String>,
) {
    if let Some(o) = outcomes.iter_mut().find(|o| o.planned.machine == machine) {
        o.outcome = outcome;
        o.seconds = took.as_secs_f64();
        o.error = error;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn share(allow: Option<&[&str]>) -> StoreShare {
        StoreShare {
            exe: PathBuf::from("/bin/drydock"),
            shared_dir: PathBuf::from("/nix/store"),
            allow: allow.map(|a| a.iter().map(|n| n.to_string()).collect()),
        }
    }

    #[test]
    fn a_guest_that_sees_the_whole_store_has_no_view_to_change() {
        let (a, b) = (share(Some(&["a-sys"])), share(Some(&["b-sys", "lib"])));
        assert_eq!(
            closure_views(Some(&a), Some(&b)).unwrap(),
            Some((
                vec!["a-sys".to_string()],
                vec!["b-sys".into(), "lib".into()]
            ))
        );
        // No share (a store that reaches the guest another way, e.g. over 9p), or a share of
        // the whole store: nothing to widen or narrow.
        let whole = share(None);
        for (o, n) in [
            (None, None),
            (Some(&whole), Some(&whole)),
            (None, Some(&whole)),
        ] {
            assert_eq!(closure_views(o, n).unwrap(), None);
        }
        // A closure on one side only: not a switch.
        for (o, n) in [(Some(&a), None), (None, Some(&b)), (Some(&whole), Some(&b))] {
            let e = closure_views(o, n).unwrap_err();
            assert!(e.contains("a restart does that"), "{e}");
        }
    }

    fn restarted() -> ClusterError {
        ClusterError::Restarted { vm: "c.m".into() }
    }

    fn done(status: i32, out: &str) -> ExecOutput {
        ExecOutput {
            stdout: out.as_bytes().to_vec(),
            stderr: Vec::new(),
            status,
        }
    }

    /// `run_switch` against a guest whose calls answer `answers` in turn: the result and the
    /// calls' texts and timeouts.
    fn switch_with(
        answers: Vec<Result<ExecOutput, ClusterError>>,
    ) -> (Result<ExecOutput, String>, Vec<(String, Duration)>) {
        let mut answers = answers.into_iter();
        let mut calls = Vec::new();
        let r = run_switch(
            "c.m",
            "/nix/store/abc-sys",
            "0123abcd",
            Deadline::after(SWITCH_DEADLINE),
            &mut |text, timeout| {
                calls.push((text.to_string(), timeout));
                answers.next().expect("no more calls expected")
            },
        );
        (r, calls)
    }

    #[test]
    fn a_switch_is_started_once_and_waited_for_again_after_a_backdoor_restart() {
        // Undisturbed: one call starts the switch and brings its status.
        let (r, calls) = switch_with(vec![Ok(done(0, "activating"))]);
        assert_eq!(r.unwrap().status, 0);
        assert_eq!(calls.len(), 1);
        assert!(calls[0].0.contains("systemd-run") && calls[0].0.contains("setsid"));
        assert!(calls[0].1 <= SWITCH_DEADLINE + WAIT_MARGIN);
        assert!(calls[0].1 > SWITCH_DEADLINE - Duration::from_secs(5));
        // The backdoor restarted under the call: the next call waits for the same switch (its
        // folder) and starts nothing; a failing switch's status is the switch's.
        let (r, calls) = switch_with(vec![Err(restarted()), Ok(done(4, "broken"))]);
        assert_eq!(r.unwrap().status, 4);
        assert_eq!(calls.len(), 2);
        let again = &calls[1].0;
        assert!(again.contains("'/tmp/drydock-switch-0123abcd'"), "{again}");
        assert!(
            !again.contains("systemd-run") && !again.contains("setsid") && !again.contains("mkdir"),
            "{again}"
        );
        assert!(calls[1].1 <= calls[0].1);
        // Another error is the switch's failure at once.
        let (r, calls) = switch_with(vec![Err(ClusterError::NoExec("c.m".into()))]);
        assert!(r.unwrap_err().contains("no backdoor service"));
        assert_eq!(calls.len(), 1);
    }

    #[test]
    fn a_guest_that_keeps_restarting_its_backdoor_cannot_hold_a_switch() {
        let answers = (0..10).map(|_| Err(restarted())).collect();
        let (r, calls) = switch_with(answers);
        assert_eq!(calls.len(), 1 + MAX_REATTACH as usize);
        let e = r.unwrap_err();
        assert!(
            e.contains("restarted during the call") && e.contains("restarted 4 times"),
            "{e}"
        );
    }

    #[test]
    fn a_switch_shows_at_most_the_end_of_its_output() {
        let short = ExecOutput {
            stdout: b"activating\n".to_vec(),
            stderr: b"warning\n".to_vec(),
            status: 0,
        };
        assert_eq!(switch_output(&short), "activating\nwarning\n");
        let mut long = vec![b'x'; 3 * MAX_SWITCH_OUTPUT];
        long.extend_from_slice(b"the end\n");
        let shown = switch_output(&ExecOutput {
            stdout: long,
            stderr: Vec::new(),
            status: 1,
        });
        assert!(shown.len() < MAX_SWITCH_OUTPUT + 100, "{}", shown.len());
        assert!(
            shown.starts_with("[only the last 64 KiB"),
            "{}",
            &shown[..80]
        );
        assert!(shown.ends_with("xthe end\n"));
    }
}
