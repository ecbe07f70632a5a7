//! The effectful side of a VM: start the store server and QEMU from a [`VmSpec`]'s plan, place
//! QEMU in its own cgroup, record the VM's state, read its console (`console`'s pump), and stop
//! it in order (QMP `system_powerdown` → grace → QMP `quit` → SIGTERM → SIGKILL) on every exit
//! path. Each wait for a process's exit blocks on its pidfd until it exits or the grace ends.
//!
//! Nobody holds the QMP socket (QEMU serves one client at a time): each operation connects,
//! acts and disconnects, so `drydock vm stop` from another terminal can always get in.

use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use drydock_gc::{Cancel, Deadline};
use serde::{Deserialize, Serialize};

use crate::cgroup::VmCgroup;
use crate::console::{
    BoundedLog, ConsoleOptions, ConsolePump, ConsoleTail, WaitOutcome, follow, rotate_at,
};
use crate::plan::{Disk, ShareTransport, StoreAttachment, VmPaths, VmSpec, plan};
use crate::qmp::Qmp;
use crate::spawn::Supervised;
use crate::storefs::StoreServer;
use crate::sys::proc::{process_start_ticks, same_process_alive};
use crate::wait::{ProcessWatch, wait_readable};

/// How long the guest gets to power off after `system_powerdown`.
pub const POWERDOWN_GRACE: Duration = Duration::from_secs(3);
const QUIT_GRACE: Duration = Duration::from_secs(3);
const TERM_GRACE: Duration = Duration::from_secs(2);
const QMP_CONNECT: Duration = Duration::from_secs(2);

/// Why a VM could not be started or stopped.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    Plan(#[from] crate::plan::PlanError),
    #[error("cannot prepare {}", path.display())]
    Files {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Read(drydock_gc::ReadFileError),
    /// A path in a launch record lies outside the places drydock puts such files.
    #[error("{}: {field} is {}, but it must be {expected}; the record was changed by hand, so drydock will not use it (remove the VM's folder and launch it anew)", file.display(), value.display())]
    Untrusted {
        file: PathBuf,
        field: &'static str,
        value: PathBuf,
        expected: String,
    },
    #[error("cannot start the store server")]
    StoreServer(#[source] crate::storefs::StoreServerError),
    #[error("cannot start QEMU")]
    Qemu(#[source] crate::spawn::SpawnError),
    #[error("cannot prepare the VM's disk: `{command}`: {message}")]
    Disk { command: String, message: String },
    #[error("QEMU exited at once ({status}): {log}")]
    QemuDied { status: ExitStatus, log: String },
    /// A folder of the VM's belongs to another user, or others can write it.
    #[error(transparent)]
    NotPrivate(drydock_gc::PrivateError),
    #[error("cannot control VM process {pid}")]
    Signal {
        pid: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("no VM named {name} in {}", dir.display())]
    NoVm { name: String, dir: PathBuf },
    #[error("no console log for a VM named {name} ({} does not exist)", path.display())]
    NoConsoleLog { name: String, path: PathBuf },
}

impl LaunchError {
    pub fn is_bad_input(&self) -> bool {
        match self {
            Self::Plan(e) => e.is_bad_input(),
            Self::Qemu(e) => e.is_bad_input(),
            Self::StoreServer(e) => e.is_bad_input(),
            Self::Untrusted { .. } | Self::NoVm { .. } | Self::NoConsoleLog { .. } => true,
            Self::NotPrivate(e) => e.is_bad_input(),
            // Bad input unless the file simply cannot be opened (missing, permissions).
            Self::Read(e) => !matches!(e, drydock_gc::ReadFileError::Io { .. }),
            _ => false,
        }
    }
}

/// What `state.json` in the VM's folder says about a started VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    pub name: String,
    /// The drydock process that owns the VM (foreground command or detached supervisor).
    pub supervisor_pid: u32,
    pub qemu_pid: u32,
    pub server_pid: Option<u32>,
    pub accel: String,
    pub memory_mib: u32,
    /// Seconds since the epoch.
    pub started: u64,
    /// The cgroup QEMU runs in, if drydock made one.
    pub cgroup: Option<PathBuf>,
    /// `running`, or `loading` while a snapshot is being loaded.
    #[serde(default)]
    pub phase: Phase,
    /// QEMU's start time (clock ticks after boot), so a recycled pid is not taken for it.
    #[serde(default)]
    pub qemu_start_ticks: Option<u64>,
    /// The same for the owner and the store server: a stale entry must not make drydock kill
    /// whatever process has their pids now.
    #[serde(default)]
    pub supervisor_start_ticks: Option<u64>,
    #[serde(default)]
    pub server_start_ticks: Option<u64>,
}

/// Where a started VM is: loading a snapshot (paused), or running.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// QEMU started with `-incoming` and is loading the saved state.
    Loading,
    /// The guest runs.
    #[default]
    Running,
}

