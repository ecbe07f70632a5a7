//! cgroups for VM placement: which hierarchy this host runs (v1, v2, hybrid), and whether
//! drydock can really create a child cgroup and give it a memory limit (tried, then removed).

use std::path::Path;

use super::{Finding, Status};
use crate::cgroup::{Hierarchy, hierarchy, memory_parent};
use crate::host::Host;

/// Try to create `parent/NAME` with a 64 MiB limit, then remove it.
fn try_child(parent: &Path, limit_file: &str) -> Result<(), String> {
    let child = parent.join(format!("drydock-doctor-{}", std::process::id()));
    std::fs::create_dir(&child).map_err(|e| format!("mkdir {}: {e}", child.display()))?;
    let result = std::fs::write(child.join(limit_file), "67108864")
        .map_err(|e| format!("write {}: {e}", child.join(limit_file).display()));
    let _ = std::fs::remove_file(child.join(limit_file)); // only a plain dir in fixture trees
    let removed = std::fs::remove_dir(&child);
    result?;
    removed.map_err(|e| format!("rmdir {}: {e}", child.display()))
}

pub(crate) fn check(host: &Host) -> Finding {
    let h = hierarchy(host);
    let name = match h {
        Hierarchy::V1 => "cgroup v1",
        Hierarchy::V2 => "cgroup v2",
        Hierarchy::Hybrid => "hybrid cgroups (v1 controllers, v2 unified)",
        Hierarchy::None => {
            return Finding::new(
                "cgroup.placement",
                Status::Warn,
                "no cgroup file system found",
            )
            .detail("/sys/fs/cgroup has neither cgroup.controllers nor a memory controller")
            .fix("mount cgroups (systemd does); VMs will run without per-VM memory limits");
        }
    };
    let Some((parent, limit_file)) = memory_parent(host, h) else {
        return Finding::new(
            "cgroup.placement",
            Status::Warn,
            format!("{name}: this process's memory cgroup is unknown"),
        )
        .detail("/proc/self/cgroup names no memory cgroup")
        .fix("VMs will run without per-VM memory limits");
    };
    if h == Hierarchy::V2 {
        let ctl =
            std::fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap_or_default();
        if !ctl.split_whitespace().any(|c| c == "memory") {
            return Finding::new("cgroup.placement", Status::Warn, format!("{name}: the memory controller is not delegated to {}", parent.display()))
                .detail(format!("cgroup.subtree_control = {:?}", ctl.trim()))
                .fix("run drydock in a delegated scope, e.g. `systemd-run --user --scope -p Delegate=yes drydock ...`; VMs still run, without memory limits");
        }
    }
    match try_child(&parent, limit_file) {
        Ok(()) => Finding::new(
            "cgroup.placement",
            Status::Pass,
            format!("{name}: drydock can create a VM cgroup with a memory limit"),
        )
        .detail(format!("created and removed a child of {} with {limit_file}", parent.display())),
        Err(why) => Finding::new(
            "cgroup.placement",
            Status::Warn,
            format!("{name}: drydock cannot create a VM cgroup; VMs will run without memory limits"),
        )
        .detail(why)
        .fix("run drydock as root, or in a delegated cgroup (`systemd-run --user --scope -p Delegate=yes`)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::fixture::tree;

    #[test]
    fn v1_child_in_memory_controller() {
        let d = tree(&[
            ("proc/self/cgroup", "5:devices:/\n4:memory:/user/me\n0::/\n"),
            ("sys/fs/cgroup/memory/user/me/memory.limit_in_bytes", "max"),
        ]);
        let host = Host::at(d.path());
        assert_eq!(hierarchy(&host), Hierarchy::V1);
        let f = check(&host);
        assert_eq!(f.status, Status::Pass, "{f:?}");
        assert!(f.summary.starts_with("cgroup v1"));
        // The probe cleaned up after itself.
        let left: Vec<_> = std::fs::read_dir(d.path().join("sys/fs/cgroup/memory/user/me"))
            .unwrap()
            .collect();
        assert_eq!(left.len(), 1);
    }

    #[test]
    fn hybrid_and_v2_detection() {
        let d = tree(&[
            ("proc/self/cgroup", "4:memory:/\n0::/\n"),
            ("sys/fs/cgroup/unified/cgroup.controllers", ""),
            ("sys/fs/cgroup/memory/memory.limit_in_bytes", "max"),
        ]);
        assert_eq!(hierarchy(&Host::at(d.path())), Hierarchy::Hybrid);
        let d = tree(&[
            ("proc/self/cgroup", "0::/user.slice/me\n"),
            ("sys/fs/cgroup/cgroup.controllers", "cpu memory"),
            ("sys/fs/cgroup/user.slice/me/cgroup.subtree_control", "cpu"),
        ]);
        let host = Host::at(d.path());
        assert_eq!(hierarchy(&host), Hierarchy::V2);
        let f = check(&host);
        assert_eq!(f.status, Status::Warn);
        assert!(f.summary.contains("not delegated"), "{f:?}");
    }

    #[test]
    fn no_cgroups() {
        let d = tree(&[("proc/self/cgroup", "")]);
        assert_eq!(check(&Host::at(d.path())).status, Status::Warn);
    }
}
