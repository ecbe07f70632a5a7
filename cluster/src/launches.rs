//! Each machine's launch, as drydock-vm's one launch sequence sees it: the request a machine's
//! plan makes (its system, settings, NICs on the cluster's hubs, backdoor, hosts table), and
//! every machine's launch resolved and checked before anything of the cluster starts, so an `up`
//! with one bad machine starts no hub and no QEMU and says what is wrong, typed.

use std::path::Path;

use drydock_vm::{Boot, LaunchKind, LaunchPlan, LaunchRequest, Share, StoreMode};
use drydock_vm::{FwCfgFile, GuestDevices, Nic, VmPaths};

use crate::compose::{ClusterPlan, HOSTS_FW_CFG, MachinePlan};
use crate::state::{
    ClusterError, ClusterLaunch, MachineError, cluster_paths, hub_socket, nic_socket,
};

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
        devices: GuestDevices {
            user_net: false,
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
        profile: m.settings.profile,
        shared_dir: Some(shared_dir(cpaths)),
    }
}

/// The folder every machine of a cluster sees as the share `shared` (nixos-test machines):
/// `STATE/clusters/NAME/shared`.
pub(crate) fn shared_dir(cpaths: &VmPaths) -> std::path::PathBuf {
    cpaths.dir.join("shared")
}

/// The launch of machine `m` of the cluster `name`, resolved (its name may be in use: a hot
/// reload resolves the machines it keeps, too).
pub(crate) fn resolve_machine(
    m: &MachinePlan,
    name: &str,
    opts: &ClusterLaunch,
) -> Result<LaunchPlan, drydock_vm::LauncherError> {
    let cpaths = cluster_paths(&opts.state_dir, name);
    let req = machine_request(m, opts, &cpaths, &cpaths.dir.join("hosts"));
    opts.launcher().resolve(&req)
}

/// Every machine's launch of `plan`, resolved and checked as a new launch (its name free), in
/// the plan's order; the first machine that cannot launch is the error. Nothing starts.
pub(crate) fn plan_launches(
    plan: &ClusterPlan,
    opts: &ClusterLaunch,
) -> Result<Vec<LaunchPlan>, ClusterError> {
    let cpaths = cluster_paths(&opts.state_dir, &plan.name);
    let hosts = cpaths.dir.join("hosts");
    let launcher = opts.launcher();
    plan.machines
        .iter()
        .map(|m| {
            let req = machine_request(m, opts, &cpaths, &hosts);
            launcher.plan(LaunchKind::New(req)).map_err(|e| {
                let system = m.settings.system.target();
                ClusterError::machine(&m.machine, MachineError::planning(system, e))
            })
        })
        .collect()
}

