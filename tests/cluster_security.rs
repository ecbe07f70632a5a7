//! What another local user, a guest, a composition and drydock's own output can do to a cluster
//! (issue 19), played for real: a second user made by the test pre-creates drydock's socket
//! folder or a state dir full of links to root's files, and connects to root's sockets; a
//! cluster is started under `umask 000`; a composition asks for more memory than the host has. Needs root (`useradd`, the store server's sandbox) and, for the tests that
//! boot, the test guest's kernel (`scripts/guest/build-initrd`).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::{self, TempUser};
use crate::vmcommon::{
    self, DownOnDrop, cluster_down, cluster_drydock, cluster_exec, cluster_store as store,
    guest_ready, processes_mentioning, text, wait_no_processes, write_composition,
};

/// A composition in its own directory `dir/NAME/drydock.nix`, written with `body` as is.
fn composition_text(dir: &Path, name: &str, body: &str) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let f = d.join("drydock.nix");
    std::fs::write(&f, body).unwrap();
    f
}

/// A composition whose one machine boots a store path given as a string: it evaluates at once
/// and nothing is built, so a refusal after planning is all that can happen.
fn plain_composition(dir: &Path, name: &str) -> PathBuf {
    composition_text(
        dir,
        name,
        r#"{ machines.solo.system = "/nix/store/00000000000000000000000000000000-not-built"; }"#,
    )
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

/// Run `cmd` as `user`, which must succeed.
fn as_user(user: &TempUser, cmd: &[&str]) {
    let o = user.command(cmd[0]).args(&cmd[1..]).output().unwrap();
    assert!(o.status.success(), "{cmd:?}: {}", text(&o.stderr));
}

fn skip_unless_root() -> bool {
    if !common::is_root() {
        eprintln!("skipped: needs root (a second user is made with useradd)");
        return true;
    }
    false
}

#[test]
fn another_users_socket_folder_is_refused_before_anything_starts() {
    if skip_unless_root() {
        return;
    }
    let user = TempUser::create();
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), 0o755);
    // A runtime folder every user may write to, as /tmp is; the other user is there first.
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    chmod(&run, 0o1777);
    let theirs = run.join(format!("drydock-{}", drydock_gc::effective_uid()));
    as_user(&user, &["mkdir", "-m", "777", theirs.to_str().unwrap()]);
    // A state dir deep enough that sockets go to the runtime folder.
    let state = dir.path().join("s".repeat(100));
    let says = format!("{} belongs to uid {}", theirs.display(), user.uid());

    // `vm run`: refused before the VM's run is recorded or anything is launched.
    let kernel = dir.path().join("kernel");
    std::fs::write(&kernel, b"not a kernel").unwrap();
    let initrd = dir.path().join("initrd");
    std::fs::write(&initrd, b"not an initrd").unwrap();
    let o = Command::new(vmcommon::bin())
        .arg("--store")
        .arg(store())
        .arg("--state-dir")
        .arg(&state)
        .args(["vm", "run", "--name", "v", "--accel", "tcg", "--kernel"])
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .env("XDG_RUNTIME_DIR", &run)
        .output()
        .unwrap();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains(&says), "{err}");

    // `up --detach`: refused after planning, before the build or any machine.
    let file = plain_composition(dir.path(), "sock");
    let o = cluster_drydock(&store(), &state)
        .arg("up")
        .arg("-f")
        .arg(&file)
        .args(["--detach", "--accel", "tcg"])
        .env("XDG_RUNTIME_DIR", &run)
        .output()
        .unwrap();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains(&says), "{err}");
    assert!(err.contains("remove it"), "the fix is named: {err}");

    // Nothing of root's went into the other user's folder, and nothing runs.
    let left: Vec<_> = std::fs::read_dir(&theirs).unwrap().flatten().collect();
    assert!(left.is_empty(), "{left:?}");
    assert!(processes_mentioning(&state).is_empty());
}

