//! What issue 19's hostile pass found about clusters, each class with a regression test against
//! real QEMU (TCG), real processes and real signals: faults the owner must notice (a store
//! server killed, an owner killed while `up --detach` waits, `down` on a full state dir,
//! leftovers), a guest that prints without end or prints escape sequences, and interruptions
//! (`exec`, evaluation and build under SIGINT and SIGTERM). Needs root (the store server's
//! sandbox, a tmpfs) and the test guest's kernel (`scripts/guest/build-initrd`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{Ran, Spawned};
use crate::vmcommon::{
    Cluster, guest_ready, processes_mentioning, text, wait_no_processes, wait_until,
};

/// Wait (bounded) for `child` to exit: its output, and how long it took from `since`.
fn finish(mut child: Spawned, since: Instant, within: Duration) -> (Ran, Duration) {
    child.wait_within(within.saturating_sub(since.elapsed()));
    let took = since.elapsed();
    (child.output(), took)
}

fn vm_state(c: &Cluster, vm: &str) -> serde_json::Value {
    let p = c.state().join("vms").join(vm).join("state.json");
    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
}

fn row<'a>(ps: &'a serde_json::Value, machine: &str) -> &'a serde_json::Value {
    ps.as_array()
        .unwrap()
        .iter()
        .find(|r| r["machine"] == machine)
        .unwrap()
}

