//! Launch resolution: a plain request (a system or a kernel, what of the store to share and how,
//! the accelerator, QEMU, disk, memory, CPUs) becomes a [`LaunchRecord`] in one call, which the
//! `launcher` makes for every new launch (`vm run`, each machine of a cluster). It resolves the
//! system, reads its closure from Nix's database, builds (or finds) the store image, chooses the
//! accelerator, finds QEMU (the only reader of `DRYDOCK_QEMU`), and checks the plan. It starts
//! nothing: spawning is `launch`'s job.

use std::path::{Path, PathBuf};
use std::time::Instant;

use drydock_gc::{NixDb, NixDbError, StoreLayout};

use crate::doctor::Finding;
use crate::host::Host;
use crate::image::{ImageError, StoreImage, closure_key, ensure_store_image};
use crate::launch::{LaunchRecord, StoreShare};
use crate::plan::{
    Accel, DirShare, Disk, GuestDevices, PlanError, ShareTransport, StoreAttachment, VmPaths,
    VmSpec,
};
use crate::profile::{FstabError, GuestNeeds, Profile, ShareTag, Transport};
use crate::reginfo::{RegInfoError, ensure_reginfo};
use crate::system::SystemError;

/// What to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Boot {
    /// A NixOS-shaped toplevel, as given by the user (logical or physical path, or a link).
    System(String),
    /// A kernel and an optional initrd; the command line is `append` alone.
    Kernel {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
    },
}

/// How much of the store the guest sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Share {
    /// Only the system's closure (from Nix's database).
    Closure,
    /// Every path of the store.
    Store,
}

/// How the store reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreMode {
    /// virtio-fs from drydock's in-process server.
    VirtioFs,
    /// The closure packed into a read-only EROFS image.
    Image,
}

/// How the store reaches the guest, as resolved.
enum Via {
    VirtioFs,
    Image,
    NineP,
}

/// Which accelerator the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    /// KVM when every doctor KVM check passes (the execution probe included), else TCG.
    Auto,
    Kvm,
    Tcg,
}

impl AccelChoice {
    /// The word `--accel` takes for this choice.
    pub fn as_arg(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }
}

/// A launch as the user asked for it.
#[derive(Debug, Clone)]
pub struct LaunchRequest {
    pub name: String,
    pub boot: Boot,
    /// Words added to the system's command line (or the whole command line of a kernel).
    pub append: Option<String>,
    pub share: Share,
    pub store_mode: StoreMode,
    pub accel: AccelChoice,
    /// `--qemu`; else `DRYDOCK_QEMU`, else `qemu-system-x86_64` on `PATH`.
    pub qemu: Option<PathBuf>,
    pub memory_mib: u32,
    pub cpus: u32,
    pub disk_size_mib: u32,
    /// A cluster machine's NICs, backdoor and firmware config (default: none).
    pub devices: GuestDevices,
    /// Launch even when the guest asks for more memory than the host has (`--allow-overcommit`).
    pub allow_overcommit: bool,
    /// Which devices the guest gets.
    pub profile: Profile,
    /// The folder a nixos-test node's `shared` tag shows (a cluster's, shared by its
    /// machines); `None`: a folder of the VM's own (`VMDIR/shared`).
    pub shared_dir: Option<PathBuf>,
}

/// A resolved launch, and what it took.
#[derive(Debug)]
pub struct Resolved {
    pub record: LaunchRecord,
    /// The store image, with `--store-mode image`, and how long getting it took.
    pub image: Option<(StoreImage, usize, std::time::Duration)>,
}

