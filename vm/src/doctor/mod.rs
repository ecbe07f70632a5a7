//! `drydock doctor`: a preflight for running VMs that finds the real cause of the usual
//! failures (KVM permissions for this user *and* for Nix's build users, device cgroups, a KVM
//! that cannot run a normal kernel, missing QEMU features, a full disk) and says how to fix it.
//! Its verdict ([`verdict`]) answers first what a user asks (can VMs run here, can Nix build VM
//! tests here), and alone decides the exit code.
//!
//! Every check reads the system through [`Host`], which takes a root directory, so unit tests run
//! the checks against fixture trees. Checks that act on the kernel (opening `/dev/kvm`, running
//! a guest, creating a cgroup) are real only on the real system.

mod access;
mod boot;
mod builders;
mod cgroup;
mod disk;
mod kvm;
mod machines;
mod nix;
mod qemu;
mod verdict;

use std::path::PathBuf;

use drydock_gc::{NixConf, NixConfError, NixConfSources};
use serde::Serialize;

pub use crate::host::Host;
pub use boot::BootProbe;
pub use verdict::{Answer, Asked, BuilderAnswer, NixAnswer, Verdict, VmsAnswer, verdict};

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    Warn,
    Fail,
}

/// One finding: what was checked, how it came out, why, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Stable identifier, e.g. `kvm.access`.
    pub id: String,
    pub status: Status,
    /// One line.
    pub summary: String,
    /// The evidence the verdict rests on.
    pub detail: String,
    /// What to do about it (absent when there is nothing to do).
    pub fix: Option<String>,
    /// `qemu` only (when QEMU answered): whether it can snapshot VMs with virtio-fs devices
    /// (QEMU ≥ 8.2 migrates vhost-user-fs); absent from every other finding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub virtiofs_snapshots: Option<bool>,
}

impl Finding {
    pub(crate) fn new(id: &str, status: Status, summary: impl Into<String>) -> Self {
        Self {
            id: id.to_string(),
            status,
            summary: summary.into(),
            detail: String::new(),
            fix: None,
            virtiofs_snapshots: None,
        }
    }

    pub(crate) fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }

    pub(crate) fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }

    pub(crate) fn virtiofs_snapshots(mut self, can: bool) -> Self {
        self.virtiofs_snapshots = Some(can);
        self
    }

    pub(crate) fn maybe_fix(mut self, fix: Option<impl Into<String>>) -> Self {
        self.fix = fix.map(Into::into);
        self
    }
}

/// What to check and where.
#[derive(Debug, Clone)]
pub struct DoctorOptions {
    /// The physical directory of the Nix store (`ROOT/nix/store` with `--store`).
    pub store_dir: PathBuf,
    /// drydock's state directory.
    pub state_dir: PathBuf,
    /// `--store ROOT`, passed on to Nix for `--nix-probe`.
    pub store_root: Option<PathBuf>,
    /// Where Nix's configuration comes from.
    pub nix_conf: NixConfSources,
    /// Build a derivation that opens `/dev/kvm` inside the Nix sandbox.
    pub nix_probe: bool,
    /// With `nix_probe`: build it on each remote builder too, through Nix's remote building.
    pub builder_probe: bool,
    /// The QEMU binary to check (default: `qemu-system-x86_64` on `PATH`).
    pub qemu: Option<PathBuf>,
    /// Boot this kernel under KVM with a deadline (`--boot-probe`).
    pub boot_probe: Option<BootProbe>,
}

