//! What another local user, a guest, a composition and drydock's own output can do to a cluster
//! (issue 19), played for real: a second user made by the test pre-creates drydock's socket
//! folder or a state dir full of links to root's files, and connects to root's sockets; a
//! cluster is started under `umask 000`; a composition asks for more memory than the host has;
//! a guest process forges backdoor replies; two `up`s of one project race; `up --watch` writes
//! its output into the composition's folder. Needs root (`useradd`, the store server's sandbox)
//! and, for the tests that boot, the test guest's kernel (`scripts/guest/build-initrd`).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::{self, Drydock, TempUser};
use crate::vmcommon::{
    Cluster, cluster_store, guest_ready, processes_mentioning, text, wait_no_processes, wait_until,
};

/// A composition whose one machine boots a store path given as a string: it evaluates at once
/// and nothing is built, so a refusal after planning is all that can happen.
const PLAIN: &str =
    r#"{ machines.solo.system = "/nix/store/00000000000000000000000000000000-not-built"; }"#;

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
    let o = Drydock::on(&cluster_store(), &state)
        .args(["vm", "run", "--name", "v", "--accel", "tcg", "--kernel"])
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .env("XDG_RUNTIME_DIR", &run)
        .run()
        .exit(2);
    let err = o.stderr_str();
    assert!(err.contains(&says), "{err}");

    // `up --detach`: refused after planning, before the build or any machine.
    let c = Cluster::named("sock")
        .composition(PLAIN)
        .state(state.clone())
        .write();
    let o = c
        .verb("up")
        .args(["--detach", "--accel", "tcg"])
        .env("XDG_RUNTIME_DIR", &run)
        .run()
        .exit(2);
    let err = o.stderr_str();
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
    let up = |state: &Path| {
        let c = Cluster::named("links")
            .composition(PLAIN)
            .state(state.to_path_buf())
            .write();
        c.verb("up")
            .args(["--detach", "--accel", "tcg"])
            .run()
            .exit(2)
            .stderr_str()
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
    let err = up(&theirs);
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
    let err = up(&loose);
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
    let c = Cluster::named("um")
        .machines("solo = { system = sys { }; memorySize = 256; };")
        .write();
    // The other user may walk up to the state dir: only drydock's own modes keep them out.
    chmod(c.dir(), 0o755);
    let state = c.state().to_path_buf();
    c.verb("up")
        .via("sh", ["-c", "umask 000 && exec \"$@\"", "sh"])
        .args(["--detach", "--accel", "tcg", "--timeout", "300"])
        .run()
        .ok();
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
    for f in [
        "cluster.json",
        "up.json",
        "hosts",
        "drydock.log",
        "owner.lock",
    ] {
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
    let o = user
        .drydock()
        .state(&state)
        .env("HOME", &state)
        .args(["exec", "-f"])
        .arg(c.file())
        .args(["solo", "--", "id"])
        .run();
    assert_ne!(o.code(), Some(0), "{}", o.stderr_str());
    assert!(!o.stdout_str().contains("uid="), "{}", o.stdout_str());
    // Root's own call works.
    let o = c.exec("solo", "60", "id -u").ok();
    assert_eq!(o.stdout_str(), "0\n");
    c.down();
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
    let c = Cluster::named("big")
        .machines(
            "huge = { system = sys { }; memorySize = 1000000; };
             small = { system = sys { }; memorySize = 256; };",
        )
        .write();
    let state = c.state();
    let host = host_mib();
    let up = |extra: &[&str]| {
        c.verb("up")
            .args(["--accel", "tcg", "--timeout", "300"])
            .args(extra)
            .run()
    };
    let err = up(&["--detach"]).exit(2).stderr_str();
    assert!(
        err.contains(&format!(
            "huge (1000000 MiB), small (256 MiB) ask for 1000256 MiB of memory in all, more than this host has ({host} MiB)"
        )) && err.contains("--allow-overcommit"),
        "{err}"
    );
    assert!(processes_mentioning(state).is_empty());
    assert!(!state.join("vms/big.huge/launch.json").exists());
    // A lone VM: the same.
    let err = c
        .drydock()
        .args([
            "vm", "run", "--name", "v", "--accel", "tcg", "--memory", "1000000",
        ])
        .args(["--kernel", "/nonexistent/k", "--initrd", "/nonexistent/i"])
        .run()
        .exit(2)
        .stderr_str();
    assert!(
        err.contains(&format!(
            "v (1000000 MiB) asks for 1000000 MiB of memory, more than this host has ({host} MiB)"
        )),
        "{err}"
    );
    // Who knows better says so: the plan goes through (a dry run; nothing boots 1 TB here).
    let out = up(&["--dry-run", "--allow-overcommit"]).ok().stdout_str();
    assert!(out.contains("create") && out.contains("huge"), "{out}");
    assert!(processes_mentioning(state).is_empty());
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
    let c = Cluster::named("forge")
        .machines("solo = { system = sys { }; memorySize = 256; };")
        .up();
    // The markers of the next 300 calls, as the issue's guest wrote them.
    c.exec("solo", "60", &forge(1, 300)).ok();
    // ... and more while the next calls run, from a process left in the background.
    c.exec(
        "solo",
        "60",
        &format!(
            "(sleep 0.3; {}) </dev/null >/dev/null 2>&1 &",
            forge(301, 600)
        ),
    )
    .ok();
    for i in 0..4 {
        let o = c.exec("solo", "60", &format!("echo real {i}; exit {i}"));
        assert_eq!(
            (o.code(), o.stdout_str()),
            (Some(i), format!("real {i}\n")),
            "{}",
            o.stderr_str()
        );
    }
    c.down();
}

#[test]
fn two_ups_of_one_project_at_once_start_it_once() {
    guest_ready();
    let c = Cluster::named("twice")
        .machines("solo = { system = sys { }; memorySize = 256; };")
        .write();
    let state = c.state();
    let up = || {
        c.verb("up")
            .args(["--detach", "--accel", "tcg", "--timeout", "300"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
    };
    let (a, b) = (up(), up());
    let pids = [a.id(), b.id()];
    let outs = [a.output(), b.output()];
    let errs: Vec<String> = outs.iter().map(|o| o.stderr_str()).collect();
    for e in &errs {
        assert!(
            !e.contains("File exists") && !e.contains("syntax error"),
            "{errs:#?}"
        );
    }
    let owner = c.ps();
    let owner_pid = c.owner_pid();
    match (outs[0].code(), outs[1].code()) {
        (Some(0), Some(0)) => {
            // The second came once the first was up: a reload with nothing to do.
            assert!(
                errs.iter().any(|e| e.contains("nothing to do")),
                "{errs:#?}"
            );
        }
        (Some(0), Some(2)) | (Some(2), Some(0)) => {
            let (won, lost) = match outs[0].code() {
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
    let qemus = processes_mentioning(state)
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("qemu-system"))
        .count();
    assert_eq!(qemus, 1);
    assert!(Path::new(&format!("/proc/{owner_pid}")).exists());
    c.down();
}

#[test]
fn a_watch_whose_output_goes_into_the_compositions_folder_reloads_only_on_edits() {
    guest_ready();
    let c = Cluster::named("own")
        .machines("solo = { system = sys { www = import ./www.nix; }; memorySize = 256; };")
        .write();
    let d = c.file().parent().unwrap().to_path_buf();
    let www = d.join("www.nix");
    std::fs::write(&www, "\"solo v1\"").unwrap();
    // `up --watch > up.log 2> up.err`, both in the composition's folder.
    let (out, err) = (d.join("up.log"), d.join("up.err"));
    let mut up = c
        .verb("up")
        .args(["--watch", "--accel", "tcg", "--timeout", "300"])
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn();
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    let served = || {
        c.exec("solo", "60", "wget -qO- http://localhost/")
            .stdout_str()
    };
    wait_until("the cluster is up", Duration::from_secs(300), || {
        assert!(up.try_wait().unwrap().is_none(), "up ended: {}", read(&err));
        read(&err).contains("Ctrl-C stops it")
    });
    assert_eq!(served(), "solo v1\n");
    // Its own output grows (the guest's console is echoed to up.log), and a file the
    // evaluation never read is written: for 10 s, no reload.
    c.exec(
        "solo",
        "60",
        "for i in 1 2 3 4 5; do echo console noise $i > /dev/console; sleep 1; done",
    )
    .ok();
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
    wait_until(
        "the import's edit is applied",
        Duration::from_secs(180),
        || served() == "solo v2\n",
    );
    c.set_machines(r#"solo = { system = sys { www = "solo v3"; }; memorySize = 256; };"#);
    wait_until(
        "the composition's edit is applied",
        Duration::from_secs(180),
        || served() == "solo v3\n",
    );
    let e = read(&err);
    assert!(
        e.contains(&format!("changed: {}", www.display()))
            && e.contains(&format!("changed: {}", c.file().display())),
        "{e}"
    );
    assert!(!e.contains("up.log") && !e.contains("notes.txt"), "{e}");
    up.signal(libc::SIGINT);
    let status = up.wait_within(Duration::from_secs(60));
    assert_eq!(status.code(), Some(130), "{}", read(&err));
    wait_no_processes(c.state(), Duration::from_secs(30));
}