#[test]
fn a_state_dir_of_another_user_with_planted_links_is_refused_and_nothing_is_followed() {
    if skip_unless_root() {
        return;
    }
    let user = TempUser::create();
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), 0o755);
    // A folder every user may write to, as /tmp is.
    let shared = dir.path().join("tmp");
    std::fs::create_dir(&shared).unwrap();
    chmod(&shared, 0o1777);
    // Root's files, which the links point at.
    let precious = dir.path().join("precious");
    std::fs::create_dir(&precious).unwrap();
    let targets: Vec<PathBuf> = ["a", "b", "c"].iter().map(|n| precious.join(n)).collect();
    for t in &targets {
        std::fs::write(t, b"root's file\n").unwrap();
    }
    let plant = |state: &Path| {
        let c = state.join("clusters/links");
        as_user(&user, &["mkdir", "-p", "-m", "777", c.to_str().unwrap()]);
        for (name, t) in ["drydock.log", "hosts", "build.nix"].iter().zip(&targets) {
            as_user(
                &user,
                &[
                    "ln",
                    "-s",
                    t.to_str().unwrap(),
                    c.join(name).to_str().unwrap(),
                ],
            );
        }
    };
    let file = plain_composition(dir.path(), "links");
    let up = |state: &Path| {
        cluster_drydock(&store(), state)
            .arg("up")
            .arg("-f")
            .arg(&file)
            .args(["--detach", "--accel", "tcg"])
            .output()
            .unwrap()
    };
    let unchanged = || {
        for t in &targets {
            assert_eq!(
                std::fs::read(t).unwrap(),
                b"root's file\n",
                "{}",
                t.display()
            );
        }
    };

    // The other user's state dir (mode 777).
    let theirs = shared.join("theirs");
    as_user(&user, &["mkdir", "-m", "777", theirs.to_str().unwrap()]);
    plant(&theirs);
    let o = up(&theirs);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "{} belongs to uid {}",
            theirs.display(),
            user.uid()
        )),
        "{err}"
    );
    unchanged();
    assert!(!theirs.join("runs.sqlite").exists());

    // Root's own state dir, but one every user may write to: the folders are loose.
    let loose = shared.join("loose");
    std::fs::create_dir(&loose).unwrap();
    chmod(&loose, 0o777);
    plant(&loose);
    let o = up(&loose);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("{} can be written by", loose.display()))
            && err.contains("chmod go-w"),
        "{err}"
    );
    unchanged();
    assert!(processes_mentioning(&theirs).is_empty() && processes_mentioning(&loose).is_empty());
}

/// Connect to the unix socket `sock` as `user`: `connected`, or the errno of the failure.
fn connect_as(user: &TempUser, sock: &Path) -> String {
    let o = user
        .command("/usr/bin/python3")
        .args([
            "-c",
            "import socket, sys\ns = socket.socket(socket.AF_UNIX)\ntry:\n    s.connect(sys.argv[1]); print('connected')\nexcept OSError as e:\n    print(e.errno)",
        ])
        .arg(sock)
        .output()
        .unwrap();
    text(&o.stdout).trim().to_string()
}

/// Every folder under `top` is 0700 and every other file, socket or FIFO grants nothing to
/// group or others (links aside): the offenders.
fn loose_entries(top: &Path) -> Vec<(PathBuf, u32)> {
    let mut bad = Vec::new();
    let mut todo = vec![top.to_path_buf()];
    while let Some(d) = todo.pop() {
        let m = mode(&d);
        if m != 0o700 {
            bad.push((d.clone(), m));
        }
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                todo.push(e.path());
            } else if !t.is_symlink() && mode(&e.path()) & 0o077 != 0 {
                bad.push((e.path(), mode(&e.path())));
            }
        }
    }
    bad
}

