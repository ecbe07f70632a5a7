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
//!    `NEW/bin/switch-to-configuration test` runs through the backdoor, its output on the guest's
//!    console too (so it streams to `up` as `MACHINE │ line`); on success the view shrinks to the
//!    new closure, the launch record names the new system and the run's GC pin moves to it. On
//!    failure the machine keeps running and keeps its record and pin.
//!
//! A second `up` reaches the owner over `STATE/clusters/NAME/.../control.sock`: one JSON request
//! line, one JSON reply line, per connection ([`request`]). Every wait has a deadline.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use drydock_gc::{Cancel, Deadline};

use crate::compose::ClusterPlan;
use crate::control::ControlOp;
use crate::events::{ControlCall, MachineEvent, OwnerEvent};
use crate::exec::exec_remote;
use crate::hub::Hub;
use crate::launches::resolve_machine;
use crate::reload::{Action, MachineOutcome, NewLaunch, Outcome, PlannedAction, plan_reload};
use crate::run::{RunningCluster, vlan_ports};
use crate::state::{ClusterError, cluster_paths, hub_socket, machine_failure};
use drydock_vm::VmPaths;
use drydock_vm::{LaunchPlan, LaunchRecord};

/// How long `switch-to-configuration` may run in a guest.
const SWITCH_DEADLINE: Duration = Duration::from_secs(300);
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
    let allow = |r: &LaunchRecord| r.share.as_ref().and_then(|s| s.allow.clone());
    let (Some(old_allow), Some(new_allow), Some(top)) = (allow(old), allow(new), &new.toplevel)
    else {
        return failed("no closure view to change".into(), String::new());
    };
    let both = union(&old_allow, &new_allow);
    if let Err(e) = drydock_vm::update_closure(&paths.fs_socket(), &both, CLOSURE_DEADLINE) {
        return failed(
            format!("showing the new closure: {}", drydock_vm::error_chain(&e)),
            String::new(),
        );
    }
    tracing::info!(vm, names = both.len(), "the guest sees the new closure");
    // The output goes to the caller and to the console (the machine's log, streamed by `up`);
    // the status survives the pipe through a file.
    let cmd = format!(
        "s=/tmp/drydock-switch.status; echo 1 > $s; {{ {top}/bin/switch-to-configuration test; echo $? > $s; }} 2>&1 | tee /dev/console; exit \"$(cat $s)\""
    );
    let out = match exec_remote(vm, &paths, &cmd, SWITCH_DEADLINE, None) {
        Ok(o) => o,
        Err(e) => return failed(drydock_vm::error_chain(&e), String::new()),
    };
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status != 0 {
        return failed(
            format!(
                "switch-to-configuration test exited with status {}",
                out.status
            ),
            output,
        );
    }
    if let Err(e) = drydock_vm::update_closure(&paths.fs_socket(), &new_allow, CLOSURE_DEADLINE) {
        tracing::warn!(
            "{vm}: narrowing the closure view: {}",
            drydock_vm::error_chain(&e)
        );
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
                    Hub::start(v, &hub_socket(&cpaths, v), ports)
                        .map_err(|e| ReloadError::Cluster(Box::new(ClusterError::Hub(e))))?,
                ),
            }
        }
        // A hub no machine uses any more stops when dropped.
        self.hubs.retain(|h| running.vlans.contains(&h.vlan()));

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
        self.write_state(true)
            .map_err(|e| ReloadError::Cluster(Box::new(e)))?;
        Ok(outcomes)
    }

    /// Answer a request of a second `up` or `vm restart` (`plan` or `apply`). Returns whether
    /// it was an apply (the cluster may have changed). `cancel` and `on_event` as for
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
        let result = match req.op {
            ControlOp::Plan => self
                .plan_reload(&req.plan, req.restart, &req.restart_machines)
                .map(|p| p.into_iter().map(MachineOutcome::planned).collect()),
            ControlOp::Apply => self.apply_reload(
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
