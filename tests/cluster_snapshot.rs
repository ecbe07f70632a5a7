//! Whole-cluster snapshots against real QEMU (TCG) and the test system in a chroot store:
//! `snapshot`, `restore` (state written after the snapshot is gone, every machine answers,
//! the VLANs work, guest clocks are the host's), restoring twice, a hot reload after a restore
//! and a snapshot of the switched system, `snapshot --stop` then a restore from nothing
//! running, `gc` keeping what only a snapshot holds, `snapshot --rm`, a tag taken again (a `gc`
//! of the replaced snapshot's run leaves the new one); and the refusals: a
//! corrupt snapshot (exit 1 naming the file) and one of another layout (exit 2 naming the
//! difference) leave nothing running, and so does Ctrl-C during a restore.

use std::time::{Duration, Instant};

use crate::common::Checks;
use crate::vmcommon;
use vmcommon::{Cluster, text, wait_no_processes, wait_until};

const THREE: &str = "alpha = { system = sys { }; memorySize = 256; };
     beta = { system = sys { }; memorySize = 256; };
     gamma = { system = sys { }; memorySize = 256; };";

fn json(c: &Cluster, args: &[&str]) -> serde_json::Value {
    let mut d = c.drydock().arg("--json");
    for a in args {
        d = d.arg(a);
    }
    let r = d.arg("-f").arg(c.file()).run();
    assert!(
        r.status.success(),
        "{args:?}: {}{}",
        text(&r.stderr),
        text(&r.stdout)
    );
    serde_json::from_slice(&r.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn out(c: &Cluster, machine: &str, cmd: &str) -> String {
    let o = c.exec(machine, "60", cmd);
    assert!(o.status.success(), "{machine}: {cmd}: {}", text(&o.stderr));
    text(&o.stdout)
}

fn running_qemus(c: &Cluster) -> usize {
    vmcommon::processes_mentioning(c.state())
        .iter()
        .filter(|(_, cmd)| cmd.contains("qemu-system"))
        .count()
}

#[test]
fn a_cluster_goes_back_to_its_snapshot_and_carries_on_from_there() {
    let c = Cluster::named("snap").machines(THREE).up();
    let mut checks = Checks::new();
    for m in ["alpha", "beta", "gamma"] {
        out(&c, m, "echo before > /tmp/mark");
    }
    let t = Instant::now();
    let s = json(&c, &["snapshot", "ready"]);
    eprintln!("snapshot of 3 machines: {:.2} s", t.elapsed().as_secs_f64());
    checks.check("the snapshot's report", || {
        assert_eq!(s["tag"], "ready");
        assert_eq!(s["machines"].as_array().unwrap().len(), 3, "{s}");
        assert_eq!(s["stopped"], false);
        assert!(
            s["run_id"].as_i64().is_some(),
            "its systems are pinned: {s}"
        );
        for m in s["machines"].as_array().unwrap() {
            assert!(m["files"]["state"].as_u64().unwrap() > 0, "{m}");
        }
    });
    let ready_run = s["run_id"].clone();
    checks.check("the machines run on after a snapshot", || {
        assert_eq!(out(&c, "alpha", "cat /tmp/mark"), "before\n");
    });
    checks.check("snapshots lists it", || {
        let l = json(&c, &["snapshots"]);
        assert_eq!(l[0]["tag"], "ready", "{l}");
        assert_eq!(
            l[0]["machines"],
            serde_json::json!(["alpha", "beta", "gamma"])
        );
        assert!(l[0]["problem"].is_null(), "{l}");
    });
    // Something changes after the snapshot; the restore takes it back.
    out(&c, "alpha", "echo after > /tmp/mark");
    out(&c, "beta", "touch /tmp/new");
    let before = c.qemu_pids();
    let t = Instant::now();
    let r = json(&c, &["restore", "ready"]);
    eprintln!(
        "restore of 3 machines: {:.2} s (owner: {})",
        t.elapsed().as_secs_f64(),
        r["restore_secs"]
    );
    checks.check("restored: the state after the snapshot is gone", || {
        assert!(r["stopped_first_secs"].as_f64().is_some(), "{r}");
        assert_eq!(out(&c, "alpha", "cat /tmp/mark"), "before\n");
        assert_eq!(out(&c, "beta", "ls /tmp/new 2>/dev/null; echo ."), ".\n");
        assert_ne!(c.qemu_pids(), before, "new QEMUs");
    });
    checks.check("restored: every machine answers and the VLAN works", || {
        for m in ["alpha", "beta", "gamma"] {
            assert_eq!(out(&c, m, "hostname"), format!("{m}\n"));
        }
        let o = c.exec("alpha", "30", "timeout 10 wget -qO- http://gamma/");
        assert_eq!(text(&o.stdout), "hello from gamma\n", "{}", text(&o.stderr));
    });
    checks.check("restored: the guest's clock is the host's", || {
        let guest: i64 = out(&c, "beta", "date +%s").trim().parse().unwrap();
        let host = drydock_gc::epoch_secs();
        assert!((guest - host).abs() <= 5, "guest {guest}, host {host}");
    });
    checks.check("a second restore in a row", || {
        out(&c, "gamma", "echo again > /tmp/mark");
        json(&c, &["restore", "ready"]);
        assert_eq!(out(&c, "gamma", "cat /tmp/mark"), "before\n");
    });
    // A hot reload after a restore switches a machine; a snapshot of the switched system.
    let switched = THREE.replace(
        "beta = { system = sys { };",
        r#"beta = { system = sys { www = "beta v2"; };"#,
    );
    c.set_machines(&switched);
    let up = c.verb("up").args(["--accel", "tcg"]).run();
    assert!(up.status.success(), "reload: {}", text(&up.stderr));
    checks.check("a reload after a restore switches beta", || {
        assert_eq!(out(&c, "alpha", "wget -qO- http://beta/"), "beta v2\n");
    });
    json(&c, &["snapshot", "switched"]);
    checks.check("restores of the old and the switched system", || {
        json(&c, &["restore", "ready"]);
        assert_eq!(
            out(&c, "alpha", "wget -qO- http://beta/"),
            "hello from beta\n"
        );
        json(&c, &["restore", "switched"]);
        assert_eq!(out(&c, "alpha", "wget -qO- http://beta/"), "beta v2\n");
    });
    // --stop: saved, then nothing runs; a restore from nothing running.
    let s = json(&c, &["snapshot", "--stop", "stopped"]);
    assert_eq!(s["stopped"], true);
    wait_no_processes(c.state(), Duration::from_secs(60));
    checks.check("--stop leaves the cluster down", || {
        assert!(!c.state().join("clusters/snap/cluster.json").exists());
    });
    let r = json(&c, &["restore", "stopped"]);
    checks.check("a restore from nothing running", || {
        assert!(r["stopped_first_secs"].is_null(), "{r}");
        assert_eq!(out(&c, "beta", "cat /tmp/mark"), "before\n");
        assert_eq!(out(&c, "alpha", "wget -qO- http://beta/"), "beta v2\n");
    });
    // gc: once only the snapshots hold the systems (the machines' runs collected), `gc --all`
    // keeps them, and a restore still works.
    c.down();
    let runs = c.drydock().args(["--json", "runs"]).run();
    assert!(runs.status.success(), "runs: {}", text(&runs.stderr));
    let runs: serde_json::Value = serde_json::from_slice(&runs.stdout).unwrap();
    let machine_runs: Vec<String> = runs["runs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            r["name"]
                .as_str()
                .unwrap_or("")
                .starts_with("machines of snap")
        })
        .map(|r| r["id"].to_string())
        .collect();
    assert!(!machine_runs.is_empty(), "{runs}");
    let mut gc = c.drydock().arg("gc");
    for id in &machine_runs {
        gc = gc.args(["--run", id]);
    }
    let g = gc.run();
    assert!(g.status.success(), "gc --run: {}", text(&g.stderr));
    let g = c.drydock().args(["gc", "--all"]).run();
    assert!(g.status.success(), "gc --all: {}", text(&g.stderr));
    checks.check("gc --all keeps what only a snapshot holds", || {
        json(&c, &["restore", "ready"]);
        assert_eq!(out(&c, "alpha", "cat /tmp/mark"), "before\n");
    });
    checks.check(
        "gc --dry-run shows a snapshot as its run's artifact",
        || {
            let id = s["run_id"].as_i64().unwrap().to_string();
            let g = c
                .drydock()
                .args(["--json", "gc", "--dry-run", "--run", &id])
                .run();
            assert!(g.status.success(), "{}", text(&g.stderr));
            let g: serde_json::Value = serde_json::from_slice(&g.stdout).unwrap();
            let a = &g["artifacts"][0];
            assert!(
                a["path"]
                    .as_str()
                    .unwrap()
                    .ends_with("clusters/snap/snapshots/stopped"),
                "{g}"
            );
            assert!(a["bytes"].as_u64().unwrap() > 0, "{g}");
        },
    );
    checks.check("snapshot --rm", || {
        let r = json(&c, &["snapshot", "--rm", "switched"]);
        assert!(r["bytes"].as_u64().unwrap() > 0, "{r}");
        let l = json(&c, &["snapshots"]);
        let tags: Vec<&str> = l
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["tag"].as_str().unwrap())
            .collect();
        assert_eq!(tags, ["ready", "stopped"], "{l}");
    });
    checks.check(
        "a tag taken again replaces it: a gc of the old snapshot's run leaves the new one",
        || {
            let old = ready_run.to_string();
            let again = json(&c, &["snapshot", "ready"]);
            assert_ne!(again["run_id"].to_string(), old, "{again}");
            let g = c.drydock().args(["gc", "--run", &old]).run();
            assert!(g.status.success(), "gc --run {old}: {}", text(&g.stderr));
            json(&c, &["restore", "ready"]);
            assert_eq!(out(&c, "alpha", "cat /tmp/mark"), "before\n");
        },
    );
    c.down();
}

