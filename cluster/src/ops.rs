//! Operations on single machines of a running cluster, carried out by its owner when asked over
//! the control socket (`ControlOp::Start`, `Stop`, `Crash`, `Block`, `Unblock`; `drydock test`'s
//! `machine.start()`, `shutdown()`, `crash()`, `block()`, `unblock()`):
//!
//! - **start**: every named machine that is not running boots (in parallel, each with a thread
//!   of its own as `up` starts them, on the cluster's hubs, from its launch in the cluster's
//!   current plan, resolved again); answered once each is ready, or with why one is not.
//!   A machine that runs is left alone. Its previous console log is kept as `console.log.prev`,
//!   A fault on its links (a block, a partition, a shape: `net`) stays in force (its NIC
//!   sockets keep their paths).
//! - **stop**: the machine's thread stops its VM in order (powerdown, quit, SIGTERM, SIGKILL);
//!   **crash**: at once (QMP quit, no powerdown). Either way the owner then stays up with no
//!   machine running (see `RunningCluster::stay`).
//! - **block** / **unblock**: every hub the machine is on drops its frames and the copies for
//!   it, or forwards them again (its VLAN links down or up; the guest sees no link change).

use std::collections::BTreeSet;
use std::time::Duration;

use drydock_gc::{Cancel, Deadline};

use crate::control::{ControlOp, ControlRequest};
use crate::events::{MachineEvent, OwnerEvent};
use crate::launches::resolve_machine;
use crate::run::RunningCluster;
use drydock_vm::VmPaths;

/// Why a machine operation could not be carried out.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpError {
    #[error("the cluster {cluster} has no machine {machine} (it has {})", has.join(", "))]
    NoMachine {
        cluster: String,
        machine: String,
        has: Vec<String>,
    },
    #[error("{0} acts on one machine; give exactly one")]
    OneMachine(&'static str),
    #[error("machine {machine}: its launch")]
    Resolve {
        machine: String,
        #[source]
        source: Box<drydock_vm::LauncherError>,
    },
    #[error("machine {machine}: starting its thread")]
    Spawn {
        machine: String,
        #[source]
        source: Box<crate::state::ClusterError>,
    },
    #[error("machine {machine} did not start: {why}")]
    NotStarted { machine: String, why: String },
}

impl OpError {
    pub(crate) fn is_bad_input(&self) -> bool {
        match self {
            Self::NoMachine { .. } | Self::OneMachine(_) => true,
            Self::Resolve { source, .. } => source.is_bad_input(),
            Self::Spawn { .. } | Self::NotStarted { .. } => false,
        }
    }
}

impl ControlOp {
    fn name(self) -> &'static str {
        match self {
            Self::Plan => "plan",
            Self::Apply => "apply",
            Self::Start => "start",
            Self::Stop => "stop",
            Self::Crash => "crash",
            Self::Block => "block",
            Self::Unblock => "unblock",
            Self::Snapshot => "snapshot",
            Self::Quit => "quit",
            Self::Net => "net",
        }
    }
}

impl RunningCluster {
    /// Carry out the machine operation `req` (see the module's doc). `cancel` (the owner is being
    /// stopped) ends a start's wait; `on_event` sees the machines' events and console lines
    /// meanwhile, other events wait for the owner's loop.
    pub(crate) fn serve_op(
        &mut self,
        req: &ControlRequest,
        cancel: &Cancel,
        on_event: &mut dyn FnMut(&OwnerEvent),
    ) -> Result<(), OpError> {
        for m in &req.machines {
            if self.plan.machine(m).is_none() {
                return Err(OpError::NoMachine {
                    cluster: self.plan.name.clone(),
                    machine: m.clone(),
                    has: self.plan.machine_names(),
                });
            }
        }
        let one = || match req.machines.as_slice() {
            [m] => Ok(m.clone()),
            _ => Err(OpError::OneMachine(req.op.name())),
        };
        match req.op {
            ControlOp::Plan
            | ControlOp::Apply
            | ControlOp::Snapshot
            | ControlOp::Quit
            | ControlOp::Net => Ok(()),
            ControlOp::Start => self.start_machines(&req.machines, cancel, on_event),
            ControlOp::Stop | ControlOp::Crash => {
                let m = one()?;
                self.stop_one(&m, req.op == ControlOp::Crash, on_event);
                Ok(())
            }
            ControlOp::Block | ControlOp::Unblock => {
                let m = one()?;
                self.set_block(&m, None, req.op == ControlOp::Block)
                    .map_err(|e| OpError::NotStarted {
                        machine: m.clone(),
                        why: e.to_string(),
                    })
            }
        }
    }