/// Why the doctor could not do its job (as opposed to a failing check, which is a finding).
#[derive(Debug, thiserror::Error)]
pub enum DoctorError {
    /// Nix's configuration cannot be read (a file exists but is unreadable, an `include`d file
    /// is missing).
    #[error(transparent)]
    NixConf(#[from] NixConfError),
}

impl DoctorError {
    /// Whether the error is the user's input (exit 2) rather than a failure of the doctor.
    pub fn is_bad_input(&self) -> bool {
        match self {
            Self::NixConf(e) => e.is_bad_input(),
        }
    }
}

/// Run every check against `host` and return the findings in a stable order.
pub fn run_checks(host: &Host, opts: &DoctorOptions) -> Result<Vec<Finding>, DoctorError> {
    // Read the configuration first: an unreadable nix.conf is bad input, reported before any
    // check runs.
    let conf = NixConf::load(host.root(), &opts.nix_conf)?;
    // QEMU is probed in the background: it is the only check that runs other programs.
    let qemu_host = host.clone();
    let qemu_bin = opts.qemu.clone();
    let qemu_cache = opts.state_dir.join("cache");
    let qemu =
        std::thread::spawn(move || qemu::check(&qemu_host, qemu_bin.as_deref(), Some(&qemu_cache)));

    let mut out = Vec::new();
    let kvm = kvm::check_all(host);
    out.extend(kvm.findings.iter().cloned());
    out.extend(nix::check(host, &conf, &kvm, opts.store_root.is_some()));
    out.extend(builders::check(
        host,
        &conf,
        &opts.nix_conf,
        &kvm,
        opts.store_root.as_deref(),
        opts.nix_probe && opts.builder_probe,
    ));
    if let Some(bp) = &opts.boot_probe {
        if kvm.opened {
            out.push(boot::probe(bp, &std::env::temp_dir()));
        } else {
            out.push(
                Finding::new(
                    "kvm.boot",
                    Status::Fail,
                    "boot probe not run: /dev/kvm cannot be opened",
                )
                .fix("see kvm.access"),
            );
        }
    }
    if opts.nix_probe {
        out.push(nix::probe(host, opts.store_root.as_deref(), &conf));
    }
    out.push(cgroup::check(host));
    match qemu.join() {
        Ok(findings) => out.extend(findings),
        Err(_) => out.push(Finding::new("qemu", Status::Fail, "QEMU check panicked")),
    }
    out.extend(disk::check(host, &opts.store_dir, &opts.state_dir));
    Ok(out)
}

/// Whether VMs should use KVM here: `Ok` when every KVM check passes, including the
/// guest-execution probe and no PVM-only module; otherwise the first finding that says why not.
pub fn kvm_usable(host: &Host) -> Result<(), Finding> {
    match verdict::kvm_blocker(&kvm::check_all(host).findings) {
        None => Ok(()),
        Some(why) => Err(why),
    }
}

/// Human-readable byte counts for messages.
pub(crate) fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Fixture trees for the checks' unit tests.
#[cfg(test)]
pub(crate) mod fixture {
    /// A temporary root holding `files` (path relative to the root, contents).
    pub(crate) fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        for (p, c) in files {
            let p = d.path().join(p);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(p, c).expect("write");
        }
        d
    }

    /// A Debian-like base: a user `alice` (1000) not in `kvm` (994), nixbld build users.
    pub(crate) const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\nnixbld1:x:30001:30000::/var/empty:/sbin/nologin\nnixbld2:x:30002:30000::/var/empty:/sbin/nologin\n";
    pub(crate) const GROUP: &str =
        "root:x:0:\nalice:x:1000:\nkvm:x:994:\nnixbld:x:30000:nixbld1,nixbld2\n";
    pub(crate) const ALICE_STATUS: &str = "Name:\tdrydock\nUid:\t1000\t1000\t1000\t1000\nGid:\t1000\t1000\t1000\t1000\nGroups:\t1000 \n";
    pub(crate) const ROOT_STATUS: &str =
        "Name:\tdrydock\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t0 \n";

    pub(crate) fn is_root() -> bool {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| crate::host::parse_status(&s))
            .is_some_and(|c| c.euid == 0)
    }

    /// Create a character device node (needs root; tests that call this say so).
    pub(crate) fn mknod_char(path: &std::path::Path, major: u32, minor: u32, mode: u32) {
        crate::sys::fs::mknod_char(path, major, minor, mode)
            .unwrap_or_else(|e| panic!("mknod {}: {e}", path.display()));
    }
}