#[test]
fn bad_snapshots_and_ctrl_c_leave_nothing_running() {
    let c = Cluster::named("snapbad")
        .machines(
            "alpha = { system = sys { }; memorySize = 256; };
             beta = { system = sys { }; memorySize = 256; };",
        )
        .up();
    let mut checks = Checks::new();
    json(&c, &["snapshot", "good"]);
    json(&c, &["snapshot", "--stop", "broken"]);
    wait_no_processes(c.state(), Duration::from_secs(60));
    checks.check("an unknown tag is exit 2 naming the tags there are", || {
        let r = c.verb("restore").arg("nope").run();
        assert_eq!(r.status.code(), Some(2), "{}", text(&r.stderr));
        assert!(
            text(&r.stderr).contains("has no snapshot \"nope\" (it has broken, good)"),
            "{}",
            text(&r.stderr)
        );
    });
    // A truncated state file: exit 1 naming it, nothing running.
    let state = c
        .state()
        .join("clusters/snapbad/snapshots/broken/machines/beta/state");
    let len = std::fs::metadata(&state).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&state)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    checks.check("a truncated snapshot is exit 1 naming its file", || {
        let r = c.verb("restore").arg("broken").run();
        assert_eq!(r.status.code(), Some(1), "{}", text(&r.stderr));
        assert!(
            text(&r.stderr).contains(&state.display().to_string()),
            "{}",
            text(&r.stderr)
        );
        assert_eq!(running_qemus(&c), 0);
    });
    // Ctrl-C while the machines load their state: everything stops.
    checks.check("Ctrl-C during a restore leaves nothing running", || {
        let mut r = c.verb("restore").arg("good").spawn();
        wait_until("a QEMU loads its state", Duration::from_secs(30), || {
            running_qemus(&c) > 0 || r.try_wait().unwrap().is_some()
        });
        r.signal(libc::SIGINT);
        let status = r.wait_within(Duration::from_secs(120));
        assert_eq!(status.code(), Some(130));
        wait_no_processes(c.state(), Duration::from_secs(60));
        assert!(!c.state().join("clusters/snapbad/cluster.json").exists());
    });
    // Another layout (a machine added and brought up): exit 2 naming it; the cluster stays as
    // it was.
    c.set_machines(
        "alpha = { system = sys { }; memorySize = 256; };
         beta = { system = sys { }; memorySize = 256; };
         gamma = { system = sys { }; memorySize = 256; };",
    );
    c.up_detached();
    let pids = c.qemu_pids();
    checks.check(
        "a snapshot of another layout is exit 2 naming the difference",
        || {
            let r = c.verb("restore").arg("good").run();
            assert_eq!(r.status.code(), Some(2), "{}", text(&r.stderr));
            assert!(
                text(&r.stderr).contains("machine gamma is new"),
                "{}",
                text(&r.stderr)
            );
            assert_eq!(c.qemu_pids(), pids, "the cluster was left as it was");
        },
    );
    c.down();
}

