//! QEMU: the binary, its version, whether it has `vhost-user-fs-pci` (virtio-fs) and
//! `memory-backend-memfd` (shared guest memory for vhost-user), whether `memfd_create` works,
//! whether it has TCG (`qemu.tcg`, present only when it has not), whether it can snapshot VMs
//! with virtio-fs devices (cluster machines: migrating vhost-user-fs needs QEMU ≥ 8.2, see
//! [`crate::qemu_can_migrate_virtiofs`]), and how big `/dev/shm` is.
//!
//! Asking QEMU costs four process starts (~40 ms), so the answers are cached in the state
//! directory, keyed by the binary's path, size, inode and modification time, like libvirt's
//! capabilities cache: a changed or replaced QEMU is asked again.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{Finding, Status, gib};
use crate::host::Host;
use crate::spawn as command;

const DEADLINE: Duration = Duration::from_secs(10);

fn run(bin: &Path, args: &[&str]) -> Result<String, String> {
    let mut c = Command::new(bin);
    c.args(args);
    match command::run_captured(c, DEADLINE) {
        Ok(r) if r.code == Some(0) => Ok(r.stdout),
        Ok(r) if r.timed_out => Err(format!("`{} {}` timed out", bin.display(), args.join(" "))),
        Ok(r) => Err(format!(
            "`{} {}` failed: {}",
            bin.display(),
            args.join(" "),
            r.stderr.trim()
        )),
        Err(e) => Err(format!("cannot run {}: {e}", bin.display())),
    }
}

/// What QEMU said about itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Caps {
    key: String,
    version: String,
    vhost_user_fs: bool,
    memfd_backend: bool,
    /// The accelerators `-accel help` lists; `None` when QEMU could not say.
    accels: Option<Vec<String>>,
    /// Whether its version migrates vhost-user-fs devices (snapshots of virtio-fs VMs).
    virtiofs_migration: bool,
}

/// The accelerators in `-accel help`'s answer ("Accelerators supported in QEMU binary:" and
/// one name a line).
fn parse_accels(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.ends_with(':'))
        .map(str::to_string)
        .collect()
}

fn cache_key(bin: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(bin).ok()?;
    // `v3`: the answers include the accelerators (v2) and virtio-fs migration (v3); older
    // entries are asked again.
    Some(format!(
        "v3:{}:{}:{}:{}:{}",
        bin.display(),
        m.size(),
        m.ino(),
        m.mtime(),
        m.mtime_nsec()
    ))
}

fn ask(bin: &Path, key: String) -> Result<Caps, String> {
    // Four independent questions, asked at once.
    let b1 = bin.to_path_buf();
    let b2 = bin.to_path_buf();
    let b3 = bin.to_path_buf();
    let dev = std::thread::spawn(move || run(&b1, &["-machine", "none", "-device", "help"]));
    let obj = std::thread::spawn(move || run(&b2, &["-machine", "none", "-object", "help"]));
    let acc = std::thread::spawn(move || run(&b3, &["-accel", "help"]));
    // The same question a snapshot records the answer of: one helper asks it.
    let version = crate::snapshot::qemu_version(bin).map_err(|e| crate::error_chain(&e));
    let devices = dev.join().unwrap_or_else(|_| Err("panicked".into()));
    let objects = obj.join().unwrap_or_else(|_| Err("panicked".into()));
    let accels = acc.join().unwrap_or_else(|_| Err("panicked".into()));
    let version = version?;
    Ok(Caps {
        key,
        virtiofs_migration: crate::qemu_can_migrate_virtiofs(&version),
        version,
        vhost_user_fs: devices.is_ok_and(|d| d.contains("\"vhost-user-fs-pci\"")),
        memfd_backend: objects.is_ok_and(|o| o.lines().any(|l| l.trim() == "memory-backend-memfd")),
        // An answer that names nothing says nothing either.
        accels: accels
            .ok()
            .map(|a| parse_accels(&a))
            .filter(|a| !a.is_empty()),
    })
}

