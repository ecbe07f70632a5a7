//! Fast restarts: `vm restart` from the recorded launch without Nix (even after Nix's GC),
//! `--store-mode image`, and `vm snapshot` / `vm restore` carrying the guest on where it was,
//! its store an image or over virtio-fs (open files, cached lookups and the closure view come
//! back with it); bad snapshots (truncated, of another closure, image gone) fail clearly and
//! leave the VM stopped. Real QEMU under TCG, a private chroot store built by `scripts/guest/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::common::{Drydock, Ran};
use crate::vmcommon;
use vmcommon::{build_system, shared_store, wait_no_processes, wait_until};

struct Fixture {
    root: PathBuf,
    toplevel: String,
    variant: String,
    outside: String,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let root = shared_store();
        Fixture {
            toplevel: build_system(&root, &[]),
            variant: build_system(&root, &["two"]),
            outside: build_system(&root, &["--outside"]),
            root,
        }
    })
}

fn drydock(state: &Path) -> Drydock {
    Drydock::on(&fixture().root, state)
}

fn ok(out: &Ran) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn counts(state: &Path, name: &str) -> Vec<u64> {
    let text = std::fs::read_to_string(state.join("vms").join(name).join("console.log"))
        .unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            l.trim_end_matches('\r')
                .strip_prefix("DRYDOCK-COUNT: ")?
                .parse()
                .ok()
        })
        .collect()
}

fn no_processes(state: &Path) {
    wait_no_processes(state, Duration::from_secs(10));
}

/// A PATH with QEMU, qemu-img and a shell, and no Nix at all.
fn path_without_nix() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for tool in ["qemu-system-x86_64", "qemu-img", "sh", "cat", "kill"] {
        let found = std::env::split_paths(&std::env::var_os("PATH").unwrap())
            .map(|p| p.join(tool))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{tool} not on PATH"));
        std::os::unix::fs::symlink(found, d.path().join(tool)).unwrap();
    }
    assert!(
        Command::new("sh")
            .arg("-c")
            .arg("command -v nix-build")
            .env("PATH", d.path())
            .output()
            .unwrap()
            .stdout
            .is_empty()
    );
    d
}

/// A store of the test's own, holding only an unrooted test system (for tests that run Nix's
/// GC or damage the store).
fn own_store() -> (tempfile::TempDir, String) {
    let root = tempfile::tempdir().unwrap();
    let top = build_system(root.path(), &[]);
    (root, top)
}

#[test]
fn restart_needs_no_nix_and_survives_nix_gc() {
    let (root, top) = own_store();
    let state = tempfile::tempdir().unwrap();
    let dd = || Drydock::on(root.path(), state.path());
    let run = dd()
        .args([
            "vm",
            "run",
            "--name",
            "r",
            "--accel",
            "tcg",
            "--system",
            &top,
            "--append",
            "drydock.test=list",
        ])
        .args(["--timeout", "180"])
        .run();
    ok(&run);
    // Nix's own GC runs; nothing but the VM's pin roots the system, and it stays.
    let gc = Command::new("nix-store")
        .arg("--store")
        .arg(root.path())
        .args(["--gc"])
        .output()
        .unwrap();
    assert!(
        gc.status.success(),
        "{}",
        String::from_utf8_lossy(&gc.stderr)
    );
    let outside = std::fs::read_dir(root.path().join("nix/store"))
        .unwrap()
        .flatten()
        .any(|e| {
            e.file_name()
                .to_string_lossy()
                .ends_with("-drydock-not-in-closure")
        });
    assert!(
        !outside,
        "the GC ran but collected nothing: the test proves nothing"
    );
    let phys = root.path().join(top.trim_start_matches('/'));
    assert!(phys.exists(), "nix-store --gc took the pinned system");
    // The VM remembers its store: another --store is refused, naming both...
    let elsewhere = tempfile::tempdir().unwrap();
    let out = Drydock::on(elsewhere.path(), state.path())
        .args(["vm", "restart", "r"])
        .run();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&elsewhere.path().display().to_string())
            && err.contains(&root.path().display().to_string()),
        "{err}"
    );
    // ...and none is needed. Someone removed the pin meanwhile: the restart renews it in the
    // VM's store, not in the machine's.
    let auto = root.path().join("nix/var/nix/gcroots/auto");
    let pins = |dir: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| std::fs::read_link(e.path()).ok())
                    .filter(|t| t.starts_with(state.path()))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(pins(&auto).len(), 1, "the launch pinned the system");
    for e in std::fs::read_dir(&auto).unwrap().flatten() {
        std::fs::remove_file(e.path()).unwrap();
    }
    // Restart with no Nix on PATH at all, and no --store.
    let nixless = path_without_nix();
    let t = Instant::now();
    let out = Drydock::new()
        .state(state.path())
        .args(["vm", "restart", "r", "--timeout", "180"])
        .env("PATH", nixless.path())
        .run();
    ok(&out);
    assert_eq!(pins(&auto).len(), 1, "the restart renewed the pin");
    assert!(
        pins(Path::new("/nix/var/nix/gcroots/auto")).is_empty(),
        "a pin landed in the machine's store"
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("r │ DRYDOCK-LS-END") && text.contains("r │ DRYDOCK-DONE"),
        "{text}"
    );
    assert!(t.elapsed() < Duration::from_secs(120));
    no_processes(state.path());
}

