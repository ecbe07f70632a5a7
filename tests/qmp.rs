//! drydock's QMP client (`drydock_vm::Qmp`) against real QEMU processes (`-machine none`, or
//! a small q35 under TCG), each with its own QMP socket: the greeting and its version, run
//! states and their events, QEMU's error classes, `quit`, `system_powerdown`, a QEMU that is
//! killed, and a migration to a file and back (and one that fails). The client's handling of
//! what needs no QEMU (timeouts, names, quoting) is unit-tested in `vm/src/qmp.rs`.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use drydock_vm::{MigrationStatus, Qmp, QmpError, RunState, VmStatus, incoming_file_uri};
use qapi::qmp as q;
use serde_json::{Value, json};

const QEMU: &str = "qemu-system-x86_64";
const CONNECT: Duration = Duration::from_secs(15);
const EVENT: Duration = Duration::from_secs(10);

/// A QEMU process with its own short temp dir; killed and reaped on drop.
struct Qemu {
    child: Child,
    dir: tempfile::TempDir,
    sock: PathBuf,
}

impl Qemu {
    fn spawn(args: &[&str]) -> Qemu {
        // Unix socket paths are limited to 108 bytes: stay short, under /tmp.
        let dir = tempfile::Builder::new()
            .prefix("dq")
            .tempdir_in("/tmp")
            .expect("temp dir");
        let sock = dir.path().join("q.sock");
        let log = File::create(dir.path().join("qemu.log")).expect("qemu log");
        let child = Command::new(QEMU)
            .args(["-nodefaults", "-display", "none", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", sock.display()))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {QEMU} (is QEMU installed?): {e}"));
        Qemu { child, dir, sock }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("qemu.log")).unwrap_or_default()
    }

    fn connect(&self) -> Qmp {
        Qmp::connect(&self.sock, CONNECT)
            .unwrap_or_else(|e| panic!("QMP connect: {e:?}; QEMU log:\n{}", self.log()))
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `(major, minor, micro)` from `qemu-system-x86_64 --version`.
fn installed_version() -> (u32, u32, u32) {
    let out = Command::new(QEMU)
        .arg("--version")
        .output()
        .expect("qemu --version");
    let text = String::from_utf8_lossy(&out.stdout);
    let word = text
        .split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)
        .unwrap_or_else(|| panic!("no version in {text:?}"));
    let mut parts = word.split('.').map(|p| p.parse::<u32>().expect("number"));
    let mut next = || parts.next().unwrap_or(0);
    (next(), next(), next())
}

#[test]
fn greeting_version_and_running_status() {
    let qemu = Qemu::spawn(&["-machine", "none"]);
    let mut qmp = qemu.connect();
    assert_eq!(qmp.version(), installed_version());
    assert!(qmp.version() >= (2, 0, 0));
    assert_eq!(qmp.socket_path(), qemu.sock.as_path());
    let status = qmp.status().expect("query-status");
    assert_eq!(
        status,
        VmStatus {
            state: RunState::Running,
            running: true
        }
    );
    // A typed command through qapi's schema.
    let version = qmp.execute(&q::query_version {}).expect("query-version");
    assert_eq!(version.qemu.major, i64::from(qmp.version().0));
}

