//! Hot reload against real QEMU (TCG) and test systems built by `drydock up` into a private
//! chroot store, on one 3-machine cluster: a changed service content is a `switch` (the guest
//! serves the new content, no machine's uptime resets, the old system is collectable and the new
//! one pinned), a kernel parameter is a `restart`, an added and a removed machine are `create` and
//! `remove` (the new one on the network, with the others), a `switch-to-configuration` that fails
//! makes `up` exit 1 with the machine still answering, and under `--watch` a syntax error changes
//! nothing while the next good edit applies. A foreground `up --watch` owns its cluster: an edit
//! switches its machine in place, its console is echoed, and Ctrl-C stops everything (exit 130).
//! A switch whose new system restarts the guest's backdoor (the test system's
//! `backdoorRevision`, as NixOS restarts a changed `backdoor.service`) runs on outside the
//! backdoor, is waited for through the new backdoor, and `exec` works right after.
//! Nothing is left running (checked over /proc).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::{Checks, Ran};
use crate::vmcommon;
use vmcommon::{Cluster, actions, row, text, up_json, wait_no_processes, wait_until};

/// The composition's variable parts.
#[derive(Clone)]
struct Edit {
    beta_www: &'static str,
    beta_activation: &'static str,
    gamma_params: &'static str,
    zed: bool,
}

const FIRST: Edit = Edit {
    beta_www: "beta v1",
    beta_activation: "",
    gamma_params: "console=ttyS0 panic=-1 quiet loglevel=4",
    zed: false,
};

/// The machines of the composition `e`.
fn machines(e: &Edit) -> String {
    let zed = if e.zed {
        "zed = { system = sys { }; memorySize = 256; };"
    } else {
        ""
    };
    format!(
        r#"
  alpha = {{ system = sys {{ www = "alpha v1"; }}; memorySize = 256; }};
  beta = {{ system = sys {{ www = "{bw}"; activation = "{ba}"; }}; memorySize = 256; }};
  gamma = {{ system = sys {{ www = "gamma v1"; kernelParams = "{gp}"; }}; memorySize = 256; }};
  {zed}
"#,
        bw = e.beta_www,
        ba = e.beta_activation,
        gp = e.gamma_params,
    )
}

/// The reload test's own chroot store: the cluster tests run `gc --all` on theirs, which would
/// collect this test's old systems before it looks at them.
fn store() -> PathBuf {
    vmcommon::created(Path::new(env!("CARGO_TARGET_TMPDIR")).join("drydock-reload-store"))
}

fn exec(c: &Cluster, machine: &str, cmd: &str) -> Ran {
    c.exec(machine, "60", cmd)
}

fn stdout_of(c: &Cluster, machine: &str, cmd: &str) -> String {
    let o = exec(c, machine, cmd);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{machine}: {cmd}: {}",
        text(&o.stderr)
    );
    text(&o.stdout)
}

fn machine<'a>(v: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    v["machines"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["machine"] == name)
        .unwrap()
}

fn uptime(c: &Cluster, m: &str) -> f64 {
    let s = stdout_of(c, m, "cut -d' ' -f1 /proc/uptime");
    s.trim().parse().unwrap()
}

