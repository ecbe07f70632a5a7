//! The KVM checks: CPU virtualisation, modules (including `kvm_pvm` and what it means), the
//! `/dev/kvm` node, whether this user can really open it and why not, the device cgroup, the
//! API version, `KVM_CREATE_VM`, and a guest that runs a few real-mode instructions to `HLT`.

use std::io;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::access::{Denial, mode_string, rw_access};
use super::{Finding, Status};
use crate::host::{Creds, FileInfo, FileKind, Host};
use crate::sys::kvm::{ExecOutcome, run_real_mode};

pub(crate) const KVM_PATH: &str = "/dev/kvm";
const KVM_MAJOR: u32 = 10;
const KVM_MINOR: u32 = 232;
const EXEC_DEADLINE: Duration = Duration::from_secs(3);

/// `mov dx, 0x3f8; mov al, 'K'; out dx, al; mov al, 'V'; out dx, al; hlt`
const PROBE_CODE: &[u8] = &[0xba, 0xf8, 0x03, 0xb0, b'K', 0xee, 0xb0, b'V', 0xee, 0xf4];

/// What the KVM checks found, for the checks that build on them (Nix, accel choice).
#[derive(Debug, Clone)]
pub(crate) struct KvmReport {
    pub findings: Vec<Finding>,
    /// `stat` of `/dev/kvm`, if it exists.
    pub device: Option<FileInfo>,
    /// This process opened `/dev/kvm` read-write.
    pub opened: bool,
}

/// Which KVM modules are loaded (from `/sys/module`, and `/proc/modules` where it exists).
pub(crate) fn loaded_modules(host: &Host) -> Vec<String> {
    let mut found: Vec<String> = Vec::new();
    let candidates = ["kvm", "kvm_intel", "kvm_amd", "kvm_pvm", "kvm_hv"];
    let sys_modules = host.read_dir_names("/sys/module").unwrap_or_default();
    let proc_modules = host.read("/proc/modules").unwrap_or_default();
    for m in candidates {
        let in_proc = proc_modules
            .lines()
            .any(|l| l.split_whitespace().next() == Some(m));
        if in_proc || sys_modules.iter().any(|s| s == m) {
            found.push(m.to_string());
        }
    }
    found
}

pub(crate) fn check_all(host: &Host) -> KvmReport {
    let modules = loaded_modules(host);
    let pvm = modules.iter().any(|m| m == "kvm_pvm");
    let mut findings = vec![check_cpu(host, pvm), check_modules(&modules)];
    let device = host.file_info(KVM_PATH).ok();
    findings.push(check_device(device.as_ref(), &modules));
    let open = device.as_ref().map(|_| host.open_rw(KVM_PATH));
    let creds = host.creds().ok();
    let access = check_access(host, device.as_ref(), open.as_ref(), creds.as_ref());
    findings.push(access);
    findings.push(check_device_cgroup(host, open.as_ref()));
    let opened = matches!(open, Some(Ok(_)));
    match open {
        Some(Ok(file)) => findings.extend(check_api(file, pvm)),
        _ => findings.push(
            Finding::new("kvm.api", Status::Warn, "KVM API not probed: /dev/kvm could not be opened")
                .detail("the API version, KVM_CREATE_VM and the guest-execution probe need an open /dev/kvm"),
        ),
    }
    KvmReport {
        findings,
        device,
        opened,
    }
}

