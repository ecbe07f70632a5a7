//! The pure planning layer of a launch: a [`VmSpec`] (what the user asked for, already resolved
//! to files) becomes a [`QemuPlan`]: QEMU's argv, the sockets and files it will use, and the
//! store-server invocation. No I/O happens here; unit tests check plans as data.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Unix socket paths must fit `sun_path` (108 bytes with the NUL); stay well under it.
pub const MAX_SOCKET_PATH: usize = 100;

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }
}

/// How the guest gets its Nix store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "mode")]
pub enum StoreAttachment {
    /// virtio-fs (tag `nix-store`) from drydock's store server on this socket.
    VirtioFs { socket: PathBuf },
    /// A read-only raw image (EROFS) attached as a virtio-blk disk.
    Image { path: PathBuf },
    /// The whole store directory `path`, read-only, over QEMU's own 9p server (tag
    /// `nix-store`): a nixos-test node whose fstab mounts the store over 9p. 9p cannot show
    /// only the closure.
    NineP { path: PathBuf },
    /// Nothing: a guest that needs no store.
    None,
}

/// The VM's writable disk: a qcow2 overlay on a blank base image shared by all VMs, so a fresh
/// start costs one `qemu-img create` (milliseconds) and never a rebuilt image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub overlay: PathBuf,
    pub base: PathBuf,
    pub size_mib: u32,
    /// The base holds an ext4 file system with this label (a nixos-test node's `/`), not
    /// blank space.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The disk's serial number as the guest sees it (`root` for a nixos-test node's `/`,
    /// as qemu-vm gives it); set, the disk is a `-device virtio-blk-pci` of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
}

/// A host folder shared with the guest under a mount tag (a nixos-test node's `xchg` and
/// `shared`), writable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirShare {
    pub tag: String,
    pub dir: PathBuf,
    pub transport: ShareTransport,
}

/// How a [`DirShare`] reaches the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "via")]
pub enum ShareTransport {
    /// QEMU's own 9p server (`-virtfs local`, `security_model=none`).
    NineP,
    /// virtio-fs from a store server of its own in read-write mode, confined to `dir`,
    /// listening on `socket`; `exe` is the drydock binary it runs as.
    VirtioFs { socket: PathBuf, exe: PathBuf },
}

/// Where a VM's files live. The state folder keeps what must persist; sockets may live in a
/// short runtime folder when the state folder's path is too long for a unix socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmPaths {
    /// `STATE/vms/NAME`.
    pub dir: PathBuf,
    /// Folder for unix sockets (`dir` itself when short enough).
    pub sockets: PathBuf,
}

/// A short, stable folder name for a VM's sockets: 48 bits of FNV-1a of its folder's path.
fn short_id(p: &Path) -> String {
    format!(
        "{:012x}",
        drydock_gc::fnv1a(p.as_os_str().as_encoded_bytes()) & 0xffff_ffff_ffff
    )
}

/// This process's uid (the owner of `/proc/self`).
pub fn current_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX)
}

impl VmPaths {
    /// Choose the socket folder: `dir` when `dir/qmp.sock` fits, else `runtime/<short id>`.
    pub fn new(dir: PathBuf, runtime: &Path, short_id: &str) -> Self {
        let fits = dir.join("console.sock").as_os_str().len() <= MAX_SOCKET_PATH;
        let sockets = if fits {
            dir.clone()
        } else {
            runtime.join(short_id)
        };
        Self { dir, sockets }
    }
    /// The paths of the VM `name` of the state dir `state_dir` (`STATE/vms/NAME`), with sockets
    /// in `$XDG_RUNTIME_DIR/drydock-UID/ID` (else the temporary directory) when the VM folder is
    /// too deep for a socket path. `name` must have passed [`validate_name`].
    pub fn in_state_dir(state_dir: &Path, name: &str) -> Self {
        Self::in_folder(state_dir, "vms", name)
    }
    /// The same for `STATE/FOLDER/NAME` (a cluster's folder is `STATE/clusters/NAME`).
    pub fn in_folder(state_dir: &Path, folder: &str, name: &str) -> Self {
        let dir = state_dir.join(folder).join(name);
        let runtime = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir)
            .join(format!("drydock-{}", current_uid()));
        let id = short_id(&dir);
        Self::new(dir, &runtime, &id)
    }

    pub fn qmp_socket(&self) -> PathBuf {
        self.sockets.join("qmp.sock")
    }
    pub fn fs_socket(&self) -> PathBuf {
        self.sockets.join("fs.sock")
    }
    /// The virtio-fs socket of the share `tag` (a nixos-test node's `xchg`, `shared`).
    pub fn share_socket(&self, tag: &str) -> PathBuf {
        self.sockets.join(format!("fs-{tag}.sock"))
    }
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// Where QEMU connects the serial console; the VM's owner listens there.
    pub fn console_socket(&self) -> PathBuf {
        self.sockets.join("console.sock")
    }
    pub fn qemu_pidfile(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }
    pub fn launch_file(&self) -> PathBuf {
        self.dir.join("launch.json")
    }
    pub fn state_file(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    pub fn allow_list(&self) -> PathBuf {
        self.dir.join("closure.txt")
    }
    pub fn supervisor_log(&self) -> PathBuf {
        self.dir.join("drydock.log")
    }
    pub fn overlay(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }
    pub fn snapshots(&self) -> PathBuf {
        self.dir.join("snapshots")
    }
}