impl VmState {
    pub fn read(paths: &VmPaths) -> Option<Self> {
        let bytes = drydock_gc::read_regular(
            &paths.state_file(),
            drydock_gc::Links::Refuse,
            drydock_gc::MAX_STATE_BYTES,
        )
        .ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn write(&self, paths: &VmPaths) -> Result<(), LaunchError> {
        write_json(&paths.state_file(), self)
    }

    /// Whether this VM's QEMU is still running (not exiting, not a zombie, not a stranger
    /// that inherited its pid).
    pub fn qemu_alive(&self) -> bool {
        same_process_alive(self.qemu_pid, self.qemu_start_ticks)
    }

    /// Whether the drydock process that owns this VM is still running.
    pub fn supervisor_alive(&self) -> bool {
        same_process_alive(self.supervisor_pid, self.supervisor_start_ticks)
    }
}

/// Write JSON atomically (a temporary file of its own in the same folder, then a rename: a
/// concurrent reader or writer never sees half a file, and a link there is replaced, not
/// followed).
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<(), LaunchError> {
    let files = |source| LaunchError::Files {
        path: path.to_path_buf(),
        source,
    };
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| files(e.into()))?;
    drydock_gc::write_atomic(path, &bytes).map_err(files)
}

impl VmPaths {
    /// The state dir the VM's folder lies in (`STATE/FOLDER/NAME`).
    fn state_dir(&self) -> Option<&Path> {
        self.dir.parent()?.parent()
    }

    /// Make the VM's folder and its socket folder (and the folders above them up to the state
    /// dir, or the runtime folder's `drydock-UID`) 0700, refusing any that exists already but
    /// belongs to another user or can be written by others (see `drydock_gc::private_dir`).
    pub fn make_private(&self) -> Result<(), drydock_gc::PrivateError> {
        match self.state_dir() {
            Some(top) => drydock_gc::private_tree(top, &self.dir)?,
            None => drydock_gc::private_dir(&self.dir)?,
        }
        if self.sockets != self.dir {
            if let Some(user_dir) = self.sockets.parent() {
                drydock_gc::private_dir(user_dir)?;
            }
            drydock_gc::private_dir(&self.sockets)?;
        }
        Ok(())
    }

    /// Before connecting to the VM's sockets or reading its files: every existing folder
    /// [`VmPaths::make_private`] would make must be private (nothing is made).
    pub fn check_private(&self) -> Result<(), drydock_gc::PrivateError> {
        match self.state_dir() {
            Some(top) => drydock_gc::check_private_tree(top, &self.dir)?,
            None => drydock_gc::check_private(&self.dir)?,
        }
        if self.sockets != self.dir {
            if let Some(user_dir) = self.sockets.parent() {
                drydock_gc::check_private(user_dir)?;
            }
            drydock_gc::check_private(&self.sockets)?;
        }
        Ok(())
    }
}

/// How the store reaches the store server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreShare {
    /// The drydock binary (re-executed as `__store-server`).
    pub exe: PathBuf,
    /// The physical store directory.
    pub shared_dir: PathBuf,
    /// Store path basenames the guest may see; `None` shares the whole store.
    pub allow: Option<Vec<String>>,
}

/// Everything needed to launch a VM again without Nix: saved as `launch.json` in its folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchRecord {
    pub spec: VmSpec,
    pub share: Option<StoreShare>,
    /// The system's toplevel (logical store path), when booted from one.
    pub toplevel: Option<String>,
    /// Why this accelerator was chosen.
    pub accel_reason: String,
    /// The run this launch is recorded as in drydock's runs database.
    #[serde(default)]
    pub run_id: Option<i64>,
    /// `run_id` is a cluster's run, shared by its machines: ending this VM does not end it
    /// (the cluster's owner, or `down`, does).
    #[serde(default)]
    pub shared_run: bool,
    /// A key derived from the closure the guest sees (snapshots and store images check it).
    #[serde(default)]
    pub closure_key: Option<String>,
    /// The Nix store the system came from: a restart or restore pins it there again, whatever
    /// store the command line names by default.
    #[serde(default)]
    pub store: Option<drydock_gc::StoreLayout>,
    /// Which devices the guest got.
    #[serde(default)]
    pub profile: crate::profile::Profile,
    /// A nixos-test node's closure registration (`regInfo=`), a logical store path pinned with
    /// the run like the system.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reginfo: Option<String>,
}

impl LaunchRecord {
    /// Read `launch.json` of the VM whose folder is `paths.dir`. The record is drydock's own,
    /// but anyone who can write the folder can edit it: every path in it that drydock writes to
    /// or hands to QEMU as a disk must lie where drydock puts such things (see
    /// [`LaunchRecord::check_paths`]); otherwise the record is refused.
    pub fn read(paths: &VmPaths) -> Result<Self, LaunchError> {
        let path = paths.launch_file();
        let bytes = drydock_gc::read_regular(
            &path,
            drydock_gc::Links::Refuse,
            drydock_gc::MAX_STATE_BYTES,
        )
        .map_err(LaunchError::Read)?;
        let record: Self = serde_json::from_slice(&bytes).map_err(|e| LaunchError::Files {
            path: path.clone(),
            source: e.into(),
        })?;
        record
            .check_paths(paths)
            .map_err(|(field, value, expected)| LaunchError::Untrusted {
                file: path,
                field,
                value,
                expected,
            })?;
        Ok(record)
    }

    /// The recorded launch of the VM `name` under `state_dir`: an invalid name, or a VM that was
    /// never launched, is bad input.
    pub fn of_vm(state_dir: &Path, name: &str) -> Result<Self, LaunchError> {
        crate::plan::validate_name(name)?;
        let paths = VmPaths::in_state_dir(state_dir, name);
        if !paths.launch_file().exists() {
            return Err(LaunchError::NoVm {
                name: name.to_owned(),
                dir: state_dir.join("vms"),
            });
        }
        Self::read(&paths)
    }