fn check_cpu(host: &Host, pvm: bool) -> Finding {
    let cpuinfo = host.read("/proc/cpuinfo").unwrap_or_default();
    let flags: Vec<&str> = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, f)| f.split_whitespace().collect())
        .unwrap_or_default();
    let has = |f: &str| flags.contains(&f);
    let nested = ["kvm_intel", "kvm_amd"]
        .iter()
        .filter_map(|m| {
            let v = host
                .read(format!("/sys/module/{m}/parameters/nested"))
                .ok()?;
            Some(format!("{m}.nested={}", v.trim()))
        })
        .collect::<Vec<_>>()
        .join(", ");
    let nested = if nested.is_empty() {
        String::new()
    } else {
        format!("; {nested}")
    };
    let hv = if has("hypervisor") {
        "; running under a hypervisor"
    } else {
        ""
    };
    if has("vmx") || has("svm") {
        let which = if has("vmx") {
            "Intel VT-x (vmx)"
        } else {
            "AMD-V (svm)"
        };
        Finding::new("cpu.virt", Status::Pass, format!("CPU has {which}")).detail(format!(
            "cpu flags include {}{hv}{nested}",
            if has("vmx") { "vmx" } else { "svm" }
        ))
    } else if pvm {
        Finding::new(
            "cpu.virt",
            Status::Warn,
            "no VT-x/AMD-V exposed; KVM here is paravirtual (kvm_pvm)",
        )
        .detail(format!("cpu flags lack vmx and svm{hv}{nested}"))
        .fix("nothing to do for TCG; for hardware KVM ask the host for nested virtualisation (kvm_intel nested=1 / kvm_amd nested=1 on the outer host)")
    } else if has("hypervisor") {
        Finding::new(
            "cpu.virt",
            Status::Fail,
            "no VT-x/AMD-V: this is a VM without nested virtualisation",
        )
        .detail(format!("cpu flags lack vmx and svm{hv}{nested}"))
        .fix("enable nested virtualisation on the outer host (e.g. `options kvm_intel nested=1`, and expose the CPU's vmx/svm to this VM), or run VMs with --accel tcg")
    } else {
        Finding::new(
            "cpu.virt",
            Status::Fail,
            "CPU virtualisation is not available",
        )
        .detail(format!("cpu flags lack vmx and svm{nested}"))
        .fix("enable Intel VT-x / AMD-V (SVM) in the firmware setup, or run VMs with --accel tcg")
    }
}

fn check_modules(modules: &[String]) -> Finding {
    let list = if modules.is_empty() {
        "none".to_string()
    } else {
        modules.join(", ")
    };
    if modules.iter().any(|m| m == "kvm_pvm") {
        return Finding::new(
            "kvm.modules",
            Status::Warn,
            "kvm_pvm loaded: this is a PVM host; only PVM-enabled guest kernels run under KVM",
        )
        .detail(format!(
            "loaded: {list}. kvm_pvm provides KVM without hardware virtualisation; a standard distribution or NixOS kernel hangs early under it"
        ))
        .fix("run VMs with --accel tcg (drydock's `auto` does when the probes fail), or boot a PVM-enabled guest kernel");
    }
    if modules.iter().any(|m| m == "kvm_intel" || m == "kvm_amd") {
        return Finding::new(
            "kvm.modules",
            Status::Pass,
            format!("KVM modules loaded: {list}"),
        );
    }
    if modules.iter().any(|m| m == "kvm") {
        return Finding::new("kvm.modules", Status::Fail, "kvm is loaded but no vendor module (kvm_intel/kvm_amd)")
            .detail(format!("loaded: {list}"))
            .fix("modprobe kvm_intel (Intel) or modprobe kvm_amd (AMD); if that fails, check `dmesg` for 'disabled by bios'");
    }
    Finding::new("kvm.modules", Status::Fail, "no KVM module is loaded")
        .detail("none of kvm, kvm_intel, kvm_amd, kvm_pvm is in /sys/module or /proc/modules")
        .fix("modprobe kvm_intel (Intel) or modprobe kvm_amd (AMD), or run VMs with --accel tcg")
}

fn check_device(info: Option<&FileInfo>, modules: &[String]) -> Finding {
    let Some(info) = info else {
        let fix = if modules.is_empty() {
            "load a KVM module (modprobe kvm_intel / kvm_amd); in a container pass the device (`--device /dev/kvm`)"
        } else {
            "create the node: `mknod /dev/kvm c 10 232` (udev normally does); in a container pass `--device /dev/kvm`"
        };
        return Finding::new("kvm.device", Status::Fail, "/dev/kvm does not exist")
            .detail(format!(
                "KVM modules loaded: {}",
                if modules.is_empty() {
                    "none".into()
                } else {
                    modules.join(", ")
                }
            ))
            .fix(fix);
    };
    if info.kind != FileKind::CharDevice {
        return Finding::new(
            "kvm.device",
            Status::Fail,
            "/dev/kvm is not a character device",
        )
        .detail(format!("found {:?}", info.kind))
        .fix("remove it and recreate the node: `rm /dev/kvm && mknod /dev/kvm c 10 232`");
    }
    if (info.major, info.minor) != (KVM_MAJOR, KVM_MINOR) {
        return Finding::new(
            "kvm.device",
            Status::Fail,
            format!("/dev/kvm is device {}:{}, not 10:232", info.major, info.minor),
        )
        .detail("the KVM misc device is character 10:232")
        .fix("recreate the node: `rm /dev/kvm && mknod /dev/kvm c 10 232` (and find what created the wrong one)");
    }
    Finding::new(
        "kvm.device",
        Status::Pass,
        "/dev/kvm is character device 10:232",
    )
    .detail(format!(
        "{} uid {} gid {}",
        mode_string(info),
        info.uid,
        info.gid
    ))
}