/// The issue's case: a formed 3-member etcd cluster (Debian's etcd, data on each machine's
/// disk) snapshotted, a key written, restored: the key is gone, every member is healthy and
/// serves writes, `exec` works on every machine; and a second restore in a row.
#[test]
fn an_etcd_cluster_comes_back_formed_without_what_was_written_after() {
    vmcommon::etcd_guest_ready();
    let c = Cluster::named("etcdsnap")
        .composition(&vmcommon::etcd_composition(3, ""))
        .up();
    let formed = vmcommon::etcd_wait_healthy(&c, 3, Duration::from_secs(180));
    eprintln!(
        "etcd: 3 members healthy {:.1} s after up",
        formed.as_secs_f64()
    );
    vmcommon::etcd_put(&c, "etcd1", "base", "1");
    json(&c, &["snapshot", "formed"]);
    let mut checks = Checks::new();
    for round in 1..=2 {
        vmcommon::etcd_put(&c, "etcd2", "later", "2");
        assert_eq!(
            vmcommon::etcd_get(&c, "etcd3", "later").as_deref(),
            Some("2")
        );
        let t = Instant::now();
        json(&c, &["restore", "formed"]);
        let restored = t.elapsed();
        let healthy = vmcommon::etcd_wait_healthy(&c, 3, Duration::from_secs(60));
        eprintln!(
            "etcd, restore {round}: {:.2} s, then healthy after {:.2} s more",
            restored.as_secs_f64(),
            healthy.as_secs_f64()
        );
        checks.check(
            &format!("restore {round}: formed, without the later key"),
            || {
                assert_eq!(
                    vmcommon::etcd_members(&c, "etcd2"),
                    vmcommon::etcd_machines(3)
                );
                assert_eq!(vmcommon::etcd_get(&c, "etcd3", "later"), None);
                assert_eq!(
                    vmcommon::etcd_get(&c, "etcd1", "base").as_deref(),
                    Some("1")
                );
                for m in vmcommon::etcd_machines(3) {
                    assert_eq!(out(&c, &m, "hostname"), format!("{m}\n"));
                }
            },
        );
        checks.check(&format!("restore {round}: it serves writes"), || {
            vmcommon::etcd_put(&c, "etcd3", "after", "3");
            assert_eq!(
                vmcommon::etcd_get(&c, "etcd1", "after").as_deref(),
                Some("3")
            );
        });
    }
    c.down();
}

