//! Clusters against real QEMU (TCG) and test systems built by `drydock up` into a private
//! chroot store: machines reach each other by name over a shared VLAN and not across VLANs,
//! `exec` passes stdout, stderr and the exit status through (124 at the deadline, the machine
//! still answering), calls on one machine queue, `wait` on the console and on a late service,
//! `shell`, GC while up keeps every system, Ctrl-C and SIGKILL leave no QEMU, store server
//! or owner behind (checked over /proc), and bad compositions are exit 2. Needs root for the
//! store server's sandbox, and the test guest's kernel (`scripts/guest/build-initrd`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::vmcommon;
use vmcommon::{
    DownOnDrop, cluster_down, cluster_drydock, cluster_exec, cluster_ps, cluster_store as store,
    cluster_up_detached, guest_ready, processes_mentioning, qemu_pids, text, wait_no_processes,
    wait_until, write_composition,
};

/// A composition of the test system, in its own directory `dir/NAME/drydock.nix`.
fn composition(dir: &Path, name: &str, machines: &str) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let f = d.join("drydock.nix");
    write_composition(&f, machines);
    f
}

fn ps_json(state: &Path, file: &Path) -> serde_json::Value {
    cluster_ps(&store(), state, file)
}

fn drydock(state: &Path) -> Command {
    cluster_drydock(&store(), state)
}

fn exec(state: &Path, file: &Path, machine: &str, timeout: &str, cmd: &str) -> Output {
    cluster_exec(&store(), state, file, machine, timeout, cmd)
}