fn name_of_user(host: &Host, uid: u32) -> String {
    host.users()
        .into_iter()
        .find(|u| u.uid == uid)
        .map(|u| u.name)
        .unwrap_or_else(|| format!("uid {uid}"))
}

fn name_of_group(host: &Host, gid: u32) -> String {
    host.groups()
        .into_iter()
        .find(|g| g.gid == gid)
        .map(|g| g.name)
        .unwrap_or_else(|| format!("gid {gid}"))
}

/// "crw------- root:root (mode 0600)"
pub(crate) fn describe_device(host: &Host, info: &FileInfo) -> String {
    format!(
        "{} {}:{} (mode {:04o})",
        mode_string(info),
        name_of_user(host, info.uid),
        name_of_group(host, info.gid),
        info.mode
    )
}

fn check_access(
    host: &Host,
    info: Option<&FileInfo>,
    open: Option<&io::Result<std::fs::File>>,
    creds: Option<&Creds>,
) -> Finding {
    let (Some(info), Some(open)) = (info, open) else {
        return Finding::new(
            "kvm.access",
            Status::Fail,
            "cannot open /dev/kvm: it does not exist",
        )
        .fix("see kvm.device");
    };
    let who = creds
        .map(|c| name_of_user(host, c.euid))
        .unwrap_or_else(|| "this user".into());
    let dev = describe_device(host, info);
    match open {
        Ok(_) => Finding::new(
            "kvm.access",
            Status::Pass,
            format!("{who} can open /dev/kvm read-write"),
        )
        .detail(format!("opened it; /dev/kvm is {dev}")),
        Err(e) => explain_denied(host, info, e, creds, &who, &dev),
    }
}

fn explain_denied(
    host: &Host,
    info: &FileInfo,
    err: &io::Error,
    creds: Option<&Creds>,
    who: &str,
    dev: &str,
) -> Finding {
    let summary = format!("{who} cannot open /dev/kvm: {err}");
    match err.raw_os_error() {
        Some(libc::EPERM) => Finding::new("kvm.access", Status::Fail, summary)
            .detail(format!(
                "EPERM (not EACCES): the file permissions are not the cause; a device cgroup or a security module (seccomp, AppArmor, SELinux) refuses the open. /dev/kvm is {dev}"
            ))
            .fix("allow the device for this cgroup/container: cgroup v1 `echo 'c 10:232 rwm' > /sys/fs/cgroup/devices/<cgroup>/devices.allow`; Docker `--device /dev/kvm`; systemd `DeviceAllow=/dev/kvm rw`"),
        Some(libc::ENXIO) | Some(libc::ENODEV) => Finding::new("kvm.access", Status::Fail, summary)
            .detail("the node exists but no driver answers: the KVM module is not loaded")
            .fix("modprobe kvm_intel (Intel) or modprobe kvm_amd (AMD)"),
        Some(libc::EACCES) => {
            let Some(c) = creds else {
                return Finding::new("kvm.access", Status::Fail, summary).detail(format!("/dev/kvm is {dev}"));
            };
            let groups = host.groups();
            let group_name = name_of_group(host, info.gid);
            let eff: Vec<String> = std::iter::once(c.egid)
                .chain(c.groups.iter().copied())
                .map(|g| name_of_group(host, g))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let mut detail = format!(
                "/dev/kvm is {dev}; {who} (uid {}) has effective groups {}",
                c.euid,
                eff.join(", ")
            );
            let listed_in_dev_group = groups
                .iter()
                .any(|g| g.gid == info.gid && g.members.iter().any(|m| m == who));
            let group_grants = (info.mode >> 3) & 0o6 == 0o6;
            let fix = match rw_access(info, c.euid, c.egid, &c.groups) {
                Err(Denial::Other) if group_grants && listed_in_dev_group => {
                    detail.push_str(&format!(
                        "; /etc/group lists {who} in {group_name}, but this session's groups were fixed at login, before that"
                    ));
                    format!("log out and back in (or run `newgrp {group_name}`) so the new group membership takes effect")
                }
                Err(Denial::Other) if group_grants => {
                    detail.push_str(&format!("; {who} is not in group {group_name}"));
                    format!("`sudo usermod -aG {group_name} {who}`, then log out and back in")
                }
                Err(Denial::Groups(gs)) => {
                    let names: Vec<String> = gs.iter().map(|g| name_of_group(host, *g)).collect();
                    detail.push_str(&format!("; group {} matches but grants no read-write", names.join(", ")));
                    format!("make the group read-write: `sudo chmod g+rw /dev/kvm` (persist with a udev rule `KERNEL==\"kvm\", GROUP=\"{group_name}\", MODE=\"0660\"`)")
                }
                _ => {
                    detail.push_str("; only the owner may open it");
                    format!(
                        "add a udev rule `KERNEL==\"kvm\", GROUP=\"kvm\", MODE=\"0660\"` (e.g. /etc/udev/rules.d/65-kvm.rules; `udevadm trigger`) and `sudo usermod -aG kvm {who}`, or grant just this user: `sudo setfacl -m u:{who}:rw /dev/kvm`"
                    )
                }
            };
            Finding::new("kvm.access", Status::Fail, summary).detail(detail).fix(fix)
        }
        _ => Finding::new("kvm.access", Status::Fail, summary).detail(format!("/dev/kvm is {dev}")),
    }
}

