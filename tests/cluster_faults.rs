//! What issue 19's hostile pass found about clusters, each class with a regression test against
//! real QEMU (TCG), real processes and real signals: faults the owner must notice (a store
//! server killed, an owner killed while `up --detach` waits, `down` on a full state dir,
//! leftovers), a guest that prints without end or prints escape sequences, and interruptions
//! (`exec`, evaluation and build under SIGINT and SIGTERM). Needs root (the store server's
//! sandbox, a tmpfs) and the test guest's kernel (`scripts/guest/build-initrd`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::vmcommon;
use vmcommon::{
    DownOnDrop, cluster_down, cluster_drydock, cluster_exec, cluster_ps, cluster_store as store,
    cluster_up_detached, guest_ready, processes_mentioning, text, wait_no_processes, wait_until,
    write_composition,
};

/// A composition of the test system, in its own directory `dir/NAME/drydock.nix`.
fn composition(dir: &Path, name: &str, machines: &str) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let f = d.join("drydock.nix");
    write_composition(&f, machines);
    f
}

fn drydock(state: &Path) -> Command {
    cluster_drydock(&store(), state)
}

fn exec(state: &Path, file: &Path, machine: &str, timeout: &str, cmd: &str) -> Output {
    cluster_exec(&store(), state, file, machine, timeout, cmd)
}

fn down_on_drop(state: &Path, file: &Path) -> DownOnDrop {
    DownOnDrop {
        store: store(),
        state: state.to_path_buf(),
        file: file.to_path_buf(),
    }
}