#[test]
fn under_umask_000_every_socket_and_folder_is_private_and_another_user_reaches_nothing() {
    if skip_unless_root() {
        return;
    }
    guest_ready();
    let user = TempUser::create();
    let dir = tempfile::tempdir().unwrap();
    chmod(dir.path(), 0o755);
    let state = dir.path().join("state");
    let cdir = dir.path().join("um");
    std::fs::create_dir(&cdir).unwrap();
    let file = cdir.join("drydock.nix");
    write_composition(&file, "solo = { system = sys { }; memorySize = 256; };");
    let up = Command::new("sh")
        .args(["-c", "umask 000 && exec \"$@\"", "sh", vmcommon::bin()])
        .arg("--store")
        .arg(store())
        .arg("--state-dir")
        .arg(&state)
        .env(
            "NIX_CONFIG",
            "sandbox-paths = /bin/sh=/bin/busybox\nsubstituters =",
        )
        .arg("up")
        .arg("-f")
        .arg(&file)
        .args(["--detach", "--accel", "tcg", "--timeout", "300"])
        .output()
        .unwrap();
    assert!(up.status.success(), "up: {}", text(&up.stderr));
    let _down = DownOnDrop {
        store: store(),
        state: state.clone(),
        file: file.clone(),
    };
    let vm = state.join("vms/um.solo");
    let cl = state.join("clusters/um");
    let sockets = [
        vm.join("exec.sock"),
        vm.join("qmp.sock"),
        vm.join("backdoor.sock"),
        vm.join("fs.sock"),
        vm.join("vlan1.sock"),
        cl.join("control.sock"),
        cl.join("vlan1.sock"),
    ];
    for s in &sockets {
        assert_eq!(mode(s), 0o600, "{}", s.display());
    }
    for d in [
        &state,
        &state.join("vms"),
        &state.join("clusters"),
        &vm,
        &cl,
    ] {
        assert_eq!(mode(d), 0o700, "{}", d.display());
    }
    for f in ["cluster.json", "up.json", "hosts", "drydock.log"] {
        assert_eq!(mode(&cl.join(f)), 0o600, "{f}");
    }
    for f in [
        "launch.json",
        "state.json",
        "console.log",
        "qemu.pid",
        "disk.qcow2",
    ] {
        assert_eq!(mode(&vm.join(f)), 0o600, "{f}");
    }
    let loose = loose_entries(&state);
    assert!(loose.is_empty(), "{loose:#?}");

    // The other user reaches none of the sockets, and `drydock exec` gets nothing as them.
    let eacces = libc::EACCES.to_string();
    for s in [&sockets[0], &sockets[1], &sockets[2], &sockets[5]] {
        assert_eq!(connect_as(&user, s), eacces, "{}", s.display());
    }
    let o: Output = user
        .command(common::binary_for_all())
        .arg("--state-dir")
        .arg(&state)
        .args(["exec", "-f"])
        .arg(&file)
        .args(["solo", "--", "id"])
        .output()
        .unwrap();
    assert_ne!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(!text(&o.stdout).contains("uid="), "{}", text(&o.stdout));
    // Root's own call works.
    let o = cluster_exec(&store(), &state, &file, "solo", "60", "id -u");
    assert_eq!(
        (o.status.code(), text(&o.stdout)),
        (Some(0), "0\n".to_string()),
        "{}",
        text(&o.stderr)
    );
    cluster_down(&store(), &state, &file);
    wait_no_processes(&state, std::time::Duration::from_secs(30));
}

/// The host's memory in MiB (`MemTotal`).
fn host_mib() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kb: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    kb / 1024
}

#[test]
fn more_memory_than_the_host_has_is_refused_before_any_qemu_starts() {
    guest_ready();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cdir = dir.path().join("big");
    std::fs::create_dir(&cdir).unwrap();
    let file = cdir.join("drydock.nix");
    write_composition(
        &file,
        "huge = { system = sys { }; memorySize = 1000000; };
         small = { system = sys { }; memorySize = 256; };",
    );
    let host = host_mib();
    let up = |extra: &[&str]| {
        cluster_drydock(&store(), &state)
            .arg("up")
            .arg("-f")
            .arg(&file)
            .args(["--accel", "tcg", "--timeout", "300"])
            .args(extra)
            .output()
            .unwrap()
    };
    let o = up(&["--detach"]);
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "huge (1000000 MiB), small (256 MiB) ask for 1000256 MiB of memory in all, more than this host has ({host} MiB)"
        )) && err.contains("--allow-overcommit"),
        "{err}"
    );
    assert!(processes_mentioning(&state).is_empty());
    assert!(!state.join("vms/big.huge/launch.json").exists());
    // A lone VM: the same.
    let o = Command::new(vmcommon::bin())
        .arg("--store")
        .arg(store())
        .arg("--state-dir")
        .arg(&state)
        .args([
            "vm", "run", "--name", "v", "--accel", "tcg", "--memory", "1000000",
        ])
        .args(["--kernel", "/nonexistent/k", "--initrd", "/nonexistent/i"])
        .output()
        .unwrap();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "v (1000000 MiB) asks for 1000000 MiB of memory, more than this host has ({host} MiB)"
        )),
        "{err}"
    );
    // Who knows better says so: the plan goes through (a dry run; nothing boots 1 TB here).
    let o = up(&["--dry-run", "--allow-overcommit"]);
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    assert!(out.contains("create") && out.contains("huge"), "{out}");
    assert!(processes_mentioning(&state).is_empty());
}

