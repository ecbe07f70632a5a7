//! Clusters against real QEMU (TCG) and test systems built by `drydock up` into a private
//! chroot store: machines reach each other by name over a shared VLAN and not across VLANs,
//! `exec` passes stdout, stderr and the exit status through (124 at the deadline, the machine
//! still answering), calls on one machine queue, `wait` on the console and on a late service,
//! `shell`, GC while up keeps every system, Ctrl-C and SIGKILL leave no QEMU, store server
//! or owner behind (checked over /proc), bad compositions are exit 2, and a machine that cannot
//! launch (a missing QEMU, a name in use) is exit 2 before anything starts. Needs root for the
//! store server's sandbox, and the test guest's kernel (`scripts/guest/build-initrd`).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::Checks;
use crate::vmcommon;
use vmcommon::{Cluster, processes_mentioning, text, wait_no_processes, wait_until};

#[test]
fn machines_talk_by_name_on_their_vlans_only_and_exec_passes_everything_through() {
    // One boot of three machines under TCG serves every check here: booting is what costs, and
    // the steps share one cluster in an order that matters (the late service, the restart of
    // gamma, GC while up, down). So this stays one test with soft checks (common::Checks):
    // a failed check is recorded and the others still run, and the test fails at the end
    // listing every failure. What later steps need stays hard: the cluster coming up, its
    // QEMU pids before the restart, and `down` before `exec` on the stopped cluster; a check
    // that depends on an earlier one runs only if that one held.
    let t = Instant::now();
    let c = Cluster::named("net")
        .machines(
            "alpha = { system = sys { }; memorySize = 256; };
         beta = { system = sys { }; memorySize = 256; vlans = [ 1 2 ]; };
         gamma = { system = sys { }; memorySize = 256; vlans = [ 2 ]; };",
        )
        .up();
    let mut checks = Checks::new();
    checks.check(
        "the build's roots are released once the runs pin the systems",
        || {
            // The build's roots held the systems until the machines' runs pinned them, then went.
            let cdir = c.state().join("clusters/net");
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
        },
    );
    eprintln!(
        "up --detach of 3 machines: {:.1} s",
        t.elapsed().as_secs_f64()
    );

    checks.check("names over VLAN 1, both ways", || {
        // By name over VLAN 1, both ways (the hosts table came from fw_cfg).
        let o = c.exec("alpha", "30", "timeout 5 wget -qO- http://beta/");
        assert_eq!(
            (o.status.code(), text(&o.stdout)),
            (Some(0), "hello from beta\n".into()),
            "{}",
            text(&o.stderr)
        );
        let o = c.exec("beta", "30", "hostname; timeout 5 wget -qO- http://alpha/");
        assert_eq!(
            text(&o.stdout),
            "beta\nhello from alpha\n",
            "{}",
            text(&o.stderr)
        );
    });
    checks.check("VLAN 2 connects gamma and beta", || {
        // VLAN 2: gamma reaches beta's VLAN 2 address (192.168.2.2; gamma is 3, beta 2).
        let o = c.exec("gamma", "30", "timeout 5 wget -qO- http://192.168.2.2/");
        assert_eq!(text(&o.stdout), "hello from beta\n", "{}", text(&o.stderr));
    });
    checks.check("VLANs are separate at layer 2", || {
        // ... but not alpha, which is on VLAN 1 only, even with an address of VLAN 1's subnet
        // on its VLAN 2 NIC: the segments are separate at layer 2.
        let o = c.exec(
            "gamma",
            "60",
            "ip addr add 192.168.1.99/24 dev eth0 && ! timeout 3 wget -qO- http://192.168.1.1/ && echo isolated",
        );
        assert_eq!(text(&o.stdout), "isolated\n", "{}", text(&o.stderr));
        let o = c.exec(
            "alpha",
            "60",
            "! timeout 3 wget -qO- http://192.168.2.3/ && echo isolated",
        );
        assert_eq!(text(&o.stdout), "isolated\n", "{}", text(&o.stderr));
    });

    checks.check(
        "exec: stdout, stderr and the exit status, separately",
        || {
            let o = c.exec("alpha", "30", "echo out; echo err >&2; exit 3");
            assert_eq!(
                (o.status.code(), text(&o.stdout), text(&o.stderr)),
                (Some(3), "out\n".into(), "err\n".into())
            );
        },
    );
    checks.check("exec: 1 MiB of binary output, intact", || {
        // Checked against the guest's own md5sum.
        let o = c.exec(
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
    });
    checks.check(
        "exec: the deadline is 124, and the machine answers afterwards",
        || {
            let o = c.exec("gamma", "2", "sleep 60");
            assert_eq!(o.status.code(), Some(124), "{}", text(&o.stderr));
            let o = c.exec("gamma", "30", "echo still here");
            assert_eq!(text(&o.stdout), "still here\n");
        },
    );
    checks.check(
        "exec: two calls on one machine at once both complete",
        || {
            std::thread::scope(|s| {
                let calls: Vec<_> = (0..2)
                    .map(|i| {
                        let c = &c;
                        s.spawn(move || c.exec("alpha", "30", &format!("sleep 1; echo call{i}")))
                    })
                    .collect();
                for (i, call) in calls.into_iter().enumerate() {
                    let o = call.join().unwrap();
                    assert_eq!(text(&o.stdout), format!("call{i}\n"));
                }
            });
        },
    );
    checks.check("vm exec by VM name", || {
        let o = c
            .drydock()
            .args(["vm", "exec", "net.beta", "--", "cat /proc/cmdline"])
            .run();
        assert!(
            text(&o.stdout).contains("drydock.machine=beta"),
            "{}",
            text(&o.stdout)
        );
    });
    checks.check("ps", || {
        let rows = c.ps();
        let rows = rows.as_array().unwrap();
        assert_eq!(rows.len(), 3);
        assert!(rows.iter().all(|r| r["state"] == "running"), "{rows:?}");
        assert_eq!(
            rows[1]["addresses"],
            serde_json::json!(["192.168.1.2/24", "192.168.2.2/24"])
        );
    });

    // `wait --console`: a line the guest printed at boot; a line it never prints is exit 1 at
    // the deadline, with the last lines seen; a bad expression is bad input.
    let w = |args: &[&str]| c.verb("wait").args(args).run();
    checks.check("wait --console: a line the guest printed at boot", || {
        let o = w(&[
            "alpha",
            "--console",
            "DRYDOCK-NIC: eth0 .*192\\.168\\.1\\.1/",
            "--timeout",
            "30",
        ]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    });
    checks.check(
        "wait --console: a line never printed is exit 1 at the deadline",
        || {
            let o = w(&["alpha", "--console", "NEVER-PRINTED", "--timeout", "2"]);
            assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
            assert!(
                text(&o.stderr).contains("DRYDOCK-READY"),
                "{}",
                text(&o.stderr)
            );
        },
    );
    checks.check("wait --console: a bad expression is bad input", || {
        let o = w(&["alpha", "--console", "(unclosed", "--timeout", "2"]);
        assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
        assert!(text(&o.stderr).contains("(unclosed"), "{}", text(&o.stderr));
    });
    checks.check("wait on a machine the cluster lacks is bad input", || {
        let o = w(&["nosuch", "--succeeds", "true"]);
        assert_eq!(o.status.code(), Some(2), "{}", text(&o.stderr));
        assert!(text(&o.stderr).contains("nosuch"), "{}", text(&o.stderr));
    });
    // `wait --succeeds`: a service that comes up late on alpha, waited for from beta over the
    // network; it failed first, then succeeded.
    if checks.check("a late service starts on alpha", || {
        let o = c.exec(
            "alpha",
            "30",
            "mkdir -p /srv/late && echo late > /srv/late/index.html && (sleep 4; httpd -p 8080 -h /srv/late) >/dev/null 2>&1 &",
        );
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    }) {
        checks.check("wait --succeeds: the late service, from beta", || {
            let o = c
                .drydock()
                .args(["--json", "wait", "-f"])
                .arg(c.file())
                .args([
                    "beta",
                    "--timeout",
                    "120",
                    "--succeeds",
                    "timeout 3 wget -qO- http://alpha:8080/",
                ])
                .run();
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
        });
    }
    checks.check(
        "wait --succeeds: a command that never succeeds is exit 1",
        || {
            let o = w(&[
                "beta",
                "--timeout",
                "3",
                "--succeeds",
                "echo not yet; false",
            ]);
            assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
            assert!(text(&o.stderr).contains("not yet"), "{}", text(&o.stderr));
        },
    );

    // `shell`: an interactive shell, its prompt naming the machine, only its output.
    checks.check("shell", || {
        let o = c
            .verb("shell")
            .arg("gamma")
            .input(&b"cd /srv/www\ncat index.html\necho $((6*7))\n"[..])
            .run();
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
        let out = text(&o.stdout);
        assert!(out.contains("gamma# "), "{out}");
        assert!(
            out.contains("hello from gamma\n") && out.contains("42\n"),
            "{out}"
        );
        assert!(!out.contains("DRYDOCK-"), "{out}");
    });
    checks.check("exec after the shell", || {
        let o = c.exec("gamma", "30", "echo after the shell");
        assert_eq!(text(&o.stdout), "after the shell\n", "{}", text(&o.stderr));
    });

    // A cluster machine is its owner's: `vm restart` restarts it in its cluster, on its
    // networks, and nothing else; `vm stop`/`snapshot` on it are bad input naming the cluster.
    let before = c.qemu_pids();
    let pid = |rows: &[(String, Option<u64>)], m: &str| {
        rows.iter().find(|(name, _)| name == m).unwrap().1
    };
    if checks.check("vm restart restarts gamma, and nothing else", || {
        let o = c
            .drydock()
            .args(["vm", "restart", "net.gamma", "--timeout", "300"])
            .run();
        assert_eq!(o.status.code(), Some(0), "vm restart: {}", text(&o.stderr));
        let after = c.qemu_pids();
        assert_ne!(
            pid(&before, "gamma"),
            pid(&after, "gamma"),
            "gamma did not restart"
        );
        for m in ["alpha", "beta"] {
            assert_eq!(pid(&before, m), pid(&after, m), "{m} was touched");
        }
    }) {
        checks.check("the restarted gamma is on VLAN 2", || {
            let o = c.exec("gamma", "30", "timeout 5 wget -qO- http://192.168.2.2/");
            assert_eq!(text(&o.stdout), "hello from beta\n", "{}", text(&o.stderr));
        });
    }
    checks.check(
        "vm stop and vm snapshot of a cluster machine are bad input",
        || {
            for verb in ["stop", "snapshot"] {
                let o = c.drydock().args(["vm", verb, "net.alpha"]).run();
                assert_eq!(o.status.code(), Some(2), "vm {verb}: {}", text(&o.stderr));
                assert!(
                    text(&o.stderr).contains("cluster net"),
                    "{}",
                    text(&o.stderr)
                );
            }
            let o = c.exec("alpha", "30", "echo still in its cluster");
            assert_eq!(
                text(&o.stdout),
                "still in its cluster\n",
                "{}",
                text(&o.stderr)
            );
        },
    );

    // GC while the cluster is up keeps every machine's system (its run pins it), and the guests
    // still read their store afterwards.
    checks.check("gc while up keeps every machine's system", || {
        let gc = c.drydock().args(["--json", "gc", "--all"]).run();
        assert!(gc.status.success(), "{}", text(&gc.stderr));
        let rows = c.ps();
        for r in rows.as_array().unwrap() {
            let sys = r["system"].as_str().unwrap();
            let on_disk = c.store().join(sys.trim_start_matches('/'));
            assert!(
                on_disk.join("kernel-params").exists(),
                "{sys} was collected while up"
            );
            let o = c.exec(
                r["machine"].as_str().unwrap(),
                "30",
                &format!("cat {sys}/kernel-params"),
            );
            assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
        }
    });

    c.down();
    let o = c.exec("alpha", "5", "true");
    assert_eq!(
        o.status.code(),
        Some(2),
        "exec on a stopped cluster is bad input"
    );
}

#[test]
fn ctrl_c_and_sigkill_leave_no_process() {
    vmcommon::guest_ready();
    let c = Cluster::named("stop")
        .machines(
            "one = { system = sys { }; memorySize = 256; }; two = { system = sys { }; memorySize = 256; };",
        )
        .write();
    let state = c.state();
    // Foreground: Ctrl-C once up stops everything and exits 130.
    let mut child = c
        .verb("up")
        .args(["--accel", "tcg", "--timeout", "300", "--hide", "one"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let log = state.join("clusters/stop/cluster.json");
    wait_until("the cluster is up", Duration::from_secs(300), || {
        log.exists()
    });
    assert!(!processes_mentioning(state).is_empty());
    child.signal(libc::SIGINT);
    child.wait_within(Duration::from_secs(60));
    let out = child.output();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    wait_no_processes(state, Duration::from_secs(10));
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
    c.up_detached();
    let owner = c.owner_pid();
    assert!(
        processes_mentioning(state).len() >= 5,
        "owner, 2 QEMU, 2 store servers"
    );
    drydock_gc::send_signal(owner, libc::SIGKILL).unwrap();
    wait_no_processes(state, Duration::from_secs(10));
    // `down` afterwards cleans up the dead owner's entries.
    c.down();
}

#[test]
fn bad_compositions_are_exit_2_naming_file_and_attribute() {
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
        let c = Cluster::named(name).composition(&body).write();
        let f = c.file();
        let o = c.verb("up").run();
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{name}: {err}");
        assert!(err.contains(says), "{name}: {err}");
        assert!(err.contains(&f.display().to_string()), "{name}: {err}");
    }
    // A system that evaluates but is not NixOS-shaped: built, then refused by the launch. Nix's
    // own builder makes it (a directory with one link), so nothing from the host is needed in the
    // sandbox.
    let c = Cluster::named("shape")
        .composition(
            r#"{ machines.m.system = derivation { name = "not-nixos"; system = "x86_64-linux"; builder = "builtin:buildenv"; derivations = ""; manifest = "none"; allowSubstitutes = false; }; }"#,
        )
        .write();
    let o = c.verb("up").args(["--detach", "--accel", "tcg"]).run();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("machines.m.system"), "{err}");
    wait_no_processes(c.state(), Duration::from_secs(10));
}

#[test]
fn a_machine_that_cannot_launch_starts_nothing_and_a_missing_qemu_is_exit_2_as_for_vm_run() {
    vmcommon::guest_ready();
    let c = Cluster::named("bad")
        .machines("a = { system = sys { }; memorySize = 256; }; b = { system = sys { }; memorySize = 256; };")
        .write();
    let state = c.state().to_path_buf();
    let cdir = state.join("clusters/bad");
    let up = |extra: &[&str], qemu: Option<&std::path::Path>| {
        let mut d = c
            .verb("up")
            .args(["--accel", "tcg", "--timeout", "60"])
            .args(extra);
        if let Some(q) = qemu {
            d = d.arg("--qemu").arg(q);
        }
        d.run()
    };
    // Nothing of the cluster started: no hosts table (written before the hubs), no owner, no
    // machine's folder, no process.
    let nothing_started = |what: &str| {
        for f in ["hosts", "cluster.json", "drydock.log"] {
            assert!(!cdir.join(f).exists(), "{what}: {f} exists");
        }
        assert!(
            !state.join("vms/bad.a").exists(),
            "{what}: bad.a was launched"
        );
        wait_no_processes(&state, Duration::from_secs(10));
    };

    // A QEMU that does not exist: bad input naming it, foreground or detached, as for `vm run`.
    let missing = c.dir().join("no-such-qemu");
    let says = format!("QEMU not found: {} does not exist", missing.display());
    for extra in [&[][..], &["--detach"]] {
        let o = up(extra, Some(&missing));
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "up {extra:?}: {err}");
        assert!(err.contains(&says), "up {extra:?}: {err}");
        nothing_started(&format!("up {extra:?} --qemu"));
    }
    let plan: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cdir.join("up.json")).unwrap()).unwrap();
    let system = plan["machines"][0]["settings"]["system"]["out_path"]
        .as_str()
        .unwrap()
        .to_string();
    let o = c
        .drydock()
        .args([
            "vm", "run", "--name", "lone", "--accel", "tcg", "--system", &system,
        ])
        .arg("--qemu")
        .arg(&missing)
        .run();
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "vm run: {err}");
    assert!(err.contains(&says), "vm run: {err}");

    // One machine's name is taken by a running VM: `up` says so, and starts no other machine.
    let mut holder = Command::new("sleep").arg("600").spawn().unwrap();
    let vm_b = state.join("vms/bad.b");
    std::fs::create_dir_all(&vm_b).unwrap();
    let pid = holder.id();
    std::fs::write(
        vm_b.join("state.json"),
        serde_json::json!({
            "name": "bad.b", "supervisor_pid": pid, "qemu_pid": pid, "server_pid": null,
            "accel": "tcg", "memory_mib": 256, "started": 0, "cgroup": null,
        })
        .to_string(),
    )
    .unwrap();
    for extra in [&[][..], &["--detach"]] {
        let o = up(extra, None);
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "up {extra:?}: {err}");
        assert!(
            err.contains(&format!(
                "machine b: a VM named bad.b is already running (QEMU pid {pid})"
            )),
            "up {extra:?}: {err}"
        );
        nothing_started(&format!("up {extra:?} with bad.b taken"));
    }
    holder.kill().unwrap();
    holder.wait().unwrap();
}