/// Wait (bounded) for `child` to exit: its output, and how long it took from `since`.
fn finish(child: Child, since: Instant, within: Duration) -> (Output, Duration) {
    let mut child = child;
    loop {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            return (out, since.elapsed());
        }
        if since.elapsed() > within {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after {within:?}: {}{}",
                text(&out.stdout),
                text(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn vm_state(state: &Path, vm: &str) -> serde_json::Value {
    let p = state.join("vms").join(vm).join("state.json");
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
    guest_ready();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let file = composition(
        dir.path(),
        "lost",
        "a = { system = sys { }; memorySize = 256; }; b = { system = sys { }; memorySize = 256; };",
    );
    cluster_up_detached(&store(), &state, &file);
    let _down = down_on_drop(&state, &file);
    let server = vm_state(&state, "lost.a")["server_pid"].as_u64().unwrap() as u32;

    // A call in progress when the store server dies fails at once, saying why.
    let call = drydock(&state)
        .args(["exec", "-f"])
        .arg(&file)
        .args(["a", "--timeout", "600", "--", "sleep 2; ls /nix/store"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
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
        row(&cluster_ps(&store(), &state, &file), "a")["state"] == "failed"
    });
    let ps = cluster_ps(&store(), &state, &file);
    let problem = row(&ps, "a")["problem"].as_str().unwrap().to_string();
    assert!(
        problem.contains(&format!("its store server (pid {server}) died")),
        "{problem}"
    );
    assert_eq!(row(&ps, "b")["state"], "running");
    let o = drydock(&state)
        .args(["ps", "-f"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(text(&o.stdout).contains("failed"), "{}", text(&o.stdout));
    assert!(
        text(&o.stdout).contains("store server"),
        "{}",
        text(&o.stdout)
    );

    // Later calls fail at once with the cause, not a busy backdoor.
    let t = Instant::now();
    let o = exec(&state, &file, "a", "600", "true");
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o.stderr).contains("is not running: its store server"),
        "{}",
        text(&o.stderr)
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(
        exec(&state, &file, "b", "30", "true").status.code(),
        Some(0)
    );

    // The reload plan restarts it, saying why; applying it brings it back.
    let plan = drydock(&state)
        .args(["--json", "up", "-f"])
        .arg(&file)
        .args(["--dry-run", "--accel", "tcg"])
        .output()
        .unwrap();
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
    let up = drydock(&state)
        .args(["up", "-f"])
        .arg(&file)
        .args(["--accel", "tcg", "--timeout", "300"])
        .output()
        .unwrap();
    assert_eq!(up.status.code(), Some(0), "{}", text(&up.stderr));
    let o = exec(&state, &file, "a", "30", "ls /nix/store | head -1");
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert_eq!(
        row(&cluster_ps(&store(), &state, &file), "a")["state"],
        "running"
    );
    cluster_down(&store(), &state, &file);
}

/// Start `exec MACHINE -- CMD` in the background.
fn exec_child(state: &Path, file: &Path, machine: &str, cmd: &str) -> Child {
    drydock(state)
        .args(["exec", "-f"])
        .arg(file)
        .args([machine, "--timeout", "600", "--", cmd])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// How many processes in the guest run `sleep 30` now.
fn guest_sleepers(state: &Path, file: &Path) -> String {
    let o = exec(
        state,
        file,
        "a",
        "30",
        "ps | grep -c '[s]leep 3[0]' || true",
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    text(&o.stdout).trim().to_string()
}

#[test]
fn an_interrupted_or_killed_exec_kills_its_command_and_frees_the_backdoor() {
    guest_ready();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let file = composition(
        dir.path(),
        "sig",
        "a = { system = sys { }; memorySize = 256; };",
    );
    cluster_up_detached(&store(), &state, &file);
    let _down = down_on_drop(&state, &file);
    for (sig, code) in [
        (libc::SIGINT, Some(130)),
        (libc::SIGTERM, Some(130)),
        (libc::SIGKILL, None),
    ] {
        // The command says it started on the console (calls queue: `exec` cannot look).
        let call = exec_child(
            &state,
            &file,
            "a",
            &format!("echo STARTED-{sig} > /dev/console; sleep 30"),
        );
        let w = drydock(&state)
            .args(["wait", "-f"])
            .arg(&file)
            .args(["a", "--timeout", "60", "--console"])
            .arg(format!("^STARTED-{sig}$"))
            .output()
            .unwrap();
        assert_eq!(w.status.code(), Some(0), "{}", text(&w.stderr));
        let sent = Instant::now();
        drydock_gc::send_signal(call.id(), sig).unwrap();
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
        let o = exec(&state, &file, "a", "30", "echo next");
        assert_eq!(
            (o.status.code(), text(&o.stdout).as_str()),
            (Some(0), "next\n"),
            "signal {sig}: {}",
            text(&o.stderr)
        );
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        assert_eq!(guest_sleepers(&state, &file), "0", "signal {sig}");
    }
    cluster_down(&store(), &state, &file);
}

fn up_detached_with(state: &Path, file: &Path, extra: &[&str]) {
    let up = drydock(state)
        .args(["up", "-f"])
        .arg(file)
        .args(["--detach", "--accel", "tcg", "--timeout", "300"])
        .args(extra)
        .output()
        .unwrap();
    assert!(up.status.success(), "up: {}", text(&up.stderr));
}

fn size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

#[test]
fn a_guest_that_prints_without_end_stays_within_its_log_limit_and_is_shown_escaped() {
    guest_ready();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let file = composition(
        dir.path(),
        "loud",
        "a = { system = sys { }; memorySize = 256; };",
    );
    let limit: u64 = 256 << 10;
    up_detached_with(&state, &file, &["--log-limit", "256K"]);
    let _down = down_on_drop(&state, &file);
    // About 2 MB of 100-character lines on the serial console: 8 times the limit.
    let o = exec(
        &state,
        &file,
        "a",
        "600",
        "i=0; line=$(printf '%099d' 0); while [ $i -lt 20000 ]; do echo \"$i $line\"; i=$((i+1)); done > /dev/console; echo LOUD-DONE > /dev/console",
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let w = drydock(&state)
        .args(["wait", "-f"])
        .arg(&file)
        .args(["a", "--timeout", "120", "--console", "^LOUD-DONE$"])
        .output()
        .unwrap();
    assert_eq!(w.status.code(), Some(0), "{}", text(&w.stderr));
    let vm = state.join("vms/loud.a");
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
    let logs = drydock(&state)
        .args(["logs", "-f"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(logs.status.code(), Some(0), "{}", text(&logs.stderr));
    let out = text(&logs.stdout);
    assert!(
        out.lines().last().unwrap().ends_with("│ LOUD-DONE"),
        "{out}"
    );
    assert!(out.contains("19999 000"), "the last numbered line");

    // Escape sequences the guest prints reach the terminal escaped: OSC 52 (the clipboard),
    // a title change, clearing the screen.
    let o = exec(
        &state,
        &file,
        "a",
        "60",
        r"printf 'HOSTILE \033]52;c;cHduZWQ=\007 \033]0;owned\033\\ \033[2J\033[H end\n' > /dev/console",
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let w = drydock(&state)
        .args(["wait", "-f"])
        .arg(&file)
        .args(["a", "--timeout", "60", "--console", "^HOSTILE"])
        .output()
        .unwrap();
    assert_eq!(w.status.code(), Some(0), "{}", text(&w.stderr));
    let want = r"HOSTILE \e]52;c;cHduZWQ=\a \e]0;owned\e\ \e[2J\e[H end";
    for args in [
        vec!["logs".to_string(), "-f".into(), file.display().to_string()],
        vec!["vm".into(), "logs".into(), "loud.a".into()],
    ] {
        let o = drydock(&state).args(&args).output().unwrap();
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
    cluster_down(&store(), &state, &file);
}

#[test]
fn a_detached_owner_killed_while_up_waits_is_reported_with_its_pid_signal_and_log() {
    guest_ready();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let file = composition(
        dir.path(),
        "orphan",
        "a = { system = sys { }; memorySize = 256; };",
    );
    let up = drydock(&state)
        .args(["up", "-f"])
        .arg(&file)
        .args(["--detach", "--accel", "tcg", "--timeout", "300"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _down = down_on_drop(&state, &file);
    // Killed while its machine boots (its QEMU runs).
    let mut owner = 0;
    wait_until("the owner runs a QEMU", Duration::from_secs(120), || {
        let ps = processes_mentioning(&state);
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
    wait_no_processes(&state, Duration::from_secs(30));
    assert!(!state.join("vms/orphan.a/state.json").exists());
    assert!(vm_runs(&state).iter().all(|(_, ended)| *ended));
    assert!(
        cgroups_of("orphan").is_empty(),
        "{:?}",
        cgroups_of("orphan")
    );
    cluster_down(&store(), &state, &file);
}

/// A tmpfs of `mib` MiB at `dir`, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, mib: u32) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
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
fn vm_runs(state: &Path) -> Vec<(i64, bool)> {
    let o = drydock(state).args(["--json", "runs"]).output().unwrap();
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
    guest_ready();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let _fs = Tmpfs::mount(&state, 16);
    let file = composition(
        dir.path(),
        "full",
        "a = { system = sys { }; memorySize = 256; }; b = { system = sys { }; memorySize = 256; };",
    );
    cluster_up_detached(&store(), &state, &file);
    let _down = down_on_drop(&state, &file);
    // Fill the state dir to the last byte.
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", state.join("filler").display()))
        .output()
        .unwrap();
    let df = Command::new("df").arg(&state).output().unwrap();
    assert!(text(&df.stdout).contains("100%"), "{}", text(&df.stdout));
    let down = drydock(&state)
        .args(["down", "-f"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(down.status.code(), Some(0), "{}", text(&down.stderr));
    wait_no_processes(&state, Duration::from_secs(30));
    std::fs::remove_file(state.join("filler")).unwrap();
    let runs = vm_runs(&state);
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert!(
        runs.iter().all(|(_, ended)| *ended),
        "runs left open: {runs:?}"
    );
    for (id, _) in runs {
        let o = drydock(&state)
            .args(["gc", "--run", &id.to_string(), "--dry-run"])
            .output()
            .unwrap();
        assert!(
            !text(&o.stderr).contains("still running"),
            "{}",
            text(&o.stderr)
        );
    }
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
    guest_ready();
    let dir = tempfile::tempdir().unwrap();
    // Deep enough that the sockets go to a runtime folder of their own.
    let state = dir.path().join("s".repeat(90));
    let file = composition(
        dir.path(),
        "left",
        "a = { system = sys { }; memorySize = 256; vlans = [ 1 2 ]; }; b = { system = sys { }; memorySize = 256; };",
    );
    let sockets = drydock_vm::VmPaths::in_state_dir(&state, "left.a").sockets;
    assert!(!sockets.starts_with(&state), "{}", sockets.display());
    let _down = down_on_drop(&state, &file);
    for kill_owner in [false, true] {
        cluster_up_detached(&store(), &state, &file);
        assert!(sockets.join("exec.sock").exists());
        assert!(!cgroups_of("left").is_empty(), "the machines have cgroups");
        if kill_owner {
            let st: serde_json::Value = serde_json::from_slice(
                &std::fs::read(state.join("clusters/left/cluster.json")).unwrap(),
            )
            .unwrap();
            drydock_gc::send_signal(st["owner_pid"].as_u64().unwrap() as u32, libc::SIGKILL)
                .unwrap();
            wait_no_processes(&state, Duration::from_secs(30));
            assert!(!leftovers(&state, "left", &["a", "b"]).is_empty());
        }
        cluster_down(&store(), &state, &file);
        let left = leftovers(&state, "left", &["a", "b"]);
        assert!(left.is_empty(), "killed owner {kill_owner}: left {left:#?}");
    }
}

/// `up` of `file` in the background (its own process group: a signal goes to it alone).
fn up_child(state: &Path, file: &Path, extra: &[&str]) -> Child {
    drydock(state)
        .args(["up", "-f"])
        .arg(file)
        .args(["--accel", "tcg", "--timeout", "300"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn evaluation_and_build_end_on_sigint_and_sigterm_and_at_their_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let fifo = dir.path().join("fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    // An evaluation that blocks for ever: it reads a FIFO nobody writes.
    let blocked = dir.path().join("blocked");
    std::fs::create_dir_all(&blocked).unwrap();
    let eval_file = blocked.join("drydock.nix");
    std::fs::write(
        &eval_file,
        format!(
            "{{ machines.a = {{ system = builtins.readFile {}; }}; }}",
            fifo.display()
        ),
    )
    .unwrap();
    // A build that takes for ever.
    let slow = dir.path().join("slow");
    std::fs::create_dir_all(&slow).unwrap();
    let build_file = slow.join("drydock.nix");
    std::fs::write(
        &build_file,
        r#"{ machines.a = { system = derivation { name = "slow"; system = "x86_64-linux"; builder = "/bin/sh"; args = [ "-c" "sleep 600" ]; }; }; }"#,
    )
    .unwrap();
    // Nix gone with it: nothing mentions the composition's directory any more, and the builder
    // is gone too.
    let gone = |d: &Path| {
        wait_no_processes(d, Duration::from_secs(20));
        wait_no_processes(Path::new("sleep 600"), Duration::from_secs(20));
    };

    for (file, what) in [(&eval_file, "evaluation"), (&build_file, "build")] {
        let d = file.parent().unwrap();
        for sig in [libc::SIGINT, libc::SIGTERM] {
            let up = up_child(&state, file, &[]);
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
            drydock_gc::send_signal(up.id(), sig).unwrap();
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
        let out = drydock(&state)
            .args(["up", "-f"])
            .arg(file)
            .args(["--accel", "tcg", "--build-timeout", "3"])
            .output()
            .unwrap();
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