    /// Boot the machines `names` that are not running, in parallel; once each is ready, or the
    /// first failure (the others still boot).
    fn start_machines(
        &mut self,
        names: &[String],
        cancel: &Cancel,
        on_event: &mut dyn FnMut(&OwnerEvent),
    ) -> Result<(), OpError> {
        let booting: BTreeSet<String> = names
            .iter()
            .filter(|m| !self.machines.contains_key(*m))
            .cloned()
            .collect();
        // Every launch is resolved before any machine boots.
        let mut launches = Vec::new();
        for name in &booting {
            let Some(m) = self.plan.machine(name).cloned() else {
                continue;
            };
            let launch =
                resolve_machine(&m, &self.plan.name, &self.opts).map_err(|e| OpError::Resolve {
                    machine: name.clone(),
                    source: Box::new(e),
                })?;
            launches.push((m, launch));
        }
        for (m, launch) in launches {
            let paths = VmPaths::in_state_dir(&self.state_dir, &m.vm_name);
            let log = paths.console_log();
            if log.exists() {
                let _ = std::fs::rename(&log, paths.dir.join("console.log.prev"));
            }
            self.spawn_machine(&m, launch).map_err(|e| OpError::Spawn {
                machine: m.machine.clone(),
                source: Box::new(e),
            })?;
        }
        let tx = self.tx.clone();
        let _interrupt = cancel.on_cancel(move || {
            let _ = tx.try_send(OwnerEvent::Interrupt);
        });
        let deadline = Deadline::after(self.opts.ready_timeout + Duration::from_secs(60));
        let mut waiting = booting;
        let mut failed = None;
        while !waiting.is_empty() {
            let ev = match self.next_event(Some(deadline)) {
                _ if cancel.is_set() => None,
                ev => ev,
            };
            let Some(ev) = ev else {
                let why = match cancel.is_set() {
                    true => "interrupted: the cluster is being stopped",
                    false => "it did not become ready in time",
                };
                let machine = waiting.into_iter().next().unwrap_or_default();
                return Err(OpError::NotStarted {
                    machine,
                    why: why.into(),
                });
            };
            let OwnerEvent::Machine { event, .. } = &ev else {
                match ev {
                    ev @ OwnerEvent::Console { .. } => on_event(&ev),
                    OwnerEvent::Interrupt => {}
                    ev => self.deferred.push_back(ev),
                }
                continue;
            };
            let (m, why) = match event {
                MachineEvent::Ready { machine, .. } => (machine.clone(), None),
                MachineEvent::Failed { machine, error } => {
                    (machine.clone(), Some(drydock_vm::error_chain(&**error)))
                }
                MachineEvent::Stopped { machine } => (
                    machine.clone(),
                    Some("it stopped before it became ready".to_string()),
                ),
                // Only a restore's machines pause (never a started one).
                MachineEvent::Paused { .. } => {
                    on_event(&ev);
                    continue;
                }
            };
            on_event(&ev);
            if waiting.remove(&m) {
                if let (Some(why), None) = (why, &failed) {
                    failed = Some(OpError::NotStarted { machine: m, why });
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Stop the machine `name` (if it runs): in order, or at once when `crash`.
    fn stop_one(&mut self, name: &str, crash: bool, on_event: &mut dyn FnMut(&OwnerEvent)) {
        // A machine a test stopped does not end the cluster with it.
        self.stay = true;
        let Some(t) = self.machines.get(name) else {
            return;
        };
        if crash {
            t.crash.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        self.stop_machines(&[name.to_string()], on_event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_operations_travel_without_a_plan() {
        // What `drydock test` sends, and what the owner reads.
        let req: ControlRequest =
            serde_json::from_str(r#"{"op": "start", "machines": ["a", "b"]}"#).unwrap();
        assert_eq!(req.op, ControlOp::Start);
        assert_eq!(req.machines, ["a", "b"]);
        assert!(req.op.on_machines() && req.plan.machines.is_empty());
        for (text, op) in [
            ("stop", ControlOp::Stop),
            ("crash", ControlOp::Crash),
            ("block", ControlOp::Block),
            ("unblock", ControlOp::Unblock),
        ] {
            let req: ControlRequest =
                serde_json::from_str(&format!(r#"{{"op": "{text}", "machines": ["a"]}}"#)).unwrap();
            assert_eq!((req.op, req.op.name()), (op, text));
        }
        // A reload's request is as before: no `machines` on the wire.
        let reload = ControlRequest {
            op: ControlOp::Plan,
            plan: Default::default(),
            restart: false,
            restart_machines: Vec::new(),
            machines: Vec::new(),
            tag: None,
            stop: false,
            net: None,
        };
        let v = serde_json::to_value(&reload).unwrap();
        assert!(v.get("machines").is_none(), "{v}");
        assert!(!reload.op.on_machines());
    }

    #[test]
    fn operation_errors_say_whose_fault() {
        let e = OpError::NoMachine {
            cluster: "c".into(),
            machine: "sever".into(),
            has: vec!["agent".into(), "server".into()],
        };
        assert!(e.is_bad_input());
        assert_eq!(
            e.to_string(),
            "the cluster c has no machine sever (it has agent, server)"
        );
        assert!(OpError::OneMachine("crash").is_bad_input());
        let e = OpError::NotStarted {
            machine: "a".into(),
            why: "it did not become ready in time".into(),
        };
        assert!(!e.is_bad_input());
    }
}