#[test]
fn stop_and_cont_change_status_and_emit_events() {
    let qemu = Qemu::spawn(&["-machine", "none", "-S"]);
    let mut qmp = qemu.connect();
    let status = qmp.status().expect("status");
    assert_eq!(status.state, RunState::Prelaunch);
    assert!(!status.running);

    qmp.cont().expect("cont");
    let resume = qmp.wait_event("RESUME", EVENT).expect("RESUME");
    assert!(resume.timestamp.is_some());
    assert!(matches!(resume.typed(), Some(q::Event::RESUME { .. })));
    assert_eq!(qmp.status().expect("status").state, RunState::Running);

    qmp.stop().expect("stop");
    qmp.wait_event("STOP", EVENT).expect("STOP");
    let status = qmp.status().expect("status");
    assert_eq!(status.state, RunState::Paused);
    assert!(!status.running);

    qmp.cont().expect("cont");
    qmp.wait_event("RESUME", EVENT).expect("second RESUME");
    assert!(qmp.status().expect("status").running);
    assert!(
        qmp.events()
            .iter()
            .all(|e| e.name != "STOP" && e.name != "RESUME"),
        "awaited events are taken off the queue"
    );

    // Events are collected while waiting for replies, and handed out by events().
    qmp.stop().expect("stop");
    qmp.status().expect("status");
    let names: Vec<String> = qmp.events().into_iter().map(|e| e.name).collect();
    assert_eq!(names, ["STOP"]);
    assert!(qmp.events().is_empty());

    // An event that never comes times out within its deadline.
    let started = Instant::now();
    let err = qmp
        .wait_event("RESUME", Duration::from_millis(300))
        .expect_err("no RESUME without cont");
    assert!(matches!(err, QmpError::Timeout { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn command_errors_carry_qemus_class_and_keep_the_session_usable() {
    let qemu = Qemu::spawn(&["-machine", "none"]);
    let mut qmp = qemu.connect();
    let err = qmp
        .execute_raw("no-such-command", Value::Null)
        .expect_err("unknown command");
    match &err {
        QmpError::Command {
            command,
            class,
            desc,
        } => {
            assert_eq!(command, "no-such-command");
            assert_eq!(class, "CommandNotFound");
            assert!(desc.contains("no-such-command"), "{desc}");
        }
        other => panic!("expected QmpError::Command, got {other:?}"),
    }
    assert!(!err.is_bad_input());

    let err = qmp
        .execute_raw("migrate", json!({ "uri": "bogus:nowhere" }))
        .expect_err("bad migration URI");
    assert!(
        matches!(&err, QmpError::Command { class, .. } if class == "GenericError"),
        "{err:?}"
    );

    let reply = qmp
        .execute_raw("query-status", Value::Null)
        .expect("raw query-status");
    assert_eq!(reply["status"], "running");
    assert!(qmp.status().expect("status").running);
}

#[test]
fn quit_makes_qemu_exit() {
    let mut qemu = Qemu::spawn(&["-machine", "none"]);
    let mut qmp = qemu.connect();
    qmp.quit().expect("quit");
    qmp.wait_disconnected(EVENT)
        .expect("QEMU closes the socket");
    let status = qemu
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("QEMU did not exit after quit; log:\n{}", qemu.log()));
    assert!(status.success(), "{status:?}");
    // quit sends SHUTDOWN with reason host-qmp-quit before closing.
    let shutdown = qmp.wait_event("SHUTDOWN", EVENT).expect("SHUTDOWN");
    assert_eq!(shutdown.data["reason"], "host-qmp-quit");
    let err = qmp.status().expect_err("no QEMU any more");
    assert!(matches!(err, QmpError::Disconnected { .. }), "{err:?}");
    // quit on a closed session is still fine.
    qmp.quit().expect("second quit");
}

#[test]
fn powerdown_emits_powerdown_event() {
    // No guest OS handles the ACPI button, so QEMU keeps running: only POWERDOWN comes.
    let qemu = Qemu::spawn(&["-M", "q35", "-accel", "tcg", "-m", "64"]);
    let mut qmp = qemu.connect();
    qmp.powerdown().expect("system_powerdown");
    let event = qmp.wait_event("POWERDOWN", EVENT).expect("POWERDOWN");
    assert!(matches!(event.typed(), Some(q::Event::POWERDOWN { .. })));
    assert!(qmp.status().expect("status").running);
}

#[test]
fn killed_qemu_gives_disconnected() {
    let mut qemu = Qemu::spawn(&["-machine", "none"]);
    let mut qmp = qemu.connect();
    assert!(qmp.status().expect("status").running);
    qemu.child.kill().expect("kill");
    qemu.child.wait().expect("reap");
    let started = Instant::now();
    let err = qmp.status().expect_err("dead QEMU");
    assert!(matches!(err, QmpError::Disconnected { .. }), "{err:?}");
    assert!(
        started.elapsed() < qmp.command_timeout() / 2,
        "must not wait for a timeout"
    );
    let err = qmp
        .wait_event("STOP", Duration::from_secs(5))
        .expect_err("dead QEMU");
    assert!(matches!(err, QmpError::Disconnected { .. }), "{err:?}");
}

#[test]
fn migrate_to_file_and_restore() {
    let src = Qemu::spawn(&["-M", "q35", "-accel", "tcg", "-m", "64"]);
    let mut qmp = src.connect();
    qmp.execute_raw(
        "migrate-set-capabilities",
        json!({ "capabilities": [{ "capability": "events", "state": true }] }),
    )
    .expect("enable MIGRATION events");
    qmp.stop().expect("stop");
    let snapshot = src.dir.path().join("snap shot's.bin");
    qmp.migrate_to_file(&snapshot).expect("migrate");
    // `migrate` replies at once; MIGRATION events follow while the client is idle, and
    // poll_events picks them up without blocking.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut statuses = Vec::new();
    while Instant::now() < deadline && statuses.last().is_none_or(|s| s != "completed") {
        qmp.poll_events().expect("poll_events");
        statuses.extend(
            qmp.events()
                .into_iter()
                .filter(|e| e.name == "MIGRATION")
                .map(|e| e.data["status"].as_str().unwrap_or_default().to_owned()),
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        statuses.last().map(String::as_str),
        Some("completed"),
        "{statuses:?}"
    );
    let info = qmp
        .wait_migration(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("migration: {e:?}; log:\n{}", src.log()));
    assert_eq!(info.status, MigrationStatus::Completed);
    assert!(info.ram_transferred.unwrap_or(0) > 0, "{:?}", info.raw);
    assert_eq!(qmp.status().expect("status").state, RunState::PostMigrate);
    let size = std::fs::metadata(&snapshot).expect("snapshot file").len();
    assert!(size > 64 * 1024, "snapshot is only {size} bytes");
    qmp.quit().expect("quit source");

    let dst = Qemu::spawn(&[
        "-M",
        "q35",
        "-accel",
        "tcg",
        "-m",
        "64",
        "-incoming",
        "defer",
    ]);
    let mut qmp = dst.connect();
    assert_eq!(qmp.status().expect("status").state, RunState::InMigrate);
    let uri = incoming_file_uri(&snapshot).expect("uri");
    qmp.migrate_incoming(&uri).expect("migrate-incoming");
    let deadline = Instant::now() + Duration::from_secs(60);
    let state = loop {
        let state = qmp.status().expect("status").state;
        if state != RunState::InMigrate || Instant::now() >= deadline {
            break state;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // The source was stopped, so the restored VM stays paused.
    assert_eq!(state, RunState::Paused, "log:\n{}", dst.log());
    qmp.cont().expect("cont");
    qmp.wait_event("RESUME", EVENT).expect("RESUME");
    assert!(qmp.status().expect("status").running);
}

#[test]
fn migration_failure_is_reported() {
    let qemu = Qemu::spawn(&["-M", "q35", "-accel", "tcg", "-m", "64"]);
    let mut qmp = qemu.connect();
    qmp.execute_raw(
        "migrate-set-capabilities",
        json!({ "capabilities": [{ "capability": "events", "state": true }] }),
    )
    .expect("enable MIGRATION events");
    qmp.stop().expect("stop");
    // The directory does not exist, so `cat > PATH` fails and the migration with it.
    let bad = qemu.dir.path().join("missing-dir").join("snap.bin");
    qmp.migrate_to_file(&bad).expect("migrate starts");
    qmp.wait_event_where("MIGRATION failed", Duration::from_secs(60), |e| {
        e.name == "MIGRATION" && e.data["status"] == "failed"
    })
    .expect("MIGRATION failed event");
    let err = qmp
        .wait_migration(Duration::from_secs(60))
        .expect_err("migration into a missing directory");
    assert!(
        matches!(
            err,
            QmpError::Migration {
                status: MigrationStatus::Failed,
                ..
            }
        ),
        "{err:?}"
    );
}
