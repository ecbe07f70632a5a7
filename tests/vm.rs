//! `drydock vm` against real QEMU (TCG) and a test system built into a private chroot store by
//! `scripts/guest/build-test-system`: what the guest sees of the store, read-only enforcement,
//! `--ready`/`--timeout`, Ctrl-C and SIGKILL leaving no process behind, detach/list/logs/stop,
//! and bad input. Needs root for the store server's sandbox (it runs here as root).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::common::{Drydock, Spawned};
use crate::vmcommon;
use vmcommon::{build_system, processes_mentioning, shared_store, wait_no_processes, wait_until};

struct Fixture {
    root: PathBuf,
    toplevel: String,
    outside: String,
    closure: Vec<String>,
}

/// The test system, built once per test binary.
fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let root = shared_store();
        let toplevel = build_system(&root, &[]);
        let outside = build_system(&root, &["--outside"]);
        let q = Command::new("nix-store")
            .arg("--store")
            .arg(&root)
            .args(["-qR", &toplevel])
            .output()
            .unwrap();
        assert!(q.status.success());
        let closure = String::from_utf8(q.stdout)
            .unwrap()
            .lines()
            .map(|l| l.trim_start_matches("/nix/store/").to_string())
            .collect();
        Fixture {
            root,
            toplevel,
            outside,
            closure,
        }
    })
}

fn drydock(state: &Path) -> Drydock {
    Drydock::on(&fixture().root, state)
}

fn console_lines(out: &Output, name: &str) -> Vec<String> {
    let prefix = format!("{name} │ ");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix).map(str::to_string))
        .collect()
}