    /// Every file the recorded launch needs must still be there (they are pinned, but someone
    /// may have deleted them by hand): the first one that is not, as what it is and its path.
    pub fn missing_file(&self) -> Option<(&'static str, PathBuf)> {
        let spec = &self.spec;
        let mut files: Vec<(&'static str, PathBuf)> = vec![("kernel", spec.kernel.clone())];
        if let Some(i) = &spec.initrd {
            files.push(("initrd", i.clone()));
        }
        if let crate::plan::StoreAttachment::Image { path } = &spec.store {
            files.push(("store image", path.clone()));
        }
        if let Some(share) = &self.share {
            for name in share.allow.iter().flatten() {
                files.push(("store path", share.shared_dir.join(name)));
            }
        }
        if let (Some(reginfo), Some(layout)) = (&self.reginfo, &self.store) {
            if let Some(name) = reginfo.rsplit('/').next() {
                files.push(("closure registration", layout.store_dir.join(name)));
            }
        }
        files
            .into_iter()
            .find(|(_, p)| std::fs::symlink_metadata(p).is_err())
    }

    /// Every path of the record that drydock writes or attaches as a disk, against where it
    /// belongs: the VM's folder (`paths.dir`), its socket folder, or the state dir's `images`
    /// folder (two levels above the VM's folder). Returns the first one out of place as (field,
    /// value, where it must be).
    pub fn check_paths(&self, paths: &VmPaths) -> Result<(), (&'static str, PathBuf, String)> {
        let out = |field, value: &Path, expected: String| Err((field, value.to_owned(), expected));
        let spec = &self.spec;
        if spec.paths.dir != paths.dir {
            return out(
                "spec.paths.dir",
                &spec.paths.dir,
                paths.dir.display().to_string(),
            );
        }
        if spec.paths.sockets != paths.sockets && spec.paths.sockets != paths.dir {
            return out(
                "spec.paths.sockets",
                &spec.paths.sockets,
                paths.sockets.display().to_string(),
            );
        }
        let images = paths
            .dir
            .parent()
            .and_then(Path::parent)
            .map(|s| s.join("images"));
        let in_images = |p: &Path| {
            images.as_deref().is_some_and(|dir| {
                p.parent() == Some(dir) && p.file_name().is_some_and(|n| n != "." && n != "..")
            })
        };
        let images_text = images
            .as_deref()
            .map(|d| format!("a file in {}", d.display()))
            .unwrap_or_default();
        if let Some(disk) = &spec.disk {
            if disk.overlay != paths.overlay() {
                return out(
                    "spec.disk.overlay",
                    &disk.overlay,
                    paths.overlay().display().to_string(),
                );
            }
            if !in_images(&disk.base) {
                return out("spec.disk.base", &disk.base, images_text);
            }
        }
        match &spec.store {
            crate::plan::StoreAttachment::Image { path } if !in_images(path) => {
                return out("spec.store.image.path", path, images_text);
            }
            crate::plan::StoreAttachment::VirtioFs { socket }
                if socket != &spec.paths.fs_socket() =>
            {
                return out(
                    "spec.store.virtio_fs.socket",
                    socket,
                    spec.paths.fs_socket().display().to_string(),
                );
            }
            _ => {}
        }
        // A writable share is the VM's own folder `VMDIR/TAG`, or a cluster's `shared`
        // folder (`STATE/clusters/NAME/shared`); its virtio-fs socket is the VM's.
        let clusters = paths
            .dir
            .parent()
            .and_then(Path::parent)
            .map(|s| s.join("clusters"));
        for share in &spec.shares {
            let own = share.dir == paths.dir.join(&share.tag) && !share.tag.contains(['/', '.']);
            let cluster_shared = share.tag == "shared"
                && share.dir.file_name().is_some_and(|n| n == "shared")
                && share.dir.parent().and_then(Path::parent) == clusters.as_deref()
                && share
                    .dir
                    .parent()
                    .and_then(Path::file_name)
                    .is_some_and(|n| n != "." && n != "..");
            if !own && !cluster_shared {
                return out(
                    "spec.shares.dir",
                    &share.dir,
                    format!(
                        "{} or a cluster's shared folder",
                        paths.dir.join(&share.tag).display()
                    ),
                );
            }
            if let crate::plan::ShareTransport::VirtioFs { socket, .. } = &share.transport {
                let want = spec.paths.share_socket(&share.tag);
                if socket != &want {
                    return out("spec.shares.socket", socket, want.display().to_string());
                }
            }
        }
        Ok(())
    }

    pub fn write(&self, paths: &VmPaths) -> Result<(), LaunchError> {
        paths.make_private().map_err(LaunchError::NotPrivate)?;
        write_json(&paths.launch_file(), self)
    }
}

/// A started VM owned by this process. Dropping it stops everything.
#[derive(Debug)]
pub struct Vm {
    paths: VmPaths,
    qemu: Supervised,
    /// QEMU's exit, to wait on (QEMU is our unreaped child, so its pid stays its own).
    qemu_exit: Option<ProcessWatch>,
    server: Option<StoreServer>,
    /// The store server's exit.
    server_exit: Option<ProcessWatch>,
    /// The servers of the guest's writable virtio-fs folders (nixos-test profile).
    share_servers: Vec<StoreServer>,
    cgroup: Option<VmCgroup>,
    console: Option<ConsolePump>,
    stopped: bool,
    pub state: VmState,
}

fn prepare(paths: &VmPaths) -> Result<(), LaunchError> {
    paths.make_private().map_err(LaunchError::NotPrivate)?;
    for f in [
        paths.qmp_socket(),
        paths.fs_socket(),
        paths.console_socket(),
        paths.qemu_pidfile(),
        paths.state_file(),
    ] {
        match std::fs::remove_file(&f) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(LaunchError::Files { path: f, source: e });
            }
            _ => {}
        }
    }
    Ok(())
}