/// Everything a launch needs, resolved: the plan is a function of this alone. It is saved in
/// the state folder (`launch.json`) so a restart needs no evaluation, build or Nix call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub name: String,
    pub qemu: PathBuf,
    /// Physical paths of the kernel and initrd.
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The kernel command line without the console (the plan adds it).
    pub cmdline: String,
    pub memory_mib: u32,
    pub cpus: u32,
    pub accel: Accel,
    pub store: StoreAttachment,
    /// The writable disk, if any.
    #[serde(default)]
    pub disk: Option<Disk>,
    pub paths: VmPaths,
    /// A cluster machine's NICs, backdoor and firmware config files (none for a lone VM).
    #[serde(default)]
    pub devices: GuestDevices,
    /// Writable host folders shared with the guest (nixos-test profile; none otherwise).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shares: Vec<DirShare>,
}

impl VmSpec {
    /// Whether the guest reaches a host folder over QEMU's 9p server (which QEMU cannot migrate
    /// while the guest has it mounted, so such a VM cannot be snapshotted).
    pub fn shares_over_9p(&self) -> bool {
        matches!(self.store, StoreAttachment::NineP { .. })
            || self
                .shares
                .iter()
                .any(|s| s.transport == ShareTransport::NineP)
    }
}

/// A virtio-net NIC on a private segment: QEMU's datagram socket `socket` sends each frame to
/// the hub's socket `hub` and receives the hub's frames on `socket`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    /// `52:54:00:12:VV:NN`.
    pub mac: String,
    /// The VM's end (QEMU binds it).
    pub socket: PathBuf,
    /// The hub's socket of the segment.
    pub hub: PathBuf,
}

/// A file QEMU exposes in the firmware config (`/sys/firmware/qemu_fw_cfg/by_name/NAME/raw`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FwCfgFile {
    /// E.g. `opt/drydock/hosts`.
    pub name: String,
    pub file: PathBuf,
}

/// What a cluster adds to a VM: NICs, the backdoor console and firmware config files.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestDevices {
    /// A user-mode NIC (QEMU's `-netdev user,restrict=on`: DHCP gives the guest 10.0.2.15,
    /// nothing leaves the host) first on the bus, before `nics` (a nixos-test node's `eth0`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub user_net: bool,
    #[serde(default)]
    pub nics: Vec<Nic>,
    /// The unix socket drydock listens on; QEMU connects to it as a client and the guest sees
    /// it as `/dev/hvc0` (QEMU drops what a guest writes to a server-mode chardev with no client).
    #[serde(default)]
    pub backdoor: Option<PathBuf>,
    #[serde(default)]
    pub fw_cfg: Vec<FwCfgFile>,
}

/// QEMU's command line, as data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuPlan {
    pub program: PathBuf,
    pub args: Vec<String>,
}

impl QemuPlan {
    /// The plan as one shell-like line, for logs and `--json` output.
    pub fn display(&self) -> String {
        std::iter::once(self.program.display().to_string())
            .chain(self.args.iter().map(|a| {
                if a.contains([' ', '"', '\'']) {
                    format!("'{}'", a.replace('\'', "'\\''"))
                } else {
                    a.clone()
                }
            }))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Why a spec cannot become a plan.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error(
        "invalid VM name {0:?}: use 1-40 letters, digits, '-', '_' or '.', not starting with '.' or '-'"
    )]
    BadName(String),
    #[error("memory must be at least 64 MiB (got {0})")]
    Memory(u32),
    #[error("cpus must be between 1 and 64 (got {0})")]
    Cpus(u32),
    #[error("socket path {} is longer than {MAX_SOCKET_PATH} bytes", .0.display())]
    SocketPath(PathBuf),
    #[error("QEMU cannot take {what} containing a comma: {}", path.display())]
    Comma { what: &'static str, path: PathBuf },
    #[error("bad MAC address {0:?}")]
    Mac(String),
    #[error("bad share tag {0:?}: use 1-31 letters, digits, '-' or '_'")]
    Tag(String),
    #[error(
        "bad firmware config name {0:?}: use opt/ followed by letters, digits, '/', '.', '-' or '_'"
    )]
    FwCfgName(String),
    /// The machines ask for more memory than the host has.
    #[error(
        "{} {} for {total_mib} MiB of memory{}, more than this host has ({host_mib} MiB): give {} less memory, or pass --allow-overcommit if you know better",
        memory_list(machines),
        if machines.len() == 1 { "asks" } else { "ask" },
        if machines.len() == 1 { "" } else { " in all" },
        if machines.len() == 1 { "it" } else { "them" }
    )]
    HostMemory {
        /// Each machine's name and memory (MiB), as asked.
        machines: Vec<(String, u32)>,
        total_mib: u64,
        host_mib: u64,
    },
}