#[test]
fn restart_names_a_pinned_path_that_is_gone() {
    // A store of its own: this test damages it.
    let (root, top) = own_store();
    let state = tempfile::tempdir().unwrap();
    let dd = |args: &[&str]| Drydock::on(root.path(), state.path()).args(args).run();
    ok(&dd(&[
        "vm",
        "run",
        "--name",
        "p",
        "--accel",
        "tcg",
        "--system",
        &top,
        "--timeout",
        "180",
    ]));
    let busybox = std::fs::read_dir(root.path().join("nix/store"))
        .unwrap()
        .flatten()
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .ends_with("-drydock-busybox")
        })
        .unwrap()
        .path();
    Command::new("chmod")
        .args(["-R", "u+w"])
        .arg(&busybox)
        .status()
        .unwrap();
    std::fs::remove_dir_all(&busybox).unwrap();
    let out = dd(&["vm", "restart", "p"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is gone") && err.contains("drydock-busybox"),
        "{err}"
    );
    no_processes(state.path());
}

fn start_counter(state: &Path, name: &str, system: &str) {
    let out = drydock(state)
        .args([
            "vm",
            "run",
            "--name",
            name,
            "--accel",
            "tcg",
            "--store-mode",
            "image",
            "--system",
            system,
        ])
        .args([
            "--append",
            "drydock.test=counter",
            "--ready",
            "DRYDOCK-COUNT: 10",
            "--detach",
            "--timeout",
            "180",
        ])
        .run();
    ok(&out);
}

#[test]
fn snapshot_stop_restore_carries_on_counting() {
    let f = fixture();
    let state = tempfile::tempdir().unwrap();
    start_counter(state.path(), "c", &f.toplevel);
    ok(&drydock(state.path()).args(["vm", "snapshot", "c"]).run());
    let at_snapshot = *counts(state.path(), "c").last().unwrap();
    assert!(at_snapshot >= 10);
    // It keeps running after the snapshot.
    wait_until(
        "the guest counts on after the snapshot",
        Duration::from_secs(60),
        || *counts(state.path(), "c").last().unwrap() > at_snapshot,
    );
    ok(&drydock(state.path()).args(["vm", "stop", "c"]).run());
    no_processes(state.path());
    let t = Instant::now();
    let out = drydock(state.path()).args(["vm", "restore", "c"]).run();
    ok(&out);
    let restore_time = t.elapsed();
    wait_until(
        "the restored guest prints its counter (three lines)",
        Duration::from_secs(60),
        || counts(state.path(), "c").len() >= 3,
    );
    let after = counts(state.path(), "c");
    assert!(
        after[0] >= at_snapshot,
        "the guest restarted counting: first {} after restore, {at_snapshot} at the snapshot",
        after[0]
    );
    assert!(after.windows(2).all(|w| w[1] == w[0] + 1), "{after:?}");
    // A loose sanity bound (the benchmark measures it): a restore is not a boot.
    assert!(restore_time < Duration::from_secs(30), "{restore_time:?}");
    let list = drydock(state.path()).args(["--json", "vm", "list"]).run();
    let doc: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(doc["vms"][0]["state"], "running", "{doc}");
    // The restored VM's run is live again: GC leaves it (and its snapshot) alone.
    let runs = drydock(state.path()).args(["--json", "runs"]).run();
    let doc: serde_json::Value = serde_json::from_slice(&runs.stdout).unwrap();
    assert!(doc["runs"][0]["ended_at"].is_null(), "{doc}");
    let gc = drydock(state.path())
        .args(["gc", "--run", "1", "--dry-run"])
        .run();
    assert_eq!(gc.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&gc.stderr).contains("still running"));
    ok(&drydock(state.path()).args(["vm", "stop", "c"]).run());
    no_processes(state.path());
}