/// Why a request cannot become a launch.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("QEMU not found: {} does not exist", .0.display())]
    QemuMissing(PathBuf),
    #[error(
        "QEMU not found: qemu-system-x86_64 is not on PATH (install qemu-system-x86, or name it with --qemu / DRYDOCK_QEMU)"
    )]
    QemuNotOnPath,
    #[error("--accel kvm: KVM is not usable here: {} [{}]{}", .0.summary, .0.id, .0.fix.as_ref().map(|x| format!("\n  fix: {x}")).unwrap_or_default())]
    KvmUnusable(Box<Finding>),
    #[error("--system")]
    System(#[source] SystemError),
    #[error("{flag} {}: no such file", path.display())]
    NoSuchFile { flag: &'static str, path: PathBuf },
    #[error("vm run needs --system TOPLEVEL or --kernel K --initrd I")]
    NothingToBoot,
    #[error(
        "--share closure needs the Nix database, and {} does not exist (is {} a Nix store?)",
        db.display(),
        store.display()
    )]
    NoDatabase { db: PathBuf, store: PathBuf },
    #[error("--system {toplevel}: not registered in the Nix database {}", db.display())]
    NotRegistered { toplevel: String, db: PathBuf },
    #[error("reading the Nix database")]
    NixDb(#[source] NixDbError),
    #[error("the store {} does not exist", .0.display())]
    NoStore(PathBuf),
    #[error("--store-mode image packs the system's closure: it needs --system and --share closure")]
    ImageNeedsClosure,
    #[error("the store image")]
    Image(#[source] ImageError),
    #[error(transparent)]
    Plan(PlanError),
    #[error("the nixos-test profile boots a system (--system TOPLEVEL), not a bare kernel")]
    ProfileNeedsSystem,
    #[error(
        "the nixos-test profile takes the store as the guest's fstab says (9p or virtio-fs): drop --store-mode image"
    )]
    ProfileStoreMode,
    #[error(
        "{toplevel}/etc/fstab: no such file: the nixos-test profile provides what the system's fstab names (a NixOS toplevel has one)"
    )]
    NoFstab { toplevel: String },
    #[error("{fstab}")]
    Fstab {
        fstab: String,
        #[source]
        source: FstabError,
    },
    #[error("the guest's fstab")]
    ReadFstab(#[source] drydock_gc::ReadFileError),
    #[error("the registration of the closure (regInfo=)")]
    RegInfo(#[source] RegInfoError),
}

impl ResolveError {
    /// Whether the request itself is at fault (exit 2).
    pub fn is_bad_input(&self) -> bool {
        match self {
            Self::System(e) => e.is_bad_input(),
            Self::NixDb(e) => e.is_bad_input(),
            Self::Image(e) => e.is_bad_input(),
            Self::Plan(e) => e.is_bad_input(),
            Self::RegInfo(e) => e.is_bad_input(),
            Self::KvmUnusable(_) => false,
            _ => true,
        }
    }
}

/// The QEMU to run: `explicit` (`--qemu`), else `$DRYDOCK_QEMU`, else `qemu-system-x86_64` on
/// `PATH`. The one place that reads `DRYDOCK_QEMU`.
pub fn find_qemu(explicit: Option<&Path>) -> Result<PathBuf, ResolveError> {
    if let Some(p) = configured_qemu(explicit) {
        return if p.is_file() {
            Ok(p)
        } else {
            Err(ResolveError::QemuMissing(p))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("qemu-system-x86_64"))
        .find(|p| p.is_file())
        .ok_or(ResolveError::QemuNotOnPath)
}

/// The QEMU named by `explicit` or `$DRYDOCK_QEMU`, unchecked (doctor reports on it itself).
pub fn configured_qemu(explicit: Option<&Path>) -> Option<PathBuf> {
    explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("DRYDOCK_QEMU").map(PathBuf::from))
        .filter(|p| !p.as_os_str().is_empty())
}

/// The accelerator, and why (shown when the VM starts).
pub fn choose_accel(choice: AccelChoice, host: &Host) -> Result<(Accel, String), ResolveError> {
    match choice {
        AccelChoice::Tcg => Ok((Accel::Tcg, "--accel tcg".into())),
        AccelChoice::Kvm => match crate::doctor::kvm_usable(host) {
            Ok(()) => Ok((Accel::Kvm, "--accel kvm".into())),
            Err(f) => Err(ResolveError::KvmUnusable(Box::new(f))),
        },
        AccelChoice::Auto => match crate::doctor::kvm_usable(host) {
            Ok(()) => Ok((Accel::Kvm, "KVM checks passed".into())),
            Err(f) => Ok((Accel::Tcg, format!("TCG because {} [{}]", f.summary, f.id))),
        },
    }
}

/// Machines asking for `machines` (name, MiB) must fit this host's memory (`MemTotal` of
/// `/proc/meminfo`; see [`crate::plan::check_memory`]), unless `allow_overcommit`. A host
/// whose memory cannot be read is not a reason to refuse.
pub fn check_host_memory(
    machines: &[(String, u32)],
    allow_overcommit: bool,
) -> Result<(), PlanError> {
    if allow_overcommit {
        return Ok(());
    }
    match Host::system().memory_mib() {
        Some(host_mib) => crate::plan::check_memory(machines, host_mib),
        None => {
            tracing::warn!("cannot read the host's memory from /proc/meminfo; not checked");
            Ok(())
        }
    }
}

/// Where store images and the blank base disks live: shared by every VM of a state dir.
pub fn images_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("images")
}