/// Every machine's launch from the cluster snapshot `snap`: each machine's recorded launch,
/// loading its saved state, left paused (the owner resumes them all at once), in the plan's
/// order; the first that cannot be planned is the error. Nothing starts.
pub(crate) fn restore_launches(
    snap: &crate::snapshot::ClusterSnapshot,
    opts: &ClusterLaunch,
) -> Result<Vec<LaunchPlan>, ClusterError> {
    let launcher = opts.launcher();
    snap.plan
        .machines
        .iter()
        .map(|m| {
            let dir =
                crate::snapshot::machine_dir(&opts.state_dir, &snap.cluster, &snap.tag, &m.machine);
            let planned = drydock_vm::read_snapshot_dir(&dir)
                .map_err(drydock_vm::LauncherError::from)
                .and_then(|(_, record)| {
                    launcher.plan(LaunchKind::RestoreFrom {
                        record: Box::new(record),
                        dir,
                        resume: false,
                    })
                });
            planned.map_err(|e| {
                let system = m.settings.system.target();
                ClusterError::machine(&m.machine, MachineError::planning(system, e))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use super::*;
    use crate::compose::{Composition, MachineSettings, SystemRef, plan_cluster};

    fn plan(machines: &[&str]) -> ClusterPlan {
        let composition = Composition {
            file: PathBuf::from("/c/drydock.nix"),
            machines: machines
                .iter()
                .map(|n| {
                    let settings = MachineSettings {
                        system: SystemRef::Path {
                            path: format!("/nix/store/{:0>32}-{n}", 0),
                        },
                        memory_mib: 256,
                        cores: 1,
                        disk_mib: 1024,
                        vlans: vec![1],
                        profile: Default::default(),
                    };
                    (n.to_string(), settings)
                })
                .collect(),
            test_script: Default::default(),
        };
        plan_cluster("c", &composition).unwrap()
    }

    fn opts(dir: &Path, qemu: &str) -> ClusterLaunch {
        ClusterLaunch {
            layout: drydock_gc::StoreLayout::chroot(dir.join("store")),
            state_dir: dir.join("state"),
            exe: PathBuf::from("/bin/drydock"),
            accel: drydock_vm::AccelChoice::Tcg,
            qemu: Some(PathBuf::from(qemu)),
            ready_timeout: Duration::from_secs(10),
            argv: Vec::new(),
            run: None,
            log_limit: drydock_vm::DEFAULT_LOG_LIMIT,
        }
    }

    /// A state file saying that the VM `vm` runs (as this process).
    fn running(state_dir: &Path, vm: &str) {
        let paths = VmPaths::in_state_dir(state_dir, vm);
        std::fs::create_dir_all(&paths.dir).unwrap();
        let me = std::process::id();
        let ticks = drydock_vm::process_start_ticks(me);
        let state = drydock_vm::VmState {
            name: vm.into(),
            supervisor_pid: me,
            qemu_pid: me,
            server_pid: None,
            accel: "tcg".into(),
            memory_mib: 256,
            started: 0,
            cgroup: None,
            phase: drydock_vm::Phase::Running,
            qemu_start_ticks: ticks,
            supervisor_start_ticks: ticks,
            server_start_ticks: None,
        };
        drydock_vm::write_json(&paths.state_file(), &state).unwrap();
    }

    #[test]
    fn a_machine_that_cannot_launch_is_a_typed_error_before_anything_starts() {
        let dir = tempfile::tempdir().unwrap();
        let p = plan(&["a", "b"]);
        let system = p.machines[0].settings.system.target().to_string();
        let me = std::process::id();
        // (QEMU, a machine whose VM runs) → the error's text, whether it is bad input.
        let cases = [
            (
                "/nonexistent/qemu",
                None,
                format!(
                    "machine a: system {system}: QEMU not found: /nonexistent/qemu does not exist"
                ),
                true,
            ),
            (
                "/bin/sh",
                Some("c.a"),
                format!("machine a: a VM named c.a is already running (QEMU pid {me})"),
                true,
            ),
        ];
        for (qemu, live, says, bad_input) in cases {
            let o = opts(dir.path(), qemu);
            if let Some(vm) = live {
                running(&o.state_dir, vm);
            }
            let cancel = drydock_gc::Cancel::new();
            let e =
                crate::run::up(&p, &o, crate::run::Boot::Fresh, &cancel, &mut |_| {}).unwrap_err();
            assert_eq!(drydock_vm::error_chain(&e), says);
            assert_eq!(e.is_bad_input(), bad_input, "{says}");
            assert!(
                matches!(e, ClusterError::Machine { .. }),
                "{says}: the machine's error keeps its type: {e:?}"
            );
            // Nothing of the cluster was made: no folder, hosts table or hub socket.
            assert!(!cluster_paths(&o.state_dir, "c").dir.exists(), "{says}");
            // The same check before a detached owner starts.
            let e = plan_launches(&p, &o).unwrap_err();
            assert_eq!(drydock_vm::error_chain(&e), says);
        }
    }

    #[test]
    fn a_machine_error_says_whether_the_input_is_at_fault() {
        let io = || std::io::Error::from(std::io::ErrorKind::PermissionDenied);
        let cases: Vec<(MachineError, bool, &str)> = vec![
            (
                MachineError::Running {
                    vm: "c.a".into(),
                    qemu_pid: 7,
                },
                true,
                "a VM named c.a is already running (QEMU pid 7)",
            ),
            (
                MachineError::Listen {
                    path: "/s/backdoor.sock".into(),
                    source: io(),
                },
                false,
                "cannot listen on /s/backdoor.sock: permission denied",
            ),
            (
                MachineError::NotReady {
                    error: crate::backdoor::BackdoorError::Io(io()),
                    console: "/v/console.log".into(),
                },
                false,
                "the backdoor connection failed: permission denied (see /v/console.log)",
            ),
            (
                MachineError::StoppedBeforeReady,
                false,
                "stopped before it became ready",
            ),
            (
                MachineError::Lost("its store server (pid 9) died".into()),
                false,
                "its store server (pid 9) died",
            ),
            // Once its VM started: how QEMU ended, what it and the guest said last.
            (
                MachineError::Ended {
                    error: Box::new(MachineError::QemuExited {
                        console: "/v/console.log".into(),
                    }),
                    qemu_ended: Some("signal: 9 (SIGKILL)".into()),
                    qemu_said: "qemu: terminating on signal 9".into(),
                    console_tail: vec!["booting".into(), "\\e[2J".into()],
                },
                false,
                "QEMU exited before the guest was ready (see /v/console.log); QEMU had ended \
                 (signal: 9 (SIGKILL)), saying: qemu: terminating on signal 9; the last lines of \
                 its console:\n  booting\n  \\e[2J",
            ),
            (
                MachineError::Ended {
                    error: Box::new(MachineError::NoBackdoor),
                    qemu_ended: None,
                    qemu_said: String::new(),
                    console_tail: Vec::new(),
                },
                false,
                "QEMU did not connect the backdoor in time",
            ),
        ];
        for (e, bad_input, says) in cases {
            assert_eq!(drydock_vm::error_chain(&e), says);
            assert_eq!(e.is_bad_input(), bad_input, "{says}");
            let e = ClusterError::machine("a", e);
            assert_eq!(drydock_vm::error_chain(&e), format!("machine a: {says}"));
            assert_eq!(e.is_bad_input(), bad_input, "{says}");
        }
    }
}