#[test]
fn bad_snapshots_fail_clearly_and_leave_the_vm_stopped() {
    let f = fixture();
    let state = tempfile::tempdir().unwrap();
    start_counter(state.path(), "a", &f.toplevel);
    ok(&drydock(state.path())
        .args(["vm", "snapshot", "a", "--tag", "t1"])
        .run());
    ok(&drydock(state.path()).args(["vm", "stop", "a"]).run());
    let snap = state.path().join("vms/a/snapshots/t1");

    // A snapshot of another closure: VM b runs the variant system.
    start_counter(state.path(), "b", &f.variant);
    ok(&drydock(state.path()).args(["vm", "stop", "b"]).run());
    let b_snap = state.path().join("vms/b/snapshots/t1");
    std::fs::create_dir_all(&b_snap).unwrap();
    for file in ["meta.json", "state", "disk.qcow2"] {
        std::fs::copy(snap.join(file), b_snap.join(file)).unwrap();
    }
    let out = drydock(state.path())
        .args(["vm", "restore", "b", "--tag", "t1"])
        .run();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("taken of another closure"), "{err}");
    no_processes(state.path());

    // A deleted state is named as missing, not as "0 bytes ... were saved".
    let state_file = snap.join("state");
    let kept = snap.join("state.kept");
    std::fs::rename(&state_file, &kept).unwrap();
    let out = drydock(state.path())
        .args(["vm", "restore", "a", "--tag", "t1"])
        .run();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("the saved state is missing") && !err.contains("0 bytes"),
        "{err}"
    );
    std::fs::rename(&kept, &state_file).unwrap();
    // Truncated state: QEMU refuses it; the VM stays stopped.
    let len = std::fs::metadata(&state_file).unwrap().len();
    let f2 = std::fs::OpenOptions::new()
        .write(true)
        .open(&state_file)
        .unwrap();
    f2.set_len(len / 2).unwrap();
    drop(f2);
    let out = drydock(state.path())
        .args(["vm", "restore", "a", "--tag", "t1"])
        .run();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("truncated"), "{err}");
    // Corrupt but the right length: QEMU itself refuses to load it.
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join("meta.json")).unwrap()).unwrap();
    std::fs::write(
        &state_file,
        vec![0x5a; meta["state_bytes"].as_u64().unwrap() as usize],
    )
    .unwrap();
    let out = drydock(state.path())
        .args(["vm", "restore", "a", "--tag", "t1"])
        .run();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    // The message names the snapshot's tag and its state file (not an empty tag and the log).
    assert!(
        err.contains("QEMU could not load it")
            && err.contains("it is stopped")
            && err.contains(r#"snapshot "t1""#)
            && err.contains(&format!("({})", state_file.display())),
        "{err}"
    );
    no_processes(state.path());
    let list = drydock(state.path()).args(["--json", "vm", "list"]).run();
    let doc: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert!(
        doc["vms"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["state"] != "running"),
        "{doc}"
    );

    // The store image is gone.
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.path().join("vms/a/launch.json")).unwrap())
            .unwrap();
    let image = PathBuf::from(rec["spec"]["store"]["path"].as_str().unwrap());
    std::fs::remove_file(&image).unwrap();
    let out = drydock(state.path())
        .args(["vm", "restore", "a", "--tag", "t1"])
        .run();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is gone"));
    no_processes(state.path());
}