/// Turn `req` into the launch record of the VM `paths`, in the store `layout`, with drydock's
/// state in `state_dir`; `exe` is the drydock binary (re-executed as the store server).
pub fn resolve_launch(
    layout: &StoreLayout,
    state_dir: &Path,
    paths: &VmPaths,
    req: &LaunchRequest,
    exe: &Path,
) -> Result<Resolved, ResolveError> {
    check_host_memory(&[(req.name.clone(), req.memory_mib)], req.allow_overcommit)
        .map_err(ResolveError::Plan)?;
    let qemu = find_qemu(req.qemu.as_deref())?;
    let (kernel, initrd, mut cmdline, toplevel) = match &req.boot {
        Boot::System(sys) => {
            let top = crate::system::toplevel_path(layout, sys).map_err(ResolveError::System)?;
            let boot = crate::system::resolve_system(layout, &top).map_err(ResolveError::System)?;
            (boot.kernel, Some(boot.initrd), boot.cmdline, Some(top))
        }
        Boot::Kernel { kernel, initrd } => {
            for (flag, p) in [("--kernel", Some(kernel)), ("--initrd", initrd.as_ref())] {
                if let Some(p) = p.filter(|p| !p.is_file()) {
                    return Err(ResolveError::NoSuchFile {
                        flag,
                        path: p.clone(),
                    });
                }
            }
            let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
            (abs(kernel), initrd.as_deref().map(abs), String::new(), None)
        }
    };
    if let Some(extra) = &req.append {
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str(extra);
    }
    let needs = match req.profile {
        Profile::Drydock => None,
        Profile::NixosTest => Some(nixos_test_needs(layout, req, toplevel.as_ref())?),
    };
    // The closure: the closure-only view shows it, and a nixos-test node's regInfo lists it.
    let closure = match (&toplevel, req.share == Share::Closure || needs.is_some()) {
        (Some(top), true) => Some(closure_of(layout, top)?),
        _ => None,
    };
    let mut allow = match (req.share, &toplevel) {
        (Share::Store, _) => None,
        (Share::Closure, Some(_)) => closure.clone(),
        // A bare kernel has no closure to compute: it sees nothing of the store unless asked.
        (Share::Closure, None) => Some(Vec::new()),
    };
    let mut reginfo = None;
    if let (Some(_), Some(closure)) = (&needs, &closure) {
        let path = ensure_reginfo(layout, &images_dir(state_dir), closure)
            .map_err(ResolveError::RegInfo)?;
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str(&format!("regInfo={path}/registration"));
        if let (Some(allow), Some(name)) = (allow.as_mut(), path.rsplit('/').next()) {
            allow.push(name.to_string());
        }
        reginfo = Some(path);
    }
    if !layout.store_dir.is_dir() && (toplevel.is_some() || req.share == Share::Store) {
        return Err(ResolveError::NoStore(layout.store_dir.clone()));
    }
    let (accel, accel_reason) = choose_accel(req.accel, &Host::system())?;
    let closure_key = allow.as_deref().map(closure_key);
    let images = images_dir(state_dir);
    let mut image_report = None;
    // How the store reaches the guest: as asked, or as a nixos-test node's fstab says.
    let store_over = match &needs {
        None => Some(match req.store_mode {
            StoreMode::VirtioFs => Via::VirtioFs,
            StoreMode::Image => Via::Image,
        }),
        Some(n) => n.transport(ShareTag::Store).map(|t| match t {
            Transport::VirtioFs => Via::VirtioFs,
            Transport::NineP => Via::NineP,
        }),
    };
    let (store, share) = match store_over {
        None => (StoreAttachment::None, None),
        Some(Via::NineP) => (
            StoreAttachment::NineP {
                path: layout.store_dir.clone(),
            },
            None,
        ),
        Some(Via::VirtioFs) => (
            StoreAttachment::VirtioFs {
                socket: paths.fs_socket(),
            },
            Some(StoreShare {
                exe: exe.to_path_buf(),
                shared_dir: layout.store_dir.clone(),
                allow,
            }),
        ),
        Some(Via::Image) => {
            let Some(closure) = allow else {
                return Err(ResolveError::ImageNeedsClosure);
            };
            let t = Instant::now();
            let image = ensure_store_image(&layout.store_dir, &closure, &images)
                .map_err(ResolveError::Image)?;
            let path = image.path.clone();
            image_report = Some((image, closure.len(), t.elapsed()));
            (StoreAttachment::Image { path }, None)
        }
    };
    let defaults = GuestNeeds {
        root_label: Some(String::new()),
        shares: Vec::new(),
    };
    let guest = needs.as_ref().unwrap_or(&defaults);
    let disk = guest.root_label.as_ref().map(|label| {
        let nixos = needs.is_some();
        let base = if nixos {
            format!("ext4-{label}-{}M.qcow2", req.disk_size_mib)
        } else {
            format!("blank-{}M.qcow2", req.disk_size_mib)
        };
        Disk {
            overlay: paths.overlay(),
            base: images.join(base),
            size_mib: req.disk_size_mib,
            label: nixos.then(|| label.clone()),
            serial: nixos.then(|| "root".to_string()),
        }
    });
    let shares = guest
        .shares
        .iter()
        .filter(|s| s.tag != ShareTag::Store)
        .map(|s| DirShare {
            tag: s.tag.tag().to_string(),
            dir: match (s.tag, &req.shared_dir) {
                (ShareTag::Shared, Some(dir)) => dir.clone(),
                _ => paths.dir.join(s.tag.tag()),
            },
            transport: match s.transport {
                Transport::NineP => ShareTransport::NineP,
                Transport::VirtioFs => ShareTransport::VirtioFs {
                    socket: paths.share_socket(s.tag.tag()),
                    exe: exe.to_path_buf(),
                },
            },
        })
        .collect();
    let mut devices = req.devices.clone();
    devices.user_net = needs.is_some();
    let spec = VmSpec {
        name: req.name.clone(),
        qemu,
        kernel,
        initrd,
        cmdline,
        memory_mib: req.memory_mib,
        cpus: req.cpus,
        accel,
        store,
        disk,
        paths: paths.clone(),
        devices,
        shares,
    };
    crate::plan::plan(&spec).map_err(ResolveError::Plan)?;
    Ok(Resolved {
        record: LaunchRecord {
            spec,
            share,
            store: toplevel.is_some().then(|| layout.clone()),
            toplevel: toplevel.map(|t| layout.logical(&t)),
            accel_reason,
            run_id: None,
            shared_run: false,
            closure_key,
            profile: req.profile,
            reginfo,
        },
        image: image_report,
    })
}

