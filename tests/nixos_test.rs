//! The `nixos-test` machine profile against real QEMU (TCG): a cluster of drydock's
//! nixos-test-shaped test nodes (`scripts/guest/nixos-node.nix`, which boot as nixpkgs'
//! qemu-vm nodes do: `/` by label, the store under an overlay, xchg and shared, a user-mode NIC
//! first, regInfo=), in each flavour of shares (9p and virtio-fs), on two VLANs: what each
//! machine got, names and VLANs, the shared folders both ways, the overlay store, the regInfo
//! check, a switch through the overlay, a switch that restarts the backdoor, and SIGINT or
//! SIGKILL of the owner leaving nothing. A fstab naming an unknown tag is exit 2 naming it, and
//! a lone node boots under `vm run --profile nixos-test`.

use std::path::Path;
use std::time::Duration;

use crate::common::Checks;
use crate::vmcommon;
use vmcommon::{
    Cluster, actions, nixos_composition, nixos_guest_ready, row, text, up_json, wait_no_processes,
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
