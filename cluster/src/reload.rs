//! The pure layer of hot reload: what a second `up` on a running cluster does to each machine.
//! The running cluster's plan, each running machine's recorded launch, the new plan and each new
//! machine's resolved launch (with whether its system has `bin/switch-to-configuration`) become
//! one [`PlannedAction`] per machine, each with why: `keep` (nothing changed), `switch` (only the
//! system changed: same kernel, initrd and kernel-params, switchable, store over virtio-fs),
//! `restart` (anything else, or `--restart` instead of a switch), `create`, `remove`. No I/O
//! happens here; `apply` gathers the facts and carries the plan out. The report types (what
//! `up` prints, as text and as `--json`) live here too.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::compose::{ClusterPlan, MachinePlan};
use drydock_vm::LaunchRecord;
use drydock_vm::StoreAttachment;

/// What happens to one machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Keep,
    Switch,
    Restart,
    Create,
    Remove,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Keep => "keep",
            Self::Switch => "switch",
            Self::Restart => "restart",
            Self::Create => "create",
            Self::Remove => "remove",
        }
    }
}

/// One machine's line of the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedAction {
    pub machine: String,
    pub action: Action,
    pub why: String,
    /// The system it runs now (absent for `create`).
    pub from: Option<String>,
    /// The system it runs afterwards (absent for `remove`).
    pub to: Option<String>,
}

/// What is known of a machine of the new plan before anything changes.
#[derive(Debug, Clone)]
pub struct NewLaunch {
    /// Its launch as it would be recorded now.
    pub record: LaunchRecord,
    /// Its system has `bin/switch-to-configuration`.
    pub switchable: bool,
}

/// The kernel command line without `init=...` and `regInfo=...` (which name the system itself
/// and its closure's registration: a switch changes both and needs no reboot).
pub fn params_without_init(cmdline: &str) -> String {
    cmdline
        .split_whitespace()
        .filter(|w| !w.starts_with("init=") && !w.starts_with("regInfo="))
        .collect::<Vec<_>>()
        .join(" ")
}

fn settings_changes(old: &MachinePlan, new: &MachinePlan) -> Vec<String> {
    let (a, b) = (&old.settings, &new.settings);
    let mut out = Vec::new();
    if a.profile != b.profile {
        out.push(format!(
            "profile {} → {}",
            a.profile.as_str(),
            b.profile.as_str()
        ));
    }
    if a.memory_mib != b.memory_mib {
        out.push(format!("memorySize {} → {}", a.memory_mib, b.memory_mib));
    }
    if a.cores != b.cores {
        out.push(format!("cores {} → {}", a.cores, b.cores));
    }
    if a.disk_mib != b.disk_mib {
        out.push(format!("diskSize {} → {}", a.disk_mib, b.disk_mib));
    }
    if a.vlans != b.vlans {
        out.push(format!("vlans {:?} → {:?}", a.vlans, b.vlans));
    }
    if old.number != new.number {
        out.push(format!(
            "its number {} → {} (its addresses change)",
            old.number, new.number
        ));
    }
    if old.append != new.append {
        out.push("its kernel command line additions changed".into());
    }
    out
}

/// What differs between two launches of a machine besides the system itself (its toplevel,
/// `init=` and closure).
fn launch_changes(old: &LaunchRecord, new: &LaunchRecord) -> Vec<String> {
    let (a, b) = (&old.spec, &new.spec);
    let mut out = Vec::new();
    if a.kernel != b.kernel {
        out.push("the kernel changed".to_string());
    }
    if a.initrd != b.initrd {
        out.push("the initrd changed".into());
    }
    if params_without_init(&a.cmdline) != params_without_init(&b.cmdline) {
        out.push(format!(
            "kernel-params changed ({:?} → {:?})",
            params_without_init(&a.cmdline),
            params_without_init(&b.cmdline)
        ));
    }
    if a.memory_mib != b.memory_mib || a.cpus != b.cpus || a.disk != b.disk {
        out.push("its memory, CPUs or disk changed".into());
    }
    if a.accel != b.accel || a.qemu != b.qemu {
        out.push("its accelerator or QEMU changed".into());
    }
    if a.devices != b.devices {
        out.push("its NICs or devices changed".into());
    }
    if a.shares != b.shares {
        out.push("its shared folders changed (the fstab's xchg or shared)".into());
    }
    if a.store != b.store
        || old.share.as_ref().map(|s| (&s.exe, &s.shared_dir))
            != new.share.as_ref().map(|s| (&s.exe, &s.shared_dir))
    {
        out.push("how it reaches the store changed".into());
    }
    out
}