/// The closure of `top` (store path basenames), from Nix's database.
fn closure_of(
    layout: &StoreLayout,
    top: &drydock_gc::StorePath,
) -> Result<Vec<String>, ResolveError> {
    if !layout.has_database() {
        return Err(ResolveError::NoDatabase {
            db: layout.db_path(),
            store: layout.store_dir.clone(),
        });
    }
    let db = NixDb::open(layout).map_err(ResolveError::NixDb)?;
    let closure = db
        .closure_of(top)
        .map_err(ResolveError::NixDb)?
        .ok_or_else(|| ResolveError::NotRegistered {
            toplevel: layout.logical(top),
            db: layout.db_path(),
        })?;
    Ok(closure.iter().map(|p| p.base_name().to_string()).collect())
}

/// What a nixos-test node's fstab (`TOPLEVEL/etc/fstab`) asks for.
fn nixos_test_needs(
    layout: &StoreLayout,
    req: &LaunchRequest,
    toplevel: Option<&drydock_gc::StorePath>,
) -> Result<GuestNeeds, ResolveError> {
    let Some(top) = toplevel else {
        return Err(ResolveError::ProfileNeedsSystem);
    };
    if req.store_mode == StoreMode::Image {
        return Err(ResolveError::ProfileStoreMode);
    }
    let top = layout.logical(top);
    let fstab = format!("{top}/etc/fstab");
    let physical = crate::system::resolve_logical(layout, &fstab).map_err(|e| match e {
        SystemError::Missing { .. } => ResolveError::NoFstab {
            toplevel: top.clone(),
        },
        other => ResolveError::System(other),
    })?;
    let text = drydock_gc::read_regular(&physical, drydock_gc::Links::Refuse, 1 << 20)
        .map_err(ResolveError::ReadFstab)?;
    crate::profile::parse_fstab(&String::from_utf8_lossy(&text))
        .map_err(|source| ResolveError::Fstab { fstab, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(boot: Boot) -> LaunchRequest {
        LaunchRequest {
            name: "t".into(),
            boot,
            append: Some("console=ttyS0 quiet".into()),
            share: Share::Closure,
            store_mode: StoreMode::VirtioFs,
            accel: AccelChoice::Tcg,
            qemu: Some(PathBuf::from("/bin/sh")),
            memory_mib: 256,
            cpus: 1,
            disk_size_mib: 64,
            devices: GuestDevices::default(),
            allow_overcommit: false,
            profile: Profile::Drydock,
            shared_dir: None,
        }
    }

    #[test]
    fn requests_resolve_or_name_the_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = dir.path().join("vmlinuz");
        std::fs::write(&kernel, b"k").unwrap();
        std::fs::create_dir_all(dir.path().join("store/nix/store")).unwrap();
        let layout = StoreLayout::chroot(dir.path().join("store"));
        let state = dir.path().join("state");
        let paths = VmPaths::in_state_dir(&state, "t");

        // A bare kernel: its command line is `append`, it sees nothing of the store, TCG as asked.
        let exe = Path::new("/bin/true");
        let ok = resolve_launch(
            &layout,
            &state,
            &paths,
            &request(Boot::Kernel {
                kernel: kernel.clone(),
                initrd: None,
            }),
            exe,
        )
        .unwrap();
        let r = &ok.record;
        assert_eq!(r.spec.cmdline, "console=ttyS0 quiet");
        assert_eq!(r.spec.accel, Accel::Tcg);
        assert_eq!(r.share.as_ref().unwrap().allow, Some(Vec::new()));
        assert_eq!(r.toplevel, None);
        assert_eq!(
            r.spec.disk.as_ref().unwrap().base,
            state.join("images/blank-64M.qcow2")
        );
        assert!(r.check_paths(&paths).is_ok());

        // Each bad input, with the variant that names it.
        let cases: Vec<(LaunchRequest, &str)> = vec![
            (
                LaunchRequest {
                    qemu: Some(dir.path().join("no-qemu")),
                    ..request(Boot::Kernel {
                        kernel: kernel.clone(),
                        initrd: None,
                    })
                },
                "no-qemu does not exist",
            ),
            (
                request(Boot::Kernel {
                    kernel: dir.path().join("missing"),
                    initrd: None,
                }),
                "--kernel",
            ),
            (
                request(Boot::Kernel {
                    kernel: kernel.clone(),
                    initrd: Some(dir.path().join("missing-initrd")),
                }),
                "--initrd",
            ),
            (
                LaunchRequest {
                    store_mode: StoreMode::Image,
                    share: Share::Store,
                    ..request(Boot::Kernel {
                        kernel: kernel.clone(),
                        initrd: None,
                    })
                },
                "--store-mode image",
            ),
            (
                LaunchRequest {
                    memory_mib: 1,
                    ..request(Boot::Kernel {
                        kernel: kernel.clone(),
                        initrd: None,
                    })
                },
                "memory",
            ),
            (
                request(Boot::System("/nix/store/nothing".into())),
                "--system",
            ),
        ];
        for (req, says) in cases {
            let e = resolve_launch(&layout, &state, &paths, &req, exe).unwrap_err();
            let text = format!(
                "{e} {}",
                std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            );
            assert!(e.is_bad_input(), "{text}");
            assert!(text.contains(says), "{text} should name {says}");
        }
    }
}
