//! `drydock doctor` run as the real binary on this machine: the verdict first (its lines, its
//! JSON, the exit code) as root and as an ordinary user made by the test, the findings as root,
//! as that user and inside v1 device cgroups that deny /dev/kvm, with `--nix-probe` against a
//! chroot store, and with bad input. Tests that need root say so (they create users and
//! cgroups).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use crate::common::{Drydock, Ran, TempUser, is_root};

fn kvm_present() -> bool {
    Path::new("/dev/kvm").exists()
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn check<'a>(doc: &'a Value, id: &str) -> &'a Value {
    doc["checks"]
        .as_array()
        .expect("checks array")
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no check {id} in {doc:#}"))
}

fn state_dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

#[test]
fn every_finding_has_the_documented_shape() {
    let state = state_dir();
    let out = Drydock::new()
        .args(["doctor", "--json", "--state-dir"])
        .arg(state.path())
        .run();
    let doc = json_of(&out);
    let checks = doc["checks"].as_array().unwrap();
    assert!(checks.len() >= 12, "{doc:#}");
    for c in checks {
        assert!(
            c["id"].is_string() && c["summary"].is_string() && c["detail"].is_string(),
            "{c}"
        );
        assert!(
            ["pass", "warn", "fail"].contains(&c["status"].as_str().unwrap()),
            "{c}"
        );
        assert!(c.get("fix").is_some(), "{c}");
    }
    let verdict = &doc["verdict"];
    for (q, question) in [
        ("vms", "Can VMs run here?"),
        ("nix", "Can Nix build VM tests here?"),
    ] {
        let a = &verdict[q];
        assert_eq!(a["question"], question, "{a}");
        assert!(
            ["yes", "partly", "no"].contains(&a["answer"].as_str().unwrap()),
            "{a}"
        );
        assert!(a["text"].is_string() && a["because"].is_array(), "{a}");
    }
    assert!(
        [Value::from("kvm"), Value::from("tcg"), Value::Null].contains(&verdict["vms"]["accel"]),
        "{verdict}"
    );
    assert!(verdict["nix"]["probed"].is_boolean(), "{verdict}");
    // Exit 1 only for a verdict that says so: a failing finding alone is not enough.
    let failed = verdict["failed"].as_bool().unwrap();
    assert_eq!(out.status.code(), Some(if failed { 1 } else { 0 }));
    for id in [
        "cpu.virt",
        "kvm.modules",
        "kvm.device",
        "kvm.access",
        "kvm.cgroup",
        "nix.build-users",
        "cgroup.placement",
        "qemu",
        "disk.store",
        "disk.state",
    ] {
        check(&doc, id);
    }
    // Only `qemu` says whether this QEMU can snapshot virtio-fs machines, and its summary says
    // the same in words (QEMU 7.2's case: `qemu72::doctor_says_no_to_virtio_fs_snapshots`).
    let qemu = check(&doc, "qemu");
    let can = qemu["virtiofs_snapshots"]
        .as_bool()
        .unwrap_or_else(|| panic!("qemu has no virtiofs_snapshots: {qemu}"));
    let summary = qemu["summary"].as_str().unwrap();
    let words = if can {
        "snapshots of virtio-fs machines (cluster snapshots): yes"
    } else {
        "snapshots of virtio-fs machines (cluster snapshots): no: "
    };
    assert!(
        qemu["status"] != "pass" || summary.contains(words),
        "{qemu}"
    );
    for c in checks.iter().filter(|c| c["id"] != "qemu") {
        assert!(c.get("virtiofs_snapshots").is_none(), "{c}");
    }
}

#[test]
fn human_output_is_a_table_then_fixes_without_colour_when_piped() {
    let state = state_dir();
    let out = Drydock::new()
        .args(["doctor", "--state-dir"])
        .arg(state.path())
        .run();
    let text = out.stdout_str();
    assert!(
        !text.contains('\x1b'),
        "colour codes in piped output:\n{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("✔ kvm.device") || l.starts_with("✘ kvm.device")),
        "{text}"
    );
    assert!(text.contains(" passed, "), "{text}");
}