fn store_listing(root: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(root.join("nix/store"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn guest_sees_exactly_the_closure_and_cannot_write() {
    let f = fixture();
    let state = tempfile::tempdir().unwrap();
    let before = store_listing(&f.root);
    let out = drydock(state.path())
        .args([
            "vm",
            "run",
            "--name",
            "ls",
            "--accel",
            "tcg",
            "--timeout",
            "180",
            "--system",
            &f.toplevel,
        ])
        .args(["--append", "drydock.test=list,write"])
        .run();
    let lines = console_lines(&out, "ls");
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}\nconsole: {lines:#?}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut seen: Vec<String> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("DRYDOCK-LS: ").map(str::to_string))
        .collect();
    seen.sort();
    let mut want = f.closure.clone();
    want.sort();
    assert_eq!(seen, want, "the guest must see exactly the closure");
    let outside = f.outside.trim_start_matches("/nix/store/");
    assert!(
        store_listing(&f.root).iter().any(|e| e == outside),
        "the outside path exists on the host"
    );
    assert!(
        !seen.iter().any(|e| e == outside),
        "a path outside the closure is visible"
    );
    assert!(
        lines.iter().any(|l| l == "DRYDOCK-WRITE: failed"),
        "a write after remount,rw must fail: {lines:#?}"
    );
    assert_eq!(
        store_listing(&f.root),
        before,
        "nothing may appear in the host store"
    );
    assert!(lines.iter().any(|l| l == "DRYDOCK-DONE"));
    wait_no_processes(state.path(), Duration::from_secs(10));
}

#[test]
fn share_store_shows_everything() {
    let f = fixture();
    let state = tempfile::tempdir().unwrap();
    let out = drydock(state.path())
        .args([
            "vm",
            "run",
            "--name",
            "all",
            "--accel",
            "tcg",
            "--timeout",
            "180",
            "--share",
            "store",
            "--system",
            &f.toplevel,
        ])
        .args(["--append", "drydock.test=list"])
        .run();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = console_lines(&out, "all");
    let outside = f.outside.trim_start_matches("/nix/store/");
    assert!(
        lines.iter().any(|l| l == &format!("DRYDOCK-LS: {outside}")),
        "{lines:#?}"
    );
}

#[test]
fn timeout_without_ready_stops_the_vm_and_shows_the_log() {
    let f = fixture();
    let state = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let out = drydock(state.path())
        .args([
            "vm",
            "run",
            "--name",
            "slow",
            "--accel",
            "tcg",
            "--system",
            &f.toplevel,
        ])
        .args([
            "--append",
            "drydock.test=idle",
            "--ready",
            "THIS-NEVER-APPEARS",
            "--timeout",
            "4",
        ])
        .run();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("timed out after") && err.contains("--- last console lines"),
        "{err}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t.elapsed()
    );
    wait_no_processes(state.path(), Duration::from_secs(10));
}

/// Start a foreground VM and wait until its console says it is ready.
fn start_foreground(state: &Path, name: &str) -> Spawned {
    let f = fixture();
    let mut child = drydock(state)
        .args([
            "vm",
            "run",
            "--name",
            name,
            "--accel",
            "tcg",
            "--system",
            &f.toplevel,
        ])
        .args([
            "--append",
            "drydock.test=idle",
            "--ready",
            "DRYDOCK-READY",
            "--timeout",
            "180",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.ends_with("DRYDOCK-READY") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(180))
        .expect("the VM never became ready");
    // QEMU and the store server are there while it runs.
    let procs = processes_mentioning(state);
    assert!(
        procs.iter().any(|(_, c)| c.contains("qemu-system")),
        "{procs:#?}"
    );
    assert!(
        procs.iter().any(|(_, c)| c.contains("__store-server")),
        "{procs:#?}"
    );
    child
}

#[test]
fn ctrl_c_stops_guest_and_store_server() {
    let state = tempfile::tempdir().unwrap();
    let mut child = start_foreground(state.path(), "ctrlc");
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let status = child.wait_within(Duration::from_secs(30));
    assert_eq!(status.code(), Some(130));
    wait_no_processes(state.path(), Duration::from_secs(5));
}

#[test]
fn sigkill_of_drydock_takes_qemu_and_store_server_with_it() {
    let state = tempfile::tempdir().unwrap();
    let mut child = start_foreground(state.path(), "killed");
    child.kill().unwrap();
    child.wait_within(Duration::from_secs(10));
    wait_no_processes(state.path(), Duration::from_secs(10));
    // The stale entry is noticed and cleaned by `vm list`.
    let out = drydock(state.path()).args(["--json", "vm", "list"]).run();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["vms"][0]["state"], "stale (cleaned)", "{doc}");

    // Whoever noticed the dead owner ended its run, once: GC may now take it like any
    // stopped VM's run (before, it stayed "running" and pinned for ever).
    let runs = |state: &Path| -> serde_json::Value {
        let out = drydock(state).args(["--json", "runs"]).run();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let doc = runs(state.path());
    let run = doc["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "killed")
        .unwrap_or_else(|| panic!("no run of the killed VM: {doc}"))
        .clone();
    assert!(
        !run["ended_at"].is_null(),
        "the dead owner's run is still open: {run}"
    );
    let again = drydock(state.path()).args(["vm", "list"]).run();
    assert!(again.status.success());
    let later = runs(state.path());
    let same = later["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == run["id"])
        .unwrap()
        .clone();
    assert_eq!(same["ended_at"], run["ended_at"], "ended twice: {same}");
    let id = run["id"].as_i64().unwrap().to_string();
    let gc = drydock(state.path())
        .args(["gc", "--run", &id, "--dry-run"])
        .run();
    let err = String::from_utf8_lossy(&gc.stderr);
    assert!(gc.status.success(), "gc --run {id}: {err}");
    assert!(!err.contains("still running"), "{err}");
}

#[test]
fn a_launch_record_naming_a_file_outside_the_vm_is_refused() {
    let state = tempfile::tempdir().unwrap();
    let f = fixture();
    let out = drydock(state.path())
        .args([
            "vm",
            "run",
            "--name",
            "edited",
            "--accel",
            "tcg",
            "--system",
            &f.toplevel,
        ])
        .args(["--append", "drydock.test=idle", "--timeout", "2"])
        .run();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let launch = state.path().join("vms/edited/launch.json");
    let victim = state.path().join("precious.txt");
    std::fs::write(&victim, "do not overwrite").unwrap();
    for (field, set) in [
        ("spec.disk.overlay", &["spec", "disk", "overlay"][..]),
        ("spec.disk.base", &["spec", "disk", "base"][..]),
    ] {
        let mut doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&launch).unwrap()).unwrap();
        let original = doc.clone();
        let mut v = &mut doc;
        for k in set {
            v = &mut v[*k];
        }
        *v = serde_json::json!(victim);
        std::fs::write(&launch, serde_json::to_vec(&doc).unwrap()).unwrap();
        let out = drydock(state.path())
            .args(["vm", "restart", "edited", "--timeout", "2"])
            .run();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{field}: {err}");
        assert!(err.contains(field) && err.contains("launch.json"), "{err}");
        assert_eq!(
            std::fs::read_to_string(&victim).unwrap(),
            "do not overwrite"
        );
        std::fs::write(&launch, serde_json::to_vec(&original).unwrap()).unwrap();
    }
    // The record as drydock wrote it is accepted again.
    let out = drydock(state.path())
        .args(["vm", "restart", "edited", "--timeout", "2"])
        .run();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_no_processes(state.path(), Duration::from_secs(10));
}

#[test]
fn detach_list_logs_name_in_use_and_stop() {
    let f = fixture();
    let state = tempfile::tempdir().unwrap();
    let run = |name: &str| {
        drydock(state.path())
            .args([
                "vm",
                "run",
                "--name",
                name,
                "--accel",
                "tcg",
                "--system",
                &f.toplevel,
                "--detach",
            ])
            .args([
                "--append",
                "drydock.test=counter",
                "--ready",
                "DRYDOCK-COUNT: 3",
                "--timeout",
                "180",
            ])
            .run()
    };
    let out = run("bg");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Still running after the command returned.
    let list = drydock(state.path()).args(["--json", "vm", "list"]).run();
    let doc: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(doc["vms"][0]["name"], "bg");
    assert_eq!(doc["vms"][0]["state"], "running", "{doc}");
    assert_eq!(doc["vms"][0]["accel"], "tcg");
    assert_eq!(doc["vms"][0]["memory_mib"], 512);
    // The VM's system is pinned by a GC root: Nix's own GC sees it as live.
    let dead = Command::new("nix-store")
        .arg("--store")
        .arg(&f.root)
        .args(["--gc", "--print-dead"])
        .output()
        .unwrap();
    let dead = String::from_utf8_lossy(&dead.stdout);
    assert!(
        !dead.contains(&f.toplevel),
        "the running VM's system is collectable:\n{dead}"
    );
    // QEMU runs in a cgroup of its own with a memory limit, where the host allows one.
    let st: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.path().join("vms/bg/state.json")).unwrap())
            .unwrap();
    if let Some(cg) = st["cgroup"].as_str() {
        let limit = std::fs::read_to_string(Path::new(cg).join("memory.limit_in_bytes"))
            .or_else(|_| std::fs::read_to_string(Path::new(cg).join("memory.max")))
            .unwrap();
        assert_eq!(limit.trim(), ((512u64 + 256) << 20).to_string());
        let procs = std::fs::read_to_string(Path::new(cg).join("cgroup.procs")).unwrap();
        assert!(
            procs
                .lines()
                .any(|p| p.parse::<u64>().ok() == st["qemu_pid"].as_u64()),
            "{procs}"
        );
    }
    // The same name again is refused.
    let again = run("bg");
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already running"));
    // Logs keep growing (the guest counts every 0.2 s; it was ready at 3).
    let mut text = String::new();
    wait_until(
        "`vm logs bg` shows the guest counting past its ready marker",
        Duration::from_secs(60),
        || {
            let logs = drydock(state.path()).args(["vm", "logs", "bg"]).run();
            text = String::from_utf8_lossy(&logs.stdout).into_owned();
            text.contains("DRYDOCK-READY") && text.contains("DRYDOCK-COUNT: 4")
        },
    );
    let stop = drydock(state.path()).args(["vm", "stop", "bg"]).run();
    assert_eq!(
        stop.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&stop.stderr)
    );
    wait_no_processes(state.path(), Duration::from_secs(10));
    let list = drydock(state.path()).args(["--json", "vm", "list"]).run();
    let doc: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(doc["vms"][0]["state"], "stopped", "{doc}");
}