/// The guest's `hold` lines with `prefix` (`DRYDOCK-HOLD-LS: ` ...), without it, in order.
fn hold_lines(state: &Path, name: &str, prefix: &str) -> Vec<String> {
    let text = std::fs::read_to_string(state.join("vms").join(name).join("console.log"))
        .unwrap_or_default();
    text.lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix(prefix))
        .map(str::to_owned)
        .collect()
}

fn md5(bytes: &[u8]) -> String {
    use std::io::Write;
    let mut c = Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = c.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// What the guest's `hold` test must print after its ticks: the host's view of the same bytes
/// and the closure of the system.
struct HoldExpected {
    held: String,
    looked_up: String,
    new: String,
    closure: Vec<String>,
}

fn hold_expected(f: &Fixture) -> HoldExpected {
    let phys = |logical: &str| f.root.join(logical.trim_start_matches('/'));
    let top = phys(&f.toplevel);
    let target = |link: &str| {
        let t = std::fs::read_link(top.join(link)).unwrap();
        phys(t.to_str().unwrap())
    };
    let kernel = std::fs::read(target("kernel")).unwrap();
    let initrd = std::fs::read(target("initrd")).unwrap();
    let out = Command::new("nix-store")
        .arg("--store")
        .arg(&f.root)
        .args(["-qR", &f.toplevel])
        .output()
        .unwrap();
    assert!(out.status.success());
    let mut closure: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim_start_matches("/nix/store/").to_owned())
        .collect();
    closure.sort();
    HoldExpected {
        held: md5(&kernel[2 << 20..(2 << 20) + 4096]),
        looked_up: md5(&std::fs::read(top.join("activate")).unwrap()),
        new: md5(&initrd[..4096]),
        closure,
    }
}

/// The `hold` test's checks, as the console of VM `name` shows them (once each).
fn check_hold(state: &Path, name: &str, want: &HoldExpected, outside: &str) {
    let one = |prefix: &str| {
        let lines = hold_lines(state, name, prefix);
        assert_eq!(lines.len(), 1, "{prefix}: {lines:?}");
        lines[0].clone()
    };
    assert_eq!(
        one("DRYDOCK-HOLD-HELD: "),
        want.held,
        "the file held open before the snapshot reads on"
    );
    assert_eq!(
        one("DRYDOCK-HOLD-LOOKED-UP: "),
        want.looked_up,
        "a file looked up before the snapshot opens and reads"
    );
    assert_eq!(
        one("DRYDOCK-HOLD-NEW: "),
        want.new,
        "a closure path never looked up before reads"
    );
    let mut listed = hold_lines(state, name, "DRYDOCK-HOLD-LS: ");
    listed.sort();
    assert_eq!(listed, want.closure, "the store shows exactly the closure");
    assert!(!listed.iter().any(|e| e == outside));
    assert_eq!(
        one("DRYDOCK-HOLD-OUTSIDE: "),
        "hidden",
        "a path outside the closure is looked up in vain"
    );
}