/// `mkfs.ext4` (e2fsprogs; often in `/sbin`, which a user's `PATH` may lack).
fn find_mkfs_ext4() -> PathBuf {
    ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("mkfs.ext4"))
}

/// Make `file`, `size_mib` MiB, holding an empty ext4 file system labelled `label`.
fn mkfs_ext4(file: &Path, label: &str, size_mib: u32) -> Result<(), LaunchError> {
    let program = find_mkfs_ext4();
    let mut cmd = Command::new(&program);
    cmd.args(["-q", "-F", "-t", "ext4", "-L", label])
        .arg(file)
        .arg(format!("{size_mib}M"));
    crate::sys::proc::private_umask(&mut cmd);
    let shown = format!("mkfs.ext4 -L {label} {} {size_mib}M", file.display());
    match crate::spawn::run_captured(cmd, Duration::from_secs(120)) {
        Ok(r) if r.code == Some(0) => Ok(()),
        Ok(r) => Err(LaunchError::Disk {
            command: shown,
            message: r.stderr.trim().to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(LaunchError::Disk {
            command: shown,
            message: "mkfs.ext4 not found (install e2fsprogs)".into(),
        }),
        Err(e) => Err(LaunchError::Disk {
            command: shown,
            message: e.to_string(),
        }),
    }
}

/// Run `qemu-img` with its arguments, with a deadline.
fn qemu_img(args: &[&std::ffi::OsStr]) -> Result<(), LaunchError> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(args);
    crate::sys::proc::private_umask(&mut cmd);
    let shown = || {
        std::iter::once("qemu-img".to_string())
            .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
            .collect::<Vec<_>>()
            .join(" ")
    };
    match crate::spawn::run_captured(cmd, Duration::from_secs(60)) {
        Ok(r) if r.code == Some(0) => Ok(()),
        Ok(r) => Err(LaunchError::Disk {
            command: shown(),
            message: r.stderr.trim().to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(LaunchError::Disk {
            command: shown(),
            message: "qemu-img not found (install qemu-utils)".into(),
        }),
        Err(e) => Err(LaunchError::Disk {
            command: shown(),
            message: e.to_string(),
        }),
    }
}

/// Throw the VM's writable layer away: the next start creates a fresh one.
pub fn discard_disk(disk: &Disk) -> Result<(), LaunchError> {
    match std::fs::remove_file(&disk.overlay) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(LaunchError::Files {
            path: disk.overlay.clone(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// A fresh writable layer: (re)create the VM's qcow2 overlay on the shared blank base. The base
/// and an empty overlay of it (the template) are made once with `qemu-img`; after that a fresh
/// overlay is a copy of the template (a few hundred KiB, no process), since the template names
/// the same absolute base path every overlay needs.
pub fn fresh_disk(disk: &Disk) -> Result<(), LaunchError> {
    let files = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LaunchError::Files { path, source }
    };
    let template = disk.base.with_extension("overlay.qcow2");
    if !disk.base.exists() || !template.exists() {
        let dir = disk.base.parent().unwrap_or(Path::new("."));
        drydock_gc::private_dir(dir).map_err(LaunchError::NotPrivate)?;
        // Concurrent launches may race here: each builds under its own name, renames win.
        let tag = format!(
            "tmp{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        )
        .replace(|c: char| !c.is_ascii_alphanumeric(), "");
        if !disk.base.exists() {
            let tmp = disk.base.with_extension(&tag);
            let size = format!("{}M", disk.size_mib);
            match &disk.label {
                None => qemu_img(&[
                    "create".as_ref(),
                    "-q".as_ref(),
                    "-f".as_ref(),
                    "qcow2".as_ref(),
                    tmp.as_os_str(),
                    size.as_ref(),
                ])?,
                Some(label) => {
                    // A nixos-test node's `/`: an ext4 file system labelled as its fstab says,
                    // made once per label and size (as qemu-vm's start script makes it).
                    let raw = disk.base.with_extension(format!("{tag}.raw"));
                    let made = mkfs_ext4(&raw, label, disk.size_mib).and_then(|()| {
                        qemu_img(&[
                            "convert".as_ref(),
                            "-q".as_ref(),
                            "-f".as_ref(),
                            "raw".as_ref(),
                            "-O".as_ref(),
                            "qcow2".as_ref(),
                            raw.as_os_str(),
                            tmp.as_os_str(),
                        ])
                    });
                    let _ = std::fs::remove_file(&raw);
                    made?;
                }
            }
            std::fs::rename(&tmp, &disk.base).map_err(files(&disk.base))?;
        }
        let tmp = template.with_extension(&tag);
        qemu_img(&[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-b".as_ref(),
            disk.base.as_os_str(),
            "-F".as_ref(),
            "qcow2".as_ref(),
            tmp.as_os_str(),
        ])?;
        std::fs::rename(&tmp, &template).map_err(files(&template))?;
    }
    if let Some(dir) = disk.overlay.parent() {
        drydock_gc::private_dir(dir).map_err(LaunchError::NotPrivate)?;
    }
    discard_disk(disk)?;
    std::fs::copy(&template, &disk.overlay).map_err(files(&disk.overlay))?;
    std::fs::set_permissions(
        &disk.overlay,
        std::fs::Permissions::from_mode(drydock_gc::FILE_MODE),
    )
    .map_err(files(&disk.overlay))?;
    Ok(())
}

/// Whether this process said that its VMs run without a cgroup of their own. It is said once:
/// a cluster's machines are all started by one process (its owner), for the same reason each.
static SAID_NO_CGROUP: AtomicBool = AtomicBool::new(false);

/// Start the store server (for virtio-fs) and QEMU, and record the VM's state. With
/// `incoming`, QEMU starts paused and loads a saved state from that migration URI. The console
/// is kept as [`ConsoleOptions::default`] says (see [`start_with`]).
pub fn start(
    spec: &VmSpec,
    share: Option<&StoreShare>,
    incoming: Option<&str>,
) -> Result<Vm, LaunchError> {
    start_with(spec, share, incoming, ConsoleOptions::default())
}

/// [`start`], with the console's log limit and a sink for its lines (`console`).
pub fn start_with(
    spec: &VmSpec,
    share: Option<&StoreShare>,
    incoming: Option<&str>,
    console: ConsoleOptions,
) -> Result<Vm, LaunchError> {
    let qemu_plan = match incoming {
        Some(uri) => crate::plan::plan_incoming(spec, uri)?,
        None => plan(spec)?,
    };
    let paths = spec.paths.clone();
    prepare(&paths)?;
    // A missing overlay (a fresh start) is created while the store server starts.
    let disk_job = spec
        .disk
        .clone()
        .filter(|d| !d.overlay.exists())
        .map(|d| std::thread::spawn(move || fresh_disk(&d)));
    let server = match (&spec.store, share) {
        (StoreAttachment::VirtioFs { socket }, Some(share)) => Some(
            StoreServer::spawn(
                &share.exe,
                socket,
                &share.shared_dir,
                share.allow.as_deref(),
            )
            .map_err(LaunchError::StoreServer),
        ),
        _ => None,
    };
    // A nixos-test node's writable folders: made private if new, each virtio-fs one served by
    // a writable server of its own (QEMU serves 9p itself).
    let mut share_servers = Vec::new();
    for s in &spec.shares {
        drydock_gc::private_dir(&s.dir).map_err(LaunchError::NotPrivate)?;
        if let ShareTransport::VirtioFs { socket, exe } = &s.transport {
            share_servers.push(
                StoreServer::spawn_writable(exe, socket, &s.dir)
                    .map_err(LaunchError::StoreServer)?,
            );
        }
    }
    if let Some(job) = disk_job {
        job.join().map_err(|_| LaunchError::Disk {
            command: "qemu-img create".into(),
            message: "the thread creating the overlay panicked".into(),
        })??;
    }
    let server = server.transpose()?;
    let qemu_log = paths.dir.join("qemu.log");
    let log = drydock_gc::create_nofollow(&qemu_log).map_err(|source| LaunchError::Files {
        path: qemu_log.clone(),
        source,
    })?;
    // QEMU connects its serial port to us as it starts: listen first.
    let files = |path: PathBuf| move |source| LaunchError::Files { path, source };
    let console_sock = paths.console_socket();
    let console_listener =
        drydock_gc::bind_listener(&console_sock).map_err(files(console_sock.clone()))?;
    let console_log = BoundedLog::create(&paths.console_log(), rotate_at(console.log_limit))
        .map_err(files(paths.console_log()))?;
    let mut cmd = Command::new(&qemu_plan.program);
    cmd.args(&qemu_plan.args).stdin(Stdio::null()).stderr(log);
    // What QEMU creates (its QMP socket, NIC sockets, pid file) is 0600 whatever
    // drydock's umask: the folders are private, and so are the files.
    crate::sys::proc::private_umask(&mut cmd);
    tracing::info!(plan = %qemu_plan.display(), "starting QEMU");
    let mut qemu = Supervised::spawn("qemu", cmd).map_err(LaunchError::Qemu)?;
    let qemu_exit = ProcessWatch::child(qemu.pid());
    let cgroup = match VmCgroup::create(&spec.name, spec.memory_mib, qemu.pid()) {
        Ok(c) => Some(c),
        Err(e) => {
            if SAID_NO_CGROUP.swap(true, Ordering::Relaxed) {
                tracing::debug!("VM {} runs without its own cgroup: {e}", spec.name);
            } else {
                tracing::warn!(
                    "VMs started here run without a cgroup of their own, so without a memory limit each (doctor: cgroup.placement): {e}"
                );
            }
            None
        }
    };
    // QEMU fails fast on bad arguments or a missing device: catch that here, with its words.
    // It is far enough once it connected its console (its chardevs are made), or 300 ms on.
    let early = Deadline::after(Duration::from_millis(300));
    while !early.expired() {
        let mut fds = vec![console_listener.as_fd()];
        fds.extend(qemu_exit.as_ref().map(|w| w.as_fd()));
        match wait_readable(&fds, Some(early)) {
            Ok(r) if r.get(1) == Some(&true) => break,
            Ok(r) if r[0] => break,
            Ok(_) => {}
            Err(e) => {
                tracing::debug!("waiting for QEMU to start: {e}");
                break;
            }
        }
    }
    if let Ok(Some(status)) = qemu.try_wait() {
        let text = std::fs::read_to_string(&qemu_log).unwrap_or_default();
        return Err(LaunchError::QemuDied {
            status,
            log: text.trim().to_string(),
        });
    }
    let pump = ConsolePump::start(&spec.name, console_listener, console_log, console.on_line)
        .map_err(files(console_sock))?;
    let state = VmState {
        name: spec.name.clone(),
        supervisor_pid: std::process::id(),
        qemu_pid: qemu.pid(),
        server_pid: server.as_ref().map(StoreServer::pid),
        accel: spec.accel.as_str().to_string(),
        memory_mib: spec.memory_mib,
        started: drydock_gc::epoch_secs().max(0) as u64,
        cgroup: cgroup.as_ref().map(|c| c.path().to_path_buf()),
        phase: if incoming.is_some() {
            Phase::Loading
        } else {
            Phase::Running
        },
        qemu_start_ticks: process_start_ticks(qemu.pid()),
        supervisor_start_ticks: process_start_ticks(std::process::id()),
        server_start_ticks: server.as_ref().and_then(|s| process_start_ticks(s.pid())),
    };
    let server_exit = server.as_ref().and_then(|s| ProcessWatch::child(s.pid()));
    let vm = Vm {
        paths,
        qemu,
        qemu_exit,
        server,
        server_exit,
        share_servers,
        cgroup,
        console: Some(pump),
        stopped: false,
        state,
    };
    // From here on the VM is stopped (by its drop) on every way out.
    vm.state.write(&vm.paths)?;
    Ok(vm)
}

impl Vm {
    pub fn paths(&self) -> &VmPaths {
        &self.paths
    }

    /// Record that the VM runs (after a snapshot was loaded and resumed).
    pub fn mark_running(&mut self) -> Result<(), LaunchError> {
        self.state.phase = Phase::Running;
        self.state.write(&self.paths)
    }

    /// QEMU's exit status once it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.qemu.try_wait().ok().flatten()
    }

    /// QEMU's exit, to wait on with other descriptors (readable once it exited).
    pub fn qemu_exit(&self) -> Option<&ProcessWatch> {
        self.qemu_exit.as_ref()
    }

    /// The store server's exit, likewise (a VM with its store over virtio-fs has one).
    pub fn server_exit(&self) -> Option<&ProcessWatch> {
        self.server_exit.as_ref()
    }

    /// The store server's pid, and how it ended if it has (reaping it).
    pub fn server_status(&mut self) -> Option<(u32, Option<ExitStatus>)> {
        let s = self.server.as_mut()?;
        Some((s.pid(), s.try_wait().ok().flatten()))
    }

    /// Stop the VM in order and clean up (store server, cgroup, state file). Idempotent.
    pub fn stop(&mut self, grace: Duration) -> Result<(), LaunchError> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let pid = self.qemu.pid();
        let paths = self.paths.clone();
        let exit = self.qemu_exit.as_ref();
        let gone = |d: Deadline| exit.is_none_or(|w| w.wait(d));
        orderly_shutdown(&paths, pid, grace, &gone);
        // Whatever QMP achieved, make sure: SIGTERM, then SIGKILL; always reaped.
        let _ = self.qemu.stop(TERM_GRACE);
        // QEMU is gone: its console's last bytes are in the log.
        if let Some(mut pump) = self.console.take() {
            pump.finish();
        }
        if let Some(server) = self.server.take() {
            if let Err(e) = server.stop() {
                tracing::warn!("stopping the store server: {e}");
            }
        }
        for server in self.share_servers.drain(..) {
            if let Err(e) = server.stop() {
                tracing::warn!("stopping a shared folder's server: {e}");
            }
        }
        if let Some(cg) = self.cgroup.take() {
            cg.remove();
        }
        let _ = std::fs::remove_file(self.paths.state_file());
        let _ = std::fs::remove_file(self.paths.qmp_socket());
        let _ = std::fs::remove_file(self.paths.console_socket());
        Ok(())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.stop(Duration::from_millis(500));
    }
}

/// QMP powerdown, wait up to `grace`; QMP quit, wait; each step only if the VM is still there.
/// `gone` waits until QEMU has exited (`true`) or the deadline passes (`false`). Signals are
/// the caller's last resort.
pub fn orderly_shutdown(
    paths: &VmPaths,
    pid: u32,
    grace: Duration,
    gone: &dyn Fn(Deadline) -> bool,
) {
    let wait = |gone: &dyn Fn(Deadline) -> bool, d: Duration| gone(Deadline::after(d));
    if gone(Deadline::after(Duration::ZERO)) {
        return;
    }
    match Qmp::connect(&paths.qmp_socket(), QMP_CONNECT) {
        Ok(mut qmp) => {
            if !grace.is_zero() {
                match qmp.powerdown() {
                    Ok(()) => {
                        drop(qmp);
                        if wait(gone, grace) {
                            tracing::debug!(pid, "guest powered off");
                            return;
                        }
                    }
                    Err(e) => tracing::debug!(pid, "system_powerdown: {e}"),
                }
                match Qmp::connect(&paths.qmp_socket(), QMP_CONNECT) {
                    Ok(q) => qmp = q,
                    Err(e) => {
                        tracing::debug!(pid, "QMP after powerdown: {e}");
                        return;
                    }
                }
            }
            if let Err(e) = qmp.quit() {
                tracing::debug!(pid, "quit: {e}");
            }
            drop(qmp);
            if wait(gone, QUIT_GRACE) {
                tracing::debug!(pid, "QEMU quit");
            }
        }
        Err(e) => tracing::debug!(pid, "no QMP ({e}); falling back to signals"),
    }
}

/// Stop a VM owned by another process (from its `state.json`): the orderly sequence, then
/// SIGTERM and SIGKILL to QEMU; the owner notices QEMU's exit and cleans up. Waits (bounded)
/// for the owner to finish, and kills it, its store server and QEMU if it does not.
pub fn stop_remote(
    paths: &VmPaths,
    state: &VmState,
    grace: Duration,
    force: bool,
) -> Result<(), LaunchError> {
    // QEMU's QMP socket is in these folders: talk to it only if they are this user's alone.
    paths.check_private().map_err(LaunchError::NotPrivate)?;
    let pid = state.qemu_pid;
    // A state file is read back from disk: obey it only for processes that are this VM's.
    let qemu_ours = is_vm_process(pid, paths, ProcessRole::Qemu);
    let qemu_exit = ProcessWatch::open(pid, state.qemu_start_ticks);
    let gone = |d: Deadline| !qemu_ours || qemu_exit.as_ref().is_none_or(|w| w.wait(d));
    if !qemu_ours && state.qemu_alive() {
        tracing::warn!(
            "{}: pid {pid} is not this VM's QEMU (its command line does not name {}); not signalling it",
            paths.state_file().display(),
            paths.dir.display()
        );
    }
    if !force {
        orderly_shutdown(paths, pid, grace, &gone);
    }
    for (sig, wait) in [
        (libc::SIGTERM, TERM_GRACE),
        (libc::SIGKILL, Duration::from_secs(2)),
    ] {
        if gone(Deadline::after(Duration::ZERO)) {
            break;
        }
        if force && sig == libc::SIGTERM {
            continue;
        }
        signal(pid, sig)?;
        gone(Deadline::after(wait));
    }
    // The owner cleans up after QEMU; give it a moment, then make sure nothing is left.
    if state.supervisor_pid != std::process::id() {
        if let Some(w) = ProcessWatch::open(state.supervisor_pid, state.supervisor_start_ticks) {
            w.wait(Deadline::after(Duration::from_secs(5)));
        }
    }
    let owner = Some((state.supervisor_pid, state.supervisor_start_ticks));
    let server = state.server_pid.map(|p| (p, state.server_start_ticks));
    for (p, ticks) in [owner, server].into_iter().flatten() {
        if p != std::process::id()
            && same_process_alive(p, ticks)
            && is_vm_process(p, paths, ProcessRole::Drydock)
        {
            signal(p, libc::SIGKILL)?;
        }
    }
    if let Some(cg) = state.cgroup.as_deref().filter(|cg| is_vm_cgroup(cg)) {
        remove_cgroup(cg);
    }
    let _ = std::fs::remove_file(paths.state_file());
    let _ = std::fs::remove_file(paths.qmp_socket());
    let _ = std::fs::remove_file(paths.console_socket());
    let _ = std::fs::remove_file(paths.fs_socket());
    let _ = std::fs::remove_file(crate::storefs::control_socket(&paths.fs_socket()));
    Ok(())
}

/// How long [`remove_cgroup`] tries, and how often.
const CGROUP_RELEASE: Duration = Duration::from_secs(5);
const CGROUP_RETRY: Duration = Duration::from_millis(20);

/// Remove the cgroup a VM named `name` would have had, had this process started it, if it is
/// there and empty: what an owner killed before it recorded its VM's state left (a cgroup with
/// a task in it is not removed).
pub fn remove_stale_cgroup(name: &str) {
    if let Some(cg) = VmCgroup::path_for(name).filter(|p| p.is_dir() && is_vm_cgroup(p)) {
        remove_cgroup(&cg);
    }
}

/// Remove a VM's cgroup once its QEMU is gone. A QEMU killed with its owner (not our child)
/// may still be exiting, its memory being torn down, and the kernel refuses to remove a cgroup
/// with a task in it (EBUSY) until the task is released, which nothing signals: a back-off,
/// bounded by [`CGROUP_RELEASE`].
fn remove_cgroup(cg: &Path) {
    let deadline = Deadline::after(CGROUP_RELEASE);
    loop {
        match std::fs::remove_dir(cg) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && !deadline.expired() => {
                std::thread::sleep(CGROUP_RETRY.min(deadline.remaining()));
            }
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!("cannot remove the cgroup {}: {e}", cg.display());
                return;
            }
            _ => return,
        }
    }
}

/// Which of a VM's processes a pid from its state file should be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProcessRole {
    /// QEMU: its command line names the VM's folder (console log, pid file).
    Qemu,
    /// The owner (`vm run` or `__vm-supervise`) or the store server: a drydock process.
    Drydock,
}

/// Whether `pid` plays `role` for the VM of `paths` (read from `/proc/PID/cmdline`), so that a
/// state file edited to name another process makes drydock signal nothing.
fn is_vm_process(pid: u32, paths: &VmPaths, role: ProcessRole) -> bool {
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = raw.split(|&b| b == 0).filter(|a| !a.is_empty()).collect();
    match role {
        ProcessRole::Qemu => {
            let dir = paths.dir.as_os_str().as_encoded_bytes();
            args.iter().any(|a| a.windows(dir.len()).any(|w| w == dir))
        }
        ProcessRole::Drydock => args.first().is_some_and(|argv0| {
            Path::new(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(argv0))
                .file_name()
                .is_some_and(|n| n.as_encoded_bytes().starts_with(b"drydock"))
        }),
    }
}

/// Whether a cgroup path from a state file is one drydock makes for a VM (`drydock-vm-NAME`
/// under the cgroup file system), before removing it.
fn is_vm_cgroup(cg: &Path) -> bool {
    cg.starts_with("/sys/fs/cgroup")
        && cg
            .file_name()
            .is_some_and(|n| n.as_encoded_bytes().starts_with(b"drydock-vm-"))
        && !cg
            .components()
            .any(|c| c == std::path::Component::ParentDir)
}

/// SIGKILL a process of ours (a supervisor that never got going); gone already is fine.
pub fn kill_process(pid: u32) {
    if let Err(e) = signal(pid, libc::SIGKILL) {
        tracing::warn!("{e}");
    }
}

fn signal(pid: u32, sig: i32) -> Result<(), LaunchError> {
    match drydock_gc::send_signal(pid, sig) {
        Err(e) if e.raw_os_error() != Some(libc::ESRCH) => {
            Err(LaunchError::Signal { pid, source: e })
        }
        _ => Ok(()),
    }
}

/// `vm logs`: the console log of the VM `name` under `state_dir` (its rotated part first), line
/// by line to `echo` (the unfinished last line too); with `follow_it`, then every new line
/// until the VM's QEMU is gone, `cancel` is set or `echo` says to stop (returns `false`: its
/// reader went away), blocked on inotify and QEMU's pidfd between lines. Returns whether
/// `cancel` ended it. Lines are handed on as the guest wrote them: the caller shows them
/// escaped ([`crate::escape_control`]). A VM without a console log is bad input.
pub fn follow_console(
    state_dir: &Path,
    name: &str,
    follow_it: bool,
    cancel: &Cancel,
    echo: &mut dyn FnMut(&str) -> bool,
) -> Result<bool, LaunchError> {
    crate::plan::validate_name(name)?;
    let paths = VmPaths::in_state_dir(state_dir, name);
    let log = paths.console_log();
    if !log.exists() {
        return Err(LaunchError::NoConsoleLog {
            name: name.to_owned(),
            path: log,
        });
    }
    let mut tail = ConsoleTail::with_rotated(log);
    // Followed: until the VM's QEMU is gone. A VM that is not running is read to its end.
    let qemu = follow_it
        .then(|| VmState::read(&paths))
        .flatten()
        .and_then(|s| ProcessWatch::open(s.qemu_pid, s.qemu_start_ticks));
    let Some(qemu) = qemu else {
        for l in tail.lines() {
            if !echo(&l) {
                return Ok(false);
            }
        }
        if let Some(r) = tail.rest() {
            echo(&r);
        }
        return Ok(false);
    };
    let end = follow(&mut tail, None, None, cancel, Some(&qemu), echo);
    Ok(end == WaitOutcome::Cancelled && cancel.is_set())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::proc::pid_alive;

    #[test]
    fn a_vms_console_is_read_until_its_reader_goes() {
        let d = tempfile::tempdir().unwrap();
        let paths = VmPaths::in_state_dir(d.path(), "v");
        std::fs::create_dir_all(&paths.dir).unwrap();
        std::fs::write(paths.console_log(), "one\ntwo\nthree").unwrap();
        let no = Cancel::new();
        let read = |follow_it: bool, take: usize| {
            let mut seen = Vec::new();
            follow_console(d.path(), "v", follow_it, &no, &mut |l| {
                seen.push(l.to_string());
                seen.len() < take
            })
            .map(|_| seen)
        };
        assert_eq!(read(false, 9).unwrap(), ["one", "two", "three"]);
        assert_eq!(
            read(false, 2).unwrap(),
            ["one", "two"],
            "the reader went away"
        );
        // Followed, it ends once the VM is not running (it has no state file here).
        assert_eq!(read(true, 9).unwrap(), ["one", "two", "three"]);
        // Its rotated part is read first.
        std::fs::write(crate::console::rotated(&paths.console_log()), "zero\n").unwrap();
        assert_eq!(read(false, 9).unwrap(), ["zero", "one", "two", "three"]);
        for (name, says) in [
            ("w", "no console log for a VM named w"),
            ("../x", "invalid"),
        ] {
            let e = follow_console(d.path(), name, false, &no, &mut |_| true).unwrap_err();
            assert!(e.is_bad_input() && e.to_string().contains(says), "{e}");
        }
    }

    #[test]
    fn liveness_of_processes() {
        assert!(pid_alive(std::process::id()));
        let mut c = Command::new("true").spawn().unwrap();
        let pid = c.id();
        c.wait().unwrap();
        assert!(!pid_alive(pid));
    }

    #[test]
    fn a_recycled_pid_is_not_the_same_process() {
        let me = std::process::id();
        let ticks = process_start_ticks(me).unwrap();
        assert!(same_process_alive(me, Some(ticks)));
        assert!(same_process_alive(me, None));
        assert!(!same_process_alive(me, Some(ticks + 1)));
    }
}