#[test]
fn as_root_here_device_and_access_pass_and_build_users_warn() {
    if !is_root() || !kvm_present() {
        eprintln!("skipped: needs root and /dev/kvm");
        return;
    }
    let state = state_dir();
    let out = Drydock::new()
        .args(["doctor", "--json", "--state-dir"])
        .arg(state.path())
        .run();
    let doc = json_of(&out);
    assert_eq!(check(&doc, "kvm.device")["status"], "pass");
    assert_eq!(check(&doc, "kvm.access")["status"], "pass");
    assert_eq!(check(&doc, "kvm.api")["status"], "pass");
    let modules = std::fs::read_dir("/sys/module")
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name() == "kvm_pvm");
    if modules {
        let m = check(&doc, "kvm.modules");
        assert_eq!(m["status"], "warn");
        assert!(m["summary"].as_str().unwrap().contains("kvm_pvm"), "{m}");
        assert!(
            m["summary"]
                .as_str()
                .unwrap()
                .contains("only PVM-enabled guest kernels"),
            "{m}"
        );
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata("/dev/kvm").unwrap().permissions(),
    );
    if mode & 0o006 != 0o006
        && std::fs::read_to_string("/etc/group")
            .unwrap()
            .contains("nixbld:")
    {
        let b = check(&doc, "nix.build-users");
        assert_eq!(b["status"], "warn", "{b}");
        assert!(
            b["summary"].as_str().unwrap().contains("manual runs work"),
            "{b}"
        );
        assert!(b["fix"].as_str().unwrap().contains("MODE=\"0666\""), "{b}");
    }
}

fn pvm_host() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

fn kvm_world_rw() -> bool {
    std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata("/dev/kvm").unwrap().permissions())
        & 0o006
        == 0o006
}

/// What the verdict says on a PVM host where KVM is not used: TCG, because of kvm_pvm.
const PVM_VMS: &str = "yes, with TCG (no usable KVM: kvm_pvm loaded: this is a PVM host; only PVM-enabled guest kernels run under KVM [kvm.modules]); expect boots and guest work roughly 5-20× slower than with KVM";
const UNPROBED: &str =
    "; from the settings, not probed (`drydock doctor --nix-probe` tries a build)";

/// The text output starts with the verdict: one line per question, the questions padded to
/// one width, the answers as the JSON has them; then a blank line, then the findings.
fn assert_verdict_first(text: &str, doc: &Value) {
    let lines: Vec<&str> = text.lines().collect();
    let v = &doc["verdict"];
    let width = "Can Nix build VM tests here?".len();
    for (i, q) in ["vms", "nix"].into_iter().enumerate() {
        let want = format!(
            "{:width$} {}",
            v[q]["question"].as_str().unwrap(),
            v[q]["text"].as_str().unwrap()
        );
        assert_eq!(lines[i], want, "line {i}:\n{text}");
    }
    assert_eq!(lines[2], "", "{text}");
    assert!(
        lines[3].starts_with("✔ cpu.virt")
            || lines[3].starts_with("! cpu.virt")
            || lines[3].starts_with("✘ cpu.virt"),
        "{text}"
    );
    assert!(text.contains(" passed, "), "{text}");
}

#[test]
fn the_verdict_comes_first_for_an_ordinary_user_and_warnings_exit_0() {
    if !is_root() || !kvm_present() {
        eprintln!("skipped: needs root (useradd) and /dev/kvm");
        return;
    }
    if kvm_world_rw() {
        eprintln!("skipped: /dev/kvm is world read-write here");
        return;
    }
    let user = TempUser::create();
    let state = world_writable_state();
    let out = as_user(&user, &["doctor", "--json"], state.path());
    let doc = json_of(&out);
    let v = &doc["verdict"];
    // This user cannot use KVM (and on a PVM host nobody can run a standard kernel with it):
    // VMs run with TCG, and Nix's VM tests cannot run here, known from the settings only.
    assert_eq!(v["vms"]["answer"], "yes", "{v:#}");
    assert_eq!(v["vms"]["accel"], "tcg", "{v:#}");
    assert_eq!(v["nix"]["answer"], "no", "{v:#}");
    assert_eq!(v["nix"]["on"], "local", "{v:#}");
    assert_eq!(v["nix"]["probed"], false, "{v:#}");
    assert_eq!(v["nix"]["check"], "drydock doctor --nix-probe", "{v:#}");
    let nix = v["nix"]["text"].as_str().unwrap();
    assert!(nix.starts_with("no: ") && nix.ends_with(UNPROBED), "{nix}");
    if pvm_host() {
        assert_eq!(v["vms"]["text"], PVM_VMS, "{v:#}");
        assert_eq!(v["nix"]["because"][0], "kvm.modules", "{v:#}");
        assert!(
            nix.starts_with("no: KVM here cannot run a VM test's kernel: kvm_pvm loaded"),
            "{nix}"
        );
    } else {
        assert_eq!(v["vms"]["because"][0], "kvm.access", "{v:#}");
    }
    // Warnings and a failing kvm.access, yet nothing asked for says no: exit 0.
    assert_eq!(check(&doc, "kvm.access")["status"], "fail");
    assert_eq!(v["failed"], false, "{v:#}");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = as_user(&user, &["doctor"], state.path());
    assert_eq!(text.status.code(), Some(0));
    assert_verdict_first(&String::from_utf8_lossy(&text.stdout), &doc);
}