/// The capabilities of `bin`, from the cache in `cache_dir` when it is still valid.
fn capabilities(bin: &Path, cache_dir: Option<&Path>) -> Result<Caps, String> {
    let key = cache_key(bin).ok_or_else(|| format!("{} does not exist", bin.display()))?;
    let file = cache_dir.map(|d| d.join("qemu-capabilities.json"));
    if let Some(f) = &file {
        if let Some(c) =
            drydock_gc::read_regular(f, drydock_gc::Links::Refuse, drydock_gc::MAX_STATE_BYTES)
                .ok()
                .and_then(|b| serde_json::from_slice::<Caps>(&b).ok())
        {
            if c.key == key {
                return Ok(c);
            }
        }
    }
    let caps = ask(bin, key)?;
    if let Some(f) = &file {
        // Best effort: an unwritable state dir only costs speed.
        // `STATE/cache`, made private like every folder of the state dir (a loose state dir
        // of another user's is left alone: the cache is only skipped).
        let dir = f.parent().unwrap_or(Path::new("."));
        let written = drydock_gc::private_tree(dir.parent().unwrap_or(dir), dir)
            .map_err(std::io::Error::other)
            .and_then(|()| {
                drydock_gc::write_atomic(f, &serde_json::to_vec(&caps).unwrap_or_default())
            });
        if let Err(e) = written {
            tracing::debug!("cannot cache QEMU capabilities in {}: {e}", f.display());
        }
    }
    Ok(caps)
}

pub(crate) fn check(host: &Host, bin: Option<&Path>, cache_dir: Option<&Path>) -> Vec<Finding> {
    let mut out = Vec::new();
    let bin: Option<PathBuf> = bin
        .map(Path::to_path_buf)
        .or_else(|| command::which("qemu-system-x86_64"));
    match bin {
        None => out.push(
            Finding::new("qemu", Status::Fail, "qemu-system-x86_64 not found on PATH")
                .fix("install QEMU (Debian/Ubuntu: `apt-get install qemu-system-x86`)"),
        ),
        Some(bin) => out.extend(check_binary(&bin, cache_dir)),
    }
    out.push(check_shm(host));
    out
}

/// `qemu`, and `qemu.tcg` when QEMU says it has no TCG.
fn check_binary(bin: &Path, cache_dir: Option<&Path>) -> Vec<Finding> {
    let caps = match capabilities(bin, cache_dir) {
        Ok(c) => c,
        Err(e) => {
            return vec![
                Finding::new(
                    "qemu",
                    Status::Fail,
                    format!("{} does not run", bin.display()),
                )
                .detail(e)
                .fix("reinstall QEMU"),
            ];
        }
    };
    let mut out = vec![check_features(bin, &caps)];
    if let Some(accels) = caps
        .accels
        .as_ref()
        .filter(|a| !a.iter().any(|x| x == "tcg"))
    {
        out.push(
            Finding::new("qemu.tcg", Status::Warn, "QEMU has no TCG: VMs run here only with KVM")
                .detail(format!("`{} -accel help` lists {}", bin.display(), accels.join(", ")))
                .fix("install a QEMU built with TCG (Debian/Ubuntu's qemu-system-x86 has it) where KVM cannot run guests"),
        );
    }
    out
}

/// `qemu`: its version and the features every launch needs.
fn check_features(bin: &Path, caps: &Caps) -> Finding {
    let version = &caps.version;
    let mut missing = Vec::new();
    if !caps.vhost_user_fs {
        missing.push("vhost-user-fs-pci (virtio-fs)");
    }
    if !caps.memfd_backend {
        missing.push("memory-backend-memfd");
    }
    if let Err(e) = crate::sys::fs::memfd_works() {
        missing.push("memfd_create");
        tracing::debug!("memfd_create failed: {e}");
    }
    let detail = format!("{}: {version}", bin.display());
    // A QEMU that cannot run virtio-fs machines cannot snapshot them either.
    let snapshots = caps.virtiofs_migration && missing.is_empty();
    let finding = if missing.is_empty() {
        Finding::new(
            "qemu",
            Status::Pass,
            format!(
                "{version}; vhost-user-fs-pci and memfd available; {}",
                virtiofs_snapshots(version, caps.virtiofs_migration)
            ),
        )
        .detail(detail)
    } else {
        Finding::new("qemu", Status::Fail, format!("QEMU lacks {}", missing.join(", ")))
            .detail(detail)
            .fix("install a QEMU built with vhost-user and virtio-fs support (QEMU ≥ 5.0; Debian's qemu-system-x86 has both), on Linux ≥ 3.17 for memfd")
    };
    finding.virtiofs_snapshots(snapshots)
}