fn memory_list(machines: &[(String, u32)]) -> String {
    machines
        .iter()
        .map(|(name, mib)| format!("{name} ({mib} MiB)"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether machines asking for `machines` (name, MiB) fit a host with `host_mib` of memory:
/// each one and their sum at most the host's memory (a guest may touch all it was given, and
/// QEMU holds what it touched). Refused: every machine, the sum and the host's memory named.
pub fn check_memory(machines: &[(String, u32)], host_mib: u64) -> Result<(), PlanError> {
    let total_mib: u64 = machines.iter().map(|(_, m)| u64::from(*m)).sum();
    if total_mib <= host_mib {
        return Ok(());
    }
    Err(PlanError::HostMemory {
        machines: machines.to_vec(),
        total_mib,
        host_mib,
    })
}

impl PlanError {
    pub fn is_bad_input(&self) -> bool {
        true
    }
}

/// Check a VM name: it becomes a folder name and part of QEMU's `-name`.
pub fn validate_name(name: &str) -> Result<(), PlanError> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(PlanError::BadName(name.to_string()))
    }
}

fn no_comma(what: &'static str, p: &Path) -> Result<String, PlanError> {
    let s = p.display().to_string();
    if s.contains(',') {
        return Err(PlanError::Comma {
            what,
            path: p.to_path_buf(),
        });
    }
    Ok(s)
}

/// The full kernel command line: the spec's, then the serial console unless one is named.
pub fn kernel_cmdline(cmdline: &str) -> String {
    let has_serial = cmdline
        .split_whitespace()
        .any(|w| w.starts_with("console=ttyS0"));
    let mut c = cmdline.trim().to_string();
    if !has_serial {
        if !c.is_empty() {
            c.push(' ');
        }
        c.push_str("console=ttyS0");
    }
    c
}

/// The plan of a VM that starts paused, loading its state from `uri` (a saved snapshot).
pub fn plan_incoming(spec: &VmSpec, uri: &str) -> Result<QemuPlan, PlanError> {
    let mut p = plan(spec)?;
    p.args.extend(["-incoming".to_string(), uri.to_string()]);
    Ok(p)
}

/// Turn a spec into QEMU's command line.
pub fn plan(spec: &VmSpec) -> Result<QemuPlan, PlanError> {
    validate_name(&spec.name)?;
    if spec.memory_mib < 64 {
        return Err(PlanError::Memory(spec.memory_mib));
    }
    if !(1..=64).contains(&spec.cpus) {
        return Err(PlanError::Cpus(spec.cpus));
    }
    let qmp = spec.paths.qmp_socket();
    if qmp.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(PlanError::SocketPath(qmp));
    }
    let mut a: Vec<String> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|s| s.to_string()));
    push(&["-name", &format!("{},debug-threads=on", spec.name)]);
    // Named, not left to the default: a saved snapshot loads only into the same machine, which
    // snapshots check through the QEMU version and these options.
    push(&["-machine", "pc"]);
    match spec.accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        Accel::Tcg => push(&["-accel", "tcg", "-cpu", "max"]),
    }
    push(&[
        "-m",
        &spec.memory_mib.to_string(),
        "-smp",
        &spec.cpus.to_string(),
    ]);
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    push(&["-kernel", &no_comma("a kernel path", &spec.kernel)?]);
    if let Some(initrd) = &spec.initrd {
        push(&["-initrd", &no_comma("an initrd path", initrd)?]);
    }
    push(&["-append", &kernel_cmdline(&spec.cmdline)]);
    let console = socket_arg("a socket folder", &spec.paths.console_socket())?;
    push(&["-chardev", &format!("socket,id=console,path={console}")]);
    push(&["-serial", "chardev:console"]);
    push(&[
        "-qmp",
        &format!(
            "unix:{},server=on,wait=off",
            no_comma("a socket folder", &qmp)?
        ),
    ]);
    push(&[
        "-pidfile",
        &no_comma("a state folder", &spec.paths.qemu_pidfile())?,
    ]);
    let virtiofs_shares = spec
        .shares
        .iter()
        .any(|s| matches!(s.transport, ShareTransport::VirtioFs { .. }));
    if matches!(spec.store, StoreAttachment::VirtioFs { .. }) || virtiofs_shares {
        // vhost-user needs guest memory the store server can map: a shared memfd.
        push(&[
            "-object",
            &format!(
                "memory-backend-memfd,id=mem,size={}M,share=on",
                spec.memory_mib
            ),
        ]);
        push(&["-numa", "node,memdev=mem"]);
    }
    match &spec.store {
        StoreAttachment::VirtioFs { socket } => {
            if socket.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(PlanError::SocketPath(socket.clone()));
            }
            push(&[
                "-chardev",
                &format!(
                    "socket,id=fs0,path={}",
                    no_comma("a socket folder", socket)?
                ),
            ]);
            push(&["-device", "vhost-user-fs-pci,chardev=fs0,tag=nix-store"]);
        }
        StoreAttachment::Image { path } => {
            // First disk: the guest's stage 1 mounts /dev/vda as the store.
            push(&[
                "-drive",
                &format!(
                    "file={},format=raw,if=virtio,readonly=on",
                    no_comma("an image path", path)?
                ),
            ]);
        }
        StoreAttachment::NineP { path } => {
            push(&[
                "-virtfs",
                &format!(
                    "local,path={},mount_tag=nix-store,security_model=none,readonly=on",
                    no_comma("a store path", path)?
                ),
            ]);
        }
        StoreAttachment::None => {}
    }
    for (i, share) in spec.shares.iter().enumerate() {
        let tag_ok = !share.tag.is_empty()
            && share.tag.len() <= 31
            && share
                .tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'));
        if !tag_ok {
            return Err(PlanError::Tag(share.tag.clone()));
        }
        match &share.transport {
            ShareTransport::NineP => push(&[
                "-virtfs",
                &format!(
                    "local,path={},mount_tag={},security_model=none",
                    no_comma("a shared folder", &share.dir)?,
                    share.tag
                ),
            ]),
            ShareTransport::VirtioFs { socket, .. } => {
                let socket = socket_arg("a socket folder", socket)?;
                let id = format!("fs{}", i + 1);
                push(&["-chardev", &format!("socket,id={id},path={socket}")]);
                push(&[
                    "-device",
                    &format!("vhost-user-fs-pci,chardev={id},tag={}", share.tag),
                ]);
            }
        }
    }
    if let Some(disk) = &spec.disk {
        let overlay = no_comma("a state folder", &disk.overlay)?;
        match &disk.serial {
            None => push(&[
                "-drive",
                &format!("file={overlay},format=qcow2,if=virtio,discard=unmap"),
            ]),
            Some(serial) => {
                if serial.is_empty()
                    || serial.len() > 20
                    || !serial
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-')
                {
                    return Err(PlanError::Tag(serial.clone()));
                }
                push(&[
                    "-drive",
                    &format!("file={overlay},format=qcow2,if=none,id=disk0,discard=unmap"),
                ]);
                push(&[
                    "-device",
                    &format!("virtio-blk-pci,drive=disk0,serial={serial}"),
                ]);
            }
        }
    }
    push_devices(&spec.devices, &mut a)?;
    Ok(QemuPlan {
        program: spec.qemu.clone(),
        args: a,
    })
}