#[test]
fn the_verdict_comes_first_as_root() {
    if !is_root() || !kvm_present() {
        eprintln!("skipped: needs root and /dev/kvm");
        return;
    }
    let state = state_dir();
    let out = Drydock::new()
        .args(["doctor", "--json", "--state-dir"])
        .arg(state.path())
        .run();
    let doc = json_of(&out);
    let v = &doc["verdict"];
    assert_eq!(v["vms"]["answer"], "yes", "{v:#}");
    assert_eq!(v["nix"]["probed"], false, "{v:#}");
    if pvm_host() {
        // Root opens /dev/kvm, but kvm_pvm hangs a standard kernel: TCG, and no VM tests in Nix.
        assert_eq!(v["vms"]["text"], PVM_VMS, "{v:#}");
        assert_eq!(v["nix"]["answer"], "no", "{v:#}");
        let mut want = "no: KVM here cannot run a VM test's kernel: kvm_pvm loaded: this is a PVM host; only PVM-enabled guest kernels run under KVM [kvm.modules]".to_string();
        if check(&doc, "nix.build-users")["status"] != "pass" {
            want.push_str("; also nix.build-users");
        }
        want.push_str(UNPROBED);
        assert_eq!(v["nix"]["text"], want.as_str(), "{v:#}");
    }
    assert_eq!(v["failed"], false, "{v:#}");
    assert_eq!(out.status.code(), Some(0));
    let text = Drydock::new()
        .args(["doctor", "--state-dir"])
        .arg(state.path())
        .run();
    assert_eq!(text.status.code(), Some(0));
    assert_verdict_first(&String::from_utf8_lossy(&text.stdout), &doc);
}

/// `drydock ARGS --state-dir STATE` as `user`, with `HOME` at `state`.
fn as_user(user: &TempUser, args: &[&str], state: &Path) -> Ran {
    user.drydock()
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .env("HOME", state)
        .run()
}

fn world_writable_state() -> tempfile::TempDir {
    let d = state_dir();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    d
}

#[test]
fn as_an_ordinary_user_access_fails_naming_user_mode_owner_and_fix() {
    if !is_root() || !kvm_present() {
        eprintln!("skipped: needs root (useradd) and /dev/kvm");
        return;
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata("/dev/kvm").unwrap().permissions(),
    );
    if mode & 0o006 == 0o006 {
        eprintln!("skipped: /dev/kvm is world read-write here");
        return;
    }
    let user = TempUser::create();
    let state = world_writable_state();
    let out = as_user(&user, &["doctor", "--json"], state.path());
    // A failing kvm.access is not the exit code's business: VMs still run, with TCG.
    assert_eq!(
        out.status.code(),
        Some(0),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc = json_of(&out);
    let a = check(&doc, "kvm.access");
    assert_eq!(a["status"], "fail");
    let summary = a["summary"].as_str().unwrap();
    assert!(
        summary.starts_with(&format!("{} cannot open /dev/kvm", user.name)),
        "{a}"
    );
    let detail = a["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!("(mode {:04o})", mode & 0o7777)),
        "{a}"
    );
    assert!(detail.contains("root:"), "{a}");
    let fix = a["fix"].as_str().unwrap();
    assert!(fix.contains("udev rule") && fix.contains(&user.name), "{a}");
    // The human form names them too.
    let text = as_user(&user, &["doctor"], state.path());
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("✘ kvm.access") && text.contains("Fixes:"),
        "{text}"
    );
}