/// The v1 devices controller's view of `c 10:232`, if that controller is in use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DeviceCgroup {
    /// Pure cgroup v2: the device filter is an eBPF program that cannot be read back.
    V2,
    /// v1, default-allow (`a *:* rwm`): deny exceptions exist but the kernel does not list them.
    V1DefaultAllow { path: String },
    /// v1 whitelist mode: whether an entry allows `c 10:232 rw`.
    V1List {
        path: String,
        allowed: bool,
        entries: Vec<String>,
    },
    /// Could not tell.
    Unknown(String),
}

pub(crate) fn read_device_cgroup(host: &Host) -> DeviceCgroup {
    let Ok(cg) = host.read("/proc/self/cgroup") else {
        return DeviceCgroup::Unknown("/proc/self/cgroup is unreadable".into());
    };
    let v1 = cg.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, ctrl, path) = (parts.next()?, parts.next()?, parts.next()?);
        ctrl.split(',')
            .any(|c| c == "devices")
            .then(|| path.to_string())
    });
    let Some(path) = v1 else {
        return if host.exists("/sys/fs/cgroup/cgroup.controllers") {
            DeviceCgroup::V2
        } else {
            DeviceCgroup::Unknown("no devices controller in /proc/self/cgroup".into())
        };
    };
    let list_path = format!(
        "/sys/fs/cgroup/devices{}/devices.list",
        path.trim_end_matches('/')
    );
    let Ok(list) = host.read(&list_path) else {
        return DeviceCgroup::Unknown(format!("{list_path} is unreadable"));
    };
    let entries: Vec<String> = list
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    if entries.iter().any(|e| e == "a *:* rwm") {
        return DeviceCgroup::V1DefaultAllow { path };
    }
    let allowed = entries.iter().any(|e| devices_entry_allows_kvm(e));
    DeviceCgroup::V1List {
        path,
        allowed,
        entries,
    }
}

fn devices_entry_allows_kvm(entry: &str) -> bool {
    let mut f = entry.split_whitespace();
    let (Some(kind), Some(num), Some(acc)) = (f.next(), f.next(), f.next()) else {
        return false;
    };
    let Some((maj, min)) = num.split_once(':') else {
        return false;
    };
    (kind == "a" || kind == "c")
        && (maj == "*" || maj == KVM_MAJOR.to_string())
        && (min == "*" || min == KVM_MINOR.to_string())
        && acc.contains('r')
        && acc.contains('w')
}

