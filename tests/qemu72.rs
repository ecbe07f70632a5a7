//! drydock on Debian 12's own QEMU 7.2 (the cache `scripts/fetch-qemu72` fills, used through
//! `--qemu` and `DRYDOCK_QEMU`), while the machine's QEMU is a newer one: a virtio-fs VM boots to
//! its ready line on it, a snapshot of that VM is refused (exit 2) naming the QEMU it needs (8.2:
//! 7.2 cannot migrate vhost-user-fs devices) and the version running, and `doctor` says that this
//! QEMU cannot snapshot virtio-fs machines. Real QEMU under TCG, the VM tests' chroot store.
//! Skipped, saying so, when the cache has no QEMU 7.2.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::Drydock;
use crate::vmcommon::{build_system, guest_cache, qemu72, shared_store, wait_no_processes};

/// The cached QEMU 7.2 and its version line, or why the test is skipped.
fn qemu() -> Option<(PathBuf, String)> {
    let found = qemu72();
    if found.is_none() {
        eprintln!(
            "skipped: no QEMU 7.2 in {}/qemu-7.2 (scripts/fetch-qemu72 fetches it; scripts/setup runs it)",
            guest_cache()
        );
    }
    found
}

/// `X.Y.Z` of a `--version` line (`QEMU emulator version 7.2.22 (Debian ...)`).
fn release(version: &str) -> &str {
    version
        .split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .unwrap_or_else(|| panic!("no version in {version:?}"))
}

#[test]
fn a_virtio_fs_vm_boots_and_its_snapshot_names_the_qemu_it_needs() {
    let Some((qemu, version)) = qemu() else {
        return;
    };
    let release = release(&version);
    assert!(release.starts_with("7.2."), "{version}");
    let root = shared_store();
    let top = build_system(&root, &[]);
    let state = tempfile::tempdir().unwrap();
    let dd = || Drydock::on(&root, state.path());
    let run = dd()
        .args(["vm", "run", "--name", "old", "--accel", "tcg", "--qemu"])
        .arg(&qemu)
        .args(["--system", &top, "--append", "drydock.test=idle"])
        .args(["--ready", "DRYDOCK-READY", "--detach", "--timeout", "180"])
        .run()
        .ok();
    assert!(
        run.stderr_str().contains("over virtio-fs"),
        "{}",
        run.stderr_str()
    );
    // It is QEMU 7.2 that runs the guest: the unpacked binary in the cache, not the machine's.
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.path().join("vms/old/state.json")).unwrap())
            .unwrap();
    let pid = doc["qemu_pid"].as_u64().unwrap();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(
        exe,
        Path::new(&guest_cache()).join("qemu-7.2/root/usr/bin/qemu-system-x86_64"),
        "QEMU pid {pid}"
    );
    let snap = dd().args(["vm", "snapshot", "old"]).run();
    // Stopped before any assertion, so that a failure leaves nothing running.
    let stop = dd().args(["vm", "stop", "old"]).run();
    wait_no_processes(state.path(), Duration::from_secs(10));
    let err = snap.stderr_str();
    assert_eq!(snap.code(), Some(2), "stderr: {err}");
    // "snapshotting a virtio-fs VM needs QEMU 8.2 or newer (migration of vhost-user-fs
    // devices); QEMU_PATH is QEMU 7.2.22"
    assert!(err.contains("needs QEMU 8.2"), "{err}");
    assert!(
        err.contains(release),
        "the running version {release}: {err}"
    );
    assert!(
        !state.path().join("vms/old/snapshots/default").exists(),
        "a refused snapshot leaves no folder"
    );
    stop.ok();
}

#[test]
fn doctor_says_no_to_virtio_fs_snapshots() {
    let Some((qemu, version)) = qemu() else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let doc = Drydock::new()
        .args(["--json", "doctor", "--state-dir"])
        .arg(state.path())
        .env("DRYDOCK_QEMU", &qemu)
        .run()
        .stdout_json();
    let f = doc["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "qemu")
        .unwrap_or_else(|| panic!("no qemu finding: {doc:#}"))
        .clone();
    assert_eq!(f["status"], "pass", "every launch works on 7.2: {f}");
    assert_eq!(f["virtiofs_snapshots"], false, "{f}");
    let summary = f["summary"].as_str().unwrap();
    assert!(summary.starts_with(&version), "{f}");
    assert!(
        summary.contains("snapshots of virtio-fs machines (cluster snapshots): no: QEMU 7.2 cannot migrate vhost-user-fs devices; needs 8.2 or newer (Debian: bookworm-backports)"),
        "{f}"
    );
    // And in text.
    let text = Drydock::new()
        .args(["doctor", "--state-dir"])
        .arg(state.path())
        .env("DRYDOCK_QEMU", &qemu)
        .run()
        .stdout_str();
    assert!(
        text.lines()
            .any(|l| l.starts_with("✔ qemu ") && l.contains("(cluster snapshots): no: QEMU 7.2")),
        "{text}"
    );
}