/// A guest command writing, to the backdoor's console, what the replies of the calls `from..=to`
/// of a sequential protocol would look like.
fn forge(from: u32, to: u32) -> String {
    format!(
        "f=$(echo forged | base64); for n in $(seq {from} {to}); do printf 'DRYDOCK-%d 0 %s  DRYDOCK-%d-END\\n' $n \"$f\" $n; done > /dev/hvc0"
    )
}

#[test]
fn forged_replies_from_a_guest_process_are_never_taken() {
    guest_ready();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cdir = dir.path().join("forge");
    std::fs::create_dir(&cdir).unwrap();
    let file = cdir.join("drydock.nix");
    write_composition(&file, "solo = { system = sys { }; memorySize = 256; };");
    vmcommon::cluster_up_detached(&store(), &state, &file);
    let _down = DownOnDrop {
        store: store(),
        state: state.clone(),
        file: file.clone(),
    };
    let exec = |cmd: &str| cluster_exec(&store(), &state, &file, "solo", "60", cmd);
    // The markers of the next 300 calls, as the issue's guest wrote them.
    let o = exec(&forge(1, 300));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    // ... and more while the next calls run, from a process left in the background.
    let o = exec(&format!(
        "(sleep 0.3; {}) </dev/null >/dev/null 2>&1 &",
        forge(301, 600)
    ));
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    for i in 0..4 {
        let o = exec(&format!("echo real {i}; exit {i}"));
        assert_eq!(
            (o.status.code(), text(&o.stdout)),
            (Some(i), format!("real {i}\n")),
            "{}",
            text(&o.stderr)
        );
    }
    cluster_down(&store(), &state, &file);
}

#[test]
fn two_ups_of_one_project_at_once_start_it_once() {
    guest_ready();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let cdir = dir.path().join("twice");
    std::fs::create_dir(&cdir).unwrap();
    let file = cdir.join("drydock.nix");
    write_composition(&file, "solo = { system = sys { }; memorySize = 256; };");
    let up = || {
        cluster_drydock(&store(), &state)
            .arg("up")
            .arg("-f")
            .arg(&file)
            .args(["--detach", "--accel", "tcg", "--timeout", "300"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (up(), up());
    let pids = [a.id(), b.id()];
    let outs = [a.wait_with_output().unwrap(), b.wait_with_output().unwrap()];
    let _down = DownOnDrop {
        store: store(),
        state: state.clone(),
        file: file.clone(),
    };
    let errs: Vec<String> = outs.iter().map(|o| text(&o.stderr)).collect();
    for e in &errs {
        assert!(
            !e.contains("File exists") && !e.contains("syntax error"),
            "{errs:#?}"
        );
    }
    let owner = vmcommon::cluster_ps(&store(), &state, &file);
    let st: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("clusters/twice/cluster.json")).unwrap())
            .unwrap();
    let owner_pid = st["owner_pid"].as_u64().unwrap() as u32;
    match (outs[0].status.code(), outs[1].status.code()) {
        (Some(0), Some(0)) => {
            // The second came once the first was up: a reload with nothing to do.
            assert!(
                errs.iter().any(|e| e.contains("nothing to do")),
                "{errs:#?}"
            );
        }
        (Some(0), Some(2)) | (Some(2), Some(0)) => {
            let (won, lost) = match outs[0].status.code() {
                Some(0) => (0, 1),
                _ => (1, 0),
            };
            let says = &errs[lost];
            assert!(
                says.contains("the cluster twice is being started by another drydock (pid ")
                    && (says.contains(&format!("pid {},", pids[won]))
                        || says.contains(&format!("pid {owner_pid},"))),
                "{says}"
            );
        }
        codes => panic!("{codes:?}: {errs:#?}"),
    }
    // One owner, one machine, one QEMU.
    assert_eq!(owner.as_array().unwrap().len(), 1, "{owner}");
    assert_eq!(owner[0]["state"], "running", "{owner}");
    let qemus = processes_mentioning(&state)
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("qemu-system"))
        .count();
    assert_eq!(qemus, 1);
    assert!(Path::new(&format!("/proc/{owner_pid}")).exists());
    cluster_down(&store(), &state, &file);
}

