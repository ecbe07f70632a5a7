//! Helpers shared by the VM test binaries: the drydock binary, test systems built into chroot
//! stores by `scripts/guest/build-test-system`, the process-tree checks, and what the cluster
//! tests share (their store, the guest's kernel, drydock with the sandbox's shell, `exec`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_drydock")
}

/// The chroot store the VM tests share: under Cargo's target temporary directory, so it is
/// reused across runs (building into it again is a no-op) instead of piling up in /tmp.
pub fn shared_store() -> PathBuf {
    created(Path::new(env!("CARGO_TARGET_TMPDIR")).join("drydock-vm-fixture-store"))
}

/// `root` as a chroot store whose database exists: tests that share a store start their Nix
/// commands at once, and Nix's creation of a new store's database is not safe against that.
/// (drydock creates a new store once itself; the fixture scripts run Nix directly.)
pub fn created(root: PathBuf) -> PathBuf {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _held = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if !root.join("nix/var/nix/db/db.sqlite").is_file() {
        let out = Command::new("nix-store")
            .arg("--store")
            .arg(&root)
            .arg("--init")
            .output()
            .expect("run nix-store --init");
        assert!(
            out.status.success(),
            "nix-store --init {}: {}",
            root.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    root
}

/// `drydock --store ROOT --state-dir STATE`.
pub fn drydock_in(root: &Path, state: &Path) -> Command {
    let mut c = Command::new(bin());
    c.arg("--store").arg(root).arg("--state-dir").arg(state);
    c
}

/// Build the test system (with `args`: `--outside`, or a variant name) into the chroot store
/// `root`; returns the printed store path. The uncompressed kernel halves a TCG boot.
pub fn build_system(root: &Path, args: &[&str]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/guest/build-test-system");
    let (flags, rest): (Vec<&str>, Vec<&str>) = args.iter().partition(|a| a.starts_with("--"));
    let out = Command::new(&script)
        .args(flags)
        .arg(root)
        .args(rest)
        .env("DRYDOCK_GUEST_KERNEL", "vmlinux")
        .output()
        .expect("run build-test-system");
    assert!(
        out.status.success(),
        "build-test-system: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Processes (pid, command line) whose command line mentions `needle` (a test's unique state
/// dir: QEMU's and the store server's arguments name it).
pub fn processes_mentioning(needle: &Path) -> Vec<(u32, String)> {
    let needle = needle.display().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmd.contains(&needle) {
            out.push((pid, cmd));
        }
    }
    out
}

/// Poll `cond` until it holds; fail with `what` if it does not within `within`. Guests under
/// TCG run at the speed of a loaded machine, so tests wait for what they expect instead of
/// sleeping a fixed time.
pub fn wait_until(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < within, "not within {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Wait (bounded) until no process mentions `state`; fail naming what is left.
pub fn wait_no_processes(state: &Path, within: Duration) {
    let t = Instant::now();
    loop {
        let left = processes_mentioning(state);
        if left.is_empty() {
            return;
        }
        assert!(t.elapsed() < within, "processes left behind: {left:#?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The chroot store the cluster tests share (the systems' builds are reused across runs).
pub fn cluster_store() -> PathBuf {
    created(Path::new(env!("CARGO_TARGET_TMPDIR")).join("drydock-cluster-store"))
}

/// Where the guest's kernel and initrd are cached.
pub fn guest_cache() -> String {
    std::env::var("DRYDOCK_CACHE_DIR").unwrap_or_else(|_| {
        format!(
            "{}/.cache/drydock",
            std::env::var("HOME").unwrap_or_default()
        )
    })
}

/// Make sure the guest kernel and initrd exist (instant once cached).
pub fn guest_ready() {
    let s = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/guest/build-initrd");
    let out = Command::new(s).output().expect("build-initrd");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// drydock on the cluster store, with state in `state` and the test system's builders' shell.
pub fn cluster_drydock(state: &Path) -> Command {
    cluster_drydock_with(&cluster_store(), state)
}

/// The same on the chroot store `store`.
pub fn cluster_drydock_with(store: &Path, state: &Path) -> Command {
    let mut c = Command::new(bin());
    c.arg("--store")
        .arg(store)
        .arg("--state-dir")
        .arg(state)
        .env(
            "NIX_CONFIG",
            "sandbox-paths = /bin/sh=/bin/busybox\nsubstituters =",
        );
    c
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `drydock exec -f FILE MACHINE --timeout SECS -- CMD`.
pub fn cluster_exec(state: &Path, file: &Path, machine: &str, timeout: &str, cmd: &str) -> Output {
    cluster_drydock(state)
        .arg("exec")
        .arg("-f")
        .arg(file)
        .args([machine, "--timeout", timeout, "--", cmd])
        .output()
        .unwrap()
}

/// `drydock up -f FILE --detach` under TCG; panics with drydock's messages if it fails.
pub fn cluster_up_detached(state: &Path, file: &Path) {
    cluster_up_detached_with(&cluster_store(), state, file)
}

/// The same on the chroot store `store`.
pub fn cluster_up_detached_with(store: &Path, state: &Path, file: &Path) {
    let up = cluster_drydock_with(store, state)
        .arg("up")
        .arg("-f")
        .arg(file)
        .args(["--detach", "--accel", "tcg", "--timeout", "300"])
        .output()
        .unwrap();
    assert!(up.status.success(), "up: {}", text(&up.stderr));
}