#[test]
fn bad_inputs_exit_2_with_the_input_named() {
    let f = fixture();
    let state = tempfile::tempdir().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "--kernel",
                "/nonexistent/bzImage",
                "--initrd",
                "/nonexistent/initrd",
            ],
            "--kernel /nonexistent/bzImage",
        ),
        (vec!["--system", &f.outside], "is not a NixOS-shaped system"),
        (vec!["--system", "/etc"], "not in the Nix store"),
        (
            vec!["--system", &f.toplevel, "--qemu", "/nonexistent/qemu"],
            "QEMU not found",
        ),
        (vec!["--system", &f.toplevel, "--ready", "("], "--ready"),
    ];
    for (args, want) in cases {
        let out = drydock(state.path())
            .args(["vm", "run", "--name", "bad", "--accel", "tcg"])
            .args(&args)
            .run();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let out = drydock(state.path())
        .args(["vm", "run", "--name", "../x", "--system", &f.toplevel])
        .run();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid VM name"));
    let out = Drydock::new()
        .state(state.path())
        .args(["vm", "run", "--name", "x", "--system", &f.toplevel])
        .env("PATH", "/nonexistent")
        .run();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("QEMU not found"));
    let out = drydock(state.path()).args(["vm", "stop", "nosuchvm"]).run();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn accel_kvm_fails_fast_with_the_doctors_finding_where_kvm_cannot_run_linux() {
    if !Path::new("/sys/module/kvm_pvm").exists() {
        eprintln!("skipped: only meaningful on a host where KVM cannot run a standard kernel");
        return;
    }
    let f = fixture();
    let state = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let out = drydock(state.path())
        .args([
            "vm",
            "run",
            "--name",
            "k",
            "--accel",
            "kvm",
            "--system",
            &f.toplevel,
        ])
        .run();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--accel kvm: KVM is not usable here")
            && err.contains("kvm_pvm")
            && err.contains("fix:"),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(processes_mentioning(state.path()).is_empty());
}