#[test]
fn machines_talk_by_name_on_their_vlans_only_and_exec_passes_everything_through() {
    guest_ready();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let file = composition(
        dir.path(),
        "net",
        "alpha = { system = sys { }; memorySize = 256; };
         beta = { system = sys { }; memorySize = 256; vlans = [ 1 2 ]; };
         gamma = { system = sys { }; memorySize = 256; vlans = [ 2 ]; };",
    );
    let t = Instant::now();
    cluster_up_detached(&store(), &state, &file);
    let _down = DownOnDrop {
        store: store(),
        state: state.clone(),
        file: file.clone(),
    };
    // The build's roots held the systems until the machines' runs pinned them, then went.
    let cdir = state.join("clusters/net");
    let left: Vec<_> = std::fs::read_dir(&cdir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("result"))
        .collect();
    assert!(
        left.is_empty(),
        "build roots left in {}: {left:?}",
        cdir.display()
    );
    eprintln!(
        "up --detach of 3 machines: {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // By name over VLAN 1, both ways (the hosts table came from fw_cfg).
    let o = exec(
        &state,
        &file,
        "alpha",
        "30",
        "timeout 5 wget -qO- http://beta/",
    );
    assert_eq!(
        (o.status.code(), text(&o.stdout)),
        (Some(0), "hello from beta\n".into()),
        "{}",
        text(&o.stderr)
    );
    let o = exec(
        &state,
        &file,
        "beta",
        "30",
        "hostname; timeout 5 wget -qO- http://alpha/",
    );
    assert_eq!(
        text(&o.stdout),
        "beta\nhello from alpha\n",
        "{}",
        text(&o.stderr)
    );
    // VLAN 2: gamma reaches beta's VLAN 2 address (192.168.2.2; gamma is 3, beta 2).
    let o = exec(
        &state,
        &file,
        "gamma",
        "30",
        "timeout 5 wget -qO- http://192.168.2.2/",
    );
    assert_eq!(text(&o.stdout), "hello from beta\n", "{}", text(&o.stderr));
    // ... but not alpha, which is on VLAN 1 only, even with an address of VLAN 1's subnet on
    // its VLAN 2 NIC: the segments are separate at layer 2.
    let o = exec(
        &state,
        &file,
        "gamma",
        "60",
        "ip addr add 192.168.1.99/24 dev eth0 && ! timeout 3 wget -qO- http://192.168.1.1/ && echo isolated",
    );
    assert_eq!(text(&o.stdout), "isolated\n", "{}", text(&o.stderr));
    let o = exec(
        &state,
        &file,
        "alpha",
        "60",
        "! timeout 3 wget -qO- http://192.168.2.3/ && echo isolated",
    );
    assert_eq!(text(&o.stdout), "isolated\n", "{}", text(&o.stderr));

    // stdout, stderr and the exit status, separately.
    let o = exec(
        &state,
        &file,
        "alpha",
        "30",
        "echo out; echo err >&2; exit 3",
    );
    assert_eq!(
        (o.status.code(), text(&o.stdout), text(&o.stderr)),
        (Some(3), "out\n".into(), "err\n".into())
    );
    // 1 MiB of binary output, intact (checked against the guest's own md5sum).
    let o = exec(
        &state,
        &file,
        "beta",
        "120",
        "dd if=/dev/urandom of=/tmp/r bs=65536 count=16 2>/dev/null; md5sum </tmp/r >&2; cat /tmp/r",
    );
    assert_eq!(o.stdout.len(), 1 << 20, "{}", text(&o.stderr));
    let mut md5 = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    md5.stdin.take().unwrap().write_all(&o.stdout).unwrap();
    let ours = text(&md5.wait_with_output().unwrap().stdout);
    assert_eq!(
        text(&o.stderr).split_whitespace().next(),
        ours.split_whitespace().next()
    );
    // The deadline: 124, and the machine answers afterwards.
    let o = exec(&state, &file, "gamma", "2", "sleep 60");
    assert_eq!(o.status.code(), Some(124), "{}", text(&o.stderr));
    let o = exec(&state, &file, "gamma", "30", "echo still here");
    assert_eq!(text(&o.stdout), "still here\n");
    // Two calls on one machine at once both complete.
    let calls: Vec<_> = (0..2)
        .map(|i| {
            let (state, file) = (state.clone(), file.clone());
            std::thread::spawn(move || {
                exec(
                    &state,
                    &file,
                    "alpha",
                    "30",
                    &format!("sleep 1; echo call{i}"),
                )
            })
        })
        .collect();
    for (i, c) in calls.into_iter().enumerate() {
        let o = c.join().unwrap();
        assert_eq!(text(&o.stdout), format!("call{i}\n"));
    }
    // `vm exec` by VM name, and `ps`.
    let o = drydock(&state)
        .args(["vm", "exec", "net.beta", "--", "cat /proc/cmdline"])
        .output()
        .unwrap();
    assert!(
        text(&o.stdout).contains("drydock.machine=beta"),
        "{}",
        text(&o.stdout)
    );
    let rows = ps_json(&state, &file);
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert!(rows.iter().all(|r| r["state"] == "running"), "{rows:?}");
    assert_eq!(
        rows[1]["addresses"],
        serde_json::json!(["192.168.1.2/24", "192.168.2.2/24"])
    );

    // `wait --console`: a line the guest printed at boot; a line it never prints is exit 1 at
    // the deadline, with the last lines seen; a bad expression is bad input.
    let w = |args: &[&str]| {
        drydock(&state)
            .arg("wait")
            .arg("-f")
            .arg(&file)
            .args(args)
            .output()
            .unwrap()
    };
    let o = w(&[
        "alpha",
        "--console",
        "DRYDOCK-NIC: eth0 .*192\\.168\\.1\\.1/",
        "--timeout",
        "30",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let o = w(&["alpha", "--console", "NEVER-PRINTED", "--timeout", "2"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("DRYDOCK-READY"),
        "{}",
        text(&o.stderr)
    );
    let o = w(&["alpha", "--console", "(unclosed", "--timeout", "2"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("(unclosed"), "{}", text(&o.stderr));
    let o = w(&["nosuch", "--succeeds", "true"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("nosuch"), "{}", text(&o.stderr));
    // `wait --succeeds`: a service that comes up late on alpha, waited for from beta over the
    // network; it failed first, then succeeded.
    let o = exec(
        &state,
        &file,
        "alpha",
        "30",
        "mkdir -p /srv/late && echo late > /srv/late/index.html && (sleep 4; httpd -p 8080 -h /srv/late) >/dev/null 2>&1 &",
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let o = drydock(&state)
        .args(["--json", "wait", "-f"])
        .arg(&file)
        .args([
            "beta",
            "--timeout",
            "120",
            "--succeeds",
            "timeout 3 wget -qO- http://alpha:8080/",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (r["met"].as_bool(), r["last_stdout"].as_str()),
        (Some(true), Some("late\n")),
        "{r}"
    );
    assert!(
        r["tries"].as_u64().unwrap() > 1,
        "it did not come up late: {r}"
    );
    let o = w(&[
        "beta",
        "--timeout",
        "3",
        "--succeeds",
        "echo not yet; false",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains("not yet"), "{}", text(&o.stderr));

    // `shell`: an interactive shell, its prompt naming the machine, only its output.
    let mut sh = drydock(&state)
        .arg("shell")
        .arg("-f")
        .arg(&file)
        .arg("gamma")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    sh.stdin
        .take()
        .unwrap()
        .write_all(b"cd /srv/www\ncat index.html\necho $((6*7))\n")
        .unwrap();
    let o = sh.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    let out = text(&o.stdout);
    assert!(out.contains("gamma# "), "{out}");
    assert!(
        out.contains("hello from gamma\n") && out.contains("42\n"),
        "{out}"
    );
    assert!(!out.contains("DRYDOCK-"), "{out}");
    let o = exec(&state, &file, "gamma", "30", "echo after the shell");
    assert_eq!(text(&o.stdout), "after the shell\n", "{}", text(&o.stderr));

    // A cluster machine is its owner's: `vm restart` restarts it in its cluster, on its
    // networks, and nothing else; `vm stop`/`snapshot` on it are bad input naming the cluster.
    let before = qemu_pids(&store(), &state, &file);
    let pid = |rows: &[(String, Option<u64>)], m: &str| {
        rows.iter().find(|(name, _)| name == m).unwrap().1
    };
    let o = drydock(&state)
        .args(["vm", "restart", "net.gamma", "--timeout", "300"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "vm restart: {}", text(&o.stderr));
    let after = qemu_pids(&store(), &state, &file);
    assert_ne!(
        pid(&before, "gamma"),
        pid(&after, "gamma"),
        "gamma did not restart"
    );
    for m in ["alpha", "beta"] {
        assert_eq!(pid(&before, m), pid(&after, m), "{m} was touched");
    }
    let o = exec(
        &state,
        &file,
        "gamma",
        "30",
        "timeout 5 wget -qO- http://192.168.2.2/",
    );
    assert_eq!(text(&o.stdout), "hello from beta\n", "{}", text(&o.stderr));
    for verb in ["stop", "snapshot"] {
        let o = drydock(&state)
            .args(["vm", verb, "net.alpha"])
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(2), "vm {verb}: {}", text(&o.stderr));
        assert!(
            text(&o.stderr).contains("cluster net"),
            "{}",
            text(&o.stderr)
        );
    }
    let o = exec(&state, &file, "alpha", "30", "echo still in its cluster");
    assert_eq!(
        text(&o.stdout),
        "still in its cluster\n",
        "{}",
        text(&o.stderr)
    );

    // GC while the cluster is up keeps every machine's system (its run pins it), and the guests
    // still read their store afterwards.
    let gc = drydock(&state)
        .args(["--json", "gc", "--all"])
        .output()
        .unwrap();
    assert!(gc.status.success(), "{}", text(&gc.stderr));
    let rows = ps_json(&state, &file);
    for r in rows.as_array().unwrap() {
        let sys = r["system"].as_str().unwrap();
        let on_disk = store().join(sys.trim_start_matches('/'));
        assert!(
            on_disk.join("kernel-params").exists(),
            "{sys} was collected while up"
        );
        let o = exec(
            &state,
            &file,
            r["machine"].as_str().unwrap(),
            "30",
            &format!("cat {sys}/kernel-params"),
        );
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    }

    cluster_down(&store(), &state, &file);
    let o = exec(&state, &file, "alpha", "5", "true");
    assert_eq!(
        o.status.code(),
        Some(2),
        "exec on a stopped cluster is bad input"
    );
}

#[test]
fn ctrl_c_and_sigkill_leave_no_process() {
    guest_ready();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let file = composition(
        dir.path(),
        "stop",
        "one = { system = sys { }; memorySize = 256; }; two = { system = sys { }; memorySize = 256; };",
    );
    // Foreground: Ctrl-C once up stops everything and exits 130.
    let mut child = drydock(&state)
        .arg("up")
        .arg("-f")
        .arg(&file)
        .args(["--accel", "tcg", "--timeout", "300", "--hide", "one"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = state.join("clusters/stop/cluster.json");
    wait_until("the cluster is up", Duration::from_secs(300), || {
        log.exists()
    });
    assert!(!processes_mentioning(&state).is_empty());
    drydock_gc::send_signal(child.id(), libc::SIGINT).unwrap();
    let t = Instant::now();
    let out = loop {
        if child.try_wait().unwrap().is_some() {
            break child.wait_with_output().unwrap();
        }
        assert!(t.elapsed() < Duration::from_secs(60), "up did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    wait_no_processes(&state, Duration::from_secs(10));
    // --hide hid exactly `one` from the terminal, not from its log.
    let stdout = text(&out.stdout);
    assert!(
        stdout.lines().any(|l| l.starts_with("two │ DRYDOCK-READY")),
        "{stdout}"
    );
    assert!(!stdout.lines().any(|l| l.starts_with("one ")), "{stdout}");
    let one_log = std::fs::read_to_string(state.join("vms/stop.one/console.log")).unwrap();
    assert!(one_log.contains("DRYDOCK-READY"));

    // Detached, then the owner is SIGKILLed: its machines and store servers die with it.
    cluster_up_detached(&store(), &state, &file);
    let st: serde_json::Value = serde_json::from_slice(&std::fs::read(&log).unwrap()).unwrap();
    let owner = st["owner_pid"].as_u64().unwrap() as u32;
    assert!(
        processes_mentioning(&state).len() >= 5,
        "owner, 2 QEMU, 2 store servers"
    );
    drydock_gc::send_signal(owner, libc::SIGKILL).unwrap();
    wait_no_processes(&state, Duration::from_secs(10));
    // `down` afterwards cleans up the dead owner's entries.
    cluster_down(&store(), &state, &file);
}

#[test]
fn bad_compositions_are_exit_2_naming_file_and_attribute() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let sys = r#"derivation { name = "s"; system = "x86_64-linux"; builder = "/bin/sh"; }"#;
    let cases = [
        ("nomachines", "{ }".to_string(), "no attribute `machines`"),
        (
            "big",
            format!("{{ machines.server = {{ system = {sys}; memorySize = \"big\"; }}; }}"),
            "machines.server.memorySize",
        ),
        (
            "underscore",
            format!("{{ machines.my_server = {{ system = {sys}; }}; }}"),
            "machines.my_server",
        ),
        (
            "notnixos",
            "{ machines.server = { system = 42; }; }".into(),
            "machines.server.system",
        ),
        ("syntax", "{ machines = { ; }".into(), "syntax error"),
    ];
    for (name, body, says) in cases {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let f = d.join("drydock.nix");
        std::fs::write(&f, body).unwrap();
        let o = drydock(&state)
            .arg("up")
            .arg("-f")
            .arg(&f)
            .output()
            .unwrap();
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{name}: {err}");
        assert!(err.contains(says), "{name}: {err}");
        assert!(err.contains(&f.display().to_string()), "{name}: {err}");
    }
    // A system that evaluates but is not NixOS-shaped: built, then refused by the launch. Nix's
    // own builder makes it (a directory with one link), so nothing from the host is needed in the
    // sandbox.
    let d = dir.path().join("shape");
    std::fs::create_dir_all(&d).unwrap();
    let f = d.join("drydock.nix");
    std::fs::write(
        &f,
        r#"{ machines.m.system = derivation { name = "not-nixos"; system = "x86_64-linux"; builder = "builtin:buildenv"; derivations = ""; manifest = "none"; allowSubstitutes = false; }; }"#,
    )
    .unwrap();
    let o = drydock(&state)
        .arg("up")
        .arg("-f")
        .arg(&f)
        .args(["--detach", "--accel", "tcg"])
        .output()
        .unwrap();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("machines.m.system"), "{err}");
    wait_no_processes(&state, Duration::from_secs(10));
}
