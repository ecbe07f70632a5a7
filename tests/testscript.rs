//! `drydock test` against real QEMU (TCG) and drydock's busybox test guest, in a chroot store of
//! its own: a script in the NixOS test driver's style against a 3-machine cluster that `test`
//! starts itself (no machine booted until `start_all()`): a service that starts late, ports,
//! outputs, `fail`, `execute`, the network between machines, `copy_from_host`, `crash()` and
//! `start()`, `block()` and `unblock()`, `wait_for_unit` on a guest without systemd, and a nested
//! subtest that fails (exit 1, the failing line named, JUnit with the failure and the passing
//! subtests). The cluster is kept (`--keep`): a script run twice against it reuses its machines
//! (boot ids unchanged), a wait that times out and a script past `--timeout` are exit 1, named.
//! A script that does not parse is exit 2 before anything starts. Under `--watch`, an edit of a
//! machine's service switches it and the script runs again and passes; Ctrl-C in the middle of a
//! run is exit 130 and the machines the run started are gone. Nothing is left running.
//!
//! The busybox guest here has no systemd, so `wait_for_unit` is checked for its error there;
//! `wait_for_unit_and_systemctl_on_systemd_nodes` waits for real units on systemd nodes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::Checks;
use crate::vmcommon;
use vmcommon::{Cluster, text, wait_no_processes, wait_until};

/// This module's own chroot store (the cluster tests collect theirs with `gc --all`).
fn store() -> PathBuf {
    vmcommon::created(Path::new(env!("CARGO_TARGET_TMPDIR")).join("drydock-testscript-store"))
}

/// Three machines: a server whose web service on port 8080 starts 4 s after boot, two clients.
const MACHINES: &str = r#"
  server = { system = sys { services = "sleep 4; mkdir -p /srv/late; echo late > /srv/late/index.html; httpd -f -p 8080 -h /srv/late"; }; memorySize = 256; };
  client1 = { system = sys { }; memorySize = 256; };
  client2 = { system = sys { }; memorySize = 256; };
"#;

/// The script, in the driver's style; `HOSTFILE` is replaced by a file of the host.
const SCRIPT: &str = r#"start_all()
with subtest("a service that starts late"):
    server.wait_until_succeeds("wget -q -O - http://localhost:8080/ | grep -q late")
    server.wait_for_open_port(8080)
    server.wait_for_closed_port(8081, timeout=30)
with subtest("commands"):
    t.assertEqual(server.succeed("echo hello"), "hello\n")
    t.assertEqual(server.succeed("echo a", "echo b"), "a\nb\n")
    client1.fail("false", "exit 3")
    status, out = client1.execute("echo out; exit 7")
    assert (status, out) == (7, "out\n"), (status, out)
    client1.fail("false | true")
with subtest("the network between machines"):
    client1.wait_until_succeeds("wget -q -O - http://server:8080/ | grep -q late")
    client2.succeed("ping -c 1 -W 5 client1")
with subtest("copy from the host"):
    client2.copy_from_host("HOSTFILE", "/tmp/in/copied")
    t.assertEqual(client2.succeed("cat /tmp/in/copied"), "from the host\n")
with subtest("crash and start"):
    before = client2.succeed("cat /proc/sys/kernel/random/boot_id")
    client2.crash()
    client2.start()
    t.assertNotEqual(client2.succeed("cat /proc/sys/kernel/random/boot_id"), before)
with subtest("block and unblock"):
    server.block()
    client1.fail("ping -c 1 -W 2 server")
    server.unblock()
    client1.wait_until_succeeds("ping -c 1 -W 2 server", timeout=30)
with subtest("no systemd here"):
    # systemd: see wait_for_unit_and_systemctl_on_systemd_nodes
    try:
        server.wait_for_unit("multi-user.target")
        raise Exception("wait_for_unit passed on a guest without systemd")
    except MachineError as e:
        assert "needs systemd" in str(e), str(e)
with subtest("outer"):
    with subtest("inner passes"):
        server.succeed("true")
    with subtest("inner fails"):
        server.succeed("echo '<boom & \"bust\">'; exit 4")
print("not reached")
"#;