#[test]
fn a_killed_store_server_is_noticed_by_ps_exec_and_the_reload_plan() {
    let c = Cluster::named("lost")
        .machines(
            "a = { system = sys { }; memorySize = 256; }; b = { system = sys { }; memorySize = 256; };",
        )
        .up();
    let server = vm_state(&c, "lost.a")["server_pid"].as_u64().unwrap() as u32;

    // A call in progress when the store server dies fails at once, saying why.
    let call = exec_child(&c, "a", "sleep 2; ls /nix/store");
    std::thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    drydock_gc::send_signal(server, libc::SIGKILL).unwrap();
    let (out, took) = finish(call, killed, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("store server"),
        "{}",
        text(&out.stderr)
    );
    assert!(took < Duration::from_secs(30), "{took:?}");

    // `ps` says so (the machine is stopped by its owner), the other machine runs on.
    wait_until("a is failed", Duration::from_secs(30), || {
        row(&c.ps(), "a")["state"] == "failed"
    });
    let ps = c.ps();
    let problem = row(&ps, "a")["problem"].as_str().unwrap().to_string();
    assert!(
        problem.contains(&format!("its store server (pid {server}) died")),
        "{problem}"
    );
    assert_eq!(row(&ps, "b")["state"], "running");
    let o = c.verb("ps").run();
    assert!(text(&o.stdout).contains("failed"), "{}", text(&o.stdout));
    assert!(
        text(&o.stdout).contains("store server"),
        "{}",
        text(&o.stdout)
    );

    // Later calls fail at once with the cause, not a busy backdoor.
    let t = Instant::now();
    let o = c.exec("a", "600", "true");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("is not running: its store server"),
        "{}",
        text(&o.stderr)
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(c.exec("b", "30", "true").status.code(), Some(0));

    // The reload plan restarts it, saying why; applying it brings it back.
    let plan = c
        .drydock()
        .json()
        .args(["up", "-f"])
        .arg(c.file())
        .args(["--dry-run", "--accel", "tcg"])
        .run();
    assert_eq!(plan.status.code(), Some(0), "{}", text(&plan.stderr));
    let plan: serde_json::Value = serde_json::from_slice(&plan.stdout).unwrap();
    let a = plan["machines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["machine"] == "a")
        .unwrap();
    assert_eq!(a["action"], "restart", "{plan}");
    assert!(
        a["why"].as_str().unwrap().contains("store server"),
        "{plan}"
    );
    let up = c
        .verb("up")
        .args(["--accel", "tcg", "--timeout", "300"])
        .run();
    assert_eq!(up.status.code(), Some(0), "{}", text(&up.stderr));
    let o = c.exec("a", "30", "ls /nix/store | head -1");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(row(&c.ps(), "a")["state"], "running");
    c.down();
}

/// Start `exec MACHINE -- CMD` in the background.
fn exec_child(c: &Cluster, machine: &str, cmd: &str) -> Spawned {
    c.verb("exec")
        .args([machine, "--timeout", "600", "--", cmd])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
}

/// How many processes in the guest run `sleep 30` now.
fn guest_sleepers(c: &Cluster) -> String {
    let o = c.exec("a", "30", "ps | grep -c '[s]leep 3[0]' || true");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    text(&o.stdout).trim().to_string()
}

#[test]
fn an_interrupted_or_killed_exec_kills_its_command_and_frees_the_backdoor() {
    let c = Cluster::named("sig")
        .machines("a = { system = sys { }; memorySize = 256; };")
        .up();
    for (sig, code) in [
        (libc::SIGINT, Some(130)),
        (libc::SIGTERM, Some(130)),
        (libc::SIGKILL, None),
    ] {
        // The command says it started on the console (calls queue: `exec` cannot look).
        let call = exec_child(
            &c,
            "a",
            &format!("echo STARTED-{sig} > /dev/console; sleep 30"),
        );
        let w = c
            .verb("wait")
            .args(["a", "--timeout", "60", "--console"])
            .arg(format!("^STARTED-{sig}$"))
            .run();
        assert_eq!(w.status.code(), Some(0), "{}", text(&w.stderr));
        let sent = Instant::now();
        call.signal(sig);
        let (out, took) = finish(call, sent, Duration::from_secs(20));
        assert_eq!(
            out.status.code(),
            code,
            "signal {sig}: {}",
            text(&out.stderr)
        );
        assert!(took < Duration::from_secs(5), "signal {sig}: {took:?}");
        // The owner saw the caller go and killed its command: the backdoor answers at once.
        let t = Instant::now();
        let o = c.exec("a", "30", "echo next");
        assert_eq!(
            (o.status.code(), text(&o.stdout).as_str()),
            (Some(0), "next\n"),
            "signal {sig}: {}",
            text(&o.stderr)
        );
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        assert_eq!(guest_sleepers(&c), "0", "signal {sig}");
    }
    c.down();
}

fn size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

#[test]
fn a_guest_that_prints_without_end_stays_within_its_log_limit_and_is_shown_escaped() {
    let c = Cluster::named("loud")
        .machines("a = { system = sys { }; memorySize = 256; };")
        .write();
    let limit: u64 = 256 << 10;
    c.up_detached_with(&["--log-limit", "256K"]);
    // About 2 MB of 100-character lines on the serial console: 8 times the limit.
    let o = c.exec(
        "a",
        "600",
        "i=0; line=$(printf '%099d' 0); while [ $i -lt 20000 ]; do echo \"$i $line\"; i=$((i+1)); done > /dev/console; echo LOUD-DONE > /dev/console",
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let w = c
        .verb("wait")
        .args(["a", "--timeout", "120", "--console", "^LOUD-DONE$"])
        .run();
    assert_eq!(w.status.code(), Some(0), "{}", text(&w.stderr));
    let vm = c.state().join("vms/loud.a");
    let log: u64 = ["console.log", "console.log.1"]
        .iter()
        .map(|f| size(&vm.join(f)))
        .sum();
    let timed: u64 = ["console.timed", "console.timed.1"]
        .iter()
        .map(|f| size(&vm.join(f)))
        .sum();
    assert!(size(&vm.join("console.log.1")) > 0, "it was rotated");
    assert!(log <= limit / 2, "console.log and .1: {log} bytes");
    assert!(timed <= limit / 2, "console.timed and .1: {timed} bytes");
    // What is kept is the end: `logs` shows the last lines, in order.
    let logs = c.verb("logs").run();
    assert_eq!(logs.status.code(), Some(0), "{}", text(&logs.stderr));
    let out = text(&logs.stdout);
    assert!(
        out.lines().last().unwrap().ends_with("│ LOUD-DONE"),
        "{out}"
    );
    assert!(out.contains("19999 000"), "the last numbered line");

    // Escape sequences the guest prints reach the terminal escaped: OSC 52 (the clipboard),
    // a title change, clearing the screen.
    let o = c.exec(
        "a",
        "60",
        r"printf 'HOSTILE \033]52;c;cHduZWQ=\007 \033]0;owned\033\\ \033[2J\033[H end\n' > /dev/console",
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let w = c
        .verb("wait")
        .args(["a", "--timeout", "60", "--console", "^HOSTILE"])
        .run();
    assert_eq!(w.status.code(), Some(0), "{}", text(&w.stderr));
    let want = r"HOSTILE \e]52;c;cHduZWQ=\a \e]0;owned\e\ \e[2J\e[H end";
    for args in [
        vec![
            "logs".to_string(),
            "--file".into(),
            c.file().display().to_string(),
        ],
        vec!["vm".into(), "logs".into(), "loud.a".into()],
    ] {
        let o = c.drydock().args(&args).run();
        assert_eq!(o.status.code(), Some(0), "{args:?}: {}", text(&o.stderr));
        assert!(
            !o.stdout.contains(&0x1b) && !o.stdout.contains(&0x07),
            "{args:?} wrote a raw escape sequence"
        );
        assert!(
            text(&o.stdout).contains(want),
            "{args:?}: {}",
            text(&o.stdout)
        );
    }
    // `wait` shows the line it matched escaped too; the log on disk keeps the bytes.
    assert!(text(&w.stderr).contains(r"\e]52;c;"), "{}", text(&w.stderr));
    assert!(!w.stderr.contains(&0x1b));
    let raw = std::fs::read(vm.join("console.log")).unwrap();
    assert!(raw.windows(5).any(|x| x == b"\x1b]52;"));
    c.down();
}

#[test]
fn a_detached_owner_killed_while_up_waits_is_reported_with_its_pid_signal_and_log() {
    guest_ready();
    let c = Cluster::named("orphan")
        .machines("a = { system = sys { }; memorySize = 256; };")
        .write();
    let state = c.state();
    let up = c
        .verb("up")
        .args(["--detach", "--accel", "tcg", "--timeout", "300"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    // Killed while its machine boots (its QEMU runs).
    let mut owner = 0;
    wait_until("the owner runs a QEMU", Duration::from_secs(120), || {
        let ps = processes_mentioning(state);
        owner = ps
            .iter()
            .find(|(_, cmd)| cmd.contains("__cluster-supervise"))
            .map_or(0, |(pid, _)| *pid);
        owner != 0 && ps.iter().any(|(_, cmd)| cmd.contains("qemu-system"))
    });
    drydock_gc::send_signal(owner, libc::SIGKILL).unwrap();
    let (out, _) = finish(up, Instant::now(), Duration::from_secs(60));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "its owner (pid {owner}) was killed by signal 9 (SIGKILL)"
        )),
        "{err}"
    );
    assert!(err.contains("clusters/orphan/drydock.log"), "{err}");
    assert!(!err.contains("did not start:\n"), "{err}");
    eprintln!("{err}");
    // Its machines died with it, and what it left is gone: their state, runs and cgroups.
    wait_no_processes(state, Duration::from_secs(30));
    assert!(!state.join("vms/orphan.a/state.json").exists());
    assert!(vm_runs(&c).iter().all(|(_, ended)| *ended));
    assert!(
        cgroups_of("orphan").is_empty(),
        "{:?}",
        cgroups_of("orphan")
    );
    // Nothing is left to stop: `down` gives the one not-up answer, exit 2.
    let down = c.verb("down").run();
    assert_eq!(down.status.code(), Some(2), "{}", text(&down.stderr));
    assert!(
        text(&down.stderr).contains("the cluster orphan is not up"),
        "{}",
        text(&down.stderr)
    );
}

/// A tmpfs of `mib` MiB at `dir` (0700, as drydock wants a state dir), unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, mib: u32) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let o = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "mount: {}", text(&o.stderr));
        Self(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The runs of kind `vm` and whether each is ended, by `runs --json`.
fn vm_runs(c: &Cluster) -> Vec<(i64, bool)> {
    let o = c.drydock().json().arg("runs").run();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["runs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "vm")
        .map(|r| (r["id"].as_i64().unwrap(), !r["ended_at"].is_null()))
        .collect()
}

#[test]
fn down_on_a_full_state_dir_ends_the_machines_runs() {
    // The state dir's tmpfs is unmounted after the cluster is down (declared first, dropped
    // last), also when the test fails.
    let fs;
    let c = Cluster::named("full")
        .machines(
            "a = { system = sys { }; memorySize = 256; }; b = { system = sys { }; memorySize = 256; };",
        )
        .write();
    let state = c.state();
    fs = Tmpfs::mount(state, 16);
    c.up_detached();
    // Fill the state dir to the last byte.
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", state.join("filler").display()))
        .output()
        .unwrap();
    let df = Command::new("df").arg(state).output().unwrap();
    assert!(text(&df.stdout).contains("100%"), "{}", text(&df.stdout));
    c.down();
    std::fs::remove_file(state.join("filler")).unwrap();
    // The two machines share one run, `machines of full`.
    let runs = vm_runs(&c);
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert!(
        runs.iter().all(|(_, ended)| *ended),
        "runs left open: {runs:?}"
    );
    for (id, _) in runs {
        let o = c
            .drydock()
            .args(["gc", "--run", &id.to_string(), "--dry-run"])
            .run();
        assert!(
            !text(&o.stderr).contains("still running"),
            "{}",
            text(&o.stderr)
        );
    }
    drop(fs);
}

/// The cgroups named for `cluster`'s machines, anywhere under the cgroup file systems.
fn cgroups_of(cluster: &str) -> Vec<PathBuf> {
    fn walk(d: &Path, depth: usize, prefix: &str, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(d) else {
            return;
        };
        for e in rd.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(prefix) {
                out.push(e.path());
            } else if depth > 0 {
                walk(&e.path(), depth - 1, prefix, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(
        Path::new("/sys/fs/cgroup"),
        5,
        &format!("drydock-vm-{cluster}."),
        &mut out,
    );
    out
}

/// Sockets (and socket folders) a cluster's machines could have left.
fn leftovers(state: &Path, cluster: &str, machines: &[&str]) -> Vec<PathBuf> {
    use std::os::unix::fs::FileTypeExt as _;
    let mut out = Vec::new();
    let mut folders: Vec<drydock_vm::VmPaths> = machines
        .iter()
        .map(|m| drydock_vm::VmPaths::in_state_dir(state, &format!("{cluster}.{m}")))
        .collect();
    folders.push(drydock_vm::VmPaths::in_folder(state, "clusters", cluster));
    for p in folders {
        if p.sockets != p.dir && p.sockets.exists() {
            out.push(p.sockets.clone());
        }
        for d in [&p.dir, &p.sockets] {
            for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
                if e.file_type().is_ok_and(|t| t.is_socket()) {
                    out.push(e.path());
                }
            }
        }
        if p.dir.join("state.json").exists() {
            out.push(p.dir.join("state.json"));
        }
    }
    out.extend(cgroups_of(cluster));
    out
}

#[test]
fn down_leaves_no_cgroup_socket_or_socket_folder_even_after_a_killed_owner() {
    // Deep enough that the sockets go to a runtime folder of their own.
    let deep = tempfile::tempdir().unwrap();
    let c = Cluster::named("left")
        .machines(
            "a = { system = sys { }; memorySize = 256; vlans = [ 1 2 ]; }; b = { system = sys { }; memorySize = 256; };",
        )
        .state(deep.path().join("s".repeat(90)))
        .write();
    let state = c.state();
    let sockets = drydock_vm::VmPaths::in_state_dir(state, "left.a").sockets;
    assert!(!sockets.starts_with(state), "{}", sockets.display());
    for kill_owner in [false, true] {
        c.up_detached();
        assert!(sockets.join("exec.sock").exists());
        assert!(!cgroups_of("left").is_empty(), "the machines have cgroups");
        if kill_owner {
            drydock_gc::send_signal(c.owner_pid(), libc::SIGKILL).unwrap();
            wait_no_processes(state, Duration::from_secs(30));
            assert!(!leftovers(state, "left", &["a", "b"]).is_empty());
        }
        c.down();
        let left = leftovers(state, "left", &["a", "b"]);
        assert!(left.is_empty(), "killed owner {kill_owner}: left {left:#?}");
    }
}

/// `up` of the cluster in the background.
fn up_child(c: &Cluster) -> Spawned {
    c.verb("up")
        .args(["--accel", "tcg", "--timeout", "300"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
}

#[test]
fn evaluation_and_build_end_on_sigint_and_sigterm_and_at_their_deadline() {
    guest_ready();
    let fifos = tempfile::tempdir().unwrap();
    let fifo = fifos.path().join("fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    // An evaluation that blocks for ever: it reads a FIFO nobody writes.
    let blocked = Cluster::named("blocked")
        .composition(&format!(
            "{{ machines.a = {{ system = builtins.readFile {}; }}; }}",
            fifo.display()
        ))
        .write();
    // A build that takes for ever, run by the test system's busybox (nothing from the host).
    let slow = Cluster::named("slow")
        .machines(
            r#"a = { system = derivation { name = "slow"; system = "x86_64-linux"; builder = "${(sys { }).sw}/bin/sh"; args = [ "-c" "sleep 600" ]; allowSubstitutes = false; preferLocalBuild = true; }; };"#,
        )
        .write();
    // Nix gone with it: nothing mentions the composition's directory any more, and the builder
    // is gone too.
    let gone = |d: &Path| {
        wait_no_processes(d, Duration::from_secs(20));
        wait_no_processes(Path::new("sleep 600"), Duration::from_secs(20));
    };

    for (c, what) in [(&blocked, "evaluation"), (&slow, "build")] {
        let d = c.file().parent().unwrap();
        for sig in [libc::SIGINT, libc::SIGTERM] {
            let up = up_child(c);
            // Well into the evaluation or the build.
            wait_until("Nix runs", Duration::from_secs(60), || {
                processes_mentioning(d)
                    .iter()
                    .any(|(_, c)| c.contains("nix-instantiate") || c.contains("nix-build"))
            });
            if what == "build" {
                wait_until("the builder runs", Duration::from_secs(60), || {
                    !processes_mentioning(Path::new("sleep 600")).is_empty()
                });
            }
            let sent = Instant::now();
            up.signal(sig);
            let (out, took) = finish(up, sent, Duration::from_secs(60));
            assert_eq!(
                out.status.code(),
                Some(130),
                "{what}, signal {sig}: {}",
                text(&out.stderr)
            );
            assert!(
                took < Duration::from_secs(15),
                "{what}, signal {sig}: {took:?}"
            );
            gone(d);
        }
        // The deadline.
        let t = Instant::now();
        let out = c
            .verb("up")
            .args(["--accel", "tcg", "--build-timeout", "3"])
            .run();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert!(err.contains("stopped"), "{what}: {err}");
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{what}: {:?}",
            t.elapsed()
        );
        gone(d);
    }
}