fn collectable(c: &Cluster) -> Vec<String> {
    let o = c
        .drydock()
        .args(["--json", "gc", "--all", "--dry-run"])
        .run();
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["paths"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn hot_reload_switches_restarts_creates_removes_and_watches() {
    // One 3-machine cluster goes through every edit below, each starting from the cluster the
    // edit before left, so the steps cannot be separate tests without a boot each. Instead each
    // reload itself (its exit code, and what the next steps read from its report) is asserted
    // hard: the steps after it assume it happened. What is checked about its effects is soft
    // (common::Checks): every wrong effect is reported, not only the first, and the test fails
    // at the end listing them all.
    let c = Cluster::named("rl")
        .store(store())
        .machines(&machines(&FIRST))
        .up();
    let mut checks = Checks::new();
    let before = c.qemu_pids();
    assert_eq!(before.len(), 3);
    let up0: Vec<f64> = ["alpha", "beta", "gamma"]
        .iter()
        .map(|m| uptime(&c, m))
        .collect();
    checks.check("alpha reaches beta's service", || {
        assert_eq!(
            stdout_of(&c, "alpha", "wget -qO- http://beta/"),
            "beta v1\n"
        );
    });

    // 1. Only beta's service content changes: the plan (dry run first) switches beta alone.
    let e2 = Edit {
        beta_www: "beta v2",
        ..FIRST
    };
    c.set_machines(&machines(&e2));
    checks.check("1: a dry run plans the switch of beta alone", || {
        let (code, v, err) = up_json(&c, &["--dry-run"]);
        assert_eq!(code, Some(0), "{err}");
        assert_eq!(
            actions(&v),
            [
                row("alpha", "keep", "planned"),
                row("beta", "switch", "planned"),
                row("gamma", "keep", "planned")
            ],
            "{v}"
        );
    });
    checks.check(
        "1: --restart turns the switch into a restart, and leaves the keeps alone",
        || {
            let (code, v, err) = up_json(&c, &["--dry-run", "--restart"]);
            assert_eq!(code, Some(0), "{err}");
            assert_eq!(
                actions(&v),
                [
                    row("alpha", "keep", "planned"),
                    row("beta", "restart", "planned"),
                    row("gamma", "keep", "planned")
                ],
                "{v}"
            );
        },
    );
    checks.check("1: a dry run changes nothing", || {
        assert_eq!(
            stdout_of(&c, "beta", "wget -qO- http://localhost/"),
            "beta v1\n",
            "a dry run changes nothing"
        );
    });
    let (code, v, err) = up_json(&c, &[]);
    assert_eq!(code, Some(0), "{err}");
    checks.check("1: the switch of beta is done", || {
        assert_eq!(
            actions(&v),
            [
                row("alpha", "keep", "planned"),
                row("beta", "switch", "done"),
                row("gamma", "keep", "planned")
            ],
            "{v}\n{err}"
        );
    });
    checks.check(
        "1: the plan is printed before it is applied, the switch streamed",
        || {
            let plan_at = err.find("switch   beta").unwrap_or(usize::MAX);
            let streamed_at = err.find("│ activating").unwrap_or(usize::MAX);
            assert!(plan_at < streamed_at && streamed_at < usize::MAX, "{err}");
        },
    );
    let (old_beta, new_beta) = (
        machine(&v, "beta")["from"].as_str().unwrap().to_string(),
        machine(&v, "beta")["to"].as_str().unwrap().to_string(),
    );
    assert_ne!(old_beta, new_beta);
    checks.check(
        "1: beta serves the new content and runs the new system",
        || {
            assert_eq!(
                stdout_of(&c, "alpha", "wget -qO- http://beta/"),
                "beta v2\n"
            );
            assert_eq!(
                stdout_of(&c, "beta", "readlink /run/current-system"),
                format!("{new_beta}\n")
            );
        },
    );
    checks.check("1: no machine rebooted", || {
        // Same QEMU processes, guest uptimes carried on.
        assert_eq!(c.qemu_pids(), before);
        for (i, m) in ["alpha", "beta", "gamma"].iter().enumerate() {
            let now = uptime(&c, m);
            assert!(now > up0[i], "{m}: uptime {now} after {}", up0[i]);
        }
    });
    checks.check("1: the launch record names the new system", || {
        // A `vm restart` boots it.
        let rec: serde_json::Value = serde_json::from_slice(
            &std::fs::read(c.state().join("vms/rl.beta/launch.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(rec["toplevel"], new_beta.as_str());
        assert!(
            rec["spec"]["cmdline"]
                .as_str()
                .unwrap()
                .contains(&format!("init={new_beta}/init"))
        );
    });
    checks.check("1: the pin moved to the new system", || {
        let dead = collectable(&c);
        assert!(
            dead.contains(&old_beta),
            "the old system is collectable: {dead:?}"
        );
        assert!(!dead.contains(&new_beta), "the new system is pinned");
    });
    checks.check("1: the guest sees the new closure only", || {
        // The old system is hidden again.
        let listing = stdout_of(&c, "beta", "ls /nix/store");
        let old_base = old_beta.trim_start_matches("/nix/store/");
        let new_base = new_beta.trim_start_matches("/nix/store/");
        assert!(
            listing.contains(new_base) && !listing.contains(old_base),
            "{listing}"
        );
    });

    // 2. A kernel parameter of gamma (restart), and a new machine zed (create).
    let e3 = Edit {
        gamma_params: "console=ttyS0 panic=-1 quiet loglevel=5",
        zed: true,
        ..e2.clone()
    };
    c.set_machines(&machines(&e3));
    let (code, v, err) = up_json(&c, &[]);
    assert_eq!(code, Some(0), "{err}");
    checks.check(
        "2: gamma restarts for its kernel parameter, zed is created",
        || {
            assert_eq!(
                actions(&v),
                [
                    row("alpha", "keep", "planned"),
                    row("beta", "keep", "planned"),
                    row("gamma", "restart", "done"),
                    row("zed", "create", "done")
                ],
                "{v}\n{err}"
            );
            assert!(
                machine(&v, "gamma")["why"]
                    .as_str()
                    .unwrap()
                    .contains("kernel-params"),
                "{v}"
            );
        },
    );
    checks.check("2: only gamma restarted", || {
        let after = c.qemu_pids();
        assert_eq!(after.len(), 4);
        assert_eq!(after[0], before[0], "alpha untouched");
        assert_eq!(after[1], before[1], "beta untouched");
        assert_ne!(after[2], before[2], "gamma restarted");
    });
    checks.check("2: gamma booted the new kernel-params", || {
        assert!(
            stdout_of(&c, "gamma", "cat /proc/cmdline").contains("loglevel=5"),
            "gamma booted the new kernel-params"
        );
    });
    checks.check(
        "2: the restarted and the new machine are on the network",
        || {
            // zed by name (its hosts table is the new one), alpha reaches zed (192.168.1.4) and
            // gamma.
            assert_eq!(
                stdout_of(&c, "zed", "wget -qO- http://alpha/"),
                "alpha v1\n"
            );
            assert_eq!(
                stdout_of(&c, "alpha", "wget -qO- http://192.168.1.4/"),
                "hello from zed\n"
            );
            assert_eq!(
                stdout_of(&c, "alpha", "wget -qO- http://gamma/"),
                "gamma v1\n"
            );
        },
    );

    // 3. zed goes (remove), and beta's new system fails to activate: up exits 1 and says why,
    // beta keeps running its old system and answers.
    let e4 = Edit {
        beta_www: "beta v3",
        beta_activation: "echo broken activation; exit 1",
        zed: false,
        ..e3.clone()
    };
    c.set_machines(&machines(&e4));
    let (code, v, err) = up_json(&c, &[]);
    assert_eq!(code, Some(1), "{v}\n{err}");
    checks.check(
        "3: zed is removed, beta's switch failed and says why",
        || {
            assert_eq!(
                actions(&v),
                [
                    row("alpha", "keep", "planned"),
                    row("beta", "switch", "failed"),
                    row("gamma", "keep", "planned"),
                    row("zed", "remove", "done")
                ],
                "{v}\n{err}"
            );
            assert!(
                machine(&v, "beta")["output"]
                    .as_str()
                    .unwrap()
                    .contains("broken activation"),
                "{v}"
            );
            assert!(err.contains("broken activation"), "{err}");
        },
    );
    checks.check("3: beta still serves its old content", || {
        assert_eq!(
            stdout_of(&c, "beta", "wget -qO- http://localhost/"),
            "beta v2\n"
        );
    });
    let rows = c.qemu_pids();
    checks.check("3: beta is still the same VM, zed is gone", || {
        assert_eq!(rows.len(), 3, "{rows:?}");
        assert_eq!(rows[1], before[1], "beta still the same VM");
    });
    checks.check("3: a failed switch keeps the launch record", || {
        let rec: serde_json::Value = serde_json::from_slice(
            &std::fs::read(c.state().join("vms/rl.beta/launch.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            rec["toplevel"],
            new_beta.as_str(),
            "a failed switch keeps the record"
        );
    });

    // 4. --watch on the running cluster: its first cycle applies the fixed composition, a syntax
    // error is reported and changes nothing, the next good edit applies.
    let e5 = Edit {
        beta_www: "beta v4",
        beta_activation: "",
        ..e4.clone()
    };
    c.set_machines(&machines(&e5));
    let log = c.dir().join("watch.log");
    let mut watch = c
        .verb("up")
        .args(["--watch", "--accel", "tcg", "--timeout", "300"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn();
    let said =
        |what: &str, n: usize| std::fs::read_to_string(&log).unwrap().matches(what).count() >= n;
    wait_until("the first watched reload", Duration::from_secs(120), || {
        said("waiting for the next change", 1)
    });
    checks.check(
        "4: the watch's first cycle applied the fixed composition",
        || {
            assert_eq!(
                stdout_of(&c, "beta", "wget -qO- http://localhost/"),
                "beta v4\n"
            );
        },
    );
    std::fs::write(c.file(), "{ machines = { ; }").unwrap();
    wait_until(
        "the syntax error is reported",
        Duration::from_secs(60),
        || said("waiting for the next change", 2),
    );
    checks.check("4: a syntax error is reported and changes nothing", || {
        let l = std::fs::read_to_string(&log).unwrap();
        assert!(
            l.contains("syntax error") && l.contains("nothing changed"),
            "{l}"
        );
        assert_eq!(c.qemu_pids(), rows, "the cluster is unchanged");
    });
    let e6 = Edit {
        beta_www: "beta v5",
        ..e5.clone()
    };
    let t = Instant::now();
    c.set_machines(&machines(&e6));
    checks.check("4: the next good edit applies", || {
        wait_until("the good edit applies", Duration::from_secs(120), || {
            exec(&c, "beta", "wget -qO- http://localhost/").stdout == b"beta v5\n"
        });
        eprintln!(
            "--watch: edit to applied in {:.2} s",
            t.elapsed().as_secs_f64()
        );
    });
    watch.signal(libc::SIGINT);
    let t = Instant::now();
    while watch.try_wait().unwrap().is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the watch did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    checks.check("4: the cluster stays up after the watch", || {
        assert_eq!(c.qemu_pids(), rows, "the cluster stays up after the watch");
    });

    c.down();
}

/// A one-machine composition whose service serves `www`.
fn solo(www: &str) -> String {
    format!(r#"solo = {{ system = sys {{ www = "{www}"; }}; memorySize = 256; }};"#)
}

#[test]
fn a_foreground_watch_switches_its_own_cluster_and_ctrl_c_stops_it() {
    vmcommon::guest_ready();
    let c = Cluster::named("fw")
        .store(store())
        .machines(&solo("solo v1"))
        .write();
    let (out, err) = (c.dir().join("up.out"), c.dir().join("up.err"));
    let mut up = c
        .verb("up")
        .args(["--watch", "--accel", "tcg", "--timeout", "300"])
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn();
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    wait_until("the cluster is up", Duration::from_secs(300), || {
        assert!(up.try_wait().unwrap().is_none(), "up ended: {}", read(&err));
        read(&err).contains("Ctrl-C stops it")
    });
    assert_eq!(
        stdout_of(&c, "solo", "wget -qO- http://localhost/"),
        "solo v1\n"
    );
    let before = c.qemu_pids();
    c.set_machines(&solo("solo v2"));
    wait_until("the edit is applied", Duration::from_secs(180), || {
        exec(&c, "solo", "wget -qO- http://localhost/").stdout == b"solo v2\n"
    });
    wait_until("the reload is reported", Duration::from_secs(30), || {
        read(&err).contains("reload applied")
    });
    let (o, e) = (read(&out), read(&err));
    assert!(e.contains("changed: ") && e.contains("drydock.nix"), "{e}");
    assert!(
        o.contains("plan for cluster fw") && o.contains("switch") && o.contains("solo │ "),
        "the plan and the echoed console on stdout: {o}"
    );
    assert_eq!(c.qemu_pids(), before, "switched in place, not restarted");
    up.signal(libc::SIGINT);
    let t = Instant::now();
    let status = loop {
        if let Some(s) = up.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "up did not stop");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(130), "{}", read(&err));
    assert!(read(&err).contains("cluster fw stopped"), "{}", read(&err));
    wait_no_processes(c.state(), Duration::from_secs(30));
}

/// A one-machine composition whose backdoor has the revision `rev`.
fn with_backdoor(rev: &str) -> String {
    format!(r#"solo = {{ system = sys {{ backdoorRevision = "{rev}"; }}; memorySize = 256; }};"#)
}

/// The session of the backdoor shell that runs an `exec` (the parent of the command's shell).
const BACKDOOR_SESSION: &str = r#"st=$(cat /proc/$$/stat); set -- ${st##*) }; echo $4"#;

#[test]
fn a_switch_that_restarts_the_backdoor_runs_on_and_exec_works_after() {
    let c = Cluster::named("br")
        .store(store())
        .machines(&with_backdoor("1"))
        .up();
    let before = c.qemu_pids();
    let old_backdoor = stdout_of(&c, "solo", "cat /run/drydock/backdoor.pid");
    assert_eq!(
        stdout_of(&c, "solo", BACKDOOR_SESSION),
        old_backdoor,
        "exec runs in the backdoor's session"
    );
    assert_eq!(
        stdout_of(&c, "solo", "cat /run/drydock/backdoor.revision"),
        "1"
    );

    // Only the backdoor's revision changes: a switch, and the new system restarts the backdoor,
    // killing every process of its session (the call that started the switch with them).
    c.set_machines(&with_backdoor("2"));
    let t = Instant::now();
    let (code, v, err) = up_json(&c, &[]);
    eprintln!(
        "a switch that restarts the backdoor: up took {:.1} s",
        t.elapsed().as_secs_f64()
    );
    assert_eq!(code, Some(0), "{v}\n{err}");
    assert_eq!(actions(&v), [row("solo", "switch", "done")], "{v}\n{err}");
    let new_top = machine(&v, "solo")["to"].as_str().unwrap().to_string();
    let output = machine(&v, "solo")["output"].as_str().unwrap_or_default();
    assert!(
        output.contains(&format!("activating {new_top}"))
            && output.contains("restarting the backdoor"),
        "the switch's whole output, through the new backdoor: {v}"
    );
    assert!(err.contains("│ restarting the backdoor"), "streamed: {err}");

    // Right after: exec works, in the new backdoor's session, on the new system, same VM.
    let new_backdoor = stdout_of(&c, "solo", "cat /run/drydock/backdoor.pid");
    assert_ne!(new_backdoor, old_backdoor, "the backdoor was restarted");
    assert_eq!(stdout_of(&c, "solo", BACKDOOR_SESSION), new_backdoor);
    assert_eq!(
        stdout_of(&c, "solo", "cat /run/drydock/backdoor.revision"),
        "2"
    );
    assert_eq!(
        stdout_of(&c, "solo", "readlink /run/current-system"),
        format!("{new_top}\n")
    );
    assert_eq!(c.qemu_pids(), before, "switched in place, not restarted");
    // Nothing of the old backdoor's session is left, and the switch's folder is gone.
    let old_session = format!(
        r#"for f in /proc/[0-9]*/stat; do read -r st <$f && set -- ${{st##*) }} && [ "$4" = {} ] && [ "$1" != Z ] && echo "$f"; done; ls -d /tmp/drydock-switch-* 2>/dev/null; true"#,
        old_backdoor.trim()
    );
    assert_eq!(stdout_of(&c, "solo", &old_session), "");
    let launch: serde_json::Value =
        serde_json::from_slice(&std::fs::read(c.state().join("vms/br.solo/launch.json")).unwrap())
            .unwrap();
    assert_eq!(launch["toplevel"], new_top.as_str());
    c.down();
}
