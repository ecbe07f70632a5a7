//! The `nixos-test` machine profile against real QEMU (TCG): a cluster of drydock's
//! nixos-test-shaped test nodes (`scripts/guest/nixos-node.nix`, which boot as nixpkgs'
//! qemu-vm nodes do: `/` by label, the store under an overlay, xchg and shared, a user-mode NIC
//! first, regInfo=), in each flavour of shares (9p and virtio-fs), on two VLANs: what each
//! machine got, names and VLANs, the shared folders both ways, the overlay store, the regInfo
//! check, a switch through the overlay, a switch that restarts the backdoor, and SIGINT or
//! SIGKILL of the owner leaving nothing. A fstab naming an unknown tag is exit 2 naming it, and
//! a lone node boots under `vm run --profile nixos-test`. A cluster of the node's systemd
//! flavour (Debian's systemd as PID 1, `init = "systemd"`): its units, a unit that starts late,
//! a switch inside `backdoor.service` dying with it, a reload that restarts just the unit whose
//! file changed, and one that restarts the backdoor from a switch running as a transient unit
//! (`systemd-run`).

use std::path::Path;
use std::time::Duration;

use crate::common::Checks;
use crate::vmcommon;
use vmcommon::{
    Cluster, actions, nixos_composition, nixos_guest_ready, row, systemd_composition,
    systemd_guest_ready, text, up_json, wait_no_processes, wait_until,
};

/// The nodes: alpha on VLAN 1, beta on 1 and 2, gamma on 2 (numbered 1, 2, 3).
const NODES: &str =
    "alpha = { vlans = [ 1 ]; }; beta = { vlans = [ 1 2 ]; }; gamma = { vlans = [ 2 ]; };";

/// The machines, beta's web page and gamma's backdoor revision as given.
fn machines(www: &str, backdoor: &str) -> String {
    format!(
        r#"alpha = {{ system = node "alpha" {{ }}; profile = "nixos-test"; memorySize = 384; diskSize = 600; vlans = [ 1 ]; }};
           beta = {{ system = node "beta" {{ www = "{www}"; }}; profile = "nixos-test"; memorySize = 384; diskSize = 700; vlans = [ 1 2 ]; }};
           gamma = {{ system = node "gamma" {{ backdoorRevision = "{backdoor}"; }}; profile = "nixos-test"; memorySize = 384; diskSize = 800; vlans = [ 2 ]; }};"#
    )
}

fn stdout_of(c: &Cluster, machine: &str, cmd: &str) -> String {
    let o = c.exec(machine, "60", cmd);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{machine}: {cmd}: {}{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stdout).trim().to_string()
}