/// Whether QEMU `version` (its `--version` line) can snapshot virtio-fs machines, in words.
fn virtiofs_snapshots(version: &str, can: bool) -> String {
    let what = "snapshots of virtio-fs machines (cluster snapshots)";
    if can {
        return format!("{what}: yes");
    }
    let why = match crate::QemuVersion::parse(version) {
        Some(v) => format!("QEMU {} cannot migrate vhost-user-fs devices", v.short()),
        None => "QEMU's version line names no version".to_string(),
    };
    format!(
        "{what}: no: {why}; needs {} or newer (Debian: bookworm-backports)",
        crate::VIRTIOFS_MIGRATION_MIN
    )
}

fn check_shm(host: &Host) -> Finding {
    match host.space("/dev/shm") {
        Ok((at, s)) => {
            let f = Finding::new(
                "host.shm",
                if s.total < 1 << 30 { Status::Warn } else { Status::Pass },
                format!("/dev/shm: {} of {} free", gib(s.available), gib(s.total)),
            )
            .detail(format!(
                "measured at {}; drydock backs guest memory with memfd (not /dev/shm), but tools that use memory-backend-file on /dev/shm are limited by it",
                at.display()
            ));
            if s.total < 1 << 30 {
                f.fix(
                    "enlarge it: `mount -o remount,size=4G /dev/shm` (containers: `--shm-size=4g`)",
                )
            } else {
                f
            }
        }
        Err(e) => Finding::new(
            "host.shm",
            Status::Warn,
            format!("cannot measure /dev/shm: {e}"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_fails_with_install_hint() {
        let d = tempfile::tempdir().unwrap();
        let f = check_binary(&d.path().join("qemu-system-x86_64"), None).remove(0);
        assert_eq!(f.status, Status::Fail);
        assert!(f.fix.unwrap().contains("QEMU"));
    }

    #[test]
    fn a_binary_without_virtiofs_is_named() {
        let d = tempfile::tempdir().unwrap();
        let fake = d.path().join("qemu");
        std::fs::write(&fake, "#!/bin/sh\ncase \"$*\" in *--version*) echo 'QEMU emulator version 2.0.0';; *-device*) echo 'name \"virtio-blk-pci\"';; *-object*) echo 'memory-backend-file';; esac\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let cache = d.path().join("cache");
        let found = check_binary(&fake, Some(&cache));
        let f = &found[0];
        assert_eq!(f.status, Status::Fail);
        assert!(f.summary.contains("vhost-user-fs-pci"), "{f:?}");
        assert!(f.summary.contains("memory-backend-memfd"), "{f:?}");
        assert!(f.detail.contains("2.0.0"));
        // Cached: the same answer without running it (even when it now fails to run)...
        assert!(cache.join("qemu-capabilities.json").exists());
        let before = std::fs::metadata(&fake).unwrap().modified().unwrap();
        std::fs::write(&fake, "#!/bin/sh\nexit 1\n").unwrap();
        let f2 = std::fs::File::options().write(true).open(&fake).unwrap();
        f2.set_modified(before).unwrap();
        drop(f2);
        // ...but the size changed, so the key no longer matches and QEMU is asked again.
        let f = check_binary(&fake, Some(&cache)).remove(0);
        assert!(f.summary.contains("does not run"), "{f:?}");
    }

    #[test]
    fn accelerators_from_accel_help() {
        assert_eq!(
            parse_accels("Accelerators supported in QEMU binary:\ntcg\nkvm\n"),
            ["tcg", "kvm"]
        );
        assert!(parse_accels("").is_empty());
    }

    /// A QEMU that answers every question, with `accels` for `-accel help`.
    fn fake_qemu(dir: &Path, accels: &str) -> PathBuf {
        fake_qemu_version(dir, accels, "7.2.0")
    }

    /// [`fake_qemu`] of version `version`.
    fn fake_qemu_version(dir: &Path, accels: &str, version: &str) -> PathBuf {
        let fake = dir.join("qemu");
        std::fs::write(&fake, format!("#!/bin/sh\ncase \"$*\" in *--version*) echo 'QEMU emulator version {version} (Debian)';; *-device*) echo 'name \"vhost-user-fs-pci\"';; *-object*) echo '  memory-backend-memfd';; *-accel*) printf 'Accelerators supported in QEMU binary:\\n{accels}';; esac\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        fake
    }

    #[test]
    fn a_qemu_without_tcg_is_a_finding_of_its_own() {
        let d = tempfile::tempdir().unwrap();
        let found = check_binary(&fake_qemu(d.path(), "kvm\\n"), None);
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].id, "qemu");
        assert_eq!(found[1].id, "qemu.tcg");
        assert_eq!(found[1].status, Status::Warn);
        assert!(found[1].detail.contains("lists kvm"), "{found:?}");
        let d = tempfile::tempdir().unwrap();
        let found = check_binary(&fake_qemu(d.path(), "tcg\\nkvm\\n"), None);
        assert_eq!(found.len(), 1, "{found:?}");
    }

    #[test]
    fn whether_virtiofs_machines_can_be_snapshotted() {
        for (version, can, says) in [
            (
                "7.2.22",
                false,
                "snapshots of virtio-fs machines (cluster snapshots): no: QEMU 7.2 cannot migrate vhost-user-fs devices; needs 8.2 or newer (Debian: bookworm-backports)",
            ),
            ("8.1.5", false, "no: QEMU 8.1 cannot migrate"),
            (
                "8.2.0",
                true,
                "snapshots of virtio-fs machines (cluster snapshots): yes",
            ),
            ("10.0.2", true, "(cluster snapshots): yes"),
            (
                "",
                false,
                "no: QEMU's version line names no version; needs 8.2 or newer",
            ),
        ] {
            let d = tempfile::tempdir().unwrap();
            let cache = d.path().join("cache");
            let bin = fake_qemu_version(d.path(), "tcg\\n", version);
            let f = check_binary(&bin, Some(&cache)).remove(0);
            assert_eq!(f.status, Status::Pass, "{f:?}");
            assert_eq!(f.virtiofs_snapshots, Some(can), "{version}: {f:?}");
            assert!(f.summary.contains(says), "{version}: {f:?}");
            // The cached answer says the same.
            let again = check_binary(&bin, Some(&cache)).remove(0);
            assert_eq!(again, f);
            let json = serde_json::to_value(&f).unwrap();
            assert_eq!(json["virtiofs_snapshots"], can, "{json}");
        }
        // A QEMU without virtio-fs snapshots no virtio-fs machine, whatever its version.
        let d = tempfile::tempdir().unwrap();
        let fake = d.path().join("qemu");
        std::fs::write(&fake, "#!/bin/sh\ncase \"$*\" in *--version*) echo 'QEMU emulator version 10.0.2';; *-object*) echo '  memory-backend-memfd';; esac\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let f = check_binary(&fake, None).remove(0);
        assert_eq!(f.status, Status::Fail);
        assert_eq!(f.virtiofs_snapshots, Some(false));
        // Other findings do not carry the field.
        let json = serde_json::to_value(Finding::new("x", Status::Pass, "s")).unwrap();
        assert!(json.get("virtiofs_snapshots").is_none(), "{json}");
    }
}