#[test]
fn a_virtiofs_vm_comes_back_with_its_open_files_and_its_closure_view() {
    let f = fixture();
    let want = hold_expected(f);
    let outside = f.outside.trim_start_matches("/nix/store/");
    let state = tempfile::tempdir().unwrap();
    let append = format!("drydock.test=hold drydock.outside={outside}");
    ok(&drydock(state.path())
        .args([
            "vm",
            "run",
            "--name",
            "v",
            "--accel",
            "tcg",
            "--memory",
            "256",
            "--system",
            &f.toplevel,
        ])
        .args([
            "--append",
            &append,
            "--ready",
            "DRYDOCK-HOLD: ready",
            "--detach",
            "--timeout",
            "180",
        ])
        .run());
    // The guest holds a file open, has looked a file up, and ticks for 15 s before its checks:
    // the snapshot is taken well before them.
    let t = Instant::now();
    let out = drydock(state.path())
        .args(["--json", "vm", "snapshot", "v"])
        .run();
    ok(&out);
    let save = t.elapsed();
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(meta["format"], "mapped-ram", "{meta}");
    let snap = state.path().join("vms/v/snapshots/default");
    for file in ["state", "disk.qcow2", "meta.json", "launch.json"] {
        assert!(snap.join(file).is_file(), "{file}");
    }
    let ticks_at_snapshot = hold_lines(state.path(), "v", "DRYDOCK-HOLD-TICK: ").len();
    assert!(
        ticks_at_snapshot < 25,
        "{ticks_at_snapshot} ticks: too late"
    );
    // The VM runs on after the snapshot, its store server too.
    let end = || !hold_lines(state.path(), "v", "DRYDOCK-HOLD-END").is_empty();
    wait_until(
        "the guest's checks after the snapshot",
        Duration::from_secs(90),
        end,
    );
    check_hold(state.path(), "v", &want, outside);
    ok(&drydock(state.path()).args(["vm", "stop", "v"]).run());
    no_processes(state.path());

    let t = Instant::now();
    ok(&drydock(state.path()).args(["vm", "restore", "v"]).run());
    let restore = t.elapsed();
    wait_until("the restored guest's checks", Duration::from_secs(90), end);
    // It carried on from the snapshot (no boot, no second `ready`), ticking to its checks.
    let console = std::fs::read_to_string(state.path().join("vms/v/console.log")).unwrap();
    assert!(
        !console.contains("DRYDOCK-READY") && !console.contains("DRYDOCK-HOLD: ready"),
        "{console}"
    );
    let ticks: Vec<u32> = hold_lines(state.path(), "v", "DRYDOCK-HOLD-TICK: ")
        .iter()
        .map(|t| t.parse().unwrap())
        .collect();
    assert!(
        ticks.last() == Some(&29) && ticks.windows(2).all(|w| w[1] == w[0] + 1),
        "{ticks:?}"
    );
    check_hold(state.path(), "v", &want, outside);
    eprintln!("virtio-fs VM of 256 MiB: snapshot {save:?}, restore {restore:?}");
    assert!(restore < Duration::from_secs(30), "{restore:?}");
    let list = drydock(state.path()).args(["--json", "vm", "list"]).run();
    let doc: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(doc["vms"][0]["state"], "running", "{doc}");
    ok(&drydock(state.path()).args(["vm", "stop", "v"]).run());
    no_processes(state.path());
}

#[test]
fn snapshots_and_images_are_artifacts_of_their_run() {
    let f = fixture();
    let state = tempfile::tempdir().unwrap();
    start_counter(state.path(), "g", &f.toplevel);
    ok(&drydock(state.path()).args(["vm", "snapshot", "g"]).run());
    // A running VM's run cannot be collected.
    let busy = drydock(state.path()).args(["gc", "--run", "1"]).run();
    assert_eq!(busy.status.code(), Some(2));
    ok(&drydock(state.path()).args(["vm", "stop", "g"]).run());
    // runs show lists the VM folder (snapshots live in it); du sizes it and the image.
    let show = drydock(state.path()).args(["runs", "show", "1"]).run();
    let text = String::from_utf8_lossy(&show.stdout);
    assert!(
        text.contains("state_dir") && text.contains("vms/g"),
        "{text}"
    );
    let du = drydock(state.path()).args(["--json", "du"]).run();
    let doc: serde_json::Value = serde_json::from_slice(&du.stdout).unwrap();
    // What it takes on disk: a `mapped-ram` state is sparse.
    let snapshot_bytes = std::os::unix::fs::MetadataExt::blocks(
        &std::fs::metadata(state.path().join("vms/g/snapshots/default/state")).unwrap(),
    ) * 512;
    assert!(
        doc["by_run"][0][2].as_u64().unwrap() >= snapshot_bytes,
        "{doc}"
    );
    assert_eq!(doc["store_images"]["count"], 1, "{doc}");
    // gc of the run takes its folder (snapshot included) and the image no VM uses any more.
    let dry = drydock(state.path())
        .args(["--json", "gc", "--run", "1", "--dry-run"])
        .run();
    let plan: serde_json::Value = serde_json::from_slice(&dry.stdout).unwrap();
    assert_eq!(plan["images"].as_array().unwrap().len(), 1, "{plan}");
    ok(&drydock(state.path()).args(["gc", "--run", "1"]).run());
    assert!(!state.path().join("vms/g").exists());
    let left: Vec<_> = std::fs::read_dir(state.path().join("images"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "erofs"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