/// One boot of three nodes serves every check (booting is what costs); soft checks record
/// each failure and the test fails at the end listing them all.
fn a_cluster_of_nodes(shares: &str) {
    nixos_guest_ready();
    let name = format!("nixos-{shares}");
    let c = Cluster::named(&name)
        .composition(&nixos_composition(shares, NODES, &machines("v1", "1")))
        .up();
    let mut checks = Checks::new();
    let shared = c.state().join(format!("clusters/{name}/shared"));
    let store_words = if shares == "9p" {
        "whole store, read-only, 9p"
    } else {
        "closure, read-only, virtio-fs"
    };

    checks.check(
        "ps names the profile, the store and the shared folder",
        || {
            let ps = c.ps();
            for m in ps.as_array().unwrap() {
                assert_eq!(m["profile"], "nixos-test", "{ps}");
                assert_eq!(m["store"], store_words, "{ps}");
                assert_eq!(m["shared"], shared.display().to_string(), "{ps}");
            }
        },
    );

    // What each node got: `/` is ext4 labelled nixos of its diskSize on the disk with serial
    // root, the store an overlay over the shared store, eth0 from QEMU's DHCP, eth1 its first
    // VLAN's address (from its own configuration), the regInfo check, its built-in hostname.
    let facts = r#"awk '$2 == "/" { print $1, $3 }' /proc/mounts; findfs LABEL=nixos; readlink -f /dev/disk/by-id/virtio-root; echo $(( $(cat /sys/class/block/vda/size) / 2048 )); awk '$2 == "/nix/store" { print $3 }' /proc/mounts; ip -4 -o addr show dev eth0 | awk '{ print $4 }'; ip -4 -o addr show dev eth1 | awk '{ print $4 }'; cat /run/drydock-reginfo; hostname"#;
    for (m, disk, eth1) in [
        ("alpha", 600, "192.168.1.1/24"),
        ("beta", 700, "192.168.1.2/24"),
        ("gamma", 800, "192.168.2.3/24"),
    ] {
        checks.check(&format!("{m}: what a nixos-test node gets"), || {
            let got = stdout_of(&c, m, facts);
            let want = format!(
                "/dev/vda ext4\n/dev/vda\n/dev/vda\n{disk}\noverlay\n10.0.2.15/24\n{eth1}\nok\n{m}"
            );
            assert_eq!(got, want, "{m}");
        });
    }
    checks.check("beta's second VLAN is eth2", || {
        assert_eq!(
            stdout_of(
                &c,
                "beta",
                "ip -4 -o addr show dev eth2 | awk '{ print $4 }'"
            ),
            "192.168.2.2/24"
        );
    });
    checks.check("by name on a shared VLAN, not across VLANs", || {
        assert_eq!(stdout_of(&c, "alpha", "wget -qO- http://beta/"), "v1");
        assert_eq!(
            stdout_of(&c, "gamma", "timeout 10 wget -qO- http://192.168.2.2/"),
            "v1"
        );
        // The same call across VLANs gets no answer: wget is stopped by timeout (143).
        let across = stdout_of(
            &c,
            "alpha",
            "timeout 5 wget -qO- http://192.168.2.3/; echo status=$?",
        );
        assert!(
            across.ends_with("status=143") || across.ends_with("status=1"),
            "alpha reached gamma's VLAN? {across}"
        );
    });

    checks.check("the shared folder, both ways, for every machine", || {
        std::fs::write(shared.join("from-host"), "hello nodes\n").unwrap();
        for m in ["alpha", "beta", "gamma"] {
            assert_eq!(stdout_of(&c, m, "cat /tmp/shared/from-host"), "hello nodes");
            stdout_of(&c, m, &format!("echo {m} > /tmp/shared/from-{m}"));
            assert_eq!(
                std::fs::read_to_string(shared.join(format!("from-{m}"))).unwrap(),
                format!("{m}\n")
            );
        }
    });
    checks.check("xchg is each machine's own", || {
        stdout_of(&c, "alpha", "echo mine > /tmp/xchg/alpha-only");
        let alpha = c.state().join(format!("vms/{name}.alpha/xchg/alpha-only"));
        assert_eq!(std::fs::read_to_string(&alpha).unwrap(), "mine\n");
        assert_eq!(
            stdout_of(
                &c,
                "beta",
                "test -e /tmp/xchg/alpha-only && echo seen || echo unseen"
            ),
            "unseen"
        );
    });
    checks.check(
        "writing to /nix/store lands in the overlay, not on the host",
        || {
            assert_eq!(
                stdout_of(
                    &c,
                    "beta",
                    "echo written > /nix/store/drydock-probe && cat /nix/store/drydock-probe"
                ),
                "written"
            );
            assert!(!c.store().join("nix/store/drydock-probe").exists());
            let ro = c.exec("beta", "60", "echo x > /nix/.ro-store/drydock-probe");
            assert_ne!(ro.status.code(), Some(0), "the store itself is read-only");
        },
    );
    checks.check("regInfo names a registration that lists the system", || {
        let top = stdout_of(&c, "alpha", "readlink /run/current-system");
        let reg = stdout_of(
            &c,
            "alpha",
            r#"for w in $(cat /proc/cmdline); do case "$w" in regInfo=*) echo "${w#regInfo=}";; esac; done"#,
        );
        assert!(reg.ends_with("-closure-info/registration"), "{reg}");
        let host = c.store().join(reg.trim_start_matches('/'));
        let listed = std::fs::read_to_string(&host).unwrap();
        assert!(listed.lines().any(|l| l == top), "{top} not in {listed}");
    });

    // Hot reload: beta's page changes (a switch through the overlay store: the new paths come
    // up in the lower layer), gamma's backdoor changes (a switch that restarts the backdoor).
    let pids = c.qemu_pids();
    let old_backdoor = checks.value("gamma's backdoor", || stdout_of(&c, "gamma", "echo $$"));
    std::fs::write(
        c.file(),
        nixos_composition(shares, NODES, &machines("v2", "2")),
    )
    .unwrap();
    let (code, report, err) = up_json(&c, &[]);
    let rows = actions(&report);
    checks.check("beta and gamma switch, alpha is kept", || {
        assert_eq!(code, Some(0), "{err}");
        assert_eq!(
            rows,
            [
                row("alpha", "keep", "planned"),
                row("beta", "switch", "done"),
                row("gamma", "switch", "done"),
            ],
            "{report}"
        );
        assert_eq!(c.qemu_pids(), pids, "switched in place");
    });
    checks.check("beta serves its new page from the new system", || {
        assert_eq!(stdout_of(&c, "alpha", "wget -qO- http://beta/"), "v2");
    });
    checks.check(
        "gamma's backdoor was restarted and exec works after",
        || {
            let now = stdout_of(&c, "gamma", "echo $$");
            assert_ne!(Some(now), old_backdoor, "the backdoor is a new one");
            assert_eq!(stdout_of(&c, "gamma", "echo ok"), "ok");
        },
    );

    // The owner interrupted (9p: SIGINT, as Ctrl-C of a foreground `up`) or killed (virtio-fs:
    // SIGKILL): QEMU, the store servers and the shares' servers go with it.
    let signal = if shares == "9p" { "-INT" } else { "-KILL" };
    checks.check(&format!("{signal} to the owner leaves nothing"), || {
        let ls = c.drydock().args(["--json", "ls"]).run().ok().stdout_json();
        let owner = ls["clusters"][0]["owner_pid"].as_u64().expect("owner pid") as i32;
        let killed = std::process::Command::new("kill")
            .args([signal, &owner.to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        wait_no_processes(c.state(), Duration::from_secs(30));
    });
    drop(checks);
}

#[test]
fn a_cluster_of_nixos_test_nodes_over_9p() {
    a_cluster_of_nodes("9p");
}

#[test]
fn a_cluster_of_nixos_test_nodes_over_virtiofs() {
    a_cluster_of_nodes("virtiofs");
}

/// A share tag drydock does not know is exit 2 naming the fstab line; nothing starts.
#[test]
fn an_unknown_share_tag_is_exit_2_naming_the_fstab_line() {
    nixos_guest_ready();
    let c = Cluster::named("nixos-bad")
        .composition(&nixos_composition(
            "9p",
            "solo = { };",
            r#"solo = { system = node "solo" { extraFstab = "home /home 9p trans=virtio 0 0"; }; profile = "nixos-test"; };"#,
        ))
        .write();
    let up = c
        .verb("up")
        .args(["--detach", "--accel", "tcg", "--timeout", "300"])
        .run();
    let err = text(&up.stderr);
    assert_eq!(up.status.code(), Some(2), "{err}");
    assert!(
        err.contains("etc/fstab") && err.contains("drydock does not know the share tag \"home\""),
        "{err}"
    );
    assert!(err.contains("\"home /home 9p trans=virtio 0 0\""), "{err}");
    assert!(!Path::new(&c.state().join("vms/nixos-bad.solo/qemu.pid")).exists());
    wait_no_processes(c.state(), Duration::from_secs(5));
}

/// `vm run --profile nixos-test`: a lone node gets what its fstab names (its own `shared`
/// folder), the user-mode NIC and regInfo=; a system without an fstab, and a store image, are
/// exit 2.
#[test]
fn a_lone_node_boots_under_vm_run_with_the_profile() {
    nixos_guest_ready();
    let root = vmcommon::shared_store();
    let node = vmcommon::build_system(&root, &["--nixos-test", "virtiofs"]);
    let plain = vmcommon::build_system(&root, &[]);
    let state = tempfile::tempdir().unwrap();
    let drydock = || crate::common::Drydock::on(&root, state.path());
    let run = drydock()
        .args(["vm", "run", "--name", "node", "--profile", "nixos-test"])
        .args(["--system", &node, "--accel", "tcg", "--timeout", "180"])
        .args(["--ready", "DRYDOCK-READY", "--detach"])
        .run();
    assert_eq!(run.status.code(), Some(0), "{}", text(&run.stderr));
    let dir = state.path().join("vms/node");
    let console = std::fs::read_to_string(dir.join("console.log")).unwrap();
    let mut checks = Checks::new();
    for line in [
        "DRYDOCK-STORE: overlay over virtiofs",
        "DRYDOCK-REGINFO: ok",
        "DRYDOCK-DHCP: eth0 10.0.2.15/24",
        "DRYDOCK-STAGE1: mounted /tmp/shared",
        "DRYDOCK-STAGE1: mounted /tmp/xchg",
    ] {
        checks.check(line, || assert!(console.contains(line), "{console}"));
    }
    checks.check("the launch record", || {
        let launch: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("launch.json")).unwrap()).unwrap();
        assert_eq!(launch["profile"], "nixos-test");
        assert_eq!(launch["spec"]["memory_mib"], 1024, "qemu-vm's default");
        assert!(
            launch["reginfo"]
                .as_str()
                .unwrap()
                .ends_with("-closure-info")
        );
        assert!(dir.join("xchg").is_dir() && dir.join("shared").is_dir());
    });
    let stop = drydock().args(["vm", "stop", "node"]).run();
    assert_eq!(stop.status.code(), Some(0), "{}", text(&stop.stderr));
    wait_no_processes(state.path(), Duration::from_secs(30));

    for (args, says) in [
        (vec!["--system", plain.as_str()], "etc/fstab: no such file"),
        (
            vec!["--system", node.as_str(), "--store-mode", "image"],
            "drop --store-mode image",
        ),
    ] {
        let bad = drydock()
            .args(["vm", "run", "--name", "bad", "--profile", "nixos-test"])
            .args(["--accel", "tcg"])
            .args(&args)
            .run();
        let err = text(&bad.stderr);
        checks.check(says, || {
            assert_eq!(bad.status.code(), Some(2), "{err}");
            assert!(err.contains(says), "{err}");
        });
    }
    drop(checks);
}

