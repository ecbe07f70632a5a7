//! Helpers shared by the VM test binaries: the drydock binary, test systems built into chroot
//! stores by `scripts/guest/build-test-system`, the process-tree checks, and what the cluster
//! tests share (their store, the guest's kernel, drydock on a store, `exec`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
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
/// `root`, once per test run for each `(root, args)`; returns the printed store path. The
/// uncompressed kernel halves a TCG boot.
pub fn build_system(root: &Path, args: &[&str]) -> String {
    type Built = std::sync::Mutex<
        std::collections::BTreeMap<(PathBuf, Vec<String>), std::sync::Arc<OnceLock<String>>>,
    >;
    static BUILT: Built = std::sync::Mutex::new(std::collections::BTreeMap::new());
    let key = (
        root.to_path_buf(),
        args.iter().map(|a| a.to_string()).collect(),
    );
    let cell = BUILT
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(key)
        .or_default()
        .clone();
    cell.get_or_init(|| build_system_now(root, args)).clone()
}

fn build_system_now(root: &Path, args: &[&str]) -> String {
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

/// Where the guest's kernel and initrd are cached: the scripts' own default
/// (`$DRYDOCK_CACHE_DIR`, else `${XDG_CACHE_HOME:-$HOME/.cache}/drydock`).
pub fn guest_cache() -> String {
    std::env::var("DRYDOCK_CACHE_DIR").unwrap_or_else(|_| {
        let base = std::env::var("XDG_CACHE_HOME")
            .ok()
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| format!("{}/.cache", std::env::var("HOME").unwrap_or_default()));
        format!("{base}/drydock")
    })
}

/// Make sure the guest kernel and initrd exist (instant once cached; run once per test run).
pub fn guest_ready() {
    static READY: std::sync::Once = std::sync::Once::new();
    READY.call_once(|| {
        let s = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/guest/build-initrd");
        let out = Command::new(s).output().expect("build-initrd");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// Write the composition `file` with the machines `machines` (the body of `machines = { ... }`),
/// where `sys ARGS` is the test system's toplevel (`scripts/guest/system.nix` with `ARGS`, e.g.
/// `www`, `activation`, `kernelParams`) on the cached guest kernel and initrd.
pub fn write_composition(file: &Path, machines: &str) {
    let system = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/guest/system.nix");
    let text = format!(
        r#"let
  cache = "{cache}/guest";
  kernelVersion = builtins.replaceStrings [ "\n" ] [ "" ] (builtins.readFile (cache + "/kernel/version"));
  sys = args: (import {system} ({{
    kernel = cache + "/kernel/vmlinux"; kernelFormat = "vmlinux";
    initrd = cache + "/initrd"; inherit kernelVersion;
  }} // args)).toplevel;
in {{ machines = {{ {machines} }}; }}
"#,
        cache = guest_cache(),
        system = system.display()
    );
    std::fs::write(file, text).unwrap();
}

/// drydock on the chroot store `store`, with state in `state`, and without `NIX_CONFIG`: the
/// test system's builds need nothing from the environment.
pub fn cluster_drydock(store: &Path, state: &Path) -> Command {
    let mut c = Command::new(bin());
    c.arg("--store")
        .arg(store)
        .arg("--state-dir")
        .arg(state)
        .env_remove("NIX_CONFIG");
    c
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `drydock exec -f FILE MACHINE --timeout SECS -- CMD`.
pub fn cluster_exec(
    store: &Path,
    state: &Path,
    file: &Path,
    machine: &str,
    timeout: &str,
    cmd: &str,
) -> Output {
    cluster_drydock(store, state)
        .arg("exec")
        .arg("-f")
        .arg(file)
        .args([machine, "--timeout", timeout, "--", cmd])
        .output()
        .unwrap()
}

/// `drydock up -f FILE --detach` under TCG; panics with drydock's messages if it fails.
pub fn cluster_up_detached(store: &Path, state: &Path, file: &Path) {
    let up = cluster_drydock(store, state)
        .arg("up")
        .arg("-f")
        .arg(file)
        .args(["--detach", "--accel", "tcg", "--timeout", "300"])
        .output()
        .unwrap();
    assert!(up.status.success(), "up: {}", text(&up.stderr));
}

/// `drydock down -f FILE`, which must succeed; then no process of `state` may be left.
pub fn cluster_down(store: &Path, state: &Path, file: &Path) {
    let down = cluster_drydock(store, state)
        .arg("down")
        .arg("-f")
        .arg(file)
        .output()
        .unwrap();
    assert!(down.status.success(), "down: {}", text(&down.stderr));
    wait_no_processes(state, Duration::from_secs(30));
}

/// Takes a cluster down when dropped, whether the test passed or not (nothing is checked: a
/// test that got that far checks its own `down`).
pub struct DownOnDrop {
    pub store: PathBuf,
    pub state: PathBuf,
    pub file: PathBuf,
}

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        let _ = cluster_drydock(&self.store, &self.state)
            .arg("down")
            .arg("-f")
            .arg(&self.file)
            .output();
    }
}

/// `ps --json` of the cluster of `file`, which must succeed.
pub fn cluster_ps(store: &Path, state: &Path, file: &Path) -> serde_json::Value {
    let ps = cluster_drydock(store, state)
        .args(["--json", "ps", "-f"])
        .arg(file)
        .output()
        .unwrap();
    assert!(ps.status.success(), "ps: {}", text(&ps.stderr));
    serde_json::from_slice(&ps.stdout).unwrap()
}

/// Every machine's QEMU pid (none if it is stopped), by `ps --json`.
pub fn qemu_pids(store: &Path, state: &Path, file: &Path) -> Vec<(String, Option<u64>)> {
    cluster_ps(store, state, file)
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["machine"].as_str().unwrap().to_string(),
                r["qemu_pid"].as_u64(),
            )
        })
        .collect()
}
