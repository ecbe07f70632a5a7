//! Placing a VM in a cgroup of its own with a memory limit (guest memory plus QEMU's
//! overhead), where the host lets drydock create one; the doctor's `cgroup.placement` check asks
//! the same questions.

use std::path::{Path, PathBuf};

use crate::host::Host;

/// Room for QEMU itself beyond the guest's memory.
const OVERHEAD_MIB: u64 = 256;

/// The cgroup layout of the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Hierarchy {
    V1,
    V2,
    Hybrid,
    None,
}

pub(crate) fn hierarchy(host: &Host) -> Hierarchy {
    if host.exists("/sys/fs/cgroup/cgroup.controllers") {
        Hierarchy::V2
    } else if host.exists("/sys/fs/cgroup/unified/cgroup.controllers") {
        Hierarchy::Hybrid
    } else if host.exists("/sys/fs/cgroup/memory") {
        Hierarchy::V1
    } else {
        Hierarchy::None
    }
}

/// Where a child cgroup with a memory limit would go, and the file that sets the limit.
pub(crate) fn memory_parent(host: &Host, h: Hierarchy) -> Option<(PathBuf, &'static str)> {
    let cg = host.read("/proc/self/cgroup").ok()?;
    let find = |want: &dyn Fn(&str, &str) -> bool| {
        cg.lines().find_map(|l| {
            let mut p = l.splitn(3, ':');
            let (id, ctrl, path) = (p.next()?, p.next()?, p.next()?);
            want(id, ctrl).then(|| path.to_string())
        })
    };
    match h {
        Hierarchy::V1 | Hierarchy::Hybrid => {
            let path = find(&|_, c| c.split(',').any(|x| x == "memory"))?;
            Some((
                host.path(format!(
                    "/sys/fs/cgroup/memory{}",
                    path.trim_end_matches('/')
                )),
                "memory.limit_in_bytes",
            ))
        }
        Hierarchy::V2 => {
            let path = find(&|id, c| id == "0" && c.is_empty())?;
            Some((
                host.path(format!("/sys/fs/cgroup{}", path.trim_end_matches('/'))),
                "memory.max",
            ))
        }
        Hierarchy::None => None,
    }
}

/// A VM's own cgroup; removed (after QEMU exited) by [`VmCgroup::remove`].
#[derive(Debug)]
pub struct VmCgroup {
    path: PathBuf,
}

impl VmCgroup {
    /// Create `drydock-vm-NAME` under this process's memory cgroup, limit it to the guest's
    /// memory plus overhead, and move `pid` into it.
    pub fn create(name: &str, memory_mib: u32, pid: u32) -> Result<Self, String> {
        let host = Host::system();
        let h = hierarchy(&host);
        let (parent, limit_file) = memory_parent(&host, h)
            .ok_or_else(|| "no memory cgroup for this process".to_string())?;
        let path = parent.join(format!("drydock-vm-{name}"));
        if path.exists() {
            // Left by a VM of the same name that died without cleaning up: reuse it if empty.
            let _ = std::fs::remove_dir(&path);
        }
        std::fs::create_dir(&path).map_err(|e| format!("mkdir {}: {e}", path.display()))?;
        let cg = Self { path };
        let limit = (u64::from(memory_mib) + OVERHEAD_MIB) << 20;
        let set = |file: &str, value: String| -> Result<(), String> {
            std::fs::write(cg.path.join(file), value)
                .map_err(|e| format!("write {}: {e}", cg.path.join(file).display()))
        };
        if let Err(e) =
            set(limit_file, limit.to_string()).and_then(|_| set("cgroup.procs", pid.to_string()))
        {
            cg.remove();
            return Err(e);
        }
        tracing::debug!(cgroup = %cg.path.display(), limit, "VM placed in its own cgroup");
        Ok(cg)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the cgroup of the VM `name` goes when this process starts it (under this
    /// process's memory cgroup), if the host has one.
    pub fn path_for(name: &str) -> Option<PathBuf> {
        let host = Host::system();
        let h = hierarchy(&host);
        let (parent, _) = memory_parent(&host, h)?;
        Some(parent.join(format!("drydock-vm-{name}")))
    }

    /// Remove the cgroup (it must be empty: call after QEMU exited).
    pub fn remove(&self) {
        if let Err(e) = std::fs::remove_dir(&self.path) {
            tracing::debug!("removing {}: {e}", self.path.display());
        }
    }
}