/// A v1 devices cgroup for one test, removed on drop.
struct DevicesCgroup {
    path: PathBuf,
}

impl DevicesCgroup {
    fn create(tag: &str, setup: &[(&str, &str)]) -> Option<Self> {
        let base = Path::new("/sys/fs/cgroup/devices");
        if !base.join("devices.list").exists() {
            return None;
        }
        let path = base.join(format!("drydock-test-{tag}-{}", std::process::id()));
        std::fs::create_dir(&path).ok()?;
        for (file, line) in setup {
            std::fs::write(path.join(file), line)
                .unwrap_or_else(|e| panic!("{file} <- {line}: {e}"));
        }
        Some(Self { path })
    }

    /// Run drydock inside this cgroup.
    fn drydock(&self, args: &[&str], state: &Path) -> Ran {
        let procs = self.path.join("cgroup.procs");
        Drydock::new()
            .via(
                "sh",
                [
                    "-c",
                    &format!("echo $$ > {} && exec \"$@\"", procs.display()),
                    "sh",
                ],
            )
            .args(args)
            .state(state)
            .run()
    }
}

impl Drop for DevicesCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}

#[test]
fn inside_a_v1_devices_cgroup_that_denies_kvm() {
    if !is_root() || !kvm_present() {
        eprintln!("skipped: needs root (cgroups) and /dev/kvm");
        return;
    }
    // Default-allow with a deny exception: the kernel hides the exception; EPERM gives it away.
    let Some(cg) = DevicesCgroup::create("deny", &[("devices.deny", "c 10:232 rwm")]) else {
        eprintln!("skipped: no writable v1 devices controller");
        return;
    };
    let state = state_dir();
    let out = cg.drydock(&["doctor", "--json"], state.path());
    // Denied KVM: VMs run with TCG, so the verdict, not the failing finding, decides: exit 0.
    assert_eq!(out.status.code(), Some(0));
    let doc = json_of(&out);
    assert_eq!(doc["verdict"]["vms"]["accel"], "tcg", "{doc:#}");
    let a = check(&doc, "kvm.access");
    assert_eq!(a["status"], "fail");
    assert!(
        a["detail"]
            .as_str()
            .unwrap()
            .starts_with("EPERM (not EACCES)"),
        "{a}"
    );
    let c = check(&doc, "kvm.cgroup");
    assert_eq!(c["status"], "fail", "{c}");
    assert!(c["fix"].as_str().unwrap().contains("devices.allow"), "{c}");
    drop(cg);

    // Whitelist mode without c 10:232: the list itself shows the cause.
    let Some(cg) = DevicesCgroup::create(
        "list",
        &[
            ("devices.deny", "a"),
            ("devices.allow", "c 1:3 rwm"),
            ("devices.allow", "c 1:5 rwm"),
            ("devices.allow", "c 1:8 rwm"),
            ("devices.allow", "c 1:9 rwm"),
            ("devices.allow", "c 5:0 rwm"),
            ("devices.allow", "c 136:* rwm"),
        ],
    ) else {
        panic!("could create one devices cgroup but not a second");
    };
    let out = cg.drydock(&["doctor", "--json"], state.path());
    let doc = json_of(&out);
    assert_eq!(out.status.code(), Some(0));
    let c = check(&doc, "kvm.cgroup");
    assert_eq!(c["status"], "fail", "{c}");
    assert!(
        c["summary"]
            .as_str()
            .unwrap()
            .contains("does not allow c 10:232"),
        "{c}"
    );
    assert!(c["detail"].as_str().unwrap().contains("c 1:3 rwm"), "{c}");
    assert_eq!(check(&doc, "kvm.access")["status"], "fail");
}