/// The systemd nodes: all on VLAN 1 (numbered 1, 2, 3).
const SYSTEMD_NODES: &str = "alpha = { }; beta = { }; gamma = { };";

/// How long alpha's `late.service` (a oneshot) takes to start.
const LATE_SECS: u64 = 20;

/// The systemd machines: alpha's web page, gamma's backdoor revision as given; alpha has a unit
/// that starts late, beta the `services` snippet (app.service) and a unit given as a script.
fn systemd_machines(www: &str, backdoor: &str) -> String {
    format!(
        r#"alpha = {{ system = node "alpha" {{ www = "{www}"; units.late = {{ type = "oneshot"; script = "sleep {LATE_SECS}"; }}; }}; profile = "nixos-test"; memorySize = 384; }};
           beta = {{ system = node "beta" {{ services = "while :; do sleep 1; done"; units.ticker = "while :; do date > /tmp/tick; sleep 1; done"; }}; profile = "nixos-test"; memorySize = 384; }};
           gamma = {{ system = node "gamma" {{ backdoorRevision = "{backdoor}"; }}; profile = "nixos-test"; memorySize = 384; }};"#
    )
}

/// When each unit last became active (`ActiveEnterTimestampMonotonic`, µs), one line per unit.
fn entered(c: &Cluster, machine: &str, units: &[&str]) -> Vec<(String, u64)> {
    let cmd = units
        .iter()
        .map(|u| format!("systemctl show -p ActiveEnterTimestampMonotonic --value {u}"))
        .collect::<Vec<_>>()
        .join("; ");
    let out = stdout_of(c, machine, &cmd);
    let times: Vec<u64> = out
        .lines()
        .map(|l| l.trim().parse().unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert_eq!(times.len(), units.len(), "{out}");
    units.iter().map(|u| u.to_string()).zip(times).collect()
}

/// A cluster of three nodes of the systemd flavour (Debian's systemd as PID 1, the node's
/// services as units, the backdoor as `backdoor.service`) over virtio-fs: what runs, a unit
/// that starts late, the network by name, a switch that runs inside the backdoor's unit dying
/// with it, then a hot reload that changes one unit of alpha (just that unit restarts) and
/// gamma's backdoor (the switch, a transient unit of its own, survives the restart).
#[test]
fn a_cluster_of_systemd_nodes_over_virtiofs() {
    systemd_guest_ready();
    let name = "nixos-systemd";
    let c = Cluster::named(name)
        .composition(&systemd_composition(
            "virtiofs",
            SYSTEMD_NODES,
            &systemd_machines("v1", "1"),
        ))
        .up();
    let mut checks = Checks::new();
    let all = ["alpha", "beta", "gamma"];

    // Right after `up` (which waits for the backdoors only), alpha's late unit may still be
    // starting: then the system is still starting too.
    checks.check(
        "alpha's late unit: activating and the system starting, or both done",
        || {
            let o = c.exec(
                "alpha",
                "60",
                "systemctl is-active late.service; systemctl is-system-running",
            );
            let got = text(&o.stdout);
            assert!(
                got == "activating\nstarting\n" || got == "active\nrunning\n",
                "{got:?}"
            );
        },
    );

    checks.check("PID 1 is Debian's systemd", || {
        for m in all {
            let got = stdout_of(&c, m, "readlink /proc/1/exe; cat /proc/1/comm");
            let (exe, comm) = got.split_once('\n').unwrap_or_else(|| panic!("{got}"));
            assert!(
                exe.starts_with("/nix/store/")
                    && exe.contains("-drydock-debian-systemd-")
                    && exe.ends_with("/usr/lib/systemd/systemd"),
                "{m}: {exe}"
            );
            assert_eq!(comm, "systemd", "{m}");
        }
    });
    checks.check("the node's units are active", || {
        // `up` waits for the backdoors only: under TCG a unit may still be starting (journald
        // was seen `activating`), so wait for them as `wait_for_unit` would, one probe a second.
        let units = "backdoor.service httpd.service network-setup.service udhcpc.service systemd-journald.service";
        for m in all {
            assert_eq!(
                stdout_of(
                    &c,
                    m,
                    &format!(
                        "for i in $(seq 50); do systemctl is-active -q {units} && break; sleep 1; done; systemctl is-active {units}"
                    )
                ),
                "active\nactive\nactive\nactive\nactive",
                "{m}"
            );
        }
        assert_eq!(
            stdout_of(&c, "beta", "systemctl is-active app.service ticker.service"),
            "active\nactive"
        );
    });
    checks.check("the backdoor is backdoor.service's main process", || {
        for m in all {
            let got = stdout_of(
                &c,
                m,
                "echo $$; systemctl show -p MainPID --value backdoor.service; cat /proc/self/cgroup",
            );
            let l: Vec<&str> = got.lines().collect();
            assert_eq!(l[0], l[1], "{m}: {got}");
            assert_eq!(l[2], "0::/system.slice/backdoor.service", "{m}: {got}");
        }
    });

    checks.check(&format!("alpha's late unit becomes active after {LATE_SECS} s"), || {
        wait_until("late.service active", Duration::from_secs(120), || {
            text(&c.exec("alpha", "60", "systemctl is-active late.service").stdout).trim()
                == "active"
        });
        let got = stdout_of(
            &c,
            "alpha",
            "systemctl show -p InactiveExitTimestampMonotonic -p ActiveEnterTimestampMonotonic --value late.service",
        );
        let t: Vec<u64> = got.lines().map(|l| l.parse().unwrap()).collect();
        let took = t[1].saturating_sub(t[0]);
        assert!(
            took >= LATE_SECS * 1_000_000,
            "late.service took {took} µs to start: {got}"
        );
    });
    // Every unit started and none failed: `running` (a failed unit would make it `degraded`).
    checks.check("is-system-running: running", || {
        for m in all {
            wait_until(
                &format!("{m}: is-system-running"),
                Duration::from_secs(60),
                || text(&c.exec(m, "60", "systemctl is-system-running").stdout).trim() == "running",
            );
        }
    });
    checks.check("the machines reach each other by name", || {
        assert_eq!(
            stdout_of(&c, "alpha", "wget -qO- http://beta/"),
            "hello from beta"
        );
        assert_eq!(
            stdout_of(&c, "beta", "wget -qO- http://gamma/"),
            "hello from gamma"
        );
        assert_eq!(stdout_of(&c, "gamma", "wget -qO- http://alpha/"), "v1");
    });
    checks.check(
        "the regInfo check and the hostname, as the busybox node's",
        || {
            for m in all {
                assert_eq!(
                    stdout_of(&c, m, "cat /run/drydock-reginfo; hostname"),
                    format!("ok\n{m}")
                );
            }
        },
    );

    // A switch run inside the backdoor's unit dies with it when it restarts the backdoor. The
    // running units are made to look older (a copy of them where backdoor.service differs), so
    // that switching to the running system restarts backdoor.service.
    checks.check("a switch inside backdoor.service dies with it", || {
        let before = stdout_of(&c, "beta", "systemctl show -p MainPID --value backdoor.service");
        stdout_of(
            &c,
            "beta",
            "d=/tmp/older; mkdir -p $d/systemd && cp -a $(readlink -f /etc/systemd/system)/. $d/units && chmod u+w $d/units/backdoor.service && echo '# older' >> $d/units/backdoor.service && ln -s $d/units $d/systemd/system && ln -sfn $d/systemd /etc/systemd",
        );
        let o = c.exec(
            "beta",
            "120",
            "/run/current-system/bin/switch-to-configuration test; echo survived > /tmp/survived",
        );
        let err = text(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{err}");
        assert!(err.contains("backdoor restarted during the call"), "{err}");
        let after = stdout_of(
            &c,
            "beta",
            "systemctl show -p MainPID --value backdoor.service; test -e /tmp/survived && echo survived || echo died; readlink /etc/systemd",
        );
        let l: Vec<&str> = after.lines().collect();
        assert_ne!(l[0], before, "a new backdoor");
        assert_eq!(l[1], "died", "the rest of the call never ran");
        assert!(
            l[2].ends_with("-drydock-test-system/etc/systemd"),
            "activate linked /etc/systemd to the system's again: {after}"
        );
    });

    // Hot reload: alpha's web page changes (httpd.service's file changes), gamma's backdoor.
    let pids = c.qemu_pids();
    let units = [
        "httpd.service",
        "backdoor.service",
        "late.service",
        "network-setup.service",
        "udhcpc.service",
        "systemd-journald.service",
    ];
    let alpha_before = checks.value("alpha's units before", || entered(&c, "alpha", &units));
    let gamma_backdoor = checks.value("gamma's backdoor before", || {
        stdout_of(
            &c,
            "gamma",
            "systemctl show -p MainPID --value backdoor.service",
        )
    });
    std::fs::write(
        c.file(),
        systemd_composition("virtiofs", SYSTEMD_NODES, &systemd_machines("v2", "2")),
    )
    .unwrap();
    let (code, report, err) = up_json(&c, &[]);
    let rows = actions(&report);
    checks.check("alpha and gamma switch in place, beta is kept", || {
        assert_eq!(code, Some(0), "{err}");
        assert_eq!(
            rows,
            [
                row("alpha", "switch", "done"),
                row("beta", "keep", "planned"),
                row("gamma", "switch", "done"),
            ],
            "{report}"
        );
        assert_eq!(c.qemu_pids(), pids, "switched in place");
    });
    checks.check(
        "alpha's switch restarted httpd.service and nothing else",
        || {
            let after = entered(&c, "alpha", &units);
            let before = alpha_before.clone().expect("the timestamps before");
            for ((u, t0), (_, t1)) in before.iter().zip(&after) {
                if u == "httpd.service" {
                    assert!(t1 > t0, "{u} was not restarted: {t0} → {t1}");
                } else {
                    assert_eq!(t1, t0, "{u} was restarted");
                }
            }
            assert_eq!(stdout_of(&c, "beta", "wget -qO- http://alpha/"), "v2");
            assert_eq!(
                stdout_of(&c, "alpha", "systemctl is-system-running"),
                "running"
            );
        },
    );
    checks.check("gamma's switch ran as a unit of its own and restarted the backdoor", || {
        let now = stdout_of(&c, "gamma", "systemctl show -p MainPID --value backdoor.service");
        assert_ne!(Some(now), gamma_backdoor, "a new backdoor");
        let journal = stdout_of(
            &c,
            "gamma",
            "journalctl --no-pager -o cat _PID=1 | grep -e '^Started drydock-switch-' -e '^drydock-switch-.*: Deactivated successfully' -e '^Stopped backdoor.service' | cut -c1-40",
        );
        let lines: Vec<&str> = journal.lines().collect();
        assert_eq!(lines.len(), 3, "{journal}");
        assert!(lines[0].starts_with("Started drydock-switch-"), "{journal}");
        assert!(lines[1].starts_with("Stopped backdoor.service"), "{journal}");
        assert!(lines[2].starts_with("drydock-switch-"), "{journal}");
        // --collect: the switch's unit is gone once it ended.
        assert_eq!(
            stdout_of(&c, "gamma", "systemctl list-units --all --no-legend --plain 'drydock-switch-*' | wc -l"),
            "0"
        );
        assert_eq!(stdout_of(&c, "gamma", "echo ok; systemctl is-system-running"), "ok\nrunning");
    });
    drop(checks);
}