/// Plan the reload of the running cluster `old` (its machines' recorded launches in
/// `recorded`; `stopped` names those whose VM is no longer running, with why if it failed, e.g.
/// its store server died) to `new` (each machine's new launch in `launches`). `force_restart` (`--restart`) turns every `switch` into a
/// `restart`. One action per machine of either plan, by name.
pub fn plan_reload(
    old: &ClusterPlan,
    recorded: &BTreeMap<String, LaunchRecord>,
    stopped: &BTreeMap<String, Option<String>>,
    new: &ClusterPlan,
    launches: &BTreeMap<String, NewLaunch>,
    force_restart: bool,
) -> Vec<PlannedAction> {
    let names: BTreeSet<&str> = old
        .machines
        .iter()
        .chain(&new.machines)
        .map(|m| m.machine.as_str())
        .collect();
    names
        .into_iter()
        .map(|name| {
            let (o, n) = (old.machine(name), new.machine(name));
            let from = o.map(|m| m.settings.system.target().to_string());
            let to = n.map(|m| m.settings.system.target().to_string());
            let (action, why) = match (o, n) {
                (None, _) => (Action::Create, "added to the composition".to_string()),
                (Some(_), None) => (Action::Remove, "removed from the composition".to_string()),
                (Some(_), Some(_)) if stopped.contains_key(name) => (
                    Action::Restart,
                    match stopped.get(name).cloned().flatten() {
                        Some(why) => format!("it failed: {why}"),
                        None => "it is not running (its VM stopped)".to_string(),
                    },
                ),
                (Some(o), Some(n)) => {
                    decide(o, n, recorded.get(name), launches.get(name), force_restart)
                }
            };
            let why = if action == Action::Keep && old.hosts != new.hosts {
                format!("{why} (it keeps the hosts table it booted with)")
            } else {
                why
            };
            PlannedAction {
                machine: name.to_string(),
                action,
                why,
                from,
                to,
            }
        })
        .collect()
}

/// `vm restart` of machines of an up cluster: each named machine that the plan keeps or
/// switches restarts instead (a machine the plan creates, removes or restarts anyway is left so).
pub fn restart_named(plan: &mut [PlannedAction], machines: &[String]) {
    for p in plan.iter_mut() {
        if machines.contains(&p.machine) && matches!(p.action, Action::Keep | Action::Switch) {
            p.action = Action::Restart;
            p.why = "a restart was asked for (`vm restart`)".into();
        }
    }
}

fn decide(
    o: &MachinePlan,
    n: &MachinePlan,
    recorded: Option<&LaunchRecord>,
    new: Option<&NewLaunch>,
    force_restart: bool,
) -> (Action, String) {
    let restart = |why: String| (Action::Restart, why);
    let changes = settings_changes(o, n);
    if !changes.is_empty() {
        return restart(changes.join(", "));
    }
    let Some(rec) = recorded else {
        return restart("its launch record is missing".into());
    };
    let Some(new) = new else {
        return restart("its new launch is unknown".into());
    };
    let changes = launch_changes(rec, &new.record);
    if !changes.is_empty() {
        return restart(changes.join(", "));
    }
    if rec.toplevel == new.record.toplevel {
        return (Action::Keep, "unchanged".into());
    }
    // The new system's paths must reach the running guest: through the store server's closure
    // view (widened by the switch), or because the guest sees the whole store (9p).
    let sees_new_paths = match rec.spec.store {
        StoreAttachment::VirtioFs { .. } => rec.share.is_some(),
        StoreAttachment::NineP { .. } => true,
        StoreAttachment::Image { .. } | StoreAttachment::None => false,
    };
    if !sees_new_paths {
        return restart(
            "its store is an image: it cannot see the new system's paths without a reboot".into(),
        );
    }
    if !new.switchable {
        return restart("the new system has no bin/switch-to-configuration".into());
    }
    if force_restart {
        return restart("--restart (it could switch: only the system changed)".into());
    }
    (
        Action::Switch,
        "only the system changed (same kernel, initrd and kernel-params)".into(),
    )
}