#[test]
fn store_that_names_nothing_is_bad_input() {
    let out = Drydock::new()
        .args(["doctor", "--store", "/nonexistent/drydock-store"])
        .run();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--store /nonexistent/drydock-store"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn unreadable_nix_conf_is_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    // A directory in place of the file: it exists and cannot be read.
    std::fs::create_dir(dir.path().join("nix.conf")).unwrap();
    let out = Drydock::new()
        .args(["doctor", "--state-dir"])
        .arg(dir.path())
        .env("NIX_CONF_DIR", dir.path())
        .run();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}/nix.conf", dir.path().display())),
        "{err}"
    );
}

#[test]
fn unreadable_nix_conf_for_an_ordinary_user() {
    if !is_root() {
        eprintln!("skipped: needs root (useradd)");
        return;
    }
    let user = TempUser::create();
    let dir = world_writable_state();
    let conf = dir.path().join("nix.conf");
    std::fs::write(&conf, "sandbox = true\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o000)).unwrap();
    let out = user
        .drydock()
        .args(["doctor", "--state-dir"])
        .arg(dir.path())
        .env("NIX_CONF_DIR", dir.path())
        .env("HOME", dir.path())
        .run();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nix.conf") && err.contains("Permission denied"),
        "{err}"
    );
}

#[test]
fn nix_probe_builds_in_a_chroot_store_and_reports_what_the_builder_saw() {
    if !is_root() || !kvm_present() || Command::new("nix-build").arg("--version").output().is_err()
    {
        eprintln!("skipped: needs root, /dev/kvm and nix-build");
        return;
    }
    let store = tempfile::tempdir().unwrap();
    let state = state_dir();
    let out = Drydock::new()
        .args(["doctor", "--json", "--nix-probe", "--store"])
        .arg(store.path())
        .arg("--state-dir")
        .arg(state.path())
        .run();
    let doc = json_of(&out);
    let p = check(&doc, "nix.probe");
    // The build really ran into the chroot store.
    assert!(store.path().join("nix/store").is_dir(), "{p}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata("/dev/kvm").unwrap().permissions(),
    );
    if mode & 0o006 == 0o006 {
        assert_eq!(p["status"], "pass", "{p}");
    } else {
        // Here /dev/kvm is root-only: the sandboxed builder must be refused.
        assert_eq!(p["status"], "fail", "{p}");
        assert!(
            p["summary"]
                .as_str()
                .unwrap()
                .contains("cannot open /dev/kvm"),
            "{p}"
        );
        assert!(p["detail"].as_str().unwrap().contains("uid "), "{p}");
        // Asked, and the answer is no: the verdict says so first, and the exit code is 1.
        let nix = &doc["verdict"]["nix"];
        assert_eq!(nix["answer"], "no", "{nix}");
        assert_eq!(nix["probed"], true, "{nix}");
        assert_eq!(nix["because"][0], "nix.probe", "{nix}");
        assert!(
            nix["text"].as_str().unwrap().starts_with(
                "no: inside the Nix sandbox, the builder cannot open /dev/kvm [nix.probe]"
            ),
            "{nix}"
        );
        assert_eq!(doc["verdict"]["failed"], true);
        assert_eq!(out.status.code(), Some(1));
    }
}

#[test]
fn boot_probe_reports_how_far_a_kernel_got_under_kvm() {
    if !is_root() || !kvm_present() {
        eprintln!("skipped: needs root and /dev/kvm");
        return;
    }
    let state = state_dir();
    let out = Drydock::new()
        .args([
            "doctor",
            "--json",
            "--boot-probe",
            "--probe-timeout",
            "8",
            "--state-dir",
        ])
        .arg(state.path())
        .run();
    if out.status.code() == Some(2) {
        // No test kernel in the cache: the message must say where it looked and what to do.
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("run scripts/setup"), "{err}");
        return;
    }
    let doc = json_of(&out);
    let b = check(&doc, "kvm.boot");
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    if pvm {
        // A standard Debian kernel hangs under KVM on a PVM host: the probe must say so.
        assert_eq!(b["status"], "fail", "{b}");
        assert!(
            b["summary"].as_str().unwrap().contains("hung")
                || b["summary"].as_str().unwrap().contains("exited"),
            "{b}"
        );
        assert!(b["fix"].as_str().unwrap().contains("--accel tcg"), "{b}");
        assert_eq!(out.status.code(), Some(1));
    } else {
        assert!(
            ["pass", "fail"].contains(&b["status"].as_str().unwrap()),
            "{b}"
        );
    }
}