/// The line of `SCRIPT` that fails.
fn failing_line() -> usize {
    SCRIPT.lines().position(|l| l.contains("exit 4")).unwrap() + 1
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Every machine's boot id, as a passing script prints them.
const BOOT_IDS: &str = r#"start_all()
for m in machines:
    print("boot id", m.name, m.succeed("cat /proc/sys/kernel/random/boot_id").strip())
"#;

fn boot_ids(stderr: &str) -> Vec<String> {
    let mut ids: Vec<String> = stderr
        .lines()
        .filter(|l| l.starts_with("boot id "))
        .map(str::to_string)
        .collect();
    ids.sort();
    ids
}

#[test]
fn a_driver_style_script_runs_against_three_machines() {
    vmcommon::guest_ready();
    let c = Cluster::named("ts")
        .store(store())
        .machines(MACHINES)
        .write();
    let mut checks = Checks::new();
    let host_file = c.dir().join("from-host.txt");
    std::fs::write(&host_file, "from the host\n").unwrap();
    let script = c.dir().join("test.py");
    std::fs::write(
        &script,
        SCRIPT.replace("HOSTFILE", &host_file.display().to_string()),
    )
    .unwrap();
    let junit = c.dir().join("junit.xml");
    let test = |args: &[&str]| {
        c.drydock()
            .arg("--json")
            .arg("test")
            .arg("-f")
            .arg(c.file())
            .args(["--accel", "tcg"])
            .args(args)
            .timeout(Duration::from_secs(600))
            .run()
    };

    // 1. The cluster is not up: `test` prepares it, boots it through start_all(), keeps it.
    let t = Instant::now();
    let first = test(&[
        script.to_str().unwrap(),
        "--keep",
        "--junit",
        junit.to_str().unwrap(),
    ]);
    eprintln!("the script's run: {:.1} s", t.elapsed().as_secs_f64());
    let err = first.stderr_str();
    assert_eq!(first.code(), Some(1), "{err}");
    checks.check("1: what the user sees", || {
        assert!(
            err.contains("its machines boot as the script starts them"),
            "{err}"
        );
        assert!(err.contains("(3 machines, 0 running)"), "{err}");
        assert!(err.contains("start_all() "), "{err}");
        assert!(err.contains("subtest: commands"), "{err}");
        assert!(err.contains("server: succeed('echo hello') "), "{err}");
        assert!(err.contains("subtest commands: passed in "), "{err}");
        assert!(err.contains("client2: crash() "), "{err}");
        // The failing line of the script, the call, its status and output, the console.
        let line = format!("test.py, line {}: server.succeed(", failing_line());
        assert!(err.contains(&line), "{line}: {err}");
        assert!(err.contains("exit status: 4"), "{err}");
        assert!(err.contains("<boom & \"bust\">"), "{err}");
        assert!(err.contains("the last console lines of server"), "{err}");
        assert!(err.contains("8 subtests passed, 2 failed"), "{err}");
        assert!(!err.contains("not reached"), "{err}");
    });
    checks.check("1: the JSON report", || {
        let r = first.stdout_json();
        assert_eq!(r["ending"], "failed");
        assert_eq!(r["exit"], 1);
        assert_eq!(
            (r["passed"].as_u64(), r["failed"].as_u64()),
            (Some(8), Some(2))
        );
        let f = &r["failure"];
        assert_eq!(f["frames"][0]["line"], failing_line());
        assert_eq!(f["call"]["exec"]["status"], 4);
        assert_eq!(f["call"]["machine"], "server");
    });
    checks.check("1: JUnit: the failure and the passing subtests", || {
        let x = read(&junit);
        assert!(x.contains("<testsuites tests=\"11\" failures=\"3\""), "{x}");
        for ok in [
            "commands",
            "copy from the host",
            "crash and start",
            "outer / inner passes",
        ] {
            assert!(
                x.contains(&format!("<testcase name=\"{ok}\" time=\""))
                    && !x.contains(&format!("<testcase name=\"{ok}\" time=\"0.000\">")),
                "{ok}: {x}"
            );
        }
        let failing = x
            .split("<testcase name=\"outer / inner fails\"")
            .nth(1)
            .unwrap();
        let failing = failing.split("</testcase>").next().unwrap();
        assert!(
            failing.contains("<failure message=\"RequestedAssertionFailed"),
            "{x}"
        );
        // The guest's output, escaped.
        assert!(
            failing.contains("&lt;boom &amp; &quot;bust&quot;&gt;"),
            "{x}"
        );
        assert!(x.contains("<testcase name=\"main\""), "{x}");
    });

    // 2. The cluster is up: the same script twice reuses its machines.
    let boot = c.dir().join("boot.py");
    std::fs::write(&boot, BOOT_IDS).unwrap();
    let a = test(&[boot.to_str().unwrap()]);
    assert_eq!(a.code(), Some(0), "{}", a.stderr_str());
    let b = test(&[boot.to_str().unwrap()]);
    assert_eq!(b.code(), Some(0), "{}", b.stderr_str());
    checks.check("2: a second run reuses the machines", || {
        let (ea, eb) = (a.stderr_str(), b.stderr_str());
        assert!(ea.contains("(3 machines, 3 running)"), "{ea}");
        assert!(!ea.contains("taking down"), "{ea}");
        let (ia, ib) = (boot_ids(&ea), boot_ids(&eb));
        assert_eq!(ia.len(), 3, "{ea}");
        assert_eq!(ia, ib, "the boot ids changed");
        assert_eq!(a.stdout_json()["ending"], "passed");
    });

    // 3. A wait that times out, and a script past --timeout: exit 1, named.
    let wait = c.dir().join("wait.py");
    std::fs::write(&wait, "server.wait_until_succeeds(\"false\", timeout=3)\n").unwrap();
    let w = test(&[wait.to_str().unwrap()]);
    checks.check("3: a wait that times out", || {
        let e = w.stderr_str();
        assert_eq!(w.code(), Some(1), "{e}");
        assert!(
            e.contains("server: wait_until_succeeds('false', timeout=3) FAILED after"),
            "{e}"
        );
        assert!(e.contains("action timed out after"), "{e}");
        assert!(
            e.contains("wait.py, line 1: server.wait_until_succeeds"),
            "{e}"
        );
    });
    let slow = c.dir().join("slow.py");
    std::fs::write(&slow, "client1.sleep(120)\n").unwrap();
    let t = Instant::now();
    let s = test(&[slow.to_str().unwrap(), "--timeout", "5"]);
    checks.check("3: a script past --timeout", || {
        let e = s.stderr_str();
        assert_eq!(s.code(), Some(1), "{e}");
        assert!(t.elapsed() < Duration::from_secs(60), "{e}");
        assert!(e.contains("(--timeout)"), "{e}");
        assert!(e.contains("call: client1: sleep(120)"), "{e}");
        assert_eq!(s.stdout_json()["ending"], "timeout");
    });
    checks.check("3: the machines still answer", || {
        let o = c.exec("client1", "30", "true");
        assert_eq!(o.status.code(), Some(0), "{}", text(&o.stderr));
    });
    c.down();
}

#[test]
fn a_script_that_does_not_parse_is_exit_2_before_anything_starts() {
    let c = Cluster::named("tsyntax")
        .store(store())
        .machines(MACHINES)
        .write();
    let script = c.dir().join("broken.py");
    std::fs::write(&script, "start_all()\nif True:\n    x = (\n").unwrap();
    let r = c
        .verb("test")
        .arg(&script)
        .timeout(Duration::from_secs(120))
        .run();
    let e = r.stderr_str();
    assert_eq!(r.code(), Some(2), "{e}");
    assert!(
        e.contains("broken.py, line 3: SyntaxError: '(' was never closed"),
        "{e}"
    );
    // Nothing was evaluated, built or started.
    assert!(!e.contains("built"), "{e}");
    assert!(
        !c.state().join("clusters/tsyntax/cluster.json").exists(),
        "a cluster was recorded"
    );
    // With --from, too, the script is checked before any snapshot is looked at.
    let r = c
        .verb("test")
        .args([script.to_str().unwrap(), "--from", "base"])
        .run();
    assert_eq!(r.code(), Some(2), "{}", r.stderr_str());
    assert!(r.stderr_str().contains("SyntaxError"), "{}", r.stderr_str());
}

/// One machine serving `www`, and a `testScript` that checks it serves `want` (and, with `sleep`,
/// then sleeps in the guest for that long).
fn watched(www: &str, want: &str, sleep: u32) -> String {
    let sleep = match sleep {
        0 => String::new(),
        s => format!("    with subtest(\"long\"):\n        solo.sleep({s})\n"),
    };
    vmcommon::composition_with(&format!(
        r#"{{
  machines.solo = {{ system = sys {{ www = "{www}"; }}; memorySize = 256; }};
  testScript = ''
    start_all()
    with subtest("serves"):
        solo.wait_until_succeeds("wget -q -O - http://localhost/ | grep -q '{want}'", timeout=60)
{sleep}  '';
}}"#
    ))
}