/// How a machine's action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Not carried out (`--dry-run`, or nothing to do).
    Planned,
    Done,
    Failed,
}

/// One machine's action and how it went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineOutcome {
    #[serde(flatten)]
    pub planned: PlannedAction,
    pub outcome: Outcome,
    /// How long the action took.
    pub seconds: f64,
    /// What `switch-to-configuration` printed (stdout, then stderr), for a switch.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub output: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl MachineOutcome {
    pub fn planned(p: PlannedAction) -> Self {
        Self {
            planned: p,
            outcome: Outcome::Planned,
            seconds: 0.0,
            output: String::new(),
            error: None,
        }
    }
}

/// Every machine's outcome, in the plan's order, and whether they all went well.
pub fn all_done(outcomes: &[MachineOutcome]) -> bool {
    outcomes.iter().all(|o| o.outcome != Outcome::Failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compose::{Composition, MachineSettings, SystemRef, plan_cluster};
    use drydock_vm::StoreShare;
    use drydock_vm::{Accel, GuestDevices, VmPaths, VmSpec};
    use std::path::{Path, PathBuf};

    fn settings(system: &str) -> MachineSettings {
        MachineSettings {
            system: SystemRef::Path {
                path: format!("/nix/store/{system}"),
            },
            memory_mib: 256,
            cores: 1,
            disk_mib: 1024,
            vlans: vec![1],
            profile: Default::default(),
        }
    }

    fn cluster(machines: &[(&str, MachineSettings)]) -> ClusterPlan {
        let c = Composition {
            file: PathBuf::from("/p/c/drydock.nix"),
            machines: machines
                .iter()
                .map(|(n, s)| (n.to_string(), s.clone()))
                .collect(),
            test_script: Default::default(),
        };
        plan_cluster("c", &c).unwrap()
    }

    /// A launch of `m` as `resolve_launch` would record it, with `kernel` and `params`.
    fn record(m: &MachinePlan, kernel: &str, params: &str, image: bool) -> LaunchRecord {
        let top = m.settings.system.target().to_string();
        let paths = VmPaths::new(
            PathBuf::from(format!("/s/vms/{}", m.vm_name)),
            Path::new("/run"),
            "x",
        );
        LaunchRecord {
            spec: VmSpec {
                name: m.vm_name.clone(),
                qemu: PathBuf::from("/bin/qemu"),
                kernel: PathBuf::from(kernel),
                initrd: Some(PathBuf::from("/nix/store/i-initrd")),
                cmdline: format!("{params} init={top}/init {}", m.append),
                memory_mib: m.settings.memory_mib,
                cpus: m.settings.cores,
                accel: Accel::Tcg,
                store: if image {
                    StoreAttachment::Image {
                        path: PathBuf::from("/s/images/x.img"),
                    }
                } else {
                    StoreAttachment::VirtioFs {
                        socket: paths.fs_socket(),
                    }
                },
                disk: None,
                devices: GuestDevices::default(),
                paths,
                shares: Vec::new(),
            },
            share: (!image).then(|| StoreShare {
                exe: PathBuf::from("/bin/drydock"),
                shared_dir: PathBuf::from("/nix/store"),
                allow: Some(vec![top.trim_start_matches("/nix/store/").to_string()]),
            }),
            toplevel: Some(top),
            accel_reason: String::new(),
            run_id: Some(1),
            shared_run: false,
            closure_key: None,
            store: None,
            profile: Default::default(),
            reginfo: None,
        }
    }

    /// The plan's (machine, action, a word of why) for one change of a one-machine cluster
    /// `old → new`, with launches made by `launch` (kernel, params, image, switchable).
    #[test]
    fn each_change_gets_its_action_and_why() {
        let k = "/nix/store/k-kernel";
        let p = "console=ttyS0 quiet";
        type Launch = (&'static str, &'static str, bool, bool);
        let same: Launch = (k, p, false, true);
        let mut more_mem = settings("b-sys");
        more_mem.memory_mib = 512;
        let mut vlan2 = settings("a-sys");
        vlan2.vlans = vec![1, 2];
        #[allow(clippy::type_complexity)]
        let cases: Vec<(
            &str,
            MachineSettings,
            MachineSettings,
            Launch,
            Launch,
            bool,
            Action,
            &str,
        )> = vec![
            (
                "nothing changed",
                settings("a-sys"),
                settings("a-sys"),
                same,
                same,
                false,
                Action::Keep,
                "unchanged",
            ),
            (
                "--restart leaves a keep",
                settings("a-sys"),
                settings("a-sys"),
                same,
                same,
                true,
                Action::Keep,
                "unchanged",
            ),
            (
                "only the system",
                settings("a-sys"),
                settings("b-sys"),
                same,
                same,
                false,
                Action::Switch,
                "only the system changed",
            ),
            (
                "--restart",
                settings("a-sys"),
                settings("b-sys"),
                same,
                same,
                true,
                Action::Restart,
                "--restart",
            ),
            (
                "kernel",
                settings("a-sys"),
                settings("b-sys"),
                same,
                ("/nix/store/k2-kernel", p, false, true),
                false,
                Action::Restart,
                "the kernel changed",
            ),
            (
                "kernel-params",
                settings("a-sys"),
                settings("b-sys"),
                same,
                (k, "console=ttyS0 quiet panic=1", false, true),
                false,
                Action::Restart,
                "kernel-params changed",
            ),
            (
                "not switchable",
                settings("a-sys"),
                settings("b-sys"),
                same,
                (k, p, false, false),
                false,
                Action::Restart,
                "no bin/switch-to-configuration",
            ),
            (
                "image store",
                settings("a-sys"),
                settings("b-sys"),
                (k, p, true, true),
                (k, p, true, true),
                false,
                Action::Restart,
                "image",
            ),
            (
                "memory and system",
                settings("a-sys"),
                more_mem,
                same,
                same,
                false,
                Action::Restart,
                "memorySize 256 → 512",
            ),
            (
                "vlans",
                settings("a-sys"),
                vlan2,
                same,
                same,
                false,
                Action::Restart,
                "vlans [1] → [1, 2]",
            ),
        ];
        for (name, a, b, la, lb, force, action, says) in cases {
            let old = cluster(&[("m", a)]);
            let new = cluster(&[("m", b)]);
            let rec = record(&old.machines[0], la.0, la.1, la.2);
            let mut nl = record(&new.machines[0], lb.0, lb.1, lb.2);
            if lb.2 {
                nl.spec.store = rec.spec.store.clone();
            }
            let recorded = BTreeMap::from([("m".to_string(), rec)]);
            let launches = BTreeMap::from([(
                "m".to_string(),
                NewLaunch {
                    record: nl,
                    switchable: lb.3,
                },
            )]);
            let plan = plan_reload(&old, &recorded, &BTreeMap::new(), &new, &launches, force);
            assert_eq!(plan.len(), 1, "{name}");
            assert_eq!(plan[0].action, action, "{name}: {}", plan[0].why);
            assert!(
                plan[0].why.contains(says),
                "{name}: {:?} should say {says:?}",
                plan[0].why
            );
        }
    }

    #[test]
    fn machines_added_and_removed_and_the_others_kept() {
        let k = "/nix/store/k-kernel";
        let p = "console=ttyS0";
        let old = cluster(&[("a", settings("a-sys")), ("b", settings("b-sys"))]);
        let new = cluster(&[("a", settings("a-sys")), ("c", settings("c-sys"))]);
        let recorded: BTreeMap<_, _> = old
            .machines
            .iter()
            .map(|m| (m.machine.clone(), record(m, k, p, false)))
            .collect();
        let launches: BTreeMap<_, _> = new
            .machines
            .iter()
            .map(|m| {
                let record = record(m, k, p, false);
                (
                    m.machine.clone(),
                    NewLaunch {
                        record,
                        switchable: true,
                    },
                )
            })
            .collect();
        let none = BTreeMap::new();
        let plan = plan_reload(&old, &recorded, &none, &new, &launches, false);
        let got: Vec<(&str, Action, Option<&str>, Option<&str>)> = plan
            .iter()
            .map(|p| {
                (
                    p.machine.as_str(),
                    p.action,
                    p.from.as_deref(),
                    p.to.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    "a",
                    Action::Keep,
                    Some("/nix/store/a-sys"),
                    Some("/nix/store/a-sys")
                ),
                ("b", Action::Remove, Some("/nix/store/b-sys"), None),
                ("c", Action::Create, None, Some("/nix/store/c-sys")),
            ]
        );
        // The hosts table changed (b went, c came): a keeps the one it booted with, and says so.
        assert!(plan[0].why.contains("hosts table"), "{}", plan[0].why);

        // Without a launch record a machine cannot be compared: it restarts.
        let plan = plan_reload(&old, &BTreeMap::new(), &none, &old, &launches, false);
        assert_eq!(plan[0].action, Action::Restart);
        assert!(plan[0].why.contains("launch record"), "{}", plan[0].why);
        // A machine whose VM stopped (it crashed, or was stopped by hand) boots again.
        let stopped = BTreeMap::from([("a".to_string(), None)]);
        let plan = plan_reload(&old, &recorded, &stopped, &new, &launches, false);
        assert_eq!(plan[0].action, Action::Restart);
        assert!(plan[0].why.contains("not running"), "{}", plan[0].why);
        // One that failed while it ran (its store server died) says why.
        let why = "its store server (pid 7) died (signal: 9 (SIGKILL))".to_string();
        let failed = BTreeMap::from([("a".to_string(), Some(why.clone()))]);
        let plan = plan_reload(&old, &recorded, &failed, &new, &launches, false);
        assert_eq!(plan[0].action, Action::Restart);
        assert_eq!(plan[0].why, format!("it failed: {why}"));
    }

    #[test]
    fn init_is_not_a_kernel_param() {
        assert_eq!(
            params_without_init("quiet init=/nix/store/a/init drydock.machine=m"),
            "quiet drydock.machine=m"
        );
    }

    #[test]
    fn a_failed_outcome_fails_the_reload() {
        let p = PlannedAction {
            machine: "m".into(),
            action: Action::Switch,
            why: String::new(),
            from: None,
            to: None,
        };
        let mut o = MachineOutcome::planned(p);
        assert!(all_done(std::slice::from_ref(&o)));
        o.outcome = Outcome::Failed;
        assert!(!all_done(&[o]));
    }

    #[test]
    fn a_named_restart_turns_keep_and_switch_into_restart_only() {
        let p = |m: &str, action| PlannedAction {
            machine: m.into(),
            action,
            why: "w".into(),
            from: None,
            to: None,
        };
        let mut plan = vec![
            p("a", Action::Keep),
            p("b", Action::Switch),
            p("c", Action::Keep),
            p("d", Action::Remove),
            p("e", Action::Create),
        ];
        restart_named(&mut plan, &["a".into(), "b".into(), "d".into(), "e".into()]);
        let got: Vec<(&str, Action)> = plan
            .iter()
            .map(|p| (p.machine.as_str(), p.action))
            .collect();
        assert_eq!(
            got,
            [
                ("a", Action::Restart),
                ("b", Action::Restart),
                ("c", Action::Keep),
                ("d", Action::Remove),
                ("e", Action::Create)
            ]
        );
        assert!(plan[0].why.contains("vm restart"));
        assert_eq!(plan[2].why, "w");
    }
}