fn socket_arg(what: &'static str, p: &Path) -> Result<String, PlanError> {
    if p.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(PlanError::SocketPath(p.to_path_buf()));
    }
    no_comma(what, p)
}

fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

/// NICs (`-netdev dgram` over unix sockets, one `virtio-net-pci` each), the backdoor
/// (`virtio-serial` with a `virtconsole` on a client-mode socket) and firmware config files.
fn push_devices(d: &GuestDevices, a: &mut Vec<String>) -> Result<(), PlanError> {
    if d.user_net {
        // First of the NICs, so the guest names it eth0 (NICs are named in PCI order).
        a.extend([
            "-netdev".to_string(),
            "user,id=user0,restrict=on".into(),
            "-device".into(),
            "virtio-net-pci,netdev=user0".into(),
        ]);
    }
    for (i, nic) in d.nics.iter().enumerate() {
        if !valid_mac(&nic.mac) {
            return Err(PlanError::Mac(nic.mac.clone()));
        }
        let local = socket_arg("a socket folder", &nic.socket)?;
        let hub = socket_arg("a socket folder", &nic.hub)?;
        a.push("-netdev".into());
        a.push(format!(
            "dgram,id=net{i},local.type=unix,local.path={local},remote.type=unix,remote.path={hub}"
        ));
        a.push("-device".into());
        a.push(format!("virtio-net-pci,netdev=net{i},mac={}", nic.mac));
    }
    if let Some(sock) = &d.backdoor {
        let sock = socket_arg("a socket folder", sock)?;
        a.extend([
            "-chardev".to_string(),
            format!("socket,id=backdoor,path={sock}"),
            "-device".into(),
            "virtio-serial".into(),
            "-device".into(),
            "virtconsole,chardev=backdoor".into(),
        ]);
    }
    for f in &d.fw_cfg {
        let ok = f.name.starts_with("opt/")
            && f.name.len() <= 55
            && f.name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '.' | '-' | '_'));
        if !ok {
            return Err(PlanError::FwCfgName(f.name.clone()));
        }
        let file = no_comma("a state folder", &f.file)?;
        a.push("-fw_cfg".into());
        a.push(format!("name={},file={file}", f.name));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        let paths = VmPaths::new("/s/vms/web".into(), Path::new("/run/x"), "abc");
        VmSpec {
            name: "web".into(),
            qemu: "/usr/bin/qemu-system-x86_64".into(),
            kernel: "/r/nix/store/k-linux/bzImage".into(),
            initrd: Some("/r/nix/store/i-initrd/initrd".into()),
            cmdline: "quiet init=/nix/store/t-system/init".into(),
            memory_mib: 512,
            cpus: 2,
            accel: Accel::Tcg,
            store: StoreAttachment::VirtioFs {
                socket: paths.fs_socket(),
            },
            disk: None,
            paths,
            devices: GuestDevices::default(),
            shares: Vec::new(),
        }
    }

    fn after<'a>(p: &'a QemuPlan, flag: &str) -> Vec<&'a str> {
        p.args
            .windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn virtiofs_plan_has_shared_memfd_numa_and_tagged_device() {
        let p = plan(&spec()).unwrap();
        assert_eq!(p.program, PathBuf::from("/usr/bin/qemu-system-x86_64"));
        assert_eq!(after(&p, "-accel"), ["tcg"]);
        assert_eq!(after(&p, "-cpu"), ["max"]);
        assert_eq!(after(&p, "-m"), ["512"]);
        assert_eq!(after(&p, "-smp"), ["2"]);
        assert_eq!(
            after(&p, "-object"),
            ["memory-backend-memfd,id=mem,size=512M,share=on"]
        );
        assert_eq!(after(&p, "-numa"), ["node,memdev=mem"]);
        assert_eq!(
            after(&p, "-device"),
            ["vhost-user-fs-pci,chardev=fs0,tag=nix-store"]
        );
        assert_eq!(
            after(&p, "-chardev"),
            [
                "socket,id=console,path=/s/vms/web/console.sock",
                "socket,id=fs0,path=/s/vms/web/fs.sock"
            ]
        );
        assert_eq!(
            after(&p, "-qmp"),
            ["unix:/s/vms/web/qmp.sock,server=on,wait=off"]
        );
        assert_eq!(
            after(&p, "-append"),
            ["quiet init=/nix/store/t-system/init console=ttyS0"]
        );
        assert_eq!(after(&p, "-kernel"), ["/r/nix/store/k-linux/bzImage"]);
        assert!(p.args.contains(&"-no-reboot".to_string()));
        assert!(p.args.contains(&"-nodefaults".to_string()));
    }

    #[test]
    fn table_of_variants() {
        type Edit = Box<dyn Fn(&mut VmSpec)>;
        let cases: Vec<(&str, Edit, &str, Vec<&str>)> = vec![
            (
                "kvm uses the host cpu",
                Box::new(|s| s.accel = Accel::Kvm),
                "-cpu",
                vec!["host"],
            ),
            (
                "image store is a read-only virtio disk",
                Box::new(|s| {
                    s.store = StoreAttachment::Image {
                        path: "/s/img/abc.erofs".into(),
                    }
                }),
                "-drive",
                vec!["file=/s/img/abc.erofs,format=raw,if=virtio,readonly=on"],
            ),
            (
                "image store has no vhost-user device",
                Box::new(|s| s.store = StoreAttachment::Image { path: "/i".into() }),
                "-device",
                vec![],
            ),
            (
                "no store, no memfd",
                Box::new(|s| s.store = StoreAttachment::None),
                "-object",
                vec![],
            ),
            (
                "no initrd",
                Box::new(|s| s.initrd = None),
                "-initrd",
                vec![],
            ),
            (
                "overlay disk after the store image",
                Box::new(|s| {
                    s.store = StoreAttachment::Image {
                        path: "/i.erofs".into(),
                    };
                    s.disk = Some(Disk {
                        overlay: "/s/vms/web/disk.qcow2".into(),
                        base: "/s/images/blank.qcow2".into(),
                        size_mib: 1024,
                        label: None,
                        serial: None,
                    });
                }),
                "-drive",
                vec![
                    "file=/i.erofs,format=raw,if=virtio,readonly=on",
                    "file=/s/vms/web/disk.qcow2,format=qcow2,if=virtio,discard=unmap",
                ],
            ),
            (
                "console named already",
                Box::new(|s| s.cmdline = "console=ttyS0,115200 x".into()),
                "-append",
                vec!["console=ttyS0,115200 x"],
            ),
            (
                "empty cmdline",
                Box::new(|s| s.cmdline = String::new()),
                "-append",
                vec!["console=ttyS0"],
            ),
        ];
        for (name, edit, flag, want) in cases {
            let mut s = spec();
            edit(&mut s);
            let p = plan(&s).unwrap();
            assert_eq!(after(&p, flag), want, "{name}");
        }
    }

    #[test]
    fn bad_specs_are_named() {
        type Edit = Box<dyn Fn(&mut VmSpec)>;
        let cases: Vec<(Edit, PlanError)> = vec![
            (
                Box::new(|s| s.name = "../x".into()),
                PlanError::BadName("../x".into()),
            ),
            (
                Box::new(|s| s.name = String::new()),
                PlanError::BadName(String::new()),
            ),
            (Box::new(|s| s.memory_mib = 16), PlanError::Memory(16)),
            (Box::new(|s| s.cpus = 0), PlanError::Cpus(0)),
            (
                Box::new(|s| s.kernel = "/a,b".into()),
                PlanError::Comma {
                    what: "a kernel path",
                    path: "/a,b".into(),
                },
            ),
        ];
        for (edit, want) in cases {
            let mut s = spec();
            edit(&mut s);
            assert_eq!(plan(&s).unwrap_err(), want);
        }
    }

    #[test]
    fn incoming_is_appended_and_machine_is_fixed() {
        let p = plan_incoming(&spec(), "exec:cat '/s/snap'").unwrap();
        assert_eq!(after(&p, "-incoming"), ["exec:cat '/s/snap'"]);
        assert_eq!(after(&p, "-machine"), ["pc"]);
        assert!(after(&plan(&spec()).unwrap(), "-incoming").is_empty());
    }

    #[test]
    fn long_state_dirs_put_sockets_in_a_short_runtime_folder() {
        let long = PathBuf::from(format!("/{}", "x".repeat(120)));
        let p = VmPaths::new(long.join("vms/web"), Path::new("/tmp/drydock-0"), "k3j2");
        assert_eq!(
            p.qmp_socket(),
            PathBuf::from("/tmp/drydock-0/k3j2/qmp.sock")
        );
        assert_eq!(p.console_log(), long.join("vms/web/console.log"));
        let short = VmPaths::new("/s/vms/web".into(), Path::new("/tmp/drydock-0"), "k3j2");
        assert_eq!(short.qmp_socket(), PathBuf::from("/s/vms/web/qmp.sock"));
    }

    #[test]
    fn machines_must_fit_the_hosts_memory() {
        let m = |xs: &[(&str, u32)]| -> Vec<(String, u32)> {
            xs.iter().map(|(n, s)| (n.to_string(), *s)).collect()
        };
        // (machines, host MiB) → the refusal's text, or none
        type Case = (Vec<(String, u32)>, u64, Option<&'static str>);
        let cases: [Case; 6] = [
            (m(&[("web", 512)]), 23_000, None),
            (m(&[("web", 23_000)]), 23_000, None),
            (m(&[]), 0, None),
            (
                m(&[("web", 1_000_000)]),
                23_000,
                Some(
                    "web (1000000 MiB) asks for 1000000 MiB of memory, more than this host has (23000 MiB): give it less memory, or pass --allow-overcommit",
                ),
            ),
            (
                m(&[("a", 12_000), ("b", 12_000)]),
                23_000,
                Some(
                    "a (12000 MiB), b (12000 MiB) ask for 24000 MiB of memory in all, more than this host has (23000 MiB): give them less memory",
                ),
            ),
            (m(&[("a", u32::MAX), ("b", u32::MAX)]), u64::MAX / 2, None),
        ];
        for (machines, host, want) in cases {
            match (check_memory(&machines, host), want) {
                (Ok(()), None) => {}
                (Err(e), Some(w)) => {
                    assert!(e.to_string().starts_with(w), "{e}");
                    assert!(e.is_bad_input());
                }
                (r, w) => panic!("{machines:?} on {host}: {r:?}, wanted {w:?}"),
            }
        }
    }

    #[test]
    fn names() {
        for ok in ["web", "a.b-c_1", "x"] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".hidden", "-x", "a/b", "a b", &"n".repeat(41)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    fn cluster_devices() -> GuestDevices {
        GuestDevices {
            user_net: false,
            nics: vec![
                Nic {
                    mac: "52:54:00:12:01:02".into(),
                    socket: "/s/vms/c.b/vlan1.sock".into(),
                    hub: "/s/clusters/c/vlan1.sock".into(),
                },
                Nic {
                    mac: "52:54:00:12:0a:02".into(),
                    socket: "/s/vms/c.b/vlan10.sock".into(),
                    hub: "/s/clusters/c/vlan10.sock".into(),
                },
            ],
            backdoor: Some("/s/vms/c.b/backdoor.sock".into()),
            fw_cfg: vec![FwCfgFile {
                name: "opt/drydock/hosts".into(),
                file: "/s/clusters/c/hosts".into(),
            }],
        }
    }

    #[test]
    fn cluster_devices_become_nics_backdoor_and_fw_cfg() {
        let mut s = spec();
        s.devices = cluster_devices();
        let p = plan(&s).unwrap();
        assert_eq!(
            after(&p, "-netdev"),
            [
                "dgram,id=net0,local.type=unix,local.path=/s/vms/c.b/vlan1.sock,remote.type=unix,remote.path=/s/clusters/c/vlan1.sock",
                "dgram,id=net1,local.type=unix,local.path=/s/vms/c.b/vlan10.sock,remote.type=unix,remote.path=/s/clusters/c/vlan10.sock",
            ]
        );
        assert_eq!(
            after(&p, "-device"),
            [
                "vhost-user-fs-pci,chardev=fs0,tag=nix-store",
                "virtio-net-pci,netdev=net0,mac=52:54:00:12:01:02",
                "virtio-net-pci,netdev=net1,mac=52:54:00:12:0a:02",
                "virtio-serial",
                "virtconsole,chardev=backdoor",
            ]
        );
        // Client mode (no server=on): drydock listens, QEMU connects.
        assert!(
            after(&p, "-chardev").contains(&"socket,id=backdoor,path=/s/vms/c.b/backdoor.sock")
        );
        assert_eq!(
            after(&p, "-fw_cfg"),
            ["name=opt/drydock/hosts,file=/s/clusters/c/hosts"]
        );
        // A lone VM has none of them.
        let lone = plan(&spec()).unwrap();
        for flag in ["-netdev", "-fw_cfg"] {
            assert!(after(&lone, flag).is_empty(), "{flag}");
        }
    }

    #[test]
    fn bad_cluster_devices_are_named() {
        type Edit = Box<dyn Fn(&mut GuestDevices)>;
        let long = PathBuf::from(format!("/{}", "x".repeat(120)));
        let cases: Vec<(Edit, PlanError)> = vec![
            (
                Box::new(|d| d.nics[0].mac = "52:54:00:12:1:2".into()),
                PlanError::Mac("52:54:00:12:1:2".into()),
            ),
            (
                Box::new(move |d| d.nics[1].hub = long.clone()),
                PlanError::SocketPath(PathBuf::from(format!("/{}", "x".repeat(120)))),
            ),
            (
                Box::new(|d| d.backdoor = Some("/a,b".into())),
                PlanError::Comma {
                    what: "a socket folder",
                    path: "/a,b".into(),
                },
            ),
            (
                Box::new(|d| d.fw_cfg[0].name = "etc/hosts".into()),
                PlanError::FwCfgName("etc/hosts".into()),
            ),
        ];
        for (edit, want) in cases {
            let mut s = spec();
            s.devices = cluster_devices();
            edit(&mut s.devices);
            assert_eq!(plan(&s).unwrap_err(), want);
        }
    }

    #[test]
    fn display_quotes_spaces() {
        let p = QemuPlan {
            program: "/q".into(),
            args: vec!["-append".into(), "a b".into()],
        };
        assert_eq!(p.display(), "/q -append 'a b'");
    }

    /// The default profile's QEMU command line, whole: what every drydock guest got before
    /// profiles existed, so no existing guest sees a different machine.
    #[test]
    fn the_default_profile_s_arguments_are_unchanged() {
        let mut s = spec();
        s.devices = cluster_devices();
        s.disk = Some(Disk {
            overlay: "/s/vms/web/disk.qcow2".into(),
            base: "/s/images/blank-1024M.qcow2".into(),
            size_mib: 1024,
            label: None,
            serial: None,
        });
        let p = plan(&s).unwrap();
        let want = [
            "-name",
            "web,debug-threads=on",
            "-machine",
            "pc",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-m",
            "512",
            "-smp",
            "2",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            "/r/nix/store/k-linux/bzImage",
            "-initrd",
            "/r/nix/store/i-initrd/initrd",
            "-append",
            "quiet init=/nix/store/t-system/init console=ttyS0",
            "-chardev",
            "socket,id=console,path=/s/vms/web/console.sock",
            "-serial",
            "chardev:console",
            "-qmp",
            "unix:/s/vms/web/qmp.sock,server=on,wait=off",
            "-pidfile",
            "/s/vms/web/qemu.pid",
            "-object",
            "memory-backend-memfd,id=mem,size=512M,share=on",
            "-numa",
            "node,memdev=mem",
            "-chardev",
            "socket,id=fs0,path=/s/vms/web/fs.sock",
            "-device",
            "vhost-user-fs-pci,chardev=fs0,tag=nix-store",
            "-drive",
            "file=/s/vms/web/disk.qcow2,format=qcow2,if=virtio,discard=unmap",
            "-netdev",
            "dgram,id=net0,local.type=unix,local.path=/s/vms/c.b/vlan1.sock,remote.type=unix,remote.path=/s/clusters/c/vlan1.sock",
            "-device",
            "virtio-net-pci,netdev=net0,mac=52:54:00:12:01:02",
            "-netdev",
            "dgram,id=net1,local.type=unix,local.path=/s/vms/c.b/vlan10.sock,remote.type=unix,remote.path=/s/clusters/c/vlan10.sock",
            "-device",
            "virtio-net-pci,netdev=net1,mac=52:54:00:12:0a:02",
            "-chardev",
            "socket,id=backdoor,path=/s/vms/c.b/backdoor.sock",
            "-device",
            "virtio-serial",
            "-device",
            "virtconsole,chardev=backdoor",
            "-fw_cfg",
            "name=opt/drydock/hosts,file=/s/clusters/c/hosts",
        ];
        assert_eq!(p.args, want);
    }

    #[test]
    fn nixos_test_devices_are_what_qemu_vm_gives_a_node() {
        let mut s = spec();
        s.devices = cluster_devices();
        s.devices.user_net = true;
        s.store = StoreAttachment::NineP {
            path: "/r/nix/store".into(),
        };
        s.disk = Some(Disk {
            overlay: "/s/vms/web/disk.qcow2".into(),
            base: "/s/images/ext4-nixos-1024M.qcow2".into(),
            size_mib: 1024,
            label: Some("nixos".into()),
            serial: Some("root".into()),
        });
        s.shares = vec![
            DirShare {
                tag: "shared".into(),
                dir: "/s/clusters/c/shared".into(),
                transport: ShareTransport::NineP,
            },
            DirShare {
                tag: "xchg".into(),
                dir: "/s/vms/web/xchg".into(),
                transport: ShareTransport::VirtioFs {
                    socket: "/s/vms/web/fs-xchg.sock".into(),
                    exe: "/bin/drydock".into(),
                },
            },
        ];
        let p = plan(&s).unwrap();
        assert_eq!(
            after(&p, "-virtfs"),
            vec![
                "local,path=/r/nix/store,mount_tag=nix-store,security_model=none,readonly=on",
                "local,path=/s/clusters/c/shared,mount_tag=shared,security_model=none",
            ]
        );
        // A virtio-fs share needs shared guest memory even when the store is 9p.
        assert_eq!(
            after(&p, "-object"),
            vec!["memory-backend-memfd,id=mem,size=512M,share=on"]
        );
        assert!(after(&p, "-chardev").contains(&"socket,id=fs2,path=/s/vms/web/fs-xchg.sock"));
        let devices = after(&p, "-device");
        assert!(devices.contains(&"vhost-user-fs-pci,chardev=fs2,tag=xchg"));
        assert!(devices.contains(&"virtio-blk-pci,drive=disk0,serial=root"));
        assert_eq!(
            after(&p, "-drive"),
            vec!["file=/s/vms/web/disk.qcow2,format=qcow2,if=none,id=disk0,discard=unmap"]
        );
        // The user-mode NIC comes first of the NICs (eth0), then the VLANs' in order.
        let nets: Vec<&str> = devices
            .iter()
            .copied()
            .filter(|d| d.starts_with("virtio-net-pci"))
            .collect();
        assert_eq!(
            nets,
            vec![
                "virtio-net-pci,netdev=user0",
                "virtio-net-pci,netdev=net0,mac=52:54:00:12:01:02",
                "virtio-net-pci,netdev=net1,mac=52:54:00:12:0a:02",
            ]
        );
        assert_eq!(after(&p, "-netdev")[0], "user,id=user0,restrict=on");

        // Without virtio-fs anywhere, no shared memory.
        s.shares.truncate(1);
        assert!(after(&plan(&s).unwrap(), "-object").is_empty());
        // Bad tags and serials are refused.
        s.shares[0].tag = "a,b".into();
        assert!(matches!(plan(&s), Err(PlanError::Tag(_))));
    }
}