fn check_device_cgroup(host: &Host, open: Option<&io::Result<std::fs::File>>) -> Finding {
    let eperm = matches!(open, Some(Err(e)) if e.raw_os_error() == Some(libc::EPERM));
    let opened = matches!(open, Some(Ok(_)));
    let allow_fix = |path: &str| {
        format!(
            "allow it: `echo 'c 10:232 rwm' > /sys/fs/cgroup/devices{path}/devices.allow` (as root, from outside the cgroup), or start the container with `--device /dev/kvm`"
        )
    };
    match read_device_cgroup(host) {
        DeviceCgroup::V2 => Finding::new(
            "kvm.cgroup",
            if eperm { Status::Fail } else { Status::Pass },
            if eperm { "the cgroup v2 device filter (eBPF) denies /dev/kvm" } else { "cgroup v2: device filter not readable; the real open decides" },
        )
        .detail("cgroup v2 enforces device access with an eBPF program that cannot be read back; kvm.access opened the device for real")
        .maybe_fix(eperm.then_some("allow /dev/kvm for this unit or container (systemd `DeviceAllow=/dev/kvm rw`, Docker `--device /dev/kvm`)")),
        DeviceCgroup::V1DefaultAllow { path } if eperm => Finding::new(
            "kvm.cgroup",
            Status::Fail,
            format!("the v1 devices cgroup {path} denies c 10:232"),
        )
        .detail("devices.list shows `a *:* rwm` (default allow) and the kernel does not list deny exceptions, but the open failed with EPERM: an exception denies /dev/kvm")
        .fix(allow_fix(&path)),
        DeviceCgroup::V1DefaultAllow { path } => Finding::new(
            "kvm.cgroup",
            Status::Pass,
            format!("v1 devices cgroup {path} allows all devices"),
        )
        .detail("devices.list: a *:* rwm"),
        DeviceCgroup::V1List { path, allowed, entries } => {
            let shown = entries.join(", ");
            if allowed {
                Finding::new("kvm.cgroup", Status::Pass, format!("v1 devices cgroup {path} allows c 10:232 rw"))
                    .detail(format!("devices.list: {shown}"))
            } else {
                Finding::new("kvm.cgroup", Status::Fail, format!("the v1 devices cgroup {path} does not allow c 10:232"))
                    .detail(format!("devices.list has no entry for c 10:232 rw: {shown}{}", if opened { " (yet the open worked: a privileged process may bypass it)" } else { "" }))
                    .fix(allow_fix(&path))
            }
        }
        DeviceCgroup::Unknown(why) => Finding::new(
            "kvm.cgroup",
            if eperm { Status::Fail } else { Status::Warn },
            "device cgroup could not be read",
        )
        .detail(why),
    }
}

fn check_api(file: std::fs::File, pvm: bool) -> Vec<Finding> {
    let mut out = Vec::new();
    let kvm = crate::sys::kvm::kvm_from_file(file);
    let version = kvm.get_api_version();
    if version != 12 {
        out.push(
            Finding::new(
                "kvm.api",
                Status::Fail,
                format!("KVM API version {version}, expected 12"),
            )
            .fix("this kernel's KVM is incompatible with QEMU; update the kernel"),
        );
        return out;
    }
    out.push(Finding::new("kvm.api", Status::Pass, "KVM API version 12"));
    let vm = match kvm.create_vm() {
        Ok(vm) => vm,
        Err(e) if e.errno() == libc::EBUSY => {
            out.push(
                Finding::new("kvm.create_vm", Status::Fail, "KVM_CREATE_VM failed: EBUSY")
                    .detail("another hypervisor (VirtualBox, VMware, another KVM user of VT-x in exclusive mode) holds the virtualisation extensions")
                    .fix("stop the other hypervisor (or its kernel module, e.g. `rmmod vboxdrv`) and retry"),
            );
            return out;
        }
        Err(e) => {
            out.push(Finding::new(
                "kvm.create_vm",
                Status::Fail,
                format!("KVM_CREATE_VM failed: {e}"),
            ));
            return out;
        }
    };
    out.push(Finding::new(
        "kvm.create_vm",
        Status::Pass,
        "KVM_CREATE_VM works",
    ));
    out.push(exec_probe(vm, pvm));
    out
}