/// `drydock test --from TAG`: the cluster is put back to the snapshot before the script runs
/// (what was written after it is gone), the composition as it is now is applied, and the
/// restored cluster stays up afterwards.
#[test]
fn test_from_a_snapshot_runs_the_script_on_the_snapshots_state() {
    let c = Cluster::named("snaptest")
        .machines("solo = { system = sys { }; memorySize = 256; };")
        .up();
    out(&c, "solo", "echo clean > /tmp/state");
    json(&c, &["snapshot", "clean"]);
    out(&c, "solo", "echo dirty > /tmp/state");
    let script = c.dir().join("check.py");
    std::fs::write(
        &script,
        "start_all()\nwith subtest(\"the snapshot's state\"):\n    t.assertEqual(solo.succeed(\"cat /tmp/state\"), \"clean\\n\")\n    solo.succeed(\"echo dirty > /tmp/state\")\n",
    )
    .unwrap();
    for run in 1..=2 {
        let r = c
            .verb("test")
            .arg(&script)
            .args(["--from", "clean", "--accel", "tcg"])
            .run();
        assert!(r.status.success(), "run {run}: {}", text(&r.stderr));
        assert!(
            text(&r.stderr).contains("put back to snapshot \"clean\""),
            "{}",
            text(&r.stderr)
        );
    }
    assert_eq!(
        out(&c, "solo", "cat /tmp/state"),
        "dirty\n",
        "left up as the script left it"
    );
    let r = c.verb("test").arg(&script).args(["--from", "nope"]).run();
    assert_eq!(r.status.code(), Some(2), "{}", text(&r.stderr));
    assert!(
        text(&r.stderr).contains("--from nope"),
        "{}",
        text(&r.stderr)
    );
    c.down();
}