#[test]
fn a_watch_whose_output_goes_into_the_compositions_folder_reloads_only_on_edits() {
    use std::time::{Duration, Instant};
    guest_ready();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let d = dir.path().join("own");
    std::fs::create_dir(&d).unwrap();
    let file = d.join("drydock.nix");
    let www = d.join("www.nix");
    std::fs::write(&www, "\"solo v1\"").unwrap();
    write_composition(
        &file,
        "solo = { system = sys { www = import ./www.nix; }; memorySize = 256; };",
    );
    // `up --watch > up.log 2> up.err`, both in the composition's folder.
    let (out, err) = (d.join("up.log"), d.join("up.err"));
    let mut up = cluster_drydock(&store(), &state)
        .arg("up")
        .arg("-f")
        .arg(&file)
        .args(["--watch", "--accel", "tcg", "--timeout", "300"])
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let _down = DownOnDrop {
        store: store(),
        state: state.clone(),
        file: file.clone(),
    };
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let served = || {
        let o = cluster_exec(
            &store(),
            &state,
            &file,
            "solo",
            "60",
            "wget -qO- http://localhost/",
        );
        text(&o.stdout)
    };
    vmcommon::wait_until("the cluster is up", Duration::from_secs(300), || {
        assert!(up.try_wait().unwrap().is_none(), "up ended: {}", read(&err));
        read(&err).contains("Ctrl-C stops it")
    });
    assert_eq!(served(), "solo v1\n");
    // Its own output grows (the guest's console is echoed to up.log), and a file the
    // evaluation never read is written: for 10 s, no reload.
    let o = cluster_exec(
        &store(),
        &state,
        &file,
        "solo",
        "60",
        "for i in 1 2 3 4 5; do echo console noise $i > /dev/console; sleep 1; done",
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    std::fs::write(d.join("notes.txt"), "not part of the composition\n").unwrap();
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_secs(10) {
        assert!(up.try_wait().unwrap().is_none(), "up ended: {}", read(&err));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(read(&out).contains("console noise 5"), "{}", read(&out));
    assert!(
        !read(&err).contains("changed: ") && !read(&out).contains("plan for cluster"),
        "reloaded without an edit: {}",
        read(&err)
    );
    // An edit of an imported file reloads; so does one of the composition itself.
    std::fs::write(&www, "\"solo v2\"").unwrap();
    vmcommon::wait_until(
        "the import's edit is applied",
        Duration::from_secs(180),
        || served() == "solo v2\n",
    );
    write_composition(
        &file,
        r#"solo = { system = sys { www = "solo v3"; }; memorySize = 256; };"#,
    );
    vmcommon::wait_until(
        "the composition's edit is applied",
        Duration::from_secs(180),
        || served() == "solo v3\n",
    );
    let e = read(&err);
    assert!(
        e.contains(&format!("changed: {}", www.display()))
            && e.contains(&format!("changed: {}", file.display())),
        "{e}"
    );
    assert!(!e.contains("up.log") && !e.contains("notes.txt"), "{e}");
    drydock_gc::send_signal(up.id(), libc::SIGINT).unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = up.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "up did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(130), "{}", read(&err));
    wait_no_processes(&state, Duration::from_secs(30));
}