#[test]
fn watch_runs_again_after_an_edit_switches_a_machine_and_ctrl_c_stops_everything() {
    vmcommon::guest_ready();
    let c = Cluster::named("tw")
        .store(store())
        .composition(&watched("solo v1", "solo v1", 0))
        .write();
    let err = c.dir().join("test.err");
    let mut watch = c
        .verb("test")
        .args(["--watch", "--accel", "tcg"])
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn();
    let said = |what: &str, n: usize| read(&err).matches(what).count() >= n;
    wait_until("the first run passes", Duration::from_secs(300), || {
        assert!(watch.try_wait().unwrap().is_none(), "{}", read(&err));
        said("run 1: passed", 1)
    });
    let before = c.qemu_pids();
    // An edit of the machine's service (and of what the script expects): a switch, and a run.
    let t = Instant::now();
    std::fs::write(c.file(), watched("solo v2", "solo v2", 0)).unwrap();
    wait_until("the second run passes", Duration::from_secs(180), || {
        assert!(watch.try_wait().unwrap().is_none(), "{}", read(&err));
        said("run 2: ", 1)
    });
    eprintln!(
        "--watch: edit to test result in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let e = read(&err);
    assert!(
        e.contains("run 2: passed (1 subtest passed, 0 failed), reload "),
        "{e}"
    );
    assert!(e.contains("switch   solo"), "{e}");
    assert_eq!(c.qemu_pids(), before, "switched in place, not restarted");
    // A run that is in the middle of its script: Ctrl-C stops it and what it started.
    std::fs::write(c.file(), watched("solo v2", "solo v2", 300)).unwrap();
    wait_until(
        "the third run is in its long subtest",
        Duration::from_secs(180),
        || {
            assert!(watch.try_wait().unwrap().is_none(), "{}", read(&err));
            said("subtest: long", 1)
        },
    );
    watch.signal(libc::SIGINT);
    let status = watch.wait_within(Duration::from_secs(120));
    let e = read(&err);
    assert_eq!(status.code(), Some(130), "{e}");
    assert!(e.contains("taking down the cluster tw"), "{e}");
    wait_no_processes(c.state(), Duration::from_secs(30));
    assert!(
        !c.state().join("clusters/tw/cluster.json").exists(),
        "the cluster is still recorded"
    );
}

/// The driver's most used calls on systemd nodes (drydock's nixos-test node with Debian's
/// systemd as PID 1): `wait_for_unit` of a unit that becomes active late, `systemctl`, and a
/// failure of `wait_for_unit` on a unit that failed, named (exit 1).
#[test]
fn wait_for_unit_and_systemctl_on_systemd_nodes() {
    vmcommon::systemd_guest_ready();
    let c = Cluster::named("tsystemd")
        .store(store())
        .composition(&vmcommon::systemd_composition(
            "virtiofs",
            "client = { }; server = { };",
            r#"client = { system = node "client" { }; profile = "nixos-test"; memorySize = 384; };
               server = { system = node "server" { units.late = { type = "oneshot"; remainAfterExit = true; script = "sleep 6"; }; units.broken = { type = "oneshot"; script = "exit 3"; }; }; profile = "nixos-test"; memorySize = 384; };"#,
        ))
        .write();
    let ok = c.dir().join("units.py");
    std::fs::write(
        &ok,
        r#"start_all()
server.wait_for_unit("late.service", timeout=120)
server.wait_for_unit("httpd.service")
client.wait_for_unit("backdoor.service")
status, out = server.systemctl("is-active late.service")
assert status == 0 and out.strip() == "active", (status, out)
client.wait_until_succeeds("wget -q -O - http://server/ | grep -q 'hello from server'")
with subtest("a unit that failed"):
    server.wait_for_unit("broken.service", timeout=60)
"#,
    )
    .unwrap();
    let r = c
        .verb("test")
        .arg(&ok)
        .args(["--accel", "tcg", "--json"])
        .timeout(Duration::from_secs(600))
        .run();
    let e = r.stderr_str();
    assert_eq!(r.code(), Some(1), "{e}");
    assert!(e.contains("broken.service"), "{e}");
    assert!(
        e.contains("wait_for_unit('broken.service'"),
        "the failing call is named: {e}"
    );
    // Every call before the failing subtest held; the one in it failed, named.
    let v: serde_json::Value =
        serde_json::from_slice(&r.stdout).unwrap_or_else(|x| panic!("{x}: {e}"));
    let calls: Vec<(String, bool)> = v["calls"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                format!(
                    "{}({})",
                    c["call"].as_str().unwrap(),
                    c["args"].as_str().unwrap()
                ),
                c["ok"].as_bool().unwrap(),
            )
        })
        .collect();
    let failed: Vec<&String> = calls.iter().filter(|(_, ok)| !ok).map(|(c, _)| c).collect();
    assert_eq!(failed.len(), 1, "{calls:?}");
    assert!(failed[0].contains("broken.service"), "{calls:?}");
    assert!(
        calls
            .iter()
            .any(|(c, ok)| *ok && c.contains("late.service")),
        "{calls:?}"
    );
    assert!(
        calls
            .iter()
            .any(|(c, ok)| *ok && c.starts_with("systemctl")),
        "{calls:?}"
    );
    assert_eq!(v["subtests"][0]["ok"], false, "{v}");
    assert!(
        e.contains("server: wait_for_unit('late.service'"),
        "the late unit was waited for: {e}"
    );
    wait_no_processes(c.state(), Duration::from_secs(60));
}