/// Run [`PROBE_CODE`] in a fresh vCPU with a deadline.
fn exec_probe(vm: kvm_ioctls::VmFd, pvm: bool) -> Finding {
    let (tx, rx) = mpsc::channel();
    let start = Instant::now();
    std::thread::spawn(move || {
        let r = run_real_mode(&vm, PROBE_CODE, 16);
        let _ = tx.send(r);
    });
    let pvm_note = if pvm {
        " A real-mode probe passing does not mean a standard kernel boots: under kvm_pvm it hangs early (see kvm.modules; `drydock doctor --boot-probe` tries it)."
    } else {
        ""
    };
    match rx.recv_timeout(EXEC_DEADLINE) {
        Ok(Ok(ExecOutcome::Halted { out })) if out == b"KV" => Finding::new(
            "kvm.exec",
            if pvm { Status::Warn } else { Status::Pass },
            format!(
                "a real-mode guest ran to HLT in {} µs",
                start.elapsed().as_micros()
            ),
        )
        .detail(format!("wrote \"KV\" to port 0x3f8 and halted.{pvm_note}"))
        .maybe_fix(pvm.then_some("use --accel tcg, or a PVM-enabled guest kernel")),
        Ok(Ok(ExecOutcome::Halted { out })) => Finding::new(
            "kvm.exec",
            Status::Fail,
            "the probe guest halted with wrong output",
        )
        .detail(format!(
            "expected \"KV\" on port 0x3f8, got {:?}",
            String::from_utf8_lossy(&out)
        ))
        .fix("KVM executes guest code incorrectly here; use --accel tcg"),
        Ok(Ok(ExecOutcome::Unexpected(why))) => Finding::new(
            "kvm.exec",
            Status::Fail,
            "the probe guest did not reach HLT",
        )
        .detail(why)
        .fix("KVM cannot run guest code here; use --accel tcg"),
        Ok(Err(e)) => Finding::new(
            "kvm.exec",
            Status::Fail,
            format!("the probe guest could not run: {e}"),
        )
        .fix("KVM cannot run guest code here; use --accel tcg"),
        Err(_) => Finding::new(
            "kvm.exec",
            Status::Fail,
            format!("the probe guest hung for {} s", EXEC_DEADLINE.as_secs()),
        )
        .detail("KVM_RUN did not return for a 10-instruction real-mode guest")
        .fix("KVM is unusable here; use --accel tcg"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_list_entries() {
        assert!(devices_entry_allows_kvm("c 10:232 rwm"));
        assert!(devices_entry_allows_kvm("c 10:* rw"));
        assert!(devices_entry_allows_kvm("a *:* rwm"));
        assert!(!devices_entry_allows_kvm("c 10:232 r"));
        assert!(!devices_entry_allows_kvm("b 10:232 rwm"));
        assert!(!devices_entry_allows_kvm("c 1:3 rwm"));
        assert!(!devices_entry_allows_kvm("garbage"));
    }
}

#[cfg(test)]
mod fixture_tests {
    use super::super::fixture::{self, ALICE_STATUS, GROUP, PASSWD, ROOT_STATUS};
    use super::*;

    fn by_id<'a>(r: &'a KvmReport, id: &str) -> &'a Finding {
        r.findings
            .iter()
            .find(|f| f.id == id)
            .unwrap_or_else(|| panic!("no {id} in {:?}", r.findings))
    }

    #[test]
    fn no_dev_kvm_and_no_modules() {
        let d = fixture::tree(&[
            ("proc/self/status", ALICE_STATUS),
            ("proc/cpuinfo", "flags\t: fpu sse2 hypervisor\n"),
            ("etc/passwd", PASSWD),
            ("etc/group", GROUP),
            ("sys/module/ext4/parameters/x", ""),
        ]);
        let r = check_all(&Host::at(d.path()));
        assert_eq!(by_id(&r, "kvm.device").status, Status::Fail);
        assert!(
            by_id(&r, "kvm.device")
                .fix
                .as_ref()
                .unwrap()
                .contains("modprobe")
        );
        assert_eq!(by_id(&r, "kvm.modules").status, Status::Fail);
        assert_eq!(by_id(&r, "cpu.virt").status, Status::Fail);
        assert!(by_id(&r, "cpu.virt").summary.contains("nested"));
        assert_eq!(by_id(&r, "kvm.access").status, Status::Fail);
        assert!(!r.opened);
    }

    #[test]
    fn kvm_pvm_is_named_with_its_consequence() {
        let d = fixture::tree(&[
            ("proc/cpuinfo", "flags\t: fpu hypervisor\n"),
            ("sys/module/kvm/parameters/x", ""),
            ("sys/module/kvm_pvm/parameters/x", ""),
        ]);
        let r = check_all(&Host::at(d.path()));
        let m = by_id(&r, "kvm.modules");
        assert_eq!(m.status, Status::Warn);
        assert!(
            m.summary.contains("kvm_pvm") && m.summary.contains("PVM-enabled guest kernels"),
            "{m:?}"
        );
        assert!(m.fix.as_ref().unwrap().contains("--accel tcg"));
        assert_eq!(by_id(&r, "cpu.virt").status, Status::Warn);
    }

    #[test]
    fn vmx_with_nested_parameter() {
        let d = fixture::tree(&[
            ("proc/cpuinfo", "flags\t: fpu vmx\n"),
            ("sys/module/kvm_intel/parameters/nested", "Y\n"),
        ]);
        let f = check_cpu(&Host::at(d.path()), false);
        assert_eq!(f.status, Status::Pass);
        assert!(f.detail.contains("kvm_intel.nested=Y"), "{f:?}");
    }

    #[test]
    fn regular_file_is_not_a_device() {
        let d = fixture::tree(&[("dev/kvm", "")]);
        let r = check_all(&Host::at(d.path()));
        assert!(
            by_id(&r, "kvm.device")
                .summary
                .contains("not a character device")
        );
    }

    #[test]
    fn wrong_major_minor_needs_root() {
        if !fixture::is_root() {
            eprintln!("skipped: needs root (mknod)");
            return;
        }
        let d = fixture::tree(&[("etc/passwd", PASSWD)]);
        std::fs::create_dir_all(d.path().join("dev")).unwrap();
        fixture::mknod_char(&d.path().join("dev/kvm"), 1, 3, 0o600);
        let r = check_all(&Host::at(d.path()));
        let f = by_id(&r, "kvm.device");
        assert_eq!(f.status, Status::Fail);
        assert!(f.summary.contains("1:3, not 10:232"), "{f:?}");
    }

    fn eacces() -> io::Result<std::fs::File> {
        Err(io::Error::from_raw_os_error(libc::EACCES))
    }

    fn device(mode: u32, gid: u32) -> FileInfo {
        FileInfo {
            kind: FileKind::CharDevice,
            major: 10,
            minor: 232,
            mode,
            uid: 0,
            gid,
            acl: None,
        }
    }

    #[test]
    fn access_0600_root_names_user_mode_owner_and_fix() {
        let d = fixture::tree(&[
            ("proc/self/status", ALICE_STATUS),
            ("etc/passwd", PASSWD),
            ("etc/group", GROUP),
        ]);
        let host = Host::at(d.path());
        let creds = host.creds().ok();
        let f = check_access(
            &host,
            Some(&device(0o600, 0)),
            Some(&eacces()),
            creds.as_ref(),
        );
        assert_eq!(f.status, Status::Fail);
        assert!(f.summary.starts_with("alice cannot open /dev/kvm"), "{f:?}");
        assert!(
            f.detail.contains("crw------- root:root (mode 0600)"),
            "{f:?}"
        );
        assert!(f.fix.as_ref().unwrap().contains("MODE=\"0660\""), "{f:?}");
        assert!(
            f.fix.as_ref().unwrap().contains("setfacl -m u:alice:rw"),
            "{f:?}"
        );
    }

    #[test]
    fn access_0660_kvm_not_in_group() {
        let d = fixture::tree(&[
            ("proc/self/status", ALICE_STATUS),
            ("etc/passwd", PASSWD),
            ("etc/group", GROUP),
        ]);
        let host = Host::at(d.path());
        let creds = host.creds().ok();
        let f = check_access(
            &host,
            Some(&device(0o660, 994)),
            Some(&eacces()),
            creds.as_ref(),
        );
        assert!(f.detail.contains("alice is not in group kvm"), "{f:?}");
        assert!(
            f.fix.as_ref().unwrap().contains("usermod -aG kvm alice"),
            "{f:?}"
        );
    }

    #[test]
    fn access_0660_kvm_added_but_not_logged_in_again() {
        let group = GROUP.replace("kvm:x:994:", "kvm:x:994:alice");
        let d = fixture::tree(&[
            ("proc/self/status", ALICE_STATUS),
            ("etc/passwd", PASSWD),
            ("etc/group", &group),
        ]);
        let host = Host::at(d.path());
        let creds = host.creds().ok();
        let f = check_access(
            &host,
            Some(&device(0o660, 994)),
            Some(&eacces()),
            creds.as_ref(),
        );
        assert!(f.detail.contains("/etc/group lists alice in kvm"), "{f:?}");
        assert!(
            f.fix.as_ref().unwrap().contains("log out and back in"),
            "{f:?}"
        );
        assert!(f.fix.as_ref().unwrap().contains("newgrp kvm"), "{f:?}");
    }

    #[test]
    fn eperm_points_at_the_cgroup_not_the_mode() {
        let d = fixture::tree(&[("proc/self/status", ROOT_STATUS), ("etc/passwd", PASSWD)]);
        let host = Host::at(d.path());
        let creds = host.creds().ok();
        let err: io::Result<std::fs::File> = Err(io::Error::from_raw_os_error(libc::EPERM));
        let f = check_access(&host, Some(&device(0o600, 0)), Some(&err), creds.as_ref());
        assert!(f.detail.starts_with("EPERM (not EACCES)"), "{f:?}");
        assert!(f.fix.as_ref().unwrap().contains("devices.allow"), "{f:?}");
    }

    #[test]
    fn v1_whitelist_without_kvm_fails() {
        let d = fixture::tree(&[
            ("proc/self/cgroup", "5:devices:/ci/job\n4:memory:/\n"),
            (
                "sys/fs/cgroup/devices/ci/job/devices.list",
                "c 1:3 rwm\nc 1:5 rwm\nc 136:* rwm\n",
            ),
        ]);
        let host = Host::at(d.path());
        let err: io::Result<std::fs::File> = Err(io::Error::from_raw_os_error(libc::EPERM));
        let f = check_device_cgroup(&host, Some(&err));
        assert_eq!(f.status, Status::Fail);
        assert!(
            f.summary.contains("/ci/job") && f.summary.contains("c 10:232"),
            "{f:?}"
        );
        assert!(
            f.fix
                .as_ref()
                .unwrap()
                .contains("/sys/fs/cgroup/devices/ci/job/devices.allow"),
            "{f:?}"
        );
        let d = fixture::tree(&[
            ("proc/self/cgroup", "5:devices:/ci/job\n"),
            (
                "sys/fs/cgroup/devices/ci/job/devices.list",
                "c 1:3 rwm\nc 10:232 rwm\n",
            ),
        ]);
        assert_eq!(
            check_device_cgroup(&Host::at(d.path()), None).status,
            Status::Pass
        );
    }

    #[test]
    fn v1_default_allow_with_eperm_blames_an_exception() {
        let d = fixture::tree(&[
            ("proc/self/cgroup", "5:devices:/box\n"),
            ("sys/fs/cgroup/devices/box/devices.list", "a *:* rwm\n"),
        ]);
        let err: io::Result<std::fs::File> = Err(io::Error::from_raw_os_error(libc::EPERM));
        let f = check_device_cgroup(&Host::at(d.path()), Some(&err));
        assert_eq!(f.status, Status::Fail);
        assert!(f.detail.contains("does not list deny exceptions"), "{f:?}");
    }

    #[test]
    fn v2_says_the_filter_is_unreadable() {
        let d = fixture::tree(&[
            ("proc/self/cgroup", "0::/user.slice\n"),
            ("sys/fs/cgroup/cgroup.controllers", "memory"),
        ]);
        let f = check_device_cgroup(&Host::at(d.path()), None);
        assert_eq!(f.status, Status::Pass);
        assert!(f.detail.contains("eBPF"), "{f:?}");
    }

    #[test]
    fn real_kvm_probe_when_available() {
        // Runs the real ioctls where /dev/kvm opens (as root here); elsewhere there is nothing to run.
        let host = Host::system();
        let r = check_all(&host);
        if !r.opened {
            eprintln!("skipped: /dev/kvm cannot be opened here");
            return;
        }
        assert_eq!(by_id(&r, "kvm.api").status, Status::Pass);
        assert_eq!(by_id(&r, "kvm.create_vm").status, Status::Pass);
        let exec = by_id(&r, "kvm.exec");
        assert!(exec.summary.contains("ran to HLT"), "{exec:?}");
    }
}
